"""The tracker and the store, against real MLflow: a SQLite store, and a tracking server that this
file starts, stops in the middle of a run and starts again."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import sqlite_store
from omegaconf import OmegaConf

from sweep.config import compose
from sweep.mlflow_store import KIND, KIND_TAG, tracking_uri, use_store
from sweep.track import Tracker
from sweep.train import train

MLFLOW = Path(sys.executable).with_name("mlflow")


@pytest.fixture
def client(mlflow_uri):
    """A client of a fresh SQLite store, which is also the fluent API's store for the test."""
    mlflow.set_tracking_uri(mlflow_uri)
    return mlflow.MlflowClient(tracking_uri=mlflow_uri)


def new_run(client) -> str:
    experiment = client.get_experiment_by_name("t") or client.get_experiment(
        client.create_experiment("t"))
    return client.create_run(experiment.experiment_id).info.run_id


def test_the_tracker_flushes_in_the_background_and_close_waits_for_the_writer(client):
    run_id = new_run(client)
    tracker = Tracker(run_id, flush_every_s=0.0)  # a flush after every epoch
    for epoch in range(1, 6):
        tracker.log_epoch(epoch, {"epoch": epoch, "train_loss": 1 / epoch, "lr": 0.1})
    tracker.log_step(6, {"step_loss": 0.2})
    tracker.close()
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(e, 1 / e) for e in range(1, 6)]
    assert client.get_run(run_id).data.metrics == {"train_loss": 0.2, "lr": 0.1,
                                                   "step_loss": 0.2}
    assert "epoch" not in client.get_run(run_id).data.metrics  # it is the step, not a metric


def test_finish_keeps_one_off_numbers_out_of_the_charts_and_logs_the_runs_figures(client,
                                                                                 tmp_path):
    cfg = compose(["model=mlp", "dataset=synthetic_regression", "dataset.n_samples=200",
                   "trainer.epochs=2", "trainer.batch_size=50", "trainer.progress=false",
                   "tracking=none"])
    result = train(cfg, output_dir=tmp_path / "run")
    run_id = new_run(client)
    tracker = Tracker(run_id, name="mlp-demo")
    for row in result.history:
        tracker.log_epoch(row["epoch"], row)
    tracker.finish(result)
    tracker.close()

    run = client.get_run(run_id)
    assert all(len(client.get_metric_history(run_id, k)) == 2 for k in run.data.metrics)
    tags = run.data.tags
    assert tags["status"] == result.status and tags["epochs"] == "2"
    assert float(tags["best_val_mse"]) == pytest.approx(result.best_metric, rel=1e-5)
    assert tags["best_epoch"] == str(result.best_epoch)
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/loss.png",
                                                                         "plots/lr.png"}
    # train() itself left the run's folder: every epoch's series and the result.
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 4  # header, epochs 0-2
    assert (tmp_path / "run" / "result.json").is_file()


def test_points_the_store_refuses_are_reported_at_close_not_retried(client):
    tracker = Tracker("0" * 32, wait_s=30)  # no such run: MLflow answers 404, not "unreachable"
    tracker.log_step(1, {"loss": 1.0})
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="refused 1 metric points"):
        tracker.close()
    assert time.monotonic() - start < 10


def test_tracking_uri_gives_a_bare_postgresql_url_its_driver(monkeypatch):
    cfg = OmegaConf.create({"tracking": {"uri": "postgresql://me:secret@db:5432/runs"}})
    assert tracking_uri(cfg) == "postgresql+psycopg2://me:secret@db:5432/runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://db/runs")
    assert tracking_uri() == "postgresql+psycopg2://db/runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x/mlflow.db")
    assert tracking_uri() == "sqlite:////tmp/x/mlflow.db"  # other schemes as they are


def test_an_existing_experiment_gets_the_kind_tag_that_opens_it_on_its_runs(client):
    old = client.create_experiment("older")
    assert KIND_TAG not in client.get_experiment(old).tags
    assert use_store(None, "older") == old
    assert client.get_experiment(old).tags[KIND_TAG] == KIND


# The three processes import everything, then wait for one signal, so their first use of the
# store falls in the same instant (without the lock MLflow's table creation crashes in two).
RACER = """
import sys, time
from pathlib import Path
from sweep.mlflow_store import use_store
Path(sys.argv[1] + ".ready").touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print(use_store(None, "race"))
"""


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_processes_starting_together_on_a_fresh_store_all_succeed(store, tmp_path, request,
                                                                  monkeypatch):
    # SQLite: a lock beside the file; PostgreSQL (a fresh database, a bare postgresql:// URL):
    # retries, since there MLflow's table creation fails with a duplicate key.
    uri = (sqlite_store(tmp_path) if store == "sqlite"
           else request.getfixturevalue("pg_database"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"r{i}"), str(go)],
                               cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(3)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("r*.ready"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outcomes = [(*r.communicate(timeout=60), r.returncode) for r in racers]
    finally:
        for racer in racers:
            racer.kill()
    assert all(code == 0 for _, _, code in outcomes), "\n".join(err for _, err, _ in outcomes)
    ids = {out.strip() for out, _, _ in outcomes}
    found = mlflow.MlflowClient(tracking_uri(None)).search_experiments(
        filter_string="name = 'race'")
    assert [e.experiment_id for e in found] == list(ids)
    assert found[0].tags[KIND_TAG] == KIND


# --- a tracking server that goes away in the middle of a run -------------------------------------

def test_a_server_outage_loses_no_point_and_does_not_stall_training(mlflow_server, monkeypatch,
                                                                   capsys):
    server = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("SWEEP_MLFLOW_WAIT_S", "120")  # a failing test ends, it does not hang
    client = mlflow.MlflowClient(server.url)
    run_id = client.create_run(use_store(None, "outage")).info.run_id
    tracker = Tracker(run_id, flush_every_s=0.2)
    down, done, errors = threading.Event(), threading.Event(), []

    def outage() -> None:  # 5 s without a server, then the time it takes to start again
        try:
            time.sleep(1.0)
            server.stop()
            down.set()
            tagging = threading.Thread(target=tracker.set_tags, args=({"during": "outage"},))
            tagging.start()  # a synchronous call: it waits for the server, saying so
            time.sleep(5.0)
            server.start()
            down.clear()
            tagging.join(60)
            time.sleep(1.0)
        except Exception as err:
            errors.append(err)
        finally:
            done.set()

    threading.Thread(target=outage).start()
    epochs, while_down, slowest = 0, 0, 0.0
    while not done.is_set():
        start = time.monotonic()
        tracker.log_epoch(epochs, {"loss": 1 / (epochs + 1), "lr": 0.1})
        slowest = max(slowest, time.monotonic() - start)
        epochs += 1
        while_down += down.is_set()
        time.sleep(0.05)
    tracker.close()
    assert not errors
    assert while_down > 20  # the loop went on while the server was away...
    assert slowest < 2.0  # ...and no call of it waited for the server
    for key in ("loss", "lr"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(epochs))
    assert client.get_run(run_id).data.tags["during"] == "outage"
    err = capsys.readouterr().err
    assert err.count("keeping") == 1, err  # one warning for the outage, not one per retry
    assert "unreachable" in err and "retrying to set the run's tags" in err
    assert "reachable again" in err and "metric points written" in err
