"""The documented options exist; bad values fail before training with one message (every option
file is built in test_conf_options.py)."""

import subprocess
import sys

import pytest

from sweep import CONF_DIR
from sweep.config import ConfigError, compose
from sweep.train import train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_the_groups_are_the_documented_ones():
    assert set(options("optimizer")) == {"sgd", "adam", "adamw", "rmsprop", "adagrad"}
    assert {"mlp", "cnn", "resnet18"} <= set(options("model"))
    assert {"digits", "synthetic_regression", "synthetic_classification", "mnist",
            "fashion_mnist", "cifar10"} <= set(options("dataset"))
    assert {"constant", "step", "exponential", "cosine"} <= set(options("scheduler"))


BASE = ["dataset=synthetic_regression", "dataset.n_samples=100", "model=mlp", "tracking=none",
        "trainer.progress=false", "trainer.epochs=2"]


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=0", "optimizer.lr=0 is not allowed: must be a number > 0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is not allowed: must be a number > 0"),
    ("trainer.batch_size=0", "trainer.batch_size=0 is not allowed: must be an integer >= 1"),
    ("trainer.epochs=0", "trainer.epochs=0 is not allowed: must be an integer >= 1"),
    ("trainer.amp=fp8", "trainer.amp='fp8' is not allowed: choose one of auto, bf16, fp16, off"),
    ("trainer.clip.mode=sometimes", "trainer.clip.mode='sometimes' is not allowed"),
    ("trainer.device=tpu", "trainer.device='tpu' is not allowed"),
    ("trainer.grad_norm_every=-1",
     "trainer.grad_norm_every=-1 is not allowed: must be an integer >= 0"),
    ("model.activation=swishy", "model.activation='swishy'"),
    ("model.bn=middle", "model.bn='middle'"),
    (["scheduler=step", "scheduler.gamma=1.5"], "scheduler.gamma=1.5"),
    (["scheduler=exponential", "scheduler.gamma=0"], "scheduler.gamma=0"),
    (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size=0"),
    ("optimizer.param_groups=[{pattern: nothing_here, lr_scale: 0.1}]",
     "pattern='nothing_here' matches no parameter"),
])
def test_bad_values_fail_before_training_with_one_message(tmp_path, override, message):
    epochs = []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        overrides = override if isinstance(override, list) else [override]
        train(compose([*BASE, *overrides]), callback=lambda e, m: epochs.append(e),
              output_dir=tmp_path)
    assert epochs == []


def test_the_cli_prints_the_message_and_exits_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sweep", *BASE, "optimizer.lr=-1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sweep: error: optimizer.lr=-1 is not allowed: must be a number > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unknown_option_lists_the_choices(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sweep", "scheduler=cosinus"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'scheduler/cosinus'" in proc.stderr
    assert "Available options" in proc.stderr and "cosine" in proc.stderr
