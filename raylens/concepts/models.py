"""Concept models: dictionaries learned on transformer activations.

A *concept model* factorises activation rows ``x`` of shape ``(n_rows, d_model)`` into
non-negative codes ``z`` of shape ``(n_rows, nb_concepts)`` and a dictionary ``D`` of
shape ``(nb_concepts, d_model)``::

    x  ~=  decode(encode(x))  =  encode(x) @ dictionary + decoder_bias

Every method is registered under a name (``method``) and is built with
:func:`build_concept_model`; a fitted model is written with :meth:`ConceptModel.save`
(``model.safetensors`` + ``config.json``, never pickle) and read back with
:func:`load_concept_model`.

Methods available now (each class docstring gives shapes, state, streaming, paper):

* SAEs, one training loop (:class:`SAEConceptModel`, :func:`sae_train_step`), all streaming:
  ``"topk_sae"`` (Gao et al. 2024), ``"batchtopk_sae"`` (Bussmann et al. 2024),
  ``"jumprelu_sae"`` (Rajamanoharan et al. 2024), ``"vanilla_sae"`` (ReLU + L1),
  ``"mp_sae"`` (matching pursuit), ``"archetypal_sae"`` (RA-SAE, Fel et al. 2025), wrapping
  ``overcomplete.sae``.
* Factorisations (:class:`DictionaryConceptModel` and Semi-NMF): ``"pca"`` (streams with
  IncrementalPCA), ``"kmeans"`` (MiniBatchKMeans), ``"nmf"`` (MiniBatchNMF, shifted input),
  ``"dictionary_learning"`` (MiniBatchDictionaryLearning) and ``"neurons"`` stream; ``"svd"``,
  ``"ica"``, ``"semi_nmf"``, ``"convex_nmf"`` and ``"archetypal_analysis"`` fit a bounded,
  seeded sample (``max_fit_rows``).

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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "ConceptModel",
    "SAEConceptModel",
    "DictionaryConceptModel",
    "TopKSAEConceptModel",
    "VanillaSAEConceptModel",
    "BatchTopKSAEConceptModel",
    "JumpReLUSAEConceptModel",
    "MPSAEConceptModel",
    "ArchetypalSAEConceptModel",
    "SemiNMFConceptModel",
    "NeuronsConceptModel",
    "PCAConceptModel",
    "SVDConceptModel",
    "ICAConceptModel",
    "KMeansConceptModel",
    "NMFConceptModel",
    "ConvexNMFConceptModel",
    "ArchetypalAnalysisConceptModel",
    "DictionaryLearningConceptModel",
    "build_concept_model",
    "load_concept_model",
    "register_concept_model",
    "available_methods",
    "sae_train_step",
    "reservoir_sample",
    "Reservoir",
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


class Reservoir:
    """Streaming uniform sample of at most ``max_rows`` rows (Algorithm R, vectorised per batch).

    ``add`` batches ``(batch, width)``; ``sample()`` returns the rows kept, float32
    ``(min(max_rows, n_seen), width)``. Same stream, batching and seed give the same sample.
    Memory ``O(max_rows * width)``. See :func:`reservoir_sample`.
    """

    def __init__(self, max_rows: int, *, seed: int = 0):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = int(max_rows)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.reservoir: Tensor | None = None
        self.n_seen = 0

    def add(self, batch: Tensor) -> None:
        """Offer a batch ``(batch, width)`` (float32 on the CPU) to the reservoir."""
        b = batch.shape[0]
        if b == 0:
            return
        max_rows, n_seen = self.max_rows, self.n_seen
        if self.reservoir is None:
            self.reservoir = torch.empty(max_rows, batch.shape[1], dtype=torch.float32)
        reservoir = self.reservoir
        fill = min(max(max_rows - n_seen, 0), b)
        if fill:
            reservoir[n_seen:n_seen + fill] = batch[:fill]
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
                reservoir[uniq] = rest[winners]
        self.n_seen += b

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
        res.add(_as_rows(batch, d_model, "batch").detach().cpu())
    if res.n_seen == 0:
        return torch.empty(0, d_model, dtype=torch.float32), 0
    return res.sample(), res.n_seen


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
        return {name: getattr(self, name) for name in _method_params(type(self))}

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
    """Keyword-only constructor parameters of ``cls``: those of the most derived ``__init__``,
    and of its parents' only while the constructors met so far forward ``**kwargs``."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        sig = inspect.signature(init).parameters
        for name, p in sig.items():
            if p.kind is p.KEYWORD_ONLY and name not in params:
                params[name] = p
        if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
            break
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


# --------------------------------------------------------------------------- SAEs


def sae_train_step(sae: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Tensor,
                   *, clip_grad: float | None = 1.0, penalty: Callable[..., Tensor] | None = None
                   ) -> dict[str, float]:
    """One Adam (or any optimizer) step of an overcomplete SAE on one batch; the single
    training step that in-memory, streaming and distributed (Ray Train) training all call.

    Loss: mean squared reconstruction error ``mean((batch - x_hat)^2)`` over
    ``(batch_rows, d_in)``, plus ``penalty(sae, batch, pre_codes, codes, x_hat)`` when given
    (the sparsity term of L1 or JumpReLU SAEs; TopK-style SAEs need none: Gao et al. 2024,
    "Scaling and evaluating sparse autoencoders"; a model's own penalty is
    ``model.penalty``). Gradients are clipped to global norm ``clip_grad`` (None: no
    clipping). overcomplete's dictionary layer re-projects its atoms on the unit sphere at
    every training-mode forward.

    Args:
        sae: an overcomplete SAE (``forward(x) -> (pre_codes, codes, x_hat)``), put in
            training mode by this function.
        optimizer: optimizer over ``sae.parameters()``.
        batch: input rows ``(batch_rows, d_in)`` already in the SAE's input space (for a
            concept model, ``model.normalize(x)``).
        clip_grad: global gradient-norm clip.
        penalty: optional extra loss term (a scalar tensor).

    Returns:
        ``dict(loss=float, mse=float, explained_variance=float, l0=float)``: total loss and
        reconstruction loss before the step, explained variance of the batch (1 - SSE/SST,
        <= 1, higher is better) and the mean number of active codes per row.

    Raises:
        ValueError: batch is not 2-D or the loss is not finite.
    """
    if batch.ndim != 2:
        raise ValueError(f"batch must be (batch_rows, d_in), got {tuple(batch.shape)}")
    sae.train()
    optimizer.zero_grad(set_to_none=True)
    pre_codes, codes, x_hat = sae(batch)
    err = (batch - x_hat).pow(2)
    mse = err.mean()
    loss = mse if penalty is None else mse + penalty(sae, batch, pre_codes, codes, x_hat)
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
            "mse": float(mse),
            "explained_variance": float(1 - sse / sst),
            "l0": float((codes != 0).sum(dim=1).float().mean()),
        }


def _chain(head: list[Tensor], rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield from head
    yield from rest


def _batchtopk_pre_hook(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a BatchTopK SAE: keep ``k_per_row * batch_rows`` codes per batch.

    overcomplete's ``BatchTopKSAE(top_k)`` counts ``top_k`` over the whole batch; raylens'
    ``top_k`` is per row (Bussmann et al. 2024), so the batch budget follows the batch size
    (a short last batch gets a proportionally smaller budget)."""
    x = args[0]
    module.top_k = max(1, min(int(module.k_per_row) * int(x.shape[0]), int(x.shape[0]) * int(module.nb_concepts)))


class SAEConceptModel(ConceptModel):
    """Shared base of the sparse-autoencoder concept models (overcomplete ``SAE`` subclasses).

    ``z = encoder((x - mean) / scale)`` of shape ``(n_rows, nb_concepts)``,
    ``x_hat = (z @ D) * scale + mean`` with the dictionary ``D (nb_concepts, d_model)`` of the
    SAE in the normalised space; ``mean`` (``(d_model,)``) is a fixed pre-encoder/decoder bias
    estimated on the first rows. Linear encoders start as ``D^T`` (Gao et al. 2024).

    Training (one loop for every SAE): Adam on the mean squared reconstruction error of
    normalised rows plus the method's :meth:`penalty`, in minibatches of ``batch_size`` rows,
    via :func:`sae_train_step`. :meth:`fit` runs ``epochs`` seeded-shuffled passes over an
    in-memory tensor; :meth:`fit_stream` runs one pass over a one-shot iterator (a
    generator), or ``epochs`` passes over a re-iterable (a list, a dataset), re-cutting the
    stream into ``batch_size``-row batches (no shuffling across batches: shuffle upstream).
    Normalisation statistics are estimated on the first ``norm_rows`` rows of the stream.
    All SAEs stream (``streaming = True``).

    State: the SAE's ``state_dict`` (``sae.*`` tensors), the fused dictionary of the fit
    (``dictionary``) and whatever a subclass adds (e.g. BatchTopK's inference threshold),
    plus the normalisation.

    Subclasses set ``method`` and implement :meth:`_build_sae` (and, when they need them,
    :meth:`penalty`, :meth:`_extra_sae_tensors`, :meth:`_load_extra_sae_tensors`).
    """

    streaming = True

    def __init__(
        self,
        *,
        nb_concepts: int,
        d_model: int,
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
        self._dict: Tensor | None = None  # fused dictionary (nb_concepts, d_model)
        self.history: list[dict[str, float]] = []

    def _post_init(self) -> None:
        """Build the (untrained) SAE once every subclass attribute is set."""
        self.sae = self._new_sae(None)

    # ---- construction

    @abc.abstractmethod
    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        """A fresh overcomplete SAE (called under a seeded RNG). ``sample``: normalised rows
        ``(n_rows, d_model)`` of the training data (None when building a placeholder)."""

    def _new_sae(self, sample: Tensor | None) -> torch.nn.Module:
        _overcomplete()
        with _seeded(self.seed):
            sae = self._build_sae(sample)
        # Gao et al. 2024: initialise a linear encoder as the transpose of the (unit-norm) decoder.
        linear = self._encoder_linear(sae)
        if linear is not None:
            with torch.no_grad():
                sae.train()
                D = sae.get_dictionary().detach()
                linear.weight.copy_(D / D.norm(dim=1, keepdim=True).clamp_min(1e-8))
                linear.bias.zero_()
        return sae

    @staticmethod
    def _encoder_linear(sae: torch.nn.Module) -> torch.nn.Linear | None:
        block = getattr(sae.encoder, "final_block", None)
        if isinstance(block, torch.nn.Sequential) and isinstance(block[0], torch.nn.Linear):
            return block[0]
        return None

    # ---- training

    def penalty(self, sae: torch.nn.Module, batch: Tensor, pre_codes: Tensor, codes: Tensor,
                x_hat: Tensor) -> Tensor | None:
        """Sparsity term added to the reconstruction loss (None: none, the default)."""
        return None

    def _penalty_fn(self) -> Callable[..., Tensor] | None:
        return None if type(self).penalty is SAEConceptModel.penalty else self.penalty

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the SAE parameters with this model's ``lr`` (for external training loops)."""
        for p in self.sae.parameters():
            p.requires_grad_(True)
        return torch.optim.Adam(self.sae.parameters(), lr=self.lr)

    def train_step(self, optimizer: torch.optim.Optimizer, batch_norm: Tensor) -> dict[str, float]:
        """:func:`sae_train_step` with this model's penalty and clipping, on normalised rows."""
        return sae_train_step(self.sae, optimizer, batch_norm, clip_grad=self.clip_grad or None,
                              penalty=self._penalty_fn())

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
            sums = {"loss": 0.0, "mse": 0.0, "explained_variance": 0.0, "l0": 0.0}
            n = 0
            for batch in _progress(batches, progress, f"{self.method} epoch {epoch + 1}"):
                stats = self.train_step(optimizer, batch)
                for k in sums:
                    sums[k] += stats[k]
                n += 1
                step += 1
            if n:
                record = {k: v / n for k, v in sums.items()} | {"epoch": epoch + 1, "steps": n}
                self.history.append(record)
                logger.info("%s epoch %d: loss %.4g, batch EV %.3f, L0 %.1f, %.1fs", self.method,
                            epoch + 1, record["loss"], record["explained_variance"], record["l0"],
                            time.perf_counter() - t0)
        if step == 0:
            raise ValueError("no training batch: empty activations/stream")
        self._finalize()

    def _finalize(self) -> None:
        """Freeze: eval mode, parameters without gradients, fused dictionary cached."""
        for p in self.sae.parameters():
            p.requires_grad_(False)
        # overcomplete's dictionary layers fuse (normalise) their dictionary when switched to
        # eval mode and keep that copy out of their state_dict: we keep our own copy and save it.
        self.sae.eval()
        with torch.no_grad():
            self._dict = self.sae.get_dictionary().detach().clone()
        self._fitted = True

    def fit(self, activations: Tensor) -> "SAEConceptModel":
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
        x_norm = self.normalize(x)
        self.sae = self._new_sae(x_norm[idx.to(x_norm.device)])

        def passes():
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen).to(x_norm.device)
                yield (x_norm[perm[i:i + self.batch_size]] for i in range(0, n, self.batch_size))

        self._train_batches(passes(), progress=False)
        self.n_fit_rows = n
        return self

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True) -> "SAEConceptModel":
        """Train on a stream of batches ``(batch, d_model)`` with bounded memory.

        The first ``norm_rows`` rows are buffered to estimate the normalisation (and, for
        methods that need data at construction such as the archetypal SAE, to build the
        SAE), then training starts on them and continues over the stream, re-cut into
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
            logger.info("%s.fit_stream: the stream is a one-shot iterator, training one pass "
                        "(epochs=%d needs a re-iterable such as a list or dataset)", self.method, self.epochs)
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
        head_x = torch.cat(head)
        self.set_normalization(head_x)
        self.sae = self._new_sae(self.normalize(head_x))
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

    def _extra_sae_tensors(self) -> dict[str, Tensor]:
        """State outside the SAE's ``state_dict`` that inference needs (override)."""
        return {}

    def _load_extra_sae_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`_extra_sae_tensors` wrote (called before freezing)."""

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors["dictionary"] = self._dict
        tensors.update(self._extra_sae_tensors())
        return tensors

    def _load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "dictionary" not in tensors:
            raise ValueError(f"{self.method} state lacks tensor 'dictionary'")
        sae_state = {k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")}
        self.sae.load_state_dict(sae_state, strict=True)
        self._load_extra_sae_tensors({k: v for k, v in tensors.items()
                                      if not k.startswith("sae.") and k != "dictionary"})
        self._finalize()
        self._dict = tensors["dictionary"].to(self.device)  # the exact fused dictionary of the fit
        # encoders that read the SAE's fused dictionary (matching pursuit) must see the same one
        if hasattr(self.sae.dictionary, "_fused_dictionary"):
            self.sae.dictionary._fused_dictionary = self._dict

    def _extra_config(self) -> dict[str, Any]:
        return {"history": self.history}

    def _load_extra_config(self, extra: dict[str, Any]) -> None:
        self.history = list(extra.get("history", []))


def _check_top_k(top_k: int | None, nb_concepts: int, default_div: int = 16) -> int:
    k = int(top_k) if top_k is not None else max(nb_concepts // default_div, 1)
    if not 1 <= k <= nb_concepts:
        raise ValueError(f"top_k must be in [1, nb_concepts={nb_concepts}], got {top_k}")
    return k


@register_concept_model
class TopKSAEConceptModel(SAEConceptModel):
    """TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders", arXiv 2406.04093), wrapping ``overcomplete.sae.TopKSAE``.

    ``z = TopK_k(ReLU(W_enc (x - mean) / scale + b_enc))`` of shape ``(n_rows, nb_concepts)``
    with at most ``top_k`` non-zeros per row; ``x_hat = (z @ D) * scale + mean`` with unit-norm
    atoms ``D (nb_concepts, d_model)`` in the normalised space. ``mean`` plays the role of
    Gao et al.'s pre-encoder/decoder bias (fixed, estimated on the first rows rather than
    learned); the encoder is initialised as ``D^T`` as in the paper.

    Streaming; training as in :class:`SAEConceptModel` (no sparsity penalty: TopK is the
    sparsity). No AuxK loss yet (dead latents are not revived). State: the SAE weights and
    the fused dictionary.

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
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, lr=lr, epochs=epochs, batch_size=batch_size,
                         seed=seed, device=device, max_fit_rows=max_fit_rows, center=center,
                         outlier_factor=outlier_factor, clip_grad=clip_grad)
        self.top_k = _check_top_k(top_k, self.nb_concepts)
        self._post_init()

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import TopKSAE

        return TopKSAE(self.d_model, nb_concepts=self.nb_concepts, top_k=self.top_k, device=self.device)


@register_concept_model
class VanillaSAEConceptModel(SAEConceptModel):
    """ReLU sparse autoencoder with an L1 penalty (the "vanilla" SAE of Bricken et al. 2023,
    "Towards Monosemanticity"; Cunningham et al. 2023, arXiv 2309.08600), wrapping
    ``overcomplete.sae.SAE`` with its linear encoder.

    ``z = ReLU(W_enc (x - mean) / scale + b_enc)`` ``(n_rows, nb_concepts)``;
    ``x_hat = (z @ D) * scale + mean`` with unit-norm atoms ``D (nb_concepts, d_model)``.
    Loss: ``mean((x_norm - x_hat_norm)^2) + l1_coef * mean_rows(||z||_1) / d_model``: since the
    normalised rows have a mean squared norm of about 1, ``l1_coef`` is the fraction of
    variance traded for one unit of code L1 norm. Sparsity is soft: codes below zero are
    cut, the rest are not thresholded. Streaming (see :class:`SAEConceptModel`). State: SAE
    weights and the fused dictionary.

    Args:
        l1_coef: L1 coefficient (see above).
        other arguments: as :class:`TopKSAEConceptModel`.

    Raises:
        ValueError: invalid parameter values.
    """

    method = "vanilla_sae"

    def __init__(
        self,
        *,
        nb_concepts: int,
        d_model: int,
        l1_coef: float = 0.05,
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
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, lr=lr, epochs=epochs, batch_size=batch_size,
                         seed=seed, device=device, max_fit_rows=max_fit_rows, center=center,
                         outlier_factor=outlier_factor, clip_grad=clip_grad)
        if not l1_coef >= 0:
            raise ValueError(f"l1_coef must be >= 0, got {l1_coef}")
        self.l1_coef = float(l1_coef)
        self._post_init()

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import SAE

        return SAE(self.d_model, nb_concepts=self.nb_concepts, device=self.device)

    def penalty(self, sae, batch, pre_codes, codes, x_hat):
        return self.l1_coef * codes.abs().sum(dim=1).mean() / batch.shape[1]


@register_concept_model
class BatchTopKSAEConceptModel(SAEConceptModel):
    """BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse
    Autoencoders", arXiv 2412.06410), wrapping ``overcomplete.sae.BatchTopKSAE``.

    Training keeps the ``top_k * batch_rows`` largest ReLU pre-activations of the whole batch
    (so rows get a variable number of latents, ``top_k`` on average); inference keeps the
    codes above a single threshold ``theta`` (a scalar in the normalised code space), the
    running average (momentum ``threshold_momentum``) of the batch's k-th largest value seen
    in training, so a row's code does not depend on the other rows of its batch.
    ``z (n_rows, nb_concepts)``; ``x_hat = (z @ D) * scale + mean``.

    overcomplete counts its ``top_k`` over the batch and keeps ``theta`` outside its
    ``state_dict``: raylens sets the batch budget from the per-row ``top_k`` before each
    forward (a pre-hook) and saves ``theta`` as the tensor ``batchtopk.threshold``. Streaming.

    Args:
        top_k: mean active latents per row (default ``max(nb_concepts // 16, 1)``).
        threshold_momentum: momentum of the running inference threshold.
        other arguments: as :class:`TopKSAEConceptModel`.

    Raises:
        ValueError: invalid parameter values.
    """

    method = "batchtopk_sae"

    def __init__(
        self,
        *,
        nb_concepts: int,
        d_model: int,
        top_k: int | None = None,
        threshold_momentum: float = 0.9,
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
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, lr=lr, epochs=epochs, batch_size=batch_size,
                         seed=seed, device=device, max_fit_rows=max_fit_rows, center=center,
                         outlier_factor=outlier_factor, clip_grad=clip_grad)
        self.top_k = _check_top_k(top_k, self.nb_concepts)
        if not 0 <= threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {threshold_momentum}")
        self.threshold_momentum = float(threshold_momentum)
        self._post_init()

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import BatchTopKSAE

        sae = BatchTopKSAE(self.d_model, nb_concepts=self.nb_concepts, top_k=self.top_k,
                           threshold_momentum=self.threshold_momentum, device=self.device)
        sae.k_per_row = self.top_k
        sae.register_forward_pre_hook(_batchtopk_pre_hook)
        return sae

    @property
    def threshold(self) -> float:
        """The inference threshold ``theta`` (normalised code units)."""
        self._check_fitted()
        return float(self.sae.running_threshold)

    def _extra_sae_tensors(self) -> dict[str, Tensor]:
        return {"batchtopk.threshold": torch.as_tensor(self.sae.running_threshold, dtype=torch.float32).reshape(())}

    def _load_extra_sae_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "batchtopk.threshold" not in tensors:
            raise ValueError("batchtopk_sae state lacks tensor 'batchtopk.threshold'")
        self.sae.running_threshold = tensors["batchtopk.threshold"].reshape(()).to(self.device)


@register_concept_model
class JumpReLUSAEConceptModel(SAEConceptModel):
    """JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping Ahead: Improving
    Reconstruction Fidelity with JumpReLU Sparse Autoencoders", arXiv 2407.14435), wrapping
    ``overcomplete.sae.JumpSAE``.

    ``z_i = h_i * [h_i > theta_i]`` with ``h = ReLU(W_enc x_norm + b_enc)`` and a learned
    threshold per latent ``theta = exp(log_theta)`` ``(nb_concepts,)``; codes ``z`` are
    ``(n_rows, nb_concepts)`` and ``x_hat = (z @ D) * scale + mean`` with unit-norm atoms
    ``D (nb_concepts, d_model)``. Loss: reconstruction MSE plus
    ``l0_coef * mean_rows(L0(z)) / d_model`` (``l0_coef``: the fraction of variance traded for
    one active latent), the L0 and the thresholds trained by the paper's kernel
    pseudo-gradient (``kernel``, ``bandwidth`` in normalised code units). Streaming. State:
    SAE weights including the log-thresholds (``sae.thresholds``) and the fused dictionary.

    Args:
        l0_coef: L0 coefficient (see above).
        bandwidth: kernel bandwidth of the pseudo-gradient.
        kernel: overcomplete kernel name (``"rectangle"`` as in the paper, ``"silverman"``...).
        other arguments: as :class:`TopKSAEConceptModel`.

    Raises:
        ValueError: invalid parameter values.
    """

    method = "jumprelu_sae"

    def __init__(
        self,
        *,
        nb_concepts: int,
        d_model: int,
        l0_coef: float = 0.005,
        bandwidth: float = 1e-2,
        kernel: str = "rectangle",
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
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, lr=lr, epochs=epochs, batch_size=batch_size,
                         seed=seed, device=device, max_fit_rows=max_fit_rows, center=center,
                         outlier_factor=outlier_factor, clip_grad=clip_grad)
        if not l0_coef >= 0:
            raise ValueError(f"l0_coef must be >= 0, got {l0_coef}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        _overcomplete()
        from overcomplete.sae import JumpSAE

        if kernel not in JumpSAE._KERNELS:
            raise ValueError(f"kernel must be one of {sorted(JumpSAE._KERNELS)}, got {kernel!r}")
        self.l0_coef = float(l0_coef)
        self.bandwidth = float(bandwidth)
        self.kernel = str(kernel)
        self._post_init()

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import JumpSAE

        return JumpSAE(self.d_model, nb_concepts=self.nb_concepts, kernel=self.kernel,
                       bandwidth=self.bandwidth, device=self.device)

    def penalty(self, sae, batch, pre_codes, codes, x_hat):
        from overcomplete.sae import heaviside

        l0 = heaviside(torch.relu(pre_codes), torch.exp(sae.thresholds), sae.kernel_fn, sae.bandwidth)
        return self.l0_coef * l0.sum(dim=1).mean() / batch.shape[1]

    @property
    def thresholds(self) -> Tensor:
        """Per-latent thresholds ``theta (nb_concepts,)`` in normalised code units."""
        self._check_fitted()
        return torch.exp(self.sae.thresholds.detach()).clone()


@register_concept_model
class MPSAEConceptModel(SAEConceptModel):
    """Matching-pursuit sparse autoencoder (MP-SAE: Costa et al. 2025, "From Flat to
    Hierarchical: Extracting Sparse Representations with Matching Pursuit", arXiv
    2506.03093; matching pursuit: Mallat & Zhang 1993), wrapping ``overcomplete.sae.MpSAE``.

    The encoder has no weights: ``top_k`` greedy steps each pick the atom most correlated
    with the residual ``r`` (start ``r = x_norm``), add ``<r, d_j>`` to code ``j`` and subtract
    it from ``r``. ``z (n_rows, nb_concepts)`` has at most ``top_k`` non-zeros (an atom can be
    picked twice); ``x_hat = (z @ D) * scale + mean`` with unit-norm atoms ``D``. The dictionary
    is trained through the pursuit by the shared SAE loop. Encoding is row-independent and
    deterministic. Streaming. State: the dictionary.

    Args:
        top_k: pursuit steps (default ``max(nb_concepts // 16, 1)``).
        other arguments: as :class:`TopKSAEConceptModel`.

    Raises:
        ValueError: invalid parameter values.
    """

    method = "mp_sae"

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
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, lr=lr, epochs=epochs, batch_size=batch_size,
                         seed=seed, device=device, max_fit_rows=max_fit_rows, center=center,
                         outlier_factor=outlier_factor, clip_grad=clip_grad)
        self.top_k = _check_top_k(top_k, self.nb_concepts)
        self._post_init()

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import MpSAE

        return MpSAE(self.d_model, nb_concepts=self.nb_concepts, k=self.top_k, device=self.device)


@register_concept_model
class ArchetypalSAEConceptModel(SAEConceptModel):
    """Relaxed archetypal TopK SAE (RA-SAE: Fel et al. 2025, "Archetypal SAE: Adaptive and
    Stable Dictionary Learning for Concept Extraction in Large Vision Models", ICML 2025,
    arXiv 2502.12892), wrapping ``overcomplete.sae.RATopKSAE``.

    Encoder as :class:`TopKSAEConceptModel` (codes ``(n_rows, nb_concepts)``, at most
    ``top_k`` non-zeros per row, ``x_hat = (z @ D) * scale + mean``); the dictionary is
    constrained near the convex hull of data: ``D = exp(m) * (W C + Lambda)`` with candidate points ``C (nb_candidates,
    d_model)``, a row-stochastic ``W (nb_concepts, nb_candidates)``, a relaxation
    ``Lambda (nb_concepts, d_model)`` with row norms ``<= delta`` and a learned scale ``m``.
    ``C`` are the k-means centroids (scikit-learn KMeans, seeded, as in the paper) of the
    normalised rows buffered first (``norm_rows`` of a stream, a seeded sample in memory).
    Streaming. State: SAE weights (``C`` included) and the fused dictionary.

    Args:
        top_k: active latents per row (default ``max(nb_concepts // 16, 1)``).
        nb_candidates: number of centroids in ``C`` (default ``4 * nb_concepts``); the first
            buffered sample must have at least that many rows.
        delta: relaxation bound (normalised rows have a norm of about 1).
        other arguments: as :class:`TopKSAEConceptModel`.

    Raises:
        ValueError: invalid parameter values, or too few rows for ``nb_candidates``.
    """

    method = "archetypal_sae"

    def __init__(
        self,
        *,
        nb_concepts: int,
        d_model: int,
        top_k: int | None = None,
        nb_candidates: int | None = None,
        delta: float = 0.1,
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
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, lr=lr, epochs=epochs, batch_size=batch_size,
                         seed=seed, device=device, max_fit_rows=max_fit_rows, center=center,
                         outlier_factor=outlier_factor, clip_grad=clip_grad)
        self.top_k = _check_top_k(top_k, self.nb_concepts)
        self.nb_candidates = int(nb_candidates) if nb_candidates is not None else 4 * self.nb_concepts
        if self.nb_candidates < self.nb_concepts:
            raise ValueError(f"nb_candidates must be >= nb_concepts={self.nb_concepts}, got {nb_candidates}")
        if not delta >= 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        self.delta = float(delta)
        self._post_init()

    def _candidates(self, sample: Tensor) -> Tensor:
        if sample.shape[0] < self.nb_candidates:
            raise ValueError(f"archetypal_sae needs at least nb_candidates={self.nb_candidates} rows in its "
                             f"first sample, got {sample.shape[0]}")
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=self.nb_candidates, n_init=1, max_iter=100, random_state=self.seed)
        km.fit(sample.detach().cpu().numpy().astype("float64"))
        return torch.as_tensor(km.cluster_centers_, dtype=torch.float32, device=self.device)

    def _build_sae(self, sample: Tensor | None) -> torch.nn.Module:
        from overcomplete.sae import RATopKSAE

        points = (torch.zeros(self.nb_candidates, self.d_model, device=self.device) if sample is None
                  else self._candidates(sample))
        return RATopKSAE(self.d_model, nb_concepts=self.nb_concepts, points=points, top_k=self.top_k,
                         delta=self.delta, use_multiplier=True, device=self.device)


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



# --------------------------------------------------------------------------- shared solvers


def _nonneg_fista(a: Tensor, D: Tensor, iters: int, *, l1: float = 0.0, lip: Tensor | None = None) -> Tensor:
    """Codes ``z (n_rows, nb_concepts)`` solving ``min_{z >= 0} 0.5 ||a - z D||^2 + l1 * sum(z)``
    for rows ``a (n_rows, d)`` and a dictionary ``D (nb_concepts, d)``: accelerated projected
    gradient (FISTA, Beck & Teboulle 2009) from ``z = 0`` with step ``1 / lambda_max(D D^T)``,
    exactly ``iters`` iterations. Rows are independent, so codes do not depend on batching."""
    with torch.no_grad():
        q = D @ D.T
        p = a @ D.T
        if lip is None:
            lip = torch.linalg.eigvalsh(q.to(torch.float64)).max().clamp_min(1e-12).to(a.dtype)
        inv_lip = 1.0 / lip
        z = torch.zeros_like(p)
        y = z
        t = 1.0
        for _ in range(iters):
            g = y - (y @ q - p) * inv_lip
            z_next = (g - l1 * inv_lip).clamp_min_(0) if l1 else g.clamp_min_(0)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = z_next + ((t - 1.0) / t_next) * (z_next - z)
            z, t = z_next, t_next
    return z


def _project_simplex(v: Tensor) -> Tensor:
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


def _simplex_fista(a: Tensor, D: Tensor, iters: int, lip: Tensor | None = None,
                   z0: Tensor | None = None) -> Tensor:
    """Codes on the simplex ``min_{z in simplex} 0.5 ||a - z D||^2`` by FISTA from ``z0`` (default
    the uniform point), exactly ``iters`` iterations; rows independent."""
    with torch.no_grad():
        q = D @ D.T
        p = a @ D.T
        if lip is None:
            lip = torch.linalg.eigvalsh(q.to(torch.float64)).max().clamp_min(1e-12).to(a.dtype)
        inv_lip = 1.0 / lip
        z = torch.full_like(p, 1.0 / D.shape[0]) if z0 is None else z0.clone()
        y = z
        t = 1.0
        for _ in range(iters):
            z_next = _project_simplex(y - (y @ q - p) * inv_lip)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = z_next + ((t - 1.0) / t_next) * (z_next - z)
            z, t = z_next, t_next
    return z


def _rebatch_min(batches: Iterable, size: int, d_model: int) -> Iterator[Tensor]:
    """Batches of exactly ``size`` rows on the CPU, except the last, which also takes the
    short remainder (``size <= rows < 2 * size``; fewer only when the whole stream is shorter),
    so every ``partial_fit`` sees at least ``size`` rows."""
    prev: Tensor | None = None
    for b in _rebatch(batches, size, d_model, "cpu"):
        if prev is None:
            prev = b
        elif b.shape[0] < size:
            prev = torch.cat([prev, b])
        else:
            yield prev
            prev = b
    if prev is not None:
        yield prev


def _np(x: Tensor):
    return x.detach().cpu().numpy()


def _t(a, device: str) -> Tensor:
    return torch.as_tensor(a, dtype=torch.float32).to(device).contiguous()


# --------------------------------------------------------------------------- linear dictionaries


class DictionaryConceptModel(ConceptModel):
    """Shared base of the concept models whose whole state is tensors: a dictionary
    ``D (nb_concepts, d_model)`` in the normalised space (``x_hat = (z @ D) * scale + mean``)
    plus named extra tensors (an encoder matrix, a neuron index...). Subclasses implement
    ``fit`` and ``_encode_normalized`` and list their extra tensor names in ``_extra_names``;
    ``self._D`` and ``self._extra`` hold the state. The non-streaming ones inherit the
    reservoir-sample :meth:`ConceptModel.fit_stream`; ``fit`` on more than ``max_fit_rows``
    rows then uses a seeded random subset (:meth:`_bounded`).
    """

    _extra_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._D: Tensor | None = None
        self._extra: dict[str, Tensor] = {}
        self._lip: Tensor | None = None

    def _bounded(self, activations: Tensor, min_rows: int = 2) -> Tensor:
        """Rows ``(n, d_model)`` as float32; a seeded random subset of ``max_fit_rows`` when more (logged)."""
        x = _as_rows(activations, self.d_model).detach()
        n = x.shape[0]
        if n < min_rows:
            raise ValueError(f"{self.method} needs at least {min_rows} rows, got {n}")
        if n > self.max_fit_rows:
            gen = torch.Generator().manual_seed(self.seed)
            x = x[torch.randperm(n, generator=gen)[: self.max_fit_rows].to(x.device)]
            logger.info("%s.fit: using a seeded random subset of %d of %d rows (max_fit_rows)",
                        self.method, self.max_fit_rows, n)
        return x

    def _set_state(self, D: Tensor, **extra: Tensor) -> None:
        D = _t(D, self.device)
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
        self._mean = self._mean + _t(mean_norm, self.device) * self._scale

    def _lipschitz(self) -> Tensor:
        if self._lip is None:
            self._lip = torch.linalg.eigvalsh((self._D @ self._D.T).to(torch.float64)).max().clamp_min(1e-12).to(
                torch.float32)
        return self._lip

    def _decode_normalized(self, z: Tensor) -> Tensor:
        return z @ self._D

    def _normalized_dictionary(self) -> Tensor:
        return self._D

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"dictionary": self._D, **{f"state.{k}": v for k, v in self._extra.items()}}

    def _load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        expected = {"dictionary", *(f"state.{k}" for k in self._extra_names)}
        if set(tensors) != expected:
            raise ValueError(f"{self.method} state must hold {sorted(expected)}, got {sorted(tensors)}")
        self._set_state(tensors["dictionary"],
                        **{k: tensors[f"state.{k}"] for k in self._extra_names})


class _PartialFitModel(DictionaryConceptModel):
    """Streaming through a scikit-learn estimator's ``partial_fit``: the first ``norm_rows``
    rows set the normalisation, then every batch (re-cut to at least ``batch_size`` rows)
    goes to ``partial_fit``; ``epochs`` passes over a re-iterable, one over an iterator."""

    streaming = True
    _stream_passes_follow_epochs: ClassVar[bool] = True

    def _partial_estimator(self):
        raise NotImplementedError

    def _fit_input(self, x_norm: Tensor):
        return _np(x_norm).astype("float64")

    def _adopt(self, est) -> None:
        raise NotImplementedError

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True) -> "ConceptModel":
        """Fit on a stream of batches ``(batch, d_model)`` with ``partial_fit``, bounded memory.

        Returns:
            self.

        Raises:
            ValueError: wrong batch shape, empty stream, or fewer than ``nb_concepts`` rows.
        """
        reiterable = _is_reiterable(batches)
        epochs = getattr(self, "epochs", 1) if self._stream_passes_follow_epochs else 1
        n_passes = epochs if reiterable else 1
        size = max(self.batch_size, self.nb_concepts)
        first = _rebatch_min(_progress(batches, progress, f"{self.method} pass 1"), size, self.d_model)
        head: list[Tensor] = []
        n_head = 0
        for b in first:
            head.append(b)
            n_head += b.shape[0]
            if n_head >= self.norm_rows:
                break
        if n_head == 0:
            raise ValueError("fit_stream got an empty stream")
        if n_head < self.nb_concepts:
            raise ValueError(f"{self.method} needs at least nb_concepts={self.nb_concepts} rows, got {n_head}")
        self.set_normalization(torch.cat(head))
        est = self._partial_estimator()
        rows = 0
        t0 = time.perf_counter()
        for p in range(n_passes):
            stream = _chain(head, first) if p == 0 else _rebatch_min(batches, size, self.d_model)
            for b in stream:
                rows += b.shape[0]
                est.partial_fit(self._fit_input(self.normalize(b).cpu()))
        self._adopt(est)
        self.n_fit_rows = rows // n_passes
        logger.info("%s: streamed %d rows x %d passes in %.1fs", self.method, self.n_fit_rows, n_passes,
                    time.perf_counter() - t0)
        return self


# --------------------------------------------------------------------------- neurons


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

    Args:
        nb_concepts: number of neurons kept (``<= d_model``).
        d_model: activation width.
        neurons: optional explicit dimension indices (``nb_concepts`` distinct ints).
        center: subtract the per-dimension mean (default True).
        other arguments: as :class:`ConceptModel`.

    Raises:
        ValueError: ``nb_concepts > d_model`` or invalid ``neurons``.
    """

    method = "neurons"
    streaming = True
    _extra_names = ("neurons",)

    def __init__(self, *, nb_concepts: int, d_model: int, neurons: list[int] | None = None, seed: int = 0,
                 device: str = "cpu", max_fit_rows: int = 10_000, center: bool = True,
                 outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if self.nb_concepts > self.d_model:
            raise ValueError(f"neurons: nb_concepts={self.nb_concepts} > d_model={self.d_model}")
        if neurons is not None:
            neurons = [int(i) for i in neurons]
            if len(neurons) != self.nb_concepts or len(set(neurons)) != len(neurons) or \
                    not all(0 <= i < self.d_model for i in neurons):
                raise ValueError(f"neurons must be {self.nb_concepts} distinct indices in [0, {self.d_model})")
        self.neurons = neurons

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

    def fit(self, activations: Tensor) -> "NeuronsConceptModel":
        """Mean and variance per dimension of ``(n_rows, d_model)``; picks the neurons. Returns self."""
        x = _as_rows(activations, self.d_model).detach().cpu().to(torch.float64)
        self._from_moments(x.shape[0], x.sum(0), x.pow(2).sum(0))
        return self

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True) -> "NeuronsConceptModel":
        """One pass of per-dimension sums over a stream of ``(batch, d_model)``. Returns self."""
        n, s, s2 = 0, torch.zeros(self.d_model, dtype=torch.float64), torch.zeros(self.d_model, dtype=torch.float64)
        for b in _progress(batches, progress, "neurons"):
            b = _as_rows(b, self.d_model, "batch").detach().cpu().to(torch.float64)
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


# --------------------------------------------------------------------------- PCA / SVD / ICA


@register_concept_model
class PCAConceptModel(_PartialFitModel):
    """Principal component analysis (Pearson 1901; Hotelling 1933) with scikit-learn.

    Codes are the coordinates on the top ``nb_concepts`` principal axes,
    ``z = (x_norm - mu) @ V^T`` ``(n_rows, nb_concepts)`` (signed), with orthonormal rows
    ``V (nb_concepts, d_model)`` as the dictionary and the exact data mean folded into the
    decoder bias. :meth:`fit` runs ``sklearn.decomposition.PCA`` (seeded) on all the rows it
    is given; :meth:`fit_stream` streams with ``IncrementalPCA.partial_fit`` (Ross et al.
    2008), one pass, batches of at least ``max(batch_size, nb_concepts)`` rows. State: ``V``
    and the explained variance per component (``state.explained_variance``, normalised units).

    Args:
        batch_size: rows per ``partial_fit``.
        other arguments: as :class:`ConceptModel`.
    """

    method = "pca"
    _extra_names = ("explained_variance",)
    _stream_passes_follow_epochs = False

    def __init__(self, *, nb_concepts: int, d_model: int, batch_size: int = 1024, seed: int = 0,
                 device: str = "cpu", max_fit_rows: int = 10_000, center: bool = True, outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if self.nb_concepts > self.d_model:
            raise ValueError(f"pca: nb_concepts={self.nb_concepts} > d_model={self.d_model}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

    def _partial_estimator(self):
        from sklearn.decomposition import IncrementalPCA

        return IncrementalPCA(n_components=self.nb_concepts)

    def _adopt(self, est) -> None:
        self._fold_mean(torch.as_tensor(est.mean_))
        self._set_state(torch.as_tensor(est.components_),
                        explained_variance=_t(est.explained_variance_, self.device))

    def fit(self, activations: Tensor) -> "PCAConceptModel":
        """PCA of ``(n_rows, d_model)`` (needs ``n_rows >= nb_concepts``). Returns self."""
        from sklearn.decomposition import PCA

        x = _as_rows(activations, self.d_model).detach()
        if x.shape[0] < self.nb_concepts:
            raise ValueError(f"pca needs at least nb_concepts={self.nb_concepts} rows, got {x.shape[0]}")
        self.set_normalization(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
                                 [: self.norm_rows].to(x.device)])
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

    Args:
        n_iter: randomized SVD power iterations.
        other arguments: as :class:`ConceptModel` (``center`` defaults to False).
    """

    method = "svd"
    streaming = False
    _extra_names = ("singular_values",)

    def __init__(self, *, nb_concepts: int, d_model: int, n_iter: int = 7, seed: int = 0, device: str = "cpu",
                 max_fit_rows: int = 10_000, center: bool = False, outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if self.nb_concepts >= self.d_model:
            raise ValueError(f"svd: nb_concepts must be < d_model={self.d_model}, got {self.nb_concepts}")
        self.n_iter = int(n_iter)

    def fit(self, activations: Tensor) -> "SVDConceptModel":
        """Truncated SVD of (a bounded seeded sample of) ``(n_rows, d_model)``. Returns self."""
        from sklearn.decomposition import TruncatedSVD

        x = self._bounded(activations, min_rows=self.nb_concepts + 1)
        self.set_normalization(x)
        est = TruncatedSVD(n_components=self.nb_concepts, n_iter=self.n_iter, random_state=self.seed)
        est.fit(_np(self.normalize(x)).astype("float64"))
        self._set_state(torch.as_tensor(est.components_), singular_values=_t(est.singular_values_, self.device))
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

    Args:
        max_iter: FastICA iterations.
        tol: FastICA tolerance.
        other arguments: as :class:`ConceptModel`.
    """

    method = "ica"
    streaming = False
    _extra_names = ("unmixing",)

    def __init__(self, *, nb_concepts: int, d_model: int, max_iter: int = 400, tol: float = 1e-4, seed: int = 0,
                 device: str = "cpu", max_fit_rows: int = 10_000, center: bool = True, outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if self.nb_concepts > self.d_model:
            raise ValueError(f"ica: nb_concepts={self.nb_concepts} > d_model={self.d_model}")
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def fit(self, activations: Tensor) -> "ICAConceptModel":
        """FastICA on (a bounded seeded sample of) ``(n_rows, d_model)``. Returns self."""
        import warnings

        from sklearn.decomposition import FastICA

        x = self._bounded(activations, min_rows=self.nb_concepts + 1)
        self.set_normalization(x)
        est = FastICA(n_components=self.nb_concepts, whiten="unit-variance", max_iter=self.max_iter, tol=self.tol,
                      random_state=self.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est.fit(_np(self.normalize(x)).astype("float64"))
        for w in caught:
            logger.info("ica: %s", w.message)
        self._fold_mean(torch.as_tensor(est.mean_))
        self._set_state(torch.as_tensor(est.mixing_.T), unmixing=_t(est.components_, self.device))
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return x_norm @ self._extra["unmixing"].T


# --------------------------------------------------------------------------- k-means


@register_concept_model
class KMeansConceptModel(_PartialFitModel):
    """k-means clustering (Lloyd 1982; k-means++ seeding: Arthur & Vassilvitskii 2007;
    mini-batch: Sculley 2010) with scikit-learn.

    Each concept is a centroid ``c_j`` (dictionary ``C (nb_concepts, d_model)``, normalised
    space); the code of a row is the one-hot indicator of its nearest centroid
    ``(n_rows, nb_concepts)``, so ``decode`` returns that centroid. (overcomplete's
    ``SkKMeans`` returns distances, which do not decode to a reconstruction.)
    :meth:`fit` runs ``KMeans`` (``n_init=1``, seeded) on the rows it is given;
    :meth:`fit_stream` streams with ``MiniBatchKMeans.partial_fit`` (``epochs`` passes over a
    re-iterable, one over an iterator). State: the centroids.

    Args:
        batch_size: rows per ``partial_fit``.
        epochs: passes over a re-iterable stream.
        max_iter: Lloyd iterations of the in-memory fit.
        other arguments: as :class:`ConceptModel`.
    """

    method = "kmeans"

    def __init__(self, *, nb_concepts: int, d_model: int, batch_size: int = 1024, epochs: int = 3,
                 max_iter: int = 100, seed: int = 0, device: str = "cpu", max_fit_rows: int = 10_000,
                 center: bool = True, outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if int(batch_size) < 1 or int(epochs) < 1 or int(max_iter) < 1:
            raise ValueError("batch_size, epochs and max_iter must be >= 1")
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.max_iter = int(max_iter)

    def _partial_estimator(self):
        from sklearn.cluster import MiniBatchKMeans

        return MiniBatchKMeans(n_clusters=self.nb_concepts, random_state=self.seed, n_init=1)

    def _adopt(self, est) -> None:
        self._set_state(torch.as_tensor(est.cluster_centers_))

    def fit(self, activations: Tensor) -> "KMeansConceptModel":
        """k-means on ``(n_rows, d_model)`` (needs ``n_rows >= nb_concepts``). Returns self."""
        from sklearn.cluster import KMeans

        x = _as_rows(activations, self.d_model).detach()
        if x.shape[0] < self.nb_concepts:
            raise ValueError(f"kmeans needs at least nb_concepts={self.nb_concepts} rows, got {x.shape[0]}")
        self.set_normalization(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
                                 [: self.norm_rows].to(x.device)])
        est = KMeans(n_clusters=self.nb_concepts, n_init=1, max_iter=self.max_iter, random_state=self.seed)
        self._adopt(est.fit(self._fit_input(self.normalize(x))))
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        d2 = self._D.pow(2).sum(dim=1) - 2 * (x_norm @ self._D.T)  # ||x - c||^2 - ||x||^2
        z = torch.zeros(x_norm.shape[0], self.nb_concepts, device=x_norm.device)
        return z.scatter_(1, d2.argmin(dim=1, keepdim=True), 1.0)


# --------------------------------------------------------------------------- NMF family


@register_concept_model
class NMFConceptModel(_PartialFitModel):
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

    Args:
        nonneg: ``"shift"`` or ``"relu"`` (see above).
        shift_quantile: quantile of each dimension used as the shift.
        max_iter: iterations of the in-memory fit.
        batch_size: rows per ``partial_fit``.
        epochs: passes over a re-iterable stream.
        encode_iters: FISTA iterations when encoding.
        other arguments: as :class:`ConceptModel`.
    """

    method = "nmf"

    def __init__(self, *, nb_concepts: int, d_model: int, nonneg: str = "shift", shift_quantile: float = 0.001,
                 max_iter: int = 300, batch_size: int = 1024, epochs: int = 3, encode_iters: int = 200,
                 seed: int = 0, device: str = "cpu", max_fit_rows: int = 10_000, outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=False, outlier_factor=outlier_factor)
        if nonneg not in ("shift", "relu"):
            raise ValueError(f"nonneg must be 'shift' or 'relu', got {nonneg!r}")
        if not 0 <= shift_quantile < 0.5:
            raise ValueError(f"shift_quantile must be in [0, 0.5), got {shift_quantile}")
        if min(int(max_iter), int(batch_size), int(epochs), int(encode_iters)) < 1:
            raise ValueError("max_iter, batch_size, epochs and encode_iters must be >= 1")
        self.nonneg = nonneg
        self.shift_quantile = float(shift_quantile)
        self.max_iter = int(max_iter)
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.encode_iters = int(encode_iters)

    def set_normalization(self, sample: Tensor) -> None:
        """Scale as :class:`ConceptModel`; the offset is the per-dimension ``shift_quantile``
        of ``sample`` (``nonneg="shift"``) or zero (``"relu"``)."""
        sample = _as_rows(sample, self.d_model, "sample").detach().cpu()
        if sample.shape[0] == 0:
            raise ValueError("cannot estimate the input normalisation from an empty sample")
        _, scale = _robust_stats(sample, True, self.outlier_factor)
        if self.nonneg == "shift":
            shift = torch.quantile(sample.to(torch.float64), self.shift_quantile, dim=0).to(torch.float32)
        else:
            shift = torch.zeros(self.d_model)
        self._mean, self._scale = shift.to(self.device), scale.to(self.device)

    def _fit_input(self, x_norm: Tensor):
        return _np(x_norm.clamp_min(0)).astype("float64")

    def _partial_estimator(self):
        from sklearn.decomposition import MiniBatchNMF

        return MiniBatchNMF(n_components=self.nb_concepts, init="nndsvda", batch_size=self.batch_size,
                            random_state=self.seed)

    def _adopt(self, est) -> None:
        self._set_state(torch.as_tensor(est.components_))

    def fit(self, activations: Tensor) -> "NMFConceptModel":
        """NMF of the shifted (or rectified) rows ``(n_rows, d_model)``. Returns self."""
        import warnings

        from sklearn.decomposition import NMF

        x = _as_rows(activations, self.d_model).detach()
        if x.shape[0] < 2:
            raise ValueError(f"nmf needs at least 2 rows, got {x.shape[0]}")
        self.set_normalization(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
                                 [: self.norm_rows].to(x.device)])
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
        return _nonneg_fista(x_norm, self._D, self.encode_iters, lip=self._lipschitz())


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
    ``max_fit_rows`` rows (``W`` is ``nb_concepts x n_fit``). State: ``D``.

    Args:
        max_iter: solver iterations.
        tol: solver tolerance on the codes.
        l1_penalty: L1 penalty on the codes during the fit.
        encode_iters: FISTA iterations when encoding.
        other arguments: as :class:`ConceptModel`.
    """

    method = "convex_nmf"
    streaming = False

    def __init__(self, *, nb_concepts: int, d_model: int, max_iter: int = 500, tol: float = 1e-4,
                 l1_penalty: float = 0.0, encode_iters: int = 200, seed: int = 0, device: str = "cpu",
                 max_fit_rows: int = 4096, center: bool = True, outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if int(max_iter) < 1 or int(encode_iters) < 1:
            raise ValueError("max_iter and encode_iters must be >= 1")
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.l1_penalty = float(l1_penalty)
        self.encode_iters = int(encode_iters)

    def fit(self, activations: Tensor) -> "ConvexNMFConceptModel":
        """Convex NMF of (a bounded seeded sample of) ``(n_rows, d_model)``. Returns self."""
        x = self._bounded(activations, min_rows=self.nb_concepts)
        self.set_normalization(x)
        a = self.normalize(x)
        _overcomplete()
        from overcomplete.optimization import ConvexNMF

        est = ConvexNMF(self.nb_concepts, device=self.device, tol=self.tol, solver="pgd",
                        l1_penalty=self.l1_penalty)
        with _seeded(self.seed), torch.enable_grad():
            est.fit(a, max_iter=self.max_iter)
        self._set_state(est.get_dictionary().detach())
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return _nonneg_fista(x_norm, self._D, self.encode_iters, lip=self._lipschitz())


def _furthest_sum(a: Tensor, k: int, seed: int) -> Tensor:
    """FurthestSum initialisation of archetypal analysis (Mørup & Hansen 2012): indices of
    ``k`` rows of ``a (n, d)``, each maximising its summed distance to those already chosen,
    from a seeded random start (which is then replaced, as in the paper)."""
    n = a.shape[0]
    gen = torch.Generator().manual_seed(seed)
    start = int(torch.randint(n, (1,), generator=gen))
    chosen = [start]
    dist_sum = torch.zeros(n, dtype=torch.float64, device=a.device)
    sq = a.pow(2).sum(dim=1)
    for step in range(k + 1):
        last = chosen[-1]
        d = (sq - 2 * (a @ a[last]) + sq[last]).clamp_min(0).sqrt().to(torch.float64)
        dist_sum += d
        if step == k:
            break
        masked = dist_sum.clone()
        masked[torch.tensor(chosen, device=a.device)] = -1
        chosen.append(int(masked.argmax()))
    # drop the random start, keep the k furthest points
    return torch.tensor(chosen[1:k + 1], dtype=torch.long)


@register_concept_model
class ArchetypalAnalysisConceptModel(DictionaryConceptModel):
    """Archetypal analysis (Cutler & Breiman 1994, "Archetypal Analysis", Technometrics 36(4)).

    Archetypes ``D = W A`` ``(nb_concepts, d_model)`` are convex combinations of the fit rows
    ``A`` (rows of ``W (nb_concepts, n_fit)`` on the simplex) and every row is approximated by a
    convex combination of archetypes: codes ``z (n_rows, nb_concepts)`` on the simplex
    (non-negative, summing to 1). The model is translation-equivariant, but the solver's
    step sizes are much better conditioned on centred rows, so ``center=True`` by default
    (measured on SmolLM2 layer 15, 16 archetypes, 30 alternations: held-out explained
    variance 0.07 centred vs -0.02 uncentred); archetypes in activation space are
    ``dictionary + decoder_bias``.

    Solver (raylens'): FurthestSum initialisation (Mørup & Hansen 2012, "Archetypal analysis
    for machine learning and data mining"), then ``max_iter`` alternations of a warm-started
    FISTA step on ``Z`` and ``w_steps`` projected-gradient steps on ``W``, both with the
    Euclidean projection on the simplex (Duchi et al. 2008). overcomplete 0.3.0's
    ``ArchetypalAnalysis`` re-applies a softmax to already-stochastic rows at every step,
    which drives codes to uniform: measured on SmolLM2 layer-15 activations, 32 archetypes,
    held-out explained variance about 0.00 after 300 or 1000 iterations. Encoding new rows
    solves ``min_{z in simplex} ||x_norm - z D||^2`` by FISTA from the uniform point
    (``encode_iters``; deterministic, row-independent). Not streaming: fits a bounded seeded
    sample of ``max_fit_rows`` rows. State: ``D``.

    Args:
        max_iter: alternations.
        z_steps: FISTA iterations on ``Z`` per alternation.
        w_steps: projected-gradient steps on ``W`` per alternation.
        encode_iters: FISTA iterations when encoding.
        other arguments: as :class:`ConceptModel`.
    """

    method = "archetypal_analysis"
    streaming = False

    def __init__(self, *, nb_concepts: int, d_model: int, max_iter: int = 100, z_steps: int = 20,
                 w_steps: int = 5, encode_iters: int = 200, seed: int = 0, device: str = "cpu",
                 max_fit_rows: int = 4096, center: bool = True, outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if min(int(max_iter), int(z_steps), int(w_steps), int(encode_iters)) < 1:
            raise ValueError("max_iter, z_steps, w_steps and encode_iters must be >= 1")
        self.max_iter = int(max_iter)
        self.z_steps = int(z_steps)
        self.w_steps = int(w_steps)
        self.encode_iters = int(encode_iters)

    def fit(self, activations: Tensor) -> "ArchetypalAnalysisConceptModel":
        """Archetypal analysis of (a bounded seeded sample of) ``(n_rows, d_model)``. Returns self."""
        x = self._bounded(activations, min_rows=self.nb_concepts + 1)
        self.set_normalization(x)
        a = self.normalize(x).detach()
        n, k = a.shape[0], self.nb_concepts
        t0 = time.perf_counter()
        with torch.no_grad():
            W = torch.zeros(k, n, device=a.device)
            W[torch.arange(k), _furthest_sum(a, k, self.seed).to(a.device)] = 1.0
            D = W @ a
            lip_a = torch.linalg.matrix_norm(a.to(torch.float64), ord=2).pow(2).to(torch.float32)
            Z = None
            for _ in range(self.max_iter):
                Z = _simplex_fista(a, D, self.z_steps, z0=Z)
                ztz = Z.T @ Z
                step = 1.0 / (torch.linalg.eigvalsh(ztz.to(torch.float64)).max().clamp_min(1e-12).to(torch.float32)
                              * lip_a)
                zta = Z.T @ a
                for _ in range(self.w_steps):
                    W = _project_simplex(W - ((ztz @ D - zta) @ a.T) * step)
                    D = W @ a
        self._set_state(D)
        self.n_fit_rows = n
        logger.info("archetypal_analysis: %d archetypes from %d rows in %.1fs", k, n, time.perf_counter() - t0)
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return _simplex_fista(x_norm, self._D, self.encode_iters, lip=self._lipschitz())


@register_concept_model
class DictionaryLearningConceptModel(_PartialFitModel):
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

    Args:
        alpha: L1 weight (normalised rows have a norm of about 1).
        batch_size: rows per mini-batch.
        max_iter: epochs of the in-memory fit.
        epochs: passes over a re-iterable stream.
        encode_iters: FISTA iterations when encoding.
        other arguments: as :class:`ConceptModel`.
    """

    method = "dictionary_learning"

    def __init__(self, *, nb_concepts: int, d_model: int, alpha: float = 0.05, batch_size: int = 256,
                 max_iter: int = 10, epochs: int = 3, encode_iters: int = 200, seed: int = 0, device: str = "cpu",
                 max_fit_rows: int = 10_000, center: bool = True, outlier_factor: float = 10.0):
        super().__init__(nb_concepts=nb_concepts, d_model=d_model, seed=seed, device=device,
                         max_fit_rows=max_fit_rows, center=center, outlier_factor=outlier_factor)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if min(int(batch_size), int(max_iter), int(epochs), int(encode_iters)) < 1:
            raise ValueError("batch_size, max_iter, epochs and encode_iters must be >= 1")
        self.alpha = float(alpha)
        self.batch_size = int(batch_size)
        self.max_iter = int(max_iter)
        self.epochs = int(epochs)
        self.encode_iters = int(encode_iters)

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

    def fit(self, activations: Tensor) -> "DictionaryLearningConceptModel":
        """Mini-batch dictionary learning on ``(n_rows, d_model)``. Returns self."""
        x = _as_rows(activations, self.d_model).detach()
        if x.shape[0] < self.nb_concepts:
            raise ValueError(f"dictionary_learning needs at least nb_concepts={self.nb_concepts} rows, "
                             f"got {x.shape[0]}")
        self.set_normalization(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
                                 [: self.norm_rows].to(x.device)])
        self._adopt(self._estimator(self.max_iter).fit(self._fit_input(self.normalize(x))))
        self.n_fit_rows = int(x.shape[0])
        return self

    def _encode_normalized(self, x_norm: Tensor) -> Tensor:
        return _nonneg_fista(x_norm, self._D, self.encode_iters, l1=self.alpha, lip=self._lipschitz())
