"""Optimizers from configs, and per-layer learning rates through parameter groups."""

import pytest
import torch
from omegaconf import OmegaConf

from sweep.config import ConfigError, compose
from sweep.optim import build_optimizer, param_groups

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}


def three_layer_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4),
                               torch.nn.Tanh(), torch.nn.Linear(4, 1))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_option_builds_and_steps(name):
    cfg = compose([f"optimizer={name}"]).optimizer
    model = three_layer_net()
    opt = build_optimizer(cfg, model)
    assert type(opt) is OPTIMIZERS[name]
    assert opt.param_groups[0]["lr"] == cfg.lr

    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 5)).pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_sgd_settings_reach_the_optimizer():
    cfg = compose(["optimizer=sgd", "optimizer.momentum=0.8", "optimizer.nesterov=true",
                   "optimizer.weight_decay=1e-4"]).optimizer
    group = build_optimizer(cfg, three_layer_net()).param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.8, True, 1e-4)


def test_different_layers_get_different_learning_rates():
    # The article's "different layers, different learning rates": the first layer at a tenth of
    # the base lr, every bias at an absolute 0.001, the rest at the base lr.
    rules = [{"pattern": r"^0\.weight", "lr_scale": 0.1}, {"pattern": "bias$", "lr": 0.001}]
    groups = param_groups(three_layer_net(), rules, lr=0.05)

    by_name = {g["name"]: g for g in groups}
    assert groups[0]["name"] == "default"  # the base group comes first: it is what `lr` logs
    assert by_name["default"]["lr"] == 0.05 and len(by_name["default"]["params"]) == 2
    assert by_name[r"^0\.weight"]["lr"] == pytest.approx(0.005)
    assert len(by_name[r"^0\.weight"]["params"]) == 1
    assert by_name["bias$"]["lr"] == 0.001 and len(by_name["bias$"]["params"]) == 3


def test_the_first_matching_rule_wins():
    rules = [{"pattern": "weight", "lr_scale": 0.5}, {"pattern": r"^0\.", "lr_scale": 0.1}]
    groups = {g["name"]: g for g in param_groups(three_layer_net(), rules, lr=1.0)}
    assert len(groups["weight"]["params"]) == 3 and len(groups[r"^0\."]["params"]) == 1


def test_a_rule_that_matches_no_parameter_is_an_error_naming_the_parameters():
    with pytest.raises(ConfigError, match=r"param_groups\[0\].pattern='\^encoder' matches no "
                                          r"parameter.*0.weight, 0.bias"):
        param_groups(three_layer_net(), [{"pattern": "^encoder", "lr_scale": 0.1}], lr=0.1)


@pytest.mark.parametrize("rule, message", [
    ({"pattern": "bias"}, "give {pattern"),
    ({"pattern": "bias", "lr": 0.1, "lr_scale": 2}, "give {pattern"),
    ({"pattern": "(", "lr_scale": 2}, "must be a regular expression"),
    ({"pattern": "bias", "lr_scale": -1}, r"lr_scale=-1 is not allowed: must be a number > 0"),
])
def test_malformed_rules_are_refused(rule, message):
    cfg = compose(["optimizer=sgd"]).optimizer
    cfg.param_groups = OmegaConf.create([rule])
    with pytest.raises(ConfigError, match=message):
        build_optimizer(cfg, three_layer_net())
