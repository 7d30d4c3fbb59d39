"""Every option file in `conf/` composes, validates and builds, so a new YAML is tested by adding
it: no list of options lives in the tests.

Schedules have their own every-file tests in test_schedules.py (their lr curves are checked).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweep import CONF_DIR
from sweep.config import ConfigError, compose, validate
from sweep.data import declared_task, load_data
from sweep.models import build_model
from sweep.optim import build_optimizer
from sweep.validation import DataError

ARCHIVES = Path(__file__).parents[2] / "shared" / "data"  # real MNIST archives, never committed
# A settings group is composed by its own app's top-level config; every other group by config.yaml.
APP_OF_GROUP = {"study": "sweep", "sensitivity": "sensitivity", "lr_find": "lr_find",
                "report": "report"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
EVERY_OPTION = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group, option", EVERY_OPTION, ids=[f"{g}={o}" for g, o in EVERY_OPTION])
def test_every_option_of_every_group_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}"], APP_OF_GROUP.get(group, "config"))
    assert cfg.choices[group] == option
    validate(cfg)  # the training config every app builds on is valid with this option


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def dataset_or_skip(dataset: str, data_root: Path):
    """The dataset, small: archives-backed ones from ../shared/data, the rest as shipped."""
    overrides = [f"dataset={dataset}"]
    cfg = compose(overrides)
    if "archives" in cfg.dataset:
        overrides += [f"dataset.root={data_root}", f"dataset.archives={ARCHIVES}",
                      "dataset.train_size=128"]
    try:
        return load_data(compose(overrides).dataset)
    except DataError as err:  # not shipped with the project and not on this machine (CIFAR-10)
        assert dataset in str(err).lower() or "archive" in str(err).lower(), err
        pytest.skip(f"{dataset}: {err}")


@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_dataset_loads_and_feeds_some_model(dataset, data_root):
    data = dataset_or_skip(dataset, data_root)
    assert len(data.x_train) and len(data.x_val) and data.num_outputs >= 1
    # what a study reads to pick its metric without loading the data
    assert declared_task(compose([f"dataset={dataset}"]).dataset) == data.task
    fed = []
    for model in options("model"):
        try:
            net = build_model(compose([f"model={model}"]).model, data)
        except ConfigError:
            continue  # a model that refuses these inputs says so: see the test below
        fed.append(model)
        assert net(data.x_train[:4]).shape[0] == 4
    assert fed, f"no model in conf/model takes {dataset}"


def one_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, data) -> float:
    out = net(data.x_train[:4])
    target = data.y_train[:4]
    loss = (torch.nn.functional.cross_entropy(out, target) if data.task == "classification"
            else torch.nn.functional.mse_loss(out, target))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_model_trains_a_step_on_every_dataset_or_refuses_it_by_name(model, dataset,
                                                                         data_root):
    data = dataset_or_skip(dataset, data_root)
    cfg = compose([f"model={model}", f"dataset={dataset}"])
    try:
        net = build_model(cfg.model, data)
    except ConfigError as err:  # e.g. a convolutional model on flat vectors
        assert str(err).startswith("model"), err
        return
    assert torch.isfinite(torch.tensor(one_step(net, torch.optim.SGD(net.parameters(), 0.01),
                                                data)))


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_optimizer_takes_a_step(optimizer):
    cfg = compose([f"optimizer={optimizer}", "model=mlp", "dataset=synthetic_regression"])
    data = load_data(cfg.dataset)
    net = build_model(cfg.model, data)
    before = [p.detach().clone() for p in net.parameters()]
    one_step(net, build_optimizer(cfg.optimizer, net), data)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
