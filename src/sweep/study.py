"""`python -m sweep.study <overrides>`: tune each schedule with Optuna, then compare them fairly.

Each schedule gets its own Optuna study, `<study.name>/<schedule>`, in one storage, and the same
trial budget. Pruning therefore only compares trials of one schedule: a schedule that decays late
looks worse early and must not be stopped for it. The storage is the single source of truth: the
same command started again, in another terminal or on other machines pointing at the same
`study.storage`, joins the study instead of starting another, and together the processes run
exactly the budget (`sweep.study_worker`). Every trial and confirmation run is a child of one
MLflow run per study; the summary (`sweep.study_report`) is computed from the storage once every
trial is finished.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from importlib.util import find_spec
from pathlib import Path

import hydra
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from sweep import CONF_DIR
from sweep.config import (
    ConfigError,
    check_choice,
    check_int_at_least,
    compose,
    fail,
    validate,
    with_choices,
)
from sweep.data import declared_task, load_data
from sweep.dburl import MissingDriver
from sweep.launch import launch, threads_per_worker
from sweep.lr_find import suggest_lr_bounds
from sweep.mlflow_store import tracking_uri, use_store
from sweep.schedules import search_space
from sweep.study_optuna import grid_values, used_budget
from sweep.study_plan import Plan, schedule_overrides, without_scheduler
from sweep.study_report import Summary, summarize
from sweep.study_storage import create_study, default_storage, is_journal, once
from sweep.study_worker import Worker
from sweep.track import Tracker, flatten, run_tags
from sweep.train import loss_and_metric
from sweep.validation import DataError

SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc")
PRUNERS = ("median", "halving", "hyperband", "none")
LAUNCHERS = ("local", "ray")


# --- settings, overrides and search spaces ------------------------------------------------------

def validate_study(cfg: DictConfig) -> None:
    """Check the `study` group before anything is trained; raises ConfigError naming the key."""
    s = cfg.study
    check_choice("study.sampler", s.sampler, SAMPLERS)
    check_choice("study.pruner", s.pruner, PRUNERS)
    check_int_at_least("study.trials", s.trials, 1)
    if s.epochs is not None:
        check_int_at_least("study.epochs", s.epochs, 1)
    for key, low in (("workers", 1), ("startup_trials", 0), ("grid_points", 2),
                     ("warmup_epochs", 0), ("prune_after", 0), ("reduction_factor", 2)):
        check_int_at_least(f"study.{key}", s[key], low)
    if not s.schedules or len(set(s.schedules)) != len(s.schedules):
        fail("study.schedules", OmegaConf.to_container(s.schedules),
             "a non-empty list of distinct schedules from conf/scheduler")
    if not s.seeds or not all(isinstance(x, int) for x in s.seeds):
        fail("study.seeds", OmegaConf.to_container(s.seeds), "a non-empty list of integer seeds")
    if s.target is not None and not isinstance(s.target, int | float):
        fail("study.target", s.target, "a number (the metric level), or null")
    if not re.fullmatch(r"[\w.\-]+", str(s.name)):
        fail("study.name", s.name, "letters, digits, '.', '-' and '_' only (it names files)")
    check_choice("study.lr_bounds", s.lr_bounds, ("declared", "auto"))
    check_choice("study.launcher", s.launcher, LAUNCHERS)
    for key in ("cpus_per_trial", "gpus_per_trial"):
        value = s[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0 or (
                key == "cpus_per_trial" and value == 0):
            fail(f"study.{key}", value, "must be a number >= 0 (cpus_per_trial > 0); fractions "
                 "let several trials share a device")
    check_int_at_least("study.heartbeat_interval", s.heartbeat_interval, 1)
    if not isinstance(s.grace_period, int) or s.grace_period < 2 * s.heartbeat_interval:
        fail("study.grace_period", s.grace_period, "must be an integer >= 2 x "
             f"study.heartbeat_interval ({2 * s.heartbeat_interval}): a live worker that misses "
             "one beat must not be taken for dead")
    if s.launcher == "ray" and find_spec("ray") is None:
        fail("study.launcher", "ray", "needs Ray: pip install -e '.[distributed]'")
    if s.sampler == "cmaes" and find_spec("cmaes") is None:
        fail("study.sampler", "cmaes", "needs the cmaes package: pip install cmaes")


def schedule_space(argv: list[str], schedule: str, epochs: int) -> dict[str, dict]:
    """The schedule's declared search space, with every key checked against its composed config."""

    known = sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml"))
    if schedule not in known:
        fail("study.schedules", schedule, "choose from " + ", ".join(known))
    cfg = compose([*without_scheduler(argv), *schedule_overrides(schedule, epochs)], "sweep")
    if not cfg.scheduler.get("search_space"):
        fail("study.schedules", schedule, f"conf/scheduler/{schedule}.yaml declares no "
             "search_space, so there is nothing to tune; add one or leave the schedule out")
    try:
        space = search_space(cfg.scheduler)
    except ConfigError as err:
        raise ConfigError(f"study.schedules: {schedule}: {err}") from None
    for key in space:
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            fail(f"scheduler/{schedule}.yaml search_space", key, "must name a key of the config")
    spaces = OmegaConf.to_container(space) if isinstance(space, DictConfig) else space
    return {key: dict(spec) for key, spec in spaces.items()}


# --- the plan, the MLflow parent run, the whole study ----------------------------------------

def set_lr_bounds_from_range_test(cfg: DictConfig, spaces: dict[str, dict[str, dict]]) -> None:
    """`study.lr_bounds=auto`: an LR range test on the study's model and data sets every
    schedule's `optimizer.lr` range (log scale), instead of the range each schedule declares."""

    low, high = suggest_lr_bounds(cfg)
    print(f"LR range test: searching optimizer.lr in [{low:.3g}, {high:.3g}]", flush=True)
    for space in spaces.values():
        if "optimizer.lr" in space:
            space["optimizer.lr"] = {"type": "float", "low": low, "high": high, "log": True}


def make_plan(cfg: DictConfig, argv: list[str]) -> Plan:
    """Validate the study and the training config, and derive everything the workers need."""

    validate_study(cfg)
    validate(cfg)
    s = OmegaConf.to_container(cfg.study, resolve=True)
    epochs = s["epochs"] or cfg.trainer.epochs
    spaces = {name: schedule_space(argv, name, epochs) for name in s["schedules"]}
    if s["lr_bounds"] == "auto":
        set_lr_bounds_from_range_test(cfg, spaces)
    budget = {name: s["trials"] for name in spaces}
    if s["sampler"] == "grid":  # a grid smaller than the budget is simply run in full
        for name, space in spaces.items():
            budget[name] = min(s["trials"], math.prod(len(grid_values(spec, s["grid_points"]))
                                                      for spec in space.values()))
    task = declared_task(cfg.dataset) or load_data(cfg.dataset).task
    _, metric, direction = loss_and_metric(cfg, task, cfg.dataset._target_.rsplit(".", 1)[-1])
    out_dir = Path(s["output_dir"]).resolve()
    return Plan(argv=list(argv), settings=s, spaces=spaces, budget=budget, epochs=epochs,
                metric=metric, direction=direction, storage=storage_url(s["storage"], out_dir),
                out_dir=out_dir, tracking=bool(cfg.tracking.enabled),
                tracking_uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
                workers=s["workers"], threads=threads_per_worker(s, s["workers"]))


def storage_url(given: str | None, out_dir: Path) -> str:
    """The study's storage, with a relative file made absolute: a worker on Ray or in another
    directory must open the same file."""
    if not given:
        return default_storage(out_dir)
    if is_journal(given):
        return str(Path(given).resolve())
    if given.startswith("sqlite:///") and not given.startswith("sqlite:////"):
        return f"sqlite:///{Path(given.removeprefix('sqlite:///')).resolve()}"
    return given


def open_studies(worker: Worker) -> None:
    """Create (or join) each schedule's study; refuse one made for the other direction."""
    plan = worker.plan
    for schedule in plan.schedules:
        study = create_study(worker.storage, plan.study_name(schedule), plan.direction)
        if study.direction.name.lower() != plan.direction:
            fail("study.name", plan.name, f"{plan.study_name(schedule)} in {plan.storage} was "
                 f"made to {study.direction.name.lower()} another metric; pick a new study.name")


def parent_run(cfg: DictConfig, worker: Worker) -> str | None:
    """The study's MLflow run id, created by exactly one of the processes that start at once.

    The election is per MLflow store: a study resumed against another store gets a parent there.
    """
    plan = worker.plan
    if not plan.tracking:
        return None
    store = hashlib.sha1(plan.tracking_uri.encode()).hexdigest()[:8]

    def create() -> str:
        import mlflow


        parent_cfg = OmegaConf.create(OmegaConf.to_container(cfg))
        with open_dict(parent_cfg):  # the study compares schedules; it has none of its own
            del parent_cfg["scheduler"]
            parent_cfg.choices.pop("scheduler", None)
        experiment_id = use_store(cfg)
        tags = {**run_tags(parent_cfg), "role": "study", "study": plan.name,
                "scheduler": ",".join(plan.schedules)}
        run = mlflow.MlflowClient(plan.tracking_uri).create_run(
            experiment_id, run_name=f"study-{plan.name}", tags=tags)
        tracker = Tracker(run.info.run_id)
        tracker.log_params(flatten(OmegaConf.to_container(parent_cfg, resolve=True)))
        tracker.log_text(OmegaConf.to_yaml(parent_cfg, resolve=True), "config.yaml")
        tracker.close()
        return run.info.run_id

    return once(worker.storage, f"{plan.name}/mlflow-parent/{store}", create, worker.liveness)


def run_study(argv: list[str], cfg: DictConfig | None = None) -> Summary:
    """Search, confirm and report; returns the summary. `argv` are the command's overrides (the
    workers compose each trial's config from them); `cfg` is what they compose, if known."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from us
    cfg = cfg if cfg is not None else compose(argv, config_name="sweep")
    plan = make_plan(cfg, argv)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        worker = Worker(plan)
    except MissingDriver as err:
        raise ConfigError(f"study.storage={plan.storage!r}: {err}") from None
    open_studies(worker)
    s = plan.settings
    done = ", ".join(f"{name} {used_budget(worker.study(name))}/{plan.budget[name]}"
                     for name in plan.schedules)
    where = (f"{plan.workers} Ray task(s)" if s["launcher"] == "ray"
             else f"{plan.workers} worker(s) here")
    print(f"study {plan.name!r}: {len(plan.schedules)} schedules x {s['trials']} trials x "
          f"{plan.epochs} epochs on {cfg.choices.get('model')}/{cfg.choices.get('dataset')}, "
          f"sampler {s['sampler']}, pruner {s['pruner']}, {where}\n"
          f"storage {plan.storage} (trials so far: {done}); the same command started elsewhere "
          "joins this study", flush=True)
    plan.parent_run_id = parent_run(cfg, worker)
    wait = launch(plan)
    if s["launcher"] == "local":
        work_here(plan, worker)
    wait()
    work_here(plan, worker)  # whatever is left: a dead worker's retried trial, the confirmations
    summary = summarize(cfg, worker)
    print(summary.text)
    if plan.tracking:
        print(f"MLflow: run `mlflow ui --backend-store-uri {plan.tracking_uri}` (or `make ui`) "
              f"and open http://127.0.0.1:5000 in its 'Model training' mode (the toggle at the "
              f"top left), experiment {cfg.tracking.experiment!r}, run 'study-{plan.name}'")
    return summary


def work_here(plan: Plan, worker: Worker) -> None:
    """This process as one of the study's workers, on the connection it already has."""
    torch.set_num_threads(plan.threads)
    worker.run()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sweep")
def main(cfg: DictConfig) -> float | None:
    """Run the study the command line composes; returns the leader's mean (for sweepers)."""

    hydra_cfg = HydraConfig.get()
    cfg = with_choices(cfg, hydra_cfg.runtime.choices)
    try:
        summary = run_study(list(hydra_cfg.overrides.task), cfg)
    except (ConfigError, DataError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nsweep.study: interrupted; finished trials are kept: run the same command to "
              "resume", file=sys.stderr)
        sys.exit(130)
    leader = next((r for r in summary.rows if r.values), None)
    return leader.mean if leader else None


if __name__ == "__main__":
    main()
