"""`python -m sweep <overrides>`: train once with the composed config, logged to MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sweep import CONF_DIR, run_folder
from sweep.checkpoint import read_checkpoint
from sweep.config import ConfigError, fail, tracking_source, validate, with_choices
from sweep.mlflow_store import tracking_uri, use_store
from sweep.plots import run_figures
from sweep.schedules import validate_scheduler
from sweep.track import mlflow_run, run_name
from sweep.train import TrainResult, default_output_dir, setup, train
from sweep.validation import DataError


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> TrainResult:
    """Train with MLflow tracking: the run records the config, every curve and the final plots.

    Everything is checked before the MLflow run is opened (or, resuming, reopened), so a refused
    input leaves no run behind and no finished run changed: the config's values, then the parts
    built from them (data, model, optimizer, loss, schedule for this data), then the checkpoint.
    The parts are built once: `train` trains with them.
    """
    validate(cfg)
    parts = setup(cfg)
    validate_scheduler(cfg.scheduler, parts.budget, parts.direction)
    run_id = None
    if cfg.trainer.resume:  # continue the interrupted run's MLflow record too
        state = read_checkpoint(cfg, parts)
        run_id = state["run_id"] if cfg.tracking.enabled else None
        if run_id is not None:
            check_run_continues(cfg, run_id, state["epoch"])
    out_dir = Path(output_dir) if output_dir is not None else default_output_dir()
    with mlflow_run(cfg, run_id=run_id) as tracker:
        result = train(cfg, tracker=tracker, output_dir=out_dir, parts=parts)
        figures = run_figures(result, tracker.name if tracker is not None else run_name(cfg))
        run_folder.save_figures(out_dir, figures)  # the same figures go to MLflow
        if tracker is not None:
            tracker.finish(result, figures)
    return result


def check_run_continues(cfg: DictConfig, run_id: str, epoch: int) -> None:
    """The checkpoint's MLflow run must be in this store, and a finished run is continued only
    from its last epoch (an earlier checkpoint would log epochs it has a second time)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    key, uri = tracking_source(cfg)
    use_store(cfg)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        fail("trainer.resume", cfg.trainer.resume, f"its MLflow run {run_id} is not in the store "
             f"{key}={uri!r}; resume with the store it was logged to, or with tracking=none")
    if run.info.status == "FINISHED":
        logged = max((m.step for m in client.get_metric_history(run_id, "train_loss")),
                     default=epoch)
        if logged > epoch:
            fail("trainer.resume", cfg.trainer.resume, f"its MLflow run {run_id} finished with "
                 f"{logged} epochs and this checkpoint holds {epoch}: continuing would log epochs "
                 "it has again; resume from its last checkpoint, or with tracking=none")


def summary(result: TrainResult, cfg: DictConfig, out_dir: Path,
            overrides: list[str]) -> str:
    """What a run prints at its end: status, final and best values, where its results and its
    checkpoint are, and the command that resumes it."""
    final = result.final
    lines = [f"status: {result.status} after {len(result.history)} epochs",
             f"final: train_loss {final.get('train_loss', float('nan')):.4g}, "
             f"val_loss {final.get('val_loss', float('nan')):.4g}, "
             f"{result.metric_name} {result.final_metric:.4g}",
             f"best {result.metric_name}: {result.best_metric:.4g} at epoch {result.best_epoch}"]
    if result.skipped_steps:
        lines.append(f"optimizer steps skipped by the fp16 gradient scaler: {result.skipped_steps}")
    lines.append(f"run folder: {out_dir.resolve()} (metrics.csv, result.json, plots/, "
                 ".hydra/config.yaml)")
    checkpoint = run_folder.read(out_dir)["checkpoint"]
    if checkpoint:
        done = len(result.history)
        how = "resume" if done < cfg.trainer.epochs else "train on (any trainer.epochs above " \
            f"{done})"
        lines += [f"checkpoint: {checkpoint}", f"{how}: " + run_folder.resume_command(
            overrides, Path(checkpoint), done, cfg.trainer.epochs)]
    return "\n".join(lines)


def ui_link(run_id: str) -> str:
    """The run's page in `mlflow ui` on its default port, in the UI's "Model training" mode
    (MLflow 3 opens experiments in its GenAI mode, which shows no runs)."""
    import mlflow

    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return (f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"
            "?workflowType=machine_learning")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train once; returns the final validation metric (for Hydra multirun sweepers)."""
    hydra = HydraConfig.get()
    cfg = with_choices(cfg, hydra.runtime.choices)
    if hydra.mode == RunMode.MULTIRUN:  # one bar for the whole multirun (sweep.multirun)
        cfg.trainer.progress = False
    try:
        result = run(cfg)
    except (ConfigError, DataError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary(result, cfg, Path(hydra.runtime.output_dir), list(hydra.overrides.task)))
    if cfg.tracking.enabled and hydra.mode != RunMode.MULTIRUN:  # its table names the runs
        print(f"logged to MLflow run {result.run_id} in {tracking_uri(cfg)}; see it with "
              f"`make ui` (mlflow ui --backend-store-uri <that uri>) at {ui_link(result.run_id)}")
    return result.final_metric


if __name__ == "__main__":
    main()
