"""What a schedule's arguments may be: the `checks:` its YAML declares, one rule per argument.

    checks:
      step_size: length               # a length (see lengths.py) of at least 1 tick
      milestones: lengths             # a strictly increasing list of lengths
      decay: length >= 0              # a bound replaces a length's own `>= 1`
      gamma: number in (0, 1]         # an interval: ( ) open, [ ] closed, inf allowed
      eta_min: number >= 0            # or one bound: > >= < <=
      T_mult: integer >= 1
      values: numbers > 0             # a non-empty list, each item checked
      staircase: bool
      lr_lambda: text                 # a string, which the schedule's own function reads
      mode: [triangular, exp_range]   # a YAML list: one of these
      base_lr: number >= 0 or null    # `or null`: null is allowed too (it stands for a default)

The checks name every setting of the schedule: the builder refuses an argument without one, so a
typo, or a key the builder sets itself (onecycle's total_steps), fails loudly. A rule belongs to
one schedule's argument, whatever other schedules call theirs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sweep.validation import check_choice, fail

KINDS = ("number", "numbers", "integer", "length", "lengths", "bool", "text")
RULE_FORMS = ("a list of choices, or <kind> [in (low, high] | >= n | > n | <= n | < n] [or null], "
              "kind one of " + ", ".join(KINDS))
_RULE = re.compile(
    r"(?P<kind>[a-z]+)"
    r"(?:\s+in\s+(?P<open>[\[(])\s*(?P<low>[^,\s]+)\s*,\s*(?P<high>[^\])\s]+)\s*(?P<close>[\])])"
    r"|\s*(?P<op>>=|<=|>|<)\s*(?P<bound>\S+))?"
    r"(?P<null>\s+or\s+null)?")
# What to say a value must be, by kind; the bounds follow.
_WHAT = {"number": "a number", "numbers": "a non-empty list of numbers", "integer": "an integer",
         "length": "a length", "lengths": "a strictly increasing list of lengths",
         "bool": "true or false", "text": "a string"}


@dataclass(frozen=True)
class Rule:
    """One argument's rule, parsed from its YAML text by `parse_rule`."""

    kind: str  # one of KINDS, or "choice"
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    nullable: bool = False

    def within(self, x: float) -> bool:
        return (x > self.low if self.low_open else x >= self.low) and (
            x < self.high if self.high_open else x <= self.high)

    def bounds(self) -> str:
        """`in (0, 1]`, `>= 1`, or nothing."""
        lo, hi = f"{self.low:g}", f"{self.high:g}"
        if self.high == math.inf:
            return "" if self.low == -math.inf else f"{'>' if self.low_open else '>='} {lo}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {hi}"
        return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"

    def allowed(self) -> str:
        """The `what is allowed` of an error message."""
        if self.kind == "choice":
            return "choose one of " + ", ".join(map(str, self.choices))
        text = " ".join(filter(None, [f"must be {_WHAT[self.kind]}", self.bounds()]))
        return text + (", or null" if self.nullable else "")


def parse_rule(key: str, text: Any) -> Rule:
    """The rule a YAML writes for one argument (see the module's docstring)."""
    if isinstance(text, list | tuple) and text:
        return Rule("choice", choices=tuple(text))
    match = _RULE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or match["kind"] not in KINDS:
        fail(key, text, RULE_FORMS)
    kind, nullable = match["kind"], match["null"] is not None
    if kind in ("bool", "text"):
        if match["open"] or match["op"]:
            fail(key, text, f"{kind} takes no bounds")
        return Rule(kind, nullable=nullable)
    try:
        if match["open"]:
            return Rule(kind, float(match["low"]), float(match["high"]), match["open"] == "(",
                        match["close"] == ")", nullable=nullable)
        if match["op"]:
            n, op = float(match["bound"]), match["op"]
            if op.startswith(">"):
                return Rule(kind, low=n, low_open=op == ">", nullable=nullable)
            return Rule(kind, high=n, high_open=op == "<", nullable=nullable)
    except ValueError:
        fail(key, text, f"bounds are numbers, inf or -inf; {RULE_FORMS}")
    low = 1 if kind in ("length", "lengths") else -math.inf  # a length is one tick or more
    return Rule(kind, low=low, nullable=nullable)


def check_value(key: str, value: Any, rule: Rule, ticks: Callable[[Any, str], int],
                interval: str) -> Any:
    """The value as the schedule gets it (lengths in ticks, via `ticks(value, key)`), or fail."""
    if value is None and rule.nullable:
        return None
    if rule.kind == "choice":
        check_choice(key, value, rule.choices)
    elif rule.kind == "bool" and not isinstance(value, bool):
        fail(key, value, rule.allowed())
    elif rule.kind == "text" and not isinstance(value, str):
        fail(key, value, rule.allowed())
    elif rule.kind in ("number", "integer"):
        _check_number(key, value, rule, rule.allowed())
    elif rule.kind == "numbers":
        if not isinstance(value, list | tuple) or not value:
            fail(key, value, rule.allowed())
        for i, v in enumerate(value):
            _check_number(f"{key}[{i}]", v, rule, f"must be a number {rule.bounds()}".strip())
    elif rule.kind == "length":
        return _length(key, value, rule, ticks, interval)
    elif rule.kind == "lengths":
        if not isinstance(value, list | tuple):
            fail(key, value, "must be a list of lengths")
        converted = [_length(f"{key}[{i}]", v, rule, ticks, interval) for i, v in enumerate(value)]
        if any(b <= a for a, b in zip(converted, converted[1:], strict=False)):
            fail(key, value, f"must be strictly increasing (in {interval}s: {converted})")
        return converted
    return value


def _check_number(key: str, value: Any, rule: Rule, allowed: str) -> None:
    number = int if rule.kind == "integer" else int | float
    if isinstance(value, bool) or not isinstance(value, number) or not rule.within(value):
        fail(key, value, allowed)


def _length(key: str, value: Any, rule: Rule, ticks: Callable[[Any, str], int],
            interval: str) -> int:
    n = ticks(value, key)
    if not rule.within(n):
        fail(key, value, f"is {n} {interval}s; must be {rule.bounds()}")
    return n
