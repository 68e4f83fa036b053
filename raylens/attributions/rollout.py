"""Attention rollout (Abnar & Zuidema, ACL 2020) and gradient-weighted attention rollout (Chefer,
Gur & Wolf, ICCV 2021): input scores from how attention mixes tokens across the layers.

Both read the attention probabilities of every layer through a recording attention function
registered for the explained model only (:func:`raylens.models.attention.custom_attention`: the
same operations as eager attention, so the weights are the model's own, never sdpa's silent
empty tuple), restored after the call. In a notebook::

    from raylens.attributions import AttentionRollout, GradientAttentionRollout
    AttentionRollout(lm, granularity="word")("The capital of France is", targets=" Paris")

Library functions: :func:`attention_rollout` and :func:`gradient_rollout` on attention tensors,
:func:`record_attention` and :func:`attention_gradients` to get them from a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from raylens.attributions.constraints import Bool, OneOf, check_values
from raylens.attributions.inside import InsideExplainer, explained_positions
from raylens.models.attention import custom_attention, eager_attention_function

HEAD_FUSIONS = ("mean", "max")


class AttentionRecorder:
    """An attention function (transformers' signature) that computes eager attention and keeps
    each call's probabilities, ``(batch, heads, q_len, k_len)``, in :attr:`weights` (layer order).
    The kept tensors are the ones multiplied with the values, so gradients with respect to them
    are the gradients with respect to the attention weights."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out, w = eager_attention_function(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        self.weights.append(w)
        return out, w


@contextlib.contextmanager
def record_attention(model: Any) -> Iterator[AttentionRecorder]:
    """Inside the block, ``model`` records every layer's attention probabilities in the yielded
    recorder's ``weights`` (``(batch, heads, q_len, k_len)`` each, layer order); the model's own
    attention implementation comes back on exit (also on an error). Other models are untouched.

    Raises:
        TypeError, ValueError: as :func:`raylens.models.attention.custom_attention`.
    """
    rec = AttentionRecorder()
    with custom_attention(model, rec):
        yield rec


def _identity_like(a: torch.Tensor) -> torch.Tensor:
    n = a.shape[-1]
    return torch.eye(n, dtype=a.dtype, device=a.device).expand(a.shape[0], n, n)


def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean",
                      exclude_first: bool = False) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

    Per layer ``A_l = 0.5 * fuse_heads(attention_l) + 0.5 * I``, rows renormalised to sum to 1;
    ``R = A_L @ ... @ A_1``. Row ``i`` of ``R`` is how much each input position flows into
    position ``i``'s last representation; every row sums to 1.

    Args:
        attentions: one ``(batch, heads, n, n)`` probability tensor per layer (layer order).
        head_fusion: ``"mean"`` (the paper's) or ``"max"`` over heads.
        exclude_first: leave out the first position (a decoder's attention sink): its column is
            removed from every layer's fused attention before the identity is added and rows are
            renormalised, so no position other than the first receives anything from it (the
            first position's own row keeps only its identity).

    Returns:
        ``(batch, n, n)`` float32 rollout matrix.

    Raises:
        ValueError: no attention tensors or an unknown ``head_fusion``.
    """
    if not attentions:
        raise ValueError("no attention weights to roll out")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    rollout = None
    for att in attentions:
        a = att.detach().float()
        a = a.mean(1) if head_fusion == "mean" else a.amax(1)
        if exclude_first:
            a = a.clone()
            a[:, :, 0] = 0
        eye = _identity_like(a)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def gradient_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, 2021, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", eq. 5-6).

    Per layer ``A_bar_l = mean_heads((grad_l * attention_l)^+)`` (``^+``: negative parts set to 0),
    then ``R <- R + A_bar_l @ R`` from ``R = I``, first layer to last.

    Args:
        attentions: one ``(batch, heads, n, n)`` probability tensor per layer.
        gradients: the gradient of the explained score with respect to each, same shapes.

    Returns:
        ``(batch, n, n)`` float32 relevance matrix (row ``i``: input positions' relevance for
        position ``i``'s output; the diagonal starts at 1).

    Raises:
        ValueError: different numbers of attention and gradient tensors, or none.
    """
    if not attentions or len(attentions) != len(gradients):
        raise ValueError(f"need one gradient per attention tensor, got {len(attentions)} and {len(gradients)}")
    rel = None
    for att, grad in zip(attentions, gradients):
        a_bar = (grad.detach().float() * att.detach().float()).clamp_min(0).mean(1)
        rel = _identity_like(a_bar) if rel is None else rel
        rel = rel + a_bar @ rel
    return rel


def attention_gradients(model: Any, score: Callable[[], torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``score()`` (a closure that calls ``model`` and returns a scalar tensor) while recording
    the attention probabilities; return ``(attentions, gradients)``: one ``(batch, heads, n, n)``
    tensor per layer each, the gradients of the scalar with respect to the probabilities.

    Raises:
        TypeError, ValueError: as :func:`record_attention`.
    """
    with torch.enable_grad(), record_attention(model) as rec:
        value = score()  # (parameters may be frozen: the closure's inputs must carry the graph)
        grads = torch.autograd.grad(value, rec.weights, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(rec.weights, grads)]
    return [w.detach() for w in rec.weights], list(grads)


class AttentionRollout(InsideExplainer):
    """Attention rollout (Abnar & Zuidema, ACL 2020, "Quantifying Attention Flow in Transformers")
    as an attribution method.

    One forward per batch with the attention probabilities recorded (:func:`attention_rollout`);
    the explained position's row of the rollout matrix gives the token scores (a causal LM's
    target token: the position that predicts it; an encoder classifier: ``[CLS]``; see
    :mod:`raylens.attributions.inside`); element score = sum over its tokens. Scores are
    **unsigned** shares (``>= 0``) and do not depend on the target class or token, only on its
    position: rollout ignores the output head.

    The attention sink: decoders without a BOS token (SmolLM2) pile most attention on their first
    position, and rollout inherits it. Every output records, per target, ``first_position_share``
    in ``params``: the full rollout's share of the first position (reported whatever
    ``exclude_first`` says). ``exclude_first=True`` rolls out without the first position's column
    (:func:`attention_rollout`) and gives the first position a score of 0, so the remaining
    positions can be compared (a decoder's scores then sum to 1 over them; an encoder's explained
    ``[CLS]`` is the first position, so leaving it out only removes its own share).

    Faithfulness (measured, deletion AUC, ``tests/test_attributions_models.py``; lower is better):
    on the MiniLM classifier it beats random rankings (0.59 vs 0.66 over 12 reviews), on SmolLM2
    it does not (-1.57 vs -2.84 random, log-probability of 2 generated tokens over 6 reviews;
    -1.66 with ``exclude_first``, -1.46 with max fusion): rollout ignores the output head, and in
    a decoder the earliest positions collect the rollout of every later one. Prefer
    :class:`GradientAttentionRollout` (-4.48) or :class:`~raylens.attributions.lrp.AttnLRP` there.

    Args:
        head_fusion: ``"mean"`` (default, the paper's) or ``"max"`` over heads.
        exclude_first: leave out the first position (default False).
    """

    param_constraints = {"head_fusion": OneOf(HEAD_FUSIONS), "exclude_first": Bool()}

    def __init__(self, model: Any, tokenizer: Any = None, *, head_fusion: str = "mean", exclude_first: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        check_values(self.param_constraints, {"head_fusion": head_fusion, "exclude_first": exclude_first})
        self.head_fusion = head_fusion
        self.exclude_first = bool(exclude_first)

    def params(self) -> dict[str, Any]:
        return {"head_fusion": self.head_fusion, "exclude_first": self.exclude_first, **super().params()}

    @torch.no_grad()
    def batch_scores(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                     tok: torch.Tensor, which: torch.Tensor,
                     n_targets: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with record_attention(self.model) as rec:
            scores = self.engine.forward(mask, rows, pos, tok, input_ids=ids)
        full = attention_rollout(rec.weights, self.head_fusion)
        roll = attention_rollout(rec.weights, self.head_fusion, exclude_first=True) if self.exclude_first else full
        at = explained_positions(self.task, self.model, mask, rows, pos)
        token_scores = torch.zeros((n_targets, *ids.shape), device=full.device)
        token_scores[which, rows] = roll[rows, at]
        if self.exclude_first:
            token_scores[..., 0] = 0
        return token_scores, scores, {"first_position_share": full[rows, at, 0]}


class GradientAttentionRollout(InsideExplainer):
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, "Generic
    Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers").

    One forward per batch with the attention probabilities recorded and one backward per target
    index (:func:`gradient_rollout`: ``A_bar = mean_heads((grad A * A)^+)``, ``R <- R + A_bar R``
    from ``R = I``); the explained position's row gives the token scores (as
    :class:`AttentionRollout`), element score = sum over its tokens. Scores are ``>= 0`` and depend
    on the target (the gradient of its score, in ``inference_mode``). The explained position's
    own token keeps the identity's 1 on top (a causal LM's last input token, an encoder's
    ``[CLS]``, which is not an element).

    Faithfulness (measured, deletion AUC, lower is better): MiniLM classifier 0.43 vs 0.66 for
    random rankings; SmolLM2 explaining log-probabilities -4.48 vs -2.84.
    """

    def batch_scores(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                     tok: torch.Tensor, which: torch.Tensor,
                     n_targets: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        at = explained_positions(self.task, self.model, mask, rows, pos)
        token_scores = torch.zeros((n_targets, *ids.shape), device=ids.device)
        with torch.enable_grad(), record_attention(self.model) as rec:
            # frozen parameters: the input embeddings carry the graph
            embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            scores = self.engine.forward(mask, rows, pos, tok, inputs_embeds=embeds)
            for t in range(n_targets):
                sel = which == t
                grads = torch.autograd.grad(scores[sel].sum(), rec.weights, retain_graph=t < n_targets - 1,
                                            allow_unused=True)
                grads = [torch.zeros_like(w) if g is None else g for w, g in zip(rec.weights, grads)]
                rel = gradient_rollout(rec.weights, grads)
                token_scores[t, rows[sel]] = rel[rows[sel], at[sel]]
        return token_scores, scores.detach(), {}


__all__ = ["AttentionRecorder", "AttentionRollout", "GradientAttentionRollout", "HEAD_FUSIONS", "attention_gradients",
           "attention_rollout", "gradient_rollout", "record_attention"]
