"""The network job's model worker: one model, its logit and tuned lenses, and causal head gating.

As a ``map_batches`` callable it turns document shards into lens shards
(`raylens.network.corpus.lens_statistics` rows, one per document, lens, layer and position);
as a plain actor it fits the tuned lens once (:meth:`NetworkModelWorker.fit_tuned_lens`) and
runs one head-gating seed per call (:meth:`NetworkModelWorker.head_gating`). A thin shell: the
math lives in ``raylens.network``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import torch

from actors.model_worker import ModelWorker
from raylens.config import NetworkJobConfig

log = logging.getLogger(__name__)

#: where the fitted tuned lens lives under the output URI, and its commit marker (written last)
TUNED_LENS_DIR = "tuned_lens"
TUNED_LENS_FILE = "tuned_lens.safetensors"
TUNED_LENS_MARKER = "tuned_lens/_success.json"
#: the folder of the per-seed head-gating tables (one shard and marker per seed)
HEAD_GATING_KIND = "head_gating"


def seed_shard(seed: int) -> str:
    """The shard name of one head-gating seed under :data:`HEAD_GATING_KIND`: ``seed-00003``."""
    return f"seed-{seed:05d}"


class NetworkModelWorker(ModelWorker):
    """The configured lenses over one model (``config``: ``NetworkJobConfig.model_dump()``).

    The lenses are built on the first shard (an actor that only fits the tuned lens or gates
    heads never loads a tuned lens).
    """

    config_class = NetworkJobConfig
    kind = "lens"

    def setup(self) -> None:
        """No lens yet (see :meth:`lenses`)."""
        self._lenses: dict | None = None

    def lenses(self) -> dict:
        """``{lens name: lens}`` for ``lens.lenses``: a `raylens.network.lens.LogitLens` and the
        `raylens.network.lens.TunedLens` saved under :data:`TUNED_LENS_DIR` (built once)."""
        from raylens.network.lens import LogitLens, TunedLens

        if self._lenses is None:
            m, tok = self.loaded.model, self.loaded.tokenizer
            built = {"logit": lambda: LogitLens(m, tok),
                     "tuned": lambda: TunedLens.load(self.store.download_dir(TUNED_LENS_DIR) / TUNED_LENS_FILE, m, tok)}
            self._lenses = {name: built[name]() for name in self.cfg.lens.lenses}
        return self._lenses

    def process_shard(self, shard: str, docs: pa.Table) -> tuple[pa.Table, dict]:
        """Every lens over one document shard; rows outside ``lens.layers`` are dropped.
        ``meta``: ``n_docs``, ``n_rows``, ``n_tokens`` (positions read per lens) and ``issues``
        (``empty`` documents, which have no rows, and ``truncated`` ones, cut to
        ``lens.max_tokens``)."""
        from raylens.network.corpus import lens_statistics

        c = self.cfg.lens
        ids, texts = docs["doc_id"].to_pylist(), docs["text"].to_pylist()
        tables = [lens_statistics(lens, texts, ids, max_tokens=c.max_tokens, batch_size=c.batch_size,
                                  lens_name=name) for name, lens in self.lenses().items()]
        table = pa.concat_tables(tables)
        if c.layers is not None:
            table = table.filter(pc.is_in(table["layer"], pa.array(c.layers, table.schema.field("layer").type)))
        issues = self.document_issues(ids, texts)
        n_tokens = sum(min(n, c.max_tokens) for n in self.token_counts(texts))
        return table, {"n_docs": len(ids), "n_rows": table.num_rows, "n_tokens": n_tokens, "issues": issues}

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text before any cut (the tokenizer's own special tokens included)."""
        return [len(ids) for ids in self.loaded.tokenizer(texts)["input_ids"]]

    def document_issues(self, ids: list[int], texts: list[str]) -> list[dict]:
        """`raylens.io.schemas.ISSUES_SCHEMA` rows of stage ``lens``: empty and cut documents."""
        issues = []
        for d, text, n in zip(ids, texts, self.token_counts(texts)):
            if not (text or "").strip():
                issues.append({"doc_id": d, "stage": "lens", "kind": "empty", "message": "empty text: no rows"})
            elif n > self.cfg.lens.max_tokens:
                issues.append({"doc_id": d, "stage": "lens", "kind": "truncated",
                               "message": f"{n} tokens cut to lens.max_tokens={self.cfg.lens.max_tokens}"})
        return issues

    def shard_counts(self, meta: dict) -> dict[str, int]:
        """``n_tokens`` of a shard."""
        return {"n_tokens": meta.get("n_tokens", 0)}

    def fit_tuned_lens(self, texts: list[str], threads: int | None = None) -> dict:
        """Fit the tuned lens on ``texts`` (`raylens.network.lens.TunedLens.fit` with
        ``lens.tuned_*``, on ``threads`` CPU threads when given), save it as
        :data:`TUNED_LENS_FILE` under :data:`TUNED_LENS_DIR`, then write :data:`TUNED_LENS_MARKER`
        (the commit). Returns the marker: ``fit_seconds``, ``n_docs``, ``steps``, ``loss_first``
        and ``loss_last`` (the fit's summed KL over layers, nats)."""
        from raylens.network.lens import TunedLens

        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        lens = TunedLens(self.loaded.model, self.loaded.tokenizer).fit(texts, **self.cfg.lens.tuned_fit_params())
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            lens.save(os.path.join(tmp, TUNED_LENS_FILE))
            self.store.remove(TUNED_LENS_DIR)  # no file of an earlier, unfinished fit stays
            self.store.upload_dir(tmp, TUNED_LENS_DIR)
        result = {"fit_seconds": seconds, "n_docs": len(texts), "steps": len(lens.history),
                  "loss_first": lens.history[0], "loss_last": lens.history[-1], "gpus": self.gpus()}
        self.store.write_json(TUNED_LENS_MARKER, result)
        log.info("tuned lens fitted on %d documents in %.1fs", len(texts), seconds)
        return result

    def head_gating(self, texts: list[str], seed: int) -> dict:
        """Causal head gating for one seed (`raylens.network.corpus.head_gating_roles` with the
        ``head_gating`` fields), written once as ``head_gating/seed-<seed>.parquet`` and its
        marker. Returns the marker's metadata (``seed``, ``n_rows``, ``seconds``, ``roles``: role ->
        heads)."""
        from raylens.network.corpus import head_gating_roles

        t0 = time.perf_counter()
        table = head_gating_roles(self.loaded.model, self.loaded.tokenizer, texts, seeds=[seed],
                                  **self.cfg.head_gating.fit_params())
        roles = {str(k): int(v) for k, v in zip(*pc.value_counts(table["role"]).flatten())}
        meta = {"seed": seed, "n_docs": len(texts), "seconds": time.perf_counter() - t0, "roles": roles,
                "gpus": self.gpus()}
        self.store.write_shard(HEAD_GATING_KIND, seed_shard(seed), table, meta)
        return {"n_rows": table.num_rows, **meta}
