"""Talking to an OpenAI-compatible LLM: the endpoint config, a client with bounded retries
and a concurrent runner, the on-disk reply cache, and a local server on loopback.

- `LabelerConfig`, `read_api_key` (`raylens.llm.config`): where the endpoint is and how to
  call it; the API key from the environment or a file.
- `make_client`, `check_endpoint`, `complete_all`, `retry_after_s` (`raylens.llm.client`): build an
  ``openai`` client, fail fast on an unreachable endpoint, send many prompts
  concurrently with retries and a circuit breaker, never raising for an endpoint problem.
- `ReplyCache`, `cache_key`, `prompt_hash` (`raylens.llm.cache`): replies cached by
  (model, prompt hash) in one JSON file; the formats are frozen so old caches keep hitting.
- `LocalLLMServer` (`raylens.llm.server`): ``transformers serve`` on 127.0.0.1 for
  offline runs.
- `clean_text` (`raylens.llm.text`): prompt and reply text as one clean line.

What to ask (label prompts, scoring prompts) lives in `raylens.concepts.labels` and
`raylens.concepts.scoring`. This package does not import ray.
"""

from raylens.llm.cache import ReplyCache, cache_key, prompt_hash
from raylens.llm.client import check_endpoint, complete_all, make_client, retry_after_s
from raylens.llm.config import LabelerConfig, read_api_key
from raylens.llm.server import LocalLLMServer, free_loopback_port, resolve_model_folder
from raylens.llm.text import clean_text

__all__ = [
    "LabelerConfig",
    "LocalLLMServer",
    "ReplyCache",
    "cache_key",
    "check_endpoint",
    "clean_text",
    "complete_all",
    "retry_after_s",
    "free_loopback_port",
    "make_client",
    "prompt_hash",
    "read_api_key",
    "resolve_model_folder",
]
