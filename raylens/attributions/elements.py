"""Input elements of an attribution: tokens, words or sentences, and the token positions each covers.

The word and sentence rules are those of :mod:`raylens.text`, which the concept pipeline
(:mod:`raylens.models.split`) uses too, so a "word" means the same thing in concepts and attributions:

* ``token``: every non-special token with a non-empty character span;
* ``word``: spans of the regex ``\\w+(?:['’]\\w+)*|[^\\w\\s]`` (a word, or one punctuation
  character); a token belongs to the span holding its **first non-space character**;
* ``sentence``: spans split after ``.``, ``!`` or ``?`` (surrounding whitespace trimmed), with the
  same first-non-space-character rule.

Special tokens (``[CLS]``, ``[SEP]``, ``<s>``...) are not elements unless asked for; then each
special token is an element of its own (its text is the token string, its span is empty, at the
start or end of the text). Non-special tokens with an empty character span (rare) belong to no
element and are never perturbed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from raylens.text import group_tokens

GRANULARITIES = ("token", "word", "sentence")


@dataclasses.dataclass(frozen=True)
class Element:
    """One input element: its text, ``(char_start, char_end)`` span and token positions."""

    text: str
    span: tuple[int, int]
    tokens: tuple[int, ...]


def split_elements(
    text: str,
    offsets: Sequence[tuple[int, int]],
    special: Sequence[int],
    granularity: str,
    *,
    special_tokens: Sequence[str] | None = None,
) -> list[Element]:
    """The elements of one tokenised text, in text order.

    Args:
        text: the text.
        offsets: ``(char_start, char_end)`` of each token (a fast tokenizer's ``offset_mapping``).
        special: 1 for special tokens, 0 otherwise (``special_tokens_mask``).
        granularity: ``"token"``, ``"word"`` or ``"sentence"``.
        special_tokens: when given (one string per token), special tokens become elements of their
            own with that text; by default they are left out.

    Returns:
        The elements; each covers at least one token.

    Raises:
        ValueError: unknown granularity, or offsets and special of different lengths.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if len(offsets) != len(special):
        raise ValueError(f"{len(offsets)} offsets but {len(special)} special-token flags")
    keep = [i for i, (sp, (s, e)) in enumerate(zip(special, offsets)) if not sp and e > s]
    if granularity == "token":
        out = [Element(text[offsets[i][0]: offsets[i][1]], (int(offsets[i][0]), int(offsets[i][1])), (i,))
               for i in keep]
    else:
        out = [Element(text[s:e], (s, e), tuple(tokens))
               for s, e, tokens in group_tokens(text, offsets, keep, granularity)]
    if special_tokens is not None:
        first_real = min((min(el.tokens) for el in out), default=len(special))
        extra = [Element(special_tokens[i], (0, 0) if i < first_real else (len(text), len(text)), (i,))
                 for i, sp in enumerate(special) if sp]
        out = sorted(out + extra, key=lambda el: min(el.tokens))
    return out
