"""A study's worker: pulls search trials, then confirmation runs, from the storage until none is
left. Every process of a study runs this same loop (the command itself, the extra local
processes, Ray tasks on other machines), started at any moment, in any number.

Order of work, all of it decided by the storage:
1. Search: each schedule's trials until its budget is used. A trial records its outcome in the
   storage as soon as training ends, then closes its MLflow run, then tells Optuna.
2. Wait until no trial of any schedule is running (re-running the trials of dead workers).
3. Confirm: one process queues (schedule, seed) items for each schedule's best trial; every
   worker claims items until none is left, then waits for the running ones.
"""

from __future__ import annotations

import math
import time
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from sweep import faults
from sweep.config import compose
from sweep.study_optuna import (
    best_trial,
    diverged_value,
    make_pruner,
    make_sampler,
    suggest,
    used_budget,
)
from sweep.study_plan import (
    Plan,
    knob_overrides,
    schedule_overrides,
    with_values,
    without_scheduler,
)
from sweep.study_progress import Progress
from sweep.study_storage import (
    Liveness,
    OnStale,
    ask,
    claim,
    create_study,
    once,
    open_storage,
    trial_id,
    worker_number,
)
from sweep.track import mlflow_run, summary_tags
from sweep.train import train

POLL_S = 1.0           # how often a worker with nothing to claim looks at the storage again
WAIT_NOTE_S = 30.0     # how often a waiting worker says what it waits for
MAX_LR_POINTS = 500    # lr points kept per confirmation run (enough for a plot, small in storage)


class Worker:
    """One process's share of a study, on its own connection to the storage."""

    def __init__(self, plan: Plan):
        s = plan.settings
        self.plan = plan
        self.on_stale = OnStale(plan.tracking_uri if plan.tracking else None)
        self.storage: BaseStorage = open_storage(plan.storage, s["heartbeat_interval"],
                                                 s["grace_period"], self.on_stale)
        self.liveness = Liveness(self.storage, s["heartbeat_interval"], s["grace_period"],
                                 self.on_stale)
        self.waiting_since: float | None = None
        self.number = worker_number(self.storage, plan.name)
        self.bases: dict[str, DictConfig] = {}

    # --- studies -------------------------------------------------------------------------------

    def study(self, schedule: str, **kwargs: Any) -> optuna.Study:
        return optuna.load_study(study_name=self.plan.study_name(schedule), storage=self.storage,
                                 **kwargs)

    def confirm_study(self, schedule: str) -> optuna.Study:
        return create_study(self.storage, self.plan.confirm_name(schedule), self.plan.direction)

    def base(self, schedule: str) -> DictConfig:
        """The schedule's composed training config, before a trial's values (composed once)."""
        if schedule not in self.bases:
            plan = self.plan
            cfg = compose([*without_scheduler(plan.argv),
                           *schedule_overrides(schedule, plan.epochs)], "sweep")
            if plan.tracking_uri:  # the same store from any working directory or machine
                cfg = with_values(cfg, {"tracking.uri": plan.tracking_uri})
            self.bases[schedule] = cfg
        return self.bases[schedule]

    def run(self) -> None:
        """Search, then confirm; returns when the storage holds nothing left to do."""
        self.search()
        self.confirm()

    def wait(self, studies: list[optuna.Study]) -> None:
        """Sleep while other processes' trials run; say so every half minute."""
        now = time.monotonic()
        if self.waiting_since is None or now - self.waiting_since > WAIT_NOTE_S:
            self.waiting_since = now
            running = self.liveness.running(studies)
            print(f"  waiting for {len(running)} run(s) in other processes: "
                  f"{', '.join(running[:3])}{' ...' if len(running) > 3 else ''}; a dead "
                  f"process's run is taken over after study.grace_period="
                  f"{self.liveness.grace} s without a heartbeat", flush=True)
        time.sleep(POLL_S)

    # --- 1. search -----------------------------------------------------------------------------

    def search(self) -> None:
        plan, s = self.plan, self.plan.settings
        # Seeded by this worker's number, unique in the storage: no two processes (and no
        # resumed run) replay the same proposals.
        studies = {name: self.study(name, sampler=make_sampler(s, plan.spaces[name],
                                                               s["seed"] + 1000 * self.number),
                                    pruner=make_pruner(s, plan.epochs))
                   for name in plan.schedules}
        progress = Progress("search")
        order = plan.schedules[self.number % len(plan.schedules):] + \
            plan.schedules[:self.number % len(plan.schedules)]  # workers start on different ones
        while True:
            worked, busy = False, False
            for name in order:
                study = studies[name]
                self.liveness.reap(study)
                while (trial := self.take_slot(study, plan.budget[name])) is not None:
                    self.run_trial(study, trial, name)
                    print(progress.line(studies, plan.budget), flush=True)
                    worked = True
                while (queued := claim(self.storage, study)) is not None:
                    self.fail_item(study, queued, "surplus")  # a retry past the budget
                busy |= bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if not busy:
                return
            if not worked:  # other workers' trials are running: wait, and reap
                self.wait(list(studies.values()))

    def take_slot(self, study: optuna.Study, budget: int) -> optuna.Trial | None:
        """A new (or queued) trial if the budget has room for it, else None.

        Two workers can ask for the last slot at the same moment; the storage numbers their
        trials, and the higher number gives its trial up before sampling anything.
        """
        if used_budget(study) >= budget:
            return None
        trial = ask(study)
        if used_budget(study, before=trial.number) >= budget:
            trial.set_user_attr("state", "surplus")
            study.tell(trial, state=TrialState.FAIL)
            return None
        return trial

    def run_trial(self, study: optuna.Study, trial: optuna.Trial, schedule: str) -> None:
        """One search trial: sample, train (reporting every epoch for pruning), record, tell."""
        plan = self.plan
        started, values = time.perf_counter(), {}
        trial.set_user_attr("role", "trial")
        with self.liveness.heartbeat(trial_id(self.storage, study, trial.number)):
            try:
                values = suggest(trial, plan.spaces[schedule])
                trial.set_user_attr("values", values)
                trial.set_user_attr("overrides", knob_overrides(values))
                value, state, epochs = self.train_trial(study, trial, schedule, values)
            except BaseException as err:  # recorded, then told as FAIL; Ctrl-C goes on up
                state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                trial.set_user_attr("state", state)
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
                say(schedule, trial.number, state, None, values, plan.metric, started,
                    f"{type(err).__name__}: {err}")
                study.tell(trial, state=TrialState.FAIL)
                if isinstance(err, KeyboardInterrupt):
                    raise
                return
            trial.set_user_attr("state", state)
            say(schedule, trial.number, state, value, values, plan.metric, started,
                f"epoch {epochs}")
            if state == "pruned":
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, value)

    def train_trial(self, study: optuna.Study, trial: optuna.Trial, schedule: str,
                    values: dict[str, Any]) -> tuple[float, str, int]:
        """Train with the sampled values in the trial's MLflow run: (value, state, epochs run)."""

        plan = self.plan
        cfg = with_values(self.base(schedule), values)
        pruned = False

        def report(epoch: int, metrics: dict[str, float]) -> bool:
            nonlocal pruned
            trial.report(metrics[plan.metric], epoch)
            faults.point("mid_trial")
            # None of our pruners stops a trial before warmup_epochs; asking reads the storage.
            pruned = epoch >= plan.settings["warmup_epochs"] and trial.should_prune()
            return pruned  # stop here, close the MLflow run cleanly, then tell Optuna

        tags = {"role": "trial", "study": plan.name, "schedule": schedule,
                "optuna.study": plan.study_name(schedule), "optuna.trial": str(trial.number)}
        if plan.parent_run_id:
            tags["mlflow.parentRunId"] = plan.parent_run_id
        with mlflow_run(cfg, run_name_=f"{schedule}-{trial.number}", tags=tags) as tracker:
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
            value, state = result.final_metric, "pruned" if pruned else "complete"
            if result.status == "diverged" or not math.isfinite(value):
                state, value = "diverged", diverged_value(study, plan.metric, result.history)
            # The result reaches the storage before anything else can be interrupted: a worker
            # killed from here on is recovered from it, not trained again.
            trial.set_user_attr("outcome", {"state": state, "value": value})
            faults.point("after_train")
            if tracker is not None:  # one-off numbers as tags: no single-point charts
                tracker.set_tags({**summary_tags(result), "state": state,
                                  "objective": f"{value:.6g}"})
        return value, state, len(result.history)

    # --- 3. confirm ----------------------------------------------------------------------------

    def confirm(self) -> None:
        plan, seeds = self.plan, list(self.plan.settings["seeds"])
        studies, progress = {}, Progress("confirm")
        for name in plan.schedules:
            best = best_trial(self.study(name))
            if best is None:
                continue
            studies[name] = confirm = self.confirm_study(name)
            key = f"{plan.confirm_name(name)}/queued/{best.number}/{'-'.join(map(str, seeds))}"
            once(self.storage, key, lambda c=confirm, b=best: queue_confirmations(c, b, seeds),
                 self.liveness)
        while True:
            worked, busy = False, False
            for name, study in studies.items():
                self.liveness.reap(study)
                while (item := claim(self.storage, study)) is not None:
                    if is_duplicate(study, item):
                        self.fail_item(study, item, "duplicate")
                        continue
                    self.run_confirmation(study, item, name)
                    print(progress.line(studies, dict.fromkeys(studies, len(seeds))), flush=True)
                    worked = True
                busy |= bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if not busy:
                return
            if not worked:
                self.wait(list(studies.values()))

    def fail_item(self, study: optuna.Study, item: FrozenTrial, why: str) -> None:
        self.storage.set_trial_user_attr(trial_id(self.storage, study, item.number), "state", why)
        study.tell(item.number, state=TrialState.FAIL)

    def run_confirmation(self, study: optuna.Study, item: FrozenTrial, schedule: str) -> None:
        """Train the best configuration with one seed as a child of the study's MLflow run."""

        plan, started = self.plan, time.perf_counter()
        seed, values = item.user_attrs["seed"], item.user_attrs["values"]
        tid = trial_id(self.storage, study, item.number)
        cfg = with_values(self.base(schedule), {**values, "seed": seed})
        tags = {"role": "confirm", "study": plan.name, "schedule": schedule, "seed": str(seed),
                "optuna.trial": str(item.user_attrs["best_trial"])}
        if plan.parent_run_id:
            tags["mlflow.parentRunId"] = plan.parent_run_id
        with self.liveness.heartbeat(tid):
            try:
                with mlflow_run(cfg, run_name_=f"{schedule}-best-seed{seed}",
                                tags=tags) as tracker:
                    if tracker is not None:
                        self.storage.set_trial_user_attr(tid, "mlflow_run_id", tracker.run_id)
                    result = train(cfg, tracker=tracker, output_dir=plan.out_dir / "runs" /
                                   f"{schedule}-best-seed{seed}")
                    record = confirmation_record(result, seed)
                    value = record["final"] if math.isfinite(record["final"]) else (
                        -math.inf if plan.direction == "maximize" else math.inf)
                    self.storage.set_trial_user_attr(tid, "outcome", {
                        "state": "complete", "value": value, "record": record})
                    faults.point("confirm")
                    if tracker is not None:
                        tracker.set_tags(summary_tags(result))
            except BaseException as err:
                state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                self.storage.set_trial_user_attr(tid, "error", f"{type(err).__name__}: {err}")
                self.fail_item(study, item, state)
                print(f"  {schedule:<12} seed {seed:<4} {state}: {type(err).__name__}: {err}",
                      flush=True)
                if isinstance(err, KeyboardInterrupt):
                    raise
                return
            self.storage.set_trial_user_attr(tid, "state", "complete")
            study.tell(item.number, value)
        print(f"  {schedule:<12} seed {seed:<4} {result.status:<11} {plan.metric} "
              f"{record['final']:.4f}  ({time.perf_counter() - started:.1f}s)", flush=True)


def queue_confirmations(study: optuna.Study, best: FrozenTrial, seeds: list[int]) -> bool:
    """One confirmation item per seed for this best trial, unless one is already queued or done
    (a process that queued some and died is followed by one that queues the rest)."""
    have = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("best_trial") == best.number and t.state != TrialState.FAIL}
    values = best.user_attrs.get("values", best.params)
    for seed in seeds:
        if seed not in have:
            study.enqueue_trial({}, user_attrs={"role": "confirm", "seed": seed,
                                                "best_trial": best.number, "values": values})
    return True


def is_duplicate(study: optuna.Study, item: FrozenTrial) -> bool:
    """A lower-numbered item for the same (best trial, seed) is queued, running or done."""
    key = (item.user_attrs.get("best_trial"), item.user_attrs.get("seed"))
    return any((t.user_attrs.get("best_trial"), t.user_attrs.get("seed")) == key
               and t.number < item.number and t.state != TrialState.FAIL
               for t in study.get_trials(deepcopy=False))


def confirmation_record(result: Any, seed: int) -> dict[str, Any]:
    """What the summary needs of a confirmation run, small enough for a trial attribute."""
    first_group = result.lr_trace[0]["group"] if result.lr_trace else None
    lr = [[r["step"], r["lr"]] for r in result.lr_trace if r["group"] == first_group]
    every = max(1, len(lr) // MAX_LR_POINTS)
    metric = result.metric_name
    final = result.final_metric if result.status != "diverged" else math.nan
    return {"seed": seed, "status": result.status, "final": final,
            "curve": [h[metric] for h in result.history], "lr": lr[::every],
            "epoch_times": [h.get("epoch_time", math.nan) for h in result.history],
            "device": result.device}


def confirmation_records(study: optuna.Study, best: FrozenTrial, seeds: list[int]
                         ) -> list[dict[str, Any]]:
    """The finished confirmation runs of `best`, one per seed, in the order of `seeds`."""
    found: dict[int, dict] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        seed = t.user_attrs.get("seed")
        if t.user_attrs.get("best_trial") == best.number and seed not in found:
            found[seed] = t.user_attrs["outcome"]["record"]
    return [found[s] for s in seeds if s in found]


def say(schedule: str, number: int, state: str, value: float | None, values: dict,
        metric: str, started: float, note: str) -> None:
    """One line per trial; the knobs at 4 significant digits (the storage has them exactly).

    A diverged trial has no value of its own: it is scored as the worst value its schedule has
    seen, so the sampler steers away from it, and the line says so.
    """
    shown = " ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float)
                     else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())
    score = "" if value is None else f"{metric} {value:.4f}"
    if state == "diverged" and value is not None:
        note = f"{note}; scored as the worst {metric} seen, to steer the sampler away"
    print(f"  {schedule:<12} #{number:<3} {state:<11} {score:<16} {shown}  "
          f"({note}, {time.perf_counter() - started:.1f}s)", flush=True)
