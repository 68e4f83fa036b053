"""Extraction placement on several GPUs per worker (`raylens.models.placement`): replicas of one
GPU when the extraction model fits on one, sharding over the fewest GPUs otherwise."""

from __future__ import annotations

import pytest

from raylens.models.placement import extraction_placement

GIB = 2**30


def test_fits_on_one_gpu_becomes_one_gpu_workers():
    # Llama-3.1-8B to layer 16 in bf16: 7.9 GiB + working set, on 80 GiB GPUs: 2 x 2 GPUs -> 4 x 1
    p = extraction_placement(need_bytes=10 * GIB, gpu_bytes=80 * GIB, num_workers=2, gpus_per_worker=2)
    assert (p.num_workers, p.gpus_per_worker) == (4, 1) and "fits on one GPU" in p.reason


def test_too_big_for_one_gpu_shards_over_the_fewest():
    # 30 GiB on 24 GiB cards: 2 GPUs per replica; a worker of 4 GPUs becomes 2 workers of 2
    p = extraction_placement(need_bytes=30 * GIB, gpu_bytes=24 * GIB, num_workers=1, gpus_per_worker=4)
    assert (p.num_workers, p.gpus_per_worker) == (2, 2) and "needs 2 GPUs" in p.reason
    # what the config asks for, when it is already the fewest
    p = extraction_placement(need_bytes=30 * GIB, gpu_bytes=24 * GIB, num_workers=3, gpus_per_worker=2)
    assert (p.num_workers, p.gpus_per_worker) == (3, 2)


def test_kept_as_configured_without_a_measured_gpu_or_with_one_gpu_per_worker():
    for gpu_bytes, gpus in ((None, 2), (80 * GIB, 1), (80 * GIB, 0)):
        p = extraction_placement(need_bytes=10 * GIB, gpu_bytes=gpu_bytes, num_workers=3, gpus_per_worker=gpus)
        assert (p.num_workers, p.gpus_per_worker, p.reason) == (3, gpus, "as configured")


def test_refuses_a_replica_larger_than_all_its_gpus():
    with pytest.raises(ValueError, match="gpus_per_worker: 2"):
        extraction_placement(need_bytes=100 * GIB, gpu_bytes=24 * GIB, num_workers=1, gpus_per_worker=2)
