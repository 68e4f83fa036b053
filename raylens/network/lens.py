"""Lenses: read a causal LM's prediction off every layer's residual stream.

- :class:`LogitLens` (nostalgebraist 2020, "interpreting GPT: the logit lens"): the residual
  stream after ``l`` blocks goes through the model's own final norm and unembedding.
- :class:`TunedLens` (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers
  with the Tuned Lens", arXiv 2303.08112): the same, after one learnt affine translator per
  layer (identity at the start), trained to minimise the KL divergence to the model's final
  next-token distribution over a corpus.

Layers are numbered ``0 .. n_layers``: ``0`` is the embedding output, ``l`` the residual stream
after block ``l - 1``, and ``n_layers`` the model's output (its logits, exactly). Hugging Face's
``hidden_states[-1]`` is already after the final norm, so layer ``n_layers`` is never normed a
second time; every other layer goes through the final norm module itself, so its statistics
(RMS or mean/variance) are recomputed from that layer's vector, never reused from the last one
(TransformerLens issue 1076).

Supported: causal LMs whose unembedding is ``get_output_embeddings()`` and whose final norm is
an attribute ``norm``, ``ln_f``, ``final_layer_norm`` or ``norm_f`` of the base model (Llama,
SmolLM2, Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX, OPT...). A sequence classifier (e.g. a BERT
classifier) has no vocabulary distribution: the lenses raise :class:`TypeError` for it rather
than project its layers onto a head trained only on the CLS vector of the last layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f")


def tokenize_batch(tokenizer: Any, texts: Sequence[str], *, max_tokens: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``texts`` right-padded, each cut to its first ``max_tokens`` tokens.

    Returns:
        ``input_ids`` and ``attention_mask``, both ``(batch, n_tokens)`` int64 on ``device``,
        ``n_tokens`` the longest kept text.

    Raises:
        ValueError: ``max_tokens < 1`` or an empty list of texts.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not texts:
        raise ValueError("no texts to tokenize")
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def lens_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm and the unembedding of a causal LM.

    Raises:
        TypeError: the model has no unembedding (a classifier or a bare encoder) or no final
            norm under a known name; the message names what is supported.
    """
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        raise TypeError(
            f"{type(model).__name__} has no unembedding (get_output_embeddings() is None): the logit and "
            "tuned lens need a causal LM (e.g. LlamaForCausalLM); a sequence classifier has no "
            "next-token distribution to read off its layers")
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        norm = getattr(base, name, None)
        if isinstance(norm, torch.nn.Module):
            return norm, unembed
    raise TypeError(f"{type(model).__name__}: no final norm found on its base model under any of "
                    f"{list(FINAL_NORM_NAMES)}; supported: Llama/Mistral/Qwen2/Gemma, GPT-2, GPT-NeoX, OPT")


def model_identity(model: Any) -> dict[str, Any]:
    """What a saved lens records about its model, and what :meth:`TunedLens.load` checks.

    Returns:
        ``name`` (``config.name_or_path``), ``revision`` (the hub commit hash, ``""`` for a
        local folder), ``n_layers``, ``d_model``, ``vocab_size`` and ``weights_sha256``: a
        SHA-256 of the final norm weight and the first 256 unembedding rows, rounded to
        bfloat16 (so a float32 and a bfloat16 copy of the same weights agree).
    """
    norm, unembed = lens_parts(model)
    digest = hashlib.sha256()
    for t in (getattr(norm, "weight", None), unembed.weight[:256]):
        if t is not None:
            digest.update(t.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    cfg = model.config
    return {
        "name": str(getattr(cfg, "name_or_path", "") or ""),
        "revision": str(getattr(cfg, "_commit_hash", "") or ""),
        "n_layers": int(cfg.num_hidden_layers),
        "d_model": int(unembed.weight.shape[1]),
        "vocab_size": int(unembed.weight.shape[0]),
        "weights_sha256": digest.hexdigest(),
    }


class LogitLens:
    """The logit lens (nostalgebraist 2020): every layer's residual stream through the model's
    final norm (statistics recomputed per layer) and unembedding.

    Args:
        model: a Hugging Face causal LM (see the module docstring for the supported ones).
        tokenizer: its tokenizer.

    Usage::

        lens = LogitLens(lm.model, lm.tokenizer)
        ids, mask = tokenize_batch(lm.tokenizer, ["The cat sat on the"], max_tokens=32)
        for layer, logits in lens.iter_layer_logits(ids, mask):   # (batch, n_tokens, vocab)
            ...
    """

    name = "logit"

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks; the lens has ``n_layers + 1`` layers."""
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where inputs go)."""
        return self.model.get_input_embeddings().weight.device

    def translate(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream as the lens sees it before the final norm: identity here."""
        return hidden

    def residual_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One forward pass (no gradient): the ``n_layers + 1`` hidden states, each
        ``(batch, n_tokens, d_model)``; the last one is already after the final norm.

        ``position_ids`` come from the mask, so padding on either side changes nothing.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        base = getattr(self.model, "base_model", self.model)  # no unembedding of every position here
        with torch.no_grad():
            out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       output_hidden_states=True)
        return tuple(out.hidden_states)

    def project(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., vocab)`` of layer ``layer`` from its residual stream ``(..., d_model)``.

        Layer ``n_layers`` is the model's own output (``hidden`` already normed): unembedding only.

        Raises:
            IndexError: ``layer`` outside ``0 .. n_layers``.
        """
        if not 0 <= layer <= self.n_layers:
            raise IndexError(f"layer must be in 0..{self.n_layers}, got {layer}")
        norm, unembed = lens_parts(self.model)
        if layer < self.n_layers:
            hidden = norm(self.translate(layer, hidden))
        logits = unembed(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def iter_layer_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          layers: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """One forward pass, then ``(layer, logits (batch, n_tokens, vocab))`` one layer at a
        time (memory: one layer's logits), for ``layers`` (default all, ``0 .. n_layers``)."""
        hidden = self.residual_stream(input_ids, attention_mask)
        for layer in range(self.n_layers + 1) if layers is None else layers:
            with torch.no_grad():
                yield layer, self.project(layer, hidden[layer])

    def layer_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """All layers at once: ``(n_layers + 1, batch, n_tokens, vocab)`` float.

        Memory grows with ``n_layers * batch * n_tokens * vocab``; over a corpus use
        :meth:`iter_layer_logits` (or :func:`raylens.network.corpus.lens_statistics`).
        """
        return torch.stack([logits for _, logits in self.iter_layer_logits(input_ids, attention_mask)])


class TunedLens(LogitLens):
    """The tuned lens (Belrose et al. 2023, arXiv 2303.08112): before the final norm, layer
    ``l < n_layers`` goes through its own affine translator ``h + h @ W_l.T + b_l`` (``W_l``
    ``(d_model, d_model)``, ``b_l`` ``(d_model,)``; zero, i.e. the logit lens, before
    :meth:`fit`), trained to minimise ``KL(final || lens)`` in nats, averaged over tokens and
    summed over layers. Layer ``n_layers`` is the model's output, untranslated.

    Args:
        model: a Hugging Face causal LM (see the module docstring).
        tokenizer: its tokenizer.
    """

    name = "tuned"

    def __init__(self, model: Any, tokenizer: Any):
        super().__init__(model, tokenizer)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.history: list[float] = []

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The translators ``(weight (n_layers, d_model, d_model), bias (n_layers, d_model))``,
        float32 on the model's device, created as zeros (the logit lens) on first use."""
        if self.weight is None:
            d = lens_parts(self.model)[1].weight.shape[1]
            self.weight = torch.zeros(self.n_layers, d, d, device=self.device)
            self.bias = torch.zeros(self.n_layers, d, device=self.device)
        return self.weight, self.bias

    def translate(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + hidden @ W_layer.T + b_layer`` (``(..., d_model)``); identity for the last layer."""
        if layer >= self.n_layers:
            return hidden
        weight, bias = self.parameters()
        h = hidden.float()  # translators in float32; back to the model's dtype for its norm
        return (h + h @ weight[layer].T + bias[layer]).to(hidden.dtype)

    def fit(self, texts: Sequence[str], *, steps: int = 100, tokens_per_step: int = 256, max_tokens: int = 64,
            batch_size: int = 8, lr: float = 1e-3, seed: int = 0) -> TunedLens:
        """Train the translators on ``texts`` (Adam, ``steps`` steps of ``tokens_per_step``
        tokens drawn at random from the corpus, every layer at each step).

        The corpus's residual streams are collected once and held in memory:
        ``n_tokens * (n_layers + 1) * d_model`` floats (SmolLM2-135M: 71 KB per token); for a
        larger corpus call :meth:`fit` again on the next part (the translators carry over).
        The loss curve (summed KL, nats) is appended to :attr:`history`.

        Returns:
            ``self``.

        Raises:
            ValueError: no token in ``texts``; bad ``steps``/``tokens_per_step``.
        """
        if steps < 1 or tokens_per_step < 1:
            raise ValueError(f"steps and tokens_per_step must be >= 1, got {steps}, {tokens_per_step}")
        hidden = self._collect(texts, max_tokens=max_tokens, batch_size=batch_size)
        weight, bias = self.parameters()
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        opt = torch.optim.Adam([weight, bias], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(steps):
                idx = torch.randint(hidden.shape[0], (min(tokens_per_step, hidden.shape[0]),), generator=gen)
                batch = hidden[idx].to(self.device)  # (tokens, n_layers + 1, d_model)
                with torch.no_grad():
                    target = torch.log_softmax(self.project(self.n_layers, batch[:, -1]).float(), -1)
                opt.zero_grad()
                total = 0.0
                for layer in range(self.n_layers):  # one layer's graph at a time: bounded memory
                    loss = kl_to_final(target, self.project(layer, batch[:, layer])).mean()
                    loss.backward()
                    total += float(loss.detach())
                opt.step()
                self.history.append(total)
        finally:
            weight.requires_grad_(False)
            bias.requires_grad_(False)
        return self

    def _collect(self, texts: Sequence[str], *, max_tokens: int, batch_size: int) -> torch.Tensor:
        """Residual streams of every real token: ``(n_tokens, n_layers + 1, d_model)`` on CPU."""
        parts = []
        for start in range(0, len(texts), batch_size):
            ids, mask = tokenize_batch(self.tokenizer, texts[start:start + batch_size], max_tokens=max_tokens,
                                       device=self.device)
            hidden = torch.stack(self.residual_stream(ids, mask), dim=2)  # (batch, tokens, layers+1, d)
            parts.append(hidden[mask.bool()].cpu())
        if not parts or sum(p.shape[0] for p in parts) == 0:
            raise ValueError("no tokens to fit the tuned lens on")
        return torch.cat(parts)

    def save(self, path: str | Path) -> Path:
        """Write the translators as safetensors (``weight`` ``(n_layers, d, d)``, ``bias``
        ``(n_layers, d)``) with the model's identity (:func:`model_identity`) in the metadata.

        Returns:
            The path written.
        """
        from safetensors.torch import save_file

        weight, bias = self.parameters()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"raylens": "tuned_lens", "identity": json.dumps(model_identity(self.model), sort_keys=True)}
        save_file({"weight": weight.detach().cpu().contiguous(), "bias": bias.detach().cpu().contiguous()},
                  str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any, tokenizer: Any) -> TunedLens:
        """Read a lens written by :meth:`save` for ``model``.

        Raises:
            ValueError: the file is not a raylens tuned lens, or it was trained for another
                model (layer count, width, vocabulary or weights differ; the message lists them).
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("raylens") != "tuned_lens":
                raise ValueError(f"{path} is not a raylens tuned lens")
            tensors = {k: f.get_tensor(k) for k in ("weight", "bias")}
        saved = json.loads(meta["identity"])
        here = model_identity(model)
        keys = ("n_layers", "d_model", "vocab_size", "weights_sha256")
        diff = {k: (saved.get(k), here[k]) for k in keys if saved.get(k) != here[k]}
        if diff:
            raise ValueError(f"tuned lens {path} was trained for model {saved.get('name')!r} "
                             f"(revision {saved.get('revision')!r}), not this one: (saved, this model) {diff}")
        lens = cls(model, tokenizer)
        lens.weight = tensors["weight"].to(lens.device, torch.float32)
        lens.bias = tensors["bias"].to(lens.device, torch.float32)
        return lens


def kl_to_final(final_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(final || softmax(logits))`` in nats over the last axis: ``(...)`` from two
    ``(..., vocab)`` tensors (``final_logprobs`` already log-softmaxed), computed in float32."""
    logq = torch.log_softmax(logits.float(), -1)
    return (final_logprobs.exp() * (final_logprobs - logq)).sum(-1)
