"""Attributions: which input elements drive a prediction or a generated token.

Interpreto's three steps, in a notebook or inside a Ray actor (no Ray import here)::

    from raylens.models import load_model
    from raylens.attributions import IntegratedGradients

    lm = load_model("smollm2-135m")
    explainer = IntegratedGradients(lm, granularity="word", n_steps=50)   # 1. build
    outputs = explainer("The capital of France is", targets=" Paris")      # 2. call
    outputs[0].scores                                                      # 3. look: (n_targets, n_elements)

A method is a perturbator (:mod:`~raylens.attributions.perturbations`) plus an aggregator
(:mod:`~raylens.attributions.aggregators`); :mod:`~raylens.attributions.base` runs the batched
inference between them. Results follow :class:`~raylens.attributions.output.AttributionOutput`.
"""

from raylens.attributions.base import AttributionExplainer, GradientExplainer, PerturbationExplainer
from raylens.attributions.elements import GRANULARITIES, Element, split_elements
from raylens.attributions.methods import (
    METHODS,
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
)
from raylens.attributions.output import ATTRIBUTION_SCHEMA, AttributionOutput

__all__ = [
    "ATTRIBUTION_SCHEMA",
    "GRANULARITIES",
    "METHODS",
    "AttributionExplainer",
    "AttributionOutput",
    "Element",
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
    "split_elements",
]
