"""Read a job config from YAML plus ``--set`` overrides and validate it whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raylens.config.common import ConfigError, format_validation_error
from raylens.config.concepts import ConceptJobConfig


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                cls: type[BaseModel] | None = None) -> Any:
    """Read a YAML config (or the defaults), apply dotted ``overrides``, validate.

    Args:
        path: YAML file; ``None`` gives the built-in defaults.
        overrides: e.g. ``{"corpus.limit": 50, "output_uri": "/tmp/x"}``.
        cls: the job's config class (default :class:`ConceptJobConfig`; the attribution job
            passes :class:`AttributionJobConfig`).

    Raises:
        ConfigError: a field is invalid or unknown, or a method parameter is unknown or out of
            range (the message names it, e.g. ``concepts.params.top_k``); the YAML does not parse
            (the message gives the file, line and column).
        FileNotFoundError: ``path`` does not exist.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config: {path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = (cls or ConceptJobConfig).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    cfg.check_method_params()
    return cfg


def read_yaml(path: str | Path) -> Any:
    """Parse the YAML file at ``path`` (empty file: ``{}``).

    Raises:
        ConfigError: a syntax error, named with the file, line and column (1-based).
        FileNotFoundError: ``path`` does not exist.
    """
    with open(path) as fh:
        try:
            return yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"invalid config: YAML syntax error in {where}: {what}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["corpus.limit=100", "concepts.method=pca"]`` -> ``{"corpus.limit": 100, ...}``; each value
    is parsed as YAML (numbers, booleans, lists).

    Raises:
        ConfigError: an item has no ``=``.
    """
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out
