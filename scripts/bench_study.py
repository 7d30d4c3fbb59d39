"""What a study costs on top of training: per trial, the framework's time against the training's.

    .venv/bin/python scripts/bench_study.py                   # the default study's model and data
    .venv/bin/python scripts/bench_study.py --trials 8 model=mlp dataset.flatten=true

1. End to end: `--trials` trials of one schedule as the study's worker loop runs them (the trial's
   config, Optuna's sampler and pruner on the study's SQLite storage, a nested MLflow run under the
   study's run, training, the budget check), with pruning off so every trial trains all its epochs.
2. The same configurations trained again with bare `train()`: no Optuna, no MLflow.
3. The overhead split into its parts, each timed alone on the same number of trials.

Everything runs in a temporary directory (its own Optuna storage and MLflow store, both created
before timing starts). Prints the overhead as a share of the training time.
"""

from __future__ import annotations

import argparse
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

    from sweep.config import compose
    from sweep.study import (
        Objective,
        make_plan,
        make_pruner,
        make_sampler,
        open_storage,
        open_studies,
        parent_run,
        schedule_overrides,
        suggest,
        used_budget,
        with_values,
        without_scheduler,
    )
    from sweep.track import mlflow_run, use_store
    from sweep.train import train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    argv = [*args.overrides, f"study.schedules=[{args.schedule}]", f"study.trials={args.trials}",
            "study.pruner=none", f"study.output_dir={tmp / 'study'}"]
    cfg = compose(argv, "sweep")
    plan = make_plan(cfg, argv)
    plan.out_dir.mkdir(parents=True)
    use_store(cfg)  # the MLflow store's tables are created here, outside the timings
    studies = open_studies(plan)
    warm = compose([*without_scheduler(argv), *schedule_overrides(args.schedule, plan.epochs),
                    "tracking=none"], "sweep")
    train(warm, output_dir=tmp)  # first-run costs (allocator, kernels) are not a trial's

    # 1 and 2, interleaved so that a busy machine slows both alike: one trial as the study's
    # worker loop runs it (sampler, pruner, Objective, the budget check after it) under the study's
    # MLflow parent run, then the same configuration bare.
    base = [*without_scheduler(argv), "tracking=none"]
    study = optuna.load_study(study_name=plan.study_name(args.schedule),
                              storage=open_storage(plan.storage),
                              sampler=make_sampler(plan.settings, plan.spaces[args.schedule], 0),
                              pruner=make_pruner(plan.settings, plan.epochs))
    objective = Objective(plan, args.schedule, nested=True)

    def study_trial() -> None:
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        used_budget(study)

    study_s, bare, knobs = [], [], []
    with parent_run(cfg, plan, studies):
        for _ in range(args.trials):
            study_s.append(timed(study_trial)[0])
            knobs.append(study.trials[-1].user_attrs["overrides"])
            trial_cfg = compose([*base, *schedule_overrides(args.schedule, plan.epochs, knobs[-1])],
                                "sweep")
            bare.append(timed(train, trial_cfg, output_dir=tmp)[0])
    trials = study.trials

    # 3. The parts of the overhead, each alone.
    trial_base = compose([*without_scheduler(argv), *schedule_overrides(args.schedule,
                                                                        plan.epochs)], "sweep")
    compose_s = [timed(with_values, trial_base, k)[0] for k in knobs]  # what a trial does
    space = plan.spaces[args.schedule]
    parts = optuna.create_study(storage=open_storage(f"sqlite:///{tmp / 'optuna_parts.db'}"),
                                direction=plan.direction,
                                sampler=make_sampler(plan.settings, space, seed=0),
                                pruner=make_pruner({**plan.settings, "pruner": "median"},
                                                   plan.epochs))
    history = [t.intermediate_values for t in trials]

    def optuna_trial(values: dict[int, float]) -> None:
        trial = parts.ask()
        suggest(trial, space)
        for epoch, value in values.items():
            trial.report(value, epoch)
            trial.should_prune()
        parts.tell(trial, list(values.values())[-1] if values else 0.0)

    optuna_s = [timed(optuna_trial, h)[0] for h in history]
    trial_cfg = compose([*without_scheduler(argv), *schedule_overrides(args.schedule, plan.epochs,
                                                                       knobs[0])], "sweep")
    epochs = [{"epoch": e, "train_loss": 0.1, "val_loss": 0.1, plan.metric: 0.9, "lr": 0.01,
               "grad_norm": 1.0, "epoch_time": 0.1} for e in range(1, plan.epochs + 1)]

    def mlflow_trial() -> None:
        with mlflow_run(trial_cfg, run_name_="bench", tags={"role": "bench"}) as tracker:
            for row in epochs:
                tracker.log_epoch(row["epoch"], row)
            tracker.set_tags({"state": "complete", "status": "completed"})
            tracker.log_step(plan.epochs, {"objective": 0.9})

    mlflow_s = [timed(mlflow_trial)[0] for _ in knobs]

    n = len(knobs)
    median = statistics.median
    train_s = median(bare)
    overhead = median(s - b for s, b in zip(study_s, bare, strict=True))
    rows = [("training alone (bare train(), no tracking)", train_s, min(bare)),
            ("a study trial, end to end", median(study_s), min(study_s)),
            ("framework overhead (paired differences; difference of minima)", overhead,
             min(study_s) - min(bare)),
            ("  the trial's config (schedule's config + the sampled values)", median(compose_s),
             min(compose_s)),
            ("  Optuna: ask, suggest, report+prune per epoch, tell (SQLite)", median(optuna_s),
             min(optuna_s)),
            ("  MLflow: a run with params, config, per-epoch metrics, tags", median(mlflow_s),
             min(mlflow_s))]
    print(f"\n{n} trials of {cfg.choices.model}/{cfg.choices.dataset}, schedule {args.schedule}, "
          f"{plan.epochs} epochs each; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'seconds per trial':<66} {'median':>8} {'min':>8}   % of training (median, min)")
    for label, med, low in rows:
        print(f"  {label:<64} {med:8.3f} {low:8.3f}   {100 * med / train_s:5.1f}% "
              f"{100 * low / min(bare):5.1f}%")
    print(f"overhead / training = {overhead / train_s:.1%} (medians), "
          f"{(min(study_s) - min(bare)) / min(bare):.1%} (minima)")


if __name__ == "__main__":
    sys.exit(main())
