"""Factor x learning rate x seed studies: does a change make training more or less lr-sensitive?

`python -m sweep.sensitivity experiment=bn_sensitivity` (make study-bn) reproduces the BN article:
tanh MLPs with and without BatchNorm trained with SGD at four learning rates, repeated over seeds.
Any config key (or config group) can be the factor, e.g. `sensitivity.factor=optimizer.momentum
sensitivity.values=[0,0.9]`, crossed with named model variants, `sensitivity.lrs` and
`sensitivity.seeds`. Settings: the `sensitivity` group (conf/sensitivity/default.yaml), composed by
conf/sensitivity.yaml; an experiment's `sensitivity:` block overrides it.

Every grid point is one nested MLflow run under a parent run; the figures, the tables and the
conclusion are computed from the runs read back from the store and logged to the parent run.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import re
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from sweep import CONF_DIR
from sweep.config import (
    ConfigError,
    check_choice,
    check_int_at_least,
    check_positive,
    compose,
    fail,
    validate,
    with_choices,
)
from sweep.data import DataError
from sweep.study_plan import override_text, with_values
from sweep.track import mlflow_run, tracking_uri, use_store
from sweep.train import pick_device, train

METRICS = ("train_loss", "val_loss", "val_mse")  # per-epoch losses: lower is better


@dataclass
class Point:
    """One grid run: which variant, factor value, lr and seed, and its per-epoch metric."""

    variant: str
    value: str
    lr: float
    seed: int
    status: str
    curve: list[float]
    run_id: str | None = None

    @property
    def final(self) -> float:
        """The last epoch's value; a run that diverged counts as infinitely bad."""
        if self.status == "diverged" or not self.curve or not math.isfinite(self.curve[-1]):
            return math.inf
        return self.curve[-1]


@dataclass
class Summary:
    """One model's (variant x factor value) final loss at each lr, and how sensitive it is."""

    variant: str
    value: str
    lrs: list[float]                 # ascending
    finals: list[list[float]]        # per lr: each seed's final loss (inf = diverged)
    geo_mean: list[float] = field(default_factory=list)   # per lr, over seeds (inf if any diverged)
    log_std: list[float] = field(default_factory=list)    # per lr: std of log10 loss over seeds
    diverged: list[int] = field(default_factory=list)     # per lr: runs that diverged
    best_lr: float = math.nan
    best_loss: float = math.nan
    lr_spread: float = math.nan      # decades of loss between the best and the worst lr
    lr_spread_se: float = math.nan   # its standard error from the seed spread
    good_lrs: list[float] = field(default_factory=list)   # lrs within `margin` x the best loss
    good_range: float = math.nan     # decades of lr from the lowest to the highest good lr
    seed_spread: float = math.nan    # mean over lrs of log_std (decades)

    @property
    def label(self) -> str:
        return f"{self.variant} {self.value}"

    @property
    def n_seeds(self) -> int:
        return max(len(f) for f in self.finals)


def summarize(points: Sequence[Point], margin: float) -> list[Summary]:
    """Group runs by model and compute each model's sensitivity measures.

    Losses span decades across lrs, so seeds are averaged in log space (a geometric mean) and
    spreads are measured in decades (log10 units).
    """
    groups: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        groups[p.variant, p.value][p.lr].append(p.final)
    out = []
    for (variant, value), by_lr in groups.items():
        lrs = sorted(by_lr)
        s = Summary(variant, value, lrs, [by_lr[lr] for lr in lrs])
        logs = [np.log10(np.asarray(f, float)) for f in s.finals]
        mean_log = np.array([x.mean() for x in logs])  # inf as soon as one seed diverged
        s.geo_mean = (10 ** mean_log).tolist()
        s.log_std = [float(x.std(ddof=1)) if len(x) > 1 and np.isfinite(x).all() else math.nan
                     for x in logs]
        s.diverged = [int(np.isinf(x).sum()) for x in logs]
        se = np.array([sd / math.sqrt(len(x)) if len(x) > 1 else 0.0
                       for sd, x in zip(s.log_std, logs, strict=True)])
        best, worst = int(np.argmin(mean_log)), int(np.argmax(mean_log))
        s.best_lr, s.best_loss = lrs[best], float(10 ** mean_log[best])
        s.lr_spread = float(mean_log[worst] - mean_log[best])
        s.lr_spread_se = float(math.hypot(se[best], se[worst]))
        s.good_lrs = [lr for lr, m in zip(lrs, mean_log, strict=True)
                      if m <= mean_log[best] + math.log10(margin)]
        s.good_range = math.log10(max(s.good_lrs) / min(s.good_lrs)) if s.good_lrs else math.nan
        finite_std = [v for v in s.log_std if math.isfinite(v)]
        s.seed_spread = float(np.mean(finite_std)) if finite_std else math.nan
        out.append(s)
    return out


def verdict(treated: Summary, base: Summary) -> str:
    """`more`, `less` or `unclear`: is `treated` more lr-sensitive than `base`?

    Compares the lr spreads; a difference counts only when larger than twice its standard error
    from the seed spread (one seed gives no error bar, so any difference counts). A model that
    diverged at some lr is maximally sensitive; if both did, the one with more diverged runs is.
    """
    t, b = treated.lr_spread, base.lr_spread
    if math.isinf(t) or math.isinf(b):
        if math.isinf(t) and math.isinf(b):
            t, b = sum(treated.diverged), sum(base.diverged)
            return "more" if t > b else "less" if t < b else "unclear"
        return "more" if math.isinf(t) else "less"
    noise = 2 * math.hypot(treated.lr_spread_se, base.lr_spread_se)
    return "more" if t - b > noise else "less" if b - t > noise else "unclear"


def conclusion(summaries: Sequence[Summary], factor: str, values: Sequence[str],
               metric: str = "train_loss") -> str:
    """One sentence per compared value, stating from the numbers whether it made models more or
    less sensitive to the learning rate than the baseline value (the first of `values`)."""
    by_key = {(s.variant, s.value): s for s in summaries}
    variants = list(dict.fromkeys(s.variant for s in summaries))
    base = str(values[0])
    sentences = []
    for value in map(str, values[1:]):
        pairs = [(v, by_key[v, value], by_key[v, base]) for v in variants
                 if (v, value) in by_key and (v, base) in by_key]
        if not pairs:
            continue
        verdicts = {v: verdict(t, b) for v, t, b in pairs}
        kinds = set(verdicts.values())
        subject = "the model" if len(pairs) == 1 else "the models"
        if kinds == {"more"} or kinds == {"less"}:
            head = (f"Here {factor}={value} made {subject} {kinds.pop()} sensitive to the "
                    f"learning rate than {factor}={base}")
        elif kinds == {"unclear"}:
            head = (f"Here {factor}={value} made no clear difference to how sensitive {subject} "
                    f"were to the learning rate, compared with {factor}={base}")
        else:
            parts = [f"made {', '.join(v for v, k in verdicts.items() if k == kind)} {kind} "
                     "sensitive to the learning rate" for kind in ("more", "less")
                     if kind in kinds]
            if "unclear" in kinds:
                parts.append("made no clear difference for "
                             + ", ".join(v for v, k in verdicts.items() if k == "unclear"))
            head = (f"Here, compared with {factor}={base}, {factor}={value} had mixed effects: "
                    f"it {' and '.join(parts)}")
        evidence = "; ".join(
            f"{v}: final {metric} varied {fmt(t.lr_spread)} ± {fmt(t.lr_spread_se)} vs "
            f"{fmt(b.lr_spread)} ± {fmt(b.lr_spread_se)} decades across the lrs, good-lr range "
            f"{fmt(t.good_range)} vs {fmt(b.good_range)} decades, best {t.best_loss:.3g} vs "
            f"{b.best_loss:.3g}" for v, t, b in pairs)
        n = min(min(t.n_seeds, b.n_seeds) for _, t, b in pairs)
        seeds = f"{n} seeds" if n > 1 else "1 seed, so no error bars"
        sentences.append(f"{head} ({evidence}; {seeds}).")
    return " ".join(sentences)


def metric_key(measure: str, s: Summary) -> str:
    """`lr_spread.mlp3.pre`: MLflow allows only letters, digits and _ - . / and spaces in names."""
    return re.sub(r"[^\w./ -]", "_", f"{measure}.{s.variant}.{s.value}")


def fmt(x: float) -> str:
    return "inf" if math.isinf(x) else "n/a" if math.isnan(x) else f"{x:.2f}"


# --- checking and running the grid ---------------------------------------------------------------

def variants(s: DictConfig) -> dict[str, list[str]]:
    """Variant name -> its overrides; without `sensitivity.models`, the composed model as is."""
    return {name: list(overrides) for name, overrides in (s.models or {}).items()} or {"model": []}


def labels(s: DictConfig) -> list[str]:
    """The factor's values as override text (`pre`, `0.9`, `[4,4]`): labels, tags and overrides."""
    return [override_text(v) for v in OmegaConf.to_container(s["values"], resolve=True)]


def check(cfg: DictConfig) -> None:
    """The `sensitivity` settings, checked before anything is composed, trained or logged."""
    s = cfg.sensitivity
    if not isinstance(s.name, str) or not s.name.strip():
        fail("sensitivity.name", s.name, "a non-empty name (the parent run's and the folder's)")
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    missing = object()
    if not isinstance(s.factor, str) or (
            s.factor not in groups and OmegaConf.select(cfg, s.factor, default=missing) is missing):
        fail("sensitivity.factor", s.factor, "a key of the config (model.bn, optimizer.momentum) "
             "or a group (" + ", ".join(groups) + ")")
    if s.factor in (s.lr_key, "seed"):
        fail("sensitivity.factor", s.factor, "not the lr or the seed: every point sets those")
    if not OmegaConf.is_list(s["values"]) or len(s["values"]) < 2:
        fail("sensitivity.values", s["values"], "a list of at least two values: a baseline and "
             "another")
    if any(v is None or OmegaConf.is_dict(v) for v in s["values"]):
        fail("sensitivity.values", s["values"], "numbers, strings, booleans or lists (each "
             "becomes override text, <factor>=<value>)")
    if len(set(labels(s))) < len(s["values"]):
        fail("sensitivity.values", s["values"], "values that differ")
    models = s.models
    if models is not None and not (OmegaConf.is_dict(models) and models and all(
            OmegaConf.is_list(o) and all(isinstance(x, str) for x in o) for o in models.values())):
        fail("sensitivity.models", models, "null, or variant name -> a list of overrides, e.g. "
             "{mlp3: ['model.hidden=[4,4,4]']}")
    lr = OmegaConf.select(cfg, s.lr_key, default=None) if isinstance(s.lr_key, str) else None
    if not isinstance(lr, int | float) or isinstance(lr, bool):
        fail("sensitivity.lr_key", s.lr_key, "a key of the config holding a number, e.g. "
             "optimizer.lr")
    if not OmegaConf.is_list(s.lrs) or not s.lrs or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in s.lrs):
        fail("sensitivity.lrs", s.lrs, "a non-empty list of learning rates > 0")
    if not OmegaConf.is_list(s.seeds) or not s.seeds or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in s.seeds):
        fail("sensitivity.seeds", s.seeds, "a non-empty list of integers")
    check_choice("sensitivity.metric", s.metric, METRICS)
    check_positive("sensitivity.margin", s.margin)
    if s.margin < 1:
        fail("sensitivity.margin", s.margin, "must be >= 1 (a factor on the best loss)")
    if s.threads is not None:
        check_int_at_least("sensitivity.threads", s.threads, 1)
    if s.from_run is not None and not cfg.tracking.enabled:
        fail("sensitivity.from_run", s.from_run, "needs tracking enabled to read the runs (drop "
             "tracking=none)")


def first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), repr(err))


def point_configs(argv: Sequence[str], s: DictConfig) -> dict[tuple[str, str], DictConfig]:
    """(variant, factor value) -> its config, each composed and validated before anything trains;
    the grid sets the lr and the seed on these as values."""
    configs = {}
    for variant, extra in variants(s).items():
        if extra:  # the variant's own overrides, on their own, so an error names the variant
            try:
                compose([*argv, *extra], "sensitivity")
            except HydraException as err:
                fail(f"sensitivity.models.{variant}", extra, first_line(err))
        for label in labels(s):
            try:
                cfg = compose([*argv, *extra, f"{s.factor}={label}"], "sensitivity")
            except HydraException as err:
                fail("sensitivity.values", label, first_line(err))
            validate(cfg)
            configs[variant, label] = cfg
    return configs


def in_grid_order(points: list[Point], s: DictConfig) -> list[Point]:
    """Variants and values in the settings' order (the baseline value first), then lr and seed."""
    names, values = list(variants(s)), labels(s)

    def position(p: Point) -> tuple:
        return (names.index(p.variant) if p.variant in names else len(names), p.variant,
                values.index(p.value) if p.value in values else len(values), p.value, p.lr,
                p.seed)
    return sorted(points, key=position)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use n intra-op threads meanwhile: tiny models run several times faster on one thread,
    where several threads spend their time waiting for each other."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_grid(configs: dict[tuple[str, str], DictConfig], s: DictConfig, out_dir: Path
             ) -> list[Point]:
    """Train every grid point as a nested MLflow run (under the active parent run, if any)."""

    runs = [(variant, value, float(lr), int(seed)) for variant, value in configs
            for lr in s.lrs for seed in s.seeds]
    short = s.factor.split(".")[-1]
    points = []
    for i, (variant, value, lr, seed) in enumerate(runs, 1):
        cfg = with_values(configs[variant, value], {s.lr_key: lr, "seed": seed})
        name = f"{variant}-{short}={value}-lr={lr:g}-seed={seed}"
        tags = {"phase": "sensitivity", "variant": variant, "factor": s.factor, "value": value,
                "lr": override_text(lr), "seed": str(seed)}
        with mlflow_run(cfg, run_name_=name, nested=True, tags=tags) as tracker:
            result = train(cfg, tracker=tracker, output_dir=out_dir)
            if tracker is not None:
                if cfg.tracking.get("log_plots", False):
                    tracker.finish(result)
                else:
                    tracker.set_tags({"status": result.status})
        if result.history and s.metric not in result.history[0]:
            fail("sensitivity.metric", s.metric, f"these runs log {result.metric_name}, not "
                 f"{s.metric}; choose train_loss or val_loss")
        curve = [h[s.metric] for h in result.history]
        points.append(Point(variant, value, lr, seed, result.status, curve, result.run_id))
        print(f"[{i}/{len(runs)}] {name}: {result.status}, final {s.metric} "
              f"{points[-1].final:.4g}", flush=True)
    return points


def points_from_store(parent_run_id: str, metric: str) -> list[Point]:
    """Read a study's grid runs back from MLflow: tags say where each run sits in the grid."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=50000)
    points = []
    for r in runs:
        tags = r.data.tags
        if tags.get("phase") != "sensitivity":
            continue
        history = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
        points.append(Point(tags["variant"], tags["value"], float(tags["lr"]), int(tags["seed"]),
                            tags.get("status", "unknown"), [m.value for m in history],
                            r.info.run_id))
    if not points:
        raise ConfigError(f"sensitivity.from_run={parent_run_id!r}: no grid runs under that run")
    return points


# --- figures and tables -------------------------------------------------------------------------

def loss_axis(ax: Any, values: Sequence[float]) -> None:
    """A log axis when the values span more than a decade and a half, with plain numbers."""
    from matplotlib.ticker import ScalarFormatter

    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 30:
        ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())  # 20, not 2 x 10^1


def _styles(points: Sequence[Point]) -> dict[tuple[str, str], dict[str, Any]]:
    """Colour per variant, line style per factor value, stable across figures."""
    variants = list(dict.fromkeys(p.variant for p in points))
    values = list(dict.fromkeys(p.value for p in points))
    dashes = ["-", "--", ":", "-."]
    return {(v, x): {"color": f"C{i % 10}", "ls": dashes[j % 4]}
            for i, v in enumerate(variants) for j, x in enumerate(values)}


def panels_figure(points: Sequence[Point], factor: str, metric: str = "train_loss"):
    """The article's figure: one panel per lr, each model's loss curve (median over seeds, with
    the min-max band when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(points)
    lrs = sorted({p.lr for p in points}, reverse=True)  # the article's order: 0.1 first
    cols = 2 if len(lrs) > 1 else 1
    rows = math.ceil(len(lrs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False,
                             sharex=True)
    short = factor.split(".")[-1]
    for ax, lr in zip(axes.flat, lrs, strict=False):
        by_model: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
        for p in points:
            if p.lr == lr:
                by_model[p.variant, p.value].append(p.curve)
        for key, curves in by_model.items():
            length = max(len(c) for c in curves)
            grid_ = np.full((len(curves), length), np.nan)
            for i, c in enumerate(curves):
                grid_[i, :len(c)] = c
            grid_[~np.isfinite(grid_)] = np.nan
            epochs = np.arange(1, length + 1)
            ax.plot(epochs, np.nanmedian(grid_, 0), lw=1.6, label=f"{key[0]} {short}={key[1]}",
                    **styles[key])
            if len(curves) > 1:
                ax.fill_between(epochs, np.nanmin(grid_, 0), np.nanmax(grid_, 0), alpha=0.15,
                                color=styles[key]["color"])
        ax.set_title(f"lr = {lr:g}")
        loss_axis(ax, [v for p in points for v in p.curve])
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(lrs):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    axes.flat[0].legend(fontsize=8)
    n = len({p.seed for p in points})
    fig.suptitle(f"{metric} per epoch at each learning rate"
                 + (f" (median and range over {n} seeds)" if n > 1 else ""))
    fig.tight_layout()
    return fig


def lr_curve_figure(summaries: Sequence[Summary], points: Sequence[Point], factor: str,
                    metric: str = "train_loss"):
    """The learning curve of the learning rate: final loss against lr for each model, the
    geometric mean over seeds with each seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(points)
    short = factor.split(".")[-1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, s in enumerate(summaries):
        style = styles[s.variant, s.value]
        # Nudge each model sideways a little so dots at the same lr do not hide each other.
        nudge = 10 ** (0.015 * (k - (len(summaries) - 1) / 2))
        xs = [lr * nudge for lr in s.lrs]
        ax.plot(xs, s.geo_mean, marker="o", lw=1.6, label=f"{s.variant} {short}={s.value}",
                **style)
        for x, finals in zip(xs, s.finals, strict=True):
            ok = [f for f in finals if math.isfinite(f)]
            ax.scatter([x] * len(ok), ok, s=12, alpha=0.5, color=style["color"])
    ax.set_xscale("log")
    ax.set_xticks(sorted({p.lr for p in points}), [f"{lr:g}" for lr in sorted({p.lr for p in
                                                                                points})])
    ax.minorticks_off()
    loss_axis(ax, [f for s in summaries for finals in s.finals for f in finals])
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final {metric}")
    ax.set_title("final loss against learning rate (line: geometric mean over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tables_markdown(summaries: Sequence[Summary], factor: str, margin: float,
                    metric: str = "train_loss") -> str:
    """A summary table of the sensitivity measures, then one table per model of loss per lr."""
    short = factor.split(".")[-1]
    lines = [
        f"| model | best lr | best final {metric} | lr spread (decades) | "
        f"good-lr range (decades, within {margin:g}x best) | seed spread (decades) | diverged |",
        "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s.variant} {short}={s.value} | {s.best_lr:g} | {s.best_loss:.4g} | "
                     f"{fmt(s.lr_spread)} ± {fmt(s.lr_spread_se)} | {fmt(s.good_range)} "
                     f"({', '.join(f'{lr:g}' for lr in s.good_lrs)}) | {fmt(s.seed_spread)} | "
                     f"{sum(s.diverged)}/{sum(len(f) for f in s.finals)} |")
    for s in summaries:
        lines += ["", f"**{s.variant} {short}={s.value}**", "",
                  f"| lr | final {metric} (geometric mean) | min | max | seed spread (decades) "
                  "| diverged | good |", "|---|---|---|---|---|---|---|"]
        for i, lr in enumerate(s.lrs):
            finals = s.finals[i]
            lines.append(f"| {lr:g} | {s.geo_mean[i]:.4g} | {min(finals):.4g} | "
                         f"{max(finals):.4g} | {fmt(s.log_std[i])} | {s.diverged[i]}/{len(finals)} "
                         f"| {'yes' if lr in s.good_lrs else ''} |")
    return "\n".join(lines)


def runs_csv(points: Sequence[Point]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["variant", "value", "lr", "seed", "status", "final", "epochs", "run_id"])
    for p in points:
        writer.writerow([p.variant, p.value, p.lr, p.seed, p.status, f"{p.final:.6g}",
                         len(p.curve), p.run_id or ""])
    return buf.getvalue()


@dataclass
class StudyResult:
    points: list[Point]
    summaries: list[Summary]
    conclusion: str
    output_dir: Path
    parent_run_id: str | None
    seconds: float


def environment() -> str:
    import torch


    return (f"torch {torch.__version__}, device {pick_device('auto')}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {platform.platform()}")


def run_study(argv: Sequence[str], out_dir: Path, cfg: DictConfig | None = None
              ) -> StudyResult:
    """Check, train the grid under one parent MLflow run, analyse the stored runs, and write and
    log the figures, tables and conclusion. `argv`: the command's overrides (each grid point is
    composed from them); `cfg`: what they compose with conf/sensitivity.yaml, if known."""
    import matplotlib.pyplot as plt


    cfg = cfg if cfg is not None else compose(argv, "sensitivity")
    s = cfg.sensitivity
    check(cfg)
    if s.from_run:  # read first: a bad id must not reopen (and fail) anything
        points = stored_points(cfg)
    else:
        configs = point_configs(argv, s)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tags = {"kind": "sensitivity", "factor": s.factor}
    with torch_threads(s.threads), mlflow_run(cfg, run_name_=s.name, tags=tags,
                                              run_id=s.from_run) as parent:
        if not s.from_run:
            points = run_grid(configs, s, out_dir)
            if parent is not None:  # analyse what the store holds, not what this process has
                points = points_from_store(parent.run_id, s.metric)
        points = in_grid_order(points, s)
        seconds = time.perf_counter() - started
        summaries = summarize(points, s.margin)
        text = conclusion(summaries, s.factor, labels(s), s.metric)
        figures = {"lr_panels.png": panels_figure(points, s.factor, s.metric),
                   "lr_curve.png": lr_curve_figure(summaries, points, s.factor, s.metric)}
        report = markdown(s, summaries, text, list(figures), argv, seconds, len(points))
        for name, fig in figures.items():
            fig.savefig(out_dir / name, dpi=120)
            plt.close(fig)
        (out_dir / "sensitivity.md").write_text(report)
        (out_dir / "runs.csv").write_text(runs_csv(points))
        if parent is not None:
            for name in figures:
                parent.log_artifact(out_dir / name, "plots")
            parent.log_artifact(out_dir / "sensitivity.md")
            parent.log_artifact(out_dir / "runs.csv")
            parent.set_tags({"conclusion": text[:4900], "status": "completed"})
            parent.log_step(0, {metric_key(m, x): getattr(x, m)
                                for x in summaries for m in ("lr_spread", "good_range",
                                                             "seed_spread", "best_loss")
                                if math.isfinite(getattr(x, m))})
    return StudyResult(points, summaries, text, out_dir,
                       parent.run_id if parent is not None else None, seconds)


def stored_points(cfg: DictConfig) -> list[Point]:
    """`sensitivity.from_run`: the grid runs under that parent run, or a ConfigError."""
    from mlflow.exceptions import MlflowException


    use_store(cfg)
    try:
        return points_from_store(cfg.sensitivity.from_run, cfg.sensitivity.metric)
    except MlflowException:
        fail("sensitivity.from_run", cfg.sensitivity.from_run,
             f"no such run in {tracking_uri(cfg)}")


def markdown(s: DictConfig, summaries: Sequence[Summary], text: str, figures: Sequence[str],
             argv: Sequence[str], seconds: float, n_runs: int) -> str:
    command = " ".join(["python -m sweep.sensitivity", *map(shlex.quote, argv)])
    return "\n".join([
        f"# Learning-rate sensitivity: {s.factor} in {labels(s)}", "",
        f"`{command}`", "",
        "## Conclusion", "", text, "",
        "## Figures", "", *(f"![{f}]({f})" for f in figures), "",
        "## Tables", "",
        f"Final {s.metric} is the last epoch's value, averaged over seeds in log space (geometric "
        "mean); a diverged run counts as infinite. lr spread = decades of loss between the best "
        f"and the worst lr (± standard error from the seeds); good-lr range = decades of lr whose "
        f"loss is within {s.margin:g}x the best; seed spread = std over seeds of log10 loss.", "",
        tables_markdown(summaries, s.factor, s.margin, s.metric), "",
        "## Evidence", "",
        f"{n_runs} runs, lrs {list(s.lrs)}, seeds {list(s.seeds)}; " + (
            f"re-analysed from the stored runs of MLflow run {s.from_run}." if s.from_run else
            f"{seconds:.0f} s wall time (training, tracking and reading back)."), "",
        environment(), ""])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sensitivity")
def main(cfg: DictConfig) -> None:
    """Run the study the command line composes, into Hydra's output folder."""
    hydra_cfg = HydraConfig.get()
    cfg = with_choices(cfg, hydra_cfg.runtime.choices)
    try:
        result = run_study(list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir),
                           cfg)
    except (ConfigError, DataError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result.conclusion)
    print(f"{len(result.points)} runs, {result.seconds:.0f} s; figures, tables and "
          f"sensitivity.md in {result.output_dir}")
    if result.parent_run_id:
        print(f"logged to MLflow parent run {result.parent_run_id}")


if __name__ == "__main__":
    main()
