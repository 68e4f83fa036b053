"""The jobs on Ray's fake GPUs (`ray.init(num_gpus=N)`; CUDA stays unavailable, so the CPU path
runs): every stage asks for GPUs and gets what the config asked for, and one GPU does not
deadlock (a watchdog turns a hang into a failure). Each job runs in its own process with its
own local Ray, so the test session's Ray is untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WATCHDOG_S = 600

_RUN = """
import sys, ray
ray.init(num_cpus=8, num_gpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False)
from jobs.{job} import main
sys.exit(main(sys.argv[2:]))
"""


def _run_job(job: str, n_gpus: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _RUN.format(job=job), str(n_gpus), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=WATCHDOG_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{job} job on {n_gpus} fake GPU(s) did not finish in {WATCHDOG_S} s (a scheduling hang?)\n"
                    + out[-3000:])
    assert proc.returncode == 0, out[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _concept_args(out: Path, *, workers: int, gpus_per_worker: int, trainer_gpus: int) -> list[str]:
    sets = {"output_uri": str(out), "corpus.limit": 16, "extraction.shard_size": 8, "extraction.max_tokens": 48,
            "concepts.nb_concepts": 16, "concepts.params": "{top_k: 4, epochs: 2}", "importance.n_samples": 4,
            "interpretation.labels.enabled": "false", "resources.num_workers": workers,
            "resources.gpus_per_worker": gpus_per_worker, "resources.trainer_gpus": trainer_gpus}
    return ["--config", "configs/default.yaml"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.slow
def test_concept_job_on_one_gpu_every_stage_asking_for_it(tmp_path):
    out = tmp_path / "one-gpu"
    _run_job("concepts", 1, _concept_args(out, workers=1, gpus_per_worker=1, trainer_gpus=1))
    got = json.loads((out / "resources.json").read_text())
    assert [len(g) for g in got["extract"].values()] == [1, 1]
    assert len(got["trainer"]) == 1 and len(got["model_worker"]) == 1
    assert (out / "report.html").exists()


@pytest.mark.slow
def test_concept_job_on_four_gpus_two_workers_of_two_and_a_trainer(tmp_path):
    out = tmp_path / "four-gpus"
    _run_job("concepts", 4, _concept_args(out, workers=2, gpus_per_worker=2, trainer_gpus=1))
    got = json.loads((out / "resources.json").read_text())
    assert [len(g) for g in got["extract"].values()] == [2, 2]
    assert len(got["trainer"]) == 1 and len(got["model_worker"]) == 2
    assert set(sum(got["extract"].values(), [])) <= {"0", "1", "2", "3"}


@pytest.mark.slow
def test_attribution_job_on_one_gpu(tmp_path):
    out = tmp_path / "attr"
    sets = {"output_uri": str(out), "model.name": "smollm2-135m", "corpus.limit": 4, "attribution.shard_size": 2,
            "attribution.methods": "[Saliency]", "attribution.max_new_tokens": 2, "attribution.max_tokens": 64,
            "attribution.params": "{}", "metrics.enabled": "false", "resources.gpus_per_worker": 1}
    _run_job("attribute", 1, ["--config", "configs/attribute.yaml"]
             + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    markers = sorted((out / "attributions" / "_success").glob("*.json"))
    assert len(markers) == 2
    assert all(len(json.loads(m.read_text())["gpus"]) == 1 for m in markers)
