"""The learning-rate schedule family: one YAML per schedule in conf/scheduler/, built for a run.

A scheduler config is `_target_` (a `torch.optim.lr_scheduler` class, or a function below that
returns a `LambdaLR`, so every parameter group scales from its own base lr and per-layer lrs keep
their ratios), the target's arguments, and three meta keys that are not passed on: `interval`
(`epoch` | `step`: when the trainer calls `step()`), `warmup` (null or `{length, start_factor}`, a
linear warmup in front of the schedule) and `search_space` (its Optuna space, see `search_space`).

Lengths (the arguments in LENGTH_KEYS, and `warmup.length`) are relative to the run's budget: an
int counts ticks of the schedule's interval, `"3 epochs"` or `"500 steps"` give units, and a float
in [0, 1] is a fraction of the run, so `T_max: 1.0` ends at the last step whatever the epochs or
batch size. After a warmup the schedule's own clock starts at 0 and its fractions are of the rest.
Functions here may also take `total_ticks`, `interval` and `steps_per_epoch`; the builder passes
them.

`python -m sweep.schedules scheduler=step optimizer.lr=0.1 trainer.epochs=100 scheduler.gamma=0.8`
draws a schedule without training; `+schedules=[step,cosine]` or `+schedules=all` draws several
(`++scheduler.gamma=0.8` then reaches those with a gamma); `+x=epoch`, `+log_y=true` for the plot,
`+steps_per_epoch=N` to skip loading the data.
"""

from __future__ import annotations

import ast
import bisect
import csv
import inspect
import math
import operator
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
)

from sweep import CONF_DIR
from sweep.config import (
    ConfigError,
    check_choice,
    check_in_range,
    check_int_at_least,
    check_positive,
    compose,
    fail,
    override_key,
)

INTERVALS = ("epoch", "step")
META_KEYS = ("interval", "warmup", "search_space")
# Arguments that are lengths, with the fewest ticks each may be.
LENGTH_KEYS = {"step_size": 1, "milestones": 1, "T_max": 1, "T_0": 1, "total_iters": 1,
               "decay_steps": 1, "boundaries": 1, "step_size_up": 1, "step_size_down": 1,
               "drop_every": 1, "max_epochs": 1, "s": 1, "decay": 0}
SPACE_TYPES = ("float", "int", "categorical")
_ABSENT = object()


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


@dataclass
class Schedule:
    """A built schedule and how the trainer steps it."""

    scheduler: LRScheduler | ReduceLROnPlateau
    interval: str  # "epoch": step() after each epoch's evaluation; "step": after each batch
    needs_metric: bool  # plateau: step(val_metric)


# --- lengths -------------------------------------------------------------------------------------

_UNITS = re.compile(r"\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*(epoch|step)s?\s*")
_LENGTH_FORMS = ('an int (ticks of the interval), "<n> epochs", "<n> steps", or a float in [0, 1] '
                 "(a fraction of the run)")


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up: 2.5 epochs is 3, not Python's banker's 2


def to_ticks(value: Any, budget: Budget, interval: str, key: str, span: int | None = None) -> int:
    """A length in ticks of `interval`: an int as is, "3 epochs" or "500 steps", a float x span."""
    span = budget.ticks(interval) if span is None else span  # what a fraction is a fraction of
    if isinstance(value, bool):
        fail(key, value, f"a length is {_LENGTH_FORMS}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            fail(key, value, f"a float length is a fraction of the run; give {_LENGTH_FORMS}")
        return max(1, _round(value * span)) if value > 0 else 0  # a part of a run is >= 1 tick
    match = _UNITS.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        fail(key, value, f"a length is {_LENGTH_FORMS}")
    n, unit = float(match[1]), match[2].lower()
    steps = n * budget.steps_per_epoch if unit == "epoch" else n
    ticks = steps if interval == "step" else steps / budget.steps_per_epoch
    return max(1, _round(ticks)) if n > 0 else 0


def _length(key: str, value: Any, plan: _Plan) -> int | list[int]:
    """Convert one length argument (a list for milestones and boundaries) and check its minimum."""
    name, low = f"scheduler.{key}", LENGTH_KEYS[key]
    if isinstance(value, list | tuple):
        ticks = [_length_one(f"{name}[{i}]", v, low, plan) for i, v in enumerate(value)]
        if any(b <= a for a, b in zip(ticks, ticks[1:], strict=False)):
            fail(name, value, f"must be strictly increasing (in {plan.interval}s: {ticks})")
        return ticks
    if key in ("milestones", "boundaries"):
        fail(name, value, "must be a list of lengths")
    return _length_one(name, value, low, plan)


def _length_one(name: str, value: Any, low: int, plan: _Plan) -> int:
    ticks = to_ticks(value, plan.budget, plan.interval, name, plan.span)
    if ticks < low:
        fail(name, value, f"is {ticks} {plan.interval}s; must be at least {low}")
    return ticks


# --- the safe expressions of the `lambda` schedule ------------------------------------------------

_FUNCTIONS: dict[str, Callable[..., float]] = {
    "exp": math.exp, "log": math.log, "sqrt": math.sqrt, "cos": math.cos, "sin": math.sin,
    "floor": math.floor, "ceil": math.ceil, "abs": abs, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_VARIABLES = ("epoch", "step")
_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Eq: operator.eq,
    ast.NotEq: operator.ne}
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Load)
_EXPRESSIONS = ("an expression of epoch and step with numbers, + - * / // % **, comparisons, "
                "`a if cond else b`, pi, e and " + ", ".join(_FUNCTIONS)
                + "; or a dotted path to a function f(tick)")


def parse_expression(text: str, key: str) -> ast.Expression:
    """Parse an lr multiplier such as `0.5 ** epoch`, arithmetic only: nothing is ever eval'd."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        fail(key, text, _EXPRESSIONS)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        ok = (isinstance(node, _NODES) or type(node) in _OPERATORS
              or (isinstance(node, ast.Constant) and type(node.value) in (int, float))
              or (isinstance(node, ast.Name) and (
                  node.id in _VARIABLES or node.id in _CONSTANTS
                  or (node.id in _FUNCTIONS and id(node) in called)))
              or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and not node.keywords))
        if not ok:
            fail(key, text, f"cannot use {ast.unparse(node)!r}; give {_EXPRESSIONS}")
    return tree


def _evaluate(node: ast.AST, env: Mapping[str, float]) -> float:
    """The value of a parsed expression; every number is a float, so `**` overflows, never hangs."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, env)
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return env[node.id] if node.id in env else _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp):
        return _OPERATORS[type(node.op)](_evaluate(node.left, env), _evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp):
        return _OPERATORS[type(node.op)](_evaluate(node.operand, env))
    if isinstance(node, ast.Call):
        return float(_FUNCTIONS[node.func.id](*(_evaluate(a, env) for a in node.args)))
    if isinstance(node, ast.IfExp):
        return _evaluate(node.body if _evaluate(node.test, env) else node.orelse, env)
    values = [_evaluate(node.left, env), *(_evaluate(c, env) for c in node.comparators)]
    return float(all(_OPERATORS[type(op)](a, b)
                     for op, a, b in zip(node.ops, values, values[1:], strict=False)))


def _multiplier(lr_lambda: str, interval: str, steps_per_epoch: int) -> Callable[[int], float]:
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", lr_lambda):  # a dotted path: f(tick)
        try:
            fn = get_object(lr_lambda)
        except Exception as err:
            fail("scheduler.lr_lambda", lr_lambda, f"cannot import it ({err}); give {_EXPRESSIONS}")
        if not callable(fn):
            fail("scheduler.lr_lambda", lr_lambda, "must name a function f(tick) -> multiplier")
        return fn
    tree = parse_expression(lr_lambda, "scheduler.lr_lambda")
    per_epoch = 1 if interval == "epoch" else steps_per_epoch  # ticks in one epoch

    def multiplier(tick: int) -> float:
        return _evaluate(tree, {"epoch": tick / per_epoch,
                                "step": tick * steps_per_epoch / per_epoch})
    return multiplier


# --- schedules PyTorch lacks, each a multiplier of every group's own base lr ---------------------

def lambda_lr(optimizer: torch.optim.Optimizer, lr_lambda: str, interval: str = "epoch",
              steps_per_epoch: int = 1) -> LambdaLR:
    """LambdaLR: base_lr * f(epoch), f a safe expression such as the BN article's `0.5 ** epoch`."""
    # A plain function, so LambdaLR's state_dict skips it: a restore rebuilds it from the config.
    return LambdaLR(optimizer, _multiplier(lr_lambda, interval, steps_per_epoch))


def inverse_time(optimizer: torch.optim.Optimizer, decay_steps: int, decay_rate: float = 1.0,
                 staircase: bool = False) -> LambdaLR:
    """Keras InverseTimeDecay (old Keras `decay`): lr / (1 + decay_rate * t / decay_steps)."""
    def factor(t: int) -> float:
        p = math.floor(t / decay_steps) if staircase else t / decay_steps
        return 1.0 / (1.0 + decay_rate * p)
    return LambdaLR(optimizer, factor)


def exponential_decay(optimizer: torch.optim.Optimizer, decay_steps: int, decay_rate: float,
                      staircase: bool = False) -> LambdaLR:
    """Keras ExponentialDecay: lr * decay_rate ** (t / decay_steps), floored if staircase."""
    def factor(t: int) -> float:
        return decay_rate ** (math.floor(t / decay_steps) if staircase else t / decay_steps)
    return LambdaLR(optimizer, factor)


def piecewise_constant(optimizer: torch.optim.Optimizer, boundaries: list[int],
                       values: list[float]) -> LambdaLR:
    """Keras PiecewiseConstantDecay: lr * values[i] while boundaries[i-1] < t <= boundaries[i]."""
    # Values multiply each group's lr (Keras' are absolute), so per-layer ratios hold.
    def factor(t: int) -> float:
        return values[bisect.bisect_left(boundaries, t)]
    return LambdaLR(optimizer, factor)


def step_decay(optimizer: torch.optim.Optimizer, drop_every: int,
               factor: float = 0.25) -> LambdaLR:
    """The article's StepDecay: initAlpha * factor ** floor((1 + epoch) / dropEvery)."""
    # The article's `1 +` makes the first drop one epoch early (at dropEvery - 1); kept as written.
    return LambdaLR(optimizer, lambda t: factor ** math.floor((1 + t) / drop_every))


def poly_decay(optimizer: torch.optim.Optimizer, max_epochs: int, power: float = 1.0) -> LambdaLR:
    """The article's PolynomialDecay: initAlpha * (1 - epoch / maxEpochs) ** power."""
    # Held at 0 past maxEpochs: a negative base to a fractional power has no real value.
    return LambdaLR(optimizer, lambda t: (1.0 - min(t, max_epochs) / max_epochs) ** power)


def power_scheduling(optimizer: torch.optim.Optimizer, s: int, c: float = 1.0) -> LambdaLR:
    """Power scheduling (the BN article; Geron): lr / (1 + t / s) ** c: lr/2 at s, lr/3 at 2s."""
    return LambdaLR(optimizer, lambda t: (1.0 + t / s) ** -c)


def wsd(optimizer: torch.optim.Optimizer, total_ticks: int, decay: int,
        decay_shape: str = "linear", min_factor: float = 0.0) -> LambdaLR:
    """Warmup-stable-decay (MiniCPM; Hagele et al. 2024): lr, then down over the last `decay`."""
    start = total_ticks - decay  # the warmup is the `warmup` meta key, in front of this
    shapes = {"linear": lambda p: p, "cosine": lambda p: (1 - math.cos(math.pi * p)) / 2,
              "sqrt": math.sqrt}  # sqrt: the paper's 1 - sqrt cooldown

    def factor(t: int) -> float:
        p = min(1.0, max(0, t - start) / max(1, decay))
        return min_factor + (1.0 - min_factor) * (1.0 - shapes[decay_shape](p))
    return LambdaLR(optimizer, factor)


# --- validation ----------------------------------------------------------------------------------

def _unit(key: str, value: Any) -> None:
    check_in_range(key, value, 0.0, 1.0)


def _unit_closed(key: str, value: Any) -> None:
    check_in_range(key, value, 0.0, 1.0, low_open=False)


def _non_negative(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        fail(key, value, "must be a number >= 0")


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(key, value, "must be true or false")


# Checks by argument name, whichever schedule has the argument.
ARG_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "gamma": _unit, "factor": _unit, "start_factor": _unit, "end_factor": _unit_closed,
    "min_factor": _unit_closed, "eta_min": _non_negative, "min_lr": _non_negative,
    "threshold": _non_negative, "power": check_positive, "c": check_positive,
    "decay_rate": check_positive, "div_factor": check_positive, "final_div_factor": check_positive,
    "max_lr": check_positive, "base_momentum": _unit_closed, "max_momentum": _unit_closed,
    "T_mult": lambda k, v: check_int_at_least(k, v, 1),
    "patience": lambda k, v: check_int_at_least(k, v, 0),
    "cooldown": lambda k, v: check_int_at_least(k, v, 0),
    "pct_start": lambda k, v: check_in_range(k, v, 0.0, 1.0, high_open=True),
    "staircase": _boolean, "three_phase": _boolean, "cycle_momentum": _boolean,
    "anneal_strategy": lambda k, v: check_choice(k, v, ("cos", "linear")),
    "threshold_mode": lambda k, v: check_choice(k, v, ("rel", "abs")),
    "decay_shape": lambda k, v: check_choice(k, v, ("linear", "cosine", "sqrt")),
}
NULLABLE = ("base_lr", "step_size_down")  # null has a meaning: see the schedules' YAMLs


@dataclass
class _Plan:
    """A checked scheduler config: the target and its arguments, lengths already in ticks."""

    target: Callable[..., Any]
    kwargs: dict[str, Any]
    interval: str
    budget: Budget
    direction: str | None
    warmup: int = 0  # ticks of linear warmup in front of the schedule
    start_factor: float = 1.0
    span: int = 0  # ticks the schedule itself runs (the run after warmup)
    name: str = ""


def _per_group(value: float, optimizer: torch.optim.Optimizer) -> list[float]:
    """An absolute lr for a group at the base lr (optimizer.lr), scaled to every group's lr."""
    base = optimizer.defaults["lr"]
    return [value * group.get("initial_lr", group["lr"]) / base for group in optimizer.param_groups]


def _check_cycle_momentum(args: dict, optimizer: torch.optim.Optimizer) -> None:
    # PyTorch's default (true) would overwrite SGD's momentum, or fail on Adagrad.
    has = optimizer.defaults.get("momentum", 0) > 0 or "betas" in optimizer.defaults
    if args.get("cycle_momentum", True) and not has:
        fail("scheduler.cycle_momentum", True, f"{type(optimizer).__name__} has no momentum or "
             "betas to cycle; set it false")


def _plateau(args: dict, plan: _Plan, optimizer: torch.optim.Optimizer | None) -> None:
    if plan.interval != "epoch":
        fail("scheduler.interval", plan.interval, "plateau is stepped with the validation metric "
             "after each epoch: use epoch")
    check_in_range("scheduler.factor", args.get("factor", 0.1), 0.0, 1.0, high_open=True)
    mode = args.get("mode", "min")
    check_choice("scheduler.mode", mode, ("auto", "min", "max"))
    wanted = {"maximize": "max", "minimize": "min", "max": "max", "min": "min"}.get(plan.direction)
    if mode == "auto" and optimizer is not None and wanted is None:
        fail("scheduler.mode", mode, "auto needs the metric's direction: build_scheduler(..., "
             "direction='maximize' | 'minimize')")
    if mode in ("min", "max") and wanted and mode != wanted:
        fail("scheduler.mode", mode, f"the trainer's metric is {plan.direction}d here; use auto "
             f"or {wanted}")
    args["mode"] = wanted if mode == "auto" else mode
    if optimizer is not None:
        args["min_lr"] = _per_group(args.get("min_lr", 0.0), optimizer)


def _cyclic(args: dict, plan: _Plan, optimizer: torch.optim.Optimizer | None) -> None:
    check_choice("scheduler.mode", args.get("mode", "triangular"),
                 ("triangular", "triangular2", "exp_range"))
    base = args.get("base_lr")
    base = args["max_lr"] / 10 if base is None else base
    _non_negative("scheduler.base_lr", base)
    if not args["max_lr"] > base:
        fail("scheduler.max_lr", args["max_lr"], f"must be > scheduler.base_lr ({base})")
    args["base_lr"] = base
    if optimizer is not None:
        _check_cycle_momentum(args, optimizer)
        args["base_lr"], args["max_lr"] = _per_group(base, optimizer), _per_group(
            args["max_lr"], optimizer)


def _onecycle(args: dict, plan: _Plan, optimizer: torch.optim.Optimizer | None) -> None:
    for key in ("total_steps", "epochs", "steps_per_epoch"):
        if args.get(key) is not None:
            fail(f"scheduler.{key}", args[key], "is set from the run's budget; leave it out")
    args["total_steps"] = plan.span
    if optimizer is not None:
        _check_cycle_momentum(args, optimizer)
        args["max_lr"] = _per_group(args["max_lr"], optimizer)


def _absolute_floor(args: dict, plan: _Plan, optimizer: torch.optim.Optimizer | None) -> None:
    lrs = {g["lr"] for g in optimizer.param_groups} if optimizer is not None else set()
    if args.get("eta_min", 0.0) > 0 and len(lrs) > 1:
        warnings.warn("scheduler.eta_min is an absolute floor shared by every parameter group "
                      "(PyTorch), so per-layer lr ratios shrink towards it", stacklevel=3)


def _lambda(args: dict, plan: _Plan, optimizer: torch.optim.Optimizer | None) -> None:
    if not isinstance(args.get("lr_lambda"), str):
        fail("scheduler.lr_lambda", args.get("lr_lambda"), _EXPRESSIONS)
    fn = _multiplier(args["lr_lambda"], plan.interval, plan.budget.steps_per_epoch)
    for tick in (0, 1, plan.span):  # catch 1/0, log(0), overflow before training starts
        try:
            value = float(fn(tick))
        except (ArithmeticError, ValueError, TypeError) as err:
            fail("scheduler.lr_lambda", args["lr_lambda"], f"fails at tick {tick}: {err}")
        if not (math.isfinite(value) and value >= 0):
            fail("scheduler.lr_lambda", args["lr_lambda"], f"gives {value} at tick {tick}; a "
                 "multiplier must be finite and >= 0")


def _piecewise(args: dict, plan: _Plan, optimizer: torch.optim.Optimizer | None) -> None:
    values = args.get("values")
    if not isinstance(values, list) or len(values) != len(args["boundaries"]) + 1:
        fail("scheduler.values", values, f"needs one more value than scheduler.boundaries "
             f"({len(args['boundaries'])}): the multiplier before, between and after them")
    for i, v in enumerate(values):
        check_positive(f"scheduler.values[{i}]", v)


def _wsd(args: dict, plan: _Plan, optimizer: torch.optim.Optimizer | None) -> None:
    if args["decay"] > plan.span:
        fail("scheduler.decay", args["decay"], f"is longer than the run ({plan.span} "
             f"{plan.interval}s after warmup)")


# Cross-argument checks and per-group scaling, by target. `optimizer` is None while validating.
HOOKS: dict[Any, Callable[[dict, _Plan, torch.optim.Optimizer | None], None]] = {
    ReduceLROnPlateau: _plateau, CyclicLR: _cyclic, OneCycleLR: _onecycle,
    CosineAnnealingLR: _absolute_floor, CosineAnnealingWarmRestarts: _absolute_floor,
    lambda_lr: _lambda, piecewise_constant: _piecewise, wsd: _wsd,
}
# Targets a linear warmup cannot go in front of, and why.
NO_WARMUP = {
    ReduceLROnPlateau: "plateau is stepped with a metric, which SequentialLR cannot chain",
    CyclicLR: "cyclic starts its own ramp from base_lr",
    OneCycleLR: "onecycle warms up itself (pct_start)",
}


def _plan(cfg: Mapping, budget: Budget, direction: str | None) -> _Plan:
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    path = raw.pop("_target_", None)
    try:
        target = get_object(path)
    except Exception as err:
        fail("scheduler._target_", path, f"must name a torch.optim.lr_scheduler class or a "
             f"sweep.schedules function ({err})")
    interval = raw.pop("interval", "epoch")
    check_choice("scheduler.interval", interval, INTERVALS)
    warmup = raw.pop("warmup", None)
    raw.pop("search_space", None)
    plan = _Plan(target, raw, interval, budget, direction, name=path)

    params = inspect.signature(target).parameters
    # PyTorch's classes get only the optimizer; functions also get these by name if they take them.
    runtime = {} if inspect.isclass(target) and issubclass(target, LRScheduler) else {
        "total_ticks": 0, "interval": interval, "steps_per_epoch": budget.steps_per_epoch}
    runtime = {k: v for k, v in runtime.items() if k in params}
    for key in raw:
        if key in ("optimizer", "last_epoch", *runtime):
            fail(f"scheduler.{key}", raw[key], "is set by the builder from the run; leave it out")
        if key not in params:
            takes = [p for p in params if p not in ("optimizer", "last_epoch", *runtime)]
            fail(f"scheduler.{key}", raw[key], f"{path} takes only {', '.join(takes)} "
                 f"(and the meta keys {', '.join(META_KEYS)})")
    for name, p in params.items():
        if p.default is p.empty and name not in ("optimizer", *runtime) and name not in raw:
            fail(f"scheduler.{name}", None, f"{path} needs it")

    # Warmup first: the schedule's own fractions are of the run that is left after it.
    total = budget.ticks(interval)
    if warmup is not None:
        if target in NO_WARMUP:
            fail("scheduler.warmup", warmup, f"must be null: {NO_WARMUP[target]}")
        if not isinstance(warmup, dict) or "length" not in warmup or set(warmup) - {
                "length", "start_factor"}:
            fail("scheduler.warmup", warmup, "null or {length: <length>, start_factor: <(0, 1]>}")
        plan.start_factor = warmup.get("start_factor", 0.1)
        check_in_range("scheduler.warmup.start_factor", plan.start_factor, 0.0, 1.0)
        plan.warmup = to_ticks(warmup["length"], budget, interval, "scheduler.warmup.length")
        if plan.warmup < 0:
            fail("scheduler.warmup.length", warmup["length"], "must be >= 0")
        if plan.warmup > total:
            warnings.warn(f"scheduler.warmup.length={warmup['length']!r} is {plan.warmup} "
                          f"{interval}s, longer than the run ({total}); clamped to the run",
                          stacklevel=3)
            plan.warmup = total
    plan.span = max(1, total - plan.warmup)

    for key, value in raw.items():
        if value is None and key in NULLABLE:
            continue
        if key in LENGTH_KEYS:
            raw[key] = _length(key, value, plan)
        elif key in ARG_CHECKS:
            ARG_CHECKS[key](f"scheduler.{key}", value)
    raw.update(runtime)
    if "total_ticks" in runtime:
        raw["total_ticks"] = plan.span
    if target in HOOKS:
        HOOKS[target](dict(raw), plan, None)  # checks only; the build runs it with the optimizer
    return plan


def validate_scheduler(cfg_scheduler: Mapping, budget: Budget,
                       direction: str | None = None) -> None:
    """Check every scheduler value for this budget before training; raises ConfigError."""
    # The search space is left to search_space(): a run that does not search never reads it.
    _plan(cfg_scheduler, budget, direction)


def build_scheduler(cfg_scheduler: Mapping, optimizer: torch.optim.Optimizer, budget: Budget,
                    direction: str | None = None) -> Schedule:
    """The configured schedule for this optimizer and run (`direction` feeds plateau's mode: auto).

    Restoring: build first, then load the optimizer's and the scheduler's state_dicts.
    """
    plan = _plan(cfg_scheduler, budget, direction)
    kwargs = dict(plan.kwargs)
    if plan.target in HOOKS:
        HOOKS[plan.target](kwargs, plan, optimizer)
    try:
        scheduler = plan.target(optimizer, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler: {plan.name} rejected {kwargs}: {err}") from err
    if plan.warmup:
        warm = LinearLR(optimizer, plan.start_factor, 1.0, total_iters=plan.warmup)
        scheduler = SequentialLR(optimizer, [warm, scheduler], milestones=[plan.warmup])
    return Schedule(scheduler, plan.interval, needs_metric=plan.target is ReduceLROnPlateau)


# --- search spaces -------------------------------------------------------------------------------

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
            _boolean(f"{k}.log", spec["log"])
            if spec["low"] <= 0:
                fail(f"{k}.low", spec["low"], "must be > 0 for a log scale")
            if "step" in spec:
                fail(f"{k}.step", spec["step"], "cannot go with log: true (Optuna)")
        if "step" in spec:
            check_positive(f"{k}.step", spec["step"])
    return space


# --- simulation and the CLI ----------------------------------------------------------------------

def budget_from_config(cfg: DictConfig) -> Budget:
    """trainer.epochs of ceil(n_train / batch_size) steps; `+steps_per_epoch=N` skips the data."""
    steps = cfg.get("steps_per_epoch")
    if steps is None:
        from sweep.data import load_data  # late: loading data is only needed here

        check_int_at_least("trainer.batch_size", cfg.trainer.batch_size, 1)
        steps = load_data(cfg.dataset).steps_per_epoch(cfg.trainer.batch_size)
    return Budget(cfg.trainer.epochs, steps)


def simulate(cfg: DictConfig, budget: Budget | None = None) -> list[dict[str, Any]]:
    """The lr of every group at every optimizer step, stepped as the trainer does, without training.

    Rows are {step (from 0), epoch (from 1, as the trainer's lr trace), group, lr}. One parameter
    per group: `default` at optimizer.lr and one per optimizer.param_groups rule. A plateau schedule
    is fed a constant metric, so it shows how it behaves when training stalls.
    """
    from sweep.optim import validate_optimizer

    validate_optimizer(cfg.optimizer)
    budget = budget or budget_from_config(cfg)
    opt = OmegaConf.to_container(cfg.optimizer, resolve=True)
    rules = opt.pop("param_groups", None) or []
    groups = [{"name": "default", "lr": opt["lr"]}] + [
        {"name": r["pattern"], "lr": r["lr"] if "lr" in r else opt["lr"] * r["lr_scale"]}
        for r in rules]
    params = [dict(g, params=[torch.nn.Parameter(torch.zeros(1))]) for g in groups]
    optimizer = get_object(opt.pop("_target_"))(params, **opt)
    # Any direction agrees with a constant metric; take the one an explicit mode asks for.
    direction = "maximize" if cfg.scheduler.get("mode") == "max" else "minimize"
    schedule = build_scheduler(cfg.scheduler, optimizer, budget, direction=direction)
    rows = []
    for step in range(budget.total_steps):
        epoch = step // budget.steps_per_epoch + 1
        rows += [{"step": step, "epoch": epoch, "group": g["name"], "lr": float(g["lr"])}
                 for g in optimizer.param_groups]
        optimizer.step()  # no gradients: changes nothing, but calls come in the trainer's order
        if schedule.interval == "step":
            schedule.scheduler.step()
        elif (step + 1) % budget.steps_per_epoch == 0:
            schedule.scheduler.step(*([0.0] if schedule.needs_metric else []))
    return rows


def available_schedules() -> list[str]:
    """The names of conf/scheduler/*.yaml."""
    return sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml"))


def _configs_to_draw(cfg: DictConfig, overrides: list[str], chosen: str) -> dict[str, DictConfig]:
    """The composed config per schedule to draw, the user's other overrides kept for each."""
    wanted = cfg.get("schedules")
    if wanted is None:
        return {chosen: cfg}
    names = available_schedules() if wanted == "all" else (
        [wanted] if isinstance(wanted, str) else list(wanted))
    for name in names:
        check_choice("schedules", name, available_schedules())
    common = [o for o in overrides if override_key(o).split(".")[0] not in ("schedules",
                                                                              "scheduler")]
    own = [o for o in overrides if override_key(o).startswith("scheduler.")]
    configs = {}
    for name in names:
        base = compose([*common, f"scheduler={name}"])
        # An override such as scheduler.gamma=0.8 applies to the schedules that have a gamma.
        keep = [o for o in own if OmegaConf.select(base, override_key(o), default=_ABSENT)
                is not _ABSENT]
        configs[name] = compose([*common, f"scheduler={name}", *keep]) if keep else base
    return configs


def write_csv(rows_by_schedule: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Columns step, epoch, group, lr; a leading schedule column when there are several."""
    several = len(rows_by_schedule) > 1
    columns = (["schedule"] if several else []) + ["step", "epoch", "group", "lr"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for name, rows in rows_by_schedule.items():
            writer.writerows([{"schedule": name, **r} if several else r for r in rows])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """`python -m sweep.schedules <overrides>`: lr_schedule.png and .csv in Hydra's output dir."""
    from sweep.report import lr_figure  # late: matplotlib only for the CLI

    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    try:
        configs = _configs_to_draw(cfg, list(hydra_cfg.overrides.task),
                                   hydra_cfg.runtime.choices.scheduler)
        budget = budget_from_config(cfg)
        rows = {name: simulate(c, budget) for name, c in configs.items()}
    except Exception as err:
        from sweep.data import DataError  # late: the data module is slow to import

        if not isinstance(err, ConfigError | DataError):
            raise
        print(f"sweep.schedules: error: {err}", file=sys.stderr)
        sys.exit(2)
    title = f"lr schedule: {', '.join(configs)}" if len(configs) <= 3 else "lr schedules"
    title += f" ({budget.epochs} epochs x {budget.steps_per_epoch} steps)"
    plateaus = [n for n, c in configs.items()
                if get_object(c.scheduler._target_) is ReduceLROnPlateau]
    if plateaus:
        title += f"\n{', '.join(plateaus)}: fed a constant metric, so it shows a stalled run"
    fig = lr_figure(rows, x=cfg.get("x", "step"), log_y=bool(cfg.get("log_y", False)), title=title)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "lr_schedule.png", dpi=120)
    write_csv(rows, out / "lr_schedule.csv")
    print(f"wrote {out / 'lr_schedule.png'}\nwrote {out / 'lr_schedule.csv'}")


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the functions that configs name
    # (sweep.schedules.lambda_lr, ...) must be the ones HOOKS knows.
    from sweep.schedules import main as sweep_main

    sweep_main()
