"""Fused trials: many compatible runs of one model trained at once, each exactly as it trains alone.

A sweep is many small trainings of one architecture (the BN study's 80 width-4 MLPs, a study's
schedules x seeds). Alone, each keeps a CPU core busy with Python and kernel launches, or leaves a
GPU nearly idle. Fused, N members are one wider model (HFTA, Wang et al., MLSys 2021): one batched
matmul per Linear layer, BatchNorm over the members' channels, and one optimizer step over a
(members, numel) tensor whose hyperparameters are per-member rows.

The modules, in reading order:
- `groups`: `fusable(configs, max_size)` -> (groups of indices, {index: why not}); what a group
  shares (model, dataset, trainer, the optimizer's update rule and parameter-group patterns) and
  what its members may differ in (every optimizer value, schedule and its knobs, warmup, seed);
- `model`: `fuse_models` -> a `StackedModel`: `LayerFusedModel` for the members' `nn.Sequential`s
  (the MLP family with BatchNorm1d `bn: none | pre | post`, each member's running statistics its
  own channels; the CNN, its convolutions one grouped convolution, its dropout masks each
  member's own, drawn as its run alone draws them), `TreeFusedModel` for ResNet-18 (a copy of
  its module tree with every layer swapped for its fused twin);
- `optim`: `FusedOptimizer`, PyTorch's SGD (momentum, dampening, nesterov, weight decay),
  Adam/AdamW, RMSprop (momentum, centered) and Adagrad update rules on the stacked weights, each
  member's values read from its own `torch.optim` optimizer, which its own scheduler (the same
  torch class as alone) steps;
- `loop`: `FusedEngine`, the group's batches, fused step, evaluation and stopped members, which
  `sweep.train.train_runs` (the one training loop) trains; `train_fused(cfgs, callbacks,
  trackers, output_dirs)` -> one `TrainResult` per config, and `member_parts(cfgs)`, the
  members' `Setup`s over data loaded once;
- `runs`: what commands call: `groups(cfgs, fuse)` plans which runs train together (the `fuse`
  setting; one log line for what cannot), and `train_group` trains one group, fused or alone.

Each member draws its initial weights after its own seed, and its batch order from its own
generator, as `sweep.train.setup` does; a member that diverges, or whose callback (an Optuna
pruner) stops it, leaves the fused rows and the others train on.

Why batched matmuls and not `torch.func.vmap`: both were measured on the development machine's
2-core CPU before choosing (a prototype: vmap took 2.5x the time without BatchNorm, 3.4x with it),
and again by `python scripts/bench_fused.py --engines` (16 members of the article's 3 x 4 tanh
MLP, batch 50, forward, backward and the same SGD update, one torch thread, medians of 5 x 200
steps): vmap over `functional_call` with stacked module state 1.35 ms a step, batched matmuls
0.34 ms (3.97x); with BatchNorm before the activation 2.38 ms against 0.64 ms (3.74x). vmap adds
its own dispatch to every op, and BatchNorm under it needs every member's statistics as batched
buffers updated in place; `bmm` is one kernel per layer, and BatchNorm over (batch, members x
features) is PyTorch's own kernel, which gives each member its own statistics exactly. The flat
(members, numel) weights make the optimizer step a handful of ops whatever the depth.

For ResNet-18 on a GPU the same holds (`docs/benchmarks.md`: a training step of 8 took 48 ms
vmapped, 22-24 ms fused by hand); on a CPU fused ResNets train slower than alone, so `fuse=auto`
trains them alone there.

Under fp16 each member has its own loss scale (`optim.LossScales`, its run alone's
`GradScaler` arithmetic on a row of scales): a member whose gradients overflow skips its step,
its schedule holds, and the others step.

With `trainer.checkpoint.every` each member saves its run alone's checkpoint into its own
folder (`FusedEngine.end_epoch`: `StackedModel.member_state`, `FusedOptimizer.member_state_dict`
in `torch.optim`'s format), so `trainer.resume` continues it alone. What does not fuse
(`trainer.resume`, an explicit `trainer.checkpoint.path`, ...): `fusable` gives those configs a
reason, and callers train them alone (`runs.groups` says so in one log line).
"""

from sweep.fused.groups import fusable, why_not
from sweep.fused.loop import member_parts, train_fused
from sweep.fused.runs import fuse_size, groups, train_group

__all__ = ["fusable", "fuse_size", "groups", "member_parts", "train_fused", "train_group",
           "why_not"]
