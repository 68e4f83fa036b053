"""Both jobs end to end with an ``s3://`` output URI on a real S3-compatible server on loopback
(moto), through pyarrow's S3 filesystem: every table lands in the bucket, no temporary object
is left, and a rerun skips the finished shards."""

from __future__ import annotations

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.procs import run_job, set_args
from tests.s3 import s3_server

TINY_CONCEPTS = {"corpus.limit": 16, "extraction.shard_size": 8, "extraction.max_tokens": 48,
                 "concepts.nb_concepts": 16, "concepts.params": "{top_k: 4, epochs: 2}", "importance.n_samples": 4,
                 "interpretation.labels.enabled": "false"}
TINY_ATTRIBUTIONS = {"model.name": "smollm2-135m", "corpus.limit": 4, "attribution.shard_size": 2,
                     "attribution.methods": "[Saliency]", "attribution.params": "{}",
                     "attribution.max_new_tokens": 2, "attribution.max_tokens": 64, "metrics.enabled": "false"}


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as query:
        yield query


def _keys(uri: str) -> list[str]:
    fs, root = pafs.FileSystem.from_uri(uri)
    return sorted(i.path[len(root) + 1:] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                  if i.type == pafs.FileType.File)


@pytest.mark.slow
def test_concept_job_on_s3_and_its_rerun(bucket):
    uri = f"s3://raylens-test/concepts{bucket}"
    run_job("concepts", set_args("configs/default.yaml", {**TINY_CONCEPTS, "output_uri": uri}))
    keys = _keys(uri)
    for rel in ("report.html", "concepts/concepts.parquet", "concepts/top_examples.parquet",
                "concepts/vocabulary.parquet", "concept_model/model.safetensors", "activations/shard-00001.parquet",
                "activations/_success/shard-00001.json"):
        assert rel in keys, (rel, keys)
    assert not [k for k in keys if ".tmp-" in k]
    fs, root = pafs.FileSystem.from_uri(uri)
    assert pq.read_table(f"{root}/concepts/concepts.parquet", filesystem=fs).num_rows == 16
    again = run_job("concepts", set_args("configs/default.yaml", {**TINY_CONCEPTS, "output_uri": uri}))
    assert "extract: 2 of 2 shards already done, 0 to do" in again


@pytest.mark.slow
def test_attribution_job_on_s3_and_its_rerun(bucket):
    uri = f"s3://raylens-test/attributions{bucket}"
    run_job("attribute", set_args("configs/attribute.yaml", {**TINY_ATTRIBUTIONS, "output_uri": uri}))
    keys = _keys(uri)
    for rel in ("gallery.html", "summary.parquet", "words.parquet", "attributions/shard-00001.parquet"):
        assert rel in keys, (rel, keys)
    fs, root = pafs.FileSystem.from_uri(uri)
    rows = pq.read_table(f"{root}/attributions", filesystem=fs)
    assert rows.num_rows == 4 and set(rows["method"].to_pylist()) == {"Saliency"}
    again = run_job("attribute", set_args("configs/attribute.yaml", {**TINY_ATTRIBUTIONS, "output_uri": uri}))
    assert "2 of 2 shards already done, 0 to do" in again
