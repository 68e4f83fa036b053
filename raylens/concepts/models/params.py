"""Declared parameters of concept models: default, type and allowed range of each one.

Every concept-model class declares the parameters it adds in a ``parameters`` class
attribute (a dict name -> :class:`Param`, in the spirit of scikit-learn's
``_parameter_constraints``); a class sees the parameters of its parents too, and may
re-declare one to change its default. :func:`resolve_params` fills the defaults, coerces the
values to their type and checks every range, without building anything, so a job's config
is checked before any work starts. Every error is a ``ValueError`` whose message starts with
the parameter's name, e.g. ``"top_k: must be <= nb_concepts (8), got 1000"``.

Bounds may name the model's size instead of a number: ``"nb_concepts"`` or ``"d_model"``
(resolved at check time; a bound on ``d_model`` is skipped while ``d_model`` is unknown).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Param", "SIZE_NAMES", "coerce", "positive_int", "resolve_params"]

#: Names a bound may use instead of a number, resolved from the model's size.
SIZE_NAMES = ("nb_concepts", "d_model")

Bound = float | int | str | None


@dataclass(frozen=True)
class Param:
    """One method parameter.

    Attributes:
        default: value when the parameter is not given (or None with ``derive``).
        kind: ``int``, ``float``, ``bool``, ``str`` or ``list`` (a list of ints); values are
            coerced to it (``"1e-3"`` -> ``0.001`` for a float, ``8.0`` -> ``8`` for an int).
        low, high: inclusive bounds (numbers, ``"nb_concepts"`` or ``"d_model"``), None: none.
        low_open, high_open: make the bound strict (``> low`` / ``< high``).
        choices: the allowed values (for strings), None: any.
        nullable: None is a valid value (kept as None unless ``derive`` is set).
        derive: ``derive(nb_concepts)`` computes the value stored when the parameter is None
            (a default that depends on the model's size, e.g. ``top_k``).
        doc: one line for the documentation.
    """

    default: Any
    kind: type = float
    low: Bound = None
    high: Bound = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    nullable: bool = False
    derive: Callable[[int], Any] | None = None
    doc: str = ""


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ValueError(f"{name}: must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            out = float(value)
        except ValueError:
            out = math.nan
        if not math.isnan(out):
            return out
    raise ValueError(f"{name}: must be a number, got {value!r}")


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{name}: must be true or false, got {value!r}")


def _as_str(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"{name}: must be a string, got {value!r}")


def _as_int_list(name: str, value: Any) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: must be a list of integers, got {value!r}")
    return [_as_int(name, v) for v in value]


_COERCE: dict[type, Callable[[str, Any], Any]] = {
    int: _as_int, float: _as_float, bool: _as_bool, str: _as_str, list: _as_int_list,
}


def coerce(name: str, param: Param, value: Any) -> Any:
    """``value`` converted to ``param.kind``.

    Raises:
        ValueError: ``"<name>: must be ..."`` when it cannot be.
    """
    return _COERCE[param.kind](name, value)


def _bound(bound: Bound, sizes: Mapping[str, int | None]) -> tuple[float | None, str]:
    """``(number or None when unknown, text for messages)`` of a bound."""
    if isinstance(bound, str):
        value = sizes.get(bound)
        return value, f"{bound} ({value})"
    return bound, f"{bound}"


def _check_range(name: str, param: Param, value: Any, sizes: Mapping[str, int | None]) -> None:
    if param.choices is not None and value not in param.choices:
        raise ValueError(f"{name}: must be one of {list(param.choices)}, got {value!r}")
    if param.kind not in (int, float):
        return
    low, low_text = _bound(param.low, sizes)
    if low is not None and (value <= low if param.low_open else value < low):
        raise ValueError(f"{name}: must be {'>' if param.low_open else '>='} {low_text}, got {value!r}")
    high, high_text = _bound(param.high, sizes)
    if high is not None and (value >= high if param.high_open else value > high):
        raise ValueError(f"{name}: must be {'<' if param.high_open else '<='} {high_text}, got {value!r}")


def resolve_params(
    declared: Mapping[str, Param],
    given: Mapping[str, Any],
    *,
    method: str,
    nb_concepts: int,
    d_model: int | None,
) -> dict[str, Any]:
    """Every declared parameter's value: given ones coerced and checked, the others defaulted.

    Args:
        declared: the class's parameters (name -> :class:`Param`).
        given: the values set by the caller (a subset of ``declared``).
        method: the method's registry name (for messages).
        nb_concepts: number of concepts (bounds named ``"nb_concepts"``).
        d_model: activation width, None when unknown (bounds on it are then skipped).

    Returns:
        ``{name: value}`` for every declared parameter, in declaration order.

    Raises:
        ValueError: an unknown name (``"<name>: unknown parameter of <method>; known: [...]"``),
            a value of the wrong type or out of range (``"<name>: must be ..."``).
    """
    unknown = [name for name in given if name not in declared]
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown parameter of {method}; known: {sorted(declared)}")
    sizes = {"nb_concepts": nb_concepts, "d_model": d_model}
    out: dict[str, Any] = {}
    for name, param in declared.items():
        value = given.get(name, param.default)
        if value is None and param.derive is not None:
            value = param.derive(nb_concepts)
        elif value is None and param.nullable:
            out[name] = None
            continue
        value = coerce(name, param, value)
        _check_range(name, param, value, sizes)
        out[name] = value
    return out


def positive_int(default: int, doc: str = "") -> Param:
    """An integer parameter ``>= 1`` (iterations, epochs, batch sizes)."""
    return Param(default, int, low=1, doc=doc)
