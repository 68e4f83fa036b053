"""Streaming helpers shared by the concept models: row checks, re-batching, reservoir
sampling, seeded subsets and the robust input statistics.

Every function works on activation rows ``(n_rows, d_model)`` (float32 after
:func:`as_rows`) and keeps memory bounded whatever the stream length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Reservoir",
    "as_rows",
    "chain",
    "is_reiterable",
    "progress_bar",
    "rebatch",
    "rebatch_min",
    "reservoir_sample",
    "robust_stats",
    "seeded",
    "seeded_subset",
    "take_head",
]


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global CPU RNG seeded, restoring the caller's RNG state after.

    overcomplete draws its initialisations from the global RNG; this keeps them
    reproducible without disturbing anybody else's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def as_rows(x: Any, d_model: int, what: str = "activations", *, cast: bool = True) -> Tensor:
    """``x`` as a float32 tensor ``(n_rows, d_model)`` (numpy arrays work; ``cast=False``: in its
    own dtype, checked only).

    Raises:
        ValueError: ``x`` is not 2-D with ``d_model`` columns (the message names ``what``).
    """
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != d_model:
        raise ValueError(f"{what} must have shape (n_rows, d_model={d_model}), got {tuple(x.shape)}")
    if cast and x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x


def seeded_subset(x: Tensor, n_rows: int, seed: int) -> Tensor:
    """The rows ``x[perm[:n_rows]]`` of ``x (n, d)`` for a permutation seeded by ``seed``
    (all of them, shuffled, when ``n <= n_rows``)."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm[:n_rows].to(x.device)]


def progress_bar(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    """``iterable`` wrapped in a tqdm progress bar over batches when ``enabled``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc=desc, unit="batch", leave=False)


def is_reiterable(batches: Iterable) -> bool:
    """True when ``iter(batches)`` gives a fresh pass (a list, a dataset), False for an iterator."""
    return not isinstance(batches, Iterator)


def chain(head: list[Tensor], rest: Iterator[Tensor]) -> Iterator[Tensor]:
    """The batches of ``head``, then those left in ``rest``."""
    yield from head
    yield from rest


class Reservoir:
    """Streaming uniform sample of at most ``max_rows`` rows (Algorithm R, vectorised per batch).

    ``add`` batches ``(batch, width)``; ``sample()`` returns the rows kept, float32
    ``(min(max_rows, n_seen), width)``. Same stream, batching and seed give the same sample.
    Memory ``O(max_rows * width)``. See :func:`reservoir_sample`.

    Raises:
        ValueError: ``max_rows < 1``.
    """

    def __init__(self, max_rows: int, *, seed: int = 0):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = int(max_rows)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.reservoir: Tensor | None = None
        self.n_seen = 0

    def add(self, batch: Tensor) -> None:
        """Offer a batch ``(batch, width)`` (float32, on any device: only the rows kept are
        copied to the CPU) to the reservoir."""
        b = batch.shape[0]
        if b == 0:
            return
        max_rows, n_seen = self.max_rows, self.n_seen
        if self.reservoir is None:
            self.reservoir = torch.empty(max_rows, batch.shape[1], dtype=torch.float32)
        reservoir = self.reservoir
        fill = min(max(max_rows - n_seen, 0), b)
        if fill:
            reservoir[n_seen:n_seen + fill] = batch[:fill].cpu()
        rest = batch[fill:]
        if rest.shape[0]:
            # row with 0-based stream index t replaces slot j ~ U{0..t} when j < max_rows
            t = torch.arange(n_seen + fill, n_seen + b, dtype=torch.float64)
            j = torch.floor(torch.rand(rest.shape[0], generator=self.gen, dtype=torch.float64) * (t + 1)).long()
            hit = torch.nonzero(j < max_rows).flatten()
            if hit.numel():
                slots = j[hit]
                # several rows of this batch may hit one slot: the last one wins (sequential semantics)
                rev_slots = slots.flip(0)
                uniq, inverse = torch.unique(rev_slots, return_inverse=True)
                first_in_rev = torch.full((uniq.numel(),), rev_slots.numel(), dtype=torch.long)
                first_in_rev.scatter_reduce_(0, inverse, torch.arange(rev_slots.numel()), reduce="amin")
                winners = hit.flip(0)[first_in_rev]
                reservoir[uniq] = rest[winners.to(rest.device)].cpu()  # only the kept rows leave the device
        self.n_seen += b

    def state_tensors(self) -> dict[str, Tensor]:
        """The reservoir's whole state as tensors (``rows``, ``n_seen``, ``rng``), for a checkpoint."""
        rows = self.reservoir if self.reservoir is not None else torch.empty(0, 0)
        return {"rows": rows, "n_seen": torch.tensor(self.n_seen, dtype=torch.int64), "rng": self.gen.get_state()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Become the reservoir :meth:`state_tensors` described."""
        rows = tensors["rows"]
        self.reservoir = rows.clone() if rows.numel() else None
        self.n_seen = int(tensors["n_seen"])
        self.gen.set_state(tensors["rng"])

    def sample(self) -> Tensor:
        """The rows kept so far (a copy)."""
        if self.reservoir is None:
            return torch.empty(0, 0, dtype=torch.float32)
        return self.reservoir[: min(self.max_rows, self.n_seen)].clone()


def reservoir_sample(
    batches: Iterable[Tensor], max_rows: int, d_model: int, *, seed: int = 0
) -> tuple[Tensor, int]:
    """Uniform sample of at most ``max_rows`` rows from a stream of batches (Algorithm R).

    Vectorised reservoir sampling (Vitter 1985, "Random sampling with a reservoir"): the
    result is a uniform sample without replacement of the rows seen (all of them when the
    stream has at most ``max_rows`` rows), reproducible for the same stream, batching and
    seed; memory is ``O(max_rows * d_model)`` whatever the stream length.

    Args:
        batches: iterable of tensors ``(batch, d_model)`` (any float dtype; numpy arrays work).
        max_rows: reservoir size, ``>= 1``.
        d_model: expected width of every batch.
        seed: seed of the sampling RNG (same stream + same seed -> same sample).

    Returns:
        ``(sample, n_seen)``: the sample, float32 ``(min(max_rows, n_seen), d_model)``, and
        the number of rows seen in the stream.

    Raises:
        ValueError: ``max_rows < 1`` or a batch that is not ``(batch, d_model)``.
    """
    res = Reservoir(max_rows, seed=seed)
    for batch in batches:
        res.add(as_rows(batch, d_model, "batch").detach().cpu())
    if res.n_seen == 0:
        return torch.empty(0, d_model, dtype=torch.float32), 0
    return res.sample(), res.n_seen


def robust_stats(x: Tensor, center: bool, outlier_factor: float) -> tuple[Tensor, Tensor]:
    """``(mean (d_model,), scale ())`` of rows ``x (n_rows, d_model)``, ignoring far outlier rows.

    Rows whose distance to the coordinate-wise median exceeds ``outlier_factor`` times the
    median distance are left out; ``mean`` is the mean of the remaining rows (zeros when
    ``center`` is False) and ``scale`` the root mean squared norm of ``x - mean`` over them,
    so a typical normalised row has norm about 1. Both float32, on the CPU.
    """
    x = x.to(torch.float64)
    med = x.median(dim=0).values
    dist = (x - med).norm(dim=1)
    ref = dist.median()
    keep = dist <= outlier_factor * ref if ref > 0 else torch.ones_like(dist, dtype=torch.bool)
    inliers = x[keep] if keep.any() else x
    mean = inliers.mean(dim=0) if center else torch.zeros(x.shape[1], dtype=torch.float64)
    scale = (inliers - mean).pow(2).sum(dim=1).mean().sqrt()
    if not torch.isfinite(scale) or scale <= 0:
        scale = torch.tensor(1.0, dtype=torch.float64)
    return mean.to(torch.float32), scale.to(torch.float32)


def rebatch(batches: Iterable, batch_size: int, d_model: int, device: str) -> Iterator[Tensor]:
    """Re-cut a stream of batches ``(batch, d_model)`` into float32 batches of exactly
    ``batch_size`` rows on ``device`` (the last one may be smaller). Batches are cast after
    the copy to ``device``: float16 batches cross to a GPU in half the bytes.

    Raises:
        ValueError: a batch that is not ``(batch, d_model)``.
    """
    pending: list[Tensor] = []
    n_pending = 0
    for batch in batches:
        batch = as_rows(batch, d_model, "batch", cast=False).detach().to(device).to(torch.float32)
        while batch.shape[0]:
            take = min(batch_size - n_pending, batch.shape[0])
            pending.append(batch[:take])
            n_pending += take
            batch = batch[take:]
            if n_pending == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, n_pending = [], 0
    if n_pending:
        yield torch.cat(pending)


def rebatch_min(batches: Iterable, size: int, d_model: int) -> Iterator[Tensor]:
    """Batches of exactly ``size`` rows on the CPU, except the last, which also takes the
    short remainder (``size <= rows < 2 * size``; fewer only when the whole stream is shorter),
    so every ``partial_fit`` sees at least ``size`` rows."""
    prev: Tensor | None = None
    for b in rebatch(batches, size, d_model, "cpu"):
        if prev is None:
            prev = b
        elif b.shape[0] < size:
            prev = torch.cat([prev, b])
        else:
            yield prev
            prev = b
    if prev is not None:
        yield prev


def take_head(stream: Iterator[Tensor], n_rows: int) -> list[Tensor]:
    """Batches pulled from ``stream`` until they hold at least ``n_rows`` rows (all of them
    when the stream is shorter); ``stream`` goes on after the last batch taken."""
    head: list[Tensor] = []
    n_head = 0
    for batch in stream:
        head.append(batch)
        n_head += batch.shape[0]
        if n_head >= n_rows:
            break
    return head
