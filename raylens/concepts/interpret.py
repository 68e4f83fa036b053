"""Interpret concepts: top activating inputs and vocabulary projection.

* Top-k activating inputs (Olah et al. 2017, "Feature Visualization", dataset examples;
  the usual first look at a dictionary feature, e.g. Bricken et al. 2023, "Towards
  Monosemanticity"): stream the activation table, encode each batch, keep for every concept
  its ``k`` highest activations with the row they came from. Memory is ``O(k x nb_concepts)``.
* Vocabulary projection ("logit lens", nostalgebraist 2020; applied to dictionary
  directions as in Bricken et al. 2023): the decoder direction of each concept, scaled by the
  final norm's weight when the model has one, times the unembedding matrix; the highest
  entries are the tokens the concept promotes, the lowest the ones it suppresses.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import torch

from raylens.io.schemas import tensor_column_to_numpy

TOP_EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("concept", pa.int32()),
        pa.field("rank", pa.int32()),
        pa.field("activation", pa.float32()),
        pa.field("doc_id", pa.int64()),
        pa.field("unit", pa.int32()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("context", pa.string()),
        pa.field("span_start", pa.int32()),
        pa.field("span_end", pa.int32()),
    ]
)


@torch.no_grad()
def top_activating(
    concept_model,
    batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    k: int = 10,
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """The ``k`` highest activations of every concept over a stream of activation rows.

    Args:
        concept_model: a fitted :class:`raylens.concepts.models.ConceptModel`.
        batches: record batches with the activation schema (``doc_id``, ``unit``,
            ``char_start``, ``char_end``, ``activation`` of shape ``(d_model,)``).
        k: examples kept per concept.

    Returns:
        ``(best, frequency, n_rows)``: ``best`` maps ``value`` (float ``(k, nb_concepts)``,
        descending per column; ``-inf`` where fewer than ``k`` rows were seen) and
        ``doc_id``, ``unit``, ``char_start``, ``char_end`` (int64 ``(k, nb_concepts)``) to the
        rows those values come from; ``frequency`` ``(nb_concepts,)`` is the share of rows
        where each concept is non-zero; ``n_rows`` the number of rows streamed. Ties keep the
        row seen first.
    """
    C = concept_model.nb_concepts
    keys = ("doc_id", "unit", "char_start", "char_end")
    best = {"value": torch.full((k, C), -float("inf"))}
    best.update({key: torch.full((k, C), -1, dtype=torch.long) for key in keys})
    fired = torch.zeros(C, dtype=torch.long)
    n_rows = 0
    for batch in batches:
        x = torch.from_numpy(tensor_column_to_numpy(batch.column("activation")).astype(np.float32))
        if x.shape[0] == 0:
            continue
        z = concept_model.encode(x.to(device)).float().cpu()  # (n_rows, nb_concepts)
        fired += (z != 0).sum(0)
        n_rows += z.shape[0]
        meta = {key: torch.from_numpy(batch.column(key).to_numpy().astype(np.int64)) for key in keys}
        vals = torch.cat([best["value"], z])  # (k + n_rows, C)
        top_vals, top_idx = torch.topk(vals, min(k, vals.shape[0]), dim=0, sorted=True)
        if top_vals.shape[0] < k:
            pad = k - top_vals.shape[0]
            top_vals = torch.cat([top_vals, torch.full((pad, C), -float("inf"))])
            top_idx = torch.cat([top_idx, torch.zeros((pad, C), dtype=torch.long)])
        for key in keys:
            col = torch.cat([best[key], meta[key][:, None].expand(-1, C)])
            best[key] = torch.gather(col, 0, top_idx)
        best["value"] = top_vals
    return best, fired.float() / max(n_rows, 1), n_rows


def top_examples_table(
    best: dict[str, torch.Tensor],
    documents: dict[int, str],
    *,
    context_chars: int = 160,
) -> pa.Table:
    """Rows ``(concept, rank, activation, doc_id, unit, char_start, char_end, text, context,
    span_start, span_end)`` from :func:`top_activating`'s ``best``; ``context`` is a window of
    about ``context_chars`` characters on each side of the unit, and ``[span_start, span_end)``
    locates the activating unit inside it. ``documents`` maps doc_id to its full text."""
    k, C = best["value"].shape
    rows: dict[str, list] = {f.name: [] for f in TOP_EXAMPLES_SCHEMA}
    for c in range(C):
        for r in range(k):
            v = float(best["value"][r, c])
            if not np.isfinite(v):
                continue
            doc = int(best["doc_id"][r, c])
            s, e = int(best["char_start"][r, c]), int(best["char_end"][r, c])
            text = documents.get(doc, "")
            lo, hi = max(0, s - context_chars), min(len(text), e + context_chars)
            rows["concept"].append(c)
            rows["rank"].append(r)
            rows["activation"].append(v)
            rows["doc_id"].append(doc)
            rows["unit"].append(int(best["unit"][r, c]))
            rows["char_start"].append(s)
            rows["char_end"].append(e)
            rows["text"].append(text[s:e])
            rows["context"].append(text[lo:hi])
            rows["span_start"].append(s - lo)
            rows["span_end"].append(e - lo)
    return pa.Table.from_pydict(rows, schema=TOP_EXAMPLES_SCHEMA)


VOCAB_SCHEMA = pa.schema(
    [
        pa.field("concept", pa.int32()),
        pa.field("direction", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("token_id", pa.int64()),
        pa.field("token", pa.string()),
        pa.field("score", pa.float32()),
    ]
)


def unembedding(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_U, g)``: the unembedding ``(vocab, d_model)`` (output embeddings, or the input
    embeddings for models without an LM head) and the final norm's weight ``(d_model,)`` or None."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    W = (out if out is not None else model.get_input_embeddings()).weight
    norm = None
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for name in ("norm", "final_layernorm", "ln_f"):
        mod = getattr(base, name, None)
        if mod is not None and getattr(mod, "weight", None) is not None:
            norm = mod.weight
            break
    return W, norm


@torch.no_grad()
def vocabulary_projection(
    dictionary: torch.Tensor,
    model: torch.nn.Module,
    tokenizer,
    *,
    k: int = 10,
) -> pa.Table:
    """Top promoted and suppressed tokens of each concept direction.

    Args:
        dictionary: ``(nb_concepts, d_model)`` concept directions in activation space.
        model: the split model (for its unembedding and final norm weight).
        tokenizer: to turn token ids into strings.
        k: tokens per direction.

    Returns:
        Table with :data:`VOCAB_SCHEMA`: ``direction`` is ``"promoted"`` (largest logits first)
        or ``"suppressed"`` (most negative first); ``score`` is the logit contribution in logit
        units per unit of concept activation.
    """
    W, g = unembedding(model)
    D = dictionary.to(W.device, torch.float32)
    if g is not None:
        D = D * g.float()
    logits = D @ W.float().T  # (nb_concepts, vocab)
    k = min(k, logits.shape[1])
    top = torch.topk(logits, k, dim=1)
    bottom = torch.topk(-logits, k, dim=1)
    rows: dict[str, list] = {f.name: [] for f in VOCAB_SCHEMA}
    for c in range(D.shape[0]):
        for direction, vals, ids in (("promoted", top.values[c], top.indices[c]),
                                     ("suppressed", -bottom.values[c], bottom.indices[c])):
            toks = tokenizer.convert_ids_to_tokens(ids.tolist())
            for r, (v, i, t) in enumerate(zip(vals.tolist(), ids.tolist(), toks)):
                rows["concept"].append(c)
                rows["direction"].append(direction)
                rows["rank"].append(r)
                rows["token_id"].append(i)
                rows["token"].append(str(t))
                rows["score"].append(v)
    return pa.Table.from_pydict(rows, schema=VOCAB_SCHEMA)
