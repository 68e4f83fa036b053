"""The on-disk cache of LLM replies, keyed by (model, prompt hash).

A rerun of labelling or label scoring only requests what is missing: each usable reply
is stored under `cache_key` (the model id and `prompt_hash` of the messages and the
sampling settings) in one JSON file, `ReplyCache`. The key and hash formats are frozen:
cache files written by earlier raylens versions keep hitting.
This module does not import ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "FLUSH_EVERY_S", "ReplyCache", "cache_key", "prompt_hash"]

#: Value of the ``"format"`` field of a cache file.
CACHE_FORMAT = 1
#: `ReplyCache.put` writes the file at most this often (seconds); `ReplyCache.flush` always does.
FLUSH_EVERY_S = 2.0


def prompt_hash(messages: list[dict], config: Any, *, version: int, kind: str | None = None) -> str:
    """sha256 (64 hex digits) over the messages and the settings that shape the reply.

    The model is not part of it: it keys separately (`cache_key`).

    Args:
        messages: OpenAI chat messages.
        config: anything with ``max_tokens`` and ``temperature`` (a
            `raylens.llm.config.LabelerConfig`).
        version: the prompt family's version (bumped when its wording changes), e.g.
            `raylens.concepts.labels.PROMPT_VERSION`.
        kind: names another prompt family (e.g. ``"detection"`` in
            `raylens.concepts.scoring`); left out of the payload when None, so label
            hashes stay what they always were.
    """
    payload: dict[str, Any] = {
        "v": version,
        "messages": messages,
        "max_tokens": config.max_tokens,
        "temperature": float(config.temperature),
    }
    if kind is not None:
        payload["kind"] = kind
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_key(model: str, prompt_hash: str) -> str:
    """The `ReplyCache` key of a reply: ``model + "\\x1f" + prompt_hash``."""
    return f"{model}\x1f{prompt_hash}"


class ReplyCache:
    """JSON file of ``{"format": 1, "entries": {model + "\\x1f" + prompt_hash: {...}}}``.

    Each entry is a dict holding one parsed reply under a field named by its user
    (``"label"`` for labels, ``"answers"`` for `raylens.concepts.scoring`), plus ``"raw"``,
    ``"model"`` and ``"time"``; one file may hold both kinds. Written atomically (temp
    file + ``os.replace``), merged with what is on disk at each flush so several
    labelers/scorers may share a file without dropping each other's entries. Thread-safe.

    Args:
        path: the JSON file; ``None`` (or ``""``) keeps entries in memory only. An
            unreadable file is moved aside (``<name>.corrupt-<unix time>``, with a
            warning) and the cache starts empty.
    """

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self.dirty = False
        self.lock = threading.Lock()
        self._last_flush = time.monotonic()
        if self.path is not None:
            self.entries = self._read()

    def _read(self) -> dict[str, dict]:
        assert self.path is not None
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise TypeError("entries is not an object")
            return {k: v for k, v in entries.items() if isinstance(v, dict)}
        except Exception as e:  # corrupt or foreign file: keep it aside, start afresh
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("LLM reply cache %s unreadable (%s); moved to %s", self.path, e, aside)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return {}

    def get(self, key: str, field: str | None = None) -> dict | None:
        """The entry under ``key``, or None; with ``field``, only an entry that has that field."""
        with self.lock:
            entry = self.entries.get(key)
        if entry is not None and field is not None and field not in entry:
            return None
        return entry

    def put(self, key: str, entry: dict) -> None:
        """Store ``entry`` under ``key``; writes the file when the last write is
        `FLUSH_EVERY_S` seconds old or more."""
        with self.lock:
            self.entries[key] = entry
            self.dirty = True
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Merge the entries into the file on disk (atomically) if any changed; no-op without a path.

        Raises:
            OSError: the file or its folder cannot be written (the temporary file is removed).
        """
        if self.path is None:
            return
        with self.lock:
            if not self.dirty:
                return
            merged = self._read() if self.path.exists() else {}
            merged.update(self.entries)
            self.entries = merged
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"format": CACHE_FORMAT, "entries": merged}, f, ensure_ascii=False, indent=0)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            self.dirty = False
            self._last_flush = time.monotonic()
