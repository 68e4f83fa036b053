"""Concepts: concept models (dictionary learning, SAEs), interpretation, importance, metrics.

The four steps of the concept pipeline, usable in a notebook:

1. split: :class:`raylens.models.split.SplitModel` reads activations at a layer;
2. fit: :func:`build_concept_model` (``"topk_sae"``, ``"semi_nmf"``) learns a concept space;
3. interpret: :func:`top_activating`, :func:`vocabulary_projection`, LLM labels
   (:mod:`raylens.concepts.labels`);
4. score: :func:`concept_gradients` (signed concept-to-output gradients).
"""

from raylens.concepts.importance import concept_gradients
from raylens.concepts.interpret import top_activating, top_examples_table, vocabulary_projection
from raylens.concepts.metrics import explained_variance, reconstruction_metrics
from raylens.concepts.models import ConceptModel, available_methods, build_concept_model, load_concept_model

__all__ = [
    "ConceptModel",
    "available_methods",
    "build_concept_model",
    "concept_gradients",
    "explained_variance",
    "load_concept_model",
    "reconstruction_metrics",
    "top_activating",
    "top_examples_table",
    "vocabulary_projection",
]
