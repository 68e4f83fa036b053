"""A local OpenAI-compatible LLM server on loopback, for offline concept labelling.

`LocalLLMServer` runs ``transformers serve`` (from ``transformers[serving]``) as a
subprocess that serves one local model folder on ``127.0.0.1``. Anything that speaks
the OpenAI chat-completions API (the ``openai`` client, `raylens.llm.client`)
can then talk to it at `LocalLLMServer.base_url` with model id
`LocalLLMServer.model_name`.

Measured with transformers 5.23 on 2 CPU cores and the built-in SmolLM2-135M-Instruct:
the server answers ``/health`` about 5 s after launch, and a 16-token chat completion
takes about 0.5-1.5 s. Facts about ``transformers serve`` 5.x this module relies on:

- the model is the positional ``FORCE_MODEL`` argument; a local folder path works
  offline, and requests must then name exactly that string as ``model`` (any other
  name is answered with HTTP 400);
- the forced model is loaded before uvicorn starts listening, so ``GET /health``
  answering 200 means the model is ready;
- ``GET /v1/models`` scans the Hugging Face hub cache and answers HTTP 500 when that
  cache folder does not exist (a fresh offline machine), so it is useless as a probe;
- uvicorn always writes an access log line per request to stderr, which lands in
  `LocalLLMServer.log_path` (see `LocalLLMServer.count_requests`).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from raylens.llm.config import LabelerConfig

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

__all__ = ["LocalLLMServer", "free_loopback_port", "resolve_model_folder"]


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def resolve_model_folder(model: str | os.PathLike[str]) -> str:
    """Resolve ``model`` to what ``transformers serve`` should load.

    An existing local folder is used as is (made absolute). A raylens built-in model
    name (e.g. ``"smollm2-135m"``) resolves through `raylens.models.builtin_model_path`
    (downloaded and converted once, then cached). Anything else is returned unchanged
    and treated by the server as a Hugging Face hub id, which only works where the hub
    (or its local cache) is reachable.

    Raises:
        RuntimeError: a built-in model could not be fetched or verified.
    """
    p = Path(os.fspath(model)).expanduser()
    if p.is_dir():
        return str(p.resolve())
    from raylens.models import BUILTIN_MODELS, builtin_model_path

    name = os.fspath(model)
    if name in BUILTIN_MODELS:
        return str(Path(builtin_model_path(name)).resolve())
    return name


def _serve_command() -> list[str]:
    """The command prefix that runs the ``transformers`` CLI of this interpreter's environment."""
    script = Path(sys.executable).with_name("transformers")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    # Works wherever transformers is importable: the CLI module has a __main__ guard.
    return [sys.executable, "-m", "transformers.cli.transformers"]


class LocalLLMServer:
    """``transformers serve`` for one model, as a subprocess bound to 127.0.0.1.

    Use as a context manager (``with LocalLLMServer() as srv: ...``) or call
    `start` / `stop`. After `start`, `base_url` (``"http://127.0.0.1:PORT/v1"``) and
    `model_name` (the model id requests must carry) are what an OpenAI client needs;
    `labeler_config` builds a `raylens.llm.config.LabelerConfig` from them.

    Args:
        model: a raylens built-in model name (default ``"smollm2-135m"``, an instruct
            model with a chat template), a local model folder, or a hub id (needs the hub).
        host: must be ``"127.0.0.1"`` (``"localhost"`` is accepted and normalised):
            this class never binds anything but loopback.
        port: TCP port; ``None`` picks a free one.
        device: passed to ``transformers serve --device`` (``"cpu"``, ``"cuda:0"``, ``"auto"``).
        startup_timeout_s: how long `start` waits for the server to answer.
        log_path: file that receives the server's stdout and stderr (including the
            uvicorn access log); ``None`` uses a temporary file, removed by `stop`.
        extra_args: further ``transformers serve`` options, e.g. ``["--dtype", "float32"]``.

    Raises:
        ValueError: ``host`` is not loopback, or ``port`` is out of range.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "smollm2-135m",
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        device: str = "cpu",
        startup_timeout_s: float = 180.0,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
    ) -> None:
        if host == "localhost":
            host = LOOPBACK
        if host != LOOPBACK:
            raise ValueError(f"LocalLLMServer only binds to {LOOPBACK}, got host={host!r}")
        if port is not None and not (0 < int(port) < 65536):
            raise ValueError(f"port must be in 1..65535, got {port!r}")
        self.model = model
        self.host = host
        self._requested_port = None if port is None else int(port)
        self.port: int | None = self._requested_port
        self.device = device
        self.startup_timeout_s = float(startup_timeout_s)
        self._user_log_path = None if log_path is None else Path(log_path)
        self.log_path: Path | None = self._user_log_path
        self.extra_args = list(extra_args)
        self.model_name: str | None = None
        self.command: list[str] | None = None
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._tmp_log = False

    # ------------------------------------------------------------------ properties
    @property
    def base_url(self) -> str:
        """``"http://127.0.0.1:PORT/v1"``; valid once a port is known (after `start`)."""
        if self.port is None:
            raise RuntimeError("LocalLLMServer has no port yet: call start() first")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        """Whether the server subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalLLMServer:
        """Launch the server and block until ``GET /health`` answers 200.

        Returns ``self``. Calling it on a running server does nothing.

        Raises:
            RuntimeError: the server exited during startup or did not answer within
                ``startup_timeout_s``; the message carries the tail of its log. The
                subprocess is stopped before raising.
        """
        if self.running:
            return self
        folder = resolve_model_folder(self.model)
        self.model_name = folder
        self.port = self._requested_port if self._requested_port is not None else free_loopback_port()
        if self._user_log_path is not None:
            self.log_path = self._user_log_path
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp_log = False
        else:
            fd, name = tempfile.mkstemp(prefix="raylens-llm-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._tmp_log = True
        self.command = [
            *_serve_command(),
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--device",
            self.device,
            "--log-level",
            "info",
            *self.extra_args,
            folder,
        ]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if Path(folder).is_dir():
            # A local folder needs nothing from the hub; never let the server try.
            env["HF_HUB_OFFLINE"] = "1"
            env["TRANSFORMERS_OFFLINE"] = "1"
        log.info("starting LLM server: %s", " ".join(self.command))
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: stop() can end it and its children
        )
        atexit.register(self.stop)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop(_keep_log=True)
            raise
        self.startup_s = time.monotonic() - t0
        log.info("LLM server ready at %s after %.1f s", self.base_url, self.startup_s)
        return self

    def _wait_ready(self, t0: float) -> None:
        url = f"http://{self.host}:{self.port}/health"
        deadline = t0 + self.startup_timeout_s
        while True:
            assert self._proc is not None
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"LLM server exited with code {rc} during startup ({' '.join(self.command or [])}); "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:  # noqa: S310 - loopback only
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"LLM server did not answer {url} within {self.startup_timeout_s:.0f} s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, grace_s: float = 10.0, *, _keep_log: bool = False) -> None:
        """Terminate the server (SIGTERM to its process group), then kill it after ``grace_s``.

        Safe to call several times, and on a server that never started. A temporary log
        file is removed unless startup failed (then it is kept for inspection).
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                atexit.unregister(self.stop)
            except Exception:  # pragma: no cover
                pass
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("LLM server pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, grace_s)
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp_log and not _keep_log and self.log_path is not None:
            try:
                self.log_path.unlink()
            except OSError:
                pass
            self._tmp_log = False

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group we created with start_new_session
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalLLMServer(model={os.fspath(self.model)!r}, port={self.port}, {state})"

    # ------------------------------------------------------------------ helpers
    def log_text(self) -> str:
        """The server's log so far (empty string when there is none)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, n_lines: int = 40) -> str:
        """The last ``n_lines`` lines of the server's log."""
        return "\n".join(self.log_text().splitlines()[-n_lines:])

    def count_requests(self, path: str = "/v1/chat/completions", status: int | None = 200) -> int:
        """How many requests for ``path`` the server has answered (``status=None``: any status).

        Counted from uvicorn's access log lines, e.g.
        ``INFO:     127.0.0.1:41238 - "POST /v1/chat/completions HTTP/1.1" 200 OK``.
        """
        n = 0
        for line in self.log_text().splitlines():
            if f" {path} HTTP/" not in line or '"' not in line:
                continue
            if status is None or line.rstrip().split('" ', 1)[-1].startswith(f"{status} "):
                n += 1
        return n

    def labeler_config(self, **overrides: Any) -> LabelerConfig:
        """A `raylens.llm.config.LabelerConfig` pointing at this server (fields overridable).

        Raises:
            RuntimeError: the server has not been started.
        """
        if self.model_name is None:
            raise RuntimeError("LocalLLMServer has not been started: call start() first")
        fields: dict[str, Any] = {"base_url": self.base_url, "model": self.model_name}
        fields.update(overrides)
        return LabelerConfig(**fields)
