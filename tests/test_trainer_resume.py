"""The concept trainer's checkpoints: a trainer killed (SIGKILL, by pid) in the middle of its fit
resumes from its last checkpoint and ends with the model an uninterrupted run makes; a rerun
skips a finished fit. Real Parquet shards, the real trainer class (called in-process, no Ray)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from raylens.io.schemas import tensor_array
from raylens.io.store import OutputStore

D_MODEL = 32
#: Largest difference allowed between the resumed and the uninterrupted model's tensors. Same
#: seed, same data order, same thread count: measured 0.0 (bit-identical); the margin covers a
#: BLAS that would split a product differently after a restart.
TOLERANCE = 1e-6

_CHILD = """
import sys, time
from raylens.concepts.models.sae import SAEConceptModel
real = SAEConceptModel.train_step
def slow(self, *a, **k):
    time.sleep(0.02)  # so that the parent's kill lands in the middle of the fit
    return real(self, *a, **k)
SAEConceptModel.train_step = slow
from actors.trainer import ConceptTrainer
import json
ConceptTrainer(json.loads(sys.argv[1])).fit(int(sys.argv[2]))
"""


def _shards(store: OutputStore, n_shards: int = 4, rows: int = 400) -> None:
    """Activation shards of a low-rank signal plus noise, 10 rows per document."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, D_MODEL))
    for s in range(n_shards):
        x = rng.normal(size=(rows, 8)) @ basis + 0.1 * rng.normal(size=(rows, D_MODEL))
        doc = s * rows // 10 + np.arange(rows) // 10
        unit = np.arange(rows) % 10
        table = pa.table({"doc_id": pa.array(doc, pa.int64()), "unit": pa.array(unit, pa.int32()),
                          "char_start": pa.array(unit * 5, pa.int32()), "char_end": pa.array(unit * 5 + 4, pa.int32()),
                          "activation": tensor_array(x, "float32")})
        store.write_shard("activations", f"shard-{s:05d}", table)


def _config(uri: str) -> dict:
    return {"output_uri": uri, "seed": 3,
            "concepts": {"method": "topk_sae", "nb_concepts": 32, "batch_rows": 64, "checkpoint_every": 10,
                         "params": {"top_k": 4, "epochs": 4, "batch_size": 32}},
            "resources": {"cpus_per_worker": 1}}


def _model_tensors(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(uri, "concept_model", "model.safetensors"))


def _count_steps(monkeypatch) -> list[int]:
    from raylens.concepts.models.sae import SAEConceptModel

    calls = [0]
    real = SAEConceptModel.train_step

    def counting(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(SAEConceptModel, "train_step", counting)
    return calls


def test_killed_trainer_resumes_to_the_uninterrupted_model(tmp_path, monkeypatch):
    from actors.trainer import CHECKPOINTS, FIT_MARKER, ConceptTrainer

    ref_uri, run_uri = str(tmp_path / "ref"), str(tmp_path / "run")
    _shards(OutputStore(ref_uri))
    shutil.copytree(ref_uri, run_uri)
    steps = _count_steps(monkeypatch)
    ref = ConceptTrainer(_config(ref_uri)).fit(D_MODEL)
    total_steps = steps[0]
    assert total_steps > 100

    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(_config(run_uri)), str(D_MODEL)],
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    pointer = os.path.join(run_uri, CHECKPOINTS, "latest.json")
    deadline = time.monotonic() + 120
    saved = 0
    target = total_steps - 30  # inside the last epoch: the train metrics' sums are resumed too
    while saved < target and time.monotonic() < deadline and child.poll() is None:
        if os.path.exists(pointer):
            saved = json.load(open(pointer))["meta"]["step"]
        time.sleep(0.02)
    assert child.poll() is None, "the trainer finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not os.path.exists(os.path.join(run_uri, FIT_MARKER))
    last = json.load(open(pointer))["meta"]["step"]
    assert target <= last < total_steps

    steps[0] = 0
    resumed = ConceptTrainer(_config(run_uri)).fit(D_MODEL)
    assert steps[0] == total_steps - last  # it went on from the checkpoint, not from zero
    a, b = _model_tensors(ref_uri), _model_tensors(run_uri)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed vs uninterrupted model: max abs difference {diff}")
    assert diff <= TOLERANCE, diff
    assert resumed["n_fit_rows"] == ref["n_fit_rows"]
    for split in ("train", "heldout"):
        m = [next(m for m in r["metrics"] if m["split"] == split) for r in (ref, resumed)]
        assert m[0]["n_rows"] == m[1]["n_rows"]
        for key in ("mse", "explained_variance", "mean_l0", "dead_fraction", "fid"):
            assert m[0][key] == pytest.approx(m[1][key], rel=1e-6, abs=1e-9), (split, key)
    assert not os.path.exists(os.path.join(run_uri, CHECKPOINTS))  # removed once the fit is done

    # a rerun of the finished fit skips it: no training step, the same metrics
    steps[0] = 0
    again = ConceptTrainer(_config(run_uri)).fit(D_MODEL)
    assert again.get("skipped") and steps[0] == 0
    assert [m["explained_variance"] for m in again["metrics"]] == \
        pytest.approx([m["explained_variance"] for m in resumed["metrics"]])
    # ...but other settings refit
    other = _config(run_uri)
    other["concepts"]["params"]["top_k"] = 5
    assert not ConceptTrainer(other).fit(D_MODEL).get("skipped") and steps[0] == total_steps


def test_train_metrics_come_from_the_last_epoch(tmp_path):
    """The train row is computed during the last epoch (no separate pass): over that epoch's
    rows, close to (and not far below) the final model's own metrics on the train rows."""
    from actors.trainer import ConceptTrainer
    from raylens.concepts.metrics import reconstruction_metrics
    from raylens.concepts.models import load_concept_model
    from raylens.io.readers import ActivationStream

    uri = str(tmp_path / "out")
    _shards(OutputStore(uri))
    trainer = ConceptTrainer(_config(uri))
    fit = trainer.fit(D_MODEL)
    train = next(m for m in fit["metrics"] if m["split"] == "train")
    model = load_concept_model(os.path.join(uri, "concept_model"))
    final = reconstruction_metrics(model, ActivationStream(OutputStore(uri), split="train", heldout_fraction=0.1))
    assert train["n_rows"] == final["n_rows"] == fit["n_fit_rows"]
    assert abs(train["explained_variance"] - final["explained_variance"]) < 0.05


def test_checkpoints_live_on_the_object_store(tmp_path, monkeypatch):
    """On S3 (a loopback server) the checkpoints go through the store: a fit interrupted by an
    error at step 35 resumes there (from its checkpoint at step 30) and ends with the local run's model."""
    from actors.trainer import CHECKPOINTS, ConceptTrainer
    from raylens.concepts.models import load_concept_model
    from raylens.concepts.models.sae import SAEConceptModel
    from tests.s3 import s3_server

    local = str(tmp_path / "local")
    _shards(OutputStore(local))
    ref = ConceptTrainer(_config(local)).fit(D_MODEL)
    with s3_server() as query:
        uri = f"s3://raylens-test/run{query}"
        store = OutputStore(uri)
        _shards(store)
        real, calls = SAEConceptModel.train_step, [0]

        def failing(self, *a, **k):
            calls[0] += 1
            if calls[0] == 35:
                raise RuntimeError("killed")
            return real(self, *a, **k)

        monkeypatch.setattr(SAEConceptModel, "train_step", failing)
        with pytest.raises(RuntimeError, match="killed"):
            ConceptTrainer(_config(uri)).fit(D_MODEL)
        assert store.read_json(f"{CHECKPOINTS}/latest.json")["meta"]["step"] == 30
        calls[0] = 1000  # no more failures
        resumed = ConceptTrainer(_config(uri)).fit(D_MODEL)
        a = load_concept_model(os.path.join(local, "concept_model"))
        b = load_concept_model(store.download_dir("concept_model"))
        assert calls[0] - 1000 == sum(h["steps"] for h in b.history) - 30  # went on from step 30
        assert torch.equal(a.dictionary, b.dictionary) and a.history == b.history
        assert not store.exists(CHECKPOINTS) and ref["n_fit_rows"] == resumed["n_fit_rows"]
