"""Assemble the concepts table and the HTML report from the job's tables."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pyarrow as pa

from raylens.config import ConceptJobConfig
from raylens.io.store import OutputStore
from raylens.viz.report import render_concept_report

CONCEPTS_SCHEMA = pa.schema([
    pa.field("concept", pa.int32()),
    pa.field("label", pa.string()),
    pa.field("label_error", pa.string()),
    pa.field("importance", pa.float32()),
    pa.field("importance_x_activation", pa.float32()),
    pa.field("frequency", pa.float32()),
    pa.field("top_tokens", pa.list_(pa.string())),
    pa.field("bottom_tokens", pa.list_(pa.string())),
    pa.field("detection_accuracy", pa.float32()),
    pa.field("fuzzing_accuracy", pa.float32()),
    pa.field("label_score_error", pa.string()),
])


def write_concepts_table_and_report(store: OutputStore, cfg: ConceptJobConfig, top: pa.Table, vocab: pa.Table,
                                    grad_mean, cxg_mean, frequency, labels: dict, fit: dict, ext: dict,
                                    scores: list[dict] | None = None) -> str:
    """Write ``concepts/concepts.parquet`` and ``report.html``; returns the report's path.

    ``scores``: `raylens.concepts.scoring.score_labels` rows (``concept`` an int); their
    detection and fuzzing accuracies (0.5 = chance) go into both, null for unscored concepts.
    """
    C = cfg.concepts.nb_concepts
    by_concept = {int(r["concept"]): r for r in (scores or [])}
    voc = vocab.to_pylist()
    ex = top.to_pylist()
    concepts = []
    for c in range(C):
        lab = labels.get(c, {})
        concepts.append({
            "concept": c,
            "label": lab.get("label"),
            "label_error": lab.get("error"),
            "importance": float(grad_mean[c]),
            "importance_x_activation": None if math.isnan(float(cxg_mean[c])) else float(cxg_mean[c]),
            "frequency": float(frequency[c]),
            "top_tokens": [r["token"] for r in voc if r["concept"] == c and r["direction"] == "promoted"],
            "bottom_tokens": [r["token"] for r in voc if r["concept"] == c and r["direction"] == "suppressed"],
            "detection_accuracy": by_concept.get(c, {}).get("detection_accuracy"),
            "fuzzing_accuracy": by_concept.get(c, {}).get("fuzzing_accuracy"),
            "label_score_error": by_concept.get(c, {}).get("error"),
        })
    store.write_table("concepts/concepts.parquet", pa.Table.from_pylist(concepts, schema=CONCEPTS_SCHEMA))
    for c in concepts:
        c["examples"] = [{"doc_id": r["doc_id"], "activation": r["activation"], "text": r["context"],
                          "spans": [[r["span_start"], r["span_end"]]]} for r in ex if r["concept"] == c["concept"]]
    held = next((m for m in fit["metrics"] if m["split"] == "heldout"), {})
    summary = {
        "model": cfg.model.name, "split point": str(cfg.extraction.split_point),
        "granularity": cfg.extraction.granularity, "corpus": cfg.corpus.source,
        "documents": cfg.corpus.limit, "concept model": f"{cfg.concepts.method} ({C} concepts)",
        "held-out explained variance": held.get("explained_variance"),
        "held-out mean L0": held.get("mean_l0"), "dead concepts": held.get("dead_fraction"),
        "importance": "mean concept-to-output gradient of the predicted output (signed)",
        **_score_summary(scores or []),
        "output": cfg.output_uri,
    }
    local = store.local_path("report.html")
    if local is not None:
        render_concept_report(concepts, local, title=f"raylens concepts: {cfg.model.name}", summary=summary)
        return str(local)
    with tempfile.TemporaryDirectory() as tmp:
        p = render_concept_report(concepts, Path(tmp) / "report.html", summary=summary)
        store.write_bytes("report.html", p.read_bytes())
    return store.path("report.html")


def _score_summary(scores: list[dict]) -> dict:
    out = {}
    for task in ("detection", "fuzzing"):
        vals = [r[f"{task}_accuracy"] for r in scores if r.get(f"{task}_accuracy") is not None]
        if scores:
            out[f"label {task} accuracy"] = (f"{sum(vals) / len(vals):.2f} mean over {len(vals)} concepts "
                                             "(0.5 = chance)") if vals else "none (see label_scores.parquet)"
    return out


__all__ = ["CONCEPTS_SCHEMA", "write_concepts_table_and_report"]
