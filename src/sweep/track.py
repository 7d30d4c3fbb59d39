"""MLflow runs: what each run records (names, params, tags, per-epoch metrics, figures) and the
tracker the training loop calls.

Everything goes through MLflow's public API (`sweep.mlflow_store`). Metric points never get lost
to an unreachable store: they wait in memory and the tracker's writer thread retries them.
"""


from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sweep.config import override_key
from sweep.mlflow_store import (
    PERMANENT,
    RETRY_FIRST_S,
    RETRY_MAX_S,
    WAIT_ENV,
    TrackingUnavailable,
    brief,
    call_mlflow,
    end_run,
    fail_fast_http,
    patience_s,
    quiet_store,
    say,
    shown,
    store_refused,
    tracking_uri,
    transient,
    use_store,
)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """`{"optimizer": {"lr": 0.1}}` -> `{"optimizer.lr": "0.1"}`; lists stay one value."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)}


def run_name(cfg: DictConfig) -> str:
    """`run_name`, else the options picked (`cnn-digits-sgd-cosine`); a Hydra multirun's job
    names its model and dataset, then the values its sweep varies (`cnn-digits-lr=0.03`), so
    the jobs' runs differ by name in the MLflow UI."""
    if cfg.get("run_name"):
        return cfg.run_name
    c = cfg.get("choices") or {}
    swept = swept_values()
    if swept:
        return "-".join([str(c.get("model", "?")), str(c.get("dataset", "?")), *swept])
    return "-".join(str(c.get(g, "?")) for g in ("model", "dataset", "optimizer", "scheduler"))


def swept_values() -> list[str]:
    """In a Hydra multirun's job, `lr=0.03` for each key the sweep varies; else [].

    The job's config holds only its own values; which keys vary is in the sweep's
    `multirun.yaml` (Hydra's basic sweeper writes it before the first job). Without it every
    override of the job is named. Model and dataset are named anyway.
    """
    try:
        hydra = HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return []
    if hydra.mode != RunMode.MULTIRUN:
        return []
    job = {override_key(o): o.split("=", 1)[1] for o in hydra.overrides.task if "=" in o}
    saved = Path(hydra.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        sweep = OmegaConf.load(saved).hydra.overrides.task
        varied = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(sweep))
                  if o.is_sweep_override()}
        job = {k: v for k, v in job.items() if k in varied}
    return [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in job.items() if k not in ("model", "dataset")]


def run_tags(cfg: DictConfig) -> dict[str, str]:
    c = cfg.get("choices") or {}
    tags = {g: str(c[g]) for g in ("model", "dataset", "optimizer", "scheduler") if g in c}
    tags["bn"] = str(cfg.model.get("bn", "none"))
    return tags


# --- a run's tracker -------------------------------------------------------------------------

MetricPoint = tuple[str, float, int, int]  # key, value, timestamp (ms), step
BATCH = 1000  # MLflow takes at most 1000 metrics in one log_batch


class Tracker:
    """Logs one MLflow run's curves, figures and tags.

    Metrics are buffered and handed every `flush_every_s` seconds to one background thread,
    which writes them in order with `MlflowClient.log_batch`, so the store's work overlaps
    training instead of stalling each epoch. If the store cannot be reached the points stay in
    memory and the thread retries while training goes on. `close` waits until every point is
    written, for up to `wait_s` seconds (default $SWEEP_MLFLOW_WAIT_S, else 600).
    """

    def __init__(self, run_id: str | None, flush_every_s: float = 0.5,
                 wait_s: float | None = None, name: str | None = None):
        import mlflow

        fail_fast_http()
        self.run_id = run_id
        self.name = name  # the run's name in the UI, for figure titles and the run folder
        self.flush_every_s = flush_every_s
        self.wait_s = patience_s() if wait_s is None else wait_s
        self.uri = mlflow.get_tracking_uri()
        self._client = mlflow.MlflowClient(self.uri)
        self._pending: list[MetricPoint] = []  # the training loop's, not yet handed over
        self._flushed_at = time.monotonic()
        # Shared with the writer, under `_changed`: points handed over and not yet taken, how many
        # handed-over points are not yet written (taken ones included), and what went wrong.
        self._changed = threading.Condition()
        self._handed: list[MetricPoint] = []
        self._unwritten = 0
        self._refused: Exception | None = None  # a write the store refused; raised by flush
        self._refused_points = 0
        self._down = False
        self._stop = False  # set by `close`: the writer ends once everything is written
        self._gave_up = False  # set when `close` ran out of time: the writer ends now
        self._writer = threading.Thread(target=self._write, name="mlflow-metrics", daemon=True)
        self._writer.start()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_step(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush(wait=False)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending += [(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self, wait: bool = True) -> None:
        """Hand the buffered metrics to the writer; with `wait`, until everything is written."""
        with self._changed:
            self._handed += self._pending
            self._unwritten += len(self._pending)
            self._changed.notify_all()
        self._pending = []
        self._flushed_at = time.monotonic()
        if wait:
            self._wait_written()

    def close(self) -> None:
        """Write everything still buffered and stop the writer."""
        try:
            self.flush()
        finally:
            with self._changed:
                self._stop = True
                self._changed.notify_all()

    def _wait_written(self) -> None:
        give_up = time.monotonic() + self.wait_s
        with self._changed:
            if self._down and self._unwritten:
                say(f"waiting up to {self.wait_s:g} s for {self._unwritten} metric points to "
                    f"reach MLflow at {shown(self.uri)} (${WAIT_ENV})")
            while self._unwritten and time.monotonic() < give_up and self._writer.is_alive():
                self._changed.wait(min(1.0, max(0.0, give_up - time.monotonic())))
            lost, refused = self._unwritten, self._refused
            if lost:  # out of time: the writer drops what it holds
                self._gave_up, self._handed, self._unwritten = True, [], 0
                self._changed.notify_all()
                raise TrackingUnavailable(
                    f"MLflow at {shown(self.uri)} unreachable for more than {self.wait_s:g} s: "
                    f"{lost} metric points of run {self.run_id} were not written (set "
                    f"${WAIT_ENV} to wait longer)")
            if refused is not None:
                lost, self._refused, self._refused_points = self._refused_points, None, 0
                raise RuntimeError(f"MLflow refused {lost} metric points of run "
                                   f"{self.run_id}: {brief(refused)}") from refused

    def _write(self) -> None:
        """The writer thread: oldest points first, at most `BATCH` a call, each batch until it is
        written (retrying while the store is unreachable) or refused."""
        from mlflow.entities import Metric

        batch: list[MetricPoint] = []
        pause, down_since = RETRY_FIRST_S, 0.0
        while True:
            with self._changed:
                while not batch and not self._handed and not self._stop:
                    self._changed.wait()
                if self._gave_up or (self._stop and not self._unwritten):
                    return
                if len(batch) < BATCH:  # the batch a retry sends grows with what came since
                    room = BATCH - len(batch)
                    batch, self._handed = batch + self._handed[:room], self._handed[room:]
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(*p) for p in batch])
            except Exception as err:
                if transient(err):
                    if not self._down:
                        self._down, down_since = True, time.monotonic()
                        say(f"MLflow at {shown(self.uri)} unreachable ({brief(err)}); keeping "
                            f"{self._unwritten} metric points and retrying every "
                            f"{RETRY_MAX_S:g} s at most; training goes on")
                    time.sleep(pause)
                    pause = min(2 * pause, RETRY_MAX_S)
                    continue
                with self._changed:
                    self._refused = self._refused or err
                    self._refused_points += len(batch)
                    self._unwritten -= len(batch)
                    batch = []
                    self._changed.notify_all()
                continue
            with self._changed:
                if self._gave_up:
                    return
                self._unwritten -= len(batch)
                if self._down:
                    self._down, pause = False, RETRY_FIRST_S
                    left = f"; {self._unwritten} more on the way" if self._unwritten else ""
                    say(f"MLflow at {shown(self.uri)} reachable again after "
                        f"{time.monotonic() - down_since:.0f} s; {len(batch)} metric points "
                        f"written{left}")
                batch = []
                self._changed.notify_all()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = [Param(k, str(v)[:6000]) for k, v in params.items()]
        call_mlflow("log the run's params", self._client.log_batch, self.run_id, params=values)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        values = [RunTag(k, str(v)) for k, v in tags.items()]
        call_mlflow("set the run's tags", self._client.log_batch, self.run_id, tags=values)

    def log_figure(self, fig: Any, name: str) -> None:
        call_mlflow(f"log {name}", self._client.log_figure, self.run_id, fig, name)

    def log_text(self, text: str, name: str) -> None:
        call_mlflow(f"log {name}", self._client.log_text, self.run_id, text, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        call_mlflow(f"log {Path(path).name}", self._client.log_artifact, self.run_id, str(path),
                    folder)

    def finish(self, result: Any, figures: dict[str, Any] | None = None) -> None:
        """Record how the run ended and its curves as figures (`plots/<name>`; drawn here unless
        the caller drew them already for the run folder).

        One-off numbers (best value, its epoch) are tags, not metrics: a metric with a single
        point would be one more chart on the run's page, ahead of the curves.
        """
        from sweep.plots import run_figures

        self.set_tags(summary_tags(result))
        self.flush()
        if figures is None:
            figures = run_figures(result, self.name or "run")
        for name, fig in figures.items():
            self.log_figure(fig, f"plots/{name}")


def summary_tags(result: Any) -> dict[str, str]:
    """The run's status and one-off numbers, as tags: `best_val_acc`, `best_epoch`, ..."""
    tags = {"status": result.status, "epochs": str(len(result.history))}
    if getattr(result, "device", ""):
        tags["device"] = result.device
    if result.best_epoch:
        tags[f"best_{result.metric_name}"] = f"{result.best_metric:.6g}"
        tags["best_epoch"] = str(result.best_epoch)
    if result.skipped_steps:
        tags["skipped_steps_total"] = str(result.skipped_steps)
    return tags


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
    try:
        with quiet_store():
            run = call_mlflow("start the run", mlflow.start_run, run_id=run_id,
                              experiment_id=experiment_id, nested=nested,
                              run_name=None if run_id else (run_name_ or run_name(cfg)),
                              tags=None if run_id else {**run_tags(cfg), **(tags or {})})
    except Exception as err:
        if any(p in str(err).lower() for p in PERMANENT):  # readable, but not writable
            raise store_refused(cfg, tracking_uri(cfg), err) from None
        raise
    status = "FAILED"  # as MLflow's own `with start_run()` marks a run left by an exception
    try:
        tracker = Tracker(run.info.run_id, name=run.info.run_name)
        try:
            if run_id is None:
                tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
                tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            yield tracker
        finally:
            tracker.close()  # waits for the metrics still being written
        status = "FINISHED"
    finally:
        call_mlflow("end the run", end_run, run.info.run_id, status)
