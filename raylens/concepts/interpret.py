"""Interpret concepts: top activating inputs and vocabulary projection.

* Top-k activating inputs (Olah et al. 2017, "Feature Visualization", dataset examples;
  the usual first look at a dictionary feature, e.g. Bricken et al. 2023, "Towards
  Monosemanticity"): stream the activation table, encode each batch, keep for every concept
  its ``k`` highest activations with the row they came from. Memory is ``O(k x nb_concepts)``.
* Sampled activating inputs (the top examples only show a concept at its strongest; Paulo et
  al. 2024, "Automatically Interpreting Millions of Features in Large Language Models",
  arXiv 2410.13928, explain and score features on examples drawn across activation
  quantiles too): the same pass keeps, per concept, a seeded uniform reservoir of its
  activating rows (``activation > 0``); `quantile_sample` splits a concept's reservoir into
  equal-count activation bins and draws the same number from each. Memory is
  ``O(n_pool x nb_concepts)``.
* Non-activating contexts (the negatives of detection scoring, `raylens.concepts.scoring`):
  the same pass keeps, per concept, a seeded reservoir of *quiet runs*: maximal runs of
  consecutive units of one document where the concept does not fire
  (``activation <= 0``), at least ``min_quiet_chars`` characters long.
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

from raylens.concepts.topk_scan import finish_scan, scan_partial
from raylens.io.schemas import NON_ACTIVATING_SCHEMA, SAMPLED_EXAMPLES_SCHEMA, TOP_EXAMPLES_SCHEMA, VOCAB_SCHEMA


@torch.no_grad()
def scan_concepts(
    concept_model,
    batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    k: int = 10,
    n_pool: int = 0,
    n_quiet: int = 0,
    min_quiet_chars: int = 0,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """One pass over the activation rows: top ``k`` rows per concept, a seeded uniform
    reservoir of ``n_pool`` activating rows per concept, and a seeded reservoir of ``n_quiet``
    non-activating runs per concept.

    Args:
        concept_model: a fitted :class:`raylens.concepts.models.ConceptModel`.
        batches: record batches with the activation schema, in the job's order (rows of a
            document together, by ``unit``): ``doc_id``, ``unit``, ``char_start``,
            ``char_end``, ``activation``.
        k: top examples kept per concept (as :func:`top_activating`).
        n_pool: activating rows (``activation > 0``) kept per concept, a uniform random
            sample without replacement (random keys, Efraimidis & Spirakis 2006, unweighted;
            each key a hash of the seed, the row and the concept: see
            :mod:`raylens.concepts.topk_scan`).
        n_quiet: non-activating runs kept per concept, a uniform random sample of the runs.
        min_quiet_chars: shortest run kept (characters of the document).
        seed: seed of both samples; the same rows give the same samples, in any order and
            however they are split across parallel scans (:func:`raylens.concepts.topk_scan.merge_scans`).

    Returns:
        ``{"best", "frequency", "n_rows"}`` as :func:`top_activating` returns them, plus
        ``"pool"``: ``value`` (float ``(n_pool, nb_concepts)``, ``-inf`` for empty slots) and
        ``doc_id``, ``unit``, ``char_start``, ``char_end`` (int64, ``-1`` for empty slots),
        in random order; and ``"quiet"``: ``doc_id``, ``char_start``, ``char_end`` (int64
        ``(n_quiet, nb_concepts)``, ``-1`` for empty slots).
    """
    return finish_scan(scan_partial(concept_model, batches, k=k, n_pool=n_pool, n_quiet=n_quiet,
                                    min_quiet_chars=min_quiet_chars, seed=seed, device=device))


def quantile_sample(
    pool: dict[str, torch.Tensor],
    *,
    n_quantiles: int = 5,
    per_quantile: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Draw ``per_quantile`` rows from each of ``n_quantiles`` activation bins of every concept's reservoir.

    The bins of a concept are consecutive, equal-count slices of its reservoir rows sorted by
    activation (``numpy.array_split``: earlier, lower bins get the remainder), so they estimate
    the quantiles of the concept's activating rows. A bin with fewer rows gives all of them.

    Args:
        pool: ``scan_concepts(...)["pool"]``.

    Returns:
        ``best``-like tensors (``value``, ``doc_id``, ``unit``, ``char_start``, ``char_end``,
        and ``quantile``: the bin, 0 = lowest activations, ``n_quantiles - 1`` = highest), shape
        ``(n_quantiles * per_quantile, nb_concepts)``, each column sorted by decreasing
        activation, ``-inf``/``-1`` padded. Seeded: the same pool gives the same sample.
    """
    if n_quantiles < 1 or per_quantile < 0:
        raise ValueError(f"n_quantiles must be >= 1 and per_quantile >= 0, got {n_quantiles}, {per_quantile}")
    n, C = pool["value"].shape
    m = n_quantiles * per_quantile
    names = ("doc_id", "unit", "char_start", "char_end")
    out = {"value": torch.full((m, C), -float("inf"))}
    out.update({name: torch.full((m, C), -1, dtype=torch.long) for name in (*names, "quantile")})
    rng = np.random.default_rng(int(seed))
    for c in range(C):
        v = pool["value"][:, c].numpy()
        rows = np.flatnonzero(np.isfinite(v))
        if not len(rows) or not m:
            continue
        rows = rows[np.argsort(v[rows], kind="stable")]  # ascending activation
        chosen, bins = [], []
        for b, part in enumerate(np.array_split(rows, min(n_quantiles, len(rows)))):
            take = part[rng.permutation(len(part))[:per_quantile]]
            chosen += take.tolist()
            bins += [b if len(rows) >= n_quantiles else int(b * n_quantiles // len(rows))] * len(take)
        order = sorted(range(len(chosen)), key=lambda i: -v[chosen[i]])
        for slot, i in enumerate(order):
            out["value"][slot, c] = float(v[chosen[i]])
            out["quantile"][slot, c] = bins[i]
            for name in names:
                out[name][slot, c] = pool[name][chosen[i], c]
    return out


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
    out = scan_concepts(concept_model, batches, k=k, device=device)
    return out["best"], out["frequency"], out["n_rows"]


def top_examples_table(
    best: dict[str, torch.Tensor],
    documents: dict[int, str],
    *,
    context_chars: int = 160,
) -> pa.Table:
    """Rows ``(concept, rank, activation, doc_id, unit, char_start, char_end, text, context,
    span_start, span_end)`` from :func:`top_activating`'s ``best``; ``context`` is a window of
    about ``context_chars`` characters on each side of the unit, and ``[span_start, span_end)``
    locates the activating unit inside it. ``documents`` maps doc_id to its full text.

    With a ``quantile`` entry in ``best`` (:func:`quantile_sample`), the table has
    :data:`SAMPLED_EXAMPLES_SCHEMA`: the same columns plus ``quantile``; ``rank`` is then the
    rank among the concept's sampled examples."""
    k, C = best["value"].shape
    schema = SAMPLED_EXAMPLES_SCHEMA if "quantile" in best else TOP_EXAMPLES_SCHEMA
    rows: dict[str, list] = {f.name: [] for f in schema}
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
            if "quantile" in best:
                rows["quantile"].append(int(best["quantile"][r, c]))
    return pa.Table.from_pydict(rows, schema=schema)





def non_activating_table(quiet: dict[str, torch.Tensor], documents: dict[int, str]) -> pa.Table:
    """Rows ``(concept, doc_id, char_start, char_end, text)`` from ``scan_concepts(...)["quiet"]``:
    ``text`` is the document text of the run, where the concept does not fire on any unit."""
    n, C = quiet["doc_id"].shape
    rows: dict[str, list] = {f.name: [] for f in NON_ACTIVATING_SCHEMA}
    for c in range(C):
        for r in range(n):
            doc = int(quiet["doc_id"][r, c])
            if doc < 0:
                continue
            s, e = int(quiet["char_start"][r, c]), int(quiet["char_end"][r, c])
            rows["concept"].append(c)
            rows["doc_id"].append(doc)
            rows["char_start"].append(s)
            rows["char_end"].append(e)
            rows["text"].append(documents.get(doc, "")[s:e])
    return pa.Table.from_pydict(rows, schema=NON_ACTIVATING_SCHEMA)





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


def _concept_logits(D: torch.Tensor, W: torch.Tensor, chunk_vocab: int) -> torch.Tensor:
    """``D @ W^T`` in float32 ``(n, vocab)`` for float32 directions ``D (n, d_model)`` and the
    unembedding ``W (vocab, d_model)``; a ``W`` of another dtype is cast ``chunk_vocab`` rows
    at a time (never the whole matrix)."""
    if W.dtype == torch.float32:
        return D @ W.T
    out = torch.empty(D.shape[0], W.shape[0], dtype=torch.float32, device=D.device)
    for v0 in range(0, W.shape[0], chunk_vocab):
        out[:, v0:v0 + chunk_vocab] = D @ W[v0:v0 + chunk_vocab].float().T
    return out


@torch.no_grad()
def vocabulary_projection(
    dictionary: torch.Tensor,
    model: torch.nn.Module,
    tokenizer,
    *,
    k: int = 10,
    chunk_concepts: int = 512,
    chunk_vocab: int = 16_384,
) -> pa.Table:
    """Top promoted and suppressed tokens of each concept direction.

    Memory: the logits are computed ``chunk_concepts`` concepts at a time, so at most
    ``chunk_concepts x vocab`` float32 scores exist at once (512 x 128,256 tokens: 250 MiB),
    plus, when the unembedding is not float32, a float32 copy of ``chunk_vocab x d_model`` of
    it (16,384 x 4,096: 256 MiB; never of the whole matrix), plus the results
    (``4 x nb_concepts x k`` values and indices). The bottom ``k`` come from
    ``topk(largest=False)``, not from a negated copy.

    Up to ``chunk_concepts`` concepts the scores are bitwise those of one product of the
    whole dictionary; with more, the tokens are the same and the scores differ by float32
    rounding (the summation order of a BLAS product depends on its shape; measured on
    SmolLM2: at most 2e-5 on logits of about 20).

    Args:
        dictionary: ``(nb_concepts, d_model)`` concept directions in activation space.
        model: the split model (for its unembedding and final norm weight).
        tokenizer: to turn token ids into strings.
        k: tokens per direction.
        chunk_concepts: concepts scored at a time (the memory budget above).
        chunk_vocab: unembedding rows cast to float32 at a time (non-float32 models only).

    Returns:
        Table with :data:`VOCAB_SCHEMA`: ``direction`` is ``"promoted"`` (largest logits first)
        or ``"suppressed"`` (most negative first); ``score`` is the logit contribution in logit
        units per unit of concept activation.

    Raises:
        ValueError: ``chunk_concepts`` or ``chunk_vocab`` below 1.
    """
    if chunk_concepts < 1 or chunk_vocab < 1:
        raise ValueError(f"chunk_concepts and chunk_vocab must be >= 1, got {chunk_concepts}, {chunk_vocab}")
    W, g = unembedding(model)
    D = dictionary.to(W.device, torch.float32)
    if g is not None:
        D = D * g.float()
    k = min(k, W.shape[0])
    parts = {"promoted": ([], []), "suppressed": ([], [])}
    for c0 in range(0, D.shape[0], chunk_concepts):
        logits = _concept_logits(D[c0:c0 + chunk_concepts], W, chunk_vocab)  # (chunk, vocab)
        for direction, largest in (("promoted", True), ("suppressed", False)):
            top = torch.topk(logits, k, dim=1, largest=largest)
            parts[direction][0].append(top.values.cpu())
            parts[direction][1].append(top.indices.cpu())
        del logits
    found = {d: (torch.cat(v).tolist(), torch.cat(i).tolist()) for d, (v, i) in parts.items() if v}
    rows: dict[str, list] = {f.name: [] for f in VOCAB_SCHEMA}
    for c in range(D.shape[0]):
        for direction in ("promoted", "suppressed"):
            vals, ids = found[direction][0][c], found[direction][1][c]
            for r, (v, i, t) in enumerate(zip(vals, ids, tokenizer.convert_ids_to_tokens(ids))):
                rows["concept"].append(c)
                rows["direction"].append(direction)
                rows["rank"].append(r)
                rows["token_id"].append(i)
                rows["token"].append(str(t))
                rows["score"].append(v)
    return pa.Table.from_pydict(rows, schema=VOCAB_SCHEMA)
