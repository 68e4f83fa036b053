"""Out-of-memory split-and-retry (`raylens.models.batching`): the test hook raises
``torch.OutOfMemoryError`` for batches above a size; the helper halves and retries, counts the
events, and the outputs equal a run without the hook (attribution forward batches, forward +
backward batches, concept-importance batches; real MiniLM sentiment classifier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylens.models import batching
from raylens.models.batching import OOM_TEST_ENV, oom_events, split_on_oom, take_oom_events


@pytest.fixture
def hook(monkeypatch):
    """Set the in-process hook (``hook(n)``: batches of more than n items raise OOM); off after."""
    take_oom_events()

    def set_limit(n):
        monkeypatch.setattr(batching, "oom_test_above", n)

    yield set_limit
    take_oom_events()


def test_split_on_oom_halves_down_to_one_and_loses_nothing(hook):
    calls = []

    def fn(part):
        calls.append(list(part))
        return [x * 10 for x in part]

    items = list(range(7))
    assert split_on_oom(fn, items) == [[x * 10 for x in items]] and oom_events() == 0
    hook(2)
    pieces = split_on_oom(fn, items)
    assert [x for p in pieces for x in p] == [x * 10 for x in items]  # order kept, nothing lost
    assert all(len(c) <= 2 for c in calls[1:]) and sorted(x for c in calls[1:] for x in c) == items
    assert take_oom_events() == 3  # 7 -> 3 + 4 -> (1 + 2) + (2 + 2)
    hook(0)  # not even one item fits: the error reaches the caller
    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(fn, [1, 2])


def test_env_var_hook_and_a_real_oom_error_are_both_split(monkeypatch, hook):
    monkeypatch.setenv(OOM_TEST_ENV, "1")
    assert split_on_oom(sum, [1, 2, 3]) == [1, 2, 3] and take_oom_events() == 2
    monkeypatch.delenv(OOM_TEST_ENV)

    def picky(part):  # what a device does: only a batch that is too large fails
        if len(part) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sum(part)

    assert split_on_oom(picky, [1, 2, 3, 4, 5]) == [3, 3, 9] and take_oom_events() == 2


@pytest.fixture(scope="module")
def clf():
    from raylens.models import load_model

    return load_model("minilm-movie-sentiment", device="cpu")


TEXTS = ["The food was terrible.", "What a wonderful book!", "An average film.", "I fell asleep."]


@pytest.mark.parametrize("name, kw", [("Occlusion", {}), ("IntegratedGradients", {"n_steps": 2})])
def test_attribution_batches_split_on_oom_give_the_same_scores(clf, hook, name, kw):
    """Occlusion runs the engine's forward batches, IntegratedGradients its forward + backward
    batches; with batches of 8 rows and the hook at 3, every batch is split."""
    from raylens.attributions import METHODS

    ref = METHODS[name](clf, batch_size=8, seed=0, **kw)(TEXTS[:2], targets=[[0, 1]] * 2)
    assert oom_events() == 0
    hook(3)
    got = METHODS[name](clf, batch_size=8, seed=0, **kw)(TEXTS[:2], targets=[[0, 1]] * 2)
    assert take_oom_events() >= 1
    for a, b in zip(ref, got):
        assert a.elements == b.elements
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-5 * float(np.abs(a.scores).max()))
        np.testing.assert_allclose(b.target_scores, a.target_scores, rtol=1e-5, atol=1e-6)


def test_concept_importance_batches_split_on_oom_give_the_same_gradients(clf, hook):
    from raylens.concepts.importance import concept_gradients
    from raylens.concepts.models import build_concept_model
    from raylens.models.split import SplitModel

    split = SplitModel(clf, -1)
    acts = torch.randn(200, split.d_model, generator=torch.Generator().manual_seed(0))
    cm = build_concept_model("semi_nmf", nb_concepts=4, d_model=split.d_model, seed=0, max_iter=20)
    cm.fit(acts)
    ref = concept_gradients(split, cm, TEXTS, batch_size=4)
    hook(1)
    got = concept_gradients(split, cm, TEXTS, batch_size=4)
    assert take_oom_events() == 3  # 4 -> 2 + 2 -> (1 + 1) + (1 + 1)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[2], ref[2])


def test_attribution_worker_marker_counts_the_splits_and_rows_are_unchanged(tmp_path, hook):
    """The job's attribution worker (called directly, no Ray) on one document shard, without and
    with the hook: the same attribution table, and the shard marker counts the splits."""
    import pyarrow as pa

    from actors.attribution_worker import AttributionModelWorker
    from raylens.config import AttributionJobConfig, load_config
    from raylens.io.schemas import DOCUMENTS_SCHEMA
    from raylens.io.store import OutputStore

    docs = pa.table({"doc_id": [0, 1], "text": TEXTS[:2], "label": [None, None]}, schema=DOCUMENTS_SCHEMA)
    tables, markers = [], []
    for limit, name in ((None, "plain"), (2, "oom")):
        hook(limit)
        out = str(tmp_path / name)
        OutputStore(out).write_shard("documents", "shard-00000", docs)
        cfg = load_config(None, {"output_uri": out, "attribution.methods": ["Occlusion", "Saliency"],
                                 "attribution.batch_size": 8, "metrics.enabled": False}, cls=AttributionJobConfig)
        worker = AttributionModelWorker(config=cfg.model_dump())
        summary = worker({"shard": np.array(["shard-00000"])})
        store = OutputStore(out)
        tables.append(store.read_table("attributions/shard-00000.parquet"))
        markers.append(store.shard_meta("attributions", "shard-00000"))
        assert int(summary["oom_splits"][0]) == markers[-1]["oom_splits"]
    assert markers[0]["oom_splits"] == 0 and markers[1]["oom_splits"] >= 2
    plain, oom = (t.drop_columns([c for c in t.column_names if "second" in c]).to_pylist() for t in tables)
    assert len(plain) == len(oom) == 4
    for a, b in zip(plain, oom):
        assert a.keys() == b.keys()
        for k in a:
            try:
                want = np.asarray(a[k], dtype=float)
            except (TypeError, ValueError):
                assert a[k] == b[k], k
                continue
            np.testing.assert_allclose(np.asarray(b[k], dtype=float), want, rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("granularity", ["token", "cls"])
def test_extraction_batches_split_on_oom_give_the_same_activations(clf, hook, granularity):
    """The concept job's extraction forward (`SplitModel.pooled_activations`): batches of 4
    documents with the hook at 1 split 4 -> 2 + 2 -> 1 + 1 + 1 + 1; the rows and the classifier's
    predicted classes are those of the unsplit run."""
    from raylens.io.schemas import tensor_column_to_numpy
    from raylens.models.split import SplitModel

    split = SplitModel(clf, 3)
    kw = {"granularity": granularity, "batch_size": 4, "max_tokens": 32, "dtype": "float32"}
    ref, _ = split.extract(TEXTS, [0, 1, 2, 3], **kw)
    hook(1)
    got, _ = split.extract(TEXTS, [0, 1, 2, 3], **kw)
    assert take_oom_events() == 3
    assert got.drop_columns(["activation"]).equals(ref.drop_columns(["activation"]))
    np.testing.assert_allclose(tensor_column_to_numpy(got["activation"]), tensor_column_to_numpy(ref["activation"]),
                               rtol=1e-4, atol=1e-5)
