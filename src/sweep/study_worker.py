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

from sweep import faults, fused
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
from sweep.track import member_runs, summary_tags
from sweep.train import Callback, check_parts

POLL_S = 1.0           # how often a worker with nothing to claim looks at the storage again
WAIT_NOTE_S = 30.0     # how often a waiting worker says what it waits for
MAX_LR_POINTS = 500    # lr points kept per confirmation run (enough for a plot, small in storage)
# The search asks for at most budget / SEARCH_ROUNDS trials at once (and `fuse`): trials asked
# together are sampled without each other's results, so the sampler learns between rounds.
SEARCH_ROUNDS = 4
# A trial another process declared dead while this one still ran it: its heartbeat missed the
# grace period (a stalled machine or storage). That process kept the trial's recorded outcome or
# queued it again (`OnStale`); this one lets it go instead of crashing on the finished trial.
# Its writes raise `Finished` then; its tells skip a finished trial (`study.tell` would raise
# ValueError if the trial ended between the write and the tell).
TAKEN_OVER = "taken over"
TAKEN_OVER_NOTE = ("declared dead by another process meanwhile (no heartbeat within "
                   "study.grace_period): the storage keeps its recorded result or runs it again")
Finished = optuna.exceptions.UpdateFinishedTrialError


def search_batch(fuse: Any, budget: int) -> int:
    """How many of a schedule's trials one worker asks for, and trains fused, at once."""
    return max(1, min(fused.fuse_size(fuse), budget // SEARCH_ROUNDS))


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
        # The batch of trials this process asked or claimed last (every earlier batch is told):
        # on Ctrl-C those not yet told end at once.
        self.held: list[tuple[optuna.Study, int]] = []

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
        """Search, then confirm; returns when the storage holds nothing left to do.

        On Ctrl-C every trial this process holds and has not told (asked and not yet sampled,
        waiting for its fused group, claimed for confirmation) ends `interrupted` before the
        process does, so the next run takes its place at once instead of after
        `study.grace_period`.
        """
        try:
            self.search()
            self.confirm()
        except KeyboardInterrupt:
            self.let_go()
            raise

    def let_go(self) -> None:
        for study, number in self.held:
            if self.storage.get_trial(trial_id(self.storage, study, number)).state == (
                    TrialState.RUNNING):
                self.fail_item(study, number, "interrupted")

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
        fuse = self.base(plan.schedules[0]).fuse
        while True:
            worked, busy = False, False
            for name in order:
                study = studies[name]
                self.liveness.reap(study)
                size = search_batch(fuse, plan.budget[name])
                while trials := self.take_slots(study, plan.budget[name], size):
                    self.run_trials(study, trials, name)
                    print(progress.line(studies, plan.budget), flush=True)
                    worked = True
                while (queued := claim(self.storage, study)) is not None:
                    self.fail_item(study, queued.number, "surplus")  # a retry past the budget
                busy |= bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if not busy:
                return
            if not worked:  # other workers' trials are running: wait, and reap
                self.wait(list(studies.values()))

    def take_slots(self, study: optuna.Study, budget: int, size: int) -> list[optuna.Trial]:
        """Up to `size` new (or queued) trials, as many as the budget has room for.

        Two workers can ask for the last slot at the same moment; the storage numbers their
        trials, and the higher number gives its trial up before sampling anything.
        """
        trials: list[optuna.Trial] = []
        self.held = []
        while len(trials) < size and used_budget(study) < budget:
            trial = ask(study)
            self.held.append((study, trial.number))
            if used_budget(study, before=trial.number) >= budget:
                trial.set_user_attr("state", "surplus")
                study.tell(trial, state=TrialState.FAIL)
                break
            trials.append(trial)
        if trials:
            faults.point("asked")
        return trials

    def run_trials(self, study: optuna.Study, trials: list[optuna.Trial], schedule: str) -> None:
        """Search trials: sample each (TPE's `constant_liar` counts the ones just asked as
        running), train them (fused where they can be; each reports every epoch for pruning,
        and a pruned member stops alone), record, tell."""
        plan, started = self.plan, time.perf_counter()
        tids = [trial_id(self.storage, study, trial.number) for trial in trials]
        with self.liveness.heartbeat(*tids):
            sampled, cfgs = [], []
            for trial in trials:
                trial.set_user_attr("role", "trial")
                values: dict[str, Any] = {}
                try:
                    values = suggest(trial, plan.spaces[schedule])
                    trial.set_user_attr("values", values)
                    trial.set_user_attr("overrides", knob_overrides(values))
                    cfg = with_values(self.base(schedule), values)
                    # A value its parts refuse (a schedule longer than the run) fails this trial
                    # alone, before it joins a fused group.
                    check_parts(cfg)
                except BaseException as err:
                    self.trial_failed(study, trial, schedule, values, started, err)
                    if isinstance(err, KeyboardInterrupt):
                        raise
                    continue
                sampled.append((trial, values))
                cfgs.append(cfg)
            for group in fused.groups(cfgs, cfgs[0].fuse if cfgs else 1):
                members = [sampled[i] for i in group]
                try:
                    outcomes = self.train_trials(study, members, [cfgs[i] for i in group],
                                                 schedule)
                except BaseException as err:  # recorded, then told as FAIL; Ctrl-C goes on up
                    for trial, values in members:
                        self.trial_failed(study, trial, schedule, values, started, err)
                    if isinstance(err, KeyboardInterrupt):
                        raise
                    continue
                for (trial, values), (value, state, epochs) in zip(members, outcomes,
                                                                   strict=True):
                    note = f"epoch {epochs}" + (f", {len(group)} fused" if len(group) > 1 else "")
                    try:
                        if state != TAKEN_OVER:
                            trial.set_user_attr("state", state)
                            if state == "pruned":
                                study.tell(trial, state=TrialState.PRUNED,
                                           skip_if_finished=True)
                            else:
                                study.tell(trial, value, skip_if_finished=True)
                    except Finished:
                        state = TAKEN_OVER
                    if state == TAKEN_OVER:
                        value, note = None, f"{note}; {TAKEN_OVER_NOTE}"
                    say(schedule, trial.number, state, value, values, plan.metric, started, note)

    def trial_failed(self, study: optuna.Study, trial: optuna.Trial, schedule: str,
                     values: dict[str, Any], started: float, err: BaseException) -> None:
        state, note = ("interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
                       f"{type(err).__name__}: {err}")
        try:
            trial.set_user_attr("state", state)
            trial.set_user_attr("error", note[:2000])
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        except Finished:
            state, note = TAKEN_OVER, f"{note}; {TAKEN_OVER_NOTE}"
        say(schedule, trial.number, state, None, values, self.plan.metric, started, note)

    def train_trials(self, study: optuna.Study, members: list[tuple[optuna.Trial, dict]],
                     cfgs: list[DictConfig], schedule: str) -> list[tuple[float, str, int]]:
        """Train the sampled values, each in its trial's MLflow run: (value, state, epochs run)
        per trial."""
        plan = self.plan
        pruned = [False] * len(members)
        taken = [False] * len(members)  # declared dead elsewhere while training here

        def reporter(k: int, trial: optuna.Trial) -> Callback:
            def report(epoch: int, metrics: dict[str, float]) -> bool:
                try:
                    trial.report(metrics[plan.metric], epoch)
                except Finished:
                    taken[k] = True
                    return True  # stop this member alone; the others train on
                faults.point("mid_trial")
                # None of our pruners stops a trial before warmup_epochs; asking reads the
                # storage.
                pruned[k] = epoch >= plan.settings["warmup_epochs"] and trial.should_prune()
                value = metrics[plan.metric]
                if pruned[k] and math.isfinite(value):
                    # Its training ends here, while a fused group's other members train on: its
                    # result reaches the storage now, so a worker killed before the group ends
                    # recovers it instead of training it again.
                    try:
                        trial.set_user_attr("outcome", {"state": "pruned", "value": value})
                    except Finished:
                        taken[k] = True
                    faults.point("pruned")
                return pruned[k]  # stop this member, close its run cleanly, then tell Optuna
            return report

        names = [f"{schedule}-{trial.number}" for trial, _ in members]
        tags = [{"role": "trial", "study": plan.name, "schedule": schedule,
                 "optuna.study": plan.study_name(schedule), "optuna.trial": str(trial.number)}
                for trial, _ in members]
        with member_runs(cfgs, names, tags, plan.parent_run_id) as trackers:
            for k, ((trial, _), tracker) in enumerate(zip(members, trackers, strict=True)):
                if tracker is not None:
                    try:
                        trial.set_user_attr("mlflow_run_id", tracker.run_id)
                    except Finished:
                        taken[k] = True
            try:
                results = fused.train_group(
                    cfgs, callbacks=[reporter(k, trial) for k, (trial, _) in enumerate(members)],
                    trackers=trackers, output_dirs=[plan.out_dir / "runs" / n for n in names])
            except BaseException as err:
                state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                for tracker in trackers:
                    if tracker is not None:
                        tracker.set_tags({"state": state,
                                          "error": f"{type(err).__name__}: {err}"})
                raise
            outcomes = []
            for (trial, _), result, stopped, lost in zip(members, results, pruned, taken,
                                                         strict=True):
                value, state = result.final_metric, "pruned" if stopped else "complete"
                if result.status == "diverged" or not math.isfinite(value):
                    state, value = "diverged", diverged_value(study, plan.metric, result.history)
                try:
                    # The result reaches the storage before anything else can be interrupted: a
                    # worker killed from here on is recovered from it, not trained again.
                    if not lost:
                        trial.set_user_attr("outcome", {"state": state, "value": value})
                except Finished:
                    lost = True
                state = TAKEN_OVER if lost else state
                outcomes.append((value, state, len(result.history)))
            faults.point("after_train")
            for tracker, result, (value, state, _) in zip(trackers, results, outcomes,
                                                          strict=True):
                if tracker is not None:  # one-off numbers as tags: no single-point charts
                    tracker.set_tags({**summary_tags(result), "state": state,
                                      "objective": f"{value:.6g}"})
                    if state == TAKEN_OVER:
                        tracker.ended_as = "KILLED"
        return outcomes

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
        size = fused.fuse_size(self.base(plan.schedules[0]).fuse)
        while True:
            for study in studies.values():
                self.liveness.reap(study)
            # Up to `fuse` items, across the schedules: one model, each its own schedule and seed,
            # so they train fused (`sweep.fused`).
            batch: list[tuple[optuna.Study, FrozenTrial, str]] = []
            self.held = []
            for name, study in studies.items():
                while len(batch) < size and (
                        item := claim(self.storage, study, self.liveness)) is not None:
                    self.held.append((study, item.number))
                    if is_duplicate(study, item):
                        self.fail_item(study, item.number, "duplicate")
                        continue
                    batch.append((study, item, name))
            if batch:
                self.run_confirmations(batch)
                print(progress.line(studies, dict.fromkeys(studies, len(seeds))), flush=True)
                continue
            if not any(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       for study in studies.values()):
                return
            self.wait(list(studies.values()))

    def fail_item(self, study: optuna.Study, number: int, why: str,
                  error: str | None = None) -> None:
        """End trial `number` FAIL, saying why (and the error), unless it has ended already."""
        tid = trial_id(self.storage, study, number)
        try:
            if error is not None:
                self.storage.set_trial_user_attr(tid, "error", error)
            self.storage.set_trial_user_attr(tid, "state", why)
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        except Finished:
            pass  # told meanwhile, or declared dead elsewhere: already ended there

    def run_confirmations(self, batch: list[tuple[optuna.Study, FrozenTrial, str]]) -> None:
        """Train the claimed items (each schedule's best configuration with one seed), as
        children of the study's MLflow run, fused where they can be."""
        cfgs = [with_values(self.base(schedule), {**item.user_attrs["values"],
                                                  "seed": item.user_attrs["seed"]})
                for _, item, schedule in batch]
        tids = [trial_id(self.storage, study, item.number) for study, item, _ in batch]
        with self.liveness.heartbeat(*tids):
            for group in fused.groups(cfgs, cfgs[0].fuse):
                self.confirm_group([batch[i] for i in group], [cfgs[i] for i in group],
                                   [tids[i] for i in group])

    def confirm_group(self, items: list[tuple[optuna.Study, FrozenTrial, str]],
                      cfgs: list[DictConfig], tids: list[int]) -> None:
        """One group of `fused.groups`: each item its own MLflow run; outcomes reach the storage
        before the runs close, then each item is told; a failure fails every item of the group."""
        plan, started = self.plan, time.perf_counter()
        seeds = [item.user_attrs["seed"] for _, item, _ in items]
        names = [f"{schedule}-best-seed{seed}" for (_, _, schedule), seed in zip(items, seeds,
                                                                                  strict=True)]
        tags = [{"role": "confirm", "study": plan.name, "schedule": schedule, "seed": str(seed),
                 "optuna.trial": str(item.user_attrs["best_trial"])}
                for (_, item, schedule), seed in zip(items, seeds, strict=True)]
        taken = [False] * len(items)  # declared dead elsewhere while here
        try:
            with member_runs(cfgs, names, tags, plan.parent_run_id) as trackers:
                for k, (tracker, tid) in enumerate(zip(trackers, tids, strict=True)):
                    if tracker is not None:
                        try:
                            self.storage.set_trial_user_attr(tid, "mlflow_run_id", tracker.run_id)
                        except Finished:
                            taken[k] = True
                results = fused.train_group(cfgs, trackers=trackers,
                                            output_dirs=[plan.out_dir / "runs" / n for n in names])
                records, values = [], []
                for k, (result, seed, tid) in enumerate(zip(results, seeds, tids, strict=True)):
                    record = confirmation_record(result, seed)
                    value = record["final"] if math.isfinite(record["final"]) else (
                        -math.inf if plan.direction == "maximize" else math.inf)
                    try:
                        if not taken[k]:
                            self.storage.set_trial_user_attr(tid, "outcome", {
                                "state": "complete", "value": value, "record": record})
                    except Finished:
                        taken[k] = True
                    records.append(record)
                    values.append(value)
                faults.point("confirm")
                for tracker, result, lost in zip(trackers, results, taken, strict=True):
                    if tracker is not None:
                        tracker.set_tags({**summary_tags(result),
                                          **({"state": TAKEN_OVER} if lost else {})})
                        if lost:
                            tracker.ended_as = "KILLED"
        except BaseException as err:
            state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            for (study, item, schedule), seed in zip(items, seeds, strict=True):
                self.fail_item(study, item.number, state, f"{type(err).__name__}: {err}")
                print(f"  {schedule:<12} seed {seed:<4} {state}: {type(err).__name__}: {err}",
                      flush=True)
            if isinstance(err, KeyboardInterrupt):
                raise
            return
        elapsed = time.perf_counter() - started
        together = f", {len(items)} fused" if len(items) > 1 else ""
        for (study, item, schedule), tid, result, record, value, lost in zip(
                items, tids, results, records, values, taken, strict=True):
            try:
                if not lost:
                    self.storage.set_trial_user_attr(tid, "state", "complete")
                    study.tell(item.number, value, skip_if_finished=True)
            except Finished:
                lost = True
            if lost:
                print(f"  {schedule:<12} seed {record['seed']:<4} {TAKEN_OVER}: "
                      f"{TAKEN_OVER_NOTE}", flush=True)
                continue
            print(f"  {schedule:<12} seed {record['seed']:<4} {result.status:<11} {plan.metric} "
                  f"{record['final']:.4f}  ({elapsed:.1f}s{together})", flush=True)


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
