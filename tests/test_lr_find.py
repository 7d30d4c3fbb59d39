"""The LR range test: where it suggests an lr on a known curve, and a real run end to end."""

import math
import sys

import mlflow
import numpy as np
import pytest
from conftest import PLAIN_SGD, TINY_CNN, TINY_MLP
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sweep import CONF_DIR
from sweep.config import ConfigError, compose
from sweep.lr_find import (
    LRFindResult,
    bounds_from,
    check,
    explosion_start,
    lr_find,
    main,
    settings_of,
    smooth,
    suggest,
    suggest_lr_bounds,
)
from sweep.train import train

# All 1000 rows: 14 batches an epoch, so a range test of 150 steps spans several epochs.
TINY = [*TINY_MLP, *PLAIN_SGD, "dataset.n_samples=1000", "model.hidden=[4,4]", "seed=929"]


def constructed_loss(lrs: np.ndarray) -> np.ndarray:
    """Flat at tiny lrs, falls fastest around lr=1e-3, bottoms out near 0.1, explodes above."""
    x = np.log10(lrs)
    return 2.0 - 1.5 / (1 + np.exp(-3 * (x + 3))) + np.exp(4 * (x + 0.5))


def test_suggestion_lies_on_the_descending_part_of_a_noisy_curve():
    lrs = np.logspace(-6, 1, 200)
    rng = np.random.default_rng(0)
    noisy = constructed_loss(lrs) * (1 + 0.05 * rng.standard_normal(len(lrs)))
    steepest, lr_at_min = suggest(lrs, smooth(noisy, 0.9))

    slope = np.gradient(constructed_loss(lrs), np.log10(lrs))
    descending = lrs[slope < -0.1]  # clearly falling, not the flat start or the explosion
    assert descending.min() <= steepest <= descending.max()
    assert 3e-4 < steepest < 3e-3  # the true steepest point is at 1e-3
    true_min = lrs[np.argmin(constructed_loss(lrs))]
    assert true_min / 3 < lr_at_min < true_min * 3
    # The second suggestion, a tenth of the minimum, is still on the falling part too.
    assert np.interp(np.log10(lr_at_min / 10), np.log10(lrs), slope) < 0


def test_two_way_smoothing_does_not_lag_behind_the_lr():
    # A one-way moving average shifts a step change to later points; smoothed both ways, the
    # halfway point stays where the step is.
    step = np.r_[np.ones(100), np.zeros(100)]
    halfway = int(np.argmin(np.abs(smooth(step, 0.9) - 0.5)))
    assert 98 <= halfway <= 101


def test_a_curve_that_only_rises_suggests_its_start():
    lrs = np.logspace(-3, 0, 20)
    assert suggest(lrs, lrs * 10) == (lrs[0], lrs[0])


def test_bounds_end_at_the_suggestion_a_safety_factor_below_the_minimum():
    result = LRFindResult(steepest=3e-3, lr_at_min=0.3)
    assert result.suggested == pytest.approx(0.1)  # the minimum / lr_find.safety (3)
    assert bounds_from(result) == pytest.approx((3e-4, 0.1))  # down to a tenth of the steepest
    low, high = bounds_from(LRFindResult(steepest=0.2, lr_at_min=0.3, safety=10))
    assert (low, high) == pytest.approx((3e-4, 0.03))  # at least two decades below the top


def test_settings_come_from_the_group_and_a_config_without_it_gets_the_groups_defaults():
    s = compose(["lr_find.steps=50", "lr_find.max_lr=1"], "lr_find").lr_find
    assert (s.steps, s.max_lr, s.min_lr) == (50, 1, 1e-6)
    defaults = OmegaConf.load(CONF_DIR / "lr_find" / "default.yaml")
    assert settings_of(compose([], "sweep")) == defaults  # the study's config has no lr_find group
    with pytest.raises(ConfigCompositionException, match="lr_find.stepz"):
        compose(["lr_find.stepz=3"], "lr_find")


@pytest.mark.parametrize(("override", "message"), [
    ("lr_find.steps=0", "lr_find.steps=0 is not allowed: must be an integer >= 3"),
    ("lr_find.max_lr=1e-7", "lr_find.max_lr=1e-07 is not allowed: must be above lr_find.min_lr"),
    ("lr_find.smoothing=1", "lr_find.smoothing=1 is not allowed: must be in [0.0, 1.0)"),
    ("lr_find.diverge=1", "lr_find.diverge=1 is not allowed: must be > 1"),
    ("lr_find.safety=0.5", "lr_find.safety=0.5 is not allowed: must be >= 1"),
])
def test_bad_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        check(compose([override], "lr_find"))
    assert str(err.value).startswith(message)


def test_range_test_on_the_article_data_stops_when_the_loss_explodes():
    result = lr_find(compose([*TINY, "lr_find.min_lr=1e-4", "lr_find.steps=150"], "lr_find"))
    assert result.status == "diverged"  # SGD at lr=10 on this MSE blows up well before the end
    assert len(result.lrs) == len(result.losses) < 150
    assert 3 <= len(result.smoothed) <= len(result.lrs)  # smoothed up to the explosion
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:], strict=False))
    lowest = int(np.argmin(result.smoothed))
    assert 1e-4 <= result.steepest <= result.lr_at_min == result.lrs[lowest]
    assert result.smoothed[lowest] < result.smoothed[0]
    low, high = suggest_lr_bounds(compose([*TINY, "optimizer.lr=123"]))  # its lr is ignored
    assert 0 < low < high < 10 and math.isfinite(high)


def run_app(monkeypatch, args: list[str]) -> None:
    """`python -m sweep.lr_find <args>`, in this process."""
    monkeypatch.setattr(sys, "argv", ["sweep.lr_find", *args])
    main()


def test_cli_logs_the_plot_and_prints_an_override(mlflow_uri, tmp_path, monkeypatch, capsys):
    run_app(monkeypatch, [*TINY, "lr_find.steps=60", f"hydra.run.dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert "suggested:                     optimizer.lr=" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "lr_find.png", "lr_find.csv", "summary.txt", ".hydra", "lr_find.log"}  # Hydra's folder
    run = mlflow.search_runs(experiment_names=["sweep"], output_format="list")[0]
    assert run.data.tags["kind"] == "lr_find"
    assert run.data.tags["suggested_override"] in out
    assert run.data.params["lr_find.steps"] == "60"  # the group is part of the logged config
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")]
    assert artifacts == ["plots/lr_find.png"]
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "lr_find/loss")) > 10


def test_cli_refuses_a_bad_setting_before_any_run(mlflow_uri, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_app(monkeypatch, [*TINY, "lr_find.min_lr=0", f"hydra.run.dir={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "sweep: error: lr_find.min_lr=0 is not allowed: must be a number > 0\n")
    assert not (tmp_path / "mlflow.db").exists()


def test_an_explosion_is_left_out_of_the_smoothing_so_it_cannot_hide_the_minimum():
    lrs = np.logspace(-4, 0, 60)
    losses = np.r_[np.linspace(2.0, 0.5, 50), [0.6, 1.5, 40, 900, 1e4] + [1e5] * 5]
    cut = explosion_start(losses, 0.9, 4.0)
    assert cut == 52  # the first loss above 4x the lowest smoothed value (40 > 4 x ~0.6)
    steepest, lr_at_min = suggest(lrs[:cut], smooth(losses[:cut], 0.9))
    assert lrs[45] <= lr_at_min <= lrs[51]  # smoothed with the explosion, it would sit far left
    assert steepest < lr_at_min


# --- the suggestion against a real grid of short runs -------------------------------------------

def grid(overrides: list[str], lrs: list[float], seeds: list[int]) -> dict[float, list]:
    """lr -> each seed's TrainResult of a short run at that constant lr."""
    return {lr: [train(compose([*overrides, f"optimizer.lr={lr}", f"seed={seed}"]),
                       output_dir=None) for seed in seeds] for lr in lrs}


def check_against_grid(overrides: list[str], runs: dict[float, list], score) -> None:
    """The suggestion lies within 3x of the grid's best lr; a short run at the upper bound
    learns, and every grid lr where a run failed to learn lies above that bound."""
    best = min(runs, key=lambda lr: sum(map(score, runs[lr])) / len(runs[lr]))
    cfg = compose(overrides)  # the seed of the range test is the first of the grid's
    low, high = suggest_lr_bounds(cfg)
    suggested = high  # the suggestion is the top of the search range
    assert best / 3 <= suggested <= best * 3, (suggested, best)
    at_high = train(compose([*overrides, f"optimizer.lr={high}"]), output_dir=None)
    assert at_high.status == "completed", (high, at_high.final)  # not diverged, not stalled
    # Too small an lr may stall below the best; above it, failures start beyond the bound.
    failed = [lr for lr, results in runs.items() if any(r.status != "completed" for r in results)]
    assert all(lr > high for lr in failed if lr >= best), (failed, high)
    assert low < high


@pytest.mark.slow
def test_on_the_digits_cnn_the_suggestion_is_near_the_grids_best_and_its_bound_still_learns(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints and outputs of the grid runs
    # The default CNN with SGD (momentum 0.9) and a cosine schedule; 3 epochs a run.
    digits = [*TINY_CNN, "trainer.epochs=3", "seed=0"]
    runs = grid(digits, [0.01, 0.03, 0.1, 0.3, 1.0], seeds=[0])
    assert runs[1.0][0].status == "stalled"  # the cliff: beyond it, accuracy stays at chance
    check_against_grid(digits, runs, score=lambda r: -r.final["val_acc"])


@pytest.mark.slow
def test_on_the_articles_mlp_the_suggestion_is_near_the_grids_best_and_its_bound_still_learns(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # net_class3 without BN, plain SGD, batches of 50, the article's 40 epochs.
    article = ["experiment=bn_sensitivity", "model.hidden=[4,4,4]", "tracking=none", "seed=929"]
    runs = grid(article, [0.003, 0.01, 0.03, 0.1, 0.3], seeds=[929, 1, 2])
    assert not any(r.status == "completed" for r in runs[0.3])  # the cliff: diverged or stuck
    check_against_grid(article, runs, score=lambda r: r.final["train_eval_loss"])
