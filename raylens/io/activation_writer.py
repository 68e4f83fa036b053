"""Writing one shard's activation rows while the next rows are computed.

Extraction computes a shard's rows in windows of whole documents
(:meth:`raylens.models.split.SplitModel.iter_extract`). :class:`ActivationShardWriter` takes
each window, splits its rows by document into train and held-out rows
(:func:`raylens.io.readers.heldout_mask`) and appends them to the shard's two files, in a
background thread: the next window is computed while this one is encoded and written (pyarrow's
Parquet encoder releases the GIL). One window is in flight at most, so the host holds two
windows (:data:`raylens.models.split.WINDOW_COPIES` counts them).

Measured with a nearly free forward, as on a GPU (``bench/extraction.py --cheap``, 300-document
shards of about five windows, median of 5 interleaved pairs): the time extraction waits on
writing fell from 26.8% of shard time to 7.0%, rows/s 1.09x (1.45x in an earlier 3-pair run). A shard of a single window gains nothing (its write is waited for
at the end): large runs want shards of many windows (README, "Large runs").
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from raylens.io.readers import HELDOUT_KIND, heldout_mask, rows_where
from raylens.io.store import OutputStore, ShardFileWriter


class ActivationShardWriter:
    """The train (``activations/``) and held-out (``activations_heldout/``) files of one
    activation shard, written window by window in a background thread.

    Args:
        store: the job's output store.
        shard: shard name.
        schema: the activation schema (:func:`raylens.io.schemas.activations_schema`).
        heldout_fraction: share of documents whose rows go to the held-out file (0: no such
            file, every row is a train row).
        slice_rows: rows split and written at a time (bounds the copies the split makes:
            :func:`raylens.models.split.write_slice_rows`).
        background: write in a background thread (True), or in the caller's (False).
        **file_options: :class:`raylens.io.store.ShardFileWriter` options (``max_file_bytes``,
            ``row_group_bytes``, ``parquet_options``).

    Attributes (read after :meth:`close`): ``n_rows`` and ``n_heldout_rows`` (rows written),
    ``write_seconds`` (seconds spent splitting and writing, in whichever thread) and
    ``wait_seconds`` (seconds the caller waited for the writing: what it costs extraction).
    """

    def __init__(self, store: OutputStore, shard: str, schema: pa.Schema, *, heldout_fraction: float,
                 slice_rows: int, background: bool = True, **file_options):
        self.store, self.shard, self.schema = store, shard, schema
        self.heldout_fraction, self.slice_rows, self.background = heldout_fraction, slice_rows, background
        self.file_options = file_options
        self.write_seconds = self.wait_seconds = 0.0
        self._files: dict[str, ShardFileWriter] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    @property
    def n_rows(self) -> int:
        return self._files["activations"].n_rows if self._files else 0

    @property
    def n_heldout_rows(self) -> int:
        return self._files[HELDOUT_KIND].n_rows if HELDOUT_KIND in self._files else 0

    def write(self, window: pa.Table) -> None:
        """Queue one window's rows ``(n_rows,)`` (``schema``) for writing; waits first for the
        window before it (raises what its writing raised)."""
        self._open()
        self._wait()
        if not self.background:
            t0 = time.perf_counter()
            self._write(window)
            self.wait_seconds += time.perf_counter() - t0
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"write-{self.shard}")
        self._pending = self._pool.submit(self._write, window)

    def _open(self) -> None:
        if not self._files:
            kinds = ["activations"] + ([HELDOUT_KIND] if self.heldout_fraction > 0 else [])
            self._files = {k: self.store.shard_writer(k, self.shard, self.schema, **self.file_options) for k in kinds}

    def _write(self, window: pa.Table) -> None:
        t0 = time.perf_counter()
        for start in range(0, window.num_rows, self.slice_rows):  # the split's copies: one slice at a time
            part = window.slice(start, self.slice_rows)
            if self.heldout_fraction > 0:
                mask = heldout_mask(part["doc_id"].to_numpy(), self.heldout_fraction)
                self._files[HELDOUT_KIND].write(rows_where(part, mask))
                part = rows_where(part, ~mask)
            self._files["activations"].write(part)
            del part
        self.write_seconds += time.perf_counter() - t0

    def _wait(self) -> None:
        if self._pending is not None:
            t0 = time.perf_counter()
            pending, self._pending = self._pending, None
            try:
                pending.result()
            finally:
                self.wait_seconds += time.perf_counter() - t0

    def close(self) -> list[str]:
        """Wait for the last window, finish the files and move them into place (unmarked: the
        caller commits them with :meth:`raylens.io.store.OutputStore.commit_shard`); their
        relative paths, train files first. Raises what the writing raised."""
        self._open()
        self._wait()
        t0 = time.perf_counter()
        files = [f for w in self._files.values() for f in w.close()]
        elapsed = time.perf_counter() - t0
        self.write_seconds += elapsed
        self.wait_seconds += elapsed
        self._shutdown()
        return files

    def abort(self) -> None:
        """Stop: wait for a window being written (its error is dropped), then close the files
        without committing them (:meth:`raylens.io.store.ShardFileWriter.abort`)."""
        if self._pending is not None:
            self._pending.cancel()
            try:
                self._wait()
            except Exception:  # noqa: BLE001 (the caller is already raising the first error)
                pass
        for w in self._files.values():
            w.abort()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


__all__ = ["ActivationShardWriter"]
