"""Which configs can train together: same model, data and trainer; each member its own
optimizer values, schedule and seed."""

from __future__ import annotations

import json
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from sweep.train import pick_device

# Fused layer by layer (`LayerFusedModel`), and by module surgery (`TreeFusedModel`, only for
# trees known to mix no channels but through the layers it swaps).
LAYER_MODELS = ("sweep.models.mlp", "sweep.models.cnn")
TREE_MODELS = ("sweep.models.resnet18",)
MODELS = (*LAYER_MODELS, *TREE_MODELS)
# The update rule each optimizer follows: Adam and AdamW members train together (each member's
# `decoupled_weight_decay` says which it is).
OPTIMIZERS = {"torch.optim.SGD": "sgd", "torch.optim.Adam": "adam", "torch.optim.AdamW": "adam",
              "torch.optim.RMSprop": "rmsprop", "torch.optim.Adagrad": "adagrad"}
# Trainer settings each member may have its own of; every other one shapes the shared loop.
PER_MEMBER_TRAINER = ("divergence_factor", "progress")


def fusable(configs: Sequence[DictConfig], max_size: int | None = None
            ) -> tuple[list[list[int]], dict[int, str]]:
    """Split configs into groups that can train fused (indices, in order, at most `max_size`
    each), and say why each of the others cannot, for a caller that trains those one at a time.

    A group shares the model, dataset and trainer settings (epochs, batch size, device, loss,
    clipping, ...), the optimizer's update rule (Adam and AdamW share one) and parameter-group
    patterns; its members may differ in every optimizer value, the schedule and its settings,
    warmup, and seed (and with it the dataset's seed: its own split, of the same sizes).
    """
    groups: dict[str, list[int]] = {}
    reasons: dict[int, str] = {}
    for i, cfg in enumerate(configs):
        reason = why_not(cfg)
        if reason is not None:
            reasons[i] = reason
            continue
        groups.setdefault(_key(cfg), []).append(i)
    size = max_size or max((len(g) for g in groups.values()), default=1)
    return [g[k:k + size] for g in groups.values() for k in range(0, len(g), size)], reasons


def why_not(cfg: DictConfig) -> str | None:
    """Why this config cannot train fused (one line), or None when it can."""
    t, opt = cfg.trainer, cfg.optimizer
    if cfg.model.get("_target_") not in MODELS:
        return (f"model {cfg.model.get('_target_')} does not fuse yet (the MLP family, the CNN "
                "and ResNet-18 do)")
    if opt.get("_target_") not in OPTIMIZERS:
        return (f"optimizer {opt.get('_target_')} does not fuse yet (SGD, Adam, AdamW, RMSprop "
                "and Adagrad do)")
    for flag in ("amsgrad", "maximize"):
        if opt.get(flag):
            return f"optimizer.{flag}=true does not fuse yet"
    if t.resume is not None:
        return "trainer.resume continues one run: it trains alone"
    if t.checkpoint.every and t.checkpoint.path is not None:
        # Fused, each member saves its checkpoint.pt in its own folder.
        return "trainer.checkpoint.path names one run's file: it trains alone"
    return None


def slower_fused(cfg: DictConfig) -> str | None:
    """Why fusing this config would train it slower than alone (one line), or None: `fuse=auto`
    trains such a config alone, an explicit `fuse=<n>` fuses it anyway."""
    target = cfg.model.get("_target_")
    if target in TREE_MODELS and pick_device(cfg.trainer.device).type == "cpu":
        # Measured (docs/benchmarks.md): on the 2-core development CPU, fused ResNet-18s train
        # slower than one after another (its grouped convolutions are slower there than one
        # convolution per member); on a GPU they pay.
        return (f"model {target} fuses by grouped convolutions, which on a CPU train slower than "
                "one at a time (fuse=<n> fuses it anyway)")
    return None


def _key(cfg: DictConfig) -> str:
    """What every member of a group shares, as text."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in PER_MEMBER_TRAINER:
        trainer.pop(key, None)
    rules = [{k: v for k, v in rule.items() if k in ("pattern", "name")}
             for rule in OmegaConf.to_container(cfg.optimizer, resolve=True).get(
                 "param_groups") or []]
    # A member's seed may choose its own split and noise (`dataset.seed: ${seed}`): its own data,
    # of the same sizes.
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset.pop("seed", None)
    shared = {"model": OmegaConf.to_container(cfg.model, resolve=True), "dataset": dataset,
              "trainer": trainer, "optimizer": [OPTIMIZERS[cfg.optimizer._target_], rules]}
    return json.dumps(shared, sort_keys=True, default=str)
