"""The concept job's model worker: splits the model at the configured layer and

* as a ``map_batches`` callable, turns document shards into activation shards;
* as a plain actor, projects concept directions on the vocabulary and computes
  concept-to-output gradients.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.model_worker import ModelWorker
from raylens.config import ConceptJobConfig
from raylens.io.memory import mmap_large_allocations
from raylens.io.activation_writer import ActivationShardWriter
from raylens.io.schemas import activation_parquet_options, activations_schema
from raylens.models.batching import take_oom_events
from raylens.models.loading import LoadedModel, model_task
from raylens.models.split import RowSampling, SplitModel, load_split_model, window_rows, write_slice_rows


class ConceptModelWorker(ModelWorker):
    """Extraction, vocabulary projection and importance with one model split at
    ``extraction.split_point``; built from ``ConceptJobConfig.model_dump()``."""

    config_class = ConceptJobConfig
    kind = "activations"

    def __init__(self, config: dict, *, extraction_only: bool = False):
        self.extraction_only = extraction_only
        super().__init__(config)

    def load(self) -> LoadedModel:
        """With ``extraction_only``, only the embeddings and the blocks up to the split point
        (`raylens.models.split.load_split_model`), except where the model's output is needed too
        (a classifier's predicted class at granularity ``cls``); else the whole model."""
        ex, m = self.cfg.extraction, self.cfg.model
        needs_output = ex.granularity == "cls" and model_task(m.name, m.task)[1] == "sequence_classification"
        if not self.extraction_only or needs_output:
            self.split = None
            return super().load()
        self.split = load_split_model(m.name, ex.split_point, task=m.task, dtype=m.dtype, device=self.device,
                                      device_map=self.device_map, trust_remote_code=m.trust_remote_code)
        return self.split.loaded

    def setup(self) -> None:
        """The model split at the configured layer (`raylens.models.split.SplitModel`); large
        host allocations served by ``mmap`` (`raylens.io.memory.mmap_large_allocations`), so
        the resident memory of extraction follows its byte budget."""
        mmap_large_allocations()
        if self.split is None:
            self.split = SplitModel(self.loaded, self.cfg.extraction.split_point)

    # ---- extraction (map_batches) ---------------------------------------------------
    def produce_shard(self, shard: str, docs: pa.Table, started: float) -> dict:
        """Stream the activations of one document shard to ``activations/<shard>.parquet`` (rows
        of held-out documents, `raylens.io.readers.heldout_mask`, to
        ``activations_heldout/<shard>.parquet``), computed in windows that fit ``extraction.max_host_bytes``
        (see :func:`window_rows`), each written while the next is computed
        (`raylens.io.activation_writer.ActivationShardWriter`), in row groups of at most
        ``extraction.row_group_bytes``, parts past ``extraction.max_file_bytes``; then the one marker
        ``activations/_success/<shard>.json`` (the commit). Marker: ``n_rows`` (train rows),
        ``n_heldout_rows``, ``files``, ``n_docs``, ``n_tokens`` (tokens, or characters at coarser
        granularities), the extraction ``issues``, ``sampling``, ``seconds``,
        ``write_seconds`` (time spent splitting and writing, in the writer's thread) and
        ``write_wait_seconds`` (time the extraction waited for it)."""
        ex, held = self.cfg.extraction, self.cfg.concepts.heldout_fraction
        d_model = self.split.d_model
        schema = activations_schema(d_model, ex.activation_dtype)
        opts = {"max_file_bytes": ex.max_file_bytes, "row_group_bytes": ex.row_group_bytes,
                "parquet_options": activation_parquet_options(schema)}
        sampling = self.sampling()
        step = write_slice_rows(ex.max_host_bytes, ex.row_group_bytes, d_model, ex.activation_dtype)
        writer = ActivationShardWriter(self.store, shard, schema, heldout_fraction=held, slice_rows=step, **opts)
        texts = docs["text"].to_pylist()
        issues, n_tokens = [], 0
        try:
            for table, found in self.split.iter_extract(
                    texts, docs["doc_id"].to_pylist(), granularity=ex.granularity, batch_size=ex.batch_size,
                    max_tokens=ex.max_tokens, dtype=ex.activation_dtype, exclude_first_tokens=ex.exclude_first_tokens,
                    window_rows=window_rows(ex.max_host_bytes, d_model, ex.activation_dtype), sampling=sampling):
                issues += found
                n_tokens += int(pc.sum(pc.subtract(table["token_end"], table["token_start"])).as_py() or 0)
                writer.write(table)  # written while the next window is computed
                del table
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        if ex.granularity != "token":
            n_tokens = int(sum(len(t) for t in texts if isinstance(t, str)))
        meta = {"n_rows": writer.n_rows, "n_heldout_rows": writer.n_heldout_rows,
                "n_docs": docs.num_rows, "n_tokens": n_tokens, "issues": issues,
                "sampling": dataclasses.asdict(sampling) if sampling else None, "write_seconds": writer.write_seconds,
                "write_wait_seconds": writer.wait_seconds,
                "seconds": time.perf_counter() - started, "oom_splits": take_oom_events(), **self.shard_meta()}
        self.store.commit_shard(self.kind, shard, files, meta)
        return meta

    def sampling(self) -> RowSampling | None:
        """The configured token sampling (`raylens.models.split.RowSampling`, seeded by the job's
        ``seed``), or ``None`` when every row is kept."""
        ex = self.cfg.extraction
        if ex.max_rows_per_document is None and ex.row_sampling_rate >= 1.0:
            return None
        return RowSampling(ex.max_rows_per_document, ex.row_sampling_rate, self.cfg.seed)

    def shard_counts(self, meta: dict) -> dict[str, int]:
        """``n_tokens`` and ``n_issues`` of a shard."""
        return {"n_tokens": meta.get("n_tokens", 0), "n_issues": len(meta.get("issues", []))}

    # ---- interpretation & importance ------------------------------------------------
    def _concept_model(self):
        from raylens.concepts.models import load_concept_model

        return load_concept_model(self.store.download_dir("concept_model"), device=str(self.loaded.device))

    def vocabulary_projection(self, k: int) -> pa.Table:
        """Top ``k`` promoted/suppressed tokens of every concept
        (`raylens.concepts.interpret.vocabulary_projection`)."""
        from raylens.concepts.interpret import vocabulary_projection

        cm = self._concept_model()
        return vocabulary_projection(cm.dictionary, self.loaded.model, self.loaded.tokenizer, k=k)

    def importance(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Per-document concept gradients and concept x gradient ``(n_docs, nb_concepts)``, and
        each document's ``target`` ``(n_docs,)`` (`raylens.concepts.importance.concept_gradients`)."""
        from raylens.concepts.importance import concept_gradients

        cm = self._concept_model()
        imp = self.cfg.importance
        g, cxg, target = concept_gradients(self.split, cm, texts, batch_size=imp.batch_size,
                                           max_tokens=self.cfg.extraction.max_tokens,
                                           exclude_first_tokens=self.cfg.extraction.exclude_first_tokens)
        return {"gradient": g.numpy(), "concept_x_gradient": cxg.numpy(), "target": target.numpy()}
