"""Training members at once: the steps of `sweep.train.train`, each one fused over the members."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from tqdm.auto import tqdm

from sweep import run_folder
from sweep.config import validate
from sweep.data import Data, augment_batch, dataset_key, load_data
from sweep.fused.groups import fusable
from sweep.fused.model import StackedModel, fuse_models
from sweep.fused.optim import FusedOptimizer
from sweep.models import build_model
from sweep.optim import build_optimizer
from sweep.schedules import Budget, build_scheduler
from sweep.train import (
    Callback,
    Setup,
    TrainResult,
    describe_device,
    diverged,
    group_lrs,
    loss_and_metric,
    pick_amp,
    pick_device,
    record_epoch,
    seed_everything,
    settle_status,
)


def member_parts(cfgs: Sequence[DictConfig]) -> list[Setup]:
    """What `sweep.train.setup` builds for each config; a dataset that several members share
    (the same config, its seed included) is loaded once."""
    t = cfgs[0].trainer
    device = pick_device(t.device)
    loaded: dict[str, Data] = {}
    parts = []
    for cfg in cfgs:
        key = dataset_key(cfg.dataset)
        if key not in loaded:
            loaded[key] = load_data(cfg.dataset)
        data = loaded[key]
        if data.nbytes > t.device_data_max_mb * 2**20:
            raise ValueError(f"fused training batches on the device, and {data.name} is larger "
                             f"than trainer.device_data_max_mb={t.device_data_max_mb}")
        loss_fn, metric_name, direction = loss_and_metric(cfg, data.task, data.name)
        # As `setup` does: each member's weights are drawn right after its own seed is set.
        seed_everything(cfg.seed, t.deterministic)
        model = build_model(cfg.model, data).to(device)
        budget = Budget(epochs=t.epochs, steps_per_epoch=data.steps_per_epoch(t.batch_size))
        parts.append(Setup(device, data, True, model, build_optimizer(cfg.optimizer, model),
                           loss_fn, metric_name, direction, budget, pick_amp(t.amp, device),
                           torch.Generator().manual_seed(cfg.seed), global_rng(device)))
    moved = {id(data): data.to(device) for data in loaded.values()}
    for part in parts:
        part.data = moved[id(part.data)]
    return parts


def global_rng(device: torch.device) -> torch.Generator:
    """A generator at the state of the global one on `device`: what a model alone on that device
    would draw from next."""
    rng = torch.Generator(device=device)
    rng.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else
                  torch.get_rng_state())
    return rng


# A run alone evaluates 1024 samples at once: for the digits CNN, whose widest activation is 4096
# numbers a sample, 2**22 numbers. Fused members evaluate as many samples together as keep that
# size; 16 CNNs at 1024 samples each took 1.7x the time of 64 each (page-sized activations).
EVAL_NUMBERS = 2**22


@torch.no_grad()
def eval_rows(model: torch.nn.Module, in_shape: Sequence[int], members: int,
              batch_size: int) -> int:
    """Samples per member in one evaluation batch: up to 1024 (as `train`), fewer where the
    members' activations together would outgrow EVAL_NUMBERS, never fewer than a training batch.
    The widest activation is the largest output of any of the model's leaf modules."""
    widest = 0

    def measure(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        nonlocal widest
        if isinstance(output, Tensor):
            widest = max(widest, output[0].numel())

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(measure) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        weight = next(model.parameters())
        model(torch.zeros(1, *in_shape, dtype=weight.dtype, device=weight.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return max(batch_size, min(1024, EVAL_NUMBERS // (members * max(widest, 1))))


SPLITS = ("x_train", "y_train", "x_val", "y_val")
# Above this size the members' epoch of samples is gathered batch by batch, not at once: one copy
# of MNIST's training split per member would be 188 MB each.
EPOCH_GATHER_BYTES = 256 * 2**20


def stack_data(parts: Sequence[Setup]) -> dict[str, Tensor]:
    """Each member's splits side by side, (members, samples, ...): a member's seed may give it
    its own split of the data (`dataset.seed: ${seed}`), of the same sizes. Members that share
    one dataset share its memory too (an expanded view, not copies)."""
    if all(p.data is parts[0].data for p in parts):
        return {k: getattr(parts[0].data, k).unsqueeze(0).expand(len(parts), *getattr(
            parts[0].data, k).shape) for k in SPLITS}
    try:
        return {k: torch.stack([getattr(p.data, k) for p in parts]) for k in SPLITS}
    except RuntimeError as err:
        raise ValueError(f"the members' datasets differ in size: {err}") from err


def member_loss(cfg: DictConfig, data: Data) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    """The loss `loss_and_metric` picks, as a function of (members, batch, outputs) outputs and
    targets giving each member's mean over its batch: (members,)."""
    t = cfg.trainer
    name = t.loss if t.loss != "auto" else (
        "cross_entropy" if data.task == "classification" else "mse")
    # Plain values: a DictConfig lookup a step costs more than the step's arithmetic.
    smoothing, delta = float(t.label_smoothing), float(t.huber_delta)
    if name == "cross_entropy":
        def loss(out: Tensor, y: Tensor) -> Tensor:
            each = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none",
                                   label_smoothing=smoothing)
            return each.view(out.shape[:2]).mean(1)
    elif name == "huber":
        def loss(out: Tensor, y: Tensor) -> Tensor:
            return F.huber_loss(out, y, reduction="none", delta=delta).mean((1, 2))
    else:
        def loss(out: Tensor, y: Tensor) -> Tensor:
            return F.mse_loss(out, y, reduction="none").mean((1, 2))
    return name, loss


@torch.no_grad()
def evaluate(model: StackedModel, split: dict[str, Tensor], loss_name: str, member_losses: Callable,
             metric_name: str, batch_size: int, train_split: bool) -> list[dict[str, float]]:
    """Each member's validation loss and metric (and with `train_split` its loss over the whole
    training split), in eval mode, as `sweep.train.evaluate` computes them."""

    def sums(x: Tensor, y: Tensor, metric: str | None) -> Tensor:
        per_batch = []  # (members,) each: loss * batch size, then the metric's sum
        for start in range(0, x.shape[1], batch_size):
            xb, yb = x[:, start:start + batch_size], y[:, start:start + batch_size]
            out = model.forward(xb, training=False)
            loss = member_losses(out, yb) * xb.shape[1]
            per_batch.append(loss)
            if metric == "val_acc":
                per_batch.append((out.argmax(-1) == yb).sum(1).to(loss.dtype))
            elif metric is not None:
                per_batch.append(F.mse_loss(out, yb, reduction="none").flatten(1).sum(1)
                                 / out.shape[2:].numel())
        width = 1 if metric is None else 2
        return torch.stack(per_batch).view(-1, width, len(x)).sum(0) / x.shape[1]

    metric_is_loss = loss_name == "mse"  # then val_mse is val_loss: computed once
    splits = [sums(split["x_val"], split["y_val"], None if metric_is_loss else metric_name)]
    if train_split:
        splits.append(sums(split["x_train"], split["y_train"], None))
    rows = torch.cat(splits).T.tolist()  # one host sync: a row of values per member
    out = []
    for values in rows:
        metrics = {"val_loss": values[0], metric_name: values[0 if metric_is_loss else 1]}
        if train_split:
            metrics["train_eval_loss"] = values[-1]
        out.append(metrics)
    return out


def train_fused(cfgs: Sequence[DictConfig], callbacks: Sequence[Callback | None] | None = None,
                trackers: Sequence[Any] | None = None,
                parts: Sequence[Setup] | None = None,
                output_dirs: Sequence[str | Path | None] | None = None) -> list[TrainResult]:
    """Train the configs of one `fusable` group at once; each gets the `TrainResult` that
    `train(cfg)` returns for it alone.

    `callbacks[i]` and `trackers[i]` are member i's, called as `train` calls its own: a truthy
    callback stops that member (`stopped`), and a member that diverges stops (`diverged`), while
    the others train on. `parts`: what `member_parts(cfgs)` would build (each member's `Setup`,
    its data on the device, of the same sizes as the others'); a test builds them in float64.
    `output_dirs[i]`: member i's run folder, which gets its metrics.csv and result.json as
    `train` writes them (none written where None).
    """
    # 1. Check, then build every member as its own run would, and fuse them.
    for cfg in cfgs:
        validate(cfg)
    groups, reasons = fusable(cfgs)
    if reasons or len(groups) != 1:
        why = "; ".join(f"config {i}: {r}" for i, r in reasons.items()) or (
            f"they form {len(groups)} groups of shared settings, not one")
        raise ValueError(f"these configs cannot train fused: {why}")
    n = len(cfgs)
    parts = list(parts) if parts is not None else member_parts(cfgs)
    callbacks = list(callbacks) if callbacks is not None else [None] * n
    trackers = list(trackers) if trackers is not None else [None] * n
    cfg0, first = cfgs[0], parts[0]
    t, data, device = cfg0.trainer, first.data, first.device
    if not first.on_device:
        raise ValueError("fused training batches on the device: the data must be there")
    metric_name, direction = first.metric_name, first.direction
    loss_name, member_losses = member_loss(cfg0, data)
    views = [p.optimizer for p in parts]
    schedules = [build_scheduler(cfg.scheduler, p.optimizer, p.budget, p.direction)
                 for cfg, p in zip(cfgs, parts, strict=True)]
    for view in views:
        # Nothing has a gradient, so this changes nothing; it tells the schedulers that their
        # optimizer has stepped (else PyTorch warns that they step first).
        view.step()
    model = fuse_models([p.model for p in parts],
                        [p.rng or global_rng(device) for p in parts], first.amp)
    names = {id(p): k for k, p in first.model.named_parameters()}
    opt = FusedOptimizer(model.flat, views, [model.columns([names[id(p)] for p in g["params"]])
                                             for g in views[0].param_groups])
    # OneCycleLR and CyclicLR may move momentum or betas along with the lr.
    cycles = any(getattr(s.scheduler, "cycle_momentum", False) for s in schedules)
    per_step = [i for i, s in enumerate(schedules) if s.interval == "step"]
    group_names = [[g.get("name", "default") for g in view.param_groups] for view in views]

    results = [TrainResult(status="completed", metric_name=metric_name, direction=direction,
                           run_id=getattr(tracker, "run_id", None),
                           # Its seconds are the group's: the device is shared n ways.
                           device=f"{describe_device(device)}, {n} runs fused", fused=n)
               for tracker in trackers]
    active = list(range(n))  # the members still training, in the order of the fused rows
    initial_loss: list[float] = []  # each member's first batch loss, in `cfgs` order
    step = 0
    batch_size, norm_every = t.batch_size, t.grad_norm_every
    eval_batch = eval_rows(first.model, data.in_shape, n, batch_size)
    divergence_factor = [cfg.trainer.divergence_factor for cfg in cfgs]
    clip_mode, clip_max = t.clip.mode, t.clip.max
    log_every = t.log_every_n_steps if any(tr is not None for tr in trackers) else 0
    split = stack_data(parts)
    n_train = split["x_train"].shape[1]
    epoch_bytes = sum(split[k][0].nbytes for k in ("x_train", "y_train"))  # one member's epoch
    augment = data.augment  # the same settings for every member (one dataset config)
    # As `train`: the loss over the training split in eval mode, and epoch 0 before any step.
    train_eval = t.train_eval_loss is True or t.train_eval_loss == "auto"  # data on the device
    initials = evaluate(model, split, loss_name, member_losses, metric_name, eval_batch,
                         train_eval)
    for i, initial in enumerate(initials):
        results[i].initial = initial
        if trackers[i] is not None and train_eval:
            trackers[i].log_epoch(0, {"train_eval_loss": initial["train_eval_loss"]})

    bar = tqdm(range(1, t.epochs + 1), desc=f"epochs, {n} fused", disable=not t.progress,
               dynamic_ncols=True)
    for epoch in bar:
        # 2. One pass over the training data, each member in its own order.
        started = time.perf_counter()
        epoch_lrs = [group_lrs(views[i]) for i in active]
        applied = [tuple(g["lr"] for g in views[i].param_groups) for i in active]
        losses: list[Tensor] = []  # (members,) a step, read back once at the epoch's end
        norms: list[Tensor] = []  # sampled steps' total gradient norms, before clipping
        trace: list[tuple[int, list[tuple[float, ...]]]] = []  # (step, each member's lrs)
        # Each member's permutation from its own generator, as `tensor_batches` draws it.
        perm = torch.stack([torch.randperm(n_train, generator=parts[i].gen)
                            for i in active]).to(device)
        who = torch.arange(len(active), device=device).unsqueeze(1)  # row i: member i's samples
        # The epoch's samples in each member's order, gathered once where that copy is small;
        # batches are slices of it. Else each batch is gathered on its own.
        whole = len(active) * epoch_bytes <= EPOCH_GATHER_BYTES
        if whole:
            x_epoch, y_epoch = split["x_train"][who, perm], split["y_train"][who, perm]
        for start in range(0, n_train, batch_size):
            if whole:
                xb, yb = x_epoch[:, start:start + batch_size], y_epoch[:, start:start + batch_size]
            else:
                rows = perm[:, start:start + batch_size]
                xb, yb = split["x_train"][who, rows], split["y_train"][who, rows]
            if augment:  # each member's crops and flips from its own generator, as alone
                xb = torch.stack([augment_batch(xb[j], generator=parts[i].gen, **augment)
                                  for j, i in enumerate(active)])
            loss = member_losses(model.forward(xb, training=True), yb)
            # The sum's gradient in a member's weights is that member's own loss's gradient.
            grad = model.flat_grads(torch.autograd.grad(loss.sum(), model.params))
            sample = norm_every and len(losses) % norm_every == 0
            if sample or clip_mode == "norm":
                total = grad.norm(dim=1)  # each member's norm over all its parameters
                if sample:
                    norms.append(total)
            if clip_mode == "norm":  # as clip_grad_norm_: scale by max / (norm + 1e-6), at most 1
                grad.mul_((clip_max / (total + 1e-6)).clamp(max=1.0).unsqueeze(1))
            elif clip_mode == "value":
                grad.clamp_(-clip_max, clip_max)
            trace.append((step, applied))
            opt.step(model.flat, grad)
            step += 1
            if per_step:
                for i in per_step:
                    schedules[i].scheduler.step()
                opt.refresh(everything=cycles)
                applied = [tuple(g["lr"] for g in views[i].param_groups) for i in active]
            losses.append(loss.detach())
            if not initial_loss:
                initial_loss = loss.tolist()  # each member's reference for "far above"
            if log_every and step % log_every == 0:
                step_losses = loss.tolist()
                for j, i in enumerate(active):
                    if trackers[i] is not None:
                        lrs = {f"step_{k}": v for k, v in group_lrs(views[i]).items()}
                        trackers[i].log_step(step, {"step_loss": step_losses[j], **lrs})

        # 3. Evaluate; then each member steps its epoch schedule, records, and may stop.
        step_losses = torch.stack(losses).T.tolist()  # one host sync an epoch
        sampled = torch.stack(norms).T.tolist() if norms else [[] for _ in active]
        evaluated = evaluate(model, split, loss_name, member_losses, metric_name, eval_batch,
                             train_eval)
        elapsed = time.perf_counter() - started  # the fused epoch's, shared by its members
        keep = []
        for j, i in enumerate(active):
            result, schedule = results[i], schedules[i]
            result.lr_trace += [{"step": k, "epoch": epoch, "group": group, "lr": lr}
                                for k, lrs in trace
                                for group, lr in zip(group_names[i], lrs[j], strict=True)]
            train_loss = sum(step_losses[j]) / len(step_losses[j])
            metrics = {"epoch": epoch, "train_loss": train_loss, **evaluated[j], **epoch_lrs[j]}
            if sampled[j]:
                metrics["grad_norm"] = math.sqrt(sum(v * v for v in sampled[j]) / len(sampled[j]))
            metrics["epoch_time"] = elapsed
            record_epoch(result, metrics, schedule, trackers[i])
            # 4. A member that diverged, or that its callback stops, leaves the fused rows.
            if diverged(metrics, initial_loss[i], divergence_factor[i]):
                result.status = "diverged"
            elif callbacks[i] is not None and callbacks[i](epoch, metrics):
                result.status = "stopped"
            else:
                keep.append(j)
        if len(keep) < len(active):
            if not keep:
                break
            rows = torch.tensor(keep, device=device)
            model.keep(rows)
            opt.keep(rows)
            # Shared data stays one view (stride 0 over the members); members' own is selected.
            split = {k: v[:len(keep)] if v.stride(0) == 0 else v.index_select(0, rows)
                     for k, v in split.items()}
            active = [active[j] for j in keep]
            per_step = [i for i in per_step if i in active]
        else:
            opt.refresh(everything=cycles)
    bar.close()
    out_dirs = list(output_dirs) if output_dirs is not None else [None] * n
    for result, part, tracker, out_dir in zip(results, parts, trackers, out_dirs, strict=True):
        settle_status(result, part.data, part.loss_fn, train_eval)
        if out_dir is not None:
            run_folder.write(out_dir, result, None, getattr(tracker, "name", None))
    return results
