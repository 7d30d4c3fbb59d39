"""Figures of a comparison (`sweep.compare`): the metric and the learning rate per epoch of every
group's runs. Few groups share one axis; many get small multiples, one panel each, so 20 schedules
never become 20 look-alike lines. Titles name the metric, x axes count epochs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sweep.compare import Comparison

OVERLAY_MAX = 6       # more groups than this: one panel each


def spans_decades(values: Sequence[float]) -> bool:
    """Whether positive values span more than two decades: then a log axis reads better."""
    v = [x for x in values if math.isfinite(x) and x > 0]
    return bool(v) and max(v) / min(v) > 100


def panels(n: int, width: float = 3.2, height: float = 2.4) -> tuple[Figure, list]:
    """A grid of n small panels sharing both axes, on an Agg canvas."""
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols + 0.6, height * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def stacked(curves: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Epochs 1..n and the curves as rows, cut to the shortest (a diverged run stops early)."""
    n = min(map(len, curves))
    return np.arange(1, n + 1), np.array([c[:n] for c in curves], float)


def curves_figure(c: Comparison, title: str | None = None) -> Figure:
    """The compared metric per epoch: the mean over each group's runs with their range, or, for
    many groups, a panel per group with every run and the leader's mean for reference."""
    groups = [g for g in c.groups if any(r.curve for r in g.runs)]
    values = [v for g in groups for r in g.runs for v in r.curve]
    title = title or f"{c.metric} per epoch ({'higher' if c.maximize else 'lower'} is better)"
    if len(groups) <= OVERLAY_MAX:
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, g in enumerate(groups):
            epochs, stack = stacked([r.curve for r in g.runs if r.curve])
            ax.plot(epochs, stack.mean(0), marker=".", color=f"C{i}",
                    label=f"{g.name} ({len(stack)} run{'s' if len(stack) > 1 else ''})")
            if len(stack) > 1:
                ax.fill_between(epochs, stack.min(0), stack.max(0), alpha=0.2, color=f"C{i}")
        axes = [ax]
        ax.set_title(f"{title}: mean and range over seeds", fontsize="medium")
        ax.legend(fontsize="small")
    else:
        fig, axes = panels(len(groups))
        lead = groups[0]
        lead_epochs, lead_stack = stacked([r.curve for r in lead.runs if r.curve])
        for ax, g in zip(axes, groups, strict=True):
            ax.plot(lead_epochs, lead_stack.mean(0), color="0.6", ls="--", lw=1)
            for r in g.runs:
                if r.curve:
                    ax.plot(range(1, len(r.curve) + 1), r.curve, color="C0", lw=1, alpha=0.5)
            epochs, stack = stacked([r.curve for r in g.runs if r.curve])
            ax.plot(epochs, stack.mean(0), color="C0", lw=2)
            ax.set_title(g.name + (" (leader)" if g is lead else ""), fontsize="small")
        fig.suptitle(f"{title}: each run thin, mean thick; dashed: the leader's mean "
                     f"({lead.name})", fontsize="medium")
    finish(axes, values, c.metric)
    return fig


def lr_figure(c: Comparison, title: str = "learning rate per epoch, every seed (where seeds "
                                         "agree, their lines overlap)") -> Figure:
    """Each group's lr against epochs, one line per seed: a schedule that reacts to the run
    (plateau) cuts its lr at different epochs for different seeds."""
    groups = [g for g in c.groups if any(r.lr for r in g.runs)]
    fig, axes = panels(max(len(groups), 1), width=3.6, height=2.6)
    for ax, g in zip(axes, groups, strict=False):
        for k, r in enumerate(g.runs):
            if r.lr:
                x, y = zip(*r.lr, strict=True)
                ax.plot(x, y, drawstyle="steps-post", color=f"C{k % 10}", lw=1.2,
                        label=f"seed {r.seed}")
        ax.set_title(g.name, fontsize="small")
        if len(g.runs) > 1:
            ax.legend(fontsize="x-small")
    fig.suptitle(title, fontsize="medium")
    finish(axes, [lr for g in groups for r in g.runs for _, lr in r.lr], "learning rate")
    return fig


def finish(axes: Sequence, values: Sequence[float], ylabel: str) -> None:
    """Shared touches: epochs on x (integer ticks), a log y axis where values span decades."""
    log = spans_decades(values)
    for ax in axes:
        if log:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
    cols = axes[0].get_subplotspec().get_gridspec().ncols
    for i, ax in enumerate(axes):
        if i + cols >= len(axes):  # nothing drawn below it: its x axis is the column's
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("epoch")
        if i % cols == 0:
            ax.set_ylabel(ylabel)


def figures(c: Comparison) -> dict[str, Figure]:
    """Every figure of a comparison, by file name."""
    out = {"curves.png": curves_figure(c)}
    if any(r.lr for g in c.groups for r in g.runs):
        out["lr.png"] = lr_figure(c)
    return out

