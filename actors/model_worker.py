"""The model-worker base: an actor that holds one Hugging Face model (sharded over its GPUs when
it has several) loaded from a job config, and serves that job's document shards as a
`actors.shard_worker.ShardWorker`.

One subclass per job: `actors.concept_worker.ConceptModelWorker` (activations, vocabulary
projection, importance) and `actors.attribution_worker.AttributionModelWorker` (attributions).
A thin shell: the math lives in ``raylens``. Ray imports only happen in the pipeline.
"""

from __future__ import annotations

from typing import ClassVar

import os

import torch
from pydantic import BaseModel

from actors.shard_worker import ShardWorker
from raylens.io.store import OutputStore
from raylens.models.loading import LoadedModel, load_model


class ModelWorker(ShardWorker):
    """One model per actor, loaded from the job's ``model`` and ``resources`` sections.

    Subclasses set :attr:`config_class` and :attr:`kind` and add their own state in
    :meth:`setup` (called at the end of the constructor).

    Args:
        config: the job config as a dict (``<config_class>.model_dump()``).

    Attributes:
        config_class: the job's pydantic config class (set by each subclass).
        cfg: the validated config.
        loaded: the `raylens.models.loading.load_model` result (model, tokenizer, task).
        store: the job's output store.

    Raises:
        pydantic.ValidationError: ``config`` is not a valid ``config_class``.
    """

    config_class: ClassVar[type[BaseModel]]

    def __init__(self, config: dict):
        self.cfg = self.config_class.model_validate(config)
        res = self.cfg.resources
        torch.set_num_threads(max(1, int(res.cpus_per_worker)))
        self.device_map = "auto" if res.gpus_per_worker > 1 and torch.cuda.device_count() > 1 else None
        self.device = "cuda" if res.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.loaded = self.load()
        self.store = OutputStore(self.cfg.output_uri)
        self.setup()

    def load(self) -> LoadedModel:
        """The model this worker holds (default: the whole model, on :attr:`device` or sharded
        with :attr:`device_map`)."""
        return load_model(self.cfg.model.name, task=self.cfg.model.task, dtype=self.cfg.model.dtype,
                          device=self.device, device_map=self.device_map,
                          trust_remote_code=self.cfg.model.trust_remote_code)

    def setup(self) -> None:
        """What the job's worker holds besides the model (default: nothing)."""

    def shard_meta(self) -> dict:
        """Marker metadata every shard of this worker gets: ``gpus``, the GPU ids this actor was
        given (``CUDA_VISIBLE_DEVICES``, which Ray sets per actor; ``[]`` for none)."""
        return {"gpus": assigned_gpus()}

    def gpus(self) -> list[str]:
        """The GPU ids Ray gave this actor (:func:`assigned_gpus`)."""
        return assigned_gpus()

    def ping(self) -> str:
        """The loaded model's class name (a cheap call that waits for the actor to be up)."""
        return type(self.loaded.model).__name__


def assigned_gpus() -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` (set per actor by Ray; with
    ``ray.init(num_gpus=N)`` on a machine without GPUs the ids are Ray's fake ones)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [g for g in value.split(",") if g.strip()]
