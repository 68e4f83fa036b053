"""HTML helpers shared by the raylens views (:mod:`raylens.viz.report`,
:mod:`raylens.viz.attributions`): escaping, JSON safe inside ``<script>``, NaN-tolerant
number formatting, readable vocabulary tokens, the offline Content-Security-Policy and
the colour palette. Standard library only."""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any

__all__ = [
    "BIDI_CONTROLS", "esc", "to_float", "finite", "fmt_num", "json_for_script", "json_num", "readable_token",
    "token_html", "CSP", "PALETTE_LIGHT", "PALETTE_DARK",
]


#: Invisible characters that reorder text (bidi embeddings, overrides, isolates, marks): shown
#: as a visible ``‹U+202E›`` so corpus text cannot disguise itself (Trojan Source, CVE-2021-42574).
BIDI_CONTROLS = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_BIDI_VISIBLE = {c: f"\u2039U+{c:04X}\u203a" for c in BIDI_CONTROLS}
_BIDI_JSON = {c: f"\\u{c:04x}" for c in BIDI_CONTROLS}


def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` for both text and (double- or single-quoted) attributes;
    bidi control characters (`BIDI_CONTROLS`) become a visible ``‹U+XXXX›``."""
    return html.escape("" if value is None else str(value).translate(_BIDI_VISIBLE), quote=True)


def to_float(value: Any) -> float | None:
    """Coerce numbers (incl. numpy / torch scalars) to ``float``; ``None`` if impossible."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def finite(x: float | None) -> bool:
    """Whether ``x`` is a finite float (not None, NaN or infinite)."""
    return x is not None and math.isfinite(x)


def fmt_num(x: float | None, *, signed: bool = False) -> str:
    """Compact human formatting of a float; ``—`` for missing, ``NaN``/``±inf`` as such."""
    if x is None:
        return "\u2014"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+inf" if x > 0 else "\u2212inf"
    s = f"{x:+.3g}" if signed else f"{x:.3g}"
    return s.replace("-", "\u2212")


def json_for_script(obj: Any) -> str:
    """JSON safe to place inside ``<script>``: no ``</``, ``<!--`` or ``]]>`` can appear, and
    bidi controls (`BIDI_CONTROLS`) are ``\\uXXXX`` escapes (the same string, once parsed)."""
    s = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (
        s.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
        .translate(_BIDI_JSON)
    )


def json_num(x: float | None) -> float | None:
    """``x`` when finite, else None (JSON has no NaN or infinity)."""
    return x if finite(x) else None


def byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (the "Ġ"/"Ċ" byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = byte_level_decoder()
SP_BYTE_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def readable_token(tok: str) -> str:
    """Best-effort readable form of a vocabulary token (still raw text, not escaped).

    * GPT-2-style byte-level BPE tokens ("Ġthe", "Ċ", "Ã©") are decoded back to text when
      they are valid UTF-8; a token holding only part of a multi-byte character is shown
      with ``\\xNN`` escapes for the dangling bytes.
    * SentencePiece "▁" word-boundary markers become spaces, ``<0x0A>`` byte tokens
      become their character.
    Whitespace is made visible later, by :func:`token_html`.
    """
    m = SP_BYTE_RE.match(tok)
    if m:
        b = int(m.group(1), 16)
        return chr(b) if b < 0x80 else tok
    if tok and all(c in BYTE_DECODER for c in tok):
        raw = bytes(BYTE_DECODER[c] for c in tok)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Only force the byte-level reading when the token is unmistakably byte-level.
            if any(ord(c) >= 256 for c in tok):
                return raw.decode("utf-8", errors="backslashreplace")
    return tok.replace("\u2581", " ")


WS_GLYPHS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def token_html(tok: Any) -> str:
    """HTML for one token chip body: escaped, with whitespace / control chars made visible."""
    text = readable_token("" if tok is None else str(tok))
    if text == "":
        return '<span class="ws">\u2205</span>'
    out: list[str] = []
    for ch in text:
        if ch in WS_GLYPHS:
            out.append(f'<span class="ws">{WS_GLYPHS[ch]}</span>')
        elif ch.isspace() or not ch.isprintable():
            out.append(f'<span class="ws">{esc(ascii(ch)[1:-1])}</span>')
        else:
            out.append(esc(ch))
    return "".join(out)


CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)


#: Colour palette (CSS custom-property declarations) of the raylens views, light and dark;
#: each view declares it on its own root selector (``:root`` for a page, a scoped class for
#: a notebook fragment).
PALETTE_LIGHT = (
    "--bg:#f6f7f9;--card:#fff;--fg:#1d2330;--muted:#6b7280;--line:#e3e6eb;\n"
    "--pos:#16a34a;--neg:#dc2626;--posbg:#dcfce7;--negbg:#fee2e2;--hl:255,176,0;--chip:#f1f3f6"
)
PALETTE_DARK = (
    "--bg:#14171c;--card:#1c2027;--fg:#e5e7eb;--muted:#9aa3af;\n"
    "--line:#2d333d;--pos:#4ade80;--neg:#f87171;--posbg:#12351f;--negbg:#3d1818;--hl:245,158,11;--chip:#262b34"
)
