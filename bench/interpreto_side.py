"""The Interpreto side of ``bench/attributions.py``: a worker that runs in the scratch venv.

Interpreto 0.5.2 needs ``nnsight<0.8`` and lists CUDA packages as hard requirements, so it
cannot share the project venv. ``bench/attributions.py`` starts this file with the scratch
venv's Python (``/tmp/interpreto-venv/bin/python``, built by ``bench/attributions.py
--setup-only``) and talks to it over a line protocol:

* the driver writes one JSON object per line on this process' **stdin**;
* this process answers each with one JSON object per line on its **stdout**, prefixed with
  ``@@BENCH@@ `` (anything a library prints goes to stderr: ``sys.stdout`` is redirected there).

Commands (``cmd`` field):

``versions``
    ``{"python", "torch", "transformers", "nnsight", "interpreto", "torchvision": null|version,
    "bitsandbytes": null|version, "threads"}``.
``load`` ``{"task": "classification"|"generation", "path": folder, "threads": int}``
    Loads the Hugging Face folder with ``AutoModelForSequenceClassification`` or
    ``AutoModelForCausalLM`` (float32, eval, CPU) and its tokenizer. Answers ``{"ok": true}``.
``run`` ``{"task", "method", "texts", "targets", "granularity", "batch_size", "n"}``
    Builds the Interpreto explainer once per ``(task, method, granularity, batch_size, n)``
    (construction is not timed) and times one call ``explainer(texts, targets)``. Classification
    targets are class indices, generation targets lists of token ids. Answers
    ``{"seconds", "rows", "padded_tokens", "forwards", "n_elements", "n_targets"}`` where rows /
    padded tokens / forwards count what reached ``model.forward`` during the timed call (plus
    ``"scores"`` and ``"elements"`` when the request sets ``"return_scores": true``).
``quit``
    Exits.

Parameter mapping (``n`` is the bench's per-method perturbation or step count):
``Lime``/``KernelShap``/``IntegratedGradients``/``SmoothGrad``/``SquareGrad``/``VarGrad``/
``GradientShap`` get ``n_perturbations=n``; ``Sobol`` gets ``n_token_perturbations=n`` and
``sobol_indices_order=TOTAL_ORDER`` (raylens' Sobol is total-order); ``Occlusion`` and
``Saliency`` take none. Everything else is Interpreto's default (logits, MEAN aggregation).

No raylens import here: this runs in a venv where raylens is not installed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

PREFIX = "@@BENCH@@ "
_OUT = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
sys.stdout = sys.stderr  # library prints must not corrupt the protocol

STATE: dict = {"models": {}, "explainers": {}}
COUNT = {"rows": 0, "padded_tokens": 0, "forwards": 0}


def reply(obj: dict) -> None:
    _OUT.write(PREFIX + json.dumps(obj) + "\n")
    _OUT.flush()


def _count_hook(module, args, kwargs):
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    if x is not None:
        COUNT["rows"] += int(x.shape[0])
        COUNT["padded_tokens"] += int(x.shape[0]) * int(x.shape[1])
        COUNT["forwards"] += 1


def cmd_versions(msg: dict) -> dict:
    import importlib.metadata as md
    import importlib.util

    import torch

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": ver("transformers"),
        "nnsight": ver("nnsight"), "interpreto": ver("interpreto"),
        "torchvision": ver("torchvision") if importlib.util.find_spec("torchvision") else None,
        "bitsandbytes": ver("bitsandbytes") if importlib.util.find_spec("bitsandbytes") else None,
        "nvidia_packages": sorted(d.metadata["Name"] for d in md.distributions()
                                  if (d.metadata["Name"] or "").lower().startswith("nvidia")),
        "threads": torch.get_num_threads(),
    }


def cmd_load(msg: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(int(msg.get("threads") or torch.get_num_threads()))
    cls = AutoModelForSequenceClassification if msg["task"] == "classification" else AutoModelForCausalLM
    model = cls.from_pretrained(msg["path"], dtype=torch.float32).to("cpu").eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(msg["path"])
    if tokenizer.pad_token is None:  # the same rule as raylens.models.load_model
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.register_forward_pre_hook(_count_hook, with_kwargs=True)
    STATE["models"][msg["task"]] = (model, tokenizer)
    return {"ok": True, "model": type(model).__name__}


def _explainer(msg: dict):
    import interpreto
    from interpreto import Granularity
    from interpreto.attributions.aggregations.sobol_aggregation import SobolIndicesOrders

    key = (msg["task"], msg["method"], msg["granularity"], msg["batch_size"], msg.get("n"))
    if key in STATE["explainers"]:
        return STATE["explainers"][key]
    model, tokenizer = STATE["models"][msg["task"]]
    cls = getattr(interpreto, msg["method"])
    kwargs = {"batch_size": int(msg["batch_size"]), "granularity": Granularity[msg["granularity"].upper()]}
    n = msg.get("n")
    if msg["method"] == "Sobol":
        kwargs.update(n_token_perturbations=int(n), sobol_indices_order=SobolIndicesOrders.TOTAL_ORDER)
    elif msg["method"] not in ("Occlusion", "Saliency"):
        kwargs["n_perturbations"] = int(n)
    explainer = cls(model, tokenizer, **kwargs)
    STATE["explainers"][key] = explainer
    return explainer


def cmd_run(msg: dict) -> dict:
    import torch

    explainer = _explainer(msg)
    if msg["task"] == "classification":
        targets = torch.tensor([int(t) for t in msg["targets"]])
    else:
        targets = [torch.tensor(t, dtype=torch.long) for t in msg["targets"]]
    torch.manual_seed(0)
    for k in COUNT:
        COUNT[k] = 0
    t0 = time.perf_counter()
    outputs = explainer(list(msg["texts"]), targets)
    seconds = time.perf_counter() - t0
    extra = {}
    if msg.get("return_scores"):  # for spot checks against raylens; not timed
        extra["scores"] = [o.attributions.float().nan_to_num(0.0).tolist() for o in outputs]
        extra["elements"] = [list(o.elements) for o in outputs]
    return {
        "seconds": seconds, **COUNT, **extra,
        "n_elements": [int(o.attributions.shape[-1]) for o in outputs],
        "n_targets": [int(o.attributions.shape[0]) if o.attributions.dim() > 1 else 1 for o in outputs],
    }


def main() -> None:
    handlers = {"versions": cmd_versions, "load": cmd_load, "run": cmd_run}
    reply({"ready": True})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        if msg.get("cmd") == "quit":
            reply({"bye": True})
            return
        try:
            reply(handlers[msg["cmd"]](msg))
        except Exception as exc:  # report, keep serving
            reply({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


if __name__ == "__main__":
    main()
