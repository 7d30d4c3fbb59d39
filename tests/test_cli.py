"""End to end: `python -m sweep` in a subprocess, then the MLflow client reads back its run."""

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import TINY_MLP, sqlite_store

TINY = [*TINY_MLP, "model.bn=pre", "optimizer=sgd", "optimizer.lr=0.03", "scheduler=step",
        "scheduler.step_size=1", "trainer.epochs=3", "trainer.log_every_n_steps=2"]


def run_cli(args, cwd, uri, command=(sys.executable, "-m", "sweep")):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_run_logs_params_curves_tags_and_plots(tmp_path):
    uri = sqlite_store(tmp_path)
    proc = run_cli([*TINY, f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, uri=uri)
    # Three epochs on 140 samples learn no more than the targets' mean: the run ends `stalled`.
    assert "status: stalled after 3 epochs" in proc.stdout

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    params, tags = run.data.params, run.data.tags
    assert params["optimizer.lr"] == "0.03" and params["model.bn"] == "pre"
    assert params["scheduler.step_size"] == "1" and params["trainer.epochs"] == "3"
    assert {k: tags[k] for k in ("model", "dataset", "optimizer", "scheduler", "bn", "status")} == {
        "model": "mlp", "dataset": "synthetic_regression", "optimizer": "sgd",
        "scheduler": "step", "bn": "pre", "status": "stalled"}
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
    # One-off numbers are tags, so the run's charts are all curves over epochs.
    assert not {"best_val_mse", "best_epoch", "objective"} & set(run.data.metrics)
    assert tags["best_epoch"] in ("1", "2", "3") and float(tags["best_val_mse"]) > 0


def test_the_run_folder_holds_the_results_without_mlflow(tmp_path):
    out = tmp_path / "out"
    proc = run_cli([*TINY, "tracking=none", f"hydra.run.dir={out}"], cwd=tmp_path, uri="")
    assert f"run folder: {out}" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()

    with open(out / "metrics.csv", newline="") as f:
        initial, *rows = list(csv.DictReader(f))
    assert initial["epoch"] == "0" and float(initial["val_loss"]) > 0  # before the first step
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {"train_loss", "val_loss", "val_mse", "lr", "grad_norm"} <= set(rows[0])
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.03, 0.015, 0.0075])

    result = json.loads((out / "result.json").read_text())
    assert f"status: {result['status']} after 3 epochs" in proc.stdout and result["epochs"] == 3
    assert result["metric"] == "val_mse" and result["direction"] == "minimize"
    assert result["final"]["val_mse"] == pytest.approx(float(rows[-1]["val_mse"]))
    assert result["initial"]["val_loss"] == pytest.approx(float(initial["val_loss"]))
    best = min(rows, key=lambda r: float(r["val_mse"]))
    assert result["best"] == {"val_mse": pytest.approx(float(best["val_mse"])),
                              "epoch": int(best["epoch"])}
    assert result["mlflow_run_id"] is None and result["checkpoint"] is None
    assert (out / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["loss.png", "lr.png"]


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
    uri = sqlite_store(tmp_path)
    # trainer.progress=true: TINY turns the bars off, and the multirun must do so by itself.
    proc = run_cli(["-m", *TINY, "trainer.progress=true", "trainer.epochs=1",
                    "optimizer.lr=0.1,0.01", f"hydra.sweep.dir={tmp_path / 'multi'}"],
                   cwd=tmp_path, uri=uri, command=(str(script),))
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(r.data.params["optimizer.lr"] for r in runs) == ["0.01", "0.1"]
    # Each run's name says what the sweep varies; the TINY overrides every job shares do not.
    assert sorted(r.info.run_name for r in runs) == ["mlp-synthetic_regression-lr=0.01",
                                                     "mlp-synthetic_regression-lr=0.1"]

    # One table across the jobs at the end, best (lowest val_mse) first, also as a CSV file.
    with open(tmp_path / "multi" / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    finals = [float(r["final"]) for r in table]
    assert finals == sorted(finals) and sorted(r["optimizer.lr"] for r in table) == ["0.01", "0.1"]
    assert {r["mlflow_run"] for r in table} == {r.info.run_id for r in runs}
    printed = proc.stdout[proc.stdout.index("2 runs, best first"):].splitlines()
    assert printed[1].split("|")[2].strip() == "optimizer.lr"
    assert [line.split("|")[2].strip() for line in printed[3:5]] == [
        r["optimizer.lr"] for r in table]
    # One bar for the multirun, none per run's epochs.
    assert "multirun: 100%" in proc.stderr and "epochs:" not in proc.stderr


def test_resuming_from_a_checkpoint_continues_the_same_mlflow_run(tmp_path):
    uri = sqlite_store(tmp_path)
    common = [o for o in TINY if not o.startswith(("trainer.epochs", "trainer.log_every"))]
    proc = run_cli([*common, "trainer.epochs=2", "trainer.checkpoint.every=1",
                    f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path, uri=uri)
    assert "after 2 epochs" in proc.stdout
    checkpoint = tmp_path / "a" / "checkpoint.pt"
    assert f"checkpoint: {checkpoint}" in proc.stdout
    assert json.loads((tmp_path / "a" / "result.json").read_text())["checkpoint"] == str(
        checkpoint)
    # The run prints the command that trains on from its checkpoint; run it as printed.
    (printed,) = [line for line in proc.stdout.splitlines() if line.startswith("train on")]
    command = shlex.split(printed.split(": ", 1)[1])
    assert command[:3] == ["python", "-m", "sweep"]
    assert f"trainer.resume={checkpoint}" in command and "trainer.epochs=4" in command
    run_cli([*command[3:], f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path, uri=uri)

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert run.data.tags["status"] == "stalled"  # 4 short epochs learn no more than the mean


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


def test_a_fused_multirun_gives_each_job_the_run_the_basic_launcher_gives_it(tmp_path):
    # Small lrs: in float32 a fused member is its run alone to rounding (tests/test_fused.py).
    sweep = ["-m", *TINY_MLP, "optimizer=sgd", "optimizer.momentum=0", "scheduler=constant",
             "trainer.epochs=3", "optimizer.lr=0.01,0.005", "seed=1,2"]
    runs, tables = {}, {}
    for launcher in ("basic", "fused"):
        uri = sqlite_store(tmp_path / launcher)
        proc = run_cli([*sweep, f"hydra/launcher={launcher}",
                        f"hydra.sweep.dir={tmp_path / launcher / 'multi'}"],
                       cwd=tmp_path, uri=uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        runs[launcher] = {r.info.run_name: r for r in client.search_runs(
            [client.get_experiment_by_name("sweep").experiment_id])}
        with open(tmp_path / launcher / "multi" / "summary.csv", newline="") as f:
            tables[launcher] = {(r["optimizer.lr"], r["seed"]): r for r in csv.DictReader(f)}
        assert "4 runs, best first" in proc.stdout

    assert not any("fused" in r.data.tags for r in runs["basic"].values())
    assert sorted(runs["fused"]) == sorted(runs["basic"])
    for name, alone in runs["basic"].items():
        fused = runs["fused"][name]
        assert (fused.info.status, fused.data.tags["status"], fused.data.tags["fused"]) == (
            "FINISHED", alone.data.tags["status"], "4")
        assert fused.data.params == alone.data.params  # each job's own config
        assert fused.data.metrics["val_mse"] == pytest.approx(alone.data.metrics["val_mse"],
                                                              rel=1e-5)
    for job, row in tables["fused"].items():
        folder = Path(row["folder"])
        assert {"result.json", "metrics.csv", "plots", ".hydra"} <= {p.name for p in
                                                                      folder.iterdir()}
        assert float(row["final"]) == pytest.approx(float(tables["basic"][job]["final"]),
                                                    rel=1e-5)


def test_a_fused_multirun_reports_each_group_s_jobs_before_the_next_group_trains(tmp_path):
    proc = run_cli(["-m", *TINY_MLP, "trainer.epochs=1", "optimizer.lr=0.01,0.005", "seed=1,2",
                    "fuse=2", "hydra/launcher=fused", f"hydra.sweep.dir={tmp_path / 'multi'}"],
                   cwd=tmp_path, uri=sqlite_store(tmp_path))
    out = proc.stdout
    # Hydra's job lines (and the multirun bar's steps with them) come group by group.
    assert out.index("Training group 1/2: jobs 0, 1 fused") < out.index("#0 : ") < out.index(
        "#1 : ") < out.index("Training group 2/2: jobs 2, 3 fused") < out.index("#2 : ")
    assert "4/4" in proc.stderr  # the bar counted every job


def test_a_fused_multirun_refuses_a_bad_job_before_any_job_trains(tmp_path):
    uri = sqlite_store(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-m", "sweep", "-m", *TINY_MLP, "trainer.epochs=1",
                           "optimizer.lr=0.1,-1", "hydra/launcher=fused",
                           f"hydra.sweep.dir={tmp_path / 'multi'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        "sweep: error: optimizer.lr=-1 is not allowed"), proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no run opened for the good job either
    assert not list((tmp_path / "multi").glob("*/result.json"))
