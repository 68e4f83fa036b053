"""The network job's per-batch functions, usable in a notebook too (no Ray here).

Lenses (:mod:`raylens.network.lens`):

- :func:`lens_statistics`: one row per (document, layer, position) of a batch of documents
  (:data:`~raylens.io.schemas.LENS_SCHEMA`): KL to the final distribution, top-1 and its
  agreement with the final top-1, the rank of the final top-1 and of the actual next token.
- :func:`prediction_depth`: per token, the first layer from which the top-1 stays final.
- :func:`lens_curves`: per (lens, layer) over any number of such rows: KL quantiles, top-1
  agreement rate, mean ranks.

Causal head gating (:mod:`raylens.network.heads`):

- :func:`head_gating_roles`: gates and roles per (seed, layer, head).
- :func:`role_stability`: per (layer, head), the majority role over seeds and the share of
  seeds that agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raylens.io.schemas import (
    HEAD_GATING_SCHEMA,
    HEAD_ROLE_NAMES,
    HEAD_ROLE_STABILITY_SCHEMA,
    LENS_CURVES_SCHEMA,
    LENS_KL_QUANTILES,
    LENS_SCHEMA,
    PREDICTION_DEPTH_SCHEMA,
)
from raylens.network.lens import LogitLens, kl_to_final, tokenize_batch


def lens_statistics(lens: LogitLens, texts: Sequence[str], doc_ids: Sequence[int], *, max_tokens: int,
                    batch_size: int, lens_name: str | None = None) -> pa.Table:
    """Per-layer lens statistics of ``texts``: one row per (document, layer, position).

    Args:
        lens: a :class:`~raylens.network.lens.LogitLens` or a fitted
            :class:`~raylens.network.lens.TunedLens`.
        texts: the documents; each is cut to its first ``max_tokens`` tokens. A text with no
            token gives no row.
        doc_ids: one id per text (int64).
        max_tokens: tokens kept per document.
        batch_size: documents per forward pass (memory: one layer's ``(n_tokens, vocab)``
            float32 logits of a batch at a time).
        lens_name: the ``lens`` column (default ``lens.name``: ``"logit"`` or ``"tuned"``).

    Returns:
        A table of :data:`~raylens.io.schemas.LENS_SCHEMA`: layers ``0 .. n_layers`` (the last
        is the model's output: KL 0, agrees), ``kl_to_final`` in nats, 0-based ranks.

    Raises:
        ValueError: ``len(doc_ids) != len(texts)`` or ``batch_size < 1``.
    """
    if len(doc_ids) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(doc_ids)} doc_ids")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    name = lens_name or lens.name
    parts = []
    for start in range(0, len(texts), batch_size):
        batch_texts = list(texts[start:start + batch_size])
        ids, mask = tokenize_batch(lens.tokenizer, batch_texts, max_tokens=max_tokens, device=lens.device)
        if ids.shape[1] == 0 or not bool(mask.any()):
            continue
        parts.extend(_batch_rows(lens, ids, mask, np.asarray(doc_ids[start:start + batch_size], np.int64), name))
    if not parts:
        return LENS_SCHEMA.empty_table()
    return pa.concat_tables(parts)


def _batch_rows(lens: LogitLens, ids: torch.Tensor, mask: torch.Tensor, doc_ids: np.ndarray,
                name: str) -> list[pa.Table]:
    """LENS_SCHEMA tables (one per layer) of one tokenized batch."""
    valid = mask.bool()
    lengths = valid.sum(1)
    rows, positions = valid.nonzero(as_tuple=True)  # real tokens, (n_real,)
    has_next = positions + 1 < lengths[rows]
    next_ids = torch.where(has_next, ids[rows, (positions + 1).clamp_max(ids.shape[1] - 1)], 0)
    hidden = lens.residual_stream(ids, mask)
    with torch.no_grad():
        final = lens.project(lens.n_layers, hidden[-1][valid]).float()  # (n_real, vocab)
        final_logprobs = torch.log_softmax(final, -1)
        final_top1 = final.argmax(-1)
    common = {
        "doc_id": pa.array(doc_ids[rows.cpu().numpy()], pa.int64()),
        "lens": pa.array([name] * len(rows), pa.string()),
        "position": pa.array(positions.cpu().numpy().astype(np.int32)),
        "token_id": pa.array(ids[valid].cpu().numpy().astype(np.int32)),
        "next_token_id": pa.array(next_ids.cpu().numpy().astype(np.int32), mask=~has_next.cpu().numpy()),
    }
    tables = []
    for layer in range(lens.n_layers + 1):
        with torch.no_grad():
            logits = final if layer == lens.n_layers else lens.project(layer, hidden[layer][valid]).float()
            kl = torch.zeros(len(rows)) if layer == lens.n_layers else kl_to_final(final_logprobs, logits)
            top1 = logits.argmax(-1)
            rank_final = (logits > logits.gather(1, final_top1[:, None])).sum(1)
            rank_next = (logits > logits.gather(1, next_ids[:, None])).sum(1)
        cols = dict(common)
        cols["layer"] = pa.array(np.full(len(rows), layer, np.int32))
        cols["kl_to_final"] = pa.array(kl.cpu().numpy().astype(np.float32))
        cols["top1_token_id"] = pa.array(top1.cpu().numpy().astype(np.int32))
        cols["top1_agrees"] = pa.array((top1 == final_top1).cpu().numpy())
        cols["rank_final"] = pa.array(rank_final.cpu().numpy().astype(np.int32))
        cols["rank_next"] = pa.array(rank_next.cpu().numpy().astype(np.int32), mask=~has_next.cpu().numpy())
        tables.append(pa.table({f.name: cols[f.name] for f in LENS_SCHEMA}, schema=LENS_SCHEMA))
    return tables


def _group_starts(keys: list[np.ndarray]) -> np.ndarray:
    """Start indices of the runs of equal keys in rows sorted by those keys."""
    change = np.zeros(len(keys[0]), dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def prediction_depth(table: pa.Table) -> pa.Table:
    """Per (document, lens, position): the first layer from which the lens's top-1 equals the
    model's final top-1 at every later layer (``n_layers`` when only the output agrees).

    Args:
        table: rows of :data:`~raylens.io.schemas.LENS_SCHEMA` holding every layer of each
            (document, lens, position) they cover (any number of batches concatenated).

    Returns:
        A table of :data:`~raylens.io.schemas.PREDICTION_DEPTH_SCHEMA`, sorted by lens,
        document and position.
    """
    if table.num_rows == 0:
        return PREDICTION_DEPTH_SCHEMA.empty_table()
    t = table.select(["lens", "doc_id", "position", "layer", "token_id", "top1_token_id", "top1_agrees"]).sort_by(
        [("lens", "ascending"), ("doc_id", "ascending"), ("position", "ascending"), ("layer", "ascending")])
    lens = np.asarray(t["lens"].to_pylist(), dtype=object)
    doc = t["doc_id"].to_numpy()
    pos = t["position"].to_numpy()
    layer = t["layer"].to_numpy()
    starts = _group_starts([lens, doc, pos])
    ends = np.append(starts[1:], len(doc)) - 1
    disagree = np.where(t["top1_agrees"].to_numpy(zero_copy_only=False), -1, layer)
    last_disagree = np.maximum.reduceat(disagree, starts)
    depth = np.where(last_disagree < 0, layer[starts], last_disagree + 1)
    return pa.table({
        "doc_id": pa.array(doc[starts], pa.int64()),
        "lens": pa.array(lens[starts].tolist(), pa.string()),
        "position": pa.array(pos[starts].astype(np.int32)),
        "token_id": pa.array(t["token_id"].to_numpy()[starts].astype(np.int32)),
        "final_top1_token_id": pa.array(t["top1_token_id"].to_numpy()[ends].astype(np.int32)),
        "prediction_depth": pa.array(depth.astype(np.int32)),
    }, schema=PREDICTION_DEPTH_SCHEMA)


def lens_curves(table: pa.Table) -> pa.Table:
    """Per (lens, layer) over the rows of ``table``: KL quantiles (0.1, 0.25, 0.5, 0.75, 0.9;
    nats), mean KL, the top-1 agreement rate with the final top-1, the mean 0-based ranks of the
    final top-1 and of the actual next token (positions with a next token), the token count.

    Args:
        table: rows of :data:`~raylens.io.schemas.LENS_SCHEMA` (any number of batches).

    Returns:
        A table of :data:`~raylens.io.schemas.LENS_CURVES_SCHEMA`, sorted by lens and layer.
    """
    if table.num_rows == 0:
        return LENS_CURVES_SCHEMA.empty_table()
    t = table.select(["lens", "layer", "kl_to_final", "top1_agrees", "rank_final", "rank_next"]).sort_by(
        [("lens", "ascending"), ("layer", "ascending")])
    lens = np.asarray(t["lens"].to_pylist(), dtype=object)
    layer = t["layer"].to_numpy()
    kl = t["kl_to_final"].to_numpy()
    agrees = t["top1_agrees"].to_numpy(zero_copy_only=False)
    rank_final = t["rank_final"].to_numpy()
    rank_next = t["rank_next"].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan
    starts = _group_starts([lens, layer])
    bounds = np.append(starts, len(layer))
    rows = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs = np.quantile(kl[s:e], LENS_KL_QUANTILES)
        nxt = rank_next[s:e]
        row = {"lens": lens[s], "layer": int(layer[s])}
        row.update({f"kl_q{round(q * 100):02d}": float(v) for q, v in zip(LENS_KL_QUANTILES, qs)})
        row.update({"kl_mean": float(kl[s:e].mean()), "top1_agreement": float(agrees[s:e].mean()),
                    "mean_rank_final": float(rank_final[s:e].mean()),
                    "mean_rank_next": float(np.nanmean(nxt)) if np.isfinite(nxt).any() else None,
                    "n_tokens": int(e - s)})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=LENS_CURVES_SCHEMA)


def head_gating_roles(model: Any, tokenizer: Any, texts: Sequence[str], *, seeds: Sequence[int],
                      max_tokens: int = 32, batch_size: int = 8, **fit_params: Any) -> pa.Table:
    """Causal head gating (Nam et al., NeurIPS 2025) on the next-token loss of ``texts``, once
    per seed: per (seed, layer, head), the three fits' gates and the head's role.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        texts: the task corpus (each cut to ``max_tokens`` tokens).
        seeds: one fit per seed (gate initialisation and minibatch order).
        max_tokens, batch_size: tokens per text and texts per optimisation step.
        **fit_params: passed to :class:`~raylens.network.heads.CausalHeadGating` (``steps``,
            ``reg_steps``, ``lam``, ``clip``, ``lr``, ``threshold``, ``init_logit``, ``init_std``,
            ``record_losses``).

    Returns:
        A table of :data:`~raylens.io.schemas.HEAD_GATING_SCHEMA`, ``n_seeds * n_layers *
        n_heads`` rows.
    """
    from raylens.network.heads import CausalHeadGating

    parts = []
    for seed in seeds:
        chg = CausalHeadGating(model, tokenizer, seed=int(seed), max_tokens=max_tokens, batch_size=batch_size,
                               **fit_params).fit(texts)
        parts.append(chg.to_table())
    return pa.concat_tables(parts) if parts else HEAD_GATING_SCHEMA.empty_table()


def role_stability(table: pa.Table) -> pa.Table:
    """Per (layer, head) over the seeds of a :func:`head_gating_roles` table: the majority role
    (ties broken in the order facilitating, interfering, irrelevant), the share of seeds that
    give it, the count of each role and the mean gates of the two regularised fits.

    Returns:
        A table of :data:`~raylens.io.schemas.HEAD_ROLE_STABILITY_SCHEMA`, sorted by layer, head.
    """
    if table.num_rows == 0:
        return HEAD_ROLE_STABILITY_SCHEMA.empty_table()
    t = table.sort_by([("layer", "ascending"), ("head", "ascending")])
    layer, head = t["layer"].to_numpy(), t["head"].to_numpy()
    role = np.asarray(t["role"].to_pylist(), dtype=object)
    retain, remove = t["gate_retain"].to_numpy(), t["gate_remove"].to_numpy()
    starts = _group_starts([layer, head])
    bounds = np.append(starts, len(layer))
    rows = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        counts = {r: int((role[s:e] == r).sum()) for r in HEAD_ROLE_NAMES}
        best = max(HEAD_ROLE_NAMES, key=lambda r: counts[r])  # max keeps the first of equal counts
        rows.append({"layer": int(layer[s]), "head": int(head[s]), "role": best,
                     "agreement": counts[best] / (e - s), "n_seeds": int(e - s),
                     **{f"n_{r}": counts[r] for r in HEAD_ROLE_NAMES},
                     "mean_gate_retain": float(retain[s:e].mean()), "mean_gate_remove": float(remove[s:e].mean())})
    return pa.Table.from_pylist(rows, schema=HEAD_ROLE_STABILITY_SCHEMA)
