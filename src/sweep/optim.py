"""Optimizers, with per-layer learning rates through parameter groups."""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sweep.validation import ConfigError, check_finite, check_in_range, fail, locate

OPTIMIZERS = {
    "torch.optim.SGD": "sgd",
    "torch.optim.Adam": "adam",
    "torch.optim.AdamW": "adamw",
    "torch.optim.RMSprop": "rmsprop",
    "torch.optim.Adagrad": "adagrad",
}


# What torch.optim's hyperparameters may be. The names mean the same in every optimizer that has
# them (PyTorch's convention); torch itself checks few of them, and some only at the first step
# (Adam's betas[1] is read there: `betas=[0.9]` was an IndexError mid-training).
NUMBER_RULES = {
    "eps": (0.0, True),  # (low, open): a number > 0; 0 can divide by zero
    "weight_decay": (0.0, False),
    "momentum": (0.0, False),
    "lr_decay": (0.0, False),
    "initial_accumulator_value": (0.0, False),
    "momentum_decay": (0.0, False),
}
UNIT_RULES = ("dampening", "alpha", "rho")  # numbers in [0, 1]
FLAGS = ("nesterov", "amsgrad", "centered", "maximize", "capturable", "differentiable",
         "decoupled_weight_decay")
OPTIONAL_FLAGS = ("foreach", "fused")  # null = PyTorch picks


def validate_optimizer(cfg: DictConfig) -> None:
    """Check the optimizer's values that can be checked without a model."""
    # A plain dict: `key in cfg` on a DictConfig raises and catches an error inside OmegaConf for
    # every absent key (0.1 ms each; a fused group of 64 validates 64 of these).
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    target = cfg.get("_target_")
    try:
        cls = locate(str(target))
    except Exception:
        cls = None
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        fail("optimizer._target_", target, "a torch.optim optimizer class, e.g. torch.optim.SGD")
    takes = [p for p in inspect.signature(cls).parameters if p != "params"]
    for key in cfg:
        if key not in (*takes, "_target_", "param_groups"):
            fail(f"optimizer.{key}", cfg[key], f"{target} takes only {', '.join(takes)} "
                 "(and param_groups)")
    # A float32 weight cannot take a step larger than float32's range: PyTorch refuses to turn
    # such an lr into a float ("value cannot be converted to type float without overflow"). Any
    # finite lr is accepted here: one that large diverges like any other too-large lr, and the
    # trainer stops the run as `diverged` when PyTorch refuses the step (train.py).
    check_finite("optimizer.lr", cfg.get("lr"), low_open=True)
    for key, (low, low_open) in NUMBER_RULES.items():
        if key in cfg:
            check_finite(f"optimizer.{key}", cfg[key], low, low_open=low_open)
    for key in UNIT_RULES:
        if key in cfg:
            check_in_range(f"optimizer.{key}", cfg[key], 0.0, 1.0, low_open=False)
    if "betas" in cfg:
        betas = cfg["betas"]
        if not isinstance(betas, list | tuple) or len(betas) != 2 or (
                not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1
                        for b in betas)):
            fail("optimizer.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    for key in FLAGS:
        if key in cfg and not isinstance(cfg[key], bool):
            fail(f"optimizer.{key}", cfg[key], "true or false")
    for key in OPTIONAL_FLAGS:
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            fail(f"optimizer.{key}", cfg[key], "null, true or false")
    if cfg.get("nesterov") and not (cfg.get("momentum", 0) > 0 and cfg.get("dampening", 0) == 0):
        fail("optimizer.nesterov", True, "needs optimizer.momentum > 0 and no dampening")
    for i, rule in enumerate(cfg.get("param_groups") or []):
        key = f"optimizer.param_groups[{i}]"
        if (not isinstance(rule, dict) or "pattern" not in rule
                or ("lr_scale" in rule) == ("lr" in rule)
                or set(rule) - {"pattern", "lr", "lr_scale", "name"}):
            fail(key, rule, "give {pattern: <regex>, lr_scale: <x>} or "
                 "{pattern: <regex>, lr: <x>}, and optionally a name: <group name>")
        try:
            re.compile(rule["pattern"])
        except re.error as err:
            fail(f"{key}.pattern", rule["pattern"], f"must be a regular expression ({err})")
        check_finite(f"{key}.{'lr' if 'lr' in rule else 'lr_scale'}",
                     rule.get("lr", rule.get("lr_scale")), low_open=True)


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
    """The configured `torch.optim` class over the model's parameter groups."""
    kwargs = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    validate_optimizer(kwargs)
    rules = kwargs.pop("param_groups", None) or []
    # The class, called with its own arguments: `validate_optimizer` admits nothing else, so
    # Hydra's instantiate would do the same call after copying the config and the parameter
    # groups through OmegaConf (1-2 ms an optimizer, which every member of a fused group pays).
    optimizer_class = locate(kwargs.pop("_target_"))
    return optimizer_class(param_groups(model, rules, kwargs["lr"]), **kwargs)
