"""The work of `hydra/launcher=fused` (`hydra_plugins.sweep_fused`): every job of a multirun of
`python -m sweep` composed and checked first, compatible jobs trained fused, each in its own job
folder and MLflow run, and as each group ends its jobs handed to Hydra's `run_job` as the basic
launcher does, so the job's `.hydra/`, callbacks (the multirun's bar), printed summary and return
value are what they are without it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict
from tqdm.auto import tqdm

from sweep import fused, run_folder
from sweep.__main__ import summary
from sweep.config import ConfigError, job_config, validate
from sweep.plots import run_figures
from sweep.track import member_runs, run_name
from sweep.train import TrainResult, check_parts
from sweep.validation import DataError

log = logging.getLogger("sweep.fused")


def job_dir(sweep_config: DictConfig) -> Path:
    """The job's output folder, as `run_job` makes it: hydra.sweep.dir/hydra.sweep.subdir."""
    return Path(os.path.abspath(os.path.join(str(sweep_config.hydra.sweep.dir),
                                             str(sweep_config.hydra.sweep.subdir))))


def launch(hydra_context: HydraContext, config: DictConfig,
           job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Compose and check every job, train them in `fuse`-sized groups, and after each group let
    Hydra run its jobs' bookkeeping with a task that reports the result already trained (the
    app's own task, `sweep.__main__.main`, is what this replaces)."""
    if config.hydra.job.config_name != "config":
        raise ConfigError(f"hydra/launcher=fused trains the jobs of `python -m sweep`, not of "
                          f"{config.hydra.job.config_name!r}; use the basic launcher there")
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    sweep_configs = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        sweep_configs.append(sweep_config)
    cfgs = [job_config(c) for c in sweep_configs]
    for cfg in cfgs:  # as `sweep.__main__.main` in a multirun: its one bar, none per job
        cfg.trainer.progress = False
    # 1. Every job checked, its data and parts built, before any job trains or any run opens.
    try:
        for cfg in cfgs:
            validate(cfg)
            check_parts(cfg)
    except (ConfigError, DataError) as err:
        tqdm.write(f"sweep: error: {err}", file=sys.stderr)  # its own line, below the bar
        sys.exit(2)

    # 2. Train: compatible jobs together, each its own MLflow run and job folder; then Hydra's
    # own bookkeeping of each of the group's jobs, as the basic launcher runs it, so the
    # multirun's bar and callbacks move group by group, not only once everything has trained.
    returns: list[JobReturn | None] = [None] * len(cfgs)
    plan = fused.groups(cfgs, config.get("fuse", "auto"))
    log.info("Launching %d jobs as %d fused groups and %d alone", len(cfgs),
             sum(len(g) > 1 for g in plan), sum(len(g) == 1 for g in plan))
    for k, group in enumerate(plan, start=1):
        members = [cfgs[i] for i in group]
        log.info("Training group %d/%d: job%s %s%s", k, len(plan), "s" * (len(group) > 1),
                 ", ".join(str(sweep_configs[i].hydra.job.num) for i in group),
                 " fused" if len(group) > 1 else "")
        names = []
        for i in group:  # a job's run name names its swept values, read from its Hydra config
            HydraConfig.instance().set_config(sweep_configs[i])
            names.append(run_name(cfgs[i]))
        dirs = [job_dir(sweep_configs[i]) for i in group]
        with member_runs(members, names, [{} for _ in group]) as trackers:
            trained = fused.train_group(members, trackers=trackers, output_dirs=dirs)
            for result, tracker, name, out_dir in zip(trained, trackers, names, dirs,
                                                      strict=True):
                figures = run_figures(result, name)
                run_folder.save_figures(out_dir, figures)  # the same figures go to MLflow
                if tracker is not None:
                    tracker.finish(result, figures)
        for i, result in zip(group, trained, strict=True):
            log.info("\t#%s : %s", sweep_configs[i].hydra.job.num,
                     " ".join(filter_overrides(job_overrides[i])))
            returns[i] = run_job(hydra_context=hydra_context, task_function=reporter(result),
                                 config=sweep_configs[i], job_dir_key="hydra.sweep.dir",
                                 job_subdir_key="hydra.sweep.subdir")
            configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return [r for r in returns if r is not None]  # every job is in one group: all of them


def reporter(result: TrainResult) -> TaskFunction:
    """The job's task: print what `python -m sweep` prints at a run's end, and return its final
    metric (for Hydra's optimising sweepers)."""
    def report(cfg: DictConfig) -> float:
        hydra = HydraConfig.get()
        print(summary(result, cfg, Path(hydra.runtime.output_dir), list(hydra.overrides.task)))
        return result.final_metric
    return report
