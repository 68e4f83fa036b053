"""LLM labels for concepts, through any OpenAI-compatible chat-completions endpoint.

Labelling a unit of a network by showing an LLM the inputs that activate it most
follows Bills et al. 2023, "Language models can explain neurons in language models"
(OpenAI): the explainer model sees top-activating text excerpts with the activating
tokens marked and answers with a short natural-language explanation. raylens asks for
a label of a few words (not a simulation-scored explanation), one request per concept.

Entry points:

- `LabelerConfig`: where the endpoint is and how to call it.
- `build_label_prompt`: examples (+ top tokens, + optional weaker examples sampled across
  activation quantiles or at random, under their own heading) -> chat messages,
  activating spans marked with ``<<`` ``>>``.
- `choose_sampled_examples`: which sampled examples of a concept go into its prompt.
- `label_concepts`: concept id -> ``{"label", "error", "prompt_hash", "cached"}``,
  concurrent, retried, cached on disk, never raising for an endpoint problem.
- `check_endpoint`: fail fast (``ConnectionError``) when the endpoint is unreachable.
- `parse_label`: raw model reply -> clean one-line label.

Any OpenAI-compatible server works (vLLM, TGI, llama.cpp, the OpenAI API). Offline,
`raylens.concepts.serve.LocalLLMServer` runs ``transformers serve`` on loopback with
the built-in SmolLM2-135M-Instruct. Labels are plain text: nothing is HTML-escaped here
(the report does that), but control characters are stripped from prompts and labels.
This module does not import ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "MARK_CLOSE",
    "MARK_OPEN",
    "PROMPT_VERSION",
    "LabelerConfig",
    "SAMPLED_HEADINGS",
    "build_label_prompt",
    "check_endpoint",
    "choose_sampled_examples",
    "label_concepts",
    "mark_spans",
    "parse_label",
]

MARK_OPEN = "<<"
MARK_CLOSE = ">>"
#: Bumped whenever the prompt wording changes (it is part of every prompt hash).
PROMPT_VERSION = 1
#: Longest label kept by `parse_label` (characters).
MAX_LABEL_CHARS = 80
#: Longest excerpt shown to the model (characters, before marking).
MAX_EXCERPT_CHARS = 400
#: How many top tokens the prompt lists at most.
MAX_TOP_TOKENS = 12

_CACHE_FORMAT = 1
_FLUSH_EVERY_S = 2.0

_SYSTEM = (
    "You explain features of a language model. A feature fires on the tokens marked with "
    f"{MARK_OPEN} {MARK_CLOSE} in the text excerpts. Reply with a short label (a few words) naming "
    "what the feature detects. Reply with the label only."
)
# One worked example. Measured with SmolLM2-135M-Instruct: one shot gives varied, on-topic
# labels; two shots make the small model copy the last answer.
_SHOT_EXAMPLES = [
    {"text": "the sky was blue and clear", "spans": [[12, 16]]},
    {"text": "she wore a red dress", "spans": [[11, 14]]},
    {"text": "paint it green", "spans": [[9, 14]]},
]
_SHOT_TOP_TOKENS = ["blue", "red", "green", "yellow"]
_SHOT_ANSWER = "color adjectives"


# ---------------------------------------------------------------------------- config
@dataclass
class LabelerConfig:
    """How `label_concepts` reaches its OpenAI-compatible endpoint.

    Attributes:
        base_url: the API root, e.g. ``"http://127.0.0.1:8765/v1"``
            (`raylens.concepts.serve.LocalLLMServer.base_url`).
        model: model id sent with each request (for ``transformers serve`` with a local
            folder: that folder path, `LocalLLMServer.model_name`).
        api_key: sent as a bearer token; local servers ignore it.
        max_concurrency: requests in flight at once.
        max_retries: extra attempts after a connection error, timeout, HTTP 429 or 5xx
            (exponential backoff from 0.5 s, capped at 8 s). Other HTTP errors are not retried.
        timeout_s: per-request timeout.
        max_tokens: generation budget of a label.
        temperature: sampling temperature (0 = greedy, reproducible).
        n_examples: how many top-activating examples per concept go into the prompt.
        cache_path: JSON file caching labels by (model, prompt hash); ``None`` disables it.

    Raises:
        ValueError: a field is out of range (the message names it).
    """

    base_url: str
    model: str
    api_key: str = "EMPTY"
    max_concurrency: int = 4
    max_retries: int = 3
    timeout_s: float = 60
    max_tokens: int = 24
    temperature: float = 0.0
    n_examples: int = 8
    cache_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not re.match(r"^https?://", self.base_url):
            raise ValueError(f"LabelerConfig.base_url must be an http(s) URL, got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"LabelerConfig.model must be a non-empty string, got {self.model!r}")
        for name, lo in (("max_concurrency", 1), ("max_retries", 0), ("max_tokens", 1), ("n_examples", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"LabelerConfig.{name} must be an integer >= {lo}, got {v!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"LabelerConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"LabelerConfig.temperature must be in [0, 2], got {self.temperature!r}")
        if self.cache_path is not None:
            self.cache_path = os.fspath(self.cache_path)


# ---------------------------------------------------------------------------- text helpers
_WS = re.compile(r"\s+")


# Invisible characters that reorder or hide text (bidi overrides/isolates, BOM): removed.
_INVISIBLE = dict.fromkeys([0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF])


def _clean(text: str) -> str:
    """Control characters and line/paragraph separators -> spaces, bidi controls removed, whitespace collapsed."""
    out = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text.translate(_INVISIBLE))
    return _WS.sub(" ", out).strip()


def _norm_spans(spans: Any, n: int) -> list[tuple[int, int]]:
    """Validate ``[[start, end], ...]`` against a text of length ``n``; sort, merge overlaps and touching spans."""
    if spans is None:
        return []
    out: list[tuple[int, int]] = []
    for sp in spans:
        if not isinstance(sp, Sequence) or isinstance(sp, str) or len(sp) != 2:
            raise ValueError(f"span must be a [start, end] pair, got {sp!r}")
        s, e = sp
        if isinstance(s, bool) or isinstance(e, bool) or not all(isinstance(x, int) or hasattr(x, "__index__") for x in (s, e)):
            raise ValueError(f"span offsets must be integers, got {sp!r}")
        s, e = int(s), int(e)
        if not 0 <= s <= e <= n:
            raise ValueError(f"span {[s, e]} is outside the text (length {n}) or reversed")
        if e > s:
            out.append((s, e))
    out.sort()
    merged: list[tuple[int, int]] = []
    for s, e in out:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def excerpt_window(text_len: int, merged: Sequence[tuple[int, int]], max_chars: int | None) -> tuple[int, int]:
    """``[lo, hi)`` of the excerpt `mark_spans` shows: the whole text when it fits in
    ``max_chars`` (or ``max_chars`` is None), else a window of ``max_chars`` characters
    around the first of the sorted, merged ``spans`` (the span itself when longer)."""
    lo, hi = 0, text_len
    if max_chars is not None and max_chars > 0 and text_len > max_chars:
        anchor_s, anchor_e = merged[0] if merged else (0, 0)
        if anchor_e - anchor_s >= max_chars:
            lo, hi = anchor_s, anchor_e  # never cut a marked run
        else:
            room = max_chars - (anchor_e - anchor_s)
            lo = max(0, anchor_s - room // 2)
            hi = min(text_len, lo + max_chars)
            lo = max(0, hi - max_chars)
    return lo, hi


def mark_spans(
    text: str,
    spans: Sequence[Sequence[int]] | None,
    *,
    max_chars: int | None = MAX_EXCERPT_CHARS,
    mark: bool = True,
    window: tuple[int, int] | None = None,
) -> str:
    """Wrap each ``[start, end)`` character span of ``text`` in ``<<`` ``>>`` and clean the result.

    Overlapping or touching spans are merged into one marked run. Texts longer than
    ``max_chars`` are cut to a window around the first span (``…`` marks a cut;
    `excerpt_window`). Control characters (newlines included) become spaces and
    whitespace is collapsed, so the result is one line. Nothing is escaped: a text that
    already contains ``<<`` keeps it.

    Args:
        mark: False cuts the same excerpt but inserts no markers (label scoring shows
            detection examples unmarked).
        window: ``(lo, hi)`` character range to show instead of the computed window
            (spans outside it are not shown).

    Raises:
        ValueError: a span is malformed, reversed, or outside the text, or ``window`` is
            not inside the text.
    """
    if not isinstance(text, str):
        raise ValueError(f"example text must be a string, got {type(text).__name__}")
    merged = _norm_spans(spans, len(text))
    if window is None:
        lo, hi = excerpt_window(len(text), merged, max_chars)
    else:
        lo, hi = (int(x) for x in window)
        if not 0 <= lo <= hi <= len(text):
            raise ValueError(f"window {[lo, hi]} is outside the text (length {len(text)}) or reversed")
    parts: list[str] = ["…" if lo > 0 else ""]
    pos = lo
    for s, e in merged:
        s, e = max(s, lo), min(e, hi)
        if e <= s:
            continue
        parts += [text[pos:s], MARK_OPEN if mark else "", text[s:e], MARK_CLOSE if mark else ""]
        pos = e
    parts += [text[pos:hi], "…" if hi < len(text) else ""]
    return _clean("".join(parts))


def _select_examples(examples: Sequence[Mapping[str, Any]], n: int | None) -> list[Mapping[str, Any]]:
    """Top ``n`` examples by activation (stable: ties keep their order); all when ``n`` is None."""
    def act(ex: Any) -> float:
        try:
            a = float(ex.get("activation", 0.0) or 0.0)
        except (AttributeError, TypeError, ValueError):
            return float("-inf")
        return a if a == a else float("-inf")  # NaN last

    indexed = list(enumerate(examples))
    indexed.sort(key=lambda ie: (-act(ie[1]), ie[0]))
    chosen = [ex for _, ex in indexed]
    return chosen if n is None else chosen[:n]


#: Headings of the sampled-examples section of a label prompt, by how they were drawn.
SAMPLED_HEADINGS = {
    "quantile": "More excerpts, sampled across weaker activation levels:",
    "random": "More excerpts, sampled at random among all activating ones:",
}


def _user_message(lines: list[str], top_tokens: Sequence[str] | None, sampled: list[str] | None = None,
                  sampled_how: str = "quantile") -> str:
    body = f"Excerpts (activating tokens marked with {MARK_OPEN} {MARK_CLOSE}):\n"
    body += "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines))
    if sampled:
        body += "\n" + SAMPLED_HEADINGS[sampled_how] + "\n"
        body += "\n".join(f"{len(lines) + i + 1}. {line}" for i, line in enumerate(sampled))
    toks = [t for t in (_clean(str(t)) for t in ([] if top_tokens is None else top_tokens)) if t][:MAX_TOP_TOKENS]
    if toks:
        body += "\nTop tokens: " + ", ".join(toks)
    return body + "\nLabel:"


def _marked_lines(examples: Sequence[Any], what: str) -> list[str]:
    lines = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "text" not in ex:
            raise ValueError(f"{what} {i} must be a dict with 'text' and 'spans', got {ex!r:.80}")
        lines.append(mark_spans(ex["text"], ex.get("spans")))
    return lines


def build_label_prompt(
    examples: list[dict],
    top_tokens: list[str] | None = None,
    *,
    max_examples: int | None = None,
    sampled: list[dict] | None = None,
    sampled_how: str = "quantile",
) -> list[dict]:
    """Chat messages asking an LLM for a short label of one concept.

    Args:
        examples: ``[{"text": str, "spans": [[start, end], ...], "activation": float}, ...]``;
            ``spans`` are character offsets into ``text`` of the activating token(s)
            (end exclusive), marked in the prompt as ``<<token>>``. Examples are listed
            by decreasing ``activation`` (missing: 0); ties keep their order.
        top_tokens: optional tokens most associated with the concept (e.g. vocabulary
            projection), listed after the excerpts (at most 12).
        max_examples: keep only this many top examples (``None``: all).
        sampled: optional weaker activating examples (same form), e.g. drawn across the
            activation quantiles (`raylens.concepts.interpret.quantile_sample`). They are
            listed after the top ones, by decreasing activation, under a heading that says
            how they were drawn, numbered on from the top ones. ``None`` or empty gives the
            top-only prompt, unchanged (same hash, same cache entries).
        sampled_how: ``"quantile"`` or ``"random"``: which heading (:data:`SAMPLED_HEADINGS`).

    Returns:
        OpenAI chat messages: a system instruction, one worked example (user/assistant),
        and the user turn for this concept, ending in ``"Label:"``.

    Raises:
        ValueError: no examples, or an example's text or spans are malformed, or an
            unknown ``sampled_how``.
    """
    if not examples:
        raise ValueError("cannot build a label prompt without examples")
    if sampled_how not in SAMPLED_HEADINGS:
        raise ValueError(f"sampled_how must be one of {sorted(SAMPLED_HEADINGS)}, got {sampled_how!r}")
    lines = _marked_lines(_select_examples(examples, max_examples), "example")
    extra = _marked_lines(_select_examples(sampled, None), "sampled example") if sampled else None
    shot = [mark_spans(e["text"], e["spans"]) for e in _SHOT_EXAMPLES]
    return [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": _user_message(shot, _SHOT_TOP_TOKENS)},
        {"role": "assistant", "content": _SHOT_ANSWER},
        {"role": "user", "content": _user_message(lines, top_tokens, extra, sampled_how)},
    ]


def choose_sampled_examples(
    sampled: Sequence[Mapping[str, Any]],
    n: int,
    how: str,
    *,
    exclude: Sequence[Mapping[str, Any]] = (),
    seed: int = 0,
    concept: Any = None,
) -> list[Mapping[str, Any]]:
    """Pick ``n`` of a concept's sampled activating examples for its label prompt.

    Args:
        sampled: rows of ``concepts/sampled_examples.parquet`` for one concept (each with
            ``quantile``; ``doc_id`` and ``unit`` identify the activating unit).
        how: ``"quantile"``: spread over the bins, from the highest to the lowest
            (``n`` bins evenly spaced over those present, then round-robin); ``"random"``:
            a seeded uniform draw.
        exclude: examples already in the prompt (same ``doc_id`` and ``unit``: left out).
        seed, concept: the draw depends on (seed, concept) only.

    Returns:
        Up to ``n`` rows, by decreasing activation.
    """
    import numpy as np

    seen = {(e.get("doc_id"), e.get("unit")) for e in exclude}
    pool = [r for r in sampled if (r.get("doc_id"), r.get("unit")) not in seen]
    if n <= 0 or not pool:
        return []
    digest = hashlib.sha256(f"{int(seed)}\x1f{concept!r}\x1flabel-sample".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    if how == "random":
        chosen = [pool[int(i)] for i in rng.permutation(len(pool))[:n]]
    elif how == "quantile":
        bins: dict[int, list] = {}
        for r in pool:
            bins.setdefault(int(r.get("quantile") or 0), []).append(r)
        for rows in bins.values():
            rows[:] = [rows[int(i)] for i in rng.permutation(len(rows))]
        order = sorted(bins, reverse=True)
        first = [order[int(round(i))] for i in np.linspace(0, len(order) - 1, min(n, len(order)))]
        sequence = list(dict.fromkeys(first)) + [b for b in order if b not in first]
        chosen = []
        while len(chosen) < n and any(bins[b] for b in sequence):
            for b in sequence:
                if bins[b] and len(chosen) < n:
                    chosen.append(bins[b].pop(0))
    else:
        raise ValueError(f"how must be 'quantile' or 'random', got {how!r}")
    return _select_examples(chosen, None)


_PREFIX = re.compile(
    r"^\s*(?:\*\*)?(?:the\s+)?(?:short\s+)?(?:label|answer|concept|feature|theme|topic|explanation|"
    r"this\s+feature\s+detects|the\s+feature\s+detects|detects)\s*(?:\*\*)?\s*[:\-–—=]\s*(?:\*\*)?",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’«»*_"


def parse_label(reply: str | None, max_chars: int = MAX_LABEL_CHARS) -> str | None:
    """Turn a raw model reply into a clean one-line label, or ``None`` if nothing is left.

    Takes the first non-empty line, drops prefixes such as ``Label:`` / ``Answer:``,
    surrounding quotes, backticks and markdown emphasis, list bullets, the ``<< >>``
    markers, control characters and a trailing period; collapses whitespace; cuts to
    ``max_chars`` at a word boundary.
    """
    if not reply:
        return None
    line = ""
    for raw in str(reply).replace("\r", "\n").split("\n"):
        cand = _clean(raw)
        cand_stripped = _PREFIX.sub("", cand).strip()
        if cand_stripped.strip(_QUOTES + " .:-"):
            line = cand
            break
    if not line:
        return None
    for _ in range(3):  # nested decorations, e.g. **Label:** "x"
        before = line
        line = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", line)
        line = _PREFIX.sub("", line).strip()
        line = line.strip(_QUOTES).strip()
        if line == before:
            break
    line = line.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")
    line = _WS.sub(" ", line).strip().rstrip(".").strip().strip(_QUOTES).strip()
    if len(line) > max_chars:
        cut = line[:max_chars]
        sp = cut.rfind(" ")
        line = (cut[:sp] if sp >= max_chars // 2 else cut).rstrip(" ,;:-")
    return line or None


# ---------------------------------------------------------------------------- hashing / cache
def _prompt_hash(messages: list[dict], config: LabelerConfig, *, version: int = PROMPT_VERSION,
                 kind: str | None = None) -> str:
    """sha256 over the messages and the settings that shape the reply (not the model: it keys separately).

    ``version`` is the prompt family's version; ``kind`` names another prompt family
    (e.g. ``"detection"`` in `raylens.concepts.scoring`) and is left out of the payload
    for labels, so label hashes stay what they always were.
    """
    payload: dict[str, Any] = {
        "v": version,
        "messages": messages,
        "max_tokens": config.max_tokens,
        "temperature": float(config.temperature),
    }
    if kind is not None:
        payload["kind"] = kind
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _cache_key(model: str, prompt_hash: str) -> str:
    return f"{model}\x1f{prompt_hash}"


class _ReplyCache:
    """JSON file of ``{"format": 1, "entries": {model + "\\x1f" + prompt_hash: {...}}}``.

    Each entry is a dict holding one parsed reply under a field named by its user
    (``"label"`` for labels, ``"answers"`` for `raylens.concepts.scoring`), plus ``"raw"``,
    ``"model"`` and ``"time"``; one file may hold both kinds. Written atomically (temp
    file + ``os.replace``), merged with what is on disk at each flush so several
    labelers/scorers may share a file without dropping each other's entries.
    """

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self.dirty = False
        self.lock = threading.Lock()
        self._last_flush = time.monotonic()
        if self.path is not None:
            self.entries = self._read()

    def _read(self) -> dict[str, dict]:
        assert self.path is not None
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise TypeError("entries is not an object")
            return {k: v for k, v in entries.items() if isinstance(v, dict)}
        except Exception as e:  # corrupt or foreign file: keep it aside, start afresh
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("LLM reply cache %s unreadable (%s); moved to %s", self.path, e, aside)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return {}

    def get(self, key: str, field: str | None = None) -> dict | None:
        """The entry under ``key``, or None; with ``field``, only an entry that has that field."""
        with self.lock:
            entry = self.entries.get(key)
        if entry is not None and field is not None and field not in entry:
            return None
        return entry

    def put(self, key: str, entry: dict) -> None:
        with self.lock:
            self.entries[key] = entry
            self.dirty = True
        if time.monotonic() - self._last_flush >= _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        with self.lock:
            if not self.dirty:
                return
            merged = self._read() if self.path.exists() else {}
            merged.update(self.entries)
            self.entries = merged
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"format": _CACHE_FORMAT, "entries": merged}, f, ensure_ascii=False, indent=0)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            self.dirty = False
            self._last_flush = time.monotonic()


# ---------------------------------------------------------------------------- endpoint
def _client(config: LabelerConfig, *, timeout_s: float | None = None) -> Any:
    import openai

    # Retries are ours (see _request), so the client's own are off.
    return openai.OpenAI(
        base_url=config.base_url,
        api_key=config.api_key,
        timeout=config.timeout_s if timeout_s is None else timeout_s,
        max_retries=0,
    )


def check_endpoint(config: LabelerConfig, timeout_s: float = 5.0) -> None:
    """Raise ``ConnectionError`` unless the endpoint at ``config.base_url`` answers HTTP.

    Sends one ``GET {base_url}/models`` through the ``openai`` client, without retries.
    Any HTTP answer counts as reachable (``transformers serve`` answers that route with
    HTTP 500 on a machine without a hub cache), except 401/403, which also raise since
    no label request would succeed. Returns ``None`` when reachable. Takes at most
    about ``timeout_s`` seconds; a closed port fails at once.

    Raises:
        ConnectionError: unreachable, timed out, or the API key was rejected; the message
            names ``config.base_url``.
    """
    import openai

    client = _client(config, timeout_s=min(float(timeout_s), float(config.timeout_s)))
    try:
        client.models.list()
    except openai.APIStatusError as e:
        if e.status_code in (401, 403):
            raise ConnectionError(
                f"LLM endpoint {config.base_url} rejected the API key (HTTP {e.status_code})"
            ) from e
        return  # it answered: reachable
    except openai.APITimeoutError as e:
        raise ConnectionError(f"LLM endpoint {config.base_url} did not answer within {timeout_s:.0f} s") from e
    except openai.APIConnectionError as e:
        raise ConnectionError(f"LLM endpoint {config.base_url} is unreachable: {_root_cause(e)}") from e
    finally:
        client.close()


def _root_cause(e: BaseException) -> str:
    """The innermost exception message (e.g. 'Connection refused'), not openai's generic wrapper text."""
    seen = set()
    cur: BaseException | None = e
    last = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        last = cur
        cur = cur.__cause__ or cur.__context__
    msg = str(last).strip() or type(last).__name__
    return _clean(msg)[:300]


class _EndpointDown(Exception):
    pass


def _request(client: Any, config: LabelerConfig, messages: list[dict], down: threading.Event) -> str | None:
    """One chat completion with retries. Returns the reply text; raises with a message naming base_url."""
    import openai

    url = config.base_url
    attempt = 0
    while True:
        if down.is_set():
            raise _EndpointDown(f"LLM endpoint {url} is unreachable (an earlier request gave up); not sent")
        try:
            resp = client.chat.completions.create(
                model=config.model,
                messages=messages,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
            )
            if not resp.choices:
                raise RuntimeError(f"LLM endpoint {url} answered with no choices")
            return resp.choices[0].message.content
        except openai.APITimeoutError as e:
            err, retry, fatal = f"LLM endpoint {url} timed out after {config.timeout_s:g} s", True, False
            cause: BaseException = e
        except openai.APIConnectionError as e:
            err, retry, fatal = f"LLM endpoint {url} is unreachable: {_root_cause(e)}", True, True
            cause = e
        except openai.APIStatusError as e:
            detail = _clean(str(getattr(e, "message", "") or e))[:300]
            err = f"LLM endpoint {url} returned HTTP {e.status_code}: {detail}"
            retry, fatal, cause = e.status_code == 429 or e.status_code >= 500, False, e
        if not retry or attempt >= config.max_retries:
            if fatal:
                down.set()  # circuit breaker: the rest fail fast instead of retrying each
            raise RuntimeError(err + (f" (after {attempt + 1} attempts)" if attempt else "")) from cause
        delay = min(8.0, 0.5 * 2**attempt) * (0.75 + 0.5 * random.random())
        log.debug("%s; retry %d/%d in %.1f s", err, attempt + 1, config.max_retries, delay)
        attempt += 1
        time.sleep(delay)


def complete_all(
    prompts: Mapping[str, list[dict]],
    config: LabelerConfig,
    parse: Callable[[str, str | None], tuple[Any, str | None]],
    *,
    cache: _ReplyCache,
    field: str,
    on_result: Callable[[str, Any, str | None], None] | None = None,
    progress: str | None = None,
    weights: Mapping[str, int] | None = None,
    unit: str = "request",
) -> dict[str, tuple[Any, str | None]]:
    """Send every prompt once, concurrently, with retries; parse, cache and report each reply.

    Shared by `label_concepts` and `raylens.concepts.scoring`. At most
    ``config.max_concurrency`` requests are in flight; each is retried as `LabelerConfig`
    says; after the first request that gives up on a connection error the rest fail at
    once (circuit breaker) instead of each retrying.

    Args:
        prompts: cache key (`_cache_key`) -> chat messages. Keys already in the cache
            should be left out by the caller (they are requested again otherwise).
        config: endpoint and request settings.
        parse: ``parse(key, raw reply)`` -> ``(value, None)`` when usable, ``(None, error)`` when not.
            Usable values are cached as ``{field: value, "raw", "model", "time"}``;
            errors are not cached (a rerun asks again).
        cache: where usable replies go; flushed at the end, also on interruption, so no
            finished request is lost.
        on_result: called in the calling thread as ``on_result(key, value, error)`` as
            each request finishes.
        progress: description of a tqdm bar on stderr, ``None`` for no bar.
        weights: bar increments per key (default 1).

    Returns:
        key -> ``(value, error)``; exactly one of them is not None. Never raises for an
        endpoint problem (unreachable, timeout, HTTP error): it lands in ``error``, naming
        ``config.base_url``.
    """
    out: dict[str, tuple[Any, str | None]] = {}
    if not prompts:
        return out
    down = threading.Event()
    client = _client(config)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum((weights or {}).get(k, 1) for k in prompts)
        bar = tqdm(total=total, desc=progress, unit=unit)

    def work(key: str, messages: list[dict]) -> tuple[Any, str | None]:
        try:
            reply = _request(client, config, messages, down)
        except (RuntimeError, _EndpointDown) as e:
            return None, str(e)
        except Exception as e:  # an unexpected client failure stays with its prompt
            return None, f"LLM request to {config.base_url} failed: {type(e).__name__}: {_clean(str(e))[:300]}"
        try:
            value, err = parse(key, reply)
        except Exception as e:  # a parser bug must not lose the other replies
            return None, f"could not parse the reply of {config.base_url}: {type(e).__name__}: {e}"
        if err is None:
            cache.put(key, {field: value, "raw": reply, "model": config.model, "time": time.time()})
        return value, err

    ex = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="raylens-llm")
    try:
        futures = {ex.submit(work, key, msgs): key for key, msgs in prompts.items()}
        not_done = set(futures)
        while not_done:
            done, not_done = wait(not_done, return_when=FIRST_COMPLETED)
            for fut in done:
                key = futures[fut]
                out[key] = fut.result()
                if on_result is not None:
                    on_result(key, *out[key])
                if bar is not None:
                    bar.update((weights or {}).get(key, 1))
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        cache.flush()
        client.close()
        if bar is not None:
            bar.close()
    return out


# ---------------------------------------------------------------------------- main entry
def label_concepts(
    concepts: Mapping[int, Mapping[str, Any]],
    config: LabelerConfig,
    *,
    progress: bool = True,
) -> dict[int, dict]:
    """Ask an LLM for a short label of each concept (Bills et al. 2023 style).

    Args:
        concepts: concept id -> ``{"examples": [{"text", "spans", "activation"}, ...],
            "top_tokens": [str, ...], "sampled_examples": [...], "sampled_how": str}`` (see
            `build_label_prompt`; all but ``examples`` optional). The ``config.n_examples``
            highest-activation examples go into the prompt, then all ``sampled_examples``
            (e.g. from `choose_sampled_examples`) under their own heading.
        config: the endpoint and request settings.
        progress: show a tqdm bar on stderr.

    Returns:
        concept id -> ``{"label": str | None, "error": str | None, "prompt_hash": str,
        "cached": bool}``, in the input order. Exactly one of ``label`` / ``error`` is set.
        ``prompt_hash`` is the sha256 of the prompt and sampling settings (``""`` when no
        prompt could be built); ``cached`` is True when the label came from
        ``config.cache_path`` without a request. Concepts with identical prompts share one
        request.

    Never raises for an endpoint problem: an unreachable endpoint, timeouts or HTTP
    errors end up in each affected concept's ``error`` (naming ``config.base_url``);
    after the first request that gives up on a connection error, the remaining concepts
    fail at once instead of retrying. Malformed examples give that concept an error.
    Successful labels are cached by (model, prompt hash) in ``config.cache_path``
    (written atomically at most every 2 s while labelling and at the end, also on
    interruption), so a rerun only requests what is missing; errors are not cached.

    Raises:
        TypeError: ``config`` is not a `LabelerConfig`.
    """
    if not isinstance(config, LabelerConfig):
        raise TypeError(f"config must be a LabelerConfig, got {type(config).__name__}")
    results: dict[int, dict] = {}
    cache = _ReplyCache(config.cache_path)
    pending: dict[str, tuple[list[dict], list[int]]] = {}  # cache key -> (messages, concept ids)

    for cid, concept in concepts.items():
        try:
            if not isinstance(concept, Mapping):
                raise ValueError(f"concept must be a dict, got {type(concept).__name__}")
            examples = concept.get("examples")
            messages = build_label_prompt([] if examples is None else list(examples), concept.get("top_tokens"),
                                          max_examples=config.n_examples,
                                          sampled=list(concept.get("sampled_examples") or []),
                                          sampled_how=concept.get("sampled_how", "quantile"))
        except Exception as e:
            results[cid] = {"label": None, "error": f"bad concept {cid!r}: {e}", "prompt_hash": "", "cached": False}
            continue
        ph = _prompt_hash(messages, config)
        key = _cache_key(config.model, ph)
        results[cid] = {"label": None, "error": None, "prompt_hash": ph, "cached": False}
        hit = cache.get(key, "label")
        if hit is not None and isinstance(hit["label"], str):
            results[cid].update(label=hit["label"], cached=True)
        elif key in pending:
            pending[key][1].append(cid)
        else:
            pending[key] = (messages, [cid])

    if pending:
        def parse(_key: str, reply: str | None) -> tuple[str | None, str | None]:
            label = parse_label(reply)
            if label is None:
                return None, f"LLM endpoint {config.base_url} gave no usable label (reply: {_clean(str(reply))[:80]!r})"
            return label, None

        def deliver(key: str, label: Any, err: str | None) -> None:
            for cid in pending[key][1]:
                results[cid]["label"], results[cid]["error"] = label, err

        complete_all(
            {key: msgs for key, (msgs, _) in pending.items()}, config, parse,
            cache=cache, field="label", on_result=deliver,
            progress="labelling concepts" if progress else None,
            weights={key: len(ids) for key, (_, ids) in pending.items()}, unit="concept",
        )
        n_err = sum(1 for r in results.values() if r["error"])
        if n_err:
            first = next(r["error"] for r in results.values() if r["error"])
            log.warning("%d of %d concepts have no label; first error: %s", n_err, len(results), first)
    return {cid: results[cid] for cid in concepts}
