"""The schedule-comparison report of a study read back from MLflow: `python -m sweep.report`.

Reads a study's runs back from MLflow (any study: the parent run and its children are all it
needs), hands them to `sweep.compare` (the comparison the study's own summary makes), and writes
report.md with PNGs, or one self-contained report.html.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sweep import CONF_DIR
from sweep.compare import Comparison, Run, compare, html_page, steps_per_epoch
from sweep.compare_plots import figures
from sweep.config import ConfigError, check_choice, check_in_range, fail
from sweep.mlflow_store import use_store

# Settings: the `report` group (conf/report/default.yaml), composed by conf/report.yaml on top of
# the study's config (conf/sweep.yaml), so `study=tiny` names a study too.
FORMATS = ("md", "html")
NO_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class Stored:
    """One child run of a study as read back from MLflow: the comparison's run, and where it
    sits in the study."""

    run: Run
    role: str                    # confirm | trial | ... (tag `role`, else `phase`, else "")
    params: dict[str, str]


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


def load_study_runs(client: Any, parent: Any) -> tuple[list[Stored], str]:
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
            # Epoch e is logged at step e; a value at step 0 (before training) is not a result.
            return [m.value for m in sorted(client.get_metric_history(run_id, key),
                                            key=lambda m: m.step) if m.step >= 1]
        curve = history(metric)
        lrs = history("lr")[:len(curve)]
        seed = tags.get("seed", params.get("seed"))
        schedule = tags.get("schedule") or tags.get("scheduler") or params.get(
            "scheduler._target_", "?").rsplit(".", 1)[-1]
        run = Run(schedule, int(seed) if seed not in (None, "None") else None,
                  tags.get("status", "unknown"), curve,
                  # Epoch e's lr holds over [e-1, e): a closing point draws the last epoch too.
                  [(float(e), lr) for e, lr in enumerate([*lrs, *lrs[-1:]])],
                  epoch_times=history("epoch_time")[:len(curve)], device=tags.get("device"),
                  run_id=r.info.run_id)
        runs.append(Stored(run, tags.get("role", tags.get("phase", "")), params))
    return runs, metric


def tuned_settings(params: dict[str, str]) -> dict[str, str]:
    """The searched keys' values: the schedule's search_space names them (logged flattened as
    `scheduler.search_space.<key>.type`); without one, the lr."""
    keys = [k.removeprefix("scheduler.search_space.").removesuffix(".type") for k in params
            if k.startswith("scheduler.search_space.") and k.endswith(".type")]
    return {k: params[k] for k in (keys or ["optimizer.lr"]) if k in params}


def shown(value: str) -> str:
    """A logged value in a table: numbers at 4 significant digits (the run keeps every digit)."""
    try:
        return f"{float(value):.4g}" if "." in value or "e" in value else value
    except ValueError:
        return value


def chosen_runs(stored: list[Stored], maximize: bool) -> tuple[list[Stored], dict[str, dict]]:
    """Per schedule its confirmation runs, or else its best finished trial; and the table's
    extra cells per schedule (tuned settings, where the runs come from)."""
    chosen, columns = [], {}
    for schedule in dict.fromkeys(s.run.group for s in stored):
        mine = [s for s in stored if s.run.group == schedule]
        confirm = [s for s in mine if s.role == "confirm"]
        if confirm:
            picked = sorted(confirm, key=lambda s: (s.run.seed is None, s.run.seed or 0))
            source = "confirmation runs"
        else:
            done = [s for s in mine if math.isfinite(s.run.final)]
            if not done:
                continue
            picked = [(max if maximize else min)(done, key=lambda s: s.run.final)]
            source = "best trial (no confirmation runs)"
        chosen += picked
        settings = tuned_settings(picked[0].params)
        columns[schedule] = {"tuned settings": " ".join(
            f"{k.rsplit('.', 1)[-1]}={shown(v)}" for k, v in settings.items()), "source": source}
    return chosen, columns


def add_steps_per_epoch(client: Any, stored: list[Stored]) -> None:
    """Each run's optimizer steps per epoch, from the config it logged (config.yaml): runs that
    share data and batch size share the count, so each distinct pair is loaded once."""
    import mlflow

    known: dict[tuple[str, str], int | None] = {}
    quiet = os.environ.get(NO_BAR)
    os.environ[NO_BAR] = "false"  # one config file each: MLflow's download bar would be noise
    try:
        for s in stored:
            key = (str({k: v for k, v in s.params.items() if k.startswith("dataset.")}),
                   s.params.get("trainer.batch_size", ""))
            if key not in known:
                try:
                    text = mlflow.artifacts.load_text(f"runs:/{s.run.run_id}/config.yaml")
                    known[key] = steps_per_epoch(OmegaConf.create(text))
                except Exception:  # no config logged, or its data is not on this machine
                    known[key] = None
            s.run.steps_per_epoch = known[key]
    finally:
        if quiet is None:
            del os.environ[NO_BAR]
        else:
            os.environ[NO_BAR] = quiet


@dataclass
class Report:
    path: Path                   # report.md or report.html
    files: list[Path]            # everything written
    comparison: Comparison
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
    import mlflow

    s = cfg.report
    client = mlflow.MlflowClient()
    experiment_id = use_store(cfg, s.experiment)
    parent = find_study(client, experiment_id, str(s.study))
    name = parent.data.tags.get("study") or parent.info.run_name
    stored, metric = load_study_runs(client, parent)
    maximize = metric == "val_acc"
    chosen, columns = chosen_runs(stored, maximize)
    add_steps_per_epoch(client, chosen)
    comparison = compare([c.run for c in chosen], metric, maximize, s.alpha, s.target, columns)
    sentence = comparison.sentence()
    out_dir.mkdir(parents=True, exist_ok=True)

    pngs = {}
    for file, fig in figures(comparison).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        pngs[file] = buf.getvalue()
    extra = ["tuned settings", "source"]
    notes = [f"Study {name!r} (MLflow run {parent.info.run_id}, experiment "
             f"{mlflow.get_experiment(parent.info.experiment_id).name!r}): {len(stored)} runs "
             f"read, metric {metric} ({'higher' if maximize else 'lower'} is better).",
             *comparison.notes()]
    title = f"Schedule comparison: {name}"
    if s.format == "md":
        path = out_dir / "report.md"
        for file, data in pngs.items():
            (out_dir / file).write_bytes(data)
        path.write_text("\n\n".join([
            f"# {title}", sentence, "## Per schedule", comparison.summary_table("md", extra),
            "## Against the leader", comparison.versus_table("md"), "## Curves",
            *(f"![{file}]({file})" for file in pngs), "## Notes", *notes]) + "\n")
        files = [path, *(out_dir / file for file in pngs)]
    else:
        from html import escape

        path = out_dir / "report.html"
        path.write_text(html_page(title, [
            ("", f"<p>{escape(sentence)}</p>"),
            ("Per schedule", comparison.summary_table("html", extra)),
            ("Against the leader", comparison.versus_table("html")),
            ("Notes", "".join(f"<p>{escape(n)}</p>" for n in notes))], pngs))
        files = [path]
    if s.log and cfg.tracking.enabled:
        for file in files:
            client.log_artifact(parent.info.run_id, str(file), "report")
    return Report(path, files, comparison, sentence, parent.info.run_id)


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
