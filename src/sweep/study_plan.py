"""What every worker of a study needs, derived once from the command line, and the overrides a
trial adds to it.

A `Plan` is plain data (picklable): a local worker process, a Ray task on another machine and the
process that started them all read the same one. Nothing in it is state another process needs to
see; that lives in the Optuna storage (`sweep.study_storage`).
"""

from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweep.config import override_key


@dataclass
class Plan:
    """The study as every worker sees it."""

    argv: list[str]                        # the command's Hydra overrides, as typed
    settings: dict[str, Any]               # cfg.study, resolved
    spaces: dict[str, dict[str, dict]]     # schedule -> {dotted config key: search spec}
    budget: dict[str, int]                 # schedule -> trials
    epochs: int
    metric: str                            # val_acc | val_mse
    direction: str                         # maximize | minimize
    storage: str                           # an RDB URL or a journal file path
    out_dir: Path
    tracking: bool = True                  # tracking.enabled
    tracking_uri: str | None = None        # where MLflow runs go, resolved once for every worker
    parent_run_id: str | None = None       # the study's MLflow run, elected in the storage
    workers: int = 1                       # worker processes (or Ray tasks) this command starts
    threads: int = 1                       # torch threads per worker: the cores, shared

    @property
    def name(self) -> str:
        return self.settings["name"]

    @property
    def schedules(self) -> list[str]:
        return list(self.spaces)

    def study_name(self, schedule: str) -> str:
        """The Optuna study holding one schedule's search trials."""
        return f"{self.name}/{schedule}"

    def confirm_name(self, schedule: str) -> str:
        """The Optuna study whose trials are the schedule's confirmation runs, one per seed."""
        return f"{self.name}/{schedule}/confirm"


# --- overrides ------------------------------------------------------------------------------------

def without_scheduler(argv: list[str]) -> list[str]:
    """The overrides minus a `scheduler=` choice: each trial picks its own schedule."""
    return [a for a in argv if override_key(a) != "scheduler"]


def training_overrides(argv: list[str]) -> list[str]:
    """The overrides `python -m sweep` understands: no study settings, no scheduler choice."""
    return [a for a in without_scheduler(argv) if override_key(a).split(".")[0] != "study"]


def schedule_overrides(schedule: str, epochs: int) -> list[str]:
    """What every trial of a schedule sets on top of the command's overrides."""
    return [f"scheduler={schedule}", f"trainer.epochs={epochs}"]


def override_text(value: Any) -> str:
    """A value as Hydra override syntax, exact: floats keep every digit (`repr`), so the command
    trains what the trial trained. This is the one formatter for override text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def knob_overrides(values: dict[str, Any]) -> list[str]:
    """`{"optimizer.lr": 0.0123}` -> `["optimizer.lr=0.0123"]`, for commands and tables."""
    return [f"{key}={override_text(value)}" for key, value in values.items()]


def rerun_command(plan: Plan, schedule: str, values: dict[str, Any]) -> str:
    """The `python -m sweep ...` line that trains one configuration of the study as is."""
    words = [*training_overrides(plan.argv), *schedule_overrides(schedule, plan.epochs),
             *knob_overrides(values)]
    return " ".join(["python -m sweep", *map(shlex.quote, words)])


def with_values(base: DictConfig, values: dict[str, Any]) -> DictConfig:
    """`base` with each dotted key set to its value, as composing with the overrides would.

    Values go in as values (no round trip through text); interpolations such as
    `dataset.seed: ${seed}` see the new values. A millisecond instead of ~0.1 s for a compose.
    """
    cfg = copy.deepcopy(base)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)  # a list replaces, it does not merge
    return cfg
