"""Checks that need more than the config's own fields, run by the jobs before any Ray work: the
model's config (read, not its weights) names a model whose split point exists, the corpus
exists and has the columns the config names, and not every text of it is blank. Each problem is one :class:`ConfigError` line that
names the field.
"""

from __future__ import annotations

from pathlib import Path
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


def check_corpus_texts(corpus: Any, label_column: str | None = None) -> None:
    """Read the corpus (``corpus``: a :class:`~raylens.config.common.CorpusConfig`) until a text
    that is not blank: the first chunk for a usable corpus, every row (up to ``corpus.limit``
    when no sample is drawn) for a corpus whose texts are all blank. A ``datasets`` name is not
    read here (the job stops on it when it writes its documents).

    Raises:
        ConfigError: ``corpus.source`` has no rows, or every text is blank (empty, whitespace,
            null or refused); ``corpus.label_column`` or ``corpus.id_column`` is missing.
    """
    from raylens.data.builtins import BUILTIN_CORPORA
    from raylens.data.corpora import iter_corpus

    source = corpus.source
    if source not in BUILTIN_CORPORA and "://" not in source and not Path(source).exists():
        return
    n = 0
    try:
        for chunk in iter_corpus(source, text_column=corpus.text_column, label_column=label_column,
                                 limit=corpus.limit if corpus.shuffle_seed is None else None,
                                 id_column=corpus.id_column, invalid_utf8=corpus.invalid_utf8):
            if any(t and t.strip() for t in chunk["text"].to_pylist()):
                return
            n += chunk.num_rows
    except KeyError as exc:
        field = "corpus.id_column" if "id column" in str(exc) else "corpus.source"
        raise _fail(field, exc) from None
    except (OSError, ValueError) as exc:
        raise _fail("corpus.source", exc) from None
    why = f"every text in column {corpus.text_column!r} of the {n} rows read is blank" if n else "it has no rows"
    raise ConfigError(field_error(f"corpus.source: no document to explain in {source!r}: {why}"))


def job_key_error(output_uri: str, old: dict, key: dict) -> ConfigError | None:
    """The error for resuming into ``output_uri``, whose ``job_key.json`` holds ``old``, with a job
    whose key is ``key`` (the settings that determine the rows): None when they are equal, else a
    :class:`ConfigError` naming the settings that differ."""
    if old == key:
        return None
    diffs = [f"{s}.{k}" for s in key for k in key[s] if old.get(s, {}).get(k) != key[s][k]]
    diffs += [s for s in old if s not in key]
    return ConfigError(f"output_uri {output_uri!r} holds results made with other settings ({', '.join(diffs)}); "
                       "use a new output_uri or delete the old one")


def check_output(output_uri: str, key: dict) -> None:
    """Check the output URI without creating it: it is not a file, and results already under it
    (its ``job_key.json``) were made with the same ``key``.

    Raises:
        ConfigError: naming ``output_uri``.
    """
    import json

    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(output_uri) if "://" in output_uri else \
            (pafs.LocalFileSystem(), str(Path(output_uri).absolute()))
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise ConfigError(field_error(f"output_uri: {output_uri!r} is a file, not a folder"))
        if info.type == pafs.FileType.NotFound or fs.get_file_info(f"{root}/job_key.json").type != pafs.FileType.File:
            return
        with fs.open_input_stream(f"{root}/job_key.json") as fh:
            old = json.loads(fh.read())
    except (OSError, ValueError) as exc:  # unreachable now: the job itself reports it
        if isinstance(exc, ConfigError):
            raise
        return
    err = job_key_error(output_uri, old, key)
    if err is not None:
        raise err


def preflight(cfg: Any) -> None:
    """Every check of this module for a job config (:class:`ConceptJobConfig`,
    :class:`AttributionJobConfig`, :class:`NetworkJobConfig`), before Ray starts, then the
    config's own ``check_model_fields(skeleton)`` when it has one.

    Raises:
        ConfigError: naming the first bad field.
    """
    corpus = cfg.corpus
    columns = {"corpus.text_column": corpus.text_column, "corpus.label_column": corpus.label_column,
               "corpus.target_column": getattr(corpus, "target_column", None), "corpus.id_column": corpus.id_column}
    check_corpus(corpus.source, columns)
    check_corpus_texts(corpus, getattr(corpus, "target_column", None) or corpus.label_column)
    extraction = getattr(cfg, "extraction", None)
    check_output(cfg.output_uri, cfg.extraction_key() if extraction is not None else cfg.job_key())
    skeleton, _, _ = check_model(cfg.model.name, cfg.model.task,
                                 extraction.split_point if extraction is not None else None,
                                 trust_remote_code=cfg.model.trust_remote_code)
    if hasattr(cfg, "check_model_fields"):  # a job's own checks against the model's config
        cfg.check_model_fields(skeleton)
