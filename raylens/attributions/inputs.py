"""Inputs of an attribution: the model's task and limits, and texts and targets made ready for
inference (:class:`PreparedInput`).

**Tasks** are read from the model, not from class names: a
:class:`~raylens.models.loading.LoadedModel`'s ``task``, else the architectures recorded in the
config, else the transformers auto-class mapping of the config type; ``task=`` overrides
(:func:`resolve_task`).

**Targets** (:meth:`InputPreparer.split_targets`, :meth:`InputPreparer.resolve_target`).

* Sequence classification: ``None`` explains the predicted class; an ``int`` explains that class
  for every input; for one text a list of class indices explains several classes at once (one
  row of scores each); for a list of texts, a list with one entry per text (an int, a list of
  ints, or None). A ``(n_texts, k)`` tensor or array works too.
* Causal LM: a target is the output text to explain (a ``str``, tokenised as a continuation of
  the input: the tokens of ``input + target`` after the input's tokens when the input's tokens
  are a prefix of them, else the target tokenised alone without special tokens) or its token
  ids. ``None`` asks the explainer to generate the continuation.

**Special tokens** (those the tokenizer adds, and special tokens written in the text such as
``<|im_start|>``) are never elements unless ``include_special_tokens=True``.

**Long inputs.** Classification inputs longer than ``max_length`` tokens are truncated to it
(special tokens kept) with a warning; a causal-LM input whose ``input + target[:-1]`` is longer
raises ``ValueError`` (truncating would change what the target continues).
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from typing import Any

import numpy as np
import torch

from raylens.attributions.constraints import is_int
from raylens.attributions.elements import Element, split_elements

#: the model tasks attributions explain
TASKS = ("sequence_classification", "causal_lm")


def unwrap_model(model: Any, tokenizer: Any = None) -> tuple[Any, Any, str | None]:
    """``(hf_model, tokenizer, task)`` from a :class:`~raylens.models.loading.LoadedModel` (its
    model, its tokenizer unless one is given, its task) or a bare Hugging Face model (``task``
    None).

    Raises:
        ValueError: a bare model without a tokenizer.
    """
    if hasattr(model, "model") and hasattr(model, "tokenizer") and hasattr(model, "task"):  # LoadedModel
        return model.model, tokenizer if tokenizer is not None else model.tokenizer, model.task
    if tokenizer is None:
        raise ValueError("pass the tokenizer with a bare Hugging Face model (or pass a LoadedModel)")
    return model, tokenizer, None


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
            task = _task_from_auto_mapping(model, config)
    if task not in TASKS:
        raise ValueError(f"cannot explain a model of task {task!r}: attributions need a sequence classifier "
                         f"or a causal LM ({TASKS}); pass task= if the model has such a head")
    return task


def _task_from_auto_mapping(model: Any, config: Any) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    for name, mapping in (("causal_lm", MODEL_FOR_CAUSAL_LM_MAPPING),
                          ("sequence_classification", MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)):
        try:
            if isinstance(model, mapping[type(config)]):
                return name
        except (KeyError, ValueError):
            continue
    return "base"


def model_limit(model: Any, tokenizer: Any) -> int | None:
    """The model's token limit: the smaller of the config's ``max_position_embeddings`` and the
    tokenizer's ``model_max_length`` (None when neither is known)."""
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
        """Number of input tokens."""
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Number of targets (0 while unresolved)."""
        return len(self.targets or [])


@dataclasses.dataclass
class InputPreparer:
    """Turns texts and raw targets into :class:`PreparedInput` for one model and granularity.

    Attributes:
        tokenizer: a fast tokenizer (character offsets).
        task: ``"sequence_classification"`` or ``"causal_lm"``.
        granularity: ``"token"``, ``"word"`` or ``"sentence"``.
        include_special_tokens: make special tokens elements of their own.
        max_length: token limit of an input (causal LM: of ``input + target[:-1]``); None: none.
        max_new_tokens: the target length assumed for a causal-LM input without target.
        n_classes: the classifier's number of classes (None for a causal LM).
        vocab_size: the model's vocabulary size (target token ids are checked against it).
    """

    tokenizer: Any
    task: str
    granularity: str
    include_special_tokens: bool
    max_length: int | None
    max_new_tokens: int
    n_classes: int | None
    vocab_size: int

    def split_targets(self, targets: Any, n: int, single: bool) -> list[Any]:
        """One raw target spec per input (see the module docstring).

        Raises:
            ValueError: targets whose type or length does not match the inputs.
        """
        targets = _as_list(targets)
        if targets is None:
            return [None] * n
        if self.task == "sequence_classification":
            return _split_class_targets(targets, n, single)
        return _split_lm_targets(targets, n, single)

    def prepare(self, index: int, text: str, target: Any) -> PreparedInput:
        """Tokenise ``text``, split it into elements and resolve its ``target`` (None: left None).

        Raises:
            ValueError: an empty text, a text with no element, a bad target, or a causal-LM input
                longer than ``max_length``.
        """
        if not text.strip():
            raise ValueError(f"input {index} is empty")
        enc = self._encode(index, text)
        ids = [int(i) for i in enc["input_ids"]]
        special_ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        special = [int(sp or t in special_ids) for sp, t in zip(enc["special_tokens_mask"], ids)]
        names = self.tokenizer.convert_ids_to_tokens(ids) if self.include_special_tokens else None
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
            item.targets = self.resolve_target(index, text, ids, target)
        limit = self.max_length
        if self.task == "causal_lm" and limit is not None:
            n_tgt = len(item.targets) if item.targets is not None else self.max_new_tokens
            if len(ids) + n_tgt - 1 > limit:
                raise ValueError(f"input {index}: {len(ids)} input tokens + {n_tgt} target tokens exceed "
                                 f"max_length={limit}; shorten the text or raise max_length")
        return item

    def _encode(self, index: int, text: str) -> Any:
        """The tokenizer's encoding (offsets, special-token mask), truncated for a classifier."""
        tok, limit = self.tokenizer, self.max_length
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
        if self.task == "sequence_classification" and limit is not None and len(enc["input_ids"]) > limit:
            warnings.warn(f"input {index} has {len(enc['input_ids'])} tokens: truncated to max_length={limit}",
                          stacklevel=5)
            enc = tok(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
                      truncation=True, max_length=limit)
        return enc

    def resolve_target(self, index: int, text: str, ids: list[int], target: Any) -> list[int]:
        """Class indices (classifier) or target token ids (causal LM) of one input's raw target.

        Args:
            index: the input's position (for messages).
            text: the input text; ids: its token ids.
            target: a list of class indices, or a target text or token ids.

        Raises:
            ValueError: a class or token id out of range, an empty target, or a target of the
                wrong type.
        """
        if self.task == "sequence_classification":
            return self._resolve_classes(index, target)
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
            if not isinstance(target, (list, tuple)) or not all(is_int(t) for t in target):
                raise ValueError(f"input {index}: a causal-LM target must be a str or a list of token ids, got {target!r}")
            out = [int(t) for t in target]
        if not out:
            raise ValueError(f"input {index}: the target has no tokens")
        bad = [t for t in out if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input {index}: target token ids {bad} out of range (vocabulary of {self.vocab_size})")
        return out

    def _resolve_classes(self, index: int, target: Any) -> list[int]:
        out = []
        for c in target:
            if not is_int(c):
                raise ValueError(f"input {index}: class target {c!r} is not an int")
            if not 0 <= int(c) < self.n_classes:
                raise ValueError(f"input {index}: class {c} out of range: the model has {self.n_classes} classes")
            out.append(int(c))
        if not out:
            raise ValueError(f"input {index}: empty list of classes")
        return out


def _split_class_targets(targets: Any, n: int, single: bool) -> list[Any]:
    if is_int(targets):
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
    return [None if t is None else ([t] if is_int(t) else list(_as_list(t))) for t in targets]


def _split_lm_targets(targets: Any, n: int, single: bool) -> list[Any]:
    if isinstance(targets, str):
        if n != 1:
            raise ValueError(f"one target text for {n} inputs: give a list with one target per input")
        return [targets]
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"causal-LM targets must be None, a str, token ids or a list, got {type(targets).__name__}")
    if single:
        if targets and all(is_int(t) for t in targets):
            return [list(targets)]
        if len(targets) == 1:
            return [_as_list(targets[0])]
        raise ValueError("for one input, targets must be a str or a list of token ids")
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} inputs: give one target (str, token ids or None) per input")
    return [_as_list(t) for t in targets]


__all__ = ["InputPreparer", "PreparedInput", "TASKS", "model_limit", "resolve_task", "unwrap_model"]
