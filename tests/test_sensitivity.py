"""Sensitivity studies: the measures and the conclusion on constructed numbers, and a tiny BN study
run for real, whose figures, tables and conclusion come from the runs in the MLflow store."""

import math
import sys

import mlflow
import pytest
from hydra.errors import ConfigCompositionException

from sweep.config import ConfigError, compose
from sweep.sensitivity import Point, conclusion, main, run_study, summarize

LRS = [0.1, 0.03, 0.01, 0.005]


def runs(variant: str, value: str, finals: dict[float, list[float]]) -> list[Point]:
    """Grid points whose final loss per lr (one entry per seed) is given; inf = diverged."""
    return [Point(variant, value, lr, seed, "diverged" if math.isinf(f) else "completed",
                  [10.0, f])
            for lr, per_seed in finals.items() for seed, f in enumerate(per_seed)]


# Final training losses over two seeds: a U-shaped curve that varies over a decade and a half,
# and a flat one that is good at every lr.
VARIES = {0.1: [5.0, 6.0], 0.03: [1.0, 1.1], 0.01: [0.30, 0.32], 0.005: [0.8, 0.9]}
FLAT = {0.1: [0.20, 0.21], 0.03: [0.18, 0.20], 0.01: [0.20, 0.19], 0.005: [0.25, 0.24]}


def test_measures_of_a_single_seed_curve():
    [s] = summarize(runs("mlp3", "none", {0.1: [8.0], 0.03: [1.0], 0.01: [1.5], 0.005: [4.0]}),
                    margin=2.0)
    assert s.lrs == sorted(LRS)
    assert (s.best_lr, s.best_loss) == (0.03, pytest.approx(1.0))
    assert s.lr_spread == pytest.approx(math.log10(8))     # worst 8 / best 1
    assert s.good_lrs == [0.01, 0.03]                       # within 2x of the best
    assert s.good_range == pytest.approx(math.log10(3))
    assert s.lr_spread_se == 0 and math.isnan(s.seed_spread)  # one seed: no error bars


def test_conclusion_says_bn_made_the_model_less_sensitive_when_it_flattens_the_curve():
    summaries = summarize(runs("mlp3", "none", VARIES) + runs("mlp3", "pre", FLAT), 2.0)
    text = conclusion(summaries, "model.bn", ["none", "pre"])
    assert text.startswith("Here model.bn=pre made the model less sensitive to the learning rate "
                           "than model.bn=none (mlp3:")
    assert "2 seeds" in text


def test_conclusion_says_bn_made_the_models_more_sensitive_when_it_spreads_the_curve():
    summaries = summarize(runs("mlp3", "none", FLAT) + runs("mlp3", "pre", VARIES)
                          + runs("mlp4", "none", FLAT) + runs("mlp4", "pre", VARIES), 2.0)
    text = conclusion(summaries, "model.bn", ["none", "pre"])
    assert "model.bn=pre made the models more sensitive to the learning rate" in text
    assert "mlp3: final train_loss varied 1.25 ± 0.04 vs 0.11 ± 0.02 decades" in text
    assert "good-lr range 0.00 vs 1.30 decades" in text and "mlp4:" in text


def test_no_verdict_when_the_difference_is_within_the_seed_noise():
    noisy = {0.1: [0.5, 2.0], 0.01: [0.3, 1.2]}
    similar = {0.1: [0.6, 2.2], 0.01: [0.25, 1.0]}
    summaries = summarize(runs("mlp3", "none", noisy) + runs("mlp3", "pre", similar), 2.0)
    assert "made no clear difference" in conclusion(summaries, "model.bn", ["none", "pre"])


def test_diverging_at_some_lr_counts_as_more_sensitive_and_mixed_results_are_said_so():
    diverges = {**FLAT, 0.1: [math.inf, 0.2]}
    summaries = summarize(runs("mlp3", "none", FLAT) + runs("mlp3", "pre", diverges)
                          + runs("mlp4", "none", VARIES) + runs("mlp4", "pre", FLAT), 2.0)
    text = conclusion(summaries, "model.bn", ["none", "pre"])
    assert text.startswith("Here, compared with model.bn=none, model.bn=pre had mixed effects: "
                           "it made mlp3 more sensitive to the learning rate and made mlp4 less "
                           "sensitive to the learning rate (mlp3: ")
    assert "varied inf" in text


# --- a tiny real study ---------------------------------------------------------------------------

TINY = ["experiment=bn_sensitivity", "trainer.epochs=3", "sensitivity.lrs=[0.1,0.01]",
        "sensitivity.seeds=[1,2]", "~sensitivity.models.mlp4"]  # one depth of the experiment's two


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny study (1 depth x BN none/pre x 2 lrs x 2 seeds = 8 runs) in a fresh store."""
    tmp = tmp_path_factory.mktemp("sensitivity")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        result = run_study(TINY, tmp / "out")
        yield result, tmp


def test_tiny_study_writes_figures_tables_and_conclusion(study):
    result, tmp = study
    assert {p.name for p in (tmp / "out").iterdir()} >= {
        "lr_panels.png", "lr_curve.png", "sensitivity.md", "runs.csv"}
    report = (tmp / "out" / "sensitivity.md").read_text()
    assert result.conclusion in report and "model.bn=pre made" in result.conclusion
    assert "| mlp3 bn=none |" in report and "| mlp3 bn=pre |" in report
    assert len(result.points) == 8 and len(result.summaries) == 2


def test_tiny_study_is_analysed_from_the_runs_in_the_store(study):
    result, _ = study
    client = mlflow.MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["conclusion"] == result.conclusion
    assert parent.data.params["sensitivity.name"] == "bn_sensitivity"  # the experiment's block
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert artifacts == {"plots/lr_panels.png", "plots/lr_curve.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 8
    assert mlflow.get_experiment(parent.info.experiment_id).name == "bn_sensitivity"
    # Each point's final loss is the last train_loss its run logged; its run trained its values.
    for point in result.points:
        history = client.get_metric_history(point.run_id, "train_loss")
        assert point.final == max(history, key=lambda m: m.step).value
        run = client.get_run(point.run_id).data
        assert (run.tags["value"], float(run.tags["lr"]), int(run.tags["seed"])) == (
            point.value, point.lr, point.seed)
        assert (run.params["model.bn"], float(run.params["optimizer.lr"]),
                int(run.params["seed"]), run.params["model.hidden"]) == (
            point.value, point.lr, point.seed, "[4, 4, 4]")


def test_a_stored_study_can_be_analysed_again_without_training(study, tmp_path):
    result, tmp = study
    again = run_study([*TINY, f"sensitivity.from_run={result.parent_run_id}"], tmp_path)
    assert again.conclusion == result.conclusion
    assert [p.run_id for p in again.points] == [p.run_id for p in result.points]


def test_unknown_settings_and_bad_values_fail_before_training(tmp_path):
    with pytest.raises(ConfigCompositionException, match="sensitivity.lr"):
        compose(["experiment=bn_sensitivity", "sensitivity.lr=[0.1]"], "sensitivity")
    with pytest.raises(ConfigError, match="at least two values"):
        run_study(["experiment=bn_sensitivity", "sensitivity.values=[pre]"], tmp_path)
    with pytest.raises(ConfigError, match=r"sensitivity.values='nope' .*model/nope"):
        run_study(["model=mlp", "sensitivity.factor=model", "sensitivity.values=[mlp,nope]"],
                  tmp_path)
    with pytest.raises(ConfigError, match=r"sensitivity.models.x=\['model.hiddn=3'\]"):
        run_study(["model=mlp", "+sensitivity.models.x=['model.hiddn=3']"], tmp_path)


def run_app(monkeypatch, args: list[str]) -> None:
    """`python -m sweep.sensitivity <args>`, in this process."""
    monkeypatch.setattr(sys, "argv", ["sweep.sensitivity", *args])
    main()


@pytest.mark.parametrize(("override", "message"), [
    ("sensitivity.lrs=[]", "sensitivity.lrs=[] is not allowed: a non-empty list of learning "
                           "rates > 0"),
    ("sensitivity.factor=model.bnn", "sensitivity.factor='model.bnn' is not allowed: a key of "
                                     "the config"),
    ("sensitivity.from_run=abc", "sensitivity.from_run='abc' is not allowed: needs tracking"),
])
def test_the_command_refuses_bad_settings_before_any_run(override, message, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SystemExit) as exit_:
        run_app(monkeypatch, ["model=mlp", "tracking=none", override,
                              f"hydra.run.dir={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sweep: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists()


def test_any_config_key_can_be_the_factor_even_without_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default MLflow store would be here
    run_app(monkeypatch, [
        "model=mlp", "dataset=synthetic_regression", "scheduler=constant", "trainer.epochs=2",
        "trainer.progress=false", "tracking=none", "sensitivity.factor=optimizer.momentum",
        "sensitivity.values=[0,0.9]", "sensitivity.lrs=[0.01,0.001]", "sensitivity.seeds=[1]",
        "hydra.run.dir=out"])
    out = capsys.readouterr().out
    conclusion_line = out.splitlines()[-2]
    assert "optimizer.momentum=0.9" in conclusion_line
    assert conclusion_line.endswith("1 seed, so no error bars).")
    assert "MLflow" not in out and not (tmp_path / "mlflow.db").exists()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "lr_panels.png", "lr_curve.png", "sensitivity.md", "runs.csv", ".hydra",
        "sensitivity.log"}  # ours, in Hydra's output folder with its own
    rows = (tmp_path / "out" / "runs.csv").read_text().splitlines()[1:]
    assert [tuple(r.split(",")[:4]) for r in rows] == [
        ("model", "0", "0.001", "1"), ("model", "0", "0.01", "1"),
        ("model", "0.9", "0.001", "1"), ("model", "0.9", "0.01", "1")]
