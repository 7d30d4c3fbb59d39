"""A Hydra multirun seen as one job: one progress bar over its runs, and at its end one table
across them, best first, read from each run folder's `result.json` (`sweep.run_folder`).

conf/config.yaml registers `MultirunSummary` as `hydra.callbacks.summary`. Hydra calls it in the
process that starts the multirun; the table is read from the folders, so it is the same whichever
launcher ran the jobs and wherever.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sweep import run_folder
from sweep.config import override_key

TABLE = "summary.csv"


class MultirunSummary(Callback):
    """One bar for the whole multirun; a table of its runs, sorted by the metric, at its end."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.sweep_dir: Path | None = None
        self.varied: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolved now: the folder's name holds the start time (`${now:...}`).
        self.sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        sweeps = [o for o in overrides if o.is_sweep_override()]
        self.varied = [o.key_or_group for o in sweeps]
        self.bar = tqdm(total=job_count(sweeps), desc="multirun", unit="run", file=sys.stderr,
                        dynamic_ncols=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.bar is None:  # a launcher that runs jobs in other processes
            return
        value = job_return.return_value
        shown = f"{value:.4g}" if isinstance(value, float) else job_return.status.name.lower()
        varied = [o for o in job_return.overrides if override_key(o) in self.varied]
        self.bar.set_postfix_str(f"last: {' '.join(varied)} -> {shown}")
        self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.sweep_dir is None:
            return
        rows = read_rows(self.sweep_dir, self.varied)
        if not rows:  # another app's multirun (a study, a sensitivity study): no run folders
            return
        write_csv(self.sweep_dir / TABLE, rows)
        print(f"\n{len(rows)} runs, best first (also in {self.sweep_dir / TABLE}):")
        print(markdown(rows))


def job_count(sweeps: list[Any]) -> int | None:
    """How many jobs the basic sweeper makes of these sweeps (the product of their lengths);
    None for a sweep that is not a list of values (an interval, for an optimising sweeper)."""
    total = 1
    for o in sweeps:
        try:
            total *= len(list(o.sweep_string_iterator()))
        except Exception:
            return None
    return total


def read_rows(sweep_dir: Path, varied: list[str]) -> list[dict[str, Any]]:
    """One row per job folder that holds a `result.json`, best first; jobs without one (failed,
    or not a training run) are left out."""
    rows = []
    for job in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
        result = run_folder.read(job) if job.is_dir() else None
        if result is None:
            continue
        saved = job / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(saved)) if saved.is_file() else []
        values = {override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
        metric = result["metric"]
        final = result["final"].get(metric)
        rows.append({"job": job.name, **{k: values.get(k, "") for k in varied},
                     "status": result["status"], "metric": metric,
                     "final": final if final is not None else math.nan,
                     "best": result["best"].get(metric), "best_epoch": result["best"]["epoch"],
                     "epochs": result["epochs"], "direction": result["direction"],
                     "mlflow_run": result["mlflow_run_id"] or "", "folder": str(job)})

    def rank(row: dict[str, Any]) -> tuple:
        value = row["final"]
        if not math.isfinite(value):
            return (row["metric"], 1, 0.0)  # diverged runs last
        return (row["metric"], 0, -value if row["direction"] == "maximize" else value)
    return sorted(rows, key=rank)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table a person reads: the varied values, status, final and best metric, the run."""
    skip = {"final", "best", "best_epoch", "direction", "mlflow_run", "folder"}
    if len({r["metric"] for r in rows}) == 1:  # else (classification and regression) a column
        skip.add("metric")
    keys = [k for k in rows[0] if k not in skip]
    head = [*keys, f"final {rows[0]['metric']}", "best (epoch)", "MLflow run"]
    lines = [head]
    for r in rows:
        best = f"{r['best']:.4g} ({r['best_epoch']})" if r["best"] is not None else "-"
        final = f"{r['final']:.4g}" if math.isfinite(r["final"]) else "-"
        lines.append([*(str(r[k]) for k in keys), final, best, r["mlflow_run"][:8] or "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
           for line in lines]
    out.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(out)
