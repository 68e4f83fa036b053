"""`ray start --head` + `ray job submit`: the job runs the same against a running cluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen (one at a time, the
    OS may hand the same port out twice: CI once gave the dashboard and its agent the same one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_cluster(temp_dir: Path) -> None:
    """Stop only this test's cluster (``ray stop`` would also kill the session's Ray):
    every process whose command line names its temp dir."""
    import signal
    import time

    def pids() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if str(temp_dir).encode() in (d / "cmdline").read_bytes():
                        found.append(int(d.name))
                except OSError:
                    pass
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 15
        while pids() and time.time() < deadline:
            time.sleep(0.5)


def test_ray_job_submit_against_ray_start_head(tmp_path):
    venv_bin = Path(sys.executable).parent
    ray_cli = str(venv_bin / "ray") if (venv_bin / "ray").exists() else shutil.which("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")
    port, dash, *free = _free_ports(2 + len(names))
    # Every per-node port explicit: the session's own Ray (other tests) holds the defaults,
    # and a second node's dashboard agent on a taken port never comes up.
    ports = [f"--{name}={p}" for name, p in zip(names, free)]
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # Unix socket paths must stay short
    start = subprocess.run(
        [ray_cli, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--num-cpus=8", f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports],
        capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    out = tmp_path / "out"
    try:
        cmd = (
            [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
             "--", "python", "-m", "jobs.concepts", "--config", "configs/default.yaml",
             "--set", f"output_uri={out}", "--set", "corpus.limit=12", "--set", "extraction.shard_size=6",
             "--set", "extraction.split_point=3", "--set", "concepts.nb_concepts=16",
             "--set", "concepts.params={top_k: 2, epochs: 2}", "--set", "importance.n_samples=4",
             "--set", "interpretation.labels.enabled=false", "--set", "resources.cpus_per_worker=1"]
        )
        # Right after `ray start` the dashboard may not have a job agent yet: retry that case only.
        deadline = time.time() + 120
        while True:
            submit = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
            if "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, (submit.stdout[-3000:], submit.stderr[-2000:])
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert (out / "report.html").exists()
    acts = pads.dataset(str(out / "activations"), format="parquet").to_table()
    assert acts.num_rows > 0 and set(acts["doc_id"].to_pylist()) <= set(range(12))
