"""Every bad input ends in one line, `sweep: error: <key>=<value> ...`, exit code 2, and leaves
nothing behind: no MLflow run (none new, none flipped to FAILED), no output folder where the
config alone shows the problem, and every file the user had (a finished run, a checkpoint) as it
was. Real files, a real MLflow SQLite store, real training on tiny data.

Most commands run in this process, through the Hydra app as typed (`sys.argv`); a few run as
subprocesses, where the point is the real command line."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_MLP, sqlite_store
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobRuntime
from hydra.types import RunMode

from sweep import CONF_DIR
from sweep.__main__ import main, run
from sweep.config import ConfigError, compose, validate
from sweep.study import main as study_main
from sweep.study_plan import override_text

TINY = [*TINY_MLP, "trainer.epochs=2"]
TRAINER = [o for o in TINY if o.startswith("trainer.")]  # for tests that pick their own dataset
ARCHIVES = Path(__file__).parents[2] / "shared" / "data"  # ../shared/data from the repo root


# --- a finished run with its checkpoints, and what "nothing changed" means ---------------------

def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def store_state(uri: str) -> list[tuple]:
    """Every run in the store: id, status, status tag and the epochs it logged."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted((r.info.run_id, r.info.status, r.data.tags.get("status"), tuple(sorted(
        m.step for m in client.get_metric_history(r.info.run_id, "train_loss")))) for r in runs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A FINISHED 3-epoch run in a SQLite store, its checkpoint after epoch 2 and after epoch 3."""
    tmp = tmp_path_factory.mktemp("finished")
    uri = sqlite_store(tmp)
    first = compose([*TINY, f"tracking.uri={uri}", "trainer.checkpoint.every=1"])
    run(first, output_dir=tmp / "first")
    shutil.copy(tmp / "first" / "checkpoint.pt", tmp / "epoch2.pt")
    more = compose([*TINY, f"tracking.uri={uri}", "trainer.checkpoint.every=1",
                    "trainer.epochs=3", f"trainer.resume={tmp / 'epoch2.pt'}"])
    run(more, output_dir=tmp / "more")
    shutil.copy(tmp / "more" / "checkpoint.pt", tmp / "epoch3.pt")
    (run_,) = store_state(uri)
    # Three epochs on 140 samples learn no more than the targets' mean: the run ends `stalled`.
    assert run_[1:] == ("FINISHED", "stalled", (1, 2, 3))
    return {"uri": uri, "epoch2": tmp / "epoch2.pt", "epoch3": tmp / "epoch3.pt"}


def refused(monkeypatch, capsys, tmp_path: Path, args: list[str], module=main) -> str:
    """Run the app in this process as `python -m <module> <args>` from `tmp_path`; it must exit
    with code 2 and one line on stderr. Returns that line without its `sweep: error: `."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sweep", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        module()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("sweep: error: "), err
    return err.removeprefix("sweep: error: ").rstrip("\n")


def refused_unchanged(monkeypatch, capsys, tmp_path, finished, args, files=(), base=TINY) -> str:
    """`refused`, with the store of `finished`, and everything in it and in `files` as it was."""
    before = store_state(finished["uri"]), [md5(f) for f in (finished["epoch2"],
                                                              finished["epoch3"], *files)]
    message = refused(monkeypatch, capsys, tmp_path,
                      [*base, f"tracking.uri={finished['uri']}", *args])
    after = store_state(finished["uri"]), [md5(f) for f in (finished["epoch2"],
                                                             finished["epoch3"], *files)]
    assert after == before
    return message


# --- trainer.resume ------------------------------------------------------------------------------

def checkpoint_file(kind: str, tmp_path: Path, finished) -> Path:
    real = finished["epoch3"].read_bytes()
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(real[:len(real) // 2])
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    elif kind == "not_ours":  # a real torch file, of something else
        torch.save({"weights": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize(("kind", "why", "found_by_config"), [
    ("missing", "no such file", True),
    ("empty", "is empty", True),
    ("folder", "is not a file", True),
    ("truncated", "cannot be read as a checkpoint (", False),
    ("garbage", "cannot be read as a checkpoint (UnpicklingError", False),
    ("not_ours", "is not a checkpoint of sweep's trainer (it has no model, optimizer", False),
])
def test_resume_from_a_file_that_is_no_checkpoint(kind, why, found_by_config, tmp_path, finished,
                                                  monkeypatch, capsys):
    path = checkpoint_file(kind, tmp_path, finished)
    out = tmp_path / "out"
    message = refused_unchanged(monkeypatch, capsys, tmp_path, finished,
                                ["trainer.epochs=4", f"trainer.resume={path}",
                                 f"hydra.run.dir={out}"])
    assert message.startswith(f"trainer.resume='{path}' is not allowed: {why}"), message
    assert "give the checkpoint.pt of an earlier run" in message
    # What the config alone shows is refused before Hydra creates the output folder.
    assert out.exists() is not found_by_config


def test_resume_with_another_optimizer_leaves_the_finished_run_as_it_was(
        tmp_path, finished, monkeypatch, capsys):
    message = refused_unchanged(monkeypatch, capsys, tmp_path, finished, [
        "optimizer=adam", "trainer.epochs=4", f"trainer.resume={finished['epoch3']}"])
    assert message == (
        f"trainer.resume='{finished['epoch3']}' is not allowed: it continues a run with other "
        "settings: optimizer._target_='torch.optim.SGD' there, 'torch.optim.Adam' here; resume "
        "with the settings it was saved with (the run's .hydra/overrides.yaml)")


def test_resume_with_another_optimizer_from_a_checkpoint_without_its_settings(
        tmp_path, finished, monkeypatch, capsys):
    # What the tensors fit decides when the checkpoint does not say what it was trained with.
    state = torch.load(finished["epoch3"], weights_only=False)
    del state["settings"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    message = refused_unchanged(monkeypatch, capsys, tmp_path, finished, [
        "optimizer=adam", "trainer.epochs=4", f"trainer.resume={old}"], files=[old])
    assert message.startswith(f"trainer.resume='{old}' is not allowed: its optimizer state is "
                              "not Adam's over these parameter groups")
    message = refused_unchanged(monkeypatch, capsys, tmp_path, finished, [
        "model.hidden=[3,3]", "trainer.epochs=4", f"trainer.resume={old}"], files=[old])
    assert message.startswith(f"trainer.resume='{old}' is not allowed: its model's weights do not "
                              "fit this config's model")


@pytest.mark.parametrize("epochs", [1, 3])
def test_resume_with_no_epochs_left_to_train(epochs, tmp_path, finished, monkeypatch, capsys):
    message = refused_unchanged(monkeypatch, capsys, tmp_path, finished, [
        f"trainer.epochs={epochs}", f"trainer.resume={finished['epoch3']}"])
    assert message.startswith(
        f"trainer.epochs={epochs} is not allowed: the checkpoint trainer.resume="
        f"'{finished['epoch3']}' already holds 3 epochs, so nothing is left to train")


def test_resume_with_other_settings_names_them(tmp_path, finished, monkeypatch, capsys):
    message = refused_unchanged(monkeypatch, capsys, tmp_path, finished, [
        "optimizer.lr=0.5", "trainer.batch_size=20", "trainer.epochs=4",
        f"trainer.resume={finished['epoch3']}"])
    assert "optimizer.lr=0.05 there, 0.5 here; trainer.batch_size=50 there, 20 here" in message


def test_resume_of_a_finished_run_from_an_earlier_checkpoint_would_log_epochs_twice(
        tmp_path, finished, monkeypatch, capsys):
    message = refused_unchanged(monkeypatch, capsys, tmp_path, finished, [
        "trainer.epochs=4", f"trainer.resume={finished['epoch2']}"])
    assert message.startswith(f"trainer.resume='{finished['epoch2']}' is not allowed: its MLflow "
                              "run ") and "finished with 3 epochs and this checkpoint holds 2" in (
        message)


def test_resume_into_a_store_without_the_run(tmp_path, finished, monkeypatch, capsys):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    message = refused_unchanged(monkeypatch, capsys, tmp_path, finished, [
        "trainer.epochs=4", f"trainer.resume={finished['epoch3']}", f"tracking.uri={other}"])
    assert "is not in the store tracking.uri=" in message and other in message
    assert store_state(other) == []


# --- optimizer values ----------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["optimizer=adam", "optimizer.betas=[0.9]"],
     "optimizer.betas=[0.9] is not allowed: two numbers in [0, 1)"),
    (["optimizer=adamw", "optimizer.betas=[0.9,1.0]"],
     "optimizer.betas=[0.9, 1.0] is not allowed: two numbers in [0, 1)"),
    (["optimizer=adam", "optimizer.betas=0.9"], "optimizer.betas=0.9 is not allowed"),
    (["optimizer=adam", "optimizer.eps=0"], "optimizer.eps=0 is not allowed: must be a number > 0"),
    (["optimizer=rmsprop", "optimizer.alpha=1.5"], "optimizer.alpha=1.5 is not allowed"),
    (["optimizer.weight_decay=-1"],
     "optimizer.weight_decay=-1 is not allowed: must be a number >= 0"),
    (["optimizer.momentum=-0.5"], "optimizer.momentum=-0.5 is not allowed: must be a number >= 0"),
    (["optimizer.nesterov=true", "optimizer.momentum=0"],
     "optimizer.nesterov=True is not allowed: needs optimizer.momentum > 0"),
    (["optimizer.nesterov=maybe"], "optimizer.nesterov='maybe' is not allowed: true or false"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is not allowed: must be a finite number > 0"),
    (["optimizer.lr=0"], "optimizer.lr=0 is not allowed: must be a number > 0"),
    (["+optimizer.betaz=[0.9,0.99]"],
     "optimizer.betaz=[0.9, 0.99] is not allowed: torch.optim.SGD takes only lr, momentum"),
    (["optimizer._target_=torch.optim.Nope"],
     "optimizer._target_='torch.optim.Nope' is not allowed: a torch.optim optimizer class"),
])
def test_bad_optimizer_values_are_refused_before_anything_exists(args, message, tmp_path,
                                                                  monkeypatch, capsys):
    uri = sqlite_store(tmp_path)
    line = refused(monkeypatch, capsys, tmp_path, [*TINY, f"tracking.uri={uri}", *args])
    assert line.startswith(message), line
    assert os.listdir(tmp_path) == []  # no store, no outputs/


@pytest.mark.parametrize("args", [["optimizer.lr=1e300"],
                                  ["optimizer=adam", "optimizer.lr=1e300"],
                                  # an lr rule can scale a group past the range as well
                                  ["optimizer.param_groups=[{pattern: '^1\\.', lr: 1e300}]"]])
def test_an_lr_too_large_to_apply_ends_as_diverged(args, tmp_path, monkeypatch, capsys):
    uri = sqlite_store(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sweep", *TINY, f"tracking.uri={uri}", *args,
                                      f"hydra.run.dir={tmp_path / 'out'}"])
    main()  # returns: exit code 0
    assert "status: diverged after 1 epochs" in capsys.readouterr().out
    ((_, status, tag, epochs),) = store_state(uri)
    assert (status, tag, epochs) == ("FINISHED", "diverged", (1,))


# --- the MLflow store and the output folders ----------------------------------------------------

def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize("via", ["tracking.uri", "MLFLOW_TRACKING_URI"])
def test_a_store_whose_folder_cannot_exist(via, tmp_path, monkeypatch, capsys):
    uri = sqlite_store(a_file(tmp_path))
    if via == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        args = TINY
    else:
        args = [*TINY, f"tracking.uri={uri}"]
    message = refused(monkeypatch, capsys, tmp_path, args)
    assert message == (f"{via}='{uri}' is not allowed: {tmp_path / 'a_file'} is a file, not a "
                       "folder; point it at a folder you can write, or use tracking=none")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_a_store_where_nothing_can_be_created(tmp_path, monkeypatch, capsys):
    # /proc takes no new files, not even from root (which passes every permission check).
    uri = "sqlite:////proc/sweep-test/mlflow.db"
    message = refused(monkeypatch, capsys, tmp_path, [*TINY, f"tracking.uri={uri}",
                                                     f"hydra.run.dir={tmp_path / 'out'}"])
    assert message.startswith(f"tracking.uri='{uri}' is not allowed: "), message
    assert "tracking=none" in message


def test_a_read_only_store_file(tmp_path, finished, monkeypatch, capsys):
    # SQLite opens the file read-only as asked, whoever we are: MLflow reads it, then cannot
    # start a run. (MLflow itself makes a folder named `file:` in the working directory.)
    store = tmp_path / "store.db"
    shutil.copy(Path(finished["uri"].removeprefix("sqlite:///")), store)
    before = md5(store)
    uri = f"sqlite:///file:{store}?mode=ro&uri=true"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    message = refused(monkeypatch, capsys, tmp_path, [*TINY, f"hydra.run.dir={tmp_path / 'out'}"])
    assert message == (f"MLFLOW_TRACKING_URI='{uri}' is not allowed: the MLflow store {store} "
                       "cannot be opened or written (attempt to write a readonly database); "
                       "point MLFLOW_TRACKING_URI at a store you can write, or use tracking=none")
    assert md5(store) == before


def without_root_powers() -> list[str]:
    """A command prefix under which file permissions hold even for root (no CAP_DAC_*)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: read-only files cannot be made so")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_store_without_write_permission(what, tmp_path, finished):
    folder = tmp_path / "store"
    folder.mkdir()
    store = folder / "mlflow.db"
    shutil.copy(Path(finished["uri"].removeprefix("sqlite:///")), store)
    store.chmod(0o444)
    if what == "folder":
        folder.chmod(0o555)
    before = md5(store), store_state(f"sqlite:///{store}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    try:
        done = subprocess.run([*without_root_powers(), sys.executable, "-m", "sweep", *TINY],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2, done.stderr
    reason = f"{folder} is not writable" if what == "folder" else f"{store} is read-only"
    assert done.stderr == (f"sweep: error: MLFLOW_TRACKING_URI='sqlite:///{store}' is not "
                           f"allowed: {reason}; point it at a folder you can write, or use "
                           "tracking=none\n")
    assert (md5(store), store_state(f"sqlite:///{store}")) == before
    assert sorted(os.listdir(tmp_path)) == ["store"]  # no outputs/


@pytest.mark.parametrize(("args", "key"), [
    (["hydra.run.dir={file}/out"], "hydra.run.dir"),
    (["-m", "hydra.sweep.dir={file}/multi", "optimizer.lr=0.1,0.2"], "hydra.sweep.dir"),
    (["trainer.checkpoint.every=1", "trainer.checkpoint.path={file}/ck.pt"],
     "trainer.checkpoint.path"),
])
def test_an_output_folder_that_cannot_exist(args, key, tmp_path, monkeypatch, capsys):
    file = a_file(tmp_path)
    flags = [a for a in args if a.startswith("-")]  # -m first, as typed
    args = [a.format(file=file) for a in args if a not in flags]
    message = refused(monkeypatch, capsys, tmp_path, [*flags, *TINY, "tracking=none", *args])
    assert message.startswith(f"{key}='{file}/") and f"{file} is a file" in message, message
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


# --- what only the data shows: before the output folder and the MLflow run ---------------------

@pytest.mark.parametrize(("args", "message"), [
    (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size=0 is not allowed"),
    (["model=cnn"], "model='cnn' is not allowed: needs images (C, H, W)"),
    (["trainer.loss=cross_entropy"], "trainer.loss='cross_entropy' is not allowed: does not fit"),
    (["optimizer.param_groups=[{pattern: nothing, lr_scale: 0.1}]"],
     "optimizer.param_groups[0].pattern='nothing' matches no parameter"),
    (["dataset=mnist", "dataset.root=/nonexistent/dir", "dataset.archives=null"],
     "dataset.root='/nonexistent/dir': MNIST not found offline"),
])
def test_what_only_the_data_shows_is_refused_before_a_run_is_opened(
        args, message, tmp_path, finished, monkeypatch, capsys):
    base = ["model=mlp", *TRAINER] if any(a.startswith("dataset=") for a in args) else TINY
    line = refused_unchanged(monkeypatch, capsys, tmp_path, finished, args, base=base)
    assert line.startswith(message), line
    assert not (tmp_path / "outputs").exists()


def test_a_study_refuses_what_only_the_data_shows_before_any_trial(tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, tmp_path, ["study=tiny", "model=cnn",
                   "dataset=synthetic_regression", "tracking=none"], module=study_main)
    assert line.startswith("model='cnn' is not allowed: needs images (C, H, W)"), line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(not (ARCHIVES / "MNIST").is_dir(), reason=f"no archives in {ARCHIVES}")
def test_a_dataset_root_that_cannot_be_a_folder(tmp_path, monkeypatch, capsys):
    root = a_file(tmp_path) / "data"
    line = refused(monkeypatch, capsys, tmp_path, [
        "model=mlp", "dataset=mnist", f"dataset.root={root}", f"dataset.archives={ARCHIVES}",
        "tracking=none", f"hydra.run.dir={tmp_path / 'out'}"])
    assert line.startswith(f"dataset.root='{root}': cannot extract train-images-idx3"), line


# --- what the config alone shows: before the output folder -------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["model.bn=foo"], "model.bn='foo' is not allowed: choose one of none, pre, post"),
    (["model.activation=nope"], "model.activation='nope' is not allowed: choose one of tanh"),
    (["model.hidden=[]"], "model.hidden=[] is not allowed: a non-empty list of integer layer "
                          "widths >= 1"),
    (["model.hidden=4"], "model.hidden=4 is not allowed: a non-empty list"),
    (["model.bias=maybe"], "model.bias='maybe' is not allowed: true or false"),
    (["+model.width=4"], "model.width=4 is not allowed: sweep.models.mlp takes only hidden"),
    (["model._target_=sweep.models.nope"], "model._target_='sweep.models.nope' is not allowed"),
    (["model=cnn", "model.channels=[]"], "model.channels=[] is not allowed"),
    (["model=cnn", "model.dropout=1"], "model.dropout=1 is not allowed: must be in [0, 1)"),
    (["model=resnet18", "model.small_input=2"], "model.small_input=2 is not allowed"),
    (["dataset.n_samples=-1"], "dataset.n_samples=-1 is not allowed: must be an integer >= 2"),
    (["+dataset.n_sample=10"], "dataset.n_sample=10 is not allowed: "
                               "sweep.data.synthetic_regression takes only n_samples"),
    (["dataset=mnist", "dataset.train_size=0"], "dataset.train_size=0 is not allowed"),
    (["dataset=digits", "dataset.augment={crop_padding: -1}"],
     "dataset.augment.crop_padding=-1 is not allowed"),
    (["trainer.epochs=0"], "trainer.epochs=0 is not allowed: must be an integer >= 1"),
    (["fuse=0"], "fuse=0 is not allowed: auto (up to 64 compatible runs trained at once), 1"),
    (["fuse=many"], "fuse='many' is not allowed: auto"),
])
def test_bad_model_and_dataset_values_are_refused_before_anything_exists(
        args, message, tmp_path, monkeypatch, capsys):
    base = ["model=mlp", *TRAINER] if any(a.startswith("dataset=") for a in args) else TINY
    line = refused(monkeypatch, capsys, tmp_path, [*base, *args])
    assert line.startswith(message), line
    assert os.listdir(tmp_path) == []  # no mlflow.db, no outputs/


def test_validation_builds_and_loads_nothing():
    # The check of an image dataset reads no file: the root does not exist and none is made.
    cfg = compose(["dataset=mnist", "dataset.root=/nonexistent/dir", "model=resnet18"])
    validate(cfg)
    assert not Path("/nonexistent/dir").exists()
    with pytest.raises(ConfigError, match=r"^model.hidden=\[\] is not allowed"):
        validate(compose(["model=mlp", "model.hidden=[]"]))


@pytest.mark.parametrize(("module", "args", "message"), [
    ("sweep", ["trainer.epochs=0"], "trainer.epochs=0 is not allowed"),
    ("sweep.study", ["study.trials=0"], "study.trials=0 is not allowed"),
])
def test_the_commands_create_nothing_for_a_refused_value(module, args, message, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(f"sweep: error: {message}") and done.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []  # no outputs/<date>/<time>/.hydra, no mlflow.db


@pytest.mark.parametrize(("module", "args", "message"), [
    ("sweep.lr_find", ["lr_find.steps=1"], "lr_find.steps=1 is not allowed"),
    ("sweep.sensitivity", ["sensitivity.lrs=[]"], "sensitivity.lrs=[] is not allowed"),
    ("sweep.sensitivity", ["fuse=-2"], "fuse=-2 is not allowed"),
    ("sweep.report", ["report.format=pdf"], "report.format='pdf' is not allowed"),
    ("sweep.study", ["study.schedules=[]"], "study.schedules=[] is not allowed"),
    ("sweep.study", ["model.bn=foo"], "model.bn='foo' is not allowed"),
])
def test_every_app_checks_before_its_output_folder(module, args, message, tmp_path,
                                                   monkeypatch, capsys):
    app = importlib.import_module(module).main
    line = refused(monkeypatch, capsys, tmp_path, ["model=mlp", *args], module=app)
    assert line.startswith(message), line
    assert os.listdir(tmp_path) == []


# --- composing -----------------------------------------------------------------------------------

def test_an_experiments_top_level_keys_win():
    assert compose(["experiment=bn_sensitivity"]).seed == 929
    assert compose(["experiment=bn_sensitivity", "seed=3"]).seed == 3
    assert compose([]).seed == 0


def test_composing_inside_a_running_hydra_keeps_its_job_name():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), job_name="study", version_base="1.3"):
        compose(["trainer.epochs=1"])
        assert JobRuntime.instance().get("name") == "study"
        # What a multirun's later jobs are composed with.
        later = GlobalHydra.instance().hydra.compose_config(
            "config", ["seed=1"], run_mode=RunMode.MULTIRUN)
        assert later.hydra.job.name == "study"


def test_override_text_of_none_is_hydras_null():
    assert override_text(None) == "null"
    assert compose([f"trainer.resume={override_text(None)}"]).trainer.resume is None
