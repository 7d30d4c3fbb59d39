"""CUDA runs: AMP in bf16 and fp16, data resident on the GPU. Skipped where there is no CUDA."""

import math

import pytest
import torch

from sweep.config import compose
from sweep.train import pick_amp, pick_device, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DIGITS = ["dataset=digits", "model=cnn", "optimizer=sgd", "scheduler=cosine",
          "scheduler.interval=step", "trainer.epochs=4", "trainer.progress=false", "tracking=none"]


def test_auto_picks_cuda_and_bf16():
    device = pick_device("auto")
    assert device.type == "cuda"
    assert pick_amp("auto", device) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_cnn_trains_on_cuda_with_each_amp_mode(tmp_path, amp):
    result = train(compose([*DIGITS, f"trainer.amp={amp}"]), output_dir=tmp_path)
    assert result.status == "completed"
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["val_acc"] > 0.8


def test_the_lr_sequence_on_cuda_is_the_one_on_the_cpu(tmp_path):
    gpu = train(compose([*DIGITS, "trainer.amp=off"]), output_dir=tmp_path)
    cpu = train(compose([*DIGITS, "trainer.amp=off", "trainer.device=cpu"]), output_dir=tmp_path)
    assert [r["lr"] for r in gpu.lr_trace] == [r["lr"] for r in cpu.lr_trace]
    assert gpu.history[-1]["val_acc"] == pytest.approx(cpu.history[-1]["val_acc"], abs=0.05)


def test_large_data_goes_through_a_dataloader(tmp_path):
    cfg = compose([*DIGITS, "trainer.device_data_max_mb=0", "trainer.num_workers=1"])
    result = train(cfg, output_dir=tmp_path)
    assert result.status == "completed" and result.history[-1]["val_acc"] > 0.8


def test_resume_on_cuda_continues_the_same_run(tmp_path):
    # A checkpoint written on CUDA restores onto CUDA: RNG states stay CPU tensors, model and
    # optimizer state land on the GPU. cuDNN may sum in another order, so losses match closely,
    # not bit for bit.
    common = [*DIGITS, "trainer.amp=off", "trainer.deterministic=true",
              "trainer.checkpoint.every=1", "trainer.epochs=4"]
    full = train(compose(common), output_dir=tmp_path / "full")
    train(compose(common), callback=lambda epoch, m: epoch == 2, output_dir=tmp_path / "cut")
    resumed = train(compose([*common, f"trainer.resume={tmp_path / 'cut' / 'checkpoint.pt'}"]),
                    output_dir=tmp_path / "cut")
    assert [r["lr"] for r in resumed.lr_trace] == [r["lr"] for r in full.lr_trace]
    for a, b in zip(resumed.history, full.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=0.02)


def test_fp16_on_cuda_skips_overflowing_steps_and_holds_the_schedule(tmp_path):
    # As the CPU test: targets of order 1e4 overflow the first scaled fp16 gradients, the scaler
    # skips those steps, and a per-step schedule advances only on the steps it applied.
    cfg = compose(["model=mlp", "dataset=synthetic_regression", "dataset.n_samples=200",
                   "dataset.weights=[2000,-1000,3000,1000,2000]", "optimizer=sgd",
                   "optimizer.momentum=0", "optimizer.lr=1e-6", "scheduler=step",
                   "scheduler.interval=step", "scheduler.step_size=1", "scheduler.gamma=0.9",
                   "trainer.batch_size=50", "trainer.epochs=3", "trainer.amp=fp16",
                   "trainer.progress=false", "tracking=none", "seed=929"])
    result = train(cfg, output_dir=tmp_path)
    steps = 3 * math.ceil(0.7 * 200 / 50)  # 140 training samples
    assert result.skipped_steps >= 1
    assert len(result.lr_trace) == steps - result.skipped_steps
    assert [r["lr"] for r in result.lr_trace] == pytest.approx(
        [1e-6 * 0.9 ** k for k in range(len(result.lr_trace))])


def test_fused_cnns_on_cuda_each_train_as_alone_in_their_first_epoch(tmp_path):
    # `fuse=auto` on a GPU: bf16 autocast (trainer.amp=auto) with grouped convolutions. CUDA's
    # dropout kernel draws other masks than a per-member Bernoulli draw, so each member is
    # compared with dropout off; the rest agrees to bf16 rounding in the first epoch.
    from sweep.fused import fusable, train_fused

    cfgs = [compose([*DIGITS, "model.dropout=0", f"seed={seed}", f"optimizer.lr={lr}"])
            for seed, lr in ((1, 0.05), (2, 0.02), (3, 0.01))]
    assert fusable(cfgs)[0] == [[0, 1, 2]]
    alone = [train(cfg, output_dir=tmp_path / str(i)) for i, cfg in enumerate(cfgs)]
    fused = train_fused(cfgs)
    for a, f in zip(alone, fused, strict=True):
        assert f.lr_trace == a.lr_trace
        assert f.history[0]["train_loss"] == pytest.approx(a.history[0]["train_loss"], rel=2e-2)
        assert f.history[-1]["val_acc"] > 0.8


@pytest.mark.parametrize("amp, rel", [("bf16", 5e-2), ("off", 1e-3)])
def test_fused_resnets_on_cuda_each_train_as_alone_in_their_first_epoch(tmp_path, monkeypatch,
                                                                       amp, rel):
    # ResNet-18 fuses by grouped convolutions (channels-last on CUDA), and on CUDA `fuse=auto`
    # fuses it (on a CPU it trains alone). In bf16 (the default there) the members' sums round
    # at 8 bits in another order, which the lr 0.05 member amplifies within its first epoch; in
    # float32 without TF32, to float32 rounding. BatchNorm2d keeps each member's statistics in
    # its own channels.
    from sweep.fused import groups, train_fused

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    base = ["dataset=synthetic_images", "dataset.n_samples=640", "dataset.signal=2",
            "model=resnet18", "optimizer=sgd", "optimizer.momentum=0.9", "scheduler=cosine",
            "trainer.epochs=3", "trainer.batch_size=64", f"trainer.amp={amp}",
            "trainer.progress=false", "tracking=none"]
    cfgs = [compose([*base, f"seed={seed}", f"optimizer.lr={lr}"])
            for seed, lr in ((1, 0.05), (2, 0.02), (3, 0.01))]
    assert groups(cfgs, "auto") == [[0, 1, 2]]
    alone = [train(cfg, output_dir=tmp_path / str(i)) for i, cfg in enumerate(cfgs)]
    fused = train_fused(cfgs)
    for a, f in zip(alone, fused, strict=True):
        assert f.lr_trace == a.lr_trace
        assert f.history[0]["train_loss"] == pytest.approx(a.history[0]["train_loss"], rel=rel)
        assert f.status == a.status == "completed"  # each learned: not `stalled`


def test_fused_fp16_members_on_cuda_each_skip_the_steps_their_run_alone_skips(tmp_path):
    # As tests/test_fused.py's fp16 test on the CPU: targets of order 1e4 overflow the first
    # scaled gradients; fused, each member has its own loss scale, skips the steps its run alone
    # skips (the largest lr the most) and applies its run alone's lrs, while the others step.
    from sweep.fused import fusable, train_fused

    per_step = ["scheduler=step", "scheduler.interval=step", "scheduler.step_size=1",
                "scheduler.gamma=0.9"]
    base = ["model=mlp", "dataset=synthetic_regression",
            "dataset.weights=[2000,-1000,3000,1000,2000]", "optimizer=sgd",
            "optimizer.momentum=0.9", "trainer.batch_size=50", "trainer.epochs=3",
            "trainer.amp=fp16", "trainer.device=cuda", "trainer.progress=false", "tracking=none"]
    cfgs = [compose([*base, *member]) for member in (
        ["seed=1", "optimizer.lr=1e-6", *per_step],
        ["seed=2", "optimizer.lr=1e-5"],
        ["seed=3", "optimizer.lr=1e-4", "scheduler=cosine_warmup"])]
    assert fusable(cfgs)[0] == [[0, 1, 2]]
    alone = [train(cfg, output_dir=tmp_path / str(i)) for i, cfg in enumerate(cfgs)]
    fused = train_fused(cfgs)
    for a, f in zip(alone, fused, strict=True):
        assert f.skipped_steps == a.skipped_steps >= 1
        assert f.lr_trace == a.lr_trace
        assert f.history[0]["train_loss"] == pytest.approx(a.history[0]["train_loss"], rel=1e-2)
    assert alone[2].skipped_steps > alone[0].skipped_steps  # each its own scaler
