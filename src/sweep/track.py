"""MLflow runs: what each run records (names, params, tags, per-epoch metrics, figures) and the
tracker the training loop calls.

Everything goes through MLflow's public API (`sweep.mlflow_store`). Metric points never get lost
to an unreachable store: they wait in memory and the tracker's writer thread retries them.
"""


from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
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

MetricPoint = tuple[str, str, float, int, int]  # run id, key, value, timestamp (ms), step
BATCH = 1000  # MLflow takes at most 1000 metrics in one log_batch


class MetricWriter:
    """One background thread that writes metric points, in order, with `MlflowClient.log_batch`.

    A run alone has its own; the members of a fused group share one, so forty runs training at
    once are one thread writing to the store, not forty contending for it. If the store cannot be
    reached the points stay in memory and the thread retries while training goes on. `wait`
    returns when every point handed over is written, for up to `wait_s` seconds (default
    $SWEEP_MLFLOW_WAIT_S, else 600).
    """

    def __init__(self, wait_s: float | None = None):
        import mlflow

        fail_fast_http()
        self.wait_s = patience_s() if wait_s is None else wait_s
        self.uri = mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient(self.uri)
        # Shared with the thread, under `_changed`: points handed over and not yet taken, how many
        # handed-over points are not yet written (taken ones included), and what went wrong.
        self._changed = threading.Condition()
        self._handed: list[MetricPoint] = []
        self._unwritten = 0
        self._refused: Exception | None = None  # a write the store refused; raised by `wait`
        self._refused_points = 0
        self._down = False
        self._stop = False  # set by `close`: the thread ends once everything is written
        self._gave_up = False  # set when `wait` ran out of time: the thread ends now
        self._thread = threading.Thread(target=self._write, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def hand(self, points: list[MetricPoint]) -> None:
        with self._changed:
            self._handed += points
            self._unwritten += len(points)
            self._changed.notify_all()

    def close(self) -> None:
        """Write everything handed over, then stop the thread."""
        try:
            self.wait()
        finally:
            with self._changed:
                self._stop = True
                self._changed.notify_all()

    def wait(self) -> None:
        """Until every point handed over is written; raises if the store stayed unreachable for
        `wait_s` seconds or refused points."""
        give_up = time.monotonic() + self.wait_s
        with self._changed:
            if self._down and self._unwritten:
                say(f"waiting up to {self.wait_s:g} s for {self._unwritten} metric points to "
                    f"reach MLflow at {shown(self.uri)} (${WAIT_ENV})")
            while self._unwritten and time.monotonic() < give_up and self._thread.is_alive():
                self._changed.wait(min(1.0, max(0.0, give_up - time.monotonic())))
            lost, refused = self._unwritten, self._refused
            if lost:  # out of time: the thread drops what it holds
                runs = sorted({p[0] for p in self._handed})
                self._gave_up, self._handed, self._unwritten = True, [], 0
                self._changed.notify_all()
                raise TrackingUnavailable(
                    f"MLflow at {shown(self.uri)} unreachable for more than {self.wait_s:g} s: "
                    f"{lost} metric points of run {', '.join(runs) or '?'} were not written "
                    f"(set ${WAIT_ENV} to wait longer)")
            if refused is not None:
                lost, self._refused, self._refused_points = self._refused_points, None, 0
                raise RuntimeError(f"MLflow refused {lost} metric points: "
                                   f"{brief(refused)}") from refused

    def _write(self) -> None:
        """The thread: oldest points first, at most `BATCH` of one run a call, each batch until it
        is written (retrying while the store is unreachable) or refused."""
        from mlflow.entities import Metric

        batch: list[MetricPoint] = []
        pause, down_since = RETRY_FIRST_S, 0.0
        while True:
            with self._changed:
                while not batch and not self._handed and not self._stop:
                    self._changed.wait()
                if self._gave_up or (self._stop and not self._unwritten):
                    return
                if len(batch) < BATCH and self._handed:  # a retry's batch grows with what came
                    run = batch[0][0] if batch else self._handed[0][0]
                    take = list(itertools.islice(
                        (i for i, p in enumerate(self._handed) if p[0] == run),
                        BATCH - len(batch)))
                    taken = set(take)
                    batch += [self._handed[i] for i in take]
                    self._handed = [p for i, p in enumerate(self._handed) if i not in taken]
            try:
                self.client.log_batch(batch[0][0], metrics=[Metric(*p[1:]) for p in batch])
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


class Tracker:
    """Logs one MLflow run's curves, figures and tags.

    Metrics are buffered and handed every `flush_every_s` seconds to a `MetricWriter`'s thread,
    so the store's work overlaps training instead of stalling each epoch: its own, or `writer`,
    one that the members of a fused group share (whoever made it closes it). `close` waits until
    every point is written.
    """

    def __init__(self, run_id: str | None, flush_every_s: float = 0.5,
                 wait_s: float | None = None, name: str | None = None,
                 writer: MetricWriter | None = None):
        self.run_id = run_id
        self.name = name  # the run's name in the UI, for figure titles and the run folder
        self.flush_every_s = flush_every_s
        self._owns_writer = writer is None
        self.writer = writer if writer is not None else MetricWriter(wait_s)
        self.uri = self.writer.uri
        self._client = self.writer.client
        self._pending: list[MetricPoint] = []  # the training loop's, not yet handed over
        self._flushed_at = time.monotonic()
        # How `member_runs` ends this run when not as its group (a study's trial that another
        # process took over ends KILLED, as that process marks the runs of workers it finds dead).
        self.ended_as: str | None = None

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_step(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush(wait=False)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending += [(self.run_id, k, float(v), now, step) for k, v in metrics.items()]

    def flush(self, wait: bool = True) -> None:
        """Hand the buffered metrics to the writer; with `wait`, until everything is written."""
        self.writer.hand(self._pending)
        self._pending = []
        self._flushed_at = time.monotonic()
        if wait:
            self.writer.wait()

    def close(self) -> None:
        """Write everything still buffered; stop the writer if it is this run's own."""
        if self._owns_writer:
            self.writer.hand(self._pending)
            self._pending = []
            self.writer.close()
        else:
            self.flush(wait=False)

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
    if getattr(result, "fused", 1) > 1:
        tags["fused"] = str(result.fused)  # trained at once with this many, itself included
    return tags


def log_config(tracker: Tracker, cfg: DictConfig) -> None:
    """A new run's config: every value as a param, and the whole as `config.yaml`."""
    tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


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
                log_config(tracker, cfg)
            yield tracker
        finally:
            tracker.close()  # waits for the metrics still being written
        status = "FINISHED"
    finally:
        call_mlflow("end the run", end_run, run.info.run_id, status)


@contextmanager
def member_runs(cfgs: Sequence[DictConfig], names: Sequence[str],
                tags: Sequence[dict[str, str]], parent_run_id: str | None = None,
                experiment: str | None = None) -> Iterator[list[Tracker | None]]:
    """Open one run per config at once, siblings under `parent_run_id`: the members of a fused
    group, each its own run with its own config, params, tags and curves. Yields their Trackers
    (Nones with `tracking.enabled=false`); closes each FINISHED, or FAILED if training raised.

    Each run costs a handful of `MlflowClient` calls (create with its tags, its params in one
    batch, its config.yaml, its end) and no fluent active-run bookkeeping; one `MetricWriter`
    thread writes every member's curves while training goes on.
    """
    if not cfgs or not cfgs[0].tracking.enabled:
        yield [None] * len(cfgs)
        return
    import mlflow

    experiment_id = use_store(cfgs[0], experiment)
    client = mlflow.MlflowClient()
    writer = MetricWriter()
    trackers: list[Tracker] = []
    status = "FAILED"
    try:
        for cfg, name, extra in zip(cfgs, names, tags, strict=True):
            run_tags_ = {**run_tags(cfg), **extra}
            if parent_run_id:
                run_tags_["mlflow.parentRunId"] = parent_run_id
            run = call_mlflow("start the run", client.create_run, experiment_id, run_name=name,
                              tags=run_tags_)
            tracker = Tracker(run.info.run_id, name=name, writer=writer)
            trackers.append(tracker)
            log_config(tracker, cfg)
        try:
            yield list(trackers)
        finally:
            for tracker in trackers:
                tracker.close()
            writer.close()  # waits for every member's metrics
        status = "FINISHED"
    finally:
        for tracker in trackers:
            call_mlflow("end the run", end_run, tracker.run_id, tracker.ended_as or status)
