"""Factor x learning rate x seed studies: does a change make training more or less lr-sensitive?

`python -m sweep.sensitivity experiment=bn_sensitivity` (make study-bn) reproduces the BN article:
tanh MLPs with and without BatchNorm trained with SGD at four learning rates, repeated over seeds.
Any config key (or config group) can be the factor, e.g. `sensitivity.factor=optimizer.momentum
sensitivity.values=[0,0.9]`, crossed with named model variants, `sensitivity.lrs` and
`sensitivity.seeds`. Settings: the `sensitivity` group (conf/sensitivity/default.yaml), composed by
conf/sensitivity.yaml; an experiment's `sensitivity:` block overrides it.

Every grid point is its own MLflow run under a parent run (the points that differ only in lr and
seed train fused, `fuse` at once: `sweep.fused`); the figures, the tables and the
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
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sweep import CONF_DIR, fused
from sweep.compare import ALPHA, LEVEL
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
from sweep.mlflow_store import tracking_uri, use_store
from sweep.sensitivity_analysis import (
    Point,
    Summary,
    conclusion,
    fallback_note,
    lr_curve_figure,
    panels_figure,
    sensitivity_figure,
    summarize,
    tables,
)
from sweep.study_plan import override_text, with_values
from sweep.track import member_runs, mlflow_run, summary_tags
from sweep.train import describe_device, pick_device
from sweep.validation import DataError

# Per-epoch losses (lower is better). train_eval_loss is the BN article's curve: the loss over the
# whole training split in eval mode, with its value at initialisation (epoch 0) for the cap.
METRICS = ("train_eval_loss", "train_loss", "val_loss", "val_mse")


def metric_key(measure: str, s: Summary) -> str:
    """`lr_sensitivity.mlp3.pre`: MLflow allows only letters, digits and _ - . / and spaces."""
    return re.sub(r"[^\w./ -]", "_", f"{measure}.{s.variant}.{s.value}")


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
        for label in labels(s):
            try:
                cfg = compose([*argv, *extra, f"{s.factor}={label}"], "sensitivity")
            except HydraException as err:
                if extra:  # the variant's own overrides on their own: does the error name it?
                    try:
                        compose([*argv, *extra], "sensitivity")
                    except HydraException as own:
                        fail(f"sensitivity.models.{variant}", extra, first_line(own))
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
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_grid(configs: dict[tuple[str, str], DictConfig], s: DictConfig, out_dir: Path,
             fuse: Any, parent_run_id: str | None) -> list[Point]:
    """Train every grid point as its own MLflow run under the parent run (if any): the points
    of one model variant and factor value, which differ only in lr and seed, train fused (`fuse`
    at once, `sweep.fused`), each still its own run, folder and row."""
    grid = [(variant, value, float(lr), int(seed)) for variant, value in configs
            for lr in s.lrs for seed in s.seeds]
    short = s.factor.split(".")[-1]
    cfgs = [with_values(configs[variant, value], {s.lr_key: lr, "seed": seed,
                                                  "trainer.progress": False})
            for variant, value, lr, seed in grid]
    names = [f"{variant}-{short}={value}-lr={lr:g}-seed={seed}"
             for variant, value, lr, seed in grid]
    tags = [{"phase": "sensitivity", "variant": variant, "factor": s.factor, "value": value,
             "lr": override_text(lr), "seed": str(seed)}
            for variant, value, lr, seed in grid]
    log_plots = bool(cfgs[0].tracking.get("log_plots", False))
    points: list[Point | None] = [None] * len(grid)
    bar = tqdm(total=len(grid), desc="sensitivity", unit="run", dynamic_ncols=True)  # one bar
    for group in fused.groups(cfgs, fuse):
        members = [cfgs[i] for i in group]
        with member_runs(members, [names[i] for i in group], [tags[i] for i in group],
                         parent_run_id) as trackers:
            # Each run its own folder: metrics.csv and result.json there.
            results = fused.train_group(members, trackers=trackers,
                                        output_dirs=[out_dir / "runs" / names[i] for i in group])
            for tracker, result in zip(trackers, results, strict=True):
                if tracker is not None:
                    if log_plots:
                        tracker.finish(result)
                    else:
                        tracker.set_tags(summary_tags(result))
        for i, result in zip(group, results, strict=True):
            if result.history and s.metric not in result.history[0]:
                logged = ", ".join(k for k in METRICS if k in result.history[0])
                hint = ("; or set trainer.train_eval_loss=true (auto measures it only for data "
                        "that lives on the device)" if s.metric == "train_eval_loss" else "")
                fail("sensitivity.metric", s.metric, f"these runs log {logged}, not "
                     f"{s.metric}{hint}")
            variant, value, lr, seed = grid[i]
            points[i] = Point(variant, value, lr, seed, result.status,
                              [h[s.metric] for h in result.history],
                              result.initial.get(s.metric), result.run_id)
        # On the one bar: a line per run would scroll the bar away.
        bar.update(len(group))
        statuses = Counter(r.status for r in results)
        first = names[group[0]] if len(group) == 1 else (
            f"{grid[group[0]][0]}-{short}={grid[group[0]][1]}, {len(group)} fused")
        bar.set_postfix_str(f"{first}: " + ", ".join(f"{n} {k}" for k, n in statuses.items()))
    bar.close()
    return [p for p in points if p is not None]


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
        initial = next((m.value for m in history if m.step == 0), None)  # epoch 0, if logged
        points.append(Point(tags["variant"], tags["value"], float(tags["lr"]), int(tags["seed"]),
                            tags.get("status", "unknown"),
                            [m.value for m in history if m.step >= 1], initial, r.info.run_id))
    if not points:
        raise ConfigError(f"sensitivity.from_run={parent_run_id!r}: no grid runs under that run")
    return points


def runs_csv(points: Sequence[Point]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["variant", "value", "lr", "seed", "status", "final", "initial", "capped",
                     "epochs", "run_id"])
    for p in points:
        writer.writerow([p.variant, p.value, p.lr, p.seed, p.status, f"{p.final:.6g}",
                         "" if p.initial is None else f"{p.initial:.6g}", f"{p.capped:.6g}",
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
    return (f"torch {torch.__version__}, device {pick_device('auto')}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {platform.platform()}")


def run_study(argv: Sequence[str], out_dir: Path, cfg: DictConfig | None = None
              ) -> StudyResult:
    """Check, train the grid under one parent MLflow run, analyse the stored runs, and write and
    log the figures, tables and conclusion. `argv`: the command's overrides (each grid point is
    composed from them); `cfg`: what they compose with conf/sensitivity.yaml, if known."""
    cfg = cfg if cfg is not None else compose(argv, "sensitivity")
    s = cfg.sensitivity
    check(cfg)
    if s.from_run:  # read first: a bad id must not reopen (and fail) anything
        points = stored_points(cfg)
    else:
        configs = point_configs(argv, s)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = describe_device(pick_device(cfg.trainer.device))
    started = time.perf_counter()
    tags = {"kind": "sensitivity", "factor": s.factor}
    with torch_threads(s.threads), mlflow_run(cfg, run_name_=s.name, tags=tags,
                                              run_id=s.from_run) as parent:
        if not s.from_run:
            points = run_grid(configs, s, out_dir, cfg.fuse,
                              parent.run_id if parent is not None else None)
            if parent is not None:  # analyse what the store holds, not what this process has
                points = points_from_store(parent.run_id, s.metric)
        points = in_grid_order(points, s)
        seconds = time.perf_counter() - started
        summaries = summarize(points, s.margin)
        text = conclusion(summaries, s.factor, labels(s), s.metric)
        figures = {"lr_panels.png": panels_figure(points, s.factor, s.metric),
                   "lr_curve.png": lr_curve_figure(summaries, points, s.factor, s.metric),
                   "lr_sensitivity.png": sensitivity_figure(summaries, s.factor, s.metric)}
        report = markdown(s, points, summaries, text, list(figures), argv, seconds, device)
        for name, fig in figures.items():
            fig.savefig(out_dir / name, dpi=120)
        (out_dir / "sensitivity.md").write_text(report)
        (out_dir / "runs.csv").write_text(runs_csv(points))
        if parent is not None:
            for name in figures:
                parent.log_artifact(out_dir / name, "plots")
            parent.log_artifact(out_dir / "sensitivity.md")
            parent.log_artifact(out_dir / "runs.csv")
            parent.set_tags({"conclusion": text[:4900], "status": "completed",
                             "metric": s.metric})
            parent.log_step(0, {metric_key(name, x): value for x in summaries for name, value in (
                ("lr_sensitivity", x.sensitivity.mean), ("good_range", x.good_range),
                ("seed_spread", x.seed_spread), ("best_loss", x.best_loss))
                if math.isfinite(value)})
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


def markdown(s: DictConfig, points: Sequence[Point], summaries: Sequence[Summary], text: str,
             figures: Sequence[str], argv: Sequence[str], seconds: float, device: str) -> str:
    command = " ".join(["python -m sweep.sensitivity", *map(shlex.quote, argv)])
    return "\n".join([
        f"# Learning-rate sensitivity of {s.metric}: {s.factor} in {labels(s)}", "",
        f"`{command}`", "",
        "## Conclusion", "", text, "",
        "## Figures", "", *(f"![{f}]({f})" for f in figures), "",
        "## Tables", "",
        f"Metric: {s.metric}, the last epoch's value. LR sensitivity (Wortsman et al. 2023): per "
        "seed, the mean over the lrs of (final loss - the best final loss over the lrs), each "
        "final loss capped at the loss at initialisation, so a diverged run counts as no better "
        f"than where it started; then the mean over seeds with its {LEVEL:.0%} Student t "
        f"interval. Good-lr range = decades of lr whose mean capped loss is within {s.margin:g}x "
        "the best; seed spread = std over seeds of log10 of the capped loss, averaged over the "
        "lrs. Learned = final loss at most 0.9x the loss at initialisation, and the run not "
        "tagged stalled by the trainer (`sweep.train.did_not_learn`, which also asks for 0.9x "
        f"the loss of the best prediction that ignores the inputs). A difference between values "
        "is clear when its paired t-test over seeds, "
        f"Holm-corrected across the variants, gives p < {ALPHA:g}.", "",
        *filter(None, [fallback_note(points, s.metric)]), "",
        tables(summaries, s.factor, s.margin, s.metric), "",
        "## Evidence", "",
        f"{len(points)} runs, lrs {list(s.lrs)}, seeds {list(s.seeds)}; " + (
            f"re-analysed from the stored runs of MLflow run {s.from_run}." if s.from_run else
            f"{seconds:.0f} s wall time (training, tracking and reading back) on {device}."), "",
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
