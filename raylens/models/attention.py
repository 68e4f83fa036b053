"""Per-model attention utilities on transformers 5's attention registry (``AttentionInterface``).

transformers 5 dispatches every attention call through ``config._attn_implementation``: a name
looked up in ``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the
mask it expects). The context managers here switch ONE model instance (its config and the configs
of its sub-models) to another implementation for the duration of a ``with`` block and restore the
previous one on exit, also when the block raises. Nothing process-global is replaced: a custom
function is registered under a fresh unique name that only the switched model looks up, and the
name is removed on exit, so other models in the same process (a Ray worker may hold several) keep
running their own implementation.

Why eager: with ``attn_implementation="sdpa"`` and ``output_attentions=True`` transformers 5.23
logs a warning and returns ``attentions == ()`` without an error. :func:`eager_attention` makes
``output_attentions=True`` return the weights (which keep ``requires_grad``), and
:func:`attention_weights` refuses to return an empty tuple.

Attention function signature (transformers' own)::

    fn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs)
        -> (attn_output, attn_weights)

    query:          (batch, heads, q_len, head_dim)
    key, value:     (batch, kv_heads, k_len, head_dim)   kv_heads divides heads (grouped-query)
    attention_mask: additive float mask broadcastable to (batch, heads, q_len, k_len), or None
    attn_output:    (batch, q_len, heads, head_dim)      (transposed, before the output projection)
    attn_weights:   (batch, heads, q_len, k_len)         softmax probabilities, or None
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

#: an attention function with transformers' signature (see the module docstring)
AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

_COUNTER = itertools.count()
_LOCK = threading.Lock()


def attention_implementation(model: PreTrainedModel) -> str:
    """The name of the attention implementation ``model`` runs now (``"eager"``, ``"sdpa"``, ...)."""
    return str(model.config._attn_implementation)


def _check_switchable(model: Any) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so its attention implementation cannot be switched per model"
        )


def _sub_implementations(model: PreTrainedModel) -> list[tuple[Any, str]]:
    """(config, implementation) for the model's config and every distinct sub-model config."""
    seen: dict[int, tuple[Any, str]] = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and id(module.config) not in seen:
            seen[id(module.config)] = (module.config, module.config._attn_implementation)
    return list(seen.values())


@contextlib.contextmanager
def _switched(model: PreTrainedModel, implementation: str) -> Iterator[PreTrainedModel]:
    """Set ``implementation`` on ``model`` (and sub-models); restore each config's previous one on exit."""
    _check_switchable(model)
    previous = _sub_implementations(model)
    try:
        model.set_attn_implementation(implementation)
        yield model
    finally:
        for config, name in previous:
            config._attn_implementation_internal = name


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Run ``model`` with transformers' eager attention inside the block, then restore its previous
    implementation (also when the block raises). Other model instances are not touched.

    Inside the block ``model(..., output_attentions=True).attentions`` is a tuple of one
    ``(batch, heads, q_len, k_len)`` tensor per layer that keeps ``requires_grad``.

    Example::

        with eager_attention(model):
            out = model(**enc, output_attentions=True)

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: the model's class does not dispatch through ``AttentionInterface``.
    """
    with _switched(model, "eager"):
        yield model


@contextlib.contextmanager
def custom_attention(model: PreTrainedModel, fn: AttentionFunction) -> Iterator[str]:
    """Run ``model`` with attention function ``fn`` inside the block; yields the unique name ``fn``
    is registered under. On exit (also when the block raises) the model gets its previous
    implementation back and the name is removed from the registries. ``fn`` receives the same
    additive float mask as eager attention (a causal mask for decoders, the padding mask for
    encoders). Other model instances in the process keep their implementation.

    ``fn`` has transformers' attention signature (see the module docstring); to wrap the
    standard computation call :func:`eager_attention_function` from it.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel`` or ``fn`` is not callable.
        ValueError: the model's class does not dispatch through ``AttentionInterface``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be an attention function, got {type(fn).__name__}")
    _check_switchable(model)
    with _LOCK:
        name = f"raylens_custom_{next(_COUNTER)}"
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    try:
        with _switched(model, name):
            yield name
    finally:
        with _LOCK:
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat grouped key/value heads: (batch, kv_heads, len, head_dim) ->
    (batch, kv_heads * groups, len, head_dim)."""
    if groups == 1:
        return states
    b, h, n, d = states.shape
    return states[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def kv_groups(module: torch.nn.Module) -> int:
    """Query heads per key/value head of an attention module (1 without grouped-query attention)."""
    return int(getattr(module, "num_key_value_groups", 1))


def attention_logits(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """``q k^T * scaling + mask``: ``(batch, heads, q_len, k_len)`` from ``query``
    ``(batch, heads, q_len, head_dim)`` and ``key`` with as many heads (repeat grouped heads first,
    :func:`repeat_kv`)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    return scores if attention_mask is None else scores + attention_mask


def eager_attention_function(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard (eager) attention computation with transformers' signature, for any
    architecture whose attention module has ``num_key_value_groups`` (grouped-query) or not:
    ``softmax(q k^T * scaling + mask) v``. Bit-identical to Llama's and BERT's eager functions
    in float32 (same operations in the same order). Shapes: see the module docstring.
    """
    key, value = repeat_kv(key, kv_groups(module)), repeat_kv(value, kv_groups(module))
    weights = torch.nn.functional.softmax(attention_logits(query, key, attention_mask, scaling), dim=-1,
                                          dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def attention_weights(model: PreTrainedModel, **inputs: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """Run ``model(**inputs, output_attentions=True)`` under :func:`eager_attention` and return
    ``(outputs, attentions)``: one ``(batch, heads, q_len, k_len)`` tensor per layer (keeping the
    autograd graph unless called under ``torch.no_grad``).

    Raises:
        RuntimeError: the model returned no attention weights (never an empty tuple).
    """
    with eager_attention(model):
        out = model(**inputs, output_attentions=True)
    attentions = tuple(getattr(out, "attentions", None) or ())
    if not attentions or any(a is None for a in attentions):
        raise RuntimeError(f"{type(model).__name__} returned no attention weights under eager attention")
    return out, attentions
