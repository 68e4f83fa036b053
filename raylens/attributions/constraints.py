"""Parameter constraints: how an attribution class declares the values its parameters accept.

Each class (explainer, perturbator, aggregator) declares its **own** parameters in a
``param_constraints`` class attribute, a mapping ``name -> constraint``; a class's full set is the
merge over its bases (:func:`constraints_of`). The same declarations check values when an object is
built and, without a model, when a job's config is loaded
(:func:`raylens.attributions.methods.check_params`).

A constraint is one of :class:`Int`, :class:`Float`, :class:`OneOf`, :class:`Bool`, or
:class:`AnyOf` of several. Every error message starts with the parameter's name, e.g.
``"n_steps must be an int >= 1, got 0"``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer: an ``int`` or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class Constraint:
    """Base class: :meth:`accepts` a value or not; :attr:`description` says what is accepted."""

    description: str = "any value"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` satisfies the constraint."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Int(Constraint):
    """An integer (``int`` or numpy integer, not a bool) ``>= min`` (and ``<= max``); ``None`` too
    when ``optional``."""

    min: int | None = None
    max: int | None = None
    optional: bool = False

    @property
    def description(self) -> str:
        bounds = [f">= {self.min}"] if self.min is not None else []
        bounds += [f"<= {self.max}"] if self.max is not None else []
        return " ".join(["an int", *bounds]) + (" or None" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        return (is_int(value) and (self.min is None or value >= self.min)
                and (self.max is None or value <= self.max))


@dataclasses.dataclass(frozen=True)
class Float(Constraint):
    """A finite real number (int or float, not a bool) ``>= min`` (``> min`` when ``strict``)."""

    min: float | None = None
    strict: bool = False

    @property
    def description(self) -> str:
        if self.min is None:
            return "a finite number"
        return f"a number {'>' if self.strict else '>='} {self.min:g}"

    def accepts(self, value: Any) -> bool:
        if not (is_int(value) or isinstance(value, (float, np.floating))) or not math.isfinite(value):
            return False
        return self.min is None or (value > self.min if self.strict else value >= self.min)


@dataclasses.dataclass(frozen=True)
class OneOf(Constraint):
    """One of a fixed tuple of values; ``None`` too when ``optional``."""

    values: tuple
    optional: bool = False

    @property
    def description(self) -> str:
        return f"one of {self.values}" + (" or None" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        try:
            return value in self.values
        except TypeError:  # an unhashable or incomparable value
            return False


@dataclasses.dataclass(frozen=True)
class Bool(Constraint):
    """``True`` or ``False`` (a numpy bool too); ``None`` too when ``optional``."""

    optional: bool = False

    @property
    def description(self) -> str:
        return "True or False" + (" or None" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        return isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class AnyOf(Constraint):
    """Accepted by at least one of ``options``."""

    options: tuple[Constraint, ...]

    @property
    def description(self) -> str:
        return " or ".join(o.description for o in self.options)

    def accepts(self, value: Any) -> bool:
        return any(o.accepts(value) for o in self.options)


def check_value(name: str, value: Any, constraint: Constraint) -> None:
    """Check one parameter value.

    Raises:
        ValueError: ``"<name> must be <description>, got <value>"``.
    """
    if not constraint.accepts(value):
        raise ValueError(f"{name} must be {constraint.description}, got {value!r}")


def check_values(constraints: Mapping[str, Constraint], values: Mapping[str, Any]) -> None:
    """Check every value of ``values`` whose name ``constraints`` declares (others are ignored).

    Raises:
        ValueError: the first value out of range (:func:`check_value`).
    """
    for name, value in values.items():
        if name in constraints:
            check_value(name, value, constraints[name])


def constraints_of(cls: type) -> dict[str, Constraint]:
    """Every parameter constraint of ``cls``: the ``param_constraints`` of its bases, then its own
    (a class may redeclare a base's parameter)."""
    merged: dict[str, Constraint] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get("param_constraints", {}))
    return merged


__all__ = ["AnyOf", "Bool", "Constraint", "Float", "Int", "OneOf", "check_value", "check_values", "constraints_of",
           "is_int"]
