"""ActivationShardWriter: the background writer gives the same files as writing in place, writes
while the caller goes on, and a failed write surfaces and commits nothing (real Parquet)."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylens.io.activation_writer import ActivationShardWriter
from raylens.io.readers import heldout_mask
from raylens.io.schemas import activation_array, activation_parquet_options, activations_schema
from raylens.io.store import OutputStore, ShardFileWriter

D = 8


def _window(doc_ids: range, rows_per_doc: int = 5, seed: int = 0) -> pa.Table:
    schema = activations_schema(D, "float16")
    docs = np.repeat(np.asarray(doc_ids, np.int64), rows_per_doc)
    n = len(docs)
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float16)
    cols = {}
    for field in schema:
        if field.name == "activation":
            cols[field.name] = activation_array(x, "float16")
        elif field.name == "doc_id":
            cols[field.name] = pa.array(docs, field.type)
        else:
            cols[field.name] = pa.nulls(n, field.type) if field.nullable else pa.array(np.zeros(n), field.type)
    return pa.table(cols, schema=schema)


def _write(store: OutputStore, windows: list[pa.Table], background: bool) -> ActivationShardWriter:
    schema = activations_schema(D, "float16")
    w = ActivationShardWriter(store, "shard-00000", schema, heldout_fraction=0.3, slice_rows=7, background=background,
                              row_group_bytes=2**10, parquet_options=activation_parquet_options(schema))
    for t in windows:
        w.write(t)
    files = w.close()
    store.commit_shard("activations", "shard-00000", files, {"n_rows": w.n_rows})
    return w


def test_background_writes_the_same_files_as_writing_in_place(tmp_path):
    windows = [_window(range(i * 10, i * 10 + 10), seed=i) for i in range(4)]
    a, b = OutputStore(str(tmp_path / "a")), OutputStore(str(tmp_path / "b"))
    wa, wb = _write(a, windows, background=True), _write(b, windows, background=False)
    assert (wa.n_rows, wa.n_heldout_rows) == (wb.n_rows, wb.n_heldout_rows)
    assert wa.n_rows + wa.n_heldout_rows == 200 and wa.n_heldout_rows > 0
    every = pa.concat_tables(windows)
    held = heldout_mask(every["doc_id"].to_numpy(), 0.3)
    for kind, expected in (("activations", every.filter(pa.array(~held))), ("activations_heldout", every.filter(pa.array(held)))):
        fa, fb = pq.ParquetFile(a.path(kind, "shard-00000.parquet")), pq.ParquetFile(b.path(kind, "shard-00000.parquet"))
        assert fa.read().equals(fb.read()) and fa.read().equals(expected)  # rows, values and order
        assert fa.metadata.num_row_groups == fb.metadata.num_row_groups > 1  # same row groups
    assert wa.write_seconds > 0 and wb.wait_seconds >= wb.write_seconds  # in place: every write is waited for


def test_the_caller_goes_on_while_a_window_is_written(tmp_path, monkeypatch):
    """write() returns while the window is still being written (the writing waits for the caller
    to go on); the next write() waits for it."""
    caller_went_on, order = threading.Event(), []
    real = ShardFileWriter.write

    def blocked(self, table):
        if self.folder == "activations" and not order:
            order.append("writing")
            assert caller_went_on.wait(30), "write() did not return before its window was written"
        real(self, table)

    monkeypatch.setattr(ShardFileWriter, "write", blocked)
    store = OutputStore(str(tmp_path))
    schema = activations_schema(D, "float16")
    w = ActivationShardWriter(store, "shard-00000", schema, heldout_fraction=0.0, slice_rows=100)
    w.write(_window(range(10)))
    order.append("caller")  # the next window would be computed here
    caller_went_on.set()
    w.write(_window(range(10, 20)))
    w.close()
    assert order[:2] in (["writing", "caller"], ["caller", "writing"])
    assert w.n_rows == 100 and w.n_heldout_rows == 0


def test_a_failed_background_write_surfaces_and_commits_nothing(tmp_path, monkeypatch):
    real = ShardFileWriter.write

    def failing(self, table):
        if self.n_rows > 0:
            raise OSError("disk full")
        real(self, table)

    monkeypatch.setattr(ShardFileWriter, "write", failing)
    store = OutputStore(str(tmp_path))
    w = ActivationShardWriter(store, "shard-00000", activations_schema(D, "float16"), heldout_fraction=0.0,
                              slice_rows=100)
    with pytest.raises(OSError, match="disk full"):
        for i in range(4):  # the second window fails in the background: the third write raises it
            w.write(_window(range(i * 10, i * 10 + 10)))
        w.close()
    w.abort()
    assert store.done_shards("activations") == []
    assert not list((tmp_path / "activations").glob("*.parquet"))  # local temporaries removed
