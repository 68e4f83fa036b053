"""The concept-model contract, the registry of methods, parameter checks, and the save format.

A *concept model* factorises activation rows ``x`` of shape ``(n_rows, d_model)`` into
codes ``z`` of shape ``(n_rows, nb_concepts)`` and a dictionary ``D`` of shape
``(nb_concepts, d_model)``::

    x  ~=  decode(encode(x))  =  encode(x) @ dictionary + decoder_bias

Every method is a :class:`ConceptModel` subclass registered under a name (``method``) with
:func:`register_concept_model`; the registry is the only list of method names. A model is
built with :func:`build_concept_model` (cheap: the constructor only checks and stores the
parameters, the work happens in ``fit``), its parameters can be checked without building it
(:func:`check_params`), and a fitted model is written with :meth:`ConceptModel.save`
(``model.safetensors`` + ``config.json``, never pickle, no device) and read back on any
device with :func:`load_concept_model`.

Input normalisation. Residual-stream activations of LLMs contain a few rows (and
dimensions) with huge norms. Every model therefore works on ``(x - mean) / scale``
internally, where ``mean`` (``(d_model,)``, zero when the method does not centre) and
``scale`` (a scalar) are estimated robustly (rows far from the bulk are left out of the
estimate) on the first rows it sees. Both are part of the saved state, and
``encode``/``decode``/``dictionary`` are all expressed in the original activation space.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from raylens.concepts.models.params import Param, coerce, resolve_params
from raylens.concepts.models.streaming import as_rows, progress_bar, reservoir_sample, robust_stats
from raylens.io.safety import refuse_pickle_files

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "ConceptModel",
    "available_methods",
    "build_concept_model",
    "check_params",
    "concept_model_class",
    "device_available",
    "load_concept_model",
    "register_concept_model",
    "unregister_concept_model",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: ``format`` field of ``config.json`` and of the safetensors metadata.
FORMAT = "raylens.concept_model"
#: Newest ``format_version`` this code reads and the one it writes.
FORMAT_VERSION = 1

_REGISTRY: dict[str, type[ConceptModel]] = {}
_SIZE = Param(None, int, low=1)


class ConceptModel(abc.ABC):
    """Abstract concept model: codes ``z (n_rows, nb_concepts)`` and a dictionary
    ``(nb_concepts, d_model)`` learned on activations ``x (n_rows, d_model)``.

    The constructor checks and stores the parameters (``nb_concepts``, ``d_model`` and those
    declared in :attr:`parameters`) and does nothing else; the work happens in :meth:`fit`.

    Class attributes a subclass sets:
        method: registry name, e.g. ``"topk_sae"``.
        streaming: True when :meth:`fit_stream` trains on the whole stream, False when it
            fits a bounded reservoir sample of ``max_fit_rows`` rows.
        resumable: True when :meth:`fit_stream` checkpoints, resumes and observes its last epoch.
        parameters: the parameters the class adds (name -> :class:`Param`); re-declaring a
            parent's parameter changes its default.
        fixed_params: parents' parameters the method does not let users set, with their value.

    Parameters every method has:
        nb_concepts: number of concepts (columns of the codes, rows of the dictionary).
        d_model: width of the activations.
        seed: seed of every random draw (initialisation, shuffling, sampling).
        device: torch device the model computes on (not saved: see :func:`load_concept_model`).
        max_fit_rows: for non-streaming methods, the most rows one fit uses.
        center: subtract the input mean before encoding.
        outlier_factor: rows farther than this many times the median distance from the
            median are ignored when estimating the input mean and scale.

    Attributes:
        n_fit_rows: rows seen by the last fit (saved).

    A subclass implements :meth:`fit`, :meth:`_encode_normalized`, :meth:`_decode_normalized`,
    :meth:`_normalized_dictionary`, :meth:`_state_tensors` and :meth:`_load_state_tensors`, and
    may override :meth:`check_relations` for constraints between parameters.

    Raises:
        ValueError: (constructor) as :func:`check_params`.
    """

    method: ClassVar[str] = ""
    streaming: ClassVar[bool] = False
    #: True when :meth:`fit_stream` also takes ``checkpoint=`` and ``observer=`` (see
    #: :meth:`raylens.concepts.models.sae.SAEConceptModel.fit_stream`): iterative methods.
    resumable: ClassVar[bool] = False
    #: Rows used to estimate the input normalisation (mean, scale).
    norm_rows: ClassVar[int] = 8192
    parameters: ClassVar[dict[str, Param]] = {
        "seed": Param(0, int, doc="seed of every random draw"),
        "device": Param("cpu", str, doc="torch device (not saved)"),
        "max_fit_rows": Param(10_000, int, low=1, doc="most rows one non-streaming fit uses"),
        "center": Param(True, bool, doc="subtract the input mean first"),
        "outlier_factor": Param(10.0, float, low=1, low_open=True,
                                doc="rows beyond this many median distances are left out of mean and scale"),
    }
    fixed_params: ClassVar[dict[str, Any]] = {}

    n_fit_rows: int = 0
    _mean: Tensor | None = None  # (d_model,)
    _scale: Tensor | None = None  # ()
    _fitted: bool = False

    def __init__(self, *, nb_concepts: int, d_model: int, **params: Any):
        if d_model is None:
            raise ValueError(f"d_model: required to build a {self.method} model")
        if isinstance(params.get("device"), torch.device):
            params["device"] = str(params["device"])
        values = type(self).resolve_params(params, nb_concepts=nb_concepts, d_model=d_model)
        for name, value in {**values, **self.fixed_params}.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ parameters

    @classmethod
    def declared_params(cls) -> dict[str, Param]:
        """Every parameter of the method but ``nb_concepts`` and ``d_model`` (name -> :class:`Param`),
        the class's own first, then its parents'."""
        declared: dict[str, Param] = {}
        fixed: set[str] = set()
        for klass in cls.__mro__:
            fixed |= set(klass.__dict__.get("fixed_params", {}))
            for name, param in klass.__dict__.get("parameters", {}).items():
                declared.setdefault(name, param)
        return {name: p for name, p in declared.items() if name not in fixed}

    @classmethod
    def check_relations(cls, values: dict[str, Any], *, nb_concepts: int, d_model: int | None) -> None:
        """Constraints between parameters, and with the model's size (override; the default has none).

        Args:
            values: every parameter's resolved value.
            nb_concepts: number of concepts.
            d_model: activation width, None when unknown (skip the checks that need it).

        Raises:
            ValueError: the message starts with the name of the parameter at fault.
        """

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], *, nb_concepts: int,
                       d_model: int | None) -> dict[str, Any]:
        """Every parameter's value (defaults filled in, values coerced), all of them checked.

        Raises:
            ValueError: as :func:`check_params`.
        """
        if "nb_concepts" in params or "d_model" in params:
            name = "nb_concepts" if "nb_concepts" in params else "d_model"
            raise ValueError(f"{name}: not a method parameter of {cls.method} (it is set on its own)")
        nb_concepts = coerce("nb_concepts", _SIZE, nb_concepts)
        if nb_concepts < 1:
            raise ValueError(f"nb_concepts: must be >= 1, got {nb_concepts}")
        if d_model is not None:
            d_model = coerce("d_model", _SIZE, d_model)
            if d_model < 1:
                raise ValueError(f"d_model: must be >= 1, got {d_model}")
        values = resolve_params(cls.declared_params(), params, method=cls.method, nb_concepts=nb_concepts,
                                d_model=d_model)
        cls.check_relations(values, nb_concepts=nb_concepts, d_model=d_model)
        return {"nb_concepts": nb_concepts, "d_model": d_model, **values}

    def get_params(self) -> dict[str, Any]:
        """Parameters of this model (JSON-serialisable), ``nb_concepts`` and ``d_model``
        included; ``build_concept_model(self.method, **self.get_params())`` rebuilds an
        unfitted twin."""
        return {name: getattr(self, name) for name in ("nb_concepts", "d_model", *self.declared_params())}

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
        sample = as_rows(sample, self.d_model, "sample")
        if sample.shape[0] == 0:
            raise ValueError("cannot estimate the input normalisation from an empty sample")
        mean, scale = robust_stats(sample.detach().cpu(), self.center, self.outlier_factor)
        self._mean, self._scale = mean.to(self.device), scale.to(self.device)

    def normalize(self, x: Tensor) -> Tensor:
        """Map activations ``(n_rows, d_model)`` to the model's input space ``(x - mean) / scale``.

        Raises:
            RuntimeError: normalisation not estimated yet.
            ValueError: wrong shape.
        """
        if self._scale is None:
            raise RuntimeError("input normalisation not estimated yet (fit the model first)")
        x = as_rows(x, self.d_model).to(self.device)
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
    def fit(self, activations: Tensor) -> ConceptModel:
        """Fit on activations ``(n_rows, d_model)`` held in memory; returns self.

        Raises:
            ValueError: wrong shape or too few rows.
        """

    def fit_stream(self, batches: Iterable[Tensor], *, progress: bool = True) -> ConceptModel:
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
            progress_bar(batches, progress, f"sampling for {self.method}"),
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
        """Concept codes of activations ``x (n_rows, d_model)`` (any float dtype, original space).

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
        """Activations reconstructed from codes ``z (n_rows, nb_concepts)``: ``z @ dictionary + decoder_bias``.

        Differentiable with torch autograd with respect to ``z`` (concept importance
        gradients go through it); the model's own parameters do not require gradients.

        Returns:
            activations ``(n_rows, d_model)`` in the original (un-normalised) space, float32,
            on ``z``'s device.

        Raises:
            RuntimeError: model not fitted.
            ValueError: wrong shape.
        """
        self._check_fitted()
        z = as_rows(z, self.nb_concepts, "codes")
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
        """Write ``model.safetensors`` (tensors, on the CPU) and ``config.json`` (method,
        parameters but the device, fit metadata) into ``directory`` (created if needed). No pickle.

        Returns:
            the directory.

        Raises:
            RuntimeError: model not fitted.
        """
        self._check_fitted()
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"norm.mean": self._mean, "norm.scale": self._scale.reshape(()), **self._state_tensors()}
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT, "method": self.method})
        params = {k: v for k, v in self.get_params().items() if k != "device"}
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method, "params": params,
                  "n_fit_rows": self.n_fit_rows, "extra": self._extra_config()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    def _restore(self, tensors: dict[str, Tensor], config: Mapping[str, Any]) -> None:
        """Become the fitted model that :meth:`save` wrote (tensors on the CPU, ``config.json``)."""
        for key in ("norm.mean", "norm.scale"):
            if key not in tensors:
                raise ValueError(f"concept model weights lack tensor {key!r}")
        self._mean = tensors.pop("norm.mean").to(self.device)
        self._scale = tensors.pop("norm.scale").reshape(()).to(self.device)
        self._load_state_tensors({k: v.to(self.device) for k, v in tensors.items()})
        self.n_fit_rows = int(config.get("n_fit_rows", 0))
        self._load_extra_config(config.get("extra", {}))
        self._fitted = True

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
        """Restore a fitted model from :meth:`_state_tensors` output (tensors on ``self.device``)."""

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


def unregister_concept_model(method: str) -> None:
    """Remove ``method`` from the registry (a no-op when it is not there)."""
    _REGISTRY.pop(method, None)


def available_methods() -> list[str]:
    """Sorted names of the registered concept methods."""
    return sorted(_REGISTRY)


def concept_model_class(method: str) -> type[ConceptModel]:
    """The class registered under ``method``.

    Raises:
        ValueError: ``"method: unknown concept method ...; known: [...]"``.
    """
    cls = _REGISTRY.get(method)
    if cls is None:
        raise ValueError(f"method: unknown concept method {method!r}; known: {available_methods()}")
    return cls


def check_params(method: str, params: Mapping[str, Any], *, nb_concepts: int, d_model: int | None = None) -> None:
    """Check a method's name and parameters without building anything.

    Args:
        method: registry name (:func:`available_methods`).
        params: method parameters, e.g. ``{"top_k": 8, "lr": 1e-3}`` (not ``nb_concepts``/``d_model``).
        nb_concepts: number of concepts.
        d_model: activation width; None when not known yet (checks that need it are skipped).

    Raises:
        ValueError: unknown method, unknown parameter, a value of the wrong type or out of
            range; the message starts with the parameter's name, e.g.
            ``"top_k: must be <= nb_concepts (8), got 1000"``,
            ``"top_kk: unknown parameter of topk_sae; known: [...]"``.
    """
    concept_model_class(method).resolve_params(params, nb_concepts=nb_concepts, d_model=d_model)


def build_concept_model(method: str, *, nb_concepts: int, d_model: int, **params: Any) -> ConceptModel:
    """Build an unfitted concept model by registry name (cheap: nothing is trained or allocated).

    Args:
        method: registry name, one of :func:`available_methods` (``"topk_sae"``, ``"semi_nmf"``).
        nb_concepts: number of concepts.
        d_model: width of the activations ``(n_rows, d_model)``.
        **params: method parameters (see the method class), e.g. ``top_k=16, lr=1e-3``.

    Returns:
        the unfitted :class:`ConceptModel`.

    Raises:
        ValueError: as :func:`check_params` (the constructor runs the same check).
    """
    return concept_model_class(method)(nb_concepts=nb_concepts, d_model=d_model, **params)


def device_available(device: str) -> bool:
    """True when torch can compute on ``device`` here (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``...)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return False
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def load_concept_model(directory: str | Path, device: str | None = None) -> ConceptModel:
    """Load a model written by :meth:`ConceptModel.save`; ``encode`` outputs are identical.

    Args:
        directory: folder holding ``config.json`` and ``model.safetensors``.
        device: torch device to load on. None: the device saved by an older raylens when
            this machine has it, else ``"cpu"`` (models saved now hold no device).

    Returns:
        the fitted :class:`ConceptModel`, on ``device``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: not a raylens concept model, unknown method, missing tensors, or a
            ``device`` this machine does not have.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    refuse_pickle_files(directory)  # raylens.io.safety.UnsafeFileError naming a planted pickle file
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"concept model file not found: {p}")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a raylens concept model (format={config.get('format')!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {config['format_version']}, newer than {FORMAT_VERSION}")
    params = dict(config["params"])
    saved = params.pop("device", None)
    if device is None:
        device = saved if saved is not None and device_available(saved) else "cpu"
    elif not device_available(device):
        raise ValueError(f"device: {device!r} is not available on this machine")
    model = build_concept_model(config["method"], nb_concepts=params.pop("nb_concepts"),
                                d_model=params.pop("d_model"), device=device, **params)
    model._restore(load_file(str(weights_path), device="cpu"), config)
    return model
