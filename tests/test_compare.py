"""The one comparison (`sweep.compare`): every statistical rule on constructed runs, the numbers at
the precision the data supports, the tables and the figures."""

import math
import random

import pytest
from scipy import stats

from sweep.compare import (
    Run,
    compare,
    estimate,
    holm,
    number,
    p_text,
    seeds_to_settle,
    table,
    versus,
)
from sweep.compare_plots import curves_figure, lr_figure


def group(name: str, finals: list[float], start: float = 0.5, **kwargs) -> list[Run]:
    """One run per seed (1, 2, ...) whose curve climbs from `start` to its final value."""
    return [Run(name, seed, "completed", [start, (start + f) / 2, f], **kwargs)
            for seed, f in enumerate(finals, start=1)]


# --- the rules ------------------------------------------------------------------------------------

def test_a_clear_effect_over_five_seeds_is_found():
    rng = random.Random(0)
    cosine = [0.90 + rng.gauss(0, 0.01) for _ in range(5)]
    step = [v - 0.03 + rng.gauss(0, 0.005) for v in cosine]  # every seed: 0.03 worse
    c = compare(group("step", step) + group("cosine", cosine), "val_acc", maximize=True)
    assert [g.name for g in c.groups] == ["cosine", "step"]
    assert c.winner == "cosine" and c.leaders == ["cosine"]
    v = c.groups[1].versus
    assert v.test == "paired t-test" and v.n == 5 and v.high < 0 and v.p_holm < 0.05
    assert c.sentence().startswith("cosine is best: final val_acc ")
    assert "Clearly worse than cosine: step." in c.sentence()


def test_noise_over_three_seeds_is_no_clear_difference_and_says_how_many_seeds_would_settle_it():
    rng = random.Random(1)
    c = compare(group("a", [0.90 + rng.gauss(0, 0.02) for _ in range(3)])
                + group("b", [0.89 + rng.gauss(0, 0.02) for _ in range(3)]), "val_acc", True)
    assert c.winner is None and sorted(c.leaders) == ["a", "b"]
    v = c.groups[1].versus
    assert v.low < 0 < v.high and not v.clear()
    n = seeds_to_settle(v, 0.05, tests=1)
    assert n > 3 and f"{n} seeds per schedule would settle it" in c.sentence()
    # At n seeds Student's t on the observed difference and spread crosses the line; at n - 1 not.
    t = abs(v.diff) / (v.spread / math.sqrt(n))
    assert t > stats.t.ppf(0.975, n - 1)
    assert abs(v.diff) / (v.spread / math.sqrt(n - 1)) <= stats.t.ppf(0.975, n - 2)


def test_holm_changes_a_borderline_call():
    leader = [0.90, 0.80, 0.85, 0.95]
    others = {"x": [0.03, 0.01, 0.05, 0.03], "y": [0.02, 0.05, 0.01, 0.04]}  # per-seed gaps
    runs = group("lead", leader) + [r for name, gaps in others.items()
                                    for r in group(name, [v - g for v, g in
                                                          zip(leader, gaps, strict=True)])]
    c = compare(runs, "val_acc", maximize=True)
    x, y = (g.versus for g in c.groups[1:])
    assert x.p < 0.05 and y.p < 0.05  # each alone would be "clearly worse"
    assert x.p_holm >= 0.05 and y.p_holm >= 0.05  # two chances of a fluke: neither is
    assert c.leaders == ["lead", "x", "y"] and c.winner is None
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan],
                                                                nan_ok=True)


def test_pairing_by_seed_sees_a_small_gap_that_large_seed_effects_would_hide():
    # Seeds matter far more than the schedule, but within each seed the leader is always better.
    leader = {1: 0.90, 2: 0.70, 3: 0.50, 4: 0.80}  # val_acc: higher is better
    other = {1: 0.88, 2: 0.69, 3: 0.48, 4: 0.79}
    assert versus(leader, other).p < 0.05
    unpaired = versus(leader, {s + 10: v for s, v in other.items()})
    assert unpaired.test == "Welch t-test" and unpaired.p > 0.05


def test_one_seed_gives_no_test_and_no_winner():
    c = compare(group("a", [0.1]) + group("b", [0.5]), "val_mse", maximize=False)
    v = c.groups[1].versus
    assert v.test == "too few seeds" and math.isnan(v.p) and not v.clear()
    assert c.winner is None and c.leaders == ["a", "b"]
    assert "one seed measures no seed-to-seed noise" in c.sentence()


def test_float_noise_is_a_tie_printed_as_zero_and_p_1_is_never_a_lead():
    same = [0.912345, 0.901234, 0.923456]
    c = compare(group("a", same) + group("b", [v - 2e-8 for v in same]), "val_acc", True)
    v = c.groups[1].versus
    assert (v.diff, v.p) == (0.0, 1.0) and c.winner is None
    assert "within rounding: more seeds would not separate them" in c.sentence()
    assert "| 2    | b        | 0 (0 .. 0)" in c.versus_table()
    assert "| 1        | tied with the leader |" in c.versus_table()
    assert number(-1.987e-08, 0.001) == "0" and p_text(0.9999) == "1"


def test_schedules_whose_runs_all_stalled_are_named():
    runs = group("cosine", [0.9, 0.92, 0.91]) + group("constant", [0.11, 0.1, 0.12])
    for r in runs[3:]:
        r.status = "stalled"  # the trainer's verdict: accuracy at chance
    c = compare(runs, "val_acc", maximize=True)
    assert c.winner == "cosine"
    assert "Did not learn in any run (stalled): constant" in c.sentence()
    assert "| constant | 3 (3 stalled) |" in c.summary_table()


def test_numbers_are_printed_at_the_precision_their_interval_supports():
    assert number(0.912345, 0.0123) == "0.912"
    assert number(0.912345, 0.3) == "0.91" and number(123.456, 12) == "123"
    assert number(0.000123456) == "0.0001235"  # no interval: four significant digits
    assert number(-0.04, 0.01, signed=True) == "-0.040"
    e = estimate([0.90, 0.91, 0.92])
    assert (e.n, e.mean) == (3, pytest.approx(0.91)) and e.low < 0.9 and e.high > 0.92
    assert math.isnan(estimate([0.9]).low)


def test_diverged_runs_have_no_final_value_and_are_counted():
    bad = [Run("plateau", 1, "diverged", [0.5, math.inf]), Run("plateau", 2, "diverged", [0.4])]
    runs = group("cosine", [0.9, 0.92]) + group("step", [0.8, 0.85]) + bad
    runs[2].status = "diverged"  # step seed 1 diverged: it has no final value
    c = compare(runs, "val_acc", maximize=True)
    assert [g.name for g in c.groups] == ["cosine", "step", "plateau"]
    assert c.groups[1].values == [0.85] and c.groups[2].values == []
    text = c.summary_table()
    assert "| step     | 2 (1 diverged) |" in text and "| plateau  | 2 (2 diverged) |" in text
    assert "No finished run: plateau." in c.sentence()
    assert "| 3    | plateau  | -" in c.versus_table() and "no finished run" in c.versus_table()


def test_a_leader_scored_on_the_seeds_that_did_not_diverge_is_no_winner():
    rng = random.Random(1)
    step = [0.80 + rng.gauss(0, 0.005) for _ in range(5)]
    cosine = group("cosine", [v + 0.1 for v in step])
    for run in cosine[:2]:  # two of five seeds blew up; the other three lead clearly
        run.status = "diverged"
    c = compare(cosine + group("step", step), "val_acc", maximize=True)
    assert c.leaders == ["cosine"] and c.winner is None
    assert "over the seeds that finished, but diverged in 2 of 5" in c.sentence()


def test_time_to_target_is_in_epochs_and_steps_and_seconds_only_beside_their_device():
    runs = group("cosine", [0.9, 0.92], steps_per_epoch=10) + group("step", [0.8, 0.82],
                                                                    steps_per_epoch=10)
    c = compare(runs, "val_acc", maximize=True, target=0.7)  # curves 0.5, 0.7 / 0.65, 0.8
    assert [g.to_target for g in c.groups] == [[2, 2], [3, 3]]
    text = c.summary_table()
    assert "| epochs to 0.7000 | steps to 0.7000 |" in text and "| 2.0  " in text
    assert "| 20 " in text and "| 30 " in text and "seconds" not in text
    assert any("Wall-clock time is not shown" in n for n in c.notes())
    for r in runs:
        r.epoch_times, r.device = [1.5, 1.5, 1.5], "cuda (NVIDIA H200)"
    text = c.summary_table()
    assert "seconds to 0.7000 (wall clock, device)" in text
    assert "3.0 on cuda (NVIDIA H200)" in text and "4.5 on cuda (NVIDIA H200)" in text


def test_one_table_formatter_for_markdown_and_html():
    md = table(["schedule", "value"], [["cosine", "0.9"], ["a|b", "1"]])
    assert md.splitlines() == ["| schedule | value |", "| -------- | ----- |",
                               "| cosine   | 0.9   |", "| a\\|b     | 1     |"]
    html = table(["schedule"], [["<cosine>"]], "html")
    assert html == "<table><tr><th>schedule</th></tr><tr><td>&lt;cosine&gt;</td></tr></table>"


# --- figures --------------------------------------------------------------------------------------

def test_few_schedules_share_an_axis_and_many_get_a_panel_each():
    few = compare(group("a", [0.9, 0.91]) + group("b", [0.8, 0.82]), "val_acc", True)
    fig = curves_figure(few)
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "epoch"
    assert "val_acc" in fig.axes[0].get_title()
    many = compare([r for i in range(12) for r in group(f"s{i}", [0.5 + i / 30, 0.51 + i / 30])],
                   "val_acc", True)
    fig = curves_figure(many)
    titled = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titled) == 12 and titled[0] == "s11 (leader)"
    assert "val_acc per epoch" in fig._suptitle.get_text()


def test_lr_curves_show_every_seed_on_an_epoch_axis_and_span_decades_on_a_log_scale():
    runs = [Run("plateau", seed, "completed", [1.0, 0.5, 0.4],
                lr=[(0.0, 0.1), (float(cut), 0.1 * 1e-3), (3.0, 0.1 * 1e-3)])
            for seed, cut in ((1, 2), (2, 1))]
    fig = lr_figure(compare(runs, "val_mse", maximize=False))
    [ax] = [a for a in fig.axes if a.get_visible()]
    assert [line.get_label() for line in ax.lines] == ["seed 1", "seed 2"]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "epoch"
