"""Figures of one run: its loss curves and its learning rates (matplotlib's Agg canvas: no display,
no pyplot state). The run's tracker, the study's summary and the schedule drawer all use them."""

from __future__ import annotations

from collections import Counter
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# --- learning-rate schedules ---------------------------------------------------------------------


def _fractional_epochs(rows: list[dict[str, Any]]) -> list[float]:
    """Epochs done at each row's step: epoch 3's 2nd of 4 steps is 2.25 (epochs count from 1)."""
    per_epoch = Counter(r["epoch"] for r in rows)
    first = {}
    for r in rows:
        first.setdefault(r["epoch"], r["step"])
    return [r["epoch"] - 1 + (r["step"] - first[r["epoch"]]) / per_epoch[r["epoch"]] for r in rows]


def lr_figure(rows_by_schedule: dict[str, list[dict[str, Any]]], x: str = "step", *,
              log_y: bool = False, title: str | None = None) -> Figure:
    """One line per schedule and parameter group: the lr applied at each optimizer step.

    Rows are {step, epoch, group, lr} as `sweep.schedules.simulate` or the trainer's lr trace give
    them; `x="epoch"` spreads each epoch's steps over it, so per-step schedules stay smooth.
    """
    if x not in ("step", "epoch"):
        raise ValueError(f"x={x!r}: choose step or epoch")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    several = len(rows_by_schedule) > 1
    for name, rows in rows_by_schedule.items():
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(r["group"], []).append(r)
        for group, g_rows in groups.items():
            label = name if len(groups) == 1 else f"{name} / {group}" if several else group
            ys = [r["lr"] for r in g_rows]
            if x == "step":
                xs = [r["step"] for r in g_rows]
            else:  # the last step's lr holds until its epoch ends
                xs, ys = _fractional_epochs(g_rows) + [g_rows[-1]["epoch"]], ys + ys[-1:]
            style = ("-", "--", ":", "-.")[len(ax.lines) // 10 % 4]  # colours repeat after 10
            ax.plot(xs, ys, style, label=label, drawstyle="steps-post")
    ax.set_xlabel("optimizer step" if x == "step" else "epoch")
    ax.set_ylabel("learning rate")
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(ax.lines) > 6:  # beside the axes, where it hides no line
        fig.set_size_inches(11, 4.5)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1),
                  ncols=2 if len(ax.lines) > 16 else 1)
    elif len(ax.lines) > 1:  # one line needs no key: the title and axis say what it is
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    return fig


# --- training curves -----------------------------------------------------------------------------


LOSS_LABELS = {"train_loss": "train_loss (mean of the epoch's batches, train mode)",
               "train_eval_loss": "train_eval_loss (whole training split, eval mode)",
               "val_loss": "val_loss"}


def loss_figure(history: list[dict[str, Any]], metric_name: str,
                title: str | None = None, initial: dict[str, float] | None = None) -> Figure:
    """The losses per epoch (log scale when they span decades), and the metric; each panel is
    titled with what it shows, the figure with `title` (the run). `initial`: the values measured
    before the first step, drawn at epoch 0."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    rows = ([{"epoch": 0, **initial}] if initial else []) + list(history)
    losses = []
    for key, label in LOSS_LABELS.items():
        points = [(r["epoch"], r[key]) for r in rows if key in r]
        if points:
            loss_ax.plot(*zip(*points, strict=True), marker=".", label=label)
            losses += [v for _, v in points if v > 0]
    if losses and max(losses) / min(losses) > 100:
        loss_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="loss")
    loss_ax.legend(fontsize="small")
    points = [(r["epoch"], r[metric_name]) for r in rows if metric_name in r]
    metric_ax.plot(*zip(*points, strict=True), marker=".", color="C3")
    metric_ax.set(xlabel="epoch", ylabel=metric_name)
    loss_ax.set_title("loss", fontsize="medium")
    metric_ax.set_title(metric_name, fontsize="medium")
    for ax in (loss_ax, metric_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title + (" (epoch 0: before the first step)" if initial else ""),
                     fontsize="medium")
    return fig


def run_figures(result: Any, run: str) -> dict[str, Figure]:
    """One run's figures by file name, titled with the run: `loss.png` (losses and the metric
    per epoch) and `lr.png` (the lr each step applied, against epochs; log scale when it spans
    decades). `result` is a `TrainResult`."""
    figures = {}
    if result.history:
        figures["loss.png"] = loss_figure(result.history, result.metric_name,
                                          title=f"{run}: loss and {result.metric_name}",
                                          initial=result.initial)
    if result.lr_trace:
        lrs = [r["lr"] for r in result.lr_trace]
        decades = min(lrs) > 0 and max(lrs) / min(lrs) > 100
        figures["lr.png"] = lr_figure({"lr": result.lr_trace}, x="epoch", log_y=decades,
                                      title=f"{run}: learning rate")
    return figures
