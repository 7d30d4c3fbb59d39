"""MLflow: where runs go, what each run records, and a tracker the training loop calls.

Everything goes through MLflow's public API. A store that cannot be reached (a tracking server
restarting, a database that is busy) never stalls training silently and never loses a metric
point: metrics wait in memory and are retried by the tracker's writer thread, other calls are
retried in place, and both say so on stderr once, and again when the store answers.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sweep.config import ConfigError, override_key, sqlite_file
from sweep.dburl import sqlalchemy_url

T = TypeVar("T")

WAIT_ENV = "SWEEP_MLFLOW_WAIT_S"  # how long to keep retrying an unreachable store (seconds)
WAIT_S = 600.0
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0  # the pause between retries doubles up to the maximum

# MLflow's HTTP client on its own retries a failed request 7 times with a backoff factor of 2
# (minutes) and waits 120 s for a reply, all without a word. Fail fast instead, so that our
# retries do the waiting and say so. Values the user has set are kept.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

# The MLflow 3 UI opens an experiment of this kind on its runs, not on the GenAI traces view.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory.

    A bare `postgresql://` gets the installed driver (`sweep.dburl.sqlalchemy_url`).
    """
    uri = cfg.tracking.get("uri") if cfg is not None else None
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return sqlalchemy_url(uri)


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


# --- an unreachable store: what is worth retrying, and the retrying ---------------------------

def fail_fast_http() -> None:
    """Short defaults for MLflow's own HTTP retries, where the user has not set them."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def patience_s() -> float:
    """How long a call, or `Tracker.close`, waits for an unreachable store: $SWEEP_MLFLOW_WAIT_S."""
    return float(os.environ.get(WAIT_ENV, WAIT_S))


# What a store says when it can never be written from here (MLflow reports SQLite's as a 503).
PERMANENT = ("attempt to write a readonly database", "read-only file system",
             "unable to open database file", "permission denied")


def transient(err: BaseException) -> bool:
    """Whether `err` says the store could not be reached or was busy (worth retrying).

    A refused request (a bad value, a deleted run: MLflow's 4xx codes) is not; it would fail again.
    """
    from mlflow.exceptions import MlflowException
    from requests.exceptions import ConnectionError, Timeout
    from sqlalchemy.exc import OperationalError

    if any(p in str(err).lower() for p in PERMANENT):
        return False
    if isinstance(err, MlflowException):  # a connection error comes wrapped as a 500
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(err, (ConnectionError, Timeout, OperationalError, ConnectionRefusedError))


def shown(uri: str) -> str:
    """The URI with its password hidden, for messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def brief(err: BaseException) -> str:
    """The error in one short line: for a failed connection, the system's reason."""
    text = " ".join(str(err).split())
    reason = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if reason:
        return reason.group().strip()
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def say(message: str) -> None:
    print(f"sweep: {message}", file=sys.stderr, flush=True)


def call_mlflow(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried while the store is unreachable, for up to `patience_s()`.

    The first failure is reported on stderr with what is being retried, success after it too;
    a refused request is raised at once, and so is the last error once the time is up.
    """
    import mlflow

    give_up, pause = None, RETRY_FIRST_S
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            if not transient(err):
                raise
            now = time.monotonic()
            if give_up is None:
                give_up = now + patience_s()
                say(f"MLflow at {shown(mlflow.get_tracking_uri())} unreachable ({brief(err)}); "
                    f"retrying to {what} every {RETRY_MAX_S:g} s at most, for up to "
                    f"{patience_s():g} s (${WAIT_ENV})")
            if now + pause > give_up:
                raise TrackingUnavailable(
                    f"MLflow at {shown(mlflow.get_tracking_uri())} still unreachable after "
                    f"{patience_s():g} s; could not {what}: {brief(err)}") from err
            time.sleep(pause)
            pause = min(2 * pause, RETRY_MAX_S)
            continue
        if give_up is not None:
            say(f"MLflow at {shown(mlflow.get_tracking_uri())} reachable again; did {what}")
        return result


class TrackingUnavailable(RuntimeError):
    """The MLflow store stayed unreachable for longer than we wait."""


# --- the store and the experiment ------------------------------------------------------------

def use_store(cfg: DictConfig | None = None, experiment: str | None = None) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id.

    Safe when several processes do it at once on a store that does not exist yet: MLflow creates
    a store's tables on its first use and two processes doing it at the same time crash, and two
    can race to create the experiment.
    """
    import mlflow

    fail_fast_http()
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name = experiment or (cfg.tracking.experiment if cfg is not None else "sweep")
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, so the store is one folder a person can move or delete.
        location = (sqlite_path(uri).parent / "mlartifacts").as_uri()
    try:
        with first_use_lock(uri), quiet_store():
            return call_mlflow(f"open the experiment {name!r}", open_experiment, name, location)
    except TrackingUnavailable:
        raise
    except Exception as err:  # a read-only store, a file in the way, a URI MLflow cannot open
        raise store_refused(cfg, uri, err) from None


@contextmanager
def quiet_store() -> Iterator[None]:
    """Without MLflow's own log of a database error (a traceback on stderr) while a store is
    opened and a run started: an error there is raised, and said in one line, by us."""
    log = logging.getLogger("mlflow.store.db.utils")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def store_refused(cfg: DictConfig | None, uri: str, err: BaseException) -> ConfigError:
    """One line for a store that cannot be opened or written, naming the setting that chose it."""
    key = "tracking.uri" if cfg is not None and cfg.tracking.get("uri") else (
        "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri")
    path = sqlite_file(uri)
    where = f"the MLflow store {path}" if path else "the MLflow store"
    said = re.search("|".join(PERMANENT), str(err), re.IGNORECASE)  # SQLite's reason, not the SQL
    if isinstance(err, OSError) and err.filename:
        reason = f"{err.strerror}: {err.filename}"  # the lock file beside a SQLite store
    else:
        reason = said.group() if said else brief(err)
    return ConfigError(f"{key}={shown(uri)!r} is not allowed: {where} cannot be opened or "
                       f"written ({reason}); point {key} at a store you can write, or use "
                       "tracking=none")


def sqlite_path(uri: str) -> Path:
    return sqlite_file(uri) or Path(uri.removeprefix("sqlite:///").partition("?")[0])


@contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """For a SQLite file, hold an exclusive lock on `<file>.lock` beside it; else nothing.

    Other databases rely on `open_experiment`'s retries instead.
    """
    if not uri.startswith("sqlite:///") or ":memory:" in uri or "mode=ro" in uri:
        yield  # a read-only SQLite file creates no tables, and gets no lock file beside it
        return
    import fcntl

    lock = sqlite_path(uri).with_name(sqlite_path(uri).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


# What a store's first use says when another process is creating the same tables or experiment.
RACES = ("already exists", "duplicate column", "duplicate key", "unique constraint",
         "expected to match one row")


def open_experiment(name: str, location: str | None, attempts: int = 5) -> str:
    """Get or create the experiment `name` with the `mlflow.experimentKind` tag; its id."""
    for attempt in range(attempts - 1):
        try:
            return get_or_create_experiment(name, location)
        except Exception as err:
            if not any(race in f"{err} {err.__cause__ or ''}".lower() for race in RACES):
                raise
        time.sleep(random.uniform(0.1, 0.3) * 2 ** attempt)  # jittered, so racers spread out
    return get_or_create_experiment(name, location)


def get_or_create_experiment(name: str, location: str | None) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)  # the store's tables are made here if new
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={KIND_TAG: KIND})
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)  # another process made it first
            if found is None:
                raise
    if found.lifecycle_stage == "active" and KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
    return found.experiment_id


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


def end_run(run_id: str, status: str) -> None:
    """End the run: MLflow's `end_run` if it is the active run, else (a retry, after `end_run`
    left it but could not reach the store) mark it ended in the store."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        mlflow.MlflowClient().set_terminated(run_id, status)


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
