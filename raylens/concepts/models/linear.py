"""Linear and clustering methods, most of them backed by scikit-learn: neurons (the identity
baseline), PCA, truncated SVD, ICA, k-means and sparse dictionary learning.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from raylens.concepts.models.base import register_concept_model
from raylens.concepts.models.dictionary import (
    DictionaryConceptModel,
    PartialFitConceptModel,
    to_numpy,
    to_tensor,
)
from raylens.concepts.models.params import Param, positive_int
from raylens.concepts.models.solvers import nonneg_fista
from raylens.concepts.models.streaming import as_rows, progress_bar

__all__ = [
    "DictionaryLearningConceptModel",
    "ICAConceptModel",
    "KMeansConceptModel",
    "NeuronsConceptModel",
    "PCAConceptModel",
    "SVDConceptModel",
]

logger = logging.getLogger(__name__)


def _check_nb_concepts(method: str, nb_concepts: int, d_model: int | None, *, strict: bool = False) -> None:
    """ValueError when ``nb_concepts`` exceeds ``d_model`` (or equals it, when ``strict``)."""
    if d_model is not None and (nb_concepts >= d_model if strict else nb_concepts > d_model):
        raise ValueError(f"nb_concepts: must be {'<' if strict else '<='} d_model ({d_model}) for {method}, "
                         f"got {nb_concepts}")



@register_concept_model
class NeuronsConceptModel(DictionaryConceptModel):
    """Neurons as concepts (the identity baseline, Interpreto's ``NeuronsAsConcepts``).

    Concept ``j`` is the activation dimension ``neurons[j]``: codes ``z = x[:, neurons] - mean[neurons]``
    (``(n_rows, nb_concepts)``, activation units; ``mean = 0`` with ``center=False``, the pure
    identity), dictionary rows are one-hot ``(nb_concepts, d_model)``, and
    ``decode(z) = z @ dictionary + mean`` (dimensions left out are reconstructed by their
    mean). With ``nb_concepts == d_model`` (and no ``neurons``) this is the identity; with
    fewer, ``neurons`` lists the dimensions, or, when None, the fit keeps the
    ``nb_concepts`` dimensions of highest variance (ties: lower index). No scaling
    (``scale = 1``).

    Streaming: one pass of float64 sums (mean and variance per dimension), exact on the
    whole stream. State: the index ``state.neurons`` (int64 ``(nb_concepts,)``) and the
    one-hot dictionary.

    Parameters (besides :class:`ConceptModel`'s; ``nb_concepts <= d_model``):
        neurons: optional explicit dimension indices (``nb_concepts`` distinct ints in ``[0, d_model)``).
    """

    method = "neurons"
    streaming = True
    extra_names = ("neurons",)
    parameters = {"neurons": Param(None, list, nullable=True, doc="explicit dimension indices")}

    @classmethod
    def check_relations(cls, values, *, nb_concepts, d_model):
        _check_nb_concepts(cls.method, nb_concepts, d_model)
        neurons = values["neurons"]
        if neurons is None:
            return
        upper = d_model if d_model is not None else math.inf
        if len(neurons) != nb_concepts or len(set(neurons)) != len(neurons) or not all(0 <= i < upper for i in neurons):
            raise ValueError(f"neurons: must be {nb_concepts} distinct indices in [0, {d_model}), got {neurons}")

    def _from_moments(self, n: int, s: Tensor, s2: Tensor) -> None:
        if n == 0:
            raise ValueError("neurons: no rows")
        mean = s / n
        var = (s2 / n - mean * mean).clamp_min(0)
        if self.neurons is not None:
            idx = torch.tensor(self.neurons, dtype=torch.long)
        elif self.nb_concepts == self.d_model:
            idx = torch.arange(self.d_model)
        else:
            order = sorted(range(self.d_model), key=lambda i: (-float(var[i]), i))
            idx = torch.tensor(order[: self.nb_concepts], dtype=torch.long)
        self._mean = (mean if self.center else torch.zeros_like(mean)).to(torch.float32).to(self.device)
        self._scale = torch.tensor(1.0, device=self.device)
        D = torch.zeros(self.nb_concepts, self.d_model)
        D[torch.arange(self.nb_concepts), idx] = 1.0
        self._set_state(D, neurons=idx.to(torch.int64))
        self.n_fit_rows = n

    def fit(self, activations: Tensor) -> NeuronsConceptModel:
        """Mean and variance per dimension of ``(n_rows, d_model)``; picks the neurons. Returns self."""
        x = as_rows(activations, self.d_model).detach().cpu().to(torch.float64)
        self._from_moments(x.shape[0], x.sum(0), x.pow(2).sum(0))
        return self

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True) -> NeuronsConceptModel:
        """One pass of per-dimension sums over a stream of ``(batch, d_model)``. Returns self."""
        n, s, s2 = 0, torch.zeros(self.d_model, dtype=torch.float64), torch.zeros(self.d_model, dtype=torch.float64)
        for b in progress_bar(batches, progress, "neurons"):
            b = as_rows(b, self.d_model, "batch").detach().cpu().to(torch.float64)
            n += b.shape[0]
            s += b.sum(0)
            s2 += b.pow(2).sum(0)
        if n == 0:
            raise ValueError("fit_stream got an empty stream")
        self._from_moments(n, s, s2)
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return x_norm[:, self._extra["neurons"]].clone()

    def _load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._load_state_tensors(tensors)
        self._extra["neurons"] = self._extra["neurons"].to(torch.int64)


@register_concept_model
class PCAConceptModel(PartialFitConceptModel):
    """Principal component analysis (Pearson 1901; Hotelling 1933) with scikit-learn.

    Codes are the coordinates on the top ``nb_concepts`` principal axes,
    ``z = (x_norm - mu) @ V^T`` ``(n_rows, nb_concepts)`` (signed), with orthonormal rows
    ``V (nb_concepts, d_model)`` as the dictionary and the exact data mean folded into the
    decoder bias. :meth:`fit` runs ``sklearn.decomposition.PCA`` (seeded) on all the rows it
    is given; :meth:`fit_stream` streams with ``IncrementalPCA.partial_fit`` (Ross et al.
    2008), one pass, batches of at least ``max(batch_size, nb_concepts)`` rows. State: ``V``
    and the explained variance per component (``state.explained_variance``, normalised units).

    Parameters (besides :class:`ConceptModel`'s; ``nb_concepts <= d_model``):
        batch_size: rows per ``partial_fit``.
    """

    method = "pca"
    extra_names = ("explained_variance",)
    stream_passes_follow_epochs = False
    parameters = {"batch_size": positive_int(1024, "rows per partial_fit")}

    @classmethod
    def check_relations(cls, values, *, nb_concepts, d_model):
        _check_nb_concepts(cls.method, nb_concepts, d_model)

    def _partial_estimator(self):
        from sklearn.decomposition import IncrementalPCA

        return IncrementalPCA(n_components=self.nb_concepts)

    def _adopt(self, est) -> None:
        self._fold_mean(torch.as_tensor(est.mean_))
        self._set_state(torch.as_tensor(est.components_),
                        explained_variance=to_tensor(est.explained_variance_, self.device))

    def fit(self, activations: Tensor) -> PCAConceptModel:
        """PCA of ``(n_rows, d_model)`` (needs ``n_rows >= nb_concepts``). Returns self."""
        from sklearn.decomposition import PCA

        x = self._rows_and_normalization(activations)
        est = PCA(n_components=self.nb_concepts, random_state=self.seed).fit(self._fit_input(self.normalize(x)))
        self._adopt(est)
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return x_norm @ self._D.T


@register_concept_model
class SVDConceptModel(DictionaryConceptModel):
    """Truncated SVD (Eckart & Young 1936; randomized: Halko, Martinsson & Tropp 2011) with
    ``sklearn.decomposition.TruncatedSVD``: like PCA but, by default, without centring
    (``center=False``), so the first component carries the mean direction.

    ``z = x_norm @ V^T`` ``(n_rows, nb_concepts)``, orthonormal right singular vectors
    ``V (nb_concepts, d_model)`` as the dictionary. Not streaming: fits a bounded seeded
    sample of ``max_fit_rows`` rows. State: ``V`` and the singular values
    (``state.singular_values``).

    Parameters (besides :class:`ConceptModel`'s; ``center`` defaults to False; ``nb_concepts < d_model``):
        n_iter: randomized SVD power iterations.
    """

    method = "svd"
    extra_names = ("singular_values",)
    parameters = {
        "n_iter": Param(7, int, low=0, doc="randomized SVD power iterations"),
        "center": Param(False, bool, doc="subtract the input mean first"),
    }

    @classmethod
    def check_relations(cls, values, *, nb_concepts, d_model):
        _check_nb_concepts(cls.method, nb_concepts, d_model, strict=True)

    def fit(self, activations: Tensor) -> SVDConceptModel:
        """Truncated SVD of (a bounded seeded sample of) ``(n_rows, d_model)``. Returns self."""
        from sklearn.decomposition import TruncatedSVD

        x = self._bounded(activations, min_rows=self.nb_concepts + 1)
        self.set_normalization(x)
        est = TruncatedSVD(n_components=self.nb_concepts, n_iter=self.n_iter, random_state=self.seed)
        est.fit(to_numpy(self.normalize(x)).astype("float64"))
        self._set_state(torch.as_tensor(est.components_), singular_values=to_tensor(est.singular_values_, self.device))
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return x_norm @ self._D.T


@register_concept_model
class ICAConceptModel(DictionaryConceptModel):
    """Independent component analysis (FastICA: Hyvärinen & Oja 2000, "Independent
    component analysis: algorithms and applications", Neural Networks 13) with
    ``sklearn.decomposition.FastICA`` (unit-variance whitening, seeded).

    ``z = (x_norm - mu) @ U^T`` ``(n_rows, nb_concepts)`` with the unmixing matrix
    ``U (nb_concepts, d_model)`` (``state.unmixing``, whitening included); the dictionary is
    the mixing matrix ``A^T (nb_concepts, d_model)``, so ``x_hat = z @ A^T`` is the projection
    on the top-``nb_concepts`` principal subspace (the same reconstruction as PCA, with
    independent rather than orthogonal axes). The ICA mean is folded into the decoder bias.
    Not streaming: fits a bounded seeded sample of ``max_fit_rows`` rows.

    Parameters (besides :class:`ConceptModel`'s; ``nb_concepts <= d_model``):
        max_iter: FastICA iterations.
        tol: FastICA tolerance.
    """

    method = "ica"
    extra_names = ("unmixing",)
    parameters = {
        "max_iter": positive_int(400, "FastICA iterations"),
        "tol": Param(1e-4, float, low=0, doc="FastICA tolerance"),
    }

    @classmethod
    def check_relations(cls, values, *, nb_concepts, d_model):
        _check_nb_concepts(cls.method, nb_concepts, d_model)

    def fit(self, activations: Tensor) -> ICAConceptModel:
        """FastICA on (a bounded seeded sample of) ``(n_rows, d_model)``. Returns self."""
        from sklearn.decomposition import FastICA

        x = self._bounded(activations, min_rows=self.nb_concepts + 1)
        self.set_normalization(x)
        est = FastICA(n_components=self.nb_concepts, whiten="unit-variance", max_iter=self.max_iter, tol=self.tol,
                      random_state=self.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est.fit(to_numpy(self.normalize(x)).astype("float64"))
        for w in caught:
            logger.info("ica: %s", w.message)
        self._fold_mean(torch.as_tensor(est.mean_))
        self._set_state(torch.as_tensor(est.mixing_.T), unmixing=to_tensor(est.components_, self.device))
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return x_norm @ self._extra["unmixing"].T


@register_concept_model
class KMeansConceptModel(PartialFitConceptModel):
    """k-means clustering (Lloyd 1982; k-means++ seeding: Arthur & Vassilvitskii 2007;
    mini-batch: Sculley 2010) with scikit-learn.

    Each concept is a centroid ``c_j`` (dictionary ``C (nb_concepts, d_model)``, normalised
    space); the code of a row is the one-hot indicator of its nearest centroid
    ``(n_rows, nb_concepts)``, so ``decode`` returns that centroid. (overcomplete's
    ``SkKMeans`` returns distances, which do not decode to a reconstruction.)
    :meth:`fit` runs ``KMeans`` (``n_init=1``, seeded) on the rows it is given;
    :meth:`fit_stream` streams with ``MiniBatchKMeans.partial_fit`` (``epochs`` passes over a
    re-iterable, one over an iterator). State: the centroids.

    Parameters (besides :class:`ConceptModel`'s):
        batch_size: rows per ``partial_fit``.
        epochs: passes over a re-iterable stream.
        max_iter: Lloyd iterations of the in-memory fit.
    """

    method = "kmeans"
    parameters = {
        "batch_size": positive_int(1024, "rows per partial_fit"),
        "epochs": positive_int(3, "passes over a re-iterable stream"),
        "max_iter": positive_int(100, "Lloyd iterations of the in-memory fit"),
    }

    def _partial_estimator(self):
        from sklearn.cluster import MiniBatchKMeans

        return MiniBatchKMeans(n_clusters=self.nb_concepts, random_state=self.seed, n_init=1)

    def _adopt(self, est) -> None:
        self._set_state(torch.as_tensor(est.cluster_centers_))

    def fit(self, activations: Tensor) -> KMeansConceptModel:
        """k-means on ``(n_rows, d_model)`` (needs ``n_rows >= nb_concepts``). Returns self."""
        from sklearn.cluster import KMeans

        x = self._rows_and_normalization(activations)
        est = KMeans(n_clusters=self.nb_concepts, n_init=1, max_iter=self.max_iter, random_state=self.seed)
        self._adopt(est.fit(self._fit_input(self.normalize(x))))
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        d2 = self._D.pow(2).sum(dim=1) - 2 * (x_norm @ self._D.T)  # ||x - c||^2 - ||x||^2
        z = torch.zeros(x_norm.shape[0], self.nb_concepts, device=x_norm.device)
        return z.scatter_(1, d2.argmin(dim=1, keepdim=True), 1.0)


@register_concept_model
class DictionaryLearningConceptModel(PartialFitConceptModel):
    """Sparse dictionary learning with non-negative codes (Olshausen & Field 1996; online /
    mini-batch: Mairal et al. 2009, "Online dictionary learning for sparse coding"), with
    ``sklearn.decomposition.MiniBatchDictionaryLearning`` (coordinate descent,
    ``positive_code=True``).

    ``min 0.5 ||x_norm - z D||^2 + alpha ||z||_1`` with ``z >= 0`` ``(n_rows, nb_concepts)``
    and unit-norm atoms ``D (nb_concepts, d_model)``. Encoding solves that lasso per row by
    FISTA (``encode_iters`` iterations from 0; deterministic, row-independent).
    :meth:`fit` runs ``max_iter`` epochs of mini-batches on the rows it is given;
    :meth:`fit_stream` streams with ``partial_fit`` (``epochs`` passes over a re-iterable).
    State: ``D``.

    Parameters (besides :class:`ConceptModel`'s):
        alpha: L1 weight (normalised rows have a norm of about 1).
        batch_size: rows per mini-batch.
        max_iter: epochs of the in-memory fit.
        epochs: passes over a re-iterable stream.
        encode_iters: FISTA iterations when encoding.
    """

    method = "dictionary_learning"
    parameters = {
        "alpha": Param(0.05, float, low=0, doc="L1 weight"),
        "batch_size": positive_int(256, "rows per mini-batch"),
        "max_iter": positive_int(10, "epochs of the in-memory fit"),
        "epochs": positive_int(3, "passes over a re-iterable stream"),
        "encode_iters": positive_int(200, "FISTA iterations when encoding"),
    }

    def _estimator(self, max_iter: int | None):
        from sklearn.decomposition import MiniBatchDictionaryLearning

        kw = {} if max_iter is None else {"max_iter": max_iter}
        return MiniBatchDictionaryLearning(n_components=self.nb_concepts, alpha=self.alpha, batch_size=self.batch_size,
                                           fit_algorithm="cd", transform_algorithm="lasso_cd", positive_code=True,
                                           random_state=self.seed, **kw)

    def _partial_estimator(self):
        return self._estimator(None)

    def _adopt(self, est) -> None:
        self._set_state(torch.as_tensor(est.components_))

    def fit(self, activations: Tensor) -> DictionaryLearningConceptModel:
        """Mini-batch dictionary learning on ``(n_rows, d_model)``. Returns self."""
        x = self._rows_and_normalization(activations)
        self._adopt(self._estimator(self.max_iter).fit(self._fit_input(self.normalize(x))))
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return nonneg_fista(x_norm, self._D, self.encode_iters, l1=self.alpha, lip=self._lipschitz())
