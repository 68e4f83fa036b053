"""Streams of activation rows from the Parquet shards, as torch tensors, in bounded memory.

Several reader threads read and decode row groups ahead of the consumer (pyarrow and the
numpy casts release the GIL), so a training loop on another thread does not wait for I/O;
the rows still come out in shard order (the same rows in the same order whatever the number
of readers).

Held-out split. When the extraction wrote the held-out documents' rows apart, under
``activations_heldout/<shard>.parquet`` (committed by the same ``activations/_success`` marker),
``split="train"`` reads ``activations/`` only and ``"heldout"`` reads ``activations_heldout/``
only: each pass reads only the rows it uses. Older outputs have no such folder: every row is
in ``activations/`` and :func:`heldout_mask` (a hash of the document id) splits them on read.
"""

from __future__ import annotations

import posixpath

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raylens.io.schemas import tensor_column_to_numpy
from raylens.io.store import OutputStore

#: Folder of the held-out documents' activation rows (see the module docstring).
HELDOUT_KIND = "activations_heldout"


def heldout_mask(doc_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic document-level held-out split: True for held-out documents.

    A document is held out when a multiplicative hash of its id falls below
    ``fraction`` of the hash range, so the split needs no state and no pass over the data.
    """
    if fraction <= 0:
        return np.zeros(len(doc_ids), dtype=bool)
    h = (doc_ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)
    return h < np.uint64(int(fraction * (1 << 32)))


def mask_runs(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """The runs of True in ``mask`` ``(n_rows,)``: their starts and their ends (exclusive), in order."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], np.asarray(mask, dtype=bool), [False]]).astype(np.int8)))
    return edges[0::2].tolist(), edges[1::2].tolist()


#: Least mean run size (bytes of rows) for which :func:`rows_where` slices instead of copying.
MIN_RUN_BYTES = 8 * 1024


def rows_where(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """The rows of ``table`` where ``mask`` ``(n_rows,)`` is True, in order. When they come in
    runs of at least :data:`MIN_RUN_BYTES` on average (a per-document mask, such as the held-out
    split, at token granularity; consecutive train documents make one run), as zero-copy slices
    of the runs (a chunked table; Parquet writers read across the chunks); else copied by
    ``Table.filter``. The copy costs per byte, the writer pays per chunk: selecting and writing
    a part of a 65,536-row float16 window (``bench/heldout_split.py``, large allocations from
    mmap as in extraction workers) as slices took 6.6x the filter's time for runs of one row of
    d_model 256 (512 B), 1.15x at 8 rows (4 KiB), 0.88x at 18 rows (9 KiB), 0.57x at 2,265
    rows; at d_model 2048 1.17x for runs of one row (4 KiB), 0.84x at 2 rows (8 KiB), 0.50x for
    long runs: the break-even is at about 6-8 KiB per run whatever the width.

    Raises:
        ValueError: ``mask`` does not have one entry per row.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (table.num_rows,):
        raise ValueError(f"mask of shape {mask.shape} for a table of {table.num_rows} rows")
    starts, stops = mask_runs(mask)
    if not starts:
        return table.slice(0, 0)
    row_bytes = table.nbytes / max(1, table.num_rows)
    if len(starts) * MIN_RUN_BYTES > int(mask.sum()) * row_bytes:
        return table.filter(mask)
    return pa.concat_tables([table.slice(a, b - a) for a, b in zip(starts, stops)])


def heldout_paths(store: OutputStore, shard: str, kind: str = "activations") -> list[str]:
    """Filesystem paths of one finished shard's held-out files: those its marker lists in
    :data:`HELDOUT_KIND`, else ``activations_heldout/<shard>.parquet`` (markers of one file each);
    only files that exist and are not empty (a shard may hold no held-out document)."""
    files = store.shard_files(kind, shard, HELDOUT_KIND) or [posixpath.join(HELDOUT_KIND, f"{shard}.parquet")]
    return [p for p in map(store.path, files) if store.fs.get_file_info(p).size]


def split_paths(store: OutputStore, split: str, kind: str = "activations") -> tuple[list[str], bool]:
    """The shard files a split reads, and whether rows must still be filtered by :func:`heldout_mask`.

    Args:
        store: the job's output store.
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        kind: the shard family whose markers commit the shards.

    Returns:
        ``(paths, filter)``: with a held-out folder, ``train`` -> ``kind/`` files, ``heldout`` ->
        held-out files, ``all`` -> both, and ``filter`` False; without one, every ``kind/`` file
        and ``filter = split != "all"``.

    Raises:
        ValueError: unknown split.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    main = store.shard_paths(kind)
    if kind != "activations" or not store.exists(HELDOUT_KIND):
        return main, split != "all"
    held = [p for s in store.done_shards(kind) for p in heldout_paths(store, s, kind)]
    return {"train": main, "heldout": held, "all": main + held}[split], False


class Background:
    """The items of ``items``, produced by a background thread (started at once) at most
    ``depth`` items ahead; iterate it once.

    An exception of the producer is raised in the consumer; :meth:`close`, or a consumer that
    drops this object, stops the producer at its next item. ``on_done`` is called by the
    producer thread once it has produced the last item (while the consumer may still be taking
    the queued ones), not after an error or a close."""

    def __init__(self, items: Iterator, depth: int, on_done: Callable[[], None] | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        # the thread holds the queue and the event, not this object: dropping it stops the producer
        threading.Thread(target=_produce, args=(items, self._queue, self._stop, on_done),
                         name="activation-stream", daemon=True).start()

    def __iter__(self) -> "Background":
        return self

    def __next__(self):
        item, exc = self._queue.get()
        if item is _END:
            self._stop.set()
            if exc is not None:
                raise exc
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (at its next item)."""
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


#: The producer's last item.
_END = object()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(items: Iterator, q: queue.Queue, stop: threading.Event, on_done: Callable[[], None] | None) -> None:
    try:
        for item in items:
            if not _put(q, stop, (item, None)):
                return
    except BaseException as exc:  # handed to the consumer
        _put(q, stop, (_END, exc))
        return
    if on_done is not None and not stop.is_set():
        on_done()
    _put(q, stop, (_END, None))


def finite_rows(x: np.ndarray) -> np.ndarray:
    """True for the rows of ``x`` ``(n_rows, d_model)`` without a NaN or an infinite value.
    float16 rows are tested on their bits (an exponent of all ones), about 3x faster than
    ``np.isfinite`` on float16."""
    if x.dtype == np.float16:
        return np.bitwise_and(x.view(np.uint16), 0x7C00).max(axis=1, initial=0) != 0x7C00
    return np.isfinite(x).all(axis=1)


def as_float32(rows: np.ndarray) -> torch.Tensor:
    """A batch of rows ``(n_rows, d_model)`` as a float32 tensor that owns its memory (a new
    array even when ``rows`` is float32: a view would keep its whole read block alive)."""
    return torch.from_numpy(rows.astype(np.float32))


def as_stored(rows: np.ndarray) -> torch.Tensor:
    """A batch of rows ``(n_rows, d_model)`` as a tensor of the same dtype that owns its memory
    (copied when ``rows`` is a view)."""
    return torch.from_numpy(rows if rows.flags.owndata and rows.flags.c_contiguous else rows.copy())


class ActivationStream:
    """A re-iterable stream of ``(batch_rows, d_model)`` activation batches, float32 (or in the
    stored dtype, ``float32=False``).

    Each ``iter()`` re-reads the finished shards of ``kind`` (so a trainer can make
    several epochs without holding the data), keeps the ``split`` rows (``"train"``,
    ``"heldout"`` or ``"all"``; see the module docstring) and, when ``shuffle_buffer`` > 0,
    mixes rows through a seeded shuffle buffer: blocks of exactly ``shuffle_buffer`` rows (the
    last one shorter) are permuted with a generator seeded by ``seed + epoch``, so the order of
    an epoch depends only on the rows, the seed and the epoch (not on row-group sizes or the
    number of readers). ``epoch`` counts the passes, or is set with :meth:`set_epoch` (a
    resumed trainer replays an epoch). Rows with a NaN or an infinite value (a float16
    overflow, see :func:`raylens.models.split.float16_overflow_issues`) are left out and
    counted in ``n_nonfinite`` (rows dropped by the last full pass).

    Memory is bounded whatever the corpus: rows stay in their stored dtype (float16: 2 bytes
    per value) from the file to the cut of a batch, which is then a float32 copy (or a copy in
    that dtype); in flight are
    ``readers * prefetch`` row groups, the shuffle buffer (``shuffle_buffer`` rows, one array
    reused for the whole pass, and a scratch batch) and ``readers * prefetch`` float32 batches
    waiting for the consumer.

    Args:
        store: the job's output store.
        kind: the shard family, ``"activations"``.
        split: which documents to keep.
        heldout_fraction: share of documents held out (used only without a held-out folder).
        batch_rows: rows per yielded batch.
        shuffle_buffer: rows held for shuffling (0 = stream order).
        seed: seed of the shuffle.
        max_rows: stop after this many rows (None = all).
        readers: row groups read and decoded in parallel, ahead of the consumer (>= 1).
        prefetch: row groups in flight per reader (memory: ``readers * prefetch`` row groups).
        epochs: the passes the consumer will make (None: unknown). With a number, a pass that
            has read its last row starts reading the next one (passes ``1 .. epochs - 1``) while
            the consumer is still on its queued batches: an epoch does not start by waiting for
            a shuffle block to fill (it matters when an epoch is not much longer than the
            shuffle buffer). Memory: during that overlap a second pass's row groups, shuffle
            block and queued batches. Call :meth:`close` (or use the stream as a context
            manager) when done, which stops a read-ahead that no pass will take.
        float32: cast batches to float32 here, in the stream's background thread (True), or
            yield them in the stored dtype (False: float16 and float32 as stored, bfloat16 as
            float32, its exact decoding) for a consumer that casts them itself, e.g. on a GPU
            after the copy (half the bytes over PCIe, no host cast).
    """

    def __init__(
        self,
        store: OutputStore,
        kind: str = "activations",
        *,
        split: Literal["train", "heldout", "all"] = "all",
        heldout_fraction: float = 0.1,
        batch_rows: int = 1024,
        shuffle_buffer: int = 0,
        seed: int = 0,
        max_rows: int | None = None,
        readers: int = 4,
        prefetch: int = 2,
        epochs: int | None = None,
        float32: bool = True,
    ):
        self.store, self.kind, self.split = store, kind, split
        self.heldout_fraction, self.batch_rows = heldout_fraction, batch_rows
        self.shuffle_buffer, self.seed, self.max_rows = shuffle_buffer, seed, max_rows
        self.readers, self.prefetch = max(1, int(readers)), max(1, int(prefetch))
        self.epochs, self.float32 = epochs, float32
        self._epoch = 0
        self.n_nonfinite = 0
        self._ahead: tuple[int, Background, threading.Event] | None = None  # the pass read ahead (_start)
        self._taken = -1  # the pass the last iter() returned
        self._lock = threading.Lock()
        self._closes = 0  # close() calls: a pass started before one reads nothing ahead

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` pass number ``epoch`` (its shuffle order)."""
        self._epoch = int(epoch)

    def _read(self, path: str, row_group: int, filter_split: bool) -> tuple[np.ndarray, int]:
        """One row group: its kept rows ``(n, d_model)`` in the stored dtype (float16 stays
        float16 until a batch is cut: half the bytes in flight and in the shuffle buffer), and
        the non-finite rows dropped."""
        columns = ["doc_id", "activation"] if filter_split else ["activation"]
        table = pq.ParquetFile(path, filesystem=self.store.fs).read_row_group(row_group, columns=columns)
        x = tensor_column_to_numpy(table.column("activation"))
        keep = finite_rows(x)
        dropped = int((~keep).sum())
        if filter_split:
            held = heldout_mask(table.column("doc_id").to_numpy(), self.heldout_fraction)
            keep &= held if self.split == "heldout" else ~held
        return (x if keep.all() else x[keep]), dropped

    def _rows(self) -> Iterator[np.ndarray]:
        paths, filter_split = split_paths(self.store, self.split, self.kind)
        dropped = 0
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.readers, thread_name_prefix="activation-reader") as pool:
            jobs = ((p, g) for p in paths
                    for g in range(pq.ParquetFile(p, filesystem=self.store.fs).metadata.num_row_groups))
            for job in jobs:
                pending.append(pool.submit(self._read, *job, filter_split))
                if len(pending) >= self.readers * self.prefetch:
                    x, d = pending.popleft().result()
                    dropped += d
                    if len(x):
                        yield x
            while pending:
                x, d = pending.popleft().result()
                dropped += d
                if len(x):
                    yield x
        self.n_nonfinite = dropped

    def _blocks(self) -> Iterator[np.ndarray]:
        """Row blocks in stream order, cut at ``max_rows``."""
        emitted = 0
        for x in self._rows():
            if self.max_rows is not None:
                x = x[: self.max_rows - emitted]
                emitted += len(x)
            if len(x):
                yield x
            if self.max_rows is not None and emitted >= self.max_rows:
                return

    def _shuffled(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Blocks of exactly ``shuffle_buffer`` rows (the last shorter), each with its order: a
        permutation drawn from ``rng`` (the order ``rng.shuffle`` would give the block's rows,
        with the same draws). The rows are copied into one buffer per pass, reused from block to
        block, and gathered in that order when batches are cut: a block is valid only until the
        next one is asked for. Against a fresh concatenated block per ``shuffle_buffer`` rows,
        shuffled in place, it saves a copy and the fresh pages (a page fault per 4 KiB with the
        allocations from mmap, as in extraction workers), and the stream's peak memory is lower (bound in
        ``tests/test_readers.py``)."""
        size = self.shuffle_buffer
        block: np.ndarray | None = None
        n = 0
        for x in self._blocks():
            if block is None:
                block = np.empty((size, *x.shape[1:]), dtype=x.dtype)
            while len(x):
                k = min(len(x), size - n)
                block[n: n + k] = x[:k]
                n, x = n + k, x[k:]
                if n == size:
                    yield block, rng.permutation(size)
                    n = 0
        if n:
            yield block[:n], rng.permutation(n)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = self._epoch
        self._epoch += 1
        with self._lock:
            ahead, self._ahead = self._ahead, None
            self._taken, closes = epoch, self._closes
        if ahead is not None and ahead[0] != epoch:  # read ahead for another pass (set_epoch)
            ahead[1].close()
            ahead = None
        batches, produced = ahead[1:] if ahead is not None else self._start(epoch)
        if produced.is_set():
            self._read_ahead(epoch, closes)
        return batches

    def _start(self, epoch: int) -> tuple[Background, threading.Event]:
        """Pass ``epoch`` produced in the background, and the event set once it has produced its
        last batch (then the next pass is read ahead, see ``epochs``)."""
        produced, closes = threading.Event(), self._closes

        def on_done() -> None:
            produced.set()
            self._read_ahead(epoch, closes)

        rng = np.random.default_rng(self.seed + epoch)
        return Background(self._batches(rng), self.readers * self.prefetch, on_done), produced

    def _read_ahead(self, epoch: int, closes: int) -> None:
        """Start reading pass ``epoch + 1`` once pass ``epoch`` is both produced and taken by
        ``iter()`` (one pass ahead at most), unless :meth:`close` was called since."""
        with self._lock:
            if (self.epochs is None or epoch + 1 >= self.epochs or self._ahead is not None
                    or self._taken != epoch or self._closes != closes):
                return
            self._ahead = (epoch + 1, *self._start(epoch + 1))

    def close(self) -> None:
        """Stop a pass read ahead that no ``iter()`` has taken (see ``epochs``)."""
        with self._lock:
            ahead, self._ahead = self._ahead, None
            self._closes += 1
        if ahead is not None:
            ahead[1].close()

    def __enter__(self) -> "ActivationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _batches(self, rng: np.random.Generator) -> Iterator[torch.Tensor]:
        """Batches of ``batch_rows`` rows (the last one shorter), cut across blocks; shuffled
        blocks' rows are gathered in their order into a reused scratch array, so a batch costs
        one fresh array: the yielded tensor."""
        blocks = self._shuffled(rng) if self.shuffle_buffer > 0 else ((b, None) for b in self._blocks())
        as_tensor = as_float32 if self.float32 else as_stored
        size = self.batch_rows
        scratch: np.ndarray | None = None

        def rows(block: np.ndarray, order: np.ndarray | None, a: int, b: int) -> np.ndarray:
            """Rows ``a:b`` of ``block`` in ``order``: a view (of the block, or of the scratch)."""
            nonlocal scratch
            if order is None:
                return block[a:b]
            if scratch is None:
                scratch = np.empty((size, *block.shape[1:]), dtype=block.dtype)
            return np.take(block, order[a:b], axis=0, out=scratch[: b - a])

        head: np.ndarray | None = None  # rows short of a batch, carried into the next block (a copy)
        for block, order in blocks:
            start = 0
            if head is not None:
                start = min(size - len(head), len(block))
                head = np.concatenate([head, rows(block, order, 0, start)])
                if len(head) < size:
                    continue
                yield as_tensor(head)
                head = None
            end = start + (len(block) - start) // size * size
            for i in range(start, end, size):
                yield as_tensor(rows(block, order, i, i + size))
            if end < len(block):  # copied: the block (or the scratch) is reused, and no view keeps it alive
                head = rows(block, order, end, len(block)).copy()
        if head is not None:
            yield as_tensor(head)


__all__ = ["HELDOUT_KIND", "MIN_RUN_BYTES", "ActivationStream", "Background", "as_float32", "as_stored", "finite_rows", "heldout_mask",
           "heldout_paths", "mask_runs", "rows_where", "split_paths"]
