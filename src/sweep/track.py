"""MLflow: where runs go, what each run records, and a tracker the training loop calls."""

from __future__ import annotations

import os
import time
import warnings
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


MetricPoint = tuple[str, float, int, int]  # key, value, timestamp (ms), step


def write_metrics(run_id: str, points: list[MetricPoint]) -> str:
    """Append metric points to a run as `MlflowClient.log_batch` would; returns which path did.

    `log_batch` builds and validates an ORM object per point: on SQLite about 50 us each, plus
    5 ms a batch, which is a tenth of a run whose epochs take 3 ms. On a SQL store (SQLite,
    PostgreSQL, MySQL) the points go in as one bulk INSERT into MLflow's own tables, through its
    SQLAlchemy models so the columns are the installed MLflow's: 900 points in 8 ms. The run's
    latest values are kept as `log_batch` keeps them. Any other store (a tracking server), or a
    batch the bulk path refuses, goes through `log_batch`; a failed bulk INSERT is rolled back
    whole, so no point is written twice.
    """
    import mlflow
    from mlflow.entities import Metric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy.exc import IntegrityError

    client = mlflow.MlflowClient()
    store = client._tracking_client.store
    if isinstance(store, SqlAlchemyStore):
        try:
            _bulk_insert_metrics(store, run_id, points)
            return "bulk"
        except Exception as err:
            # A point stored twice (log_batch skips repeats) is expected; anything else will
            # recur in every batch, so say so. MLflow's session wraps the database's errors.
            if not isinstance(err.__cause__ or err, IntegrityError):
                warnings.warn(f"Writing metrics in bulk failed ({type(err).__name__}: {err}); "
                              "using MLflow's log_batch, which is slower", stacklevel=2)
    client.log_batch(run_id, metrics=[Metric(*p) for p in points])
    return "log_batch"


def _bulk_insert_metrics(store: Any, run_id: str, points: list[MetricPoint]) -> None:
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from sqlalchemy import insert

    def order(row: Any) -> tuple:  # MLflow's rule for a key's latest value
        return (row["step"], row["timestamp"], row["value"])

    rows, latest = [], {}
    for key, value, timestamp, step in points:
        is_nan, value = store.sanitize_metric_value(value)  # NaN as 0 and a flag, inf as max
        row = {"run_uuid": run_id, "key": key, "value": value, "timestamp": timestamp,
               "step": step, "is_nan": is_nan}
        rows.append(row)
        if key not in latest or order(row) > order(latest[key]):
            latest[key] = row
    with store.ManagedSessionMaker(read_only=False) as session:  # one transaction
        session.execute(insert(SqlMetric.__table__), rows)  # Core: no ORM work per row
        for old in session.query(SqlLatestMetric).filter(
                SqlLatestMetric.run_uuid == run_id, SqlLatestMetric.key.in_(list(latest))).all():
            new = latest.pop(old.key)
            if order(new) > (old.step, old.timestamp, old.value):
                old.value, old.timestamp, old.step, old.is_nan = (
                    new["value"], new["timestamp"], new["step"], new["is_nan"])
        session.add_all([SqlLatestMetric(**row) for row in latest.values()])


class Tracker:
    """Logs one MLflow run's curves, figures and tags.

    Metrics are buffered and written in batches by one background thread (`write_metrics`):
    every `flush_every_s` seconds the buffer goes to the writer, so the database work overlaps
    training instead of stalling each epoch. `close` waits for the writer.
    """

    def __init__(self, run_id: str | None, flush_every_s: float = 0.5):
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self._pending: list[MetricPoint] = []
        self._flushed_at = time.monotonic()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
        self._writes: list[Future] = []

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_step(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush(wait=False)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending += [(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self, wait: bool = True) -> None:
        """Hand the buffered metrics to the writer; with `wait`, until everything is written."""
        for i in range(0, len(self._pending), 1000):  # MLflow takes at most 1000 per batch
            self._writes.append(self._writer.submit(
                write_metrics, self.run_id, self._pending[i:i + 1000]))
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
