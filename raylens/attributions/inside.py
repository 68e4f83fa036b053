"""The explainer kind of the methods that look inside the network (attention rollout,
gradient-weighted attention rollout, AttnLRP): one pass per batch of inputs over the unperturbed
input, token scores read from the model's internals, element score = **sum of its tokens' scores**
(the rule of the gradient methods, so token, word and sentence granularity all work).

The explained position of a target (:func:`explained_positions`): a causal LM's target token
``t`` is predicted at position ``n_input - 1 + t`` (teacher forcing on ``input + target[:-1]``, as
for every method); an encoder classifier reads its first token (``[CLS]``); a decoder classifier
reads its last real token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raylens.attributions.base import AttributionExplainer
from raylens.attributions.inputs import PreparedInput


def explained_positions(task: str, model: Any, mask: torch.Tensor, rows: torch.Tensor,
                        pos: torch.Tensor) -> torch.Tensor:
    """The position whose output each ``(row, position, target)`` pair reads, ``(n_pairs,)`` int64.

    Args:
        task: ``"causal_lm"`` or ``"sequence_classification"``.
        model: the Hugging Face model (``config.is_decoder`` / ``model_type`` decide where a
            classifier reads: first token for encoders, last real token for decoders).
        mask: ``(n_rows, width)`` attention mask (1 on real tokens, right padding).
        rows, pos: ``(n_pairs,)`` batch row and read position of each pair (engine convention).
    """
    if task == "causal_lm":
        return pos
    encoder = getattr(model.config, "model_type", "") in ENCODER_TYPES
    if encoder:
        return torch.zeros_like(pos)
    return mask.long().sum(1)[rows] - 1


#: model types whose classifier reads the first token (``[CLS]``)
ENCODER_TYPES = ("bert", "roberta", "distilbert", "electra", "xlm-roberta", "deberta", "deberta-v2", "mpnet",
                 "albert", "camembert")


class InsideExplainer(AttributionExplainer):
    """Base class of the methods that read the model's internals on the unperturbed input.

    A subclass implements :meth:`batch_scores`; batching (right padding, at most ``batch_size``
    inputs and ``max_batch_tokens`` padded tokens per pass, longest first) and the element sums
    are done here. One forward per batch (plus, for gradient-based subclasses, one backward per
    target index). Padding never changes a score (padded keys are masked).

    Memory: the rollout methods keep every layer's attention probabilities of the batch,
    ``layers x heads x width^2`` floats per input (SmolLM2, 512 tokens: about 280 MB per input), so
    long inputs want a small ``batch_size`` or ``max_batch_tokens``.
    """

    def batch_scores(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                     tok: torch.Tensor, which: torch.Tensor,
                     n_targets: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Token scores and target scores of one batch.

        Args:
            ids: ``(n_rows, width)`` token ids (right-padded), mask: ``(n_rows, width)``.
            rows, pos, tok, which: ``(n_pairs,)`` batch row, read position, class or token id and
                target index of each pair.
            n_targets: the largest target index + 1.

        Returns:
            ``(token_scores, scores, extras)``: ``(n_targets, n_rows, width)`` score of each
            position for target ``t`` of each row, ``(n_pairs,)`` target scores
            (``inference_mode``), and ``name -> (n_pairs,)`` values recorded per target in each
            output's ``params`` (e.g. the share of the first position), possibly empty.
        """
        raise NotImplementedError

    def _output(self, item: PreparedInput, scores: np.ndarray, seed: int) -> Any:
        out = super()._output(item, scores, seed)
        out.params.update(getattr(self, "_extras", {}).pop(item.index, {}))
        return out

    def _explain(self, items: list[PreparedInput], seed: int) -> list[np.ndarray]:
        order = self._order(items)
        seqs = {i: self._sequence(items[i]) for i in order}
        batches = self.engine.pack([len(seqs[i]) for i in order])
        out: list[np.ndarray] = [np.zeros(0)] * len(items)
        self._extras: dict[int, dict[str, list[float]]] = {}
        dev = self.device
        with self.engine.bar(len(batches), len(items), type(self).__name__) as bar:
            for batch in batches:
                idx = [order[j] for j in batch]
                width = max(len(seqs[i]) for i in idx)
                ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.int64)
                p_row, p_pos, p_tok, p_t = [], [], [], []
                for r, i in enumerate(idx):
                    ids[r, : len(seqs[i])] = seqs[i]
                    mask[r, : len(seqs[i])] = 1
                    pos, tok = self._pairs(items[i])
                    p_row += [r] * len(tok)
                    p_pos += pos.tolist()
                    p_tok += tok.tolist()
                    p_t += list(range(len(tok)))
                tensors = [torch.tensor(a, device=dev) for a in (ids, mask, p_row, p_pos, p_tok, p_t)]
                token_scores, scores, extras = self.batch_scores(*tensors, n_targets=max(p_t) + 1)
                token_scores = token_scores.detach().double().cpu().numpy()
                scores = scores.detach().double().cpu().numpy()
                extras = {k: v.detach().double().cpu().numpy() for k, v in extras.items()}
                for r, i in enumerate(idx):
                    it, sel = items[i], np.asarray(p_row) == r
                    ts = token_scores[: it.n_targets, r, : it.n_in]
                    out[i] = np.stack([ts[:, list(el.tokens)].sum(1) for el in it.elements], axis=1)
                    it.target_scores = scores[sel]
                    self._extras[it.index] = {k: [round(float(x), 6) for x in v[sel]] for k, v in extras.items()}
                bar.update(1)
        return out


__all__ = ["ENCODER_TYPES", "InsideExplainer", "explained_positions"]
