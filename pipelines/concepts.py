"""The concept pipeline: documents -> activations (Ray Data + model workers) -> concept model
(trainer actor) -> importance, top examples, vocabulary projection, labels -> tables + report.

Wiring only: every computation is a ``raylens`` function called inside an actor. Each
stage writes under the job's output URI; finished shards are skipped on a rerun.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.concept_worker import ConceptModelWorker
from actors.data_parallel import fit_data_parallel
from actors.trainer import PROCESS_ENV, ConceptTrainer, scan_shard
from pipelines.common import check_job_key, run_shard_stage, write_corpus_shards, write_issues
from pipelines.console import TqdmLines, progress, say
from pipelines.console import say as _say
from pipelines.report import write_concepts_table_and_report
from raylens.concepts.models import concept_model_class
from raylens.concepts.models.data_parallel import data_parallel_ranks
from raylens.concepts.topk_scan import merge_scans
from raylens.config import ConceptJobConfig
from raylens.io.readers import split_paths
from raylens.io.schemas import IMPORTANCE_SCHEMA, activation_width, importance_per_doc_schema, tensor_array
from raylens.io.store import OutputStore
from raylens.models.loading import model_task

log = logging.getLogger(__name__)


def check_config(store: OutputStore, cfg: ConceptJobConfig) -> None:
    """Refuse to resume into an output URI written with different extraction settings."""
    check_job_key(store, cfg.extraction_key(), cfg.model_dump(), cfg.output_uri)


def write_documents(store: OutputStore, cfg: ConceptJobConfig) -> list[str]:
    """Stream the corpus into ``documents/`` shards of ``extraction.shard_size`` rows (once)."""
    return write_corpus_shards(store, cfg.corpus, cfg.extraction.shard_size)


def _gpu_bytes() -> float | None:
    """Memory of one GPU of the cluster (bytes), asked of a one-GPU task; None without CUDA
    (Ray's fake GPUs)."""
    def probe() -> float | None:
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None

    return ray.get(ray.remote(num_gpus=1, num_cpus=0)(probe).remote())


def extraction_resources(cfg: ConceptJobConfig) -> ConceptJobConfig:
    """``cfg`` with the extraction stage's workers and GPUs placed by
    `raylens.models.placement.extraction_placement` when workers have several GPUs: workers of one
    GPU each when the extraction model fits on one, else sharded over the fewest GPUs that hold it."""
    res = cfg.resources
    if res.gpus_per_worker <= 1:
        return cfg
    from raylens.config.plan import plan_concept_job
    from raylens.models.placement import extraction_placement

    need = plan_concept_job(cfg, sample_docs=50)["memory"]["extraction_gpu_peak_bytes"]
    place = extraction_placement(need_bytes=need, gpu_bytes=_gpu_bytes(), num_workers=res.num_workers,
                                 gpus_per_worker=res.gpus_per_worker)
    if place.reason != "as configured":
        say(f"extract: {place.reason}")
    return cfg.model_copy(update={"resources": res.model_copy(
        update={"num_workers": place.num_workers, "gpus_per_worker": place.gpus_per_worker})})


def extract(store: OutputStore, cfg: ConceptJobConfig, shards: list[str]) -> dict:
    """Run the model workers over the shards that have no ``_SUCCESS`` marker yet (placed by
    :func:`extraction_resources`)."""
    run = run_shard_stage("extract", ConceptModelWorker, extraction_resources(cfg), shards,
                          worker_kwargs={"extraction_only": True})
    if not run.rows:
        return {"n_shards": 0, "seconds": 0.0, "n_tokens": 0}
    rows, seconds = run.rows, run.seconds
    n_tokens = int(sum(r["n_tokens"] for r in rows))
    say(f"extract: {len(rows)} shards, {sum(r['n_rows'] for r in rows)} activation rows in {seconds:.1f}s "
        f"({n_tokens / max(seconds, 1e-9):.0f} tokens/s including worker start-up)")
    return {"n_shards": len(rows), "seconds": seconds, "n_tokens": n_tokens}


def _d_model(store: OutputStore) -> int:
    first = store.shard_paths("activations")[0]
    return activation_width(pq.read_schema(first, filesystem=store.fs))


def _show_epochs(state: dict | None, shown: int) -> int:
    """Console lines for the epochs finished since ``shown``; returns the epochs shown now."""
    if not state or state["epoch"] <= shown:
        return shown
    of = f"/{state['epochs']}" if state["epochs"] else ""
    progress(f"fit: epoch {state['epoch']}{of}, loss {state['loss']:.4g}", final=state["epoch"] == state["epochs"])
    return state["epoch"]


def fit(store: OutputStore, cfg: ConceptJobConfig):
    """Start the trainer actor and fit the concept model on the activation shards, one console
    line per finished epoch; returns the actor (kept for the top examples) and its fit result."""
    res, d_model = cfg.resources, _d_model(store)
    ranks, why = data_parallel_ranks(concept_model_class(cfg.concepts.method), res.trainer_gpus)
    say(f"fit: {cfg.concepts.method} with {cfg.concepts.nb_concepts} concepts "
        f"({f'Ray Train TorchTrainer, {ranks} workers' if ranks > 1 else 'trainer actor'})")
    if ranks == 1 and why:
        say(f"fit: {why}")
    fresh = ranks > 1 and fit_data_parallel(cfg, d_model, ranks)  # the actor below then finds the fit finished
    # two threads: fit_progress answers while fit runs
    trainer = ray.remote(ConceptTrainer).options(num_gpus=res.trainer_gpus, num_cpus=res.cpus_per_worker,
                                                 max_concurrency=2, runtime_env={"env_vars": PROCESS_ENV}) \
        .remote(cfg.model_dump())
    ref = trainer.fit.remote(d_model)
    shown = 0
    while not ray.wait([ref], timeout=1.0)[0]:
        shown = _show_epochs(ray.get(trainer.fit_progress.remote()), shown)
    _show_epochs(ray.get(trainer.fit_progress.remote()), shown)
    result = ray.get(ref) | ({"skipped": False, "ranks": ranks} if fresh else {})
    if result.get("skipped"):
        say("fit: concept model already fitted with these settings (concept_model/_SUCCESS.json): skipping the fit")
    held = next(m for m in result["metrics"] if m["split"] == "heldout")
    say(f"fit: {result['fit_seconds']:.1f}s; held-out explained variance {held['explained_variance']:.3f}, "
        f"mean L0 {held['mean_l0']:.1f}")
    return trainer, result


def distributed_scan(store: OutputStore, cfg: ConceptJobConfig):
    """The top-k scan as parallel Ray tasks: one :func:`actors.trainer.scan_shard` per finished
    shard (at most ``interpretation.scan_tasks`` at a time, each with ``resources.trainer_gpus``
    GPUs), merged pairwise by tasks (:func:`raylens.concepts.topk_scan.merge_scans`, shard order
    kept), then the tables written by a CPU-only trainer actor. Returns each concept's firing
    frequency."""
    res, config = cfg.resources, cfg.model_dump()
    scan = ray.remote(scan_shard).options(num_gpus=res.trainer_gpus, num_cpus=1)
    merge = ray.remote(merge_scans).options(num_cpus=1)
    parts, running = [], []
    for shard in store.done_shards("activations"):
        if len(running) >= cfg.interpretation.scan_tasks:
            _, running = ray.wait(running, num_returns=1)
        parts.append(scan.remote(config, shard))
        running.append(parts[-1])
    while len(parts) > 1:  # a balanced tree: left before right, so ties keep the earlier shard
        parts = [merge.remote(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    writer = ray.remote(ConceptTrainer).options(num_cpus=1, num_gpus=0).remote(config)
    try:
        return ray.get(writer.top_examples.remote(parts[0]))
    finally:
        ray.kill(writer)


#: Activations on disk (bytes) up to which the top-k scan runs in the trainer that fitted: a
#: fresh actor costs a process start and its imports (6-8 s on 2 CPU cores, most of a small job's
#: scan), and what a fit leaves resident grows only with large corpora (see :func:`top_inputs`).
SCAN_IN_TRAINER_BYTES = 2**30


def top_inputs(store: OutputStore, cfg: ConceptJobConfig, trainer=None) -> list[float]:
    """The top-k scan of the fitted concept model: the parallel tasks of :func:`distributed_scan`
    when ``interpretation.scan_tasks > 1``, else one pass in a trainer actor. That actor is
    ``trainer`` (the one that fitted, given) when the activations take at most
    :data:`SCAN_IN_TRAINER_BYTES` on disk, else a fresh one (``resources.trainer_gpus`` GPUs): a
    long fit leaves host memory resident that grows with the corpus (freed blocks the allocator
    keeps: scanning in the fitting actor, its peak RSS grew 1.18-1.22x from 10k to 60k-300k
    documents in ``bench/scale.py``; a scan alone in a fresh process did not grow). ``trainer``
    is killed before a scan elsewhere and after its own. Returns each concept's firing frequency."""
    if trainer is not None and cfg.interpretation.scan_tasks == 1 and \
            store.file_bytes(split_paths(store, "all")[0]) <= SCAN_IN_TRAINER_BYTES:
        try:
            return ray.get(trainer.top_examples.remote())
        finally:
            ray.kill(trainer)
    if trainer is not None:
        ray.kill(trainer)
    if cfg.interpretation.scan_tasks > 1:
        return distributed_scan(store, cfg)
    res = cfg.resources
    scanner = ray.remote(ConceptTrainer).options(num_gpus=res.trainer_gpus, num_cpus=res.cpus_per_worker) \
        .remote(cfg.model_dump())
    try:
        return ray.get(scanner.top_examples.remote())
    finally:
        ray.kill(scanner)


def interpret(store: OutputStore, cfg: ConceptJobConfig, trainer):
    """Top activating inputs (:func:`top_inputs`) and the vocabulary projection (a new model
    worker); returns each concept's firing frequency, the model-worker actor and the vocabulary
    table. The fitting ``trainer`` is gone before the model worker starts (on one GPU two actors
    cannot each hold one)."""
    res = cfg.resources
    say("interpret: top activating inputs")
    frequency = top_inputs(store, cfg, trainer)
    worker = ray.remote(ConceptModelWorker).options(num_gpus=res.gpus_per_worker, num_cpus=res.cpus_per_worker) \
        .remote(cfg.model_dump())
    say("interpret: vocabulary projection")
    vocab = ray.get(worker.vocabulary_projection.remote(cfg.interpretation.vocab_top_k))
    store.write_table("concepts/vocabulary.parquet", vocab)
    return frequency, worker, vocab


def _importance_texts(store: OutputStore, n: int) -> tuple[list[int], list[str]]:
    ids, texts = [], []
    for rb in store.iter_shard_batches("documents", columns=["doc_id", "text"]):
        for d, t in zip(rb.column("doc_id").to_pylist(), rb.column("text").to_pylist()):
            if t and t.strip():
                ids.append(d)
                texts.append(t)
                if len(ids) == n:
                    return ids, texts
    return ids, texts


def importance(store: OutputStore, cfg: ConceptJobConfig, worker) -> tuple[np.ndarray, np.ndarray]:
    """Concept-to-output gradients over ``importance.n_samples`` documents (model worker); writes
    ``concepts/importance.parquet`` (and the per-document table); returns the means over
    documents of the gradient and of concept x gradient, ``(nb_concepts,)`` each (zeros and NaN
    when not computed)."""
    C = cfg.concepts.nb_concepts
    grad_mean = np.zeros(C)
    cxg_mean = np.full(C, np.nan)
    n_imp = 0
    if cfg.importance.enabled and ray.get(worker.ping.remote()) and model_task(cfg.model.name, cfg.model.task)[1] != "base":
        ids, texts = _importance_texts(store, cfg.importance.n_samples)
        say(f"score: concept-to-output gradients over {len(texts)} documents")
        imp = ray.get(worker.importance.remote(texts))
        grad_mean, cxg_mean, n_imp = imp["gradient"].mean(0), imp["concept_x_gradient"].mean(0), len(texts)
        store.write_table("concepts/importance_per_doc.parquet", pa.Table.from_arrays(
            [pa.array(ids, pa.int64()), pa.array(imp["target"], pa.int64()),
             tensor_array(imp["gradient"], "float32"), tensor_array(imp["concept_x_gradient"], "float32")],
            schema=importance_per_doc_schema(C)))
    store.write_table("concepts/importance.parquet", pa.Table.from_pydict(
        {"concept": np.arange(C), "gradient": grad_mean, "concept_x_gradient": cxg_mean, "n_samples": [n_imp] * C},
        schema=IMPORTANCE_SCHEMA))
    return grad_mean, cxg_mean


def labels_stage(store: OutputStore, cfg: ConceptJobConfig, top: pa.Table, vocab: pa.Table,
                 order: list[int]) -> tuple[dict[int, dict], list[dict]]:
    """LLM labels and their scores for the concepts in ``order`` (the tqdm bars of the library
    become ``labels: n/total`` lines); writes ``concepts/label_scores.parquet`` (removes a stale
    one when nothing was scored)."""
    lab = cfg.interpretation.labels
    say("labels: " + ("LLM labels for the most important concepts" if lab.enabled else "disabled"))
    with contextlib.redirect_stderr(TqdmLines("labels", sys.stderr)):
        labels, scores = _label_and_score(cfg, store, top, vocab, order)
    if labels:
        say(f"labels: {sum(1 for v in labels.values() if v.get('label'))} of {len(labels)} concepts labelled")
    if scores:
        from raylens.concepts.scoring import scores_table

        store.write_table("concepts/label_scores.parquet", scores_table(scores))
    elif store.exists("concepts/label_scores.parquet"):  # from an earlier run with scoring on
        store.remove("concepts/label_scores.parquet")
    return labels, scores


def _label_and_score(cfg: ConceptJobConfig, store: OutputStore, top: pa.Table, vocab: pa.Table,
                     order: list[int]) -> tuple[dict[int, dict], list[dict]]:
    """`raylens.concepts.labeling.label_and_score` on the job's tables: labels, then their scores."""
    from raylens.concepts.labeling import label_and_score

    paths = {name: f"concepts/{name}.parquet" for name in ("sampled_examples", "non_activating")}
    tables = {name: store.read_table(p) if store.exists(p) else None for name, p in paths.items()}
    return label_and_score(cfg.interpretation.labels, top, vocab, order, sampled=tables["sampled_examples"],
                           non_activating=tables["non_activating"], seed=cfg.seed,
                           n_quantiles=cfg.interpretation.sample_quantiles, cache_path=_label_cache(cfg), say=_say)


def _label_cache(cfg: ConceptJobConfig) -> str | None:
    store = OutputStore(cfg.output_uri)
    p = store.local_path("concepts", "labels_cache.json")
    return str(p) if p is not None else None


def run_concept_job(cfg: ConceptJobConfig) -> dict:
    """Run the whole concept job (Ray must be initialised). Returns paths and headline numbers.

    Raises:
        ConfigError: the output URI holds results made with other extraction settings, or the
            corpus has no documents.
    """
    store = OutputStore(cfg.output_uri)
    check_config(store, cfg)
    t_start = time.perf_counter()
    shards = write_documents(store, cfg)
    ext = extract(store, cfg, shards)
    markers = {s: store.shard_meta("activations", s) for s in shards}  # read once: issues and GPU ids
    write_issues(store, [i for meta in markers.values() for i in meta.get("issues", [])])
    trainer, fitted = fit(store, cfg)
    frequency, worker, vocab = interpret(store, cfg, trainer)
    grad_mean, cxg_mean = importance(store, cfg, worker)
    store.write_json("resources.json", {  # the GPU ids each stage's actors were given
        "extract": {s: meta.get("gpus") for s, meta in markers.items()},
        "trainer": fitted.get("gpus"), "model_worker": ray.get(worker.gpus.remote())})
    ray.kill(worker)  # free its memory and GPUs before the labels (a local LLM may start)
    top = store.read_table("concepts/top_examples.parquet")
    order = sorted(range(cfg.concepts.nb_concepts), key=lambda c: -abs(float(grad_mean[c])))  # the report's order
    labels, scores = labels_stage(store, cfg, top, vocab, order)
    report = write_concepts_table_and_report(store, cfg, top, vocab, grad_mean, cxg_mean, frequency, labels,
                                             fitted, ext, scores=scores)
    total = time.perf_counter() - t_start
    say(f"done in {total:.0f}s")
    return {"output_uri": cfg.output_uri, "report": report, "fit": fitted, "extract": ext, "seconds": total}
