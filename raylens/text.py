"""Word and sentence splitting: the one definition of a "word" and a "sentence" in raylens.

The concept pipeline (:meth:`raylens.models.split.SplitModel.units`) and the attributions
(:func:`raylens.attributions.elements.split_elements`) both group a tokenised text's tokens into
words or sentences with :func:`group_tokens`, so a word means the same thing in both.

* **word**: a match of :data:`WORD_PATTERN`, ``\\w+(?:['’]\\w+)*|[^\\w\\s]``: a run of word
  characters with inner apostrophes (``don't``, ``it’s``), or one punctuation character.
* **sentence**: a match of :data:`SENTENCE_PATTERN`, ``[^.!?]*(?:[.!?]+|$)``: text up to and
  including a run of ``.``, ``!`` or ``?`` (or the end of the text); blank matches are dropped
  and the span of a sentence is trimmed of surrounding whitespace.
* A **token belongs to** the word or sentence that holds its first non-space character (the
  last unit starting at or before it); a token before the first unit belongs to none.

Spans are ``(char_start, char_end)`` offsets into the text, end exclusive. Standard library
and numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

#: a word, or one punctuation character
WORD_PATTERN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
#: text up to and including a run of sentence-final punctuation (or the end of the text)
SENTENCE_PATTERN = re.compile(r"[^.!?]*(?:[.!?]+|$)")
#: the units :func:`text_spans` and :func:`group_tokens` know
TEXT_UNITS = ("word", "sentence")


def word_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the words of ``text``, in order."""
    return [(m.start(), m.end()) for m in WORD_PATTERN.finditer(text)]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, in order, blank ones left
    out; a span includes the whitespace around its sentence (see :func:`trim_span`)."""
    return [(m.start(), m.end()) for m in SENTENCE_PATTERN.finditer(text) if text[m.start(): m.end()].strip()]


def text_spans(text: str, unit: str) -> list[tuple[int, int]]:
    """:func:`word_spans` or :func:`sentence_spans` of ``text``.

    Raises:
        ValueError: ``unit`` is not one of :data:`TEXT_UNITS`.
    """
    if unit == "word":
        return word_spans(text)
    if unit == "sentence":
        return sentence_spans(text)
    raise ValueError(f"unit must be one of {TEXT_UNITS}, got {unit!r}")


def trim_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` narrowed to exclude the whitespace at both ends of ``text[start:end]``."""
    raw = text[start:end]
    return start + len(raw) - len(raw.lstrip()), end - (len(raw) - len(raw.rstrip()))


def group_tokens(text: str, offsets: Sequence[tuple[int, int]], tokens: Sequence[int],
                 unit: str) -> list[tuple[int, int, list[int]]]:
    """Group tokens into the words or sentences of ``text``.

    Args:
        text: the text the tokens were cut from.
        offsets: ``(char_start, char_end)`` of every token of the text (a fast tokenizer's
            ``offset_mapping``).
        tokens: the token positions to group (e.g. the non-special tokens with a non-empty span),
            in increasing order.
        unit: ``"word"`` or ``"sentence"``.

    Returns:
        One ``(char_start, char_end, token_positions)`` per unit that holds at least one of
        ``tokens``, in text order; sentence spans are trimmed of surrounding whitespace. A token
        whose first non-space character precedes every unit is left out.

    Raises:
        ValueError: ``unit`` is not one of :data:`TEXT_UNITS`.
    """
    spans = text_spans(text, unit)
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    by_span: dict[int, list[int]] = {}
    for i in tokens:
        s, e = offsets[i]
        first = s + (len(text[s:e]) - len(text[s:e].lstrip()))  # first non-space character
        j = int(np.searchsorted(starts, first, side="right")) - 1
        if j >= 0:
            by_span.setdefault(j, []).append(i)
    out = []
    for j in sorted(by_span):
        s, e = spans[j]
        if unit == "sentence":
            s, e = trim_span(text, s, e)
        out.append((s, e, by_span[j]))
    return out


__all__ = ["SENTENCE_PATTERN", "TEXT_UNITS", "WORD_PATTERN", "group_tokens", "sentence_spans", "text_spans",
           "trim_span", "word_spans"]
