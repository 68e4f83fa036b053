"""Perturbators: the first of the three parts of an attribution method.

A perturbator turns one input into the rows the model is run on.

* :class:`MaskPerturbator` (perturbation methods) works in **token-id space**: it returns a
  boolean *keep* matrix ``(n_rows, n_elements)``. An element that is not kept has **every token
  it covers replaced by the replacement token** (the tokenizer's mask token, else its pad token,
  or ``replace_token_id``); the sequence keeps its length, positions and attention mask, and
  special tokens are never replaced. Nothing is dropped.
* :class:`EmbeddingPerturbator` (gradient methods) works in **embedding space**: it returns
  ``(n_rows, n_tokens, d_model)`` input embeddings (the output of the model's input embedding
  layer). Only the element tokens are moved; special tokens and, for causal LMs, the target
  prefix keep their embeddings.

Stochastic perturbators draw from generators seeded by ``(seed, input key, row)``, so the same
seed gives the same rows whatever the batch size or the other inputs of the call.

A perturbator with parameters declares the values they accept in ``param_constraints``
(:mod:`raylens.attributions.constraints`) and checks them when built.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from raylens.attributions.constraints import Float, Int, OneOf, check_values

# ----------------------------------------------------------------------------- token-id space


class MaskPerturbator:
    """Base class of token-id perturbators: :meth:`masks` returns ``(keep, info)``.

    ``keep[r, e]`` is True when element ``e`` is left as is in row ``r``; ``info`` holds arrays
    the matching aggregator needs (kernel weights, design sizes...).
    """

    #: whether ``keep[0]`` is the unperturbed input (its scores are then the target scores).
    first_row_is_clean: bool = False

    def masks(self, n_elements: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """``(keep, info)``: ``keep`` ``(n_rows, n_elements)`` bool (True = element left as is) and
        what the aggregator needs; ``rng`` is seeded per input (draw every random number from it)."""
        raise NotImplementedError

    def params(self) -> dict:
        """The parameters recorded in each output's ``params``."""
        return {}


class OcclusionPerturbator(MaskPerturbator):
    """Row 0 unperturbed, then row ``1 + e`` with element ``e`` alone masked (``n_elements + 1`` rows)."""

    first_row_is_clean = True

    def masks(self, n_elements: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        keep = np.ones((n_elements + 1, n_elements), dtype=bool)
        keep[1:] = ~np.eye(n_elements, dtype=bool)
        return keep, {}


class KernelShapPerturbator(MaskPerturbator):
    """Coalitions for Kernel SHAP (Lundberg & Lee, 2017).

    Row 0 is the full input, row 1 the fully masked one (they fix the efficiency constraint), then
    the coalitions ``z`` (1 = element kept) with their Shapley-kernel weights:

    * when all ``2^M - 2`` non-trivial coalitions fit in ``n_samples`` they are **enumerated**,
      each weighted by the Shapley kernel ``(M - 1) / (C(M, |z|) |z| (M - |z|))``: the result is
      then the exact Shapley value of the masking game;
    * otherwise ``n_samples`` coalitions are **sampled** from the kernel itself (a size ``s`` with
      probability proportional to ``(M - 1) / (s (M - s))``, then a uniform subset of that size),
      in antithetic pairs ``(z, 1 - z)``, each with weight 1.

    Rows: ``n_samples + 2`` (or ``2^M`` when enumerated).
    """

    first_row_is_clean = True
    param_constraints = {"n_samples": Int(min=1)}

    def __init__(self, n_samples: int = 100):
        check_values(self.param_constraints, {"n_samples": n_samples})
        self.n_samples = int(n_samples)

    def params(self) -> dict:
        return {"n_samples": self.n_samples}

    def masks(self, n_elements: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        m = n_elements
        ends = np.stack([np.ones(m, dtype=bool), np.zeros(m, dtype=bool)])
        if m <= 1:
            return ends, {"weights": np.zeros(0), "exact": True}
        if m < 31 and 2 ** m - 2 <= self.n_samples:
            codes = np.arange(1, 2 ** m - 1, dtype=np.int64)
            z = ((codes[:, None] >> np.arange(m)) & 1).astype(bool)
            s = z.sum(1)
            w = (m - 1) / (np.array([math.comb(m, int(k)) for k in s], dtype=np.float64) * s * (m - s))
            return np.concatenate([ends, z]), {"weights": w, "exact": True}
        sizes = np.arange(1, m)
        p = (m - 1) / (sizes * (m - sizes))
        p = p / p.sum()
        n_pairs = (self.n_samples + 1) // 2
        drawn = rng.choice(sizes, size=n_pairs, p=p)
        z = np.zeros((n_pairs, m), dtype=bool)
        for r, size in enumerate(drawn):
            z[r, rng.choice(m, size=int(size), replace=False)] = True
        z = np.stack([z, ~z], axis=1).reshape(-1, m)[: self.n_samples]
        return np.concatenate([ends, z]), {"weights": np.ones(len(z)), "exact": False}


class LimePerturbator(MaskPerturbator):
    """Random masks for LIME (Ribeiro et al., 2016).

    Row 0 is the full input; each of the other ``n_samples - 1`` rows masks ``k`` elements, ``k``
    uniform in ``1..M``, chosen uniformly (LIME's text sampler). Each row gets the exponential
    kernel weight ``exp(-d^2 / kernel_width^2)`` of its distance ``d`` to the full input: cosine
    distance ``1 - sqrt(n_kept / M)`` (default) or Hamming distance ``n_masked / M``.
    """

    first_row_is_clean = True
    param_constraints = {"n_samples": Int(min=2), "distance": OneOf(("cosine", "hamming")),
                         "kernel_width": Float(min=0, strict=True)}

    def __init__(self, n_samples: int = 100, distance: str = "cosine", kernel_width: float = 0.25):
        check_values(self.param_constraints, {"n_samples": n_samples, "distance": distance, "kernel_width": kernel_width})
        self.n_samples, self.distance, self.kernel_width = int(n_samples), distance, float(kernel_width)

    def params(self) -> dict:
        return {"n_samples": self.n_samples, "distance": self.distance, "kernel_width": self.kernel_width}

    def masks(self, n_elements: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        m = n_elements
        keep = np.ones((self.n_samples, m), dtype=bool)
        n_off = rng.integers(1, m + 1, size=self.n_samples - 1)
        for r, k in enumerate(n_off, start=1):
            keep[r, rng.choice(m, size=int(k), replace=False)] = False
        kept = keep.sum(1) / m
        d = 1.0 - np.sqrt(kept) if self.distance == "cosine" else 1.0 - kept
        return keep, {"weights": np.exp(-(d ** 2) / self.kernel_width ** 2)}


class SobolPerturbator(MaskPerturbator):
    """Quasi-Monte Carlo design for Sobol total-order indices (Fel et al., 2021).

    Each element is kept or masked with probability 1/2. A scrambled Sobol sequence of dimension
    ``2M`` (``scipy.stats.qmc.Sobol``) gives two ``n_samples x M`` matrices ``A`` and ``B`` (an
    element is kept where the coordinate is >= 1/2); the rows are ``A``, ``B`` and, for each
    element ``i``, ``A`` with column ``i`` taken from ``B`` (Saltelli's design):
    ``n_samples * (M + 2)`` rows.
    """

    param_constraints = {"n_samples": Int(min=2)}

    def __init__(self, n_samples: int = 32):
        check_values(self.param_constraints, {"n_samples": n_samples})
        self.n_samples = int(n_samples)

    def params(self) -> dict:
        return {"n_samples": self.n_samples}

    def masks(self, n_elements: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        from scipy.stats import qmc

        m, n = n_elements, self.n_samples
        # scipy >= 1.15 names the generator ``rng`` (``seed`` is deprecated there)
        key = "rng" if "rng" in inspect.signature(qmc.Sobol.__init__).parameters else "seed"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # balance properties need a power of 2 of points
            u = qmc.Sobol(d=2 * m, scramble=True, **{key: rng}).random(n)
        a, b = u[:, :m] >= 0.5, u[:, m:] >= 0.5
        mixed = np.repeat(a[None], m, axis=0)  # (M, N, M)
        idx = np.arange(m)
        mixed[idx, :, idx] = b.T
        return np.concatenate([a, b, mixed.reshape(m * n, m)]), {"n_samples": n}


# ----------------------------------------------------------------------------- embedding space


@dataclasses.dataclass
class EmbeddingContext:
    """What an embedding perturbator and a gradient aggregator know about one input.

    Attributes:
        x: ``(n_tokens, d_model)`` float32: the input embeddings of the (unperturbed) input tokens.
        reference: ``(n_tokens, d_model)`` float32: the reference embeddings (IG's baseline: zero, or
            the replacement token's embedding).
        movable: ``(n_tokens, 1)`` float32: 1 for tokens of an element (perturbed), 0 otherwise.
        generator: ``generator(row)`` returns a CPU ``torch.Generator`` seeded for that row.
    """

    x: torch.Tensor
    reference: torch.Tensor
    movable: torch.Tensor
    generator: Callable[[int], torch.Generator]

    def noise(self, g: torch.Generator, std: float) -> torch.Tensor:
        """Gaussian noise drawn from ``g``, ``(n_tokens, d_model)``: per coordinate standard
        deviation ``std * ||x_t|| / sqrt(d_model)`` (so ``||noise_t|| ~= std * ||x_t||``), zero on
        tokens that are not moved."""
        eps = torch.randn(self.x.shape, generator=g, dtype=torch.float32).to(self.x.device)
        scale = self.x.norm(dim=-1, keepdim=True) / math.sqrt(self.x.shape[-1])
        return eps * scale * std * self.movable


class EmbeddingPerturbator:
    """Base class of embedding-space perturbators: ``n_rows`` rows per input (and per target).

    :meth:`rows` returns the perturbed input embeddings ``(len(rows), n_tokens, d_model)`` float32
    and per-row tensors for the aggregator.
    """

    #: the row that is the unperturbed input (its scores are the target scores), or None.
    clean_row: int | None = None
    n_rows: int = 1

    def rows(self, ctx: EmbeddingContext, rows: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The perturbed input embeddings ``(len(rows), n_tokens, d_model)`` float32 of the given
        row indices (in ``0..n_rows-1``) and per-row tensors (first axis ``len(rows)``) for the
        aggregator; random rows draw from ``ctx.generator(row)``."""
        raise NotImplementedError

    def params(self) -> dict:
        """The parameters recorded in each output's ``params``."""
        return {}


class IdentityPerturbator(EmbeddingPerturbator):
    """One row: the input itself (Saliency)."""

    clean_row = 0
    n_rows = 1

    def rows(self, ctx, rows):
        return ctx.x.expand(len(rows), *ctx.x.shape), {}


INTEGRATION_RULES = ("midpoint", "trapezoid", "gauss_legendre")


def check_integration(n_steps: int, rule: str) -> None:
    """Check a quadrature: ``rule`` one of :data:`INTEGRATION_RULES`, ``n_steps`` an int >= 1
    (>= 2 for ``"trapezoid"``).

    Raises:
        ValueError: naming ``integration`` or ``n_steps``.
    """
    check_values({"integration": OneOf(INTEGRATION_RULES), "n_steps": Int(min=1)},
                 {"integration": rule, "n_steps": n_steps})
    if rule == "trapezoid" and n_steps < 2:
        raise ValueError(f"n_steps must be >= 2 with integration='trapezoid', got {n_steps}")


def integration_points(n_steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, weights)`` of a quadrature rule for an integral over ``[0, 1]``; weights sum to 1.

    ``midpoint``: ``alpha_k = (k + 1/2) / n``, weights ``1/n``; ``trapezoid``: ``alpha_k = k / (n - 1)``,
    weights ``1/(n - 1)`` halved at both ends (needs ``n >= 2``); ``gauss_legendre``: Gauss-Legendre
    nodes mapped to ``[0, 1]`` (exact for polynomials of degree ``2n - 1``).
    """
    check_integration(n_steps, rule)
    if rule == "midpoint":
        return (np.arange(n_steps) + 0.5) / n_steps, np.full(n_steps, 1.0 / n_steps)
    if rule == "trapezoid":
        w = np.full(n_steps, 1.0 / (n_steps - 1))
        w[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n_steps), w
    nodes, w = np.polynomial.legendre.leggauss(n_steps)
    return (nodes + 1) / 2, w / 2


class InterpolationPerturbator(EmbeddingPerturbator):
    """Points on the straight path from the reference to the input (Integrated Gradients):
    ``reference + alpha_k (x - reference)`` on element tokens, with quadrature weights."""

    param_constraints = {"n_steps": Int(min=1), "integration": OneOf(INTEGRATION_RULES)}

    def __init__(self, n_steps: int = 50, integration: str = "gauss_legendre"):
        check_integration(n_steps, integration)
        self.alphas, self.weights = integration_points(int(n_steps), integration)
        self.n_steps, self.integration = int(n_steps), integration
        self.n_rows = self.n_steps
        self.clean_row = self.n_steps - 1 if integration == "trapezoid" else None

    def params(self) -> dict:
        return {"n_steps": self.n_steps, "integration": self.integration}

    def rows(self, ctx, rows):
        a = torch.as_tensor(self.alphas[list(rows)], dtype=torch.float32, device=ctx.x.device)[:, None, None]
        w = torch.as_tensor(self.weights[list(rows)], dtype=torch.float64, device=ctx.x.device)
        path = ctx.reference + a * (ctx.x - ctx.reference)
        emb = ctx.movable * path + (1 - ctx.movable) * ctx.x
        return emb, {"weight": w}


class NoisePerturbator(EmbeddingPerturbator):
    """``n_samples`` noisy copies of the input, ``x + eps`` on element tokens, ``eps`` as in
    :meth:`EmbeddingContext.noise` (SmoothGrad, SquareGrad, VarGrad)."""

    param_constraints = {"n_samples": Int(min=1), "noise_std": Float(min=0)}

    def __init__(self, n_samples: int = 20, noise_std: float = 0.1):
        check_values(self.param_constraints, {"n_samples": n_samples, "noise_std": noise_std})
        self.n_samples, self.noise_std = int(n_samples), float(noise_std)
        self.n_rows = self.n_samples

    def params(self) -> dict:
        return {"n_samples": self.n_samples, "noise_std": self.noise_std}

    def rows(self, ctx, rows):
        return torch.stack([ctx.x + ctx.noise(ctx.generator(r), self.noise_std) for r in rows]), {}


class RandomBaselinePerturbator(NoisePerturbator):
    """GradientSHAP's samples: for row ``k`` a random baseline ``b_k = reference + eps_k``
    (``eps_k`` as in :meth:`EmbeddingContext.noise`) and a random ``alpha_k ~ U(0, 1)``; the row is
    ``b_k + alpha_k (x - b_k)`` on element tokens, and the aggregator gets ``delta_k = x - b_k``.
    Parameters as :class:`NoisePerturbator` (the noise is around the reference)."""

    def rows(self, ctx, rows):
        embs, deltas = [], []
        for r in rows:
            g = ctx.generator(r)
            base = ctx.reference + ctx.noise(g, self.noise_std)
            alpha = float(torch.rand((), generator=g))
            delta = (ctx.x - base) * ctx.movable
            embs.append(ctx.movable * (base + alpha * delta) + (1 - ctx.movable) * ctx.x)
            deltas.append(delta)
        return torch.stack(embs), {"delta": torch.stack(deltas)}
