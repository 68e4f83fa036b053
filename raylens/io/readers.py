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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
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


def background(items: Iterator, depth: int) -> Iterator:
    """The items of ``items``, produced by a background thread at most ``depth`` items ahead.

    An exception of the producer is raised in the consumer; a consumer that stops early stops
    the producer (at its next item)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer
            q.put((done, exc))

    thread = threading.Thread(target=produce, name="activation-stream", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


def as_float32(rows: np.ndarray) -> torch.Tensor:
    """A batch of rows ``(n_rows, d_model)`` as a float32 tensor that owns its memory (a new
    array even when ``rows`` is float32: a view would keep its whole read block alive)."""
    return torch.from_numpy(rows.astype(np.float32))


class ActivationStream:
    """A re-iterable stream of ``(batch_rows, d_model)`` float32 activation batches.

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
    per value) from the file to the cut of a batch, which is then a float32 copy; in flight are
    ``readers * prefetch`` row groups, the shuffle buffer (about twice ``shuffle_buffer`` rows)
    and ``readers * prefetch`` float32 batches waiting for the consumer.

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
    ):
        self.store, self.kind, self.split = store, kind, split
        self.heldout_fraction, self.batch_rows = heldout_fraction, batch_rows
        self.shuffle_buffer, self.seed, self.max_rows = shuffle_buffer, seed, max_rows
        self.readers, self.prefetch = max(1, int(readers)), max(1, int(prefetch))
        self._epoch = 0
        self.n_nonfinite = 0

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
        keep = np.isfinite(x).all(axis=1)
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

    def _shuffled(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Blocks of exactly ``shuffle_buffer`` rows (the last shorter), each permuted by ``rng``."""
        buf: list[np.ndarray] = []
        n_buf = 0
        for x in self._blocks():
            buf.append(x)
            n_buf += len(x)
            while n_buf >= self.shuffle_buffer:
                block = np.concatenate(buf)
                head, rest = block[: self.shuffle_buffer], block[self.shuffle_buffer:]
                rng.shuffle(head)
                yield head
                buf, n_buf = [rest], len(rest)
        if n_buf:
            block = np.concatenate(buf)
            rng.shuffle(block)
            yield block

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng(self.seed + self._epoch)
        self._epoch += 1
        return background(self._batches(rng), self.readers * self.prefetch)

    def _batches(self, rng: np.random.Generator) -> Iterator[torch.Tensor]:
        blocks = self._shuffled(rng) if self.shuffle_buffer > 0 else self._blocks()
        pending: list[np.ndarray] = []
        n_pending = 0
        for block in blocks:  # re-cut into batch_rows batches across blocks
            pending.append(block)
            n_pending += len(block)
            if n_pending < self.batch_rows:
                continue
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
            keep = n_pending - n_pending % self.batch_rows
            for i in range(0, keep, self.batch_rows):
                yield as_float32(joined[i: i + self.batch_rows])
            # the remainder is copied, so that no view keeps the whole block alive
            pending = [joined[keep:].copy()] if keep < n_pending else []
            n_pending -= keep
        if n_pending:
            yield as_float32(np.concatenate(pending))


__all__ = ["HELDOUT_KIND", "ActivationStream", "as_float32", "background", "heldout_mask", "heldout_paths", "split_paths"]
