"""Composing configs outside the CLI, and validating them before any training starts."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

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
    check_int_at_least("trainer.grad_norm_every", t.grad_norm_every, 0)
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


# --- settings blocks (`lr_find.x=v`, `sensitivity.x=v`, `report.x=v`) ---------------------------

def override_key(override: str) -> str:
    """`+scheduler.gamma=0.8` -> `scheduler.gamma`: the key a Hydra override sets."""
    return override.split("=", 1)[0].lstrip("+~")


def split_settings(overrides: Sequence[str], key: str) -> tuple[list[str], list[str]]:
    """Separate `<key>.x=v` items (a module's own settings) from the Hydra overrides.

    The settings are not part of the config tree, so Hydra would reject them as unknown keys.
    """
    hydra_items, own = [], []
    for item in overrides:
        name = override_key(item)
        (own if name == key or name.startswith(key + ".") else hydra_items).append(item)
    return hydra_items, own


def load_settings(cfg: DictConfig | None, key: str, defaults: dict[str, Any],
                  items: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the config's `<key>:` block (an experiment file's), then command-line items.

    Unknown keys fail loudly, naming the allowed ones.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = OmegaConf.create(dict(defaults))
    block = cfg.get(key) if cfg is not None else None
    pairs: list[tuple[str, Any]] = []
    if block is not None:
        pairs += list(OmegaConf.to_container(block, resolve=True).items())
    for override in OverridesParser.create().parse_overrides(list(items)):
        name = override.key_or_group.removeprefix(key).lstrip(".")
        if not name:
            fail(key, override.input_line, f"set one setting at a time: {key}.<name>=<value>")
        pairs.append((name, override.value()))
    for name, value in pairs:
        if name.split(".")[0] not in defaults:
            raise ConfigError(f"{key}.{name} is not a {key} setting; choose from "
                              + ", ".join(defaults))
        OmegaConf.update(out, name, value, merge=False)  # a list or dict replaces, not merges
    return out


def timestamped_dir(base: str, explicit: str | None) -> Path:
    """`explicit`, else outputs/<base>/<date>/<time> like Hydra's run directories."""
    if explicit:
        return Path(explicit)
    return Path("outputs") / base / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
