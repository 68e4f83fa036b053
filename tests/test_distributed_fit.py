"""Data-parallel SAE fitting (``resources.trainer_gpus > 1``): two ranks, each training on its half
of every batch with the gradients summed, end with the model one process fits on the same data
in the same order; a data-parallel fit killed after a checkpoint resumes to that same model; a
method not fitted by gradient steps keeps the one-process fit. Real Parquet shards; the ranks are
real processes (gloo on the CPU), started by hand or by Ray Train's TorchTrainer on a local Ray
with fake GPUs."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from raylens.io.schemas import tensor_array
from raylens.io.store import OutputStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 32
#: Rows per SAE step: odd, and 1,540 train rows = 57 x 27 + 1 (see :func:`_write_store`).
BATCH = 27
#: Largest difference allowed between a parameter of the 2-rank and of the 1-process model. The
#: ranks sum the same gradients in another order (two half-batch products plus an all-reduce
#: instead of one product); over 116 Adam steps that drifts by a few 1e-7 in float32 (measured:
#: printed by the tests).
TOLERANCE = 1e-4

_RANK = """
import json, logging, os, sys
import torch.distributed as dist
logging.basicConfig(level=logging.INFO)
config, d_model, stop = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
if stop:  # the ranks die together once the checkpoint of step `stop` is written (a killed worker group)
    from raylens.concepts.models.checkpoint import FitCheckpoint
    from raylens.concepts.models.data_parallel import ReadOnlyCheckpoint
    for cls in (FitCheckpoint, ReadOnlyCheckpoint):
        def save(self, tensors, meta, real=cls.save):
            real(self, tensors, meta)
            if meta["step"] >= stop:
                os._exit(3)
        cls.save = save
from actors.data_parallel import RankTrainer
RankTrainer(config, rank, world, "cpu").fit_rank(d_model)
dist.destroy_process_group()
"""


def _write_store(uri: str) -> None:
    """Four activation shards of 430 rows (a rank-6 signal plus noise), ten rows per document: 1,540
    train rows, so that steps of :data:`BATCH` rows split 13 / 14 over two ranks and the last
    step of an epoch has one row (fewer rows than ranks)."""
    gen = np.random.default_rng(7)
    n = 1720
    x = gen.normal(size=(n, 6)) @ gen.normal(size=(6, WIDTH)) + 0.1 * gen.normal(size=(n, WIDTH))
    rows = np.arange(n)
    store = OutputStore(uri)
    for s, part in enumerate(np.split(rows, 4)):
        store.write_shard("activations", f"shard-{s:05d}", pa.table({
            "doc_id": pa.array(part // 10, pa.int64()), "unit": pa.array(part % 10, pa.int32()),
            "char_start": pa.array(3 * (part % 10), pa.int32()), "char_end": pa.array(3 * (part % 10) + 2, pa.int32()),
            "activation": tensor_array(x[part], "float32")}))


def _config(uri: str, method: str = "topk_sae", gpus: int = 2) -> dict:
    params = {"top_k": 4, "epochs": 2, "batch_size": BATCH} if method == "topk_sae" else {}
    return {"output_uri": uri, "seed": 5,
            "concepts": {"method": method, "nb_concepts": 32, "batch_rows": 64, "checkpoint_every": 20,
                         "params": params},
            "resources": {"cpus_per_worker": 1, "trainer_gpus": gpus}}


def _weights(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(uri, "concept_model", "model.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(config: dict, world: int = 2, stop: int = 0) -> list[str]:
    """Run the data-parallel fit as ``world`` rank processes; returns their logs (rank 0 first)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, json.dumps(config), str(WIDTH), str(stop)], cwd=ROOT,
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [3 if stop else 0] * world, (codes, logs[0][-3000:])
    return logs


def _one_process_fit(tmp_path) -> tuple[str, dict]:
    """The reference: the trainer's one-process fit (trainer_gpus 0) on its own copy of the shards."""
    from actors.trainer import ConceptTrainer

    ref = str(tmp_path / "ref")
    _write_store(ref)
    return ref, ConceptTrainer(_config(ref, gpus=0)).fit(WIDTH)


def _assert_same_fit(ref: str, run: str, what: str) -> None:
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{what}: parameters max abs difference {diff:.3g} (tolerance {TOLERANCE:g})")
    assert diff <= TOLERANCE, diff
    hist = [json.load(open(os.path.join(u, "concept_model", "config.json")))["extra"]["history"] for u in (ref, run)]
    for h1, h2 in zip(*hist, strict=True):  # the whole batches' statistics, epoch by epoch
        for k in ("loss", "mse", "explained_variance", "l0", "steps"):
            assert h2[k] == pytest.approx(h1[k], rel=1e-4, abs=1e-6), (k, h1, h2)
    rows = [{m["split"]: m for m in OutputStore(u).read_table("concepts/metrics.parquet").to_pylist()}
            for u in (ref, run)]
    for split in ("train", "heldout"):  # train: the last epoch observed on rank 0, whole batches gathered
        m1, m2 = rows[0][split], rows[1][split]
        assert m1["n_rows"] == m2["n_rows"] > 0
        for key in ("mse", "explained_variance", "mean_l0", "dead_fraction"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-3, abs=1e-6), (split, key)


def test_two_ranks_killed_after_a_checkpoint_resume_to_the_one_process_model(tmp_path):
    """Two rank processes (gloo) killed together right after the checkpoint of step 60 of 116, then
    rerun: they resume from it (both say so) and end with the one-process model (the
    uninterrupted data-parallel fit is the TorchTrainer test's)."""
    from actors.trainer import CHECKPOINTS, FIT_MARKER

    ref, fitted = _one_process_fit(tmp_path)
    assert fitted["n_fit_rows"] == 57 * BATCH + 1  # a one-row last step in each epoch
    run = str(tmp_path / "killed")
    _write_store(run)
    t0 = time.perf_counter()
    _run_ranks(_config(run), stop=60)
    assert not os.path.exists(os.path.join(run, FIT_MARKER))
    assert json.load(open(os.path.join(run, CHECKPOINTS, "latest.json")))["meta"]["step"] == 60
    logs = _run_ranks(_config(run))
    print(f"2 ranks, killed and resumed: {time.perf_counter() - t0:.1f}s with start-ups; "
          f"one process: {fitted['fit_seconds']:.1f}s of fit")
    assert all("resuming from the checkpoint at step 60" in log for log in logs)
    _assert_same_fit(ref, run, "2 ranks killed at step 60 and resumed vs 1 process")
    assert not os.path.exists(os.path.join(run, CHECKPOINTS))  # rank 0 removed them once the model was saved


def test_only_row_separable_gradient_methods_go_data_parallel():
    from raylens.concepts.models import concept_model_class
    from raylens.concepts.models.data_parallel import data_parallel_ranks, slice_bounds

    assert data_parallel_ranks(concept_model_class("topk_sae"), 4)[0] == 4
    assert data_parallel_ranks(concept_model_class("jumprelu_sae"), 2)[0] == 2
    for method, gpus in [("topk_sae", 1), ("topk_sae", 2.5), ("pca", 2), ("semi_nmf", 8), ("batchtopk_sae", 2)]:
        ranks, why = data_parallel_ranks(concept_model_class(method), gpus)
        assert ranks == 1 and (gpus <= 1) == (why == ""), (method, gpus, why)
    assert slice_bounds(32, 2) == [0, 16, 32] and slice_bounds(7, 3) == [0, 2, 4, 7]


def test_non_gradient_method_with_two_trainer_gpus_fits_in_one_process(tmp_path, caplog):
    from actors.trainer import ConceptTrainer
    from raylens.concepts.models import load_concept_model

    uri = str(tmp_path / "pca")
    _write_store(uri)
    with caplog.at_level(logging.WARNING, logger="actors.trainer"):
        result = ConceptTrainer(_config(uri, "pca", gpus=2)).fit(WIDTH)
    lines = [r.getMessage() for r in caplog.records if "trainer GPUs stay unused" in r.getMessage()]
    assert lines == ["fit: pca is not fitted by gradient steps (no data-parallel fit): one process on one GPU "
                     "fits it, 1 of the 2 trainer GPUs stay unused"]
    assert result["n_fit_rows"] > 0 and load_concept_model(os.path.join(uri, "concept_model")).is_fitted


_TORCH_TRAINER = """
import json, sys, ray
ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
from actors.data_parallel import fit_data_parallel
from raylens.config import ConceptJobConfig
cfg = ConceptJobConfig.model_validate(json.loads(sys.argv[1]))
print("FITTED", fit_data_parallel(cfg, int(sys.argv[2]), 2), fit_data_parallel(cfg, int(sys.argv[2]), 2))
"""


@pytest.mark.slow
def test_torch_trainer_on_two_fake_gpus_fits_the_one_process_model(tmp_path):
    """Ray Train's TorchTrainer, two workers of one (fake) GPU each: CUDA is unavailable, so the
    ranks run gloo on the CPU; the same model as one process; a rerun finds the fit finished."""
    ref, _ = _one_process_fit(tmp_path)
    run = str(tmp_path / "ray")
    _write_store(run)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _TORCH_TRAINER, json.dumps(_config(run)), str(WIDTH)], cwd=ROOT,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=400)
    print(f"TorchTrainer fit with a local Ray start: {time.perf_counter() - t0:.1f}s")
    assert "FITTED True False" in out.stdout, (out.stdout[-2000:], out.stderr[-4000:])
    _assert_same_fit(ref, run, "TorchTrainer, 2 ranks vs 1 process")
