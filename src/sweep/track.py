"""MLflow: where runs go, what each run records, and a tracker the training loop calls."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    uri = cfg.tracking.get("uri") if cfg is not None else None
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """`{"optimizer": {"lr": 0.1}}` -> `{"optimizer.lr": "0.1"}`; lists stay one value."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)}


def run_name(cfg: DictConfig) -> str:
    if cfg.get("run_name"):
        return cfg.run_name
    c = cfg.get("choices") or {}
    return "-".join(str(c.get(g, "?")) for g in ("model", "dataset", "optimizer", "scheduler"))


def run_tags(cfg: DictConfig) -> dict[str, str]:
    c = cfg.get("choices") or {}
    tags = {g: str(c[g]) for g in ("model", "dataset", "optimizer", "scheduler") if g in c}
    tags["bn"] = str(cfg.model.get("bn", "none"))
    return tags


def use_store(cfg: DictConfig | None = None, experiment: str | None = None) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name = experiment or (cfg.tracking.experiment if cfg is not None else "sweep")
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, so the store is one folder a person can move or delete.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


class Tracker:
    """Logs one MLflow run's curves, figures and tags.

    Metrics are buffered and written in batches by one background thread: every `flush_every_s`
    seconds the buffer goes to the writer as one `log_batch`, so the database work (on SQLite about
    50 us a metric and 5 ms a batch) overlaps training instead of stalling each epoch. `close`
    waits for the writer.
    """

    def __init__(self, run_id: str | None, flush_every_s: float = 0.5):
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self._pending: list[Any] = []
        self._flushed_at = time.monotonic()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
        self._writes: list[Future] = []

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_step(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush(wait=False)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self, wait: bool = True) -> None:
        """Hand the buffered metrics to the writer; with `wait`, until everything is written."""
        import mlflow

        client = mlflow.MlflowClient()
        for i in range(0, len(self._pending), 1000):  # MLflow takes at most 1000 per batch
            self._writes.append(self._writer.submit(
                client.log_batch, self.run_id, metrics=self._pending[i:i + 1000]))
        self._pending = []
        self._flushed_at = time.monotonic()
        if wait:
            for write in self._writes:
                write.result()  # raises here if a write failed
            self._writes = []

    def close(self) -> None:
        self.flush()
        self._writer.shutdown()

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()}, run_id=self.run_id)

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow
        from mlflow.entities import RunTag

        run_tags_ = [RunTag(k, str(v)) for k, v in tags.items()]
        mlflow.MlflowClient().log_batch(self.run_id, tags=run_tags_)

    def log_figure(self, fig: Any, name: str) -> None:
        import mlflow

        mlflow.MlflowClient().log_figure(self.run_id, fig, name)

    def log_text(self, text: str, name: str) -> None:
        import mlflow

        mlflow.MlflowClient().log_text(self.run_id, text, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        import mlflow

        mlflow.MlflowClient().log_artifact(self.run_id, str(path), folder)

    def finish(self, result: Any) -> None:
        """Record how the run ended, its summary numbers and its curves as figures."""
        from sweep.report import loss_figure, lr_figure

        self.set_tags({"status": result.status})
        summary = {f"best_{result.metric_name}": result.best_metric,
                   "best_epoch": result.best_epoch,
                   "skipped_steps_total": result.skipped_steps}
        self.log_step(len(result.history), {k: v for k, v in summary.items() if v == v})
        self.flush()
        if result.history:
            self.log_figure(loss_figure(result.history, result.metric_name), "plots/loss.png")
        if result.lr_trace:
            self.log_figure(lr_figure({"lr": result.lr_trace}), "plots/lr.png")


@contextmanager
def mlflow_run(cfg: DictConfig, run_name_: str | None = None, nested: bool = False,
               tags: dict[str, str] | None = None, run_id: str | None = None,
               experiment: str | None = None) -> Iterator[Tracker | None]:
    """Open (or, with `run_id`, reopen) a run that records the config; yields its Tracker.

    With `tracking.enabled=false` it yields None and logs nothing.
    """
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    experiment_id = use_store(cfg, experiment)
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, nested=nested,
                          run_name=None if run_id else (run_name_ or run_name(cfg)),
                          tags=None if run_id else {**run_tags(cfg), **(tags or {})}) as run:
        tracker = Tracker(run.info.run_id)
        if run_id is None:
            container = OmegaConf.to_container(cfg, resolve=True)
            tracker.log_params(flatten(container))
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        try:
            yield tracker
        finally:
            tracker.close()  # waits for the metrics still being written
