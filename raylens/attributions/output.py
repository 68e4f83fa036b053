"""The result of an attribution method for one input: what every part of raylens.attributions
produces (methods), consumes (metrics, HTML views) and writes (the Ray attribution job)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import numpy as np

Task = Literal["sequence_classification", "causal_lm"]
Granularity = Literal["token", "word", "sentence"]


@dataclasses.dataclass
class AttributionOutput:
    """Importance of the input elements of one text for one or several targets.

    Attributes:
        text: the input text.
        task: ``"sequence_classification"`` (targets are classes) or ``"causal_lm"`` (targets
            are the output tokens being explained, in order).
        granularity: ``"token"``, ``"word"`` or ``"sentence"``.
        elements: ``n_elements`` strings, the input elements (special tokens excluded).
        element_spans: ``n_elements`` ``(char_start, char_end)`` spans of the elements in ``text``.
        element_tokens: ``n_elements`` lists of token positions (indices into ``input_ids``)
            each element covers; a coarser element covers several tokens.
        input_ids: the tokenised input ``(n_tokens,)`` (special tokens included) that the
            token positions index.
        scores: float32 array ``(n_targets, n_elements)``: signed importance of each element
            for each target (units depend on the method: logit units for gradient x input
            and perturbation methods with ``inference_mode="logits"``).
        targets: ``n_targets`` ints: class indices (classification) or output token ids
            (causal LM, in generation order).
        target_labels: ``n_targets`` readable names: class labels, or output token strings.
        method: the method's class name, e.g. ``"IntegratedGradients"``.
        params: the method's parameters (JSON-serialisable), e.g. ``{"n_steps": 50}``.
        target_scores: optional ``(n_targets,)`` float: the model's score of each target on the
            unperturbed input (same ``inference_mode`` as the method).
    """

    text: str
    task: Task
    granularity: Granularity
    elements: list[str]
    element_spans: list[tuple[int, int]]
    element_tokens: list[list[int]]
    input_ids: list[int]
    scores: np.ndarray
    targets: list[int]
    target_labels: list[str]
    method: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    target_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32)
        n_el = len(self.elements)
        if self.scores.ndim != 2 or self.scores.shape != (len(self.targets), n_el):
            raise ValueError(f"scores must be (n_targets={len(self.targets)}, n_elements={n_el}), "
                             f"got {self.scores.shape}")
        if not (len(self.element_spans) == len(self.element_tokens) == n_el):
            raise ValueError("elements, element_spans and element_tokens must have the same length")
        if len(self.target_labels) != len(self.targets):
            raise ValueError("targets and target_labels must have the same length")

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def n_elements(self) -> int:
        return len(self.elements)

    def to_arrow_row(self) -> dict[str, Any]:
        """One row for a pyarrow table with :data:`ATTRIBUTION_SCHEMA` (``pa.Table.from_pylist``).

        Lossless: :meth:`from_arrow_row` gives back an equal output (scores as float32), so
        outputs read back from Parquet can be rescored by :mod:`raylens.attributions.metrics`."""
        return {
            "text": self.text, "task": self.task, "granularity": self.granularity,
            "elements": list(self.elements), "element_spans": [list(s) for s in self.element_spans],
            "element_tokens": [list(map(int, t)) for t in self.element_tokens],
            "input_ids": list(map(int, self.input_ids)),
            "scores": self.scores.tolist(), "targets": list(map(int, self.targets)),
            "target_labels": list(self.target_labels), "method": self.method,
            "params": json.dumps(self.params, sort_keys=True, default=str),
            "target_scores": None if self.target_scores is None else np.asarray(self.target_scores, np.float32).tolist(),
        }

    @classmethod
    def from_arrow_row(cls, row: dict[str, Any]) -> "AttributionOutput":
        """The inverse of :meth:`to_arrow_row` (a dict as ``pa.Table.to_pylist`` returns it; extra
        keys, such as the attribution job's ``doc_id`` or metric columns, are ignored).

        Raises:
            KeyError: a column of :data:`ATTRIBUTION_SCHEMA` is missing.
        """
        ts = row.get("target_scores")
        return cls(
            text=row["text"], task=row["task"], granularity=row["granularity"],
            elements=list(row["elements"]), element_spans=[tuple(s) for s in row["element_spans"]],
            element_tokens=[list(t) for t in row["element_tokens"]], input_ids=list(row["input_ids"]),
            scores=np.asarray(row["scores"], dtype=np.float32).reshape(len(row["targets"]), len(row["elements"])),
            targets=list(row["targets"]), target_labels=list(row["target_labels"]), method=row["method"],
            params=json.loads(row["params"]) if row.get("params") else {},
            target_scores=None if ts is None else np.asarray(ts, dtype=np.float32),
        )

    def _repr_html_(self) -> str:  # notebooks
        from raylens.viz.attributions import attribution_html

        return attribution_html([self], standalone=False)


