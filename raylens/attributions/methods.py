"""The attribution methods: four perturbation methods, six gradient methods and three that look
inside the network (:class:`AttentionRollout`, :class:`GradientAttentionRollout`, :class:`AttnLRP`,
see :mod:`raylens.attributions.inside`).

Every class is built as ``Method(model, tokenizer=None, **options)`` and called as
``method(inputs, targets=None) -> list[AttributionOutput]``. The options common to all
(``granularity``, ``batch_size``, ``max_batch_tokens``, ``inference_mode``, ``replace_token_id``,
``include_special_tokens``, ``max_length``, ``max_new_tokens``, ``task``, ``seed``, ``progress``) are
those of :class:`~raylens.attributions.base.AttributionExplainer`.

**Perturbation methods** mask whole elements in token-id space (every token of a masked element is
replaced by ``replace_token_id``: the mask token, else the pad token), so their scores are per
element at every granularity.

**Gradient methods** differentiate the target score with respect to the input embeddings (the
output of the model's input embedding layer), compute token scores and **sum the token scores of
each element** at word and sentence granularity. Scores are signed gradient x input by default
(``input_x_gradient=True``: ``g . x`` summed over the embedding axis, in the units of the target
score); ``input_x_gradient=False`` gives the unsigned L2 norm of the gradient per token instead.
Unlike Interpreto (``abs().mean()`` over the embedding axis) nothing is made unsigned unless the
method is (SquareGrad, VarGrad, Sobol), and IG is the textbook one (``x - baseline``, not the
interpolated input).

Noise for SmoothGrad, SquareGrad, VarGrad and GradientSHAP is Gaussian in embedding space, scaled
per token to the embedding's norm: per-coordinate standard deviation
``noise_std * ||x_t|| / sqrt(d_model)``, so ``||noise_t|| ~= noise_std * ||x_t||``; only element
tokens are moved.

**The registry.** Every method is a class decorated with :func:`register_method`, which adds it to
:data:`METHODS` under its class name (the names a job's config lists). A method declares the
values its own parameters accept in ``param_constraints`` (those of its perturbator and
aggregator, see :mod:`raylens.attributions.constraints`); the common ones are declared by
:class:`~raylens.attributions.base.AttributionExplainer` and
:class:`~raylens.attributions.base.GradientExplainer`. :func:`check_params` checks a method's
parameters by name and value without a model. Adding a method is one registered class::

    @register_method
    class PairOcclusion(PerturbationExplainer):
        param_constraints = {"width": Int(min=1)}

        def __init__(self, model, tokenizer=None, *, width: int = 2, **kwargs):
            super().__init__(model, tokenizer, perturbator=PairMasks(width), aggregator=OcclusionAggregator(),
                             **kwargs)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from raylens.attributions.aggregators import (
    GradientAggregator,
    GradientShapAggregator,
    IntegratedGradientsAggregator,
    KernelShapAggregator,
    LimeAggregator,
    OcclusionAggregator,
    SaliencyAggregator,
    SmoothGradAggregator,
    SobolAggregator,
    SquareGradAggregator,
    VarGradAggregator,
)
from raylens.attributions.base import AttributionExplainer, GradientExplainer, PerturbationExplainer
from raylens.attributions.constraints import constraints_of
from raylens.attributions.lrp import AttnLRP
from raylens.attributions.perturbations import (
    IdentityPerturbator,
    InterpolationPerturbator,
    KernelShapPerturbator,
    LimePerturbator,
    NoisePerturbator,
    OcclusionPerturbator,
    RandomBaselinePerturbator,
    SobolPerturbator,
    check_integration,
)
from raylens.attributions.rollout import AttentionRollout, GradientAttentionRollout

# ----------------------------------------------------------------------------- the registry

#: every registered method, by name, in registration order (use :func:`register_method` to add one)
METHODS: dict[str, type[AttributionExplainer]] = {}

_BUILT_BY_METHOD = ("self", "model", "tokenizer", "perturbator", "aggregator")


def _keywords(init: Any) -> list[str]:
    """The keyword parameters a constructor takes (not the model, tokenizer or **kwargs)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in inspect.signature(init).parameters.items() if p.kind in kinds and n not in _BUILT_BY_METHOD]


def register_method(cls: type[AttributionExplainer]) -> type[AttributionExplainer]:
    """Class decorator: add an attribution method to :data:`METHODS` under its class name.

    The class must derive from :class:`~raylens.attributions.base.AttributionExplainer` and
    declare (in ``param_constraints``, its own or its bases') every keyword parameter its
    constructor takes, and nothing its constructors do not take.

    Returns:
        ``cls`` unchanged.

    Raises:
        TypeError: not an explainer class, or parameters and declarations that disagree.
        ValueError: another class is registered under the same name.
    """
    if not (isinstance(cls, type) and issubclass(cls, AttributionExplainer)):
        raise TypeError(f"register_method needs an AttributionExplainer subclass, got {cls!r}")
    name = cls.__name__
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"an attribution method named {name!r} is already registered")
    declared = constraints_of(cls)
    own = _keywords(cls.__dict__["__init__"]) if "__init__" in cls.__dict__ else []
    accepted = {n for k in cls.__mro__ if "__init__" in k.__dict__ and issubclass(k, AttributionExplainer)
                for n in _keywords(k.__dict__["__init__"])}
    undeclared = [n for n in own if n not in declared]
    unaccepted = [n for n in declared if n not in accepted]
    if undeclared or unaccepted:
        raise TypeError(f"{name}: parameters without a declared constraint {undeclared}, declared but not "
                        f"taken by the constructor {unaccepted}; see param_constraints")
    METHODS[name] = cls
    return cls


def unregister_method(name: str) -> type[AttributionExplainer]:
    """Remove a method from :data:`METHODS` (e.g. a test's toy method) and return its class.

    Raises:
        ValueError: no method of that name is registered.
    """
    method_class(name)
    return METHODS.pop(name)


def available_methods() -> list[str]:
    """The registered method names, in registration order."""
    return list(METHODS)


def method_class(name: str) -> type[AttributionExplainer]:
    """The class registered as ``name``.

    Raises:
        ValueError: no method of that name (the message lists the registered ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def check_params(method: str, params: Mapping[str, Any]) -> None:
    """Check the options of one method without a model (what a job's config gives per method,
    and the options common to every method): names the method takes, values in range.

    Args:
        method: a registered method name (:data:`METHODS`).
        params: option name -> value, e.g. ``{"n_steps": 32}``.

    Raises:
        ValueError: an unknown method (``"unknown attribution method ..."``); otherwise a message
            that starts with the parameter's name: an unknown parameter
            (``"n_stepz: unknown parameter of IntegratedGradients; known: [...]"``) or a value
            out of range (``"n_steps must be an int >= 1, got 0"``).
    """
    method_class(method).validate_params(params)


# ----------------------------------------------------------------------------- perturbation


@register_method
class Occlusion(PerturbationExplainer):
    """Occlusion (Zeiler & Fergus, 2014, "Visualizing and Understanding Convolutional Networks").

    ``score[t, e] = f_t(x) - f_t(x with element e masked)``: ``n_elements + 1`` forward rows per
    input (all target tokens of a causal LM in the same forwards). Deterministic.
    """

    _stochastic = False

    def __init__(self, model: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, perturbator=OcclusionPerturbator(), aggregator=OcclusionAggregator(), **kwargs)


@register_method
class Lime(PerturbationExplainer):
    """LIME (Ribeiro et al., 2016, "Why Should I Trust You?").

    Random masks (``k`` elements masked, ``k`` uniform in ``1..M``), weighted by the exponential
    kernel ``exp(-d^2 / kernel_width^2)`` of their distance to the input (cosine distance
    ``1 - sqrt(kept / M)``, or Hamming ``masked / M``), and a weighted ridge regression
    (``alpha``, unpenalised intercept) whose coefficients are the scores. Rows: ``n_samples`` per
    input (the first is the unperturbed input).

    Args:
        n_samples: rows per input (default 100).
        distance: ``"cosine"`` (default) or ``"hamming"``.
        kernel_width: the kernel's width (default 0.25, LIME's text default on this distance scale).
        alpha: ridge penalty (default 1.0).
    """

    param_constraints = {**constraints_of(LimePerturbator), **constraints_of(LimeAggregator)}

    def __init__(self, model: Any, tokenizer: Any = None, *, n_samples: int = 100, distance: str = "cosine",
                 kernel_width: float = 0.25, alpha: float = 1.0, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, perturbator=LimePerturbator(n_samples, distance, kernel_width),
                         aggregator=LimeAggregator(alpha), **kwargs)


@register_method
class KernelShap(PerturbationExplainer):
    """Kernel SHAP (Lundberg & Lee, 2017, "A Unified Approach to Interpreting Model Predictions").

    Shapley values of the masking game ``v(S) = f(x with the elements outside S masked)``,
    estimated by weighted least squares under the Shapley kernel with the efficiency constraint
    imposed exactly: the scores of a target sum to ``f(x) - f(all elements masked)``. With
    ``2^M - 2 <= n_samples`` (``M`` elements) all coalitions are enumerated and the values are
    exact; otherwise ``n_samples`` coalitions are drawn from the kernel in antithetic pairs. Rows:
    ``n_samples + 2`` per input (see :class:`~raylens.attributions.perturbations.KernelShapPerturbator`).

    Args:
        n_samples: coalitions per input (default 100).
    """

    param_constraints = constraints_of(KernelShapPerturbator)

    def __init__(self, model: Any, tokenizer: Any = None, *, n_samples: int = 100, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, perturbator=KernelShapPerturbator(n_samples),
                         aggregator=KernelShapAggregator(), **kwargs)


@register_method
class Sobol(PerturbationExplainer):
    """Sobol total-order indices (Fel et al., 2021, "Look at the Variance! Efficient Black-box
    Explanations with Sobol-based Sensitivity Analysis").

    Each element is kept or masked with probability 1/2 along a scrambled Sobol quasi-Monte Carlo
    design (Saltelli's ``A``, ``B``, ``A_B^i`` matrices); the score of element ``i`` is its total
    order index, Jansen's estimator ``mean((f(A) - f(A_B^i))^2) / (2 Var f)``: the share of the
    score's variance that involves the element. **Unsigned** (``>= 0``, no direction). Rows:
    ``n_samples * (n_elements + 2)`` per input.

    Args:
        n_samples: QMC points per matrix (default 32; powers of 2 balance the sequence best).
    """

    param_constraints = constraints_of(SobolPerturbator)

    def __init__(self, model: Any, tokenizer: Any = None, *, n_samples: int = 32, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, perturbator=SobolPerturbator(n_samples), aggregator=SobolAggregator(),
                         **kwargs)


# ----------------------------------------------------------------------------- gradients


@register_method
class Saliency(GradientExplainer):
    """Saliency (Simonyan et al., 2013, "Deep Inside Convolutional Networks"), as gradient x input
    by default (Shrikumar et al., 2017).

    Token score ``g . x`` (``input_x_gradient=True``, signed) or ``||g||_2`` (unsigned); element
    score = sum over its tokens. One forward+backward row per input and target.

    Faithfulness (measured, ``tests/test_attributions_models.py``): on transformer token
    embeddings the signed ``g . x`` ranks elements *worse than random* on deletion: the
    fine-tuned MiniLM sentiment classifier, 12 real reviews, deletion AUC 0.71 vs 0.66 for
    random rankings (the negated scores reach 0.55, so the sign is anti-correlated with the
    effect of masking), and the same with softmax or log-softmax scores. ``g . x`` is a
    first-order estimate of moving the embedding to zero, which masking does not do. The
    gradient norm (``input_x_gradient=False``) beats random (0.60 vs 0.66); prefer it, or
    :class:`IntegratedGradients`, to rank words with such a model. On SmolLM2 explaining
    log-probabilities both forms beat random (-3.65 signed, -3.84 norm vs -2.84); with raw logits
    the signed form did not (-2.76).

    Args:
        input_x_gradient: multiply by the input embedding (default True).
    """

    param_constraints = constraints_of(SaliencyAggregator)

    def __init__(self, model: Any, tokenizer: Any = None, *, input_x_gradient: bool = True, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, perturbator=IdentityPerturbator(),
                         aggregator=SaliencyAggregator(input_x_gradient), **kwargs)


@register_method
class IntegratedGradients(GradientExplainer):
    """Integrated Gradients (Sundararajan et al., 2017, "Axiomatic Attribution for Deep Networks"),
    textbook form.

    ``IG_t = (x_t - b_t) . integral_0^1 grad f(b + alpha (x - b))_t d alpha``, the integral by a
    quadrature of ``n_steps`` points (``integration``: ``"gauss_legendre"`` default, ``"midpoint"``
    or ``"trapezoid"`` Riemann sums). Only element tokens move along the path (special tokens and a
    causal LM's target prefix keep their embeddings), so **completeness** holds for the elements:
    the scores of a target sum to ``f(x) - f(baseline)`` up to the quadrature error. Element score
    = sum over its tokens. Rows: ``n_steps`` per input (all targets share them, see
    :class:`~raylens.attributions.base.GradientExplainer`).

    How many steps? The quadrature error depends on how smooth the score is along the path, which
    varies a lot between models and ``inference_mode``. Measured (relative error of the sum,
    Gauss-Legendre): a MiniLM-L6 classifier's logits, about 1% at 16 steps and below 0.01% at 64;
    SmolLM2-135M's **logits** swing by hundreds of units per unit of ``alpha`` along embedding
    paths and need about 2,000 steps for 1%, while its **softmax** probabilities are smooth
    (2.5% at 16 steps, 0.05% at 64). Check
    ``scores.sum(1)`` against ``f(x) - f(baseline)`` when it matters.

    Explain the score you care about: on SmolLM2, IG of the raw logits (32 steps, zero baseline)
    ranks words worse than random on deletion of the log-probability (-2.69 vs -2.84 over 6 short
    reviews), IG of the log-softmax much better (-4.06); see
    ``tests/test_attributions_models.py``.

    Decoders without a BOS token (SmolLM2) use their first token as an attention sink; moving it
    makes every path rough. Start such inputs with a special token (e.g. ``<|im_start|>``, or the
    chat template): special tokens are never elements, so they stay put.

    Args:
        n_steps: quadrature points (default 50).
        baseline: ``"zero"`` (zero embedding, default), ``"pad"`` (pad token embedding), ``"mask"``
            (``replace_token_id`` embedding: ``[MASK]`` for BERT-like models) or a token id.
        integration: the quadrature rule.
    """

    param_constraints = constraints_of(InterpolationPerturbator)
    _uses_baseline = True

    def __init__(self, model: Any, tokenizer: Any = None, *, n_steps: int = 50, baseline: str | int = "zero",
                 integration: str = "gauss_legendre", **kwargs: Any) -> None:
        super().__init__(model, tokenizer, perturbator=InterpolationPerturbator(n_steps, integration),
                         aggregator=IntegratedGradientsAggregator(), baseline=baseline, **kwargs)

    @classmethod
    def _check_together(cls, values: Mapping[str, Any]) -> None:
        check_integration(values["n_steps"], values["integration"])


class NoiseTunnel(GradientExplainer):
    """The gradients of ``n_samples`` noisy copies of the input embeddings
    (:class:`~raylens.attributions.perturbations.NoisePerturbator`), reduced over the copies by the
    subclass's ``aggregator_class``: one idea behind SmoothGrad, SquareGrad and VarGrad (Captum's
    ``NoiseTunnel``). Not a method itself.

    Args:
        n_samples: noisy copies (default 20).
        noise_std: noise scale relative to each token embedding's norm (default 0.1).
        input_x_gradient: multiply by the input embedding (default True).
    """

    #: the reduction over the noisy copies (a :class:`~raylens.attributions.aggregators.GradientAggregator`)
    aggregator_class: type[GradientAggregator]
    param_constraints = {**constraints_of(NoisePerturbator), **constraints_of(GradientAggregator)}
    _stochastic = True

    def __init__(self, model: Any, tokenizer: Any = None, *, n_samples: int = 20, noise_std: float = 0.1,
                 input_x_gradient: bool = True, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, perturbator=NoisePerturbator(n_samples, noise_std),
                         aggregator=self.aggregator_class(input_x_gradient), **kwargs)


@register_method
class SmoothGrad(NoiseTunnel):
    """SmoothGrad (Smilkov et al., 2017, "SmoothGrad: removing noise by adding noise").

    Mean gradient over ``n_samples`` noisy copies of the input embeddings, times the input:
    ``mean_k(g_k) . x`` (signed), or ``||mean_k g_k||_2`` with ``input_x_gradient=False``.
    Rows: ``n_samples`` per input and target. Like :class:`Saliency`, the signed form ranks
    elements worse than random on deletion on the real models measured (MiniLM classifier: 0.69
    vs 0.66); the norm form beats random (0.60).

    Args:
        n_samples: noisy copies (default 20).
        noise_std: noise scale relative to each token embedding's norm (default 0.1).
        input_x_gradient: multiply by the input embedding (default True).
    """

    aggregator_class = SmoothGradAggregator


@register_method
class SquareGrad(NoiseTunnel):
    """SquareGrad (Hooker et al., 2019, "A Benchmark for Interpretability Methods in Deep Neural
    Networks").

    Mean of squares over ``n_samples`` noisy copies: ``mean_k (g_k . x)^2``, or
    ``mean_k ||g_k||^2`` with ``input_x_gradient=False``. **Unsigned.**

    Args:
        n_samples: noisy copies (default 20).
        noise_std: noise scale relative to each token embedding's norm (default 0.1).
        input_x_gradient: multiply by the input embedding (default True).
    """

    aggregator_class = SquareGradAggregator


@register_method
class VarGrad(NoiseTunnel):
    """VarGrad (Hooker et al., 2019; Adebayo et al., 2018).

    Variance over ``n_samples`` noisy copies (population variance): ``var_k (g_k . x)``, or
    ``sum_d var_k g_kd`` with ``input_x_gradient=False``. **Unsigned.**

    Args:
        n_samples: noisy copies (default 20).
        noise_std: noise scale relative to each token embedding's norm (default 0.1).
        input_x_gradient: multiply by the input embedding (default True).
    """

    aggregator_class = VarGradAggregator


@register_method
class GradientShap(GradientExplainer):
    """GradientSHAP (Lundberg & Lee, 2017), the expected-gradients estimator.

    For each of ``n_samples`` rows: a random baseline ``b_k = reference + eps_k`` (Gaussian noise of
    relative scale ``noise_std`` around the ``baseline`` embedding), a random ``alpha_k ~ U(0, 1)``,
    the gradient ``g_k`` at ``b_k + alpha_k (x - b_k)``; score ``mean_k g_k . (x - b_k)`` (signed).
    In expectation the scores of a target sum to ``f(x) - E[f(b)]``. Rows: ``n_samples`` per input
    and target.

    Args:
        n_samples: random baselines (default 20).
        noise_std: baseline noise relative to each token embedding's norm (default 0.1).
        baseline: the baselines' centre, as for :class:`IntegratedGradients` (default ``"zero"``).
    """

    param_constraints = constraints_of(RandomBaselinePerturbator)
    _stochastic = True
    _uses_baseline = True

    def __init__(self, model: Any, tokenizer: Any = None, *, n_samples: int = 20, noise_std: float = 0.1,
                 baseline: str | int = "zero", **kwargs: Any) -> None:
        super().__init__(model, tokenizer, perturbator=RandomBaselinePerturbator(n_samples, noise_std),
                         aggregator=GradientShapAggregator(), baseline=baseline, **kwargs)


# ----------------------------------------------------------------------------- inside the network
# (defined in raylens.attributions.rollout and raylens.attributions.lrp, registered here after the ten)

register_method(AttentionRollout)
register_method(GradientAttentionRollout)
register_method(AttnLRP)


__all__ = [
    "METHODS", "AttentionRollout", "AttnLRP", "GradientAttentionRollout", "GradientShap", "IntegratedGradients", "KernelShap", "Lime", "NoiseTunnel", "Occlusion", "Saliency",
    "SmoothGrad", "Sobol", "SquareGrad", "VarGrad", "available_methods", "check_params", "method_class",
    "register_method", "unregister_method",
]
