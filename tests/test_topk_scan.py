"""The top-k scan split over shards: partial scans merged in any tree order equal one scan, and
equal a full sort of the stored rows (top k), the smallest hash keys (sampled pools) and the
brute-force frequencies; the Ray wiring (parallel scan tasks) writes the same tables as the
trainer's single pass. Real Parquet shards, a real fitted TopK SAE."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raylens.concepts.interpret import scan_concepts
from raylens.concepts.models import build_concept_model
from raylens.concepts import topk_scan
from raylens.concepts.topk_scan import finish_scan, hash_keys, merge_scans, quiet_runs, quiet_runs_sparse, scan_partial
from raylens.io.schemas import tensor_array
from raylens.io.store import OutputStore

D, C, K, N_POOL = 16, 24, 5, 6
COLS = ["doc_id", "unit", "char_start", "char_end", "activation"]


def _store(path, heldout: bool = False) -> tuple[OutputStore, object]:
    rng = np.random.default_rng(0)
    store = OutputStore(str(path))
    for s in range(4):
        doc = np.repeat(np.arange(s * 20, s * 20 + 20), 9)
        unit = np.tile(np.arange(9), 20)
        x = rng.normal(size=(len(doc), D)).astype(np.float32)
        t = pa.table({"doc_id": pa.array(doc, pa.int64()), "unit": pa.array(unit, pa.int32()),
                      "char_start": pa.array(unit * 6, pa.int32()), "char_end": pa.array(unit * 6 + 5, pa.int32()),
                      "activation": tensor_array(x, "float32")})
        if heldout:  # the last 4 documents of each shard in activations_heldout/
            held = pa.array(doc >= s * 20 + 16)
            store.write_table(f"activations_heldout/shard-{s:05d}.parquet", t.filter(held))
            t = t.filter(pa.compute.invert(held))
        store.write_shard("activations", f"shard-{s:05d}", t)
    return store, rng


def _model(rng) -> object:
    x = torch.from_numpy(rng.normal(size=(2000, D)).astype(np.float32))
    return build_concept_model("topk_sae", nb_concepts=C, d_model=D, top_k=4, epochs=2, batch_size=128).fit(x)


def _batches(store, shard):
    return pq.ParquetFile(store.path("activations", f"{shard}.parquet")).iter_batches(batch_size=50, columns=COLS)


def _equal(a: dict, b: dict) -> None:
    for part in ("best", "pool", "quiet"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["frequency"], b["frequency"]) and a["n_rows"] == b["n_rows"]


def test_merged_partial_scans_equal_a_full_sort(tmp_path):
    store, rng = _store(tmp_path)
    model = _model(rng)
    shards = store.done_shards("activations")
    kw = dict(k=K, n_pool=N_POOL, n_quiet=3, min_quiet_chars=10, seed=7)
    p = [scan_partial(model, _batches(store, s), **kw) for s in shards]
    left = finish_scan(merge_scans(merge_scans(merge_scans(p[0], p[1]), p[2]), p[3]))
    tree = finish_scan(merge_scans(merge_scans(p[0], p[1]), merge_scans(p[2], p[3])))
    one = scan_concepts(model, (b for s in shards for b in _batches(store, s)), **kw)
    for res in (left, tree):
        for part in ("best", "pool", "quiet"):
            assert all(torch.equal(res[part][key], one[part][key]) for key in one[part]), part
        assert torch.equal(res["frequency"], one["frequency"]) and res["n_rows"] == one["n_rows"] == 720
    # the direct computation over every stored row
    t = pa.concat_tables([store.read_table(f"activations/{s}.parquet") for s in shards])
    z = torch.cat([model.encode(torch.from_numpy(np.stack(b.column("activation").to_numpy(zero_copy_only=False))
                                                 .astype(np.float32)))
                   for s in shards for b in _batches(store, s)]).numpy()
    doc, unit = t["doc_id"].to_numpy(), t["unit"].to_numpy()
    assert np.allclose(tree["frequency"].numpy(), (z != 0).mean(0))
    for c in range(C):
        order = np.argsort(-z[:, c], kind="stable")[:K]
        assert np.array_equal(tree["best"]["value"][:, c].numpy(), z[order, c])
        pos = z[order, c] > 0
        got = set(zip(tree["best"]["doc_id"][:, c].numpy()[pos], tree["best"]["unit"][:, c].numpy()[pos]))
        assert got == set(zip(doc[order][pos], unit[order][pos]))
        act = np.flatnonzero(z[:, c] > 0)
        keys = hash_keys(7, doc[act], unit[act], np.full(len(act), c))
        want = set(zip(doc[act][np.argsort(keys)[:N_POOL]], unit[act][np.argsort(keys)[:N_POOL]]))
        ok = tree["pool"]["doc_id"][:, c].numpy() >= 0
        assert set(zip(tree["pool"]["doc_id"][:, c].numpy()[ok], tree["pool"]["unit"][:, c].numpy()[ok])) == want
    assert (tree["frequency"] > 0).sum() > C // 2


@pytest.mark.parametrize("method", ["topk_sae", "pca"])
def test_sparse_and_dense_paths_give_identical_tables(tmp_path, monkeypatch, method):
    """The sparse path (gaps between firing rows) and the dense one (boolean passes over every
    code) on the same rows: SAE codes (a few non-zeros per row) and PCA codes (signed, dense);
    samples compacted after every batch (the lazy compaction keeps the same entries)."""
    store, rng = _store(tmp_path)
    x = torch.from_numpy(rng.normal(size=(2000, D)).astype(np.float32))
    params = {"top_k": 4, "epochs": 2, "batch_size": 128} if method == "topk_sae" else {}
    model = build_concept_model(method, nb_concepts=C if method == "topk_sae" else D, d_model=D, **params).fit(x)
    shards = store.done_shards("activations")
    kw = dict(k=K, n_pool=N_POOL, n_quiet=3, min_quiet_chars=10, seed=7)

    def scan(path):
        return finish_scan(scan_partial(model, (b for s in shards for b in _batches(store, s)), path=path, **kw))

    lazy = scan("sparse")
    monkeypatch.setattr(topk_scan, "WAITING_ENTRIES", 1)
    sparse, dense, auto = scan("sparse"), scan("dense"), scan("auto")
    for other in (dense, auto, lazy):
        _equal(sparse, other)
    assert (sparse["quiet"]["doc_id"] >= 0).any() and (sparse["pool"]["doc_id"] >= 0).any()
    with pytest.raises(ValueError, match="path"):
        scan("fast")


class _RandomTopK:
    """A TopK 'concept model' with 4,096 concepts: the 8 largest of a fixed random projection."""

    nb_concepts = 4096

    def __init__(self, d: int):
        self.w = torch.randn(d, self.nb_concepts, generator=torch.Generator().manual_seed(1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        v, i = (x @ self.w).topk(8, dim=1)
        return torch.zeros(x.shape[0], self.nb_concepts).scatter(1, i, v.relu())


def test_many_concepts_equal_brute_force(monkeypatch):
    """4,096 concepts on 3,000 rows: merged sparse partials equal the direct computation over
    every row (top k by a stable sort, the smallest pool keys, every quiet run's key), and the
    dense path; quiet_runs_sparse equals quiet_runs."""
    rng = np.random.default_rng(3)
    lens = rng.integers(1, 60, size=120)
    doc = np.repeat(np.arange(120) * 2 + 1, lens)
    unit = np.concatenate([np.arange(n) for n in lens])
    unit[rng.random(len(unit)) < 0.02] += 3  # gaps in the units: runs break there
    cs = unit * 7 + rng.integers(0, 3, len(unit))
    x = rng.normal(size=(len(doc), 8)).astype(np.float32)
    t = pa.table({"doc_id": pa.array(doc, pa.int64()), "unit": pa.array(unit, pa.int32()),
                  "char_start": pa.array(cs, pa.int32()), "char_end": pa.array(cs + 5, pa.int32()),
                  "activation": tensor_array(x, "float32")})
    model = _RandomTopK(8)
    Cn, k, n_pool, n_quiet, min_chars = model.nb_concepts, 3, 2, 2, 30
    kw = dict(k=k, n_pool=n_pool, n_quiet=n_quiet, min_quiet_chars=min_chars, seed=5)
    cut = int(np.flatnonzero(doc == doc[len(doc) // 2])[0])  # shards of whole documents
    monkeypatch.setattr(topk_scan, "WAITING_ENTRIES", 5000)
    parts = [scan_partial(model, t.slice(a, b - a).to_batches(max_chunksize=500), **kw)
             for a, b in ((0, cut), (cut, len(doc)))]
    got = finish_scan(merge_scans(*parts))
    _equal(got, finish_scan(scan_partial(model, t.to_batches(max_chunksize=700), path="dense", **kw)))
    z = model.encode(torch.from_numpy(x)).numpy()
    r, c = np.nonzero(z.T > 0)[::-1]
    order = np.lexsort((r, c))
    r, c = r[order], c[order]
    want_q = quiet_runs(z > 0, doc, unit, cs, cs + 5, min_chars)
    for a, b in zip(want_q, quiet_runs_sparse(r, c, Cn, doc, unit, cs, cs + 5, min_chars)):
        assert np.array_equal(a, b)
    qkey = hash_keys(5, want_q[1], want_q[2], want_q[0])
    pkey = hash_keys(5, doc[r], unit[r], c)
    for j in range(0, Cn, 37):
        top = np.argsort(-z[:, j], kind="stable")[:k]
        assert np.array_equal(got["best"]["value"][:, j].numpy(), z[top, j])
        assert np.array_equal(got["best"]["unit"][:, j].numpy(), unit[top])
        mine = np.flatnonzero(c == j)
        pick = mine[np.argsort(pkey[mine], kind="stable")[:n_pool]]
        assert np.array_equal(got["pool"]["unit"][: len(pick), j].numpy(), unit[r[pick]])
        mine = np.flatnonzero(want_q[0] == j)
        pick = mine[np.argsort(qkey[mine], kind="stable")[:n_quiet]]
        assert np.array_equal(got["quiet"]["char_start"][: len(pick), j].numpy(), want_q[2][pick])
    assert torch.equal(got["frequency"], torch.from_numpy((z != 0).sum(0)).float() / len(doc))


@pytest.mark.slow
def test_parallel_scan_tasks_write_the_trainers_tables(tmp_path, ray_session):
    from actors.trainer import ConceptTrainer
    from pipelines.concepts import distributed_scan
    from raylens.config import ConceptJobConfig

    store, rng = _store(tmp_path / "a", heldout=True)
    model = _model(rng)
    model.save(store.path("concept_model"))
    texts = pa.table({"doc_id": pa.array(np.arange(80), pa.int64()), "text": ["word " * 20] * 80})
    store.write_shard("documents", "shard-00000", texts)
    shutil.copytree(store.path(), str(tmp_path / "b"))
    interp = {"top_k_examples": K, "sample_pool_size": N_POOL, "sampled_per_quantile": 2, "sample_quantiles": 2,
              "non_activating_per_concept": 3, "non_activating_min_chars": 10, "scan_tasks": 3}
    cfgs = [ConceptJobConfig.model_validate({"output_uri": str(tmp_path / x), "interpretation": interp,
                                             "concepts": {"nb_concepts": C}}) for x in "ab"]
    freq = distributed_scan(store, cfgs[0])
    assert freq == ConceptTrainer(cfgs[1].model_dump()).top_examples()
    for name in ("top_examples", "sampled_examples", "non_activating"):
        a, b = (pq.read_table(os.path.join(tmp_path, x, "concepts", f"{name}.parquet")) for x in "ab")
        assert a.equals(b), name
    top = pq.read_table(os.path.join(tmp_path, "a", "concepts", "top_examples.parquet"))
    assert set(top["doc_id"].to_pylist()) & {s * 20 + i for s in range(4) for i in range(16, 20)}  # held-out rows too


def test_top_inputs_scans_in_the_fitting_trainer_when_small_else_in_a_fresh_actor(tmp_path, ray_session, monkeypatch):
    """`pipelines.concepts.top_inputs` with the fitting trainer given: under
    ``SCAN_IN_TRAINER_BYTES`` of activations that trainer scans (no new actor), above it a fresh
    trainer actor does; the tables and frequencies are the same, and the given trainer is gone
    after either."""
    import ray

    import pipelines.concepts as job
    from actors.trainer import ConceptTrainer
    from raylens.config import ConceptJobConfig

    store, rng = _store(tmp_path / "a", heldout=True)
    _model(rng).save(store.path("concept_model"))
    shutil.copytree(store.path(), str(tmp_path / "b"))
    interp = {"top_k_examples": K, "sample_pool_size": N_POOL, "sampled_per_quantile": 2, "sample_quantiles": 2,
              "non_activating_per_concept": 0}
    cfgs = [ConceptJobConfig.model_validate({"output_uri": str(tmp_path / x), "interpretation": interp,
                                             "concepts": {"nb_concepts": C}}) for x in "ab"]
    made, real_remote = [], ray.remote
    monkeypatch.setattr(ray, "remote", lambda *a, **kw: (made.append(a[0]), real_remote(*a, **kw))[1])
    freqs = []
    for cfg, limit in zip(cfgs, (job.SCAN_IN_TRAINER_BYTES, 0)):
        monkeypatch.setattr(job, "SCAN_IN_TRAINER_BYTES", limit)
        trainer = real_remote(ConceptTrainer).remote(cfg.model_dump())
        freqs.append(job.top_inputs(OutputStore(cfg.output_uri), cfg, trainer))
        assert made == ([] if limit else [ConceptTrainer]), made
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(trainer.fit_progress.remote(), timeout=60)
    assert freqs[0] == freqs[1]
    for name in ("top_examples", "sampled_examples"):
        a, b = (pq.read_table(os.path.join(tmp_path, x, "concepts", f"{name}.parquet")) for x in "ab")
        assert a.equals(b), name


def test_ranks_in_runs():
    from raylens.concepts.topk_scan import ranks_in_runs

    assert ranks_in_runs(np.array([4, 4, 4, 7, 9, 9])).tolist() == [0, 1, 2, 0, 0, 1]
    assert ranks_in_runs(np.array([], np.int64)).tolist() == []
    keys = np.sort(np.random.default_rng(0).integers(0, 50, 1000))
    assert np.array_equal(ranks_in_runs(keys), np.arange(len(keys)) - np.searchsorted(keys, keys, side="left"))
