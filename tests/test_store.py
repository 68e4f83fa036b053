"""The output store on a local folder and on a real S3-compatible server on loopback (moto):
shards and markers, resume, JSON, folders; on S3 every object is written once at its final key
(no temporary object, no rename)."""

from __future__ import annotations

import logging
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from raylens.io.store import OutputStore, shard_name
from tests.s3 import s3_server


@pytest.fixture(scope="module")
def s3_query():
    with s3_server() as query:
        yield query


def _exercise(store: OutputStore, tmp_path) -> None:
    t = pa.table({"doc_id": pa.array([1, 2, 3], pa.int64()), "text": ["a", "b", "c"]})
    for i in range(3):
        assert not store.is_done("acts", shard_name(i))
        store.write_shard("acts", shard_name(i), t.slice(i, 1), {"seconds": 1.5})
    assert store.done_shards("acts") == [shard_name(i) for i in range(3)]
    assert store.shard_meta("acts", shard_name(1)) == {"n_rows": 1, "seconds": 1.5}
    got = pa.Table.from_batches(list(store.iter_shard_batches("acts")))
    assert got.equals(t)
    store.write_json("job_key.json", {"a": [1, 2]})
    assert store.read_json("job_key.json") == {"a": [1, 2]}
    store.write_table("concepts/x.parquet", t)
    assert store.read_table("concepts/x.parquet").equals(t)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    store.upload_dir(folder, "concept_model")
    assert (store.download_dir("concept_model") / "config.json").read_text() == "{}"
    store.remove("concepts/x.parquet")
    assert not store.exists("concepts/x.parquet")


def test_local_store(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    assert store.is_local
    _exercise(store, tmp_path)
    assert not list((tmp_path / "out").rglob(".tmp-*"))


def test_s3_store_writes_each_object_once_at_its_key(s3_query, tmp_path):
    uri = f"s3://raylens-test/run1{s3_query}"
    store = OutputStore(uri)
    assert not store.is_local
    assert store.staging_path("acts/shard-00000.parquet") == store.path("acts/shard-00000.parquet")
    _exercise(store, tmp_path)
    fs, root = pafs.FileSystem.from_uri(uri)
    keys = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))]
    assert keys and not [k for k in keys if ".tmp-" in k]
    again = OutputStore(uri)  # a rerun sees the finished shards
    assert again.done_shards("acts") == [shard_name(i) for i in range(3)]



def test_issues_table_schema_and_order():
    from raylens.io.schemas import ISSUES_SCHEMA, issues_table

    t = issues_table([{"doc_id": 3, "stage": "extract", "kind": "truncated", "error": "truncated to max_tokens=8"},
                      {"doc_id": 1, "stage": "attribute", "kind": "empty", "message": "Saliency: empty text"}])
    assert t.schema.equals(ISSUES_SCHEMA)
    assert t.to_pylist() == [
        {"doc_id": 1, "stage": "attribute", "kind": "empty", "message": "Saliency: empty text"},
        {"doc_id": 3, "stage": "extract", "kind": "truncated", "message": "truncated to max_tokens=8"}]
    assert issues_table([]).num_rows == 0


class _RequestLog(logging.Handler):
    """The request lines the loopback S3 server (werkzeug) logs: ``"PUT /bucket/key?... HTTP/1.1"``."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        m = re.search(r'"([A-Z]+) (\S+) HTTP', record.getMessage())
        if m:
            self.lines.append(f"{m.group(1)} {m.group(2)}")


def test_s3_streamed_shard_is_uploaded_once_per_file(s3_query):
    """A streamed shard (two part files past max_file_bytes, and a held-out file) and its marker:
    on the S3 server, each object is started once (one PutObject or one CreateMultipartUpload),
    only at its final key, with no copy and no delete; the rows read back equal the rows written."""
    from urllib.parse import unquote, urlsplit

    store = OutputStore(f"s3://raylens-test/stream{s3_query}")
    schema = pa.schema([pa.field("doc_id", pa.int64()), pa.field("x", pa.binary(4096))])
    tables = [pa.table({"doc_id": pa.array(range(i * 300, i * 300 + 300), pa.int64()),
                        "x": pa.array([bytes([i]) * 4096] * 300, pa.binary(4096))}, schema=schema) for i in range(3)]
    log, logger = _RequestLog(), logging.getLogger("werkzeug")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    try:
        train = store.shard_writer("acts", "shard-00000", schema, max_file_bytes=2 * 2**20)
        held = store.shard_writer("acts_heldout", "shard-00000", schema)
        for t in tables:
            train.write(t)
        held.write(tables[0].slice(0, 10))
        files = train.close() + held.close()
        store.commit_shard("acts", "shard-00000", files, {"n_rows": 900})
    finally:
        logger.removeHandler(log)
        logger.setLevel(old_level)
    assert files == ["acts/shard-00000.parquet", "acts/shard-00000-part0001.parquet", "acts_heldout/shard-00000.parquet"]
    starts: dict[str, int] = {}
    for line in log.lines:
        method, url = line.split(" ", 1)
        parts = urlsplit(url)
        key = unquote(parts.path).split("/stream/", 1)[-1]
        assert method != "DELETE", line
        if parts.path.endswith("/") or method not in ("PUT", "POST"):
            continue  # folder markers, reads, listings
        if (method == "PUT" and not parts.query) or (method == "POST" and parts.query == "uploads"):
            starts[key] = starts.get(key, 0) + 1
    assert starts == {f: 1 for f in files + ["acts/_success/shard-00000.json"]}, starts
    assert store.shard_files("acts", "shard-00000", "acts_heldout") == ["acts_heldout/shard-00000.parquet"]
    back = pa.Table.from_batches(list(store.iter_shard_batches("acts")))
    assert back.to_pylist() == pa.concat_tables(tables).to_pylist()
