"""Each schedule's Optuna search space, the `search_space:` of its YAML, checked before a study."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweep.validation import check_choice, check_positive, fail

SPACE_TYPES = ("float", "int", "categorical")
_ABSENT = object()


def search_space(cfg_scheduler: Mapping) -> dict[str, dict[str, Any]]:
    """The schedule's Optuna space {config path: {type, low, high, log | choices}}, checked."""
    cfg = cfg_scheduler if isinstance(cfg_scheduler, DictConfig) else OmegaConf.create(
        dict(cfg_scheduler))
    key = "scheduler.search_space"
    space = OmegaConf.to_container(cfg, resolve=True).get("search_space")
    if not isinstance(space, dict) or not space:
        fail(key, space, "every schedule declares one: {<config path>: {type: float, low: .., "
             "high: ..}}, at least optimizer.lr")
    for path, spec in space.items():
        k = f"{key}.{path}"
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", str(path)):
            fail(k, path, "keys are dotted config paths such as optimizer.lr or scheduler.gamma")
        if path.startswith("scheduler.") and OmegaConf.select(
                cfg, path.removeprefix("scheduler."), default=_ABSENT) is _ABSENT:
            fail(k, spec, "names no key of this schedule")
        if not isinstance(spec, dict):
            fail(k, spec, "must be {type: float | int | categorical, ...}")
        kind = spec.get("type")
        check_choice(f"{k}.type", kind, SPACE_TYPES)
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log",
                                                                     "step"}
        if set(spec) - allowed:
            fail(k, spec, f"a {kind} space takes only {', '.join(sorted(allowed))}")
        if kind == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                fail(f"{k}.choices", spec.get("choices"), "must be a non-empty list")
            continue
        number = int if kind == "int" else int | float
        for bound in ("low", "high"):
            if isinstance(spec.get(bound), bool) or not isinstance(spec.get(bound), number):
                fail(f"{k}.{bound}", spec.get(bound), "must be an int" if kind == "int"
                     else "must be a number")
        if not spec["low"] < spec["high"]:
            fail(f"{k}.low", spec["low"], f"must be < high ({spec['high']})")
        if spec.get("log", False):
            if not isinstance(spec["log"], bool):
                fail(f"{k}.log", spec["log"], "must be true or false")
            if spec["low"] <= 0:
                fail(f"{k}.low", spec["low"], "must be > 0 for a log scale")
            if "step" in spec:
                fail(f"{k}.step", spec["step"], "cannot go with log: true (Optuna)")
        if "step" in spec:
            check_positive(f"{k}.step", spec["step"])
    return space
