"""The concept-trainer actor: fits the concept model from the activation shards (streamed,
never all in RAM), saves it, measures it, and finds each concept's top activating inputs.

A thin shell around ``raylens.concepts``; runs on a GPU when one is given to it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raylens.concepts.interpret import non_activating_table, quantile_sample, top_examples_table
from raylens.concepts.topk_scan import ScanPartial, finish_scan, scan_batch_rows, scan_partial
from raylens.concepts.metrics import ReconstructionAccumulator, reconstruction_metrics
from raylens.concepts.models.checkpoint import FitCheckpoint
from actors.model_worker import assigned_gpus
from raylens.concepts.models import ConceptModel, build_concept_model, load_concept_model
from raylens.concepts.models.data_parallel import data_parallel_ranks
from raylens.io.schemas import METRICS_SCHEMA
from raylens.config import ConceptJobConfig
from raylens.io.memory import limit_malloc_arenas, mmap_large_allocations
from raylens.io.readers import ActivationStream, heldout_paths, split_paths
from raylens.io.store import OutputStore

log = logging.getLogger(__name__)

#: The commit point of a finished fit (its key, time and rows), written last.
FIT_MARKER = "concept_model/_SUCCESS.json"
#: Folder of the fit's checkpoints (removed once the fit is finished).
CHECKPOINTS = "concept_model_checkpoints"


#: The activation columns the top-k scan reads.
SCAN_COLUMNS = ["doc_id", "unit", "char_start", "char_end", "activation"]


def scan_settings(cfg: ConceptJobConfig) -> dict:
    """The keyword arguments of :func:`raylens.concepts.topk_scan.scan_partial` from the job config."""
    interp = cfg.interpretation
    return {"k": interp.top_k_examples, "n_pool": interp.sample_pool_size if interp.sampled_per_quantile > 0 else 0,
            "n_quiet": interp.non_activating_per_concept, "min_quiet_chars": interp.non_activating_min_chars,
            "seed": cfg.seed}


def scan_batches(store: OutputStore, paths: list[str], model: ConceptModel) -> Iterator[pa.RecordBatch]:
    """The :data:`SCAN_COLUMNS` of the activation files ``paths``, in order, in batches sized for
    ``model``'s scan (:func:`raylens.concepts.topk_scan.scan_batch_rows`)."""
    rows = scan_batch_rows(model.d_model, model.nb_concepts)
    for p in paths:
        yield from pq.ParquetFile(p, filesystem=store.fs).iter_batches(batch_size=rows, columns=SCAN_COLUMNS)


def scan_shard(config: dict, shard: str) -> ScanPartial:
    """The partial top-k scan of one shard's rows (``activations/`` and, when the extraction
    wrote one, ``activations_heldout/``), on a GPU when this process was given one; the body of
    the parallel scan tasks (merge them with :func:`raylens.concepts.topk_scan.merge_scans`)."""
    mmap_large_allocations()  # record batches and codes given back when freed (see top_examples)
    trainer = ConceptTrainer(config)
    device = "cuda" if assigned_gpus() and torch.cuda.is_available() else "cpu"
    model = load_concept_model(trainer.store.download_dir("concept_model"), device=device)
    store = trainer.store  # the shard's files as its marker lists them (part files), then its held-out rows
    paths = [store.path(f) for f in store.shard_files("activations", shard)] + heldout_paths(store, shard)
    return scan_partial(model, scan_batches(trainer.store, paths, model), **scan_settings(trainer.cfg), device=device)


#: Environment of the process of a :class:`ConceptTrainer` that fits (its Ray actor's
#: ``runtime_env`` ``env_vars``): glibc capped at two malloc arenas from the start (the
#: activation streams' reader threads then share them, see ``_stream``; a cap set later with
#: ``mallopt`` does not bind once a process has made more than eight arenas, as a Ray worker's
#: own threads may have).
PROCESS_ENV = {"MALLOC_ARENA_MAX": "2"}


class ConceptTrainer:
    """Args: config: the job config as a dict."""

    def __init__(self, config: dict):
        self.cfg = ConceptJobConfig.model_validate(config)
        self.store = OutputStore(self.cfg.output_uri)
        self.device = "cuda" if self.cfg.resources.trainer_gpus > 0 and torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, int(self.cfg.resources.cpus_per_worker)))
        self._fitting = None  # the model being fitted, read by fit_progress from another thread

    def _stream(self, split: str, shuffle: bool, epochs: int | None = None, float32: bool = True) -> ActivationStream:
        # reader threads share two malloc arenas: the stream's peak stays flat with the corpus
        # (tests/test_readers.py: 32-38 MiB over 2 to 64 shards; 51-61 with every large block
        # from mmap, which read 2.1x slower; 57-69 and rising with glibc's defaults). The job's
        # trainer actor has the cap from its start (PROCESS_ENV); this call covers a process
        # that starts its first threads here (a notebook, a Ray Train worker).
        limit_malloc_arenas(2)
        c = self.cfg.concepts
        return ActivationStream(self.store, split=split, heldout_fraction=c.heldout_fraction,
                                batch_rows=c.batch_rows, shuffle_buffer=16 * c.batch_rows if shuffle else 0,
                                seed=self.cfg.seed, readers=c.readers, epochs=epochs, float32=float32)

    def train_stream(self, model: ConceptModel) -> ActivationStream:
        """The shuffled stream of train rows ``model``'s fit reads (the same order in every
        process), reading each pass ahead of the fit when the model streams several (its
        ``epochs``); close it after the fit. A streaming model on a GPU gets the rows in their
        stored dtype and casts them there (its ``fit_stream`` re-cuts batches on its device)."""
        streams = model.streaming
        return self._stream("train", shuffle=True, epochs=getattr(model, "epochs", None) if streams else None,
                            float32=not (streams and self.device != "cpu"))

    def fit_key(self, d_model: int) -> dict:
        """What a fitted concept model depends on: a finished fit or a checkpoint of another key
        is not reused."""
        c = self.cfg.concepts
        return {"method": c.method, "nb_concepts": c.nb_concepts, "params": c.params, "d_model": d_model,
                "seed": self.cfg.seed, "heldout_fraction": c.heldout_fraction, "batch_rows": c.batch_rows,
                "shards": self.store.done_shards("activations")}

    def finished_fit(self, d_model: int) -> dict | None:
        """The result of an earlier fit of the same key (its marker ``concept_model/_SUCCESS.json``
        and ``concepts/metrics.parquet`` exist), or None."""
        if not (self.store.exists(FIT_MARKER) and self.store.exists("concepts/metrics.parquet")):
            return None
        done = self.store.read_json(FIT_MARKER)
        if done.get("key") != json.loads(json.dumps(self.fit_key(d_model), default=str)):
            return None
        rows = self.store.read_table("concepts/metrics.parquet").to_pylist()
        return {"fit_seconds": done["fit_seconds"], "metrics": rows, "n_fit_rows": done["n_fit_rows"],
                "gpus": assigned_gpus(), "skipped": True}

    def fit(self, d_model: int) -> dict:
        """Fit, save to ``concept_model/`` and write ``concepts/metrics.parquet``; returns the metrics.

        A fit of the same key already finished is not redone (the result says ``skipped``).
        Iterative models (SAEs) checkpoint every ``concepts.checkpoint_every`` steps under
        ``concept_model_checkpoints/`` and resume from there after a killed trainer.

        Metrics: ``heldout`` rows are the final model's, over the held-out rows only. For
        iterative models the ``train`` row is computed during the last epoch of the fit, with no
        pass of its own: each batch is scored by the forward pass of its own training step,
        before that step's update (the usual "training loss" of SAE trainers; the model still
        changes during that epoch, so these are slightly pessimistic for the final model); the
        accumulated sums are checkpointed with the fit, so a resumed fit gives the same row.
        Other methods get a separate pass over the train rows.
        """
        done = self.finished_fit(d_model)
        if done is not None:
            log.info("fit: concept model already fitted (%s): skipping the fit", FIT_MARKER)
            return done
        model, kwargs = self.fit_setup(d_model)
        train_acc, checkpoint = kwargs.get("observer"), kwargs.get("checkpoint")
        t0 = time.perf_counter()
        with self.train_stream(model) as stream:
            self.fit_model(model, stream, **kwargs)
        fit_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            model.save(tmp)
            self.store.remove("concept_model")  # no stale file of an earlier fit (another method) stays
            self.store.upload_dir(tmp, "concept_model")
        train_m = (train_acc.result() if train_acc is not None
                   else reconstruction_metrics(model, self._stream("train", shuffle=False)))
        rows = [{"model": "fitted", "split": "train", **train_m},
                {"model": "fitted", "split": "heldout",
                 **reconstruction_metrics(model, self._stream("heldout", shuffle=False))}]
        for r in rows:
            r["fit_seconds"] = fit_s
        self.store.write_table("concepts/metrics.parquet", pa.Table.from_pylist(rows, schema=METRICS_SCHEMA))
        self.store.write_json(FIT_MARKER, {"key": self.fit_key(d_model), "fit_seconds": fit_s,
                                           "n_fit_rows": model.n_fit_rows})
        if checkpoint is not None:
            checkpoint.clear()
        return {"fit_seconds": fit_s, "metrics": rows, "n_fit_rows": model.n_fit_rows, "gpus": assigned_gpus()}

    def fit_setup(self, d_model: int) -> tuple[ConceptModel, dict]:
        """The unfitted concept model of this job (on this trainer's device) and the keyword
        arguments of its ``fit_stream``: a :class:`FitCheckpoint` and a train-metrics observer for
        iterative models, none for the others."""
        c = self.cfg.concepts
        params = {"seed": self.cfg.seed, "device": self.device, **c.params}
        model = build_concept_model(c.method, nb_concepts=c.nb_concepts, d_model=d_model, **params)
        self._fitting = model
        if not model.streaming:
            log.info("%s needs its rows in memory: fitting on a seeded sample of at most %d rows",
                     c.method, model.max_fit_rows)
        ranks, why = data_parallel_ranks(type(model), self.cfg.resources.trainer_gpus)
        if ranks == 1 and why:
            log.warning("fit: %s", why)
        if not model.resumable:
            return model, {}
        checkpoint = FitCheckpoint(self.store, CHECKPOINTS, every=c.checkpoint_every, key=self.fit_key(d_model))
        return model, {"checkpoint": checkpoint, "observer": ReconstructionAccumulator()}

    def fit_model(self, model: ConceptModel, stream: ActivationStream, **kwargs) -> None:
        """Fit ``model`` on the train ``stream`` in this process (``kwargs`` from :meth:`fit_setup`);
        :class:`actors.data_parallel.RankTrainer` fits it as one rank of several."""
        model.fit_stream(stream, progress=False, **kwargs)

    def fit_progress(self) -> dict | None:
        """Where a running :meth:`fit` is, for the driver's console (call it on an actor with
        ``max_concurrency=2`` while ``fit`` runs): ``{"epoch": epochs done, "epochs": epochs
        planned or None, "loss": mean loss of the last epoch or None}``; None before ``fit``
        has built its model. Epochs are those of iterative models (SAEs, their ``history``);
        other methods report epoch 0."""
        model = self._fitting
        if model is None:
            return None
        history = list(getattr(model, "history", None) or [])
        return {"epoch": len(history), "epochs": getattr(model, "epochs", None),
                "loss": history[-1]["loss"] if history else None}

    def top_examples(self, partial: ScanPartial | None = None) -> list[float]:
        """Write ``concepts/top_examples.parquet``, and (when configured)
        ``concepts/sampled_examples.parquet`` (activating examples sampled evenly over
        activation quantiles, with a ``quantile`` column) and ``concepts/non_activating.parquet``
        (runs of text where a concept does not fire), from ``partial`` (the merged scans of
        every shard, :func:`scan_shard`), or from one pass over the activation shards here
        when None. Returns each concept's firing frequency."""
        # large blocks (record batches, codes) from mmap, given back when freed: a scanner's
        # resident memory after a 60k-document scan stayed at 595 MiB (743 without; 576 / 599 at 10k)
        mmap_large_allocations()
        if partial is None:
            model = load_concept_model(self.store.download_dir("concept_model"), device=self.device)
            partial = scan_partial(model, scan_batches(self.store, split_paths(self.store, "all")[0], model),
                                   **scan_settings(self.cfg), device=self.device)
        scan = finish_scan(partial)
        interp = self.cfg.interpretation
        sampled = interp.sampled_per_quantile > 0
        best = scan["best"]
        picked = quantile_sample(scan["pool"], n_quantiles=interp.sample_quantiles,
                                 per_quantile=interp.sampled_per_quantile, seed=self.cfg.seed) if sampled else None
        wanted = set(int(d) for d in best["doc_id"].flatten().tolist() if d >= 0)
        for t in ([picked["doc_id"]] if picked else []) + [scan["quiet"]["doc_id"]]:
            wanted |= set(int(d) for d in t.flatten().tolist() if d >= 0)
        docs: dict[int, str] = {}
        for rb in self.store.iter_shard_batches("documents", columns=["doc_id", "text"]):
            for d, t in zip(rb.column("doc_id").to_pylist(), rb.column("text").to_pylist()):
                if d in wanted:
                    docs[d] = t
        self.store.write_table("concepts/top_examples.parquet",
                               top_examples_table(best, docs, context_chars=interp.context_chars))
        if picked is not None:
            self.store.write_table("concepts/sampled_examples.parquet",
                                   top_examples_table(picked, docs, context_chars=interp.context_chars))
        if interp.non_activating_per_concept:
            self.store.write_table("concepts/non_activating.parquet", non_activating_table(scan["quiet"], docs))
        return scan["frequency"].tolist()
