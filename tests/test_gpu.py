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
