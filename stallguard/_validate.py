"""Argument checks with messages that name the parameter, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "check_choice",
    "check_float",
    "check_int",
    "check_norm_type",
    "check_type",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
    """Return ``value`` if it is an int within ``[min, max]``; raise a clear error otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    _check_bounds(owner, name, value, min, max, "an int")
    return value


def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """Return ``float(value)`` if it is a real number within the bounds; raise a clear error otherwise.

    ``min_open``/``max_open`` make the bound strict (``value > min`` rather than ``>=``).
    """
    if not _is_number(value):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    if min is not None and (v <= min if min_open else v < min):
        op = ">" if min_open else ">="
        raise ValueError(f"{owner}: {name} must be {op} {min}, got {value!r}")
    if max is not None and (v >= max if max_open else v > max):
        op = "<" if max_open else "<="
        raise ValueError(f"{owner}: {name} must be {op} {max}, got {value!r}")
    return v


def _check_bounds(owner: str, name: str, value: Any, lo: Any, hi: Any, what: str) -> None:
    if lo is not None and value < lo:
        raise ValueError(f"{owner}: {name} must be {what} >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{owner}: {name} must be {what} <= {hi}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Collection[T]) -> T:
    """Return ``value`` if it is one of ``choices``; raise ``ValueError`` listing them otherwise."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: {name} must be one of {allowed}, got {value!r}")
    return value


def check_type(owner: str, name: str, value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """Return ``value`` if it is an instance of ``types``; raise ``TypeError`` saying ``what`` is allowed."""
    if not isinstance(value, types):
        raise TypeError(f"{owner}: {name} must be {what}, got {type(value).__name__} {value!r}")
    return value


def check_norm_type(owner: str, name: str, value: Any) -> float:
    """Return the p of a p-norm as a float: a number > 0, or ``math.inf`` (also given as ``"inf"``)."""
    if value == "inf":
        return math.inf
    v = check_float(owner, name, value, allow_inf=True)
    if v <= 0:
        raise ValueError(f"{owner}: {name} must be > 0 (or math.inf), got {value!r}")
    return v
