"""One output URI per job: named shards, atomic writes, ``_SUCCESS`` markers, resume.

Layout under the output URI (a local path or any pyarrow filesystem URI such as ``s3://``)::

    config.json                     the resolved job config
    documents/shard-00000.parquet   corpus rows (doc_id, text, label) of shard 0
    activations/shard-00000.parquet activations of shard 0 (schema in raylens.io.schemas)
    activations/_success/shard-00000.json   marker: written last, holds the row count and files
    activations/shard-00000-part0001.parquet   more files of a shard past ``max_file_bytes``
    activations_heldout/shard-00000.parquet    held-out documents' rows (committed by the marker above)
    concept_model/                  model.safetensors + config.json
    concepts/*.parquet              per-concept tables; report.html

A shard file is written, then its marker: the marker is the commit. A reader trusts only
marked shards and a rerun skips them, so a crash or a killed worker never leaves a half shard
or a duplicate row. On a local filesystem a file is written to a temporary name and renamed
into place (a rename is atomic there); on an object store (``s3://``...) each object is
written once, at its final key: an upload becomes visible only when it completes, and a rename
would be a server-side copy of the whole object (refused above 5 GiB on S3). pyarrow's dataset
readers ignore names starting with ``_`` or ``.``, so markers and temporaries never leak into reads.

Large shards are streamed (:class:`ShardFileWriter`): row groups go to a
``pyarrow.parquet.ParquetWriter`` opened at the staging path (the final key on an object store:
one multipart upload, never a copy), rolling over to a new part file past ``max_file_bytes``;
:meth:`OutputStore.commit_shard` moves the files into place and writes the marker listing them.
A file left half-written by a killed worker has no marker: readers never see it, and the rerun
writes the same key again (overwriting it).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylens.io.safety import check_under_root
from raylens.io.schemas import ActivationType, activation_parquet_options


def shard_name(index: int) -> str:
    """Deterministic shard id: ``shard-00042``."""
    return f"shard-{index:05d}"


class OutputStore:
    """Reads and writes a job's artifacts under one output URI.

    Args:
        uri: a local folder (created if missing) or a pyarrow filesystem URI.
    """

    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.fs.create_dir(self.root, recursive=True)

    def __reduce__(self):  # picklable for Ray: rebuild from the URI
        return (OutputStore, (self.uri,))

    def path(self, *parts: str) -> str:
        """Filesystem path of ``parts`` under the root (`raylens.io.safety.OutputPathError` if it escapes)."""
        return check_under_root(self.root, posixpath.join(self.root, *parts))

    def local_path(self, *parts: str) -> Path | None:
        """A local ``Path`` when the store is on the local filesystem, else ``None``."""
        return Path(self.path(*parts)) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    # ---- tables -----------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        """True on the local filesystem (writes go through a temporary name and a rename)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def staging_path(self, rel: str) -> str:
        """Where to write ``rel`` before :meth:`commit`: a hidden temporary sibling on a local
        filesystem, the final key itself on an object store (written once, no copy)."""
        final = self.path(rel)
        self.fs.create_dir(posixpath.dirname(final), recursive=True)
        if not self.is_local:
            return final
        return posixpath.join(posixpath.dirname(final), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}")

    def commit(self, staged: str, rel: str) -> None:
        """Move a file written at :meth:`staging_path` into place (nothing to do on an object store)."""
        if staged != self.path(rel):
            self.fs.move(staged, self.path(rel))

    def write_table(self, rel: str, table: pa.Table, *, compression: str = "zstd") -> None:
        """Write ``table`` to ``rel``, never visible half-written (see the module docstring).
        ``compression`` applies to every column but an activation column (``ActivationType``),
        which is written as the extraction writes it
        (:func:`raylens.io.schemas.activation_parquet_options`: no compression, dictionary or
        statistics)."""
        staged = self.staging_path(rel)
        options: dict = {"compression": compression}
        if "activation" in table.schema.names and isinstance(table.schema.field("activation").type, ActivationType):
            options = activation_parquet_options(table.schema)
            options["compression"] = {n: (compression if n != "activation" else "none") for n in table.schema.names}
        pq.write_table(table, staged, filesystem=self.fs, **options)
        self.commit(staged, rel)

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)

    # ---- json / text ------------------------------------------------------------
    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return json.loads(fh.read().decode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel``, never visible half-written (see the module docstring)."""
        staged = self.staging_path(rel)
        with self.fs.open_output_stream(staged) as fh:
            fh.write(data)
        self.commit(staged, rel)

    # ---- shards -----------------------------------------------------------------
    def marker(self, kind: str, shard: str) -> str:
        return posixpath.join(kind, "_success", f"{shard}.json")

    def is_done(self, kind: str, shard: str) -> bool:
        """True when ``kind/shard`` was fully written (its marker exists)."""
        return self.exists(self.marker(kind, shard))

    def write_shard(self, kind: str, shard: str, table: pa.Table, meta: dict | None = None) -> None:
        """Write one shard atomically, then its ``_SUCCESS`` marker (with ``n_rows`` and ``meta``)."""
        self.write_table(posixpath.join(kind, f"{shard}.parquet"), table)
        self.write_json(self.marker(kind, shard), {"n_rows": table.num_rows, **(meta or {})})

    def shard_writer(self, folder: str, shard: str, schema: pa.Schema, *, max_file_bytes: int | None = None,
                     row_group_bytes: int | None = None, parquet_options: dict | None = None) -> "ShardFileWriter":
        """A :class:`ShardFileWriter` streaming ``folder/<shard>.parquet`` (and its parts)."""
        return ShardFileWriter(self, folder, shard, schema, max_file_bytes=max_file_bytes,
                               row_group_bytes=row_group_bytes, parquet_options=parquet_options)

    def commit_shard(self, kind: str, shard: str, files: list[str], meta: dict) -> None:
        """Commit streamed files (relative paths from :meth:`ShardFileWriter.close`, any folder)
        with one marker ``kind/_success/<shard>.json`` holding ``files`` and ``meta``: the marker is
        the only commit point (a crash before it leaves nothing a reader sees)."""
        self.write_json(self.marker(kind, shard), {**meta, "files": list(files)})

    def shard_files(self, kind: str, shard: str, folder: str | None = None) -> list[str]:
        """Relative paths of the files of a finished shard that lie in ``folder`` (default ``kind``):
        those its marker lists, else ``<folder>/<shard>.parquet`` (markers of a single file)."""
        folder = folder or kind
        files = self.shard_meta(kind, shard).get("files")
        if files is None:
            return [posixpath.join(folder, f"{shard}.parquet")] if folder == kind else []
        return [f for f in files if posixpath.dirname(f) == folder]

    def done_shards(self, kind: str) -> list[str]:
        """Sorted ids of the marked (finished) shards of ``kind``."""
        sel = pafs.FileSelector(self.path(kind, "_success"), allow_not_found=True)
        names = [posixpath.basename(i.path) for i in self.fs.get_file_info(sel)]
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith("."))

    def shard_meta(self, kind: str, shard: str) -> dict:
        return self.read_json(self.marker(kind, shard))

    def shard_paths(self, kind: str, folder: str | None = None) -> list[str]:
        """Filesystem paths of the files of the finished shards of ``kind`` lying in ``folder``
        (default ``kind``; e.g. ``shard_paths("activations", "activations_heldout")``), in shard
        then part order; unfinished shards are excluded."""
        return [self.path(f) for s in self.done_shards(kind) for f in self.shard_files(kind, s, folder)]

    def file_bytes(self, paths: list[str]) -> int:
        """Total size in bytes of the files ``paths`` (filesystem paths, as :meth:`shard_paths`
        gives them).

        Raises:
            FileNotFoundError: one of them does not exist.
        """
        infos = self.fs.get_file_info(list(paths))
        missing = [i.path for i in infos if i.type == pafs.FileType.NotFound]
        if missing:
            raise FileNotFoundError(f"no such file(s): {missing[:3]}")
        return int(sum(i.size for i in infos))

    def iter_shard_batches(
        self, kind: str, *, columns: list[str] | None = None, batch_rows: int = 4096, folder: str | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches over the finished shards of ``kind`` (their files in ``folder``,
        default ``kind``), in shard order."""
        for p in self.shard_paths(kind, folder):
            pf = pq.ParquetFile(p, filesystem=self.fs)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)

    # ---- folders (concept model) ------------------------------------------------
    def upload_dir(self, local: str | os.PathLike, rel: str) -> None:
        """Copy a local folder to ``rel`` (replacing files of the same name)."""
        dest = self.path(rel)
        self.fs.create_dir(dest, recursive=True)
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_dir(self, rel: str) -> Path:
        """A local folder with the content of ``rel`` (the folder itself when local)."""
        local = self.local_path(rel)
        if local is not None:
            return local
        tmp = Path(tempfile.mkdtemp(prefix="raylens-"))
        pafs.copy_files(self.path(rel), str(tmp), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return tmp

    def remove(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))



class ShardFileWriter:
    """Streams one shard's rows into Parquet files under ``folder``, row group by row group, in
    bounded memory: ``<shard>.parquet``, then ``<shard>-part0001.parquet``... each time a file
    passes ``max_file_bytes`` of Arrow data. Files go to :meth:`OutputStore.staging_path`
    (the final key on an object store); nothing is visible to readers before the caller's
    :meth:`OutputStore.commit_shard`. Always writes at least the first file (empty if no rows),
    so a folder's shard set matches the marked shards.

    Args:
        store: the output store.
        folder: relative folder (``"activations"``, ``"activations_heldout"``).
        shard: shard name.
        schema: the files' schema.
        max_file_bytes: roll over to a new part past this many bytes (``None`` = one file).
        row_group_bytes: cut each written table into row groups of at most this many bytes of
            Arrow data (at least one row; ``None`` = one row group per :meth:`write`): a reader
            decodes a row group at a time, so this bounds its memory whatever the writer's batches.
        parquet_options: ``ParquetWriter`` keyword arguments (default zstd).
    """

    def __init__(self, store: OutputStore, folder: str, shard: str, schema: pa.Schema, *,
                 max_file_bytes: int | None = None, row_group_bytes: int | None = None,
                 parquet_options: dict | None = None):
        self.store, self.folder, self.shard, self.schema = store, folder, shard, schema
        self.max_file_bytes, self.row_group_bytes, self.parquet_options = max_file_bytes, row_group_bytes, parquet_options
        self.n_rows = 0
        self._staged: list[tuple[str, str]] = []  # (staging path, relative path)
        self._writer: pq.ParquetWriter | None = None
        self._bytes = 0

    def _open(self) -> None:
        part = len(self._staged)
        rel = posixpath.join(self.folder, f"{self.shard}.parquet" if part == 0 else f"{self.shard}-part{part:04d}.parquet")
        staged = self.store.staging_path(rel)
        self._writer = pq.ParquetWriter(staged, self.schema, filesystem=self.store.fs,
                                        **(self.parquet_options or {"compression": "zstd"}))
        self._staged.append((staged, rel))
        self._bytes = 0

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (``schema``) as one row group, or several of at most
        ``row_group_bytes`` (and a million rows) each."""
        if self._writer is None or (self.max_file_bytes is not None and self._bytes >= self.max_file_bytes):
            if self._writer is not None:
                self._writer.close()
            self._open()
        if table.num_rows:
            rows = None if self.row_group_bytes is None else \
                max(1, int(self.row_group_bytes * table.num_rows // max(1, table.nbytes)))
            self._writer.write_table(table, row_group_size=rows)
            self._bytes += table.nbytes
            self.n_rows += table.num_rows

    def close(self) -> list[str]:
        """Finish the files and move them into place (still unmarked); their relative paths."""
        if self._writer is None:
            self._open()
        self._writer.close()
        self._writer = None
        for staged, rel in self._staged:
            self.store.commit(staged, rel)
        return [rel for _, rel in self._staged]

    def abort(self) -> None:
        """Close without committing; local temporaries are removed (a half object on an object
        store stays unmarked and is overwritten by the rerun)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        if self.store.is_local:
            for staged, _ in self._staged:
                with contextlib.suppress(FileNotFoundError):
                    self.store.fs.delete_file(staged)
