"""Concept models: dictionaries learned on transformer activations.

A *concept model* factorises activation rows ``x`` of shape ``(n_rows, d_model)`` into
non-negative codes ``z`` of shape ``(n_rows, nb_concepts)`` and a dictionary ``D`` of
shape ``(nb_concepts, d_model)``::

    x  ~=  decode(encode(x))  =  encode(x) @ dictionary + decoder_bias

Every method is registered under a name (``method``) and is built with
:func:`build_concept_model`; a fitted model is written with :meth:`ConceptModel.save`
(``model.safetensors`` + ``config.json``, never pickle) and read back with
:func:`load_concept_model`.

Methods available now:

* ``"topk_sae"`` (:class:`TopKSAEConceptModel`): a TopK sparse autoencoder, Gao et al.
  2024, "Scaling and evaluating sparse autoencoders" (arXiv 2406.04093), wrapping
  ``overcomplete.sae.TopKSAE``. Streaming: trains with Adam from any iterable of batches.
* ``"semi_nmf"`` (:class:`SemiNMFConceptModel`): Semi-NMF, Ding, Li & Jordan 2010,
  "Convex and Semi-Nonnegative Matrix Factorizations" (IEEE TPAMI 32(1)), wrapping
  ``overcomplete.optimization.SemiNMF``. Not streaming: fits a bounded, seeded sample.

Adding a method: subclass :class:`ConceptModel`, set ``method`` and ``streaming``,
implement ``fit``, ``_encode_normalized``, ``_decode_normalized``, ``_normalized_dictionary``,
``_state_tensors`` and ``_load_state_tensors``, and decorate it with
:func:`register_concept_model`. Constructor keyword arguments are the method's
parameters; they are what ``config.json`` stores.

Input normalisation. Residual-stream activations of LLMs contain a few rows (and
dimensions) with huge norms. Every model therefore works on
``(x - mean) / scale`` internally, where ``mean`` (``(d_model,)``, zero when the method
does not centre) and ``scale`` (a scalar) are estimated robustly (rows far from the bulk
are left out of the estimate) on the first rows it sees. Both are part of the saved
state, and ``encode``/``decode``/``dictionary`` are all expressed in the original
activation space.

overcomplete is imported only through :func:`raylens._compat.import_overcomplete`; this
module never imports ray.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "ConceptModel",
    "TopKSAEConceptModel",
    "SemiNMFConceptModel",
    "build_concept_model",
    "load_concept_model",
    "register_concept_model",
    "available_methods",
    "sae_train_step",
    "reservoir_sample",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "raylens.concept_model"
_FORMAT_VERSION = 1

_REGISTRY: dict[str, type["ConceptModel"]] = {}


# --------------------------------------------------------------------------- helpers


def _overcomplete():
    from raylens._compat import import_overcomplete

    return import_overcomplete()


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block with torch's global CPU RNG seeded, restoring the caller's RNG state after.

    overcomplete draws its initialisations from the global RNG; this keeps them
    reproducible without disturbing anybody else's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _as_rows(x: Any, d_model: int, what: str = "activations") -> Tensor:
    """Return ``x`` as a float32 tensor ``(n_rows, d_model)``; ValueError on a wrong shape."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != d_model:
        raise ValueError(f"{what} must have shape (n_rows, d_model={d_model}), got {tuple(x.shape)}")
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x


def _progress(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc=desc, unit="batch", leave=False)


def _is_reiterable(batches: Iterable) -> bool:
    """True when ``iter(batches)`` gives a fresh pass (a list, a dataset), False for an iterator."""
    return not isinstance(batches, Iterator)


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
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    gen = torch.Generator().manual_seed(int(seed))
    reservoir: Tensor | None = None
    n_seen = 0
    for batch in batches:
        batch = _as_rows(batch, d_model, "batch").detach().cpu()
        b = batch.shape[0]
        if b == 0:
            continue
        if reservoir is None:
            reservoir = torch.empty(max_rows, d_model, dtype=torch.float32)
        fill = min(max(max_rows - n_seen, 0), b)
        if fill:
            reservoir[n_seen:n_seen + fill] = batch[:fill]
        rest = batch[fill:]
        if rest.shape[0]:
            # row with 0-based stream index t replaces slot j ~ U{0..t} when j < max_rows
            t = torch.arange(n_seen + fill, n_seen + b, dtype=torch.float64)
            j = torch.floor(torch.rand(rest.shape[0], generator=gen, dtype=torch.float64) * (t + 1)).long()
            hit = torch.nonzero(j < max_rows).flatten()
            if hit.numel():
                slots = j[hit]
                # several rows of this batch may hit one slot: the last one wins (sequential semantics)
                rev_slots = slots.flip(0)
                uniq, inverse = torch.unique(rev_slots, return_inverse=True)
                first_in_rev = torch.full((uniq.numel(),), rev_slots.numel(), dtype=torch.long)
                first_in_rev.scatter_reduce_(0, inverse, torch.arange(rev_slots.numel()), reduce="amin")
                winners = hit.flip(0)[first_in_rev]
                reservoir[uniq] = rest[winners]
        n_seen += b
    if reservoir is None:
        return torch.empty(0, d_model, dtype=torch.float32), 0
    return reservoir[: min(max_rows, n_seen)].clone(), n_seen


def _robust_stats(x: Tensor, center: bool, outlier_factor: float) -> tuple[Tensor, Tensor]:
    """``(mean (d_model,), scale ())`` of rows ``x (n_rows, d_model)``, ignoring far outlier rows.

    Rows whose distance to the coordinate-wise median exceeds ``outlier_factor`` times the
    median distance are left out; ``mean`` is the mean of the remaining rows (zeros when
    ``center`` is False) and ``scale`` the root mean squared norm of ``x - mean`` over them,
    so a typical normalised row has norm about 1.
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


def _rebatch(batches: Iterable, batch_size: int, d_model: int, device: str) -> Iterator[Tensor]:
    """Re-cut a stream of batches ``(batch, d_model)`` into batches of exactly ``batch_size``
    rows (the last one may be smaller)."""
    pending: list[Tensor] = []
    n_pending = 0
    for batch in batches:
        batch = _as_rows(batch, d_model, "batch").detach().to(device)
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


# --------------------------------------------------------------------------- base class


class ConceptModel(abc.ABC):
    """Abstract concept model: codes ``z (n_rows, nb_concepts)`` and a dictionary
    ``(nb_concepts, d_model)`` learned on activations ``x (n_rows, d_model)``.

    Subclasses are registered with :func:`register_concept_model` and built with
    :func:`build_concept_model`; their constructor keyword arguments are the method
    parameters stored in ``config.json``.

    Attributes:
        method: registry name of the method (class attribute), e.g. ``"topk_sae"``.
        streaming: class attribute; True when :meth:`fit_stream` trains on the whole stream,
            False when it fits a bounded reservoir sample of ``max_fit_rows`` rows.
        nb_concepts: number of concepts (columns of the codes, rows of the dictionary).
        d_model: width of the activations.
        seed: seed of every random draw (initialisation, shuffling, sampling).
        device: torch device the model computes on.
        max_fit_rows: for non-streaming methods, the most rows one fit uses.
        n_fit_rows: rows seen by the last fit (saved).

    The model works internally on ``(x - mean) / scale`` (see the module docstring); the
    public API is in the original activation space.
    """

    method: ClassVar[str] = ""
    streaming: ClassVar[bool] = False
    #: Rows used to estimate the input normalisation (mean, scale).
    norm_rows: ClassVar[int] = 8192

    def __init__(
        self,
        *,
        nb_concepts: int,
        d_model: int,
        seed: int = 0,
        device: str = "cpu",
        max_fit_rows: int = 10_000,
        center: bool = True,
        outlier_factor: float = 10.0,
    ):
        if int(nb_concepts) < 1:
            raise ValueError(f"nb_concepts must be >= 1, got {nb_concepts}")
        if int(d_model) < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if int(max_fit_rows) < 1:
            raise ValueError(f"max_fit_rows must be >= 1, got {max_fit_rows}")
        if not outlier_factor > 1:
            raise ValueError(f"outlier_factor must be > 1, got {outlier_factor}")
        self.nb_concepts = int(nb_concepts)
        self.d_model = int(d_model)
        self.seed = int(seed)
        self.device = str(device)
        self.max_fit_rows = int(max_fit_rows)
        self.center = bool(center)
        self.outlier_factor = float(outlier_factor)
        self.n_fit_rows = 0
        self._mean: Tensor | None = None  # (d_model,)
        self._scale: Tensor | None = None  # ()
        self._fitted = False

    # ------------------------------------------------------------------ config

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters of this model (JSON-serialisable), ``nb_concepts`` and
        ``d_model`` included; ``build_concept_model(self.method, **self.get_params())``
        rebuilds an unfitted twin."""
        params = {}
        for cls in type(self).__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            for name, p in inspect.signature(init).parameters.items():
                if p.kind is p.KEYWORD_ONLY and name not in params:
                    params[name] = getattr(self, name)
        return params

    @property
    def is_fitted(self) -> bool:
        """True once the model was fitted (or loaded)."""
        return self._fitted

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__} ({self.method!r}) is not fitted: call fit/fit_stream or load it")

    # ------------------------------------------------------------------ normalisation

    def set_normalization(self, sample: Tensor) -> None:
        """Estimate the input normalisation (mean, scale) from a sample of rows.

        Args:
            sample: activations ``(n_rows, d_model)``, typically the first rows of a stream.

        Raises:
            ValueError: wrong shape or empty sample.
        """
        sample = _as_rows(sample, self.d_model, "sample")
        if sample.shape[0] == 0:
            raise ValueError("cannot estimate the input normalisation from an empty sample")
        mean, scale = _robust_stats(sample.detach().cpu(), self.center, self.outlier_factor)
        self._mean, self._scale = mean.to(self.device), scale.to(self.device)

    def normalize(self, x: Tensor) -> Tensor:
        """Map activations ``(n_rows, d_model)`` to the model's input space ``(x - mean) / scale``.

        Raises:
            RuntimeError: normalisation not estimated yet.
            ValueError: wrong shape.
        """
        if self._scale is None:
            raise RuntimeError("input normalisation not estimated yet (fit the model first)")
        x = _as_rows(x, self.d_model).to(self.device)
        return (x - self._mean) / self._scale

    def denormalize(self, x_norm: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: ``(n_rows, d_model)`` -> ``x_norm * scale + mean``."""
        if self._scale is None:
            raise RuntimeError("input normalisation not estimated yet (fit the model first)")
        return x_norm * self._scale + self._mean

    @property
    def decoder_bias(self) -> Tensor:
        """Offset ``(d_model,)`` added by :meth:`decode` (the input mean, or zeros when the
        method does not centre)."""
        self._check_fitted()
        return self._mean.detach().clone()

    # ------------------------------------------------------------------ public API

    @abc.abstractmethod
    def fit(self, activations: Tensor) -> "ConceptModel":
        """Fit on activations held in memory.

        Args:
            activations: ``(n_rows, d_model)``.

        Returns:
            self.

        Raises:
            ValueError: wrong shape or too few rows.
        """

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True) -> "ConceptModel":
        """Fit on a stream of activation batches ``(batch, d_model)`` with bounded memory.

        This default (non-streaming methods) collects a uniform, seeded reservoir sample of
        at most ``max_fit_rows`` rows of the stream (:func:`reservoir_sample`, seed
        ``self.seed``), logs how many rows it kept out of how many, and calls :meth:`fit`
        on it. Streaming methods override it to train on every row.

        Args:
            batches: any iterable of tensors ``(batch, d_model)`` (a generator is fine).
            progress: show a progress bar over batches.

        Returns:
            self.

        Raises:
            ValueError: a batch of the wrong shape, or an empty stream.
        """
        sample, n_seen = reservoir_sample(
            _progress(batches, progress, f"sampling for {self.method}"),
            self.max_fit_rows, self.d_model, seed=self.seed,
        )
        if n_seen == 0:
            raise ValueError("fit_stream got an empty stream")
        logger.info(
            "%s is not a streaming method: fitting on a seeded reservoir sample of %d of %d rows "
            "(max_fit_rows=%d, seed=%d)", self.method, sample.shape[0], n_seen, self.max_fit_rows, self.seed,
        )
        self.fit(sample)
        self.n_fit_rows = int(sample.shape[0])
        return self

    def encode(self, x: Tensor) -> Tensor:
        """Concept codes of activations.

        Args:
            x: activations ``(n_rows, d_model)`` (any float dtype), in the original space.

        Returns:
            codes ``(n_rows, nb_concepts)``, float32, on ``x``'s device.

        Raises:
            RuntimeError: model not fitted.
            ValueError: wrong shape.
        """
        self._check_fitted()
        out_device = x.device if isinstance(x, Tensor) else torch.device("cpu")
        return self._encode_normalized(self.normalize(x)).to(out_device)

    def decode(self, z: Tensor) -> Tensor:
        """Activations reconstructed from codes: ``z @ dictionary + decoder_bias``.

        Differentiable with torch autograd with respect to ``z`` (concept importance
        gradients go through it); the model's own parameters do not require gradients.

        Args:
            z: codes ``(n_rows, nb_concepts)``.

        Returns:
            activations ``(n_rows, d_model)`` in the original (un-normalised) space, float32,
            on ``z``'s device.

        Raises:
            RuntimeError: model not fitted.
            ValueError: wrong shape.
        """
        self._check_fitted()
        z = _as_rows(z, self.nb_concepts, "codes")
        out_device = z.device
        return self.denormalize(self._decode_normalized(z.to(self.device))).to(out_device)

    @property
    def dictionary(self) -> Tensor:
        """Concept directions ``(nb_concepts, d_model)`` in the original activation space,
        so that ``decode(z) == z @ dictionary + decoder_bias``.

        Raises:
            RuntimeError: model not fitted.
        """
        self._check_fitted()
        return (self._normalized_dictionary() * self._scale).detach().clone()

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` (tensors) and ``config.json`` (method, parameters,
        fit metadata) into ``directory`` (created if needed). No pickle.

        Returns:
            the directory.

        Raises:
            RuntimeError: model not fitted.
        """
        self._check_fitted()
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"norm.mean": self._mean, "norm.scale": self._scale.reshape(())}
        for name, t in self._state_tensors().items():
            tensors[name] = t
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": _FORMAT, "method": self.method})
        config = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "method": self.method,
            "params": self.get_params(),
            "n_fit_rows": self.n_fit_rows,
            "extra": self._extra_config(),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    def _extra_config(self) -> dict[str, Any]:
        """Non-tensor fit metadata saved in config.json (override to add)."""
        return {}

    def _load_extra_config(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_config` wrote."""

    # ------------------------------------------------------------------ subclass hooks

    @abc.abstractmethod
    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        """Codes ``(n_rows, nb_concepts)`` of normalised rows ``(n_rows, d_model)``."""

    @abc.abstractmethod
    def _decode_normalized(self, z: Tensor) -> Tensor:
        """Normalised reconstruction ``(n_rows, d_model)`` of codes; differentiable in ``z``."""

    @abc.abstractmethod
    def _normalized_dictionary(self) -> Tensor:
        """Dictionary ``(nb_concepts, d_model)`` in the normalised space."""

    @abc.abstractmethod
    def _state_tensors(self) -> dict[str, Tensor]:
        """Tensors that, with the normalisation and the config, fully define the fitted model."""

    @abc.abstractmethod
    def _load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore a fitted model from :meth:`_state_tensors` output."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params}, fitted={self._fitted})"


# --------------------------------------------------------------------------- registry


def register_concept_model(cls: type[ConceptModel]) -> type[ConceptModel]:
    """Class decorator adding a :class:`ConceptModel` subclass to the registry under ``cls.method``.

    Raises:
        ValueError: empty or already registered method name.
    """
    if not cls.method:
        raise ValueError(f"{cls.__name__} has no method name")
    if cls.method in _REGISTRY and _REGISTRY[cls.method] is not cls:
        raise ValueError(f"concept method {cls.method!r} is already registered by {_REGISTRY[cls.method].__name__}")
    _REGISTRY[cls.method] = cls
    return cls


def available_methods() -> list[str]:
    """Sorted names of the registered concept methods."""
    return sorted(_REGISTRY)


def _method_params(cls: type[ConceptModel]) -> dict[str, inspect.Parameter]:
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for name, p in inspect.signature(init).parameters.items():
            if p.kind is p.KEYWORD_ONLY and name not in params:
                params[name] = p
    return params


def build_concept_model(method: str, *, nb_concepts: int, d_model: int, **params: Any) -> ConceptModel:
    """Build an unfitted concept model by registry name.

    Args:
        method: registry name, one of :func:`available_methods` (``"topk_sae"``, ``"semi_nmf"``).
        nb_concepts: number of concepts.
        d_model: width of the activations ``(n_rows, d_model)``.
        **params: method parameters (see the method class), e.g. ``top_k=16, lr=1e-3``.

    Returns:
        the unfitted :class:`ConceptModel`.

    Raises:
        ValueError: unknown method (the message names it and lists the known ones), an
            unknown parameter for this method (named), or an invalid value.
    """
    cls = _REGISTRY.get(method)
    if cls is None:
        raise ValueError(f"unknown concept method {method!r}; known methods: {available_methods()}")
    known = _method_params(cls)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for concept method {method!r}; known parameters: {sorted(known)}"
        )
    return cls(nb_concepts=nb_concepts, d_model=d_model, **params)


def load_concept_model(directory: str | Path) -> ConceptModel:
    """Load a model written by :meth:`ConceptModel.save`; ``encode`` outputs are identical.

    Args:
        directory: folder holding ``config.json`` and ``model.safetensors``.

    Returns:
        the fitted :class:`ConceptModel` (on the device named in its config).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: not a raylens concept model, unknown method, or missing tensors.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"concept model file not found: {p}")
    config = json.loads(config_path.read_text())
    if config.get("format") != _FORMAT:
        raise ValueError(f"{config_path} is not a raylens concept model (format={config.get('format')!r})")
    if int(config.get("format_version", 0)) > _FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {config['format_version']}, newer than {_FORMAT_VERSION}")
    params = dict(config["params"])
    model = build_concept_model(
        config["method"], nb_concepts=params.pop("nb_concepts"), d_model=params.pop("d_model"), **params
    )
    tensors = load_file(str(weights_path), device="cpu")
    for key in ("norm.mean", "norm.scale"):
        if key not in tensors:
            raise ValueError(f"{weights_path} lacks tensor {key!r}")
    model._mean = tensors.pop("norm.mean").to(model.device)
    model._scale = tensors.pop("norm.scale").reshape(()).to(model.device)
    model._load_state_tensors({k: v.to(model.device) for k, v in tensors.items()})
    model.n_fit_rows = int(config.get("n_fit_rows", 0))
    model._load_extra_config(config.get("extra", {}))
    model._fitted = True
    return model


# --------------------------------------------------------------------------- TopK SAE


def sae_train_step(sae: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Tensor,
                   *, clip_grad: float | None = 1.0) -> dict[str, float]:
    """One Adam (or any optimizer) step of an overcomplete SAE on one batch; the single
    training step that in-memory, streaming and distributed (Ray Train) training all call.

    Loss: mean squared reconstruction error ``mean((batch - x_hat)^2)`` over
    ``(batch_rows, d_in)`` (TopK SAEs need no sparsity penalty: Gao et al. 2024, "Scaling
    and evaluating sparse autoencoders"). Gradients are clipped to global norm
    ``clip_grad`` (None: no clipping). overcomplete's dictionary layer re-projects its atoms
    on the unit sphere at every training-mode forward.

    Args:
        sae: an overcomplete SAE (``forward(x) -> (pre_codes, codes, x_hat)``), put in
            training mode by this function.
        optimizer: optimizer over ``sae.parameters()``.
        batch: input rows ``(batch_rows, d_in)`` already in the SAE's input space (for a
            :class:`TopKSAEConceptModel`, ``model.normalize(x)``).

    Returns:
        ``dict(loss=float, explained_variance=float, l0=float)``: loss before the step,
        explained variance of the batch (1 - SSE/SST, <= 1, higher is better) and the mean
        number of active codes per row.

    Raises:
        ValueError: batch is not 2-D or the loss is not finite.
    """
    if batch.ndim != 2:
        raise ValueError(f"batch must be (batch_rows, d_in), got {tuple(batch.shape)}")
    sae.train()
    optimizer.zero_grad(set_to_none=True)
    _, codes, x_hat = sae(batch)
    err = (batch - x_hat).pow(2)
    loss = err.mean()
    if not torch.isfinite(loss):
        raise ValueError(f"non-finite SAE loss {loss.item()}")
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip_grad)
    optimizer.step()
    with torch.no_grad():
        sse = err.sum()
        sst = (batch - batch.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return {
            "loss": float(loss),
            "explained_variance": float(1 - sse / sst),
            "l0": float((codes != 0).sum(dim=1).float().mean()),
        }


@register_concept_model
class TopKSAEConceptModel(ConceptModel):
    """TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders", arXiv 2406.04093), wrapping ``overcomplete.sae.TopKSAE``.

    ``z = TopK_k(ReLU(W_enc (x - mean) / scale + b_enc))`` of shape ``(n_rows, nb_concepts)``
    with at most ``top_k`` non-zeros per row; ``x_hat = (z @ D) * scale + mean`` with unit-norm
    atoms ``D (nb_concepts, d_model)`` in the normalised space. ``mean`` plays the role of
    Gao et al.'s pre-encoder/decoder bias (fixed, estimated on the first rows rather than
    learned); the encoder is initialised as ``D^T`` as in the paper.

    Training: Adam on the mean squared reconstruction error of normalised rows, in
    minibatches of ``batch_size`` rows, via :func:`sae_train_step`. :meth:`fit` runs
    ``epochs`` seeded-shuffled passes over an in-memory tensor; :meth:`fit_stream` runs one
    pass over a one-shot iterator (a generator), or ``epochs`` passes over a re-iterable
    (a list, a dataset), re-cutting the stream into ``batch_size``-row batches (no
    shuffling across batches: shuffle upstream). Normalisation statistics are estimated on
    the first ``norm_rows`` rows of the stream. No AuxK loss yet (dead latents are not revived).

    Args:
        nb_concepts: number of latents.
        d_model: activation width.
        top_k: active latents per row (default: ``max(nb_concepts // 16, 1)``).
        lr: Adam learning rate.
        epochs: passes over the data.
        batch_size: rows per training step.
        seed: seed of initialisation and shuffling.
        device: torch device.
        max_fit_rows: unused by this streaming method's :meth:`fit_stream`; kept for a uniform config.
        center: subtract the input mean before encoding (default True).
        outlier_factor: rows farther than this many times the median distance from the
            median are ignored when estimating mean and scale.
        clip_grad: global gradient-norm clip (0 disables).

    Raises:
        ValueError: invalid parameter values.
    """

    method = "topk_sae"
    streaming = True

    def __init__(
        self,
        *,
        nb_concepts: int,
        d_model: int,
        top_k: int | None = None,
        lr: float = 2e-3,
        epochs: int = 10,
        batch_size: int = 256,
        seed: int = 0,
        device: str = "cpu",
        max_fit_rows: int = 10_000,
        center: bool = True,
        outlier_factor: float = 10.0,
        clip_grad: float = 1.0,
    ):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        self.top_k = int(top_k) if top_k is not None else max(self.nb_concepts // 16, 1)
        if not 1 <= self.top_k <= self.nb_concepts:
            raise ValueError(f"top_k must be in [1, nb_concepts={self.nb_concepts}], got {top_k}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.clip_grad = float(clip_grad)
        self.sae = self._new_sae()
        self._dict: Tensor | None = None  # fused, unit-norm dictionary (nb_concepts, d_model)
        self.history: list[dict[str, float]] = []

    def _new_sae(self) -> torch.nn.Module:
        _overcomplete()
        from overcomplete.sae import TopKSAE

        with _seeded(self.seed):
            sae = TopKSAE(self.d_model, nb_concepts=self.nb_concepts, top_k=self.top_k, device=self.device)
        # Gao et al. 2024: initialise the encoder as the transpose of the decoder.
        linear = self._encoder_linear(sae)
        if linear is not None:
            with torch.no_grad():
                sae.dictionary._weights.data = sae.dictionary.normalization(sae.dictionary._weights.data)
                linear.weight.copy_(sae.dictionary._weights)
                linear.bias.zero_()
        return sae

    @staticmethod
    def _encoder_linear(sae: torch.nn.Module) -> torch.nn.Linear | None:
        block = getattr(sae.encoder, "final_block", None)
        if isinstance(block, torch.nn.Sequential) and isinstance(block[0], torch.nn.Linear):
            return block[0]
        return None

    # ---- training

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the SAE parameters with this model's ``lr`` (for external training loops)."""
        for p in self.sae.parameters():
            p.requires_grad_(True)
        return torch.optim.Adam(self.sae.parameters(), lr=self.lr)

    def _train_batches(self, batch_passes: Iterable[Iterable[Tensor]], progress: bool) -> None:
        """Train over several passes; each element of ``batch_passes`` yields normalised batches."""
        with torch.enable_grad():  # callers may be inside torch.no_grad()
            self._train_batches_impl(batch_passes, progress)

    def _train_batches_impl(self, batch_passes: Iterable[Iterable[Tensor]], progress: bool) -> None:
        optimizer = self.make_optimizer()
        self.history = []
        t0 = time.perf_counter()
        step = 0
        for epoch, batches in enumerate(batch_passes):
            sums = {"loss": 0.0, "explained_variance": 0.0, "l0": 0.0}
            n = 0
            for batch in _progress(batches, progress, f"topk_sae epoch {epoch + 1}"):
                stats = sae_train_step(self.sae, optimizer, batch, clip_grad=self.clip_grad or None)
                for k in sums:
                    sums[k] += stats[k]
                n += 1
                step += 1
            if n:
                record = {k: v / n for k, v in sums.items()} | {"epoch": epoch + 1, "steps": n}
                self.history.append(record)
                logger.info("topk_sae epoch %d: loss %.4g, batch EV %.3f, L0 %.1f, %.1fs",
                            epoch + 1, record["loss"], record["explained_variance"], record["l0"],
                            time.perf_counter() - t0)
        if step == 0:
            raise ValueError("no training batch: empty activations/stream")
        self._finalize()

    def _finalize(self) -> None:
        """Freeze: eval mode, parameters without gradients, fused dictionary cached."""
        for p in self.sae.parameters():
            p.requires_grad_(False)
        # overcomplete's DictionaryLayer fuses (normalises) its dictionary when switched to eval
        # mode and keeps that copy out of its state_dict: we keep our own copy and save it.
        self.sae.eval()
        with torch.no_grad():
            self._dict = self.sae.get_dictionary().detach().clone()
        self._fitted = True

    def fit(self, activations: Tensor) -> "TopKSAEConceptModel":
        """Train on activations ``(n_rows, d_model)`` in memory: ``epochs`` seeded-shuffled
        passes in minibatches of ``batch_size`` rows (see the class docstring).

        Returns:
            self.

        Raises:
            ValueError: wrong shape or no rows.
        """
        x = _as_rows(activations, self.d_model).detach()
        n = x.shape[0]
        if n == 0:
            raise ValueError("fit got no rows")
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=gen)[: self.norm_rows]
        self.set_normalization(x[idx])
        self.sae = self._new_sae()
        x_norm = self.normalize(x)

        def passes():
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen).to(x_norm.device)
                yield (x_norm[perm[i:i + self.batch_size]] for i in range(0, n, self.batch_size))

        self._train_batches(passes(), progress=False)
        self.n_fit_rows = n
        return self

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True) -> "TopKSAEConceptModel":
        """Train on a stream of batches ``(batch, d_model)`` with bounded memory.

        The first ``norm_rows`` rows are buffered to estimate the normalisation, then
        training starts on them and continues over the stream, re-cut into
        ``batch_size``-row batches. A one-shot iterator gets one pass; a re-iterable gets
        ``epochs`` passes.

        Returns:
            self.

        Raises:
            ValueError: wrong batch shape or empty stream.
        """
        reiterable = _is_reiterable(batches)
        n_passes = self.epochs if reiterable else 1
        if not reiterable and self.epochs > 1:
            logger.info("topk_sae.fit_stream: the stream is a one-shot iterator, training one pass "
                        "(epochs=%d needs a re-iterable such as a list or dataset)", self.epochs)
        first_pass = _rebatch(batches, self.batch_size, self.d_model, self.device)
        head: list[Tensor] = []
        n_head = 0
        for batch in first_pass:
            head.append(batch)
            n_head += batch.shape[0]
            if n_head >= self.norm_rows:
                break
        if n_head == 0:
            raise ValueError("fit_stream got an empty stream")
        self.set_normalization(torch.cat(head))
        self.sae = self._new_sae()
        counter = {"rows": 0}

        def normalized(stream: Iterable[Tensor]) -> Iterator[Tensor]:
            for b in stream:
                counter["rows"] += b.shape[0]
                yield self.normalize(b)

        def passes():
            yield normalized(_chain(head, first_pass))
            for _ in range(n_passes - 1):
                yield normalized(_rebatch(batches, self.batch_size, self.d_model, self.device))

        self._train_batches(passes(), progress=progress)
        self.n_fit_rows = counter["rows"] // n_passes
        return self

    # ---- inference

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        _, z = self.sae.encode(x_norm)
        return z

    def _decode_normalized(self, z: Tensor) -> Tensor:
        return z @ self._dict

    def _normalized_dictionary(self) -> Tensor:
        return self._dict

    # ---- state

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors["dictionary"] = self._dict
        return tensors

    def _load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "dictionary" not in tensors:
            raise ValueError("topk_sae state lacks tensor 'dictionary'")
        sae_state = {k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")}
        self.sae.load_state_dict(sae_state, strict=True)
        self._finalize()
        self._dict = tensors["dictionary"].to(self.device)  # the exact fused dictionary of the fit

    def _extra_config(self) -> dict[str, Any]:
        return {"history": self.history}

    def _load_extra_config(self, extra: dict[str, Any]) -> None:
        self.history = list(extra.get("history", []))


def _chain(head: list[Tensor], rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield from head
    yield from rest


# --------------------------------------------------------------------------- Semi-NMF


@register_concept_model
class SemiNMFConceptModel(ConceptModel):
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
    reconstructions). With ``solver="pgd"`` and ``l1_penalty > 0``, overcomplete's penalised
    code update is used instead (fixed steps, zero start). The state is the dictionary
    plus the normalisation.

    Args:
        nb_concepts: number of concepts.
        d_model: activation width.
        solver: overcomplete solver for the fit, ``"mu"`` (multiplicative updates) or
            ``"pgd"`` (projected gradient, supports ``l1_penalty``).
        max_iter: fit iterations (upper bound; overcomplete stops earlier at ``tol``).
        tol: fit stopping tolerance on the relative change of the codes.
        l1_penalty: L1 penalty on codes (``"pgd"`` solver only).
        encode_iters: FISTA iterations when encoding new rows (cost per row and iteration:
            ``O(nb_concepts^2)``).
        seed: seed of the sampling and of overcomplete's random initialisation.
        device: torch device.
        max_fit_rows: the most rows one fit uses.
        center: subtract the input mean first (default False).
        outlier_factor: see :class:`ConceptModel`.

    Raises:
        ValueError: invalid parameter values.
    """

    method = "semi_nmf"
    streaming = False

    def __init__(
        self,
        *,
        nb_concepts: int,
        d_model: int,
        solver: str = "mu",
        max_iter: int = 500,
        tol: float = 1e-4,
        l1_penalty: float = 0.0,
        encode_iters: int = 300,
        seed: int = 0,
        device: str = "cpu",
        max_fit_rows: int = 10_000,
        center: bool = False,
        outlier_factor: float = 10.0,
    ):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if solver not in ("mu", "pgd"):
            raise ValueError(f"solver must be 'mu' or 'pgd', got {solver!r}")
        if int(max_iter) < 1 or int(encode_iters) < 1:
            raise ValueError(f"max_iter and encode_iters must be >= 1, got {max_iter}, {encode_iters}")
        if l1_penalty and solver != "pgd":
            raise ValueError("l1_penalty is only used by solver='pgd'")
        self.solver = solver
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.l1_penalty = float(l1_penalty)
        self.encode_iters = int(encode_iters)
        self._D: Tensor | None = None  # (nb_concepts, d_model), normalised space
        self._lip: Tensor | None = None

    def fit(self, activations: Tensor) -> "SemiNMFConceptModel":
        """Fit on activations ``(n_rows, d_model)``; more than ``max_fit_rows`` rows are
        subsampled (seeded, logged).

        Returns:
            self.

        Raises:
            ValueError: wrong shape, or fewer rows than needed (``n_rows < 2``).
        """
        x = _as_rows(activations, self.d_model).detach()
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"semi_nmf needs at least 2 rows, got {n}")
        if n > self.max_fit_rows:
            gen = torch.Generator().manual_seed(self.seed)
            x = x[torch.randperm(n, generator=gen)[: self.max_fit_rows].to(x.device)]
            logger.info("semi_nmf.fit: using a seeded random subset of %d of %d rows (max_fit_rows)",
                        self.max_fit_rows, n)
        self.set_normalization(x)
        a = self.normalize(x)
        _overcomplete()
        from overcomplete.optimization import SemiNMF

        onc = SemiNMF(self.nb_concepts, solver=self.solver, device=self.device, tol=self.tol,
                      l1_penalty=self.l1_penalty, verbose=False)
        t0 = time.perf_counter()
        with _seeded(self.seed), torch.enable_grad():  # the 'pgd' solver uses autograd
            onc.fit(a, max_iter=self.max_iter)
        D = onc.get_dictionary().detach()
        if not torch.isfinite(D).all():
            raise ValueError("semi_nmf fit diverged (non-finite dictionary)")
        self._D = D.to(torch.float32).contiguous()
        self._lip = None
        self._fitted = True
        self.n_fit_rows = int(x.shape[0])
        logger.info("semi_nmf: fitted %d concepts on %d rows in %.1fs", self.nb_concepts, x.shape[0],
                    time.perf_counter() - t0)
        return self

    def _lipschitz(self) -> Tensor:
        """Largest eigenvalue of ``D D^T``: the Lipschitz constant of the NNLS gradient."""
        if self._lip is None:
            ddt = (self._D @ self._D.T).to(torch.float64)
            self._lip = torch.linalg.eigvalsh(ddt).max().clamp_min(1e-12).to(torch.float32)
        return self._lip

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        a = x_norm.detach()
        D = self._D
        if self.solver == "pgd" and self.l1_penalty:
            # overcomplete's own code update (Adam on the penalised loss), from a deterministic
            # start and for a fixed number of steps.
            from overcomplete.optimization.semi_nmf import snmf_projected_gradient_descent

            z0 = torch.zeros(a.shape[0], self.nb_concepts, device=a.device, dtype=a.dtype)
            with torch.enable_grad():
                    z, _ = snmf_projected_gradient_descent(a, z0, D, update_Z=True, update_D=False,
                                                       max_iter=self.encode_iters, tol=0.0,
                                                       l1_penalty=self.l1_penalty)
            return z.detach()
        # NNLS  min_{z >= 0} ||a - z D||^2  by accelerated projected gradient (FISTA, Beck &
        # Teboulle 2009) from z = 0 with step 1 / lambda_max(D D^T). Rows are independent.
        # (Ding et al.'s multiplicative update solves the same problem but converges far
        # more slowly: 3000 iterations do not reach what 200 FISTA iterations reach.)
        with torch.no_grad():
            q = D @ D.T  # (nb_concepts, nb_concepts)
            p = a @ D.T  # (n_rows, nb_concepts)
            inv_lip = 1.0 / self._lipschitz()
            z = torch.zeros_like(p)
            y = z
            t = 1.0
            for _ in range(self.encode_iters):
                z_next = (y - (y @ q - p) * inv_lip).clamp_min_(0)
                t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
                y = z_next + ((t - 1.0) / t_next) * (z_next - z)
                z, t = z_next, t_next
        return z

    def _decode_normalized(self, z: Tensor) -> Tensor:
        return z @ self._D

    def _normalized_dictionary(self) -> Tensor:
        return self._D

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"dictionary": self._D}

    def _load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if set(tensors) != {"dictionary"}:
            raise ValueError(f"semi_nmf state must hold exactly 'dictionary', got {sorted(tensors)}")
        D = tensors["dictionary"]
        if tuple(D.shape) != (self.nb_concepts, self.d_model):
            raise ValueError(f"semi_nmf dictionary has shape {tuple(D.shape)}, expected "
                             f"({self.nb_concepts}, {self.d_model})")
        self._D = D.to(torch.float32).contiguous()
        self._lip = None
