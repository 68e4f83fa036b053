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
"""

from __future__ import annotations

from collections.abc import Sequence

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
