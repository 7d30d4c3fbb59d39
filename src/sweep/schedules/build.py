"""Building a schedule for a run: read its config, check it, convert lengths, put warmup in front.

A scheduler config (conf/scheduler/<name>.yaml) is `_target_`, the target's arguments, and meta
keys that are not passed on:
- `interval`: `epoch` | `step`, when the trainer calls step();
- `warmup`: null or {length, start_factor}: a linear warmup (LinearLR) chained in front with
  SequentialLR; after it the schedule's own clock starts at 0 and its fractions are of the rest;
- `checks`: what each argument may be (checks.py); only the arguments it names are taken;
- `prepare`: for a PyTorch class that needs values from the run, its function in pytorch.py;
- `search_space`: its Optuna space (space.py).
The target is a `torch.optim.lr_scheduler` class, built with the optimizer and the arguments, or a
function returning a multiplier f(t) (family.py), which is evaluated on every tick of the run
before training and then wrapped in a LambdaLR.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import (
    LambdaLR,
    LinearLR,
    LRScheduler,
    ReduceLROnPlateau,
    SequentialLR,
)

from sweep.schedules.checks import Rule, check_value, parse_rule
from sweep.schedules.expressions import Multiplier, locate, one_line, own_function
from sweep.schedules.lengths import INTERVALS, Budget, to_ticks
from sweep.validation import ConfigError, check_choice, check_in_range, fail

META_KEYS = ("interval", "warmup", "checks", "prepare", "search_space")
RUNTIME = ("total_ticks", "interval", "steps_per_epoch")  # passed to the functions that take them
SET_BY_BUILDER = ("optimizer", "last_epoch")
MULTIPLIER = "a multiplier must be a finite number >= 0 on every tick of the run"


@dataclass
class Schedule:
    """A built schedule and how the trainer steps it."""

    scheduler: LRScheduler | ReduceLROnPlateau
    interval: str  # "epoch": step() after each epoch's evaluation; "step": after each batch
    needs_metric: bool  # plateau: step(val_metric)


@dataclass
class Run:
    """What a schedule is built for; `prepare` functions read it."""

    budget: Budget
    interval: str
    direction: str | None  # the trainer's metric: maximize | minimize (plateau's mode: auto)
    optimizer: torch.optim.Optimizer | None  # None while a config is only validated
    warmup_cfg: Any = None  # scheduler.warmup as written
    warmup: int = 0  # ticks of linear warmup in front of the schedule
    start_factor: float = 1.0
    span: int = 0  # ticks the schedule itself runs: the run after warmup

    def per_group(self, lr: float) -> float | list[float]:
        """An absolute lr for a group at optimizer.lr, scaled to every group's own lr."""
        if self.optimizer is None:
            return lr
        base = self.optimizer.defaults["lr"]
        return [lr * g.get("initial_lr", g["lr"]) / base for g in self.optimizer.param_groups]

    def refuse_warmup(self, why: str) -> None:
        """Fail unless scheduler.warmup is null, saying why this schedule cannot have one."""
        if self.warmup_cfg is not None:
            fail("scheduler.warmup", self.warmup_cfg, f"must be null: {why}")


@dataclass
class _Plan:
    """A checked config: what to build, with which arguments, for which run."""

    target: Any
    name: str
    kwargs: dict[str, Any]
    run: Run
    multiplier: Multiplier | None  # for a function of ours, already checked on every tick


def validate_scheduler(cfg_scheduler: Mapping, budget: Budget,
                       direction: str | None = None) -> None:
    """Check every scheduler value for this budget before training; raises ConfigError."""
    # The search space is left to search_space(): a run that does not search never reads it.
    _plan(cfg_scheduler, budget, direction, None)


def build_scheduler(cfg_scheduler: Mapping, optimizer: torch.optim.Optimizer, budget: Budget,
                    direction: str | None = None) -> Schedule:
    """The configured schedule for this optimizer and run (`direction` feeds plateau's mode: auto).

    Restoring: build first, then load the optimizer's and the scheduler's state_dicts.
    """
    plan = _plan(cfg_scheduler, budget, direction, optimizer)
    if plan.multiplier is not None:
        # A plain function, so LambdaLR's state_dict skips it: a restore rebuilds it from config.
        scheduler = LambdaLR(optimizer, plan.multiplier)
    else:
        try:
            scheduler = plan.target(optimizer, **plan.kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"scheduler: {plan.name} rejected {plan.kwargs}: {err}") from err
    needs_metric = isinstance(scheduler, ReduceLROnPlateau)
    run = plan.run
    if run.warmup:
        warm = LinearLR(optimizer, run.start_factor, 1.0, total_iters=run.warmup)
        scheduler = SequentialLR(optimizer, [warm, scheduler], milestones=[run.warmup])
    return Schedule(scheduler, run.interval, needs_metric)


def _plan(cfg: Mapping, budget: Budget, direction: str | None,
          optimizer: torch.optim.Optimizer | None) -> _Plan:
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = raw.pop("_target_", None)
    target = _target(name)
    interval = raw.pop("interval", "epoch")
    check_choice("scheduler.interval", interval, INTERVALS)
    run = Run(budget, interval, direction, optimizer, warmup_cfg=raw.pop("warmup", None))
    rules, prepare = raw.pop("checks", None), raw.pop("prepare", None)
    raw.pop("search_space", None)

    # The arguments are exactly those the YAML's checks name; the builder supplies the rest.
    pytorch = inspect.isclass(target)
    params = inspect.signature(target).parameters
    runtime = [] if pytorch else [p for p in RUNTIME if p in params]
    rules = _rules(rules, name, params, runtime)
    for key, value in raw.items():
        if key in (*SET_BY_BUILDER, *runtime):
            fail(f"scheduler.{key}", value, "is set by the builder from the run; leave it out")
        if key not in rules:
            fail(f"scheduler.{key}", value, f"{name} takes only {', '.join(rules) or 'nothing'} "
                 f"here (its YAML's checks), and the meta keys {', '.join(META_KEYS)}")
    for key, p in params.items():
        if p.default is p.empty and key not in (*SET_BY_BUILDER, *runtime) and key not in raw:
            fail(f"scheduler.{key}", None, f"{name} needs it")

    _warmup(run)  # first: the schedule's own fractions are of the run that is left after it

    def ticks(value: Any, key: str) -> int:
        return to_ticks(value, budget, interval, key, run.span)

    kwargs = {k: check_value(f"scheduler.{k}", v, rules[k], ticks, interval)
              for k, v in raw.items()}
    given = {"total_ticks": run.span, "interval": interval,
             "steps_per_epoch": budget.steps_per_epoch}
    kwargs.update({k: given[k] for k in runtime})
    if prepare is not None:
        if not isinstance(prepare, str) or not prepare.startswith("sweep.schedules.pytorch."):
            fail("scheduler.prepare", prepare, "null, or a function in sweep.schedules.pytorch")
        locate(prepare)(kwargs, run)
    multiplier = None if pytorch else _multiplier(target, name, kwargs, raw, run)
    return _Plan(target, name, kwargs, run, multiplier)


def _target(name: Any) -> Any:
    """What `_target_` names: a PyTorch scheduler class, or a function returning f(t)."""
    allowed = ("a torch.optim.lr_scheduler class, or a plain Python function returning a "
               "multiplier f(t) in sweep.schedules.family or a module of your own")
    if not isinstance(name, str):
        fail("scheduler._target_", name, allowed)
    if not name.startswith(("torch.", "sweep.schedules.family.")):  # yours: the lambda's rule
        return own_function(name, "scheduler._target_", allowed)
    try:
        target = locate(name)
    except Exception as err:
        fail("scheduler._target_", name, f"cannot import it ({one_line(err)}); {allowed}")
    pytorch = inspect.isclass(target) and issubclass(target, LRScheduler | ReduceLROnPlateau)
    if not (pytorch if name.startswith("torch.") else inspect.isfunction(target)):
        fail("scheduler._target_", name, allowed)
    return target


def _rules(rules: Any, name: str, params: Mapping[str, inspect.Parameter],
           runtime: list[str]) -> dict[str, Rule]:
    if rules is None:
        return {}
    if not isinstance(rules, dict):
        fail("scheduler.checks", rules, "a mapping {argument: rule}, see sweep/schedules/checks.py")
    for key in rules:
        if key not in params or key in (*SET_BY_BUILDER, *runtime):
            fail(f"scheduler.checks.{key}", rules[key], f"names no setting of {name}")
    return {key: parse_rule(f"scheduler.checks.{key}", rule) for key, rule in rules.items()}


def _warmup(run: Run) -> None:
    warmup, total = run.warmup_cfg, run.budget.ticks(run.interval)
    if warmup is not None:
        if not isinstance(warmup, dict) or "length" not in warmup or set(warmup) - {
                "length", "start_factor"}:
            fail("scheduler.warmup", warmup, "null or {length: <length>, start_factor: <(0, 1]>}")
        run.start_factor = warmup.get("start_factor", 0.1)
        check_in_range("scheduler.warmup.start_factor", run.start_factor, 0.0, 1.0)
        run.warmup = to_ticks(warmup["length"], run.budget, run.interval, "scheduler.warmup.length")
        if run.warmup < 0:
            fail("scheduler.warmup.length", warmup["length"], "must be >= 0")
        if run.warmup > total:
            warnings.warn(f"scheduler.warmup.length={warmup['length']!r} is {run.warmup} "
                          f"{run.interval}s, longer than the run ({total}); clamped to the run",
                          stacklevel=5)
            run.warmup = total
    run.span = max(1, total - run.warmup)


def _multiplier(target: Any, name: str, kwargs: dict[str, Any], settings: dict[str, Any],
                run: Run) -> Multiplier:
    """f = target(**kwargs), evaluated on every tick the run will ask for: finite and >= 0."""
    try:
        f = target(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler: {name} rejected {kwargs}: {err}") from err
    # Blame the one setting f depends on (lambda's lr_lambda), or all of them.
    key, shown = "scheduler", settings
    if len(settings) == 1:
        [(arg, shown)] = settings.items()
        key = f"scheduler.{arg}"
    after = " after warmup" if run.warmup else ""
    # Ticks 0..span: the trainer's last step() computes the lr after its last step, too.
    for t in range(run.span + 1):
        try:
            value = f(t)
        except Exception as err:  # a user's f(tick) may raise anything; report it, don't train
            fail(key, shown, f"raises {one_line(err)} at {run.interval} {t} of 0..{run.span}"
                 f"{after}; {MULTIPLIER}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value) and value >= 0):
            fail(key, shown, f"gives {value!r} at {run.interval} {t} of 0..{run.span}{after}; "
                 f"{MULTIPLIER}")
    return f
