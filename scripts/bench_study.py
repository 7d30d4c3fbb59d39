"""What a study costs on top of training: per trial, the framework's time against the training's.

    .venv/bin/python scripts/bench_study.py                   # the default study's model and data
    .venv/bin/python scripts/bench_study.py --trials 8 model=mlp dataset.flatten=true

1. End to end: `--trials` trials of one schedule through the study's own worker loop (compose the
   trial's config, Optuna's sampler and pruner on a SQLite storage, a nested MLflow run, training),
   pruning off so every trial trains all its epochs.
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
        make_plan,
        make_pruner,
        make_sampler,
        open_storage,
        open_studies,
        parent_run,
        schedule_overrides,
        search,
        suggest,
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

    # 1 and 2, interleaved so that a busy machine slows both alike: one more trial through the
    # study's worker loop (under the study's MLflow parent run), then the same configuration bare.
    base = [*without_scheduler(argv), "tracking=none"]
    study_s, bare, knobs = [], [], []
    with parent_run(cfg, plan, studies):
        for i in range(args.trials):
            plan.budget[args.schedule] = i + 1
            study_s.append(timed(search, plan)[0])
            knobs.append(studies[args.schedule].trials[-1].user_attrs["overrides"])
            trial_cfg = compose([*base, *schedule_overrides(args.schedule, plan.epochs, knobs[-1])],
                                "sweep")
            bare.append(timed(train, trial_cfg, output_dir=tmp)[0])
    trials = studies[args.schedule].trials

    # 3. The parts of the overhead, each alone.
    trial_base = compose([*without_scheduler(argv), *schedule_overrides(args.schedule,
                                                                        plan.epochs)], "sweep")
    compose_s = [timed(with_values, trial_base, k)[0] for k in knobs]  # what a trial does
    space = plan.spaces[args.schedule]
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp / 'optuna_parts.db'}"),
                                direction=plan.direction,
                                sampler=make_sampler(plan.settings, space, seed=0),
                                pruner=make_pruner({**plan.settings, "pruner": "median"},
                                                   plan.epochs))
    history = [t.intermediate_values for t in trials]

    def optuna_trial(values: dict[int, float]) -> None:
        trial = study.ask()
        suggest(trial, space)
        for epoch, value in values.items():
            trial.report(value, epoch)
            trial.should_prune()
        study.tell(trial, list(values.values())[-1] if values else 0.0)

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
    train_mean = median(bare)
    overhead = median(s - b for s, b in zip(study_s, bare, strict=True))
    rows = [("training alone (bare train(), no tracking)", train_mean),
            ("a study trial, end to end", median(study_s)),
            ("framework overhead (median of paired differences)", overhead),
            ("  the trial's config (schedule's config + the sampled values)", median(compose_s)),
            ("  Optuna: ask, suggest, report+prune per epoch, tell (SQLite)", median(optuna_s)),
            ("  MLflow: a run with params, config, per-epoch metrics, tags", median(mlflow_s))]
    print(f"\n{n} trials of {cfg.choices.model}/{cfg.choices.dataset}, schedule {args.schedule}, "
          f"{plan.epochs} epochs each; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("medians over the trials; % of the training time")
    for label, seconds in rows:
        print(f"  {label:<64} {seconds:7.3f} s  {100 * seconds / train_mean:5.1f}%")
    print(f"overhead / training = {overhead / train_mean:.1%}")


if __name__ == "__main__":
    sys.exit(main())
