"""Two guards every job relies on: no pickle is ever loaded, and no output escapes its URI.

- `refuse_pickle_files(folder)`: a model folder or a concept-model folder holding a pickle file
  (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``, ``*.ckpt``) is refused
  before anything in it is read. Unpickling runs arbitrary code (the reason safetensors exists);
  raylens loads weights from ``*.safetensors`` only.
- `check_under_root(root, path)`: the path `raylens.io.store.OutputStore.path` builds for a
  name is refused unless it stays under the store's root, whatever the name holds (``..``,
  an absolute path, separators, NUL). Names built from document ids, labels or method names go
  through it with every read and write.
- `safe_component(text)`: any text (a label, a method name) as one harmless file-name component,
  for code that wants a readable name rather than an error.

Standard library only; this module does not import ray.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

__all__ = ["PICKLE_SUFFIXES", "OutputPathError", "UnsafeFileError", "check_under_root", "refuse_pickle_files",
           "safe_component"]

#: File-name endings of pickle-based weight files (``pytorch_model.bin`` and its shards end in ``.bin``).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


class UnsafeFileError(ValueError):
    """A folder to load from holds a pickle file; the message names the file."""


class OutputPathError(ValueError):
    """An output name would land outside the output URI; the message names it."""


def refuse_pickle_files(folder: str | os.PathLike) -> None:
    """Refuse a local folder that holds a pickle file anywhere inside it.

    Args:
        folder: a model folder (Hugging Face layout) or a concept-model folder. Something that
            is not a local folder (a hub id) is left alone: its loader asks for safetensors.

    Raises:
        UnsafeFileError: naming the first pickle file found (sorted by path) and what to do.
    """
    root = Path(folder)
    if not root.is_dir():
        return
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES))
    if found:
        raise UnsafeFileError(
            f"refusing to load from {root}: {found[0]} is a pickle file (loading it could run arbitrary code); "
            "raylens reads weights from *.safetensors only: convert it, or remove it from the folder"
            + (f" ({len(found) - 1} more pickle file(s) there)" if len(found) > 1 else ""))


def check_under_root(root: str, path: str) -> str:
    """``path`` unchanged when it lies under ``root`` (both POSIX-style, as pyarrow filesystems use).

    Args:
        root: the output root (a local absolute path, or ``bucket/prefix`` on an object store).
        path: a path built by joining names under ``root``.

    Returns:
        ``path``.

    Raises:
        OutputPathError: ``path`` holds a NUL byte, or normalises (``..`` resolved, an absolute
            part restarting the path) to somewhere that is not ``root`` or below it.
    """
    if "\0" in path:
        raise OutputPathError(f"output name {path!r} holds a NUL byte")
    base = posixpath.normpath(root)
    norm = posixpath.normpath(path)
    if norm != base and not norm.startswith(base.rstrip("/") + "/"):
        raise OutputPathError(f"output name {path!r} escapes the output URI {root!r} (resolves to {norm!r})")
    return path


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(text: str, max_chars: int = 80) -> str:
    """``text`` as one file-name component: runs of anything but ``A-Z a-z 0-9 . _ -`` become one
    ``_``, leading dots are dropped (no ``..``, no hidden file), at most ``max_chars`` characters;
    ``"_"`` when nothing is left."""
    out = _UNSAFE.sub("_", str(text)).lstrip(".")[:max_chars]
    return out if out.strip("_") else "_"
