"""The console a user watches while a job runs: one line per stage event, written by the driver.

* :func:`say` writes a permanent line (a stage starts, a stage's result).
* :func:`progress` writes a stage's running state (shards done / total, fit epoch, labels
  n / total). On a terminal it rewrites one line in place; elsewhere (a log, ``ray job logs``,
  a pipe) it prints a new line at most every ``min_interval_s`` seconds, and always the last one.
* :class:`TqdmLines` turns the tqdm bars of library code run in the driver into progress lines.

By default lines go to ``sys.stdout``; the job CLI points them at the terminal it saved before
sending Ray's own output to the job's log file (`jobs.cli`). No Ray import.
"""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from typing import TextIO

PREFIX = "[raylens] "


class Console:
    """Stage lines on one text stream.

    Args:
        out: where the lines go; ``None`` is ``sys.stdout`` at the time of each write.
        live: rewrite progress lines in place (``"\\r"``); ``None`` when ``out`` is a terminal.
        min_interval_s: seconds between two progress lines when not ``live``.
    """

    def __init__(self, out: TextIO | None = None, *, live: bool | None = None, min_interval_s: float = 5.0):
        self.out = out
        self.live = live
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._open = False  # a live progress line is on screen, to be overwritten
        self._last = 0.0  # when the last line was printed (seconds, perf_counter)

    def _stream(self) -> TextIO:
        return self.out if self.out is not None else sys.stdout

    def _is_live(self, stream: TextIO) -> bool:
        if self.live is not None:
            return self.live
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _permanent(self, text: str) -> None:
        with self._lock:
            stream = self._stream()
            stream.write(("\r\033[K" if self._open else "") + text + "\n")
            stream.flush()
            self._open = False
            self._last = time.perf_counter()

    def say(self, msg: str) -> None:
        """A permanent line ``[raylens] msg`` (it replaces a live progress line)."""
        self._permanent(PREFIX + msg)

    def line(self, text: str) -> None:
        """A permanent line as it is (no prefix), e.g. a row of a results list."""
        self._permanent(text)

    def progress(self, msg: str, *, final: bool = False) -> None:
        """A stage's running state; ``final`` marks its last update (always printed)."""
        with self._lock:
            stream = self._stream()
            now = time.perf_counter()
            if self._is_live(stream):
                stream.write("\r\033[K" + PREFIX + msg)
                self._open = True
            elif final or now - self._last >= self.min_interval_s:
                stream.write(PREFIX + msg + "\n")
            else:
                return
            stream.flush()
            self._last = now


_console = Console()


def use_console(console: Console) -> Console:
    """Send the pipelines' stage lines to ``console`` from now on; returns the previous one."""
    global _console
    previous, _console = _console, console
    return previous


def say(msg: str) -> None:
    """A permanent stage line on the current console (see :meth:`Console.say`)."""
    _console.say(msg)


def progress(msg: str, *, final: bool = False) -> None:
    """A stage's running state on the current console (see :meth:`Console.progress`)."""
    _console.progress(msg, final=final)


_BAR = re.compile(r"(?P<desc>[^\r\n]*?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")


class TqdmLines(io.TextIOBase):
    """A text stream for tqdm bars: passes everything written to ``raw`` (the log) and turns
    each bar update ``desc: 40%|####  | 2/5 [...]`` into ``progress("<stage>: desc 2/5")``.

    Use it as ``contextlib.redirect_stderr(TqdmLines("labels", sys.stderr))`` around library
    code that draws tqdm bars on ``sys.stderr``.

    Args:
        stage: the stage name that starts each progress line.
        raw: where the bar's own text goes (``None``: nowhere).
    """

    def __init__(self, stage: str, raw: TextIO | None):
        super().__init__()
        self.stage = stage
        self.raw = raw
        self._seen: tuple[str, int, int] | None = None

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if self.raw is not None:
            self.raw.write(s)
        for m in _BAR.finditer(s):
            n, total = int(m["n"]), int(m["total"])
            key = (m["desc"].strip(), n, total)
            if key != self._seen:  # tqdm redraws the same state on close
                self._seen = key
                progress(f"{self.stage}: {key[0]} {n}/{total}", final=n >= total)
        return len(s)

    def flush(self) -> None:
        if self.raw is not None:
            self.raw.flush()

    def fileno(self) -> int:
        """The raw stream's descriptor (for code that hands ``sys.stderr`` to a subprocess).

        Raises:
            OSError: no raw stream, or it has no descriptor.
        """
        if self.raw is None:
            raise OSError("TqdmLines without a raw stream has no file descriptor")
        return self.raw.fileno()
