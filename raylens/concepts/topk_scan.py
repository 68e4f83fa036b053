"""The top-k scan over the activation rows, split so that it runs in parallel: a partial scan
of any subset of whole documents (:func:`scan_partial`, one shard per task), an associative
merge (:func:`merge_scans`) and the final tables (:func:`finish_scan`).

What one scan keeps, per concept (see :mod:`raylens.concepts.interpret` for why):

* the ``k`` highest codes with their rows, ties to the row seen first (top-k merging is
  associative);
* a uniform sample of ``n_pool`` activating rows (``code > 0``): each (row, concept) gets a
  random key, a hash of ``(seed, doc_id, unit, concept)`` (splitmix64), and the sample is the
  ``n_pool`` smallest keys (Efraimidis & Spirakis 2006, unweighted): it depends on the rows and
  the seed, not on their order or on how they were split across tasks;
* a uniform sample of ``n_quiet`` non-activating runs (maximal runs of consecutive units of one
  document where the concept does not fire, at least ``min_quiet_chars`` long), keyed the same
  way by ``(seed, doc_id, char_start, concept)``;
* how many rows fire it (its frequency).

Sparsity. An SAE code has a handful of non-zeros per row of ``nb_concepts``: a batch is one
``nonzero()`` of its codes (on the device that encoded them) and everything after works on
those entries: the frequencies count them, only entries above a concept's current k-th best
enter the top-k merge, only the activating ones are keyed for the pool, and a concept's quiet
runs are the gaps between its firing rows inside each stretch of consecutive units (plus the
stretches where it does not fire at all): no pass over rows x concepts. Dense codes (PCA, ICA,
NMF: most entries non-zero) take the dense path, boolean passes over the batch's codes, when
more than :data:`DENSE_ABOVE` of a batch's codes are non-zero; both paths give the same tables.
The sampled pools are kept lazily: offers are filtered by the thresholds of the last
compaction and compacted (sorted) when they outnumber the kept entries, which keeps the same
entries as an eager sort after every batch (ties to the entry offered first).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from raylens.io.schemas import tensor_column_to_numpy

__all__ = ["DENSE_ABOVE", "META", "SCAN_BATCH_BYTES", "WAITING_ENTRIES", "ScanPartial", "finish_scan", "hash_keys", "merge_scans", "quiet_runs", "scan_batch_rows",
           "quiet_runs_sparse", "ranks_in_runs", "scan_partial"]

#: The row metadata kept with each example.
META = ("doc_id", "unit", "char_start", "char_end")
#: A batch whose share of non-zero codes is above this takes the dense path. Measured (1,024
#: concepts, 4,096-row batches, k 10, pools 256 and 20; CPU ms per batch, sparse / dense): 37 /
#: 131 at 2% non-zero, 102 / 150 at 10%, 186 / 214 at 20%, 280 / 240 at 30%, 492 / 307 at 50%.
DENSE_ABOVE = 0.25

#: Host bytes of one scan batch's float32 activations and dense codes (see :func:`scan_batch_rows`).
SCAN_BATCH_BYTES = 32 * 2**20


def scan_batch_rows(d_model: int, nb_concepts: int, max_bytes: int = SCAN_BATCH_BYTES) -> int:
    """Rows per record batch of the scan: its float32 activations and codes
    ``(rows, d_model + nb_concepts)`` within ``max_bytes``, between 1,024 and 65,536 rows.
    Parquet's default batch (65,536 rows) swung a scanner's resident memory by 200-350 MiB per
    batch at d_model 256 and 256 concepts (``bench/scale.py``): its peak was the highest swing
    seen, so it rose with the length of the scan (906-1,005 MiB at 10k documents, 1,040-1,051
    at 60k)."""
    return int(min(65536, max(1024, max_bytes // (4 * (d_model + nb_concepts)))))

_QUIET_COLS = ("doc_id", "char_start", "char_end")
_KEY_BITS = 40
_BINS = 64  # key bins per concept of the linear pre-selection before a sample's sort
_COLUMN_CHUNK = 2048  # columns per dense top-k pass (bounds its int64 keys to rows x 2048)
_DENSITY_ROWS = 256  # rows of a batch that choose its path
#: Sampled entries (pool and quiet runs, about 48 bytes each) that may wait before a
#: compaction: the kept entries, at least, or this many, or 4 x the sample's size if fewer.
WAITING_ENTRIES = 1 << 20


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash_rows(seed: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The part of :func:`hash_keys` that depends on ``(seed, a, b)`` only (uint64, one per row)."""
    with np.errstate(over="ignore"):
        x = _mix(np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + a.astype(np.uint64))
        return _mix(x ^ (b.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)))


def _hash_concepts(rows: np.ndarray, concept: np.ndarray) -> np.ndarray:
    """:func:`hash_keys` from the rows' part (:func:`_hash_rows`) and the concepts."""
    with np.errstate(over="ignore"):
        x = _mix(rows ^ (concept.astype(np.uint64) + np.uint64(0x632BE59BD9B4E019)))
    return (x >> np.uint64(24)).astype(np.float64) * 2.0 ** -_KEY_BITS


def hash_keys(seed: int, a: np.ndarray, b: np.ndarray, concept: np.ndarray) -> np.ndarray:
    """Uniform keys in ``[0, 1)`` on a grid of ``2**-40`` (float64, exact), a hash of
    ``(seed, a, b, concept)`` elementwise (int arrays of one shape): the same inputs give the
    same key in any process."""
    return _hash_concepts(_hash_rows(seed, a, b), concept)


def _order_key(cols: dict[str, np.ndarray]) -> np.ndarray:
    """One int64 per entry ordering by (concept, key) (keys are multiples of ``2**-40``)."""
    return (cols["concept"] << _KEY_BITS) | (cols["key"] * 2.0 ** _KEY_BITS).astype(np.int64)


def ranks_in_runs(keys: np.ndarray) -> np.ndarray:
    """Each entry's position within its run of equal ``keys`` ``(n,)`` (sorted, or at least
    grouped): ``[0, 1, 2, 0, 0, 1]`` for ``[4, 4, 4, 7, 9, 9]``; int64."""
    if not len(keys):
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))


def _keep_smallest(cols: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Of flat entries (``concept``, ``key``, ...), the ``n`` smallest keys per concept, sorted by
    (concept, key), ties to the earlier entry. Entries that are already sorted runs (a kept
    pool, then new entries) merge in about linear time: numpy's stable sort (timsort) finds
    the runs."""
    if len(cols["key"]) > 2 * n * (int(cols["concept"].max()) + 1):  # many more than are kept: pre-select
        cols = _below_nth_bin(cols, n)
    order = np.argsort(_order_key(cols), kind="stable")
    conc = cols["concept"][order]
    if not len(conc):
        return cols
    keep = order[ranks_in_runs(conc) < n]
    return {name: v[keep] for name, v in cols.items()}


def _below_nth_bin(cols: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The entries of each concept's key bins (``_BINS`` equal bins of ``[0, 1)``) up to the one
    that holds its ``n``-th smallest key: a superset of the ``n`` smallest (ties included),
    found in linear time, that the sort then trims."""
    conc = cols["concept"]
    C = int(conc.max()) + 1
    cell = conc * _BINS + (cols["key"] * _BINS).astype(np.int64)
    cum = np.bincount(cell, minlength=C * _BINS).reshape(C, _BINS).cumsum(1)
    last = np.minimum((cum < n).sum(1), _BINS - 1)  # the bin of the n-th smallest (or the last)
    keep = (cell - conc * _BINS) <= last[conc]
    return cols if keep.all() else {name: v[keep] for name, v in cols.items()}


def _cat(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _flat(names: tuple[str, ...], value: bool) -> dict[str, np.ndarray]:
    out = {"concept": np.zeros(0, np.int64), "key": np.zeros(0, np.float64)}
    if value:
        out["value"] = np.zeros(0, np.float32)
    out.update({name: np.zeros(0, np.int64) for name in names})
    return out


def _kth_key(cols: dict[str, np.ndarray], n: int, C: int) -> np.ndarray:
    """Per concept, the largest key kept when ``n`` are kept, else ``inf`` (``(C,)``)."""
    kth = np.full(C, np.inf)
    if n and len(cols["key"]):
        counts = np.bincount(cols["concept"], minlength=C)
        last = np.cumsum(counts) - 1  # entries are sorted by (concept, key)
        full = counts >= n
        kth[full] = cols["key"][last[full]]
    return kth


class _Sample:
    """The ``n`` smallest keys per concept of the entries offered, kept lazily: offers below
    :attr:`kth` (the thresholds of the last compaction) wait in a list and are compacted with
    :func:`_keep_smallest` once they outnumber the kept entries."""

    def __init__(self, kept: dict[str, np.ndarray], n: int, C: int):
        self.kept, self.n, self.C = kept, n, C
        self.kth = _kth_key(kept, n, C)
        self.waiting: list[dict[str, np.ndarray]] = []
        self.n_waiting = 0

    def offer(self, new: dict[str, np.ndarray]) -> None:
        """Entries (``concept``, ``key``, ...) already filtered by ``key < kth[concept]``."""
        if not len(new["key"]):
            return
        self.waiting.append(new)
        self.n_waiting += len(new["key"])
        if self.n_waiting >= max(len(self.kept["key"]), min(WAITING_ENTRIES, 4 * self.n * self.C)):
            self.compact()

    def compact(self) -> dict[str, np.ndarray]:
        """The kept entries, sorted by (concept, key)."""
        if self.waiting:
            self.kept = _keep_smallest(_cat(self.kept, *self.waiting), self.n)
            self.kth = _kth_key(self.kept, self.n, self.C)
            self.waiting, self.n_waiting = [], 0
        return self.kept


def _breaks(doc: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """``(m + 1,)`` bool: ``brk[i]``, a run cannot continue from row ``i - 1`` to row ``i``."""
    m = len(doc)
    brk = np.ones(m + 1, dtype=bool)
    if m > 1:
        brk[1:m] = (doc[1:] != doc[:-1]) | (unit[1:] != unit[:-1] + 1)
    return brk


def _dense_spans(fired: np.ndarray, brk: np.ndarray, cs: np.ndarray, ce: np.ndarray,
                 min_chars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quiet runs from ``fired (m, C)`` bool: ``(concept, first row, last row)``, concept-major,
    rows ascending."""
    m = fired.shape[0]
    quiet = ~fired
    prev_quiet = np.vstack([np.zeros((1, quiet.shape[1]), bool), quiet[:-1]])
    next_quiet = np.vstack([quiet[1:], np.zeros((1, quiet.shape[1]), bool)])
    start = quiet & (brk[:m, None] | ~prev_quiet)
    end = quiet & (brk[1:, None] | ~next_quiet)
    s_c, s_r = np.nonzero(start.T)  # concept-major, rows ascending: starts and ends pair up
    _, e_r = np.nonzero(end.T)
    keep = (ce[e_r] - cs[s_r]) >= min_chars
    return s_c[keep], s_r[keep], e_r[keep]


def _sparse_spans(r: np.ndarray, c: np.ndarray, C: int, brk: np.ndarray, cs: np.ndarray, ce: np.ndarray,
                  min_chars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quiet runs from the firing entries ``(r, c)`` sorted by (concept, row):
    ``(concept, first row, last row)``, unordered. A stretch is a maximal run of rows without a
    break; a concept's runs in it are the gaps before, between and after its firing rows, or
    the whole stretch where it does not fire."""
    m = len(brk) - 1
    first = np.flatnonzero(brk[:m])  # each stretch's first row
    last = np.r_[first[1:], m] - 1
    s = (np.cumsum(brk[:m]) - 1)[r]
    head = np.ones(len(r), bool)  # the first firing row of its (concept, stretch)
    head[1:] = (c[1:] != c[:-1]) | (s[1:] != s[:-1])
    tail = np.ones(len(r), bool)  # the last one
    tail[:-1] = head[1:]
    prev = np.zeros_like(r)  # the row after the previous firing row
    prev[1:] = r[:-1] + 1
    fired = np.zeros((len(first), C), bool)
    fired[s, c] = True
    whole = np.flatnonzero((ce[last] - cs[first]) >= min_chars)
    w_s, w_c = np.nonzero(~fired[whole])
    conc = np.concatenate([c, c[tail], w_c])
    lo = np.concatenate([np.where(head, first[s], prev), r[tail] + 1, first[whole[w_s]]])
    hi = np.concatenate([r - 1, last[s[tail]], last[whole[w_s]]])
    ok = np.flatnonzero(hi >= lo)
    ok = ok[(ce[hi[ok]] - cs[lo[ok]]) >= min_chars]
    return conc[ok], lo[ok], hi[ok]


def quiet_runs(fired: np.ndarray, doc: np.ndarray, unit: np.ndarray, cs: np.ndarray, ce: np.ndarray,
               min_chars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of consecutive units of one document where a concept does not fire.

    Args: ``fired`` ``(m, C)`` bool; ``doc``, ``unit``, ``cs``, ``ce`` ``(m,)`` (rows in
    stream order; a run breaks where the document changes or units are not consecutive).
    Returns ``(concept, doc_id, char_start, char_end)`` of the runs at least ``min_chars`` long,
    concept-major, then in row order.
    """
    c, lo, hi = _dense_spans(fired, _breaks(doc, unit), cs, ce, min_chars)
    return c, doc[lo], cs[lo], ce[hi]


def quiet_runs_sparse(rows: np.ndarray, concepts: np.ndarray, nb_concepts: int, doc: np.ndarray,
                      unit: np.ndarray, cs: np.ndarray, ce: np.ndarray,
                      min_chars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`quiet_runs` from the firing entries instead of a dense mask: ``fired[rows,
    concepts]`` true, nothing else (int arrays ``(nnz,)``, sorted by (concept, row), no
    duplicates); the same runs in the same order, at a cost in the entries and the stretches of
    consecutive units times ``nb_concepts``, not in rows x ``nb_concepts``."""
    c, lo, hi = _sparse_spans(rows, concepts, nb_concepts, _breaks(doc, unit), cs, ce, min_chars)
    order = _concept_major(c, lo, nb_concepts)
    c, lo, hi = c[order], lo[order], hi[order]
    return c, doc[lo], cs[lo], ce[hi]


@dataclass
class ScanPartial:
    """What a scan of some whole documents keeps (merge with :func:`merge_scans`).

    Attributes:
        best: ``value`` float ``(k, C)`` (descending per column, ties to the row seen first,
            ``-inf`` padded) and the :data:`META` columns int64 ``(k, C)`` (``-1`` padded).
        pool: flat entries sorted by (concept, key): ``concept``, ``key``, ``value``, :data:`META`.
        quiet: flat entries sorted by (concept, key): ``concept``, ``key``, ``doc_id``,
            ``char_start``, ``char_end``.
        fired: int64 ``(C,)`` rows where each concept is non-zero.
        n_rows: rows scanned.
        k, n_pool, n_quiet: the sizes kept.
    """

    best: dict[str, torch.Tensor]
    pool: dict[str, np.ndarray]
    quiet: dict[str, np.ndarray]
    fired: torch.Tensor
    n_rows: int
    k: int
    n_pool: int
    n_quiet: int

    @classmethod
    def empty(cls, C: int, k: int, n_pool: int, n_quiet: int) -> ScanPartial:
        """A scan of no row."""
        best = {"value": torch.full((k, C), -float("inf"))}
        best.update({key: torch.full((k, C), -1, dtype=torch.long) for key in META})
        return cls(best, _flat(META, True), _flat(_QUIET_COLS, False), torch.zeros(C, dtype=torch.long), 0,
                   k, n_pool, n_quiet)


def _merge_best(best: dict[str, np.ndarray], new: dict[str, np.ndarray], tie: np.ndarray) -> None:
    """Merge candidates into ``best`` (``(k, C)`` arrays, in place): per concept the ``k``
    largest values of its column and its candidates (flat ``concept``, ``value``, :data:`META`),
    ties to ``best``'s entries, then to the smaller ``tie`` (int, the candidates' stream order)."""
    if not len(new["concept"]):
        return
    if len(tie) > 1 and (np.diff(tie) < 0).any():
        first = np.argsort(tie, kind="stable")
        new, tie = {name: v[first] for name, v in new.items()}, tie[first]
    k, C = best["value"].shape
    cols = np.flatnonzero(np.bincount(new["concept"], minlength=C))
    conc = np.concatenate([np.tile(cols, k), new["concept"]])  # best's entries first, by slot
    vals = {name: np.concatenate([best[name][:, cols].reshape(-1), new[name]]) for name in best}
    bits = (vals["value"] + np.float32(0.0)).view(np.int32)  # -0.0 ties with 0.0
    desc = ~np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32, in the values' descending order
    idx = np.argsort((conc << 32) | (desc.astype(np.int64) + 2 ** 31), kind="stable")  # ties: array order
    conc = conc[idx]
    rank = ranks_in_runs(conc)
    keep = rank < k  # every column in cols has k entries of its own
    for name, v in vals.items():
        best[name][rank[keep], conc[keep]] = v[idx[keep]]


def _column_top(z: torch.Tensor, cols: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of codes ``z (m, C)`` float32, per column in ``cols`` the ``k`` largest entries, ties to
    the earlier row (a top-k over int64 keys: the float's order-preserving bits, then the row):
    ``(rows, concepts, values)``, on ``z``'s device."""
    m = z.shape[0]
    tie = (2 ** 32 - 1 - torch.arange(m, device=z.device, dtype=torch.long))[:, None]
    rs, cs, vs = [], [], []
    for chunk in cols.split(_COLUMN_CHUNK):
        sub = z[:, chunk] + 0.0  # -0.0 ties with 0.0
        bits = sub.view(torch.int32)
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
        rows = (ordered * 2 ** 32 + tie).topk(min(k, m), dim=0).indices  # (k, len(chunk))
        rs.append(rows.reshape(-1))
        cs.append(chunk.expand(rows.shape[0], -1).reshape(-1))
        vs.append(torch.gather(sub, 0, rows).reshape(-1))
    return torch.cat(rs), torch.cat(cs), torch.cat(vs)


def _numpy(*ts: torch.Tensor) -> list[np.ndarray]:
    return [t.cpu().numpy() for t in ts]


def _entries(z: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> list[np.ndarray]:
    """``(r, c, z[r, c])`` as numpy arrays (gathered by numpy on the CPU: several times faster)."""
    if z.device.type == "cpu":
        r, c = r.numpy(), c.numpy()
        return [r, c, z.numpy()[r, c]]
    return _numpy(r, c, z[r, c])


def _concept_major(conc: np.ndarray, rows: np.ndarray, C: int) -> np.ndarray:
    """The order sorting entries by (concept, row) (LSD radix sorts on 16 bits when both fit)."""
    if C <= 1 << 16 and (not len(rows) or rows.max() < 1 << 16):
        first = np.argsort(rows.astype(np.uint16), kind="stable")
        return first[np.argsort(conc[first].astype(np.uint16), kind="stable")]
    return np.lexsort((rows, conc))


def _fired_rows(r: np.ndarray, c: np.ndarray, m: int, C: int) -> np.ndarray:
    fired = np.zeros((m, C), bool)
    fired[r, c] = True
    return fired


class _Scanner:
    """One partial scan fed batch by batch (the state of :func:`scan_partial`)."""

    def __init__(self, C: int, k: int, n_pool: int, n_quiet: int, min_chars: int, seed: int, path: str):
        if path not in ("auto", "sparse", "dense"):
            raise ValueError(f"scan path must be 'auto', 'sparse' or 'dense', not {path!r}")
        self.part = ScanPartial.empty(C, k, n_pool, n_quiet)
        self.best = {name: t.numpy() for name, t in self.part.best.items()}  # views, merged in place
        self.pool = _Sample(self.part.pool, n_pool, C)
        self.quiet = _Sample(self.part.quiet, n_quiet, C)
        self.C, self.min_chars, self.seed, self.path = C, min_chars, seed, path
        self.carry: dict[str, np.ndarray] | None = None  # the last, maybe unfinished, document

    def add(self, z: torch.Tensor, meta: dict[str, np.ndarray]) -> None:
        """Codes ``z (n, C)`` float32 (on any device) of rows with metadata ``(n,)`` each, in
        stream order."""
        p = self.part
        p.n_rows += z.shape[0]
        head = z[:_DENSITY_ROWS]  # the density, estimated
        dense = self.path == "dense" or (self.path == "auto" and
                                         int(torch.count_nonzero(head)) > DENSE_ABOVE * head.numel())
        if dense:  # the activating entries only
            p.fired += (z != 0).sum(0).cpu()
            r, c = torch.nonzero(z > 0, as_tuple=True)
        else:  # every non-zero entry (one pass): the activating ones are most or all of them
            r, c = torch.nonzero(z, as_tuple=True)
            p.fired += torch.bincount(c, minlength=self.C).cpu()
        r, c, v = _entries(z, r, c)
        if p.k:
            self._add_top(z, r, c, v, meta, dense)
        if not dense and (v < 0).any():
            pos = v > 0
            r, c, v = r[pos], c[pos], v[pos]
        if p.n_pool and len(r):
            key = _hash_concepts(_hash_rows(self.seed, meta["doc_id"], meta["unit"])[r], c)
            keep = np.flatnonzero(key < self.pool.kth[c])
            rows = r[keep]
            self.pool.offer({"concept": c[keep], "key": key[keep], "value": v[keep],
                             **{name: meta[name][rows] for name in META}})
        if p.n_quiet:
            self._add_quiet(r, c, (z > 0).cpu().numpy() if dense else None, meta)

    def _add_top(self, z: torch.Tensor, r: np.ndarray, c: np.ndarray, v: np.ndarray, meta: dict[str, np.ndarray],
                 dense: bool) -> None:
        """Merge the codes above their concept's k-th best (``r``, ``c``, ``v``: the non-zero
        codes, or the activating ones when ``dense``). A concept whose k-th best is >= 0 can
        only gain a non-zero code. One whose k-th best is < 0 (its first rows) may gain zeros:
        with no negative code in the batch, its first ``k - g`` zero rows lie in the batch's
        first ``k`` rows (``g`` its positive rows); else (signed codes, the dense path) it gets a
        top-k over its column of the batch."""
        k, C = self.part.k, self.C
        kth = self.best["value"][-1]
        warm = kth < 0
        if dense:
            column = warm
            thr = torch.from_numpy(np.where(warm, np.inf, kth).astype(np.float32)).to(z.device)
            rr, cc, vv = _entries(z, *torch.nonzero(z > thr, as_tuple=True))
        else:
            column = warm & (np.bincount(c[v < 0], minlength=C) > 0) if warm.any() else warm
            sel = (v > kth[c]) & ~column[c]
            rr, cc, vv = r[sel], c[sel], v[sel]
            fill = np.flatnonzero(warm & ~column)
            if len(fill):
                hr, hc = _numpy(*torch.nonzero(z[:k, torch.from_numpy(fill).to(z.device)] == 0, as_tuple=True))
                rr, cc, vv = np.r_[rr, hr], np.r_[cc, fill[hc]], np.r_[vv, np.zeros(len(hr), np.float32)]
        if column.any():
            r2, c2, v2 = _numpy(*_column_top(z, torch.from_numpy(np.flatnonzero(column)).to(z.device), k))
            sel = v2 > kth[c2]
            rr, cc, vv = np.r_[rr, r2[sel]], np.r_[cc, c2[sel]], np.r_[vv, v2[sel]]
        _merge_best(self.best, {"concept": cc, "value": vv, **{name: meta[name][rr] for name in META}}, rr)

    def _add_quiet(self, r: np.ndarray, c: np.ndarray, fired: np.ndarray | None, meta: dict[str, np.ndarray]) -> None:
        """Find the quiet runs of the finished documents (``r``, ``c``: the activating entries,
        row-major; ``fired``: the dense mask on the dense path); keep the last document's rows."""
        rows = {key: meta[key] for key in META}
        if self.carry is not None:
            n0 = len(self.carry["doc_id"])
            rows = {name: np.concatenate([self.carry[name], rows[name]]) for name in rows}
            r, c = np.r_[self.carry["r"], r + n0], np.r_[self.carry["c"], c]
            if fired is not None:
                fired = np.concatenate([_fired_rows(self.carry["r"], self.carry["c"], n0, self.C), fired])
        doc = rows["doc_id"]
        last = np.flatnonzero(doc != doc[-1])
        cut = int(last[-1]) + 1 if len(last) else 0  # the last document may go on in the next batch
        tail = r >= cut
        self.carry = {name: v[cut:] for name, v in rows.items()}
        self.carry.update(r=r[tail] - cut, c=c[tail])
        if cut:
            self._runs({name: v[:cut] for name, v in rows.items()}, r[~tail], c[~tail],
                       None if fired is None else fired[:cut])

    def _runs(self, rows: dict[str, np.ndarray], r: np.ndarray, c: np.ndarray, fired: np.ndarray | None) -> None:
        """Offer the quiet runs of whole documents to the sample (``r``, ``c`` row-major)."""
        brk = _breaks(rows["doc_id"], rows["unit"])
        cs, ce = rows["char_start"], rows["char_end"]
        if fired is not None:
            conc, lo, hi = _dense_spans(fired, brk, cs, ce, self.min_chars)
        else:  # a stable sort by concept (radix on 16 bits) of row-major entries: (concept, row)
            order = np.argsort(c.astype(np.uint16) if self.C <= 1 << 16 else c, kind="stable")
            conc, lo, hi = _sparse_spans(r[order], c[order], self.C, brk, cs, ce, self.min_chars)
        key = _hash_concepts(_hash_rows(self.seed, rows["doc_id"], cs)[lo], conc)
        keep = np.flatnonzero(key < self.quiet.kth[conc])
        keep = keep[_concept_major(conc[keep], lo[keep], self.C)]  # the dense path's order
        conc, lo, hi = conc[keep], lo[keep], hi[keep]
        self.quiet.offer({"concept": conc.astype(np.int64), "key": key[keep], "doc_id": rows["doc_id"][lo],
                          "char_start": cs[lo], "char_end": ce[hi]})

    def finish(self) -> ScanPartial:
        """The partial scan (the last document's quiet runs flushed, the samples compacted)."""
        carry = self.carry
        if carry is not None and len(carry["doc_id"]):
            n = len(carry["doc_id"])
            fired = _fired_rows(carry["r"], carry["c"], n, self.C) if self.path == "dense" else None
            self._runs({key: carry[key] for key in META}, carry["r"], carry["c"], fired)
        self.carry = None
        self.part.pool, self.part.quiet = self.pool.compact(), self.quiet.compact()
        return self.part


@torch.no_grad()
def scan_partial(concept_model, batches: Iterable[pa.RecordBatch | pa.Table], *, k: int = 10, n_pool: int = 0,
                 n_quiet: int = 0, min_quiet_chars: int = 0, seed: int = 0, device: str = "cpu",
                 path: str = "auto") -> ScanPartial:
    """Scan the rows of some whole documents (a document's rows all in ``batches``, together and
    by ``unit``): see the module docstring.

    Args:
        concept_model: a fitted :class:`raylens.concepts.models.ConceptModel`.
        batches: record batches with ``doc_id``, ``unit``, ``char_start``, ``char_end``,
            ``activation`` (``(d_model,)``).
        k: top rows kept per concept.
        n_pool: activating rows sampled per concept.
        n_quiet: non-activating runs sampled per concept.
        min_quiet_chars: shortest run kept (characters).
        seed: seed of the sample keys.
        device: where the concept model encodes (the codes' ``nonzero()`` runs there too).
        path: ``"auto"`` (per batch: dense above :data:`DENSE_ABOVE` non-zero codes, else
            sparse), ``"sparse"`` or ``"dense"``: the same result, at different costs.

    Returns:
        the :class:`ScanPartial`.

    Raises:
        ValueError: an unknown ``path``.
    """
    scanner = _Scanner(concept_model.nb_concepts, k, n_pool, n_quiet, min_quiet_chars, int(seed), path)
    for batch in batches:
        x = torch.from_numpy(tensor_column_to_numpy(batch.column("activation")).astype(np.float32))
        if x.shape[0] == 0:
            continue
        z = concept_model.encode(x.to(device)).float()  # (n_rows, nb_concepts)
        meta = {key: batch.column(key).to_numpy().astype(np.int64) for key in META}
        scanner.add(z, meta)
    return scanner.finish()


def merge_scans(a: ScanPartial, b: ScanPartial) -> ScanPartial:
    """The scan of the rows of ``a`` and ``b`` (disjoint documents): associative, and
    equal to one scan over both (ties of the top k keep ``a``'s rows first).

    Raises:
        ValueError: the two partials keep different sizes or concept counts.
    """
    if (a.k, a.n_pool, a.n_quiet, a.fired.shape) != (b.k, b.n_pool, b.n_quiet, b.fired.shape):
        raise ValueError("merge_scans: the partial scans were made with different sizes")
    best = {name: t.clone() for name, t in a.best.items()}
    C = a.fired.shape[0]
    conc, slot = np.tile(np.arange(C), a.k), np.repeat(np.arange(a.k), C)  # b's entries, slot-major
    flat = {name: t.numpy().reshape(-1) for name, t in b.best.items()}
    sel = flat["value"] > best["value"].numpy()[-1][conc]  # ties go to a's rows
    _merge_best({name: t.numpy() for name, t in best.items()},
                {"concept": conc[sel], **{name: v[sel] for name, v in flat.items()}}, slot[sel])
    return ScanPartial(best, _keep_smallest(_cat(a.pool, b.pool), a.n_pool),
                       _keep_smallest(_cat(a.quiet, b.quiet), a.n_quiet),
                       a.fired + b.fired, a.n_rows + b.n_rows, a.k, a.n_pool, a.n_quiet)


def _slots(flat: dict[str, np.ndarray], names: tuple[str, ...], n: int, C: int) -> dict[str, torch.Tensor]:
    """Flat entries sorted by (concept, key) as ``(n, C)`` tensors, ``-1`` (``-inf`` values) padded."""
    out = {name: np.full((n, C), -1, np.int64) for name in names}
    if "value" in flat:
        out["value"] = np.full((n, C), -np.inf, np.float32)
    if len(flat["key"]):
        conc = flat["concept"]
        slot = ranks_in_runs(conc)
        for name in out:
            out[name][slot, conc] = flat[name]
    return {name: torch.from_numpy(v) for name, v in out.items()}


def finish_scan(part: ScanPartial) -> dict:
    """The result of :func:`raylens.concepts.interpret.scan_concepts` from a (merged) partial scan:
    ``best``, ``frequency`` (float ``(C,)``), ``n_rows``, ``pool`` (``(n_pool, C)`` tensors,
    in key order, i.e. random) and ``quiet`` (``(n_quiet, C)``)."""
    C = part.fired.shape[0]
    return {"best": part.best, "frequency": part.fired.float() / max(part.n_rows, 1), "n_rows": part.n_rows,
            "pool": _slots(part.pool, META, part.n_pool, C), "quiet": _slots(part.quiet, _QUIET_COLS, part.n_quiet, C)}
