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
])


def write_concepts_table_and_report(store: OutputStore, cfg: ConceptJobConfig, top: pa.Table, vocab: pa.Table,
                                    grad_mean, cxg_mean, frequency, labels: dict, fit: dict, ext: dict) -> str:
    """Write ``concepts/concepts.parquet`` and ``report.html``; returns the report's path."""
    C = cfg.concepts.nb_concepts
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


__all__ = ["CONCEPTS_SCHEMA", "write_concepts_table_and_report"]
