"""Load a Hugging Face model and tokenizer from a built-in name, a local folder or a hub id."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from raylens.io.safety import refuse_pickle_files
from raylens.models.builtins import BUILTIN_MODELS, builtin_config_path, builtin_model_path

log = logging.getLogger(__name__)

Task = Literal["causal_lm", "sequence_classification", "base"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclasses.dataclass
class LoadedModel:
    """A model, its tokenizer and its task.

    Attributes:
        model: the ``transformers`` model, in eval mode, gradients off for its parameters.
        tokenizer: its (fast) tokenizer; has a pad token.
        task: ``"causal_lm"`` (next-token logits ``(n_samples, n_tokens, vocab)``),
            ``"sequence_classification"`` (class logits ``(n_samples, n_classes)``) or ``"base"``
            (an encoder or decoder without a head: no output to explain).
        source: the name, folder or hub id it was loaded from.
    """

    model: Any
    tokenizer: Any
    task: Task
    source: str

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where inputs must go)."""
        return self.model.get_input_embeddings().weight.device


def resolve_model_source(name_or_path: str) -> str:
    """Map a built-in name to its cached folder; leave folders and hub ids as they are."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path))
    return name_or_path


def detect_task(config: Any) -> Task:
    """The task of a model from its config: the ``architectures`` head it was saved with."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence_classification"
    return "base"


def truncated_config(config: Any, num_layers: int) -> Any:
    """A copy of ``config`` with only the first ``num_layers`` blocks (per-layer lists such as
    ``layer_types`` cut to match).

    Raises:
        ValueError: ``num_layers`` is not in ``[1, config.num_hidden_layers]``.
    """
    import copy

    total = int(config.num_hidden_layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    out = copy.deepcopy(config)
    out.num_hidden_layers = num_layers
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == total and key not in ("architectures",):
            setattr(out, key, value[:num_layers])
    return out


def model_classes() -> dict[str, Any]:
    """Task -> the ``transformers`` auto class that loads it."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification,
            "base": AutoModel}


def load_model_config(source: str, *, name: str | None = None, trust_remote_code: bool = False) -> Any:
    """The ``transformers`` config of a local folder or hub id (``config.json`` only, no weights).
    A config that needs the model's own Python code (``auto_map``) is refused unless
    ``trust_remote_code`` (``model.trust_remote_code`` in a job config; off by default).

    Raises:
        FileNotFoundError: neither a readable local folder nor a reachable hub id (the message
            names ``name`` and the built-in names).
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "local folder" if Path(source).exists() else "Hugging Face hub id"
        raise FileNotFoundError(
            f"cannot load model {name or source!r}: not a built-in ({sorted(BUILTIN_MODELS)}), "
            f"and loading it as a {where} failed: {exc}"
        ) from exc


def model_task(name_or_path: str, task: Task | None = None, *, trust_remote_code: bool = False) -> tuple[Any, str]:
    """A model's ``transformers`` config and its task (``task`` when given, else read from the
    config's ``architectures``), from ``config.json`` only: no weights, nothing built. A built-in
    recipe model not built yet is described by the model it is fine-tuned from, with its task.

    Raises:
        FileNotFoundError: as :func:`load_model_config`.
        raylens.io.safety.UnsafeFileError: a local folder holding a pickle file.
    """
    source = str(builtin_config_path(name_or_path)) if name_or_path in BUILTIN_MODELS else name_or_path
    refuse_pickle_files(source)  # refused at the pre-flight check already, before any Ray work
    config = load_model_config(source, name=name_or_path, trust_remote_code=trust_remote_code)
    if task is None and name_or_path in BUILTIN_MODELS and BUILTIN_MODELS[name_or_path].kind == "finetuned":
        return config, "sequence_classification"
    return config, task or detect_task(config)


def meta_model(name_or_path: str, task: Task | None = None, *,
               trust_remote_code: bool = False) -> tuple[torch.nn.Module, str]:
    """The model's skeleton on PyTorch's meta device (no weights, no memory) and its task: enough
    to check module paths and count parameters before anything is loaded. A built-in recipe model
    not built yet is described by the model it is fine-tuned from.

    Raises:
        FileNotFoundError: as :func:`load_model_config`.
        ValueError: unknown ``task``.
    """
    config, task = model_task(name_or_path, task, trust_remote_code=trust_remote_code)
    classes = model_classes()
    if task not in classes:
        raise ValueError(f"task must be one of {sorted(classes)}, got {task!r}")
    with torch.device("meta"):
        return classes[task].from_config(config, trust_remote_code=trust_remote_code), task


def load_model(
    name_or_path: str,
    *,
    task: Task | None = None,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    num_layers: int | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a model and tokenizer for explanation.

    Args:
        name_or_path: a built-in name (see :data:`raylens.models.builtins.BUILTIN_MODELS`, e.g.
            ``"smollm2-135m"``), a local folder in Hugging Face layout, or a hub id.
        task: force the task; by default it is read from the config's ``architectures``.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (weights and activations).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available. Ignored
            when ``device_map`` is given.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``) to shard one model over
            several GPUs with accelerate.
        num_layers: load only the embeddings and the first ``num_layers`` blocks, as the bare
            model without its head (task ``"base"``): what activations up to a split point
            need. Llama-3.1-8B to layer 16: about 7.9 of 15 GiB. Weights past them are not read
            into memory.
        trust_remote_code: run the model's own Python code (``auto_map`` in its config) when it
            has some; off by default (``model.trust_remote_code`` in a job config).

    Weights are read from ``*.safetensors`` only: a local folder holding a pickle file
    (``pytorch_model.bin``, ``*.pt``, ``*.pkl``...) is refused before anything is loaded
    (`raylens.io.safety.refuse_pickle_files`), and a hub id is asked for safetensors.

    Returns:
        A :class:`LoadedModel` in eval mode with frozen parameters.

    Raises:
        ValueError: unknown ``dtype`` or ``task``.
        FileNotFoundError: the model is neither a built-in, a local folder, nor reachable on the hub.
        raylens.io.safety.UnsafeFileError: the folder holds a pickle file (the message names it).
    """
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source = resolve_model_source(name_or_path)
    refuse_pickle_files(source)
    config = load_model_config(source, name=name_or_path, trust_remote_code=trust_remote_code)
    task = task or detect_task(config)
    classes = model_classes()
    if task not in classes:
        raise ValueError(f"task must be one of {sorted(classes)}, got {task!r}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if num_layers is not None:
        task = "base"
        kwargs["config"] = truncated_config(config, num_layers)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if num_layers is None:
        model = classes[task].from_pretrained(source, **kwargs)
    else:  # the blocks past num_layers and the head are "unexpected" keys by design: no load report
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = classes[task].from_pretrained(source, **kwargs)
        finally:
            hf_logging.set_verbosity(level)
    if device_map is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    log.info("loaded %s (%s, task=%s, dtype=%s)", name_or_path, type(model).__name__, task, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, task=task, source=name_or_path)
