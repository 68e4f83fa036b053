"""Where extraction runs when a worker is given several GPUs.

Extraction loads only the embeddings and the blocks up to the split point
(:func:`raylens.models.split.load_split_model`). Sharding that part over an actor's GPUs with
``device_map`` makes the GPUs run one after the other: with no pipelining each waits for the one
before it, so two GPUs give one GPU's throughput (DESIGN.md, "Measured at scale"). When the part
fits on one GPU, the same GPUs are better used as independent workers of one GPU each (Ray runs
one shard per worker, data parallel, none waits on another); only when it does not fit is it
sharded, over the fewest GPUs that hold it, with the layers balanced over them.
"""

from __future__ import annotations

import dataclasses
import math

#: Share of a GPU's memory extraction may plan to use (the rest: fragmentation, other tenants).
GPU_HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class ExtractionPlacement:
    """How the extraction stage uses the GPUs it is given.

    Attributes:
        num_workers: model-worker actors of the stage.
        gpus_per_worker: GPUs of each (the model is sharded over them when > 1).
        reason: one line for the console and the plan.
    """

    num_workers: int
    gpus_per_worker: float
    reason: str


def extraction_placement(*, need_bytes: float, gpu_bytes: float | None, num_workers: int,
                         gpus_per_worker: float, headroom: float = GPU_HEADROOM) -> ExtractionPlacement:
    """Workers and GPUs per worker for extraction, from what one model replica needs.

    Args:
        need_bytes: GPU memory of one extraction replica (bytes): the weights it loads, one
            batch's working set and the CUDA context (`raylens.config.plan.plan_concept_job`'s
            ``extraction_gpu_peak_bytes``).
        gpu_bytes: memory of one GPU (bytes); ``None`` when unknown (no CUDA where it was asked,
            e.g. Ray's fake GPUs): the configured resources are kept.
        num_workers, gpus_per_worker: what the config asks for (``resources``).
        headroom: share of a GPU's memory a replica may use.

    Returns:
        The configured resources when ``gpus_per_worker <= 1`` or ``gpu_bytes`` is unknown; else
        the same GPUs (``num_workers x ceil(gpus_per_worker)``) as workers of ``k`` GPUs each,
        ``k`` the fewest GPUs that hold one replica (1 when it fits on one GPU).

    Raises:
        ValueError: one replica does not fit on all of a worker's GPUs together.
    """
    if gpus_per_worker <= 1 or gpu_bytes is None:
        return ExtractionPlacement(num_workers, gpus_per_worker, "as configured")
    per_worker = math.ceil(gpus_per_worker)
    total = num_workers * per_worker
    k = max(1, math.ceil(need_bytes / (headroom * gpu_bytes)))
    if k > per_worker:
        raise ValueError(f"extraction needs about {need_bytes / 2**30:.1f} GiB per replica, more than "
                         f"{per_worker} GPUs of {gpu_bytes / 2**30:.1f} GiB hold "
                         f"(resources.gpus_per_worker: {gpus_per_worker})")
    if k == 1:
        return ExtractionPlacement(total, 1, f"the extraction model ({need_bytes / 2**30:.1f} GiB) fits on one GPU: "
                                             f"{total} workers of 1 GPU instead of {num_workers} of {per_worker}")
    workers = num_workers * (per_worker // k)
    return ExtractionPlacement(workers, k, f"the extraction model ({need_bytes / 2**30:.1f} GiB) needs {k} GPUs: "
                                           f"{workers} workers of {k} GPUs, layers balanced over them")
