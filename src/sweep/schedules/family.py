"""The schedules PyTorch lacks, each a small pure function: its arguments in, a multiplier out.

Each returns f(t), the factor on every parameter group's own lr at tick t, where t counts ticks of
the schedule's interval from 0 (after any warmup). The builder wraps f in PyTorch's LambdaLR, so
per-layer lrs keep their ratios and a restore rebuilds f from the config; before training it
evaluates f on every tick of the run, and each value must be a finite number >= 0. A function may
also take `total_ticks` (the ticks it runs: the run after warmup), `interval` and
`steps_per_epoch`, which the builder passes. Its YAML declares what each argument may be.
"""

from __future__ import annotations

import bisect
import math

from sweep.schedules.expressions import Multiplier, multiplier
from sweep.validation import fail


def lambda_lr(lr_lambda: str, interval: str = "epoch", steps_per_epoch: int = 1) -> Multiplier:
    """f(t) as written: an expression of epoch and step, such as the BN article's `0.5 ** epoch`.

    PyTorch's LambdaLR, with a safe expression (expressions.py) or a dotted path to your own f.
    """
    return multiplier(lr_lambda, "scheduler.lr_lambda", interval, steps_per_epoch)


def inverse_time(decay_steps: int, decay_rate: float = 1.0, staircase: bool = False) -> Multiplier:
    """1 / (1 + decay_rate * t / decay_steps), t / decay_steps floored if staircase.

    Keras InverseTimeDecay; old Keras `SGD(decay=d)` is decay_steps=1, decay_rate=d, per step.
    """
    def f(t: int) -> float:
        p = math.floor(t / decay_steps) if staircase else t / decay_steps
        return 1.0 / (1.0 + decay_rate * p)
    return f


def exponential_decay(decay_steps: int, decay_rate: float, staircase: bool = False) -> Multiplier:
    """decay_rate ** (t / decay_steps), the exponent floored if staircase.

    Keras ExponentialDecay.
    """
    def f(t: int) -> float:
        return decay_rate ** (math.floor(t / decay_steps) if staircase else t / decay_steps)
    return f


def piecewise_constant(boundaries: list[int], values: list[float]) -> Multiplier:
    """values[i] while boundaries[i-1] < t <= boundaries[i]: Keras PiecewiseConstantDecay.

    Keras' values are absolute lrs; here they multiply each group's lr, so per-layer ratios hold.
    """
    if len(values) != len(boundaries) + 1:
        fail("scheduler.values", values, f"needs one more value than scheduler.boundaries "
             f"({len(boundaries)}): the multiplier before, between and after them")
    return lambda t: values[bisect.bisect_left(boundaries, t)]


def step_decay(drop_every: int, factor: float = 0.25) -> Multiplier:
    """factor ** floor((1 + t) / drop_every).

    The article's StepDecay(initAlpha, factor, dropEvery), initAlpha being each group's lr.
    """
    # The article's `1 +` makes the first drop one epoch early (at dropEvery - 1); kept as written.
    return lambda t: factor ** math.floor((1 + t) / drop_every)


def poly_decay(max_epochs: int, power: float = 1.0) -> Multiplier:
    """(1 - t / max_epochs) ** power: the article's PolynomialDecay(maxEpochs, initAlpha, power)."""
    # Held at 0 past maxEpochs: a negative base to a fractional power has no real value.
    return lambda t: (1.0 - min(t, max_epochs) / max_epochs) ** power


def power_scheduling(s: int, c: float = 1.0) -> Multiplier:
    """(1 + t / s) ** -c: lr/2 at t = s and lr/3 at 2s with c = 1 (the BN article; Geron)."""
    return lambda t: (1.0 + t / s) ** -c


_SHAPES = {"linear": lambda p: p, "cosine": lambda p: (1 - math.cos(math.pi * p)) / 2,
           "sqrt": math.sqrt}  # sqrt: the paper's 1 - sqrt cooldown


def wsd(total_ticks: int, decay: int, decay_shape: str = "linear", min_factor: float = 0.0,
        interval: str = "epoch") -> Multiplier:
    """1, then down to min_factor over the last `decay` ticks: min + (1 - min) * (1 - shape(p)).

    Warmup-stable-decay (MiniCPM, Hu et al. 2024; Hagele et al. 2024 for the 1 - sqrt shape);
    the warmup is the `warmup` meta key in front of it, so total_ticks is the run after warmup.
    """
    if decay > total_ticks:
        fail("scheduler.decay", decay, f"is longer than the run ({total_ticks} {interval}s after "
             "warmup)")
    start, shape = total_ticks - decay, _SHAPES[decay_shape]

    def f(t: int) -> float:
        p = min(1.0, max(0, t - start) / max(1, decay))
        return min_factor + (1.0 - min_factor) * (1.0 - shape(p))
    return f
