"""End to end: `python -m sweep` in a subprocess, then the MLflow client reads back its run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

TINY = ["model=mlp", "model.bn=pre", "dataset=synthetic_regression", "dataset.n_samples=200",
        "optimizer=sgd", "optimizer.lr=0.03", "scheduler=step", "scheduler.step_size=1",
        "trainer.epochs=3", "trainer.batch_size=50", "trainer.log_every_n_steps=2"]


def run_cli(args, cwd, uri, command=(sys.executable, "-m", "sweep")):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_run_logs_params_curves_tags_and_plots(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    proc = run_cli([*TINY, f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, uri=uri)
    assert "status: completed after 3 epochs" in proc.stdout

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    params, tags = run.data.params, run.data.tags
    assert params["optimizer.lr"] == "0.03" and params["model.bn"] == "pre"
    assert params["scheduler.step_size"] == "1" and params["trainer.epochs"] == "3"
    assert {k: tags[k] for k in ("model", "dataset", "optimizer", "scheduler", "bn", "status")} == {
        "model": "mlp", "dataset": "synthetic_regression", "optimizer": "sgd",
        "scheduler": "step", "bn": "pre", "status": "completed"}
    assert run.info.run_name == "mlp-synthetic_regression-sgd-step"

    for metric in ("train_loss", "val_loss", "val_mse", "lr", "grad_norm"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == [1, 2, 3], metric
    lrs = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
    assert [m.value for m in lrs] == pytest.approx([0.03, 0.015, 0.0075])  # StepLR, gamma 0.5
    # 140 samples / 50 = 3 steps an epoch, 9 in all: per-step metrics at steps 2, 4, 6, 8.
    for metric in ("step_loss", "step_lr"):
        steps = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in steps) == [2, 4, 6, 8]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/loss.png", "plots/lr.png"}


def test_default_store_is_sqlite_in_the_working_directory_and_any_cwd_works(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "sweep", *TINY, "trainer.epochs=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "mlartifacts").is_dir()
    assert list((tmp_path / "outputs").glob("*/*/.hydra/config.yaml"))


def test_the_console_script_and_multirun_grids(tmp_path):
    script = Path(sys.executable).parent / "sweep"
    if not script.exists():
        script = shutil.which("sweep")
    if script is None:
        pytest.skip("the `sweep` console script is not installed (pip install -e .)")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    run_cli(["-m", *TINY, "trainer.epochs=1", "optimizer.lr=0.1,0.01",
             f"hydra.sweep.dir={tmp_path / 'multi'}"], cwd=tmp_path, uri=uri,
            command=(str(script),))
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(r.data.params["optimizer.lr"] for r in runs) == ["0.01", "0.1"]


def test_resuming_from_a_checkpoint_continues_the_same_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    common = [o for o in TINY if not o.startswith(("trainer.epochs", "trainer.log_every"))]
    proc = run_cli([*common, "trainer.epochs=2", "trainer.checkpoint.every=1",
                    f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path, uri=uri)
    assert "after 2 epochs" in proc.stdout
    run_cli([*common, "trainer.epochs=4", f"trainer.resume={tmp_path / 'a' / 'checkpoint.pt'}",
             f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path, uri=uri)

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert run.data.tags["status"] == "completed"


@pytest.mark.parametrize(("module", "setting", "message"), [
    ("sweep.sensitivity", "sensitivity.lrs=[]",  # the default factor, model.bn, needs model=mlp
     "sensitivity.lrs=[] is not allowed: a non-empty list of learning rates > 0"),
    ("sweep.lr_find", "lr_find.steps=0", "lr_find.steps=0 is not allowed: must be an integer >= 3"),
    ("sweep.report", "report.format=pdf",
     "report.format='pdf' is not allowed: choose one of md, html"),
])
def test_the_other_commands_refuse_a_bad_setting_in_one_line_from_any_directory(
        tmp_path, module, setting, message):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", module, "model=mlp", setting], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == f"sweep: error: {message}"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow store, let alone a run
