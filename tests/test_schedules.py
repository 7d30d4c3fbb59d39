"""Every schedule in conf/scheduler/: real PyTorch schedulers over a tiny optimizer, no mocks."""

import csv
import inspect
import io
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf, open_dict
from torch.optim import lr_scheduler as L

from sweep import CONF_DIR
from sweep.config import ConfigError, compose
from sweep.plots import lr_figure
from sweep.schedules import (
    Budget,
    available_schedules,
    build_scheduler,
    parse_expression,
    search_space,
    simulate,
    to_ticks,
    validate_scheduler,
)
from sweep.schedules.build import META_KEYS
from sweep.schedules.checks import Rule, parse_rule

SCHEDULES = available_schedules()


def config(*overrides: str):
    return compose(["optimizer=sgd", "optimizer.lr=0.1", *overrides])


def tiny_optimizer(lrs=(0.1,), momentum=0.9):
    """One parameter per group, like the trainer's optimizer over per-layer groups."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr, "name": f"g{i}"}
              for i, lr in enumerate(lrs)]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=momentum)


def run(scheduler, optimizer, ticks, metrics=None):
    """The lrs of every group at each tick, stepping as the trainer does (optimizer first)."""
    lrs = []
    for t in range(ticks):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step(metrics[t]) if metrics is not None else scheduler.step()
    return lrs


def first_group(rows):
    return [r["lr"] for r in rows if r["group"] == "default"]


# --- every YAML ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_composes_validates_builds_and_steps(name):
    cfg = compose([f"scheduler={name}", "trainer.epochs=5"])
    budget = Budget(epochs=5, steps_per_epoch=3)
    validate_scheduler(cfg.scheduler, budget, direction="minimize")
    space = search_space(cfg.scheduler)
    assert "optimizer.lr" in space
    schedule = build_scheduler(cfg.scheduler, tiny_optimizer(), budget, direction="minimize")
    assert schedule.interval in ("epoch", "step")
    assert schedule.needs_metric == (name == "plateau")
    rows = simulate(cfg, budget)
    assert len(rows) == budget.total_steps
    assert all(math.isfinite(r["lr"]) and r["lr"] >= 0 for r in rows)


def own_settings(name):
    """The arguments conf/scheduler/<name>.yaml passes to its target, and its declared checks."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "scheduler" / f"{name}.yaml"))
    return [k for k in raw if k != "_target_" and k not in META_KEYS], raw.get("checks") or {}


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_declares_one_check_per_argument(name):
    settings, checks = own_settings(name)
    assert sorted(checks) == sorted(settings), f"{name}.yaml: `checks:` must name its arguments"
    cfg = compose([f"scheduler={name}"])
    params = inspect.signature(get_object(cfg.scheduler._target_)).parameters
    for key, rule in checks.items():
        assert key in params
        assert isinstance(parse_rule(f"scheduler.checks.{key}", rule), Rule)


def bad_value(rule: Rule):
    """A value the rule refuses (never null)."""
    if rule.kind == "choice":
        return "not-one-of-them"
    if rule.kind in ("bool", "text"):
        return 3 if rule.kind == "text" else "maybe"
    if rule.kind in ("length", "lengths"):
        return "3 fortnights"
    one = (rule.low - 1 if rule.low > -math.inf else rule.high + 1 if rule.high < math.inf
           else "a string")
    return [one] if rule.kind == "numbers" else one


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_declared_check_refuses_a_bad_value_naming_its_key(name):
    _, checks = own_settings(name)
    for key, text in checks.items():
        cfg = compose([f"scheduler={name}", "trainer.epochs=10"])
        value = bad_value(parse_rule(key, text))
        OmegaConf.update(cfg, f"scheduler.{key}", value, merge=False)
        with pytest.raises(ConfigError) as err:
            validate_scheduler(cfg.scheduler, Budget(10, 2), direction="minimize")
        message = str(err.value)
        assert message.startswith(f"scheduler.{key}") and " is not allowed: " in message, message
        assert "\n" not in message


@pytest.mark.parametrize("text,rule", [
    ("number in (0, 1]", Rule("number", 0, 1, low_open=True)),
    ("number >= 0", Rule("number", low=0)),
    ("integer >= 1", Rule("integer", low=1)),
    ("length", Rule("length", low=1)),
    ("length >= 0", Rule("length", low=0)),
    ("lengths", Rule("lengths", low=1)),
    ("number in [0, 1)", Rule("number", 0, 1, high_open=True)),
    ("number >= 0 or null", Rule("number", low=0, nullable=True)),
    ("bool", Rule("bool")),
    (["cos", "linear"], Rule("choice", choices=("cos", "linear"))),
])
def test_check_rules_read_as_written(text, rule):
    assert parse_rule("k", text) == rule


@pytest.mark.parametrize("text", ["unit", "number in 0..1", "bool > 0", "number > x", "", 3, []])
def test_a_malformed_check_rule_fails_naming_its_key(text):
    with pytest.raises(ConfigError, match="k="):
        parse_rule("k", text)


# Closed forms over 100 ticks at lr 0.1 (Budget(100, 1): epochs and steps are the same ticks).
def sgdr(t, T_0=5, T_mult=2, lr=0.1, eta_min=0.0):
    T_i = T_0
    while t >= T_i:
        t, T_i = t - T_i, T_i * T_mult
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t / T_i)) / 2


def one_cycle(t, total=100, max_lr=0.1, pct=0.3, div=25.0, final_div=1e4):
    def anneal(start, end, p):
        return end + (start - end) / 2 * (1 + math.cos(math.pi * p))
    end_up = pct * total - 1
    if t <= end_up:
        return anneal(max_lr / div, max_lr, t / end_up)
    return anneal(max_lr, max_lr / div / final_div, (t - end_up) / (total - 1 - end_up))


def triangle(t, base=0.01, top=0.1, half=4):
    cycle = math.floor(1 + t / (2 * half))
    x = abs(t / half - 2 * cycle + 1)
    return base + (top - base) * max(0.0, 1 - x)


CLOSED_FORMS = {
    "constant": ([], lambda t: 0.1),
    # The article's StepLR(step_size=5, gamma=0.8) over 100 epochs.
    "step": (["scheduler.step_size=5", "scheduler.gamma=0.8"], lambda t: 0.1 * 0.8 ** (t // 5)),
    # The article's MultiStepLR([30, 80], 0.1): 0.1, then 0.01, then 0.001.
    "multistep": (["scheduler.milestones=[30,80]", "scheduler.gamma=0.1"],
                  lambda t: 0.1 if t < 30 else 0.01 if t < 80 else 0.001),
    "exponential": (["scheduler.gamma=0.9"], lambda t: 0.1 * 0.9 ** t),
    # The article's CosineAnnealingLR(T_max=10, eta_min=0.01): cycles between 0.1 and 0.01.
    "cosine": (["scheduler.T_max=10", "scheduler.eta_min=0.01"],
               lambda t: 0.01 + 0.09 * (1 + math.cos(math.pi * t / 10)) / 2),
    "cosine_restarts": (["scheduler.T_0=5", "scheduler.T_mult=2"], sgdr),
    "lambda": (["scheduler.lr_lambda='0.5 ** epoch'"], lambda t: 0.1 * 0.5 ** t),
    "cyclic": (["scheduler.step_size_up=4"], triangle),
    "onecycle": ([], one_cycle),
    "polynomial": (["scheduler.total_iters=1.0", "scheduler.power=2.0"],
                   lambda t: 0.1 * (1 - t / 100) ** 2),
    "linear": (["scheduler.start_factor=1.0", "scheduler.end_factor=0.0"],
               lambda t: 0.1 * (1 - t / 100)),
    # Keras InverseTimeDecay: lr / (1 + decay_rate * t / decay_steps).
    "inverse_time": (["scheduler.decay_rate=0.5", "scheduler.decay_steps=10"],
                     lambda t: 0.1 / (1 + 0.5 * t / 10)),
    # Keras ExponentialDecay with staircase: lr * decay_rate ** floor(t / decay_steps).
    "exponential_decay": (["scheduler.decay_rate=0.96", "scheduler.decay_steps=10",
                           "scheduler.staircase=true"], lambda t: 0.1 * 0.96 ** (t // 10)),
    # Keras' example with boundaries [30, 60]: values[i] while t <= boundaries[i].
    "piecewise_constant": (["scheduler.boundaries=[30,60]", "scheduler.values=[1.0,0.5,0.1]"],
                           lambda t: 0.1 if t <= 30 else 0.05 if t <= 60 else 0.01),
    # The article's StepDecay(initAlpha=0.1, factor=0.25, dropEvery=15).
    "step_decay": (["scheduler.factor=0.25", "scheduler.drop_every=15"],
                   lambda t: 0.1 * 0.25 ** math.floor((1 + t) / 15)),
    # The article's PolynomialDecay(maxEpochs=100, initAlpha=0.1, power=5).
    "poly_decay": (["scheduler.max_epochs=100", "scheduler.power=5"],
                   lambda t: 0.1 * (1 - t / 100) ** 5),
    # Power scheduling: lr, lr/2 at t = s, lr/3 at 2s.
    "power": (["scheduler.s=10", "scheduler.c=1.0"], lambda t: 0.1 / (1 + t / 10)),
    # 10 ticks of warmup from 0.01, then a cosine over the remaining 90.
    "cosine_warmup": (["scheduler.warmup.length=10", "scheduler.warmup.start_factor=0.1"],
                      lambda t: 0.1 * (0.1 + 0.9 * t / 10) if t < 10
                      else 0.1 * (1 + math.cos(math.pi * (t - 10) / 90)) / 2),
    # Warmup 10, stable until the last 18 of the remaining 90 (decay 0.2), then linear to 0.
    "wsd": (["scheduler.warmup.length=10", "scheduler.decay=0.2"],
            lambda t: 0.1 * (0.1 + 0.9 * t / 10) if t < 10 else 0.1 if t < 82
            else 0.1 * (1 - (t - 82) / 18)),
    # Fed a constant metric: a cut after 1 + patience + 1 epochs, then every patience + 1.
    "plateau": (["scheduler.patience=9", "scheduler.factor=0.5"],
                lambda t: 0.1 * 0.5 ** max(0, (t - 1) // 10)),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_follows_its_closed_form(name):
    # A new schedule fails here until its formula and the values it gives are written above.
    assert name in CLOSED_FORMS, f"conf/scheduler/{name}.yaml: add its closed form to CLOSED_FORMS"
    overrides, formula = CLOSED_FORMS[name]
    rows = simulate(config(f"scheduler={name}", "trainer.epochs=100", *overrides), Budget(100, 1))
    assert first_group(rows) == pytest.approx([formula(t) for t in range(100)], rel=1e-9,
                                              abs=1e-12)


def test_closed_forms_name_only_existing_schedules():
    assert set(CLOSED_FORMS) <= set(SCHEDULES)


def test_lambda_is_the_articles_half_per_epoch():
    # The BN article: LambdaLR(0.5 ** epoch) at 0.05 gives 0.025 after one epoch.
    cfg = config("scheduler=lambda", "optimizer.lr=0.05")
    assert first_group(simulate(cfg, Budget(3, 2))) == pytest.approx(
        [0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])


# PyTorch's own schedules against the class built directly, as in the articles.
NATIVE = {
    "constant": ([], lambda o: L.ConstantLR(o, factor=1.0, total_iters=1)),
    "step": (["scheduler.step_size=5", "scheduler.gamma=0.8"], lambda o: L.StepLR(o, 5, 0.8)),
    "multistep": (["scheduler.milestones=[30,80]"], lambda o: L.MultiStepLR(o, [30, 80], 0.1)),
    "exponential": (["scheduler.gamma=0.9"], lambda o: L.ExponentialLR(o, 0.9)),
    "cosine": (["scheduler.T_max=10", "scheduler.eta_min=0.01"],
               lambda o: L.CosineAnnealingLR(o, T_max=10, eta_min=0.01)),
    "cosine_restarts": (["scheduler.T_0=5", "scheduler.T_mult=2"],
                        lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2)),
    "lambda": ([], lambda o: L.LambdaLR(o, lambda epoch: 0.5 ** epoch)),
    "cyclic": (["scheduler.step_size_up=4", "scheduler.mode=triangular2"],
               lambda o: L.CyclicLR(o, 0.01, 0.1, step_size_up=4, mode="triangular2",
                                    cycle_momentum=False)),
    "onecycle": ([], lambda o: L.OneCycleLR(o, 0.1, total_steps=100, cycle_momentum=False)),
    "polynomial": (["scheduler.total_iters=50", "scheduler.power=0.5"],
                   lambda o: L.PolynomialLR(o, total_iters=50, power=0.5)),
    "linear": (["scheduler.start_factor=0.5", "scheduler.end_factor=0.1",
                "scheduler.total_iters=40"],
               lambda o: L.LinearLR(o, start_factor=0.5, end_factor=0.1, total_iters=40)),
    "plateau": (["scheduler.patience=2", "scheduler.cooldown=1", "scheduler.mode=min"],
                lambda o: L.ReduceLROnPlateau(o, "min", factor=0.5, patience=2, cooldown=1)),
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_pytorch_schedules_match_the_class_built_directly(name):
    overrides, make = NATIVE[name]
    cfg = config(f"scheduler={name}", "trainer.epochs=100", *overrides)
    metrics = [1.0 / (1 + min(t, 20)) for t in range(100)] if name == "plateau" else None
    ours = build_scheduler(cfg.scheduler, opt := tiny_optimizer(), Budget(100, 1), "minimize")
    theirs = make(reference := tiny_optimizer())
    expected = [lr for (lr,) in run(theirs, reference, 100, metrics)]
    assert [lr for (lr,) in run(ours.scheduler, opt, 100, metrics)] == pytest.approx(
        expected, rel=1e-12)


# --- state, warmup, intervals, lengths, groups ---------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULES)
def test_restoring_mid_way_continues_the_identical_sequence(name):
    cfg = config(f"scheduler={name}", "trainer.epochs=6")
    budget = Budget(6, 4)
    ticks = budget.ticks(cfg.scheduler.interval)
    metrics = [1.0, 0.5, 0.5, 0.5, 0.5, 0.4] if name == "plateau" else None

    def fresh():
        opt = tiny_optimizer((0.1, 0.01))
        return opt, build_scheduler(cfg.scheduler, opt, budget, "minimize").scheduler

    opt, sched = fresh()
    half = ticks // 2
    run(sched, opt, half, metrics)
    saved = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, saved)
    rest = metrics[half:] if metrics else None
    expected = run(sched, opt, ticks - half, rest)

    opt, sched = fresh()  # as a resumed trainer: build from the config, then load both states
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert run(sched, opt, ticks - half, rest) == expected


@pytest.mark.parametrize("name", SCHEDULES)
def test_per_layer_lrs_keep_their_ratio_throughout(name):
    cfg = config(f"scheduler={name}", "trainer.epochs=6",
                 "optimizer.param_groups=[{pattern: layer1, lr_scale: 0.1}]")
    rows = simulate(cfg, Budget(6, 4))
    base = first_group(rows)
    scaled = [r["lr"] for r in rows if r["group"] == "layer1"]
    assert base == pytest.approx([10 * lr for lr in scaled], rel=1e-9, abs=1e-15)


def test_warmup_goes_in_front_of_any_schedule():
    cfg = config("scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.5",
                 "scheduler.warmup={length: 3, start_factor: 0.1}", "trainer.epochs=9")
    lrs = first_group(simulate(cfg, Budget(9, 1)))
    # 0.01 rising linearly to 0.1, then StepLR's own clock starts at 0.
    assert lrs == pytest.approx([0.01, 0.04, 0.07, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_warmup_in_epochs_of_a_per_step_schedule():
    cfg = config("scheduler=exponential", "scheduler.interval=step", "scheduler.gamma=0.5",
                 "scheduler.warmup={length: '1 epoch', start_factor: 0.5}")
    lrs = first_group(simulate(cfg, Budget(2, 2)))
    assert lrs == pytest.approx([0.05, 0.075, 0.1, 0.05])


def test_warmup_longer_than_the_run_warns_and_is_clamped():
    cfg = config("scheduler=cosine_warmup", "scheduler.warmup.length='20 epochs'")
    with pytest.warns(UserWarning, match="clamped"):
        lrs = first_group(simulate(cfg, Budget(4, 1)))
    assert lrs == pytest.approx([0.1 * (0.1 + 0.9 * t / 4) for t in range(4)])


def test_step_interval_steps_after_every_batch():
    cfg = config("scheduler=step", "scheduler.interval=step", "scheduler.step_size='1 epoch'",
                 "scheduler.gamma=0.5")
    rows = simulate(cfg, Budget(3, 4))
    assert first_group(rows) == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)
    assert [r["epoch"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
    per_step = first_group(simulate(config("scheduler=cosine", "scheduler.interval=step"),
                                    Budget(3, 4)))
    assert len(set(per_step)) == 12  # a new lr at every optimizer step


def test_epoch_interval_holds_the_lr_within_each_epoch():
    rows = simulate(config("scheduler=exponential", "scheduler.gamma=0.5"), Budget(3, 4))
    assert first_group(rows) == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)


def test_lengths_convert_between_epochs_steps_and_fractions():
    budget = Budget(epochs=4, steps_per_epoch=5)
    assert to_ticks(1.0, budget, "epoch", "k") == 4
    assert to_ticks(1.0, budget, "step", "k") == 20
    assert to_ticks(0.5, budget, "step", "k") == 10
    assert to_ticks(0.01, budget, "epoch", "k") == 1  # a part of the run is at least one tick
    assert to_ticks(0.0, budget, "epoch", "k") == 0
    assert to_ticks("3 epochs", budget, "step", "k") == 15
    assert to_ticks("1 epoch", budget, "epoch", "k") == 1
    assert to_ticks("10 steps", budget, "epoch", "k") == 2
    assert to_ticks("7 steps", budget, "step", "k") == 7
    assert to_ticks(3, budget, "step", "k") == 3
    assert to_ticks(0.5, budget, "epoch", "k", span=3) == 2  # fractions of the run after warmup
    for bad in (1.5, -0.1, "3 fortnights", "epochs", True, None, [1]):
        with pytest.raises(ConfigError, match="k="):
            to_ticks(bad, budget, "epoch", "k")


@pytest.mark.parametrize("interval,t_max", [("epoch", 4), ("step", 20)])
def test_t_max_one_is_the_whole_run_in_either_interval(interval, t_max):
    cfg = config("scheduler=cosine", f"scheduler.interval={interval}", "scheduler.T_max=1.0")
    schedule = build_scheduler(cfg.scheduler, tiny_optimizer(), Budget(4, 5))
    assert schedule.scheduler.T_max == t_max
    lrs = first_group(simulate(cfg, Budget(4, 5)))
    last = t_max - 1  # the last tick applied: one short of the cosine's end
    assert lrs[-1] == pytest.approx(0.1 * (1 + math.cos(math.pi * last / t_max)) / 2)


def test_plateau_cuts_the_lr_exactly_when_the_metric_stalls_for_patience_epochs():
    cfg = config("scheduler=plateau", "scheduler.patience=2", "scheduler.factor=0.1",
                 "scheduler.threshold=0.0")
    opt = tiny_optimizer()
    schedule = build_scheduler(cfg.scheduler, opt, Budget(10, 1), direction="minimize")
    assert schedule.needs_metric and schedule.interval == "epoch"
    val_mse = [1.0, 0.8, 0.6, 0.6, 0.6, 0.6, 0.5, 0.5, 0.5, 0.5]
    lrs = [g[0] for g in run(schedule.scheduler, opt, 10, val_mse)]
    # Best 0.6 after epoch 3; epochs 4, 5, 6 do not improve: 3 > patience, so the cut follows
    # epoch 6 (0.5 at epoch 7 is then an improvement on 0.6, and the count starts again).
    assert lrs == pytest.approx([0.1] * 6 + [0.01] * 4)


def test_plateau_mode_auto_follows_the_metrics_direction():
    cfg = config("scheduler=plateau", "scheduler.patience=1", "scheduler.factor=0.5")
    val_acc = [0.5, 0.6, 0.7, 0.8, 0.9]  # always improving when maximised
    opt = tiny_optimizer()
    schedule = build_scheduler(cfg.scheduler, opt, Budget(5, 1), direction="maximize")
    assert [g[0] for g in run(schedule.scheduler, opt, 5, val_acc)] == [0.1] * 5
    with pytest.raises(ConfigError, match="scheduler.mode='auto'"):
        build_scheduler(cfg.scheduler, tiny_optimizer(), Budget(5, 1))  # direction unknown


def test_lambda_accepts_a_dotted_path_and_rebuilds_it_on_restore():
    cfg = config("scheduler=lambda", f"scheduler.lr_lambda={__name__}.halving")
    assert first_group(simulate(cfg, Budget(3, 1))) == pytest.approx([0.1, 0.05, 0.025])
    opt = tiny_optimizer()
    sched = build_scheduler(cfg.scheduler, opt, Budget(3, 1)).scheduler
    run(sched, opt, 2)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    assert state["scheduler"]["lr_lambdas"] == [None]  # PyTorch does not save plain functions
    opt = tiny_optimizer()
    sched = build_scheduler(cfg.scheduler, opt, Budget(3, 1)).scheduler
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert run(sched, opt, 1) == [[pytest.approx(0.025)]]


def halving(tick: int) -> float:
    return 0.5 ** tick


def two_arguments(tick: int, k: float) -> float:
    return k ** tick


def text_multiplier(tick: int) -> str:
    return "1.0"


def negative_after_two(tick: int) -> float:
    return 1.0 if tick < 2 else -1.0


def fails_at_three(tick: int) -> float:
    return 1.0 / (tick - 3)


class Halving:
    def __call__(self, tick: int) -> float:
        return 0.5 ** tick


HALVING = Halving()


# Each one ends in a one-line ConfigError before a scheduler exists, and nothing it names is run
# (sys.exit would end pytest, input would raise OSError under its capture).
BAD_LAMBDAS = [
    "sys.exit", "os._exit", "builtins.input", "math.exp", "collections.OrderedDict",
    "os.path.basename",  # a Python function of one argument, but the standard library's
    "torch.manual_seed",  # an installed package's
    "epoch(1)", "exp(epoch, 2)", "min(epoch)", "epoch.real", "nomodule.f",
    "1 / (epoch - 3) ** 2", "(epoch - 3) ** 2 - 1", "(-1) ** 0.5", "exp(1000 * epoch)",
    "log(epoch)", "1e308 * 10 * epoch", "0.5 ** epoch if epoch < 4 else -1",
    f"{__name__}.two_arguments", f"{__name__}.text_multiplier", f"{__name__}.negative_after_two",
    f"{__name__}.fails_at_three", f"{__name__}.HALVING", f"{__name__}.Halving",
    f"{__name__}.missing", f"{__name__}",
]


@pytest.mark.parametrize("value", BAD_LAMBDAS)
def test_a_bad_lambda_fails_in_one_line_naming_the_value(value):
    cfg = config("scheduler=lambda", "trainer.epochs=5")
    cfg.scheduler.lr_lambda = value
    with pytest.raises(ConfigError) as err:
        validate_scheduler(cfg.scheduler, Budget(5, 2))
    message = str(err.value)
    assert message.startswith(f"scheduler.lr_lambda={value!r} is not allowed: "), message
    assert "\n" not in message
    with pytest.raises(ConfigError):
        build_scheduler(cfg.scheduler, tiny_optimizer(), Budget(5, 2))


@pytest.mark.parametrize("interval,ticks", [("epoch", 5), ("step", 15)])
def test_a_lambda_is_checked_on_every_tick_including_the_last(interval, ticks):
    # The trainer's last step() computes the lr after the last step: that tick counts too.
    cfg = config("scheduler=lambda", f"scheduler.interval={interval}",
                 f"scheduler.lr_lambda='1 / abs({interval} - {ticks})'")
    with pytest.raises(ConfigError, match=f"at {interval} {ticks} of 0..{ticks};"):
        validate_scheduler(cfg.scheduler, Budget(5, 3))
    cfg.scheduler.lr_lambda = f"1 / abs({interval} - {ticks + 1})"
    validate_scheduler(cfg.scheduler, Budget(5, 3))


def test_a_bad_lambda_stops_training_before_the_first_epoch(tmp_path):
    from sweep.train import train

    cfg = compose(["dataset=synthetic_regression", "dataset.n_samples=100", "model=mlp",
                   "tracking=none", "trainer.progress=false", "trainer.epochs=5",
                   "scheduler=lambda", "scheduler.lr_lambda='1 / (epoch - 3) ** 2'"])
    epochs = []
    with pytest.raises(ConfigError, match="scheduler.lr_lambda="):
        train(cfg, callback=lambda e, m: epochs.append(e), output_dir=tmp_path)
    assert epochs == []


@pytest.mark.parametrize("value", ["sys.exit", "'1 / (epoch - 3) ** 2'"])
def test_the_training_cli_refuses_a_bad_lambda_with_exit_code_2(tmp_path, value):
    cmd = [sys.executable, "-m", "sweep", "scheduler=lambda", f"scheduler.lr_lambda={value}",
           "tracking=none", "trainer.epochs=5", "dataset=synthetic_regression", "model=mlp",
           "dataset.n_samples=100", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"sweep: error: scheduler.lr_lambda={value.strip(chr(39))!r} is "
                                "not allowed: "), done.stderr
    assert "Traceback" not in done.stderr and "status:" not in done.stdout


@pytest.mark.parametrize("text", ["__import__('os').system('echo owned')", "epoch.__class__",
                                  "open('x')", "[epoch]", "lambda: 1", "exp", "x ** 2",
                                  "math.exp(epoch)(1)", "epoch and 1", "'a' * 3"])
def test_lambda_expressions_allow_arithmetic_only(text):
    with pytest.raises(ConfigError, match="scheduler.lr_lambda"):
        parse_expression(text, "scheduler.lr_lambda")


def test_lambda_expressions_use_epoch_or_step_in_either_interval():
    cfg = config("scheduler=lambda", "scheduler.interval=step",
                 "scheduler.lr_lambda='0.5 ** epoch if step < 6 else 0.1 * min(1, sqrt(4))'")
    assert first_group(simulate(cfg, Budget(4, 2))) == pytest.approx(
        [0.1, 0.1 * 0.5 ** 0.5, 0.05, 0.1 * 0.5 ** 1.5, 0.025, 0.1 * 0.5 ** 2.5, 0.01, 0.01])


# --- validation ----------------------------------------------------------------------------------

def _space(cfg, spec, path="optimizer.lr"):
    with open_dict(cfg):
        cfg.scheduler.search_space[path] = spec


ERRORS = [
    (["scheduler=step", "scheduler.gamma=1.5"], None, "scheduler.gamma=1.5"),
    (["scheduler=step", "scheduler.gamma=0"], None, "scheduler.gamma=0"),
    (["scheduler=step", "scheduler.step_size=0"], None, "scheduler.step_size=0"),
    (["scheduler=multistep", "scheduler.milestones=[0.8,0.3]"], None, "scheduler.milestones="),
    (["scheduler=piecewise_constant", "scheduler.values=[1.0,0.5]"], None, "scheduler.values="),
    (["scheduler=cyclic", "scheduler.base_lr=0.5"], None, "scheduler.max_lr=0.1"),
    (["scheduler=polynomial", "scheduler.power=0"], None, "scheduler.power=0"),
    (["scheduler=step", "scheduler.interval=hourly"], None, "scheduler.interval='hourly'"),
    (["scheduler=plateau", "scheduler.interval=step"], None, "scheduler.interval='step'"),
    (["scheduler=plateau", "scheduler.mode=min"], None, "scheduler.mode='min'"),
    (["scheduler=plateau", "scheduler.factor=1.0"], None, "scheduler.factor=1.0"),
    (["scheduler=plateau", "scheduler.warmup={length: 2}"], None, "scheduler.warmup="),
    (["scheduler=cosine", "scheduler.T_max='3 fortnights'"], None, "scheduler.T_max='3 fortn"),
    (["scheduler=cosine", "scheduler.T_max=1.5"], None, "scheduler.T_max=1.5"),
    (["scheduler=cosine_restarts", "scheduler.T_mult=0"], None, "scheduler.T_mult=0"),
    (["scheduler=step", "+scheduler.gama=0.5"], None, "scheduler.gama=0.5"),
    (["scheduler=onecycle", "+scheduler.total_steps=10"], None, "scheduler.total_steps=10"),
    (["scheduler=wsd", "scheduler.decay=1000"], None, "scheduler.decay=1000"),
    (["scheduler=cosine_warmup", "scheduler.warmup.start_factor=0"], None,
     "scheduler.warmup.start_factor=0"),
    (["scheduler=lambda", "scheduler.lr_lambda='1 / (epoch - 1)'"], None, "scheduler.lr_lambda="),
    (["scheduler=lambda", "scheduler.lr_lambda='__import__(\"os\")'"], None,
     "scheduler.lr_lambda="),
    (["scheduler=lambda", "scheduler.lr_lambda=1"], None, "scheduler.lr_lambda=1"),
    (["scheduler=multistep", "scheduler.milestones=30"], None, "scheduler.milestones=30"),
    (["scheduler=cyclic", "+scheduler.scale_mode=cycle"], None, "scheduler.scale_mode='cycle'"),
    (["scheduler=step", "+scheduler.last_epoch=3"], None, "scheduler.last_epoch=3"),
    (["scheduler=wsd", "+scheduler.total_ticks=3"], None, "scheduler.total_ticks=3"),
    (["scheduler=step", "scheduler._target_=os.system"], None, "scheduler._target_='os.system'"),
    (["scheduler=step", "scheduler._target_=torch.optim.SGD"], None, "scheduler._target_="),
    (["scheduler=step", "+scheduler.prepare=builtins.print"], None, "scheduler.prepare="),
    (["scheduler=step", "+scheduler.checks.gama='number > 0'"], None, "scheduler.checks.gama="),
    (["scheduler=step", "scheduler.checks.gamma=unit"], None, "scheduler.checks.gamma='unit'"),
    # A function of ours is evaluated on every tick too; with several settings it names them all.
    (["scheduler=exponential_decay", "scheduler.decay_rate=1e300", "scheduler.decay_steps=1"],
     None, "scheduler={'decay_rate': 1e+300"),
    (["scheduler=step"], lambda c: _space(c, {"type": "float", "low": 1.0, "high": 0.1}),
     "scheduler.search_space.optimizer.lr.low=1.0"),
    (["scheduler=step"], lambda c: _space(c, {"type": "normal", "low": 0.1, "high": 1.0}),
     "scheduler.search_space.optimizer.lr.type='normal'"),
    (["scheduler=step"], lambda c: _space(c, {"type": "categorical"}),
     "scheduler.search_space.optimizer.lr.choices=None"),
    (["scheduler=step"], lambda c: _space(c, {"type": "float", "low": 0.0, "high": 1.0,
                                              "log": True}),
     "scheduler.search_space.optimizer.lr.low=0.0"),
    (["scheduler=step"], lambda c: _space(c, {"type": "float", "low": 0.1, "high": 0.9},
                                          "scheduler.gama"),
     "scheduler.search_space.scheduler.gama="),
]


@pytest.mark.parametrize("overrides,edit,message", ERRORS, ids=[e[2] for e in ERRORS])
def test_bad_values_give_one_clear_error_naming_the_key(overrides, edit, message):
    cfg = config("trainer.epochs=10", *overrides)
    if edit is not None:
        edit(cfg)
    with pytest.raises(ConfigError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        validate_scheduler(cfg.scheduler, Budget(10, 2), direction="maximize")
        search_space(cfg.scheduler)  # what a study checks before its first trial
    assert message in str(err.value)
    assert "not allowed" in str(err.value)
    assert "\n" not in str(err.value)


def test_cycling_momentum_needs_an_optimizer_with_momentum():
    cfg = config("scheduler=cyclic", "optimizer=adagrad", "scheduler.cycle_momentum=true")
    with pytest.raises(ConfigError, match="scheduler.cycle_momentum=True"):
        simulate(cfg, Budget(4, 2))
    simulate(config("scheduler=onecycle", "optimizer=adam", "scheduler.cycle_momentum=true"),
             Budget(4, 2))  # Adam cycles beta1


# --- plots and the CLI ---------------------------------------------------------------------------

def test_lr_figure_draws_one_line_per_schedule_and_group():
    rows = {n: simulate(config(f"scheduler={n}", "optimizer.param_groups=[{pattern: a, lr: 0.01}]"),
                        Budget(3, 2)) for n in ("step", "cosine")}
    fig = lr_figure(rows, x="epoch", log_y=True, title="t")
    ax = fig.axes[0]
    assert len(ax.lines) == 4
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "learning rate"
    assert ax.get_yscale() == "log"
    assert list(ax.lines[0].get_xdata()) == [0, 0.5, 1, 1.5, 2, 2.5, 3]  # to the end of epoch 3


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_the_plot_and_the_table(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sweep.schedules", "scheduler=step", "trainer.epochs=20",
           "dataset=synthetic_regression", f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(out / "lr_schedule.png") in done.stdout
    assert (out / "lr_schedule.png").stat().st_size > 0
    rows = _read_csv(out / "lr_schedule.csv")
    assert list(rows[0]) == ["step", "epoch", "group", "lr"]
    steps_per_epoch = math.ceil(700 / 64)  # 1000 samples, 30% held out, batch 64
    assert len(rows) == 20 * steps_per_epoch
    assert float(rows[0]["lr"]) == pytest.approx(0.05)


@pytest.mark.slow  # another CLI start (~5 s)
def test_cli_draws_several_schedules_with_the_users_overrides(tmp_path):
    # scheduler.* overrides reach the drawn schedules that have the key; `++` lets Hydra accept
    # one that the primary schedule (cosine by default) lacks.
    cmd = [sys.executable, "-m", "sweep.schedules", "+schedules=[step,cosine,plateau]",
           "++scheduler.gamma=0.8", "++scheduler.step_size=1", "trainer.epochs=3",
           "+steps_per_epoch=2", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = _read_csv(tmp_path / "lr_schedule.csv")
    assert list(rows[0]) == ["schedule", "step", "epoch", "group", "lr"]
    by = {n: [float(r["lr"]) for r in rows if r["schedule"] == n] for n in ("step", "cosine",
                                                                           "plateau")}
    assert by["step"] == pytest.approx([0.05, 0.05, 0.04, 0.04, 0.032, 0.032])
    assert len(by["cosine"]) == len(by["plateau"]) == 6


@pytest.mark.slow  # another CLI start (~5 s)
def test_cli_reports_a_bad_value_without_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "sweep.schedules", "scheduler=piecewise_constant",
           "scheduler.values=[1.0]", "+steps_per_epoch=2", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "scheduler.values=[1.0] is not allowed: needs one more value" in done.stderr
    assert "Traceback" not in done.stderr


def test_search_spaces_round_trip_as_plain_dicts():
    space = search_space(config("scheduler=step").scheduler)
    assert json.loads(json.dumps(space)) == space  # plain containers for Optuna's suggest_* calls
    assert space["optimizer.lr"] == {"type": "float", "low": 1.0e-4, "high": 1.0, "log": True}


@pytest.mark.slow  # two CLI starts (~8 s)
def test_cli_is_a_hydra_app_with_help_and_cfg_job(tmp_path):
    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "sweep.schedules", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout
    assert "+schedules=[step,cosine] | all" in cli("--help")
    job = OmegaConf.create(cli("--cfg", "job", "scheduler=step", "scheduler.gamma=0.8"))
    assert job.scheduler.gamma == 0.8 and job.scheduler.checks.step_size == "length"
    assert not (tmp_path / "outputs").exists()  # --cfg prints; it runs nothing
