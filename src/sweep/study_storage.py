"""The Optuna storage as the single source of truth for a study that many processes share.

Any number of identical processes, on one machine or many, point at one storage URL. They agree
on everything through it, never through one process's memory or local files:

- Liveness is a heartbeat in the storage. A trial whose heartbeat is older than the grace period
  belongs to a dead process: any live worker fails it and either recovers its recorded result or
  queues it again (`Reaper`), and closes its MLflow run as KILLED.
- "Exactly once" jobs (creating the study's MLflow run, queueing the confirmation runs, publishing
  the summary) are elected with `once`: contenders each create a trial in a small study of their
  own, and the lowest trial number does the job. Trial numbers are assigned by the storage, so
  every process sees the same order.
- Queued work (retries, confirmation runs) is claimed with the storage's compare-and-set
  WAITING -> RUNNING, so two processes never claim the same item.

RDB storages (SQLite, PostgreSQL, MySQL) use Optuna's own heartbeat and stale-trial check; Optuna
has none for the journal file, so a heartbeat there is a trial system attribute refreshed by the
same thread, and the same check reads it.
"""

from __future__ import annotations

import fcntl
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from sweep.dburl import sqlalchemy_url

BEAT = "sweep:heartbeat"  # trial system attr: first (RDB) or last (journal) heartbeat, epoch s
MAX_RETRIES = 3           # a trial whose process keeps dying is given up after this


def is_journal(url: str) -> bool:
    return url.endswith((".journal", ".log"))


def default_storage(out_dir: Path) -> str:
    """SQLite in the output directory; a journal file made by an earlier version is kept."""
    journal = out_dir / "optuna.journal"
    return str(journal) if journal.exists() else f"sqlite:///{out_dir / 'optuna.db'}"


def sqlite_connect(path: str) -> Any:
    """A SQLite connection tuned for a study that several processes share.

    WAL lets readers (the dashboard, other workers) go on while one process writes, and
    synchronous=NORMAL skips the fsync per commit, which made Optuna's share of a trial 5x slower.
    A killed process still loses nothing it committed; only a power cut could lose the last ones.
    """
    import sqlite3

    conn = sqlite3.connect(path, timeout=120, check_same_thread=False)  # wait for other workers
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of this machine (a SQLite file is on one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def retrying(make: Callable[[], Any], what: str, attempts: int = 6) -> Any:
    """`make()`, retried with jittered backoff: processes that create the same tables in the same
    second collide ("already exists", a unique violation) until one has finished."""
    for attempt in range(attempts):
        try:
            return make()
        except Exception as err:  # SQLAlchemy's errors vary by database and driver
            if attempt == attempts - 1:
                raise
            warnings.warn(f"{what} failed ({type(err).__name__}); retrying", stacklevel=2)
            time.sleep(0.2 * 2 ** attempt * (1 + random.random()))


def open_storage(url: str, heartbeat_interval: int, grace_period: int,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None
                 ) -> BaseStorage:
    """An Optuna storage from a URL (a bare `postgresql://` works) or a journal file path."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    url = sqlalchemy_url(url)
    kwargs: dict[str, Any] = {"heartbeat_interval": heartbeat_interval,
                              "grace_period": grace_period,
                              "heartbeat_stale_trial_callback": on_stale}

    def make() -> BaseStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kwargs)

    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        kwargs["engine_kwargs"] = {"creator": partial(sqlite_connect, path)}
        with file_lock(Path(path + ".lock")):  # the schema is created by one process at a time
            return make()
    return retrying(make, f"opening the Optuna storage {url}")


def create_study(storage: BaseStorage, name: str, direction: str) -> optuna.Study:
    """Create or load a study; safe when several processes create it in the same second."""
    return retrying(lambda: optuna.create_study(study_name=name, storage=storage,
                                                direction=direction, load_if_exists=True),
                    f"creating the study {name}")


def trial_id(storage: BaseStorage, study: optuna.Study, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number)


def ask(study: optuna.Study) -> optuna.Trial:
    """`study.ask()`, which pops a queued trial first. Optuna warns that heartbeats are meant for
    `optimize`; ours come from `Liveness.heartbeat`, so the warning does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        return study.ask()


# --- liveness -------------------------------------------------------------------------------------

class Liveness:
    """Heartbeats for the trials this process runs, and the check that fails other processes'
    stale ones. One per process and storage."""

    def __init__(self, storage: BaseStorage, interval: int, grace: int,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None):
        self.storage, self.interval, self.grace, self.on_stale = storage, interval, grace, on_stale
        self.rdb = isinstance(storage, optuna.storages.RDBStorage)

    def beat(self, tid: int, first: bool = False) -> None:
        # The system attribute marks "this trial has a heartbeat": on RDB storages Optuna keeps
        # the beats themselves (and ignores trials that never had one), on a journal it is the beat.
        if self.rdb:
            self.storage.record_heartbeat(tid)
        if first or not self.rdb:
            try:
                self.storage.set_trial_system_attr(tid, BEAT, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # declared dead elsewhere meanwhile: its worker finds out at its next write

    @contextmanager
    def heartbeat(self, *tids: int) -> Iterator[None]:
        """Beat for these trials (a fused group's, or one) from a background thread while the
        block runs."""
        for tid in tids:
            self.beat(tid, first=True)
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval):
                for tid in tids:
                    try:
                        self.beat(tid)
                    except Exception as err:  # a storage hiccup must not kill the training
                        warnings.warn(f"heartbeat for trial {tid} failed: {err}", stacklevel=1)

        thread = threading.Thread(target=loop, name=f"heartbeat-{'-'.join(map(str, tids))}",
                                  daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def reap(self, study: optuna.Study) -> None:
        """Fail the study's trials whose process stopped beating; `on_stale` handles each.

        A running trial that never beat (its process died right after creating it, or an older
        version made it) is judged by its start time.
        """
        if self.rdb:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # calls the storage's on_stale
        now = time.time()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            last = t.system_attrs.get(BEAT)
            if self.rdb and last is not None:
                continue  # Optuna's heartbeat covers it
            if last is None and t.datetime_start is not None:
                last = t.datetime_start.timestamp()
            if last is None or now - last <= self.grace:
                continue
            tid = trial_id(self.storage, study, t.number)
            try:
                if not self.storage.set_trial_state_values(tid, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker reaped it first
            if self.on_stale is not None:
                self.on_stale(study, self.storage.get_trial(tid))

    def running(self, studies: list[optuna.Study]) -> list[str]:
        """What other processes are still running, for a worker that waits on them."""
        now = time.time()
        out = []
        for study in studies:
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                last = t.system_attrs.get(BEAT) or (t.datetime_start.timestamp()
                                                    if t.datetime_start else now)
                out.append(f"{study.study_name} #{t.number} (started {now - last:.0f} s ago)")
        return out


class OnStale:
    """What happens to a trial whose process died: its recorded result is kept, or it runs again.

    A trial records its outcome (`user_attrs["outcome"]`) in the storage the moment training
    ends, before anything else can be interrupted. If it dies after that, the result is added
    back as a finished trial; otherwise Optuna's retry callback queues the same parameters again.
    Either way the dead process's MLflow run is closed as KILLED instead of staying RUNNING.
    """

    def __init__(self, tracking_uri: str | None):
        self.tracking_uri = tracking_uri
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        role = trial.user_attrs.get("role")
        if role not in ("trial", "confirm"):
            return  # an election's contender or a worker slot: nothing to redo
        outcome = trial.user_attrs.get("outcome")
        if outcome is not None:
            recover(study, trial, outcome)
        else:
            self.retry(study, trial)
        state = f"{outcome['state']} (recovered)" if outcome else "interrupted"
        self.close_run(trial.user_attrs.get("mlflow_run_id"), state)

    def close_run(self, run_id: str | None, state: str) -> None:
        if not run_id or not self.tracking_uri:
            return
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
                client.set_tag(run_id, "state", state)
        except Exception as err:  # a store that is away must not stop the live worker
            warnings.warn(f"could not close the killed trial's MLflow run {run_id}: {err}",
                          stacklevel=2)


def recover(study: optuna.Study, trial: FrozenTrial, outcome: dict[str, Any]) -> None:
    """Add a dead trial's recorded result back as a finished trial (the original stays FAIL)."""
    state = {"complete": TrialState.COMPLETE, "diverged": TrialState.COMPLETE,
             "pruned": TrialState.PRUNED}.get(outcome["state"], TrialState.FAIL)
    value = outcome.get("value")
    study.add_trial(optuna.create_trial(
        state=state, value=value if state == TrialState.COMPLETE else None,
        params=trial.params, distributions=trial.distributions,
        user_attrs={**trial.user_attrs, "state": outcome["state"], "recovered_from": trial.number},
        intermediate_values=trial.intermediate_values))


# --- exactly once, and claiming queued work -------------------------------------------------------

def once(storage: BaseStorage, name: str, job: Callable[[], Any], liveness: Liveness,
         poll_s: float = 0.2) -> Any:
    """Run `job` in exactly one of the processes that call this with the same `name`; every
    caller gets its (JSON-serialisable) result.

    Each caller creates a trial in the study `name`; the lowest-numbered trial that is running or
    complete does the job and stores the result as the study's user attribute `result`. A
    contender that dies is reaped by its heartbeat and the next lowest takes over.
    """
    study = create_study(storage, name, "minimize")
    done = study.user_attrs
    if "result" in done:
        return done["result"]
    mine = ask(study)
    tid = trial_id(storage, study, mine.number)
    with liveness.heartbeat(tid):
        while True:
            result = study.user_attrs
            if "result" in result:
                storage.set_trial_state_values(tid, TrialState.COMPLETE, [0.0])
                return result["result"]
            live = study.get_trials(deepcopy=False,
                                    states=(TrialState.RUNNING, TrialState.COMPLETE))
            if min(t.number for t in live) == mine.number:
                try:
                    value = job()
                except BaseException:  # the next contender takes over at once, not after grace
                    storage.set_trial_state_values(tid, TrialState.FAIL)
                    raise
                study.set_user_attr("result", value)
                storage.set_trial_state_values(tid, TrialState.COMPLETE, [0.0])
                return value
            time.sleep(poll_s)
            liveness.reap(study)


def claim(storage: BaseStorage, study: optuna.Study,
          liveness: Liveness | None = None) -> FrozenTrial | None:
    """Take the lowest-numbered queued (WAITING) trial of the study, or None if there is none.

    WAITING -> RUNNING is a compare-and-set in the storage: if another process took the trial
    first, this one moves on to the next. With `liveness` the trial beats once at once: a worker
    that claims a batch starts its heartbeats when the batch is built, and a trial claimed early
    must not look dead to other workers in between.
    """
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        tid = trial_id(storage, study, t.number)
        try:
            if storage.set_trial_state_values(tid, TrialState.RUNNING):
                if liveness is not None:
                    liveness.beat(tid, first=True)
                return storage.get_trial(tid)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def worker_number(storage: BaseStorage, study_name: str) -> int:
    """A number no other process of this study has ever had: a trial number of `<name>/workers`.

    Seeding each worker's sampler with it makes two processes' proposals differ by construction.
    """
    study = create_study(storage, f"{study_name}/workers", "minimize")
    trial = ask(study)
    study.tell(trial, 0.0)
    return trial.number
