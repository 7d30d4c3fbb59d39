"""The MLflow store: where runs go (`tracking.uri`), opening it safely when several processes
use a fresh store at once, and calling it through its public API with retries.

A store that cannot be reached (a tracking server restarting, a database that is busy) never
stalls anything silently: calls are retried in place and say so on stderr once, and again when
the store answers; a store that refuses for good (read-only, no permission) is one ConfigError
naming the path.
"""


from __future__ import annotations

import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from sweep.config import ConfigError, sqlite_file
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


def end_run(run_id: str, status: str) -> None:
    """End the run: MLflow's `end_run` if it is the active run, else (a retry, after `end_run`
    left it but could not reach the store) mark it ended in the store."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        mlflow.MlflowClient().set_terminated(run_id, status)
