"""The NMF family: NMF (scikit-learn, streams), semi-NMF and convex NMF (overcomplete).

Every member encodes new rows by a deterministic, row-independent non-negative least
squares solve (:func:`raylens.concepts.models.solvers.nonneg_fista`), whatever solver fitted it.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import Tensor

from raylens._compat import import_overcomplete
from raylens.concepts.models.base import register_concept_model
from raylens.concepts.models.dictionary import DictionaryConceptModel, PartialFitConceptModel, to_numpy
from raylens.concepts.models.params import Param, positive_int
from raylens.concepts.models.solvers import nonneg_fista
from raylens.concepts.models.streaming import as_rows, robust_stats, seeded

__all__ = ["ConvexNMFConceptModel", "NMFConceptModel", "SemiNMFConceptModel"]

logger = logging.getLogger(__name__)



@register_concept_model
class SemiNMFConceptModel(DictionaryConceptModel):
    """Semi-NMF (Ding, Li & Jordan 2010, "Convex and Semi-Nonnegative Matrix
    Factorizations", IEEE TPAMI 32(1)), wrapping ``overcomplete.optimization.SemiNMF``.

    ``x / scale ~= z @ D`` with codes ``z >= 0`` ``(n_rows, nb_concepts)`` and an unconstrained
    dictionary ``D (nb_concepts, d_model)`` (by default no centring: ``center=False``, the
    classic formulation in which the mean is carried by the concepts).

    Not streaming: :meth:`fit` uses at most ``max_fit_rows`` rows (a seeded random subset
    when given more) and :meth:`fit_stream` fits a seeded reservoir sample of that size.

    Encoding new rows solves the non-negative least squares problem
    ``min_{z >= 0} ||x_norm - z D||^2`` (the Z-step of Semi-NMF with D fixed) by accelerated
    projected gradient (FISTA) for exactly ``encode_iters`` iterations from ``z = 0``, so
    codes are deterministic and do not depend on which rows share a batch. overcomplete's
    own ``SemiNMF.encode`` is neither: it starts from unseeded random codes, stops on a
    batch-wide tolerance, and its multiplicative update converges slowly (worse
    reconstructions: 3000 iterations do not reach what 200 FISTA iterations reach). With
    ``solver="pgd"`` and ``l1_penalty > 0``, overcomplete's penalised code update is used
    instead (fixed steps, zero start). The state is the dictionary plus the normalisation.

    Parameters (besides :class:`ConceptModel`'s; ``center`` defaults to False):
        solver: overcomplete solver for the fit, ``"mu"`` (multiplicative updates) or
            ``"pgd"`` (projected gradient, supports ``l1_penalty``).
        max_iter: fit iterations (upper bound; overcomplete stops earlier at ``tol``).
        tol: fit stopping tolerance on the relative change of the codes.
        l1_penalty: L1 penalty on codes (``"pgd"`` solver only).
        encode_iters: FISTA iterations when encoding new rows (cost per row and iteration:
            ``O(nb_concepts^2)``).
    """

    method = "semi_nmf"
    parameters = {
        "solver": Param("mu", str, choices=("mu", "pgd"), doc="overcomplete fit solver"),
        "max_iter": positive_int(500, "fit iterations (upper bound)"),
        "tol": Param(1e-4, float, low=0, doc="fit stopping tolerance"),
        "l1_penalty": Param(0.0, float, low=0, doc="L1 penalty on codes (solver 'pgd' only)"),
        "encode_iters": positive_int(300, "FISTA iterations when encoding"),
        "center": Param(False, bool, doc="subtract the input mean first"),
    }

    @classmethod
    def check_relations(cls, values, *, nb_concepts, d_model):
        if values["l1_penalty"] and values["solver"] != "pgd":
            raise ValueError(f"l1_penalty: only used by solver='pgd', got solver={values['solver']!r}")

    def fit(self, activations: Tensor) -> SemiNMFConceptModel:
        """Fit on activations ``(n_rows, d_model)``; more than ``max_fit_rows`` rows are
        subsampled (seeded, logged).

        Returns:
            self.

        Raises:
            ValueError: wrong shape, fewer than 2 rows, or a diverged fit.
        """
        x = self._bounded(activations, min_rows=2)
        self.set_normalization(x)
        a = self.normalize(x)
        import_overcomplete()
        from overcomplete.optimization import SemiNMF

        onc = SemiNMF(self.nb_concepts, solver=self.solver, device=self.device, tol=self.tol,
                      l1_penalty=self.l1_penalty, verbose=False)
        t0 = time.perf_counter()
        with seeded(self.seed), torch.enable_grad():  # the 'pgd' solver uses autograd
            onc.fit(a, max_iter=self.max_iter)
        self._set_state(onc.get_dictionary().detach())
        self.n_fit_rows = int(x.shape[0])
        logger.info("semi_nmf: fitted %d concepts on %d rows in %.1fs", self.nb_concepts, x.shape[0],
                    time.perf_counter() - t0)
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        a = x_norm.detach()
        if self.solver == "pgd" and self.l1_penalty:
            # overcomplete's own code update (Adam on the penalised loss), from a deterministic
            # start and for a fixed number of steps.
            from overcomplete.optimization.semi_nmf import snmf_projected_gradient_descent

            z0 = torch.zeros(a.shape[0], self.nb_concepts, device=a.device, dtype=a.dtype)
            with torch.enable_grad():
                z, _ = snmf_projected_gradient_descent(a, z0, self._D, update_Z=True, update_D=False,
                                                       max_iter=self.encode_iters, tol=0.0,
                                                       l1_penalty=self.l1_penalty)
            return z.detach()
        return nonneg_fista(a, self._D, self.encode_iters, lip=self._lipschitz())


@register_concept_model
class NMFConceptModel(PartialFitConceptModel):
    """Non-negative matrix factorisation (Lee & Seung 1999, "Learning the parts of objects by
    non-negative matrix factorization", Nature 401; as used for concepts by CRAFT, Fel et
    al. 2023) with scikit-learn: ``x_nn ~= z @ H`` with ``z >= 0`` ``(n_rows, nb_concepts)`` and
    ``H >= 0`` ``(nb_concepts, d_model)``.

    NMF needs non-negative input, and residual-stream activations are signed. raylens makes
    them non-negative by a shift (default ``nonneg="shift"``): the decoder bias is a
    per-dimension low quantile ``b`` (``shift_quantile``) of the first rows, and the fit sees
    ``max((x - b) / scale, 0)`` (rows below ``b`` on a dimension are clipped there, for the
    fit only). ``nonneg="relu"`` instead fits ``max(x / scale, 0)`` (bias 0; the negative part
    of activations is lost). Encoding any row solves the NNLS problem
    ``min_{z >= 0} ||x_norm - z H||^2`` by FISTA (``encode_iters`` iterations from 0:
    deterministic and row-independent), not sklearn's ``transform``.

    :meth:`fit` runs ``sklearn.decomposition.NMF`` (coordinate descent, NNDSVDA init) on the
    rows it is given; :meth:`fit_stream` streams with ``MiniBatchNMF.partial_fit`` (Lefèvre
    et al. 2011 online NMF), ``epochs`` passes over a re-iterable. State: ``H``.

    Parameters (besides :class:`ConceptModel`'s but ``center``, which the shift replaces):
        nonneg: ``"shift"`` or ``"relu"`` (see above).
        shift_quantile: quantile of each dimension used as the shift, in ``[0, 0.5)``.
        max_iter: iterations of the in-memory fit.
        batch_size: rows per ``partial_fit``.
        epochs: passes over a re-iterable stream.
        encode_iters: FISTA iterations when encoding.
    """

    method = "nmf"
    parameters = {
        "nonneg": Param("shift", str, choices=("shift", "relu"), doc="how rows are made non-negative"),
        "shift_quantile": Param(0.001, float, low=0, high=0.5, high_open=True, doc="quantile used as the shift"),
        "max_iter": positive_int(300, "iterations of the in-memory fit"),
        "batch_size": positive_int(1024, "rows per partial_fit"),
        "epochs": positive_int(3, "passes over a re-iterable stream"),
        "encode_iters": positive_int(200, "FISTA iterations when encoding"),
    }
    fixed_params = {"center": False}

    def set_normalization(self, sample: Tensor) -> None:
        """Scale as :class:`ConceptModel`; the offset is the per-dimension ``shift_quantile``
        of ``sample (n_rows, d_model)`` (``nonneg="shift"``) or zero (``"relu"``)."""
        sample = as_rows(sample, self.d_model, "sample").detach().cpu()
        if sample.shape[0] == 0:
            raise ValueError("cannot estimate the input normalisation from an empty sample")
        _, scale = robust_stats(sample, True, self.outlier_factor)
        if self.nonneg == "shift":
            shift = torch.quantile(sample.to(torch.float64), self.shift_quantile, dim=0).to(torch.float32)
        else:
            shift = torch.zeros(self.d_model)
        self._mean, self._scale = shift.to(self.device), scale.to(self.device)

    def _fit_input(self, x_norm: Tensor):
        return to_numpy(x_norm.clamp_min(0)).astype("float64")

    def _partial_estimator(self):
        from sklearn.decomposition import MiniBatchNMF

        return MiniBatchNMF(n_components=self.nb_concepts, init="nndsvda", batch_size=self.batch_size,
                            random_state=self.seed)

    def _adopt(self, est) -> None:
        self._set_state(torch.as_tensor(est.components_))

    def fit(self, activations: Tensor) -> NMFConceptModel:
        """NMF of the shifted (or rectified) rows ``(n_rows, d_model)``. Returns self.

        Raises:
            ValueError: wrong shape or fewer than 2 rows.
        """
        from sklearn.decomposition import NMF

        x = self._rows_and_normalization(activations, min_rows=2)
        est = NMF(n_components=self.nb_concepts, init="nndsvda", solver="cd", max_iter=self.max_iter,
                  random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: logged below
            est.fit(self._fit_input(self.normalize(x)))
        logger.info("nmf: %d iterations, reconstruction error %.4g", est.n_iter_, est.reconstruction_err_)
        self._adopt(est)
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return nonneg_fista(x_norm, self._D, self.encode_iters, lip=self._lipschitz())


@register_concept_model
class ConvexNMFConceptModel(DictionaryConceptModel):
    """Convex NMF (Ding, Li & Jordan 2010, "Convex and Semi-Nonnegative Matrix
    Factorizations", IEEE TPAMI 32(1)), wrapping ``overcomplete.optimization.ConvexNMF``.

    ``x_norm ~= z @ D`` with ``z >= 0`` ``(n_rows, nb_concepts)`` and atoms that are non-negative
    combinations of the fit rows, ``D = W A`` (``W >= 0`` ``(nb_concepts, n_fit)``, ``A`` the
    normalised fit rows), so each concept is a weighted mix of real (centred) activations;
    works on signed data. Centred by default: overcomplete's projected-gradient (Adam)
    solver converges far faster on centred rows (measured on SmolLM2 layer 15, 32 concepts,
    held-out explained variance 0.45 after 500 iterations centred vs 0.21 after 1000
    uncentred). The fit is seeded. Encoding new rows is NNLS on ``D`` by FISTA
    (deterministic, row-independent). Not streaming: fits a bounded seeded sample of
    ``max_fit_rows`` rows (default 4096: ``W`` is ``nb_concepts x n_fit``). State: ``D``.

    Parameters (besides :class:`ConceptModel`'s):
        max_iter: solver iterations.
        tol: solver tolerance on the codes.
        l1_penalty: L1 penalty on the codes during the fit.
        encode_iters: FISTA iterations when encoding.
    """

    method = "convex_nmf"
    parameters = {
        "max_iter": positive_int(500, "solver iterations"),
        "tol": Param(1e-4, float, low=0, doc="solver tolerance on the codes"),
        "l1_penalty": Param(0.0, float, low=0, doc="L1 penalty on the codes during the fit"),
        "encode_iters": positive_int(200, "FISTA iterations when encoding"),
        "max_fit_rows": Param(4096, int, low=1, doc="most rows one fit uses"),
    }

    def fit(self, activations: Tensor) -> ConvexNMFConceptModel:
        """Convex NMF of (a bounded seeded sample of) ``(n_rows, d_model)``. Returns self.

        Raises:
            ValueError: wrong shape or fewer than ``nb_concepts`` rows.
        """
        x = self._bounded(activations, min_rows=self.nb_concepts)
        self.set_normalization(x)
        a = self.normalize(x)
        import_overcomplete()
        from overcomplete.optimization import ConvexNMF

        est = ConvexNMF(self.nb_concepts, device=self.device, tol=self.tol, solver="pgd",
                        l1_penalty=self.l1_penalty)
        with seeded(self.seed), torch.enable_grad():
            est.fit(a, max_iter=self.max_iter)
        self._set_state(est.get_dictionary().detach())
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return nonneg_fista(x_norm, self._D, self.encode_iters, lip=self._lipschitz())
