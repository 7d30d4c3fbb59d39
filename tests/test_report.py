"""The schedule-comparison report: written from a tiny study's runs in a real MLflow store (made
here with the tags `sweep.study` uses); the statistics themselves are tested in test_compare."""

import sys

import mlflow
import pytest
from conftest import PLAIN_SGD, TINY_MLP

from sweep.config import ConfigError, compose
from sweep.report import main, write_report
from sweep.track import mlflow_run
from sweep.train import train

# --- a report from the runs in a store ----------------------------------------------------------

# All 1000 rows (14 batches an epoch), the data the rankings and gaps checked below came from.
TINY = [*TINY_MLP, *PLAIN_SGD, "dataset.n_samples=1000", "model.hidden=[4,4]", "trainer.epochs=3"]


def tracked_run(overrides: list[str], tags: dict[str, str], out) -> None:
    cfg = compose([*TINY, *overrides])
    with mlflow_run(cfg, nested=True, tags=tags) as tracker:
        result = train(cfg, tracker=tracker, output_dir=out)
        tracker.set_tags({"status": result.status})


@pytest.fixture(scope="module")
def store(module_mlflow_uri, tmp_path_factory):
    """Study `tiny`: cosine (lr 0.05) and constant (lr 1e-4, barely learns) confirmed over two
    seeds each, plus trials; `step` has only a trial, and no `schedule` tag."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
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
    c = report.comparison
    # Ranked by the confirmation runs' mean final val_mse; step falls back to its best trial.
    assert [g.name for g in c.groups] == ["cosine", "step", "constant"]
    cosine, step, constant = c.groups
    assert [r.seed for r in cosine.runs] == [1, 2]
    assert cosine.columns["source"] == "confirmation runs"
    assert step.columns["source"] == "best trial (no confirmation runs)" and len(step.runs) == 1
    assert constant.columns["tuned settings"] == "lr=0.0001"
    assert step.columns["tuned settings"].split() == ["lr=0.01", "gamma=0.5", "step_size=0.25"]
    stored = mlflow.MlflowClient().get_metric_history(cosine.runs[0].run_id, "val_mse")
    assert cosine.runs[0].final == max(stored, key=lambda m: m.step).value
    assert cosine.runs[0].steps_per_epoch == 14  # 700 training samples in batches of 50
    assert c.target == pytest.approx(constant.score.mean)  # default: the worst schedule's mean
    assert all(e is not None for e in cosine.to_target)  # the leader reaches that level
    assert constant.versus.test == "paired t-test" and constant.versus.diff > 0
    assert step.versus.test == "too few seeds"  # one run: no noise estimate against it
    assert report.sentence == c.sentence() and "final val_mse" in report.sentence
    for piece in (report.sentence, "| cosine   | lr=0.05", "confirmation runs",
                  "paired t-test, n=2", "p (Holm)", "![curves.png](curves.png)", parent_id,
                  "Wall-clock time is not shown"):
        assert piece in text
    logged = mlflow.MlflowClient().list_artifacts(parent_id, "report")
    assert {a.path for a in logged} == {"report/report.md", "report/curves.png", "report/lr.png"}


def test_html_report_is_one_self_contained_page(store, tmp_path):
    _, parent_id = store
    report = write_report(settings(f"report.study={parent_id}", "report.format=html",
                                   "report.log=false"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    page = report.path.read_text()
    assert page.count("data:image/png;base64,") == 2 and page.count("<table>") == 2
    assert report.sentence.split(":")[0] in page


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
    out = capsys.readouterr().out
    assert "final val_mse" in out and "report written to" in out
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
