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
from sweep.checkpoint import (
    load_checkpoint,
    read_checkpoint,
    resume_settings,
    run_rngs,
    save_checkpoint,
)
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


def loss_name(trainer: DictConfig, task: str) -> str:
    """`trainer.loss`, with `auto` the task's own: cross_entropy for classification, else mse."""
    if trainer.loss != "auto":
        return trainer.loss
    return "cross_entropy" if task == "classification" else "mse"


def loss_and_metric(cfg: DictConfig, task: str, dataset: str) -> tuple[Callable, str, str]:
    """The loss that fits the task, and the metric a sweep optimises (`data.task`, or the task the
    dataset declares: a study learns its metric without loading the data)."""
    t = cfg.trainer
    name = loss_name(t, task)
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


def epoch_means(losses: list[torch.Tensor], norms: list[torch.Tensor]
                ) -> list[tuple[float, float]]:
    """For each run of a step's (runs,) tensors: the mean step loss, and the RMS over sampled
    steps of the total gradient norm (NaN where none was sampled).

    All come back from the device in one read; the arithmetic on these few hundred numbers is
    cheaper in Python than the half-dozen tensor ops it would take there.
    """
    # (steps, runs): a run alone's 0-d losses become a column.
    values = torch.stack([*losses, *norms]).view(len(losses) + len(norms), -1).T.tolist()
    out = []
    for row in values:
        mean = sum(row[:len(losses)]) / len(losses)
        squares = sum(v * v for v in row[len(losses):])
        out.append((mean, math.sqrt(squares / len(norms)) if norms else math.nan))
    return out


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


@dataclass
class Step:
    """What an engine's training step gives the loop, one entry per run still training."""

    loss: torch.Tensor                  # (runs,) each run's batch loss on the device (0-d: one)
    norm: torch.Tensor | None = None    # (runs,) total gradient norms before clipping, if sampled
    skipped: list[bool] | None = None   # per run: no update applied (fp16's scaler saw inf/nan)
    overflow: bool = False              # the lr is beyond the weights' range: the epoch ends


@dataclass
class Run:
    """One run's part of the loop: its result, and what it steps, logs and decides each epoch."""

    result: TrainResult
    optimizer: torch.optim.Optimizer  # its param_groups hold the lrs the run applies
    schedule: Any                     # sweep.schedules.Schedule
    divergence_factor: float
    tracker: Any = None
    callback: Callback | None = None
    initial_loss: float | None = None  # its first batch loss, the reference for "diverged"


def train_runs(engine: Any, runs: Sequence[Run], t: DictConfig, first_epoch: int = 1,
               step: int = 0, desc: str = "epochs") -> None:
    """The one training loop, for one run (`AloneEngine`) or several at once (the fused engine of
    `sweep.fused`): train, evaluate, step the schedules, log; stop a run that diverges or that its
    callback stops, while the others train on.

    The engine holds the models, optimizers and data; its `active` lists the runs still training
    (indices into `runs`, in its order); `batches()` gives an epoch's batches, `step(xb, yb,
    sample_norm)` one `Step`, `evaluate(train_split)` a dict of metrics per active run,
    `lrs_changed()` follows schedules that stepped, `end_epoch(epoch, going_on, steps, runs)`
    may save checkpoints of the runs going on (indices into `runs`, each with its own step), and
    `keep(rows)` drops the runs that stopped. `step`: the optimizer steps every run applied
    before (a resumed run's); from there each run counts its own, as fp16's loss scaler may skip
    a step for some runs only.
    """
    # Plain values for the loop: a DictConfig lookup costs tens of microseconds, an epoch of the
    # article's MLP a few milliseconds.
    norm_every, progress = t.grad_norm_every, t.progress
    tracked = any(run.tracker is not None for run in runs)
    log_every = t.log_every_n_steps if tracked else 0
    train_eval = engine.train_eval
    group_names = [[g.get("name", "default") for g in run.optimizer.param_groups] for run in runs]
    # A run's own step is the loop's `step` (batches stepped) less the steps its scaler skipped.
    skipped_here = [0] * len(runs)
    if first_epoch == 1:
        # Epoch 0: the losses at initialisation, the reference for "did not learn" and the cap
        # comparisons put on a diverged run's loss. It draws no randomness: training is unchanged.
        for i, initial in zip(engine.active, engine.evaluate(train_eval), strict=True):
            runs[i].result.initial = initial
            if runs[i].tracker is not None and train_eval:
                runs[i].tracker.log_epoch(0, {"train_eval_loss": initial["train_eval_loss"]})

    bar = tqdm(range(first_epoch, t.epochs + 1), desc=desc, disable=not progress,
               initial=first_epoch - 1, total=t.epochs, dynamic_ncols=True)
    for epoch in bar:
        # 2. One pass over the training data.
        started = time.perf_counter()
        active = list(engine.active)
        per_step = [j for j, i in enumerate(active) if runs[i].schedule.interval == "step"]
        epoch_lrs = [group_lrs(runs[i].optimizer) for i in active]  # the first step's
        applied = [tuple(g["lr"] for g in runs[i].optimizer.param_groups) for i in active]
        epoch_step, epoch_skipped = step, [skipped_here[i] for i in active]
        losses: list[torch.Tensor] = []  # (runs,) a step, on the device: read once, at the end
        norms: list[torch.Tensor] = []  # sampled steps' total gradient norms, before clipping
        # Each step's lrs as each run applied them, and which runs skipped it (None: none did).
        trace: list[tuple[list[tuple[float, ...]], list[bool] | None]] = []
        for xb, yb in engine.batches():
            sample = bool(norm_every) and len(losses) % norm_every == 0
            out = engine.step(xb, yb, sample)
            if out.overflow:
                losses.append(torch.full_like(out.loss, math.inf))
                break
            if sample:
                norms.append(out.norm)
            skipped = out.skipped
            trace.append((applied, skipped))
            step += 1
            if skipped is not None:
                for j, i in enumerate(active):
                    skipped_here[i] += skipped[j]
            if per_step:
                # A skipped step applied no lr, so a per-step schedule does not advance either.
                for j in per_step:
                    if skipped is None or not skipped[j]:
                        runs[active[j]].schedule.scheduler.step()  # always after the update
                engine.lrs_changed()
                applied = [tuple(g["lr"] for g in runs[i].optimizer.param_groups)
                           for i in active]
            losses.append(out.loss)
            if runs[active[0]].initial_loss is None:
                for i, first in zip(active, out.loss.view(-1).tolist(), strict=True):
                    runs[i].initial_loss = first  # the reference for "far above where it started"
            if log_every and (engine.fp16 or step % log_every == 0):
                for j, (i, loss) in enumerate(zip(active, out.loss.view(-1).tolist(),
                                                  strict=True)):
                    own = step - skipped_here[i]
                    if runs[i].tracker is not None and own % log_every == 0 and (
                            skipped is None or not skipped[j]):
                        lrs = {f"step_{k}": v for k, v in group_lrs(runs[i].optimizer).items()}
                        runs[i].tracker.log_step(own, {"step_loss": loss, **lrs})

        # 3. Evaluate; then each run steps its epoch schedule (plateau on its metric), records,
        # and may stop.
        means = epoch_means(losses, norms)  # one host sync an epoch
        evaluated = engine.evaluate(train_eval)
        elapsed = time.perf_counter() - started  # an engine of several runs shares it
        stopping: dict[int, str] = {}
        for j, i in enumerate(active):
            run, (train_loss, grad_norm) = runs[i], means[j]
            result = run.result
            result.skipped_steps += skipped_here[i] - epoch_skipped[j]
            own = [lrs[j] for lrs, skipped in trace if skipped is None or not skipped[j]]
            first = epoch_step - epoch_skipped[j]
            result.lr_trace += [{"step": first + k, "epoch": epoch, "group": group, "lr": lr}
                                for k, lrs in enumerate(own)
                                for group, lr in zip(group_names[i], lrs, strict=True)]
            metrics = {"epoch": epoch, "train_loss": train_loss, **evaluated[j], **epoch_lrs[j]}
            if norms:
                metrics["grad_norm"] = grad_norm
            if engine.fp16:
                metrics["skipped_steps"] = result.skipped_steps
            metrics["epoch_time"] = elapsed
            record_epoch(result, metrics, run.schedule, run.tracker)
            # 4. Stop a run that diverged instead of burning the remaining epochs.
            if diverged(metrics, run.initial_loss, run.divergence_factor):
                stopping[i] = "diverged"
        if progress and len(active) == 1:
            final, metric = runs[active[0]].result.final, runs[active[0]].result.metric_name
            bar.set_postfix(train_loss=f"{final['train_loss']:.4g}",
                            **{metric: f"{final[metric]:.4g}"})
        going_on = [i for i in active if i not in stopping]
        engine.end_epoch(epoch, going_on, [step - skipped_here[i] for i in going_on], runs)
        for i in active:
            run = runs[i]
            if i not in stopping and run.callback is not None and run.callback(
                    epoch, run.result.final):
                stopping[i] = "stopped"
        for i, status in stopping.items():
            runs[i].result.status = status
        keep = [j for j, i in enumerate(active) if i not in stopping]
        if not keep:
            break
        if len(keep) < len(active):
            engine.keep(keep)
        else:
            engine.lrs_changed()
    bar.close()


class AloneEngine:
    """One run: its model, optimizer (with fp16's gradient scaler) and data, batched from device
    tensors or through a DataLoader; `train`'s engine for `train_runs`."""

    fp16: bool
    active = (0,)

    def __init__(self, cfg: DictConfig, parts: Setup, schedule: Any,
                 checkpoint: tuple[Path, dict[str, Any]] | None = None):
        t = cfg.trainer
        self.parts, self.schedule, self.checkpoint = parts, schedule, checkpoint
        self.every = t.checkpoint.every
        # fp16 needs loss scaling to keep small gradients representable; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(parts.device.type, enabled=parts.amp == torch.float16)
        # Without fp16 the scaler is a no-op, so the step skips its calls (microseconds a step).
        self.fp16 = self.scaler.is_enabled()
        self.params = [p for p in parts.model.parameters() if p.requires_grad]
        self.autocast = torch.autocast(parts.device.type, dtype=parts.amp) if (
            parts.amp is not None) else nullcontext()
        self.batch_size, self.num_workers = t.batch_size, t.num_workers
        self.clip_mode, self.clip_max = t.clip.mode, t.clip.max
        # The loss over the whole training split in eval mode, each epoch: on by default where
        # that split lives on the device (one batched forward pass), a setting for DataLoader-sized
        # data.
        self.train_eval = t.train_eval_loss is True or (
            t.train_eval_loss == "auto" and parts.on_device)
        self.eval_batch = max(1024, t.batch_size)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.parts
        for xb, yb in batches(p.data, p.device, self.batch_size, self.num_workers, p.gen,
                              p.on_device):
            if p.data.augment:
                xb = augment_batch(xb, generator=p.gen, **p.data.augment)
            yield xb, yb

    def step(self, xb: torch.Tensor, yb: torch.Tensor, sample_norm: bool) -> Step:
        p, scaler, optimizer = self.parts, self.scaler, self.parts.optimizer
        with self.autocast:
            out = p.model(xb)
            loss = p.loss_fn(out if p.amp is None else out.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        if self.fp16:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip and measure true gradients, not scaled ones
        else:
            loss.backward()
        norm = torch.linalg.vector_norm(torch.stack(grad_norms(self.params))) if (
            sample_norm) else None
        if self.clip_mode == "norm":
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_max)
        elif self.clip_mode == "value":
            torch.nn.utils.clip_grad_value_(self.params, self.clip_max)
        skipped = None
        try:
            if self.fp16:
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped by the scaler when gradients hold inf/nan
                scaler.update()
                if scaler.get_scale() < scale:
                    skipped = [True]
            else:
                optimizer.step()
        except RuntimeError as err:
            # An lr beyond the weights' float range (1e300 on float32 weights) cannot even be
            # applied: PyTorch refuses to convert it ("... without overflow"). It is a too-large
            # lr like lr=50, so it ends the same way: this epoch's loss is infinite and the run
            # stops as `diverged`. Refusing it at validation instead would miss the lrs a
            # schedule or a per-group rule scales up past the range.
            if "without overflow" not in str(err):
                raise
            return Step(loss.detach(), norm, overflow=True)
        return Step(loss.detach(), norm, skipped=skipped)

    def evaluate(self, train_split: bool) -> list[dict[str, float]]:
        p = self.parts
        return [evaluate(p.model, p.data, p.loss_fn, p.metric_name, p.device, p.amp,
                         self.eval_batch, train_split)]

    def lrs_changed(self) -> None:
        """Nothing to follow: the optimizer reads its own param_groups."""

    def end_epoch(self, epoch: int, going_on: Sequence[int], steps: Sequence[int],
                  runs: Sequence[Run]) -> None:
        """Save the checkpoint every `trainer.checkpoint.every` epochs, unless the run diverged."""
        if self.checkpoint is not None and going_on and epoch % self.every == 0:
            path, settings = self.checkpoint
            run, p = runs[0], self.parts
            states = {"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
                      "scheduler": self.schedule.scheduler.state_dict(),
                      "scaler": self.scaler.state_dict()}
            save_checkpoint(path, states, run_rngs(p.gen), epoch, steps[0], run.initial_loss,
                            run.result, settings)

    def keep(self, rows: Sequence[int]) -> None:
        raise AssertionError("a run alone never continues without itself")


def train(cfg: DictConfig, callback: Callback | None = None, tracker: Any = None,
          output_dir: str | Path | None = None, parts: Setup | None = None) -> TrainResult:
    """Train one model as the config says and return its result; `tracker` logs to MLflow.

    `parts`: what `setup(cfg)` built already (a caller that checks them before opening a run).
    """
    # 1. Check everything that can be checked, then build each part (still before any training).
    validate(cfg)
    t = cfg.trainer
    parts = parts if parts is not None else setup(cfg)
    schedule = build_scheduler(cfg.scheduler, parts.optimizer, parts.budget, parts.direction)
    out_dir = Path(output_dir) if output_dir is not None else default_output_dir()
    ckpt_path = Path(t.checkpoint.path) if t.checkpoint.path else out_dir / "checkpoint.pt"
    # Saved with each checkpoint, compared when resuming.
    engine = AloneEngine(cfg, parts, schedule,
                         (ckpt_path, resume_settings(cfg)) if t.checkpoint.every else None)
    result = TrainResult(status="completed", metric_name=parts.metric_name,
                         direction=parts.direction, run_id=getattr(tracker, "run_id", None),
                         device=describe_device(parts.device))
    run = Run(result, parts.optimizer, schedule, t.divergence_factor, tracker, callback)
    step, first_epoch = 0, 1
    if t.resume:
        step, first_epoch, run.initial_loss = load_checkpoint(
            read_checkpoint(cfg, parts), parts.model, parts.optimizer, schedule.scheduler,
            engine.scaler, parts.gen, result)

    train_runs(engine, [run], t, first_epoch, step)

    settle_status(result, parts.data, parts.loss_fn, engine.train_eval)
    run_folder.write(out_dir, result, ckpt_path if t.checkpoint.every and ckpt_path.exists()
                     else None, getattr(tracker, "name", None))
    return result
