"""Streams of activation rows from the Parquet shards, as torch tensors, in bounded memory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from raylens.io.schemas import tensor_column_to_numpy
from raylens.io.store import OutputStore


def heldout_mask(doc_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic document-level held-out split: True for held-out documents.

    A document is held out when a multiplicative hash of its id falls below
    ``fraction`` of the hash range, so the split needs no state and no pass over the data.
    """
    if fraction <= 0:
        return np.zeros(len(doc_ids), dtype=bool)
    h = (doc_ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)
    return h < np.uint64(int(fraction * (1 << 32)))


class ActivationStream:
    """A re-iterable stream of ``(batch_rows, d_model)`` float32 activation batches.

    Each ``iter()`` re-reads the finished shards of ``kind`` (so a trainer can make
    several epochs without holding the data), keeps the ``split`` rows (``"train"``,
    ``"heldout"`` or ``"all"``; see :func:`heldout_mask`) and, when ``shuffle_buffer`` > 0,
    mixes rows through a seeded shuffle buffer of that many rows (a new permutation each
    pass), since rows of one document arrive together. Rows with a NaN or an infinite value
    (a float16 overflow, see :func:`raylens.models.split.float16_overflow_issues`) are left out
    and counted in ``n_nonfinite`` (rows dropped by the last full pass).

    Args:
        store: the job's output store.
        kind: the shard family, ``"activations"``.
        split: which documents to keep.
        heldout_fraction: share of documents held out.
        batch_rows: rows per yielded batch.
        shuffle_buffer: rows held for shuffling (0 = stream order).
        seed: seed of the shuffle.
        max_rows: stop after this many rows (None = all).
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
    ):
        self.store, self.kind, self.split = store, kind, split
        self.heldout_fraction, self.batch_rows = heldout_fraction, batch_rows
        self.shuffle_buffer, self.seed, self.max_rows = shuffle_buffer, seed, max_rows
        self._epoch = 0
        self.n_nonfinite = 0

    def _rows(self) -> Iterator[np.ndarray]:
        dropped = 0
        held = f"{self.kind}_heldout"  # held-out rows split off at extraction, when present
        folders = [self.kind, held] if self.store.shard_paths(self.kind, held) else [self.kind]
        folders = {"train": folders[:1], "heldout": folders[-1:], "all": folders}[self.split]
        for rb in (b for f in folders for b in self.store.iter_shard_batches(
                self.kind, columns=["doc_id", "activation"], batch_rows=self.batch_rows, folder=f)):
            x = tensor_column_to_numpy(rb.column("activation"))
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                dropped += int((~finite).sum())
                x, rb = x[finite], rb.filter(pa.array(finite))
            if self.split != "all":
                held = heldout_mask(rb.column("doc_id").to_numpy(), self.heldout_fraction)
                x = x[held] if self.split == "heldout" else x[~held]
            if len(x):
                yield x.astype(np.float32)
        self.n_nonfinite = dropped

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng(self.seed + self._epoch)
        self._epoch += 1
        emitted = 0
        buf: list[np.ndarray] = []
        n_buf = 0

        def emit(block: np.ndarray) -> Iterator[torch.Tensor]:
            for i in range(0, len(block), self.batch_rows):
                yield torch.from_numpy(block[i: i + self.batch_rows])

        for x in self._rows():
            if self.max_rows is not None:
                x = x[: self.max_rows - emitted]
                emitted += len(x)
            if self.shuffle_buffer <= 0:
                yield from emit(x)
            else:
                buf.append(x)
                n_buf += len(x)
                if n_buf >= self.shuffle_buffer:
                    block = np.concatenate(buf)
                    rng.shuffle(block)
                    keep = len(block) - len(block) % self.batch_rows
                    yield from emit(block[:keep])
                    buf, n_buf = [block[keep:]], len(block) - keep
            if self.max_rows is not None and emitted >= self.max_rows:
                break
        if n_buf:
            block = np.concatenate(buf)
            rng.shuffle(block)
            yield from emit(block)
