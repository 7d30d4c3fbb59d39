"""Fused trials: members trained at once give each member the run it has alone.

Each test trains the same configs twice, one at a time with `sweep.train.train` and together with
`train_fused`, on real data, and compares every per-epoch number, the lr of every step and the
status. In float64 the two differ only by the order of floating-point sums (a batched matmul
against one matmul per member: the first layer's weight gradient differs by an ulp now and then),
so they agree to 1e-9 relative. Not at any lr: a run on the edge of chaos amplifies an ulp like any
other change of summation order (another BLAS would too). BatchNorm after a saturated tanh did
~100x an epoch here: `bn=post`, SGD lr 0.05 with momentum 0.5, was 1e-4 apart by epoch 3, so the
members below train at lrs below that edge.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import mlflow
import pytest
import torch

from sweep import run_folder
from sweep.config import compose
from sweep.data import load_data
from sweep.fused import fusable, groups, member_parts, train_fused, train_group
from sweep.fused.optim import FusedOptimizer
from sweep.study_plan import with_values
from sweep.track import Tracker
from sweep.train import Setup, TrainResult, setup, train

REGRESSION = ["dataset=synthetic_regression", "model=mlp", "scheduler=constant",
              "trainer.batch_size=50", "trainer.epochs=4", "trainer.progress=false",
              "tracking=none"]
SGD = ["optimizer=sgd", "optimizer.momentum=0"]
CNN = ["dataset=digits", "model=cnn", "model.channels=[4,8]", "model.hidden=16",
       "trainer.batch_size=64", "trainer.epochs=2", "trainer.device=cpu", "trainer.progress=false",
       "tracking=none", "scheduler=constant"]


@pytest.fixture(autouse=True)
def one_thread():
    """Width-4 MLPs run faster on one torch thread than on several (as the BN study sets it), and
    on a busy machine several threads wait on each other for every tiny op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def float64(parts: Setup) -> Setup:
    """The same parts in float64: weights drawn in float32 as always, then widened exactly."""
    parts.model.double()
    for state in parts.optimizer.state.values():  # Adagrad makes its sums when it is built
        state.update({k: v.double() for k, v in state.items() if v.is_floating_point()})
    data = parts.data
    parts.data = dataclasses.replace(data, **{
        k: getattr(data, k).double() if getattr(data, k).is_floating_point() else getattr(data, k)
        for k in ("x_train", "y_train", "x_val", "y_val")})
    return parts


def alone_and_fused(cfgs, tmp_path, wide: bool = True, callbacks=None
                    ) -> list[tuple[TrainResult, TrainResult]]:
    """Each config trained alone, and all of them fused; float64 unless `wide` is false."""
    widen = float64 if wide else (lambda parts: parts)
    callbacks = callbacks or [None] * len(cfgs)
    alone = [train(cfg, callback=cb, parts=widen(setup(cfg)), output_dir=tmp_path / str(i))
             for i, (cfg, cb) in enumerate(zip(cfgs, callbacks, strict=True))]
    fused = train_fused(cfgs, callbacks=callbacks,
                        parts=[widen(parts) for parts in member_parts(cfgs)])
    return list(zip(alone, fused, strict=True))


def assert_same_run(alone: TrainResult, fused: TrainResult, rel: float = 1e-9,
                    epochs: int | None = None) -> None:
    """Same status, epochs, lrs at every step, and every per-epoch number within `rel`
    (`epochs`: only the first so many epochs, and not how the run ended)."""
    if epochs is None:
        assert fused.status == alone.status
        assert len(fused.history) == len(alone.history)
        assert fused.lr_trace == alone.lr_trace  # each member's lr at every step, exactly
    for mine, theirs in list(zip(fused.history, alone.history, strict=True))[:epochs]:
        assert list(mine) == list(theirs)
        for key, value in theirs.items():
            if key != "epoch_time" and math.isfinite(value):
                assert mine[key] == pytest.approx(value, rel=rel, abs=0), (key, mine["epoch"])
    for key, value in alone.initial.items():
        assert fused.initial[key] == pytest.approx(value, rel=rel)


# Members of one group differ in seed (so in initial weights, batch order and, through
# dataset.seed, their split of the data), lr, optimizer values and schedule kind.
MEMBERS = {
    "sgd": [["seed=929", "optimizer.lr=0.03"],
            ["seed=1", "optimizer.lr=0.01", "optimizer.momentum=0.9", "scheduler=cosine"],
            ["seed=2", "optimizer.lr=0.005", "optimizer.momentum=0.8", "optimizer.nesterov=true",
             "optimizer.weight_decay=0.01", "scheduler=step"],
            ["seed=3", "optimizer.lr=0.01", "optimizer.momentum=0.5",
             "+optimizer.dampening=0.3", "scheduler=cosine_warmup"],  # per step, with warmup
            ["seed=4", "optimizer.lr=0.01", "optimizer.momentum=0.9", "scheduler=onecycle",
             "scheduler.cycle_momentum=true"]],  # moves each step's momentum too
    "adam": [["seed=929", "optimizer.lr=0.01"],
             ["seed=1", "optimizer.lr=0.003", "optimizer.betas=[0.8,0.99]", "scheduler=onecycle"],
             ["seed=2", "optimizer.lr=0.01", "optimizer.weight_decay=0.01", "scheduler=plateau",
              "scheduler.patience=0"]],
    "adamw": [["seed=929", "optimizer.lr=0.01", "scheduler=wsd"],
              ["seed=1", "optimizer.lr=0.02", "optimizer.weight_decay=0.1",
               "optimizer.eps=1e-6", "scheduler=exponential"]],
    "rmsprop": [["seed=929", "optimizer.lr=0.003"],
                ["seed=1", "optimizer.lr=0.001", "optimizer.momentum=0.9",
                 "+optimizer.centered=true", "scheduler=cosine"],
                ["seed=2", "optimizer.lr=0.002", "optimizer.alpha=0.9",
                 "optimizer.weight_decay=0.01", "scheduler=linear"]],
    "adagrad": [["seed=929", "optimizer.lr=0.05"],
                ["seed=1", "optimizer.lr=0.02", "optimizer.lr_decay=0.01",
                 "+optimizer.initial_accumulator_value=0.1", "scheduler=step"]],
}


@pytest.mark.parametrize("bn", ["none", "pre", "post"])
@pytest.mark.parametrize("optimizer", list(MEMBERS))
def test_every_member_trains_as_it_does_alone(optimizer, bn, tmp_path):
    base = [*REGRESSION, f"optimizer={optimizer}", f"model.bn={bn}"]
    if optimizer == "sgd":
        base.append("optimizer.momentum=0")
    if bn == "pre" and optimizer != "sgd":
        # A bias right before BatchNorm cancels out: its gradient is rounding noise (1e-17),
        # which Adam, RMSprop and Adagrad divide by its own size into lr-sized steps, so that
        # bias (and the running mean it feeds, used in eval mode) follows the summation order.
        # Without it, exact.
        base.append("model.bias=false")
    cfgs = [compose([*base, *member]) for member in MEMBERS[optimizer]]

    for alone, fused in alone_and_fused(cfgs, tmp_path):
        assert_same_run(alone, fused)


def test_classification_with_clipping_and_per_layer_lrs(tmp_path):
    base = ["dataset=digits", "dataset.flatten=true", "model=mlp", "model.hidden=[32]",
            "optimizer=sgd", "scheduler=cosine", "trainer.batch_size=64", "trainer.epochs=3",
            "trainer.clip.mode=norm", "trainer.clip.max=0.5", "trainer.progress=false",
            "tracking=none", "optimizer.param_groups=[{pattern: '^1\\.', lr_scale: 0.1}]"]
    cfgs = [compose([*base, "seed=1"]), compose([*base, "seed=2", "optimizer.lr=0.2"])]

    for alone, fused in alone_and_fused(cfgs, tmp_path):
        assert alone.metric_name == fused.metric_name == "val_acc"
        assert {row["group"] for row in fused.lr_trace} == {"default", "^1\\."}
        assert_same_run(alone, fused)


def test_a_member_that_diverges_stops_while_the_others_train_on(tmp_path):
    # Member 1's warmup climbs from lr 0.002 to 20 over three epochs: it diverges mid-run.
    members = [["seed=929", "optimizer.lr=0.03"],
               ["seed=1", "optimizer.lr=20", "scheduler.warmup={length: 3, start_factor: 1e-4}"],
               ["seed=2", "optimizer.lr=0.01", "scheduler=cosine"]]
    cfgs = [compose([*REGRESSION, *SGD, *member]) for member in members]

    runs = alone_and_fused(cfgs, tmp_path)

    (_, first), (alone, diverged), (_, last) = runs
    assert diverged.status == "diverged" and 1 < len(diverged.history) < 4
    assert first.status != "diverged" and len(first.history) == len(last.history) == 4
    for alone, fused in runs:
        assert_same_run(alone, fused)


def test_a_callback_stops_its_member_only(tmp_path):
    # As an Optuna pruner does: member 0 is stopped after its second epoch.
    cfgs = [compose([*REGRESSION, *SGD, f"seed={seed}", "optimizer.lr=0.02"]) for seed in (1, 2)]
    callbacks = [lambda epoch, metrics: epoch == 2, None]

    runs = alone_and_fused(cfgs, tmp_path, callbacks=callbacks)

    assert [fused.status for _, fused in runs][0] == "stopped"
    assert [len(fused.history) for _, fused in runs] == [2, 4]
    for alone, fused in runs:
        assert_same_run(alone, fused)


def test_each_member_logs_to_its_own_mlflow_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("fused")
    trackers = [Tracker(client.create_run(experiment).info.run_id) for _ in range(2)]
    # Member 1 decays its lr every step: each member's per-step lr is its own.
    cfgs = [compose([*REGRESSION, *SGD, "seed=1", "optimizer.lr=0.02",
                     "trainer.log_every_n_steps=5"]),
            compose([*REGRESSION, *SGD, "seed=2", "optimizer.lr=0.02", "scheduler=exponential",
                     "scheduler.interval=step", "scheduler.gamma=0.99",
                     "trainer.log_every_n_steps=5"])]

    results = train_fused(cfgs, trackers=trackers)
    for tracker in trackers:
        tracker.close()

    for result, tracker in zip(results, trackers, strict=True):
        assert result.run_id == tracker.run_id
        logged = client.get_metric_history(tracker.run_id, "train_loss")
        assert [(m.step, m.value) for m in logged] == [
            (h["epoch"], h["train_loss"]) for h in result.history]
        first = client.get_metric_history(tracker.run_id, "train_eval_loss")[0]
        assert (first.step, first.value) == (0, result.initial["train_eval_loss"])
        # Every 5th optimizer step: its loss, and the lr the next step applies.
        steps = len(result.lr_trace)
        assert [m.step for m in client.get_metric_history(tracker.run_id, "step_loss")] == list(
            range(5, steps + 1, 5))
        lrs = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "step_lr")}
        following = {r["step"]: r["lr"] for r in result.lr_trace}
        assert all(lr == pytest.approx(following[k]) for k, lr in lrs.items() if k in following)
    step_lrs = [client.get_metric_history(t.run_id, "step_lr")[-1].value for t in trackers]
    assert step_lrs[0] == 0.02 and step_lrs[1] < 0.02
    assert results[0].history[0]["train_loss"] != results[1].history[0]["train_loss"]


def test_float32_first_epoch_and_small_lr_runs_agree(tmp_path):
    # In float32 the members' sums round differently (1e-7); at a small lr that stays small, at
    # a large one it grows from epoch to epoch, as between any two summation orders.
    members = [["seed=929", "optimizer.lr=0.005"], ["seed=1", "optimizer.lr=0.1"],
               ["seed=2", "optimizer.lr=0.005", "optimizer.momentum=0.9"]]
    cfgs = [compose([*REGRESSION, *SGD, "model.bn=pre", *member]) for member in members]

    runs = alone_and_fused(cfgs, tmp_path, wide=False)

    for i, (alone, fused) in enumerate(runs):
        assert fused.history[0]["train_loss"] == pytest.approx(alone.history[0]["train_loss"],
                                                               rel=1e-5)
        assert_same_run(alone, fused, rel=1e-5, epochs=None if i != 1 else 1)


def largest_gap(a: TrainResult, b: TrainResult, key: str = "train_eval_loss") -> float:
    return max(abs(x[key] / y[key] - 1) for x, y in zip(a.history, b.history, strict=True))


def test_in_float32_a_member_strays_no_further_than_float32_itself(tmp_path):
    # The BN article's mlp4 with BN: at lr 0.005 float32 and float64 of a run alone agree for
    # ten epochs; at 0.01 and 0.1 they part within a few (docs/benchmarks.md). A fused member,
    # summing in another order, may part from its run alone as far as that and no further.
    preset = ["experiment=bn_sensitivity", "tracking=none", "trainer.progress=false",
              "trainer.epochs=6", "model.hidden=[4,4,4,4]", "model.bn=pre", "seed=929"]
    cfgs = [compose([*preset, f"optimizer.lr={lr}"], "sensitivity") for lr in (0.1, 0.01, 0.005)]
    in32 = [train(cfg, output_dir=tmp_path / str(i)) for i, cfg in enumerate(cfgs)]
    in64 = [train(cfg, parts=float64(setup(cfg)), output_dir=tmp_path / str(i))
            for i, cfg in enumerate(cfgs)]

    fused = train_fused(cfgs)

    for alone, wide, member in zip(in32, in64, fused, strict=True):
        rounding = largest_gap(alone, wide)  # what float32 does to this run alone
        assert largest_gap(member, alone) <= 10 * rounding + 1e-6, (rounding, member.history)


# Groups whose checkpoints hold every kind of state: BatchNorm's running statistics, each
# optimizer's own (none for SGD without momentum; RMSprop's momentum and centered averages),
# fp16's loss scale, and dropout's RNG.
CHECKPOINTED = {
    "sgd": ([*REGRESSION, "optimizer=sgd", "model.bn=pre"],
            [["seed=1", "optimizer.lr=0.01", "optimizer.momentum=0.9", "optimizer.nesterov=true",
              "scheduler=cosine"], ["seed=2", "optimizer.lr=0.02", "optimizer.momentum=0"]]),
    "adam": ([*REGRESSION, "optimizer=adam", "model.bn=pre", "model.bias=false"],
             [["seed=1", "optimizer.lr=0.01", "scheduler=onecycle"],
              ["seed=2", "optimizer=adamw", "optimizer.lr=0.005", "optimizer.weight_decay=0.1"]]),
    "rmsprop": ([*REGRESSION, "optimizer=rmsprop", "model.bn=post"],
                [["seed=1", "optimizer.lr=0.001", "optimizer.momentum=0.9",
                  "+optimizer.centered=true"], ["seed=2", "optimizer.lr=0.002"]]),
    "adagrad": ([*REGRESSION, "optimizer=adagrad"],
                [["seed=1", "optimizer.lr=0.05", "optimizer.lr_decay=0.01"],
                 ["seed=2", "optimizer.lr=0.02", "scheduler=step"]]),
    "fp16": ([*REGRESSION, *SGD, "trainer.amp=fp16", "trainer.device=cpu",
              "dataset.weights=[2000,-1000,3000,1000,2000]"],
             [["seed=1", "optimizer.lr=1e-6"], ["seed=2", "optimizer.lr=1e-5"]]),
    "cnn": ([*CNN, *SGD, "trainer.epochs=4"],
            [["seed=1", "optimizer.lr=0.05"], ["seed=2", "optimizer.lr=0.02"]]),
}


def assert_same_checkpoint(fused: dict, alone: dict, rel: float) -> None:
    """Everything a checkpoint holds: the same keys, counts, schedule, scaler and RNG states
    exactly; weights and optimizer state within `rel` (a different summation order)."""
    assert fused.keys() == alone.keys()
    for key in ("epoch", "step", "skipped_steps", "best_epoch", "lr_trace", "settings"):
        assert fused[key] == alone[key], key
    assert fused["scheduler"] == alone["scheduler"] and fused["scaler"] == alone["scaler"]
    for key in ("batches", "torch"):
        assert torch.equal(fused["rng"][key], alone["rng"][key]), key
    assert fused["model"].keys() == alone["model"].keys()
    for key, value in alone["model"].items():  # BatchNorm's batch counts exactly
        torch.testing.assert_close(fused["model"][key], value, rtol=rel, atol=rel * 1e-3)
    assert fused["optimizer"]["param_groups"] == alone["optimizer"]["param_groups"]
    theirs, mine = alone["optimizer"]["state"], fused["optimizer"]["state"]
    assert mine.keys() == theirs.keys()
    for index, state in theirs.items():
        assert mine[index].keys() == state.keys()
        for key, value in state.items():
            assert mine[index][key].dtype == value.dtype, key
            torch.testing.assert_close(mine[index][key], value, rtol=rel, atol=rel * 1e-3)


@pytest.mark.parametrize("case", list(CHECKPOINTED))
def test_a_fused_member_saves_its_run_alone_s_checkpoint_and_resumes_alone(case, tmp_path):
    # Every member of a group with trainer.checkpoint.every saves, in its own folder, the
    # checkpoint its run alone saves; `trainer.resume` then continues it alone, as if it had
    # trained alone all along. Cut after epoch 2 (the callback stops every run there). In float64
    # (fp16: float32 weights under fp16 autocast, within float32's rounding).
    base, members = CHECKPOINTED[case]
    widen, rel = (float64, 1e-9) if case != "fp16" else ((lambda parts: parts), 1e-5)
    def config(k: int, *more: str):
        return compose([*base, *members[k], "trainer.epochs=4", *more])

    def cut(epoch, metrics):
        return epoch == 2

    n = len(members)
    cfgs = [config(k, "trainer.checkpoint.every=1") for k in range(n)]
    fused = [tmp_path / f"fused{k}" for k in range(n)]
    train_fused(cfgs, callbacks=[cut] * n, output_dirs=fused,
                parts=[widen(p) for p in member_parts(cfgs)])
    for k, cfg in enumerate(cfgs):
        train(cfg, callback=cut, output_dir=tmp_path / f"alone{k}", parts=widen(setup(cfg)))
        saved = [torch.load(d / "checkpoint.pt", weights_only=False)
                 for d in (fused[k], tmp_path / f"alone{k}")]
        assert_same_checkpoint(*saved, rel=rel)
        assert run_folder.read(fused[k])["checkpoint"] == str(fused[k] / "checkpoint.pt")

        resume = config(k, f"trainer.resume={fused[k] / 'checkpoint.pt'}")
        resumed = train(resume, output_dir=fused[k], parts=widen(setup(resume)))
        straight = train(config(k), output_dir=tmp_path / f"straight{k}",
                         parts=widen(setup(config(k))))
        assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
        assert_same_run(straight, resumed, rel=rel)


def test_fusable_groups_what_fuses_and_says_why_not_for_the_rest():
    mlp = [*REGRESSION, *SGD]
    cfgs = [compose([*mlp, "seed=1"]),                                     # 0
            compose([*mlp, "seed=2", "optimizer.lr=0.1", "scheduler=cosine"]),  # 1: with 0
            compose([*mlp, "model.bn=pre"]),                               # 2: another model
            compose([*mlp, "trainer.checkpoint.path=a.pt", "trainer.checkpoint.every=1"]),  # 3: no
            compose([*REGRESSION, "optimizer=adam", "+optimizer.amsgrad=true"]),  # 4: no
            compose([*mlp, "seed=3", "optimizer.momentum=0.9"]),           # 5: with 0 and 1
            compose([*REGRESSION, "optimizer=adam", "seed=4"])]            # 6: Adam's own group

    groups, reasons = fusable(cfgs)

    assert groups == [[0, 1, 5], [2], [6]]
    assert set(reasons) == {3, 4}
    assert "checkpoint.path" in reasons[3] and "amsgrad" in reasons[4]
    assert fusable(cfgs, max_size=2)[0] == [[0, 1], [5], [2], [6]]


def test_train_fused_refuses_configs_that_do_not_train_together():
    cfgs = [compose([*REGRESSION, *SGD]), compose([*REGRESSION, *SGD, "trainer.epochs=3"])]
    with pytest.raises(ValueError, match="cannot train fused: they form 2 groups"):
        train_fused(cfgs)
    with pytest.raises(ValueError, match="config 0: trainer.resume continues one run"):
        train_fused([compose([*REGRESSION, *SGD, f"trainer.resume={__file__}"])])


def test_members_have_their_own_data_and_weights():
    cfgs = [compose([*REGRESSION, *SGD, f"seed={seed}"]) for seed in (1, 2)]
    first, second = member_parts(cfgs)
    assert not torch.equal(first.data.x_train, second.data.x_train)  # dataset.seed: ${seed}
    assert not torch.equal(first.model[1].weight, second.model[1].weight)
    again = member_parts(cfgs[:1])[0]
    assert torch.equal(again.model[1].weight, first.model[1].weight)


def test_the_fuse_setting_plans_the_groups_and_says_once_why_runs_train_alone(caplog):
    mlp = [*REGRESSION, *SGD]
    cfgs = [compose([*mlp, "seed=1"]), compose(["model=resnet18", "tracking=none"]),
            compose([*mlp, "seed=2"]), compose(["model=resnet18", "tracking=none", "seed=1"]),
            compose([*mlp, "seed=3"])]

    with caplog.at_level(logging.WARNING, logger="sweep.fused"):
        planned = groups(cfgs, "auto")

    # ResNet-18s fuse by grouped convolutions, which on this CPU are slower than one at a time:
    # `auto` trains them alone and says so; an explicit size fuses them anyway.
    assert planned == [[0, 2, 4], [1], [3]]
    assert [r.getMessage() for r in caplog.records] == [
        "fuse=auto: 2 of 5 runs train one at a time: model sweep.models.resnet18 fuses by grouped "
        "convolutions, which on a CPU train slower than one at a time (fuse=<n> fuses it "
        "anyway)"]
    assert groups(cfgs, 2) == [[0, 2], [1, 3], [4]]
    assert groups(cfgs, 1) == [[0], [1], [2], [3], [4]]


def test_a_fused_group_writes_each_members_run_folder(tmp_path):
    cfgs = [compose([*REGRESSION, *SGD, f"seed={seed}"]) for seed in (1, 2)]

    results = train_group(cfgs, output_dirs=[tmp_path / "a", tmp_path / "b"])

    for result, folder in zip(results, ("a", "b"), strict=True):
        saved = run_folder.read(tmp_path / folder)
        assert (saved["status"], saved["epochs"], saved["fused"]) == (result.status, 4, 2)
        assert saved["final"]["train_loss"] == pytest.approx(result.final["train_loss"])
        rows = (tmp_path / folder / "metrics.csv").read_text().splitlines()
        assert len(rows) == 1 + 1 + 4  # the header, epoch 0, four epochs



def test_cnn_members_with_dropout_train_as_they_do_alone(tmp_path):
    # Each member's convolutions are one grouped convolution, and its dropout masks come from its
    # own generator at the state the run alone trains from: the same masks, step by step.
    members = [["seed=1", "optimizer.lr=0.05"], ["seed=2", "optimizer.lr=0.02"],
               ["seed=3", "optimizer=adam", "optimizer.lr=0.003"]]
    cfgs = [compose([*CNN, *(SGD if "optimizer=adam" not in m else []), *m]) for m in members]
    sgd = fusable(cfgs)[0]
    assert sgd == [[0, 1], [2]]  # the two SGD members fuse; Adam is a group of its own

    # The CNN drops a quarter of its activations twice a step (model.dropout=0.25): other masks
    # would part the runs in the first step.
    for alone, fused in alone_and_fused(cfgs[:2], tmp_path):
        assert_same_run(alone, fused)


def test_resnet18_members_train_as_they_do_alone(tmp_path):
    # ResNet-18 is a module tree, fused by surgery: grouped convolutions, BatchNorm2d over the
    # members' channels (each member's running statistics its own), residual additions as they
    # are, the head a batched matmul. Member 0 stops after its first epoch, so the second trains
    # the other alone in the fused rows.
    base = ["model=resnet18", "dataset=synthetic_images", "dataset.shape=[1,8,8]",
            "dataset.n_samples=40", "trainer.batch_size=8", "trainer.epochs=2",
            "trainer.device=cpu", "trainer.progress=false", "tracking=none", "optimizer=sgd"]
    cfgs = [compose([*base, "seed=1", "optimizer.lr=0.05", "scheduler=cosine"]),
            compose([*base, "seed=2", "optimizer.lr=0.01", "optimizer.momentum=0.5",
                     "scheduler=onecycle"])]
    callbacks = [lambda epoch, metrics: epoch == 1, None]

    runs = alone_and_fused(cfgs, tmp_path, callbacks=callbacks)

    assert [len(fused.history) for _, fused in runs] == [1, 2]
    for alone, fused in runs:
        assert_same_run(alone, fused)


def test_augmented_members_crop_and_flip_as_they_do_alone(tmp_path):
    cfgs = [compose([*CNN, *SGD, "dataset.augment={crop_padding: 1, hflip: true}",
                     f"seed={seed}", "trainer.batch_size=128"]) for seed in (1, 2)]
    for alone, fused in alone_and_fused(cfgs, tmp_path):
        assert_same_run(alone, fused)


def test_bf16_members_train_as_they_do_alone_to_bf16_rounding(tmp_path):
    # trainer.amp=bf16 (on a GPU `auto` picks it): the members' matmuls run in bfloat16 under
    # autocast as the run alone's do; their sums in another order round differently at bf16's
    # 8 bits, so the first epoch agrees to about 1e-2, not to float32's 1e-5.
    cfgs = [compose([*REGRESSION, *SGD, "trainer.amp=bf16", "trainer.device=cpu", f"seed={seed}",
                     "optimizer.lr=0.005"]) for seed in (1, 2)]

    for alone, fused in alone_and_fused(cfgs, tmp_path, wide=False):
        assert fused.history[0]["train_loss"] == pytest.approx(alone.history[0]["train_loss"],
                                                               rel=1e-2)
        assert fused.lr_trace == alone.lr_trace


def test_fp16_members_each_skip_the_steps_their_own_loss_scale_overflows(tmp_path):
    # As test_train's fp16 test: targets of order 1e4 overflow the first scaled fp16 gradients,
    # so each run's GradScaler skips steps and halves its scale until they fit. Fused, each member
    # has its own scale: the member at the largest lr overflows more often than the others, skips
    # those steps alone (its momentum, schedule and step count hold), and the others step.
    per_step = ["scheduler=step", "scheduler.interval=step", "scheduler.step_size=1",
                "scheduler.gamma=0.9"]
    base = [*REGRESSION, "optimizer=sgd", "optimizer.momentum=0.9", "trainer.amp=fp16",
            "trainer.device=cpu", "trainer.epochs=3", "dataset.weights=[2000,-1000,3000,1000,2000]"]
    cfgs = [compose([*base, *member]) for member in (
        ["seed=1", "optimizer.lr=1e-6", *per_step],
        ["seed=2", "optimizer.lr=1e-5"],
        ["seed=3", "optimizer.lr=1e-4", "scheduler=cosine_warmup"])]

    runs = alone_and_fused(cfgs, tmp_path, wide=False)

    for alone, fused in runs:
        assert fused.skipped_steps == alone.skipped_steps >= 1
        assert_same_run(alone, fused, rel=1e-5)
    assert runs[2][0].skipped_steps > runs[0][0].skipped_steps  # each its own scaler


@pytest.mark.parametrize("rule", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9, "centered": True}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1})],
    ids=lambda rule: rule[0].__name__)
def test_a_member_whose_step_is_skipped_keeps_its_weights_state_and_step_count(rule):
    # fp16's scaler skips a step for one member only: that member's optimizer alone does not
    # step (its momentum starts on its first applied step, Adam counts only applied steps); its
    # gradients, inf or nan, leave no trace.
    optimizer, settings = rule
    torch.manual_seed(0)
    weights = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    alone = [optimizer([w], **settings) for w in weights]
    flat = torch.stack([w.detach().clone() for w in weights])
    fused = FusedOptimizer(flat, alone, [[range(5)]])

    for skipped in ([True, False], [False, False], [False, True], [True, True], [False, False]):
        grads = torch.randn(2, 5, dtype=torch.float64)
        for w, opt, grad, skip in zip(weights, alone, grads, skipped, strict=True):
            if not skip:
                w.grad = grad.clone()
                opt.step()
        grads[torch.tensor(skipped)] = math.nan
        fused.step(flat, grads, applied=~torch.tensor(skipped).unsqueeze(1))
        torch.testing.assert_close(flat, torch.stack(weights).detach(), rtol=1e-12, atol=0)


def test_members_with_their_own_large_splits_fuse_in_groups_that_fit(caplog):
    # Each seed its own split of the data: a member holds a copy (twice while fused). With room
    # for 2.5 copies of this dataset's, groups of one; with room for 4, groups of two.
    cfgs = [compose([*REGRESSION, *SGD, f"seed={seed}"]) for seed in (1, 2, 3)]
    each = load_data(cfgs[0].dataset).nbytes
    for room, expected in ((2.5, [[0], [1], [2]]), (4.5, [[0, 1], [2]]), (6.5, [[0, 1, 2]])):
        sized = [with_values(cfg, {"trainer.device_data_max_mb": room * each / 2**20})
                 for cfg in cfgs]
        with caplog.at_level(logging.WARNING, logger="sweep.fused"):
            assert groups(sized, "auto") == expected
    assert "each has its own split" in caplog.text
    # One shared dataset (a fixed dataset.seed) is one copy whatever the members.
    shared = [with_values(cfg, {"dataset.seed": 7, "trainer.device_data_max_mb": each / 2**20})
              for cfg in cfgs]
    assert groups(shared, "auto") == [[0, 1, 2]]


def test_tree_fusion_refuses_what_would_not_be_each_members_own():
    # A module tree fuses by swapping its layers; a dropout left in it would draw one mask over
    # every member's channels, and a layer it does not know would mix them.
    from torch import nn

    from sweep.fused.model import TreeFusedModel

    def tree(*middle):
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), *middle, nn.Flatten(),
                             nn.Linear(2 * 36, 3))

    with pytest.raises(ValueError, match="dropout inside a module tree"):
        TreeFusedModel([tree(nn.Dropout(0.5)) for _ in range(2)])
    with pytest.raises(ValueError, match="knows no layer of .*weight"):
        TreeFusedModel([tree(nn.GroupNorm(1, 2)) for _ in range(2)])
