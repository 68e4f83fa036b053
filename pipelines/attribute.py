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
import ray

from actors.model_worker import ModelWorker
from pipelines.common import check_job_key, say, write_corpus_shards
from raylens.attributions.corpus import method_summary, word_importance
from raylens.config import AttributionJobConfig
from raylens.io.store import OutputStore

log = logging.getLogger(__name__)


def check_config(store: OutputStore, cfg: AttributionJobConfig) -> None:
    """Refuse to resume into an output URI written with other attribution settings."""
    check_job_key(store, cfg.job_key(), cfg.model_dump(), cfg.output_uri)


def write_documents(store: OutputStore, cfg: AttributionJobConfig) -> list[str]:
    """The corpus into ``documents/`` shards (once); the target column, when set, as ``label``."""
    c = cfg.corpus
    return write_corpus_shards(store, c.source, text_column=c.text_column,
                               label_column=c.target_column or c.label_column, limit=c.limit,
                               shuffle_seed=c.shuffle_seed, shard_size=cfg.attribution.shard_size)


def attribute(store: OutputStore, cfg: AttributionJobConfig, shards: list[str]) -> dict:
    """Run the model workers over the shards not marked done yet; returns headline numbers."""
    pending = [s for s in shards if not store.is_done("attributions", s)]
    say(f"attribute: {len(shards) - len(pending)} of {len(shards)} shards already done, {len(pending)} to do "
        f"({', '.join(cfg.attribution.methods)})")
    if not pending:
        return {"n_shards": 0, "seconds": 0.0, "n_docs": 0}
    res = cfg.resources
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        ModelWorker,
        fn_constructor_kwargs={"config": cfg.model_dump()},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(res.num_workers, len(pending))),
        num_gpus=res.gpus_per_worker,
        num_cpus=res.cpus_per_worker,
    )
    rows = ds.take_all()
    seconds = time.perf_counter() - t0
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


def select_examples(store: OutputStore, cfg: AttributionJobConfig) -> dict[str, dict[str, list]]:
    """Per method: the ``best``, ``worst`` (by deletion AUC minus its random baseline, lower is
    better) and a seeded ``random`` sample of explained rows, as ``(AttributionOutput, row)``."""
    import numpy as np

    from raylens.attributions.output import AttributionOutput

    k = cfg.gallery.examples_per_kind
    cols = ["doc_id", "method", "target_index", "error", "deletion_auc", "deletion_auc_random"]
    index = pa.concat_tables([t.select(cols) for t in _tables(store)]).to_pylist() if store.done_shards(
        "attributions") else []
    chosen: dict[str, dict[str, list[tuple[int, str, int]]]] = {}
    rng = np.random.default_rng(cfg.attribution.seed)
    for method in cfg.attribution.methods:
        rows = [r for r in index if r["method"] == method and r["error"] is None]
        keyed = [r for r in rows if r["deletion_auc"] is not None and r["deletion_auc_random"] is not None
                 and np.isfinite(r["deletion_auc"] - r["deletion_auc_random"])]
        keyed.sort(key=lambda r: (r["deletion_auc"] - r["deletion_auc_random"], r["doc_id"]))
        best, worst = keyed[:k], keyed[::-1][:k]
        taken = {(r["doc_id"], r["target_index"]) for r in best + worst}
        rest = [r for r in rows if (r["doc_id"], r["target_index"]) not in taken]
        rand = [rest[i] for i in sorted(rng.choice(len(rest), size=min(k, len(rest)), replace=False))] if rest else []
        chosen[method] = {kind: [(r["doc_id"], method, r["target_index"]) for r in sel]
                          for kind, sel in (("best", best), ("worst", worst), ("random", rand))}
    wanted = {key for kinds in chosen.values() for sel in kinds.values() for key in sel}
    found: dict[tuple, tuple] = {}
    for t in _tables(store):
        for r in t.to_pylist():
            key = (r["doc_id"], r["method"], r["target_index"])
            if key in wanted and r["error"] is None:
                found[key] = (AttributionOutput.from_arrow_row(r), r)
    return {m: {kind: [found[key] for key in sel if key in found] for kind, sel in kinds.items()}
            for m, kinds in chosen.items()}


def write_gallery(store: OutputStore, cfg: AttributionJobConfig, summary: pa.Table, words: pa.Table) -> str:
    """Write ``gallery.html``; returns its path (or URI)."""
    from raylens.viz.gallery import render_gallery

    n_docs = sum(int(store.shard_meta("attributions", s).get("n_docs", 0)) for s in store.done_shards("attributions"))
    html = render_gallery(summary.to_pylist(), words.to_pylist(), select_examples(store, cfg),
                          title=f"raylens attributions: {cfg.model.name} on {cfg.corpus.source}",
                          subtitle=f"{n_docs} documents · {cfg.attribution.granularity} granularity · "
                                   f"targets: {cfg.attribution.targets} · inference mode: "
                                   f"{cfg.attribution.inference_mode}",
                          top_words=cfg.gallery.top_words)
    store.write_bytes("gallery.html", html.encode("utf-8"))
    return store.path("gallery.html")


def run_attribution_job(cfg: AttributionJobConfig) -> dict:
    """Run the whole attribution job (Ray must be initialised). Returns paths and numbers."""

    store = OutputStore(cfg.output_uri)
    check_config(store, cfg)
    t_start = time.perf_counter()
    say(f"documents: reading corpus {cfg.corpus.source!r} (limit {cfg.corpus.limit})")
    shards = write_documents(store, cfg)
    run = attribute(store, cfg, shards)
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
