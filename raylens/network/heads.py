"""Causal head gating (Nam et al., NeurIPS 2025, "Causal Head Gating: A Framework for
Interpreting Roles of Attention Heads in Transformers").

A gate ``g[layer, head]`` in [0, 1] multiplies each attention head's output before the output
projection (``o_proj``). transformers 5.23 has no ``head_mask``, so the gates are applied by an
attention function registered for this one model instance only
(:func:`raylens.models.attention.custom_attention`: the standard eager computation, then the
gates); the model gets its own implementation back after every call.

The gates are ``sigmoid(theta)``, fitted by gradient descent on a task loss (here the mean
next-token cross-entropy, nats per token, over a corpus) in three fits:

1. ``gate``: no regulariser (``steps`` steps from ``theta ~ N(init_logit, init_std)``, the seed
   drawing the start and the minibatches);
2. ``gate_retain``: from (1), ``reg_steps`` steps of ``loss - lam * sum(clip(theta))``, the
   paper's regulariser on the clipped inverse sigmoid of the gates (``theta`` clipped to
   ``[-clip, clip]``): open gates are rewarded, so a head that still closes hurts the task;
3. ``gate_remove``: from (1), ``reg_steps`` steps of ``loss + lam * sum(clip(theta))``: closed
   gates are rewarded, so a head that stays open is needed by the task.

Roles (threshold ``t``, default 0.5), the rule implemented here:

- **facilitating**: ``gate_remove >= t`` (kept although removal is rewarded);
- **interfering**: ``gate_retain < t`` (removed although keeping is rewarded), unless
  facilitating (the two cannot both hold for a head with a consistent effect; if they do, the
  remove fit's evidence wins);
- **irrelevant**: the rest (open when keeping is rewarded, closed when removal is).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raylens.io.schemas import HEAD_GATING_SCHEMA, HEAD_ROLE_NAMES
from raylens.models.attention import custom_attention, eager_attention_function
from raylens.network.lens import tokenize_batch

HEAD_ROLES = HEAD_ROLE_NAMES


def head_roles(gate_retain: np.ndarray, gate_remove: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Roles from the two regularised fits' gates (any equal shapes), by the rule in the
    module docstring: an array of ``"facilitating"``, ``"interfering"``, ``"irrelevant"``."""
    gate_retain, gate_remove = np.asarray(gate_retain), np.asarray(gate_remove)
    return np.where(gate_remove >= threshold, "facilitating",
                    np.where(gate_retain < threshold, "interfering", "irrelevant")).astype(object)


def attention_shape(model: Any) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of a model's self-attention (``config`` fields)."""
    cfg = model.config
    return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


@contextlib.contextmanager
def gated_heads(model: Any, gates: torch.Tensor) -> Iterator[Any]:
    """Run ``model`` inside the block with each head's output multiplied by its gate.

    Args:
        model: a transformers model whose attention modules carry ``layer_idx`` (Llama, BERT...).
        gates: ``(n_layers, n_heads)``; may require grad (the gradient flows to it). Gate 1
            everywhere gives the model's eager-attention outputs bit for bit.

    Raises:
        ValueError: ``gates`` is not ``(n_layers, n_heads)``; the model cannot switch attention.
    """
    if tuple(gates.shape) != attention_shape(model):
        raise ValueError(f"gates must be {attention_shape(model)} (layers, heads), got {tuple(gates.shape)}")

    def gated(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = eager_attention_function(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        gate = gates[module.layer_idx].to(out.dtype)  # out: (batch, q_len, heads, head_dim)
        return out * gate[None, None, :, None], weights

    with custom_attention(model, gated):
        yield model


def next_token_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per predicted token) of a right-padded batch; a
    scalar that keeps the autograd graph."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    target = input_ids[:, 1:]
    keep = attention_mask[:, 1:].bool()
    logits = logits[:, :-1][keep]
    return torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target[keep])


@dataclasses.dataclass
class CausalHeadGating:
    """Causal head gating (Nam et al., NeurIPS 2025) on the next-token loss of a corpus.

    Args:
        model: a Hugging Face causal LM (attention through transformers' ``AttentionInterface``).
        tokenizer: its tokenizer.
        steps: optimisation steps of the unregularised fit.
        reg_steps: steps of each regularised fit (started from the unregularised gates).
        lam: regulariser weight per head, on the clipped gate logit (nats per logit unit).
        clip: bound of the gate logits in the regulariser (gates ``sigmoid(+-clip)``).
        lr: Adam learning rate on the gate logits.
        threshold: gate value separating open from closed for the roles.
        seed: start of the gate logits and order of the minibatches.
        init_logit, init_std: the gate logits start as ``N(init_logit, init_std)``.
        max_tokens: tokens kept per text.
        batch_size: texts per step.
        record_losses: after the fits, measure each fit's task loss over the whole corpus
            (three more passes without gradient); ``False`` leaves ``losses_`` as NaN.

    After :meth:`fit`: ``gates_``, ``gates_retain_``, ``gates_remove_`` (``(n_layers, n_heads)``
    numpy float32), ``roles_`` (same shape, strings) and ``losses_`` (the final task loss of
    each fit over the whole corpus, nats per token).
    """

    model: Any = dataclasses.field(repr=False)
    tokenizer: Any = dataclasses.field(repr=False)
    _: dataclasses.KW_ONLY
    steps: int = 100
    reg_steps: int = 100
    lam: float = 0.01
    clip: float = 5.0
    lr: float = 0.1
    threshold: float = 0.5
    seed: int = 0
    init_logit: float = 3.0
    init_std: float = 1.0
    max_tokens: int = 32
    batch_size: int = 8
    record_losses: bool = True

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where inputs go)."""
        return self.model.get_input_embeddings().weight.device

    def _batches(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [tokenize_batch(self.tokenizer, texts[i:i + self.batch_size], max_tokens=self.max_tokens,
                               device=self.device) for i in range(0, len(texts), self.batch_size)]

    def task_loss(self, texts: Sequence[str], gates: np.ndarray | torch.Tensor | None = None) -> float:
        """Mean next-token cross-entropy (nats per token) over ``texts`` with ``gates``
        ``(n_layers, n_heads)`` (``None``: the model as it is), token-weighted over batches."""
        total, count = 0.0, 0
        for ids, mask in self._batches(texts):
            n = int(mask[:, 1:].sum())
            if n == 0:
                continue
            with torch.no_grad():
                if gates is None:
                    loss = next_token_loss(self.model, ids, mask)
                else:
                    with gated_heads(self.model, torch.as_tensor(gates, dtype=torch.float32, device=self.device)):
                        loss = next_token_loss(self.model, ids, mask)
            total += float(loss) * n
            count += n
        if count == 0:
            raise ValueError("no text has two tokens: no next-token loss")
        return total / count

    def _descend(self, theta: torch.Tensor, batches: list, n_steps: int, reg: float, gen: torch.Generator) -> torch.Tensor:
        """``n_steps`` Adam steps on ``task loss + reg * sum(clip(theta))`` from ``theta``."""
        theta = theta.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=self.lr)
        for _ in range(n_steps):
            ids, mask = batches[int(torch.randint(len(batches), (1,), generator=gen))]
            opt.zero_grad()
            gates = torch.sigmoid(theta)
            with gated_heads(self.model, gates):
                loss = next_token_loss(self.model, ids, mask) + reg * theta.clamp(-self.clip, self.clip).sum()
            loss.backward()
            opt.step()
        return theta.detach()

    def fit(self, texts: Sequence[str]) -> CausalHeadGating:
        """The three fits on ``texts`` and the roles (see the module docstring).

        Returns:
            ``self``.

        Raises:
            ValueError: no text has two tokens.
        """
        batches = [(ids, mask) for ids, mask in self._batches(texts) if int(mask[:, 1:].sum()) > 0]
        if not batches:
            raise ValueError("no text has two tokens: no next-token loss")
        gen = torch.Generator().manual_seed(self.seed)
        shape = attention_shape(self.model)
        theta = self.init_logit + self.init_std * torch.randn(shape, generator=gen)
        theta = self._descend(theta.to(self.device), batches, self.steps, 0.0, gen)
        retain = self._descend(theta, batches, self.reg_steps, -self.lam, gen)
        remove = self._descend(theta, batches, self.reg_steps, self.lam, gen)
        self.gates_, self.gates_retain_, self.gates_remove_ = (
            torch.sigmoid(t).cpu().numpy().astype(np.float32) for t in (theta, retain, remove))
        self.roles_ = head_roles(self.gates_retain_, self.gates_remove_, self.threshold)
        fits = {"gate": self.gates_, "gate_retain": self.gates_retain_, "gate_remove": self.gates_remove_}
        self.losses_ = {name: self.task_loss(texts, g) if self.record_losses else float("nan")
                        for name, g in fits.items()}
        return self

    def to_table(self) -> pa.Table:
        """The fitted gates and roles: :data:`~raylens.io.schemas.HEAD_GATING_SCHEMA`, one row
        per (layer, head), in layer-major order.

        Raises:
            RuntimeError: called before :meth:`fit`.
        """
        if not hasattr(self, "roles_"):
            raise RuntimeError("call fit() first")
        n_layers, n_heads = self.gates_.shape
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        n = n_layers * n_heads
        return pa.table({
            "seed": pa.array(np.full(n, self.seed, np.int32)),
            "layer": pa.array(layer.ravel().astype(np.int32)),
            "head": pa.array(head.ravel().astype(np.int32)),
            "gate": pa.array(self.gates_.ravel()),
            "gate_retain": pa.array(self.gates_retain_.ravel()),
            "gate_remove": pa.array(self.gates_remove_.ravel()),
            "role": pa.array(self.roles_.ravel().tolist(), pa.string()),
            "loss": pa.array(np.full(n, self.losses_["gate"], np.float32)),
            "loss_retain": pa.array(np.full(n, self.losses_["gate_retain"], np.float32)),
            "loss_remove": pa.array(np.full(n, self.losses_["gate_remove"], np.float32)),
        }, schema=HEAD_GATING_SCHEMA)
