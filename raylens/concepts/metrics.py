"""Reconstruction and sparsity metrics of concept models (pure torch).

Shapes: activations ``x`` and reconstructions ``x_hat`` are ``(n_rows, d_model)``; codes
``z`` are ``(n_rows, nb_concepts)``. Sums are accumulated in float64, so the streaming
:func:`reconstruction_metrics` equals the in-memory functions on the concatenated rows
(up to rounding) with memory bounded by one batch.

References: explained variance / fraction of variance unexplained and dead latents as
reported for TopK SAEs in Gao et al. 2024, "Scaling and evaluating sparse autoencoders";
the same reconstruction error is the objective of Semi-NMF (Ding, Li & Jordan 2010,
"Convex and Semi-Nonnegative Matrix Factorizations").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from raylens.concepts.models import ConceptModel

__all__ = [
    "explained_variance",
    "reconstruction_mse",
    "mean_l0",
    "dead_concepts",
    "reconstruction_metrics",
    "ReconstructionAccumulator",
]


def _pair(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must both be (n_rows, d_model), got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no rows")
    return x.detach().to(torch.float64), x_hat.detach().to(x.device, torch.float64)


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of the variance of ``x`` explained by ``x_hat``.

    ``1 - sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2`` with ``mean(x)`` the mean
    row ``(d_model,)``. Higher is better; range ``(-inf, 1]``: 1 is a perfect reconstruction,
    0 is as good as predicting the mean row, negative is worse than that.

    Args:
        x: activations ``(n_rows, d_model)``.
        x_hat: reconstructions ``(n_rows, d_model)``.

    Returns:
        the explained variance (float). ``nan`` when ``x`` has zero variance.

    Raises:
        ValueError: shapes differ, are not 2-D, or there are no rows.
    """
    x, x_hat = _pair(x, x_hat)
    sse = (x - x_hat).pow(2).sum()
    sst = (x - x.mean(dim=0)).pow(2).sum()
    if sst == 0:
        return float("nan")
    return float(1 - sse / sst)


def reconstruction_mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean squared reconstruction error over all ``n_rows * d_model`` entries.

    Lower is better; range ``[0, inf)``, in squared activation units.

    Args:
        x: activations ``(n_rows, d_model)``.
        x_hat: reconstructions ``(n_rows, d_model)``.

    Returns:
        ``mean((x - x_hat)^2)`` (float).

    Raises:
        ValueError: shapes differ, are not 2-D, or there are no rows.
    """
    x, x_hat = _pair(x, x_hat)
    return float((x - x_hat).pow(2).mean())


def _codes(z: Tensor) -> Tensor:
    if z.ndim != 2:
        raise ValueError(f"codes must be (n_rows, nb_concepts), got {tuple(z.shape)}")
    return z.detach()


def mean_l0(z: Tensor, *, eps: float = 0.0) -> float:
    """Mean number of active concepts per row (``|z| > eps``).

    Lower is sparser; range ``[0, nb_concepts]``. A TopK SAE has ``mean_l0 <= top_k``;
    Semi-NMF codes are rarely exactly zero, pass ``eps`` to count only non-negligible ones.

    Args:
        z: codes ``(n_rows, nb_concepts)``.
        eps: activity threshold (default 0: non-zero).

    Returns:
        the mean L0 norm of the rows (float).

    Raises:
        ValueError: ``z`` is not 2-D or has no rows.
    """
    z = _codes(z)
    if z.shape[0] == 0:
        raise ValueError("no rows")
    return float((z.abs() > eps).sum(dim=1).to(torch.float64).mean())


def dead_concepts(z: Tensor | Iterable[Tensor], *, eps: float = 0.0) -> float:
    """Fraction of concepts never active (``|z| > eps``) on any row.

    Lower is better; range ``[0, 1]``. Accepts one code tensor or a stream of them
    (memory: one ``(nb_concepts,)`` mask).

    Args:
        z: codes ``(n_rows, nb_concepts)``, or an iterable of ``(batch, nb_concepts)`` tensors.
        eps: activity threshold (default 0: non-zero).

    Returns:
        the dead fraction (float).

    Raises:
        ValueError: a tensor that is not 2-D, widths that differ, or no codes at all.
    """
    stream = [z] if isinstance(z, Tensor) else z
    alive: Tensor | None = None
    for batch in stream:
        batch = _codes(torch.as_tensor(batch))
        active = (batch.abs() > eps).any(dim=0).cpu()
        if alive is None:
            alive = active
        elif active.shape != alive.shape:
            raise ValueError(f"code widths differ: {alive.shape[0]} vs {active.shape[0]}")
        else:
            alive |= active
    if alive is None or alive.numel() == 0:
        raise ValueError("no codes")
    return float(1 - alive.to(torch.float64).mean())


class ReconstructionAccumulator:
    """Streaming accumulator behind :func:`reconstruction_metrics`.

    Keeps float64 sums only: row count, squared error, squared deviation from the running
    mean (Chan et al.'s parallel update, ``(d_model,)`` mean), L0 total and an "ever
    active" mask ``(nb_concepts,)``; memory does not grow with the number of rows.
    """

    def __init__(self) -> None:
        self.n_rows = 0
        self.d_model: int | None = None
        self.sse = 0.0
        self.m2 = 0.0
        self.mean: Tensor | None = None
        self.l0_total = 0.0
        self.alive: Tensor | None = None

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        """Add a batch: activations ``x (batch, d_model)``, reconstructions ``x_hat (batch, d_model)``,
        codes ``z (batch, nb_concepts)``.

        Raises:
            ValueError: inconsistent shapes.
        """
        x, x_hat = _pair(x, x_hat)
        z = _codes(z)
        if z.shape[0] != x.shape[0]:
            raise ValueError(f"codes have {z.shape[0]} rows, activations {x.shape[0]}")
        b = x.shape[0]
        self.sse += float((x - x_hat).pow(2).sum())
        mean_b = x.mean(dim=0).cpu()
        m2_b = float((x - x.mean(dim=0)).pow(2).sum())
        if self.mean is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            if mean_b.shape != self.mean.shape:
                raise ValueError(f"d_model differs between batches: {self.mean.shape[0]} vs {mean_b.shape[0]}")
            n = self.n_rows + b
            delta = mean_b - self.mean
            self.m2 += m2_b + float(delta.pow(2).sum()) * self.n_rows * b / n
            self.mean = self.mean + delta * (b / n)
        active = z != 0
        self.l0_total += float(active.sum())
        col = active.any(dim=0).cpu()
        self.alive = col if self.alive is None else (self.alive | col)
        self.n_rows += b
        self.d_model = x.shape[1]

    def result(self) -> dict[str, Any]:
        """``dict(mse, explained_variance, mean_l0, dead_fraction, n_rows)`` (see
        :func:`reconstruction_metrics`).

        Raises:
            ValueError: no rows were added.
        """
        if self.n_rows == 0:
            raise ValueError("no rows")
        return {
            "mse": self.sse / (self.n_rows * self.d_model),
            "explained_variance": (1 - self.sse / self.m2) if self.m2 > 0 else float("nan"),
            "mean_l0": self.l0_total / self.n_rows,
            "dead_fraction": float(1 - self.alive.to(torch.float64).mean()),
            "n_rows": self.n_rows,
        }


@torch.no_grad()
def reconstruction_metrics(model: "ConceptModel", batches: Iterable[Tensor]) -> dict[str, Any]:
    """Stream activation batches through ``model.encode``/``model.decode`` and summarise.

    Memory is bounded by one batch (sums are accumulated), so this runs over a corpus.

    Args:
        model: a fitted :class:`~raylens.concepts.models.ConceptModel`.
        batches: iterable of activations ``(batch, d_model)`` (a generator is fine).

    Returns:
        dict with
          * ``mse`` (lower is better, ``[0, inf)``): mean squared error per entry,
          * ``explained_variance`` (higher is better, ``(-inf, 1]``): over all rows, as
            :func:`explained_variance` on the concatenated stream,
          * ``mean_l0`` (``[0, nb_concepts]``): mean non-zero codes per row,
          * ``dead_fraction`` (lower is better, ``[0, 1]``): concepts never active,
          * ``n_rows``: rows seen.

    Raises:
        ValueError: empty stream or batches of the wrong shape.
        RuntimeError: model not fitted.
    """
    acc = ReconstructionAccumulator()
    for batch in batches:
        x = torch.as_tensor(batch)
        if x.ndim != 2:
            raise ValueError(f"batch must be (batch, d_model), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            continue
        x = x.to(torch.float32)
        z = model.encode(x)
        acc.update(x, model.decode(z), z)
    if acc.n_rows == 0:
        raise ValueError("reconstruction_metrics got an empty stream")
    return acc.result()
