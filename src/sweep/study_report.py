"""After the search and the confirmation runs: the comparison, built from what the storage holds.

The summary names a winner only when the runner-up is worse by more than the seed-to-seed noise:
the confirmation runs pair up by seed, and the test is `sweep.report`'s (a paired t-test, p < 0.05),
so the study's summary and the report read back from MLflow agree. A smaller gap is what a
different seed could undo. Everything here is read from the Optuna storage, so every process of
a study prints the same summary; one of them (elected in the storage) publishes it to MLflow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig

from sweep import faults
from sweep.dburl import sqlalchemy_url
from sweep.plots import lr_figure
from sweep.report import compare
from sweep.study_optuna import best_trial, trial_state
from sweep.study_plan import Plan, knob_overrides, rerun_command
from sweep.study_storage import once
from sweep.study_worker import Worker, confirmation_records
from sweep.track import Tracker

TALLY = ("complete", "pruned", "diverged", "failed")


@dataclass
class Row:
    """One schedule's line in the comparison."""

    schedule: str
    tally: dict[str, int]                  # trials by state: complete, pruned, diverged, failed
    best_trial: int | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # the best trial's values
    command: str = ""                      # `python -m sweep ...` rerunning the best configuration
    runs: list[dict] = field(default_factory=list)   # one record per confirmation seed
    to_target: list[int | None] = field(default_factory=list)  # epochs to reach the target

    @property
    def values(self) -> list[float]:
        return [r["final"] for r in self.runs if math.isfinite(r["final"])]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


@dataclass
class Summary:
    """The comparison: rows ranked best first, the verdict, and where everything was written."""

    rows: list[Row]
    metric: str
    direction: str
    target: float | None
    winner: str | None
    verdict: str
    text: str                              # what is printed: the table and the lines under it
    out_dir: Path


# --- rows from the storage ----------------------------------------------------------------------

def schedule_row(worker: Worker, schedule: str) -> Row:
    """A schedule's trials by state, its best trial and the confirmation runs of it."""
    plan = worker.plan
    study = worker.study(schedule)
    trials = study.get_trials(deepcopy=False)
    row = Row(schedule, {k: sum(trial_state(t) == k for t in trials) for k in TALLY})
    best = best_trial(study)
    if best is None:
        return row
    values = best.user_attrs.get("values", best.params)
    row.best_trial, row.knobs = best.number, dict(values)
    row.command = rerun_command(plan, schedule, values)
    row.runs = confirmation_records(worker.confirm_study(schedule), best,
                                    list(plan.settings["seeds"]))
    return row


def epochs_to(curve: list[float], target: float, maximize: bool) -> int | None:
    """The first epoch (1-based) whose metric reaches the target, or None."""
    for epoch, value in enumerate(curve, start=1):
        if (value >= target) if maximize else (value <= target):
            return epoch
    return None


def verdict(ranked: list[Row], metric: str, maximize: bool) -> tuple[str | None, str]:
    """The winner, if the runner-up is worse than it by more than the seed-to-seed noise."""

    if not ranked:
        return None, "no schedule completed a trial: nothing to compare"
    first = ranked[0]
    if len(ranked) == 1:
        return None, f"only {first.schedule} completed a trial: nothing to compare it with"
    second = ranked[1]

    def by_seed(row: Row) -> dict[int, float]:
        return {r["seed"]: r["final"] for r in row.runs if math.isfinite(r["final"])}

    test = compare(by_seed(first), by_seed(second), maximize)
    if test.test == "too few seeds":
        return None, ("no winner named: set study.seeds to two or more seeds to measure the "
                      "seed-to-seed noise")
    evidence = f"{test.test} over {test.n} seeds, p = {test.p:.2g}"
    if test.beyond_noise:
        return first.schedule, (f"winner: {first.schedule} ({metric} {first.mean:.4f} vs "
                                f"{second.schedule} {second.mean:.4f}; {evidence})")
    return None, (f"no clear winner: {first.schedule} leads {second.schedule} by "
                  f"{abs(first.mean - second.mean):.4f}, within the seed-to-seed noise "
                  f"({evidence})")


# --- the table and files --------------------------------------------------------------------------

def shown(value: Any) -> str:
    """A knob's value in a table: 4 significant digits (the command keeps every digit)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cells(row: Row, metric: str) -> list[str]:
    knobs = dict(row.knobs)
    lr = shown(knobs.pop("optimizer.lr")) if "optimizer.lr" in knobs else "-"
    other = " ".join(f"{k.rsplit('.', 1)[-1]}={shown(v)}" for k, v in knobs.items()) or "-"
    diverged = sum(r["status"] == "diverged" for r in row.runs)
    score = f"{row.mean:.4f} ± {row.std:.4f}" if row.values else "-"
    if diverged:
        score += f" ({diverged} diverged)"
    reached = [e for e in row.to_target if e is not None]
    to_target = "-" if not reached else f"{statistics.fmean(reached):.1f}" + (
        "" if len(reached) == len(row.to_target) else f" ({len(reached)}/{len(row.to_target)})")
    tally = " / ".join(str(row.tally[k]) for k in TALLY)
    if row.best_trial is None:
        return [row.schedule, "-", "no trial completed", "-", "-", "-", tally]
    return [row.schedule, lr, other, score, str(len(row.runs)), to_target, tally]


def markdown_table(rows: list[Row], metric: str, target: float | None) -> str:
    """An aligned Markdown table: readable on a terminal and rendered in MLflow and on GitHub."""
    head = ["schedule", "lr", "knobs", f"{metric} mean ± std", "seeds",
            f"epochs to {target:.4g}" if target is not None else "epochs to target",
            "trials done / pruned / diverged / failed"]
    body = [cells(r, metric) for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def write_files(summary: Summary, plan: Plan) -> list[Path]:
    """summary.md, summary.csv and best_overrides/<schedule>.txt in the output directory."""
    out = plan.out_dir
    (out / "summary.md").write_text(f"# Study {plan.settings['name']}\n\n{summary.text}\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["schedule", "best_trial", "knobs", f"{summary.metric}_mean",
                    f"{summary.metric}_std", "seeds", "values", "epochs_to_target",
                    *[f"trials_{k}" for k in TALLY], "command"])
        for r in summary.rows:
            w.writerow([r.schedule, r.best_trial, " ".join(knob_overrides(r.knobs)), r.mean,
                        r.std, len(r.runs),
                        " ".join(f"{v:.6g}" for v in r.values),
                        " ".join("-" if e is None else str(e) for e in r.to_target),
                        *[r.tally[k] for k in TALLY], r.command])
    (out / "best_overrides").mkdir(exist_ok=True)
    written = [out / "summary.md", out / "summary.csv"]
    for r in summary.rows:
        if r.command:
            path = out / "best_overrides" / f"{r.schedule}.txt"
            path.write_text(r.command + "\n")
            written.append(path)
    return written


def cli_storage(url: str) -> str:
    """The storage as Optuna's command line takes it: with the driver named, and a journal file
    as `optuna` has no flag for it, only its path (read it with JournalFileBackend)."""
    return url if url.endswith((".journal", ".log")) else sqlalchemy_url(url)


# --- plots ----------------------------------------------------------------------------------------

def figure_of(axes: Any) -> Any:
    import numpy as np

    return np.asarray(axes).flat[0].figure  # Optuna returns an Axes or an array of them


def optuna_figures(studies: dict[str, optuna.Study], plan: Plan) -> dict[str, Any]:
    """Optimisation history (all schedules), and per schedule importances and lr x knob contour."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    figures: dict[str, Any] = {}
    # Optuna's plots switch pyplot's global style to ggplot: keep that to them.
    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        history = figure_of(ovm.plot_optimization_history(list(studies.values()),
                                                          target_name=plan.metric))
        history.set_size_inches(11, 5)  # room for the plot beside its legend of schedules
        figures["optimization_history.png"] = history
        for name, study in studies.items():
            done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if len(done) < 2:
                continue
            numeric = [k for k, s in plan.spaces[name].items() if s["type"] != "categorical"]
            pair = ["optimizer.lr"] + [k for k in numeric if k != "optimizer.lr"][:1]
            if len(pair) == 2 and "optimizer.lr" in numeric:  # lr x gamma (or the first knob)
                landscape = (f"contour_{name}.png", ovm.plot_contour, {"params": pair})
            else:
                landscape = (f"slice_{name}.png", ovm.plot_slice, {})
            for file, plot, kwargs in [(f"importances_{name}.png", ovm.plot_param_importances, {}),
                                       landscape]:
                try:
                    figures[file] = figure_of(plot(study, **kwargs))
                except (ValueError, RuntimeError, ZeroDivisionError) as err:
                    print(f"  (no {file}: {err})")  # e.g. every trial had the same value
    return figures


def curve_figures(rows: list[Row], metric: str) -> dict[str, Any]:
    """The best configurations' validation curves (mean and range over seeds) and lr curves."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        curves = [r["curve"] for r in row.runs if r["curve"]]
        if not curves:
            continue
        n = min(map(len, curves))
        stack = np.array([c[:n] for c in curves])
        epochs = np.arange(1, n + 1)
        ax.plot(epochs, stack.mean(0), marker="o", ms=3, label=f"{row.schedule} ({len(curves)})")
        ax.fill_between(epochs, stack.min(0), stack.max(0), alpha=0.2)
    ax.set(xlabel="epoch", ylabel=metric,
           title="best configuration of each schedule (mean, range over seeds)")
    ax.legend()
    lrs = {r.schedule: [{"step": s, "lr": lr, "group": "default", "epoch": 0}
                        for s, lr in r.runs[0]["lr"]] for r in rows if r.runs and r.runs[0]["lr"]}
    return {"best_val_curves.png": fig, "best_lr_curves.png": lr_figure(lrs)}


def save_figures(figures: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")
        plt.close(fig)  # Optuna's plots are pyplot figures; ours are not (closing them is a no-op)
        paths.append(folder / name)
    return paths


# --- all of it ------------------------------------------------------------------------------------

def summarize(cfg: DictConfig, worker: Worker) -> Summary:
    """Rank the schedules from the storage and write the summary files; one process of the study
    also draws the plots and attaches everything to the study's MLflow run."""
    plan = worker.plan
    maximize = plan.direction == "maximize"
    rows = [schedule_row(worker, name) for name in plan.schedules]
    ranked = sorted((r for r in rows if r.values), key=lambda r: r.mean, reverse=maximize)
    rows = ranked + [r for r in rows if not r.values]
    target = cfg.study.target
    if target is None and ranked:  # the level every schedule reaches on average: the worst mean
        target = ranked[-1].mean
    for row in rows:
        row.to_target = [epochs_to(r["curve"], target, maximize) for r in row.runs]
    winner, line = verdict(ranked, plan.metric, maximize)
    how = "set by study.target" if cfg.study.target is not None else "the worst schedule's mean"
    notes = [line]
    if target is not None:
        notes.append(f'"epochs to {target:.4g}": first epoch at {plan.metric} '
                     f"{'>=' if maximize else '<='} {target:.4g} ({how}), mean over seeds")
    notes.append(f"trials: the pruner ({plan.settings['pruner']}) stopped "
                 f"{sum(r.tally['pruned'] for r in rows)} of "
                 f"{sum(sum(r.tally.values()) for r in rows)}; best configurations, rerun as is:")
    notes += [f"  {r.command}" for r in rows if r.command]
    notes.append(f"written to {plan.out_dir}: summary.md, summary.csv, best_overrides/, plots/")
    notes.append(f"Optuna storage {plan.storage}: `optuna trials --study-name "
                 f"{plan.study_name(plan.schedules[0])} --storage {cli_storage(plan.storage)}`")
    text = markdown_table(rows, plan.metric, target) + "\n\n" + "\n".join(notes)
    summary = Summary(rows, plan.metric, plan.direction, target, winner, line, text, plan.out_dir)
    written = write_files(summary, plan)
    # Published once per distinct result: a study resumed with a larger budget publishes again.
    fingerprint = hashlib.sha1(json.dumps([(r.schedule, r.best_trial, [x["seed"] for x in r.runs])
                                           for r in rows]).encode()).hexdigest()[:12]
    once(worker.storage, f"{plan.name}/published/{fingerprint}",
         lambda: publish(cfg, worker, summary, ranked, written), worker.liveness)
    return summary


def publish(cfg: DictConfig, worker: Worker, summary: Summary, ranked: list[Row],
            written: list[Path]) -> bool:
    """Plots, and the summary on the study's MLflow run, which is then marked finished."""
    plan = worker.plan
    plots: list[Path] = []
    if cfg.study.plots:
        studies = {name: worker.study(name) for name in plan.schedules}
        figures = {**optuna_figures(studies, plan), **curve_figures(ranked, plan.metric)}
        plots = save_figures(figures, plan.out_dir / "plots")
    faults.point("summary")
    if plan.parent_run_id:
        import mlflow


        mlflow.set_tracking_uri(plan.tracking_uri)
        parent = Tracker(plan.parent_run_id)
        for path in written:
            parent.log_artifact(path, "best_overrides" if path.parent.name == "best_overrides"
                                else None)
        for path in plots:
            parent.log_artifact(path, "plots")
        parent.set_tags({"winner": summary.winner or "none"})
        parent.log_step(0, {f"{r.schedule}/{plan.metric}_mean": r.mean for r in ranked}
                        | {f"{r.schedule}/{plan.metric}_std": r.std for r in ranked})
        parent.close()
        mlflow.MlflowClient(plan.tracking_uri).set_terminated(plan.parent_run_id, "FINISHED")
    return True
