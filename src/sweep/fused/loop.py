"""The fused engine: `sweep.train.train_runs` (the one training loop) trains a group's members at
once through it, each member's step the one `train` takes alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from sweep import run_folder
from sweep.checkpoint import resume_settings, run_rngs, save_checkpoint
from sweep.config import validate
from sweep.data import Data, augment_batch, dataset_key, load_data
from sweep.fused.groups import fusable
from sweep.fused.model import StackedModel, fuse_models
from sweep.fused.optim import FusedOptimizer, LossScales
from sweep.models import model_factory
from sweep.optim import build_optimizer
from sweep.schedules import Budget, build_scheduler
from sweep.train import (
    Callback,
    Run,
    Setup,
    Step,
    TrainResult,
    describe_device,
    loss_and_metric,
    loss_name,
    pick_amp,
    pick_device,
    seed_everything,
    settle_status,
    train_runs,
)


def member_parts(cfgs: Sequence[DictConfig]) -> list[Setup]:
    """What `sweep.train.setup` builds for each config; a dataset that several members share
    (the same config, its seed included) is loaded once."""
    t = cfgs[0].trainer
    device = pick_device(t.device)
    loaded: dict[str, Data] = {}
    parts = []
    make_model = None  # the members share one model config, sized alike
    for cfg in cfgs:
        key = dataset_key(cfg.dataset)
        if key not in loaded:
            loaded[key] = load_data(cfg.dataset)
        data = loaded[key]
        if data.nbytes > t.device_data_max_mb * 2**20:
            raise ValueError(f"fused training batches on the device, and {data.name} is larger "
                             f"than trainer.device_data_max_mb={t.device_data_max_mb}")
        loss_fn, metric_name, direction = loss_and_metric(cfg, data.task, data.name)
        make_model = make_model or model_factory(cfg.model, data)
        # As `setup` does: each member's weights are drawn right after its own seed is set.
        seed_everything(cfg.seed, t.deterministic)
        model = make_model().to(device)
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
    name = loss_name(t, data.task)
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


class FusedEngine:
    """The runs of one `fusable` group as one `StackedModel` with one `FusedOptimizer`: the
    engine `sweep.train.train_runs` trains them with. Each member keeps its own `torch.optim`
    optimizer (the view its scheduler steps and its lrs are read from) and its own generator,
    from which it draws its batch order and augmentation as `train` draws them alone."""

    def __init__(self, cfg: DictConfig, parts: Sequence[Setup], schedules: Sequence[Any],
                 checkpoints: Sequence[tuple[Path, dict[str, Any]]] | None = None):
        t, first = cfg.trainer, parts[0]
        self.parts, self.device, self.data = list(parts), first.device, first.data
        # Each member's (checkpoint path, settings), saved every `trainer.checkpoint.every`.
        self.checkpoints, self.every = checkpoints, t.checkpoint.every
        self.loss_name, self.member_losses = member_loss(cfg, first.data)
        self.metric_name = first.metric_name
        self.views = [p.optimizer for p in parts]
        for view in self.views:
            # Nothing has a gradient, so this changes nothing; it tells the schedulers that
            # their optimizer has stepped (else PyTorch warns that they step first).
            view.step()
        self.rngs = [p.rng or global_rng(self.device) for p in parts]  # dropout masks
        self.model = fuse_models([p.model for p in parts], self.rngs, first.amp)
        # fp16 keeps small gradients representable by loss scaling, each member its own scale.
        self.fp16 = first.amp == torch.float16
        self.scales = LossScales(len(parts), self.device) if self.fp16 else None
        names = {id(p): k for k, p in first.model.named_parameters()}
        self.opt = FusedOptimizer(self.model.flat, self.views, [
            self.model.columns([names[id(p)] for p in g["params"]])
            for g in self.views[0].param_groups])
        # OneCycleLR and CyclicLR may move momentum or betas along with the lr.
        self.cycles = any(getattr(s.scheduler, "cycle_momentum", False) for s in schedules)
        self.active = list(range(len(parts)))  # the members still training, in row order
        self.batch_size, self.clip_mode, self.clip_max = t.batch_size, t.clip.mode, t.clip.max
        self.eval_batch = eval_rows(first.model, first.data.in_shape, len(parts), t.batch_size)
        self.train_eval = t.train_eval_loss is True or t.train_eval_loss == "auto"  # on device
        self.split = stack_data(parts)
        self.n_train = self.split["x_train"].shape[1]
        # One member's epoch of samples: gathered at once where the members' copy is small.
        self.epoch_bytes = sum(self.split[k][0].nbytes for k in ("x_train", "y_train"))

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(members, batch, ...) batches: each member's samples in its own order, as
        `tensor_batches` draws it, with its own crops and flips."""
        split, parts, active = self.split, self.parts, self.active
        perm = torch.stack([torch.randperm(self.n_train, generator=parts[i].gen)
                            for i in active]).to(self.device)
        who = torch.arange(len(active), device=self.device).unsqueeze(1)  # row i: member i's
        whole = len(active) * self.epoch_bytes <= EPOCH_GATHER_BYTES
        if whole:
            x_epoch, y_epoch = split["x_train"][who, perm], split["y_train"][who, perm]
        augment = self.data.augment  # the same settings for every member (one dataset config)
        for start in range(0, self.n_train, self.batch_size):
            if whole:
                end = start + self.batch_size
                xb, yb = x_epoch[:, start:end], y_epoch[:, start:end]
            else:
                rows = perm[:, start:start + self.batch_size]
                xb, yb = split["x_train"][who, rows], split["y_train"][who, rows]
            if augment:
                xb = torch.stack([augment_batch(xb[j], generator=parts[i].gen, **augment)
                                  for j, i in enumerate(active)])
            yield xb, yb

    def step(self, xb: Tensor, yb: Tensor, sample_norm: bool) -> Step:
        model, scales = self.model, self.scales
        loss = self.member_losses(model.forward(xb, training=True), yb)
        # The sum's gradient in a member's weights is that member's own loss's gradient.
        total = loss.sum() if scales is None else scales.scaled(loss)
        grad = model.flat_grads(torch.autograd.grad(total, model.params))
        found_inf = None if scales is None else scales.unscale_(grad)  # true gradients
        total = None
        if sample_norm or self.clip_mode == "norm":
            total = grad.norm(dim=1)  # each member's norm over all its parameters
        if self.clip_mode == "norm":  # as clip_grad_norm_: scale by max / (norm + 1e-6), <= 1
            grad.mul_((self.clip_max / (total + 1e-6)).clamp(max=1.0).unsqueeze(1))
        elif self.clip_mode == "value":
            grad.clamp_(-self.clip_max, self.clip_max)
        skipped = None
        if found_inf is not None:
            scales.update(found_inf)
            skipped = found_inf.tolist()  # one host sync a step, as `GradScaler.step` alone
            if not any(skipped):
                skipped = None
        self.opt.step(model.flat, grad, None if skipped is None else ~found_inf.unsqueeze(1))
        return Step(loss.detach(), total if sample_norm else None, skipped)

    def evaluate(self, train_split: bool) -> list[dict[str, float]]:
        return evaluate(self.model, self.split, self.loss_name, self.member_losses,
                        self.metric_name, self.eval_batch, train_split)

    def lrs_changed(self) -> None:
        self.opt.refresh(everything=self.cycles)

    def end_epoch(self, epoch: int, going_on: Sequence[int], steps: Sequence[int],
                  runs: Sequence[Run]) -> None:
        """Every `trainer.checkpoint.every` epochs, each member going on saves the checkpoint its
        run alone saves (its weights, optimizer, schedule, scaler and RNGs as that run holds
        them), so `trainer.resume` continues it alone."""
        if self.checkpoints is None or not going_on or epoch % self.every:
            return
        for i, step in zip(going_on, steps, strict=True):
            row, part, run = self.active.index(i), self.parts[i], runs[i]
            path, settings = self.checkpoints[i]
            states = {
                # Its BatchNorms counted every batch it trained on, skipped steps' too.
                "model": self.model.member_state(row, part.model,
                                                 step + run.result.skipped_steps),
                "optimizer": self.opt.member_state_dict(
                    row, lambda values, model=part.model: self.model.shaped(values, model)),
                "scheduler": run.schedule.scheduler.state_dict(),
                "scaler": self.scaler_state(row)}
            save_checkpoint(path, states, run_rngs(part.gen, self.rngs[i]), epoch, step,
                            run.initial_loss, run.result, settings)

    def scaler_state(self, row: int) -> dict[str, Any]:
        """The `GradScaler.state_dict()` of member `row`'s run alone ({} without fp16)."""
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.fp16)
        state = scaler.state_dict()
        if self.scales is not None:
            state["scale"] = float(self.scales.scale[row].item())
            state["_growth_tracker"] = int(self.scales.tracker[row].item())
        return state

    def keep(self, rows: Sequence[int]) -> None:
        """Only these members (positions in `active`) train on."""
        index = torch.tensor(list(rows), device=self.device)
        self.model.keep(index)
        self.opt.keep(index)
        if self.scales is not None:
            self.scales.keep(index)
        # Shared data stays one view (stride 0 over the members); members' own is selected.
        self.split = {k: v[:len(rows)] if v.stride(0) == 0 else v.index_select(0, index)
                      for k, v in self.split.items()}
        self.active = [self.active[j] for j in rows]


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
    for cfg in cfgs:
        validate(cfg)
    groups, reasons = fusable(cfgs)
    if reasons or len(groups) != 1:
        why = "; ".join(f"config {i}: {r}" for i, r in reasons.items()) or (
            f"they form {len(groups)} groups of shared settings, not one")
        raise ValueError(f"these configs cannot train fused: {why}")
    n = len(cfgs)
    parts = list(parts) if parts is not None else member_parts(cfgs)
    if not parts[0].on_device:
        raise ValueError("fused training batches on the device: the data must be there")
    callbacks = list(callbacks) if callbacks is not None else [None] * n
    trackers = list(trackers) if trackers is not None else [None] * n
    schedules = [build_scheduler(cfg.scheduler, p.optimizer, p.budget, p.direction)
                 for cfg, p in zip(cfgs, parts, strict=True)]
    out_dirs = list(output_dirs) if output_dirs is not None else [None] * n
    checkpoints = None
    if cfgs[0].trainer.checkpoint.every:  # each member's in its own folder, as alone
        if any(d is None for d in out_dirs):
            raise ValueError("fused checkpoints go into each member's folder: give output_dirs")
        checkpoints = [(Path(d) / "checkpoint.pt", resume_settings(cfg))
                       for d, cfg in zip(out_dirs, cfgs, strict=True)]
    engine = FusedEngine(cfgs[0], parts, schedules, checkpoints)
    device = f"{describe_device(parts[0].device)}, {n} runs fused"
    # Each member's seconds are the group's: the device is shared n ways.
    runs = [Run(TrainResult(status="completed", metric_name=p.metric_name, direction=p.direction,
                            run_id=getattr(tracker, "run_id", None), device=device, fused=n),
                p.optimizer, schedule, cfg.trainer.divergence_factor, tracker, callback)
            for cfg, p, schedule, tracker, callback in zip(cfgs, parts, schedules, trackers,
                                                           callbacks, strict=True)]

    train_runs(engine, runs, cfgs[0].trainer, desc=f"epochs, {n} fused")

    for k, (run, part, out_dir) in enumerate(zip(runs, parts, out_dirs, strict=True)):
        settle_status(run.result, part.data, part.loss_fn, engine.train_eval)
        if out_dir is not None:
            saved = checkpoints[k][0] if checkpoints and checkpoints[k][0].exists() else None
            run_folder.write(out_dir, run.result, saved, getattr(run.tracker, "name", None))
    return [run.result for run in runs]
