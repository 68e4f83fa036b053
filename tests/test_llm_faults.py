"""LLM endpoint faults, through raylens' own client and the real ``openai`` client, against the
fault-injecting server of `tests.llm_faults` on loopback: bounded retries with exponential
backoff (Retry-After honoured up to a cap), then the concept is unlabelled with the reason, and
every other concept still gets its answer. Short timeouts and backoffs keep each test fast."""

from __future__ import annotations

import time

import pytest

from raylens.concepts.labels import label_concepts
from raylens.llm.client import retry_after_s
from raylens.llm.config import LabelerConfig
from tests.llm_faults import FaultyLLM

CONCEPTS = {
    0: {"examples": [{"text": "a great movie, great cast", "spans": [[2, 7]], "activation": 2.0}],
        "top_tokens": ["great"]},
    1: {"examples": [{"text": "the plot was dull", "spans": [[13, 17]], "activation": 1.5}], "top_tokens": ["dull"]},
}
FAST = dict(model="m", timeout_s=0.5, backoff_s=0.05, max_backoff_s=0.2, max_concurrency=1)


def _label(server: FaultyLLM, tmp_path, **over) -> tuple[dict, float]:
    cfg = LabelerConfig(base_url=server.base_url, cache_path=str(tmp_path / "cache.json"), **{**FAST, **over})
    t0 = time.monotonic()
    out = label_concepts(CONCEPTS, cfg, progress=False)
    return out, time.monotonic() - t0


def _all_unlabelled(out: dict, url: str, reason: str, attempts: int) -> None:
    assert list(out) == list(CONCEPTS)
    for r in out.values():
        assert r["label"] is None, r
        assert url in r["error"] and reason in r["error"], r["error"]
        if attempts > 1:
            assert f"after {attempts} attempts" in r["error"], r["error"]


@pytest.mark.parametrize("mode, reason", [
    ("500", "HTTP 500"),
    ("429", "HTTP 429"),
    ("garbage", "a body that is not JSON"),
    ("empty", "an empty body"),
])
def test_faults_are_retried_a_bounded_number_of_times_then_recorded(tmp_path, mode, reason):
    with FaultyLLM(mode, retry_after=None) as server:
        out, elapsed = _label(server, tmp_path, max_retries=2)
    _all_unlabelled(out, server.base_url, reason, attempts=3)
    assert len(server.chat_requests()) == 2 * 3  # two concepts, 1 + max_retries attempts each
    assert elapsed < 10
    assert not (tmp_path / "cache.json").exists()  # errors are not cached: a rerun asks again


def test_slow_endpoint_times_out_and_is_retried(tmp_path):
    with FaultyLLM("slow", delay_s=5.0) as server:
        out, elapsed = _label(server, tmp_path, max_retries=1, timeout_s=0.3)
    _all_unlabelled(out, server.base_url, "timed out after 0.3 s", attempts=2)
    assert len(server.chat_requests()) == 2 * 2
    assert elapsed < 4  # four timeouts of 0.3 s and short backoffs, never the server's 5 s


def test_down_endpoint_fails_fast_with_the_circuit_breaker(tmp_path):
    server = FaultyLLM("down")
    out, elapsed = _label(server, tmp_path, max_retries=3)
    assert list(out) == list(CONCEPTS)
    assert all(r["label"] is None and "unreachable" in r["error"] and server.base_url in r["error"]
               for r in out.values())
    assert elapsed < 3


@pytest.mark.parametrize("mode", ["500", "429", "garbage", "empty", "slow"])
def test_good_reply_after_failures_is_the_label(tmp_path, mode):
    with FaultyLLM(mode, fail_first=2, retry_after="0", delay_s=2.0, reply="Praise for movies") as server:
        out, _ = _label(server, tmp_path, max_retries=3, timeout_s=0.4)
    assert [r["label"] for r in out.values()] == ["Praise for movies"] * 2
    assert all(r["error"] is None for r in out.values())
    assert len(server.chat_requests()) == 2 + 2  # two failures, then one good reply per concept


def test_backoff_grows_exponentially(tmp_path):
    with FaultyLLM("500") as server:
        _label(server, tmp_path, max_retries=3, backoff_s=0.2, max_backoff_s=5.0)
    gaps = server.gaps()[:3]  # the first concept's three retries (one request in flight at a time)
    assert len(gaps) == 3
    for i, g in enumerate(gaps):
        assert g >= 0.75 * 0.2 * 2**i - 0.01, gaps  # at least the jittered delay
    assert gaps[0] < gaps[1] < gaps[2], gaps


def test_retry_after_is_honoured_up_to_the_cap(tmp_path):
    with FaultyLLM("429", fail_first=1, retry_after="1") as server:
        out, _ = _label(server, tmp_path, max_retries=2, max_backoff_s=5.0)
    assert out[0]["label"] == "movie sentiment"
    assert server.gaps()[0] >= 0.95  # waited what the server asked, not the 0.05 s backoff
    with FaultyLLM("429", retry_after="3600") as server:  # asks for an hour: capped at 0.2 s
        (tmp_path / "capped").mkdir()
        out, elapsed = _label(server, tmp_path / "capped", max_retries=2, max_backoff_s=0.2)
    assert all("HTTP 429" in r["error"] for r in out.values())
    assert elapsed < 5 and max(server.gaps()) < 1.0


def test_retry_after_header_forms():
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "1.5"}) == 1.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "-3"}) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None and retry_after_s(None) is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_s({"retry-after": future}) <= 31


def test_other_http_errors_are_not_retried(tmp_path):
    """A 4xx other than 429 will not improve with time: one attempt, then the reason."""
    with FaultyLLM("400") as server:
        out, _ = _label(server, tmp_path, max_retries=3)
    _all_unlabelled(out, server.base_url, "HTTP 400", attempts=1)
    assert len(server.chat_requests()) == 2
    with pytest.raises(ValueError, match="backoff_s"):
        LabelerConfig(base_url=server.base_url, model="m", backoff_s=0)
