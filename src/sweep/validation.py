"""The primitives of validation: the error types and the checks that name key, value and what
is allowed. Leaf modules (data, models, optim, schedules) use them; `sweep.config` composes them
into whole-config validation, so nothing here imports another module of ours.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Sequence
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


class DataError(RuntimeError):
    """A dataset that cannot be loaded (files missing or corrupt); the message says the fix."""


def locate(path: str) -> Any:
    """The object a dotted path names (`torch.optim.SGD`), or ImportError/AttributeError.

    Like Hydra's `get_method`, without the error it logs before raising: a refused `_target_`
    stays one line.
    """
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            found = getattr(found, name)
        return found
    raise ImportError(f"no module named {parts[0]!r}")


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_positive(key: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        fail(key, value, "must be a number > 0")


def check_finite(key: str, value: Any, low: float = 0.0, *, low_open: bool = False) -> None:
    """A finite number >= low (> low with `low_open`)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not (value > low if low_open else value >= low) or not math.isfinite(value):
        finite = "finite " if number and not math.isfinite(value) else ""
        fail(key, value, f"must be a {finite}number {'>' if low_open else '>='} {low:g}")


def check_int_at_least(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        fail(key, value, f"must be an integer >= {low}")


def check_positive_ints(key: str, value: Any, allowed: str, length: int | None = None) -> None:
    """A non-empty list of integers >= 1 (of `length` items, if given); `allowed` says what."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value or (
            length is not None and len(value) != length) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        fail(key, value, allowed)


def check_in_range(key: str, value: Any, low: float, high: float, *, low_open: bool = True,
                   high_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        fail(key, value, f"must be in {lo}{low}, {high}{hi}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        fail(key, value, "choose one of " + ", ".join(map(str, choices)))
