"""The model-worker base: an actor that holds one Hugging Face model (sharded over its GPUs when
it has several) loaded from a job config, and serves that job's document shards as a
`actors.shard_worker.ShardWorker`.

One subclass per job: `actors.concept_worker.ConceptModelWorker` (activations, vocabulary
projection, importance) and `actors.attribution_worker.AttributionModelWorker` (attributions).
A thin shell: the math lives in ``raylens``. Ray imports only happen in the pipeline.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel

from actors.shard_worker import ShardWorker
from raylens.io.store import OutputStore
from raylens.models.loading import load_model


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
        device_map = "auto" if res.gpus_per_worker > 1 and torch.cuda.device_count() > 1 else None
        device = "cuda" if res.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.loaded = load_model(self.cfg.model.name, task=self.cfg.model.task, dtype=self.cfg.model.dtype,
                                 device=device, device_map=device_map)
        self.store = OutputStore(self.cfg.output_uri)
        self.setup()

    def setup(self) -> None:
        """What the job's worker holds besides the model (default: nothing)."""

    def ping(self) -> str:
        """The loaded model's class name (a cheap call that waits for the actor to be up)."""
        return type(self.loaded.model).__name__
