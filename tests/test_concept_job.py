"""The concept job end to end: real SmolLM2, real movie reviews, real local Ray, real
Parquet, a real OpenAI-compatible server on loopback for the labels."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from raylens.concepts.metrics import explained_variance
from raylens.concepts.models import build_concept_model, load_concept_model
from raylens.config import ConfigError, load_config
from raylens.io.schemas import tensor_column_to_numpy
from raylens.io.store import OutputStore

pytestmark = pytest.mark.slow

EV_FLOOR = 0.5  # held-out explained variance the fitted SAE must reach; a random dictionary gets < 0.2


@pytest.fixture(scope="module")
def llm_server():
    from raylens.llm.server import LocalLLMServer

    with LocalLLMServer("smollm2-135m") as server:
        yield server


def _config(out: Path, **over):
    base = {
        "output_uri": str(out),
        "corpus.limit": 60,
        "extraction.shard_size": 15,
        "extraction.split_point": 7,
        "extraction.batch_size": 8,
        "concepts.nb_concepts": 32,
        "concepts.params": {"top_k": 4, "epochs": 20, "lr": 0.002},
        "concepts.heldout_fraction": 0.2,
        "importance.n_samples": 16,
        "interpretation.labels.max_concepts": 3,
        "interpretation.labels.n_examples": 4,
        "interpretation.labels.example_sampling": "top+quantile",
        "interpretation.labels.n_sampled_examples": 2,
        "resources.num_workers": 2,
        "resources.cpus_per_worker": 1,
    }
    base.update(over)
    return load_config(None, base)


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_session, llm_server):
    from pipelines.concepts import run_concept_job

    out = tmp_path_factory.mktemp("job") / "out"
    cfg = _config(out, **{"interpretation.labels.base_url": llm_server.base_url,
                          "interpretation.labels.model": llm_server.model_name})
    result = run_concept_job(cfg)
    return cfg, result, OutputStore(str(out))


def _activations(store):
    """Every stored activation row: the training rows and the held-out documents' rows
    (`activations_heldout/`), which the top examples are found among too."""
    from raylens.io.readers import split_paths

    paths, _ = split_paths(store, "all")
    assert any("activations_heldout" in p for p in paths)  # the held-out split is made at extraction
    return pads.dataset(paths).to_table()


def test_outputs_exist_and_activations_are_tensors(job):
    cfg, result, store = job
    assert Path(result["report"]).exists()
    for rel in ("concept_model/model.safetensors", "concept_model/config.json", "concepts/concepts.parquet",
                "concepts/top_examples.parquet", "concepts/vocabulary.parquet", "concepts/importance.parquet",
                "concepts/metrics.parquet"):
        assert store.exists(rel), rel
    acts = _activations(store)
    assert str(acts.schema.field("activation").type).startswith("extension<raylens.activation")
    assert len(store.done_shards("activations")) == 4
    docs = pads.dataset(store.shard_paths("documents")).to_table()
    assert docs.num_rows == 60 and len(set(docs["doc_id"].to_pylist())) == 60
    html = Path(result["report"]).read_text()
    assert "<script>alert" not in html


def test_rerun_skips_finished_shards_without_duplicates(job, ray_session):
    from pipelines.concepts import extract, write_documents

    cfg, _, store = job
    before = _activations(store)
    mtimes = {p: os.path.getmtime(p) for p in store.shard_paths("activations")}
    # Lose one shard's marker and file, as if its worker died: only that shard is redone.
    lost = store.done_shards("activations")[1]
    store.remove(f"activations/_success/{lost}.json")
    store.remove(f"activations/{lost}.parquet")
    shards = write_documents(store, cfg)
    summary = extract(store, cfg, shards)
    assert summary["n_shards"] == 1
    after = _activations(store)
    assert after.num_rows == before.num_rows
    keys = collections.Counter(zip(after["doc_id"].to_pylist(), after["unit"].to_pylist()))
    assert max(keys.values()) == 1
    for p, t in mtimes.items():
        if lost not in p:
            assert os.path.getmtime(p) == t, f"{p} was rewritten"
    # A full rerun does nothing.
    assert extract(store, cfg, shards)["n_shards"] == 0


def test_rerun_with_other_settings_is_refused(job):
    from pipelines.concepts import check_config

    cfg, _, store = job
    other = _config(Path(store.root), **{"extraction.split_point": 3})
    with pytest.raises(ConfigError, match="extraction.split_point"):
        check_config(store, other)


def test_sae_explains_heldout_variance(job):
    cfg, result, store = job
    from raylens.io.readers import ActivationStream

    model = load_concept_model(store.download_dir("concept_model"))
    held = torch.cat(list(ActivationStream(store, split="heldout", heldout_fraction=0.2)))
    ev = explained_variance(held, model.decode(model.encode(held)))
    # The same model with its random initial dictionary (same normalisation, same top_k).
    train = torch.cat(list(ActivationStream(store, split="train", heldout_fraction=0.2)))
    random_sae = build_concept_model("topk_sae", nb_concepts=32, d_model=held.shape[1], top_k=4)
    random_sae.set_normalization(train)
    random_sae._finalize()
    ev_random = explained_variance(held, random_sae.decode(random_sae.encode(held)))
    print(f"held-out explained variance: SAE {ev:.3f}, random dictionary {ev_random:.3f} ({held.shape[0]} rows)")
    assert ev >= EV_FLOOR
    assert ev_random < EV_FLOOR
    metrics = store.read_table("concepts/metrics.parquet").to_pylist()
    held_m = next(m for m in metrics if m["split"] == "heldout")
    assert held_m["explained_variance"] == pytest.approx(ev, abs=1e-3)


def test_top_examples_are_the_k_highest(job):
    cfg, _, store = job
    model = load_concept_model(store.download_dir("concept_model"))
    acts = _activations(store)
    x = torch.from_numpy(tensor_column_to_numpy(acts["activation"]).astype(np.float32))
    z = model.encode(x)
    top = store.read_table("concepts/top_examples.parquet").to_pylist()
    k = cfg.interpretation.top_k_examples
    doc, unit = acts["doc_id"].to_numpy(), acts["unit"].to_numpy()
    for c in range(cfg.concepts.nb_concepts):
        rows = sorted((r for r in top if r["concept"] == c), key=lambda r: r["rank"])
        expect = torch.sort(z[:, c], descending=True).values[:k]
        assert len(rows) == k
        np.testing.assert_allclose([r["activation"] for r in rows], expect.numpy(), rtol=1e-4, atol=1e-5)
        for r in rows:  # each example is the row it claims to be
            i = np.flatnonzero((doc == r["doc_id"]) & (unit == r["unit"]))[0]
            assert float(z[i, c]) == pytest.approx(r["activation"], rel=1e-4, abs=1e-5)
            assert r["context"][r["span_start"]: r["span_end"]] == r["text"]


def test_importance_has_one_signed_value_per_concept(job):
    cfg, _, store = job
    imp = store.read_table("concepts/importance.parquet")
    assert imp.num_rows == cfg.concepts.nb_concepts
    g = imp["gradient"].to_numpy()
    cxg = imp["concept_x_gradient"].to_numpy()
    assert np.isfinite(g).all() and np.isfinite(cxg).all()
    assert (g > 0).any() and (g < 0).any(), "importance should be signed, not an absolute value"
    per_doc = store.read_table("concepts/importance_per_doc.parquet")
    assert per_doc.num_rows == cfg.importance.n_samples
    concepts = store.read_table("concepts/concepts.parquet")
    assert concepts.num_rows == cfg.concepts.nb_concepts


def test_labels_came_from_the_local_server(job, llm_server):
    cfg, _, store = job
    concepts = store.read_table("concepts/concepts.parquet").to_pylist()
    labelled = [c for c in concepts if c["label"]]
    assert len(labelled) == cfg.interpretation.labels.max_concepts
    assert all(0 < len(c["label"]) <= 200 for c in labelled)
    assert llm_server.count_requests("/v1/chat/completions", 200) >= len(labelled)


def test_sampled_and_non_activating_examples(job):
    """concepts/sampled_examples.parquet: activating rows of every activation quantile, each the
    row it claims; concepts/non_activating.parquet: runs where the concept really is silent."""
    cfg, _, store = job
    interp = cfg.interpretation
    model = load_concept_model(store.download_dir("concept_model"))
    acts = _activations(store)
    z = model.encode(torch.from_numpy(tensor_column_to_numpy(acts["activation"]).astype(np.float32))).numpy()
    doc, unit = acts["doc_id"].to_numpy(), acts["unit"].to_numpy()
    cs, ce = acts["char_start"].to_numpy(), acts["char_end"].to_numpy()
    sampled = store.read_table("concepts/sampled_examples.parquet")
    top = store.read_table("concepts/top_examples.parquet")
    assert sampled.schema.names == top.schema.names + ["quantile"]
    rows = sampled.to_pylist()
    per = interp.sample_quantiles * interp.sampled_per_quantile
    for c in range(cfg.concepts.nb_concepts):
        mine = [r for r in rows if r["concept"] == c]
        n_act = int((z[:, c] > 0).sum())
        assert len(mine) == min(per, n_act)
        if n_act >= interp.sample_pool_size:  # a full reservoir: every bin is represented
            assert sorted({r["quantile"] for r in mine}) == list(range(interp.sample_quantiles))
        for r in mine:
            i = np.flatnonzero((doc == r["doc_id"]) & (unit == r["unit"]))[0]
            assert float(z[i, c]) == pytest.approx(r["activation"], rel=1e-4, abs=1e-5) and r["activation"] > 0
    quiet = store.read_table("concepts/non_activating.parquet").to_pylist()
    assert quiet and len({r["concept"] for r in quiet}) > cfg.concepts.nb_concepts // 2
    for r in quiet:
        inside = (doc == r["doc_id"]) & (cs >= r["char_start"]) & (ce <= r["char_end"])
        assert inside.any() and (z[inside, r["concept"]] <= 0).all()
        assert len(r["text"]) == r["char_end"] - r["char_start"] >= interp.non_activating_min_chars


def test_label_prompts_held_the_sampled_examples(job):
    """With example_sampling top+quantile, each label's cached prompt is the top examples plus
    the chosen sampled ones (the cache is keyed by the prompt's hash)."""
    from raylens.concepts.labels import (LabelerConfig, build_label_prompt, choose_sampled_examples,
                                         label_prompt_hash)
    from raylens.llm.cache import cache_key

    cfg, _, store = job
    lab = cfg.interpretation.labels
    cache = json.loads(Path(store.local_path("concepts", "labels_cache.json")).read_text())["entries"]
    concepts = store.read_table("concepts/concepts.parquet").to_pylist()
    vocab = store.read_table("concepts/vocabulary.parquet").to_pylist()
    ex = {name: store.read_table(f"concepts/{name}.parquet").to_pylist() for name in ("top_examples", "sampled_examples")}

    def as_ex(r):
        return {"text": r["context"], "spans": [[r["span_start"], r["span_end"]]], "activation": r["activation"],
                "doc_id": r["doc_id"], "unit": r["unit"], "quantile": r.get("quantile")}

    lc = LabelerConfig(base_url="http://127.0.0.1:1/v1", model=lab.model, max_tokens=lab.max_tokens)
    n_sampled = 0
    for c in (c["concept"] for c in concepts if c["label"]):
        top = sorted((as_ex(r) for r in ex["top_examples"] if r["concept"] == c), key=lambda e: -e["activation"])
        chosen = choose_sampled_examples([as_ex(r) for r in ex["sampled_examples"] if r["concept"] == c],
                                         lab.n_sampled_examples, "quantile", exclude=top[: lab.n_examples],
                                         seed=cfg.seed, concept=c)
        n_sampled += len(chosen)
        tokens = [r["token"] for r in vocab if r["concept"] == c and r["direction"] == "promoted"]
        msgs = build_label_prompt(top, tokens, max_examples=lab.n_examples, sampled=chosen)
        assert cache_key(lab.model, label_prompt_hash(msgs, lc)) in cache
    assert n_sampled == lab.n_sampled_examples * lab.max_concepts


def test_labels_are_scored_detection_and_fuzzing(job):
    cfg, result, store = job
    lab = cfg.interpretation.labels
    scores = store.read_table("concepts/label_scores.parquet").to_pylist()
    concepts = {c["concept"]: c for c in store.read_table("concepts/concepts.parquet").to_pylist()}
    labelled = [c for c in concepts.values() if c["label"]]
    assert len(scores) == min(lab.score_max_concepts, len(labelled))
    print()
    for r in scores:
        c = concepts[int(r["concept"])]
        assert r["label"] == c["label"]
        assert r["detection_n_examples"] == lab.score_n_activating + lab.score_n_non_activating, r["error"]
        assert 0 < r["fuzzing_n_examples"] <= lab.score_n_fuzzing
        assert r["n_errors"] < r["n_examples"], r["error"]
        for task in ("detection", "fuzzing"):
            v = r[f"{task}_accuracy"]
            assert v is None or 0.0 <= v <= 1.0
            assert c[f"{task}_accuracy"] == (None if v is None else pytest.approx(v, abs=1e-6))
        print(f"concept {r['concept']} {r['label']!r}: detection {r['detection_accuracy']} "
              f"fuzzing {r['fuzzing_accuracy']} errors {r['n_errors']}/{r['n_examples']}")
    unscored = [c for c in concepts.values() if str(c["concept"]) not in {r["concept"] for r in scores}]
    assert all(c["detection_accuracy"] is None and c["fuzzing_accuracy"] is None for c in unscored)
    html = Path(result["report"]).read_text()
    assert html.count('<span class="k">detection</span>') == len(scores)


def test_down_endpoint_keeps_the_work_and_records_errors(job, tmp_path):
    """Labels and scores against a closed port: every concept gets an error, the tables and
    the report are still written."""
    import shutil

    from pipelines.report import write_concepts_table_and_report
    from raylens.concepts.labeling import label_and_score
    from raylens.llm.server import free_loopback_port

    cfg, result, store = job
    out = tmp_path / "copy"
    shutil.copytree(store.root, out)
    (out / "concepts" / "labels_cache.json").unlink()
    url = f"http://127.0.0.1:{free_loopback_port()}/v1"
    down = _config(out, **{"interpretation.labels.base_url": url, "interpretation.labels.model": "m",
                           "interpretation.labels.example_sampling": "top+quantile",
                           "interpretation.labels.n_sampled_examples": 2})
    copy = OutputStore(str(out))
    C = down.concepts.nb_concepts
    top, vocab = copy.read_table("concepts/top_examples.parquet"), copy.read_table("concepts/vocabulary.parquet")
    labels, scores = label_and_score(
        down.interpretation.labels, top, vocab, list(range(C)),
        sampled=copy.read_table("concepts/sampled_examples.parquet"),
        non_activating=copy.read_table("concepts/non_activating.parquet"), seed=down.seed,
        n_quantiles=down.interpretation.sample_quantiles, cache_path=str(out / "concepts" / "labels_cache.json"))
    assert len(labels) == down.interpretation.labels.max_concepts
    assert all(r["label"] is None and url in r["error"] for r in labels.values())
    assert len(scores) == min(down.interpretation.labels.score_max_concepts, len(labels))
    assert all(r["error"].startswith("not scored: no label") and url in r["error"] for r in scores)
    imp = copy.read_table("concepts/importance.parquet")
    fit = {"metrics": copy.read_table("concepts/metrics.parquet").to_pylist()}
    report = write_concepts_table_and_report(copy, down, top, vocab, imp["gradient"].to_numpy(),
                                             imp["concept_x_gradient"].to_numpy(), [0.1] * C, labels, fit, {},
                                             scores=scores)
    table = copy.read_table("concepts/concepts.parquet").to_pylist()
    assert sum(1 for r in table if r["label_score_error"]) == len(scores)
    assert "scoring errors" in Path(report).read_text()


@pytest.mark.parametrize("method, params", [("pca", {}), ("ica", {"max_fit_rows": 3000})])
def test_job_runs_end_to_end_with_other_methods(job, tmp_path, method, params, llm_server, ray_session):
    """A streaming non-SAE method (PCA) and a sample-fit method (ICA) through the whole job, on
    a copy of the job's output: the finished activation shards are reused, everything after
    them (fit, examples, vocabulary, importance; labels and their scores for PCA) is redone."""
    import shutil

    from pipelines.concepts import run_concept_job

    cfg, _, store = job
    out = tmp_path / "copy"
    shutil.copytree(store.root, out)
    labels = {"interpretation.labels.base_url": llm_server.base_url,
              "interpretation.labels.model": llm_server.model_name,
              "interpretation.labels.max_concepts": 1, "interpretation.labels.score_max_concepts": 1} \
        if method == "pca" else {"interpretation.labels.enabled": False}
    other = _config(out, **{"concepts.method": method, "concepts.nb_concepts": 8, "concepts.params": params,
                            "importance.n_samples": 4, **labels})
    result = run_concept_job(other)
    assert result["extract"]["n_shards"] == 0  # nothing extracted again
    copy = OutputStore(str(out))
    model = load_concept_model(out / "concept_model")
    assert model.method == method and model.dictionary.shape == (8, 576)
    held = next(m for m in result["fit"]["metrics"] if m["split"] == "heldout")
    print(f"{method}: held-out explained variance {held['explained_variance']:.3f}")
    assert held["explained_variance"] > 0.4  # measured 0.57 (pca), 0.58 (ica); random dictionaries < 0.05
    top = copy.read_table("concepts/top_examples.parquet")
    assert set(top["concept"].to_pylist()) == set(range(8))
    concepts = copy.read_table("concepts/concepts.parquet").to_pylist()
    assert len(concepts) == 8 and Path(result["report"]).exists()
    if method == "pca":
        assert sum(1 for c in concepts if c["label"]) == 1
        assert copy.read_table("concepts/label_scores.parquet").num_rows == 1
    else:
        assert not any(c["label"] for c in concepts) and not copy.exists("concepts/label_scores.parquet")


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="extraction.granularity"):
        load_config(None, {"extraction.granularity": "paragraph"})
    with pytest.raises(ConfigError, match="corpus.limt"):
        load_config(None, {"corpus.limt": 3})
    with pytest.raises(ConfigError, match="concepts"):
        load_config(None, {"concepts.method": "nope"})


def test_job_cli_rejects_bad_config_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extraction:\n  granularity: paragraph\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.concepts", "--config", str(bad)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 2
    assert "extraction.granularity" in proc.stderr
    assert "ray" not in proc.stdout.lower()


def test_trainer_fits_semi_nmf_on_a_bounded_sample(job, tmp_path):
    """The matrix-factorisation path of the trainer: Semi-NMF on a seeded sample of the same shards."""
    import shutil

    from actors.trainer import ConceptTrainer

    cfg, _, store = job
    out = tmp_path / "copy"
    shutil.copytree(store.root, out)
    nmf_cfg = _config(out, **{"concepts.method": "semi_nmf", "concepts.nb_concepts": 16,
                              "concepts.params": {"max_fit_rows": 2000, "max_iter": 100}})
    trainer = ConceptTrainer(nmf_cfg.model_dump())  # the actor class, called in-process
    fit = trainer.fit(576)
    assert fit["n_fit_rows"] == 2000
    held = next(m for m in fit["metrics"] if m["split"] == "heldout")
    print(f"semi_nmf held-out explained variance {held['explained_variance']:.3f}")
    assert held["explained_variance"] >= EV_FLOOR
    reloaded = load_concept_model(out / "concept_model")
    assert reloaded.method == "semi_nmf" and reloaded.dictionary.shape == (16, 576)


def test_killed_worker_leaves_exactly_one_row_per_unit(job, tmp_path, ray_session):
    """SIGKILL one model-worker process mid-extraction: Ray restarts it, the shard is redone,
    and the activation table has exactly the rows of an undisturbed run, none twice."""
    import signal
    import threading
    import time

    from pipelines.concepts import check_config, extract, write_documents

    cfg, _, ref_store = job
    reference = _activations(ref_store)
    cfg2 = _config(tmp_path / "killed")
    store = OutputStore(cfg2.output_uri)
    check_config(store, cfg2)
    shards = write_documents(store, cfg2)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(extract(store, cfg2, shards)))
    runner.start()

    from tests.procs import session_worker_pids as worker_pids

    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and runner.is_alive():
        if store.done_shards("activations") and worker_pids():  # mid-run: one shard done, more to do
            killed = worker_pids()[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=600)
    assert killed is not None, "no worker was killed mid-run"
    assert store.done_shards("activations") == shards
    after = _activations(store)
    assert after.num_rows == reference.num_rows
    keys = collections.Counter(zip(after["doc_id"].to_pylist(), after["unit"].to_pylist()))
    assert max(keys.values()) == 1
    assert set(keys) == set(zip(reference["doc_id"].to_pylist(), reference["unit"].to_pylist()))
