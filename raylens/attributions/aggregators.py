"""Aggregators: the last of the three parts of an attribution method.

* A :class:`MaskAggregator` turns the scores of the masked rows of one input,
  ``(n_rows, n_targets)``, into element scores ``(n_targets, n_elements)`` (perturbation methods
  mask whole elements, so their scores are per element natively).
* A :class:`GradientAggregator` turns gradients into **token** scores. It is streaming: for each
  batch of rows it returns per-row terms that the engine sums over the rows of one
  ``(input, target)`` pair (so memory does not grow with the number of rows), then
  :meth:`GradientAggregator.finalize` turns the sums into token scores ``(n_tokens,)``. The
  explainer then sums token scores over each element's tokens (the granularity rule of every
  gradient method).

Notation: ``g`` is the gradient of the target score with respect to the input embeddings of a
perturbed row, ``x`` the unperturbed input embeddings, both ``(n_tokens, d_model)``; ``.`` sums over
the embedding axis.
"""

from __future__ import annotations

import numpy as np
import torch

from raylens.attributions.constraints import Bool, Float, check_values
from raylens.attributions.perturbations import EmbeddingContext

# ----------------------------------------------------------------------------- masks


class MaskAggregator:
    """Base class: :meth:`aggregate` maps ``(keep, scores, info)`` to ``(n_targets, n_elements)``."""

    def aggregate(self, keep: np.ndarray, scores: np.ndarray, info: dict) -> np.ndarray:
        """Element scores ``(n_targets, n_elements)`` from the perturbator's ``keep``
        ``(n_rows, n_elements)`` and ``info``, and the rows' target scores ``(n_rows, n_targets)``."""
        raise NotImplementedError

    def params(self) -> dict:
        """The parameters recorded in each output's ``params``."""
        return {}


class OcclusionAggregator(MaskAggregator):
    """``score[t, e] = f_t(x) - f_t(x with element e masked)`` (row 0 is ``x``)."""

    def aggregate(self, keep, scores, info):
        return (scores[0][None, :] - scores[1:]).T


class KernelShapAggregator(MaskAggregator):
    """Weighted least squares of ``f(z) ~ phi_0 + z . phi`` under the Shapley kernel, with
    ``phi_0 = f(all masked)`` and the efficiency constraint ``sum(phi) = f(x) - f(all masked)``
    imposed exactly (the last coefficient is eliminated; minimum-norm solution when the system is
    underdetermined)."""

    def aggregate(self, keep, scores, info):
        f_x, f_0 = scores[0], scores[1]
        delta = f_x - f_0  # (T,)
        m = keep.shape[1]
        if m == 1:
            return delta[:, None].copy()
        z = keep[2:].astype(np.float64)
        y = scores[2:] - f_0[None, :] - z[:, -1:] * delta[None, :]  # (n, T)
        a = z[:, :-1] - z[:, -1:]  # (n, M-1)
        sw = np.sqrt(np.asarray(info["weights"], dtype=np.float64))[:, None]
        phi, *_ = np.linalg.lstsq(a * sw, y * sw, rcond=None)  # (M-1, T)
        last = delta - phi.sum(0)
        return np.concatenate([phi, last[None, :]]).T


class LimeAggregator(MaskAggregator):
    """Weighted ridge regression of the scores on the keep indicators, with an unpenalised
    intercept: minimise ``sum_r w_r (f_r - b - z_r . phi)^2 + alpha ||phi||^2`` (LIME's surrogate,
    ``alpha=1`` like LIME's default ``Ridge``); the coefficients ``phi`` are the element scores."""

    param_constraints = {"alpha": Float(min=0)}

    def __init__(self, alpha: float = 1.0):
        check_values(self.param_constraints, {"alpha": alpha})
        self.alpha = float(alpha)

    def params(self) -> dict:
        return {"alpha": self.alpha}

    def aggregate(self, keep, scores, info):
        x = keep.astype(np.float64)
        w = np.asarray(info["weights"], dtype=np.float64)
        mean_w = w / w.sum()
        xc = x - mean_w @ x
        yc = scores - mean_w @ scores
        gram = xc.T @ (w[:, None] * xc) + self.alpha * np.eye(x.shape[1])
        coef = np.linalg.solve(gram, xc.T @ (w[:, None] * yc))  # (M, T)
        return coef.T


class SobolAggregator(MaskAggregator):
    """Total-order Sobol indices with Jansen's estimator:
    ``S_T,i = mean((f(A) - f(A_B^i))^2) / (2 Var f)``, ``Var f`` over the rows of ``A`` and ``B``.
    Unsigned (``>= 0``); 0 when the score does not vary."""

    def aggregate(self, keep, scores, info):
        n = int(info["n_samples"])
        m = keep.shape[1]
        fa, fb = scores[:n], scores[n: 2 * n]
        fab = scores[2 * n:].reshape(m, n, -1)  # (M, N, T)
        var = np.concatenate([fa, fb]).var(0)  # (T,)
        st = ((fa[None] - fab) ** 2).mean(1) / 2  # (M, T)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(var[None] > 0, st / var[None], 0.0)
        return out.T


# ----------------------------------------------------------------------------- gradients


class GradientAggregator:
    """Base class: :meth:`terms` gives per-row tensors (first axis = rows) that are summed over
    the rows of an (input, target) pair; :meth:`finalize` maps the sums to token scores."""

    param_constraints = {"input_x_gradient": Bool()}

    def __init__(self, input_x_gradient: bool = True):
        check_values(self.param_constraints, {"input_x_gradient": input_x_gradient})
        self.input_x_gradient = bool(input_x_gradient)

    def params(self) -> dict:
        """The parameters recorded in each output's ``params``."""
        return {"input_x_gradient": self.input_x_gradient}

    def terms(self, g: torch.Tensor, ctx: EmbeddingContext, info: dict, n_rows: int) -> dict[str, torch.Tensor]:
        """Per-row terms ``(len(g), n_tokens, ...)`` from the gradients ``g`` ``(rows, n_tokens,
        d_model)`` of one target for some rows of an input (``info``: the perturbator's tensors of
        those rows; ``n_rows``: the input's row count); they are summed over all rows."""
        raise NotImplementedError

    def finalize(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token scores ``(n_tokens,)`` from the terms summed over the rows."""
        raise NotImplementedError


class SaliencyAggregator(GradientAggregator):
    """``g . x`` (signed) or, with ``input_x_gradient=False``, ``||g||_2`` per token (unsigned)."""

    def terms(self, g, ctx, info, n_rows):
        if self.input_x_gradient:
            return {"a": (g * ctx.x).sum(-1)}
        return {"g": g}

    def finalize(self, sums):
        return sums["a"] if self.input_x_gradient else sums["g"].norm(dim=-1)


class IntegratedGradientsAggregator(GradientAggregator):
    """``(x - reference) . sum_k w_k g_k``: the quadrature of the path integral (always input x
    gradient: that is what makes completeness hold)."""

    def __init__(self):
        super().__init__(True)

    def params(self) -> dict:
        return {}

    def terms(self, g, ctx, info, n_rows):
        delta = (ctx.x - ctx.reference) * ctx.movable
        return {"a": info["weight"][:, None] * (g * delta).sum(-1).double()}

    def finalize(self, sums):
        return sums["a"]


class SmoothGradAggregator(GradientAggregator):
    """Mean over noisy rows: ``mean_k(g_k) . x`` or ``||mean_k g_k||_2``."""

    def terms(self, g, ctx, info, n_rows):
        if self.input_x_gradient:
            return {"a": (g * ctx.x).sum(-1) / n_rows}
        return {"g": g / n_rows}

    def finalize(self, sums):
        return sums["a"] if self.input_x_gradient else sums["g"].norm(dim=-1)


class SquareGradAggregator(GradientAggregator):
    """Mean of squares over noisy rows: ``mean_k (g_k . x)^2`` or ``mean_k ||g_k||^2`` (unsigned)."""

    def terms(self, g, ctx, info, n_rows):
        if self.input_x_gradient:
            return {"a2": (g * ctx.x).sum(-1).double() ** 2 / n_rows}
        return {"g2": (g.double() ** 2).sum(-1) / n_rows}

    def finalize(self, sums):
        return sums["a2"] if self.input_x_gradient else sums["g2"]


class VarGradAggregator(GradientAggregator):
    """Variance over noisy rows (population variance, ``1/n``): ``var_k (g_k . x)`` or
    ``sum_d var_k g_kd`` (unsigned)."""

    def terms(self, g, ctx, info, n_rows):
        if self.input_x_gradient:
            a = (g * ctx.x).sum(-1).double()
            return {"a": a / n_rows, "a2": a ** 2 / n_rows}
        g = g.double()
        return {"g": g / n_rows, "g2": (g ** 2).sum(-1) / n_rows}

    def finalize(self, sums):
        if self.input_x_gradient:
            return (sums["a2"] - sums["a"] ** 2).clamp_min(0)
        return (sums["g2"] - (sums["g"] ** 2).sum(-1)).clamp_min(0)


class GradientShapAggregator(GradientAggregator):
    """Expected gradients: ``mean_k g_k . (x - b_k)`` (always times ``x - b_k``)."""

    def __init__(self):
        super().__init__(True)

    def params(self) -> dict:
        return {}

    def terms(self, g, ctx, info, n_rows):
        return {"a": (g * info["delta"]).sum(-1).double() / n_rows}

    def finalize(self, sums):
        return sums["a"]
