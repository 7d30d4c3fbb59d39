"""The one training loop: train, evaluate, step the schedule, log; stop on divergence."""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sweep import run_folder
from sweep.checkpoint import load_checkpoint, read_checkpoint, resume_settings, save_checkpoint
from sweep.config import fail, validate
from sweep.data import Data, augment_batch, load_data, tensor_batches
from sweep.models import build_model
from sweep.optim import build_optimizer
from sweep.schedules import Budget, build_scheduler, validate_scheduler

Callback = Callable[[int, dict[str, float]], bool | None]


@dataclass
class TrainResult:
    """What a run produced; Optuna trials and studies read this directly."""

    status: str                     # completed | diverged | stopped | stalled (did not learn)
    metric_name: str                # val_acc (classification) or val_mse (regression)
    direction: str                  # maximize | minimize
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    lr_trace: list[dict[str, Any]] = field(default_factory=list)   # {step, epoch, group, lr}
    best_metric: float = math.nan
    best_epoch: int = 0
    skipped_steps: int = 0          # optimizer steps AMP's gradient scaler skipped (inf/nan grads)
    initial: dict[str, float] = field(default_factory=dict)  # epoch 0: evaluated before any step
    run_id: str | None = None
    device: str = ""                # what it trained on, as `describe_device` names it
    fused: int = 1                  # runs trained at once with it, itself included (sweep.fused);
                                    # a fused run's epoch_time is its group's


    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    @property
    def final_metric(self) -> float:
        return self.final.get(self.metric_name, math.nan)


def pick_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """The device named the way timings need it: the GPU's model, or the CPU cores the process
    may use (a run's seconds mean little without it)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"cpu ({cores} cores, {torch.get_num_threads()} threads)"
    return device.type


def pick_amp(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 by default on CUDA that has it; fp16 needs a gradient scaler; off on CPU by default."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[name]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # cuDNN times its algorithms for each new input shape and keeps the fastest, instead of
    # guessing by heuristics: a run's batches have one or two shapes. The timing makes the
    # choice, and so the rounding, vary between runs: off where runs must repeat exactly.
    torch.backends.cudnn.benchmark = not deterministic


def loss_and_metric(cfg: DictConfig, task: str, dataset: str) -> tuple[Callable, str, str]:
    """The loss that fits the task, and the metric a sweep optimises (`data.task`, or the task the
    dataset declares: a study learns its metric without loading the data)."""
    t = cfg.trainer
    name = t.loss if t.loss != "auto" else (
        "cross_entropy" if task == "classification" else "mse")
    if (name == "cross_entropy") != (task == "classification"):
        fail("trainer.loss", name, f"does not fit the {task} dataset {dataset!r}; use "
             + ("cross_entropy" if task == "classification" else "mse or huber"))
    if name == "cross_entropy":
        def loss_fn(out, y):
            return F.cross_entropy(out, y, label_smoothing=t.label_smoothing)
        return loss_fn, "val_acc", "maximize"
    if name == "huber":
        def loss_fn(out, y):
            return F.huber_loss(out, y, delta=t.huber_delta)
        return loss_fn, "val_mse", "minimize"
    return F.mse_loss, "val_mse", "minimize"


def grad_norms(params: list[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Each parameter's gradient norm, on the device: one fused op, no host sync."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return torch._foreach_norm(grads)


def epoch_means(losses: list[torch.Tensor],
                norms: list[Sequence[torch.Tensor]]) -> tuple[float, float]:
    """The mean step loss, and the RMS over sampled steps of the total gradient norm (or NaN).

    Both come back from the device in one read; the arithmetic on these few hundred numbers is
    cheaper in Python than the half-dozen tensor ops it would take there.
    """
    values = torch.stack([*losses, *(n for sample in norms for n in sample)]).tolist()
    squares = sum(v * v for v in values[len(losses):])  # over samples and parameters
    rms = math.sqrt(squares / len(norms)) if norms else math.nan
    return sum(values[:len(losses)]) / len(losses), rms


def batches(data: Data, device: torch.device, bs: int, num_workers: int, gen: torch.Generator,
            on_device: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled training batches: sliced from tensors on the device, or through a DataLoader."""
    if on_device:
        yield from tensor_batches(data.x_train, data.y_train, bs, True, gen)
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=bs, shuffle=True,
        generator=gen, num_workers=num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False)
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: Data, loss_fn: Callable, metric_name: str,
             device: torch.device, amp: torch.dtype | None, batch_size: int,
             train_split: bool = False) -> dict[str, float]:
    """Validation loss and metric, and with `train_split` the loss over the whole training split
    (`train_eval_loss`, the BN article's curve), all in eval mode; summed on the device and read
    back once."""
    model.eval()
    metric_is_loss = loss_fn is F.mse_loss  # then val_mse is val_loss: computed once

    def sums(x: torch.Tensor, y: torch.Tensor, metric: str | None) -> torch.Tensor:
        """Per batch: loss * batch size, then the metric's sum; averaged over the split."""
        per_batch = []
        for xb, yb in tensor_batches(x, y, batch_size, False, None):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if amp is None:
                out = model(xb)
            else:
                with torch.autocast(device.type, dtype=amp):
                    out = model(xb).float()
            per_batch.append(loss_fn(out, yb) * len(xb))
            if metric == "val_acc":
                per_batch.append((out.argmax(1) == yb).sum())
            elif metric is not None:
                per_batch.append(F.mse_loss(out, yb, reduction="sum") / out.shape[1:].numel())
        width = 1 if metric is None else 2
        return torch.stack(per_batch).view(-1, width).sum(0) / len(x)

    splits = [sums(data.x_val, data.y_val, None if metric_is_loss else metric_name)]
    if train_split:
        splits.append(sums(data.x_train, data.y_train, None))
    model.train()
    values = torch.cat(splits).tolist()
    val_loss = values[0]
    metrics = {"val_loss": val_loss, metric_name: val_loss if metric_is_loss else values[1]}
    if train_split:
        metrics["train_eval_loss"] = values[-1]
    return metrics


# "Did not learn" (status `stalled`) is decided here and nowhere else. A finished run learned when
# its final loss is at most LEARNED_LOSS_RATIO x its reference: the lower of its loss at
# initialisation (epoch 0) and the loss of the best prediction that ignores the inputs (the
# training targets' mean; the training label frequencies). The second matters: a regression net
# that only learned the mean ends far below its initial loss, which also paid for the mean's
# square, yet knows nothing of the inputs (the BN article's MLP stuck at 32.4, the variance of y
# on seed 929's training split). 0.9: a tenth of the reference is the least progress that
# counts, well above how much a stuck run's loss wobbles from epoch to epoch.
LEARNED_LOSS_RATIO = 0.9
# Classification must also end clearly above chance (the majority class's share of the
# validation split): at least a tenth of the way from chance to perfect accuracy.
LEARNED_ACCURACY_SHARE = 0.1


@torch.inference_mode()
def constant_baseline(data: Data, loss_fn: Callable, metric_name: str,
                      train_split: bool) -> dict[str, float]:
    """What predicting without looking at the inputs scores: the loss (on the training split with
    `train_split`, else validation) and, for classification, the validation accuracy."""
    y = data.y_train if train_split else data.y_val
    if metric_name == "val_acc":
        counts = torch.bincount(data.y_train, minlength=data.num_outputs).float()
        logits = (counts / counts.sum()).clamp_min(1e-12).log()  # softmax gives the frequencies
        loss = loss_fn(logits.expand(len(y), -1), y)
        chance = (data.y_val == counts.argmax()).float().mean()
        return {"loss": loss.item(), "val_acc": chance.item()}
    return {"loss": loss_fn(data.y_train.mean(0).expand_as(y), y).item()}


def did_not_learn(final: dict[str, float], initial: dict[str, float],
                  baseline: dict[str, float], loss_key: str) -> bool:
    """Whether a finished run ends `stalled` by the rule above; a NaN loss never learned.

    `final`/`initial`: the last epoch's and epoch 0's metrics; `baseline`: `constant_baseline`
    on the split `loss_key` (train_eval_loss or val_loss) is measured on.
    """
    reference = min(initial[loss_key], baseline["loss"])
    if not final[loss_key] <= LEARNED_LOSS_RATIO * reference:
        return True
    if "val_acc" not in baseline:
        return False
    chance = baseline["val_acc"]
    return not final["val_acc"] > chance + LEARNED_ACCURACY_SHARE * (1 - chance)


def diverged(metrics: dict[str, float], initial_loss: float, factor: float) -> bool:
    """Whether an epoch's end stops the run as `diverged`: a loss that is not finite, or a train
    loss above `trainer.divergence_factor` x the run's first batch loss."""
    train_loss = metrics["train_loss"]
    return not math.isfinite(train_loss) or not math.isfinite(metrics["val_loss"]) or (
        train_loss > factor * max(initial_loss, 1e-12))


def settle_status(result: TrainResult, data: Data, loss_fn: Callable, train_eval: bool) -> None:
    """A run that completed but did not learn ends `stalled` (`did_not_learn`, on the training
    split's eval-mode loss where it was measured, else the validation loss)."""
    if result.status == "completed" and result.history and result.initial and did_not_learn(
            result.final, result.initial,
            constant_baseline(data, loss_fn, result.metric_name, train_eval),
            "train_eval_loss" if train_eval else "val_loss"):
        result.status = "stalled"


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr` is the first (default) group's; `lr/<name>` each group's when there are several."""
    lrs = {"lr": optimizer.param_groups[0]["lr"]}
    if len(optimizer.param_groups) > 1:
        for g in optimizer.param_groups:
            # MLflow metric names allow only letters, digits and _-. :/ (a regex rule has more).
            lrs["lr/" + re.sub(r"[^\w\-. :/]", "_", g.get("name", "default"))] = g["lr"]
    return lrs


@dataclass
class Setup:
    """The parts every run over a config trains with; `train` and `lr_find` both start here."""

    device: torch.device
    data: Data                      # on `device` when `on_device`
    on_device: bool                 # small enough to batch from device tensors (no DataLoader)
    model: torch.nn.Module          # on `device`
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    metric_name: str                # val_acc | val_mse
    direction: str                  # maximize | minimize
    budget: Budget                  # epochs and optimizer steps per epoch, for the schedule
    amp: torch.dtype | None         # the autocast dtype, or None for full precision
    gen: torch.Generator            # batch order and augmentation (checkpointed by `train`)
    # The global RNG's state once the model is built: what its dropout masks are drawn from
    # (`train` draws them from the global RNG itself; a fused member from this copy).
    rng: torch.Generator | None = None


def setup(cfg: DictConfig) -> Setup:
    """Seed, then build the device, data, model, optimizer and loss as the config says."""
    t = cfg.trainer
    device = pick_device(t.device)
    seed_everything(cfg.seed, t.deterministic)
    data = load_data(cfg.dataset)
    model = build_model(cfg.model, data).to(device)
    optimizer = build_optimizer(cfg.optimizer, model)
    loss_fn, metric_name, direction = loss_and_metric(cfg, data.task, data.name)
    budget = Budget(epochs=t.epochs, steps_per_epoch=data.steps_per_epoch(t.batch_size))
    on_device = data.nbytes <= t.device_data_max_mb * 2**20
    if on_device:
        data = data.to(device)
    return Setup(device, data, on_device, model, optimizer, loss_fn, metric_name, direction,
                 budget, pick_amp(t.amp, device), torch.Generator().manual_seed(cfg.seed))


def check_parts(cfg: DictConfig) -> None:
    """An app's check (`checks:` in its primary config): build what the config describes on its
    data, so a value only the data can refuse (a CNN on vectors, a loss for the other task, a
    schedule longer than the run) is refused before Hydra creates the output folder or any MLflow
    run opens. `load_data` keeps the data for the run. A multirun's jobs differ in the values it
    sweeps, which its start does not see: each job checks its own parts before its run opens."""
    if OmegaConf.select(cfg, "hydra.mode") == RunMode.MULTIRUN:
        return
    parts = setup(cfg)
    validate_scheduler(cfg.scheduler, parts.budget, parts.direction)


def default_output_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not inside a Hydra app (tests, studies): the working directory
        return Path.cwd()


def record_epoch(result: TrainResult, metrics: dict[str, float], schedule: Any,
                 tracker: Any = None) -> None:
    """An epoch's end, for a run alone and for each member of a fused group alike: an
    epoch-interval schedule steps (plateau on the run's metric), the row joins the history, the
    best epoch so far is kept, and the tracker logs the row."""
    value = metrics[result.metric_name]
    if schedule.interval == "epoch":
        if schedule.needs_metric:
            schedule.scheduler.step(value)
        else:
            schedule.scheduler.step()
    result.history.append(metrics)
    improved = value > result.best_metric if result.direction == "maximize" else (
        value < result.best_metric)
    if math.isfinite(value) and (result.best_epoch == 0 or improved):
        result.best_metric, result.best_epoch = value, metrics["epoch"]
    if tracker is not None:
        tracker.log_epoch(metrics["epoch"], metrics)


def train(cfg: DictConfig, callback: Callback | None = None, tracker: Any = None,
          output_dir: str | Path | None = None, parts: Setup | None = None) -> TrainResult:
    """Train one model as the config says and return its result; `tracker` logs to MLflow.

    `parts`: what `setup(cfg)` built already (a caller that checks them before opening a run).
    """
    # 1. Check everything that can be checked, then build each part (still before any training).
    validate(cfg)
    t = cfg.trainer
    parts = parts if parts is not None else setup(cfg)
    device, data, model, optimizer = parts.device, parts.data, parts.model, parts.optimizer
    loss_fn, metric_name, direction = parts.loss_fn, parts.metric_name, parts.direction
    amp, on_device, gen = parts.amp, parts.on_device, parts.gen
    schedule = build_scheduler(cfg.scheduler, optimizer, parts.budget, direction)
    # fp16 needs loss scaling to keep small gradients representable; bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    out_dir = Path(output_dir) if output_dir is not None else default_output_dir()
    ckpt_path = Path(t.checkpoint.path) if t.checkpoint.path else out_dir / "checkpoint.pt"

    result = TrainResult(status="completed", metric_name=metric_name, direction=direction,
                         run_id=getattr(tracker, "run_id", None), device=describe_device(device))
    step, start_epoch, initial_loss = 0, 1, None
    settings = resume_settings(cfg)  # saved with each checkpoint, compared when resuming
    # The loss over the whole training split in eval mode, each epoch: on by default where that
    # split lives on the device (one batched forward pass), a setting for DataLoader-sized data.
    train_eval = t.train_eval_loss is True or (t.train_eval_loss == "auto" and on_device)
    eval_batch = max(1024, t.batch_size)
    if t.resume:
        step, start_epoch, initial_loss = load_checkpoint(
            read_checkpoint(cfg, parts), model, optimizer, schedule.scheduler, scaler, gen, result)
    else:
        # Epoch 0: the losses at initialisation, the reference for "did not learn" and the cap
        # comparisons put on a diverged run's loss. It draws no randomness: training is unchanged.
        result.initial = evaluate(model, data, loss_fn, metric_name, device, amp, eval_batch,
                                  train_eval)
        if tracker is not None and train_eval:
            tracker.log_epoch(0, {"train_eval_loss": result.initial["train_eval_loss"]})

    # Plain values for the loop: a DictConfig lookup costs tens of microseconds, an epoch of the
    # article's MLP a few milliseconds.
    batch_size, num_workers, norm_every = t.batch_size, t.num_workers, t.grad_norm_every
    clip_mode, clip_max, checkpoint_every = t.clip.mode, t.clip.max, t.checkpoint.every
    progress, divergence_factor = t.progress, t.divergence_factor
    log_every = t.log_every_n_steps if tracker is not None else 0
    group_names = [g.get("name", "default") for g in optimizer.param_groups]
    # Without fp16 the scaler is a no-op, so the loop skips its calls (microseconds a step).
    per_step, fp16 = schedule.interval == "step", scaler.is_enabled()
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()

    bar = tqdm(range(start_epoch, t.epochs + 1), desc="epochs", disable=not progress,
               initial=start_epoch - 1, total=t.epochs, dynamic_ncols=True)
    for epoch in bar:
        # 2. One pass over the training data.
        started = time.perf_counter()
        epoch_lrs = group_lrs(optimizer)  # what this epoch's first step applies
        losses: list[torch.Tensor] = []  # on the device: summed once, at the epoch's end
        norms: list[Sequence[torch.Tensor]] = []  # sampled steps' gradient norms, before clipping
        trace: list[tuple[int, tuple[float, ...]]] = []  # (step, each group's lr) applied
        for xb, yb in batches(data, device, batch_size, num_workers, gen, on_device):
            if data.augment:
                xb = augment_batch(xb, generator=gen, **data.augment)
            with autocast:
                out = model(xb)
                loss = loss_fn(out if amp is None else out.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            if fp16:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip and measure true gradients, not scaled ones
            else:
                loss.backward()
            if norm_every and len(losses) % norm_every == 0:
                norms.append(grad_norms(params))
            if clip_mode == "norm":
                torch.nn.utils.clip_grad_norm_(params, clip_max)
            elif clip_mode == "value":
                torch.nn.utils.clip_grad_value_(params, clip_max)
            applied = tuple(g["lr"] for g in optimizer.param_groups)
            try:
                if fp16:
                    scale = scaler.get_scale()
                    scaler.step(optimizer)  # skipped by the scaler when gradients hold inf/nan
                    scaler.update()
                    skipped = scaler.get_scale() < scale
                else:
                    optimizer.step()
                    skipped = False
            except RuntimeError as err:
                # An lr beyond the weights' float range (1e300 on float32 weights) cannot even be
                # applied: PyTorch refuses to convert it ("... without overflow"). It is a
                # too-large lr like lr=50, so it ends the same way: this epoch's loss is infinite
                # and the run stops as `diverged` below. Refusing it at validation instead would
                # miss the lrs a schedule or a per-group rule scales up past the range.
                if "without overflow" not in str(err):
                    raise
                losses.append(torch.full_like(loss.detach(), math.inf))
                break
            if skipped:
                # A skipped step applied no lr, so a per-step schedule does not advance either.
                result.skipped_steps += 1
            else:
                trace.append((step, applied))
                step += 1
                if per_step:
                    schedule.scheduler.step()  # always after optimizer.step()
            losses.append(loss.detach())
            if initial_loss is None:
                initial_loss = loss.item()  # the reference for "far above where it started"
            if log_every and step % log_every == 0:
                lrs = {f"step_{k}": v for k, v in group_lrs(optimizer).items()}
                tracker.log_step(step, {"step_loss": loss.item(), **lrs})

        result.lr_trace += [{"step": k, "epoch": epoch, "group": name, "lr": lr}
                            for k, lrs in trace for name, lr in zip(group_names, lrs, strict=True)]

        # 3. Evaluate, then step an epoch schedule (plateau schedules get the metric).
        train_loss, grad_norm = epoch_means(losses, norms)  # one host sync an epoch
        metrics = {"epoch": epoch, "train_loss": train_loss, **evaluate(
            model, data, loss_fn, metric_name, device, amp, eval_batch, train_eval), **epoch_lrs}
        if norms:
            metrics["grad_norm"] = grad_norm
        if fp16:
            metrics["skipped_steps"] = result.skipped_steps
        metrics["epoch_time"] = time.perf_counter() - started
        record_epoch(result, metrics, schedule, tracker)
        if progress:
            bar.set_postfix(train_loss=f"{train_loss:.4g}",
                            **{metric_name: f"{metrics[metric_name]:.4g}"})

        # 4. Stop a run that diverged instead of burning the remaining epochs.
        if diverged(metrics, initial_loss, divergence_factor):
            result.status = "diverged"
            break
        if checkpoint_every and epoch % checkpoint_every == 0:
            save_checkpoint(ckpt_path, model, optimizer, schedule.scheduler, scaler, gen, epoch,
                            step, initial_loss, result, settings)
        if callback is not None and callback(epoch, metrics):
            result.status = "stopped"
            break
    bar.close()
    settle_status(result, data, loss_fn, train_eval)
    run_folder.write(out_dir, result, ckpt_path if checkpoint_every and ckpt_path.exists()
                     else None, getattr(tracker, "name", None))
    return result
