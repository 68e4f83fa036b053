"""AttnLRP (Achtibat et al., ICML 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
for Transformers"): layer-wise relevance propagation as one modified backward pass.

LRP's rules can be written as "gradient x input" with modified local gradients: the relevance of
a tensor ``x`` is ``x * g_x`` where ``g`` is the modified gradient of the explained score. The
rules of the paper, as modified gradients (forward values are unchanged, bit for bit):

- linear layers (and RoPE, residual sums, the embedding): the epsilon rule, which for
  ``z = W x`` is the plain gradient (its stabiliser only matters where ``z`` is 0); relevance
  ``b * g`` reaching a bias is absorbed by it;
- element-wise non-linearities ``y = f(x)`` (SiLU, GELU, tanh): the identity rule
  ``R_x = R_y``, i.e. ``g_x = g_y * f(x) / x`` (the ratio treated as a constant);
- the softmax: the paper's rule ``R_x = x * (R_s - s * sum(R_s))`` (Proposition 3.1), which is
  the plain softmax gradient times its input;
- the products ``q k^T``, ``softmax(.) v`` and the gated MLP's ``act(gate) * up``: the uniform
  rule, half of the relevance to each factor (``g`` halved through each factor);
- normalisation (LayerNorm, RMSNorm): the identity rule through a stop-gradient on the
  variance (the normalisation becomes linear in its input).

Relevance is then conserved up to what biases and the softmax rule absorb, and the accounting is
exact (``tests/test_inside_attributions.py``): on SmolLM2 (no biases) the input relevances plus
what each softmax's Taylor rule absorbs (its bias; ``lrp_rules(..., ledger=[])`` records it) equal
the explained logit to 1e-3; the softmax bias is most of it there (10.6 of a 15.4 logit, 15.8 of
27.4: the inputs keep 31% and 42%), so the paper's rule is far from conservative on this model.
With relevance through the values only (``attention_rule="values"``, CP-LRP) SmolLM2's inputs
sum to the logit exactly; on the MiniLM classifier inputs + what its biases absorb = the logit. The rules are installed on ONE model instance for the
call (:func:`lrp_rules`): the attention through a uniquely registered attention function
(:func:`raylens.models.attention.custom_attention`), the norms, activations and gated MLPs by an
instance-level ``forward``; everything is restored on exit (also on an error), and other models in
the process are never touched.

Supported architectures: :data:`LRP_ARCHITECTURES` (Llama and BERT families); any other model
raises a ``ValueError`` naming them. Written from the paper (no code from the ``lxt`` package).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from raylens.attributions.constraints import OneOf, check_values
from raylens.attributions.inside import InsideExplainer
from raylens.models.attention import (
    attention_logits,
    custom_attention,
    kv_groups,
    repeat_kv,
)

#: model types AttnLRP supports (``config.model_type``)
LRP_ARCHITECTURES = ("llama", "bert")
#: attribute names under which the supported architectures keep their activation modules
ACTIVATION_ATTRIBUTES = ("act_fn", "intermediate_act_fn", "activation", "transform_act_fn")
#: stabiliser of the identity rule's ratio f(x) / x
EPSILON = 1e-6


class _HalfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 0.5 * grad


class _ScaledGradient(torch.autograd.Function):
    """Forward: ``y`` (computed without a graph from ``x``); backward: ``g * scale`` w.r.t. ``x``,
    centred over the last axis when ``centre`` (LayerNorm's mean subtraction)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, centre: bool) -> torch.Tensor:
        ctx.save_for_backward(scale)
        ctx.centre = centre
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (scale,) = ctx.saved_tensors
        h = grad * scale
        return (h - h.mean(-1, keepdim=True) if ctx.centre else h), None, None, None


def half_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged in the forward pass, half its gradient in the backward pass: the uniform
    rule of a product of two factors that both depend on the input."""
    return _HalfGradient.apply(x)


def identity_rule(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` in the forward pass; backward ``g_x = g_y * fn(x) / x`` (LRP's identity rule for
    an element-wise non-linearity: ``x * g_x = y * g_y``, stabilised by :data:`EPSILON`)."""
    with torch.no_grad():
        y = fn(x)
        ratio = y / torch.where(x >= 0, x + EPSILON, x - EPSILON)
    return _ScaledGradient.apply(x, y, ratio, False)


def lrp_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                  ledger: list[torch.Tensor] | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with AttnLRP's rules (transformers' attention signature, shapes as in
    :mod:`raylens.models.attention`): the uniform rule on ``q k^T`` and on ``softmax(.) v``; the
    softmax keeps its plain gradient (the paper's softmax rule). Forward value identical to eager
    attention.

    ``ledger``: when given, the backward pass appends to it, per call, the relevance the softmax
    rule absorbs (its Taylor bias): ``sum(A * g_A) - sum(x * g_x)`` over the attention weights
    ``A`` and the scores ``x`` of the unmasked entries, a 0-d float64 tensor each time."""
    key, value = repeat_kv(key, kv_groups(module)), repeat_kv(value, kv_groups(module))
    scores = attention_logits(half_gradient(query), half_gradient(key), attention_mask, scaling)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if ledger is not None and weights.requires_grad:
        def into_softmax(g: torch.Tensor) -> None:
            ledger.append((weights.detach().double() * g.double()).sum())

        def out_of_softmax(g: torch.Tensor) -> None:
            x = scores.detach().double()
            ledger.append(-torch.where(torch.isfinite(x), x * g.double(), 0.0).sum())

        weights.register_hook(into_softmax)
        scores.register_hook(out_of_softmax)
    output = torch.matmul(half_gradient(weights), half_gradient(value)).transpose(1, 2).contiguous()
    return output, weights


def values_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose relevance flows through the values only (the attention weights are
    treated as constants: CP-LRP, Ali et al., ICML 2022, "XAI for Transformers: Better
    Explanations through Conservative Propagation"): ``softmax(.) v`` is then linear in ``v`` and
    conservative. Forward value identical to eager attention."""
    key, value = repeat_kv(key, kv_groups(module)), repeat_kv(value, kv_groups(module))
    weights = torch.nn.functional.softmax(attention_logits(query, key, attention_mask, scaling), dim=-1,
                                          dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights.detach(), value).transpose(1, 2).contiguous()
    return output, weights


#: how relevance crosses the attention: AttnLRP's softmax rule, or the values only (CP-LRP)
ATTENTION_RULES = {"softmax": lrp_attention, "values": values_attention}


def _rms_norm_forward(module: torch.nn.Module) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + module.variance_epsilon).detach()  # stop-gradient on the variance
        return module.weight * h.to(dtype)
    return forward


def _layer_norm_forward(module: torch.nn.LayerNorm, capture: list[torch.Tensor] | None) -> Any:
    original = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        """LayerNorm's own value; backward ``g_x = centre(g * weight / std)`` with the standard
        deviation held constant (stop-gradient on the variance): a linear map of ``x``."""
        if capture is not None:
            capture.append(x)
        with torch.no_grad():
            value = original(module, x)
            scale = torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + module.eps)
            if module.weight is not None:
                scale = scale * module.weight
        return _ScaledGradient.apply(x, value, scale, True)
    return forward


def _activation_forward(module: torch.nn.Module) -> Any:
    original = type(module).forward
    return lambda x: identity_rule(lambda v: original(module, v), x)


def _gated_mlp_forward(mlp: torch.nn.Module) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        gated = half_gradient(mlp.act_fn(mlp.gate_proj(x))) * half_gradient(mlp.up_proj(x))
        return mlp.down_proj(gated)
    return forward


def check_lrp_support(model: Any) -> str:
    """The model's ``config.model_type`` when AttnLRP supports it.

    Raises:
        ValueError: an unsupported architecture (the message names the supported ones).
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))
    if model_type not in LRP_ARCHITECTURES:
        raise ValueError(f"AttnLRP supports the {', '.join(LRP_ARCHITECTURES)} architectures "
                         f"(config.model_type); this model is {model_type!r} ({type(model).__name__})")
    return model_type


def _rule_forwards(model: torch.nn.Module, model_type: str, capture: list[torch.Tensor]) -> dict[int, tuple]:
    """``id(module) -> (module, new forward)`` for every module whose forward AttnLRP replaces."""
    swaps: dict[int, tuple] = {}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            swaps[id(module)] = (module, _rms_norm_forward(module))
        elif isinstance(module, torch.nn.LayerNorm):
            swaps[id(module)] = (module, _layer_norm_forward(module, None))
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            swaps[id(module)] = (module, _gated_mlp_forward(module))
        for attr in ACTIVATION_ATTRIBUTES:
            act = module.__dict__.get("_modules", {}).get(attr)
            if isinstance(act, torch.nn.Module) and id(act) not in swaps:
                swaps[id(act)] = (act, _activation_forward(act))
    if model_type == "bert":  # relevance of a token: at the sum of its word, position and type embeddings
        word_emb = model.get_input_embeddings()
        for module in model.modules():
            if getattr(module, "word_embeddings", None) is word_emb and hasattr(module, "LayerNorm"):
                swaps[id(module.LayerNorm)] = (module.LayerNorm, _layer_norm_forward(module.LayerNorm, capture))
    return swaps


@contextlib.contextmanager
def lrp_rules(model: Any, attention_rule: str = "softmax",
              ledger: list[torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Install AttnLRP's rules on ``model`` (this instance only) inside the block; yields a list
    that receives the tensor whose ``x * grad`` is the token relevance when the architecture
    embeds tokens with more than the word embedding (BERT: the input of the embedding LayerNorm,
    word + position + type embeddings, ``(batch, n, d_model)``); empty for Llama (use the input
    embeddings). Forward values are unchanged. Everything is restored on exit, also on an error.
    ``ledger`` (softmax rule only): receives the relevance each softmax absorbs during backward
    passes run inside the block (see :func:`lrp_attention`); inputs + ledger = the explained score
    on a bias-free model.

    Raises:
        ValueError: an unsupported architecture (see :func:`check_lrp_support`).
    """
    model_type = check_lrp_support(model)
    if attention_rule not in ATTENTION_RULES:
        raise ValueError(f"attention_rule must be one of {sorted(ATTENTION_RULES)}, got {attention_rule!r}")
    capture: list[torch.Tensor] = []
    swaps = _rule_forwards(model, model_type, capture)
    had = {key: "forward" in module.__dict__ for key, (module, _) in swaps.items()}
    previous = {key: module.__dict__.get("forward") for key, (module, _) in swaps.items()}
    try:
        for module, forward in swaps.values():
            module.forward = forward
        attention = ATTENTION_RULES[attention_rule]
        if ledger is not None and attention is lrp_attention:
            attention = functools.partial(lrp_attention, ledger=ledger)
        with custom_attention(model, attention):
            yield capture
    finally:
        for key, (module, _) in swaps.items():
            if had[key]:
                module.forward = previous[key]
            else:
                module.__dict__.pop("forward", None)


def lrp_relevance(model: Any, score: Any, inputs_embeds: torch.Tensor, attention_rule: str = "softmax",
                  **forward_kwargs: Any) -> torch.Tensor:
    """Token relevances of one scalar explained by AttnLRP (the library form of :class:`AttnLRP`).

    Args:
        model: a supported Hugging Face model (:data:`LRP_ARCHITECTURES`).
        score: a function of the model's output returning a scalar tensor (e.g.
            ``lambda out: out.logits[0, -1, token]``).
        inputs_embeds: ``(batch, n, d_model)`` input embeddings.
        forward_kwargs: the other arguments of the forward (``attention_mask``, ...).

    Returns:
        ``(batch, n)`` float32 relevance per token; their sum is about the scalar (see the module
        docstring for what biases absorb).
    """
    with torch.enable_grad(), lrp_rules(model, attention_rule) as capture:
        x = inputs_embeds.detach().requires_grad_(True)
        value = score(model(inputs_embeds=x, **forward_kwargs))
        at = capture[0] if capture else x
        (grad,) = torch.autograd.grad(value, at)
    return (at.detach() * grad).float().sum(-1)


class AttnLRP(InsideExplainer):
    """AttnLRP (Achtibat et al., ICML 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance
    Propagation for Transformers") as an attribution method; the rules are in the module
    docstring (:func:`lrp_rules`).

    One forward per batch and one modified backward per target index; token relevance
    ``sum_d x * g`` at the input embeddings (BERT: at word + position + type embeddings), element
    score = sum over its tokens. **Signed**, in the units of the target score (explain
    ``inference_mode="logits"``, the default, for relevance in logit units; other modes start
    from the softmax / log-softmax gradient at the output).

    Conservation (measured, see the module docstring): with ``attention_rule="values"`` the
    relevances of all tokens (special tokens and a causal LM's target prefix included) sum to the
    explained logit on a bias-free model (SmolLM2: exactly, to float rounding); biases (BERT)
    absorb their share. The paper's softmax rule (``"softmax"``, default) is not conservative:
    SmolLM2 keeps 31-42% of the logit at the inputs. It ranks words better, though (deletion AUC,
    lower is better): MiniLM classifier 0.36 (``"values"`` 0.37) vs 0.66 for random rankings;
    SmolLM2 explaining log-probabilities -3.94 (``"values"`` -2.95) vs -2.84.

    Args:
        attention_rule: ``"softmax"`` (default: AttnLRP's rule through the softmax and the uniform
            rule on ``q k^T`` and ``softmax(.) v``) or ``"values"`` (CP-LRP: through the values
            only, conservative).

    Raises:
        ValueError: an unsupported architecture (at construction; the message names
            :data:`LRP_ARCHITECTURES`).
    """

    param_constraints = {"attention_rule": OneOf(tuple(ATTENTION_RULES))}

    def __init__(self, model: Any, tokenizer: Any = None, *, attention_rule: str = "softmax", **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        check_values(self.param_constraints, {"attention_rule": attention_rule})
        check_lrp_support(self.model)
        self.attention_rule = attention_rule

    def params(self) -> dict[str, Any]:
        return {"attention_rule": self.attention_rule, **super().params()}

    def batch_scores(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                     tok: torch.Tensor, which: torch.Tensor,
                     n_targets: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        token_scores = torch.zeros((n_targets, *ids.shape), device=ids.device)
        with torch.enable_grad(), lrp_rules(self.model, self.attention_rule) as capture:
            x = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            scores = self.engine.forward(mask, rows, pos, tok, inputs_embeds=x)
            at = capture[0] if capture else x
            for t in range(n_targets):
                (grad,) = torch.autograd.grad(scores[which == t].sum(), at, retain_graph=t < n_targets - 1)
                token_scores[t] = (at.detach() * grad).float().sum(-1)
        return token_scores, scores.detach(), {}


__all__ = ["ACTIVATION_ATTRIBUTES", "ATTENTION_RULES", "AttnLRP", "EPSILON", "LRP_ARCHITECTURES", "check_lrp_support", "half_gradient",
           "identity_rule", "lrp_attention", "values_attention", "lrp_relevance", "lrp_rules"]
