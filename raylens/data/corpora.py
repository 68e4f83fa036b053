"""Corpora: built-in offline corpora, Parquet/CSV/JSONL files, or Hugging Face ``datasets``.

Every source is read as a stream of pyarrow record batches with the columns
``doc_id`` (int64, the row number in the source after sampling), ``text`` (string) and
``label`` (string, null when the corpus has none), so callers never hold more than a
chunk unless they ask for a random sample (which needs one pass over the source).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from raylens.data.builtins import BUILTIN_CORPORA, builtin_corpus_path

log = logging.getLogger(__name__)

def _iter_source(source: str, text_column: str, label_column: str | None, chunk_rows: int) -> Iterator[pa.Table]:
    """Yield tables with columns ``text`` and ``label`` (string or null) from any source."""
    if source in BUILTIN_CORPORA:
        spec = BUILTIN_CORPORA[source]
        folder = builtin_corpus_path(source)
        if spec.kind == "txt-folders":
            for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                files = sorted(label_dir.glob("*.txt"))
                for i in range(0, len(files), chunk_rows):
                    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files[i : i + chunk_rows]]
                    yield pa.table({"text": texts, "label": [label_dir.name] * len(texts)})
            return
        source = str(folder / Path(spec.member).name)
        text_column, label_column = spec.text_column, spec.label_column

    path = Path(source)
    suffix = path.suffix.lower()
    if path.exists() or "://" in source:
        if suffix in (".jsonl", ".json"):
            import pyarrow.json as pj

            batches = pj.read_json(source).to_batches(chunk_rows)
        else:
            batches = file_dataset(source).to_batches(batch_size=chunk_rows)
        for b in batches:
            yield _select(pa.Table.from_batches([b]), text_column, label_column, source)
        return

    # Otherwise a Hugging Face datasets name ("name" or "name:config"), split "train" by default.
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover
        raise FileNotFoundError(f"corpus {source!r} is not a file and `datasets` is not installed") from exc
    name, _, config = source.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as exc:
        raise FileNotFoundError(
            f"corpus {source!r} is not a built-in ({sorted(BUILTIN_CORPORA)}), not an existing "
            f"file, and loading it with `datasets` failed: {exc}"
        ) from exc
    rows: list[dict] = []
    for row in stream:
        rows.append(row)
        if len(rows) == chunk_rows:
            yield _select(pa.Table.from_pylist(rows), text_column, label_column, source)
            rows = []
    if rows:
        yield _select(pa.Table.from_pylist(rows), text_column, label_column, source)


def _select(table: pa.Table, text_column: str, label_column: str | None, source: str) -> pa.Table:
    if text_column not in table.column_names:
        raise KeyError(f"corpus {source!r} has no text column {text_column!r}; columns: {table.column_names}")
    texts = table[text_column].cast(pa.string())
    if label_column and label_column in table.column_names:
        labels = table[label_column].cast(pa.string())
    elif label_column and label_column not in table.column_names:
        raise KeyError(f"corpus {source!r} has no label column {label_column!r}; columns: {table.column_names}")
    else:
        labels = pa.nulls(table.num_rows, pa.string())
    return pa.table({"text": texts, "label": labels})


def file_dataset(source: str):
    """A ``pyarrow.dataset`` over a CSV (``.csv``), TSV (``.tsv``) or Parquet (anything else) file,
    folder or URI; opening it reads only its schema (Parquet footer, CSV header)."""
    import pyarrow.dataset as ds

    suffix = Path(source).suffix.lower()
    if suffix == ".tsv":
        import pyarrow.csv as pcsv

        return ds.dataset(source, format=ds.CsvFileFormat(parse_options=pcsv.ParseOptions(delimiter="\t")))
    return ds.dataset(source, format="csv" if suffix == ".csv" else "parquet")


def corpus_columns(source: str) -> list[str]:
    """The column names of a corpus, reading only its schema (Parquet footer, CSV header, the
    first JSON line; a built-in's are ``text`` and ``label``).

    Raises:
        FileNotFoundError: not a built-in, an existing file or folder, an object-store URI, or a
            ``datasets`` name whose builder can be opened.
    """
    if source in BUILTIN_CORPORA:
        return ["text", "label"]
    path = Path(source)
    if path.exists() or "://" in source:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            import json

            with open(path, encoding="utf-8", errors="replace") as fh:
                first = fh.readline()
            return list(json.loads(first)) if first.strip() else []
        return file_dataset(source).schema.names
    try:
        import datasets

        name, _, config = source.partition(":")
        features = datasets.load_dataset_builder(name, config or None).info.features
    except Exception as exc:
        raise FileNotFoundError(
            f"corpus {source!r} is not a built-in ({sorted(BUILTIN_CORPORA)}), not an existing file, and "
            f"opening it with `datasets` failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    return list(features or [])


def iter_corpus(
    source: str,
    *,
    text_column: str = "text",
    label_column: str | None = None,
    limit: int | None = None,
    shuffle_seed: int | None = None,
    chunk_rows: int = 1024,
) -> Iterator[pa.Table]:
    """Stream a corpus as tables of ``(doc_id, text, label)`` rows.

    Args:
        source: a built-in name (``"movie-reviews"``, ``"bbc-news"``), a Parquet/CSV/TSV/JSONL
            path or folder (any pyarrow URI), or a Hugging Face ``datasets`` name
            (``"name"`` or ``"name:config"``, split ``train``) when the hub is reachable.
        text_column: column holding the text (built-ins set their own).
        label_column: optional label column (built-ins set their own).
        limit: keep at most this many documents.
        shuffle_seed: when set, take a seeded uniform random sample of ``limit`` rows
            (reservoir sampling over one pass of the source, kept in source order);
            when ``None``, take the first ``limit`` rows.
        chunk_rows: rows per yielded table.

    Yields:
        ``pa.Table`` with columns ``doc_id`` (int64; the row's index among the kept rows,
        so ids are deterministic for a given source, limit and seed), ``text``, ``label``.

    Raises:
        KeyError: the text or label column is missing (the message lists the columns).
        FileNotFoundError: the source is neither built-in, a file, nor a loadable dataset.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if source in BUILTIN_CORPORA:
        label_column = BUILTIN_CORPORA[source].label_column
    chunks = _iter_source(source, text_column, label_column, chunk_rows)
    if shuffle_seed is not None and limit is not None:
        chunks = iter([_reservoir(chunks, limit, shuffle_seed)])
    next_id = 0
    for chunk in chunks:
        if limit is not None:
            chunk = chunk.slice(0, max(0, limit - next_id))
        if chunk.num_rows == 0:
            if limit is not None and next_id >= limit:
                return
            continue
        for start in range(0, chunk.num_rows, chunk_rows):
            piece = chunk.slice(start, chunk_rows)
            ids = pa.array(np.arange(next_id, next_id + piece.num_rows, dtype=np.int64))
            next_id += piece.num_rows
            yield pa.table({"doc_id": ids, "text": piece["text"], "label": piece["label"]})


def _reservoir(chunks: Iterator[pa.Table], k: int, seed: int) -> pa.Table:
    """Uniform sample of ``k`` rows over a stream (Algorithm R with a seeded generator)."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, str, str | None]] = []
    seen = 0
    for chunk in chunks:
        texts = chunk["text"].to_pylist()
        labels = chunk["label"].to_pylist()
        for t, lab in zip(texts, labels):
            if len(kept) < k:
                kept.append((seen, t, lab))
            else:
                j = int(rng.integers(0, seen + 1))
                if j < k:
                    kept[j] = (seen, t, lab)
            seen += 1
    kept.sort(key=lambda r: r[0])
    return pa.table({"text": pa.array([r[1] for r in kept], pa.string()),
                     "label": pa.array([r[2] for r in kept], pa.string())})
