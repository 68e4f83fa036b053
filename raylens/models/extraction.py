"""Activation extraction in windows of documents, with the rows built as arrays.

:meth:`raylens.models.split.SplitModel.iter_extract` runs here. Per window of documents, one
tokenizer call gives flat token arrays (:class:`WindowTokens`); the units (one row each) are
flat arrays too (:class:`WindowUnits`): for granularities ``token``, ``sample_mean`` and
``cls`` built with numpy, for ``word`` and ``sentence`` per unit by
:func:`raylens.text.group_tokens`. Batches of documents are padded, run to the split point and
pooled with one ``index_select`` (plus one ``index_add_`` when units hold several tokens) on the
model's device, and the Arrow columns are built from the arrays (the ``text`` column from one
UTF-8 buffer per window, :func:`unit_texts`). No Python object per row.

The unit rules are those of :meth:`raylens.models.split.SplitModel.units` (one document at a
time, kept as the plain reference; tests/test_extraction_arrays.py checks the two agree).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from raylens.io.memory import release_host_memory
from raylens.io.schemas import activation_array, activations_schema
from raylens.models.batching import split_on_oom
from raylens.text import TEXT_UNITS, group_tokens

if TYPE_CHECKING:
    from raylens.models.split import RowSampling, SplitModel

GRANULARITIES = ("token", "word", "sentence", "sample_mean", "cls")
#: The largest finite float16 value; bfloat16 and float32 activations can exceed it.
FLOAT16_MAX = 65504.0


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int):
    """The one tokenizer call of extraction: each text alone (no padding), with special tokens,
    character offsets and the special-token mask, truncated to ``max_tokens``.

    Returns:
        ``(encoding, truncated)``: the tokenizer's batch encoding (lists per text) and, per text,
        whether it was cut (the fast tokenizer's overflow, else a second, untruncated pass).
    """
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_tokens,
                    return_offsets_mapping=True, return_special_tokens_mask=True, return_overflowing_tokens=False)
    if getattr(enc, "encodings", None):  # fast tokenizers: the cut-off tail is kept as `overflowing`
        return enc, [bool(e.overflowing) for e in enc.encodings]
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    return enc, [len(f) > len(ids) for f, ids in zip(full, enc["input_ids"])]


def concat_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, b) for a, b in zip(starts, stops)])`` without a Python loop
    (int64; ``stops >= starts``)."""
    starts, stops = np.asarray(starts, np.int64), np.asarray(stops, np.int64)
    lens = stops - starts
    if not len(lens):
        return np.zeros(0, np.int64)
    shift = starts - np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.repeat(shift, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def csr(counts: np.ndarray) -> np.ndarray:
    """``(n + 1,)`` start offsets of ``n`` consecutive groups of ``counts`` items (int64)."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


@dataclasses.dataclass
class WindowTokens:
    """A window's tokens, flat over its ``n_docs`` documents (``n_tokens`` in all).

    Attributes:
        ids: ``(n_tokens,)`` int64 token ids, document after document.
        offsets: ``(n_tokens, 2)`` int64 character spans ``[start, end)`` in each document's text.
        special: ``(n_tokens,)`` bool, the tokenizer's special tokens.
        start: ``(n_docs + 1,)`` int64, document ``j``'s tokens are ``start[j]:start[j + 1]``.
        truncated: ``(n_docs,)`` bool, cut at ``max_tokens``.
    """

    ids: np.ndarray
    offsets: np.ndarray
    special: np.ndarray
    start: np.ndarray
    truncated: np.ndarray

    @property
    def position(self) -> np.ndarray:
        """``(n_tokens,)`` each token's position in its document."""
        return np.arange(len(self.ids), dtype=np.int64) - np.repeat(self.start[:-1], self.lengths)

    @property
    def lengths(self) -> np.ndarray:
        """``(n_docs,)`` tokens per document."""
        return np.diff(self.start)


def window_tokens(tokenizer, texts: Sequence[str], max_tokens: int) -> WindowTokens:
    """:func:`tokenize` of a window's texts, as flat arrays (:class:`WindowTokens`)."""
    enc, truncated = tokenize(tokenizer, texts, max_tokens)
    chain = itertools.chain.from_iterable
    start = csr(np.fromiter(map(len, enc["input_ids"]), np.int64, len(texts)))
    n = int(start[-1])
    return WindowTokens(
        ids=np.fromiter(chain(enc["input_ids"]), np.int64, n),
        offsets=np.fromiter(chain(chain(enc["offset_mapping"])), np.int64, 2 * n).reshape(n, 2),
        special=np.fromiter(chain(enc["special_tokens_mask"]), np.int64, n).astype(bool),
        start=start, truncated=np.asarray(truncated, bool).reshape(len(texts)))


@dataclasses.dataclass
class WindowUnits:
    """A window's units (one activation row each), flat: ``n_units`` units of ``n_docs``
    documents, each the mean of its ``n_members`` token positions in all.

    Attributes:
        doc_units: ``(n_docs + 1,)`` document ``j``'s units are rows ``doc_units[j]:doc_units[j + 1]``.
        unit: ``(n_units,)`` index of the unit among its document's units (kept after sampling).
        char_start, char_end: ``(n_units,)`` character span in the document's text.
        token_start, token_end: ``(n_units,)`` ``min`` and ``max + 1`` of its token positions.
        unit_members: ``(n_units + 1,)`` unit ``u``'s positions are ``member_pos[unit_members[u]:unit_members[u + 1]]``.
        member_pos: ``(n_members,)`` token positions, unit after unit, increasing within a unit.
    """

    doc_units: np.ndarray
    unit: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray
    token_start: np.ndarray
    token_end: np.ndarray
    unit_members: np.ndarray
    member_pos: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """``(n_docs,)`` units per document."""
        return np.diff(self.doc_units)

    def take(self, rows: np.ndarray, counts: np.ndarray) -> "WindowUnits":
        """The units ``rows`` (increasing), ``counts`` ``(n_docs,)`` of them per document."""
        first, last = self.unit_members[rows], self.unit_members[rows + 1]
        return WindowUnits(csr(counts), self.unit[rows], self.char_start[rows], self.char_end[rows],
                           self.token_start[rows], self.token_end[rows], csr(last - first),
                           self.member_pos[concat_ranges(first, last)])


def window_units(tokens: WindowTokens, texts: Sequence[str], granularity: str, exclude_first_tokens: int = 0,
                 cls_token_id: int | None = None) -> WindowUnits:
    """The units of a window's documents at ``granularity`` (rules of
    :meth:`raylens.models.split.SplitModel.units`): special tokens, empty spans, positions below
    ``exclude_first_tokens`` and documents of blank text leave no unit.

    Raises:
        ValueError: unknown granularity.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    n_docs = len(texts)
    doc = np.repeat(np.arange(n_docs), tokens.lengths)
    pos = tokens.position
    blank = np.fromiter((not t.strip() for t in texts), bool, n_docs)
    keep = ~tokens.special & (tokens.offsets[:, 1] > tokens.offsets[:, 0]) & (pos >= exclude_first_tokens) & ~blank[doc]
    kdoc, kpos, kspan = doc[keep], pos[keep], tokens.offsets[keep]
    kcount = np.bincount(kdoc, minlength=n_docs)
    if granularity == "token":
        unit = np.arange(len(kpos)) - csr(kcount)[kdoc]
        return WindowUnits(csr(kcount), unit, kspan[:, 0], kspan[:, 1], kpos, kpos + 1,
                           np.arange(len(kpos) + 1, dtype=np.int64), kpos)
    if granularity in TEXT_UNITS:
        return _text_units(tokens, texts, granularity, kpos, kcount)
    last = np.maximum(csr(kcount)[1:] - 1, 0)  # each document's last kept token, where it has one
    end = np.where(kcount > 0, kspan[last, 1] if len(kpos) else 0, 0)
    if granularity == "sample_mean":
        has = kcount > 0
        return WindowUnits(csr(has), np.zeros(int(has.sum()), np.int64), np.zeros(int(has.sum()), np.int64),
                           end[has], kpos[csr(kcount)[:-1][has]], kpos[last[has]] + 1, csr(kcount[has]), kpos)
    lengths = tokens.lengths  # cls: one unit per document with tokens
    has = (lengths > 0) & ~blank
    first = np.full(n_docs, -1, np.int64)
    first[lengths > 0] = tokens.ids[tokens.start[:-1][lengths > 0]]
    first_is_cls = first == cls_token_id if cls_token_id is not None else np.zeros(n_docs, bool)
    cls_pos = np.where(first_is_cls, 0, lengths - 1)[has]
    n = int(has.sum())
    return WindowUnits(csr(has), np.zeros(n, np.int64), np.zeros(n, np.int64), end[has], cls_pos, cls_pos + 1,
                       np.arange(n + 1, dtype=np.int64), cls_pos)


def _text_units(tokens: WindowTokens, texts: Sequence[str], granularity: str, kpos: np.ndarray,
                kcount: np.ndarray) -> WindowUnits:
    """Words or sentences (:func:`raylens.text.group_tokens`), per unit in Python."""
    spans, members, counts, sizes = [], [], [], []
    kstart = csr(kcount)
    for j, text in enumerate(texts):
        units = []
        if kcount[j]:
            offsets = tokens.offsets[tokens.start[j]: tokens.start[j + 1]].tolist()
            units = group_tokens(text, offsets, kpos[kstart[j]: kstart[j + 1]].tolist(), granularity)
        counts.append(len(units))
        for k, (s, e, toks) in enumerate(units):
            spans.append((s, e, min(toks), max(toks) + 1, k))
            members.extend(toks)
            sizes.append(len(toks))
    cols = np.asarray(spans, np.int64).reshape(-1, 5)
    return WindowUnits(csr(np.asarray(counts, np.int64)), cols[:, 4], cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3],
                       csr(np.asarray(sizes, np.int64)), np.asarray(members, np.int64))


def sample_units(units: WindowUnits, sampling: "RowSampling", doc_ids: np.ndarray) -> WindowUnits:
    """The units that ``sampling`` keeps (:meth:`raylens.models.split.RowSampling.keep`, seeded
    per document by its id); ``doc_ids`` ``(n_docs,)``."""
    kept = [sampling.keep(int(n), int(d)) for n, d in zip(units.counts.tolist(), np.asarray(doc_ids).tolist())]
    rows = np.concatenate([units.doc_units[j] + k for j, k in enumerate(kept)] or [np.zeros(0, np.int64)])
    return units.take(rows.astype(np.int64), np.fromiter(map(len, kept), np.int64, len(kept)))


def padded_batch(tokens: WindowTokens, docs: np.ndarray, pad_token_id: int,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(n_docs, n_tokens)`` input ids (int64, ``pad_token_id`` past each
    document's end) and attention mask of the documents ``docs`` of a window, on ``device``."""
    lens = tokens.lengths[docs]
    n = int(lens.max()) if len(lens) else 0
    ids = np.full((len(docs), n), pad_token_id, np.int64)
    ids[np.repeat(np.arange(len(docs)), lens), concat_ranges(np.zeros_like(lens), lens)] = \
        tokens.ids[concat_ranges(tokens.start[docs], tokens.start[docs] + lens)]
    mask = (np.arange(n)[None, :] < lens[:, None]).astype(np.int64)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def pool_batch(h: torch.Tensor, units: WindowUnits, docs: np.ndarray, values: torch.Tensor) -> None:
    """Pool each unit of the documents ``docs`` (the batch's rows, in order) from ``h``
    ``(n_docs, n_tokens, d_model)`` into its row of ``values`` ``(n_units, d_model)``; a
    document's units are consecutive rows of ``values``, written with one copy each.

    When every unit is one token and ``values`` has ``h``'s dtype, each document's rows are
    copied from ``h`` straight into ``values``; else the batch's token rows are gathered (one
    ``index_select``), averaged per unit in float32 when a unit has several (``index_add_`` in
    token order, then a division by the counts) and cast once (round to nearest even). On the
    CPU the per-document copies are numpy's (one thread: no parallel region per document).
    """
    first, last = units.doc_units[docs], units.doc_units[docs + 1]
    rows = concat_ranges(first, last)
    m0, m1 = units.unit_members[rows], units.unit_members[rows + 1]
    sizes = m1 - m0
    flat_h = h.reshape(-1, h.shape[-1])
    src = np.repeat(np.repeat(np.arange(len(docs)), last - first), sizes) * h.shape[1] \
        + units.member_pos[concat_ranges(m0, m1)]
    at = csr(last - first).tolist()  # each document's rows in the batch's units
    if len(src) == len(rows) and h.dtype == values.dtype:  # one token per unit: copies from h
        source, take = flat_h, src
    else:
        dev = h.device
        source, take = flat_h.index_select(0, torch.from_numpy(src).to(dev)), None
        if len(src) != len(rows):
            index = torch.from_numpy(np.repeat(np.arange(len(rows)), sizes)).to(dev)
            sums = torch.zeros((len(rows), h.shape[-1]), dtype=torch.float32, device=dev).index_add_(0, index, source.float())
            source = sums / torch.bincount(index, minlength=len(rows)).clamp_min(1)[:, None].float()
        source = source.to(values.dtype)
    out, inp = host_rows(values), host_rows(source)
    if out is None or inp is None:
        take = None if take is None else torch.from_numpy(take).to(h.device)
    for r, (a, b) in enumerate(zip(first.tolist(), last.tolist())):
        lo, hi = at[r], at[r + 1]
        if out is not None and inp is not None:
            if take is None:
                out[a:b] = inp[lo:hi]
            else:
                np.take(inp, take[lo:hi], axis=0, out=out[a:b], mode="clip")
        elif take is None:
            values[a:b].copy_(source[lo:hi])
        else:
            torch.index_select(source, 0, take[lo:hi], out=values[a:b])


def host_rows(t: torch.Tensor) -> np.ndarray | None:
    """A CPU tensor's numpy view (``bfloat16`` as its ``int16`` bits), or ``None`` on another device."""
    if t.device.type != "cpu":
        return None
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def pool_documents(split: "SplitModel", tokens: WindowTokens, units: WindowUnits, docs: np.ndarray, *,
                   batch_size: int, predict: bool = False, progress: Callable[[int], None] | None = None,
                   dtype: str = "float32") -> tuple[torch.Tensor, np.ndarray | None]:
    """Every unit of the documents ``docs`` of a window, pooled at ``split``'s split point:
    documents batched by length (stable sort, ``batch_size`` at a time, a batch too large for the
    device split and retried), each batch pooled into the window's rows (:func:`pool_batch`,
    cast once to ``dtype``).

    Returns:
        ``(values, predicted)``: ``(n_units, d_model)`` of ``dtype`` on the model's device (rows
        of documents not in ``docs`` are left unset), and with ``predict`` the ``(n_docs,)``
        predicted class of each document (a sequence classifier's full forward; -1 outside
        ``docs``), else ``None``.
    """
    lengths = tokens.lengths
    values = torch.empty((int(units.doc_units[-1]), split.d_model), dtype=getattr(torch, dtype),
                         device=split.loaded.device)
    predicted = np.full(len(lengths), -1, np.int64)
    todo = sorted(np.asarray(docs, np.int64).tolist(), key=lambda j: lengths[j])

    def forward(idx: Sequence[int]) -> None:  # values and predicted change only once nothing can fail
        batch = np.asarray(idx, np.int64)
        ids, mask = padded_batch(tokens, batch, split.tokenizer.pad_token_id, split.loaded.device)
        h, pred = split.hidden_and_prediction(ids, mask) if predict else (split.hidden(ids, mask), None)
        pred = None if pred is None else pred.cpu().numpy()
        pool_batch(h, units, batch, values)
        if pred is not None:
            predicted[batch] = pred

    for b in range(0, len(todo), batch_size):
        split_on_oom(forward, todo[b: b + batch_size], what="extraction batch")
        if progress is not None:
            progress(len(todo[b: b + batch_size]))
        gc.collect(1)  # nnsight's trace leaves reference cycles that hold the batch's tensors
    return values, (predicted if predict else None)


def unit_texts(texts: Sequence[str], row_doc: np.ndarray, start: np.ndarray, end: np.ndarray) -> pa.Array:
    """``texts[row_doc[i]][start[i]:end[i]]`` for every row (character offsets, clipped as
    Python slices are), as an Arrow ``string`` array built from the documents' UTF-8 bytes: one
    gather of the rows' bytes, no Python string per row. ``row_doc`` must be non-decreasing."""
    row_doc = np.asarray(row_doc, np.int64)
    docs = np.unique(row_doc)
    lo, hi = np.searchsorted(row_doc, docs, "left"), np.searchsorted(row_doc, docs, "right")
    raw = [texts[j].encode("utf-8") for j in docs.tolist()]
    n_chars = np.fromiter((len(texts[j]) for j in docs.tolist()), np.int64, len(docs))
    n_bytes = np.fromiter(map(len, raw), np.int64, len(raw))
    base = np.repeat(csr(n_bytes)[:-1], hi - lo)
    limit = np.repeat(n_chars, hi - lo)
    bstart = np.minimum(np.maximum(np.asarray(start, np.int64), 0), limit)
    bend = np.minimum(np.maximum(np.asarray(end, np.int64), bstart), limit)
    for k in np.flatnonzero(n_bytes != n_chars).tolist():  # non-ASCII documents
        cp = np.frombuffer(texts[int(docs[k])].encode("utf-32-le"), np.uint32)
        cum = csr(1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000))  # characters -> bytes
        bstart[lo[k]: hi[k]], bend[lo[k]: hi[k]] = cum[bstart[lo[k]: hi[k]]], cum[bend[lo[k]: hi[k]]]
    bstart, bend = bstart + base, bend + base
    offsets = csr(bend - bstart)
    if offsets[-1] >= 2**31:  # beyond a string array's 32-bit offsets: let Arrow decide
        return pa.array([texts[d][s:e] for d, s, e in zip(row_doc.tolist(), start, end)], pa.string())
    data = np.frombuffer(b"".join(raw), np.uint8)[concat_ranges(bstart, bend)]
    return pa.Array.from_buffers(pa.string(), len(row_doc),
                                 [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])


def window_table(units: WindowUnits, doc_ids: np.ndarray, texts: Sequence[str], values: torch.Tensor,
                 predicted: np.ndarray | None, d_model: int, dtype: str) -> pa.Table:
    """The activation table (schema :func:`raylens.io.schemas.activations_schema`) of a
    window's ``units`` and their ``values`` ``(n_units, d_model)``; ``doc_ids`` and
    ``predicted`` (or ``None``: nulls) are ``(n_docs,)``, ``texts`` the documents'."""
    row_doc = np.repeat(np.arange(len(doc_ids)), units.counts)
    cols = {"doc_id": np.asarray(doc_ids, np.int64)[row_doc], "unit": units.unit, "char_start": units.char_start,
            "char_end": units.char_end, "token_start": units.token_start, "token_end": units.token_end}
    schema = activations_schema(d_model, dtype)
    arrays = {k: pa.array(v, schema.field(k).type) for k, v in cols.items()}
    arrays["text"] = unit_texts(texts, row_doc, units.char_start, units.char_end)
    arrays["predicted_class"] = (pa.nulls(len(row_doc), pa.int32()) if predicted is None
                                 else pa.array(predicted[row_doc], pa.int32()))
    return pa.Table.from_arrays([arrays[f.name] for f in schema if f.name != "activation"]
                                + [activation_array(values, dtype)], schema=schema)


def document_issues(doc_ids: Sequence[int], texts: Sequence[str], truncated: Sequence[bool],
                    counts: Sequence[int], max_tokens: int) -> list[dict]:
    """One issue ``{doc_id, stage, kind, error}`` per document that is empty (blank text, or no
    unit: ``counts`` before sampling) or else truncated to ``max_tokens``."""
    out = []
    for d, text, cut, n in zip(doc_ids, texts, truncated, counts):
        if not text.strip() or not n:
            out.append({"doc_id": int(d), "stage": "extract", "kind": "empty", "error": "empty text: no tokens, skipped"})
        elif cut:
            out.append({"doc_id": int(d), "stage": "extract", "kind": "truncated",
                        "error": f"truncated to max_tokens={max_tokens}"})
    return out


def float16_overflow_issues(values: torch.Tensor, row_docs: np.ndarray) -> list[dict]:
    """One issue per document whose activations exceed float16's range (``|x| > 65,504``):
    stored as float16 they become ``inf`` (those rows are left out of the fit by
    :class:`raylens.io.readers.ActivationStream`). Bfloat16 models reach such values (a massive
    activation); ``extraction.activation_dtype: float32`` or ``bfloat16`` stores them.

    Args:
        values: ``(n_rows, d_model)`` float32 activations, or their float16 copy (where an
            overflow is already ``inf``), on any device.
        row_docs: ``(n_rows,)`` the document id of each row.
    """
    def count(block: torch.Tensor) -> np.ndarray:
        if block.dtype == torch.float16 and block.device.type == "cpu":  # inf bits: 13x torch's CPU half ops
            bits = block.numpy().view(np.uint16) & 0x7FFF
            if len(bits) and bits.max() < 0x7C00:  # no inf (nor NaN) at all: the common case, one pass
                return np.zeros(len(bits), np.int64)
            return np.count_nonzero(bits == 0x7C00, axis=1)
        return (block.abs() > FLOAT16_MAX).sum(1).cpu().numpy()

    # in blocks of 2**22 values: a window-sized temporary would double the window's memory
    step = max(1, 2**22 // max(1, values.shape[1]))
    over = np.concatenate([count(values[i: i + step]) for i in range(0, len(values), step)] or [np.zeros(0, np.int64)])
    if not over.any():
        return []
    docs, inverse = np.unique(row_docs, return_inverse=True)
    counts = np.bincount(inverse, weights=over, minlength=len(docs))
    return [{"doc_id": int(d), "stage": "extract", "kind": "float16_overflow",
             "error": f"{int(n)} activation values beyond float16's range (|x| > 65,504) stored as inf; "
                      "those rows are left out of the fit; use extraction.activation_dtype: float32"}
            for d, n in zip(docs, counts) if n]


def iter_windows(split: "SplitModel", texts: Sequence[str], doc_ids: Sequence[int], *, granularity: str = "token",
                 batch_size: int = 8, max_tokens: int = 128, dtype: str = "float16", exclude_first_tokens: int = 0,
                 window_rows: int | None = None, sampling: "RowSampling | None" = None,
                 progress: Callable[[int], None] | None = None) -> Iterator[tuple[pa.Table, list[dict]]]:
    """:meth:`raylens.models.split.SplitModel.iter_extract` (arguments, yields and errors there):
    documents in ``doc_id`` order, in windows of ``max(1, window_rows // max_tokens)`` documents,
    each tokenised once, turned into units, sampled, pooled and tabled as arrays."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if len(texts) != len(doc_ids):
        raise ValueError(f"{len(texts)} texts but {len(doc_ids)} doc_ids")
    texts = [t if isinstance(t, str) else "" for t in texts]
    # A classifier's prediction costs the rest of the forward: only at granularity cls, where
    # the row is the one the classification head reads (the forward then does not stop early).
    predict = granularity == "cls" and split.loaded.task == "sequence_classification"
    order = sorted(range(len(texts)), key=lambda i: int(doc_ids[i]))
    # a document has at most max_tokens units: windows of whole documents hold <= window_rows rows
    per_window = max(1, len(order) if window_rows is None else max(1, window_rows // max_tokens))
    for w in range(0, len(order), per_window):
        window = order[w: w + per_window]
        wtexts = [texts[i] for i in window]
        ids = np.asarray([int(doc_ids[i]) for i in window], np.int64)
        tokens = window_tokens(split.tokenizer, wtexts, max_tokens)
        units = window_units(tokens, wtexts, granularity, exclude_first_tokens, split.tokenizer.cls_token_id)
        issues = document_issues(ids.tolist(), wtexts, tokens.truncated.tolist(), units.counts.tolist(), max_tokens)
        if sampling is not None:
            units = sample_units(units, sampling, ids)
        values, predicted = pool_documents(split, tokens, units, np.flatnonzero(units.counts), batch_size=batch_size,
                                           predict=predict, progress=progress, dtype=dtype)
        if dtype == "float16":
            issues += float16_overflow_issues(values, np.repeat(ids, units.counts))
        table = window_table(units, ids, wtexts, values, predicted, split.d_model, dtype)
        # the window's values and arrays go before the table is handed over, and the table when
        # the caller asks for the next window: never two windows alive at once
        del values, tokens, units
        yield table, issues
        del table
        release_host_memory()


__all__ = ["FLOAT16_MAX", "GRANULARITIES", "WindowTokens", "WindowUnits", "concat_ranges", "csr", "document_issues",
           "float16_overflow_issues", "iter_windows", "padded_batch",
           "host_rows", "pool_batch", "pool_documents", "sample_units", "tokenize", "unit_texts",
           "window_table", "window_tokens", "window_units"]
