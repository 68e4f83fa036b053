"""Pieces both jobs share: the corpus written once into document shards, the output-URI guard
against resuming with other settings, and :func:`run_shard_stage`, a worker class run over the
document shards on an actor pool (Ray Data)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.console import progress, say
from raylens.config import ConfigError
from raylens.config.preflight import job_key_error
from raylens.data.corpora import iter_corpus
from raylens.io.schemas import DOCUMENTS_SCHEMA, issues_table
from raylens.io.store import OutputStore, shard_name

__all__ = ["ShardStage", "check_job_key", "run_shard_stage", "say", "write_corpus_shards"]


def write_corpus_shards(store: OutputStore, corpus, shard_size: int, *, label_column: str | None = None) -> list[str]:
    """Stream the corpus (``corpus``: the job's corpus section) into ``documents/`` shards of
    ``shard_size`` rows, once: a rerun reads the manifest written at the end. Rows refused by the
    corpus reader (`raylens.data.corpora.iter_corpus`: invalid UTF-8 with ``skip``, a text that
    is a list or a mapping, a repeated id) are not documents; their problems and those of the
    kept rows (replaced bytes, null or non-string texts) go into the manifest's ``issues``,
    which :func:`write_issues` adds to ``issues.parquet``. Console: the corpus read, documents
    read so far, then the count written.

    Args:
        label_column: the column read as ``label`` (default ``corpus.label_column``).

    Raises:
        ConfigError: the corpus produced no documents, or every text is blank.
    """
    source = corpus.source
    say(f"documents: reading corpus {source!r} (limit {corpus.limit})")
    if store.exists("documents", "_manifest.json"):
        shards = store.read_json("documents/_manifest.json")["shards"]
        say(f"documents: {len(shards)} shards written by an earlier run")
        return shards
    chunks = iter_corpus(source, text_column=corpus.text_column, label_column=label_column or corpus.label_column,
                         limit=corpus.limit, shuffle_seed=corpus.shuffle_seed, chunk_rows=shard_size,
                         id_column=corpus.id_column, invalid_utf8=corpus.invalid_utf8, with_issues=True)
    shards: list[str] = []
    issues: list[dict] = []
    n_read = n_text = 0

    def flush(table: pa.Table) -> None:
        nonlocal n_read, n_text
        name = shard_name(len(shards))
        store.write_shard("documents", name, table.cast(DOCUMENTS_SCHEMA))
        shards.append(name)
        n_read += table.num_rows
        n_text += sum(1 for t in table["text"].to_pylist() if t and t.strip())
        progress(f"documents: {n_read} read, {len(shards)} shards written")

    buf = None
    for chunk in chunks:
        issues += [{"doc_id": d, "stage": "corpus", **i} for d, row in zip(chunk["doc_id"].to_pylist(),
                                                                          chunk["issues"].to_pylist()) for i in row]
        kept = chunk.filter(pc.invert(chunk["refused"])).select(["doc_id", "text", "label"])
        buf = kept if buf is None else pa.concat_tables([buf, kept])
        while buf.num_rows >= shard_size:
            flush(buf.slice(0, shard_size))
            buf = buf.slice(shard_size)
    if buf is not None and buf.num_rows:
        flush(buf)
    if not n_text:
        raise ConfigError(f"corpus.source {source!r} produced no documents" if not n_read else
                          f"corpus.source: every text of the {n_read} documents of {source!r} is blank")
    store.write_json("documents/_manifest.json", {"shards": shards, "issues": issues})
    say(f"documents: {n_read} documents in {len(shards)} shards" + (f", {len(issues)} corpus issues" if issues else ""))
    return shards


def check_job_key(store: OutputStore, key: dict, config: dict, output_uri: str) -> None:
    """Refuse to resume into ``output_uri`` when it holds results made with another ``key``
    (the settings that determine the rows); record ``key`` and the whole config otherwise.

    Raises:
        ConfigError: naming the settings that differ.
    """
    if store.exists("job_key.json"):
        err = job_key_error(output_uri, store.read_json("job_key.json"), key)
        if err is not None:
            raise err
    else:
        store.write_json("job_key.json", key)
    store.write_json("config.json", config)


@dataclass
class ShardStage:
    """What :func:`run_shard_stage` did.

    Attributes:
        rows: one summary row per shard processed in this run (`actors.shard_worker.ShardWorker`
            columns), in the order they finished.
        seconds: wall-clock seconds of the stage, actor start-up included (0 when nothing ran).
    """

    rows: list[dict]
    seconds: float


def run_shard_stage(stage: str, worker: type, cfg, shards: list[str], *, note: str = "",
                    worker_kwargs: dict | None = None) -> ShardStage:
    """Run ``worker`` (a `actors.shard_worker.ShardWorker` subclass built from ``cfg``) over the
    document shards that have no success marker of ``worker.kind`` yet, on a pool of
    ``cfg.resources.num_workers`` actors with the configured GPUs and CPUs each.

    Prints ``<stage>: d of n shards already done, p to do<note>``, then a progress line as
    shards finish (shards done / to do, output rows/s, time left).

    Args:
        stage: the stage's name on the console (``"extract"``).
        worker: the worker class; Ray Data builds one per actor with ``config=cfg.model_dump()``.
        cfg: the job config (``output_uri`` and ``resources`` sections are read here).
        shards: every document shard of the job.
        note: appended to the first line.
        worker_kwargs: more keyword arguments of the worker's constructor.

    Returns:
        The summary rows and seconds of the shards processed now.
    """
    store = OutputStore(cfg.output_uri)
    pending = [s for s in shards if not store.is_done(worker.kind, s)]
    say(f"{stage}: {len(shards) - len(pending)} of {len(shards)} shards already done, {len(pending)} to do{note}")
    if not pending:
        return ShardStage([], 0.0)
    res = cfg.resources
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        worker,
        fn_constructor_kwargs={"config": cfg.model_dump(), **(worker_kwargs or {})},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(res.num_workers, len(pending))),
        num_gpus=res.gpus_per_worker,
        num_cpus=res.cpus_per_worker,
    )
    rows: list[dict] = []
    for row in ds.iter_rows():
        rows.append(row)
        elapsed = time.perf_counter() - t0
        left = elapsed / len(rows) * (len(pending) - len(rows))
        rate = sum(r["n_rows"] for r in rows) / max(elapsed, 1e-9)
        progress(f"{stage}: {len(rows)}/{len(pending)} shards, {rate:.{0 if rate >= 10 else 2}f} rows/s, "
                 f"about {left:.0f}s left", final=len(rows) == len(pending))
    n_oom = sum(int(r.get("oom_splits", 0)) for r in rows)
    if n_oom:
        say(f"{stage}: {n_oom} batches ran out of memory and were split and retried (counts in the shard markers)")
    return ShardStage(rows, time.perf_counter() - t0)


def write_issues(store: OutputStore, issues: list[dict]) -> None:
    """Write the job's per-document problems (and the corpus reader's, from the documents
    manifest) to ``issues.parquet``
    (`raylens.io.schemas.ISSUES_SCHEMA`, also when there are none) and say how many of each kind."""
    if store.exists("documents", "_manifest.json"):  # the corpus reader's (see write_corpus_shards)
        issues = store.read_json("documents/_manifest.json").get("issues", []) + list(issues)
    table = issues_table(issues)
    store.write_table("issues.parquet", table)
    kinds = Counter(table["kind"].to_pylist())
    detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    say(f"issues: {table.num_rows} recorded in issues.parquet" + (f" ({detail})" if detail else ""))

