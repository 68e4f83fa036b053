"""The jobs on Ray's fake GPUs (`ray.init(num_gpus=N)`; CUDA stays unavailable, so the CPU path
runs): every stage asks for GPUs and gets what the config asked for, and one GPU does not
deadlock (a watchdog turns a hang into a failure). Each job runs in its own process with its
own local Ray, so the test session's Ray is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.procs import run_job, set_args

WATCHDOG_S = 600


def _concept_args(out: Path, *, workers: int, gpus_per_worker: int, trainer_gpus: int) -> list[str]:
    sets = {"output_uri": str(out), "corpus.limit": 16, "extraction.shard_size": 8, "extraction.max_tokens": 48,
            "concepts.nb_concepts": 16, "concepts.params": "{top_k: 4, epochs: 2}", "importance.n_samples": 4,
            "interpretation.labels.enabled": "false", "resources.num_workers": workers,
            "resources.gpus_per_worker": gpus_per_worker, "resources.trainer_gpus": trainer_gpus}
    return set_args("configs/default.yaml", sets)


@pytest.mark.slow
def test_concept_job_on_one_gpu_every_stage_asking_for_it(tmp_path):
    out = tmp_path / "one-gpu"
    run_job("concepts", _concept_args(out, workers=1, gpus_per_worker=1, trainer_gpus=1), n_gpus=1,
            timeout_s=WATCHDOG_S)
    got = json.loads((out / "resources.json").read_text())
    assert [len(g) for g in got["extract"].values()] == [1, 1]
    assert len(got["trainer"]) == 1 and len(got["model_worker"]) == 1
    assert (out / "report.html").exists()


@pytest.mark.slow
def test_concept_job_on_four_gpus_two_workers_of_two_and_a_trainer(tmp_path):
    out = tmp_path / "four-gpus"
    run_job("concepts", _concept_args(out, workers=2, gpus_per_worker=2, trainer_gpus=1), n_gpus=4,
            timeout_s=WATCHDOG_S)
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
    run_job("attribute", set_args("configs/attribute.yaml", sets), n_gpus=1, timeout_s=WATCHDOG_S)
    markers = sorted((out / "attributions" / "_success").glob("*.json"))
    assert len(markers) == 2
    assert all(len(json.loads(m.read_text())["gpus"]) == 1 for m in markers)
