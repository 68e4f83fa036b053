"""The attribution engine: preparing inputs and targets, batched inference, and the two method
families (perturbation in token-id space, gradients in embedding space).

An explainer is built once (``explainer = Occlusion(model, tokenizer, ...)``) and called on texts
(``explainer(texts, targets)``), which returns one
:class:`~raylens.attributions.output.AttributionOutput` per text. A method is a perturbator
(:mod:`raylens.attributions.perturbations`) plus an aggregator
(:mod:`raylens.attributions.aggregators`); this module runs the inference between them.

**Tasks** are read from the model, not from class names: a
:class:`~raylens.models.loading.LoadedModel`'s ``task``, else the architectures recorded in the
config, else the transformers auto-class mapping of the config type; ``task=`` overrides.

**Targets.**

* Sequence classification: ``None`` explains the predicted class (argmax of the logits of the
  unperturbed input); an ``int`` explains that class for every input; for one text a list of
  class indices explains several classes at once (one row of scores each); for a list of texts,
  a list with one entry per text (an int, a list of ints, or None). A ``(n_texts, k)`` tensor or
  array works too.
* Causal LM: a target is the output text to explain (a ``str``, tokenised as a continuation of
  the input: the tokens of ``input + target`` after the input's tokens when the input's tokens
  are a prefix of them, else the target tokenised alone without special tokens) or its token ids.
  ``None`` generates ``max_new_tokens`` tokens greedily from the input alone (one input at a
  time, so targets do not depend on batching) and stops before the first end-of-sequence token.
  Each row of scores explains one target token; scores cover the input elements only.

**Target score.** Classification: ``h(logits)[c]``; causal LM: ``h(logits at position
n_input - 1 + t)[target_t]`` with teacher forcing on ``input + target[:t]``. ``h`` is the
``inference_mode``: ``"logits"`` (identity, default), ``"softmax"`` or ``"log_softmax"`` over
the classes or the vocabulary.

**Batching.** Rows (perturbations of one or many inputs) are packed in order into batches of at
most ``batch_size`` rows (and at most ``max_batch_tokens`` padded tokens when given), right-padded
with an attention mask of 0 on padding (and ``position_ids`` from the mask for causal LMs), so
padding never changes a score. Inputs are processed longest first. Perturbation methods score all
target tokens of a causal LM in one forward over ``input + target[:-1]``.

**Special tokens** (those the tokenizer adds, and special tokens written in the text such as
``<|im_start|>``) are never elements and never perturbed unless ``include_special_tokens=True``.

**Long inputs.** ``max_length`` defaults to the model's limit (the config's
``max_position_embeddings`` and the tokenizer's ``model_max_length``, the smaller). Longer
classification inputs are truncated to it (special tokens kept) with a warning; a causal-LM
input whose ``input + target[:-1]`` is longer raises ``ValueError`` (truncating would change what
the target continues).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from raylens.attributions.aggregators import GradientAggregator, MaskAggregator
from raylens.attributions.elements import GRANULARITIES, Element, split_elements
from raylens.attributions.output import AttributionOutput
from raylens.attributions.perturbations import EmbeddingContext, EmbeddingPerturbator, MaskPerturbator

log = logging.getLogger(__name__)

INFERENCE_MODES = ("logits", "softmax", "log_softmax")
TASKS = ("sequence_classification", "causal_lm")
BASELINES = ("zero", "pad", "mask")


# ----------------------------------------------------------------------------- model and task


def default_replace_token_id(tokenizer: Any) -> int:
    """The token that stands in for a masked element: the tokenizer's mask token, else its pad
    token (the same rule as :mod:`raylens.attributions.metrics`).

    Raises:
        ValueError: the tokenizer has neither.
    """
    for attr in ("mask_token_id", "pad_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a mask nor a pad token: pass replace_token_id")


def resolve_task(model: Any, task: str | None = None) -> str:
    """``"causal_lm"`` or ``"sequence_classification"`` for a Hugging Face model.

    Order: ``task`` when given; the config's ``architectures``
    (:func:`raylens.models.loading.detect_task`); the transformers auto mapping of the config type
    (a model built with ``from_config`` has no ``architectures``).

    Raises:
        ValueError: the model has no classification or language-modelling head.
    """
    if task is None:
        from raylens.models.loading import detect_task

        config = getattr(model, "config", None)
        task = detect_task(config) if config is not None else "base"
        if task == "base" and config is not None:
            from transformers.models.auto.modeling_auto import (
                MODEL_FOR_CAUSAL_LM_MAPPING,
                MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
            )

            for name, mapping in (("causal_lm", MODEL_FOR_CAUSAL_LM_MAPPING),
                                  ("sequence_classification", MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)):
                try:
                    if isinstance(model, mapping[type(config)]):
                        task = name
                        break
                except (KeyError, ValueError):
                    continue
    if task not in TASKS:
        raise ValueError(f"cannot explain a model of task {task!r}: attributions need a sequence classifier "
                         f"or a causal LM ({TASKS}); pass task= if the model has such a head")
    return task


def _model_limit(model: Any, tokenizer: Any) -> int | None:
    limits = []
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        limits.append(n)
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 1_000_000:
        limits.append(n)
    return min(limits) if limits else None


def _as_list(x: Any) -> Any:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.tolist()
    return x


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- prepared inputs


@dataclasses.dataclass
class PreparedInput:
    """One input ready for inference.

    Attributes:
        index: position in the call's inputs.
        text: the text.
        input_ids: the tokenised input (special tokens included; for causal LMs the prompt only).
        elements: the elements at the explainer's granularity.
        targets: class indices or target token ids (None until resolved).
        key: a stable hash of the input ids (seeds the random perturbations of this input).
        token_element: ``(n_input_tokens,)`` element index of each token, -1 for none.
        target_scores: the target scores of the unperturbed input, once known.
    """

    index: int
    text: str
    input_ids: list[int]
    elements: list[Element]
    targets: list[int] | None
    key: int
    token_element: np.ndarray
    target_scores: np.ndarray | None = None

    @property
    def n_in(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return len(self.targets or [])


# ----------------------------------------------------------------------------- the explainer


class AttributionExplainer:
    """Base class of the attribution methods (see the module docstring for targets, scores,
    batching and long inputs).

    Args:
        model: a :class:`~raylens.models.loading.LoadedModel`, or a Hugging Face
            ``*ForSequenceClassification`` / ``*ForCausalLM`` model (then pass ``tokenizer``).
        tokenizer: its fast tokenizer (default: the ``LoadedModel``'s).
        granularity: ``"token"``, ``"word"`` (default) or ``"sentence"``
            (:mod:`raylens.attributions.elements`).
        batch_size: rows per forward pass.
        max_batch_tokens: also cap rows x padded length per batch (None: no cap).
        inference_mode: ``"logits"`` (default), ``"softmax"`` or ``"log_softmax"``.
        replace_token_id: the token that replaces masked elements (perturbation methods) and whose
            embedding is the ``"mask"`` baseline; default: the mask token, else the pad token.
        include_special_tokens: make special tokens elements of their own (default: excluded,
            never perturbed).
        max_length: token limit of an input (causal LM: of ``input + target[:-1]``); default the
            model's.
        max_new_tokens: tokens generated when a causal-LM target is None (default 10).
        task: force ``"sequence_classification"`` or ``"causal_lm"``.
        seed: seed of the random perturbations (same seed, same scores); None draws a fresh one.
        progress: show a tqdm bar over batches (None: when there are several inputs and batches).

    Raises:
        ValueError: bad parameter, slow tokenizer, or a model with no head to explain.
    """

    #: whether the method draws random numbers (then ``params`` records the seed used)
    _stochastic: bool = False

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        granularity: str = "word",
        batch_size: int = 32,
        max_batch_tokens: int | None = None,
        inference_mode: str = "logits",
        replace_token_id: int | None = None,
        include_special_tokens: bool = False,
        max_length: int | None = None,
        max_new_tokens: int = 10,
        task: str | None = None,
        seed: int | None = 0,
        progress: bool | None = None,
    ) -> None:
        if hasattr(model, "model") and hasattr(model, "tokenizer") and hasattr(model, "task"):  # LoadedModel
            tokenizer = tokenizer if tokenizer is not None else model.tokenizer
            task = task or (model.task if model.task in TASKS else None)
            model = model.model
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a bare Hugging Face model (or pass a LoadedModel)")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("attributions need a fast tokenizer (character offsets); load it with use_fast=True")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES}, got {inference_mode!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens!r}")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.task = resolve_task(model, task)
        self.granularity = granularity
        self.batch_size = int(batch_size)
        self.max_batch_tokens = max_batch_tokens
        self.inference_mode = inference_mode
        self.replace_token_id = int(replace_token_id) if replace_token_id is not None else default_replace_token_id(tokenizer)
        self.include_special_tokens = bool(include_special_tokens)
        self.max_length = max_length if max_length is not None else _model_limit(model, tokenizer)
        self.max_new_tokens = int(max_new_tokens)
        self.seed = seed
        self.progress = progress
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.replace_token_id  # masked out anyway
        try:
            fwd = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            fwd = {}
        self._logits_to_keep = "logits_to_keep" in fwd
        self._position_ids = "position_ids" in fwd
        if self.task == "sequence_classification":
            self.n_classes = int(model.config.num_labels)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])

    # ---- public ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _recorded_params(self, seed: int) -> dict[str, Any]:
        p = self.params()
        if "seed" in p:
            p["seed"] = seed  # the seed actually used (drawn when ``seed=None``)
        return p

    def params(self) -> dict[str, Any]:
        """The parameters recorded in each output's ``params``."""
        p = {"inference_mode": self.inference_mode, "replace_token_id": self.replace_token_id,
             "include_special_tokens": self.include_special_tokens}
        if self._stochastic:
            p["seed"] = self.seed
        return p

    def __call__(self, inputs: str | Sequence[str], targets: Any = None) -> list[AttributionOutput]:
        """Explain ``inputs`` (a text or a list of texts) for ``targets``.

        Returns:
            One :class:`AttributionOutput` per text, in input order, scores ``(n_targets, n_elements)``.

        Raises:
            ValueError: an empty text (or one with no element), targets of the wrong shape, class
                indices or token ids out of range, or a causal-LM input too long.
            TypeError: inputs that are not strings.
        """
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"input {i} is a {type(t).__name__}, not a str")
        if not texts:
            return []
        per_input = self._split_targets(targets, len(texts), single)
        seed = self.seed if self.seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
        was_training = self.model.training
        self.model.eval()
        try:
            items = [self._prepare(i, t, tg) for i, (t, tg) in enumerate(zip(texts, per_input))]
            pending = [it for it in items if it.targets is None]
            if pending:  # classification: predicted class; causal LM: greedy generation
                if self.task == "sequence_classification":
                    self._clean_pass(pending, all_classes=True)
                else:
                    for it in pending:
                        it.targets = self._generate(it)
            scores = self._explain(items, seed)
            missing = [it for it in items if it.target_scores is None]
            if missing:
                self._clean_pass(missing)
        finally:
            self.model.train(was_training)
        return [self._output(it, sc, seed) for it, sc in zip(items, scores)]

    explain = __call__

    def generate(self, inputs: str | Sequence[str]) -> list[list[int]]:
        """The greedy continuations a call with ``targets=None`` explains (causal LMs only): one
        list of output token ids per input, at most ``max_new_tokens`` long, cut before the first
        end-of-sequence token. Generating once and passing the ids as targets to several methods
        explains the same output with each of them.

        Raises:
            ValueError: the model is not a causal LM, or an input is empty or too long.
        """
        if self.task != "causal_lm":
            raise ValueError(f"generate() needs a causal LM, this model's task is {self.task!r}")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        was_training = self.model.training
        self.model.eval()
        try:
            return [self._generate(self._prepare(i, t, None)) for i, t in enumerate(texts)]
        finally:
            self.model.train(was_training)

    def validate(self, inputs: str | Sequence[str], targets: Any = None) -> list[str | None]:
        """Check inputs and targets without running the model: one error message per input (None
        when it can be explained). For jobs that record bad rows instead of failing a batch;
        :meth:`__call__` raises the same messages. Greedy generation (causal-LM target None) is
        not run, so its length is assumed to be ``max_new_tokens``.

        Raises:
            ValueError: targets whose shape does not match the inputs (an error of the call, not of
                one input).
        """
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        per_input = self._split_targets(targets, len(texts), single)
        errors: list[str | None] = []
        for i, (t, tg) in enumerate(zip(texts, per_input)):
            try:
                if not isinstance(t, str):
                    raise TypeError(f"input {i} is a {type(t).__name__}, not a str")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._prepare(i, t, tg)
                errors.append(None)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        return errors

    # ---- to implement ------------------------------------------------------------
    def _explain(self, items: list[PreparedInput], seed: int) -> list[np.ndarray]:
        """Element scores ``(n_targets, n_elements)`` per item; may set ``item.target_scores``."""
        raise NotImplementedError

    # ---- inputs and targets ------------------------------------------------------
    def _split_targets(self, targets: Any, n: int, single: bool) -> list[Any]:
        """One raw target spec per input."""
        targets = _as_list(targets)
        if targets is None:
            return [None] * n
        if self.task == "sequence_classification":
            if _is_int(targets):
                return [[int(targets)]] * n
            if not isinstance(targets, (list, tuple)):
                raise ValueError(f"classification targets must be None, an int or a list, got {type(targets).__name__}")
            if single:
                if len(targets) == 1 and isinstance(targets[0], (list, tuple)):
                    targets = targets[0]
                return [list(targets)]
            if len(targets) != n:
                raise ValueError(f"{len(targets)} targets for {n} inputs: give one entry (class index, list of "
                                 f"class indices, or None) per input")
            return [None if t is None else ([t] if _is_int(t) else list(_as_list(t))) for t in targets]
        # causal LM
        if isinstance(targets, str):
            if n != 1:
                raise ValueError(f"one target text for {n} inputs: give a list with one target per input")
            return [targets]
        if not isinstance(targets, (list, tuple)):
            raise ValueError(f"causal-LM targets must be None, a str, token ids or a list, got {type(targets).__name__}")
        if single:
            if targets and all(_is_int(t) for t in targets):
                return [list(targets)]
            if len(targets) == 1:
                return [_as_list(targets[0])]
            raise ValueError("for one input, targets must be a str or a list of token ids")
        if len(targets) != n:
            raise ValueError(f"{len(targets)} targets for {n} inputs: give one target (str, token ids or None) per input")
        return [_as_list(t) for t in targets]

    def _prepare(self, index: int, text: str, target: Any) -> PreparedInput:
        if not text.strip():
            raise ValueError(f"input {index} is empty")
        tok = self.tokenizer
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
        limit = self.max_length
        if self.task == "sequence_classification" and limit is not None and len(enc["input_ids"]) > limit:
            warnings.warn(f"input {index} has {len(enc['input_ids'])} tokens: truncated to max_length={limit}",
                          stacklevel=3)
            enc = tok(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
                      truncation=True, max_length=limit)
        ids = [int(i) for i in enc["input_ids"]]
        special_ids = set(getattr(tok, "all_special_ids", []) or [])
        special = [int(sp or t in special_ids) for sp, t in zip(enc["special_tokens_mask"], ids)]
        names = tok.convert_ids_to_tokens(ids) if self.include_special_tokens else None
        elements = split_elements(text, [tuple(o) for o in enc["offset_mapping"]], special, self.granularity,
                                  special_tokens=names)
        if not elements:
            raise ValueError(f"input {index} has no {self.granularity} to attribute to: {text!r}")
        token_element = np.full(len(ids), -1, dtype=np.int64)
        for e, el in enumerate(elements):
            token_element[list(el.tokens)] = e
        item = PreparedInput(index=index, text=text, input_ids=ids, elements=elements, targets=None,
                             key=zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes()), token_element=token_element)
        if target is not None:
            item.targets = self._resolve_target(index, text, ids, target)
        if self.task == "causal_lm" and limit is not None:
            n_tgt = len(item.targets) if item.targets is not None else self.max_new_tokens
            if len(ids) + n_tgt - 1 > limit:
                raise ValueError(f"input {index}: {len(ids)} input tokens + {n_tgt} target tokens exceed "
                                 f"max_length={limit}; shorten the text or raise max_length")
        return item

    def _resolve_target(self, index: int, text: str, ids: list[int], target: Any) -> list[int]:
        if self.task == "sequence_classification":
            out = []
            for c in target:
                if not _is_int(c):
                    raise ValueError(f"input {index}: class target {c!r} is not an int")
                if not 0 <= int(c) < self.n_classes:
                    raise ValueError(f"input {index}: class {c} out of range: the model has {self.n_classes} classes")
                out.append(int(c))
            if not out:
                raise ValueError(f"input {index}: empty list of classes")
            return out
        if isinstance(target, str):
            if not target:
                raise ValueError(f"input {index}: empty target text")
            full = self.tokenizer(text + target, add_special_tokens=True, return_special_tokens_mask=True)
            f_ids, f_sp = list(full["input_ids"]), list(full["special_tokens_mask"])
            if f_ids[: len(ids)] == ids:
                out = [int(t) for t, sp in zip(f_ids[len(ids):], f_sp[len(ids):]) if not sp]
            else:
                out = [int(t) for t in self.tokenizer(target, add_special_tokens=False)["input_ids"]]
        else:
            if not isinstance(target, (list, tuple)) or not all(_is_int(t) for t in target):
                raise ValueError(f"input {index}: a causal-LM target must be a str or a list of token ids, got {target!r}")
            out = [int(t) for t in target]
        if not out:
            raise ValueError(f"input {index}: the target has no tokens")
        bad = [t for t in out if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input {index}: target token ids {bad} out of range (vocabulary of {self.vocab_size})")
        return out

    @torch.no_grad()
    def _generate(self, item: PreparedInput) -> list[int]:
        from transformers import GenerationConfig

        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        eos_set = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        cfg = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                               eos_token_id=eos)
        ids = torch.tensor([item.input_ids], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        new = [int(t) for t in out[0, ids.shape[1]:]]
        cut = next((j for j, t in enumerate(new) if t in eos_set), len(new))
        return new[:cut] if cut > 0 else new[:1]

    # ---- inference ---------------------------------------------------------------
    def _pack(self, lengths: Sequence[int], weights: Sequence[int] | None = None) -> list[list[int]]:
        """Consecutive jobs grouped into batches of at most ``batch_size`` rows and
        ``max_batch_tokens`` padded tokens; a job of weight ``w`` counts as ``w`` rows (a job always
        fits alone)."""
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

    def _bar(self, total: int, n_inputs: int, desc: str):
        from tqdm.auto import tqdm

        if self.progress is None:
            disable = None if (n_inputs > 1 and total > 1) else True
        else:
            disable = not self.progress
        return tqdm(total=total, desc=desc, unit="batch", disable=disable, leave=False)

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.inference_mode == "softmax":
            return logits.softmax(-1)
        if self.inference_mode == "log_softmax":
            return logits.log_softmax(-1)
        return logits

    def _forward(self, attention_mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor,
                 *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``(n_pairs,)`` float32 of the pairs ``(row, position, token or class)`` of one batch."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        else:
            kwargs["inputs_embeds"] = inputs_embeds
        if self.task == "causal_lm":
            kwargs["use_cache"] = False
            if self._position_ids:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            index = pos
            if self._logits_to_keep:
                keep = torch.unique(pos)
                kwargs["logits_to_keep"] = keep
                index = torch.searchsorted(keep, pos)
            logits = self.model(**kwargs).logits
            vec = logits[rows.to(logits.device), index.to(logits.device)]
        else:
            logits = self.model(**kwargs).logits
            vec = logits[rows.to(logits.device)]
        # with device_map="auto" the logits may live on another device than the embeddings
        return self._transform(vec).gather(-1, tok.to(vec.device)[:, None])[:, 0]

    def _sequence(self, item: PreparedInput) -> np.ndarray:
        ids = item.input_ids + (item.targets[:-1] if self.task == "causal_lm" else [])
        return np.asarray(ids, dtype=np.int64)

    def _pairs(self, item: PreparedInput, targets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        tgt = np.asarray(item.targets if targets is None else targets, dtype=np.int64)
        if self.task == "causal_lm":
            return item.n_in - 1 + np.arange(len(tgt)), tgt
        return np.zeros(len(tgt), dtype=np.int64), tgt

    @torch.inference_mode()
    def _score_masks(self, items: list[PreparedInput], keeps: list[np.ndarray], *,
                     all_classes: bool = False, desc: str = "") -> list[np.ndarray]:
        """Scores ``(n_rows, n_targets)`` float64 of masked variants of each item (``keeps[i]`` is
        ``(n_rows, n_elements)``, True = element kept); ``all_classes``: score every class."""
        dev = self.device
        seqs = [self._sequence(it) for it in items]
        pairs = [self._pairs(it, np.arange(self.n_classes) if all_classes else None) for it in items]
        out = [np.zeros((k.shape[0], len(p[1]))) for k, p in zip(keeps, pairs)]
        jobs = [(i, r) for i in range(len(items)) for r in range(keeps[i].shape[0])]
        batches = self._pack([len(seqs[i]) for i, _ in jobs])
        with self._bar(len(batches), len(items), desc) as bar:
            for batch in batches:
                width = max(len(seqs[jobs[j][0]]) for j in batch)
                ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(batch), width), dtype=np.int64)
                rows, pos, tok, where = [], [], [], []
                b = 0
                while b < len(batch):  # contiguous rows of one item
                    i = jobs[batch[b]][0]
                    e = b
                    while e < len(batch) and jobs[batch[e]][0] == i:
                        e += 1
                    it, seq = items[i], seqs[i]
                    r = np.array([jobs[j][1] for j in batch[b:e]])
                    kept = keeps[i][r][:, np.maximum(it.token_element, 0)] | (it.token_element < 0)[None, :]
                    block = np.repeat(seq[None, :], e - b, axis=0)
                    block[:, : it.n_in] = np.where(kept, block[:, : it.n_in], self.replace_token_id)
                    ids[b:e, : len(seq)] = block
                    mask[b:e, : len(seq)] = 1
                    p, t = pairs[i]
                    for q in range(b, e):
                        rows.append(np.full(len(t), q))
                        pos.append(p)
                        tok.append(t)
                        where.append((i, r[q - b]))
                    b = e
                scores = self._forward(
                    torch.from_numpy(mask).to(dev), torch.from_numpy(np.concatenate(rows)).to(dev),
                    torch.from_numpy(np.concatenate(pos)).to(dev), torch.from_numpy(np.concatenate(tok)).to(dev),
                    input_ids=torch.from_numpy(ids).to(dev),
                ).double().cpu().numpy()
                offset = 0
                for i, r in where:
                    n = out[i].shape[1]
                    out[i][r] = scores[offset: offset + n]
                    offset += n
                bar.update(1)
        return out

    def _clean_pass(self, items: list[PreparedInput], all_classes: bool = False) -> None:
        """Score the unperturbed inputs: sets ``target_scores`` (and, with ``all_classes``, the
        predicted class as the target of items that have none)."""
        keeps = [np.ones((1, len(it.elements)), dtype=bool) for it in items]
        scores = self._score_masks(items, keeps, all_classes=all_classes, desc="predict")
        for it, s in zip(items, scores):
            if all_classes:
                if it.targets is None:
                    it.targets = [int(np.argmax(s[0]))]
                it.target_scores = s[0][it.targets]
            else:
                it.target_scores = s[0]

    def _output(self, item: PreparedInput, scores: np.ndarray, seed: int) -> AttributionOutput:
        if self.task == "sequence_classification":
            id2label = getattr(self.model.config, "id2label", None) or {}
            labels = [str(id2label.get(c, id2label.get(str(c), c))) for c in item.targets]
        else:
            labels = [self.tokenizer.decode([t]) for t in item.targets]
        return AttributionOutput(
            text=item.text, task=self.task, granularity=self.granularity,
            elements=[el.text for el in item.elements], element_spans=[el.span for el in item.elements],
            element_tokens=[list(el.tokens) for el in item.elements], input_ids=list(item.input_ids),
            scores=np.asarray(scores, dtype=np.float32), targets=list(item.targets), target_labels=labels,
            method=type(self).__name__, params=self._recorded_params(seed),
            target_scores=None if item.target_scores is None else np.asarray(item.target_scores, np.float32),
        )

    def _order(self, items: list[PreparedInput]) -> list[int]:
        """Items longest first (batches hold similar lengths)."""
        return sorted(range(len(items)), key=lambda i: -(items[i].n_in + items[i].n_targets))


class PerturbationExplainer(AttributionExplainer):
    """Perturbation methods: a :class:`MaskPerturbator` builds keep-masks over the elements, the
    masked token ids are scored in batches, a :class:`MaskAggregator` maps the scores to element
    scores (native at every granularity: whole elements are masked)."""

    _stochastic = True

    def __init__(self, model: Any, tokenizer: Any = None, *, perturbator: MaskPerturbator,
                 aggregator: MaskAggregator, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.perturbator = perturbator
        self.aggregator = aggregator

    def params(self) -> dict[str, Any]:
        return {**self.perturbator.params(), **self.aggregator.params(), **super().params()}

    def _explain(self, items: list[PreparedInput], seed: int) -> list[np.ndarray]:
        order = self._order(items)
        plans = {}
        for i in order:
            rng = np.random.default_rng([seed, items[i].key])
            plans[i] = self.perturbator.masks(len(items[i].elements), rng)
        sub = [items[i] for i in order]
        scores = self._score_masks(sub, [plans[i][0] for i in order], desc=type(self).__name__)
        out: list[np.ndarray] = [np.zeros(0)] * len(items)
        for i, s in zip(order, scores):
            keep, info = plans[i]
            out[i] = self.aggregator.aggregate(keep, s, info)
            if self.perturbator.first_row_is_clean:
                items[i].target_scores = s[0]
        return out


class GradientExplainer(AttributionExplainer):
    """Gradient methods: an :class:`EmbeddingPerturbator` builds input embeddings, each row's
    target scores are differentiated with respect to them, a :class:`GradientAggregator` turns the
    gradients into **token** scores, and each element's score is the **sum of its tokens'
    scores** (the granularity rule of every gradient method).

    Cost and batching. Each perturbed row is one forward over the input (causal LM:
    ``input + target[:-1]``, all ``T`` target tokens scored in that forward, teacher forcing);
    the target prefix and special tokens keep their embeddings. One backward pass serves a whole
    batch: the batch's target scores are differentiated by a single ``torch.autograd.grad`` call
    (rows do not interact, so each row receives its own gradient). With ``T > 1`` targets (several
    classes, or several target tokens) that call is vectorised over the targets
    (``is_grads_batched=True``: ``T`` one-hot output gradients through one graph, about
    ``F + T x B`` per row instead of ``T x (F + B)`` for separate rows; measured 1.75x faster than
    stacking target rows for SmolLM2 with 5 targets on CPU). If an operation of the model has no
    vectorised backward, the call falls back to ``T`` backward passes over the same graph.
    ``batch_size`` counts forward rows, as for every method; the vectorised backward holds
    ``min(T, target_chunk)`` gradients of the batch at once, so ``target_chunk`` bounds its
    memory (targets beyond it go through further vectorised passes over the same graph).
    (Counting a row ``T`` times against ``batch_size`` instead, as this class did first, left
    batches of 2 rows for 8 target tokens and ran IntegratedGradients on SmolLM2 at 1.6x
    Interpreto's speed instead of the 1.9x it reaches with 3 targets.)

    Args:
        baseline: the reference embedding of element tokens (IG's baseline, GradientSHAP's
            baseline centre): ``"zero"`` (zero vector), ``"pad"`` (the pad token's embedding),
            ``"mask"`` (the ``replace_token_id`` token's embedding) or a token id.
        target_chunk: most target gradients computed in one vectorised backward (default 16).
    """

    #: whether the method uses the reference embedding (recorded in params)
    _uses_baseline: bool = False

    def __init__(self, model: Any, tokenizer: Any = None, *, perturbator: EmbeddingPerturbator,
                 aggregator: GradientAggregator, baseline: str | int = "zero", target_chunk: int = 16,
                 **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if not _is_int(target_chunk) or target_chunk < 1:
            raise ValueError(f"target_chunk must be an int >= 1, got {target_chunk!r}")
        self.target_chunk = int(target_chunk)
        if not (_is_int(baseline) or baseline in BASELINES):
            raise ValueError(f"baseline must be one of {BASELINES} or a token id, got {baseline!r}")
        if baseline == "pad" and getattr(self.tokenizer, "pad_token_id", None) is None:
            raise ValueError("baseline='pad' but the tokenizer has no pad token")
        self.perturbator = perturbator
        self.aggregator = aggregator
        self.baseline = baseline

    def params(self) -> dict[str, Any]:
        p = {**self.perturbator.params(), **self.aggregator.params(), **super().params()}
        if self._uses_baseline:
            p["baseline"] = self.baseline
        return p

    def _context(self, item: PreparedInput, seed: int) -> EmbeddingContext:
        emb = self.model.get_input_embeddings()
        ids = torch.tensor(item.input_ids, device=self.device)
        with torch.no_grad():
            x = emb(ids).float()
            if self.baseline == "zero":
                ref = torch.zeros_like(x)
            else:
                tid = {"pad": self.tokenizer.pad_token_id, "mask": self.replace_token_id}.get(self.baseline, self.baseline)
                ref = emb(torch.full_like(ids, int(tid))).float()
        movable = torch.as_tensor(item.token_element >= 0, dtype=torch.float32, device=self.device)[:, None]

        def generator(row: int) -> torch.Generator:
            state = np.random.SeedSequence([seed, item.key, row]).generate_state(2)
            return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

        return EmbeddingContext(x=x, reference=ref, movable=movable, generator=generator)

    def _backward(self, scores: torch.Tensor, which: torch.Tensor, n_targets: int,
                  embeds: torch.Tensor) -> torch.Tensor:
        """``(n_targets, *embeds.shape)``: gradient of ``sum(scores[which == t])`` for each ``t``, in
        one (vectorised) backward pass."""
        if n_targets == 1:
            return torch.autograd.grad(scores.sum(), embeds)[0][None]
        onehot = torch.zeros((n_targets, scores.shape[0]), dtype=scores.dtype, device=scores.device)
        onehot[which.to(scores.device), torch.arange(scores.shape[0], device=scores.device)] = 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vmap's "no batching rule, falling back" warnings
                chunks = [torch.autograd.grad(scores, embeds, grad_outputs=onehot[c: c + self.target_chunk],
                                              is_grads_batched=True, retain_graph=True)[0]
                          for c in range(0, n_targets, self.target_chunk)]
                return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        except RuntimeError as exc:  # an op without a vectorised backward: one pass per target
            log.debug("vectorised backward failed (%s); one backward per target", exc)
            return torch.stack([torch.autograd.grad(scores, embeds, grad_outputs=onehot[t], retain_graph=True)[0]
                                for t in range(n_targets)])

    def _explain(self, items: list[PreparedInput], seed: int) -> list[np.ndarray]:
        pert, agg = self.perturbator, self.aggregator
        emb_layer = self.model.get_input_embeddings()
        dtype = emb_layer.weight.dtype
        dev = self.device
        d = emb_layer.weight.shape[1]
        seqs = [self._sequence(it) for it in items]
        pairs = [self._pairs(it) for it in items]
        jobs = [(i, k) for i in self._order(items) for k in range(pert.n_rows)]
        batches = self._pack([len(seqs[i]) for i, _ in jobs])
        sums: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        clean: dict[int, np.ndarray] = {}
        contexts: dict[int, EmbeddingContext] = {}
        with self._bar(len(batches), len(items), type(self).__name__) as bar:
            for batch in batches:
                rows = [jobs[j] for j in batch]
                in_batch = list(dict.fromkeys(i for i, _ in rows))
                contexts = {i: contexts.get(i) or self._context(items[i], seed) for i in in_batch}
                width = max(len(seqs[i]) for i in in_batch)
                embeds = torch.zeros((len(rows), width, d), dtype=dtype, device=dev)
                mask = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
                infos: dict[int, tuple[list[int], dict[str, torch.Tensor]]] = {}
                p_row, p_pos, p_tok, p_t = [], [], [], []
                with torch.no_grad():
                    for i in in_batch:  # rows of one item are contiguous
                        it, seq = items[i], seqs[i]
                        sel = [r for r, (ii, _) in enumerate(rows) if ii == i]
                        e, info = pert.rows(contexts[i], [rows[r][1] for r in sel])
                        a, b = sel[0], sel[-1] + 1
                        embeds[a:b, : it.n_in] = e.to(dtype)
                        if len(seq) > it.n_in:  # causal LM: the target prefix, never perturbed
                            embeds[a:b, it.n_in: len(seq)] = emb_layer(torch.from_numpy(seq[it.n_in:]).to(dev))
                        mask[a:b, : len(seq)] = 1
                        infos[i] = (sel, info)
                        pos, tok = pairs[i]
                        for r in sel:
                            p_row.extend([r] * len(tok))
                            p_pos.extend(pos.tolist())
                            p_tok.extend(tok.tolist())
                            p_t.extend(range(len(tok)))
                embeds.requires_grad_(True)
                which = torch.tensor(p_t, device=dev)
                with torch.enable_grad():
                    scores = self._forward(mask, torch.tensor(p_row, device=dev), torch.tensor(p_pos, device=dev),
                                           torch.tensor(p_tok, device=dev), inputs_embeds=embeds)
                    grad = self._backward(scores, which, max(p_t) + 1, embeds)  # (T, n_rows, width, d)
                scores = scores.detach().double().cpu().numpy()
                with torch.no_grad():
                    for i in in_batch:
                        it, ctx = items[i], contexts[i]
                        sel, info = infos[i]
                        for t in range(it.n_targets):
                            terms = agg.terms(grad[t, sel[0]: sel[-1] + 1, : it.n_in].float(), ctx, info, pert.n_rows)
                            acc = sums.setdefault((i, t), {})
                            for name, v in terms.items():
                                v = v.double().sum(0)
                                acc[name] = acc[name] + v if name in acc else v
                        if pert.clean_row is not None:
                            for r in sel:
                                if rows[r][1] == pert.clean_row:
                                    q = [n for n, rr in enumerate(p_row) if rr == r]
                                    clean[i] = scores[q]
                del grad, embeds
                bar.update(1)
        out = []
        for i, it in enumerate(items):
            tok_scores = torch.stack([agg.finalize(sums[(i, t)]) for t in range(it.n_targets)]).double().cpu().numpy()
            out.append(np.stack([tok_scores[:, list(el.tokens)].sum(1) for el in it.elements], axis=1))
            if i in clean:
                it.target_scores = clean[i]
        return out
