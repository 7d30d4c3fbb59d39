"""Checkpoints of the one training loop: what `trainer.checkpoint.every` writes, what
`trainer.resume` reads back after checking that it continues this config's run, and the restore.

A checkpoint holds everything needed to continue as if never interrupted: the model, optimizer,
scheduler and AMP scaler states, every RNG, the history so far and the settings it trained with.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sweep.config import check_file, fail

if TYPE_CHECKING:  # for the annotations only: sweep.train imports this module
    from sweep.train import Setup, TrainResult

# What a checkpoint continues: the run it was saved from trained with these settings, and its
# state (the schedule's above all) only means the same thing with them. trainer.epochs may grow
# (train on); where the data files are read from does not change the run.
RESUME_KEYS = ("model", "dataset", "optimizer", "scheduler", "trainer.batch_size")
WHERE_ONLY = ("dataset.root", "dataset.archives", "dataset.download")
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step",
                   "initial_loss", "run_id", "history", "lr_trace", "best_metric", "best_epoch",
                   "skipped_steps")
A_CHECKPOINT = "the checkpoint.pt of an earlier run (one with trainer.checkpoint.every > 0)"


def resume_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the config that continues it, flattened."""
    flat: dict[str, Any] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}.{k}", v)
        elif key not in WHERE_ONLY:
            flat[key] = value

    for key in RESUME_KEYS:
        node = OmegaConf.select(cfg, key)
        walk(key, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node)
             else node)
    return flat


def save_checkpoint(path: Path, states: dict[str, Any], rng: dict[str, Any], epoch: int,
                    step: int, initial_loss: float | None, result: TrainResult,
                    settings: dict[str, Any] | None = None) -> None:
    """Everything needed to continue as if never interrupted, written atomically. `states`: the
    model's, optimizer's, scheduler's and scaler's `state_dict()`s; `rng`: `run_rngs`'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        **{key: states[key] for key in ("model", "optimizer", "scheduler", "scaler")},
        "rng": rng, "epoch": epoch, "step": step, "initial_loss": initial_loss,
        "run_id": result.run_id, "history": result.history, "lr_trace": result.lr_trace,
        "best_metric": result.best_metric, "best_epoch": result.best_epoch,
        "skipped_steps": result.skipped_steps, "initial": result.initial, "settings": settings,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a kill mid-write never leaves a truncated checkpoint


def run_rngs(gen: torch.Generator, dropout: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG a run draws from: `gen` (batch order, augmentation) and the global ones, where a
    run alone draws its dropout masks. `dropout`: a fused member's own generator for those, saved
    as the global RNG of its device that its run alone would hold."""
    rng = {"batches": gen.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
           "numpy": np.random.get_state(), "python": random.getstate()}
    if dropout is not None:
        if dropout.device.type == "cuda":
            rng["cuda"][dropout.device.index or 0] = dropout.get_state()
        else:
            rng["torch"] = dropout.get_state()
    return rng


def read_checkpoint(cfg: DictConfig, parts: Setup) -> dict[str, Any]:
    """The checkpoint `trainer.resume` names, once it is known to continue this config's run.

    Raises ConfigError naming `trainer.resume` (or `trainer.epochs`) for a file that is not a
    checkpoint, or one of a run with other settings, a different model or optimizer, or no
    epochs left to train. `sweep.__main__.run` calls it before it reopens the MLflow run.
    """
    path = str(cfg.trainer.resume)
    check_file("trainer.resume", path, A_CHECKPOINT)
    try:
        # Onto the CPU: RNG states must stay CPU byte tensors, and the model's and optimizer's
        # load_state_dict copy their tensors to wherever the parameters live.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, garbage, not a torch file at all
        reason = " ".join(str(err).split()).split(". ")[0][:120]  # its first sentence
        fail("trainer.resume", path, f"cannot be read as a checkpoint ({type(err).__name__}: "
             f"{reason}); give {A_CHECKPOINT}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else [
        "keys at all"]
    if missing:
        fail("trainer.resume", path, f"is not a checkpoint of sweep's trainer (it has no "
             f"{', '.join(missing)}); give {A_CHECKPOINT}")

    if cfg.trainer.epochs <= state["epoch"]:
        fail("trainer.epochs", cfg.trainer.epochs, f"the checkpoint trainer.resume={path!r} "
             f"already holds {state['epoch']} epochs, so nothing is left to train; set "
             f"trainer.epochs above {state['epoch']} to train on, or start afresh without "
             "trainer.resume")
    saved, here = state.get("settings") or {}, resume_settings(cfg)
    differ = [k for k in dict.fromkeys([*saved, *here]) if saved.get(k) != here.get(k)] if (
        saved) else []
    # Another optimizer (schedule, model) differs in every setting: its name says it all.
    differ = [k for k in differ if k.endswith("._target_")] or differ
    if differ:
        shown = "; ".join(f"{k}={saved.get(k)!r} there, {here.get(k)!r} here" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        fail("trainer.resume", path, f"it continues a run with other settings: {shown}{more}; "
             "resume with the settings it was saved with (the run's .hydra/overrides.yaml)")

    # What the checkpoint's tensors fit, for one saved without its settings.
    want, got = parts.model.state_dict(), state["model"]
    if not isinstance(got, dict) or set(want) != set(got) or any(
            getattr(got[k], "shape", None) != want[k].shape for k in want):
        fail("trainer.resume", path, "its model's weights do not fit this config's model; resume "
             "with the model it was saved with")
    ours = parts.optimizer.state_dict()["param_groups"]
    theirs = state["optimizer"].get("param_groups", []) if isinstance(
        state["optimizer"], dict) else []
    if len(ours) != len(theirs) or any(
            set(a) - {"initial_lr"} != set(b) - {"initial_lr"} or len(a["params"]) != len(
                b["params"]) for a, b in zip(ours, theirs, strict=False)):
        fail("trainer.resume", path, "its optimizer state is not "
             f"{type(parts.optimizer).__name__}'s over these parameter groups; resume with the "
             "optimizer it was saved with")
    return state


def load_checkpoint(state: dict[str, Any], model, optimizer, scheduler, scaler,
                    gen: torch.Generator, result: TrainResult) -> tuple[int, int, float | None]:
    """Restore what `save_checkpoint` wrote and `read_checkpoint` checked; returns (step, first
    epoch to run, initial loss)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])  # after the optimizer's, which it reads
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    gen.set_state(rng["batches"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    for key in ("history", "lr_trace", "best_metric", "best_epoch", "skipped_steps"):
        setattr(result, key, state[key])
    result.initial = state.get("initial", {})  # absent from checkpoints older than epoch 0's
    return state["step"], state["epoch"] + 1, state["initial_loss"]
