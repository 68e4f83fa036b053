"""Concept importance: gradients of the model's output with respect to concept activations.

At the split point the activation ``h`` ``(n_tokens, d_model)`` is rewritten as
``h + decode(z) - stopgrad(decode(z))`` with ``z = encode(h)`` a leaf ``(n_tokens,
nb_concepts)``: the forward is unchanged (the reconstruction error is kept), and the
gradient reaches ``z`` through the decoder. The output ``y`` is the logit of the model's
own prediction: the predicted next token at the last real position (causal LM) or the
predicted class (classifier). Per document:

* ``gradient[c]   = sum_t dy/dz[t, c]``  (the change of ``y`` when concept ``c`` rises by one
  unit at every position),
* ``concept_x_gradient[c] = sum_t z[t, c] * dy/dz[t, c]`` (first-order contribution of ``c``
  to ``y``, in logit units).

Both are signed; the job reports their means over a sample of documents. This is the
gradient-based concept importance of TCAV (Kim et al. 2018) and of Fel et al. 2023
("A Holistic Approach to Unifying Automatic Concept Extraction and Concept Importance
Estimation"), computed exactly through the concept decoder. One backward of the summed
targets serves the whole batch (documents are independent under their attention masks).

:func:`concept_output_gradients` does the same for several outputs at once (every class
of a classifier, or chosen token ids), with one backward per output, and can route only
the ``cls`` position through the concept model (concept models fitted on ``cls`` rows);
class-wise concept importance (:mod:`raylens.concepts.classwise`, CRAFT, Fel et al. 2023,
arXiv 2211.10154) is built on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from raylens.models.split import SplitModel


def concept_gradients(
    split: SplitModel,
    concept_model,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_tokens: int = 128,
    exclude_first_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-document concept gradients and concept x gradient for the model's own prediction.

    Args:
        split: the split model (task ``causal_lm`` or ``sequence_classification``).
        concept_model: fitted concept model on that split point (``encode``/``decode``).
        texts: ``n_docs`` non-empty strings.
        exclude_first_tokens: positions below this do not count in the sums (match the
            extraction setting the concept model was trained with).

    Returns:
        ``(gradient, concept_x_gradient, target_ids)``: float tensors ``(n_docs, nb_concepts)``
        (logit units per unit of concept activation, and logit units) and the explained
        output per document ``(n_docs,)`` (token id or class index).

    Raises:
        ValueError: the model has no output head to explain (task ``base``) or a text is empty.
    """
    task = split.loaded.task
    if task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"concept importance needs a causal LM or a classifier, not task {task!r}")
    encoded = split.encode(texts, max_tokens)
    empty = [i for i, e in enumerate(encoded) if not e.input_ids]
    if empty:
        raise ValueError(f"texts at positions {empty[:5]} are empty")
    model = split.model
    grads, cxg, targets = [], [], []
    for b in range(0, len(texts), batch_size):
        ids, mask = split.pad(encoded[b: b + batch_size])
        captured: dict[str, torch.Tensor] = {}

        def through_concepts(h: torch.Tensor) -> torch.Tensor:
            flat = h.detach().float().reshape(-1, h.shape[-1])
            z = concept_model.encode(flat).detach().requires_grad_(True)  # (n_samples*n_tokens, C)
            rec = concept_model.decode(z)
            captured["z"] = z
            return h + (rec - rec.detach()).reshape(h.shape).to(h.dtype)

        with torch.enable_grad(), split.replace_output(through_concepts):
            out = model(input_ids=ids, attention_mask=mask)
            logits = out.logits
            if task == "causal_lm":
                last = mask.sum(1) - 1  # last real position of each row
                rows = logits[torch.arange(len(ids)), last]  # (n_samples, vocab)
            else:
                rows = logits  # (n_samples, n_classes)
            target = rows.argmax(-1)
            y = rows.gather(1, target[:, None]).sum()
            (g,) = torch.autograd.grad(y, captured["z"])
        z = captured["z"].detach()
        n, t = ids.shape
        m = mask.clone()
        m[:, :exclude_first_tokens] = 0
        m = m.reshape(n, t, 1).to(g.dtype)
        g = g.reshape(n, t, -1) * m
        grads.append(g.sum(1).cpu())
        cxg.append((g * z.reshape(n, t, -1)).sum(1).cpu())
        targets.append(target.cpu())
    return torch.cat(grads), torch.cat(cxg), torch.cat(targets)


# ---------------------------------------------------------------------------- several outputs
POSITIONS = ("all", "cls")


class ConceptOutputGradients(NamedTuple):
    """Result of :func:`concept_output_gradients` (axes: ``n_docs``, ``nb_concepts``, ``n_outputs``).

    Attributes:
        gradient: ``(n_docs, nb_concepts, n_outputs)``, ``sum_t d y_o / d z[t, c]`` (logit
            units per unit of concept activation).
        concept_x_gradient: ``(n_docs, nb_concepts, n_outputs)``, ``sum_t z[t, c] * d y_o / d z[t, c]``
            (logit units, signed).
        outputs: ``(n_outputs,)`` the explained outputs (class indices, or token ids).
        logits: ``(n_docs, n_outputs)`` the explained logits ``y_o`` of each document.
        predicted: ``(n_docs,)`` the model's own prediction (argmax over all classes, or over
            the vocabulary at the last real position).
    """

    gradient: torch.Tensor
    concept_x_gradient: torch.Tensor
    outputs: torch.Tensor
    logits: torch.Tensor
    predicted: torch.Tensor


def explained_positions(split: SplitModel, encoded: Sequence, positions: str) -> list[list[int]] | None:
    """Token positions that go through the concept model, per document (``None`` for ``"all"``).

    ``"cls"`` is the single position of :class:`SplitModel`'s ``cls`` granularity: the first
    token when the tokenizer puts its CLS token first (encoders; for BERT classifiers, at the
    last layer, the only position the pooler and the head read), else the last real token.

    Raises:
        ValueError: unknown ``positions``.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if positions == "all":
        return None
    cls_id = split.tokenizer.cls_token_id
    return [[0 if cls_id is not None and e.input_ids and e.input_ids[0] == cls_id else len(e.input_ids) - 1]
            for e in encoded]


def concept_output_gradients(
    split: SplitModel,
    concept_model,
    texts: Sequence[str],
    *,
    outputs: Sequence[int] | None = None,
    positions: str = "all",
    batch_size: int = 8,
    max_tokens: int = 128,
    exclude_first_tokens: int = 0,
) -> ConceptOutputGradients:
    """Concept gradients and concept x gradient for several outputs at once (e.g. every class).

    The same construction as :func:`concept_gradients` (the split activation is rewritten
    ``h + decode(z) - stopgrad(decode(z))``, forward unchanged), but with one backward per
    explained output instead of the predicted one only, as class-wise concept importance
    needs (CRAFT, Fel et al. 2023, arXiv 2211.10154: importance of each class's concepts
    for that class's logit, and for the others).

    Args:
        split: the split model (task ``sequence_classification`` or ``causal_lm``).
        concept_model: fitted concept model on that split point (``encode``/``decode``).
        texts: ``n_docs`` non-empty strings.
        outputs: class indices (classifier; default: every class) or token ids at the last
            real position (causal LM; required).
        positions: ``"all"``: every token position goes through the concept model (as in
            :func:`concept_gradients`; ``exclude_first_tokens`` leaves early positions out of
            the sums); ``"cls"``: only the ``cls``-granularity position does (use it for
            concept models fitted on ``cls`` rows; other positions keep their activation).

    Returns:
        :class:`ConceptOutputGradients` (CPU tensors).

    Raises:
        ValueError: the model has no output head (task ``base``), a text is empty, an output
            index is out of range, ``outputs`` is missing for a causal LM, or unknown ``positions``.
    """
    task = split.loaded.task
    if task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"concept importance needs a causal LM or a classifier, not task {task!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    n_out_total = int(split.model.config.num_labels) if task == "sequence_classification" else None
    if outputs is None:
        if task == "causal_lm":
            raise ValueError("outputs (token ids) are required to explain a causal LM")
        outputs = list(range(n_out_total))
    out_idx = torch.as_tensor(list(outputs), dtype=torch.long)
    if out_idx.ndim != 1 or out_idx.numel() == 0:
        raise ValueError(f"outputs must be a non-empty list of indices, got {outputs!r}")
    limit = n_out_total if n_out_total is not None else split.model.get_output_embeddings().weight.shape[0]
    if int(out_idx.min()) < 0 or int(out_idx.max()) >= limit:
        raise ValueError(f"outputs must be in [0, {limit}), got {out_idx.tolist()}")
    encoded = split.encode(texts, max_tokens)
    empty = [i for i, e in enumerate(encoded) if not e.input_ids]
    if empty:
        raise ValueError(f"texts at positions {empty[:5]} are empty")
    pos_all = explained_positions(split, encoded, positions)
    model = split.model
    grads, cxg, logits_out, predicted = [], [], [], []
    for b in range(0, len(texts), batch_size):
        ids, mask = split.pad(encoded[b: b + batch_size])
        n, t = ids.shape
        captured: dict[str, torch.Tensor] = {}
        if pos_all is not None:
            rows_idx = torch.arange(n, device=ids.device)
            pos = torch.tensor([p[0] for p in pos_all[b: b + batch_size]], device=ids.device)

        def through_concepts(h: torch.Tensor) -> torch.Tensor:
            if pos_all is None:
                flat = h.detach().float().reshape(-1, h.shape[-1])
                z = concept_model.encode(flat).detach().requires_grad_(True)  # (n*t, C)
                rec = concept_model.decode(z)
                captured["z"] = z
                return h + (rec - rec.detach()).reshape(h.shape).to(h.dtype)
            sel = h[rows_idx, pos].detach().float()  # (n, d_model)
            z = concept_model.encode(sel).detach().requires_grad_(True)  # (n, C)
            rec = concept_model.decode(z)
            captured["z"] = z
            delta = torch.zeros_like(h).index_put((rows_idx, pos), (rec - rec.detach()).to(h.dtype))
            return h + delta

        with torch.enable_grad(), split.replace_output(through_concepts):
            logits = model(input_ids=ids, attention_mask=mask).logits
            if task == "causal_lm":
                last = mask.sum(1) - 1
                full = logits[torch.arange(n), last]  # (n, vocab)
            else:
                full = logits  # (n, n_classes)
            rows = full[:, out_idx.to(full.device)]  # (n, n_outputs)
            z = captured["z"]
            per_out = []
            for j in range(rows.shape[1]):
                (g,) = torch.autograd.grad(rows[:, j].sum(), z, retain_graph=j < rows.shape[1] - 1)
                per_out.append(g)
        g = torch.stack(per_out, -1).detach()  # (n*t or n, C, n_outputs)
        z = captured["z"].detach()
        if pos_all is None:
            m = mask.clone()
            m[:, :exclude_first_tokens] = 0
            g = g.reshape(n, t, *g.shape[1:]) * m.reshape(n, t, 1, 1).to(g.dtype)
            z = z.reshape(n, t, -1, 1)
            grads.append(g.sum(1).cpu())
            cxg.append((g * z).sum(1).cpu())
        else:
            grads.append(g.cpu())
            cxg.append((g * z[..., None]).cpu())
        logits_out.append(rows.detach().float().cpu())
        predicted.append(full.detach().argmax(-1).cpu())
    return ConceptOutputGradients(torch.cat(grads), torch.cat(cxg), out_idx, torch.cat(logits_out),
                                  torch.cat(predicted))
