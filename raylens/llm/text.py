"""Text sent to or read from an LLM, made one clean line.

`clean_text` is what every prompt excerpt, label and error message built from a reply
goes through (`raylens.concepts.labels`, `raylens.concepts.scoring`,
`raylens.llm.client`): control characters and line/paragraph separators become spaces,
invisible characters that reorder or hide text are removed, whitespace is collapsed.
This module does not import ray.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["clean_text"]

_WS = re.compile(r"\s+")
# Invisible characters that reorder or hide text (bidi overrides/isolates, BOM): removed.
_INVISIBLE = dict.fromkeys([0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF])


def clean_text(text: str) -> str:
    """``text`` as one line: control characters (Unicode category Cc, newlines and tabs
    included) and line/paragraph separators -> spaces, bidi controls and BOM removed,
    whitespace runs collapsed to one space, ends stripped. Nothing is escaped."""
    out = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text.translate(_INVISIBLE))
    return _WS.sub(" ", out).strip()
