"""Reconstruction and sparsity metrics of concept models (pure torch).

Shapes: activations ``x`` and reconstructions ``x_hat`` are ``(n_rows, d_model)``; codes
``z`` are ``(n_rows, nb_concepts)``. Sums are accumulated in float64, so the streaming
:func:`reconstruction_metrics` equals the in-memory functions on the concatenated rows
(up to rounding) with memory bounded by one batch.

FID-style Fréchet distance between activations and reconstructions: Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
(Fréchet/Wasserstein-2 distance of Gaussian fits, Dowson & Landau 1982). Stability across
seeds by optimal matching of dictionary atoms (Hungarian algorithm, Kuhn 1955), as used
to compare concept extraction methods by Fel et al. 2025, "Archetypal SAE".

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
    "frechet_distance",
    "sparsity_ratio",
    "match_concepts",
    "dictionary_stability",
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


def _gaussian_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().to(torch.float64)
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / max(x.shape[0] - 1, 1)


def _sqrtm_psd(s: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(x: Tensor, x_hat: Tensor) -> float:
    """Fréchet distance between Gaussian fits of activations and reconstructions (the FID
    formula applied to activation rows instead of Inception features).

    ``||mu_x - mu_r||^2 + Tr(S_x + S_r - 2 (S_x^{1/2} S_r S_x^{1/2})^{1/2})`` with means
    ``(d_model,)`` and covariances ``(d_model, d_model)`` of the rows, in float64 through
    symmetric eigendecompositions. Lower is better; range ``[0, inf)`` in squared activation
    units: 0 when the two fits coincide (e.g. ``x_hat == x``), growing with distortion (noise
    added to ``x_hat`` inflates its covariance). It compares distributions, not rows: a
    shuffled reconstruction scores the same. Needs more rows than ``d_model`` for a
    full-rank covariance (with fewer it is still defined, but noisier).

    Args:
        x: activations ``(n_rows, d_model)``, ``n_rows >= 2``.
        x_hat: reconstructions ``(m_rows, d_model)`` (need not pair with ``x``), ``m_rows >= 2``.

    Returns:
        the distance (float, clamped at 0 against rounding).

    Raises:
        ValueError: not 2-D, widths differ, or fewer than 2 rows.
    """
    if x.ndim != 2 or x_hat.ndim != 2 or x.shape[1] != x_hat.shape[1]:
        raise ValueError(f"x and x_hat must be (n_rows, d_model), got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if x.shape[0] < 2 or x_hat.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 rows on each side")
    mu1, s1 = _gaussian_fit(x)
    mu2, s2 = _gaussian_fit(x_hat.to(x.device))
    r1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross
    return float(d.clamp_min(0))


def sparsity_ratio(z: Tensor, *, eps: float = 0.0) -> float:
    """Mean fraction of concepts active per row: ``mean_l0(z) / nb_concepts``.

    Lower is sparser; range ``[0, 1]`` (1: every concept active on every row, as for PCA
    codes; ``top_k / nb_concepts`` for a TopK SAE; ``1 / nb_concepts`` for k-means).

    Args:
        z: codes ``(n_rows, nb_concepts)``.
        eps: activity threshold (default 0: non-zero).

    Returns:
        the ratio (float).

    Raises:
        ValueError: ``z`` is not 2-D, has no rows or no columns.
    """
    z = _codes(z)
    if z.shape[1] == 0:
        raise ValueError("codes have no concepts")
    return mean_l0(z, eps=eps) / z.shape[1]


def _as_dictionary(d: "Tensor | ConceptModel") -> Tensor:
    if not isinstance(d, Tensor):
        d = d.dictionary
    if d.ndim != 2:
        raise ValueError(f"a dictionary must be (nb_concepts, d_model), got {tuple(d.shape)}")
    return d.detach().to(torch.float64).cpu()


def match_concepts(a: "Tensor | ConceptModel", b: "Tensor | ConceptModel") -> tuple[Tensor, Tensor, Tensor]:
    """Optimal one-to-one matching of the concepts of two dictionaries.

    Maximises the summed absolute cosine similarity of matched atoms (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``); absolute, since a concept direction and its
    negation are the same concept for signed methods (PCA, ICA). Rectangular inputs match
    ``min(k_a, k_b)`` pairs. Zero atoms have cosine 0 with everything.

    Args:
        a: dictionary ``(k_a, d_model)`` or a fitted concept model.
        b: dictionary ``(k_b, d_model)`` or a fitted concept model.

    Returns:
        ``(rows, cols, sims)``: int64 indices into ``a`` and ``b`` and the matched absolute
        cosines (float64, each in ``[0, 1]``), sorted by ``rows``.

    Raises:
        ValueError: not 2-D or different ``d_model``.
    """
    from scipy.optimize import linear_sum_assignment

    da, db = _as_dictionary(a), _as_dictionary(b)
    if da.shape[1] != db.shape[1]:
        raise ValueError(f"dictionaries have different widths: {da.shape[1]} vs {db.shape[1]}")
    na = da / da.norm(dim=1, keepdim=True).clamp_min(1e-12)
    nb = db / db.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (na @ nb.T).abs().clamp(0, 1)
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    return rows, cols, sim[rows, cols]


def dictionary_stability(a: "Tensor | ConceptModel", b: "Tensor | ConceptModel") -> float:
    """Stability of a concept method: mean absolute cosine of optimally matched atoms of two
    dictionaries, typically the same method fitted with two seeds (or on two data halves).

    Higher is more stable; range ``[0, 1]``: 1 when one dictionary is a permutation (and
    sign flip / rescaling) of the other, near ``sqrt(2 / (pi * d_model))``-ish small values
    for unrelated random directions. Invariant to permuting the concepts of either side.

    Args:
        a: dictionary ``(k_a, d_model)`` or a fitted concept model.
        b: dictionary ``(k_b, d_model)`` or a fitted concept model.

    Returns:
        the mean matched absolute cosine (float).

    Raises:
        ValueError: see :func:`match_concepts`.
    """
    _, _, sims = match_concepts(a, b)
    return float(sims.mean())


class ReconstructionAccumulator:
    """Streaming accumulator behind :func:`reconstruction_metrics`.

    Keeps float64 sums: row count, squared error, squared deviation from the running
    mean (Chan et al.'s parallel update, ``(d_model,)`` mean), L0 total and an "ever
    active" mask ``(nb_concepts,)``, plus a seeded uniform reservoir of at most
    ``fid_rows`` ``(x, x_hat)`` row pairs for the Fréchet distance; memory does not grow
    with the number of rows.

    Args:
        fid_rows: reservoir size for the Fréchet distance (0 disables it).
        seed: seed of the reservoir.
    """

    def __init__(self, fid_rows: int = 4096, seed: int = 0) -> None:
        self.fid_rows = int(fid_rows)
        self._reservoir = None
        if self.fid_rows > 0:
            from raylens.concepts.models import Reservoir

            self._reservoir = Reservoir(self.fid_rows, seed=seed)
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
        if self._reservoir is not None:
            self._reservoir.add(torch.cat([x, x_hat], dim=1).to(torch.float32))
        self.n_rows += b
        self.d_model = x.shape[1]

    def state_tensors(self) -> dict[str, Tensor]:
        """The accumulated state as tensors (sums in float64, the running mean ``(d_model,)``, the
        ever-active mask ``(nb_concepts,)``, the reservoir), for a fit checkpoint."""
        out = {"sums": torch.tensor([self.n_rows, self.d_model or 0, self.sse, self.m2, self.l0_total],
                                    dtype=torch.float64),
               "mean": self.mean if self.mean is not None else torch.empty(0),
               "alive": self.alive if self.alive is not None else torch.empty(0, dtype=torch.bool)}
        if self._reservoir is not None:
            out.update({f"reservoir.{k}": v for k, v in self._reservoir.state_tensors().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Become the accumulator :meth:`state_tensors` described."""
        n_rows, d_model, self.sse, self.m2, self.l0_total = tensors["sums"].tolist()
        self.n_rows, self.d_model = int(n_rows), (int(d_model) or None)
        self.mean = tensors["mean"].clone() if tensors["mean"].numel() else None
        self.alive = tensors["alive"].clone() if tensors["alive"].numel() else None
        if self._reservoir is not None:
            self._reservoir.load_state_tensors({k[len("reservoir."):]: v for k, v in tensors.items()
                                                if k.startswith("reservoir.")})

    def result(self) -> dict[str, Any]:
        """``dict(mse, explained_variance, mean_l0, sparsity_ratio, dead_fraction, fid,
        fid_rows, n_rows)`` (see :func:`reconstruction_metrics`).

        Raises:
            ValueError: no rows were added.
        """
        if self.n_rows == 0:
            raise ValueError("no rows")
        fid, fid_n = float("nan"), 0
        if self._reservoir is not None:
            pairs = self._reservoir.sample()
            fid_n = int(pairs.shape[0])
            if fid_n >= 2:
                fid = frechet_distance(pairs[:, : self.d_model], pairs[:, self.d_model:])
        return {
            "mse": self.sse / (self.n_rows * self.d_model),
            "explained_variance": (1 - self.sse / self.m2) if self.m2 > 0 else float("nan"),
            "mean_l0": self.l0_total / self.n_rows,
            "sparsity_ratio": self.l0_total / self.n_rows / self.alive.numel(),
            "dead_fraction": float(1 - self.alive.to(torch.float64).mean()),
            "fid": fid,
            "fid_rows": fid_n,
            "n_rows": self.n_rows,
        }


@torch.no_grad()
def reconstruction_metrics(model: "ConceptModel", batches: Iterable[Tensor], *, fid_rows: int = 4096,
                           seed: int = 0) -> dict[str, Any]:
    """Stream activation batches through ``model.encode``/``model.decode`` and summarise.

    Memory is bounded by one batch plus the Fréchet-distance reservoir (sums are
    accumulated), so this runs over a corpus.

    Args:
        model: a fitted :class:`~raylens.concepts.models.ConceptModel`.
        batches: iterable of activations ``(batch, d_model)`` (a generator is fine).
        fid_rows: size of the seeded uniform sample of rows the Fréchet distance is computed
            on (0: skip it, ``fid`` is nan).
        seed: seed of that sample.

    Returns:
        dict with
          * ``mse`` (lower is better, ``[0, inf)``): mean squared error per entry,
          * ``explained_variance`` (higher is better, ``(-inf, 1]``): over all rows, as
            :func:`explained_variance` on the concatenated stream,
          * ``mean_l0`` (``[0, nb_concepts]``): mean non-zero codes per row,
          * ``sparsity_ratio`` (lower is sparser, ``[0, 1]``): ``mean_l0 / nb_concepts``,
          * ``dead_fraction`` (lower is better, ``[0, 1]``): concepts never active,
          * ``fid`` (lower is better, ``[0, inf)``): :func:`frechet_distance` between the
            activations and reconstructions of a uniform sample of ``fid_rows`` rows
            (``fid_rows``: its actual size),
          * ``n_rows``: rows seen.

    Raises:
        ValueError: empty stream or batches of the wrong shape.
        RuntimeError: model not fitted.
    """
    acc = ReconstructionAccumulator(fid_rows=fid_rows, seed=seed)
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
