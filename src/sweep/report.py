"""The schedule-comparison report of a study read back from MLflow: tables, figures, the ranking."""

from __future__ import annotations

import io
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

from sweep import CONF_DIR
from sweep.config import ConfigError, check_choice, check_in_range, fail
from sweep.plots import lr_figure
from sweep.track import use_store

# --- the schedule-comparison report: `python -m sweep.report` -------------------------------------
# Reads a study's runs back from MLflow (any study: the parent run and its children are all it
# needs), and writes report.md with PNGs, or one self-contained report.html.

# Settings: the `report` group (conf/report/default.yaml), composed by conf/report.yaml on top of
# the study's config (conf/sweep.yaml), so `study=tiny` names a study too.
FORMATS = ("md", "html")


@dataclass
class StoredRun:
    """One child run of a study, as read back from MLflow."""

    run_id: str
    schedule: str
    role: str                    # confirm | trial | ... (tag `role`, else `phase`, else "")
    seed: int | None
    status: str
    params: dict[str, str]
    curve: list[float]           # the validation metric per epoch
    lrs: list[float]             # the lr each epoch started with
    epoch_times: list[float]     # seconds per epoch (training and evaluation)

    @property
    def final(self) -> float:
        if self.status == "diverged" or not self.curve:
            return math.nan
        return self.curve[-1]


@dataclass
class Comparison:
    """A schedule against the leader: the paired difference over seeds and whether it is noise."""

    diff: float                  # mean over seeds of (this - leader), in the metric's units
    low: float                   # 95% interval of the mean difference (t distribution)
    high: float
    p: float                     # paired t-test (Welch's when the seeds do not pair up)
    n: int                       # pairs (or the smaller group) the test used
    test: str                    # "paired t-test" | "Welch t-test" | "too few seeds"
    beyond_noise: bool


@dataclass
class ScheduleResult:
    schedule: str
    runs: list[StoredRun]
    source: str                  # "confirmation runs" or "best trial (no confirmation runs)"
    settings: dict[str, str]     # the tuned values of the searched keys
    to_target: list[int | None] = field(default_factory=list)      # epochs, per run
    time_to_target: list[float | None] = field(default_factory=list)  # seconds, per run
    comparison: Comparison | None = None

    @property
    def values(self) -> list[float]:
        return [r.final for r in self.runs if math.isfinite(r.final)]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


def compare(leader: dict[int | None, float], other: dict[int | None, float],
            maximize: bool, alpha: float = 0.05) -> Comparison:
    """Is `other` (values by seed) worse than `leader` by more than the seed-to-seed noise?

    Runs with the same seed share data order and initialisation, so the test pairs them by seed
    (a paired t-test); without common seeds it falls back to Welch's t-test. The interval is the
    95% t interval of the mean difference; with one seed there is no noise estimate at all.
    """
    from scipy import stats

    common = sorted(s for s in leader.keys() & other.keys() if s is not None)
    paired = len(common) >= 2
    a = np.array([other[s] for s in common] if paired else list(other.values()), float)
    b = np.array([leader[s] for s in common] if paired else list(leader.values()), float)
    diff = float(a.mean() - b.mean())
    if paired:
        d = a - b
        n, test = len(d), "paired t-test"
        se = d.std(ddof=1) / math.sqrt(n)
        p = float(stats.ttest_rel(a, b).pvalue) if se > 0 else (0.0 if diff else 1.0)
        half = float(stats.t.ppf(0.975, n - 1) * se)
    elif len(a) >= 2 and len(b) >= 2:
        n, test = min(len(a), len(b)), "Welch t-test"
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = math.sqrt(va + vb)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if se > 0 else (
            0.0 if diff else 1.0)
        dof = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1)) + (vb ** 2 / (len(b) - 1))) if se else 1
        half = float(stats.t.ppf(0.975, dof) * se)
    else:
        return Comparison(diff, math.nan, math.nan, math.nan, min(len(a), len(b)),
                          "too few seeds", False)
    worse = diff < 0 if maximize else diff > 0
    return Comparison(diff, diff - half, diff + half, p, n, test,
                      bool(worse and math.isfinite(p) and p < alpha))


def find_study(client: Any, experiment_id: str, study: str) -> Any:
    """The parent run: by id, else the newest run tagged as study `study` (or named for it)."""
    import mlflow

    if re.fullmatch(r"[0-9a-f]{32}", study):
        return client.get_run(study)
    for query in (f"tags.role = 'study' and tags.study = '{study}'",
                  f"attributes.run_name = 'study-{study}'", f"attributes.run_name = '{study}'"):
        found = client.search_runs([experiment_id], query, max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            return found[0]
    names = sorted({r.data.tags.get("study") for r in client.search_runs(
        [experiment_id], "tags.role = 'study'", max_results=500)} - {None})
    raise ConfigError(f"report.study={study!r}: no such study in experiment "
                      f"{mlflow.get_experiment(experiment_id).name!r} of "
                      f"{mlflow.get_tracking_uri()}; studies there: {', '.join(names) or 'none'}")


def load_study_runs(client: Any, parent: Any) -> tuple[list[StoredRun], str]:
    """Every descendant run of `parent` with its curves, and the validation metric's name."""
    pending, found = [parent.info.run_id], []
    while pending:  # children, then theirs (a study may group its trials under runs)
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{pending.pop()}'",
                                      max_results=50000)
        pending += [c.info.run_id for c in children]
        found += children
    names = {m for r in found for m in r.data.metrics}
    metric = next((m for m in ("val_acc", "val_mse") if m in names), None)
    if metric is None:
        raise ConfigError(f"study run {parent.info.run_id} has no child runs with a validation "
                          "metric (val_acc or val_mse) to compare")
    runs = []
    for r in found:
        tags, params = r.data.tags, r.data.params
        if metric not in r.data.metrics:
            continue

        def history(key: str, run_id: str = r.info.run_id) -> list[float]:
            return [m.value for m in sorted(client.get_metric_history(run_id, key),
                                            key=lambda m: m.step)]
        curve = history(metric)
        seed = tags.get("seed", params.get("seed"))
        schedule = tags.get("schedule") or tags.get("scheduler") or params.get(
            "scheduler._target_", "?").rsplit(".", 1)[-1]
        runs.append(StoredRun(r.info.run_id, schedule, tags.get("role", tags.get("phase", "")),
                              int(seed) if seed not in (None, "None") else None,
                              tags.get("status", "unknown"), params, curve,
                              history("lr")[:len(curve)], history("epoch_time")[:len(curve)]))
    return runs, metric


def tuned_settings(params: dict[str, str]) -> dict[str, str]:
    """The searched keys' values: the schedule's search_space names them (logged flattened as
    `scheduler.search_space.<key>.type`); without one, the lr."""
    keys = [k.removeprefix("scheduler.search_space.").removesuffix(".type") for k in params
            if k.startswith("scheduler.search_space.") and k.endswith(".type")]
    return {k: params[k] for k in (keys or ["optimizer.lr"]) if k in params}


def group_by_schedule(runs: list[StoredRun], maximize: bool) -> list[ScheduleResult]:
    """Per schedule its confirmation runs, or else its best finished trial."""
    out = []
    for schedule in dict.fromkeys(r.schedule for r in runs):
        mine = [r for r in runs if r.schedule == schedule]
        confirm = [r for r in mine if r.role == "confirm"]
        if confirm:
            chosen, source = sorted(confirm, key=lambda r: (r.seed is None, r.seed)), \
                "confirmation runs"
        else:
            done = [r for r in mine if math.isfinite(r.final)]
            if not done:
                continue
            chosen = [(max if maximize else min)(done, key=lambda r: r.final)]
            source = "best trial (no confirmation runs)"
        out.append(ScheduleResult(schedule, chosen, source, tuned_settings(chosen[0].params)))
    return out


def epochs_to_target(curve: list[float], target: float, maximize: bool) -> int | None:
    """The first epoch (1-based) at or beyond the target, or None."""
    for epoch, value in enumerate(curve, 1):
        if (value >= target) if maximize else (value <= target):
            return epoch
    return None


def rank(results: list[ScheduleResult], maximize: bool, target: float | None,
         alpha: float) -> tuple[list[ScheduleResult], float | None]:
    """Best mean first; each schedule compared with the leader; epochs and time to the target."""
    ranked = sorted((r for r in results if r.values), key=lambda r: r.mean, reverse=maximize)
    ranked += [r for r in results if not r.values]
    if target is None and ranked and ranked[0].values:
        target = [r for r in ranked if r.values][-1].mean
    for r in ranked:
        if target is not None:
            r.to_target = [epochs_to_target(run.curve, target, maximize) for run in r.runs]
            r.time_to_target = [sum(run.epoch_times[:e]) if e and run.epoch_times else None
                                for run, e in zip(r.runs, r.to_target, strict=True)]
        if ranked[0].values and r is not ranked[0] and r.values:
            by_seed = {run.seed: run.final for run in r.runs if math.isfinite(run.final)}
            lead = {run.seed: run.final for run in ranked[0].runs if math.isfinite(run.final)}
            r.comparison = compare(lead, by_seed, maximize, alpha)
    return ranked, target


def ranking_sentence(ranked: list[ScheduleResult], metric: str, alpha: float) -> str:
    """Which schedule leads, and which gaps to it are larger than the seed-to-seed noise."""
    scored = [r for r in ranked if r.values]
    if not scored:
        return "No schedule has a finished run to compare."
    lead = scored[0]
    if len(scored) == 1:
        return f"Only {lead.schedule} has finished runs ({metric} {lead.mean:.4g})."
    beyond = [r.schedule for r in scored[1:] if r.comparison and r.comparison.beyond_noise]
    within = [r.schedule for r in scored[1:] if r.schedule not in beyond]
    text = f"{lead.schedule} ranks first ({metric} {lead.mean:.4g} ± {lead.std:.2g})."
    if beyond:
        text += f" Worse than it by more than the noise (p < {alpha:g}): {', '.join(beyond)}."
    if within:
        text += (f" Not distinguishable from it over these seeds: {', '.join(within)}; more "
                 "seeds could separate them.")
    if not beyond:
        text += " No difference is larger than the seed-to-seed noise, so no winner is named."
    return text


def curves_figure(results: list[ScheduleResult], metric: str) -> Figure:
    """Validation metric per epoch: mean over a schedule's runs, with their range shaded."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, r in enumerate(results):
        curves = [run.curve for run in r.runs if run.curve]
        if not curves:
            continue
        n = min(map(len, curves))
        stack = np.array([c[:n] for c in curves])
        epochs = np.arange(1, n + 1)
        ax.plot(epochs, stack.mean(0), marker=".", color=f"C{i % 10}",
                label=f"{r.schedule} ({len(curves)} run{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            ax.fill_between(epochs, stack.min(0), stack.max(0), alpha=0.2, color=f"C{i % 10}")
    values = [v for r in results for run in r.runs for v in run.curve if v > 0]
    if values and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric}: mean and range over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def report_lr_figure(results: list[ScheduleResult]) -> Figure:
    """Each schedule's lr per epoch (its first run's; the tuned lrs differ between schedules)."""
    # Epoch e's lr holds over [e-1, e): a closing point at the end draws the last epoch too.
    rows = {r.schedule: [{"step": e, "epoch": e + 1, "group": "default", "lr": lr}
                         for e, lr in enumerate([*r.runs[0].lrs, r.runs[0].lrs[-1]])]
            for r in results if r.runs and r.runs[0].lrs}
    lrs = [row["lr"] for v in rows.values() for row in v if row["lr"] > 0]
    log_y = bool(lrs) and max(lrs) / min(lrs) > 100
    return lr_figure(rows, x="epoch", log_y=log_y, title="learning rate at the start of each epoch")


def _mean_or_dash(values: list[float | None], fmt: str) -> str:
    done = [v for v in values if v is not None]
    if not done:
        return "not reached"
    text = format(float(np.mean(done)), fmt)
    return text if len(done) == len(values) else f"{text} ({len(done)}/{len(values)} runs)"


def report_tables(ranked: list[ScheduleResult], metric: str, target: float | None
                  ) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The per-schedule table and the ranking table, as header and rows."""
    head = ["schedule", "tuned settings", "runs", f"final {metric} mean ± std", "min .. max",
            f"epochs to {target:.4g}" if target is not None else "epochs to target",
            "seconds to target", "source"]
    rows = []
    for r in ranked:
        diverged = sum(run.status == "diverged" for run in r.runs)
        score = f"{r.mean:.4g} ± {r.std:.2g}" if r.values else "-"
        rows.append([
            r.schedule, " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r.settings.items()),
            str(len(r.runs)) + (f" ({diverged} diverged)" if diverged else ""), score,
            f"{min(r.values):.4g} .. {max(r.values):.4g}" if r.values else "-",
            _mean_or_dash(r.to_target, ".1f"), _mean_or_dash(r.time_to_target, ".2f"), r.source])
    rank_head = ["rank", "schedule", "difference to the leader (95% interval)", "test", "p",
                 "larger than the noise?"]
    rank_rows = []
    for i, r in enumerate(ranked, 1):
        c = r.comparison
        if i == 1 or c is None:
            rank_rows.append([str(i), r.schedule, "leader" if i == 1 else "-", "-", "-", "-"])
            continue
        interval = f"{c.diff:+.4g} ({c.low:+.4g} .. {c.high:+.4g})" if math.isfinite(c.low) \
            else f"{c.diff:+.4g}"
        rank_rows.append([str(i), r.schedule, interval, f"{c.test}, n={c.n}",
                          f"{c.p:.3g}" if math.isfinite(c.p) else "-",
                          "yes" if c.beyond_noise else "no"])
    return head, rows, rank_head, rank_rows


def md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                        for row in rows)])


def html_table(head: list[str], rows: list[list[str]]) -> str:
    from html import escape

    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


@dataclass
class Report:
    path: Path                   # report.md or report.html
    files: list[Path]            # everything written
    ranked: list[ScheduleResult]
    metric: str
    target: float | None
    sentence: str
    parent_run_id: str


def check(cfg: DictConfig) -> None:
    """The `report` settings, checked before MLflow is read or anything is written."""
    s = cfg.report
    if not isinstance(s.study, str | int) or isinstance(s.study, bool) or not str(s.study):
        fail("report.study", s.study, "a study's name or its parent run id")
    check_choice("report.format", s.format, FORMATS)
    check_in_range("report.alpha", s.alpha, 0.0, 1.0, high_open=True)
    if s.target is not None and (not isinstance(s.target, int | float)
                                 or isinstance(s.target, bool) or not math.isfinite(s.target)):
        fail("report.target", s.target, "null (the worst schedule's mean) or a number")
    if not isinstance(s.log, bool):
        fail("report.log", s.log, "true or false")


def write_report(cfg: DictConfig, out_dir: Path) -> Report:
    """Read a study from MLflow and write its comparison report into `out_dir`; `cfg` is
    composed by conf/report.yaml and checked."""
    import base64

    import mlflow


    s = cfg.report
    client = mlflow.MlflowClient()
    experiment_id = use_store(cfg, s.experiment)
    parent = find_study(client, experiment_id, str(s.study))
    name = parent.data.tags.get("study") or parent.info.run_name
    runs, metric = load_study_runs(client, parent)
    maximize = metric == "val_acc"
    ranked, target = rank(group_by_schedule(runs, maximize), maximize, s.target, s.alpha)
    sentence = ranking_sentence(ranked, metric, s.alpha)
    out_dir.mkdir(parents=True, exist_ok=True)

    figures = {"curves.png": curves_figure(ranked, metric), "lr.png": report_lr_figure(ranked)}
    pngs = {}
    for file, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        pngs[file] = buf.getvalue()
    head, rows, rank_head, rank_rows = report_tables(ranked, metric, target)
    how = "report.target" if s.target is not None else "the worst schedule's mean final value"
    notes = [f"Study {name!r} (MLflow run {parent.info.run_id}, experiment "
             f"{mlflow.get_experiment(parent.info.experiment_id).name!r}): {len(runs)} runs read, "
             f"metric {metric} ({'higher' if maximize else 'lower'} is better).",
             "Final = the last epoch's value; a diverged run has none. Epochs and seconds to "
             f"target: the first epoch at {metric} {'>=' if maximize else '<='} "
             f"{target:.4g} ({how}), mean over the runs that reach it, seconds of training and "
             "evaluation." if target is not None else "",
             f"Differences to the leader: mean over seeds with a 95% t interval; paired by seed "
             f"when the seeds match. Larger than the noise = p < {s.alpha:g}."]
    title = f"Schedule comparison: {name}"
    if s.format == "md":
        path = out_dir / "report.md"
        for file, data in pngs.items():
            (out_dir / file).write_bytes(data)
        path.write_text("\n\n".join([
            f"# {title}", sentence, "## Per schedule", md_table(head, rows), "## Ranking",
            md_table(rank_head, rank_rows), "## Curves",
            *(f"![{file}]({file})" for file in pngs), "## Notes", *filter(None, notes)]) + "\n")
        files = [path, *(out_dir / file for file in pngs)]
    else:
        from html import escape

        path = out_dir / "report.html"
        images = "".join(f'<p><img alt="{file}" src="data:image/png;base64,'
                         f'{base64.b64encode(data).decode()}"></p>' for file, data in pngs.items())
        path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
            f"</style></head><body><h1>{escape(title)}</h1><p>{escape(sentence)}</p>"
            f"<h2>Per schedule</h2>{html_table(head, rows)}<h2>Ranking</h2>"
            f"{html_table(rank_head, rank_rows)}<h2>Curves</h2>{images}<h2>Notes</h2>"
            + "".join(f"<p>{escape(n)}</p>" for n in notes if n) + "</body></html>\n")
        files = [path]
    if s.log and cfg.tracking.enabled:
        for file in files:
            client.log_artifact(parent.info.run_id, str(file), "report")
    return Report(path, files, ranked, metric, target, sentence, parent.info.run_id)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="report")
def main(cfg: DictConfig) -> None:
    """`python -m sweep.report [report.study=<name or run id>] [study=<option>] ...`"""
    try:
        check(cfg)
        report = write_report(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(report.sentence)
    print(f"report written to {report.path}")


if __name__ == "__main__":
    main()
