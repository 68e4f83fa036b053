"""Checks that need more than the config's own fields, run by the jobs before any Ray work: the
model's config (read, not its weights) names a model whose split point exists, and the corpus
exists and has the columns the config names. Each problem is one :class:`ConfigError` line that
names the field.
"""

from __future__ import annotations

from typing import Any

from raylens.config.common import ConfigError, field_error


def _fail(field: str, exc: BaseException) -> ConfigError:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return ConfigError(field_error(f"{field}: {' '.join(str(msg).split())}"))  # one line


def check_model(model_name: str, task: str | None, split_point: int | str | None = None, *,
                trust_remote_code: bool = False) -> tuple[Any, str, str | None]:
    """Read the model's config (a skeleton on the meta device: no weights, no memory) and, when
    given, resolve ``split_point`` in it. Returns ``(skeleton, task, split module path or None)``.
    A model that needs its own code is refused unless ``trust_remote_code``.

    Raises:
        ConfigError: ``model.name`` cannot be read, or ``extraction.split_point`` is out of range
            or names no module.
    """
    from raylens.models.loading import meta_model
    from raylens.models.split import resolve_split_point

    try:
        model, task = meta_model(model_name, task, trust_remote_code=trust_remote_code)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise _fail("model.name", exc) from None
    if split_point is None:
        return model, task, None
    try:
        return model, task, resolve_split_point(model, split_point)
    except ValueError as exc:
        raise _fail("extraction.split_point", exc) from None


def check_corpus(source: str, columns: dict[str, str | None]) -> None:
    """Open the corpus' schema and check that every named column exists.

    Args:
        source: ``corpus.source``.
        columns: config field -> column name, e.g. ``{"corpus.text_column": "text"}``; ``None``
            values are skipped.

    Raises:
        ConfigError: the source cannot be opened (``corpus.source``) or a column is missing (its field).
    """
    from raylens.data.corpora import corpus_columns

    try:
        have = corpus_columns(source)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise _fail("corpus.source", exc) from None
    for field, column in columns.items():
        if column is not None and column not in have:
            raise ConfigError(field_error(f"{field}: corpus {source!r} has no column {column!r}; columns: {have}"))


def preflight(cfg: Any) -> None:
    """Every check of this module for a job config (:class:`ConceptJobConfig` or
    :class:`AttributionJobConfig`), before Ray starts.

    Raises:
        ConfigError: naming the first bad field.
    """
    corpus = cfg.corpus
    columns = {"corpus.text_column": corpus.text_column, "corpus.label_column": corpus.label_column,
               "corpus.target_column": getattr(corpus, "target_column", None)}
    check_corpus(corpus.source, columns)
    extraction = getattr(cfg, "extraction", None)
    check_model(cfg.model.name, cfg.model.task, extraction.split_point if extraction is not None else None,
                trust_remote_code=cfg.model.trust_remote_code)
