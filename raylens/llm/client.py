"""An OpenAI-compatible chat-completions client: construction, a reachability check, one
request with bounded retries, and `complete_all`, the concurrent runner that labelling
and label scoring share.

Any OpenAI-compatible server works (vLLM, TGI, llama.cpp, the OpenAI API, or
`raylens.llm.server.LocalLLMServer` on loopback). Endpoint problems never raise out of
`complete_all`: they end up as per-prompt errors naming ``config.base_url``. This module
does not import ray; ``openai`` is imported when a client is made.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from raylens.llm.cache import ReplyCache
from raylens.llm.config import LabelerConfig
from raylens.llm.text import clean_text

log = logging.getLogger(__name__)

__all__ = ["check_endpoint", "complete_all", "make_client", "retry_after_s"]


def make_client(config: LabelerConfig, *, timeout_s: float | None = None) -> Any:
    """An ``openai.OpenAI`` client for ``config.base_url`` with its own retries off
    (`complete_all` retries as ``config.max_retries`` says).

    Args:
        timeout_s: per-request timeout in seconds (default ``config.timeout_s``).
    """
    import openai

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

    client = make_client(config, timeout_s=min(float(timeout_s), float(config.timeout_s)))
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
    return clean_text(msg)[:300]


class _EndpointDown(Exception):
    pass


class _BadReply(Exception):
    """HTTP 200, but not a chat completion (no choices)."""


def retry_after_s(headers: Any) -> float | None:
    """Seconds to wait that an HTTP answer asks for: ``retry-after-ms`` (OpenAI), else
    ``Retry-After`` as seconds or as an HTTP date (RFC 9110, section 10.2.3). None when absent
    or unreadable; never negative."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _classify(e: BaseException, config: LabelerConfig) -> tuple[str, bool, bool, float | None]:
    """``(message, retry, fatal, Retry-After seconds)`` of one failed request; ``fatal`` trips
    the circuit breaker (the endpoint does not answer at all)."""
    import openai

    url = config.base_url
    if isinstance(e, openai.APITimeoutError):
        return f"LLM endpoint {url} timed out after {config.timeout_s:g} s", True, False, None
    if isinstance(e, openai.APIConnectionError):
        return f"LLM endpoint {url} is unreachable: {_root_cause(e)}", True, True, None
    if isinstance(e, openai.APIStatusError):
        detail = clean_text(str(getattr(e, "message", "") or e))[:300]
        retry = e.status_code == 429 or e.status_code >= 500
        hint = retry_after_s(getattr(e.response, "headers", None)) if retry else None
        return f"LLM endpoint {url} returned HTTP {e.status_code}: {detail}", retry, False, hint
    if isinstance(e, _BadReply):
        return f"LLM endpoint {url} answered with no choices", True, False, None
    if isinstance(e, openai.APIError):  # e.g. a reply the client could not validate
        return f"LLM endpoint {url}: {type(e).__name__}: {clean_text(str(e))[:300]}", True, False, None
    # ValueError: the body did not decode (json.JSONDecodeError keeps the text as ``doc``)
    doc = getattr(e, "doc", None)
    what = "an empty body" if doc is not None and not doc.strip() else "a body that is not JSON"
    return (f"LLM endpoint {url} answered HTTP 200 with {what}"
            + (f" ({clean_text(doc)[:60]!r})" if doc and doc.strip() else ""), True, False, None)


def _request(client: Any, config: LabelerConfig, messages: list[dict], down: threading.Event) -> str | None:
    """One chat completion with at most ``config.max_retries`` retries: exponential backoff
    from ``config.backoff_s`` (+-25% jitter), or the ``Retry-After`` the endpoint asks for,
    each capped at ``config.max_backoff_s``. Returns the reply text; raises ``RuntimeError``
    with a message naming base_url (and the attempts) once it gives up."""
    import openai

    attempt = 0
    while True:
        if down.is_set():
            raise _EndpointDown(f"LLM endpoint {config.base_url} is unreachable (an earlier request gave up); "
                                "not sent")
        try:
            resp = client.chat.completions.create(
                model=config.model,
                messages=messages,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
            )
            if not getattr(resp, "choices", None):
                raise _BadReply()
            return resp.choices[0].message.content
        except (openai.APIError, _BadReply, ValueError) as e:
            err, retry, fatal, hint = _classify(e, config)
            cause: BaseException = e
        if not retry or attempt >= config.max_retries:
            if fatal:
                down.set()  # circuit breaker: the rest fail fast instead of retrying each
            raise RuntimeError(err + (f" (after {attempt + 1} attempts)" if attempt else "")) from cause
        if hint is not None:
            delay = min(config.max_backoff_s, hint)
        else:
            delay = min(config.max_backoff_s, config.backoff_s * 2**attempt) * (0.75 + 0.5 * random.random())
        log.debug("%s; retry %d/%d in %.2f s", err, attempt + 1, config.max_retries, delay)
        attempt += 1
        time.sleep(delay)


def _complete_one(client: Any, config: LabelerConfig, key: str, messages: list[dict], down: threading.Event,
                  parse: Callable[[str, str | None], tuple[Any, str | None]], cache: ReplyCache,
                  field: str) -> tuple[Any, str | None]:
    """Request, parse and cache one prompt for `complete_all`: ``(value, error)``, never raising."""
    try:
        reply = _request(client, config, messages, down)
    except (RuntimeError, _EndpointDown) as e:
        return None, str(e)
    except Exception as e:  # an unexpected client failure stays with its prompt
        return None, f"LLM request to {config.base_url} failed: {type(e).__name__}: {clean_text(str(e))[:300]}"
    try:
        value, err = parse(key, reply)
    except Exception as e:  # a parser bug must not lose the other replies
        return None, f"could not parse the reply of {config.base_url}: {type(e).__name__}: {e}"
    if err is None:
        cache.put(key, {field: value, "raw": reply, "model": config.model, "time": time.time()})
    return value, err


def complete_all(
    prompts: Mapping[str, list[dict]],
    config: LabelerConfig,
    parse: Callable[[str, str | None], tuple[Any, str | None]],
    *,
    cache: ReplyCache,
    field: str,
    on_result: Callable[[str, Any, str | None], None] | None = None,
    progress: str | None = None,
    weights: Mapping[str, int] | None = None,
    unit: str = "request",
) -> dict[str, tuple[Any, str | None]]:
    """Send every prompt once, concurrently, with retries; parse, cache and report each reply.

    Shared by `raylens.concepts.labels.label_concepts` and `raylens.concepts.scoring`. At
    most ``config.max_concurrency`` requests are in flight; each is retried as
    `LabelerConfig` says; after the first request that gives up on a connection error the
    rest fail at once (circuit breaker) instead of each retrying.

    Args:
        prompts: cache key (`raylens.llm.cache.cache_key`) -> chat messages. Keys already
            in the cache should be left out by the caller (they are requested again otherwise).
        config: endpoint and request settings.
        parse: ``parse(key, raw reply)`` -> ``(value, None)`` when usable, ``(None, error)`` when not.
            Usable values are cached as ``{field: value, "raw", "model", "time"}``;
            errors are not cached (a rerun asks again).
        cache: where usable replies go; flushed at the end, also on interruption, so no
            finished request is lost.
        on_result: called in the calling thread as ``on_result(key, value, error)`` as
            each request finishes.
        progress: description of a tqdm bar on stderr, ``None`` for no bar.
        weights: bar increments per key (default 1), counted in ``unit``.

    Returns:
        key -> ``(value, error)``; exactly one of them is not None. Never raises for an
        endpoint problem (unreachable, timeout, HTTP error): it lands in ``error``, naming
        ``config.base_url``.
    """
    out: dict[str, tuple[Any, str | None]] = {}
    if not prompts:
        return out
    down = threading.Event()
    client = make_client(config)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum((weights or {}).get(k, 1) for k in prompts), desc=progress, unit=unit)
    ex = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="raylens-llm")
    try:
        futures = {ex.submit(_complete_one, client, config, key, msgs, down, parse, cache, field): key
                   for key, msgs in prompts.items()}
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
