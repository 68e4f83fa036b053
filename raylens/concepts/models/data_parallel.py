"""Data-parallel training of the SAE concept models over ``torch.distributed`` ranks.

Every rank runs the same streaming fit (:meth:`SAEConceptModel.fit_stream`: the same stream,
the same normalisation, the same seeded initialisation, the same checkpoints) and differs in one
place: its training step. Each training batch ``(batch_size, d_model)`` the one-process fit would
take is cut into ``world_size`` contiguous slices of equal size (sizes differ by at most one row
when the batch does not divide); rank ``r`` runs :func:`~raylens.concepts.models.sae.sae_train_step`
on slice ``r`` only, its gradients are scaled by ``rows_r / batch_rows`` and summed over the
ranks (one ``all_reduce`` per parameter tensor), then clipped and applied by every rank. The SAE
loss is a mean over the batch's rows (the reconstruction MSE and every family's penalty are row
means), so the summed gradient is the full batch's gradient and the fitted model equals the
one-process fit up to the order of float summation (``tests/test_distributed_fit.py`` measures
it). A batch with fewer rows than ranks is trained whole by every rank, each weighted
``1 / world_size``.

Why an explicit all-reduce rather than ``torch.nn.parallel.DistributedDataParallel``: the step
stays the one :func:`sae_train_step` every fit calls, unchanged (DDP averages gradients over the
ranks whatever their slice sizes, so a short last batch would need a loss scale inside the step;
penalties read the raw overcomplete module's attributes, e.g. JumpReLU's ``thresholds``, which a
DDP wrapper hides; the gathered observer and the saved state need the bare module). An SAE has a
handful of large parameter tensors (encoder, dictionary, biases), so one all-reduce per tensor
after the backward is few calls; what it gives up is DDP's overlap of the reduction with the
backward: ``bench/data_parallel.py`` measured DDP's step 4-12% faster on 2 loaded CPU cores
(gloo), within that machine's run-to-run noise.

Data: every rank reads the same stream and keeps its slice of each batch, rather than rank 0
reading and scattering: nothing but gradients crosses between ranks and no rank waits on another's
reads; the cost is N reads and decodes of the stream (on one host the page cache makes it one
disk read; ``bench/data_parallel.py``: each of 2 readers of the same store got 0.5-0.6x one
reader's rows/s on 2 CPU cores). Scattering would decode once but leaves rank 0 the only reader
all the same (the fit is then as fast as one reader either way) and sends ``(N - 1) / N`` of every
batch from it.

What rank 0 alone does: it writes the checkpoints (other ranks resume from the same files but
never write), it observes the last epoch (the observer's ``update`` gets the whole batch, gathered
from the slices, in row order, so training metrics equal the one-process fit's) and it is the
caller's place to save the model. The step statistics of ``history`` (loss, mse, explained
variance, L0) are those of the whole batch on every rank (one small all-reduce per step).

Methods whose step couples the rows of a batch (:data:`BATCH_COUPLED`: BatchTopK keeps the
``top_k * batch_rows`` largest codes of the whole batch and a running threshold) and methods not
fitted by gradient steps (PCA, NMF, ... : ``resumable`` is False) are not data-parallel:
:func:`data_parallel_ranks` says so, and why. Never imports ray: the Ray Train launch is in
``actors/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from raylens.concepts.models.base import ConceptModel
from raylens.concepts.models.checkpoint import FitCheckpoint
from raylens.concepts.models.sae import SAEConceptModel, sae_train_step

__all__ = ["BATCH_COUPLED", "DataParallelStep", "ReadOnlyCheckpoint", "data_parallel_ranks", "fit_stream_data_parallel",
           "slice_bounds"]

#: Methods whose training step couples the rows of a batch: a slice per rank is another step.
BATCH_COUPLED = frozenset({"batchtopk_sae"})


def data_parallel_ranks(cls: type[ConceptModel], gpus: float) -> tuple[int, str]:
    """How many data-parallel ranks fit a model of class ``cls`` given ``gpus`` trainer GPUs,
    and one line saying why (empty when there is nothing to say: ``gpus <= 1``).

    Returns ``(int(gpus), "...")`` when ``gpus`` is an integer > 1 and ``cls`` is an SAE family
    fitted by gradient steps whose step is row-separable; else ``(1, reason)``.
    """
    if gpus <= 1:
        return 1, ""
    unused = f"one process on one GPU fits it, {gpus - 1:g} of the {gpus:g} trainer GPUs stay unused"
    if not float(gpus).is_integer():
        return 1, f"resources.trainer_gpus={gpus:g} is not a whole number of GPUs: {unused}"
    if not (issubclass(cls, SAEConceptModel) and cls.resumable):
        return 1, f"{cls.method} is not fitted by gradient steps (no data-parallel fit): {unused}"
    if cls.method in BATCH_COUPLED:
        return 1, (f"{cls.method} couples the rows of a training batch (batch-wide top-k), so a slice per "
                   f"rank is not the same step: {unused}")
    return int(gpus), f"data-parallel fit of {cls.method} over {int(gpus)} ranks"


def slice_bounds(n_rows: int, world_size: int) -> list[int]:
    """Row bounds of ``world_size`` contiguous slices of ``n_rows`` rows (sizes differ by at most
    one; ``bounds[r]:bounds[r + 1]`` is rank ``r``'s slice), ``world_size + 1`` integers."""
    return [r * n_rows // world_size for r in range(world_size + 1)]


class ReadOnlyCheckpoint(FitCheckpoint):
    """The checkpoints of a fit as a rank other than 0 sees them: it resumes from them
    (:meth:`load`) and never writes or removes one (``save`` and ``clear`` do nothing)."""

    def __init__(self, checkpoint: FitCheckpoint):
        super().__init__(checkpoint.store, checkpoint.rel, every=checkpoint.every, key=checkpoint.key)

    def save(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Nothing: rank 0 writes the checkpoints."""

    def clear(self) -> None:
        """Nothing: rank 0 removes the checkpoints."""


class _Discard:
    """An observer that keeps nothing (ranks other than 0 gather their slices to rank 0)."""

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        pass


class _SummedGradientStep:
    """The optimizer as :func:`sae_train_step` drives it, with the ranks' gradients summed (each
    scaled by ``weight``, this rank's share of the batch) and clipped before the update."""

    def __init__(self, optimizer: torch.optim.Optimizer, weight: float, clip_grad: float | None):
        self.optimizer, self.weight, self.clip_grad = optimizer, weight, clip_grad
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for p in self.params:  # a parameter without a gradient has none on every rank (same model, same ops)
            if p.grad is not None:
                p.grad.mul_(self.weight)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()


class DataParallelStep:
    """This rank's training step of a data-parallel fit: called as ``model.train_step`` is
    (``step(optimizer, batch_norm, observe)``, ``batch_norm (batch_rows, d_model)`` the whole
    normalised batch), it trains on this rank's slice and returns the whole batch's statistics
    (``loss``, ``mse``, ``explained_variance``, ``l0``: as :func:`sae_train_step` returns them
    for the whole batch, summed in float64 over the ranks). ``torch.distributed`` must be
    initialised with ``world_size`` ranks.

    Args:
        model: the SAE concept model being fitted (its ``sae``, ``clip_grad``, ``penalty``).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of ranks (>= 2).
    """

    def __init__(self, model: SAEConceptModel, rank: int, world_size: int):
        self.model, self.rank, self.world_size = model, int(rank), int(world_size)
        self.synced = False

    def _sync_start(self) -> None:
        """Rank 0's SAE tensors on every rank (they are built the same way; this makes it exact)."""
        with torch.no_grad():
            for t in self.model.sae.state_dict().values():
                dist.broadcast(t, src=0)
        self.synced = True

    def _gather_observe(self, observe: Callable, bounds: list[int]) -> Callable:
        """``observe`` fed on rank 0 with the whole batch, gathered from the ranks' slices in order."""
        width = max(b - a for a, b in zip(bounds, bounds[1:]))

        def gathered(x: Tensor, z: Tensor, x_hat: Tensor) -> None:
            packed = torch.cat([x, z, x_hat], dim=1)
            padded = torch.zeros(width, packed.shape[1], dtype=packed.dtype, device=packed.device)
            padded[: packed.shape[0]] = packed
            parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(padded, parts, dst=0)
            if self.rank == 0:
                whole = torch.cat([p[: b - a] for p, a, b in zip(parts, bounds, bounds[1:])])
                d, c = x.shape[1], z.shape[1]
                observe(whole[:, :d], whole[:, d:d + c], whole[:, d + c:])

        return gathered

    def __call__(self, optimizer: torch.optim.Optimizer, batch_norm: Tensor,
                 observe: Callable[[Tensor, Tensor, Tensor], None] | None = None) -> dict[str, float]:
        if not self.synced:
            self._sync_start()
        n = batch_norm.shape[0]
        if n >= self.world_size:
            bounds = slice_bounds(n, self.world_size)
            part = batch_norm[bounds[self.rank]: bounds[self.rank + 1]]
            weight = part.shape[0] / n
            if observe is not None:
                observe = self._gather_observe(observe, bounds)
        else:  # fewer rows than ranks: every rank trains the whole batch, each counted 1 / world_size
            part, weight = batch_norm, 1.0 / self.world_size
            if observe is not None and self.rank != 0:
                observe = None
        model = self.model
        penalty = None if type(model).penalty is SAEConceptModel.penalty else model.penalty
        stats = sae_train_step(model.sae, _SummedGradientStep(optimizer, weight, model.clip_grad or None), part,
                               clip_grad=None, penalty=penalty, observe=observe)
        return self._whole_batch_stats(stats, part, weight, n)

    def _whole_batch_stats(self, stats: dict[str, float], part: Tensor, weight: float, n: int) -> dict[str, float]:
        """The whole batch's statistics from each rank's slice statistics (one all-reduce)."""
        rows, d = part.shape
        x = part.detach().to(torch.float64)
        sums = torch.cat([torch.tensor([stats["loss"] * rows, stats["mse"] * rows, stats["l0"] * rows,
                                        float(x.pow(2).sum())], dtype=torch.float64, device=x.device),
                          x.sum(dim=0)]) * (weight * n / rows)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        loss, mse, l0, sumsq = (float(v) / (n if i < 3 else 1) for i, v in enumerate(sums[:4].tolist()))
        sst = max(sumsq - float(sums[4:].pow(2).sum()) / n, 1e-12)
        return {"loss": loss, "mse": mse, "explained_variance": 1.0 - mse * n * d / sst, "l0": l0}


def fit_stream_data_parallel(model: SAEConceptModel, batches: Iterable[Tensor], *, rank: int, world_size: int,
                             checkpoint: FitCheckpoint | None = None, observer: Any = None,
                             progress: bool = False) -> SAEConceptModel:
    """:meth:`SAEConceptModel.fit_stream` on one rank of a data-parallel fit (see the module
    docstring); call it on every rank, with ``torch.distributed`` initialised, the same stream
    (the same batches ``(batch, d_model)`` in the same order on every rank), the same model
    parameters and seed, and the same kinds of arguments (a checkpoint on every rank or none, an
    observer on every rank or none). The model ends fitted on every rank; save rank 0's.

    Args:
        model: an unfitted SAE concept model, on this rank's device.
        batches: the activation stream (a re-iterable for several epochs, as ``fit_stream``).
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks; 1 is the plain ``fit_stream``.
        checkpoint: the fit's checkpoints: rank 0 writes them, every rank resumes from them.
        observer: fed the whole batches of the last epoch, on rank 0 only (other ranks' observer
            receives nothing).
        progress: a progress bar on rank 0.

    Returns:
        ``model``, fitted.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``, a model that is not data-parallel
            (:func:`data_parallel_ranks`), or as ``fit_stream``.
        RuntimeError: ``torch.distributed`` is not initialised with ``world_size`` ranks.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
    if world_size == 1:
        return model.fit_stream(batches, progress=progress, checkpoint=checkpoint, observer=observer)
    ranks, why = data_parallel_ranks(type(model), world_size)
    if ranks != world_size:
        raise ValueError(why)
    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise RuntimeError(f"torch.distributed must be initialised with world_size={world_size}")
    if rank != 0:
        checkpoint = ReadOnlyCheckpoint(checkpoint) if checkpoint is not None else None
        observer = _Discard() if observer is not None else None
    model.train_step = DataParallelStep(model, rank, world_size)  # this fit's step, for this instance only
    try:
        return model.fit_stream(batches, progress=progress and rank == 0, checkpoint=checkpoint, observer=observer)
    finally:
        del model.train_step
