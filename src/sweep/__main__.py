"""`python -m sweep <overrides>`: train once with the composed config, logged to MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sweep import CONF_DIR
from sweep.config import ConfigError, validate, with_choices
from sweep.data import DataError
from sweep.track import mlflow_run, tracking_uri
from sweep.train import TrainResult, train


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> TrainResult:
    """Train with MLflow tracking: the run records the config, every curve and the final plots."""
    validate(cfg)  # fail before an MLflow run is opened
    run_id = None
    if cfg.trainer.resume:  # continue the interrupted run's MLflow record too
        run_id = torch.load(cfg.trainer.resume, map_location="cpu", weights_only=False)["run_id"]
    with mlflow_run(cfg, run_id=run_id) as tracker:
        result = train(cfg, tracker=tracker, output_dir=output_dir)
        if tracker is not None:
            tracker.finish(result)
    return result


def summary(result: TrainResult) -> str:
    final = result.final
    lines = [f"status: {result.status} after {len(result.history)} epochs",
             f"final: train_loss {final.get('train_loss', float('nan')):.4g}, "
             f"val_loss {final.get('val_loss', float('nan')):.4g}, "
             f"{result.metric_name} {result.final_metric:.4g}",
             f"best {result.metric_name}: {result.best_metric:.4g} at epoch {result.best_epoch}"]
    if result.skipped_steps:
        lines.append(f"optimizer steps skipped by the fp16 gradient scaler: {result.skipped_steps}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train once; returns the final validation metric (for Hydra multirun sweepers)."""
    cfg = with_choices(cfg, HydraConfig.get().runtime.choices)
    try:
        result = run(cfg)
    except (ConfigError, DataError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary(result))
    if cfg.tracking.enabled:
        print(f"logged to MLflow run {result.run_id} in {tracking_uri(cfg)}; "
              "see it with `make ui` (mlflow ui --backend-store-uri <that uri>)")
    return result.final_metric


if __name__ == "__main__":
    main()
