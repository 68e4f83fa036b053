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
from dataclasses import dataclass

__all__ = ["LabelerConfig"]


@dataclass
class LabelerConfig:
    """How `raylens.concepts.labels.label_concepts` (and `raylens.llm.client.complete_all`)
    reach their OpenAI-compatible endpoint.

    Attributes:
        base_url: the API root, e.g. ``"http://127.0.0.1:8765/v1"``
            (`raylens.llm.server.LocalLLMServer.base_url`).
        model: model id sent with each request (for ``transformers serve`` with a local
            folder: that folder path, `LocalLLMServer.model_name`).
        api_key: sent as a bearer token; local servers ignore it.
        max_concurrency: requests in flight at once.
        max_retries: extra attempts after a connection error, timeout, HTTP 429 or 5xx
            (exponential backoff from 0.5 s, capped at 8 s). Other HTTP errors are not retried.
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
