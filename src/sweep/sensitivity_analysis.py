"""How sensitive a model is to the learning rate, and whether a factor changed that.

LR sensitivity as Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
instabilities", section 2) define it, for one model and one seed over the lr sweep:

    sensitivity = mean over lrs of ( min(final(lr), initial) - min over lrs of min(final, initial) )

Each final loss is capped at the loss at initialisation (epoch 0 of the same metric), so a run that
diverged counts as "no better than where it started", never as infinity: one bad seed cannot make
the measure infinite, and every lr of the sweep counts, not just the two extremes.

The conclusion compares a factor's value with the baseline per model variant, paired over seeds
with `sweep.compare` (Student t, Holm-corrected across the variants): "more" or "less" sensitive
only when the difference is clear; a variant that did not learn is left out of such claims.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from sweep.compare import (
    ALPHA,
    LEVEL,
    Estimate,
    Versus,
    estimate,
    estimate_text,
    final_value,
    holm,
    number,
    p_text,
    seeds_to_settle,
    table,
    versus,
)
from sweep.train import LEARNED_LOSS_RATIO


@dataclass
class Point:
    """One grid run: which variant, factor value, lr and seed, and its per-epoch metric."""

    variant: str
    value: str
    lr: float
    seed: int
    status: str                      # completed | diverged | stalled | ...
    curve: list[float]               # the metric after epochs 1..n
    initial: float | None = None     # the metric at epoch 0 (initialisation), if it was measured
    run_id: str | None = None

    @property
    def final(self) -> float:
        return final_value(self.status, self.curve)

    @property
    def start(self) -> float:
        """The loss at initialisation; without an epoch-0 value, the first logged one."""
        return self.initial if self.initial is not None else (self.curve[0] if self.curve
                                                              else math.nan)

    @property
    def capped(self) -> float:
        """The final loss capped at the start: a diverged run is no better than where it began."""
        return self.start if math.isnan(self.final) else min(self.final, self.start)

    @property
    def learned(self) -> bool:
        """Ended clearly below where it started (the trainer's `stalled` rule on this metric)."""
        return (self.status != "stalled" and math.isfinite(self.final)
                and self.final <= LEARNED_LOSS_RATIO * self.start)


@dataclass
class Summary:
    """One model's (variant x factor value) final loss at each lr, and its LR sensitivity."""

    variant: str
    value: str
    lrs: list[float]                          # ascending
    points: dict[float, list[Point]]          # per lr, one per seed
    sensitivity: Estimate = field(default_factory=lambda: estimate([]))  # over seeds
    by_seed: dict[int, float] = field(default_factory=dict)             # each seed's measure
    capped_mean: list[float] = field(default_factory=list)  # per lr, over seeds
    best_lr: float = math.nan
    best_loss: float = math.nan
    good_lrs: list[float] = field(default_factory=list)     # within `margin` x the best
    good_range: float = math.nan              # decades of lr from the lowest to the highest good lr
    seed_spread: float = math.nan             # mean over lrs of the std over seeds, in decades
    learned_lrs: list[float] = field(default_factory=list)  # lrs where most seeds learned

    @property
    def label(self) -> str:
        return f"{self.variant} {self.value}"

    @property
    def learned(self) -> bool:
        return bool(self.learned_lrs)

    @property
    def n_seeds(self) -> int:
        return max(len(p) for p in self.points.values())

    def count(self, status: str) -> int:
        return sum(p.status == status for ps in self.points.values() for p in ps)


def summarize(points: Sequence[Point], margin: float) -> list[Summary]:
    """Group runs by model and compute each model's LR sensitivity and the measures beside it."""
    groups: dict[tuple[str, str], dict[float, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        groups[p.variant, p.value][p.lr].append(p)
    out = []
    for (variant, value), by_lr in groups.items():
        lrs = sorted(by_lr)
        s = Summary(variant, value, lrs, {lr: by_lr[lr] for lr in lrs})
        # Per seed over the sweep; only seeds that ran every lr have the measure.
        capped: dict[int, dict[float, float]] = defaultdict(dict)
        for lr in lrs:
            for p in by_lr[lr]:
                capped[p.seed][lr] = p.capped
        s.by_seed = {seed: float(np.mean([c[lr] for lr in lrs]) - min(c.values()))
                     for seed, c in capped.items() if len(c) == len(lrs)}
        s.sensitivity = estimate(list(s.by_seed.values()))
        s.capped_mean = [float(np.mean([p.capped for p in by_lr[lr]])) for lr in lrs]
        best = int(np.nanargmin(s.capped_mean)) if any(map(math.isfinite, s.capped_mean)) else 0
        s.best_lr, s.best_loss = lrs[best], s.capped_mean[best]
        s.good_lrs = [lr for lr, m in zip(lrs, s.capped_mean, strict=True)
                      if m <= margin * s.best_loss]
        s.good_range = math.log10(max(s.good_lrs) / min(s.good_lrs)) if s.good_lrs else math.nan
        spreads = [float(np.std(np.log10([p.capped for p in by_lr[lr]]), ddof=1))
                   for lr in lrs if len(by_lr[lr]) > 1 and all(p.capped > 0 for p in by_lr[lr])]
        s.seed_spread = float(np.mean(spreads)) if spreads else math.nan
        s.learned_lrs = [lr for lr in lrs if 2 * sum(p.learned for p in by_lr[lr]) > len(by_lr[lr])]
        out.append(s)
    return out


def fallback_note(points: Sequence[Point], metric: str) -> str:
    """Say so when the loss at initialisation was not measured and the first epoch stood in."""
    if all(p.initial is not None for p in points):
        return ""
    return (f"These runs logged no epoch-0 value of {metric}, so each run's first logged value "
            "(after one epoch) stands in for the loss at initialisation; the cap is looser than "
            "the definition's.")


# --- the conclusion -------------------------------------------------------------------------------

@dataclass
class Verdict:
    """A value of the factor against the baseline, for one variant."""

    variant: str
    treated: Summary
    base: Summary
    test: Versus | None               # None when a side did not learn
    kind: str = "unclear"             # more | less | unclear | excluded


def verdicts(summaries: Sequence[Summary], value: str, base: str,
             alpha: float = ALPHA) -> list[Verdict]:
    """Per variant, `value` against `base`: paired over seeds, Holm-corrected across variants."""
    by_key = {(s.variant, s.value): s for s in summaries}
    variants = list(dict.fromkeys(s.variant for s in summaries))
    out = [Verdict(v, by_key[v, value], by_key[v, base], None) for v in variants
           if (v, value) in by_key and (v, base) in by_key]
    for v in out:
        if not (v.treated.learned and v.base.learned):
            v.kind = "excluded"
        else:
            v.test = versus(v.base.by_seed, v.treated.by_seed)
    tested = [v for v in out if v.test is not None]
    for v, p in zip(tested, holm([v.test.p for v in tested]), strict=True):
        v.test.p_holm = p
        if v.test.clear(alpha):
            v.kind = "more" if v.test.diff > 0 else "less"
    return out


def conclusion(summaries: Sequence[Summary], factor: str, values: Sequence[str],
               metric: str, alpha: float = ALPHA) -> str:
    """One paragraph per compared value, stating from the numbers whether it made the models more
    or less sensitive to the learning rate than the baseline (the first of `values`)."""
    base = str(values[0])
    paragraphs = []
    for value in map(str, values[1:]):
        found = verdicts(summaries, value, base, alpha)
        if not found:
            continue
        claims = [v for v in found if v.kind != "excluded"]
        kinds = {v.kind for v in claims}
        # Only variants that learned are the subject of a claim.
        who = (("the model" if len(found) == 1 else "the models") if len(claims) == len(found)
               else ", ".join(v.variant for v in claims))
        changed = f"{factor}={value}"
        if not claims:
            head = f"No claim about {changed} against {factor}={base}"
        elif kinds in ({"more"}, {"less"}):
            head = (f"Here {changed} made {who} {kinds.pop()} sensitive to the learning rate "
                    f"than {factor}={base}")
        elif kinds == {"unclear"}:
            verb = "were" if who == "the models" or ", " in who else "was"
            head = (f"Here {changed} made no clear difference to how sensitive {who} {verb} to "
                    f"the learning rate, compared with {factor}={base}")
        else:
            parts = [f"made {', '.join(v.variant for v in claims if v.kind == kind)} {kind} "
                     "sensitive to the learning rate" for kind in ("more", "less") if kind in kinds]
            if "unclear" in kinds:
                parts.append("made no clear difference for "
                             + ", ".join(v.variant for v in claims if v.kind == "unclear"))
            head = (f"Here, compared with {factor}={base}, {changed} had mixed effects: it "
                    + " and ".join(parts))
        lines = [evidence(v, factor, metric, alpha, len(claims)) for v in found]
        paragraphs.append(f"{head}. " + " ".join(lines))
    return "\n\n".join(paragraphs)


def evidence(v: Verdict, factor: str, metric: str, alpha: float, tests: int) -> str:
    """The numbers behind one variant's verdict."""
    short = factor.split(".")[-1]
    t, b = v.treated, v.base
    if v.kind == "excluded":
        stuck = [s for s in (t, b) if not s.learned]
        who = " and ".join(f"{s.variant} with {short}={s.value}" for s in stuck)
        return (f"{who} did not learn at any lr (final {metric} not clearly below its value at "
                "initialisation, or runs tagged stalled), so it is left out of any more- or "
                "less-sensitive claim.")
    c = v.test
    measured = (f"{v.variant}: LR sensitivity of final {metric} {estimate_text(t.sensitivity)} "
                f"with {short}={t.value} vs {estimate_text(b.sensitivity)} with {short}={b.value}")
    beside = (f"good-lr range {fmt(t.good_range)} vs {fmt(b.good_range)} decades, seed spread "
              f"{fmt(t.seed_spread)} vs {fmt(b.seed_spread)} decades")
    if c.test == "too few seeds":
        return (f"{measured} ({beside}); one seed measures no seed-to-seed noise, so no "
                "difference can be called clear: run two or more seeds.")
    half = (c.high - c.low) / 2
    diff = (f"difference {number(c.diff, half, True)} ({LEVEL:.0%} CI "
            f"{number(c.low, half, True)} .. {number(c.high, half, True)}), {c.test} over "
            f"{c.n} seeds, p = {p_text(c.p)}, Holm {p_text(c.p_holm)}")
    settle = ""
    if v.kind == "unclear":
        n = seeds_to_settle(c, alpha, tests)
        settle = (" The difference is within rounding: more seeds would not settle it."
                  if n is None else f" If the observed difference held, {n} seeds would "
                  "settle it." if n <= 1000 else " The difference is too small to settle with "
                  "any practical number of seeds.")
    return f"{measured}, {diff}; {beside}.{settle}"


def fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.2f}"


# --- tables and figures -------------------------------------------------------------------------

def tables(summaries: Sequence[Summary], factor: str, margin: float, metric: str,
           fmt_: str = "md") -> str:
    """The sensitivity measures per model, then one table per model of the final loss per lr."""
    short = factor.split(".")[-1]
    head = ["model", f"LR sensitivity of final {metric} ({LEVEL:.0%} CI over seeds)", "seeds",
            "best lr", f"best final {metric}", f"good-lr range (decades, within {margin:g}x best)",
            "seed spread (decades)", "diverged", "did not learn at"]
    rows = [[f"{s.variant} {short}={s.value}", estimate_text(s.sensitivity), str(s.n_seeds),
             f"{s.best_lr:g}", number(s.best_loss),
             f"{fmt(s.good_range)} ({', '.join(f'{lr:g}' for lr in s.good_lrs)})",
             fmt(s.seed_spread), f"{s.count('diverged')}/{sum(map(len, s.points.values()))}",
             "every lr" if not s.learned else
             ", ".join(f"{lr:g}" for lr in s.lrs if lr not in s.learned_lrs) or "-"]
            for s in summaries]
    parts = [table(head, rows, fmt_)]
    for s in summaries:
        lr_head = ["lr", f"final {metric} (mean over seeds that finished)",
                   "capped at initial (mean)", "capped min", "capped max", "diverged", "learned",
                   "good"]
        lr_rows = []
        for lr, mean in zip(s.lrs, s.capped_mean, strict=True):
            ps = s.points[lr]
            caps = [p.capped for p in ps]
            finals = [p.final for p in ps if math.isfinite(p.final)]
            lr_rows.append([f"{lr:g}", number(float(np.mean(finals))) if finals else "-",
                            number(mean), number(min(caps)), number(max(caps)),
                            f"{sum(p.status == 'diverged' for p in ps)}/{len(ps)}",
                            f"{sum(p.learned for p in ps)}/{len(ps)}",
                            "yes" if lr in s.good_lrs else ""])
        title = f"{s.variant} {short}={s.value}"
        parts.append(f"<h3>{title}</h3>" if fmt_ == "html" else f"**{title}**")
        parts.append(table(lr_head, lr_rows, fmt_))
    return "\n\n".join(parts)


def styles(points: Sequence[Point]) -> dict[tuple[str, str], dict[str, Any]]:
    """Colour per variant, line style per factor value, stable across figures."""
    variants = list(dict.fromkeys(p.variant for p in points))
    values = list(dict.fromkeys(p.value for p in points))
    dashes = ["-", "--", ":", "-."]
    return {(v, x): {"color": f"C{i % 10}", "ls": dashes[j % 4]}
            for i, v in enumerate(variants) for j, x in enumerate(values)}


def loss_axis(ax: Any, values: Sequence[float]) -> None:
    """A log axis when the values span more than a decade and a half, labelled in plain numbers."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 30:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def panels_figure(points: Sequence[Point], factor: str, metric: str) -> Figure:
    """The article's figure: one panel per lr, each model's loss per epoch from initialisation
    (median over seeds, with the min-max band when there are several)."""
    look = styles(points)
    lrs = sorted({p.lr for p in points}, reverse=True)  # the article's order: 0.1 first
    cols = 2 if len(lrs) > 1 else 1
    rows = math.ceil(len(lrs) / cols)
    fig = Figure(figsize=(6 * cols, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    short = factor.split(".")[-1]
    for ax, lr in zip(axes.flat, lrs, strict=False):
        by_model: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
        for p in points:
            if p.lr == lr:
                by_model[p.variant, p.value].append([p.start, *p.curve])
        for key, curves in by_model.items():
            length = max(len(c) for c in curves)
            grid = np.full((len(curves), length), np.nan)
            for i, c in enumerate(curves):
                grid[i, :len(c)] = c
            grid[~np.isfinite(grid)] = np.nan
            epochs = np.arange(length)
            ax.plot(epochs, np.nanmedian(grid, 0), lw=1.6, label=f"{key[0]} {short}={key[1]}",
                    **look[key])
            if len(curves) > 1:
                ax.fill_between(epochs, np.nanmin(grid, 0), np.nanmax(grid, 0), alpha=0.15,
                                color=look[key]["color"])
        ax.set_title(f"lr = {lr:g}", fontsize="medium")
        loss_axis(ax, [v for p in points for v in [p.start, *p.curve]])
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(lrs):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch (0 = at initialisation)")
    axes.flat[0].legend(fontsize=8)
    n = len({p.seed for p in points})
    fig.suptitle(f"{metric} per epoch at each learning rate"
                 + (f" (median and range over {n} seeds)" if n > 1 else ""))
    return fig


def lr_curve_figure(summaries: Sequence[Summary], points: Sequence[Point], factor: str,
                    metric: str) -> Figure:
    """Final loss (capped at the loss at initialisation) against lr for each model: the mean over
    seeds as a line, each seed as a dot, a diverged seed as a cross at its cap."""
    look = styles(points)
    short = factor.split(".")[-1]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, s in enumerate(summaries):
        style = look[s.variant, s.value]
        # Nudge each model sideways a little so dots at the same lr do not hide each other.
        nudge = 10 ** (0.015 * (k - (len(summaries) - 1) / 2))
        xs = [lr * nudge for lr in s.lrs]
        ax.plot(xs, s.capped_mean, marker="o", lw=1.6,
                label=f"{s.variant} {short}={s.value} (sensitivity "
                      f"{number(s.sensitivity.mean, s.sensitivity.half)})", **style)
        for x, lr in zip(xs, s.lrs, strict=True):
            for p in s.points[lr]:
                ax.scatter([x], [p.capped], s=14 if p.status != "diverged" else 30, alpha=0.6,
                           color=style["color"], marker="o" if p.status != "diverged" else "x")
    lrs = sorted({p.lr for p in points})
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    loss_axis(ax, [p.capped for p in points])
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final {metric} (capped at initial)")
    ax.set_title(f"final {metric} against learning rate: mean over seeds; x = diverged, drawn at "
                 "its cap", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def sensitivity_figure(summaries: Sequence[Summary], factor: str, metric: str) -> Figure:
    """Each model's LR sensitivity with its interval over seeds, and every seed's value."""
    short = factor.split(".")[-1]
    fig = Figure(figsize=(7, 0.6 * len(summaries) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for y, s in enumerate(summaries):
        e = s.sensitivity
        color = "C0" if s.learned else "0.6"
        if math.isfinite(e.low):
            ax.errorbar([e.mean], [y], xerr=[[e.mean - e.low], [e.high - e.mean]], fmt="o",
                        color=color, capsize=4)
        else:
            ax.plot([e.mean], [y], "o", color=color)
        ax.scatter(list(s.by_seed.values()), [y] * len(s.by_seed), s=12, color=color, alpha=0.5)
    ax.set_yticks(range(len(summaries)),
                  [f"{s.variant} {short}={s.value}" + ("" if s.learned else " (did not learn)")
                   for s in summaries])
    ax.invert_yaxis()
    ax.set_xlabel(f"LR sensitivity of final {metric} (lower = less sensitive)")
    ax.set_title(f"LR sensitivity: mean and {LEVEL:.0%} CI over seeds, dots = seeds",
                 fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    return fig
