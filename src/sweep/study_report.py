"""After the search and the confirmation runs: the comparison, built from what the storage holds.

The confirmation runs of each schedule's best configuration go to `sweep.compare`, the one
comparison `sweep.report` also makes from MLflow, so the study's summary and the report name the
same leaders. Everything here is read from the Optuna storage, so every process of a study prints
the same summary; one of them (elected in the storage) publishes it to MLflow: the files, the
figures and an HTML comparison page on the study's parent run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from omegaconf import DictConfig

from sweep import faults
from sweep.compare import Comparison, Group, Run, compare, html_page, steps_per_epoch
from sweep.compare_plots import figures as comparison_figures
from sweep.dburl import sqlalchemy_url
from sweep.study_optuna import best_trial, trial_state
from sweep.study_plan import Plan, knob_overrides, rerun_command
from sweep.study_storage import once
from sweep.study_worker import Worker, confirmation_records
from sweep.track import Tracker

TALLY = ("complete", "pruned", "diverged", "failed")
COLUMNS = ["lr", "knobs", "trials done / pruned / diverged / failed"]


@dataclass
class Searched:
    """One schedule's search: trials by state, the best trial, and its confirmation runs."""

    schedule: str
    tally: dict[str, int]                  # trials by state: complete, pruned, diverged, failed
    best_trial: int | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # the best trial's values
    command: str = ""                      # `python -m sweep ...` rerunning the best configuration
    runs: list[Run] = field(default_factory=list)        # one per confirmation seed
    group: Group | None = None             # its place in the comparison

    @property
    def values(self) -> list[float]:
        return self.group.values if self.group else []

    @property
    def mean(self) -> float:
        return self.group.score.mean if self.group else float("nan")

    def columns(self) -> dict[str, str]:
        """The table's cells that come from the search."""
        knobs = dict(self.knobs)
        lr = shown(knobs.pop("optimizer.lr")) if "optimizer.lr" in knobs else "-"
        other = " ".join(f"{k.rsplit('.', 1)[-1]}={shown(v)}" for k, v in knobs.items())
        return {"lr": lr, "knobs": other or ("no trial completed" if self.best_trial is None
                                              else "-"),
                COLUMNS[2]: " / ".join(str(self.tally[k]) for k in TALLY)}


@dataclass
class Summary:
    """The comparison of the schedules, and where everything was written."""

    rows: list[Searched]                   # in the comparison's order: best mean first
    comparison: Comparison
    metric: str
    direction: str
    text: str                              # what is printed: the tables and the lines under them
    out_dir: Path

    @property
    def winner(self) -> str | None:
        return self.comparison.winner

    @property
    def leaders(self) -> list[str]:
        return self.comparison.leaders

    @property
    def verdict(self) -> str:
        return self.comparison.sentence()


def shown(value: Any) -> str:
    """A knob's value in a table: 4 significant digits (the command keeps every digit)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- rows from the storage ----------------------------------------------------------------------

def as_run(schedule: str, record: dict[str, Any], per_epoch: int | None) -> Run:
    """A confirmation record (`study_worker.confirmation_record`) as the comparison's run; its lr
    trace, kept per optimizer step, is put on the epoch axis."""
    lr = [(step / per_epoch, value) for step, value in record.get("lr", [])] if per_epoch else []
    if lr:  # the last step's lr holds to the end of the run
        lr.append((float(len(record["curve"])), lr[-1][1]))
    return Run(schedule, record["seed"], record["status"], list(record["curve"]), lr, per_epoch,
               list(record.get("epoch_times", [])), record.get("device"))


def schedule_row(worker: Worker, schedule: str, per_epoch: int | None) -> Searched:
    """A schedule's trials by state, its best trial and the confirmation runs of it."""
    plan = worker.plan
    study = worker.study(schedule)
    trials = study.get_trials(deepcopy=False)
    row = Searched(schedule, {k: sum(trial_state(t) == k for t in trials) for k in TALLY})
    best = best_trial(study)
    if best is None:
        return row
    values = best.user_attrs.get("values", best.params)
    row.best_trial, row.knobs = best.number, dict(values)
    row.command = rerun_command(plan, schedule, values)
    records = confirmation_records(worker.confirm_study(schedule), best,
                                   list(plan.settings["seeds"]))
    row.runs = [as_run(schedule, r, per_epoch) for r in records]
    return row


def write_files(summary: Summary, plan: Plan) -> list[Path]:
    """summary.md, summary.csv and best_overrides/<schedule>.txt in the output directory."""
    out = plan.out_dir
    (out / "summary.md").write_text(f"# Study {plan.settings['name']}\n\n{summary.text}\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["schedule", "best_trial", "knobs", f"{summary.metric}_mean",
                    f"{summary.metric}_ci_low", f"{summary.metric}_ci_high", "seeds", "values",
                    "p_vs_leader_holm", "tied_with_leader", "epochs_to_target",
                    *[f"trials_{k}" for k in TALLY], "command"])
        for r in summary.rows:
            g = r.group
            w.writerow([r.schedule, r.best_trial, " ".join(knob_overrides(r.knobs)),
                        g.score.mean, g.score.low, g.score.high, len(r.runs),
                        " ".join(f"{v:.6g}" for v in r.values),
                        g.versus.p_holm if g.versus else "", g.name in summary.leaders,
                        " ".join("-" if e is None else str(e) for e in g.to_target),
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


# --- Optuna's plots, one schedule at a time -------------------------------------------------------

def figure_of(axes: Any) -> Any:
    import numpy as np

    return np.asarray(axes).flat[0].figure  # Optuna returns an Axes or an array of them


OPTUNA_TITLES = {"Slice Plot", "Contour Plot", "Optimization History Plot",
                 "Hyperparameter Importances"}


def tidy(fig: Any) -> None:
    """Optuna's figures, readable: our title instead of its generic one, an honest colour-bar
    label, and log axes labelled at 1-2-5 steps only (the slice plot labels every minor tick,
    and the labels run into each other)."""
    for ax in fig.axes:
        if ax.get_title() in OPTUNA_TITLES:
            ax.set_title("")
        if ax.get_ylabel() == "Trial":  # a colour bar over a filtered copy's renumbered trials
            ax.set_ylabel("order of the trials drawn")
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=6))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
        if ax.get_xscale() == "log":
            ax.tick_params(axis="x", labelrotation=30)


def optuna_figures(studies: dict[str, optuna.Study], plan: Plan) -> dict[str, Any]:
    """Per schedule: the optimisation history, Optuna's parameter importances and lr x knob
    contour (or slice plot), titled with the schedule; diverged trials carry a penalty value
    that would set the scale, so they are left out and named in a note."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    figures: dict[str, Any] = {}
    # Optuna's plots switch pyplot's global style to ggplot: keep that to them.
    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, study in studies.items():
            trials = study.get_trials(deepcopy=False)
            diverged = [t.number for t in trials if trial_state(t) == "diverged"]
            kept = [t for t in trials if trial_state(t) in ("complete", "pruned")]
            if not any(trial_state(t) == "complete" for t in kept):
                continue
            view = optuna.create_study(direction=study.direction)  # in memory: a filtered copy
            view.add_trials(kept)
            note = ("diverged trials, left out of the scale: "
                    + ", ".join(f"#{n}" for n in diverged)) if diverged else ""
            numeric = [k for k, s in plan.spaces[name].items() if s["type"] != "categorical"]
            pair = ["optimizer.lr"] + [k for k in numeric if k != "optimizer.lr"][:1]
            figures[f"history_{name}.png"] = history_figure(name, trials, plan, note)
            plots = []
            if sum(trial_state(t) == "complete" for t in kept) >= 2:
                plots.append((f"importances_{name}.png", "parameter importances",
                              ovm.plot_param_importances, {}))
                if len(pair) == 2 and "optimizer.lr" in numeric:  # lr x gamma (or first knob)
                    plots.append((f"contour_{name}.png", f"{plan.metric} over {' x '.join(pair)}",
                                  ovm.plot_contour, {"params": pair, "target_name": plan.metric}))
                else:
                    plots.append((f"slice_{name}.png", f"{plan.metric} against each parameter",
                                  ovm.plot_slice, {"target_name": plan.metric}))
            for file, what, plot, kwargs in plots:
                try:
                    fig = figure_of(plot(view, **kwargs))
                except (ValueError, RuntimeError, ZeroDivisionError) as err:
                    print(f"  (no {file}: {err})")  # e.g. every trial had the same value
                    continue
                tidy(fig)
                fig.suptitle(f"{name}: {what}" + (f"\n({note})" if note else ""),
                             fontsize="medium")
                figures[file] = fig
    return figures


def history_figure(schedule: str, trials: list[optuna.trial.FrozenTrial], plan: Plan,
                   note: str) -> Figure:
    """The optimisation history with the storage's trial numbers (Optuna's plot of a filtered
    copy would renumber them): each finished trial's value and the best so far."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [t for t in trials if trial_state(t) == "complete" and t.value is not None]
    pick = max if plan.direction == "maximize" else min
    best = [pick(t.value for t in done[:i + 1]) for i in range(len(done))]
    ax.plot([t.number for t in done], [t.value for t in done], "o", label="trial")
    ax.plot([t.number for t in done], best, drawstyle="steps-post", color="C1",
            label="best so far")
    pruned = sum(trial_state(t) == "pruned" for t in trials)
    ax.set(xlabel="trial number", ylabel=plan.metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    numbers = [t.number for t in trials] or [0]
    ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)  # whole trials, even with one drawn
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    pruned_note = f"{pruned} pruned trial{'s' if pruned > 1 else ''} not drawn"
    notes = [n for n in (note, pruned_note if pruned else "") if n]
    fig.suptitle(f"{schedule}: optimisation history ({plan.metric} of each finished trial)"
                 + (f"\n{'; '.join(notes)}" if notes else ""), fontsize="medium")
    return fig


def save_figures(figures: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")
        plt.close(fig)  # Optuna's plots are pyplot figures; ours are not (closing them is a no-op)
        paths.append(folder / name)
    return paths


def comparison_page(summary: Summary, plan: Plan, plots: list[Path]) -> Path:
    """comparison.html: the verdict, both tables, the notes and every plot, in one file."""
    c = summary.comparison
    path = plan.out_dir / "comparison.html"
    path.write_text(html_page(f"Study {plan.name}: schedule comparison", [
        ("", f"<p>{escape(summary.verdict)}</p>"),
        ("Per schedule", c.summary_table("html", COLUMNS)),
        ("Against the leader", c.versus_table("html")),
        ("Notes", "".join(f"<p>{escape(n)}</p>" for n in c.notes())),
        ("Best configurations, rerun as is", "".join(
            f"<pre>{escape(r.command)}</pre>" for r in summary.rows if r.command))],
        {p.name: p.read_bytes() for p in plots}))
    return path


# --- all of it ------------------------------------------------------------------------------------

def summarize(cfg: DictConfig, worker: Worker) -> Summary:
    """Compare the schedules from the storage and write the summary files; one process of the
    study also draws the plots and attaches everything to the study's MLflow run."""
    plan = worker.plan
    maximize = plan.direction == "maximize"
    per_epoch = steps_per_epoch(worker.base(plan.schedules[0]))  # the schedules share the data
    searched = {name: schedule_row(worker, name, per_epoch) for name in plan.schedules}
    comparison = compare([run for row in searched.values() for run in row.runs], plan.metric,
                         maximize, target=cfg.study.target, names=plan.schedules,
                         columns={name: row.columns() for name, row in searched.items()})
    for g in comparison.groups:
        searched[g.name].group = g
    rows = [searched[g.name] for g in comparison.groups]
    notes = [comparison.sentence(), "", *comparison.notes(),
             f"Trials: the pruner ({plan.settings['pruner']}) stopped "
             f"{sum(r.tally['pruned'] for r in rows)} of "
             f"{sum(sum(r.tally.values()) for r in rows)}; best configurations, rerun as is:"]
    notes += [f"  {r.command}" for r in rows if r.command]
    notes.append(f"written to {plan.out_dir}: summary.md, summary.csv, comparison.html, "
                 "best_overrides/, plots/")
    notes.append(f"Optuna storage {plan.storage}: `optuna trials --study-name "
                 f"{plan.study_name(plan.schedules[0])} --storage {cli_storage(plan.storage)}`")
    text = "\n\n".join([comparison.summary_table("md", COLUMNS), comparison.versus_table("md"),
                        "\n".join(notes)])
    summary = Summary(rows, comparison, plan.metric, plan.direction, text, plan.out_dir)
    written = write_files(summary, plan)
    # Published once per distinct result: a study resumed with a larger budget publishes again.
    fingerprint = hashlib.sha1(json.dumps([(r.schedule, r.best_trial, [x.seed for x in r.runs])
                                           for r in rows]).encode()).hexdigest()[:12]
    once(worker.storage, f"{plan.name}/published/{fingerprint}",
         lambda: publish(cfg, worker, summary, written), worker.liveness)
    return summary


def publish(cfg: DictConfig, worker: Worker, summary: Summary, written: list[Path]) -> bool:
    """Plots, the comparison page, and the summary on the study's MLflow run, which is then
    marked finished."""
    plan = worker.plan
    plots: list[Path] = []
    if cfg.study.plots:
        studies = {name: worker.study(name) for name in plan.schedules}
        figures = {**{f"best_{k}": f for k, f in comparison_figures(summary.comparison).items()},
                   **optuna_figures(studies, plan)}  # the comparison first, then how it was found
        plots = save_figures(figures, plan.out_dir / "plots")
    page = comparison_page(summary, plan, plots)
    faults.point("summary")
    if plan.parent_run_id:
        import mlflow

        mlflow.set_tracking_uri(plan.tracking_uri)
        parent = Tracker(plan.parent_run_id)
        for path in [*written, page]:
            parent.log_artifact(path, "best_overrides" if path.parent.name == "best_overrides"
                                else None)
        for path in plots:
            parent.log_artifact(path, "plots")
        c = summary.comparison
        parent.set_tags({"winner": c.winner or "none", "leaders": ", ".join(c.leaders),
                         "verdict": c.sentence()[:4900]})
        parent.log_step(0, {f"{g.name}/{plan.metric}_mean": g.score.mean for g in c.scored})
        parent.close()
        mlflow.MlflowClient(plan.tracking_uri).set_terminated(plan.parent_run_id, "FINISHED")
    return True

