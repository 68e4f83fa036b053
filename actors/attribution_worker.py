"""The attribution job's model worker: holds the configured attribution methods and, as a
``map_batches`` callable, turns document shards into attribution shards
(`raylens.attributions.corpus.attribute_documents` rows)."""

from __future__ import annotations

import pyarrow as pa

from actors.model_worker import ModelWorker
from raylens.config import AttributionJobConfig


class AttributionModelWorker(ModelWorker):
    """Every configured method over one model (``config``: ``AttributionJobConfig.model_dump()``)."""

    config_class = AttributionJobConfig
    kind = "attributions"

    def setup(self) -> None:
        """One explainer per configured method (`raylens.attributions.corpus.build_explainers`)."""
        from raylens.attributions.corpus import build_explainers

        a = self.cfg.attribution
        self.explainers = build_explainers(
            self.loaded, a.methods, params=a.params, granularity=a.granularity, batch_size=a.batch_size,
            inference_mode=a.inference_mode, max_new_tokens=a.max_new_tokens, seed=a.seed, progress=False)

    def process_shard(self, shard: str, docs: pa.Table) -> tuple[pa.Table, dict]:
        """Explain one document shard with every method, ``attribution.docs_per_call`` documents
        at a time; ``meta``: ``n_docs``, ``n_rows``, ``n_errors`` (rows with ``error`` set) and
        ``method_seconds`` (method name -> seconds)."""
        from raylens.attributions.corpus import attribute_documents

        a, m = self.cfg.attribution, self.cfg.metrics
        ids, texts, labels = docs["doc_id"].to_pylist(), docs["text"].to_pylist(), docs["label"].to_pylist()
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
        return table, {"n_docs": len(ids), "n_rows": table.num_rows, "n_errors": n_err, "method_seconds": secs}

    def shard_counts(self, meta: dict) -> dict[str, int]:
        """``n_errors`` of a shard."""
        return {"n_errors": meta.get("n_errors", 0)}
