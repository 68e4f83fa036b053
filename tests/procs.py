"""Process helpers for the tests: find this session's Ray workers (to kill one), and run a job in
its own process with its own local Ray and a watchdog (no tests here)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_RUN = """
import sys, ray
ray.init(num_cpus=8, num_gpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False)
from jobs.{job} import main
sys.exit(main(sys.argv[2:]))
"""


def session_worker_pids(name: bytes = b"ModelWorker") -> list[int]:
    """Pids of this test session's model-worker processes: descendants of this process (the
    local Ray started by the session fixture) whose command line names the actor class, so a
    test never kills another session's workers."""
    parent: dict[int, int] = {}
    cmd: dict[int, bytes] = {}
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd[int(d.name)] = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                pass
    me = os.getpid()

    def mine(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = parent.get(pid, 0)
            if pid == me:
                return True
        return False

    return sorted(p for p, c in cmd.items() if name in c and mine(p))


def run_job(job: str, args: list[str], *, n_gpus: int = 0, timeout_s: float = 600, expect: int = 0) -> str:
    """Run ``python -m jobs.<job> <args>`` in a new process whose local Ray has ``n_gpus`` fake
    GPUs (CUDA stays unavailable: the CPU path runs), with the environment of this process.
    A run past ``timeout_s`` (a scheduling hang) is killed with its process group and fails the
    test; so does an exit code other than ``expect``. Returns the console output."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _RUN.format(job=job), str(n_gpus), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{job} job on {n_gpus} fake GPU(s) did not finish in {timeout_s} s (a scheduling hang?)\n"
                    + out[-3000:])
    assert proc.returncode == expect, out[-4000:]
    return out


def set_args(config: str, sets: dict) -> list[str]:
    """``--config config`` and one ``--set key=value`` per item."""
    return ["--config", config] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
