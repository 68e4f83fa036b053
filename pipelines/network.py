"""The network pipeline: documents -> tuned lens (fitted once on a training slice, a model-worker
actor) -> lens statistics per shard (Ray Data + model workers) -> causal head gating, one actor
task per seed -> lens curves, prediction depth, head roles and their stability -> HTML report.

Wiring only: every number comes from ``raylens.network`` inside an actor, or from its corpus
functions over the written tables. Each stage writes under the job's output URI and is skipped on
a rerun when finished (the tuned lens' marker, each lens shard's marker, each seed's marker).
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.network_worker import (HEAD_GATING_KIND, TUNED_LENS_MARKER, NetworkModelWorker, seed_shard)
from pipelines.common import check_job_key, run_shard_stage, say, write_corpus_shards, write_issues
from raylens.config import NetworkJobConfig
from raylens.io.store import OutputStore

def first_documents(store: OutputStore, n: int) -> tuple[list[int], list[str]]:
    """The first ``n`` non-empty documents by ``doc_id`` (ids and texts)."""
    ids, texts = [], []
    for rb in store.iter_shard_batches("documents", columns=["doc_id", "text"]):
        for d, t in zip(rb.column("doc_id").to_pylist(), rb.column("text").to_pylist()):
            if len(ids) < n and t and t.strip():
                ids.append(d)
                texts.append(t)
    return ids, texts


def model_actors(cfg: NetworkJobConfig, n: int, *, num_cpus: float | None = None) -> list:
    """``n`` model-worker actors with the configured GPUs each and ``num_cpus`` CPUs (default the
    configured ones)."""
    res = cfg.resources
    cls = ray.remote(NetworkModelWorker).options(num_gpus=res.gpus_per_worker,
                                                 num_cpus=num_cpus or res.cpus_per_worker)
    return [cls.remote(cfg.model_dump()) for _ in range(n)]


def fit_tuned_lens(store: OutputStore, cfg: NetworkJobConfig) -> dict | None:
    """Fit the tuned lens once on the documents with ``doc_id < lens.train_docs`` (one model-worker
    actor, killed after so its GPUs are free for the lens stage); a rerun reads the marker."""
    if "tuned" not in cfg.lens.lenses:
        return None
    if store.exists(TUNED_LENS_MARKER):
        say("tuned lens: fitted by an earlier run")
        return store.read_json(TUNED_LENS_MARKER)
    _, texts = first_documents(store, cfg.lens.train_docs)
    res = cfg.resources
    # alone in its stage: on CPUs the actor takes every worker's CPUs
    cpus = res.cpus_per_worker * (1 if res.gpus_per_worker else res.num_workers)
    say(f"tuned lens: fitting one translator per layer on {len(texts)} documents, {cfg.lens.tuned_steps} steps "
        f"(model-worker actor)")
    (actor,) = model_actors(cfg, 1, num_cpus=cpus)
    try:
        result = ray.get(actor.fit_tuned_lens.remote(texts, threads=max(1, int(cpus))))
    finally:
        ray.kill(actor)
    say(f"tuned lens: fitted in {result['fit_seconds']:.1f}s; summed KL over layers {result['loss_first']:.1f} -> "
        f"{result['loss_last']:.1f} nats")
    return result


def lens_stage(cfg: NetworkJobConfig, shards: list[str]) -> dict:
    """Lens statistics over the shards not marked done yet; returns headline numbers."""
    run = run_shard_stage("lens", NetworkModelWorker, cfg, shards, note=f" ({', '.join(cfg.lens.lenses)} lens)")
    if not run.rows:
        return {"n_shards": 0, "seconds": 0.0, "n_tokens": 0}
    n_tokens = int(sum(r["n_tokens"] for r in run.rows))
    say(f"lens: {len(run.rows)} shards, {sum(r['n_rows'] for r in run.rows)} rows in {run.seconds:.1f}s "
        f"({n_tokens / max(run.seconds, 1e-9):.0f} tokens/s including worker start-up)")
    return {"n_shards": len(run.rows), "seconds": run.seconds, "n_tokens": n_tokens}


def head_gating_stage(store: OutputStore, cfg: NetworkJobConfig) -> list[dict]:
    """Causal head gating, one actor task per seed not marked done, on up to
    ``resources.num_workers`` actors (killed after); returns the new seeds' metadata."""
    h = cfg.head_gating
    if not h.enabled:
        return []
    pending = [s for s in h.seeds if not store.is_done(HEAD_GATING_KIND, seed_shard(s))]
    say(f"head gating: {len(h.seeds) - len(pending)} of {len(h.seeds)} seeds already done, {len(pending)} to do")
    if not pending:
        return []
    _, texts = first_documents(store, h.n_docs)
    actors = model_actors(cfg, min(cfg.resources.num_workers, len(pending)))
    refs = [actors[i % len(actors)].head_gating.remote(texts, seed) for i, seed in enumerate(pending)]
    done = []
    try:
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            meta = ray.get(ready[0])
            done.append(meta)
            roles = ", ".join(f"{n} {r}" for r, n in sorted(meta["roles"].items()))
            say(f"head gating: seed {meta['seed']} in {meta['seconds']:.1f}s: {roles}")
    finally:
        for a in actors:
            ray.kill(a)
    return done


def lens_table(store: OutputStore, *, doc_ids: list[int] | None = None, exclude: bool = False) -> pa.Table:
    """The finished lens shards as one table; with ``doc_ids`` only those documents (or, with
    ``exclude``, all but those)."""
    tables = []
    for s in store.done_shards("lens"):
        t = store.read_table(f"lens/{s}.parquet")
        if doc_ids is not None:
            keep = pc.is_in(t["doc_id"], pa.array(doc_ids, pa.int64()))
            t = t.filter(pc.invert(keep) if exclude else keep)
        tables.append(t)
    return pa.concat_tables(tables)


def aggregate(store: OutputStore, cfg: NetworkJobConfig) -> dict[str, pa.Table]:
    """Write ``prediction_depth.parquet`` (per shard, every document), ``lens_curves.parquet``
    (over the documents the tuned lens was not fitted on), ``head_roles.parquet`` (every seed's
    gates and roles) and ``head_stability.parquet``; returns them by name."""
    from raylens.network.corpus import lens_curves, prediction_depth, role_stability

    depth = pa.concat_tables([prediction_depth(store.read_table(f"lens/{s}.parquet"))
                              for s in store.done_shards("lens")])
    train_ids, _ = first_documents(store, cfg.lens.train_docs) if "tuned" in cfg.lens.lenses else ([], "")
    curves = lens_curves(lens_table(store, doc_ids=train_ids, exclude=True))
    out = {"prediction_depth": depth, "lens_curves": curves}
    seeds = [seed_shard(s) for s in cfg.head_gating.seeds if store.is_done(HEAD_GATING_KIND, seed_shard(s))]
    if cfg.head_gating.enabled and seeds:
        roles = pa.concat_tables([store.read_table(f"{HEAD_GATING_KIND}/{s}.parquet") for s in seeds])
        out |= {"head_roles": roles, "head_stability": role_stability(roles)}
    for name, table in out.items():
        store.write_table(f"{name}.parquet", table)
    say(f"aggregate: {', '.join(f'{n}.parquet ({t.num_rows} rows)' for n, t in out.items())}")
    return out


def report_stage(store: OutputStore, cfg: NetworkJobConfig, tables: dict[str, pa.Table]) -> str:
    """Write ``report.html`` (`raylens.viz.network.render_network_report`); returns its path or URI."""
    from raylens.viz.network import render_network_report

    train_ids = set(first_documents(store, cfg.lens.train_docs)[0]) if "tuned" in cfg.lens.lenses else set()
    doc_id = cfg.report.doc_id
    if doc_id is None:
        doc_id = min((d for d in tables["prediction_depth"]["doc_id"].to_pylist() if d not in train_ids),
                     default=None)
    rows = lens_table(store, doc_ids=[doc_id]).to_pylist() if doc_id is not None else []
    rows = [r for r in rows if r["position"] < cfg.report.max_positions]
    html = render_network_report(
        rows, tables["lens_curves"].to_pylist(),
        tables["head_stability"].to_pylist() if "head_stability" in tables else [],
        tables["head_roles"].to_pylist() if "head_roles" in tables else [],
        token_strings=token_strings(cfg, rows), doc_id=doc_id,
        title=f"raylens network: {cfg.model.name} on {cfg.corpus.source}",
        summary={"model": cfg.model.name, "corpus": cfg.corpus.source, "documents": cfg.corpus.limit,
                 "lenses": ", ".join(cfg.lens.lenses), "tuned lens trained on": f"{len(train_ids)} documents",
                 "max tokens": cfg.lens.max_tokens, "head-gating seeds": len(cfg.head_gating.seeds),
                 "output": cfg.output_uri})
    store.write_bytes("report.html", html.encode("utf-8"))
    return store.path("report.html")


def token_strings(cfg: NetworkJobConfig, rows: list[dict]) -> dict[int, str]:
    """The vocabulary strings of the token ids in ``rows`` (input, next and top-1 tokens), from
    the model's tokenizer (read from its config folder: no weights)."""
    from transformers import AutoTokenizer

    from raylens.models.loading import resolve_model_source

    ids = sorted({int(r[k]) for r in rows for k in ("token_id", "next_token_id", "top1_token_id")
                  if r[k] is not None})
    tok = AutoTokenizer.from_pretrained(resolve_model_source(cfg.model.name))
    return dict(zip(ids, tok.convert_ids_to_tokens(ids)))


def check_config(store: OutputStore, cfg: NetworkJobConfig) -> None:
    """Refuse to resume into an output URI written with other lens or head-gating settings."""
    check_job_key(store, cfg.job_key(), cfg.model_dump(), cfg.output_uri)


def run_network_job(cfg: NetworkJobConfig) -> dict:
    """Run the whole network job (Ray must be initialised). Returns paths and numbers.

    Raises:
        ConfigError: the output URI holds results made with other settings, or the corpus has
            no documents.
    """
    store = OutputStore(cfg.output_uri)
    check_config(store, cfg)
    t_start = time.perf_counter()
    shards = write_corpus_shards(store, cfg.corpus, cfg.lens.shard_size, label_column=cfg.corpus.label_column)
    tuned = fit_tuned_lens(store, cfg)
    lens = lens_stage(cfg, shards)
    write_issues(store, [i for s in shards for i in store.shard_meta("lens", s).get("issues", [])])
    gating = head_gating_stage(store, cfg)
    tables = aggregate(store, cfg)
    show_curves(tables["lens_curves"])
    report = report_stage(store, cfg, tables)
    total = time.perf_counter() - t_start
    say(f"done in {total:.0f}s; report: {report}")
    return {"output_uri": cfg.output_uri, "report": report, "tuned_lens": tuned, "lens": lens,
            "head_gating": gating, "seconds": total}


def show_curves(curves: pa.Table) -> None:
    """One console line per lens: KL to the final distribution (median, nats) at a few layers."""
    rows = curves.to_pylist()
    for name in dict.fromkeys(r["lens"] for r in rows):
        mine = sorted((r for r in rows if r["lens"] == name), key=lambda r: r["layer"])
        picked = mine[:: max(1, len(mine) // 5)]
        say(f"  {name} lens, median KL to final (nats) by layer: "
            + ", ".join(f"{r['layer']}: {r['kl_q50']:.2f}" for r in picked))
