"""The concept fit over several GPUs: a Ray Train ``TorchTrainer`` of ``resources.trainer_gpus``
workers, each one rank of :func:`raylens.concepts.models.data_parallel.fit_stream_data_parallel`.

Wiring only. Every rank reads the same train stream and trains on its slice of each batch; rank 0
runs the whole :meth:`actors.trainer.ConceptTrainer.fit` (checkpoints, the saved model, metrics,
the fit marker: the same files as a one-process fit, so a rerun skips it and a killed fit
resumes from its checkpoints, on one process or on several). NCCL on CUDA workers, gloo on CPU
ones (Ray's fake GPUs in the tests). Ray is imported where it is used, so that a rank started
without Ray (the tests' own ``torch.distributed`` processes) does not pay for importing it.
"""

from __future__ import annotations

import logging
import uuid

import torch

from actors.trainer import ConceptTrainer
from raylens.concepts.models import ConceptModel
from raylens.concepts.models.data_parallel import fit_stream_data_parallel
from raylens.config import ConceptJobConfig
from raylens.io.readers import ActivationStream

log = logging.getLogger(__name__)


class RankTrainer(ConceptTrainer):
    """A :class:`ConceptTrainer` on one rank of a data-parallel fit.

    Args:
        config: the job config as a dict.
        rank: this worker's rank, ``0 <= rank < world_size``.
        world_size: the number of ranks.
        device: this rank's torch device (``"cuda:<local rank>"`` or ``"cpu"``).
    """

    def __init__(self, config: dict, rank: int, world_size: int, device: str):
        super().__init__(config)
        self.rank, self.world_size, self.device = rank, world_size, device

    def fit_model(self, model: ConceptModel, stream: ActivationStream, **kwargs) -> None:
        """Fit ``model`` as this rank of the data-parallel fit."""
        fit_stream_data_parallel(model, stream, rank=self.rank, world_size=self.world_size, **kwargs)

    def fit_rank(self, d_model: int) -> None:
        """Rank 0 runs :meth:`fit`; the others train with it and write nothing (nothing either when
        the fit is already finished)."""
        if self.rank == 0:
            self.fit(d_model)
        elif self.finished_fit(d_model) is None:
            model, kwargs = self.fit_setup(d_model)
            with self.train_stream(model) as stream:
                self.fit_model(model, stream, **kwargs)


def train_rank(loop_config: dict) -> None:
    """The ``train_loop_per_worker`` of the TorchTrainer: ``loop_config`` holds ``config`` (the job
    config as a dict) and ``d_model``."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = str(ray.train.torch.get_device()) if torch.cuda.is_available() else "cpu"
    trainer = RankTrainer(loop_config["config"], ctx.get_world_rank(), ctx.get_world_size(), device)
    trainer.fit_rank(loop_config["d_model"])


def _finished(config: dict, d_model: int) -> bool:
    return ConceptTrainer(config).finished_fit(d_model) is not None


def _cuda_workers() -> bool:
    return torch.cuda.is_available()


def fit_data_parallel(cfg: ConceptJobConfig, d_model: int, ranks: int) -> bool:
    """Fit the job's concept model with a TorchTrainer of ``ranks`` workers, one GPU and
    ``resources.cpus_per_worker`` CPUs each, unless a finished fit of the same key is there.

    Returns:
        True when it fitted, False when it found the fit finished.

    Raises:
        ray.train.TrainingFailedError: a rank failed (the checkpoints stay: a rerun resumes).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = cfg.model_dump()
    if ray.get(ray.remote(num_cpus=0)(_finished).remote(config, d_model)):
        return False
    cuda = ray.get(ray.remote(num_gpus=1, num_cpus=0)(_cuda_workers).remote())
    log.info("fit: TorchTrainer of %d workers (%s backend)", ranks, "nccl" if cuda else "gloo")
    trainer = TorchTrainer(
        train_rank, train_loop_config={"config": config, "d_model": d_model},
        scaling_config=ScalingConfig(num_workers=ranks, use_gpu=True,
                                     resources_per_worker={"CPU": cfg.resources.cpus_per_worker, "GPU": 1}),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        run_config=RunConfig(name=f"raylens-concept-fit-{uuid.uuid4().hex[:8]}"))  # a new run: nothing to restore
    trainer.fit()
    return True
