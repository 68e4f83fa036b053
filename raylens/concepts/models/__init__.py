"""Concept models: dictionaries learned on transformer activations.

A *concept model* factorises activation rows ``x (n_rows, d_model)`` into codes
``z (n_rows, nb_concepts)`` and a dictionary ``D (nb_concepts, d_model)``::

    x  ~=  decode(encode(x))  =  encode(x) @ dictionary + decoder_bias

Build one by name with :func:`build_concept_model` (cheap: nothing is allocated before
``fit``), check a method's parameters without building it with :func:`check_params`, write
a fitted model with :meth:`ConceptModel.save` (``model.safetensors`` + ``config.json``, never
pickle, no device) and read it back on any device with :func:`load_concept_model`.

One family per module (each class docstring gives shapes, state, streaming, paper):

* :mod:`~raylens.concepts.models.base`: :class:`ConceptModel`, the registry, checks, save format;
  :mod:`~raylens.concepts.models.params`: declared parameters (:class:`Param`);
  :mod:`~raylens.concepts.models.streaming`: reservoir sampling, re-batching, robust statistics.
* :mod:`~raylens.concepts.models.sae` (the one training loop, :func:`sae_train_step`) and
  :mod:`~raylens.concepts.models.sae_variants`: ``"topk_sae"`` (Gao et al. 2024),
  ``"batchtopk_sae"`` (Bussmann et al. 2024), ``"jumprelu_sae"`` (Rajamanoharan et al.
  2024), ``"vanilla_sae"`` (ReLU + L1), ``"mp_sae"`` (matching pursuit), ``"archetypal_sae"``
  (RA-SAE, Fel et al. 2025), wrapping ``overcomplete.sae``; all stream.
* :mod:`~raylens.concepts.models.nmf`: ``"nmf"`` (MiniBatchNMF, shifted input, streams),
  ``"semi_nmf"``, ``"convex_nmf"``.
* :mod:`~raylens.concepts.models.linear`: ``"neurons"``, ``"pca"`` (IncrementalPCA),
  ``"kmeans"`` (MiniBatchKMeans) and ``"dictionary_learning"`` stream; ``"svd"``, ``"ica"``.
* :mod:`~raylens.concepts.models.archetypal`: ``"archetypal_analysis"``.

Methods that do not stream fit a bounded, seeded sample (``max_fit_rows``).

Adding a method is one class in its family's module (or a new module imported here)::

    @register_concept_model
    class MyConceptModel(DictionaryConceptModel):
        \"\"\"... codes (n_rows, nb_concepts) ... streaming or not ...\"\"\"

        method = "my_method"
        parameters = {"max_iter": positive_int(100, "iterations")}  # only its own

        def fit(self, activations):  # (n_rows, d_model)
            x = self._bounded(activations)
            self.set_normalization(x)
            self._set_state(D)  # (nb_concepts, d_model), normalised space
            return self

        def _encode_normalized(self, x_norm):  # (n_rows, d_model) -> (n_rows, nb_concepts)
            ...

:class:`ConceptModel` subclasses that are not :class:`DictionaryConceptModel` also implement
``_decode_normalized``, ``_normalized_dictionary``, ``_state_tensors`` and
``_load_state_tensors``. overcomplete is imported only through
:func:`raylens._compat.import_overcomplete`; this package never imports ray.
"""

from raylens.concepts.models.archetypal import ArchetypalAnalysisConceptModel, furthest_sum
from raylens.concepts.models.base import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ConceptModel,
    available_methods,
    build_concept_model,
    check_params,
    concept_model_class,
    device_available,
    load_concept_model,
    register_concept_model,
    unregister_concept_model,
)
from raylens.concepts.models.dictionary import DictionaryConceptModel, PartialFitConceptModel
from raylens.concepts.models.linear import (
    DictionaryLearningConceptModel,
    ICAConceptModel,
    KMeansConceptModel,
    NeuronsConceptModel,
    PCAConceptModel,
    SVDConceptModel,
)
from raylens.concepts.models.nmf import ConvexNMFConceptModel, NMFConceptModel, SemiNMFConceptModel
from raylens.concepts.models.params import Param, positive_int
from raylens.concepts.models.sae import TOP_K, SAEConceptModel, sae_train_step
from raylens.concepts.models.sae_variants import (
    JUMP_KERNELS,
    ArchetypalSAEConceptModel,
    BatchTopKSAEConceptModel,
    JumpReLUSAEConceptModel,
    MPSAEConceptModel,
    TopKSAEConceptModel,
    VanillaSAEConceptModel,
)
from raylens.concepts.models.streaming import Reservoir, reservoir_sample

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "JUMP_KERNELS",
    "TOP_K",
    "WEIGHTS_FILE",
    "ArchetypalAnalysisConceptModel",
    "ArchetypalSAEConceptModel",
    "BatchTopKSAEConceptModel",
    "ConceptModel",
    "ConvexNMFConceptModel",
    "DictionaryConceptModel",
    "DictionaryLearningConceptModel",
    "ICAConceptModel",
    "JumpReLUSAEConceptModel",
    "KMeansConceptModel",
    "MPSAEConceptModel",
    "NMFConceptModel",
    "NeuronsConceptModel",
    "PCAConceptModel",
    "Param",
    "PartialFitConceptModel",
    "Reservoir",
    "SAEConceptModel",
    "SVDConceptModel",
    "SemiNMFConceptModel",
    "TopKSAEConceptModel",
    "VanillaSAEConceptModel",
    "available_methods",
    "build_concept_model",
    "check_params",
    "concept_model_class",
    "device_available",
    "furthest_sum",
    "load_concept_model",
    "positive_int",
    "register_concept_model",
    "reservoir_sample",
    "sae_train_step",
    "unregister_concept_model",
]
