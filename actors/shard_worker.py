"""The shard-worker base: the plumbing of a ``map_batches`` stage over document shards, written
once. For each shard named in the batch it skips a shard already marked done (a retried task or
a resumed job), else reads ``documents/<shard>.parquet``, asks the subclass to process it, writes
``<kind>/<shard>.parquet`` and its success marker, and returns one summary row per shard.

A job's worker subclasses it and implements :meth:`ShardWorker.process_shard` (and names its
output ``kind``), or overrides :meth:`ShardWorker.produce_shard` to stream its rows to the files
itself (the concept worker: bounded host memory); see `actors.concept_worker` and `actors.attribution_worker`. No Ray import:
the pipeline hands the class to ``ray.data.Dataset.map_batches``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from raylens.io.store import OutputStore
from raylens.models.batching import take_oom_events

log = logging.getLogger(__name__)

#: summary columns every shard worker returns (one row per shard), before its own counts
SUMMARY_COLUMNS = ("shard", "skipped", "n_docs", "n_rows", "seconds", "oom_splits")


class ShardWorker:
    """A ``map_batches`` callable that turns document shards into output shards of ``kind``.

    Subclasses set :attr:`kind` and :attr:`store` (in their constructor) and implement
    :meth:`process_shard`; :meth:`shard_counts` adds job-specific integer columns to the
    summary rows.

    Attributes:
        kind: the output folder under the store (``"activations"``, ``"attributions"``).
        store: the job's output store.
    """

    kind: str
    store: OutputStore

    def process_shard(self, shard: str, docs: pa.Table) -> tuple[pa.Table, dict]:
        """Process one document shard (what the default :meth:`produce_shard` writes).

        Args:
            shard: the shard's name (``documents/<shard>.parquet``).
            docs: its documents (``raylens.io.schemas.DOCUMENTS_SCHEMA``: ``doc_id``, ``text``,
                ``label``).

        Returns:
            ``(table, meta)``: the rows to write as ``<kind>/<shard>.parquet`` and the JSON
            metadata of its success marker (``seconds`` is added by the caller).

        Raises:
            NotImplementedError: a worker that overrides :meth:`produce_shard` instead.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither process_shard nor produce_shard")

    def produce_shard(self, shard: str, docs: pa.Table, started: float) -> dict:
        """Write ``<kind>/<shard>`` and its success marker (the commit, written last) from
        :meth:`process_shard`'s table; returns the marker's content (``n_rows``, ``seconds`` since
        ``started`` (a ``time.perf_counter()`` value), :meth:`shard_meta` and the worker's meta).
        Override it to stream a large shard in bounded memory."""
        table, meta = self.process_shard(shard, docs)
        meta["seconds"] = time.perf_counter() - started
        meta["oom_splits"] = take_oom_events()
        meta.update(self.shard_meta())
        self.store.write_shard(self.kind, shard, table, meta)
        return {"n_rows": table.num_rows, **meta}

    def shard_meta(self) -> dict:
        """Extra marker metadata of every shard this worker writes (default: none)."""
        return {}

    def shard_counts(self, meta: dict) -> dict[str, int]:
        """Job-specific integer summary columns of a shard, from its marker ``meta``
        (default: none)."""
        return {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``map_batches`` entry: process the shards named in ``batch["shard"]``.

        Returns:
            One summary row per shard: :data:`SUMMARY_COLUMNS` (``seconds`` in seconds of
            reading plus processing, 0 for a skipped shard of an older run without it),
            ``oom_splits`` (batches split after running out of device memory,
            `raylens.models.batching`; also in the marker) and the
            columns of :meth:`shard_counts`.
        """
        rows = [self.run_shard(str(shard)) for shard in batch["shard"]]
        return {k: np.asarray([r[k] for r in rows]) for k in rows[0]} if rows else {}

    def run_shard(self, shard: str) -> dict:
        """One shard, skipped when already marked done; returns its summary row."""
        skipped = self.store.is_done(self.kind, shard)
        if skipped:
            meta = self.store.shard_meta(self.kind, shard)
        else:
            t0 = time.perf_counter()
            take_oom_events()  # count this shard's out-of-memory splits only
            docs = self.store.read_table(f"documents/{shard}.parquet")
            meta = self.produce_shard(shard, docs, t0)
            log.info("%s: shard %s, %d documents, %d rows in %.1fs", self.kind, shard, docs.num_rows,
                     meta["n_rows"], meta["seconds"])
        row = {"shard": shard, "skipped": skipped, "n_docs": int(meta.get("n_docs", 0)),
               "n_rows": int(meta["n_rows"]), "seconds": float(meta.get("seconds", 0.0)),
               "oom_splits": int(meta.get("oom_splits", 0))}
        return row | {k: int(v) for k, v in self.shard_counts(meta).items()}
