"""The command line every job shares: arguments (``--config``, ``--set``, ``--verbose``), config
validation before Ray starts, the job's log file, Ray start, the results block and exit codes.

A job is a :class:`Job` (its config class, its pipeline, the results it lists) and a
``main = Job(...).main`` in ``jobs/<name>.py``; adding a job is new files only.

The console shows the driver's stage lines (`pipelines.console`). Ray's own output (Ray Data
progress, actor logs forwarded to the driver, the driver's logging, tracebacks) goes to the
job's log file, ``<output_uri>/logs/job.log`` when the output URI is local, else a file under
the system temporary directory; the first line says where. ``--verbose`` shows it on the
console instead.

Exit codes: 0 done; 1 the job failed (one line here, the traceback in the log); 2 a bad config
or ``--set`` (one line naming the field, before Ray starts), or an output URI holding results
made with other settings.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


from pipelines.console import Console, use_console
from raylens.config import ConfigError, load_config, parse_overrides
from raylens.config.plan import format_plan, plan_job
from raylens.config.preflight import preflight

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``, as under ``ray job submit``), else
    start a local Ray with a few more logical CPUs than cores (see DESIGN.md). Actor output is
    forwarded to the driver, so it lands where the driver's output goes (`JobOutput`)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)


def log_path(output_uri: str, job: str) -> Path:
    """The job's log file: ``<output_uri>/logs/job.log`` for a local output URI, else
    ``<tmp>/raylens-logs/<job>-<time>.log``."""
    from raylens.io.store import OutputStore

    local = OutputStore(output_uri).local_path("logs", "job.log")
    if local is None:
        local = Path(tempfile.gettempdir()) / "raylens-logs" / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    local.parent.mkdir(parents=True, exist_ok=True)
    return local


class JobOutput:
    """Where a job's output goes while it runs (a context manager; entering it returns self).

    Without ``verbose``, the process's stdout and stderr (file descriptors 1 and 2, so Ray's
    child processes and C code too, and ``sys.stdout`` / ``sys.stderr``, also where they are not
    those descriptors, as in a notebook) are appended to ``path``; stage lines go to a copy of
    the original stdout, error lines to a copy of the original stderr. With ``verbose`` nothing is
    redirected and the driver's logging also goes to ``path``. The driver's logging is at INFO
    either way. Everything is restored on exit.

    Args:
        path: the job's log file.
        verbose: show Ray's output on the console.

    Attributes:
        console: the stage-line console (also the pipelines' current one while entered).
        err: the stream for error lines.
    """

    def __init__(self, path: Path, *, verbose: bool):
        self.path = path
        self.verbose = verbose

    def _redirect(self) -> tuple[TextIO, TextIO]:
        """Send fds 1 and 2 and ``sys.stdout`` / ``sys.stderr`` to the log; returns streams that
        still reach the console (stdout, stderr)."""
        self._saved = [os.dup(1), os.dup(2)]
        self._streams = (sys.stdout, sys.stderr)
        self._opened = []
        kept = []
        for stream, fd, saved in zip(self._streams, (1, 2), self._saved):
            try:
                on_fd = stream.fileno() == fd
            except (AttributeError, OSError, ValueError):  # a notebook's or a test's stream
                on_fd = False
            if on_fd:
                stream = os.fdopen(os.dup(saved), "w", buffering=1)
                self._opened.append(stream)
            kept.append(stream)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout, sys.stderr = (open(n, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
                                  for n in (1, 2))
        return kept[0], kept[1]

    def _restore(self) -> None:
        sys.stdout.close()
        sys.stderr.close()
        sys.stdout, sys.stderr = self._streams
        for target, fd in zip((1, 2), self._saved):
            os.dup2(fd, target)
            os.close(fd)
        for stream in self._opened:
            stream.close()

    def __enter__(self) -> "JobOutput":
        sys.stdout.flush()
        sys.stderr.flush()
        out, self.err = (sys.stdout, sys.stderr) if self.verbose else self._redirect()
        self._handlers = [logging.StreamHandler(sys.stderr)]
        if self.verbose:
            self._handlers.append(logging.FileHandler(self.path))
        root = logging.getLogger()
        self._level = root.level
        root.setLevel(logging.INFO)
        for h in self._handlers:
            h.setFormatter(logging.Formatter(LOG_FORMAT))
            root.addHandler(h)
        self.console = Console(out, live=False if self.verbose else None)
        self._previous = use_console(self.console)
        return self

    def __exit__(self, *exc) -> None:
        use_console(self._previous)
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(self._level)
        sys.stdout.flush()
        sys.stderr.flush()
        if not self.verbose:
            self._restore()

    def error(self, msg: str) -> None:
        """An error line ``[raylens] msg`` on the console."""
        print(f"[raylens] {msg}", file=self.err, flush=True)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception (of its cause for a Ray task error)."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


@dataclass(frozen=True)
class Job:
    """A job's command line.

    Args:
        name: the module under ``jobs/`` (``python -m jobs.<name>``); also names a non-local
            job's log file.
        description: the ``--help`` text (the job module's docstring).
        config_class: its pydantic config class (`raylens.config`).
        pipeline: ``"module:function"`` that runs the job on a validated config once Ray is
            up and returns a result dict (imported then, so a bad config fails before Ray
            loads).
        headline: ``(name, key)``: the result listed first, ``result[key]`` (the report).
        outputs: paths under the output URI listed after it.
    """

    name: str
    description: str
    config_class: type
    pipeline: str
    headline: tuple[str, str]
    outputs: tuple[str, ...] = ()

    def run(self, cfg: Any) -> dict:
        """Import :attr:`pipeline` and run it on ``cfg``."""
        module, function = self.pipeline.split(":")
        return getattr(importlib.import_module(module), function)(cfg)

    def results(self, cfg: Any, result: dict) -> list[tuple[str, str]]:
        """``(name, path)`` of the headline result and the outputs."""
        out = cfg.output_uri.rstrip("/")
        return [(self.headline[0], str(result[self.headline[1]]))] + [(rel, f"{out}/{rel}") for rel in self.outputs]

    def parser(self) -> argparse.ArgumentParser:
        """The job's argument parser."""
        parser = argparse.ArgumentParser(prog=f"python -m jobs.{self.name}", description=self.description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", help="YAML config (default: built-in defaults)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a field, e.g. --set corpus.limit=100 (repeatable)")
        parser.add_argument("--plan", action="store_true",
                            help="print what the run will need and produce (model config and a corpus sample "
                                 "only: no weights, no Ray) and exit")
        parser.add_argument("--verbose", action="store_true",
                            help="show Ray's output (Ray Data progress, actor logs) on the console; "
                                 "without it, only the log file has it")
        return parser

    def main(self, argv: list[str] | None = None) -> int:
        """Parse ``argv``, validate the config, run the job; returns the exit code
        (:data:`EXIT_OK`, :data:`EXIT_FAILED`, :data:`EXIT_CONFIG`)."""
        args = self.parser().parse_args(argv)
        try:
            cfg = load_config(args.config, parse_overrides(args.set), cls=self.config_class)
            preflight(cfg)
        except (ConfigError, FileNotFoundError) as exc:
            print(f"[raylens] {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if args.plan:
            print(format_plan(plan_job(cfg)), flush=True)
            return EXIT_OK
        path = log_path(cfg.output_uri, self.name)
        with JobOutput(path, verbose=args.verbose) as out:
            out.console.say(f"log: {path} " + ("(the driver's logging; Ray's output is shown here)" if args.verbose
                                               else "(Ray's output; --verbose shows it here)"))
            try:
                init_ray(cfg.resources.ray_address)
                result = self.run(cfg)
            except ConfigError as exc:
                out.error(str(exc))
                return EXIT_CONFIG
            except Exception as exc:  # the console gets one line, the log the traceback
                traceback.print_exc()
                out.error(f"failed: {_one_line(exc)} (traceback in {path})")
                return EXIT_FAILED
            out.console.say("results:")
            listed = self.results(cfg, result)
            width = max(len(name) for name, _ in listed) + 1
            for name, where in listed:
                out.console.line(f"  {name:<{width}}{where}")
        return EXIT_OK
