"""One study, many processes: the storage is the single source of truth.

Real processes (`python -m sweep.study`) on real storages (SQLite, a journal file, PostgreSQL),
killed with a real SIGKILL at the moments that used to lose work, then resumed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import TINY_STUDY, sqlite_store
from optuna.trial import TrialState

from sweep.dburl import sqlalchemy_url
from sweep.study import run_study
from sweep.study_optuna import counts, trial_state
from sweep.study_storage import OnStale, trial_id

# 2 schedules x 3 trials x 2 epochs of a small MLP on 200 regression samples; 2 seeds to confirm.
TINY = [*TINY_STUDY, "study.trials=3", "study.plots=false",
        "study.heartbeat_interval=1", "study.grace_period=3"]
SCHEDULES, SEEDS, BUDGET = ("step", "cosine"), (1, 2), 3


def sweep_study(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweep.study", *argv], cwd=cwd,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def summary_of(output: str) -> str:
    """The printed comparison: from the table's header to the end."""
    return output[output.index("| schedule"):] if "| schedule" in output else ""


def load(storage: str, name: str) -> optuna.Study:
    if storage.endswith(".journal"):
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage))
    else:
        storage = sqlalchemy_url(storage)
    return optuna.load_study(study_name=name, storage=storage)


def runs_by_role(tracking_uri: str, study: str) -> dict[str, list]:
    client = mlflow.MlflowClient(sqlalchemy_url(tracking_uri))
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id], f"tags.study = '{study}'",
                              max_results=1000)
    out: dict[str, list] = {"study": [], "trial": [], "confirm": []}
    for run in runs:
        out[run.data.tags["role"]].append(run)
    return out


def check_one_study(storage: str, tracking_uri: str, name: str) -> dict[str, list]:
    """Exact budget, one parent run with every child, each confirmation once, nothing RUNNING."""
    for schedule in SCHEDULES:
        trials = load(storage, f"{name}/{schedule}").trials
        assert sum(counts(t) for t in trials) == BUDGET, [trial_state(t) for t in trials]
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        confirm = load(storage, f"{name}/{schedule}/confirm").trials
        done = [t.user_attrs["seed"] for t in confirm if t.state == TrialState.COMPLETE]
        assert sorted(done) == sorted(SEEDS), [(t.number, trial_state(t)) for t in confirm]
    runs = runs_by_role(tracking_uri, name)
    assert len(runs["study"]) == 1
    parent = runs["study"][0].info.run_id
    children = runs["trial"] + runs["confirm"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    # A confirmation another process took over (and ran again) ends KILLED, tagged so.
    counted = [r for r in runs["confirm"] if r.data.tags.get("state") != "taken over"]
    assert Counter((r.data.tags["schedule"], r.data.tags["seed"]) for r in counted) == \
        Counter({(s, str(k)): 1 for s in SCHEDULES for k in SEEDS})
    statuses = Counter(r.info.status for r in [*runs["study"], *children])
    assert "RUNNING" not in statuses, statuses
    return runs


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_three_processes_started_at_once_run_one_study_exactly_once(kind, tmp_path, request):
    out = tmp_path / "study"
    storage, tracking_uri = {
        "sqlite": lambda: (f"sqlite:///{out / 'optuna.db'}", sqlite_store(tmp_path)),
        "journal": lambda: (str(out / "optuna.journal"), sqlite_store(tmp_path)),
        "postgresql": lambda: (request.getfixturevalue("pg_database"),
                               request.getfixturevalue("pg_database2")),
    }[kind]()
    argv = [*TINY, f"study.output_dir={out}", f"study.storage={storage}", "study.name=three"]
    procs = [sweep_study(argv, tmp_path, {"MLFLOW_TRACKING_URI": tracking_uri})
             for _ in range(3)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs

    runs = check_one_study(storage, tracking_uri, "three")
    assert len(runs["trial"]) == BUDGET * len(SCHEDULES)  # no trial trained twice
    # Every process printed the same summary, and it is the storage's: its tallies add up.
    summaries = {summary_of(o) for o in outputs}
    assert len(summaries) == 1 and "| step " in summaries.pop()
    # No two trials of a schedule were proposed with the same parameters.
    for schedule in SCHEDULES:
        params = [tuple(sorted(t.params.items())) for t in load(storage, f"three/{schedule}").trials
                  if counts(t)]
        assert len(set(params)) == len(params)


@pytest.mark.parametrize("moment, kind", [
    ("mid_trial", "sqlite"), ("after_train", "sqlite"), ("confirm", "sqlite"),
    ("summary", "sqlite"),
    ("mid_trial", "journal"),  # no heartbeat in Optuna for a journal: ours
    ("after_train", "postgresql"),
])
def test_a_sigkill_at_any_moment_loses_nothing_and_trains_nothing_twice(moment, kind, tmp_path,
                                                                        monkeypatch, request):
    out, tracking_uri = tmp_path / "study", sqlite_store(tmp_path)
    storage = {"sqlite": lambda: f"sqlite:///{out / 'optuna.db'}",
               "journal": lambda: str(out / "optuna.journal"),
               "postgresql": lambda: request.getfixturevalue("pg_database")}[kind]()
    argv = [*TINY, f"study.output_dir={out}", "study.name=killed", f"study.storage={storage}"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    killed = sweep_study(argv, tmp_path, {"SWEEP_KILL_AT": moment})
    output = killed.communicate(timeout=600)[0]
    assert killed.returncode == -9, output  # it really died there

    summary = run_study(argv)  # the same command again, after a grace period's wait at most
    runs = check_one_study(storage, tracking_uri, "killed")
    trials = [t for s in SCHEDULES for t in load(storage, f"killed/{s}").trials]
    recovered = [t for t in trials if "recovered_from" in t.user_attrs]
    retried = [t for t in trials if "failed_trial" in t.system_attrs]
    if moment == "mid_trial":  # its training never finished: it runs again, once
        assert len(retried) == 1 and not recovered
        assert len(runs["trial"]) == BUDGET * len(SCHEDULES) + 1
        assert Counter(r.info.status for r in runs["trial"])["KILLED"] == 1
    elif moment == "after_train":  # its result was in the storage: recovered, not retrained
        assert len(recovered) == 1 and not retried
        assert len(runs["trial"]) == BUDGET * len(SCHEDULES)
        killed_run = [r for r in runs["trial"] if r.info.status == "KILLED"]
        assert len(killed_run) == 1 and "(recovered)" in killed_run[0].data.tags["state"]
    else:  # a confirmation or the summary: no search trial was touched
        assert len(runs["trial"]) == BUDGET * len(SCHEDULES) and not recovered and not retried
    assert len(runs["confirm"]) == len(SCHEDULES) * len(SEEDS)
    assert runs["study"][0].info.status == "FINISHED"
    assert {r.schedule for r in summary.rows} == set(SCHEDULES)
    assert all(len(r.runs) == len(SEEDS) for r in summary.rows)


def test_a_fused_member_pruned_before_its_group_ends_is_recovered_after_a_kill(tmp_path):
    # Rounds of 2 trials train fused. In the second, trial 2 (lr 1e-4, far behind the first
    # round's two after one epoch) is pruned at epoch 1 while trial 3 trains on; the worker is
    # killed right then. Trial 2's result was in the storage: recovered, not trained again;
    # trial 3's was not: it runs again.
    out, tracking_uri = tmp_path / "study", sqlite_store(tmp_path)
    storage = f"sqlite:///{out / 'optuna.db'}"
    argv = [*TINY_STUDY, "study.plots=false", "study.heartbeat_interval=1",
            "study.grace_period=3", "study.schedules=[cosine]", "study.trials=8",
            "study.prune_after=2", "study.seeds=[1]", "study.name=halfway",
            f"study.output_dir={out}", f"study.storage={storage}"]
    out.mkdir()
    study = optuna.create_study(study_name="halfway/cosine", direction="minimize",
                                storage=storage)
    for lr in (0.05, 0.05, 1e-4, 0.05, 0.05, 0.05, 0.05, 0.05):
        study.enqueue_trial({"optimizer.lr": lr})
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    killed = sweep_study(argv, tmp_path, {**env, "SWEEP_KILL_AT": "pruned"})
    output = killed.communicate(timeout=600)[0]
    assert killed.returncode == -9, output  # it really died there

    again = sweep_study(argv, tmp_path, env)
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output

    trials = load(storage, "halfway/cosine").trials
    recovered = [t for t in trials if "recovered_from" in t.user_attrs]
    retried = [t for t in trials if "failed_trial" in t.system_attrs]
    assert [(t.user_attrs["recovered_from"], trial_state(t)) for t in recovered] == [
        (2, "pruned")]
    assert [t.system_attrs["failed_trial"] for t in retried] == [3]
    runs = runs_by_role(tracking_uri, "halfway")
    killed_runs = [r for r in runs["trial"] if r.info.status == "KILLED"]
    assert sorted(r.data.tags["state"] for r in killed_runs) == ["interrupted",
                                                                 "pruned (recovered)"]


def test_a_worker_killed_while_another_runs_has_its_trial_rerun_by_the_live_one(tmp_path):
    out, tracking_uri = tmp_path / "study", sqlite_store(tmp_path)
    storage = f"sqlite:///{out / 'optuna.db'}"
    argv = [*TINY, f"study.output_dir={out}", "study.name=pair", "study.epochs=4"]
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    live = sweep_study(argv, tmp_path, env)
    doomed = sweep_study(argv, tmp_path, {**env, "SWEEP_KILL_AT": "mid_trial"})
    doomed.communicate(timeout=600)
    output = live.communicate(timeout=600)[0]
    assert doomed.returncode == -9 and live.returncode == 0, output

    check_one_study(storage, tracking_uri, "pair")
    trials = [t for s in SCHEDULES for t in load(storage, f"pair/{s}").trials]
    interrupted = [t for t in trials if trial_state(t) == "interrupted"]
    retried = [t for t in trials if "failed_trial" in t.system_attrs]
    assert len(interrupted) == 1 and len(retried) == 1
    assert retried[0].params == interrupted[0].params  # the same trial, run again


def trials_running(storage: str, names: list[str]) -> int:
    total = 0
    for name in names:
        try:
            total += sum(t.state == TrialState.RUNNING for t in load(storage, name).trials)
        except Exception:  # the database or the study is not created yet
            pass
    return total


def declare_dead(storage: str, name: str, tracking_uri: str, has_reported: bool) -> bool:
    """What another worker's reaper does to a trial whose heartbeat it finds stale: fail it, then
    keep its recorded outcome or queue it again (`OnStale`). Here to a running trial whose worker
    is alive and well: a heartbeat that missed the grace period (a stalled machine, a storage
    that stopped answering) looks the same from outside. True if it caught one."""
    try:
        rdb = optuna.storages.RDBStorage(sqlalchemy_url(storage))
        study = optuna.load_study(study_name=name, storage=rdb)
    except Exception:  # the database or the study is not created yet
        return False
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if has_reported and not t.intermediate_values:
            continue
        tid = trial_id(rdb, study, t.number)
        try:
            if rdb.set_trial_state_values(tid, TrialState.FAIL):
                OnStale(tracking_uri)(study, rdb.get_trial(tid))
                return True
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished first
    return False


def test_a_trial_declared_dead_while_its_worker_lives_is_let_go_not_a_crash(tmp_path):
    # The worker finds its trial (a search trial mid-training, a confirmation) already failed by
    # someone else: it stops that member, says so, and goes on; the storage's account stands.
    out, tracking_uri = tmp_path / "study", sqlite_store(tmp_path)
    storage = f"sqlite:///{out / 'optuna.db'}"
    argv = [*TINY, f"study.output_dir={out}", "study.name=alive", "study.epochs=300",
            "study.pruner=none", "fuse=1"]
    study = sweep_study(argv, tmp_path, {"MLFLOW_TRACKING_URI": tracking_uri})
    caught = {"search": False, "confirm": False}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and study.poll() is None and not all(caught.values()):
        if not caught["search"]:
            caught["search"] = declare_dead(storage, "alive/step", tracking_uri, True)
        elif not caught["confirm"]:
            caught["confirm"] = declare_dead(storage, "alive/step/confirm", tracking_uri, False)
        time.sleep(0.05)
    output = study.communicate(timeout=600)[0]
    assert study.returncode == 0, output
    assert caught == {"search": True, "confirm": True}, output
    assert output.count("taken over") >= 2, output

    runs = check_one_study(storage, tracking_uri, "alive")
    taken = [r for r in runs["trial"] + runs["confirm"] if r.data.tags.get("state") == "taken over"]
    assert len(taken) == 2 and {r.info.status for r in taken} == {"KILLED"}


def test_the_ray_launcher_runs_the_budget_with_two_workers(tmp_path, monkeypatch):
    out, tracking_uri = tmp_path / "study", sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    argv = [*TINY, f"study.output_dir={out}", "study.name=ray", "study.launcher=ray",
            "study.workers=2", "study.cpus_per_trial=1"]
    summary = run_study(argv)  # a local Ray, started and stopped by the study

    runs = check_one_study(f"sqlite:///{out / 'optuna.db'}", tracking_uri, "ray")
    assert len(runs["trial"]) == BUDGET * len(SCHEDULES)
    assert len(summary.rows) == len(SCHEDULES)


def test_a_ray_node_killed_mid_study_loses_nothing(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    out, tracking_uri = tmp_path / "study", sqlite_store(tmp_path)
    storage = f"sqlite:///{out / 'optuna.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]  # a worker slot on each
        cluster.wait_for_nodes()
        argv = [*TINY, f"study.output_dir={out}", "study.name=nodes", "study.launcher=ray",
                "study.workers=2", f"study.ray_address={cluster.address}", "study.epochs=40"]

        def kill_a_node_once_both_train() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if trials_running(storage, ["nodes/step", "nodes/cosine"]) >= 2:
                    cluster.remove_node(nodes[1])  # its raylet and worker die at once
                    return
                time.sleep(0.2)

        killer = threading.Thread(target=kill_a_node_once_both_train)
        killer.start()
        run_study(argv)
        killer.join()
    finally:
        ray.shutdown()
        cluster.shutdown()

    check_one_study(storage, tracking_uri, "nodes")
    trials = [t for s in SCHEDULES for t in load(storage, f"nodes/{s}").trials]
    interrupted = [t for t in trials if trial_state(t) == "interrupted"]
    assert len(interrupted) == 1  # the dead node's trial
    # ... run again elsewhere with its parameters; unless the node died before it sampled any
    # (these trials take a fraction of a second), when a new trial takes its place in the budget.
    retried = [t for t in trials if "failed_trial" in t.system_attrs]
    assert len(retried) == (1 if interrupted[0].params else 0)
    if retried:
        assert retried[0].params == interrupted[0].params


def test_a_tracking_server_stopped_mid_study_loses_no_metric_point(mlflow_server, tmp_path):
    out = tmp_path / "study"
    storage = f"sqlite:///{out / 'optuna.db'}"
    argv = [*TINY, f"study.output_dir={out}", "study.name=outage", "study.epochs=20",
            "study.pruner=none"]
    study = sweep_study(argv, tmp_path, {"MLFLOW_TRACKING_URI": mlflow_server.url,
                                         "SWEEP_MLFLOW_WAIT_S": "300"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and study.poll() is None:  # once training has begun
        if trials_running(storage, ["outage/step", "outage/cosine"]):
            break
        time.sleep(0.2)
    mlflow_server.stop()
    time.sleep(5)
    mlflow_server.start()
    output = study.communicate(timeout=600)[0]
    assert study.returncode == 0, output
    assert "unreachable" in output and "reachable again" in output  # it said so, once each way

    runs = check_one_study(storage, mlflow_server.url, "outage")
    client = mlflow.MlflowClient(mlflow_server.url)
    by_trial = {(r.data.tags["schedule"], int(r.data.tags["optuna.trial"])): r.info.run_id
                for r in runs["trial"]}
    for schedule in SCHEDULES:
        for t in load(storage, f"outage/{schedule}").trials:
            epochs = sorted(t.intermediate_values)  # what the trial reported, epoch by epoch
            run_id = by_trial[(schedule, t.number)]
            for key in ("train_loss", "val_mse", "lr"):
                assert sorted(m.step for m in client.get_metric_history(run_id, key)) == epochs
