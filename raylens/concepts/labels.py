"""LLM labels for concepts, through any OpenAI-compatible chat-completions endpoint.

Labelling a unit of a network by showing an LLM the inputs that activate it most
follows Bills et al. 2023, "Language models can explain neurons in language models"
(OpenAI): the explainer model sees top-activating text excerpts with the activating
tokens marked and answers with a short natural-language explanation. raylens asks for
a label of a few words (not a simulation-scored explanation), one request per concept.

Entry points:

- `LabelerConfig`: where the endpoint is and how to call it (defined in
  `raylens.llm.config`, re-exported here).
- `build_label_prompt`: examples (+ top tokens, + optional weaker examples sampled across
  activation quantiles or at random, under their own heading) -> chat messages,
  activating spans marked with ``<<`` ``>>``.
- `choose_sampled_examples`: which sampled examples of a concept go into its prompt.
- `label_concepts`: concept id -> ``{"label", "error", "prompt_hash", "cached"}``,
  concurrent, retried, cached on disk, never raising for an endpoint problem.
- `check_endpoint`: fail fast (``ConnectionError``) when the endpoint is unreachable
  (`raylens.llm.client`, re-exported here).
- `parse_label`: raw model reply -> clean one-line label.
- `label_prompt_hash`: the prompt hash of a label prompt (its cache key with
  `raylens.llm.cache.cache_key`).
- `mark_spans`, `excerpt_window`, `normalize_spans`: excerpts with their activating spans
  marked (shared with `raylens.concepts.scoring`).

The endpoint machinery (client, retries, concurrency, reply cache) is `raylens.llm`.

Any OpenAI-compatible server works (vLLM, TGI, llama.cpp, the OpenAI API). Offline,
`raylens.llm.server.LocalLLMServer` runs ``transformers serve`` on loopback with
the built-in SmolLM2-135M-Instruct. Labels are plain text: nothing is HTML-escaped here
(the report does that), but control characters are stripped from prompts and labels.
This module does not import ray.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from raylens.llm.cache import ReplyCache, cache_key, prompt_hash
from raylens.llm.client import check_endpoint, complete_all
from raylens.llm.config import LabelerConfig
from raylens.llm.text import clean_text

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
    "example_activation",
    "excerpt_window",
    "label_concepts",
    "label_prompt_hash",
    "mark_spans",
    "normalize_spans",
    "parse_label",
    "seeded_rng",
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


# ---------------------------------------------------------------------------- text helpers
_WS = re.compile(r"\s+")


def normalize_spans(spans: Any, n: int) -> list[tuple[int, int]]:
    """Validate ``[[start, end], ...]`` character spans (end exclusive) against a text of
    length ``n``; drop empty ones; sort; merge overlapping and touching ones.

    Raises:
        ValueError: a span is not a pair of integers, is reversed, or lies outside the text.
    """
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
    merged = normalize_spans(spans, len(text))
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
    return clean_text("".join(parts))


def example_activation(ex: Any) -> float:
    """An example's ``"activation"`` as a float (missing or None: 0.0); ``-inf`` when it is NaN,
    not a number, or ``ex`` is not a dict, so such examples sort last."""
    try:
        a = float(ex.get("activation", 0.0) or 0.0)
    except (AttributeError, TypeError, ValueError):
        return float("-inf")
    return a if a == a else float("-inf")  # NaN last


def seeded_rng(seed: int, concept: Any, task: str) -> Any:
    """A ``numpy.random.Generator`` seeded by sha256 of (seed, ``repr(concept)``, task): the
    draws of one concept for one task do not depend on its label or on other concepts."""
    import numpy as np

    digest = hashlib.sha256(f"{int(seed)}\x1f{concept!r}\x1f{task}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _select_examples(examples: Sequence[Mapping[str, Any]], n: int | None) -> list[Mapping[str, Any]]:
    """Top ``n`` examples by activation (stable: ties keep their order); all when ``n`` is None."""
    indexed = list(enumerate(examples))
    indexed.sort(key=lambda ie: (-example_activation(ie[1]), ie[0]))
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
    toks = [t for t in (clean_text(str(t)) for t in ([] if top_tokens is None else top_tokens)) if t][:MAX_TOP_TOKENS]
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
    rng = seeded_rng(seed, concept, "label-sample")
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
        cand = clean_text(raw)
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


def label_prompt_hash(messages: list[dict], config: LabelerConfig) -> str:
    """The sha256 (64 hex digits) of a label prompt and the sampling settings of ``config``
    (``max_tokens``, ``temperature``; not the model), at :data:`PROMPT_VERSION`: the
    ``prompt_hash`` of `label_concepts` rows, and with
    ``raylens.llm.cache.cache_key(config.model, ...)`` the key of the label in the cache."""
    return prompt_hash(messages, config, version=PROMPT_VERSION)


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
    cache = ReplyCache(config.cache_path)
    results, pending = _plan_labels(concepts, config, cache)
    if pending:
        _request_labels(pending, results, config, cache, progress)
        n_err = sum(1 for r in results.values() if r["error"])
        if n_err:
            first = next(r["error"] for r in results.values() if r["error"])
            log.warning("%d of %d concepts have no label; first error: %s", n_err, len(results), first)
    return {cid: results[cid] for cid in concepts}


def _plan_labels(concepts: Mapping[int, Mapping[str, Any]], config: LabelerConfig, cache: ReplyCache,
                 ) -> tuple[dict[int, dict], dict[str, tuple[list[dict], list[int]]]]:
    """The `label_concepts` rows (cached labels and bad-concept errors already in) and the
    requests left to send: cache key -> (messages, the concept ids that share that prompt)."""
    results: dict[int, dict] = {}
    pending: dict[str, tuple[list[dict], list[int]]] = {}
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
        ph = label_prompt_hash(messages, config)
        key = cache_key(config.model, ph)
        results[cid] = {"label": None, "error": None, "prompt_hash": ph, "cached": False}
        hit = cache.get(key, "label")
        if hit is not None and isinstance(hit["label"], str):
            results[cid].update(label=hit["label"], cached=True)
        elif key in pending:
            pending[key][1].append(cid)
        else:
            pending[key] = (messages, [cid])
    return results, pending


def _request_labels(pending: dict[str, tuple[list[dict], list[int]]], results: dict[int, dict],
                    config: LabelerConfig, cache: ReplyCache, progress: bool) -> None:
    """Send the `_plan_labels` requests; each reply's label (or error) goes to every concept sharing it."""
    def parse(_key: str, reply: str | None) -> tuple[str | None, str | None]:
        label = parse_label(reply)
        if label is None:
            return None, f"LLM endpoint {config.base_url} gave no usable label (reply: {clean_text(str(reply))[:80]!r})"
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
