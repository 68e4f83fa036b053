"""Shared bases of the factorisation methods (NMF family, sklearn-backed linear methods,
archetypal analysis): a state made of tensors only, and streaming through ``partial_fit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from raylens.concepts.models.base import ConceptModel
from raylens.concepts.models.solvers import lipschitz
from raylens.concepts.models.streaming import (
    as_rows,
    chain,
    is_reiterable,
    progress_bar,
    rebatch_min,
    seeded_subset,
    take_head,
)

__all__ = ["DictionaryConceptModel", "PartialFitConceptModel", "to_numpy", "to_tensor"]

logger = logging.getLogger(__name__)


def to_numpy(x: Tensor):
    """``x`` as a numpy array on the CPU (detached)."""
    return x.detach().cpu().numpy()


def to_tensor(a: Any, device: str) -> Tensor:
    """An array-like as a contiguous float32 tensor on ``device``."""
    return torch.as_tensor(a, dtype=torch.float32).to(device).contiguous()


class DictionaryConceptModel(ConceptModel):
    """Shared base of the concept models whose whole state is tensors: a dictionary
    ``D (nb_concepts, d_model)`` in the normalised space (``x_hat = (z @ D) * scale + mean``)
    plus named extra tensors (an encoder matrix, a neuron index...).

    Subclasses implement ``fit`` and ``_encode_normalized`` and list their extra tensor names
    in ``extra_names``; ``self._D`` and ``self._extra`` hold the state (set with
    :meth:`_set_state`). The non-streaming ones inherit the reservoir-sample
    :meth:`ConceptModel.fit_stream`; ``fit`` on more than ``max_fit_rows`` rows then uses a
    seeded random subset (:meth:`_bounded`). Not streaming unless a subclass says so.
    """

    #: Names of the extra state tensors, saved as ``state.<name>``.
    extra_names: ClassVar[tuple[str, ...]] = ()

    _D: Tensor | None = None
    _extra: Mapping[str, Tensor] = MappingProxyType({})
    _lip: Tensor | None = None

    def _bounded(self, activations: Tensor, min_rows: int = 2) -> Tensor:
        """Rows ``(n, d_model)`` as float32; a seeded random subset of ``max_fit_rows`` when more (logged)."""
        x = as_rows(activations, self.d_model).detach()
        n = x.shape[0]
        if n < min_rows:
            raise ValueError(f"{self.method} needs at least {min_rows} rows, got {n}")
        if n > self.max_fit_rows:
            x = seeded_subset(x, self.max_fit_rows, self.seed)
            logger.info("%s.fit: using a seeded random subset of %d of %d rows (max_fit_rows)",
                        self.method, self.max_fit_rows, n)
        return x

    def _rows_and_normalization(self, activations: Tensor, min_rows: int | None = None) -> Tensor:
        """Rows ``(n, d_model)`` as float32 (at least ``min_rows``, default ``nb_concepts``, else
        ValueError), after estimating the normalisation on a seeded subset of ``norm_rows`` of them."""
        x = as_rows(activations, self.d_model).detach()
        if x.shape[0] < (min_rows or self.nb_concepts):
            what = f"nb_concepts={self.nb_concepts}" if min_rows is None else f"{min_rows}"
            raise ValueError(f"{self.method} needs at least {what} rows, got {x.shape[0]}")
        self.set_normalization(seeded_subset(x, self.norm_rows, self.seed))
        return x

    def _set_state(self, D: Tensor, **extra: Tensor) -> None:
        D = to_tensor(D, self.device)
        if tuple(D.shape) != (self.nb_concepts, self.d_model):
            raise ValueError(f"{self.method}: dictionary has shape {tuple(D.shape)}, expected "
                             f"({self.nb_concepts}, {self.d_model})")
        if not torch.isfinite(D).all():
            raise ValueError(f"{self.method} fit diverged (non-finite dictionary)")
        self._D = D
        self._extra = {k: v.to(self.device).contiguous() for k, v in extra.items()}
        self._lip = None
        self._fitted = True

    def _fold_mean(self, mean_norm: Tensor) -> None:
        """Move an offset found by the fit in the normalised space into the input mean, so
        that ``decode`` stays ``z @ dictionary + decoder_bias``."""
        self._mean = self._mean + to_tensor(mean_norm, self.device) * self._scale

    def _lipschitz(self) -> Tensor:
        if self._lip is None:
            self._lip = lipschitz(self._D)
        return self._lip

    def _decode_normalized(self, z: Tensor) -> Tensor:
        return z @ self._D

    def _normalized_dictionary(self) -> Tensor:
        return self._D

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"dictionary": self._D, **{f"state.{k}": v for k, v in self._extra.items()}}

    def _load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        expected = {"dictionary", *(f"state.{k}" for k in self.extra_names)}
        if set(tensors) != expected:
            raise ValueError(f"{self.method} state must hold {sorted(expected)}, got {sorted(tensors)}")
        self._set_state(tensors["dictionary"], **{k: tensors[f"state.{k}"] for k in self.extra_names})


class PartialFitConceptModel(DictionaryConceptModel):
    """Streaming through a scikit-learn estimator's ``partial_fit``: the first ``norm_rows``
    rows (of batches ``(batch, d_model)``) set the normalisation, then every batch (re-cut to
    at least ``max(batch_size, nb_concepts)`` rows) goes to ``partial_fit``; ``epochs`` passes
    over a re-iterable (when ``stream_passes_follow_epochs``), one over an iterator.

    Subclasses implement :meth:`_partial_estimator` and :meth:`_adopt` and declare a
    ``batch_size`` parameter.
    """

    streaming = True
    #: True: a re-iterable stream gets ``epochs`` passes; False: always one.
    stream_passes_follow_epochs: ClassVar[bool] = True

    def _partial_estimator(self):
        """A fresh scikit-learn estimator with ``partial_fit``."""
        raise NotImplementedError

    def _fit_input(self, x_norm: Tensor):
        """What the estimator fits on, from normalised rows ``(n, d_model)`` (float64 numpy)."""
        return to_numpy(x_norm).astype("float64")

    def _adopt(self, est) -> None:
        """Take the fitted estimator's state (:meth:`_set_state`)."""
        raise NotImplementedError

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True) -> ConceptModel:
        """Fit on a stream of batches ``(batch, d_model)`` with ``partial_fit``, bounded memory.

        Returns:
            self.

        Raises:
            ValueError: wrong batch shape, empty stream, or fewer than ``nb_concepts`` rows.
        """
        reiterable = is_reiterable(batches)
        epochs = getattr(self, "epochs", 1) if self.stream_passes_follow_epochs else 1
        n_passes = epochs if reiterable else 1
        size = max(self.batch_size, self.nb_concepts)
        first = rebatch_min(progress_bar(batches, progress, f"{self.method} pass 1"), size, self.d_model)
        head = take_head(first, self.norm_rows)
        n_head = sum(b.shape[0] for b in head)
        if n_head == 0:
            raise ValueError("fit_stream got an empty stream")
        if n_head < self.nb_concepts:
            raise ValueError(f"{self.method} needs at least nb_concepts={self.nb_concepts} rows, got {n_head}")
        self.set_normalization(torch.cat(head))
        est = self._partial_estimator()
        rows = 0
        t0 = time.perf_counter()
        for p in range(n_passes):
            stream = chain(head, first) if p == 0 else rebatch_min(batches, size, self.d_model)
            for b in stream:
                rows += b.shape[0]
                est.partial_fit(self._fit_input(self.normalize(b).cpu()))
        self._adopt(est)
        self.n_fit_rows = rows // n_passes
        logger.info("%s: streamed %d rows x %d passes in %.1fs", self.method, self.n_fit_rows, n_passes,
                    time.perf_counter() - t0)
        return self
