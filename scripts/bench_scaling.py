"""Trials per hour of a whole study: one worker, N local workers, N Ray tasks, SQLite or PostgreSQL.

    .venv/bin/python scripts/bench_scaling.py                    # N = every core of this machine
    .venv/bin/python scripts/bench_scaling.py --repeats 5 --workers 1,4,8 --epochs 4
    .venv/bin/python scripts/bench_scaling.py --cases baseline,local   # a subset

Every case is a whole `python -m sweep.study` process, pinned with `taskset`, on a fresh storage in
a temporary directory:

- baseline: 1 worker on 1 core (`taskset -c 0`, study.workers=1: 1 torch thread)
- local N:  N workers on N cores (`taskset -c 0-(N-1)`, study.workers=N: 1 torch thread each)
- ray N:    the same N workers as Ray tasks (study.launcher=ray, cpus_per_trial=1) on the same
            cores; the study starts a local Ray itself, as a user without a cluster would
- postgres: the baseline on a PostgreSQL server started here (127.0.0.1, stopped at the end;
            unpinned, as a database server would be another machine's)
- mlflow:   the baseline with MLflow on (a fresh SQLite store), to show its share of a trial

Every case but `mlflow` runs with `tracking=none`, so the scaling rows measure training, Optuna and
the launcher, not MLflow's store.

The work: `model=cnn dataset=digits`, SGD, `cosine`, `--epochs` (4) epochs a trial, the lr drawn
from [0.01, 0.05]. One such trial takes 1-1.5 s on one core of the development machine: long
enough that training dominates a trial, short enough that a repeat of every case fits in 3
minutes. The digits CNN (rather than the article's MLP) because its epochs are real convolution
work (about 0.3 s on one core), so a worker's time is training, not Python bookkeeping. The narrow
lr range keeps every trial from diverging: a diverged trial stops early, and then the cases would
not do the same work. Each worker runs `--trials-per-worker` (10) trials, so every case keeps each
of its workers busy for the same time.

What is timed. Startup (imports, composing, Ray) and the end (one confirmation run, the summary)
are fixed costs of a study, not of its trials, so the rate is taken from the Optuna storage's own
timestamps, read back after the process exits:

- search: trials / (last trial's end - first trial's start). This is the study process's wall time
  minus its measured startup (start -> first trial) and end (last trial -> exit); ramp-up (the
  extra workers starting while the first already trains) stays in, as it would in any study.
- steady: each worker's trials after its first, over the span they took, summed over workers
  (workers are told apart by chaining each trial to the trial that ended last before it began).
  A fresh worker's first trial pays imports the later ones do not; this leaves them out.

Targets (the issue): local / baseline >= 1.7 with N = 2, ray / local >= 0.9. The cases of a repeat
run back to back in a rotating order, so the machine's load hits each case alike, and ratios are
taken within a repeat. The script also measures the CPU other processes used on the case's cores
while it ran (/proc/stat minus the study's own processes): on a shared machine that, and not the
study, is often why a ratio falls short.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
STUDY = "bench"
TICK = os.sysconf("SC_CLK_TCK")
QUIET = 0.15  # a run is quiet when other processes used less than this many of its cores


# --- a throwaway PostgreSQL server (as tests/conftest.py and scripts/server.sh start one) ---------

class Postgres:
    """initdb + pg_ctl start on 127.0.0.1 and a free port; as user `postgres` when we are root."""

    def __init__(self) -> None:
        on_path = shutil.which("pg_ctl")
        dirs = [Path(on_path).resolve().parent] if on_path else sorted(
            (Path(d) for d in glob("/usr/lib/postgresql/*/bin")), key=lambda d: d.parent.name)
        if not dirs:
            sys.exit("PostgreSQL not found (initdb, pg_ctl): apt-get install postgresql, or "
                     "leave the postgres case out with --cases")
        self.bin = dirs[-1]
        self.root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.data = self.root / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.pid: int | None = None
        self.databases = 0

    def cmd(self, *words: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *words] if os.geteuid() == 0 else list(words)

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres")
        # The server's defaults (fsync on, synchronous_commit on), as scripts/server.sh runs it.
        subprocess.run(self.cmd(str(self.bin / "initdb"), "-D", str(self.data), "-U", "sweep",
                                "-A", "trust", "-E", "UTF8", "--no-locale", "--no-instructions"),
                       check=True, capture_output=True)
        with open(self.data / "postgresql.conf", "a") as conf:  # TCP on 127.0.0.1 only
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       "unix_socket_directories = ''\n")
        subprocess.run(self.cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                                str(self.root / "server.log"), "-w", "-t", "60", "start"),
                       check=True, capture_output=True)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def new_database(self) -> str:
        import psycopg2

        self.databases += 1
        name = f"bench_{self.databases}"
        conn = psycopg2.connect(f"postgresql://sweep@127.0.0.1:{self.port}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()
        return f"postgresql://sweep@127.0.0.1:{self.port}/{name}"  # bare scheme, as users write

    def version(self) -> str:
        out = subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True,
                             text=True)
        return re.search(r"\d+(\.\d+)+", out.stdout).group(0)

    def stop(self) -> None:
        if self.pid is not None:
            subprocess.run(self.cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                                    "-w", "stop"), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


# --- CPU: the study's processes against everything else on its cores -----------------------------

def proc_stat(pid: str) -> tuple[int, int, int] | None:
    """(ppid, session id, utime + stime in ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[3]), int(fields[11]) + int(fields[12])


def cores_busy(cores: list[int]) -> float:
    """Busy seconds so far of these cores, summed (from /proc/stat)."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                v = list(map(int, vals))
                total += sum(v[:8]) - v[3] - v[4]  # all but idle and iowait
    return total / TICK


class CpuWatch(threading.Thread):
    """Samples, every `every` s, the CPU seconds of the study's process tree (its session, and
    the descendants of the given roots: the PostgreSQL server) and the busy seconds of its cores."""

    def __init__(self, roots: list[int], cores: list[int], every: float = 0.5):
        super().__init__(daemon=True)
        self.roots, self.cores, self.every = set(roots), cores, every
        self.sid = os.getsid(roots[0])
        self.seen: dict[int, int] = {}  # pid -> last CPU ticks
        self.samples: list[tuple[float, float, float]] = []  # (time, ours s, busy s)
        self.stop = threading.Event()

    def sample(self) -> None:
        stats = {int(p): s for p in os.listdir("/proc") if p.isdigit()
                 and (s := proc_stat(p)) is not None}
        ours = set(self.roots)
        for pid, (_, sid, _) in stats.items():
            if sid == self.sid:
                ours.add(pid)
        grew = True
        while grew:  # descendants that started their own session (Ray's daemons, PostgreSQL's)
            grew = False
            for pid, (ppid, _, _) in stats.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    grew = True
        for pid in ours & stats.keys():
            self.seen[pid] = stats[pid][2]
        self.samples.append((time.time(), sum(self.seen.values()) / TICK,
                             cores_busy(self.cores)))

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()

    def between(self, a: float, b: float) -> tuple[float, float]:
        """(the study's cores, other processes' cores on the same cores) on average over [a, b]."""
        first = min(self.samples, key=lambda s: abs(s[0] - a))
        last = min(self.samples, key=lambda s: abs(s[0] - b))
        span = last[0] - first[0]
        if span <= 0:
            return math.nan, math.nan
        ours = (last[1] - first[1]) / span
        return ours, (last[2] - first[2]) / span - ours


# --- one case -----------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    workers: int          # N: workers and cores
    launcher: str = "local"
    storage: str = "sqlite"
    tracking: bool = False

    def cores(self) -> list[int]:
        return list(range(self.workers))


@dataclass
class Result:
    case: str
    trials: int
    wall: float
    startup: float        # process start -> first trial's start
    end: float            # last trial's end -> process exit
    search: float         # trials per hour over the search phase
    steady: float         # trials per hour, each worker's first trial left out
    chains: int           # workers seen in the storage
    trial_s: float        # median trial, first trials left out
    first_s: float        # median first trial of a worker
    gap_s: float          # median time between a worker's trials
    workers_up: list[float] = field(default_factory=list)  # each Worker() registered, s after start
    ours: float = math.nan    # cores the study's processes used during the search
    cpu_s: float = math.nan   # CPU seconds of the study's processes per trial during the search
    steady_cpu_s: float = math.nan  # the same while every worker is past its first trial
    others: float = math.nan  # cores other processes used on the same cores meanwhile
    load: float = math.nan


def study_argv(case: Case, trials: int, epochs: int, out: Path, storage: str) -> list[str]:
    argv = ["study=tiny", "model=cnn", "dataset=digits", "optimizer=sgd", f"study.name={STUDY}",
            "study.pruner=none", "study.plots=false", "study.schedules=[cosine]",
            f"study.trials={trials}", f"study.epochs={epochs}", "study.seeds=[1]",
            "scheduler.search_space={optimizer.lr:{type:float,low:0.01,high:0.05,log:true}}",
            f"study.output_dir={out}", f"study.storage={storage}", f"study.workers={case.workers}"]
    if case.launcher == "ray":
        argv += ["study.launcher=ray", "study.cpus_per_trial=1"]
    if not case.tracking:
        argv.append("tracking=none")
    return argv


def chains(trials: list[optuna.trial.FrozenTrial]) -> list[list[optuna.trial.FrozenTrial]]:
    """Group trials by worker: a worker asks for its next trial right after telling the last, so
    each trial follows the chain whose trial ended last before it began (a new chain if none
    has ended: every known worker is busy)."""
    out: list[list[optuna.trial.FrozenTrial]] = []
    for t in sorted(trials, key=lambda t: t.datetime_start):
        free = [c for c in out if c[-1].datetime_complete <= t.datetime_start]
        if free:
            max(free, key=lambda c: c[-1].datetime_complete).append(t)
        else:
            out.append([t])
    return out


def run_case(case: Case, args: argparse.Namespace, tmp: Path, pg: Postgres | None,
             trials: int | None = None) -> Result:
    trials = trials or args.trials_per_worker * case.workers
    where = tmp / f"{case.name.replace(' ', '')}-{time.monotonic_ns()}"
    where.mkdir()
    storage = (pg.new_database() if case.storage == "postgres"
               else f"sqlite:///{where / 'optuna.db'}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "OMP_NUM_THREADS")}
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
    if case.tracking:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{where / 'mlflow.db'}"
    cores = case.cores()
    cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "sweep.study",
           *study_argv(case, trials, args.epochs, where / "out", storage)]
    log = where / "study.log"
    with open(log, "w") as out:
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=where,
                                start_new_session=True)
        watch = CpuWatch([proc.pid] + ([pg.pid] if pg and case.storage == "postgres" else []),
                         cores)
        watch.sample()
        watch.start()
        rc = proc.wait()
        ended = time.time()
        watch.stop.set()
        watch.join()
        watch.sample()
    if rc != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        sys.exit(f"{case.name}: the study exited with {rc}; its log is above ({log})")

    opened = optuna.storages.RDBStorage(storage.replace("postgresql://",
                                                        "postgresql+psycopg2://"))
    done = [t for t in optuna.load_study(study_name=f"{STUDY}/cosine", storage=opened).trials
            if t.state == TrialState.COMPLETE and t.user_attrs.get("role") == "trial"]
    workers = optuna.load_study(study_name=f"{STUDY}/workers", storage=opened).trials
    if hasattr(opened, "engine"):
        opened.engine.dispose()
    if len(done) != trials:
        sys.exit(f"{case.name}: {len(done)} of {trials} trials completed; see {log}")
    ts = lambda d: d.timestamp()  # noqa: E731  (naive local times, as time.time())
    first, last = min(ts(t.datetime_start) for t in done), max(ts(t.datetime_complete)
                                                              for t in done)
    groups = chains(done)
    steady = sum((len(c) - 1) / (ts(c[-1].datetime_complete) - ts(c[0].datetime_complete))
                 for c in groups if len(c) > 1)
    dur = lambda t: ts(t.datetime_complete) - ts(t.datetime_start)  # noqa: E731
    later = [dur(t) for c in groups for t in c[1:]]
    gaps = [ts(b.datetime_start) - ts(a.datetime_complete) for c in groups
            for a, b in zip(c, c[1:], strict=False)]
    ours, others = watch.between(first, last)
    # Every worker past its first trial and none finished yet: CPU seconds per trial there.
    a = max(ts(c[0].datetime_complete) for c in groups)
    b = min(ts(c[-1].datetime_complete) for c in groups)
    n = sum(a < ts(t.datetime_complete) <= b for t in done)
    steady_cpu = watch.between(a, b)[0] * (b - a) / n if n else math.nan
    if not args.keep:
        shutil.rmtree(where, ignore_errors=True)
    return Result(case=case.name, trials=trials, wall=ended - started, startup=first - started,
                  end=ended - last, search=3600 * trials / (last - first), steady=3600 * steady,
                  chains=len(groups), trial_s=statistics.median(later) if later else math.nan,
                  first_s=statistics.median(dur(c[0]) for c in groups),
                  gap_s=statistics.median(gaps) if gaps else math.nan,
                  workers_up=sorted(ts(w.datetime_start) - started for w in workers),
                  ours=ours, others=others, cpu_s=ours * (last - first) / trials,
                  steady_cpu_s=steady_cpu,
                  load=os.getloadavg()[0])


def storage_alone(args: argparse.Namespace, tmp: Path, pg: Postgres) -> dict[str, list[float]]:
    """Seconds per trial of a worker's own storage work, on SQLite and on PostgreSQL: the same
    `Worker.take_slot` + `run_trial` as a study, with training replaced by replaying `--epochs`
    epochs' metrics (tracking off). Interleaved, pinned to core 0, one median per repeat each."""
    import contextlib
    import io

    import sweep.study_worker
    import sweep.train
    from sweep.config import compose
    from sweep.study import make_plan
    from sweep.study_optuna import make_pruner, make_sampler
    from sweep.study_storage import create_study
    from sweep.study_worker import Worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sides = {}
    for kind in ("sqlite", "postgres"):
        where = tmp / f"alone-{kind}"
        where.mkdir()
        storage = pg.new_database() if kind == "postgres" else f"sqlite:///{where / 'optuna.db'}"
        argv = study_argv(Case(kind, 1), 10**6, args.epochs, where / "out", storage)
        plan = make_plan(compose(argv, "sweep"), argv)
        worker = Worker(plan)
        create_study(worker.storage, plan.study_name("cosine"), plan.direction)
        worker.base("cosine")  # composed once, as in a study
        s = plan.settings
        study = worker.study("cosine", sampler=make_sampler(s, plan.spaces["cosine"], s["seed"]),
                             pruner=make_pruner(s, plan.epochs))
        sides[kind] = (worker, study)
    metric = plan.metric

    replayed = []

    def replay(cfg, callback=None, tracker=None, output_dir=None) -> sweep.train.TrainResult:
        replayed.append(1)
        rows = [{metric: 0.9} for _ in range(args.epochs)]
        for epoch, row in enumerate(rows, 1):
            if callback is not None and callback(epoch, row):
                break
        return sweep.train.TrainResult(status="completed", metric_name=metric,
                                       direction="maximize", history=rows, best_metric=0.9)

    out: dict[str, list[float]] = {kind: [] for kind in sides}
    # train() replaced wherever the worker looks it up: its own module, or sweep.train's.
    modules = [m for m in (sweep.study_worker, sweep.train) if hasattr(m, "train")]
    real = [m.train for m in modules]
    for module in modules:
        module.train = replay
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the per-trial lines
            for _ in range(args.repeats):
                for kind, (worker, study) in sides.items():
                    took = []
                    for _ in range(args.trials_per_worker):
                        started = time.perf_counter()
                        worker.run_trial(study, worker.take_slot(study, 10**6), "cosine")
                        took.append(time.perf_counter() - started)
                        if not replayed:
                            sys.exit("the worker trained for real: bench_scaling.py must "
                                     "replace train() where sweep.study_worker looks it up")
                    out[kind].append(statistics.median(took))
    finally:
        for module, fn in zip(modules, real, strict=True):
            module.train = fn
        os.sched_setaffinity(0, affinity)
        for worker, _ in sides.values():
            if hasattr(worker.storage, "engine"):
                worker.storage.engine.dispose()
    return out


# --- the report ---------------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    lo, med, hi = min(values), statistics.median(values), max(values)
    return f"{fmt.format(lo)} / {fmt.format(med)} / {fmt.format(hi)}"


def versions(pg: Postgres | None) -> str:
    import sqlite3
    from importlib.metadata import version

    names = ["torch", "optuna", "ray", "mlflow"]
    got = []
    for name in names:
        try:
            got.append(f"{name} {version(name)}")
        except Exception:
            got.append(f"{name} -")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), "
            f"Python {platform.python_version()}, {', '.join(got)}, SQLite "
            f"{sqlite3.sqlite_version}" + (f", PostgreSQL {pg.version()}" if pg else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default=str(len(os.sched_getaffinity(0))),
                        help="comma-separated N for the local and ray cases (default: all cores)")
    parser.add_argument("--trials-per-worker", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial")
    parser.add_argument("--cases", default="baseline,local,ray,postgres,mlflow")
    parser.add_argument("--keep", action="store_true", help="keep each case's directory and log")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below

    have = sorted(os.sched_getaffinity(0))
    ns = [int(n) for n in args.workers.split(",")]
    if max(ns) > len(have) or have[:max(ns)] != list(range(max(ns))):
        sys.exit(f"--workers {args.workers}: this process may use cores {have}; N cores means "
                 "cores 0..N-1")
    wanted = args.cases.split(",")
    cases = [Case("baseline", 1)] if "baseline" in wanted else []
    cases += [Case(f"local {n}", n) for n in ns if n > 1 and "local" in wanted]
    cases += [Case(f"ray {n}", n, "ray") for n in ns if "ray" in wanted]
    if "postgres" in wanted:
        cases.append(Case("postgres", 1, storage="postgres"))
    if "mlflow" in wanted:
        cases.append(Case("mlflow", 1, tracking=True))

    tmp = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    pg = Postgres() if any(c.storage == "postgres" for c in cases) else None
    try:
        if pg:
            pg.start()
        print(versions(pg))
        print(f"cnn/digits, cosine, {args.epochs} epochs a trial, {args.trials_per_worker} trials "
              f"per worker, {args.repeats} repeats; load average {os.getloadavg()[0]:.1f}",
              flush=True)
        # Warm-up, not counted: the first start reads every module from disk; Ray's first start
        # also unpacks its runtime.
        for case in {(c.launcher, c.storage, c.tracking): c for c in cases}.values():
            run_case(case, args, tmp, pg, trials=case.workers)
        results: dict[str, list[Result]] = {c.name: [] for c in cases}
        print(f"{'case':<10} {'trials':>6} {'search/h':>8} {'steady/h':>8} {'trial s':>7} "
              f"{'first s':>7} {'gap ms':>6} {'startup':>7} {'end':>5} {'wall':>6}  workers up "
              f"(s)        CPU s/trial (steady); study cores, others' cores, load", flush=True)
        for r in range(args.repeats):
            for case in cases[r % len(cases):] + cases[:r % len(cases)]:
                res = run_case(case, args, tmp, pg)
                results[case.name].append(res)
                print(f"{res.case:<10} {res.trials:>6} {res.search:>8.0f} {res.steady:>8.0f} "
                      f"{res.trial_s:>7.2f} {res.first_s:>7.2f} {1000 * res.gap_s:>6.0f} "
                      f"{res.startup:>7.1f} {res.end:>5.1f} {res.wall:>6.1f}  "
                      f"{','.join(f'{w:.1f}' for w in res.workers_up):<18} {res.cpu_s:.2f} "
                      f"({res.steady_cpu_s:.2f}); "
                      f"{res.ours:.2f}, {res.others:.2f}, {res.load:.1f}", flush=True)
        alone = storage_alone(args, tmp, pg) if pg and "baseline" in results else None
    finally:
        if pg:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True) if not args.keep else print(f"kept {tmp}")

    print(f"\nmin / median / max of {args.repeats} repeats (trials per hour from the storage's "
          "timestamps; startup and end are the process's fixed costs, in seconds)")
    print("| case | search trials/h | steady trials/h | trial s | CPU s per trial | steady CPU s "
          "per trial | startup s | wall s | others' cores |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rs in results.items():
        print(f"| {name} | {spread([r.search for r in rs])} | {spread([r.steady for r in rs])} | "
              f"{spread([r.trial_s for r in rs], '{:.2f}')} | "
              f"{spread([r.cpu_s for r in rs], '{:.2f}')} | "
              f"{spread([r.steady_cpu_s for r in rs], '{:.2f}')} | "
              f"{spread([r.startup for r in rs], '{:.1f}')} | "
              f"{spread([r.wall for r in rs], '{:.1f}')} | "
              f"{spread([r.others for r in rs], '{:.2f}')} |")

    def ratio(a: str, b: str, what: str, target: str) -> None:
        if a in results and b in results:
            for key in ("search", "steady"):
                pairs = [getattr(x, key) / getattr(y, key)
                         for x, y in zip(results[a], results[b], strict=True)]
                print(f"{what} ({key}): {spread(pairs, '{:.2f}')}   {target}")
            # The ratio if each case had its cores to itself: trials per CPU second, times the
            # cores. Other processes on the cores slow the rate; this they change far less.
            k = next(c.workers for c in cases if c.name == a) / next(
                c.workers for c in cases if c.name == b)
            pairs = [k * y.steady_cpu_s / x.steady_cpu_s
                     for x, y in zip(results[a], results[b], strict=True)]
            print(f"{what} (steady, per CPU second x cores): {spread(pairs, '{:.2f}')}")
            # Runs in which other processes left the case's cores alone, from any repeat.
            qa, qb = ([r.steady for r in results[x] if r.others < QUIET] for x in (a, b))
            if qa and qb:
                print(f"{what} (steady, quiet runs only: {len(qa)} and {len(qb)} of "
                      f"{len(results[a])}): {statistics.median(qa) / statistics.median(qb):.2f}")

    def cost(a: str, b: str, what: str) -> None:
        if a in results and b in results:
            # 1 worker: seconds per trial over the search phase, paired within a repeat
            per = [3600 / x.search - 3600 / y.search
                   for x, y in zip(results[a], results[b], strict=True)]
            gap = [x.gap_s - y.gap_s for x, y in zip(results[a], results[b], strict=True)]
            print(f"{what}: {spread(per, '{:+.3f}')} s per trial (of "
                  f"{statistics.median(3600 / y.search for y in results[b]):.2f} s); between "
                  f"trials {spread([1000 * g for g in gap], '{:+.0f}')} ms")

    print("\nratios within a repeat, min / median / max:")
    for n in ns:
        if n > 1:
            ratio(f"local {n}", "baseline", f"local {n} / baseline", f"target >= {0.85 * n:.2f}")
            ratio(f"ray {n}", f"local {n}", f"ray {n} / local {n}", "target >= 0.90")
    ratio("ray 1", "baseline", "ray 1 / baseline", "target >= 0.90")
    cost("postgres", "baseline", "PostgreSQL - SQLite")
    cost("mlflow", "baseline", "MLflow (SQLite store) - tracking off")
    if alone:
        diff = [1000 * (p - q) for p, q in zip(alone["postgres"], alone["sqlite"], strict=True)]
        print(f"a worker's storage work alone (training replayed), ms per trial: SQLite "
              f"{spread([1000 * x for x in alone['sqlite']], '{:.1f}')}, PostgreSQL "
              f"{spread([1000 * x for x in alone['postgres']], '{:.1f}')}, difference "
              f"{spread(diff, '{:+.1f}')}")


if __name__ == "__main__":
    main()
