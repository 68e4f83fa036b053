"""`LabelerConfig`: where an OpenAI-compatible endpoint is and how to call it.

One config serves every LLM call of raylens: concept labels
(`raylens.concepts.labels.label_concepts`), label scores
(`raylens.concepts.scoring.score_labels`) and the generic runner
`raylens.llm.client.complete_all`. It lives here, below the concept modules, so that
`raylens.llm.server.LocalLLMServer.labeler_config` can build one without importing them;
`raylens.concepts.labels` re-exports it. This module does not import ray.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LabelerConfig", "read_api_key"]


@dataclass
class LabelerConfig:
    """How `raylens.concepts.labels.label_concepts` (and `raylens.llm.client.complete_all`)
    reach their OpenAI-compatible endpoint.

    Attributes:
        base_url: the API root, e.g. ``"http://127.0.0.1:8765/v1"``
            (`raylens.llm.server.LocalLLMServer.base_url`).
        model: model id sent with each request (for ``transformers serve`` with a local
            folder: that folder path, `LocalLLMServer.model_name`).
        api_key: sent as a bearer token; local servers ignore it. Read it with `read_api_key`
            (from the environment or a file), never from a config file's body; it is not
            part of ``repr`` (no log line or traceback shows it).
        max_concurrency: requests in flight at once.
        max_retries: extra attempts after a connection error, a timeout, HTTP 429 or 5xx, or a
            reply that is not a chat completion (a body that is not JSON, an empty body, no
            choices). Other HTTP errors are not retried.
        backoff_s: wait before the first retry, in seconds; doubled for each later one, with
            +-25% jitter.
        max_backoff_s: the longest wait before a retry, in seconds; a ``Retry-After`` header
            (seconds or an HTTP date) is honoured up to it.
        timeout_s: per-request timeout.
        max_tokens: generation budget of a label.
        temperature: sampling temperature (0 = greedy, reproducible).
        n_examples: how many top-activating examples per concept go into the prompt
            (read by `label_concepts` only).
        cache_path: JSON file caching labels by (model, prompt hash); ``None`` disables it.

    Raises:
        ValueError: a field is out of range (the message names it).
    """

    base_url: str
    model: str
    api_key: str = field(default="EMPTY", repr=False)
    max_concurrency: int = 4
    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
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
        for name in ("timeout_s", "backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LabelerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"LabelerConfig.temperature must be in [0, 2], got {self.temperature!r}")
        if self.cache_path is not None:
            self.cache_path = os.fspath(self.cache_path)


def read_api_key(env: str | None, file: str | os.PathLike | None = None) -> str:
    """The API key of an endpoint: the first line of ``file`` when given, else the environment
    variable ``env``, else ``"EMPTY"`` (what local servers expect). The key itself never comes
    from a config file's body (`raylens.config.LabelsConfig` refuses one there).

    Raises:
        ValueError: ``file`` is given but cannot be read or is empty (the message names the
            file, never its content).
    """
    if file is not None:
        try:
            key = Path(file).expanduser().read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API key file {os.fspath(file)!r}: {type(e).__name__}") from None
        if not key or not key[0].strip():
            raise ValueError(f"the API key file {os.fspath(file)!r} is empty")
        return key[0].strip()
    return os.environ.get(env, "EMPTY") if env else "EMPTY"
