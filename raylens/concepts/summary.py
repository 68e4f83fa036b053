"""One summary row per concept: what the concept job writes as ``concepts/concepts.parquet``
and shows in its report, assembled from the interpretation and scoring results.

Usable in a notebook: give it the tables and arrays the four concept steps produce
(:func:`raylens.concepts.interpret.vocabulary_projection`, the importance means, the firing
frequencies, :func:`raylens.concepts.labels.label_concepts` and
:func:`raylens.concepts.scoring.score_labels` results).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pyarrow as pa

from raylens.io.schemas import CONCEPTS_SCHEMA




def _tokens_by_concept(vocabulary: pa.Table) -> dict[tuple[int, str], list[str]]:
    out: dict[tuple[int, str], list[str]] = {}
    for r in vocabulary.to_pylist():
        out.setdefault((r["concept"], r["direction"]), []).append(r["token"])
    return out


def concept_rows(nb_concepts: int, *, importance: Sequence[float], importance_x_activation: Sequence[float],
                 frequency: Sequence[float], vocabulary: pa.Table, labels: Mapping[int, Mapping],
                 scores: Sequence[Mapping] | None = None) -> list[dict]:
    """The rows of :data:`CONCEPTS_SCHEMA`, concept ``0 .. nb_concepts - 1`` in order.

    Args:
        nb_concepts: number of concepts C.
        importance: mean signed concept-to-output gradient per concept, shape ``(C,)``.
        importance_x_activation: mean concept x gradient per concept, ``(C,)``; NaN (not
            computed) becomes null.
        frequency: share of activation rows on which each concept fires, ``(C,)``, in [0, 1].
        vocabulary: vocabulary projection rows (``concept``, ``direction`` ``"promoted"`` /
            ``"suppressed"``, ``token``), in rank order per concept and direction.
        labels: concept -> label result (``label``, ``error``); concepts without one get nulls.
        scores: `raylens.concepts.scoring.score_labels` rows (``concept`` an int or its string);
            their detection and fuzzing accuracies (0.5 = chance) and ``error``; null for
            unscored concepts.

    Returns:
        ``C`` dicts with the :data:`CONCEPTS_SCHEMA` fields.

    Raises:
        IndexError: an array holds fewer than ``C`` values.
    """
    by_concept = {int(r["concept"]): r for r in (scores or [])}
    tokens = _tokens_by_concept(vocabulary)
    rows = []
    for c in range(nb_concepts):
        lab, score = labels.get(c, {}), by_concept.get(c, {})
        cxg = float(importance_x_activation[c])
        rows.append({
            "concept": c,
            "label": lab.get("label"),
            "label_error": lab.get("error"),
            "importance": float(importance[c]),
            "importance_x_activation": None if math.isnan(cxg) else cxg,
            "frequency": float(frequency[c]),
            "top_tokens": tokens.get((c, "promoted"), []),
            "bottom_tokens": tokens.get((c, "suppressed"), []),
            "detection_accuracy": score.get("detection_accuracy"),
            "fuzzing_accuracy": score.get("fuzzing_accuracy"),
            "label_score_error": score.get("error"),
        })
    return rows


def concepts_table(rows: Sequence[Mapping]) -> pa.Table:
    """:func:`concept_rows` as a table of :data:`CONCEPTS_SCHEMA` (extra keys are dropped)."""
    return pa.Table.from_pylist(list(rows), schema=CONCEPTS_SCHEMA)


def with_examples(rows: Sequence[Mapping], top_examples: pa.Table) -> list[dict]:
    """Copies of concept rows with their top activating examples, as
    :func:`raylens.viz.report.render_concept_report` takes them.

    Args:
        rows: concept rows (a ``concept`` key each), e.g. from :func:`concept_rows`.
        top_examples: `raylens.concepts.interpret.top_examples_table` rows (``concept``,
            ``doc_id``, ``activation``, ``context``, ``span_start``, ``span_end``).

    Returns:
        One dict per row with ``examples``: ``[{doc_id, activation, text, spans}]`` in table
        order, ``spans`` the example's ``[[start, end]]`` character span in ``text``.
    """
    examples: dict[int, list[dict]] = {}
    for r in top_examples.to_pylist():
        examples.setdefault(r["concept"], []).append(
            {"doc_id": r["doc_id"], "activation": r["activation"], "text": r["context"],
             "spans": [[r["span_start"], r["span_end"]]]})
    return [{**row, "examples": examples.get(row["concept"], [])} for row in rows]


def label_score_summary(scores: Sequence[Mapping]) -> dict[str, str]:
    """Report lines for the label scores: ``label detection accuracy`` and ``label fuzzing
    accuracy``, each the mean over scored concepts (0.5 = chance); empty without scores."""
    out = {}
    for task in ("detection", "fuzzing"):
        vals = [r[f"{task}_accuracy"] for r in scores if r.get(f"{task}_accuracy") is not None]
        if scores:
            out[f"label {task} accuracy"] = (f"{sum(vals) / len(vals):.2f} mean over {len(vals)} concepts "
                                             "(0.5 = chance)") if vals else "none (see label_scores.parquet)"
    return out


__all__ = ["CONCEPTS_SCHEMA", "concept_rows", "concepts_table", "label_score_summary", "with_examples"]
