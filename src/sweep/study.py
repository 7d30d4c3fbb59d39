"""`python -m sweep.study <overrides>`: tune each schedule with Optuna, then compare them fairly.

Each schedule gets its own Optuna study, `<study.name>/<schedule>`, in one storage, and the same
trial budget. Pruning therefore only compares trials of one schedule: a schedule that decays late
looks worse early and must not be stopped for it. Every trial is a nested MLflow run under one
parent run per study. Running the same command again resumes: finished trials stay, and only the
rest of the budget runs. After the search, `sweep.study_report` retrains the best configuration of
each schedule with several seeds and writes the comparison.
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import optuna
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import FrozenTrial, TrialState

from sweep import CONF_DIR
from sweep.config import (
    ConfigError,
    check_choice,
    check_int_at_least,
    compose,
    fail,
    override_key,
    validate,
)
from sweep.study_optuna import (
    default_storage,
    diverged_value,
    grid_values,
    hydra_value,
    make_pruner,
    make_sampler,
    open_storage,
    suggest,
    used_budget,
)
from sweep.track import mlflow_run, tracking_uri

SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc")
PRUNERS = ("median", "halving", "hyperband", "none")


@dataclass
class Plan:
    """What every worker needs to run trials, derived once from the command line (picklable)."""

    argv: list[str]                        # the command's Hydra overrides, as typed
    settings: dict[str, Any]               # cfg.study, resolved
    spaces: dict[str, dict[str, dict]]     # schedule -> {dotted config key: search spec}
    budget: dict[str, int]                 # schedule -> trials
    epochs: int
    metric: str                            # val_acc | val_mse
    direction: str                         # maximize | minimize
    storage: str                           # an RDB URL or a journal file path
    out_dir: Path
    parent_run_id: str | None = None       # the study's MLflow run
    workers: int = 1
    threads: int = 1                       # torch threads per worker: the cores, shared

    @property
    def schedules(self) -> list[str]:
        return list(self.spaces)

    def study_name(self, schedule: str) -> str:
        return f"{self.settings['name']}/{schedule}"


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
    if s.sampler == "cmaes" and find_spec("cmaes") is None:
        fail("study.sampler", "cmaes", "needs the cmaes package: pip install cmaes")


def without_scheduler(argv: list[str]) -> list[str]:
    """The overrides minus a `scheduler=` choice: each trial picks its own schedule."""
    return [a for a in argv if override_key(a) != "scheduler"]


def training_overrides(argv: list[str]) -> list[str]:
    """The overrides `python -m sweep` understands: no study settings, no scheduler choice."""
    return [a for a in without_scheduler(argv) if override_key(a).split(".")[0] != "study"]


def schedule_overrides(schedule: str, epochs: int, knobs: list[str] = ()) -> list[str]:
    """What one trial sets on top of the command's overrides: its schedule, budget and knobs."""
    return [f"scheduler={schedule}", f"trainer.epochs={epochs}", *knobs]


def rerun_command(plan: Plan, schedule: str, knobs: list[str]) -> str:
    """The `python -m sweep ...` line that trains one configuration of the study as is."""
    words = [*training_overrides(plan.argv), *schedule_overrides(schedule, plan.epochs, knobs)]
    return " ".join(["python -m sweep", *map(shlex.quote, words)])


def with_values(base: DictConfig, overrides: list[str]) -> DictConfig:
    """`base` with `key=value` overrides applied the way Hydra applies them after composing.

    The same config as composing again with the overrides added, for a millisecond instead of
    ~0.1 s a trial (every key is checked to exist when the study starts).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = copy.deepcopy(base)
    for override in OverridesParser.create().parse_overrides(overrides):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


def schedule_space(argv: list[str], schedule: str, epochs: int) -> dict[str, dict]:
    """The schedule's declared search space, with every key checked against its composed config."""
    from sweep.schedules import search_space

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


# --- one trial -----------------------------------------------------------------------------------

class SurplusTrial(RuntimeError):
    """Two workers asked for the last slot at once; the higher trial number gives it up."""


class Objective:
    """One trial: sample the schedule's knobs, train, report the metric every epoch for pruning."""

    def __init__(self, plan: Plan, schedule: str, nested: bool):
        self.plan, self.schedule, self.nested = plan, schedule, nested
        self.base: DictConfig | None = None  # the schedule's composed config, before the knobs

    def __call__(self, trial: optuna.Trial) -> float:
        plan, schedule = self.plan, self.schedule
        if used_budget(trial.study, before=trial.number) >= plan.budget[schedule]:
            trial.set_user_attr("state", "surplus")
            trial.study.stop()
            raise SurplusTrial(f"{plan.study_name(schedule)} already has its "
                               f"{plan.budget[schedule]} trials")
        started, params = time.perf_counter(), {}
        try:
            params = suggest(trial, plan.spaces[schedule])
            value, state, epochs = self.train(trial, params)
        except BaseException as err:  # recorded here, then Optuna marks the trial FAIL
            state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            trial.set_user_attr("state", state)
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            self.say(trial, state, None, params, started, f"{type(err).__name__}: {err}")
            raise
        trial.set_user_attr("state", state)
        self.say(trial, state, value, params, started, f"epoch {epochs}")
        if state == "pruned":
            raise optuna.TrialPruned(f"pruned after epoch {epochs}")
        return value

    def train(self, trial: optuna.Trial, params: dict[str, Any]) -> tuple[float, str, int]:
        """Train with the sampled values in the trial's MLflow run: (value, state, epochs run)."""
        from sweep.train import train

        plan, schedule = self.plan, self.schedule
        knobs = [f"{key}={hydra_value(value)}" for key, value in params.items()]
        trial.set_user_attr("overrides", knobs)
        if self.base is None:
            self.base = compose([*without_scheduler(plan.argv),
                                 *schedule_overrides(schedule, plan.epochs)], "sweep")
        cfg = with_values(self.base, knobs)
        pruned = False

        def report(epoch: int, metrics: dict[str, float]) -> bool:
            nonlocal pruned
            trial.report(metrics[plan.metric], epoch)
            # None of our pruners stops a trial before warmup_epochs; asking reads the storage.
            pruned = epoch >= plan.settings["warmup_epochs"] and trial.should_prune()
            return pruned  # stop here, close the MLflow run cleanly, then tell Optuna

        tags = {"role": "trial", "study": plan.settings["name"], "schedule": schedule,
                "optuna.study": plan.study_name(schedule), "optuna.trial": str(trial.number)}
        if plan.parent_run_id:  # what `nested` does in-process; needed in worker processes
            tags["mlflow.parentRunId"] = plan.parent_run_id
        with mlflow_run(cfg, run_name_=f"{schedule}-{trial.number}", nested=self.nested,
                        tags=tags) as tracker:
            if tracker is not None:
                trial.set_user_attr("mlflow_run_id", tracker.run_id)
            try:
                result = train(cfg, callback=report, tracker=tracker,
                               output_dir=plan.out_dir / "runs" / f"{schedule}-{trial.number}")
            except BaseException as err:
                if tracker is not None:
                    state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                    tracker.set_tags({"state": state, "error": f"{type(err).__name__}: {err}"})
                raise
            value = result.final_metric
            state = "pruned" if pruned else "complete"
            if result.status == "diverged" or not math.isfinite(value):
                state, value = "diverged", diverged_value(trial.study, plan.metric,
                                                          result.history)
            if tracker is not None:
                tracker.set_tags({"state": state})
                tracker.log_step(len(result.history), {"objective": value,
                                                       f"best_{plan.metric}": result.best_metric})
        return value, state, len(result.history)

    def say(self, trial: optuna.Trial, state: str, value: float | None, params: dict,
            started: float, note: str) -> None:
        shown = " ".join(f"{k.rsplit('.', 1)[-1]}={hydra_value(v)}" for k, v in params.items())
        score = "" if value is None else (f"penalty {value:.4f}" if state == "diverged"
                                          else f"{self.plan.metric} {value:.4f}")
        print(f"  {self.schedule:<12} #{trial.number:<3} {state:<11} {score:<16} {shown}  "
              f"({note}, {time.perf_counter() - started:.1f}s)", flush=True)


# --- workers and the search ----------------------------------------------------------------------

def work(plan: Plan, nested: bool = True, worker: int = 0) -> None:
    """Pull trials of each schedule from the storage until every schedule's budget is used."""
    import torch

    if plan.workers > 1:  # N workers share the cores instead of oversubscribing them
        torch.set_num_threads(plan.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(plan.storage, shared=bool(plan.settings["storage"]))
    for schedule in plan.schedules:
        budget = plan.budget[schedule]
        probe = optuna.load_study(study_name=plan.study_name(schedule), storage=storage)
        left = budget - used_budget(probe)
        if left <= 0:
            continue
        # A resumed or parallel run must not replay the same random proposals: offset the seed.
        seed = plan.settings["seed"] + 1000 * worker + len(probe.trials)
        study = optuna.load_study(study_name=plan.study_name(schedule), storage=storage,
                                  sampler=make_sampler(plan.settings, plan.spaces[schedule], seed),
                                  pruner=make_pruner(plan.settings, plan.epochs))

        def stop_when_full(study: optuna.Study, _: FrozenTrial, budget: int = budget) -> None:
            if used_budget(study) >= budget:
                study.stop()

        study.optimize(Objective(plan, schedule, nested), n_trials=left, catch=(Exception,),
                       callbacks=[stop_when_full], gc_after_trial=False)


def worker_main(plan: Plan, worker: int) -> None:
    """A worker process; its trials are children of the study's MLflow run by tag, not nesting."""
    try:
        work(plan, nested=False, worker=worker)
    except KeyboardInterrupt:  # the trial is already recorded as interrupted
        sys.exit(130)


def search(plan: Plan) -> None:
    """Run the trials here (one worker) or in `plan.workers` processes on the shared storage."""
    if plan.workers == 1:
        work(plan, nested=True)
        return
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch threads or MLflow state
    procs = [ctx.Process(target=worker_main, args=(plan, i), name=f"worker-{i}")
             for i in range(plan.workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C; let them record their trial
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    for p in procs:
        if p.exitcode:
            print(f"warning: {p.name} exited with code {p.exitcode}; its running trial is "
                  "re-run next time", file=sys.stderr)


def set_lr_bounds_from_range_test(cfg: DictConfig, spaces: dict[str, dict[str, dict]]) -> None:
    """`study.lr_bounds=auto`: an LR range test on the study's model and data sets every
    schedule's `optimizer.lr` range (log scale), instead of the range each schedule declares."""
    from sweep.lr_find import suggest_lr_bounds

    low, high = suggest_lr_bounds(cfg)
    print(f"LR range test: searching optimizer.lr in [{low:.3g}, {high:.3g}]", flush=True)
    for space in spaces.values():
        if "optimizer.lr" in space:
            space["optimizer.lr"] = {"type": "float", "low": low, "high": high, "log": True}


def make_plan(cfg: DictConfig, argv: list[str]) -> Plan:
    """Validate the study and the training config, and derive everything the workers need."""
    from sweep.data import load_data
    from sweep.train import loss_and_metric

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
    _, metric, direction = loss_and_metric(cfg, load_data(cfg.dataset))
    out_dir = Path(s["output_dir"]).resolve()
    storage = s["storage"] or default_storage(out_dir, s["workers"])
    threads = max(1, (os.cpu_count() or 1) // s["workers"])
    return Plan(argv=list(argv), settings=s, spaces=spaces, budget=budget, epochs=epochs,
                metric=metric, direction=direction, storage=storage, out_dir=out_dir,
                workers=s["workers"], threads=threads)


def open_studies(plan: Plan) -> dict[str, optuna.Study]:
    """Create or load each schedule's study; trials a killed run left RUNNING are failed."""
    owned = not plan.settings["storage"]  # nobody else writes to the default storage
    storage = open_storage(plan.storage, shared=not owned)
    studies = {}
    for schedule in plan.schedules:
        study = optuna.create_study(study_name=plan.study_name(schedule), storage=storage,
                                    direction=plan.direction, load_if_exists=True)
        if study.direction.name.lower() != plan.direction:
            fail("study.name", plan.settings["name"],
                 f"{plan.study_name(schedule)} in {plan.storage} was made to "
                 f"{study.direction.name.lower()} another metric; pick a new study.name")
        # A shared storage's running trials may be another machine's: heartbeats handle those.
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if owned else []
        for t in running:
            storage.set_trial_user_attr(t._trial_id, "state", "interrupted")
            study.tell(t.number, state=TrialState.FAIL)
        studies[schedule] = study
    return studies


@contextmanager
def parent_run(cfg: DictConfig, plan: Plan, studies: dict[str, optuna.Study]) -> Iterator[Any]:
    """The study's MLflow run: reopened on resume (its id lives in the Optuna studies)."""
    run_id = next((s.user_attrs["mlflow_run_id"] for s in studies.values()
                   if "mlflow_run_id" in s.user_attrs), None)
    if run_id and cfg.tracking.enabled:
        import mlflow

        from sweep.track import use_store
        use_store(cfg)
        try:
            mlflow.MlflowClient().get_run(run_id)
        except mlflow.exceptions.MlflowException:  # another MLflow store: start a new parent
            run_id = None
    parent_cfg = copy.deepcopy(cfg)
    with open_dict(parent_cfg):  # the study compares schedules; it has no scheduler of its own
        del parent_cfg["scheduler"]
        parent_cfg.choices.pop("scheduler", None)
    tags = {"role": "study", "study": plan.settings["name"], "scheduler": ",".join(studies)}
    with mlflow_run(parent_cfg, run_name_=f"study-{plan.settings['name']}", tags=tags,
                    run_id=run_id) as tracker:
        if tracker is not None:
            plan.parent_run_id = tracker.run_id
            for study in studies.values():
                study.set_user_attr("mlflow_run_id", tracker.run_id)
        yield tracker


def run_study(argv: list[str]) -> Any:
    """Search, confirm and report; returns the `sweep.study_report.Summary`."""
    from sweep.study_report import summarize

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from us
    cfg = compose(argv, config_name="sweep")
    plan = make_plan(cfg, argv)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    studies = open_studies(plan)
    s = plan.settings
    done = ", ".join(f"{name} {used_budget(st)}/{plan.budget[name]}"
                     for name, st in studies.items())
    print(f"study {s['name']!r}: {len(studies)} schedules x {s['trials']} trials x {plan.epochs} "
          f"epochs on {cfg.choices.get('model')}/{cfg.choices.get('dataset')}, "
          f"sampler {s['sampler']}, pruner {s['pruner']}, {plan.workers} worker(s)\n"
          f"storage {plan.storage} (trials so far: {done})", flush=True)
    with parent_run(cfg, plan, studies) as parent:
        search(plan)
        summary = summarize(cfg, plan, studies, parent)
    print(summary.text)
    if cfg.tracking.enabled:
        print(f"MLflow: run `mlflow ui --backend-store-uri {tracking_uri(cfg)}` (or `make ui`) "
              f"and open http://127.0.0.1:5000, experiment {cfg.tracking.experiment!r}, "
              f"run 'study-{s['name']}'")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Parse `sys.argv[1:]` as Hydra overrides for conf/sweep.yaml and run the study."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        print(OmegaConf.to_yaml(compose([], config_name="sweep").study))
        return
    from sweep.data import DataError

    try:
        run_study(argv)
    except (ConfigError, DataError, HydraException) as err:
        print(f"sweep.study: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nsweep.study: interrupted; finished trials are kept: run the same command to "
              "resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
