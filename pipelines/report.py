"""Write the concepts table and the HTML report from the job's tables (the rows come from
`raylens.concepts.summary`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa

from raylens.concepts.summary import concept_rows, concepts_table, label_score_summary, with_examples
from raylens.config import ConceptJobConfig
from raylens.io.store import OutputStore
from raylens.viz.report import render_concept_report


def write_concepts_table_and_report(store: OutputStore, cfg: ConceptJobConfig, top: pa.Table, vocab: pa.Table,
                                    grad_mean, cxg_mean, frequency, labels: dict, fit: dict, ext: dict,
                                    scores: list[dict] | None = None) -> str:
    """Write ``concepts/concepts.parquet`` and ``report.html`` (with the job's ``issues.parquet``
    shown, when written); returns the report's path.

    ``scores``: `raylens.concepts.scoring.score_labels` rows (``concept`` an int); their
    detection and fuzzing accuracies (0.5 = chance) go into both, null for unscored concepts.
    """
    C = cfg.concepts.nb_concepts
    rows = concept_rows(C, importance=grad_mean, importance_x_activation=cxg_mean, frequency=frequency,
                        vocabulary=vocab, labels=labels, scores=scores)
    store.write_table("concepts/concepts.parquet", concepts_table(rows))
    held = next((m for m in fit["metrics"] if m["split"] == "heldout"), {})
    summary = {
        "model": cfg.model.name, "split point": str(cfg.extraction.split_point),
        "granularity": cfg.extraction.granularity, "corpus": cfg.corpus.source,
        "documents": cfg.corpus.limit, "concept model": f"{cfg.concepts.method} ({C} concepts)",
        "held-out explained variance": held.get("explained_variance"),
        "held-out mean L0": held.get("mean_l0"), "dead concepts": held.get("dead_fraction"),
        "importance": "mean concept-to-output gradient of the predicted output (signed)",
        **label_score_summary(scores or []),
        "output": cfg.output_uri,
    }
    concepts = with_examples(rows, top)
    page = dict(title=f"raylens concepts: {cfg.model.name}", summary=summary, issues=read_issues(store))
    local = store.local_path("report.html")
    if local is not None:
        render_concept_report(concepts, local, **page)
        return str(local)
    with tempfile.TemporaryDirectory() as tmp:
        p = render_concept_report(concepts, Path(tmp) / "report.html", **page)
        store.write_bytes("report.html", p.read_bytes())
    return store.path("report.html")


def read_issues(store: OutputStore) -> list[dict] | None:
    """The rows of the job's ``issues.parquet`` (`pipelines.common.write_issues`) for the HTML
    outputs; None when the job has not written it."""
    return store.read_table("issues.parquet").to_pylist() if store.exists("issues.parquet") else None


__all__ = ["read_issues", "write_concepts_table_and_report"]
