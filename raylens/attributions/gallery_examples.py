"""Which explained rows a corpus gallery shows: per method, the best and worst rows by
faithfulness and a seeded random sample (the attribution job's gallery; usable in a notebook
on `raylens.attributions.corpus.attribute_documents` tables)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

from raylens.attributions.output import AttributionOutput

_INDEX_COLUMNS = ["doc_id", "method", "target_index", "error", "deletion_auc", "deletion_auc_random"]


def _pick(rows: list[dict], k: int, rng: np.random.Generator) -> dict[str, list[dict]]:
    """``best`` / ``worst`` by deletion AUC minus its random baseline, then ``random`` among the rest."""
    keyed = [r for r in rows if r["deletion_auc"] is not None and r["deletion_auc_random"] is not None
             and np.isfinite(r["deletion_auc"] - r["deletion_auc_random"])]
    keyed.sort(key=lambda r: (r["deletion_auc"] - r["deletion_auc_random"], r["doc_id"]))
    best, worst = keyed[:k], keyed[::-1][:k]
    taken = {(r["doc_id"], r["target_index"]) for r in best + worst}
    rest = [r for r in rows if (r["doc_id"], r["target_index"]) not in taken]
    rand = [rest[i] for i in sorted(rng.choice(len(rest), size=min(k, len(rest)), replace=False))] if rest else []
    return {"best": best, "worst": worst, "random": rand}


def select_examples(tables: Sequence[pa.Table], methods: Iterable[str], *, per_kind: int = 3,
                    seed: int = 0) -> dict[str, dict[str, list[tuple[AttributionOutput, dict]]]]:
    """Per method: the ``best`` and ``worst`` explained rows (by deletion AUC minus its random
    baseline; lower is better; ties by ``doc_id``) and a seeded ``random`` sample of the other
    explained rows (``error`` null).

    Args:
        tables: attribution rows (`raylens.attributions.corpus.ROW_SCHEMA`), read twice (an
            index pass, then the chosen rows).
        methods: the methods to pick for, in the order wanted.
        per_kind: rows per kind (at most).
        seed: seeds the random sample (one generator, methods in order).

    Returns:
        ``{method: {"best" | "worst" | "random": [(AttributionOutput, row dict)]}}``; rows
        without deletion metrics are only sampled at random.
    """
    index = pa.concat_tables([t.select(_INDEX_COLUMNS) for t in tables]).to_pylist() if tables else []
    chosen: dict[str, dict[str, list[tuple[int, str, int]]]] = {}
    rng = np.random.default_rng(seed)
    for method in methods:
        rows = [r for r in index if r["method"] == method and r["error"] is None]
        chosen[method] = {kind: [(r["doc_id"], method, r["target_index"]) for r in sel]
                          for kind, sel in _pick(rows, per_kind, rng).items()}
    wanted = {key for kinds in chosen.values() for sel in kinds.values() for key in sel}
    found: dict[tuple, tuple] = {}
    for t in tables:
        for r in t.to_pylist():
            key = (r["doc_id"], r["method"], r["target_index"])
            if key in wanted and r["error"] is None:
                found[key] = (AttributionOutput.from_arrow_row(r), r)
    return {m: {kind: [found[key] for key in sel if key in found] for kind, sel in kinds.items()}
            for m, kinds in chosen.items()}


__all__ = ["select_examples"]
