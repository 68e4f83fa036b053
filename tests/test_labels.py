"""LLM concept labels: prompt building (fast), a down endpoint (fast), and a real
``transformers serve`` on loopback with the built-in SmolLM2-135M-Instruct (slow)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from raylens.concepts.labels import (
    build_label_prompt,
    choose_sampled_examples,
    label_concepts,
    mark_spans,
    parse_label,
)
from raylens.llm.client import check_endpoint
from raylens.llm.config import LabelerConfig
from raylens.llm.server import LocalLLMServer, free_loopback_port

# ---------------------------------------------------------------------------- data
CONCEPTS = {
    0: {
        "examples": [
            {"text": "I moved to Paris last year", "spans": [[11, 16]], "activation": 3.0},
            {"text": "the train from London was late", "spans": [[15, 21]], "activation": 2.5},
            {"text": "Berlin is cold in winter", "spans": [[0, 6]], "activation": 2.0},
            {"text": "flights to Rome are cheap", "spans": [[11, 15]], "activation": 1.0},
        ],
        "top_tokens": ["Paris", "London", "Berlin", "Rome"],
    },
    7: {
        "examples": [
            {"text": "the dog barked loudly", "spans": [[4, 7]], "activation": 5.0},
            {"text": "a cat sat on the mat", "spans": [[2, 5]], "activation": 4.0},
            {"text": "the horse ran away", "spans": [[4, 9]], "activation": 3.0},
        ],
        "top_tokens": ["dog", "cat", "horse"],
    },
    12: {
        "examples": [
            {"text": "This movie was terrible and boring", "spans": [[15, 23]], "activation": 2.0},
            {"text": "an awful film", "spans": [[3, 8]], "activation": 1.5},
            {"text": "the acting was bad", "spans": [[15, 18]], "activation": 1.0},
        ],
        "top_tokens": ["terrible", "awful", "bad"],
    },
}
# Same prompt as concept 7: must share its request.
CONCEPTS[8] = json.loads(json.dumps(CONCEPTS[7]))


def _dead_url() -> str:
    """A loopback port with nothing listening."""
    return f"http://127.0.0.1:{free_loopback_port()}/v1"


# ---------------------------------------------------------------------------- fast: prompts
def test_mark_spans_marks_activating_tokens():
    assert mark_spans("I moved to Paris last year", [[11, 16]]) == "I moved to <<Paris>> last year"
    # several spans, given out of order
    assert mark_spans("cats and dogs", [[9, 13], [0, 4]]) == "<<cats>> and <<dogs>>"
    # touching / overlapping spans of one multi-token word merge into one marked run
    assert mark_spans("New York is big", [[0, 3], [3, 8]]) == "<<New York>> is big"
    assert mark_spans("abcdef", [[0, 4], [2, 6]]) == "<<abcdef>>"
    # a token with its leading space, at the very end
    assert mark_spans("hello world", [[5, 11]]) == "hello<< world>>"
    # control characters become spaces, the result is one line, offsets still refer to the raw text
    assert mark_spans("line one\nParis\ttwo\x00", [[9, 14]]) == "line one <<Paris>> two"
    # empty spans are ignored, no spans -> plain text
    assert mark_spans("plain", [[2, 2]]) == "plain"
    assert mark_spans("plain", []) == "plain"
    # long texts are cut to a window around the first span, which stays marked
    long = "a " * 500 + "TARGET" + " b" * 500
    s = long.index("TARGET")
    out = mark_spans(long, [[s, s + 6]], max_chars=100)
    assert "<<TARGET>>" in out and out.startswith("…") and out.endswith("…") and len(out) <= 100 + 6
    for bad in ([[3, 2]], [[0, 99]], [[-1, 2]], [[0]], [["a", "b"]], [[0.5, 2]]):
        with pytest.raises(ValueError):
            mark_spans("short", bad)


def test_build_label_prompt_orders_and_marks_examples():
    examples = [
        {"text": "low one", "spans": [[0, 3]], "activation": 0.1},
        {"text": "a dog\nbarks", "spans": [[2, 5]], "activation": 2.0},
        {"text": "the cat sat", "spans": [[4, 7]], "activation": 9.0},
    ]
    msgs = build_label_prompt(examples, ["dog", " cat", "\n"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
    user = msgs[-1]["content"]
    lines = user.splitlines()
    # highest activation first, spans marked, newline inside the example gone
    assert lines[1] == "1. the <<cat>> sat"
    assert lines[2] == "2. a <<dog>> barks"
    assert lines[3] == "3. <<low>> one"
    assert "Top tokens: dog, cat" in user and user.endswith("Label:")
    # top-k selection
    short = build_label_prompt(examples, None, max_examples=1)[-1]["content"]
    assert "<<cat>>" in short and "dog" not in short and "Top tokens" not in short
    with pytest.raises(ValueError):
        build_label_prompt([])


SAMPLED = [  # weaker examples of concept 0, as concepts/sampled_examples.parquet gives them
    {"text": "a weekend in Lisbon", "spans": [[13, 19]], "activation": 0.4, "doc_id": 5, "unit": 4, "quantile": 1},
    {"text": "near Oslo", "spans": [[5, 9]], "activation": 0.1, "doc_id": 6, "unit": 2, "quantile": 0},
    {"text": "Madrid again", "spans": [[0, 6]], "activation": 0.9, "doc_id": 7, "unit": 0, "quantile": 2},
]


def test_sampled_examples_get_their_own_section_and_change_the_hash(tmp_path):
    top = CONCEPTS[0]["examples"]
    base = build_label_prompt(top, ["Paris"])
    assert build_label_prompt(top, ["Paris"], sampled=[]) == base  # top-only prompts are unchanged
    msgs = build_label_prompt(top, ["Paris"], max_examples=2, sampled=SAMPLED)
    assert msgs[:3] == base[:3]
    lines = msgs[-1]["content"].splitlines()
    assert lines[1:3] == ["1. I moved to <<Paris>> last year", "2. the train from <<London>> was late"]
    assert lines[3] == "More excerpts, sampled across weaker activation levels:"
    assert lines[4:7] == ["3. <<Madrid>> again", "4. a weekend in <<Lisbon>>", "5. near <<Oslo>>"]
    assert lines[7] == "Top tokens: Paris" and lines[8] == "Label:"
    rnd = build_label_prompt(top, None, sampled=SAMPLED[:1], sampled_how="random")[-1]["content"]
    assert "sampled at random among all activating ones:" in rnd
    with pytest.raises(ValueError, match="sampled_how"):
        build_label_prompt(top, None, sampled=SAMPLED, sampled_how="bottom")
    # the prompt hash (the cache key) follows the examples: top-only unchanged, sampled ones new
    cfg = LabelerConfig(base_url=_dead_url(), model="m", max_retries=0, timeout_s=5)
    plain = {0: CONCEPTS[0]}
    mixed = {0: {**CONCEPTS[0], "sampled_examples": SAMPLED, "sampled_how": "quantile"}}
    empty = {0: {**CONCEPTS[0], "sampled_examples": []}}
    h = {name: label_concepts(c, cfg, progress=False)[0]["prompt_hash"]
         for name, c in (("plain", plain), ("mixed", mixed), ("empty", empty))}
    assert h["plain"] == h["empty"] != h["mixed"]


def test_choose_sampled_examples_spreads_bins_and_is_seeded():
    rows = [{"doc_id": d, "unit": 0, "quantile": d // 3, "activation": float(d), "text": f"t{d}", "spans": []}
            for d in range(15)]  # 5 bins of 3
    got = choose_sampled_examples(rows, 3, "quantile", seed=0, concept=4)
    assert [r["quantile"] for r in got] == [4, 2, 0]  # evenly spaced bins, highest first
    assert choose_sampled_examples(rows, 3, "quantile", seed=0, concept=4) == got
    assert len({r["quantile"] for r in choose_sampled_examples(rows, 5, "quantile", seed=1, concept=4)}) == 5
    seven = choose_sampled_examples(rows, 7, "quantile", seed=0, concept=4)
    assert len(seven) == 7 and len({r["doc_id"] for r in seven}) == 7
    assert [r["activation"] for r in seven] == sorted((r["activation"] for r in seven), reverse=True)
    # already shown examples are never picked again
    shown = rows[::2]
    for how in ("quantile", "random"):
        picked = choose_sampled_examples(rows, 20, how, exclude=shown, seed=0, concept=1)
        assert {r["doc_id"] for r in picked} == {r["doc_id"] for r in rows[1::2]}
    r1 = choose_sampled_examples(rows, 4, "random", seed=0, concept=1)
    assert r1 == choose_sampled_examples(rows, 4, "random", seed=0, concept=1)
    assert {tuple(r["doc_id"] for r in choose_sampled_examples(rows, 4, "random", seed=s, concept=1))
            for s in range(5)} != {tuple(r["doc_id"] for r in r1)}
    assert choose_sampled_examples([], 4, "random") == [] and choose_sampled_examples(rows, 0, "random") == []


def test_parse_label_cleans_replies():
    assert parse_label('Label: "color adjectives".') == "color adjectives"
    assert parse_label("**Label:** `city names`") == "city names"
    assert parse_label("Theme:\nanimals\nmore text") == "animals"
    assert parse_label("The feature detects: years") == "years"
    assert parse_label("<<Paris>> cities") == "Paris cities"
    assert parse_label("bad\x07 words\u202e") == "bad words"
    assert parse_label("") is None and parse_label(None) is None and parse_label('  "" ') is None
    long = parse_label("word " * 60)
    assert long is not None and len(long) <= 80 and not long.endswith(" ")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_concurrency"):
        LabelerConfig(base_url="http://127.0.0.1:1/v1", model="m", max_concurrency=0)
    with pytest.raises(ValueError, match="base_url"):
        LabelerConfig(base_url="127.0.0.1:1", model="m")
    assert LabelerConfig(base_url="http://127.0.0.1:1/v1/", model="m").base_url == "http://127.0.0.1:1/v1"


def test_server_refuses_non_loopback_host():
    with pytest.raises(ValueError, match="127.0.0.1"):
        LocalLLMServer(host="0.0.0.0")


# ---------------------------------------------------------------------------- fast: endpoint down
def test_down_endpoint_gives_per_concept_errors(tmp_path):
    url = _dead_url()
    cfg = LabelerConfig(base_url=url, model="m", max_retries=1, timeout_s=5, cache_path=str(tmp_path / "c.json"))
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=url.replace(".", r"\.")):
        check_endpoint(cfg)
    assert time.monotonic() - t0 < 3

    t0 = time.monotonic()
    concepts = {**CONCEPTS, 99: {"examples": []}}
    out = label_concepts(concepts, cfg, progress=False)
    assert time.monotonic() - t0 < 15
    assert list(out) == list(concepts)
    for cid, r in out.items():
        assert r["label"] is None and r["cached"] is False
        assert isinstance(r["error"], str) and r["error"]
        if cid == 99:
            assert "example" in r["error"] and r["prompt_hash"] == ""
        else:
            assert url in r["error"] and "unreachable" in r["error"]
            assert len(r["prompt_hash"]) == 64
    assert out[7]["prompt_hash"] == out[8]["prompt_hash"]
    assert not (tmp_path / "c.json").exists()  # errors are not cached


# ---------------------------------------------------------------------------- slow: real server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("llm") / "server.log"
    with LocalLLMServer("smollm2-135m", log_path=log_path) as srv:
        yield srv
    assert not srv.running


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory):
    cache = tmp_path_factory.mktemp("labels") / "labels.json"
    cfg = server.labeler_config(max_tokens=12, max_concurrency=2, cache_path=str(cache))
    before = server.count_requests()
    t0 = time.monotonic()
    out = label_concepts(CONCEPTS, cfg, progress=False)
    elapsed = time.monotonic() - t0
    return cfg, out, server.count_requests() - before, elapsed


@pytest.mark.slow
def test_server_is_loopback_openai_compatible(server):
    assert server.running
    assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
    assert server.startup_s is not None and server.startup_s < 120
    check_endpoint(server.labeler_config())  # reachable: no exception
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    r = client.chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.0
    )
    assert isinstance(r.choices[0].message.content, str)


@pytest.mark.slow
def test_labels_come_from_the_local_server(first_run, server):
    cfg, out, n_requests, elapsed = first_run
    # four concepts, two share a prompt: three chat completions reached the server
    assert n_requests == 3, server.log_tail()
    assert list(out) == list(CONCEPTS)
    for cid, r in out.items():
        assert r["error"] is None, r
        assert r["cached"] is False
        assert isinstance(r["label"], str) and 0 < len(r["label"]) <= 80
        assert "\n" not in r["label"] and "<<" not in r["label"]
        assert len(r["prompt_hash"]) == 64
    assert out[7] == out[8]
    assert len({out[c]["prompt_hash"] for c in (0, 7, 12)}) == 3
    print(f"labels: { {c: r['label'] for c, r in out.items()} }; {elapsed / n_requests:.2f} s per request")


@pytest.mark.slow
def test_rerun_with_cache_makes_no_request(first_run, server):
    cfg, out, _, _ = first_run
    data = json.loads(open(cfg.cache_path, encoding="utf-8").read())
    assert len(data["entries"]) == 3
    before = server.count_requests(status=None)
    again = label_concepts(CONCEPTS, cfg, progress=False)
    assert server.count_requests(status=None) == before
    for cid in CONCEPTS:
        assert again[cid]["cached"] is True
        assert again[cid]["label"] == out[cid]["label"]
        assert again[cid]["prompt_hash"] == out[cid]["prompt_hash"]
        assert again[cid]["error"] is None


@pytest.mark.slow
def test_http_error_is_reported_not_retried(server, tmp_path):
    # The server is pinned to its folder: another model name is answered with HTTP 400.
    cfg = server.labeler_config(model="not-this-model", max_retries=3, cache_path=str(tmp_path / "c.json"))
    before = server.count_requests(status=400)
    out = label_concepts({1: CONCEPTS[0]}, cfg, progress=False)
    assert out[1]["label"] is None
    assert server.base_url in out[1]["error"] and "400" in out[1]["error"]
    assert server.count_requests(status=400) - before == 1


@pytest.mark.slow
def test_server_start_failure_shows_log_tail(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    srv = LocalLLMServer(str(empty), startup_timeout_s=90, log_path=tmp_path / "fail.log")
    with pytest.raises(RuntimeError, match="log tail"):
        srv.start()
    assert not srv.running
    # nothing is left listening on its port
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", srv.port)) != 0
