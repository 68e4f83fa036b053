"""The inference engine of the attributions: batched, right-padded forward passes that read the
target scores of ``(row, position, target)`` pairs.

Both the attribution methods (:mod:`raylens.attributions.base`) and the faithfulness metrics
(:mod:`raylens.attributions.metrics`) score their perturbed inputs here, with the same packing,
padding and logit transform; only their defaults differ (the methods explain ``"logits"`` by
default, the metrics read a probability or log-probability, see their docstrings).

**Target score.** Classification: ``h(logits)[c]`` for class ``c``; causal LM:
``h(logits at position n_input - 1 + t)[target_t]`` with teacher forcing on
``input + target[:t]`` (:func:`teacher_forced`, :func:`target_pairs`). ``h`` is the inference
mode (:func:`transform`): ``"logits"`` (identity), ``"softmax"`` or ``"log_softmax"`` over the
classes or the vocabulary, computed in float32.

**Batching.** Rows are packed in the order given into batches of at most ``batch_size`` rows
(and at most ``max_batch_tokens`` padded tokens when given), right-padded with an attention mask
of 0 on padding (and ``position_ids`` from the mask for causal LMs), so padding never changes a
score. A causal LM computes logits only where they are read when its ``forward`` accepts
``logits_to_keep``: at exactly the positions read (``keep_logits="positions"``, the methods'
default), or at every position from the first one read to the end (``"tail"``, one slice: what
the metrics have always used). The two agree up to float rounding (the output projection runs on
a different number of rows); each caller keeps its own, so its scores stay exactly what they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from raylens.models.batching import split_on_oom

#: what the target score is read from: raw logits, probabilities or log-probabilities
INFERENCE_MODES = ("logits", "softmax", "log_softmax")
#: which logits a causal LM computes: exactly the positions read, or all from the first one on
KEEP_LOGITS = ("positions", "tail")


def default_replace_token_id(tokenizer: Any) -> int:
    """The token that stands in for a masked (removed) element: the tokenizer's mask token, else
    its pad token. The attribution methods and the metrics use the same rule.

    Raises:
        ValueError: the tokenizer has neither.
    """
    for attr in ("mask_token_id", "pad_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a mask nor a pad token: pass replace_token_id")


def transform(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """``logits`` ``(..., n_classes or vocab)`` as float32 logits, softmax or log-softmax over the
    last axis, by inference ``mode`` (one of :data:`INFERENCE_MODES`)."""
    logits = logits.float()
    if mode == "softmax":
        return logits.softmax(-1)
    if mode == "log_softmax":
        return logits.log_softmax(-1)
    return logits


def teacher_forced(task: str, input_ids: Sequence[int], targets: Sequence[int]) -> np.ndarray:
    """The token ids one forward runs on: ``input_ids`` for a classifier, ``input_ids ++
    targets[:-1]`` for a causal LM (the last target token is never an input). ``(length,)`` int64."""
    ids = list(input_ids) + (list(targets[:-1]) if task == "causal_lm" else [])
    return np.asarray(ids, dtype=np.int64)


def target_pairs(task: str, n_input: int, targets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, targets)``, each ``(n_targets,)`` int64: where each target's score is read
    (causal LM: position ``n_input - 1 + t``; classifier: 0, unused) and which class or token."""
    tgt = np.asarray(targets, dtype=np.int64)
    if task == "causal_lm":
        return n_input - 1 + np.arange(len(tgt)), tgt
    return np.zeros(len(tgt), dtype=np.int64), tgt


@dataclasses.dataclass
class RowBlock:
    """Token-id rows of the same length that read the same target pairs (e.g. the perturbations of
    one input).

    Attributes:
        ids: ``(n_rows, length)`` int64 token ids.
        pos: ``(n_pairs,)`` positions read (see :func:`target_pairs`).
        tok: ``(n_pairs,)`` class or token id of each pair.
    """

    ids: np.ndarray
    pos: np.ndarray
    tok: np.ndarray


class InferenceEngine:
    """Batched target scores of one model.

    Args:
        model: a Hugging Face ``*ForSequenceClassification`` or ``*ForCausalLM`` model.
        task: ``"sequence_classification"`` or ``"causal_lm"``.
        pad_id: the token id written at padded positions (masked: its value never matters).
        batch_size: most rows per forward pass.
        max_batch_tokens: also cap rows x padded length per batch (None: no cap).
        inference_mode: the default of :meth:`forward`'s ``mode`` (None: callers always pass one).
        progress: show a tqdm bar over batches (None: when there are several inputs and batches).
        keep_logits: ``"positions"`` or ``"tail"`` (see the module docstring).
    """

    def __init__(self, model: Any, task: str, *, pad_id: int, batch_size: int = 32,
                 max_batch_tokens: int | None = None, inference_mode: str | None = "logits",
                 progress: bool | None = None, keep_logits: str = "positions") -> None:
        if keep_logits not in KEEP_LOGITS:
            raise ValueError(f"keep_logits must be one of {KEEP_LOGITS}, got {keep_logits!r}")
        self.model = model
        self.task = task
        self.pad_id = int(pad_id)
        self.batch_size = int(batch_size)
        self.max_batch_tokens = max_batch_tokens
        self.inference_mode = inference_mode
        self.progress = progress
        self.keep_logits = keep_logits
        try:
            fwd = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            fwd = {}
        self.logits_to_keep = "logits_to_keep" in fwd
        self.position_ids = "position_ids" in fwd

    @property
    def device(self) -> torch.device:
        """Where the input embeddings live (inputs are sent there)."""
        return self.model.get_input_embeddings().weight.device

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode inside the block, its former mode restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def pack(self, lengths: Sequence[int], weights: Sequence[int] | None = None) -> list[list[int]]:
        """Consecutive jobs (of the given padded ``lengths``) grouped into batches of at most
        ``batch_size`` rows and ``max_batch_tokens`` padded tokens; a job of weight ``w`` counts as
        ``w`` rows (a job always fits alone). Returns the job indices of each batch."""
        batches: list[list[int]] = []
        cur: list[int] = []
        width = rows = 0
        for j, n in enumerate(lengths):
            wj = 1 if weights is None else max(1, int(weights[j]))
            w = max(width, n)
            if cur and (rows + wj > self.batch_size
                        or (self.max_batch_tokens is not None and w * (rows + wj) > self.max_batch_tokens)):
                batches.append(cur)
                cur, w, rows = [], n, 0
            cur.append(j)
            width, rows = w, rows + wj
        if cur:
            batches.append(cur)
        return batches

    def bar(self, total: int, n_inputs: int, desc: str) -> Any:
        """A tqdm bar over ``total`` batches (shown per :attr:`progress`)."""
        from tqdm.auto import tqdm

        if self.progress is None:
            disable = None if (n_inputs > 1 and total > 1) else True
        else:
            disable = not self.progress
        return tqdm(total=total, desc=desc, unit="batch", disable=disable, leave=False)

    def forward(self, attention_mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor, *,
                input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                mode: str | None = None) -> torch.Tensor:
        """Scores ``(n_pairs,)`` float32 of the pairs ``(rows[k], pos[k], tok[k])`` of one batch.

        Args:
            attention_mask: ``(n_rows, width)``, 1 on real tokens, 0 on padding.
            rows, pos, tok: ``(n_pairs,)`` batch row, position read (causal LM) and class or token.
            input_ids: ``(n_rows, width)`` token ids, or
            inputs_embeds: ``(n_rows, width, d_model)`` input embeddings.
            mode: the inference mode (default :attr:`inference_mode`).
        """
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        else:
            kwargs["inputs_embeds"] = inputs_embeds
        if self.task == "causal_lm":
            kwargs["use_cache"] = False
            if self.position_ids:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            index = pos
            width = attention_mask.shape[1]
            if self.logits_to_keep and self.keep_logits == "tail":
                kwargs["logits_to_keep"] = width - int(pos.min())
            elif self.logits_to_keep:
                keep = torch.unique(pos)
                kwargs["logits_to_keep"] = keep
                index = torch.searchsorted(keep, pos)
            logits = self.model(**kwargs).logits
            if self.keep_logits == "tail":
                index = pos - (width - logits.shape[1])  # logits[:, 0] is position width - n_kept
            vec = logits[rows.to(logits.device), index.to(logits.device)]
        else:
            logits = self.model(**kwargs).logits
            vec = logits[rows.to(logits.device)]
        # with device_map="auto" the logits may live on another device than the embeddings
        return transform(vec, mode or self.inference_mode).gather(-1, tok.to(vec.device)[:, None])[:, 0]

    @torch.inference_mode()
    def score_blocks(self, blocks: Sequence[RowBlock], *, desc: str = "", n_inputs: int | None = None,
                     mode: str | None = None) -> list[np.ndarray]:
        """Target scores of token-id rows: one ``(n_rows, n_pairs)`` float64 array per block.

        Rows are packed in block order (put similar lengths next to each other for little padding
        work); ``n_inputs`` (default: the number of blocks) only decides whether a bar is shown.
        A batch that runs out of device memory is split in halves and retried
        (:func:`raylens.models.batching.split_on_oom`).
        """
        out = [np.zeros((b.ids.shape[0], len(b.tok))) for b in blocks]
        jobs = [(i, r) for i, b in enumerate(blocks) for r in range(b.ids.shape[0])]
        batches = self.pack([blocks[i].ids.shape[1] for i, _ in jobs])
        with self.bar(len(batches), len(blocks) if n_inputs is None else n_inputs, desc) as bar:
            for batch in batches:
                here = [jobs[j] for j in batch]
                scores = np.concatenate(split_on_oom(  # out of memory: halves, retried (nothing lost)
                    lambda part: self._score_batch([(blocks[i], r) for i, r in part], mode), here,
                    what="forward batch"))
                offset = 0
                for i, r in here:
                    n = len(blocks[i].tok)
                    out[i][r] = scores[offset: offset + n]
                    offset += n
                bar.update(1)
        return out

    def _score_batch(self, rows: list[tuple[RowBlock, int]], mode: str | None) -> np.ndarray:
        """Scores ``(n_pairs,)`` float64 of one batch of ``(block, row index)``, pairs in row order."""
        width = max(b.ids.shape[1] for b, _ in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        which, pos, tok = [], [], []
        for q, (b, r) in enumerate(rows):
            ids[q, : b.ids.shape[1]] = b.ids[r]
            mask[q, : b.ids.shape[1]] = 1
            which.append(np.full(len(b.tok), q))
            pos.append(b.pos)
            tok.append(b.tok)
        dev = self.device
        return self.forward(
            torch.from_numpy(mask).to(dev), torch.from_numpy(np.concatenate(which)).to(dev),
            torch.from_numpy(np.concatenate(pos)).to(dev), torch.from_numpy(np.concatenate(tok)).to(dev),
            input_ids=torch.from_numpy(ids).to(dev), mode=mode,
        ).double().cpu().numpy()


__all__ = ["INFERENCE_MODES", "KEEP_LOGITS", "InferenceEngine", "RowBlock", "default_replace_token_id", "target_pairs",
           "teacher_forced", "transform"]
