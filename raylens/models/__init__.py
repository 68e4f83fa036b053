"""Model loading (built-in offline names, local folders, hub ids) and split points."""

from raylens.data.builtins import BUILTIN_CORPORA, builtin_corpus_path
from raylens.models.builtins import BUILTIN_MODELS, builtin_model_path
from raylens.models.loading import LoadedModel, load_model

__all__ = [
    "BUILTIN_CORPORA",
    "BUILTIN_MODELS",
    "LoadedModel",
    "builtin_corpus_path",
    "builtin_model_path",
    "load_model",
]
