"""The metric writer: what it stores reads back exactly as MLflow's own `log_batch` stores it."""

import math
import warnings

import mlflow
import pytest
from mlflow.entities import Metric

from sweep.track import Tracker, write_metrics

INF = float("inf")


@pytest.fixture
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def new_run(client) -> str:
    experiment = client.get_experiment_by_name("t") or client.get_experiment(
        client.create_experiment("t"))
    return client.create_run(experiment.experiment_id).info.run_id


def stored(client, run_id: str, keys) -> tuple[dict, dict]:
    """Every point of every key (NaN made comparable), and the run's latest values."""
    def same(v):
        return "nan" if math.isnan(v) else v
    history = {k: sorted((m.step, m.timestamp, same(m.value))
                         for m in client.get_metric_history(run_id, k)) for k in keys}
    latest = {k: same(v) for k, v in client.get_run(run_id).data.metrics.items()}
    return history, latest


# Two batches, as two flushes would write them: the second brings later steps for some keys,
# an earlier step for one (its latest value must not move back), and NaN and infinite values.
BATCHES = [
    [("loss", 1.0, 1000, 1), ("loss", 0.5, 1001, 2), ("lr", 0.1, 1000, 1), ("acc", 0.3, 1000, 1),
     ("weird", math.nan, 1000, 1)],
    [("loss", 0.25, 2000, 3), ("lr", 0.05, 2000, 2), ("acc", 0.2, 2000, 0),
     ("weird", INF, 2000, 2), ("weird", -INF, 2000, 3), ("new", 7.0, 2000, 5)],
]


def test_bulk_writes_read_back_exactly_as_log_batch_writes(client):
    ours, mlflows = new_run(client), new_run(client)
    for batch in BATCHES:
        assert write_metrics(ours, batch) == "bulk"
        client.log_batch(mlflows, metrics=[Metric(*p) for p in batch])
    keys = {p[0] for batch in BATCHES for p in batch}
    assert stored(client, ours, keys) == stored(client, mlflows, keys)
    history, latest = stored(client, ours, keys)
    assert latest == {"loss": 0.25, "lr": 0.05, "acc": 0.3, "weird": -1.7976931348623157e308,
                      "new": 7.0}
    assert [p[2] for p in history["weird"]] == ["nan", 1.7976931348623157e308,
                                                -1.7976931348623157e308]


def test_a_point_written_twice_falls_back_to_log_batch_which_keeps_one(client):
    run_id = new_run(client)
    assert write_metrics(run_id, BATCHES[0]) == "bulk"
    repeat = [*BATCHES[0][:2], ("loss", 0.1, 3000, 3)]  # two points again, one new
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a repeat is expected: no warning
        assert write_metrics(run_id, repeat) == "log_batch"
    assert [m.value for m in sorted(client.get_metric_history(run_id, "loss"),
                                    key=lambda m: m.step)] == [1.0, 0.5, 0.1]


def test_the_tracker_flushes_in_the_background_and_close_waits_for_the_writer(client):
    run_id = new_run(client)
    tracker = Tracker(run_id, flush_every_s=0.0)  # a flush after every epoch
    for epoch in range(1, 6):
        tracker.log_epoch(epoch, {"epoch": epoch, "train_loss": 1 / epoch, "lr": 0.1})
    tracker.log_step(6, {"best_val_mse": 0.2})
    tracker.close()
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(e, 1 / e) for e in range(1, 6)]
    assert client.get_run(run_id).data.metrics == {"train_loss": 0.2, "lr": 0.1,
                                                   "best_val_mse": 0.2}
    assert "epoch" not in client.get_run(run_id).data.metrics  # it is the step, not a metric
