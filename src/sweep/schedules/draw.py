"""Schedules without training: every group's lr at every step, drawn, and the command that does it.

`python -m sweep.schedules scheduler=step optimizer.lr=0.1 trainer.epochs=100 scheduler.gamma=0.8`
writes lr_schedule.png and lr_schedule.csv to Hydra's output folder. It is a Hydra app on the one
config tree (conf/schedules.yaml: the training config, so `--cfg job` and `--help` work), and takes
its own settings with `+`: `+schedules=[step,cosine]` or `+schedules=all` draws several (then
`++scheduler.gamma=0.8` reaches those with a gamma), `+x=epoch` and `+log_y=true` shape the plot,
`+steps_per_epoch=N` skips loading the data.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import ReduceLROnPlateau

from sweep import CONF_DIR
from sweep.config import ConfigError, check_choice, check_int_at_least, compose, override_key
from sweep.schedules.build import build_scheduler
from sweep.schedules.lengths import Budget
from sweep.validation import DataError

_ABSENT = object()


def budget_from_config(cfg: DictConfig) -> Budget:
    """trainer.epochs of ceil(n_train / batch_size) steps; `+steps_per_epoch=N` skips the data."""
    steps = cfg.get("steps_per_epoch")
    if steps is None:
        from sweep.data import load_data  # late: loading data is only needed here

        check_int_at_least("trainer.batch_size", cfg.trainer.batch_size, 1)
        steps = load_data(cfg.dataset).steps_per_epoch(cfg.trainer.batch_size)
    return Budget(cfg.trainer.epochs, steps)


def simulate(cfg: DictConfig, budget: Budget | None = None) -> list[dict[str, Any]]:
    """The lr of every group at every optimizer step, stepped as the trainer does, without training.

    Rows are {step (from 0), epoch (from 1, as the trainer's lr trace), group, lr}. One parameter
    per group: `default` at optimizer.lr and one per optimizer.param_groups rule. A plateau schedule
    is fed a constant metric, so it shows how it behaves when training stalls.
    """
    from sweep.optim import validate_optimizer

    validate_optimizer(cfg.optimizer)
    budget = budget or budget_from_config(cfg)
    opt = OmegaConf.to_container(cfg.optimizer, resolve=True)
    rules = opt.pop("param_groups", None) or []
    groups = [{"name": "default", "lr": opt["lr"]}] + [
        {"name": r["pattern"], "lr": r["lr"] if "lr" in r else opt["lr"] * r["lr_scale"]}
        for r in rules]
    params = [dict(g, params=[torch.nn.Parameter(torch.zeros(1))]) for g in groups]
    optimizer = get_object(opt.pop("_target_"))(params, **opt)
    # Any direction agrees with a constant metric; take the one an explicit mode asks for.
    direction = "maximize" if cfg.scheduler.get("mode") == "max" else "minimize"
    schedule = build_scheduler(cfg.scheduler, optimizer, budget, direction=direction)
    rows = []
    for step in range(budget.total_steps):
        epoch = step // budget.steps_per_epoch + 1
        rows += [{"step": step, "epoch": epoch, "group": g["name"], "lr": float(g["lr"])}
                 for g in optimizer.param_groups]
        optimizer.step()  # no gradients: changes nothing, but calls come in the trainer's order
        if schedule.interval == "step":
            schedule.scheduler.step()
        elif (step + 1) % budget.steps_per_epoch == 0:
            schedule.scheduler.step(*([0.0] if schedule.needs_metric else []))
    return rows


def available_schedules() -> list[str]:
    """The names of conf/scheduler/*.yaml."""
    return sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml"))


def _configs_to_draw(cfg: DictConfig, overrides: list[str], chosen: str) -> dict[str, DictConfig]:
    """The composed config per schedule to draw, the user's other overrides kept for each."""
    wanted = cfg.get("schedules")
    if wanted is None:
        return {chosen: cfg}
    names = available_schedules() if wanted == "all" else (
        [wanted] if isinstance(wanted, str) else list(wanted))
    for name in names:
        check_choice("schedules", name, available_schedules())
    common = [o for o in overrides if override_key(o).split(".")[0] not in ("schedules",
                                                                              "scheduler")]
    own = [o for o in overrides if override_key(o).startswith("scheduler.")]
    configs = {}
    for name in names:
        base = compose([*common, f"scheduler={name}"])
        # An override such as scheduler.gamma=0.8 applies to the schedules that have a gamma.
        keep = [o for o in own if OmegaConf.select(base, override_key(o), default=_ABSENT)
                is not _ABSENT]
        configs[name] = compose([*common, f"scheduler={name}", *keep]) if keep else base
    return configs


def write_csv(rows_by_schedule: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Columns step, epoch, group, lr; a leading schedule column when there are several."""
    several = len(rows_by_schedule) > 1
    columns = (["schedule"] if several else []) + ["step", "epoch", "group", "lr"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for name, rows in rows_by_schedule.items():
            writer.writerows([{"schedule": name, **r} if several else r for r in rows])


@hydra.main(config_path=str(CONF_DIR), config_name="schedules", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """`python -m sweep.schedules <overrides>`: lr_schedule.png and .csv in Hydra's output dir."""
    from sweep.plots import lr_figure  # late: matplotlib only for the CLI

    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    try:
        configs = _configs_to_draw(cfg, list(hydra_cfg.overrides.task),
                                   hydra_cfg.runtime.choices.scheduler)
        budget = budget_from_config(cfg)
        rows = {name: simulate(c, budget) for name, c in configs.items()}
    except Exception as err:
        if not isinstance(err, ConfigError | DataError):
            raise
        print(f"sweep.schedules: error: {err}", file=sys.stderr)
        sys.exit(2)
    title = f"lr schedule: {', '.join(configs)}" if len(configs) <= 3 else "lr schedules"
    title += f" ({budget.epochs} epochs x {budget.steps_per_epoch} steps)"
    plateaus = [n for n, c in configs.items()
                if get_object(c.scheduler._target_) is ReduceLROnPlateau]
    if plateaus:
        title += f"\n{', '.join(plateaus)}: fed a constant metric, so it shows a stalled run"
    fig = lr_figure(rows, x=cfg.get("x", "step"), log_y=bool(cfg.get("log_y", False)), title=title)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "lr_schedule.png", dpi=120)
    write_csv(rows, out / "lr_schedule.csv")
    print(f"wrote {out / 'lr_schedule.png'}\nwrote {out / 'lr_schedule.csv'}")
