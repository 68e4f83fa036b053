"""The console a user watches: one line per stage, Ray's own output in the job's log file
(``--verbose`` shows it), exit codes 0 / 1 / 2, and tqdm bars turned into stage lines."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from pipelines.console import Console, TqdmLines, use_console
from raylens.config import AttributionJobConfig, ConfigError

ROOT = Path(__file__).parents[1]


# ----------------------------------------------------------------------------- fast


def _ok(cfg) -> dict:
    print("a line of Ray's own output")  # stdout of the driver: the log, not the console
    return {"gallery": "g.html"}


def _bad_setting(cfg) -> dict:
    raise ConfigError("output_uri holds results made with other settings (attribution.granularity)")


def _crash(cfg) -> dict:
    raise RuntimeError("the model worker died\nsecond line")


def _toy_job(pipeline: str) -> cli.Job:
    """A job is a `cli.Job`: declared from its test file alone."""
    return cli.Job("toy", "A toy job.", AttributionJobConfig, f"tests.test_cli:{pipeline}",
                   headline=("gallery", "gallery"), outputs=("summary.parquet",))


@pytest.mark.parametrize("pipeline, code", [("_ok", 0), ("_bad_setting", 2), ("_crash", 1)])
def test_exit_codes_console_and_log(pipeline, code, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(cli, "init_ray", lambda address: None)
    out = tmp_path / "out"
    assert _toy_job(pipeline).main(["--set", f"output_uri={out}"]) == code
    console = capfd.readouterr()
    log = (out / "logs" / "job.log").read_text()
    assert console.out.splitlines()[0] == f"[raylens] log: {out / 'logs' / 'job.log'} " \
                                          "(Ray's output; --verbose shows it here)"
    assert "a line of Ray's own output" not in console.out + console.err
    if code == 0:
        assert "a line of Ray's own output" in log
        assert console.out.splitlines()[-2:] == ["  gallery         g.html", f"  summary.parquet {out}/summary.parquet"]
    elif code == 2:
        assert console.err.strip() == "[raylens] output_uri holds results made with other settings " \
                                      "(attribution.granularity)"
    else:
        assert console.err.strip() == "[raylens] failed: RuntimeError: the model worker died " \
                                      f"(traceback in {out / 'logs' / 'job.log'})"
        assert "Traceback (most recent call last)" in log and "second line" in log


def test_bad_set_exits_2_before_anything():
    assert _toy_job("_ok").main(["--set", "corpus.limit"]) == 2


def test_progress_lines_are_throttled_but_the_last_is_kept():
    buf = io.StringIO()
    con = Console(buf, live=False, min_interval_s=3600)
    con.say("extract: 0 of 3 shards already done, 3 to do")
    con.progress("extract: 1/3 shards")
    con.progress("extract: 2/3 shards")
    con.progress("extract: 3/3 shards", final=True)
    assert buf.getvalue().splitlines() == ["[raylens] extract: 0 of 3 shards already done, 3 to do",
                                           "[raylens] extract: 3/3 shards"]
    live = io.StringIO()
    con = Console(live, live=True)
    con.progress("fit: epoch 1/2")
    con.progress("fit: epoch 2/2", final=True)
    con.say("fit: done")
    assert live.getvalue() == ("\r\033[K[raylens] fit: epoch 1/2\r\033[K[raylens] fit: epoch 2/2"
                               "\r\033[K[raylens] fit: done\n")


def test_tqdm_bars_become_stage_lines():
    from tqdm import tqdm

    buf, raw = io.StringIO(), io.StringIO()
    previous = use_console(Console(buf, live=False, min_interval_s=0))
    try:
        bar = tqdm(total=3, desc="labelling concepts", file=TqdmLines("labels", raw), mininterval=0)
        for _ in range(3):
            bar.update(1)
        bar.close()
    finally:
        use_console(previous)
    assert buf.getvalue().splitlines() == [f"[raylens] labels: labelling concepts {n}/3" for n in range(4)]
    assert "labelling concepts: 100%" in raw.getvalue()


# ----------------------------------------------------------------------------- a real run

TINY = ["--config", "configs/default.yaml", "--set", "corpus.limit=8", "--set", "extraction.shard_size=4",
        "--set", "extraction.split_point=1", "--set", "extraction.max_tokens=32", "--set", "concepts.nb_concepts=8",
        "--set", "concepts.params={top_k: 2, epochs: 2}", "--set", "importance.n_samples=2",
        "--set", "interpretation.labels.enabled=false", "--set", "resources.cpus_per_worker=1"]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.concepts", *TINY, "--set", f"output_uri={out}", *extra],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


@pytest.mark.slow
def test_concept_job_console(tmp_path):
    """A tiny concept job: stage lines on the console, Ray's output in the log only; a rerun
    with --verbose (the finished activations are reused) shows Ray's output."""
    out = tmp_path / "out"
    run = _run(out)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == f"[raylens] log: {out}/logs/job.log (Ray's output; --verbose shows it here)"
    for pattern in (r"documents: 8 documents in 2 shards", r"extract: 2/2 shards, \d+(\.\d\d)? rows/s, about 0s left",
                    r"extract: 2 shards, \d+ activation rows", r"fit: epoch 2/2, loss \S+",
                    r"fit: .*held-out explained variance", r"labels: disabled", r"done in \d+s"):
        assert any(re.fullmatch(r"\[raylens\] " + pattern + ".*", x) for x in lines), (pattern, run.stdout)
    shown = run.stdout + run.stderr
    for ray_output in ("Running Dataset", "Total Progress", "pid=", "Started a local Ray instance"):
        assert ray_output not in shown, ray_output
    log = (out / "logs" / "job.log").read_text()
    assert "Started a local Ray instance" in log and "MapBatches(ConceptModelWorker)" in log

    again = _run(out, "--verbose")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "extract: 2 of 2 shards already done, 0 to do" in again.stdout
    shown = again.stdout + again.stderr
    assert "Started a local Ray instance" in shown and "pid=" in shown
