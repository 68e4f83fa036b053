"""Attributions: which input elements drive a prediction or a generated token.

Interpreto's three steps, in a notebook or inside a Ray actor (no Ray import here)::

    from raylens.models import load_model
    from raylens.attributions import IntegratedGradients

    lm = load_model("smollm2-135m")
    explainer = IntegratedGradients(lm, granularity="word", n_steps=50)   # 1. build
    outputs = explainer("The capital of France is", targets=" Paris")      # 2. call
    outputs[0].scores                                                      # 3. look: (n_targets, n_elements)

A method is a perturbator (:mod:`~raylens.attributions.perturbations`) plus an aggregator
(:mod:`~raylens.attributions.aggregators`) in one of the explainer kinds of
:mod:`~raylens.attributions.base`; the batched inference between them runs in
:mod:`~raylens.attributions.engine` on inputs prepared by :mod:`~raylens.attributions.inputs`.
Results follow :class:`~raylens.attributions.output.AttributionOutput`. The methods a job can name
are registered in :data:`METHODS` (:mod:`~raylens.attributions.methods`); :func:`check_params`
checks a method's parameters without a model.

A new method is those two parts, e.g. "mask one element and its right neighbour" (add
``@register_method`` above the class, and declare its own parameters in ``param_constraints``, to
make it available by name to :func:`~raylens.attributions.corpus.build_explainers` and the jobs)::

    import numpy as np
    from raylens.attributions import PerturbationExplainer
    from raylens.attributions.perturbations import MaskPerturbator
    from raylens.attributions.aggregators import MaskAggregator

    class PairMasks(MaskPerturbator):
        first_row_is_clean = True                       # row 0: the unperturbed input
        def masks(self, n_elements, rng):               # (n_rows, n_elements) keep-mask, info
            keep = np.ones((n_elements + 1, n_elements), dtype=bool)
            for e in range(n_elements):
                keep[1 + e, e: e + 2] = False
            return keep, {}

    class Drop(MaskAggregator):
        def aggregate(self, keep, scores, info):        # scores: (n_rows, n_targets)
            return (scores[0][None] - scores[1:]).T     # (n_targets, n_elements)

    class PairOcclusion(PerturbationExplainer):
        def __init__(self, model, tokenizer=None, **kwargs):
            super().__init__(model, tokenizer, perturbator=PairMasks(), aggregator=Drop(), **kwargs)

Faithfulness of any output: :class:`Deletion`, :class:`Insertion`, :class:`AOPCComprehensiveness`,
:class:`AOPCSufficiency` or all four with :func:`faithfulness` (each beside a random-ranking
baseline; see :mod:`~raylens.attributions.metrics` for directions)::

    from raylens.attributions import faithfulness
    faithfulness(lm, outputs)["deletion_auc"]        # lower is better; compare "deletion_auc_random"

Gradient methods pair an :class:`~raylens.attributions.perturbations.EmbeddingPerturbator`
(``rows(ctx, rows) -> (embeddings, per-row info)``) with a streaming
:class:`~raylens.attributions.aggregators.GradientAggregator` (``terms`` summed over rows, then
``finalize``) in a :class:`GradientExplainer`.

Three methods look inside the network on the unperturbed input (:mod:`~raylens.attributions.inside`):
:class:`AttentionRollout` (Abnar & Zuidema 2020), :class:`GradientAttentionRollout` (Chefer et al.
2021) and :class:`AttnLRP` (Achtibat et al. 2024), through per-model attention functions
(:mod:`raylens.models.attention`) restored after each call.
"""

from raylens.attributions.base import AttributionExplainer, GradientExplainer, PerturbationExplainer
from raylens.attributions.elements import GRANULARITIES, Element, split_elements
from raylens.attributions.methods import (
    METHODS,
    AttentionRollout,
    AttnLRP,
    GradientAttentionRollout,
    GradientShap,
    IntegratedGradients,
    KernelShap,
    Lime,
    Occlusion,
    Saliency,
    SmoothGrad,
    Sobol,
    SquareGrad,
    VarGrad,
    available_methods,
    check_params,
    register_method,
    unregister_method,
)
from raylens.attributions.metrics import (
    AOPCComprehensiveness,
    AOPCSufficiency,
    Deletion,
    Insertion,
    faithfulness,
)
from raylens.attributions.output import AttributionOutput
from raylens.io.schemas import ATTRIBUTION_SCHEMA

__all__ = [
    "AOPCComprehensiveness",
    "AOPCSufficiency",
    "ATTRIBUTION_SCHEMA",
    "Deletion",
    "Insertion",
    "faithfulness",
    "GRANULARITIES",
    "METHODS",
    "AttributionExplainer",
    "AttentionRollout",
    "AttnLRP",
    "AttributionOutput",
    "Element",
    "GradientAttentionRollout",
    "GradientExplainer",
    "GradientShap",
    "IntegratedGradients",
    "KernelShap",
    "Lime",
    "Occlusion",
    "PerturbationExplainer",
    "Saliency",
    "SmoothGrad",
    "Sobol",
    "SquareGrad",
    "VarGrad",
    "available_methods",
    "check_params",
    "register_method",
    "split_elements",
    "unregister_method",
]
