"""The model-worker actor: holds one Hugging Face model (sharded over its GPUs when it has
several) and serves the jobs' model work. Built from a concept-job config, it splits the model
at the configured layer and:

* as a ``map_batches`` callable, turns document shards into activation shards;
* as a plain actor, projects concept directions on the vocabulary and computes
  concept-to-output gradients.

Built from an attribution-job config, it holds the configured attribution methods and, as a
``map_batches`` callable, turns document shards into attribution shards.

A thin shell: the math lives in ``raylens``. Ray imports only happen in the pipeline.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import torch

from raylens.config import AttributionJobConfig, ConceptJobConfig
from raylens.io.store import OutputStore
from raylens.models.loading import load_model
from raylens.models.split import SplitModel

log = logging.getLogger(__name__)


class ModelWorker:
    """One model per actor.

    Args:
        config: the job config as a dict (``ConceptJobConfig.model_dump()``).
    """

    def __init__(self, config: dict):
        self.job = "attribute" if "attribution" in config else "concepts"
        self.cfg = (AttributionJobConfig if self.job == "attribute" else ConceptJobConfig).model_validate(config)
        res = self.cfg.resources
        torch.set_num_threads(max(1, int(res.cpus_per_worker)))
        device_map = "auto" if res.gpus_per_worker > 1 and torch.cuda.device_count() > 1 else None
        device = "cuda" if res.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.loaded = load_model(self.cfg.model.name, task=self.cfg.model.task, dtype=self.cfg.model.dtype,
                                 device=device, device_map=device_map)
        self.store = OutputStore(self.cfg.output_uri)
        if self.job == "concepts":
            self.split = SplitModel(self.loaded, self.cfg.extraction.split_point)
        else:
            from raylens.attributions.corpus import build_explainers

            a = self.cfg.attribution
            self.explainers = build_explainers(
                self.loaded, a.methods, params=a.params, granularity=a.granularity, batch_size=a.batch_size,
                inference_mode=a.inference_mode, max_new_tokens=a.max_new_tokens, seed=a.seed, progress=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``map_batches`` entry: process the document shards named in ``batch["shard"]``."""
        return self.attribute(batch) if self.job == "attribute" else self.extract(batch)

    # ---- extraction (map_batches) ---------------------------------------------------
    def extract(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Extract the shards named in ``batch["shard"]``; returns one summary row per shard."""
        ex = self.cfg.extraction
        out: dict[str, list] = {"shard": [], "n_docs": [], "n_rows": [], "n_tokens": [], "seconds": [],
                                "n_issues": [], "skipped": []}
        for shard in batch["shard"]:
            shard = str(shard)
            if self.store.is_done("activations", shard):  # a retried or resumed shard
                meta = self.store.shard_meta("activations", shard)
                out["skipped"].append(True)
            else:
                t0 = time.perf_counter()
                docs = self.store.read_table(f"documents/{shard}.parquet")
                table, issues = self.split.extract(
                    docs["text"].to_pylist(), docs["doc_id"].to_pylist(), granularity=ex.granularity,
                    batch_size=ex.batch_size, max_tokens=ex.max_tokens, dtype=ex.activation_dtype,
                    exclude_first_tokens=ex.exclude_first_tokens)
                n_tokens = int(np.sum(table["token_end"].to_numpy() - table["token_start"].to_numpy())) \
                    if ex.granularity == "token" else int(sum(len(t) for t in docs["text"].to_pylist()))
                meta = {"n_docs": docs.num_rows, "n_tokens": n_tokens, "issues": issues,
                        "seconds": time.perf_counter() - t0}
                self.store.write_shard("activations", shard, table, meta)
                meta["n_rows"] = table.num_rows
                out["skipped"].append(False)
            out["shard"].append(shard)
            out["n_rows"].append(int(meta["n_rows"]))
            out["n_docs"].append(int(meta.get("n_docs", 0)))
            out["n_tokens"].append(int(meta.get("n_tokens", 0)))
            out["seconds"].append(float(meta.get("seconds", 0.0)))
            out["n_issues"].append(len(meta.get("issues", [])))
        return {k: np.asarray(v) for k, v in out.items()}

    # ---- attribution (map_batches) ---------------------------------------------------
    def attribute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Explain the shards named in ``batch["shard"]`` with every configured method; writes
        ``attributions/<shard>.parquet`` (and its success marker) per shard and returns one
        summary row per shard. A shard already marked done is skipped (retry or resume)."""
        from raylens.attributions.corpus import attribute_documents

        a, m = self.cfg.attribution, self.cfg.metrics
        out: dict[str, list] = {"shard": [], "n_docs": [], "n_rows": [], "n_errors": [], "seconds": [],
                                "skipped": []}
        for shard in batch["shard"]:
            shard = str(shard)
            skipped = self.store.is_done("attributions", shard)
            if skipped:
                meta = self.store.shard_meta("attributions", shard)
            else:
                t0 = time.perf_counter()
                docs = self.store.read_table(f"documents/{shard}.parquet")
                ids, texts, labels = (docs["doc_id"].to_pylist(), docs["text"].to_pylist(),
                                      docs["label"].to_pylist())
                tables, secs = [], {}
                for i in range(0, len(ids), a.docs_per_call):
                    t, s = attribute_documents(
                        self.loaded, self.explainers, ids[i:i + a.docs_per_call], texts[i:i + a.docs_per_call],
                        labels[i:i + a.docs_per_call], target_mode=a.targets, max_tokens=a.max_tokens, too_long=a.too_long,
                        metrics=m.enabled, metric_options={"n_steps": m.n_steps, "n_random": m.n_random,
                                                           "batch_size": m.batch_size, "seed": a.seed})
                    tables.append(t)
                    for k, v in s.items():
                        secs[k] = secs.get(k, 0.0) + v
                table = pa.concat_tables(tables)
                n_err = int(table["error"].is_valid().to_numpy(zero_copy_only=False).sum())
                meta = {"n_docs": len(ids), "n_rows": table.num_rows, "n_errors": n_err,
                        "method_seconds": secs, "seconds": time.perf_counter() - t0}
                self.store.write_shard("attributions", shard, table, meta)
                log.info("attributions: shard %s, %d documents, %d rows (%d errors) in %.1fs", shard, len(ids),
                         table.num_rows, n_err, meta["seconds"])
            out["shard"].append(shard)
            out["skipped"].append(skipped)
            for k in ("n_docs", "n_rows", "n_errors"):
                out[k].append(int(meta.get(k, 0)))
            out["seconds"].append(float(meta.get("seconds", 0.0)))
        return {k: np.asarray(v) for k, v in out.items()}

    # ---- interpretation & importance ------------------------------------------------
    def _concept_model(self):
        from raylens.concepts.models import load_concept_model

        cm = load_concept_model(self.store.download_dir("concept_model"))
        return cm

    def vocabulary_projection(self, k: int):
        """Top promoted/suppressed tokens of every concept (a pyarrow table)."""
        from raylens.concepts.interpret import vocabulary_projection

        cm = self._concept_model()
        return vocabulary_projection(cm.dictionary, self.loaded.model, self.loaded.tokenizer, k=k)

    def importance(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Per-document concept gradients and concept x gradient ``(n_docs, nb_concepts)``."""
        from raylens.concepts.importance import concept_gradients

        cm = self._concept_model()
        imp = self.cfg.importance
        g, cxg, target = concept_gradients(self.split, cm, texts, batch_size=imp.batch_size,
                                           max_tokens=self.cfg.extraction.max_tokens,
                                           exclude_first_tokens=self.cfg.extraction.exclude_first_tokens)
        return {"gradient": g.numpy(), "concept_x_gradient": cxg.numpy(), "target": target.numpy()}

    def ping(self) -> str:
        return type(self.loaded.model).__name__
