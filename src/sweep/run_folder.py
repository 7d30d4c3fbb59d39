"""A run's folder holds its results without MLflow: `metrics.csv` (one row per epoch, every series
the run logged), `result.json` (status, final and best metrics, MLflow run id, checkpoint), the
figures under `plots/`, and Hydra's `.hydra/` (the resolved config and the overrides).

`sweep.train.train` writes the first two at the end of every run; `python -m sweep` adds the
figures, and a multirun's table (`sweep.multirun`) is read back from `result.json`.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path
from typing import Any

METRICS, RESULT, PLOTS = "metrics.csv", "result.json", "plots"


def write(out_dir: str | Path, result: Any, checkpoint: Path | None = None,
          name: str | None = None) -> None:
    """`metrics.csv` and `result.json` of a `TrainResult` in `out_dir`.

    `checkpoint`: the file the run saved, if it saved one; `name`: its MLflow run name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Epoch 0 holds what was measured before the first step (the loss at initialisation).
    rows = ([{"epoch": 0, **result.initial}] if result.initial else []) + list(result.history)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # first seen first
    with open(out / METRICS, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    final = {k: v for k, v in result.final.items() if k != "epoch"}
    summary = {
        "status": result.status,
        "name": name,
        "epochs": len(result.history),
        "initial": {k: number(v) for k, v in result.initial.items()},
        "metric": result.metric_name,
        "direction": result.direction,
        "final": {k: number(v) for k, v in final.items()},
        "best": {result.metric_name: number(result.best_metric), "epoch": result.best_epoch},
        "skipped_steps": result.skipped_steps,
        "fused": result.fused,
        "mlflow_run_id": result.run_id,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
    }
    (out / RESULT).write_text(json.dumps(summary, indent=2) + "\n")


def number(value: float) -> float | None:
    """JSON has no NaN or infinity: a diverged run's values are null."""
    return value if math.isfinite(value) else None


def save_figures(out_dir: str | Path, figures: dict[str, Any]) -> list[Path]:
    """Each figure as `plots/<name>` in the run folder; the paths written."""
    folder = Path(out_dir) / PLOTS
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=100)
        paths.append(folder / name)
    return paths


def read(out_dir: str | Path) -> dict[str, Any] | None:
    """A run folder's `result.json`, or None where there is none (a run that did not finish)."""
    path = Path(out_dir) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def resume_command(overrides: list[str], checkpoint: Path, epochs_done: int,
                   epochs: int) -> str:
    """The `python -m sweep ...` line that continues a run from its checkpoint: the run's own
    overrides, the checkpoint, and more epochs when it has trained all it was asked to."""
    words = [o for o in overrides if not o.startswith(("trainer.resume=", "trainer.epochs="))]
    more = epochs if epochs > epochs_done else 2 * epochs_done
    words += [f"trainer.resume={Path(checkpoint).resolve()}", f"trainer.epochs={more}"]
    return " ".join(["python -m sweep", *map(shlex.quote, words)])
