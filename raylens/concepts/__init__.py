"""Concepts: concept models (dictionary learning, SAEs), interpretation, importance, metrics.

The four steps of the concept pipeline, usable in a notebook:

1. split: :class:`raylens.models.split.SplitModel` reads activations at a layer;
2. fit: :func:`build_concept_model` learns a concept space with any of
   :func:`available_methods` (SAEs, factorisations, clustering and the neurons baseline:
   the families are listed in :mod:`raylens.concepts.models`), all behind one
   :class:`ConceptModel` interface; :func:`check_params` checks a method's parameters
   without building it;
3. interpret: :func:`top_activating`, :func:`vocabulary_projection`, LLM labels
   (:mod:`raylens.concepts.labels`);
4. score: :func:`concept_gradients` (signed concept-to-output gradients),
   :func:`concept_output_gradients` (several outputs at once), and label quality with
   :func:`score_labels` (Delphi-style detection and fuzzing).

Class-wise concepts for classifiers (one concept model per predicted class, CRAFT-style):
:class:`ClasswiseConcepts` with :func:`classwise_activations`.
"""

from raylens.concepts.classwise import ClasswiseConcepts, classwise_activations
from raylens.concepts.importance import ConceptOutputGradients, concept_gradients, concept_output_gradients
from raylens.concepts.interpret import top_activating, top_examples_table, vocabulary_projection
from raylens.concepts.labeling import label_and_score
from raylens.concepts.metrics import (
    dictionary_stability,
    explained_variance,
    frechet_distance,
    match_concepts,
    reconstruction_metrics,
    sparsity_ratio,
)
from raylens.concepts.models import (
    ConceptModel,
    available_methods,
    build_concept_model,
    check_params,
    load_concept_model,
)
from raylens.concepts.scoring import SCORES_SCHEMA, parse_binary_answers, score_labels, scores_table, shuffle_labels

__all__ = [
    "SCORES_SCHEMA",
    "ClasswiseConcepts",
    "ConceptModel",
    "ConceptOutputGradients",
    "classwise_activations",
    "concept_output_gradients",
    "label_and_score",
    "parse_binary_answers",
    "score_labels",
    "scores_table",
    "shuffle_labels",
    "available_methods",
    "build_concept_model",
    "check_params",
    "concept_gradients",
    "dictionary_stability",
    "explained_variance",
    "frechet_distance",
    "load_concept_model",
    "match_concepts",
    "reconstruction_metrics",
    "sparsity_ratio",
    "top_activating",
    "top_examples_table",
    "vocabulary_projection",
]
