"""Composing configs outside the CLI, and validating them before any training starts."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from sweep import CONF_DIR


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the config as `python -m sweep <overrides>` would, without running anything."""
    # Inside a running Hydra app (a CLI that composes one config per schedule or trial) Hydra is
    # already initialised; set its state aside for the compose and put it back afterwards.
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides),
                                return_hydra_config=True)
    finally:
        if outer is not None:
            global_hydra.clear()
            global_hydra.initialize(outer)
    choices = cfg.hydra.runtime.choices
    with open_dict(cfg):
        del cfg["hydra"]
    return with_choices(cfg, choices)


def with_choices(cfg: DictConfig, choices: Mapping[str, Any]) -> DictConfig:
    """Record the option picked in each group (`scheduler: cosine`), for run names and tags."""
    picked = {g: c for g, c in choices.items() if not g.startswith("hydra") and c is not None}
    with open_dict(cfg):
        cfg.choices = picked
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check every value that can be checked before data is loaded; raises ConfigError."""
    from sweep.optim import validate_optimizer  # late: optim imports this module's helpers

    t = cfg.trainer
    check_int_at_least("trainer.epochs", t.epochs, 1)
    check_int_at_least("trainer.batch_size", t.batch_size, 1)
    check_choice("trainer.amp", t.amp, ("auto", "bf16", "fp16", "off"))
    check_choice("trainer.clip.mode", t.clip.mode, ("none", "norm", "value"))
    if t.clip.mode != "none":
        check_positive("trainer.clip.max", t.clip.max)
    check_choice("trainer.loss", t.loss, ("auto", "mse", "huber", "cross_entropy"))
    check_in_range("trainer.label_smoothing", t.label_smoothing, 0.0, 1.0, low_open=False,
                   high_open=True)
    check_positive("trainer.huber_delta", t.huber_delta)
    check_positive("trainer.divergence_factor", t.divergence_factor)
    check_int_at_least("trainer.log_every_n_steps", t.log_every_n_steps, 0)
    check_int_at_least("trainer.checkpoint.every", t.checkpoint.every, 0)
    check_int_at_least("trainer.num_workers", t.num_workers, 0)
    device = str(t.device)
    if device not in ("auto", "cpu", "mps") and not re.fullmatch(r"cuda(:\d+)?", device):
        fail("trainer.device", device, "choose auto, cpu, cuda, cuda:<index> or mps")
    validate_optimizer(cfg.optimizer)


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_positive(key: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        fail(key, value, "must be a number > 0")


def check_int_at_least(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        fail(key, value, f"must be an integer >= {low}")


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
