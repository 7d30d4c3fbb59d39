"""How long a run is, and lengths in it: ticks, "3 epochs", "500 steps" or a fraction of the run.

A schedule is stepped once per tick of its interval: after every optimizer step (`step`) or after
each epoch's evaluation (`epoch`). A length in a schedule's config (an argument its YAML checks as
`length` or `lengths`, and `warmup.length`) is one of
- an int: ticks of the schedule's interval, as PyTorch counts them;
- "3 epochs" or "500 steps": converted to ticks, rounded half up, and at least 1 unless it is 0;
- a float in [0, 1]: a fraction of the run, so `T_max: 1.0` ends at the last step whatever the
  epochs or the batch size. The schedule's own lengths are fractions of the run after its warmup.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from sweep.validation import check_int_at_least, fail

INTERVALS = ("epoch", "step")
LENGTH_FORMS = ('an int (ticks of the interval), "<n> epochs", "<n> steps", or a float in [0, 1] '
                "(a fraction of the run)")
_UNITS = re.compile(r"\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*(epoch|step)s?\s*")


@dataclass
class Budget:
    """How long a run is: `epochs` of `steps_per_epoch` optimizer steps."""

    epochs: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        check_int_at_least("trainer.epochs", self.epochs, 1)
        check_int_at_least("steps_per_epoch", self.steps_per_epoch, 1)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def ticks(self, interval: str) -> int:
        """How often a schedule with this interval is stepped over the run."""
        return self.epochs if interval == "epoch" else self.total_steps


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up: 2.5 epochs is 3, not Python's banker's 2


def to_ticks(value: Any, budget: Budget, interval: str, key: str, span: int | None = None) -> int:
    """A length in ticks of `interval`: an int as is, "3 epochs" or "500 steps", a float x span."""
    span = budget.ticks(interval) if span is None else span  # what a fraction is a fraction of
    if isinstance(value, bool):
        fail(key, value, f"a length is {LENGTH_FORMS}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            fail(key, value, f"a float length is a fraction of the run; give {LENGTH_FORMS}")
        return max(1, _round(value * span)) if value > 0 else 0  # a part of a run is >= 1 tick
    match = _UNITS.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        fail(key, value, f"a length is {LENGTH_FORMS}")
    n, unit = float(match[1]), match[2].lower()
    steps = n * budget.steps_per_epoch if unit == "epoch" else n
    ticks = steps if interval == "step" else steps / budget.steps_per_epoch
    return max(1, _round(ticks)) if n > 0 else 0
