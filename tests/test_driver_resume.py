"""The driver killed mid-job, then the same command again (both jobs, real SmolLM2 / MiniLM, real
local Ray, real Parquet): the shards finished before the kill are kept untouched (same inode and
mtime), the rest is done, and every final table equals an uninterrupted run's (same rows, same
values; timing columns left out)."""

from __future__ import annotations

import importlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.procs import ROOT, run_job

pytestmark = pytest.mark.slow

_RUN = """
import sys, ray
ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
from jobs.{job} import main
sys.exit(main(sys.argv[1:]))
"""

#: tiny runs: a few documents in many small shards (so the kill lands between two shards)
JOBS = {
    "concepts": ("activations", {
        "corpus.limit": 16, "extraction.shard_size": 2, "extraction.split_point": 2, "extraction.max_tokens": 24,
        "concepts.nb_concepts": 8, "concepts.params": "{top_k: 2, epochs: 2}", "importance.n_samples": 4,
        "interpretation.labels.enabled": "false", "interpretation.sampled_per_quantile": 1,
        "interpretation.non_activating_per_concept": 2, "resources.num_workers": 1}),
    "attribute": ("attributions", {
        "corpus.limit": 12, "attribution.shard_size": 2, "attribution.max_tokens": 24,
        "attribution.too_long": "truncate", "attribution.methods": "[Occlusion, Saliency]",
        "metrics.n_steps": 2, "metrics.n_random": 1, "resources.num_workers": 1}),
}


def _args(out: pathlib.Path, sets: dict) -> list[str]:
    return [a for k, v in {"output_uri": out, **sets}.items() for a in ("--set", f"{k}={v}")]


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children of children included)."""
    children: dict[int, list[int]] = {}
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_driver_after_first_shards(job: str, args: list[str], markers: pathlib.Path, timeout_s: float = 300):
    """Start the job (its own process, its own local Ray), SIGKILL the driver as soon as a shard
    marker exists, then the Ray processes it started (its descendants only)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _RUN.format(job=job), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not (markers.exists() and any(markers.iterdir())):
            assert proc.poll() is None, f"the {job} job ended (code {proc.returncode}) before any shard was done"
            assert time.monotonic() < deadline, f"no shard marker after {timeout_s} s"
            time.sleep(0.02)
        below = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)  # the driver, mid-job
        proc.wait()
    finally:  # the driver's process group (its own session) and every process it started
        for kill, target in [(os.killpg, proc.pid)] + [(os.kill, p) for p in [proc.pid] + locals().get("below", [])]:
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()


def _stamp(path: pathlib.Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _tables(out: pathlib.Path) -> dict[str, list[dict]]:
    """Every Parquet table of a job's output, as sorted rows without timing columns."""
    tables = {}
    for p in sorted(out.rglob("*.parquet")):
        rel = str(p.relative_to(out))
        if "/_" in f"/{rel}" or "/." in f"/{rel}":
            continue
        t = pq.read_table(p)
        t = t.drop_columns([c for c in t.column_names if "second" in c or c.endswith("_s") or "time" in c])
        tables[rel] = sorted(t.to_pylist(), key=repr)
    return tables


def _uninterrupted(job: str, out: pathlib.Path, sets: dict) -> None:
    """The reference run: the same config (``--set`` values parsed as the command line does),
    run in this process on the session's Ray (no second Ray start)."""
    from raylens.config import load_config, parse_overrides

    spec = importlib.import_module(f"jobs.{job}").JOB
    spec.run(load_config(None, parse_overrides(_args(out, sets)[1::2]), cls=spec.config_class))


@pytest.mark.parametrize("job", list(JOBS))
def test_driver_killed_then_rerun_equals_an_uninterrupted_run(job, tmp_path, ray_session):
    kind, sets = JOBS[job]
    ref, out = tmp_path / "ref", tmp_path / "out"
    _uninterrupted(job, ref, sets)
    _kill_driver_after_first_shards(job, _args(out, sets), out / kind / "_success")
    done = sorted(p.stem for p in (out / kind / "_success").iterdir())
    n_shards = len(list((ref / kind / "_success").iterdir()))
    assert 0 < len(done) < n_shards, f"the kill landed after every shard ({len(done)} of {n_shards})"
    kept = {s: (_stamp(out / kind / "_success" / f"{s}.json"), _stamp(out / kind / f"{s}.parquet")) for s in done}

    log = run_job(job, _args(out, sets))
    assert f"{len(done)} of {n_shards} shards already done, {n_shards - len(done)} to do" in log, log[-2000:]
    for s, stamps in kept.items():  # the finished shards were not rewritten
        assert (_stamp(out / kind / "_success" / f"{s}.json"), _stamp(out / kind / f"{s}.parquet")) == stamps, s
    got, want = _tables(out), _tables(ref)
    assert sorted(got) == sorted(want)
    for rel in want:
        assert got[rel] == want[rel], f"{rel} differs after the kill and rerun"
