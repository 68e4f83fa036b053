"""The top-k scan over the activation rows, split so that it runs in parallel: a partial scan
of any subset of whole documents (:func:`scan_partial`, one shard per task), an associative
merge (:func:`merge_scans`) and the final tables (:func:`finish_scan`).

What one scan keeps, per concept (see :mod:`raylens.concepts.interpret` for why):

* the ``k`` highest codes with their rows (top-k merging is associative);
* a uniform sample of ``n_pool`` activating rows (``code > 0``): each (row, concept) gets a
  random key, a hash of ``(seed, doc_id, unit, concept)`` (splitmix64), and the sample is the
  ``n_pool`` smallest keys (Efraimidis & Spirakis 2006, unweighted): it depends on the rows and
  the seed, not on their order or on how they were split across tasks;
* a uniform sample of ``n_quiet`` non-activating runs (maximal runs of consecutive units of one
  document where the concept does not fire, at least ``min_quiet_chars`` long), keyed the same
  way by ``(seed, doc_id, char_start, concept)``;
* how many rows fire it (its frequency).

Sparsity. SAE codes have a handful of non-zeros per row: only the entries above a concept's
current k-th best value enter the top-k merge, and only the activating entries are keyed for
the pool, so after the first rows a batch costs one comparison per code instead of a sort.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from raylens.io.schemas import tensor_column_to_numpy

__all__ = ["META", "ScanPartial", "finish_scan", "hash_keys", "merge_scans", "quiet_runs", "scan_partial"]

#: The row metadata kept with each example.
META = ("doc_id", "unit", "char_start", "char_end")
_QUIET_COLS = ("doc_id", "char_start", "char_end")
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_keys(seed: int, a: np.ndarray, b: np.ndarray, concept: np.ndarray) -> np.ndarray:
    """Uniform keys in ``[0, 1)`` on a grid of ``2**-40`` (float64, exact), a hash of
    ``(seed, a, b, concept)`` elementwise (int arrays of one shape): the same inputs give the
    same key in any process."""
    with np.errstate(over="ignore"):
        x = _mix(np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + a.astype(np.uint64))
        x = _mix(x ^ (b.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)))
        x = _mix(x ^ (concept.astype(np.uint64) + np.uint64(0x632BE59BD9B4E019)))
    return (x >> np.uint64(24)).astype(np.float64) * 2.0 ** -_KEY_BITS


_KEY_BITS = 40


def _order_key(cols: dict[str, np.ndarray]) -> np.ndarray:
    """One int64 per entry ordering by (concept, key) (keys are multiples of ``2**-40``)."""
    return (cols["concept"] << _KEY_BITS) | (cols["key"] * 2.0 ** _KEY_BITS).astype(np.int64)


def _keep_smallest(cols: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Of flat entries (``concept``, ``key``, ...), the ``n`` smallest keys per concept, sorted by
    (concept, key). Entries that are already sorted runs (a kept pool, then new entries) merge
    in about linear time: numpy's stable sort (timsort) finds the runs."""
    order = np.argsort(_order_key(cols), kind="stable")
    conc = cols["concept"][order]
    if not len(conc):
        return cols
    starts = np.flatnonzero(np.r_[True, conc[1:] != conc[:-1]])
    rank = np.arange(len(conc)) - np.repeat(starts, np.diff(np.r_[starts, len(conc)]))
    keep = order[rank < n]
    return {name: v[keep] for name, v in cols.items()}


def _cat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([a[name], b[name]]) for name in a}


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


def quiet_runs(fired: np.ndarray, doc: np.ndarray, unit: np.ndarray, cs: np.ndarray, ce: np.ndarray,
               min_chars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of consecutive units of one document where a concept does not fire.

    Args: ``fired`` ``(m, C)`` bool; ``doc``, ``unit``, ``cs``, ``ce`` ``(m,)`` (rows in
    stream order; a run breaks where the document changes or units are not consecutive).
    Returns ``(concept, doc_id, char_start, char_end)`` of the runs at least ``min_chars`` long.
    """
    m = fired.shape[0]
    quiet = ~fired
    brk = np.ones(m + 1, dtype=bool)  # brk[i]: a run cannot continue from row i-1 to row i
    if m > 1:
        brk[1:m] = (doc[1:] != doc[:-1]) | (unit[1:] != unit[:-1] + 1)
    prev_quiet = np.vstack([np.zeros((1, quiet.shape[1]), bool), quiet[:-1]])
    next_quiet = np.vstack([quiet[1:], np.zeros((1, quiet.shape[1]), bool)])
    start = quiet & (brk[:m, None] | ~prev_quiet)
    end = quiet & (brk[1:, None] | ~next_quiet)
    s_c, s_r = np.nonzero(start.T)  # concept-major, rows ascending: starts and ends pair up
    _, e_r = np.nonzero(end.T)
    lo, hi = cs[s_r], ce[e_r]
    keep = (hi - lo) >= min_chars
    return s_c[keep], doc[s_r][keep], lo[keep], hi[keep]


@dataclass
class ScanPartial:
    """What a scan of some whole documents keeps (merge with :func:`merge_scans`).

    Attributes:
        best: ``value`` float ``(k, C)`` (descending per column, ``-inf`` padded) and the
            :data:`META` columns int64 ``(k, C)`` (``-1`` padded).
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


def _merge_top(best: dict[str, torch.Tensor], vals: torch.Tensor, meta: dict[str, torch.Tensor],
               k: int) -> dict[str, torch.Tensor]:
    """The ``k`` largest of ``best`` + new candidates ``vals (m, C)`` (``-inf`` = no candidate)
    whose rows have ``meta`` (``(m,)`` each, one value per row, or ``(m, C)``); ties keep
    ``best``'s entries first."""
    top_vals, idx = torch.topk(torch.cat([best["value"], vals]).T.contiguous(), k, dim=1, sorted=True)  # rows: faster
    top_vals, idx = top_vals.T.contiguous(), idx.T.contiguous()
    old = idx < k
    out = {"value": top_vals}
    for key in META:
        kept = torch.gather(best[key], 0, idx.clamp(max=k - 1))
        new_idx = (idx - k).clamp(min=0)
        new = meta[key][new_idx] if meta[key].ndim == 1 else torch.gather(meta[key], 0, new_idx)
        out[key] = torch.where(old, kept, new)
    return out


class _Scanner:
    """One partial scan fed batch by batch (the state of :func:`scan_partial`)."""

    def __init__(self, C: int, k: int, n_pool: int, n_quiet: int, min_chars: int, seed: int):
        self.part = ScanPartial.empty(C, k, n_pool, n_quiet)
        self.C, self.min_chars, self.seed = C, min_chars, seed
        self.pool_kth = np.full(C, np.inf)  # a concept's largest kept key once its sample is full
        self.quiet_kth = np.full(C, np.inf)
        self.carry: dict[str, np.ndarray] | None = None  # rows of the last, maybe unfinished, document

    def add(self, z: torch.Tensor, meta: dict[str, np.ndarray]) -> None:
        """Codes ``z (n, C)`` (CPU float32) of rows with metadata ``(n,)`` each, in stream order."""
        p = self.part
        r, c = torch.nonzero(z, as_tuple=True)  # the active codes: a few per row for an SAE
        v = z[r, c]
        p.fired += torch.bincount(c, minlength=self.C)
        p.n_rows += z.shape[0]
        if p.k:
            self._add_top(z, meta, r, c, v)
        if p.n_pool:
            pos = v > 0
            self._add_pool(r[pos].numpy(), c[pos].numpy(), v[pos].numpy(), meta)
        if p.n_quiet:
            self._add_quiet(z, meta)

    def _add_top(self, z: torch.Tensor, meta: dict[str, np.ndarray], r: torch.Tensor, c: torch.Tensor,
                 v: torch.Tensor) -> None:
        """Merge the rows with a code above its concept's k-th best (``r``, ``c``, ``v``: the
        non-zero codes; when every k-th best is >= 0, only those can beat it)."""
        p = self.part
        kth = p.best["value"][-1]
        if bool((kth >= 0).all()):
            rows = torch.unique(r[v > kth[c]])
        else:
            rows = torch.nonzero((z > kth).any(1)).flatten()
        if rows.numel():
            zr = z[rows]
            sub = torch.where(zr > kth, zr, torch.tensor(-float("inf")))
            m = {key: torch.from_numpy(meta[key])[rows] for key in META}
            p.best = _merge_top(p.best, sub, m, p.k)

    def _add_pool(self, r: np.ndarray, c: np.ndarray, v: np.ndarray, meta: dict[str, np.ndarray]) -> None:
        """Offer the activating codes ``v`` at rows ``r``, concepts ``c`` to the sampled pools."""
        key = hash_keys(self.seed, meta["doc_id"][r], meta["unit"][r], c)
        keep = key < self.pool_kth[c]
        if not keep.any():
            return
        r, c, key = r[keep], c[keep], key[keep]
        new = {"concept": c.astype(np.int64), "key": key, "value": v[keep],
               **{name: meta[name][r].astype(np.int64) for name in META}}
        p = self.part
        p.pool = _keep_smallest(_cat(p.pool, new), p.n_pool)
        self.pool_kth = _kth_key(p.pool, p.n_pool, self.C)

    def _add_quiet(self, z: torch.Tensor, meta: dict[str, np.ndarray]) -> None:
        rows = {key: meta[key] for key in META}
        rows["fired"] = (z > 0).numpy()
        if self.carry is not None:
            rows = {name: np.concatenate([self.carry[name], rows[name]]) for name in rows}
        last = np.flatnonzero(rows["doc_id"] != rows["doc_id"][-1])
        cut = int(last[-1]) + 1 if len(last) else 0  # the last document may go on in the next batch
        self.carry = {name: v[cut:] for name, v in rows.items()}
        if cut:
            self._runs({name: v[:cut] for name, v in rows.items()})

    def _runs(self, rows: dict[str, np.ndarray]) -> None:
        c, d, lo, hi = quiet_runs(rows["fired"], rows["doc_id"], rows["unit"], rows["char_start"],
                                  rows["char_end"], self.min_chars)
        key = hash_keys(self.seed, d, lo, c)
        keep = key < self.quiet_kth[c]
        if keep.any():
            new = {"concept": c[keep].astype(np.int64), "key": key[keep], "doc_id": d[keep].astype(np.int64),
                   "char_start": lo[keep].astype(np.int64), "char_end": hi[keep].astype(np.int64)}
            p = self.part
            p.quiet = _keep_smallest(_cat(p.quiet, new), p.n_quiet)
            self.quiet_kth = _kth_key(p.quiet, p.n_quiet, self.C)

    def finish(self) -> ScanPartial:
        """The partial scan (the last document's quiet runs flushed)."""
        if self.carry is not None and len(self.carry["doc_id"]):
            self._runs(self.carry)
            self.carry = None
        return self.part


@torch.no_grad()
def scan_partial(concept_model, batches: Iterable[pa.RecordBatch | pa.Table], *, k: int = 10, n_pool: int = 0,
                 n_quiet: int = 0, min_quiet_chars: int = 0, seed: int = 0, device: str = "cpu") -> ScanPartial:
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
        device: where the concept model encodes.

    Returns:
        the :class:`ScanPartial`.
    """
    scanner = _Scanner(concept_model.nb_concepts, k, n_pool, n_quiet, min_quiet_chars, int(seed))
    for batch in batches:
        x = torch.from_numpy(tensor_column_to_numpy(batch.column("activation")).astype(np.float32))
        if x.shape[0] == 0:
            continue
        z = concept_model.encode(x.to(device)).float().cpu()  # (n_rows, nb_concepts)
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
    return ScanPartial(_merge_top(a.best, b.best["value"], {key: b.best[key] for key in META}, a.k),
                       _keep_smallest(_cat(a.pool, b.pool), a.n_pool),
                       _keep_smallest(_cat(a.quiet, b.quiet), a.n_quiet),
                       a.fired + b.fired, a.n_rows + b.n_rows, a.k, a.n_pool, a.n_quiet)


def _slots(flat: dict[str, np.ndarray], names: tuple[str, ...], n: int, C: int) -> dict[str, torch.Tensor]:
    """Flat entries sorted by (concept, key) as ``(n, C)`` tensors, ``-1`` (``-inf`` values) padded."""
    out = {name: np.full((n, C), -1, np.int64) for name in names}
    if "value" in flat:
        out["value"] = np.full((n, C), -np.inf, np.float32)
    if len(flat["key"]):
        conc = flat["concept"]
        slot = np.arange(len(conc)) - np.searchsorted(conc, conc, side="left")
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
