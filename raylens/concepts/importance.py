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
arXiv 2211.10154) is built on it. Both run the same loop, :func:`concept_gradient_batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from raylens.models.batching import split_on_oom
from raylens.models.split import SplitModel

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


def _checked_task(split: SplitModel) -> str:
    task = split.loaded.task
    if task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"concept importance needs a causal LM or a classifier, not task {task!r}")
    return task


def _encode_texts(split: SplitModel, texts: Sequence[str], max_tokens: int) -> list:
    encoded = split.encode(texts, max_tokens)
    empty = [i for i, e in enumerate(encoded) if not e.input_ids]
    if empty:
        raise ValueError(f"texts at positions {empty[:5]} are empty")
    return encoded


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


def _through_concepts(concept_model, captured: dict, pos: torch.Tensor | None) -> Callable:
    """The split-point rewrite ``h + decode(z) - stopgrad(decode(z))`` with the leaf
    ``z = encode(h)`` stored in ``captured["z"]``: at every position (``pos`` None; ``z`` is
    ``(n * t, C)``) or at one position per row (``pos (n,)``; ``z`` is ``(n, C)``)."""

    def replace(h: torch.Tensor) -> torch.Tensor:
        if pos is None:
            flat = h.detach().float().reshape(-1, h.shape[-1])
            z = concept_model.encode(flat).detach().requires_grad_(True)  # (n*t, C)
            rec = concept_model.decode(z)
            captured["z"] = z
            return h + (rec - rec.detach()).reshape(h.shape).to(h.dtype)
        rows_idx = torch.arange(h.shape[0], device=h.device)
        sel = h[rows_idx, pos].detach().float()  # (n, d_model)
        z = concept_model.encode(sel).detach().requires_grad_(True)  # (n, C)
        rec = concept_model.decode(z)
        captured["z"] = z
        delta = torch.zeros_like(h).index_put((rows_idx, pos), (rec - rec.detach()).to(h.dtype))
        return h + delta

    return replace


def concept_gradient_batches(
    split: SplitModel,
    concept_model,
    encoded: Sequence,
    *,
    select: Callable[[torch.Tensor], torch.Tensor],
    positions: list[list[int]] | None = None,
    batch_size: int = 8,
    exclude_first_tokens: int = 0,
) -> Iterator[ConceptOutputGradients]:
    """The one concept-gradient loop that :func:`concept_gradients` and
    :func:`concept_output_gradients` share: per batch of documents, one forward through the
    concept model (the split activation rewritten ``h + decode(z) - stopgrad(decode(z))``)
    and one backward per explained output.

    Args:
        split: the split model (task ``causal_lm`` or ``sequence_classification``).
        concept_model: fitted concept model on that split point (``encode``/``decode``).
        encoded: ``n_docs`` encoded texts (``split.encode``), none empty.
        select: ``select(full) -> (n, n_outputs)`` int64 column indices of the explained
            outputs of each row of ``full (n, n_classes or vocab)`` (the logits of the
            classifier, or at the last real position of a causal LM).
        positions: per document, the one position routed through the concept model
            (:func:`explained_positions`); None: every position.
        exclude_first_tokens: with every position, positions below this do not count in the sums.

    A batch that runs out of device memory is split in halves and retried
    (:func:`raylens.models.batching.split_on_oom`): it then yields one result per piece.

    Yields:
        per batch, :class:`ConceptOutputGradients` with ``gradient`` and ``concept_x_gradient``
        ``(n, nb_concepts, n_outputs)``, ``outputs`` ``(n, n_outputs)`` (the selected indices),
        ``logits`` ``(n, n_outputs)`` and ``predicted`` ``(n,)``; CPU tensors.
    """
    causal = split.loaded.task == "causal_lm"

    def one(docs: Sequence[int]) -> ConceptOutputGradients:
        ids, mask = split.pad([encoded[d] for d in docs])
        n, t = ids.shape
        pos = None if positions is None else torch.tensor([positions[d][0] for d in docs], device=ids.device)
        captured: dict[str, torch.Tensor] = {}
        with torch.enable_grad(), split.replace_output(_through_concepts(concept_model, captured, pos)):
            logits = split.model(input_ids=ids, attention_mask=mask).logits
            full = logits[torch.arange(n), mask.sum(1) - 1] if causal else logits  # (n, vocab or n_classes)
            idx = select(full)
            rows = full.gather(1, idx)  # (n, n_outputs)
            per_out = [torch.autograd.grad(rows[:, j].sum(), captured["z"], retain_graph=j < rows.shape[1] - 1)[0]
                       for j in range(rows.shape[1])]
        g = torch.stack(per_out, -1).detach()  # (n*t or n, C, n_outputs)
        z = captured["z"].detach()
        if pos is None:
            m = mask.clone()
            m[:, :exclude_first_tokens] = 0
            g = g.reshape(n, t, *g.shape[1:]) * m.reshape(n, t, 1, 1).to(g.dtype)
            grad, cxg = g.sum(1), (g * z.reshape(n, t, -1, 1)).sum(1)
        else:
            grad, cxg = g, g * z[..., None]
        return ConceptOutputGradients(grad.cpu(), cxg.cpu(), idx.cpu(), rows.detach().float().cpu(),
                                      full.detach().argmax(-1).cpu())

    for b in range(0, len(encoded), batch_size):
        # out of memory: the batch is split in halves and retried, down to one document
        yield from split_on_oom(one, range(b, min(b + batch_size, len(encoded))), what="concept-gradient batch")


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
    _checked_task(split)
    encoded = _encode_texts(split, texts, max_tokens)
    batches = list(concept_gradient_batches(split, concept_model, encoded, select=lambda full: full.argmax(-1)[:, None],
                                            batch_size=batch_size, exclude_first_tokens=exclude_first_tokens))
    return (torch.cat([r.gradient[..., 0] for r in batches]), torch.cat([r.concept_x_gradient[..., 0] for r in batches]),
            torch.cat([r.predicted for r in batches]))


def _output_indices(split: SplitModel, task: str, outputs: Sequence[int] | None) -> torch.Tensor:
    """The explained outputs as int64 ``(n_outputs,)``, checked against the head's size."""
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
    return out_idx


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
    task = _checked_task(split)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    out_idx = _output_indices(split, task, outputs)
    encoded = _encode_texts(split, texts, max_tokens)
    batches = list(concept_gradient_batches(
        split, concept_model, encoded, select=lambda full: out_idx.to(full.device).expand(full.shape[0], -1),
        positions=explained_positions(split, encoded, positions), batch_size=batch_size,
        exclude_first_tokens=exclude_first_tokens))
    return ConceptOutputGradients(torch.cat([r.gradient for r in batches]),
                                  torch.cat([r.concept_x_gradient for r in batches]), out_idx,
                                  torch.cat([r.logits for r in batches]), torch.cat([r.predicted for r in batches]))
