"""Code solvers shared by the dictionary methods: non-negative (optionally L1-penalised)
least squares and least squares on the probability simplex, both by FISTA.

Each solves one problem per row of ``a (n_rows, d)`` for a fixed dictionary
``D (nb_concepts, d)``, for exactly ``iters`` iterations from a fixed start, so codes are
deterministic and do not depend on which rows share a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["lipschitz", "nonneg_fista", "project_simplex", "simplex_fista"]


def lipschitz(D: Tensor) -> Tensor:
    """Largest eigenvalue of ``D D^T`` for ``D (nb_concepts, d)`` (float64 eigen-solve, float32
    scalar, at least 1e-12): the Lipschitz constant of the least-squares code gradient."""
    return torch.linalg.eigvalsh((D @ D.T).to(torch.float64)).max().clamp_min(1e-12).to(torch.float32)


def _fista(a: Tensor, D: Tensor, iters: int, lip: Tensor | None, start: Callable[[Tensor], Tensor],
           prox: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """FISTA (Beck & Teboulle 2009) on ``0.5 ||a - z D||^2`` per row of ``a (n_rows, d)``:
    ``z = start(p)`` with ``p = a D^T (n_rows, nb_concepts)``, then exactly ``iters`` steps
    ``z = prox(y - grad(y) / L, 1 / L)`` with momentum, ``L = lip`` (computed when None)."""
    with torch.no_grad():
        q = D @ D.T
        p = a @ D.T
        if lip is None:
            lip = lipschitz(D).to(a.dtype)
        inv_lip = 1.0 / lip
        z = start(p)
        y = z
        t = 1.0
        for _ in range(iters):
            z_next = prox(y - (y @ q - p) * inv_lip, inv_lip)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = z_next + ((t - 1.0) / t_next) * (z_next - z)
            z, t = z_next, t_next
    return z


def nonneg_fista(a: Tensor, D: Tensor, iters: int, *, l1: float = 0.0, lip: Tensor | None = None) -> Tensor:
    """Codes ``z (n_rows, nb_concepts)`` solving ``min_{z >= 0} 0.5 ||a - z D||^2 + l1 * sum(z)``
    for rows ``a (n_rows, d)`` and a dictionary ``D (nb_concepts, d)``: accelerated projected
    gradient (FISTA, Beck & Teboulle 2009) from ``z = 0`` with step ``1 / lambda_max(D D^T)``
    (``lip``, computed when None), exactly ``iters`` iterations. Rows are independent, so codes
    do not depend on batching."""

    def prox(g: Tensor, inv_lip: Tensor) -> Tensor:
        return (g - l1 * inv_lip).clamp_min_(0) if l1 else g.clamp_min_(0)

    return _fista(a, D, iters, lip, torch.zeros_like, prox)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v (n_rows, k)`` on the probability simplex
    (Duchi et al. 2008, "Efficient projections onto the l1-ball")."""
    k = v.shape[1]
    u, _ = torch.sort(v, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1.0
    ind = torch.arange(1, k + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0
    rho = (cond * torch.arange(k, device=v.device)).argmax(dim=1, keepdim=True)  # last True
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def simplex_fista(a: Tensor, D: Tensor, iters: int, lip: Tensor | None = None,
                  z0: Tensor | None = None) -> Tensor:
    """Codes on the simplex ``min_{z in simplex} 0.5 ||a - z D||^2`` for rows ``a (n_rows, d)``,
    ``D (nb_concepts, d)``, by FISTA from ``z0`` (default the uniform point), exactly ``iters``
    iterations; rows independent. Returns ``(n_rows, nb_concepts)``."""

    def start(p: Tensor) -> Tensor:
        return torch.full_like(p, 1.0 / D.shape[0]) if z0 is None else z0.clone()

    return _fista(a, D, iters, lip, start, lambda g, inv_lip: project_simplex(g))
