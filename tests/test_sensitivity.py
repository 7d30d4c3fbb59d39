"""Sensitivity studies: the measures and the conclusion on constructed numbers, and a tiny BN study
run for real, whose figures, tables and conclusion come from the runs in the MLflow store."""

import math
import random
import sys

import mlflow
import pytest
from hydra.errors import ConfigCompositionException

from sweep.config import ConfigError, compose
from sweep.sensitivity import main, run_study
from sweep.sensitivity_analysis import Point, conclusion, summarize, tables

LRS = [0.1, 0.03, 0.01, 0.005]
START = 10.0  # every constructed run's loss at initialisation


def runs(variant: str, value: str, finals: dict[float, list[float]], status: str = "completed",
         initial: float | None = START) -> list[Point]:
    """Grid points whose final loss per lr (one entry per seed) is given; inf = diverged."""
    return [Point(variant, value, lr, seed, "diverged" if math.isinf(f) else status,
                  [START * 0.8, f], initial)
            for lr, per_seed in finals.items() for seed, f in enumerate(per_seed)]


def seeds(curve: dict[float, float], n: int, noise: float, rng: random.Random
          ) -> dict[float, list[float]]:
    """`curve` (final loss per lr) as n seeds, each value scaled by its own noise."""
    return {lr: [f * (1 + rng.uniform(-noise, noise)) for _ in range(n)] for lr, f in curve.items()}


# A U-shaped curve over the lrs (good only at 0.01) and a flat one (good everywhere).
VARIES = {0.1: 5.0, 0.03: 1.0, 0.01: 0.3, 0.005: 0.8}
FLAT = {0.1: 0.20, 0.03: 0.18, 0.01: 0.20, 0.005: 0.25}


def test_lr_sensitivity_is_the_mean_gap_to_the_best_lr_with_losses_capped_at_the_start():
    # Seed 0 diverges at lr 0.1: it counts as the loss at initialisation (10), not infinity.
    [s] = summarize(runs("mlp3", "none", {0.1: [math.inf, 8.0], 0.03: [1.0, 1.0],
                                          0.01: [1.5, 1.5], 0.005: [4.0, 12.0]}), margin=2.0)
    # Seed 0: capped 10, 1, 1.5, 4 -> mean 4.125 - best 1; seed 1: 8, 1, 1.5, 10 (12 capped).
    assert s.by_seed == {0: pytest.approx(3.125), 1: pytest.approx(4.125)}
    assert math.isfinite(s.sensitivity.mean) and s.sensitivity.mean == pytest.approx(3.625)
    assert s.sensitivity.low < 3.625 < s.sensitivity.high  # a t interval over the two seeds
    assert (s.best_lr, s.best_loss) == (0.03, pytest.approx(1.0))
    assert s.good_lrs == [0.01, 0.03]  # within 2x of the best mean
    assert s.good_range == pytest.approx(math.log10(3))
    assert s.count("diverged") == 1 and s.learned


def test_a_clear_effect_over_five_seeds_is_found_and_named_with_its_metric():
    rng = random.Random(0)
    points = (runs("mlp3", "none", seeds(VARIES, 5, 0.1, rng))
              + runs("mlp3", "pre", seeds(FLAT, 5, 0.1, rng)))
    text = conclusion(summarize(points, 2.0), "model.bn", ["none", "pre"], "train_eval_loss")
    assert text.startswith("Here model.bn=pre made the model less sensitive to the learning rate "
                           "than model.bn=none. mlp3: LR sensitivity of final train_eval_loss ")
    assert "paired t-test over 5 seeds" in text and "95% CI" in text


def test_noise_over_three_seeds_is_no_clear_difference_and_says_what_would_settle_it():
    rng = random.Random(1)
    points = (runs("mlp3", "none", seeds(VARIES, 3, 0.6, rng))
              + runs("mlp3", "pre", seeds(VARIES, 3, 0.6, rng)))
    text = conclusion(summarize(points, 2.0), "model.bn", ["none", "pre"], "train_eval_loss")
    assert text.startswith("Here model.bn=pre made no clear difference to how sensitive the model "
                           "was to the learning rate")
    assert "paired t-test over 3 seeds" in text
    assert "seeds would settle it" in text or "within rounding" in text


def test_a_model_that_did_not_learn_is_never_called_less_sensitive():
    # Momentum 0.9 sits at its starting loss at every lr: a flat curve, sensitivity ~0, yet it
    # learned nothing. The runs are also tagged stalled in one variant, not in the other.
    rng = random.Random(2)
    stuck = seeds({lr: START * 0.98 for lr in LRS}, 5, 0.01, rng)
    for status in ("completed", "stalled"):
        points = (runs("mlp", "0", seeds(VARIES, 5, 0.1, rng))
                  + runs("mlp", "0.9", stuck, status=status))
        summaries = summarize(points, 2.0)
        assert summaries[1].sensitivity.mean < summaries[0].sensitivity.mean
        text = conclusion(summaries, "optimizer.momentum", ["0", "0.9"], "train_loss")
        assert "less sensitive" not in text and "more sensitive" not in text
        assert text.startswith("No claim about optimizer.momentum=0.9")
        assert ("mlp with momentum=0.9 did not learn at any lr (final train_loss not clearly "
                "below its value at initialisation") in text


def test_mixed_effects_are_said_so_and_one_seed_never_makes_a_claim():
    rng = random.Random(3)
    points = (runs("mlp3", "none", seeds(FLAT, 5, 0.05, rng))
              + runs("mlp3", "pre", seeds(VARIES, 5, 0.05, rng))
              + runs("mlp4", "none", seeds(VARIES, 5, 0.05, rng))
              + runs("mlp4", "pre", seeds(FLAT, 5, 0.05, rng)))
    text = conclusion(summarize(points, 2.0), "model.bn", ["none", "pre"], "val_loss")
    assert text.startswith("Here, compared with model.bn=none, model.bn=pre had mixed effects: it "
                           "made mlp3 more sensitive to the learning rate and made mlp4 less "
                           "sensitive to the learning rate.")
    one = runs("mlp3", "none", {lr: [f] for lr, f in VARIES.items()}) + runs(
        "mlp3", "pre", {lr: [f] for lr, f in FLAT.items()})
    text = conclusion(summarize(one, 2.0), "model.bn", ["none", "pre"], "val_loss")
    assert "made no clear difference" in text and "one seed measures no seed-to-seed noise" in text


def test_tables_name_the_metric_and_the_runs_that_did_not_learn():
    points = runs("mlp3", "none", {lr: [f, f] for lr, f in VARIES.items()}) + runs(
        "mlp3", "pre", {lr: [START, START] for lr in LRS})
    text = tables(summarize(points, 2.0), "model.bn", 2.0, "train_eval_loss")
    assert "LR sensitivity of final train_eval_loss (95% CI over seeds)" in text
    assert "| mlp3 bn=pre  | 0 (0 .. 0)" in text and "| every lr " in text
    assert "| 0.1   | 10.00 " in text  # the cap: no lr is better than where it started
    assert "| 0.1   | 5.000 " in text  # mlp3 bn=none's final at lr 0.1, as the runs ended


# --- a tiny real study ---------------------------------------------------------------------------

TINY = ["experiment=bn_sensitivity", "trainer.epochs=3", "sensitivity.lrs=[0.1,0.01]",
        "sensitivity.seeds=[1,2]", "~sensitivity.models.mlp4"]  # one depth of the experiment's two


@pytest.fixture(scope="module")
def study(module_mlflow_uri, tmp_path_factory):
    """One tiny study (1 depth x BN none/pre x 2 lrs x 2 seeds = 8 runs) in a fresh store."""
    tmp = tmp_path_factory.mktemp("sensitivity")
    return run_study(TINY, tmp / "out"), tmp


def test_tiny_study_writes_figures_tables_and_conclusion(study):
    result, tmp = study
    assert {p.name for p in (tmp / "out").iterdir()} >= {
        "lr_panels.png", "lr_curve.png", "lr_sensitivity.png", "sensitivity.md", "runs.csv"}
    report = (tmp / "out" / "sensitivity.md").read_text()
    assert result.conclusion in report and "model.bn=pre" in result.conclusion
    assert "final train_eval_loss" in result.conclusion  # every sentence names its metric
    assert "| mlp3 bn=none |" in report and "| mlp3 bn=pre  |" in report
    assert "# Learning-rate sensitivity of train_eval_loss" in report
    assert "stands in for the loss at initialisation" not in report  # epoch 0 was measured
    assert len(result.points) == 8 and len(result.summaries) == 2
    assert all(math.isfinite(s.sensitivity.mean) for s in result.summaries)


def test_tiny_study_is_analysed_from_the_runs_in_the_store(study):
    result, _ = study
    client = mlflow.MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["conclusion"] == result.conclusion
    assert parent.data.params["sensitivity.name"] == "bn_sensitivity"  # the experiment's block
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert artifacts == {"plots/lr_panels.png", "plots/lr_curve.png", "plots/lr_sensitivity.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 8
    # The 4 points of each BN value differ only in lr and seed: they trained fused, each its own
    # finished run.
    assert {(c.info.status, c.data.tags["fused"]) for c in children} == {("FINISHED", "4")}
    assert mlflow.get_experiment(parent.info.experiment_id).name == "bn_sensitivity"
    # Each point's final loss is the last train_eval_loss its run logged, and its cap the value
    # at epoch 0; its run trained its values.
    for point in result.points:
        history = {m.step: m.value for m in client.get_metric_history(point.run_id,
                                                                      "train_eval_loss")}
        assert sorted(history) == [0, 1, 2, 3]
        assert (point.initial, point.curve) == (history[0], [history[e] for e in (1, 2, 3)])
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


def test_a_metric_without_an_epoch_0_value_falls_back_to_its_first_and_says_so(study, tmp_path):
    result, _ = study
    train_mode = run_study([*TINY, f"sensitivity.from_run={result.parent_run_id}",
                            "sensitivity.metric=train_loss"], tmp_path / "again")
    assert all(p.initial is None and p.start == p.curve[0] for p in train_mode.points)
    assert "final train_loss" in train_mode.conclusion
    report = (tmp_path / "again" / "sensitivity.md").read_text()
    assert "These runs logged no epoch-0 value of train_loss, so each run's first logged value" \
        in report


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
def test_the_command_refuses_bad_settings_before_any_run(override, message, mlflow_uri,
                                                          tmp_path, monkeypatch, capsys):
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
    assert "optimizer.momentum=0.9" in conclusion_line and "final val_mse" not in out
    # One seed: no noise estimate, so no claim either way (unless a variant did not learn).
    assert ("one seed measures no seed-to-seed noise" in conclusion_line
            or "did not learn at any lr" in conclusion_line)
    assert "MLflow" not in out and not (tmp_path / "mlflow.db").exists()
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "lr_panels.png", "lr_curve.png", "lr_sensitivity.png", "sensitivity.md", "runs.csv",
        ".hydra"}  # ours, in Hydra's output folder with its own
    rows = (tmp_path / "out" / "runs.csv").read_text().splitlines()[1:]
    assert [tuple(r.split(",")[:4]) for r in rows] == [
        ("model", "0", "0.001", "1"), ("model", "0", "0.01", "1"),
        ("model", "0.9", "0.001", "1"), ("model", "0.9", "0.01", "1")]
