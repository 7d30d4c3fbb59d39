"""The trainer on real tiny runs: exact schedules, divergence, clipping, resume, AMP."""

import math
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import PLAIN_SGD, TINY_CNN, TINY_MLP

from sweep.__main__ import run
from sweep.config import ConfigError, compose, validate
from sweep.data import load_data
from sweep.models import build_model
from sweep.train import (
    did_not_learn,
    epoch_means,
    evaluate,
    grad_norms,
    loss_and_metric,
    pick_amp,
    setup,
    train,
)

REGRESSION = [*TINY_MLP, *PLAIN_SGD, "optimizer.lr=0.03", "scheduler=constant", "tracking=none",
              "seed=929"]


# Enough data and BN for four epochs to learn more than the targets' mean (else: `stalled`).
LEARNS = ["dataset.n_samples=1000", "model.bn=pre"]


def config(*overrides: str):
    return compose([*REGRESSION, *overrides])


def test_training_lowers_the_loss_and_reports_every_epoch(tmp_path):
    # With BN, six epochs on 140 samples learn more than the targets' mean (without, it stalls).
    result = train(config("trainer.epochs=6", "optimizer.lr=0.05", "model.bn=pre"),
                   output_dir=tmp_path)

    assert result.status == "completed"
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.metric_name == "val_mse" and result.direction == "minimize"
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_metric == min(h["val_mse"] for h in result.history)
    assert all(h["grad_norm"] > 0 for h in result.history)


def test_epoch_schedule_sets_the_lr_of_every_step(tmp_path):
    # StepLR(step_size=2, gamma=0.5) on 140 training samples / batch 50 = 3 steps per epoch.
    cfg = config("scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.5",
                 "trainer.epochs=5", "optimizer.lr=0.1")
    result = train(cfg, output_dir=tmp_path)

    assert len(result.lr_trace) == 5 * 3
    for row in result.lr_trace:
        assert row["lr"] == pytest.approx(0.1 * 0.5 ** ((row["epoch"] - 1) // 2))
    assert [h["lr"] for h in result.history] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_step_schedule_advances_after_every_optimizer_step(tmp_path):
    cfg = config("scheduler=cosine", "scheduler.interval=step", "scheduler.T_max=1.0",
                 "scheduler.eta_min=0.0", "trainer.epochs=4", "optimizer.lr=0.1")
    result = train(cfg, output_dir=tmp_path)

    # The same schedule built directly with PyTorch and stepped once per optimizer step.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=0.0)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    assert [r["lr"] for r in result.lr_trace] == pytest.approx(expected)


def test_a_huge_learning_rate_stops_as_diverged_instead_of_crashing(tmp_path):
    result = train(config("optimizer.lr=50", "trainer.epochs=20"), output_dir=tmp_path)

    assert result.status == "diverged"
    assert len(result.history) < 20


def test_clipping_by_norm_bounds_every_update_and_logs_the_norm_before_clipping(tmp_path):
    cfg = config("optimizer.lr=1.0", "trainer.epochs=1", "trainer.clip.mode=norm",
                 "trainer.clip.max=0.001", "trainer.divergence_factor=1e9")
    result = train(cfg, output_dir=tmp_path)
    unclipped = train(config("optimizer.lr=1e-9", "trainer.epochs=1"), output_dir=tmp_path)

    # Plain SGD with lr 1: each step moves the weights by the clipped gradient, norm <= 0.001;
    # the loss therefore barely moves, while the logged (pre-clip) norm is the real, large one.
    assert result.history[0]["grad_norm"] == pytest.approx(unclipped.history[0]["grad_norm"],
                                                           rel=0.05)
    assert result.history[0]["grad_norm"] > 100 * 0.001
    assert result.history[0]["train_loss"] == pytest.approx(unclipped.history[0]["train_loss"],
                                                            rel=0.05)


def test_grad_norm_is_sampled_every_n_steps_or_not_at_all(tmp_path):
    every_step = train(config("trainer.epochs=2", "trainer.grad_norm_every=1"), output_dir=tmp_path)
    never = train(config("trainer.epochs=2", "trainer.grad_norm_every=0"), output_dir=tmp_path)
    assert all(h["grad_norm"] > 0 for h in every_step.history)
    assert all("grad_norm" not in h for h in never.history)
    # Measuring the norm changes nothing about training itself.
    assert [h["train_loss"] for h in never.history] == [h["train_loss"] for h in every_step.history]
    # Epochs shorter than the sampling interval (3 steps here) still measure their first step.
    sparse = train(config("trainer.epochs=2", "trainer.grad_norm_every=16"), output_dir=tmp_path)
    assert all(h["grad_norm"] > 0 for h in sparse.history)


def test_clipping_by_value(tmp_path):
    torch.manual_seed(0)
    clipped = train(config("optimizer.lr=0.5", "trainer.epochs=2", "trainer.clip.mode=value",
                           "trainer.clip.max=1e-4"), output_dir=tmp_path)
    free = train(config("optimizer.lr=0.5", "trainer.epochs=2"), output_dir=tmp_path)
    # Each coordinate moves at most lr * 1e-4 per step, so the model is still near its start.
    assert abs(clipped.history[-1]["train_loss"] - clipped.history[0]["train_loss"]) < abs(
        free.history[-1]["train_loss"] - free.history[0]["train_loss"])


@pytest.mark.parametrize("scheduler", ["step", "cosine"])
def test_resume_continues_with_the_same_lrs_and_losses(tmp_path, scheduler):
    # The CNN with dropout on digits: batch order, dropout masks and the schedule all resume.
    # Bit-identical losses are a promise on the CPU; tests/test_gpu.py checks CUDA.
    common = [*TINY_CNN, "optimizer=sgd", f"scheduler={scheduler}", "trainer.epochs=5",
              "trainer.batch_size=256", "trainer.checkpoint.every=1"]
    full = train(compose(common), output_dir=tmp_path / "full")

    # Interrupted after epoch 2 (its checkpoint is on disk), then resumed from that checkpoint.
    train(compose(common), callback=lambda epoch, m: epoch == 2, output_dir=tmp_path / "cut")
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    resumed = train(compose([*common, f"trainer.resume={checkpoint}"]), output_dir=tmp_path / "cut")

    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    assert resumed.initial == full.initial  # epoch 0 comes back with the checkpoint
    assert resumed.status == full.status
    assert [r["lr"] for r in resumed.lr_trace] == [r["lr"] for r in full.lr_trace]
    for a, b in zip(resumed.history, full.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"]


def test_callback_sees_each_epoch_and_can_stop_the_run(tmp_path):
    seen = []
    result = train(config("trainer.epochs=10"),
                   callback=lambda epoch, metrics: seen.append(metrics["val_mse"]) or epoch == 3,
                   output_dir=tmp_path)
    assert result.status == "stopped"
    assert len(seen) == 3 == len(result.history)


def test_per_layer_learning_rates_keep_their_ratio_under_a_schedule(tmp_path):
    cfg = config("scheduler=exponential", "scheduler.gamma=0.5", "trainer.epochs=3",
                 "optimizer.lr=0.08",
                 "optimizer.param_groups=[{pattern: '^1\\.', lr_scale: 0.25, name: first}]")
    result = train(cfg, output_dir=tmp_path)

    for h in result.history:
        assert h["lr/first"] == pytest.approx(0.25 * h["lr"])
    assert [h["lr"] for h in result.history] == pytest.approx([0.08, 0.04, 0.02])


def test_amp_defaults_off_on_cpu_and_bf16_trains_on_cpu(tmp_path):
    assert pick_amp("auto", torch.device("cpu")) is None
    result = train(config("trainer.amp=bf16", "trainer.epochs=4", "optimizer.lr=0.05",
                          *LEARNS), output_dir=tmp_path)
    assert result.status == "completed"
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_fp16_counts_the_steps_the_gradient_scaler_skips(tmp_path):
    # Targets of order 1e4 make the first scaled fp16 gradients overflow, so the scaler skips
    # steps (and halves its scale) until they fit; skipped steps apply no lr.
    cfg = config("trainer.amp=fp16", "trainer.epochs=3", "optimizer.lr=1e-6",
                 "dataset.weights=[2000,-1000,3000,1000,2000]", "scheduler=step",
                 "scheduler.interval=step", "scheduler.step_size=1", "scheduler.gamma=0.9")
    result = train(cfg, output_dir=tmp_path)

    assert result.skipped_steps >= 1
    assert len(result.lr_trace) == 3 * 3 - result.skipped_steps
    # The schedule advanced once per applied step only.
    assert [r["lr"] for r in result.lr_trace] == pytest.approx(
        [1e-6 * 0.9 ** k for k in range(len(result.lr_trace))])


def test_a_loss_that_does_not_fit_the_task_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="trainer.loss='cross_entropy'"):
        train(config("trainer.loss=cross_entropy"), output_dir=tmp_path)


def test_data_too_large_for_the_device_goes_through_a_dataloader(tmp_path):
    result = train(config("trainer.device_data_max_mb=0", "trainer.num_workers=0",
                          "trainer.epochs=4", "optimizer.lr=0.05", *LEARNS), output_dir=tmp_path)
    assert result.status == "completed"
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "MNIST").is_dir(), reason="needs ../shared/data/MNIST")
def test_the_cnn_learns_real_mnist_from_the_archives(tmp_path):
    cfg = compose(["dataset=mnist", f"dataset.archives={SHARED_DATA}",
                   f"dataset.root={tmp_path / 'data'}", "dataset.train_size=4000", "model=cnn",
                   "model.channels=[16,32]",
                   "optimizer=sgd", "optimizer.lr=0.05", "scheduler=cosine", "trainer.epochs=3",
                   "trainer.batch_size=64", "trainer.progress=false", "tracking=none"])
    result = train(cfg, output_dir=tmp_path)
    assert result.status == "completed"
    assert result.history[-1]["val_acc"] > 0.8  # chance is 0.1


@pytest.mark.parametrize("loss", ["mse", "huber", "cross_entropy"])
def test_evaluation_in_uneven_batches_equals_the_whole_split_at_once(loss):
    cfg = (compose(["dataset=digits", "model=cnn", "tracking=none"]) if loss == "cross_entropy"
           else config(f"trainer.loss={loss}"))
    data = load_data(cfg.dataset)
    model = build_model(cfg.model, data)
    loss_fn, metric_name, _ = loss_and_metric(cfg, data.task, data.name)
    got = evaluate(model, data, loss_fn, metric_name, torch.device("cpu"), None, batch_size=17,
                   train_split=True)

    with torch.no_grad():
        out = model.eval()(data.x_val)  # evaluate() left it training: the CNN has dropout
        out_train = model(data.x_train)
    metric = ((out.argmax(1) == data.y_val).float().mean() if metric_name == "val_acc"
              else torch.nn.functional.mse_loss(out, data.y_val))
    assert got["val_loss"] == pytest.approx(loss_fn(out, data.y_val).item(), rel=1e-5)
    assert got["train_eval_loss"] == pytest.approx(loss_fn(out_train, data.y_train).item(),
                                                   rel=1e-5)
    assert got[metric_name] == pytest.approx(metric.item(), rel=1e-5)
    if loss == "huber":
        assert got["val_loss"] != pytest.approx(got["val_mse"])


def test_epoch_means_give_the_mean_loss_and_the_rms_of_the_total_gradient_norm():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model(torch.randn(8, 3)).square().mean().backward()
    norms = grad_norms(list(model.parameters()))
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert math.sqrt(sum(n.item() ** 2 for n in norms)) == pytest.approx(total, rel=1e-5)

    # Two runs trained at once: a (runs,) tensor a step. Run 0's sampled total norms 5 and 0
    # give the RMS sqrt((25 + 0) / 2); run 1's, 1 and 1.
    losses = [torch.tensor([1.0, 0.5]), torch.tensor([2.0, 0.5]), torch.tensor([6.0, 0.5])]
    samples = [torch.tensor([5.0, 1.0]), torch.tensor([0.0, 1.0])]
    (mean0, rms0), (mean1, rms1) = epoch_means(losses, samples)
    assert (mean0, rms0) == pytest.approx((3.0, math.sqrt(12.5)))
    assert (mean1, rms1) == pytest.approx((0.5, 1.0))
    assert math.isnan(epoch_means(losses, [])[0][1])


# --- the loss over the training split in eval mode, and "did not learn" -------------------------

@pytest.mark.parametrize("overrides", [
    # BatchNorm: eval mode normalises with the running statistics, not the batch's.
    [*REGRESSION, "model.bn=pre", "trainer.epochs=3"],
    # Dropout; 1437 training images are two evaluation batches.
    [*TINY_CNN, "optimizer.lr=0.05", "trainer.batch_size=256", "trainer.epochs=1"],
])
def test_train_eval_loss_is_a_full_pass_over_the_training_split_in_eval_mode(tmp_path, overrides):
    cfg = compose(overrides)
    parts = setup(cfg)
    result = train(cfg, output_dir=tmp_path, parts=parts)  # trains parts.model in place
    untrained = setup(cfg)  # the same seed: the same initial weights and data

    def full_pass(model: torch.nn.Module, data) -> float:
        """The article's `mse_cal`: one forward pass over the whole split, in eval mode."""
        model.eval()
        with torch.no_grad():
            return untrained.loss_fn(model(data.x_train), data.y_train).item()

    assert [h["epoch"] for h in result.history] == list(range(1, cfg.trainer.epochs + 1))
    assert result.history[-1]["train_eval_loss"] == pytest.approx(
        full_pass(parts.model, parts.data), rel=1e-5)
    # Epoch 0 is the loss at initialisation, before any step.
    assert result.initial["train_eval_loss"] == pytest.approx(
        full_pass(untrained.model, untrained.data), rel=1e-5)
    assert result.history[-1]["train_eval_loss"] < result.initial["train_eval_loss"]


def test_train_eval_loss_is_off_for_dataloader_sized_data_unless_asked_for(tmp_path):
    big = ["trainer.device_data_max_mb=0", "trainer.num_workers=0", "trainer.epochs=2"]
    auto = train(config(*big), output_dir=tmp_path)
    asked = train(config(*big, "trainer.train_eval_loss=true"), output_dir=tmp_path)
    off = train(config("trainer.train_eval_loss=false", "trainer.epochs=2"), output_dir=tmp_path)

    assert all("train_eval_loss" not in h for h in auto.history + off.history)
    assert "train_eval_loss" not in auto.initial and "val_loss" in auto.initial
    assert all(h["train_eval_loss"] > 0 for h in asked.history)
    # Measuring it draws no randomness: the training itself is the same with it or without.
    on = train(config("trainer.epochs=2"), output_dir=tmp_path)
    assert [h["train_loss"] for h in on.history] == [h["train_loss"] for h in off.history]


@pytest.mark.parametrize("value", ["sometimes", 1])
def test_train_eval_loss_takes_auto_true_or_false(value):
    with pytest.raises(ConfigError, match=(
            rf"trainer.train_eval_loss={value!r} is not allowed: choose auto, true or false")):
        validate(config(f"trainer.train_eval_loss={value}"))


ARTICLE = ["experiment=bn_sensitivity", "tracking=none", "trainer.epochs=10"]


def test_a_run_that_only_learns_the_mean_ends_stalled_and_one_that_learns_completed(tmp_path):
    # The article's MLP with momentum 0.9 at lr 0.03 settles on the targets' mean: far below
    # its initial loss, which also paid for the mean's square, but no better than ignoring x.
    stuck = train(compose([*ARTICLE, "optimizer.momentum=0.9", "optimizer.lr=0.03"]),
                  output_dir=tmp_path)
    learns = train(compose([*ARTICLE, "optimizer.lr=0.03"]), output_dir=tmp_path)

    data = load_data(compose(ARTICLE).dataset)
    mean_only = data.y_train.var(unbiased=False).item()  # the MSE of predicting the mean
    assert stuck.status == "stalled"
    assert stuck.final["train_eval_loss"] < 0.9 * stuck.initial["train_eval_loss"]
    assert stuck.final["train_eval_loss"] > 0.9 * mean_only
    assert learns.status == "completed"
    assert learns.final["train_eval_loss"] < 0.9 * mean_only


def test_a_tiny_lr_stalls_on_the_loss_and_chance_accuracy_stalls_a_classifier(tmp_path):
    tiny = train(compose([*ARTICLE, "optimizer.lr=1e-6"]), output_dir=tmp_path)
    assert tiny.status == "stalled"
    assert tiny.final["train_eval_loss"] == pytest.approx(tiny.initial["train_eval_loss"],
                                                          rel=1e-3)

    digits = [*TINY_CNN, "trainer.batch_size=256", "trainer.epochs=2"]
    at_chance = train(compose([*digits, "optimizer.lr=1e-5"]), output_dir=tmp_path)
    learned = train(compose([*digits, "optimizer.lr=0.2"]), output_dir=tmp_path)
    assert at_chance.status == "stalled" and at_chance.final["val_acc"] < 0.25  # chance ~0.1
    assert learned.status == "completed" and learned.final["val_acc"] > 0.5


def test_the_stall_rule_needs_a_tenth_below_the_reference_and_a_tenth_above_chance():
    baseline = {"loss": 30.0}
    assert did_not_learn({"l": 27.5}, {"l": 80.0}, baseline, "l")  # 0.92 of the mean's loss
    assert not did_not_learn({"l": 26.9}, {"l": 80.0}, baseline, "l")
    assert did_not_learn({"l": 9.5}, {"l": 10.0}, baseline, "l")  # started below the mean's
    assert did_not_learn({"l": math.nan}, {"l": 80.0}, baseline, "l")
    chance = {"loss": 2.3, "val_acc": 0.1}
    assert did_not_learn({"l": 1.0, "val_acc": 0.18}, {"l": 2.3}, chance, "l")  # < 0.1 + 0.09
    assert not did_not_learn({"l": 1.0, "val_acc": 0.2}, {"l": 2.3}, chance, "l")


def test_epoch_0_and_the_stalled_status_reach_mlflow(mlflow_uri, tmp_path):
    cfg = compose(["experiment=bn_sensitivity", "trainer.epochs=3", "optimizer.lr=1e-6",
                   "tracking=mlflow"])
    result = run(cfg, output_dir=tmp_path / "run")

    client = mlflow.MlflowClient()
    history = sorted((m.step, m.value) for m in client.get_metric_history(
        result.run_id, "train_eval_loss"))
    assert [step for step, _ in history] == [0, 1, 2, 3]
    assert history[0][1] == pytest.approx(result.initial["train_eval_loss"])
    assert client.get_run(result.run_id).data.tags["status"] == "stalled"
