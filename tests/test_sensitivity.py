"""Sensitivity studies: the measures and the conclusion on constructed numbers, and a tiny BN study
run for real, whose figures, tables and conclusion come from the runs in the MLflow store."""

import math

import mlflow
import pytest

from sweep.config import ConfigError
from sweep.sensitivity import Point, conclusion, run_study, summarize

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
        "sensitivity.seeds=[1,2]", "sensitivity.models={mlp3:['model.hidden=[4,4,4]']}"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny study (1 depth x BN none/pre x 2 lrs x 2 seeds = 8 runs) in a fresh store."""
    tmp = tmp_path_factory.mktemp("sensitivity")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        result = run_study(TINY, output_dir=tmp / "out")
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
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert artifacts == {"plots/lr_panels.png", "plots/lr_curve.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 8
    assert mlflow.get_experiment(parent.info.experiment_id).name == "bn_sensitivity"
    # Each point's final loss is the last train_loss its run logged.
    for point in result.points:
        history = client.get_metric_history(point.run_id, "train_loss")
        assert point.final == max(history, key=lambda m: m.step).value
        tags = client.get_run(point.run_id).data.tags
        assert (tags["value"], float(tags["lr"]), int(tags["seed"])) == (
            point.value, point.lr, point.seed)


def test_a_stored_study_can_be_analysed_again_without_training(study, tmp_path):
    result, tmp = study
    again = run_study([*TINY, f"sensitivity.from_run={result.parent_run_id}"],
                      output_dir=tmp_path)
    assert again.conclusion == result.conclusion
    assert [p.run_id for p in again.points] == [p.run_id for p in result.points]


def test_unknown_settings_and_too_few_values_fail_before_training():
    with pytest.raises(ConfigError, match="sensitivity.lr is not a sensitivity setting"):
        run_study(["experiment=bn_sensitivity", "sensitivity.lr=[0.1]"])
    with pytest.raises(ConfigError, match="at least two values"):
        run_study(["experiment=bn_sensitivity", "sensitivity.values=[pre]"])


def test_any_config_key_can_be_the_factor_even_without_mlflow(tmp_path):
    result = run_study(["model=mlp", "dataset=synthetic_regression", "scheduler=constant",
                        "trainer.epochs=2", "trainer.progress=false", "tracking=none",
                        "sensitivity.factor=optimizer.momentum", "sensitivity.values=[0,0.9]",
                        "sensitivity.lrs=[0.01,0.001]", "sensitivity.seeds=[1]"],
                       output_dir=tmp_path)
    assert result.parent_run_id is None
    assert [(s.variant, s.value) for s in result.summaries] == [("model", "0"), ("model", "0.9")]
    assert "optimizer.momentum=0.9" in result.conclusion
    assert result.conclusion.endswith("1 seed, so no error bars).")
    assert {p.name for p in tmp_path.iterdir()} == {
        "lr_panels.png", "lr_curve.png", "sensitivity.md", "runs.csv"}
