"""The attribution pipeline: documents -> attribution rows (Ray Data + model workers, one
Parquet shard per document shard) -> per-method summary, corpus word table, HTML gallery.

Wiring only: the rows come from :func:`raylens.attributions.corpus.attribute_documents` inside
the model-worker actors. Finished shards (success marker) are skipped on a rerun, so a rerun
with the same output URI only does what is missing; a killed actor's shard is redone whole
(its file is written atomically before its marker).
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from actors.attribution_worker import AttributionModelWorker
from pipelines.common import check_job_key, run_shard_stage, say, write_corpus_shards, write_issues
from raylens.attributions.corpus import method_summary, word_importance
from raylens.attributions.gallery_examples import select_examples
from raylens.config import AttributionJobConfig
from raylens.io.store import OutputStore

log = logging.getLogger(__name__)


def check_config(store: OutputStore, cfg: AttributionJobConfig) -> None:
    """Refuse to resume into an output URI written with other attribution settings."""
    check_job_key(store, cfg.job_key(), cfg.model_dump(), cfg.output_uri)


def write_documents(store: OutputStore, cfg: AttributionJobConfig) -> list[str]:
    """The corpus into ``documents/`` shards (once); the target column, when set, as ``label``."""
    c = cfg.corpus
    return write_corpus_shards(store, c, cfg.attribution.shard_size, label_column=c.target_column or c.label_column)


def attribute(store: OutputStore, cfg: AttributionJobConfig, shards: list[str]) -> dict:
    """Run the model workers over the shards not marked done yet; returns headline numbers."""
    run = run_shard_stage("attribute", AttributionModelWorker, cfg, shards,
                          note=f" ({', '.join(cfg.attribution.methods)})")
    if not run.rows:
        return {"n_shards": 0, "seconds": 0.0, "n_docs": 0}
    rows, seconds = run.rows, run.seconds
    n_docs = int(sum(r["n_docs"] for r in rows))
    say(f"attribute: {len(rows)} shards, {n_docs} documents, {sum(r['n_rows'] for r in rows)} rows "
        f"({sum(r['n_errors'] for r in rows)} errors) in {seconds:.1f}s "
        f"({n_docs / max(seconds, 1e-9):.2f} documents/s including worker start-up)")
    return {"n_shards": len(rows), "seconds": seconds, "n_docs": n_docs}


def _tables(store: OutputStore) -> list[pa.Table]:
    return [store.read_table(f"attributions/{s}.parquet") for s in store.done_shards("attributions")]


def summarize(store: OutputStore, cfg: AttributionJobConfig) -> tuple[pa.Table, pa.Table]:
    """Write ``summary.parquet`` (per method) and ``words.parquet`` (the corpus word table)."""
    secs: dict[str, float] = {}
    for s in store.done_shards("attributions"):
        for k, v in (store.shard_meta("attributions", s).get("method_seconds") or {}).items():
            secs[k] = secs.get(k, 0.0) + float(v)
    summary = method_summary(_tables(store), seconds=secs)
    g = cfg.gallery
    words = word_importance(_tables(store), min_count=g.min_word_count, top_k=max(g.top_words, 25))
    store.write_table("summary.parquet", summary)
    store.write_table("words.parquet", words)
    return summary, words


def write_gallery(store: OutputStore, cfg: AttributionJobConfig, summary: pa.Table, words: pa.Table) -> str:
    """Write ``gallery.html``; returns its path (or URI)."""
    from pipelines.report import read_issues
    from raylens.viz.gallery import render_gallery

    n_docs = sum(int(store.shard_meta("attributions", s).get("n_docs", 0)) for s in store.done_shards("attributions"))
    examples = select_examples(_tables(store), cfg.attribution.methods, per_kind=cfg.gallery.examples_per_kind,
                               seed=cfg.attribution.seed)
    html = render_gallery(summary.to_pylist(), words.to_pylist(), examples,
                          title=f"raylens attributions: {cfg.model.name} on {cfg.corpus.source}",
                          subtitle=f"{n_docs} documents · {cfg.attribution.granularity} granularity · "
                                   f"targets: {cfg.attribution.targets} · inference mode: "
                                   f"{cfg.attribution.inference_mode}",
                          top_words=cfg.gallery.top_words, issues=read_issues(store))
    store.write_bytes("gallery.html", html.encode("utf-8"))
    return store.path("gallery.html")


def _issue_kind(error: str) -> str:
    """The ``kind`` of an attribution error row: ``empty``, ``too_long`` or ``error``."""
    return "empty" if error.startswith("empty") else "too_long" if error.startswith("too long") else "error"


def run_attribution_job(cfg: AttributionJobConfig) -> dict:
    """Run the whole attribution job (Ray must be initialised). Returns paths and numbers."""

    store = OutputStore(cfg.output_uri)
    check_config(store, cfg)
    t_start = time.perf_counter()
    shards = write_documents(store, cfg)
    run = attribute(store, cfg, shards)
    write_issues(store, [{"doc_id": r["doc_id"], "stage": "attribute", "kind": _issue_kind(r["error"]),
                          "message": f"{r['method']}: {r['error']}"}
                         for rb in store.iter_shard_batches("attributions", columns=["doc_id", "method", "error"])
                         for r in rb.to_pylist() if r["error"] is not None])
    say("summary: per-method metrics and the corpus word table")
    summary, words = summarize(store, cfg)
    for r in summary.to_pylist():
        say(f"  {r['method']:<20} {r['n_rows']} rows, {r['n_errors']} errors, {r['rows_per_second']:.2f} rows/s; "
            f"deletion AUC {r['deletion_auc']:.3f} (random {r['deletion_auc_random']:.3f})")
    gallery = write_gallery(store, cfg, summary, words)
    total = time.perf_counter() - t_start
    say(f"done in {total:.0f}s; gallery: {gallery}")
    return {"output_uri": cfg.output_uri, "gallery": gallery, "attribute": run, "seconds": total,
            "summary": summary.to_pylist()}
