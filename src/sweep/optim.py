"""Optimizers, with per-layer learning rates through parameter groups."""

from __future__ import annotations

import re
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sweep.config import ConfigError, check_positive, fail

OPTIMIZERS = {
    "torch.optim.SGD": "sgd",
    "torch.optim.Adam": "adam",
    "torch.optim.AdamW": "adamw",
    "torch.optim.RMSprop": "rmsprop",
    "torch.optim.Adagrad": "adagrad",
}


def validate_optimizer(cfg: DictConfig) -> None:
    """Check the optimizer's values that can be checked without a model."""
    check_positive("optimizer.lr", cfg.lr)
    for key in ("weight_decay", "momentum"):
        if key in cfg and not (isinstance(cfg[key], int | float) and cfg[key] >= 0):
            fail(f"optimizer.{key}", cfg[key], "must be a number >= 0")
    if cfg.get("nesterov") and not cfg.get("momentum", 0) > 0:
        fail("optimizer.nesterov", True, "needs optimizer.momentum > 0")
    for i, rule in enumerate(cfg.get("param_groups") or []):
        key = f"optimizer.param_groups[{i}]"
        if ("pattern" not in rule or ("lr_scale" in rule) == ("lr" in rule)
                or set(rule) - {"pattern", "lr", "lr_scale", "name"}):
            fail(key, OmegaConf.to_container(rule), "give {pattern: <regex>, lr_scale: <x>} or "
                 "{pattern: <regex>, lr: <x>}, and optionally a name: <group name>")
        try:
            re.compile(rule.pattern)
        except re.error as err:
            fail(f"{key}.pattern", rule.pattern, f"must be a regular expression ({err})")
        check_positive(f"{key}.{'lr' if 'lr' in rule else 'lr_scale'}",
                       rule.get("lr", rule.get("lr_scale")))


def param_groups(model: torch.nn.Module, rules: list[Any], lr: float) -> list[dict[str, Any]]:
    """Split parameters into groups by the first rule whose pattern matches the parameter's name.

    As in "different layers, different learning rates": `{pattern: '^1\\.', lr_scale: 0.1, name:
    first}` gives layer 1 a tenth of the base lr. Unmatched parameters form the `default` group.
    """
    groups: dict[str, dict[str, Any]] = {}
    matched = [0] * len(rules)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        for i, rule in enumerate(rules):
            if re.search(rule["pattern"], name):
                matched[i] += 1
                group_lr = rule["lr"] if "lr" in rule else lr * rule["lr_scale"]
                group_name = rule.get("name", rule["pattern"])
                groups.setdefault(group_name, {"name": group_name, "lr": group_lr,
                                               "params": []})["params"].append(param)
                break
        else:
            groups.setdefault("default", {"name": "default", "lr": lr, "params": []})[
                "params"].append(param)
    for i, rule in enumerate(rules):
        if not matched[i]:
            names = ", ".join(n for n, _ in model.named_parameters())
            raise ConfigError(f"optimizer.param_groups[{i}].pattern={rule['pattern']!r} matches no "
                              f"parameter; the model's parameters are: {names}")
    # The default group first, so `lr` (group 0) is the base learning rate in logs.
    return sorted(groups.values(), key=lambda g: g["name"] != "default")


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Instantiate the configured optimizer over the model's parameter groups."""
    validate_optimizer(cfg)
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    rules = kwargs.pop("param_groups", None) or []
    return instantiate(kwargs, params=param_groups(model, rules, cfg.lr), _convert_="all")
