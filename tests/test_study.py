"""`python -m sweep.study` on tiny real studies: storage, MLflow, resume, pruning, workers."""

import math
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from contextlib import closing
from importlib.util import find_spec

import mlflow
import optuna
import pytest
from conftest import TINY_STUDY
from omegaconf import OmegaConf
from optuna.trial import TrialState

from sweep.config import ConfigError, compose
from sweep.lr_find import suggest_lr_bounds
from sweep.report import write_report
from sweep.study import main, make_plan, run_study
from sweep.study_optuna import counts, grid_values, make_pruner, trial_state
from sweep.study_plan import knob_overrides, with_values
from sweep.study_worker import Worker


def studies_in(out_dir, name="tiny", schedules=("step", "cosine")):
    storage = f"sqlite:///{out_dir / 'optuna.db'}"
    return {s: optuna.load_study(study_name=f"{name}/{s}", storage=storage) for s in schedules}


def finished(study):
    return {t.number: t.params for t in study.trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


@pytest.fixture(scope="module")
def tracked(module_mlflow_uri, tmp_path_factory):
    """The tiny study with MLflow and plots, run twice: the second invocation must resume."""
    out = tmp_path_factory.mktemp("study") / "tiny"
    argv = [*TINY_STUDY, f"study.output_dir={out}"]
    first = run_study(argv)
    before = {s: finished(study) for s, study in studies_in(out).items()}
    second = run_study(argv)
    return {"out": out, "argv": argv, "first": first, "second": second, "before": before}


def test_the_storage_holds_every_schedules_trials(tracked):
    for schedule, study in studies_in(tracked["out"]).items():
        assert len(finished(study)) == 2, schedule
        assert {trial_state(t) for t in study.trials} <= {"complete", "pruned", "diverged"}
        assert all(t.user_attrs["overrides"][0].startswith("optimizer.lr=") for t in study.trials)


def test_a_second_invocation_resumes_without_rerunning_finished_trials(tracked):
    after = {s: finished(study) for s, study in studies_in(tracked["out"]).items()}
    assert after == tracked["before"]
    # The confirmation runs are cached too: the same table comes back.
    first, second = tracked["first"], tracked["second"]
    assert [(r.schedule, r.values) for r in first.rows] == [
        (r.schedule, r.values) for r in second.rows]


def test_mlflow_holds_a_parent_with_nested_trials_and_the_summary(tracked):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("sweep")
    parents = client.search_runs([experiment.experiment_id],
                                 "tags.role = 'study' and tags.study = 'tiny'")
    assert len(parents) == 1  # the second invocation reopened it
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = [r for r in children if r.data.tags["role"] == "trial"]
    confirms = [r for r in children if r.data.tags["role"] == "confirm"]
    assert len(trials) == 4 and len(confirms) == 2 * 2  # 2 schedules x 2 seeds
    for run in trials:
        assert run.data.tags["state"] in ("complete", "pruned", "diverged")
        assert "optuna.trial" in run.data.tags and "optimizer.lr" in run.data.params
        assert len(client.get_metric_history(run.info.run_id, "val_mse")) >= 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary.csv", "comparison.html", "plots", "best_overrides"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    # Optuna's plots one schedule at a time; the comparison's curves with every seed's lr.
    assert {"plots/history_step.png", "plots/history_cosine.png", "plots/best_curves.png",
            "plots/best_lr.png"} <= plots
    assert parent.data.tags["leaders"] == ", ".join(tracked["first"].leaders)


def test_the_study_summary_and_the_report_name_the_same_leaders(tracked, tmp_path):
    summary = tracked["first"]
    report = write_report(compose(["study=tiny", "report.log=false"], "report"), tmp_path)
    assert report.comparison.leaders == summary.leaders and summary.leaders
    assert report.comparison.winner == summary.winner
    assert report.sentence == summary.verdict  # one pipeline, one sentence
    for ours, theirs in zip(summary.comparison.groups, report.comparison.groups, strict=True):
        assert (ours.name, ours.values) == (theirs.name, theirs.values)
        assert ours.to_target == theirs.to_target
        assert theirs.runs[0].steps_per_epoch == ours.runs[0].steps_per_epoch == 3
    text = (tracked["out"] / "summary.md").read_text()
    assert summary.verdict in text and "p (Holm)" in text


def test_the_best_configuration_is_saved_as_a_command_python_m_sweep_reruns(tracked):
    out, summary = tracked["out"], tracked["first"]
    for row in summary.rows:
        words = shlex.split((out / "best_overrides" / f"{row.schedule}.txt").read_text())
        assert words[:3] == ["python", "-m", "sweep"]
        cfg = compose(words[3:])  # what `python -m sweep` composes: conf/config.yaml
        best = studies_in(out)[row.schedule].trials[row.best_trial]
        assert cfg.choices.scheduler == row.schedule and cfg.trainer.epochs == 2
        assert cfg.optimizer.lr == best.params["optimizer.lr"]  # exactly what the trial trained
    assert "| schedule |" in (out / "summary.md").read_text()


def test_a_raised_budget_runs_only_the_missing_trials(tmp_path):
    argv = [*TINY_STUDY, "tracking=none", "study.plots=false", "study.schedules=[cosine]",
            "study.seeds=[1]", f"study.output_dir={tmp_path}"]
    run_study(argv)
    before = finished(studies_in(tmp_path, schedules=["cosine"])["cosine"])
    run_study([*argv, "study.trials=3"])
    after = finished(studies_in(tmp_path, schedules=["cosine"])["cosine"])
    assert len(after) == 3 and {n: after[n] for n in before} == before


def test_a_trial_left_running_by_a_killed_run_is_run_again(tmp_path):
    # Killed before its first heartbeat: judged by its start time, after the grace period.
    argv = [*TINY_STUDY, "tracking=none", "study.plots=false", "study.schedules=[cosine]",
            "study.seeds=[1]", f"study.output_dir={tmp_path}", "study.heartbeat_interval=1",
            "study.grace_period=2"]
    study = optuna.create_study(study_name="tiny/cosine", direction="minimize",
                                storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.ask()  # a trial whose process was killed: RUNNING forever

    run_study(argv)
    trials = studies_in(tmp_path, schedules=["cosine"])["cosine"].trials
    assert trials[0].state == TrialState.FAIL and trial_state(trials[0]) == "interrupted"
    assert len(finished(studies_in(tmp_path, schedules=["cosine"])["cosine"])) == 2


@pytest.mark.parametrize("pruner", ["median", "halving", "hyperband"])
def test_each_pruner_stops_a_trial_far_behind_the_others(pruner):
    settings = {"pruner": pruner, "prune_after": 2, "warmup_epochs": 1, "reduction_factor": 3}
    study = optuna.create_study(direction="maximize", pruner=make_pruner(settings, epochs=2))
    for _ in range(3):  # three good trials, each reporting like the trainer's callback does
        good = study.ask()
        for epoch in (1, 2):
            good.report(0.9, epoch)
            good.should_prune()
        study.tell(good, 0.9)
    bad = study.ask()
    bad.report(0.1, 1)
    assert bad.should_prune()


def test_a_study_prunes_a_hopeless_trial_of_its_schedule(tmp_path):
    argv = [*TINY_STUDY, "tracking=none", "study.plots=false", "study.schedules=[cosine]",
            "study.trials=3", "study.prune_after=2", "study.warmup_epochs=1", "study.seeds=[1]",
            f"study.output_dir={tmp_path}"]
    study = optuna.create_study(study_name="tiny/cosine", direction="minimize",
                                storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for lr in (0.05, 0.05, 1e-4):  # the last barely moves: far behind after one epoch
        study.enqueue_trial({"optimizer.lr": lr})

    summary = run_study(argv)
    states = [trial_state(t) for t in studies_in(tmp_path, schedules=["cosine"])["cosine"].trials]
    assert states == ["complete", "complete", "pruned"]
    assert summary.rows[0].tally["pruned"] == 1


def test_a_diverging_lr_and_a_raising_trial_are_recorded_and_the_study_goes_on(tmp_path):
    argv = [*TINY_STUDY, "tracking=none", "study.plots=false", "study.schedules=[step]",
            "study.trials=3", "study.pruner=none", "study.seeds=[1]",
            f"study.output_dir={tmp_path}"]
    study = optuna.create_study(study_name="tiny/step", direction="minimize",
                                storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.enqueue_trial({"optimizer.lr": 50.0})     # blows up in the first epoch
    study.enqueue_trial({"scheduler.gamma": 1.5})   # the schedule refuses it: the trial raises
    study.enqueue_trial({"optimizer.lr": 0.05})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns that the values are outside the space
        summary = run_study(argv)

    trials = studies_in(tmp_path, schedules=["step"])["step"].trials
    assert [trial_state(t) for t in trials] == ["diverged", "failed", "complete"]
    assert trials[0].state == TrialState.COMPLETE and trials[0].value >= trials[2].value
    assert trials[1].state == TrialState.FAIL and "scheduler.gamma" in trials[1].user_attrs["error"]
    assert summary.rows[0].best_trial == 2
    assert summary.rows[0].tally == {"complete": 1, "pruned": 0, "diverged": 1, "failed": 1}


def test_a_larger_budget_asks_for_trials_in_rounds_and_trains_each_round_fused(mlflow_uri,
                                                                               tmp_path):
    argv = [*TINY_STUDY, "study.plots=false", "study.schedules=[cosine,step]", "study.trials=8",
            "study.seeds=[1,2]", f"study.output_dir={tmp_path}"]
    summary = run_study(argv)

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    for schedule, study in studies_in(tmp_path, schedules=["cosine", "step"]).items():
        assert len(finished(study)) == 8  # 4 rounds of 2 (study.trials / SEARCH_ROUNDS)
        assert len({t.params["optimizer.lr"] for t in study.trials}) == 8  # no repeats
        trials = [r for r in runs if r.data.tags.get("role") == "trial"
                  and r.data.tags["schedule"] == schedule]
        assert {r.data.tags["fused"] for r in trials} == {"2"}
        for run in trials:  # each its own trial, and its own run that says how it ended
            trial = study.trials[int(run.data.tags["optuna.trial"])]
            assert run.data.tags["state"] == trial_state(trial)
            assert float(run.data.params["optimizer.lr"]) == trial.params["optimizer.lr"]
    # The confirmations: both schedules' best, 2 seeds each, one fused group of 4.
    confirms = [r for r in runs if r.data.tags.get("role") == "confirm"]
    assert sorted(r.data.tags["fused"] for r in confirms) == ["4"] * 4
    assert len(summary.rows) == 2


def test_two_workers_complete_the_budget_together_with_distinct_trials(module_mlflow_uri,
                                                                        tmp_path):
    argv = [*TINY_STUDY, "study.plots=false", "study.schedules=[cosine]", "study.trials=4",
            "study.workers=2", "study.seeds=[1]", "study.name=pair",
            f"study.output_dir={tmp_path}"]
    run_study(argv)

    # Both processes worked on the one SQLite storage (WAL lets them share it).
    trials = studies_in(tmp_path, name="pair", schedules=["cosine"])["cosine"].trials
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 4 and len({t.number for t in done}) == 4
    assert all(trial_state(t) in ("complete", "pruned", "surplus") for t in trials)
    # Both workers' trials are children of the study's one MLflow run.
    client = mlflow.MlflowClient()
    parent = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                                "tags.role = 'study' and tags.study = 'pair'")[0]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                  "tags.role = 'trial'")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(
        t.number for t in trials if trial_state(t) != "surplus")


def test_workers_racing_for_the_last_slot_leave_exactly_one_trial(tmp_path):
    argv = [*TINY_STUDY, "tracking=none", "study.schedules=[cosine]",
            f"study.output_dir={tmp_path}"]
    plan = make_plan(compose(argv, "sweep"), argv)
    workers = [Worker(plan) for _ in range(4)]  # four processes' connections to one storage
    studies = [optuna.create_study(study_name="tiny/cosine", storage=w.storage,
                                   direction=plan.direction, load_if_exists=True)
               for w in workers]
    start = threading.Barrier(len(workers))
    taken = []

    def race(worker, study):
        start.wait()
        taken.extend(worker.take_slots(study, budget=1, size=2))

    threads = [threading.Thread(target=race, args=pair)
               for pair in zip(workers, studies, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 1
    trials = studies[0].trials
    assert sum(counts(t) for t in trials) == 1  # the winner's, still running
    assert all(trial_state(t) == "surplus" and not t.params for t in trials if not counts(t))


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid", "qmc", "cmaes"])
def test_every_sampler_runs_a_reproducible_study(sampler, tmp_path):
    argv = [*TINY_STUDY, "tracking=none", "study.plots=false", "study.schedules=[step]",
            "study.seeds=[1]", f"study.sampler={sampler}", "study.startup_trials=1"]
    if sampler == "cmaes" and find_spec("cmaes") is None:
        with pytest.raises(ConfigError, match="needs the cmaes package: pip install cmaes"):
            run_study([*argv, f"study.output_dir={tmp_path}"])
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. QMC's warning that it is experimental
        for run in ("a", "b"):
            run_study([*argv, f"study.output_dir={tmp_path / run}"])
    a, b = (studies_in(tmp_path / run, schedules=["step"])["step"] for run in ("a", "b"))
    assert len(finished(a)) == 2 and finished(a) == finished(b)


def trials_started(db) -> int:
    """Read the trial count with plain sqlite: optuna.load_study here could race the study's own
    process creating the schema."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT COUNT(*) FROM trials JOIN studies USING (study_id) "
                               "WHERE study_name = 'tiny/cosine'").fetchone()[0]
    except sqlite3.OperationalError:  # the file or its tables are not there yet
        return 0


def second_trial_training(db) -> bool:
    """Two trials started, and the second has reported at least one epoch."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            reported = con.execute(
                "SELECT COUNT(*) FROM trial_intermediate_values JOIN trials USING (trial_id) "
                "JOIN studies USING (study_id) WHERE study_name = 'tiny/cosine' AND number = 1"
            ).fetchone()[0]
    except sqlite3.OperationalError:  # the file or its tables are not there yet
        return False
    return trials_started(db) == 2 and reported > 0


def test_ctrl_c_loses_only_the_running_trial(tmp_path):
    argv = [*TINY_STUDY, "tracking=none", "study.plots=false", "study.schedules=[cosine]",
            "study.trials=3", "study.pruner=none", "study.seeds=[1]", "study.epochs=200",
            f"study.output_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "sweep.study", *argv], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "optuna.db"
    deadline = time.monotonic() + 120
    # Until the second trial is training (it has reported an epoch), polled often: on a fast
    # machine a trial of this tiny model lasts a few seconds.
    while not second_trial_training(db) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert second_trial_training(db), "never saw the second trial training"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command to resume" in err
    trials = studies_in(tmp_path, schedules=["cosine"])["cosine"].trials
    assert [trial_state(t) for t in trials] == ["complete", "interrupted"]

    run_study([*argv, "study.epochs=2"])  # shorter, to finish quickly: only 2 more trials run
    trials = studies_in(tmp_path, schedules=["cosine"])["cosine"].trials
    assert [trial_state(t) for t in trials] == ["complete", "interrupted", "complete", "complete"]


def test_ctrl_c_between_asking_and_training_leaves_no_trial_running(tmp_path):
    # SIGINT right after a batch of trials is asked (SWEEP_INTERRUPT_AT=asked), before any is
    # sampled: they end interrupted at once, so the next run takes their places without waiting
    # out study.grace_period (60 s) for them.
    argv = [*TINY_STUDY, "tracking=none", "study.plots=false", "study.schedules=[cosine]",
            "study.trials=8", "study.seeds=[1]", f"study.output_dir={tmp_path}"]
    command = [sys.executable, "-m", "sweep.study", *argv]
    interrupted = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "SWEEP_INTERRUPT_AT": "asked"})
    assert interrupted.returncode == 130, interrupted.stderr
    assert "run the same command to resume" in interrupted.stderr
    trials = studies_in(tmp_path, schedules=["cosine"])["cosine"].trials
    assert [trial_state(t) for t in trials] == ["interrupted", "interrupted"]  # one batch: 8 // 4

    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "waiting for" not in resumed.stdout, resumed.stdout
    trials = studies_in(tmp_path, schedules=["cosine"])["cosine"].trials
    assert sum(counts(t) for t in trials) == 8


@pytest.mark.parametrize("overrides, message", [
    (["study.sampler=bayes"], "study.sampler='bayes' is not allowed: choose one of tpe, random"),
    (["study.trials=0"], "study.trials=0 is not allowed: must be an integer >= 1"),
    (["study.lr_bounds=guess"], "study.lr_bounds='guess' is not allowed: choose one of declared"),
    (["study.schedules=[step,nope]"], "study.schedules='nope' is not allowed: choose from"),
    (["~scheduler.search_space"], "study.schedules='step' is not allowed: "
                                  "conf/scheduler/step.yaml declares no search_space"),
])
def test_bad_study_settings_fail_before_training_with_a_clear_message(overrides, message,
                                                                      tmp_path, capsys,
                                                                      monkeypatch):
    argv = [*TINY_STUDY, "tracking=none", f"study.output_dir={tmp_path}", *overrides]
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[")):
        run_study(argv)
    monkeypatch.setattr(sys, "argv", ["sweep.study", *argv])  # the Hydra app, as typed
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and f"sweep: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()


def test_grid_values_span_the_declared_range():
    assert grid_values({"type": "float", "low": 1e-4, "high": 1.0, "log": True}, 3) == \
        pytest.approx([1e-4, 1e-2, 1.0])
    assert grid_values({"type": "int", "low": 1, "high": 5}, 3) == [1, 3, 5]
    assert grid_values({"type": "categorical", "choices": [[30, 80], [50]]}, 3) == ["[30,80]",
                                                                                 "[50]"]
    assert not math.isnan(grid_values({"type": "float", "low": 0.1, "high": 0.9}, 2)[0])


def test_a_trials_values_give_the_config_that_composing_with_them_gives():
    base = ["model=mlp", "scheduler=multistep", "trainer.epochs=8"]
    values = {"optimizer.lr": 0.0123456789012345, "scheduler.gamma": 0.7, "seed": 4,
              "scheduler.milestones": [2, 5]}  # a list choice, as a list
    fast = with_values(compose(base, "sweep"), values)
    composed = compose([*base, *knob_overrides(values)], "sweep")
    assert OmegaConf.to_container(fast, resolve=True) == OmegaConf.to_container(composed,
                                                                                resolve=True)
    assert fast.dataset.seed == 4  # interpolations see the new values
    assert fast.optimizer.lr == 0.0123456789012345  # every digit: the command trains the trial


def test_lr_bounds_auto_sets_every_schedules_lr_range_from_a_range_test(tmp_path):
    argv = [*TINY_STUDY, "tracking=none", f"study.output_dir={tmp_path}", "study.lr_bounds=auto"]
    cfg = compose(argv, "sweep")
    plan = make_plan(cfg, argv)

    low, high = suggest_lr_bounds(cfg)  # the range test is deterministic on the CPU
    assert 0 < low < high
    for space in plan.spaces.values():
        assert space["optimizer.lr"] == {"type": "float", "low": low, "high": high, "log": True}
