"""Fit checkpoints of the iterative concept models: save every N training steps, resume after a
killed trainer, and mark a finished fit so that a rerun skips it.

A checkpoint is one safetensors file (the model's tensors, the optimizer's state tensors, the
torch RNG state) plus a JSON pointer ``latest.json`` naming it (the commit point: a file
without a pointer, or a pointer to another key, is ignored). Everything goes through an
:class:`~raylens.io.store.OutputStore`, so the checkpoints of a job on S3 live on S3; a new
file is written once under its final name (no rename), then the pointer, then the older file
is removed.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from raylens.io.store import OutputStore

__all__ = ["FitCheckpoint", "FitState", "optimizer_from_tensors", "optimizer_to_tensors"]

logger = logging.getLogger(__name__)

#: Checkpoints every this many training steps unless configured (a TopK SAE step over 4096 rows
#: of width 4096 and 16,384 concepts is ~10 ms on an H100: a checkpoint every ~10 s).
DEFAULT_EVERY = 1000


@dataclass
class FitState:
    """Where a running fit is: the resumable part of the training loop (JSON-serialisable).

    Attributes:
        step: optimizer steps done in all.
        epoch: the epoch in progress (0-based; ``epochs`` when the fit is done).
        batch: batches of ``epoch`` already trained on (a resumed fit skips that many).
        epoch_rows: rows of ``epoch`` trained on so far.
        sums: running sums of the step statistics of ``epoch`` (``loss``, ``mse``, ...).
        history: one record per finished epoch.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    epoch_rows: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-serialisable dict."""
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "epoch_rows": self.epoch_rows,
                "sums": dict(self.sums), "history": list(self.history)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FitState:
        """Inverse of :meth:`to_json`."""
        return cls(**{k: d[k] for k in ("step", "epoch", "batch", "epoch_rows", "sums", "history")})


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's ``state_dict`` split into tensors (``optim.<param index>.<name>``, for
    safetensors) and the JSON-serialisable rest (``param_groups`` and non-tensor state)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                           meta: dict[str, Any]) -> None:
    """Load into ``optimizer`` what :func:`optimizer_to_tensors` wrote (``tensors`` may hold other keys)."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class FitCheckpoint:
    """The checkpoints of one fit under ``rel`` of an output store.

    Args:
        store: the job's output store (local folder or object store).
        rel: folder of the checkpoints, e.g. ``"concept_model_checkpoints"``.
        every: save every this many training steps (>= 1).
        key: what the fit depends on (method, parameters, data); a checkpoint written under
            another key is ignored (never resumed into).

    Raises:
        ValueError: ``every < 1``.
    """

    POINTER = "latest.json"

    def __init__(self, store: OutputStore, rel: str, *, every: int = DEFAULT_EVERY, key: dict | None = None):
        if every < 1:
            raise ValueError(f"every: must be >= 1, got {every}")
        self.store, self.rel, self.every, self.key = store, rel, int(every), key or {}

    def _key_json(self) -> str:
        return json.dumps(self.key, sort_keys=True, default=str)

    def save(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Write one checkpoint (tensors on any device; ``meta`` JSON-serialisable, with ``step``)."""
        from safetensors.torch import save as save_bytes

        name = f"step-{int(meta['step']):012d}.safetensors"
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        self.store.write_bytes(posixpath.join(self.rel, name), save_bytes(flat))
        previous = self._pointer()
        self.store.write_json(posixpath.join(self.rel, self.POINTER),
                              {"file": name, "key": self._key_json(), "meta": meta})
        if previous and previous.get("file") not in (None, name):
            self.store.remove(posixpath.join(self.rel, previous["file"]))

    def _pointer(self) -> dict | None:
        rel = posixpath.join(self.rel, self.POINTER)
        return self.store.read_json(rel) if self.store.exists(rel) else None

    def load(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """``(tensors on the CPU, meta)`` of the last checkpoint of this key, or None."""
        from safetensors.torch import load as load_bytes

        pointer = self._pointer()
        if pointer is None:
            return None
        if pointer.get("key") != self._key_json():
            logger.warning("ignoring the checkpoint in %s: written by a fit with other settings", self.rel)
            return None
        with self.store.fs.open_input_stream(self.store.path(self.rel, pointer["file"])) as fh:
            return load_bytes(fh.read()), pointer["meta"]

    def clear(self) -> None:
        """Remove every checkpoint (after the finished model is saved)."""
        self.store.remove(self.rel)
