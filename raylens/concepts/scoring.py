"""Score concept labels with an LLM: detection and fuzzing, as Delphi does.

Paulo, Mallen, Juang & Belrose 2024, "Automatically Interpreting Millions of Features in
Large Language Models" (arXiv 2410.13928; the ``delphi`` library) score a feature's
natural-language label by asking a *scorer* LLM to use it on examples whose answer is known:

* **Detection**: the scorer sees the label and a text excerpt (nothing marked) and says
  whether the text contains what the label describes (1) or not (0). Half of the excerpts
  activate the concept (its top examples, or examples sampled evenly over activation
  quantiles), half are drawn at random from texts where it does not fire. A label that
  names what the concept really detects lets the scorer separate the two.
* **Fuzzing**: the scorer sees activating excerpts with some words marked ``<< >>``
  (the markers of `raylens.concepts.labels.mark_spans`): in half of them the truly
  activating tokens are marked, in the other half as many random words are. It says
  whether the marked words match the label (1) or not (0). This checks that the label
  names the activating *tokens*, not only the context.

Each score is an accuracy against the known answers, over the examples whose reply
could be parsed. Both sets are balanced by construction (as many 1s as 0s), so **0.5 is
chance** and 1.0 perfect; a scorer that always says 1 gets 0.5 accuracy and 0.5 balanced
accuracy. ``balanced_accuracy`` (the mean of the true-positive and true-negative rates)
stays at 0.5 for a constant answer even when errors unbalance the answered set, and the
per-class counts (tp, fp, tn, fn) are returned beside it. A useful control, as in the
paper, is to score each concept with a label *shuffled* from another concept
(`shuffle_labels`): the gap between real and shuffled scores is what the labels carry.
Score on examples the labeler did not see (Delphi holds them out) when you can.

Replies are parsed robustly for small models (``"1"``, ``"Yes"``, ``"[1,0,1]"``,
``"1. yes 2. no"``, see `parse_binary_answers`); a reply that cannot be parsed is an
*error* for its examples, never counted as a right or wrong answer.

The endpoint side is `raylens.llm`, shared with `raylens.concepts.labels`: the same `LabelerConfig`
(``max_concurrency`` requests in flight, retries with backoff, ``max_tokens``,
``temperature``), the same on-disk cache keyed by (model, prompt hash) in
``config.cache_path`` (a rerun only requests what is missing), the same circuit breaker.
An unreachable endpoint never raises: each concept comes back with an ``error`` and its
examples counted in ``n_errors``; replies received before the failure are kept (and
cached). Use `raylens.llm.client.check_endpoint` to fail fast before a long run.
Sampling is seeded per (seed, concept id): a concept gets the same examples whatever its
label, so real and shuffled labels are compared on identical examples.
This module does not import ray.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raylens.concepts.labels import (MARK_CLOSE, MARK_OPEN, example_activation, excerpt_window, mark_spans,
                                     normalize_spans, seeded_rng)
from raylens.io.schemas import SCORES_SCHEMA
from raylens.llm.cache import ReplyCache, cache_key, prompt_hash
from raylens.llm.client import complete_all
from raylens.llm.config import LabelerConfig
from raylens.llm.text import clean_text

log = logging.getLogger(__name__)

__all__ = [
    "SCORES_SCHEMA",
    "SCORING_PROMPT_VERSION",
    "build_detection_prompt",
    "build_fuzzing_prompt",
    "parse_binary_answers",
    "score_labels",
    "scores_table",
    "shuffle_labels",
]

#: Bumped whenever a scoring prompt's wording changes (part of every prompt hash).
SCORING_PROMPT_VERSION = 1
#: Default excerpt length shown to the scorer (characters, before marking).
SCORING_EXCERPT_CHARS = 240

_WORD = re.compile(r"\w+")

# ---------------------------------------------------------------------------- prompts
_DETECTION_SYSTEM = (
    "You check labels of features of a language model. You get a label and {what}. "
    "Answer 1 if {it_contains} what the label describes, 0 if not. {reply}"
)
_FUZZING_SYSTEM = (
    f"You check labels of features of a language model. In each text some words are marked with {MARK_OPEN} "
    f"{MARK_CLOSE}. You get a label and {{what}}. Answer 1 if the marked words are what the label describes, "
    "0 if not. {reply}"
)
_ONE = "Reply with one digit only: 1 or 0."
_MANY = "Reply with a Python list of 0s and 1s, one per text, for example [1, 0, 1], and nothing else."

# Worked examples (one 1, one 0; the 1/0 order alternates with the task so neither is "last").
_SHOT_LABEL = "color adjectives"
_DET_SHOTS = [("the train left the station at noon", 0), ("she wore a red dress to the party", 1)]
_FUZZ_SHOTS = [(f"she wore a {MARK_OPEN}red{MARK_CLOSE} dress to the party", 1),
               (f"she {MARK_OPEN}wore{MARK_CLOSE} a blue dress to the party", 0)]


def _system(task: str, n: int) -> str:
    what = "one text" if n == 1 else "numbered texts"
    tmpl = _DETECTION_SYSTEM if task == "detection" else _FUZZING_SYSTEM
    return tmpl.format(what=what, it_contains="the text contains" if n == 1 else "a text contains",
                       reply=_ONE if n == 1 else _MANY)


def _user(label: str, excerpts: Sequence[str]) -> str:
    if len(excerpts) == 1:
        return f"Label: {label}\nText: {excerpts[0]}\nAnswer:"
    body = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(excerpts))
    return f"Label: {label}\nTexts:\n{body}\nAnswer:"


def _answer(bits: Sequence[int]) -> str:
    return str(bits[0]) if len(bits) == 1 else "[" + ", ".join(str(b) for b in bits) + "]"


def _prompt(task: str, label: str, excerpts: Sequence[str]) -> list[dict]:
    if not excerpts:
        raise ValueError("a scoring prompt needs at least one example")
    label = clean_text(str(label))
    if not label:
        raise ValueError("cannot score an empty label")
    shots = _DET_SHOTS if task == "detection" else _FUZZ_SHOTS
    msgs = [{"role": "system", "content": _system(task, len(excerpts))}]
    if len(excerpts) == 1:
        for text, bit in shots:
            msgs += [{"role": "user", "content": _user(_SHOT_LABEL, [text])},
                     {"role": "assistant", "content": _answer([bit])}]
    else:
        texts = [t for t, _ in shots] + [shots[0][0]]
        bits = [b for _, b in shots] + [shots[0][1]]
        msgs += [{"role": "user", "content": _user(_SHOT_LABEL, texts)},
                 {"role": "assistant", "content": _answer(bits)}]
    msgs.append({"role": "user", "content": _user(label, excerpts)})
    return msgs


def build_detection_prompt(label: str, excerpts: Sequence[str]) -> list[dict]:
    """Chat messages asking whether each (unmarked) excerpt matches ``label``.

    One excerpt: the scorer answers one digit. Several: a Python list, one 0/1 per excerpt.
    A worked example (label ``"color adjectives"``) shows the reply format.

    Raises:
        ValueError: no excerpts or an empty label.
    """
    return _prompt("detection", label, [clean_text(e) for e in excerpts])


def build_fuzzing_prompt(label: str, excerpts: Sequence[str]) -> list[dict]:
    """Chat messages asking whether the ``<< >>``-marked words of each excerpt match ``label``.

    Raises:
        ValueError: no excerpts or an empty label.
    """
    return _prompt("fuzzing", label, [clean_text(e) for e in excerpts])


# ---------------------------------------------------------------------------- parsing
_TRUE = {"1", "yes", "true", "y"}
_FALSE = {"0", "no", "false", "n"}
_ANSWER_WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_NUMBERED = re.compile(r"(?<![\w.])(\d+)\s*(?:\.\s+|[):\-]\s*)\**\s*(yes|no|true|false|1|0)\b", re.IGNORECASE)


def _bit(word: str) -> int | None:
    w = word.strip().strip("'\"`*").lower()
    return 1 if w in _TRUE else 0 if w in _FALSE else None


def parse_binary_answers(reply: str | None, n: int) -> list[int] | None:
    """Read ``n`` yes/no answers (as 1/0) from a scorer's reply, or ``None`` when it is unusable.

    Accepted, in this order:

    1. a bracketed list of exactly ``n`` items, each 1/0/yes/no/true/false (``"[1, 0, 1]"``,
       ``"['yes','no']"``); the first such list wins;
    2. numbered answers ``1..n`` (``"1. yes 2. no"``, ``"1) 1\\n2) 0"``), in any order; a
       numbered reply missing a number is unusable;
    3. the answer words of the reply (``1``/``0`` as whole numbers, ``yes``/``no``,
       ``true``/``false``): exactly ``n`` of them, or, for ``n == 1``, any number that all
       agree (``"Yes, it does. 1"``).

    Anything else (no answer word, a count that does not match, ``"yes"`` and ``"no"``
    together for one example, ``"10"``, ``"0.5"``) is ``None``: the caller counts it as an
    error, not as an answer.
    """
    if reply is None or n < 1:
        return None
    text = str(reply)
    for m in _BRACKET.finditer(text):
        items = [x for x in re.split(r"[,\s;]+", m.group(1)) if x.strip()]
        bits = [_bit(x) for x in items]
        if len(bits) == n and all(b is not None for b in bits):
            return [int(b) for b in bits]  # type: ignore[arg-type]
    numbered: dict[int, int] = {}
    for m in _NUMBERED.finditer(text):
        k, b = int(m.group(1)), _bit(m.group(2))
        if 1 <= k <= n and b is not None and k not in numbered:
            numbered[k] = b
    if numbered:  # a numbered reply is read by its numbers only
        return [numbered[k] for k in range(1, n + 1)] if len(numbered) == n else None
    words = [_bit(w) for w in _ANSWER_WORD.findall(text.lower())]
    bits = [b for b in words if b is not None]
    if len(bits) == n:
        return bits
    if n == 1 and bits and len(set(bits)) == 1:
        return bits[:1]
    return None


# ---------------------------------------------------------------------------- sampling
def _sample_activating(examples: Sequence[Mapping[str, Any]], n: int, how: str, n_quantiles: int,
                       rng: np.random.Generator) -> list[Mapping[str, Any]]:
    """``n`` activating examples: the top ``n`` by activation (``"top"``), or an even draw from
    ``n_quantiles`` activation bins (``"quantiles"``, Delphi's default: the bins are consecutive
    slices of the examples sorted by decreasing activation; remainders go to the top bins)."""
    order = sorted(range(len(examples)), key=lambda i: (-example_activation(examples[i]), i))
    if n >= len(order):
        return [examples[i] for i in order]
    if how == "top":
        return [examples[i] for i in order[:n]]
    bins = [b for b in np.array_split(np.asarray(order), min(n_quantiles, len(order))) if len(b)]
    per = [n // len(bins) + (1 if q < n % len(bins) else 0) for q in range(len(bins))]
    chosen: list[int] = []
    spare: list[int] = []
    for b, k in zip(bins, per):
        take = rng.permutation(len(b))
        chosen += [int(b[j]) for j in take[:k]]
        spare += [int(b[j]) for j in take[k:]]
    if len(chosen) < n:  # a bin smaller than its share: fill from the rest
        chosen += [spare[j] for j in rng.permutation(len(spare))[: n - len(chosen)]]
    chosen.sort(key=lambda i: (-example_activation(examples[i]), i))
    return [examples[i] for i in chosen]


def _text_of(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("text"), str):
        return item["text"]
    raise ValueError(f"a non-activating example must be a string or a dict with 'text', got {item!r:.80}")


def _random_window(text: str, max_chars: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random ``max_chars`` window of ``text``, starting and ending at whitespace when possible."""
    if len(text) <= max_chars:
        return 0, len(text)
    lo = int(rng.integers(0, len(text) - max_chars + 1))
    if lo > 0:
        nxt = text.find(" ", lo, lo + 40)
        lo = nxt + 1 if nxt >= 0 else lo
    hi = min(len(text), lo + max_chars)
    if hi < len(text):
        prev = text.rfind(" ", max(lo, hi - 40), hi)
        hi = prev if prev > lo else hi
    return lo, hi


def _random_spans(text: str, true_spans: Sequence[tuple[int, int]], window: tuple[int, int],
                  rng: np.random.Generator) -> list[tuple[int, int]]:
    """As many random words (regex ``\\w+``) as there are true spans, inside ``window``, none
    overlapping a true span; ``[]`` when the window has no other word."""
    lo, hi = window
    words = [(m.start(), m.end()) for m in _WORD.finditer(text, lo, hi)
             if not any(m.start() < e and s < m.end() for s, e in true_spans)]
    if not words:
        return []
    k = min(len(words), max(1, len(true_spans)))
    return sorted(words[int(j)] for j in rng.choice(len(words), size=k, replace=False))


# ---------------------------------------------------------------------------- bookkeeping
def _counts(truths: Sequence[int], answers: Sequence[int | None]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and (tp, fp, tn, fn) over the answered examples."""
    tp = fp = tn = fn = 0
    for t, a in zip(truths, answers):
        if a is None:
            continue
        if t == 1:
            tp, fn = tp + (a == 1), fn + (a == 0)
        else:
            fp, tn = fp + (a == 1), tn + (a == 0)
    answered = tp + fp + tn + fn
    acc = (tp + tn) / answered if answered else None
    pos, neg = tp + fn, tn + fp
    bal = (tp / pos + tn / neg) / 2 if pos and neg else None
    return {"accuracy": acc, "balanced_accuracy": bal, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "answered": answered}





def scores_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """`score_labels` rows as a pyarrow table with :data:`SCORES_SCHEMA` (``concept`` as its
    ``str()``; missing scores are null; the per-example ``examples`` lists are left out)."""
    cols: dict[str, list] = {f.name: [] for f in SCORES_SCHEMA}
    for r in rows:
        for f in SCORES_SCHEMA:
            v = r.get(f.name)
            cols[f.name].append(str(v) if f.name == "concept" and v is not None else v)
    return pa.Table.from_pydict(cols, schema=SCORES_SCHEMA)


def shuffle_labels(labels: Mapping[Any, str], *, seed: int = 0) -> dict[Any, str]:
    """A seeded derangement of ``labels`` across concepts: every concept gets another concept's
    label (the control of Paulo et al. 2024). Needs at least two concepts with different labels
    for every concept to change; concepts that share a label may swap to an identical one.

    Raises:
        ValueError: fewer than two concepts.
    """
    keys = list(labels)
    if len(keys) < 2:
        raise ValueError("shuffling labels needs at least two concepts")
    rng = np.random.default_rng(seed)
    # a random cyclic shift of a random order is a derangement of the positions
    order = [keys[i] for i in rng.permutation(len(keys))]
    shift = int(rng.integers(1, len(keys)))
    return {order[i]: labels[order[(i + shift) % len(keys)]] for i in range(len(keys))}


# ---------------------------------------------------------------------------- main entry
@dataclass(frozen=True)
class _Options:
    """The sampling parameters of `score_labels`, checked in the order of its signature.

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """

    n_activating: int
    n_non_activating: int
    n_fuzzing: int
    sampling: str
    n_quantiles: int
    examples_per_prompt: int
    max_excerpt_chars: int
    seed: int

    def __post_init__(self) -> None:
        for name, lo in (("n_activating", 0), ("n_non_activating", 0), ("n_fuzzing", 0), ("n_quantiles", 1),
                         ("examples_per_prompt", 1), ("max_excerpt_chars", 20)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.sampling not in ("top", "quantiles"):
            raise ValueError(f"sampling must be 'top' or 'quantiles', got {self.sampling!r}")


def _plan_concept(cid: Any, concept: Mapping[str, Any], corpus: Sequence[Any] | None,
                  opts: _Options) -> dict[str, Any]:
    """The examples of one concept: ``{"detection": [...], "fuzzing": [...], "error": str | None}``,
    each item ``{"excerpt", "truth", "kind"}`` in a seeded random order; ``error`` says why
    detection has no examples (no non-activating text)."""
    examples = concept.get("examples")
    if not examples:
        raise ValueError("no activating examples")
    examples = [ex for ex in examples if isinstance(ex, Mapping) and isinstance(ex.get("text"), str)]
    if not examples:
        raise ValueError("activating examples must be dicts with 'text' (and 'spans', 'activation')")
    plan: dict[str, Any] = {"detection": [], "fuzzing": [], "error": None}
    n_activating, n_non_activating, n_fuzzing = opts.n_activating, opts.n_non_activating, opts.n_fuzzing
    sampling, n_quantiles, seed, max_chars = opts.sampling, opts.n_quantiles, opts.seed, opts.max_excerpt_chars

    pool = concept.get("non_activating")
    pool = list(pool) if pool is not None else list(corpus or [])
    shown = {ex["text"] for ex in examples}
    pool = [t for t in (_text_of(p) for p in pool) if t.strip() and t not in shown]
    if n_non_activating and not pool:  # detection needs both classes; fuzzing does not
        plan["error"] = ("no non-activating examples: give the concept 'non_activating' or a corpus "
                         "(detection not scored)")
    elif n_activating or n_non_activating:
        rng = seeded_rng(seed, cid, "detection")
        if n_non_activating and len(pool) < n_non_activating:  # keep the set balanced
            n_activating = min(n_activating, len(pool))
        pos = _sample_activating(examples, n_activating, sampling, n_quantiles, rng)
        for ex in pos:
            plan["detection"].append({"excerpt": mark_spans(ex["text"], ex.get("spans"), max_chars=max_chars,
                                                             mark=False), "truth": 1, "kind": "activating"})
        for j in rng.choice(len(pool), size=min(n_non_activating, len(pool)), replace=False) if pool else []:
            text = pool[int(j)]
            plan["detection"].append({"excerpt": mark_spans(text, [], mark=False,
                                                             window=_random_window(text, max_chars, rng)),
                                      "truth": 0, "kind": "non_activating"})
        plan["detection"] = [plan["detection"][int(i)] for i in rng.permutation(len(plan["detection"]))]

    if n_fuzzing:
        rng = seeded_rng(seed, cid, "fuzzing")
        with_spans = [ex for ex in examples if normalize_spans(ex.get("spans"), len(ex["text"]))]
        chosen = _sample_activating(with_spans, n_fuzzing, sampling, n_quantiles, rng)
        is_true = np.zeros(len(chosen), dtype=bool)
        is_true[rng.permutation(len(chosen))[: (len(chosen) + 1) // 2]] = True
        for ex, correct in zip(chosen, is_true):
            true = normalize_spans(ex.get("spans"), len(ex["text"]))
            window = excerpt_window(len(ex["text"]), true, max_chars)
            spans = true if correct else _random_spans(ex["text"], true, window, rng)
            if not spans:  # no other word to mark: the example cannot be fuzzed
                continue
            plan["fuzzing"].append({"excerpt": mark_spans(ex["text"], spans, window=window),
                                    "truth": int(bool(correct)), "kind": "correct" if correct else "random"})
    return plan


def score_labels(
    concepts: Mapping[Any, Mapping[str, Any]],
    config: LabelerConfig,
    *,
    corpus: Sequence[str | Mapping[str, Any]] | None = None,
    n_activating: int = 5,
    n_non_activating: int = 5,
    n_fuzzing: int = 10,
    sampling: str = "quantiles",
    n_quantiles: int = 5,
    examples_per_prompt: int = 1,
    max_excerpt_chars: int = SCORING_EXCERPT_CHARS,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Detection and fuzzing scores of each concept's label (Paulo et al. 2024, arXiv 2410.13928).

    Args:
        concepts: concept id -> ``{"label": str, "examples": [{"text", "spans", "activation"}, ...],
            "non_activating": [str | {"text"}, ...]}``. ``examples`` are activating examples
            (``spans``: character offsets of the activating tokens, end exclusive, as in
            `raylens.concepts.labels.build_label_prompt`); ``non_activating`` (optional)
            are texts where the concept does not fire.
        config: the scorer endpoint and request settings (`LabelerConfig`; its
            ``n_examples`` is not used here). ``max_tokens`` must leave room for a list
            when ``examples_per_prompt > 1`` (about 3 tokens per example).
        corpus: texts to draw non-activating examples from when a concept has no
            ``non_activating`` list (the caller makes sure the concept does not fire on
            them; texts equal to one of the concept's activating examples are skipped).
        n_activating: activating examples per concept for detection (truth 1).
        n_non_activating: random non-activating excerpts per concept for detection (truth 0);
            keep it equal to ``n_activating`` so 0.5 is chance. A concept with fewer
            non-activating texts gets that many activating excerpts too (the set stays
            balanced); one with none is not scored on detection (its ``error`` says so; its
            fuzzing score is still computed).
        n_fuzzing: activating examples per concept for fuzzing (examples with spans only);
            half (rounded up) have their true spans marked (truth 1), the others as many
            random words of the same excerpt (truth 0).
        sampling: ``"quantiles"`` (even draw over ``n_quantiles`` activation bins, Delphi's
            default) or ``"top"`` (highest activations).
        examples_per_prompt: examples shown per request (Delphi: 5; 1 is more reliable
            for small scorer models, whose lists are often the wrong length).
        max_excerpt_chars: excerpt length, around the first activating span (a random
            window for non-activating texts).
        seed: sampling seed; a concept's examples depend on (seed, concept id) only.
        progress: tqdm bar on stderr.

    Returns:
        One dict per concept, in input order: ``concept``, ``label``;
        ``detection_accuracy``, ``fuzzing_accuracy`` (share of answered examples answered
        right; 0.5 = chance on these balanced sets, 1 = perfect; None when no example of
        the task was answered); ``detection_balanced_accuracy``,
        ``fuzzing_balanced_accuracy`` (mean of true-positive and true-negative rates; None
        unless both classes were answered); per task ``{task}_tp``, ``_fp``, ``_tn``, ``_fn``,
        ``_n_examples``, ``_n_errors``; ``n_examples`` (both tasks), ``n_errors`` (examples
        without a usable answer: endpoint errors and unparseable replies), ``n_cached``
        (examples answered from the cache), ``error`` (the first error, or None), and
        ``examples``: one dict per example ``{task, kind, excerpt, truth, answer, error,
        cached}`` (``answer`` None on error). `scores_table` turns the rows into a table.

    Never raises for an endpoint problem or a malformed concept: those end up in the
    concept's ``error`` (an endpoint error names ``config.base_url``).

    Raises:
        TypeError: ``config`` is not a `LabelerConfig`.
        ValueError: a bad scoring parameter (the message names it).
    """
    if not isinstance(config, LabelerConfig):
        raise TypeError(f"config must be a LabelerConfig, got {type(config).__name__}")
    opts = _Options(n_activating, n_non_activating, n_fuzzing, sampling, n_quantiles, examples_per_prompt,
                    max_excerpt_chars, seed)
    cache = ReplyCache(config.cache_path)
    requests = _plan_requests(concepts, corpus, opts, config, cache)
    _ask(requests, config, cache, progress)
    return _summarise(concepts, requests)


@dataclass
class _Requests:
    """What `score_labels` asks, and where the answers go."""

    rows: dict[Any, dict] = field(default_factory=dict)  # concept -> its result row
    items: dict[Any, list[dict]] = field(default_factory=dict)  # concept -> example records
    pending: dict[str, list[dict]] = field(default_factory=dict)  # cache key -> messages
    waiting: dict[str, list[list[dict]]] = field(default_factory=dict)  # cache key -> groups of records it answers


def _plan_requests(concepts: Mapping[Any, Mapping[str, Any]], corpus: Sequence[Any] | None, opts: _Options,
                   config: LabelerConfig, cache: ReplyCache) -> _Requests:
    """Every concept's examples and the prompts still to send (cached answers filled in)."""
    req = _Requests()
    for cid, concept in concepts.items():
        label = concept.get("label") if isinstance(concept, Mapping) else None
        req.rows[cid] = {"concept": cid, "label": label if isinstance(label, str) else None, "error": None}
        req.items[cid] = []
        try:
            if not isinstance(concept, Mapping):
                raise ValueError(f"concept must be a dict, got {type(concept).__name__}")
            if not isinstance(label, str) or not clean_text(label):
                raise ValueError(f"label must be a non-empty string, got {label!r:.80}")
            plan = _plan_concept(cid, concept, corpus, opts)
        except Exception as e:
            req.rows[cid]["error"] = f"bad concept {cid!r}: {e}"
            continue
        if plan["error"]:
            req.rows[cid]["error"] = f"concept {cid!r}: {plan['error']}"
        for task in ("detection", "fuzzing"):
            recs = [{"task": task, "kind": p["kind"], "excerpt": p["excerpt"], "truth": p["truth"],
                     "answer": None, "error": None, "cached": False} for p in plan[task]]
            req.items[cid] += recs
            _queue_groups(req, task, label, recs, opts.examples_per_prompt, config, cache)
    return req


def _queue_groups(req: _Requests, task: str, label: str, recs: list[dict], per_prompt: int,
                  config: LabelerConfig, cache: ReplyCache) -> None:
    """One prompt per ``per_prompt`` records of a task: answered from the cache, or queued in ``req``."""
    for g in range(0, len(recs), per_prompt):
        group = recs[g: g + per_prompt]
        msgs = _prompt(task, label, [r["excerpt"] for r in group])
        key = cache_key(config.model, prompt_hash(msgs, config, version=SCORING_PROMPT_VERSION, kind=task))
        hit = cache.get(key, "answers")
        if hit is not None and isinstance(hit["answers"], list) and len(hit["answers"]) == len(group):
            for r, a in zip(group, hit["answers"]):
                r["answer"], r["cached"] = int(a), True
            continue
        req.pending[key] = msgs
        req.waiting.setdefault(key, []).append(group)


def _ask(req: _Requests, config: LabelerConfig, cache: ReplyCache, progress: bool) -> None:
    """Send the pending prompts; each parsed answer (or error) goes to the records waiting on it."""
    sizes = {key: len(groups[0]) for key, groups in req.waiting.items()}

    def parse(key: str, reply: str | None) -> tuple[list[int] | None, str | None]:
        bits = parse_binary_answers(reply, sizes[key])
        if bits is None:
            return None, (f"unparseable reply from {config.base_url} for {sizes[key]} example(s): "
                          f"{clean_text(str(reply))[:80]!r}")
        return bits, None

    def deliver(key: str, bits: list[int] | None, err: str | None) -> None:
        for group in req.waiting[key]:
            for j, r in enumerate(group):
                if err is None:
                    r["answer"] = int(bits[j])  # type: ignore[index]
                else:
                    r["error"] = err

    complete_all(req.pending, config, parse, cache=cache, field="answers", on_result=deliver,
                 progress="scoring labels" if progress else None,
                 weights={k: sum(len(g) for g in v) for k, v in req.waiting.items()}, unit="example")


def _summarise(concepts: Mapping[Any, Any], req: _Requests) -> list[dict]:
    """The `score_labels` rows, in input order: per-task counts and accuracies, the first error."""
    out = []
    for cid in concepts:
        row, recs = req.rows[cid], req.items[cid]
        for task in ("detection", "fuzzing"):
            task_recs = [r for r in recs if r["task"] == task]
            c = _counts([r["truth"] for r in task_recs], [r["answer"] for r in task_recs])
            row[f"{task}_accuracy"] = c["accuracy"]
            row[f"{task}_balanced_accuracy"] = c["balanced_accuracy"]
            for k in ("tp", "fp", "tn", "fn"):
                row[f"{task}_{k}"] = c[k]
            row[f"{task}_n_examples"] = len(task_recs)
            row[f"{task}_n_errors"] = sum(1 for r in task_recs if r["answer"] is None)
        row["n_examples"] = len(recs)
        row["n_errors"] = sum(1 for r in recs if r["answer"] is None)
        row["n_cached"] = sum(1 for r in recs if r["cached"])
        if row["error"] is None:
            row["error"] = next((r["error"] for r in recs if r["error"]), None)
        row["examples"] = recs
        out.append(row)
    n_err = sum(r["n_errors"] for r in out)
    if n_err:
        first = next((r["error"] for r in out if r["error"]), None)
        log.warning("%d of %d scoring examples have no usable answer; first error: %s",
                    n_err, sum(r["n_examples"] for r in out), first)
    return out
