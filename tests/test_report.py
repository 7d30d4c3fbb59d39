"""The schedule-comparison report: the noise test on constructed numbers, and a report written
from a tiny study's runs in a real MLflow store (made here with the tags `sweep.study` uses)."""

import math
import sys

import mlflow
import pytest

from sweep.config import ConfigError, compose
from sweep.report import compare, main, write_report
from sweep.track import mlflow_run
from sweep.train import train

# --- is a difference larger than the seed-to-seed noise? -----------------------------------------


def test_a_consistent_gap_over_seeds_is_larger_than_the_noise():
    leader = {1: 0.10, 2: 0.12, 3: 0.11}  # val_mse by seed: lower is better
    c = compare(leader, {1: 0.20, 2: 0.23, 3: 0.21}, maximize=False)
    assert c.test == "paired t-test" and c.n == 3
    assert c.diff == pytest.approx(0.103, abs=1e-3)
    assert 0 < c.low < c.diff < c.high and c.p < 0.05 and c.beyond_noise


def test_a_gap_smaller_than_the_seed_spread_is_noise():
    c = compare({1: 0.10, 2: 0.12, 3: 0.11}, {1: 0.09, 2: 0.14, 3: 0.12}, maximize=False)
    assert c.low < 0 < c.high and not c.beyond_noise


def test_pairing_by_seed_sees_a_small_gap_that_large_seed_effects_would_hide():
    # Seeds matter far more than the schedule, but within each seed the leader is always better.
    leader = {1: 0.90, 2: 0.70, 3: 0.50, 4: 0.80}  # val_acc: higher is better
    other = {1: 0.88, 2: 0.69, 3: 0.48, 4: 0.79}
    assert compare(leader, other, maximize=True).beyond_noise
    unpaired = compare(leader, {s + 10: v for s, v in other.items()}, maximize=True)
    assert unpaired.test == "Welch t-test" and not unpaired.beyond_noise


def test_one_seed_gives_no_noise_estimate():
    c = compare({1: 0.1}, {1: 0.5}, maximize=False)
    assert c.test == "too few seeds" and math.isnan(c.p) and not c.beyond_noise


# --- a report from the runs in a store ----------------------------------------------------------

TINY = ["model=mlp", "model.hidden=[4,4]", "dataset=synthetic_regression", "optimizer=sgd",
        "optimizer.momentum=0", "trainer.epochs=3", "trainer.batch_size=50",
        "trainer.progress=false"]


def tracked_run(overrides: list[str], tags: dict[str, str], out) -> None:
    cfg = compose([*TINY, *overrides])
    with mlflow_run(cfg, nested=True, tags=tags) as tracker:
        result = train(cfg, tracker=tracker, output_dir=out)
        tracker.set_tags({"status": result.status})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Study `tiny`: cosine (lr 0.05) and constant (lr 1e-4, barely learns) confirmed over two
    seeds each, plus trials; `step` has only a trial, and no `schedule` tag."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.chdir(tmp)  # the default output folder, outputs/report/<study>, lands here
        with mlflow_run(compose(TINY), run_name_="study-tiny",
                        tags={"role": "study", "study": "tiny"}) as parent:
            for schedule, lr in (("cosine", 0.05), ("constant", 1e-4)):
                for seed in (1, 2):
                    tracked_run([f"scheduler={schedule}", f"optimizer.lr={lr}", f"seed={seed}"],
                                {"role": "confirm", "study": "tiny", "schedule": schedule,
                                 "seed": str(seed)}, tmp)
            tracked_run(["scheduler=cosine", "optimizer.lr=1e-4"],  # a bad trial: not reported
                        {"role": "trial", "study": "tiny", "schedule": "cosine"}, tmp)
            tracked_run(["scheduler=step", "optimizer.lr=0.01"], {"role": "trial"}, tmp)
        yield tmp, parent.run_id


def settings(*overrides: str):
    return compose(list(overrides), "report")


def test_markdown_report_from_the_store(store, tmp_path):
    _, parent_id = store
    report = write_report(settings("report.study=tiny"), tmp_path)
    assert report.path == tmp_path / "report.md"
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "curves.png", "lr.png"}
    text = report.path.read_text()
    # Ranked by the confirmation runs' mean final val_mse; step falls back to its best trial.
    assert [r.schedule for r in report.ranked] == ["cosine", "step", "constant"]
    cosine, step, constant = report.ranked
    assert [r.seed for r in cosine.runs] == [1, 2] and cosine.source == "confirmation runs"
    assert step.source == "best trial (no confirmation runs)" and len(step.runs) == 1
    assert constant.settings == {"optimizer.lr": "0.0001"}
    assert step.settings.keys() == {"optimizer.lr", "scheduler.gamma", "scheduler.step_size"}
    stored = mlflow.MlflowClient().get_metric_history(cosine.runs[0].run_id, "val_mse")
    assert cosine.runs[0].final == max(stored, key=lambda m: m.step).value
    assert report.target == pytest.approx(constant.mean)  # default: the worst schedule's mean
    assert all(e is not None for e in cosine.to_target)  # the leader reaches that level
    assert constant.comparison.test == "paired t-test" and constant.comparison.diff > 0
    assert report.sentence.startswith("cosine ranks first (val_mse ")
    for piece in (report.sentence, "| cosine | lr=0.05 | 2 |", "| 3 | constant | +",
                  "paired t-test, n=2", "![curves.png](curves.png)", parent_id):
        assert piece in text
    logged = mlflow.MlflowClient().list_artifacts(parent_id, "report")
    assert {a.path for a in logged} == {"report/report.md", "report/curves.png", "report/lr.png"}


def test_html_report_is_one_self_contained_page(store, tmp_path):
    _, parent_id = store
    report = write_report(settings(f"report.study={parent_id}", "report.format=html",
                                   "report.log=false"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    page = report.path.read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    assert "cosine ranks first" in page


def test_an_unknown_study_names_the_ones_there(store, tmp_path):
    with pytest.raises(ConfigError, match="no such study.*studies there: tiny"):
        write_report(settings("report.study=nope"), tmp_path)


def run_app(monkeypatch, args: list[str]) -> None:
    """`python -m sweep.report <args>`, in this process."""
    monkeypatch.setattr(sys, "argv", ["sweep.report", *args])
    main()


def test_the_command_writes_to_outputs_report_study_and_runs_as_a_multirun(store, monkeypatch,
                                                                           capsys):
    tmp, _ = store  # the working directory
    run_app(monkeypatch, ["study=tiny", "report.log=false"])  # the study group names it
    assert (tmp / "outputs" / "report" / "tiny" / "report.md").exists()
    assert "cosine ranks first" in capsys.readouterr().out
    run_app(monkeypatch, ["-m", "report.study=tiny", "report.format=md,html", "report.log=false",
                          f"hydra.sweep.dir={tmp / 'multi'}"])
    assert (tmp / "multi" / "0" / "report.md").exists()
    assert (tmp / "multi" / "1" / "report.html").exists()


def test_the_command_refuses_a_bad_setting_before_reading_mlflow(store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never reached
    with pytest.raises(SystemExit) as exit_:
        run_app(monkeypatch, ["report.study=tiny", "report.format=pdf"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "sweep: error: report.format='pdf' is not allowed: choose one of md, html\n")
