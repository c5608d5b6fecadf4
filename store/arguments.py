"""Checks of the plain values a caller passes (feature ids, counts, token ranges, thresholds).

Python turns 5.7 into 5, True into 1 and "5" into 5 without a word, and numpy indexes -1 as the
last element: a feature id or a row given so would answer for another one, silently. These
accept whole numbers as ints or numpy integers, and real numbers as ints, floats or numpy
numbers; never a bool, a string or a non-finite value. Each failure is a ConfigError naming the
argument, the value and what to give instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from store.errors import ConfigError


def is_whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def whole_number(name: str, value: Any, minimum: int | None = None, what: str = "a whole number") -> int:
    """``value`` as an int, if it is a whole number of at least ``minimum``; ``what`` says what it
    counts or names, for the message."""
    if not is_whole(value) or (minimum is not None and value < minimum):
        at_least = f" of at least {minimum}" if minimum is not None else ""
        raise ConfigError(f"{name}={value!r}: give {what}, a whole number{at_least}.")
    return int(value)


def is_finite_number(value: Any) -> bool:
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return real and math.isfinite(value)


def is_context(value: Any) -> bool:
    """Whether ``value`` is a context around a token: two whole numbers of at least 0 (left, right)."""
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(is_whole(c) and c >= 0 for c in value)


def finite_number(name: str, value: Any, what: str = "a number") -> float:
    """``value`` as a float, if it is a finite real number."""
    if not is_finite_number(value):
        raise ConfigError(f"{name}={value!r}: give {what}, a finite number.")
    return float(value)


def whole_numbers(name: str, values: Any, what: str = "whole numbers") -> np.ndarray:
    """``values`` as an int64 array, if they are a non-empty sequence (list, tuple, range, integer
    array or tensor) of whole numbers."""
    if isinstance(values, (list, tuple, range)):
        fine = len(values) > 0 and all(is_whole(v) for v in values)
    else:
        array = np.asarray(values) if hasattr(values, "__array__") else None
        fine = array is not None and array.ndim == 1 and array.size > 0 and array.dtype.kind in "iu"
    if not fine:
        raise ConfigError(f"{name}={values!r}: give {what}, a non-empty list of whole numbers.")
    return np.asarray(values, dtype=np.int64)
