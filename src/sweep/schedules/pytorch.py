"""What PyTorch's own schedulers need from the run: each function is named by a YAML's `prepare:`.

It gets the checked arguments (lengths already in ticks) and the `Run`, and completes them in
place: values the run decides, lrs scaled to every parameter group, checks across arguments, and
a refusal of `warmup` where a linear warmup cannot go in front. While a config is only validated
`run.optimizer` is None, and what needs the optimizer waits for the build.
"""

from __future__ import annotations

import warnings
from typing import Any

from sweep.schedules.build import Run
from sweep.validation import fail


def plateau(args: dict[str, Any], run: Run) -> None:
    """ReduceLROnPlateau: stepped with the validation metric; `mode: auto` follows its direction."""
    run.refuse_warmup("plateau is stepped with a metric, which SequentialLR cannot chain")
    if run.interval != "epoch":
        fail("scheduler.interval", run.interval, "plateau is stepped with the validation metric "
             "after each epoch: use epoch")
    mode = args.get("mode", "min")
    wanted = {"maximize": "max", "minimize": "min", "max": "max", "min": "min"}.get(run.direction)
    if mode == "auto" and run.optimizer is not None and wanted is None:
        fail("scheduler.mode", mode, "auto needs the metric's direction: build_scheduler(..., "
             "direction='maximize' | 'minimize')")
    if mode in ("min", "max") and wanted and mode != wanted:
        fail("scheduler.mode", mode, f"the trainer's metric is {run.direction}d here; use auto "
             f"or {wanted}")
    args["mode"] = wanted if mode == "auto" else mode
    args["min_lr"] = run.per_group(args.get("min_lr", 0.0))


def cyclic(args: dict[str, Any], run: Run) -> None:
    """CyclicLR: base_lr null is max_lr / 10; both are lrs for a group at optimizer.lr."""
    run.refuse_warmup("cyclic starts its own ramp from base_lr")
    base = args.get("base_lr")
    base = args["max_lr"] / 10 if base is None else base
    if not args["max_lr"] > base:
        fail("scheduler.max_lr", args["max_lr"], f"must be > scheduler.base_lr ({base})")
    args["base_lr"], args["max_lr"] = run.per_group(base), run.per_group(args["max_lr"])
    _cycle_momentum(args, run)


def one_cycle(args: dict[str, Any], run: Run) -> None:
    """OneCycleLR: total_steps is the run; max_lr is for a group at optimizer.lr."""
    run.refuse_warmup("onecycle warms up itself (pct_start)")
    args["total_steps"] = run.span
    args["max_lr"] = run.per_group(args["max_lr"])
    _cycle_momentum(args, run)


def absolute_floor(args: dict[str, Any], run: Run) -> None:
    """CosineAnnealingLR, CosineAnnealingWarmRestarts: eta_min is one lr for every group."""
    lrs = {g["lr"] for g in run.optimizer.param_groups} if run.optimizer is not None else set()
    if args.get("eta_min", 0.0) > 0 and len(lrs) > 1:
        warnings.warn("scheduler.eta_min is an absolute floor shared by every parameter group "
                      "(PyTorch), so per-layer lr ratios shrink towards it", stacklevel=5)


def _cycle_momentum(args: dict[str, Any], run: Run) -> None:
    # PyTorch's default (true) would overwrite SGD's momentum, or fail on Adagrad.
    opt = run.optimizer
    has = opt is None or opt.defaults.get("momentum", 0) > 0 or "betas" in opt.defaults
    if args.get("cycle_momentum", True) and not has:
        fail("scheduler.cycle_momentum", True, f"{type(opt).__name__} has no momentum or betas "
             "to cycle; set it false")
