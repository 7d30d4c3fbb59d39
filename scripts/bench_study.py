"""What a study costs on top of training: per trial, the framework's time against the training's.

    .venv/bin/python scripts/bench_study.py                   # the default study's model and data
    .venv/bin/python scripts/bench_study.py --trials 8 model=mlp dataset.flatten=true

1. End to end: `--trials` trials of one schedule exactly as a study's worker runs them
   (`sweep.study_worker.Worker.take_slot` + `run_trial`: the budget check and ask, the sampled
   values and the trial's config, the heartbeat, Optuna's report and prune check every epoch on
   the study's SQLite storage, a nested MLflow run under the study's run, training, recording the
   outcome, tell), with pruning off so every trial trains all its epochs.
2. After each, the same configuration trained again with bare `train()`: no Optuna, no MLflow.
3. The overhead split into its parts, each timed alone on the same number of trials: the trial's
   config; Optuna and the worker's bookkeeping (the same `run_trial` on a second storage, with
   tracking off and training replaced by replaying the trial's per-epoch metrics); MLflow (a run
   with params, config, the same per-epoch metrics and tags).

Everything runs in a temporary directory (its own Optuna storage and MLflow store, both created
before timing starts). Prints the overhead as a share of the training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--schedule", default="step")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for sweep.study")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_study_"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.chdir(tmp)

    import optuna
    import torch

    import sweep.study_worker
    import sweep.train
    from sweep.config import compose
    from sweep.launch import threads_per_worker
    from sweep.mlflow_store import use_store
    from sweep.study import make_plan, open_studies, parent_run
    from sweep.study_optuna import make_pruner, make_sampler
    from sweep.study_plan import with_values
    from sweep.study_storage import create_study
    from sweep.study_worker import Worker
    from sweep.track import mlflow_run
    from sweep.train import train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    schedule = args.schedule
    argv = [*args.overrides, f"study.schedules=[{schedule}]", f"study.trials={args.trials}",
            "study.pruner=none", "study.name=bench", f"study.output_dir={tmp / 'study'}"]
    cfg = compose(argv, "sweep")
    plan = make_plan(cfg, argv)
    plan.out_dir.mkdir(parents=True)
    torch.set_num_threads(threads_per_worker(plan.settings, plan.workers))  # as a worker does
    use_store(cfg)  # the MLflow store's tables are created here, outside the timings
    worker = Worker(plan)
    open_studies(worker)
    plan.parent_run_id = parent_run(cfg, worker)  # the study's MLflow run, as run_study makes it
    untracked = {"tracking.enabled": False}
    base = worker.base(schedule)  # composed once per schedule, as in a study
    train(with_values(base, untracked), output_dir=tmp)  # first-run costs are not a trial's

    # 1 and 2, interleaved so that a busy machine slows both alike: one trial as the study's worker
    # loop runs it, then the same configuration bare.
    s = plan.settings
    study = worker.study(schedule, sampler=make_sampler(s, plan.spaces[schedule], s["seed"]),
                         pruner=make_pruner(s, plan.epochs))
    budget = plan.budget[schedule]

    def study_trial() -> optuna.Trial:
        trial = worker.take_slot(study, budget)
        worker.run_trial(study, trial, schedule)
        return trial

    study_s, bare, values, dropped = [], [], [], 0
    for _ in range(args.trials):
        took, trial = timed(study_trial)
        took_bare = timed(train, with_values(base, {**trial.user_attrs["values"], **untracked}),
                          output_dir=tmp)[0]
        if trial.user_attrs["state"] != "complete":  # a diverged trial stops early: not a pair
            dropped += 1
            continue
        study_s.append(took)
        values.append(trial.user_attrs["values"])
        bare.append(took_bare)
    trials = [t for t in study.get_trials() if t.user_attrs.get("role") == "trial"]

    # 3. The parts of the overhead, each alone.
    compose_s = [timed(with_values, base, v)[0] for v in values]  # what a trial does
    # Optuna and the worker's bookkeeping: the same run_trial on a storage of its own, with
    # tracking off and train() replaced by replaying the trial's recorded metrics.
    parts_plan = dataclasses.replace(plan, storage=f"sqlite:///{tmp / 'optuna_parts.db'}",
                                     tracking=False, tracking_uri=None, parent_run_id=None)
    parts = Worker(parts_plan)
    parts.bases[schedule] = with_values(base, untracked)
    create_study(parts.storage, plan.study_name(schedule), plan.direction)
    parts_study = parts.study(schedule, sampler=make_sampler(s, plan.spaces[schedule], s["seed"]),
                              pruner=make_pruner(s, plan.epochs))
    history = iter([[{plan.metric: v} for _, v in sorted(t.intermediate_values.items())]
                    for t in trials])

    replayed = []

    def replay(cfg, callback=None, tracker=None, output_dir=None) -> sweep.train.TrainResult:
        replayed.append(1)
        rows = next(history)
        for epoch, row in enumerate(rows, 1):
            if callback is not None and callback(epoch, row):
                break
        return sweep.train.TrainResult(status="completed", metric_name=plan.metric,
                                       direction=plan.direction, history=rows,
                                       best_metric=rows[-1][plan.metric])

    # train() replaced wherever the worker looks it up: its own module, or sweep.train's.
    modules = [m for m in (sweep.study_worker, sweep.train) if hasattr(m, "train")]
    real = [m.train for m in modules]
    for module in modules:
        module.train = replay
    try:
        optuna_s = [timed(lambda: parts.run_trial(parts_study, parts.take_slot(
            parts_study, budget), schedule))[0] for _ in trials]
    finally:
        for module, fn in zip(modules, real, strict=True):
            module.train = fn
    if len(replayed) != len(trials):
        sys.exit("the worker trained for real in the Optuna row: bench_study.py must replace "
                 "train() where sweep.study_worker looks it up")
    epochs = [{"epoch": e, "train_loss": 0.1, "val_loss": 0.1, plan.metric: 0.9, "lr": 0.01,
               "grad_norm": 1.0, "epoch_time": 0.1} for e in range(1, plan.epochs + 1)]
    trial_cfg = with_values(base, values[0])
    tags = {"role": "bench", "mlflow.parentRunId": plan.parent_run_id}

    def mlflow_trial() -> None:
        with mlflow_run(trial_cfg, run_name_="bench", tags=tags) as tracker:
            for row in epochs:
                tracker.log_epoch(row["epoch"], row)
            tracker.set_tags({"state": "complete"})
            tracker.log_step(plan.epochs, {"objective": 0.9, f"best_{plan.metric}": 0.9})

    mlflow_s = [timed(mlflow_trial)[0] for _ in values]

    n = len(values)
    median = statistics.median
    train_s = median(bare)
    overhead = median(s - b for s, b in zip(study_s, bare, strict=True))
    rows = [("training alone (bare train(), no tracking)", train_s, min(bare)),
            ("a study trial, end to end", median(study_s), min(study_s)),
            ("framework overhead (paired differences; difference of minima)", overhead,
             min(study_s) - min(bare)),
            ("  the trial's config (schedule's config + the sampled values)", median(compose_s),
             min(compose_s)),
            ("  Optuna + worker: slot, ask, heartbeat, report+prune, tell; + the config",
             median(optuna_s), min(optuna_s)),
            ("  MLflow: a run with params, config, per-epoch metrics, tags", median(mlflow_s),
             min(mlflow_s))]
    print(f"\n{n} trials of {cfg.choices.model}/{cfg.choices.dataset}, schedule {schedule}, "
          f"{plan.epochs} epochs each; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} cores, Python {platform.python_version()}, Optuna "
          f"{optuna.__version__}, load average {os.getloadavg()[0]:.1f}"
          + (f"; {dropped} diverged trial(s) left out" if dropped else ""))
    print(f"{'seconds per trial':<70} {'median':>8} {'min':>8}   % of training (median, min)")
    for label, med, low in rows:
        print(f"  {label:<68} {med:8.3f} {low:8.3f}   {100 * med / train_s:5.1f}% "
              f"{100 * low / min(bare):5.1f}%")
    print(f"overhead / training = {overhead / train_s:.1%} (medians), "
          f"{(min(study_s) - min(bare)) / min(bare):.1%} (minima)")


if __name__ == "__main__":
    sys.exit(main())
