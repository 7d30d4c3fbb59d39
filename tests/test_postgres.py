"""PostgreSQL as users configure it: Optuna's RDB storage and MLflow's SQL store on a real server,
reached through the plain `postgresql://` URL a user writes (see `pg_database` in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep import dburl
from sweep.dburl import MissingDriver, sqlalchemy_url


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://u@h:5432/optuna", "postgresql+psycopg2://u@h:5432/optuna"),
    ("postgres://u:pw@h/optuna", "postgresql+psycopg2://u:pw@h/optuna"),
    ("postgresql+psycopg://u@h/optuna", "postgresql+psycopg://u@h/optuna"),
    ("postgresql+psycopg2://u@h/optuna", "postgresql+psycopg2://u@h/optuna"),
    ("sqlite:///outputs/optuna.db", "sqlite:///outputs/optuna.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_sqlalchemy_url_names_the_installed_driver(monkeypatch, url: str, expected: str) -> None:
    # Pretend only psycopg2 is installed, so the expectation holds whatever this machine has.
    monkeypatch.setattr(dburl, "find_spec", lambda name: object() if name == "psycopg2" else None)
    assert sqlalchemy_url(url) == expected


def test_sqlalchemy_url_falls_back_to_psycopg3_then_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(dburl, "find_spec", lambda name: object() if name == "psycopg" else None)
    assert sqlalchemy_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.setattr(dburl, "find_spec", lambda name: None)
    with pytest.raises(MissingDriver, match="pip install"):
        sqlalchemy_url("postgres://u@h/db")


def test_optuna_study_on_postgres(pg_database: str) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = sqlalchemy_url(pg_database)
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="schedules/cosine", storage=storage)
    study.optimize(lambda trial: (trial.suggest_float("x", -3, 3) - 1) ** 2, n_trials=5)

    # A second storage object is what another worker process would open: it sees the same study.
    other = optuna.load_study(study_name="schedules/cosine",
                              storage=optuna.storages.RDBStorage(url))
    states = [t.state for t in other.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 5
    assert other.best_value == study.best_value


def test_mlflow_sql_store_on_postgres(pg_database: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlalchemy_url(pg_database))
    experiment_id = client.create_experiment("sweep", artifact_location=tmp_path.as_uri())
    run = client.create_run(experiment_id, run_name="cosine")
    for epoch, loss in enumerate([1.0, 0.5, 0.25]):
        client.log_metric(run.info.run_id, "val_loss", loss, step=epoch)
    client.log_param(run.info.run_id, "scheduler", "cosine")
    client.set_terminated(run.info.run_id)

    got = client.get_run(run.info.run_id)
    assert got.data.params == {"scheduler": "cosine"}
    assert got.data.metrics["val_loss"] == 0.25
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert got.info.status == "FINISHED"
