"""The concept job's model worker: splits the model at the configured layer and

* as a ``map_batches`` callable, turns document shards into activation shards;
* as a plain actor, projects concept directions on the vocabulary and computes
  concept-to-output gradients.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actors.model_worker import ModelWorker
from raylens.config import ConceptJobConfig
from raylens.models.loading import LoadedModel, model_task
from raylens.models.split import SplitModel, load_split_model


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
        """The model split at the configured layer (`raylens.models.split.SplitModel`)."""
        if self.split is None:
            self.split = SplitModel(self.loaded, self.cfg.extraction.split_point)

    # ---- extraction (map_batches) ---------------------------------------------------
    def process_shard(self, shard: str, docs: pa.Table) -> tuple[pa.Table, dict]:
        """Activations of one document shard (``raylens.io.schemas.activations_schema`` rows);
        ``meta``: ``n_docs``, ``n_tokens`` (tokens, or characters at coarser granularities) and
        the extraction ``issues``."""
        ex = self.cfg.extraction
        texts = docs["text"].to_pylist()
        table, issues = self.split.extract(
            texts, docs["doc_id"].to_pylist(), granularity=ex.granularity,
            batch_size=ex.batch_size, max_tokens=ex.max_tokens, dtype=ex.activation_dtype,
            exclude_first_tokens=ex.exclude_first_tokens)
        n_tokens = int(np.sum(table["token_end"].to_numpy() - table["token_start"].to_numpy())) \
            if ex.granularity == "token" else int(sum(len(t) for t in texts))
        return table, {"n_docs": docs.num_rows, "n_tokens": n_tokens, "issues": issues}

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
