"""Shared fixtures and tiny-run settings.

- `TINY_MLP`, `TINY_CNN`, `PLAIN_SGD`, `TINY_STUDY`: override lists for real runs of seconds;
  a test extends them (`[*TINY_MLP, "model.bn=pre"]`) rather than writing its own.
- `mlflow_uri`: a fresh SQLite MLflow store per test; `module_mlflow_uri`: one for a module's
  tests that share a trained store. Both are set as MLFLOW_TRACKING_URI while in use.
- `postgres_url`: a real PostgreSQL server for the session; `pg_database`: a fresh, empty database
  on it per test, so one test's studies and runs never leak into another's.
- `mlflow_server`: a real `mlflow server` on 127.0.0.1.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

PG_USER = "sweep"  # the superuser initdb creates; trust auth, so no password
RUN_AS = "postgres"  # PostgreSQL refuses to run as root; under root the server runs as this user
_database_numbers = itertools.count(1)

# --- tiny real runs -------------------------------------------------------------------------------

# The article's MLP on 200 rows of synthetic_regression (140 train): 3 batches an epoch, no bar.
TINY_MLP = ["model=mlp", "dataset=synthetic_regression", "dataset.n_samples=200",
            "trainer.batch_size=50", "trainer.progress=false"]
# The default CNN (with dropout) on digits, 1437 training images, on the CPU: no bar, no MLflow.
TINY_CNN = ["dataset=digits", "model=cnn", "trainer.device=cpu", "trainer.progress=false",
            "tracking=none"]
# SGD without momentum: the lr alone sets each step, so lr comparisons mean what they say.
PLAIN_SGD = ["optimizer=sgd", "optimizer.momentum=0"]
# Study `tiny` (2 schedules, 2 trials of 2 epochs, 2 seeds) on TINY_MLP with momentum-free SGD.
TINY_STUDY = ["study=tiny", *TINY_MLP, "optimizer.momentum=0"]


# --- an MLflow store ------------------------------------------------------------------------------

def sqlite_store(folder: Path) -> str:
    """The URI of a SQLite MLflow store at `folder`/mlflow.db (created on first use)."""
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store in `tmp_path` for one test, set as MLFLOW_TRACKING_URI."""
    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def module_mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite MLflow store for a module's tests, set as MLFLOW_TRACKING_URI while they run:
    creating a store costs seconds of migrations, and a module's tests read one trained store."""
    uri = sqlite_store(tmp_path_factory.mktemp("mlflow"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def _unavailable(reason: str) -> None:
    """Skip on a developer's machine; fail under CI, where a skipped database test hides a gap."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def _pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's versioned directories."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        # Resolve symlinks: /usr/local/bin/pg_ctl may be a lone link into /usr/lib/postgresql/N/bin.
        return Path(on_path).resolve().parent
    # Debian/Ubuntu keep the server binaries off PATH; take the newest major version.
    found = [Path(d) for d in glob("/usr/lib/postgresql/*/bin")
             if Path(d, "pg_ctl").exists() and Path(d, "initdb").exists()]
    versions = [(int(d.parent.name) if d.parent.name.isdigit() else 0, d) for d in found]
    return max(versions)[1] if versions else None


def _free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    """`cmd`, run as the unprivileged server user when we are root."""
    return ["runuser", "-u", RUN_AS, "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], cwd: Path) -> None:
    """Run a server command; if it fails, raise with its output rather than a bare exit code."""
    done = subprocess.run(_as_server_user(cmd), cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")


def _with_database(url: str, name: str) -> str:
    """`url` pointing at database `name`."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _create_database(url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `url`; returns the new database's URL."""
    try:
        import psycopg2
    except ImportError:
        _unavailable("psycopg2 is not installed: pip install -e '.[distributed]'")
    conn = psycopg2.connect(_with_database(url, "postgres"))
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return _with_database(url, name)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1; yields `postgresql://sweep@127.0.0.1:<port>/sweep`.

    The URL's bare scheme is on purpose: users write it that way and `sweep` must accept it.
    """
    bindir = _pg_bindir()
    if bindir is None:
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                     "/usr/lib/postgresql/*/bin: apt-get install postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            _unavailable(f"running as root, and there is no user {RUN_AS!r} to run PostgreSQL as")
        if shutil.which("runuser") is None:
            _unavailable("running as root, runuser is needed to start PostgreSQL as a normal user")

    # Under /tmp rather than pytest's tmp_path: root's pytest-of-root is 0700, which the server user
    # cannot enter, and a short path keeps the unix socket's name under its 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (root, sock):
            shutil.chown(path, user=RUN_AS)
    port = _free_port()
    try:
        # --no-sync and the settings below trade durability for speed: the data dies with the test.
        _run([str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust", "-E", "UTF8",
              "--no-locale", "--no-sync", "--no-instructions"], cwd=root)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{sock}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "200",  # every Optuna/MLflow engine in a test holds a small pool
        }
        with open(data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"],
             cwd=root)
    except Exception as exc:
        server_log = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc}\n{server_log}", pytrace=False)

    try:
        yield _create_database(f"postgresql://{PG_USER}@127.0.0.1:{port}/postgres", "sweep")
    finally:
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                        "-w", "stop"]), cwd=root, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(postgres_url: str) -> str:
    """A new, empty database on the server of `postgres_url`; returns its (plain) URL."""
    return _create_database(postgres_url, f"test_{next(_database_numbers)}")


@pytest.fixture
def pg_database(postgres_url: str) -> str:
    """A fresh database per test: `postgresql://sweep@127.0.0.1:<port>/test_<n>`."""
    return fresh_database(postgres_url)


@pytest.fixture
def pg_database2(postgres_url: str) -> str:
    """A second fresh database, for a test that keeps MLflow and Optuna apart as a team would."""
    return fresh_database(postgres_url)


# --- an MLflow tracking server --------------------------------------------------------------------

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store; can be stopped and started again."""

    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.url = root, f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [MLFLOW, "server", "--backend-store-uri", sqlite_store(self.root),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own process group: uvicorn runs as a child
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        log = (self.root / "server.log").read_text()
        raise RuntimeError(f"mlflow server did not start:\n{log}")

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)  # the server and its uvicorn worker
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A real `mlflow server` on 127.0.0.1 for one test; it can be stopped and started again."""
    server = MlflowServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
