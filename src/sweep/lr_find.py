"""The learning-rate range test: one short run whose lr rises exponentially until the loss explodes.

`python -m sweep.lr_find <overrides>` trains the configured model from `lr_find.min_lr` to
`lr_find.max_lr` over `lr_find.steps` optimizer steps, plots the smoothed loss against the lr (log
axis), and prints the suggestion as an override to paste:

- suggested: the lr at the smoothed loss's minimum divided by `lr_find.safety` (3); also the
  upper bound of `study.lr_bounds=auto`'s search range, so a short run there still learns;
- steepest descent (shown beside it): the lr where the smoothed loss falls fastest.

After Smith, "Cyclical Learning Rates for Training Neural Networks" (2017), and fastai's lr_find.
Settings: the `lr_find` group (conf/lr_find/default.yaml), composed by conf/lr_find.yaml.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from sweep import CONF_DIR
from sweep.config import (
    ConfigError,
    check_in_range,
    check_int_at_least,
    check_positive,
    fail,
    validate,
    with_choices,
)
from sweep.data import augment_batch
from sweep.study_plan import override_text
from sweep.track import mlflow_run, run_name
from sweep.train import batches, setup
from sweep.validation import DataError

# --- the range test ---------------------------------------------------------------------------

@dataclass
class LRFindResult:
    """The measured curve and the lrs read off it."""

    lrs: list[float] = field(default_factory=list)       # the lr each step applied
    losses: list[float] = field(default_factory=list)    # that step's batch loss
    smoothed: list[float] = field(default_factory=list)  # zero-lag smoothing of `losses`, up
                                                         # to where the loss explodes
    steepest: float = math.nan    # lr of the steepest descent of the smoothed curve
    lr_at_min: float = math.nan   # lr at the smoothed curve's minimum
    status: str = "completed"     # completed (reached max_lr) | diverged (stopped early)
    safety: float = 3.0           # lr_find.safety: how far below the minimum the suggestion sits

    @property
    def suggested(self) -> float:
        """The lr to train with, and the top of a search range: the minimum's lr / `safety`.

        Each lr of the range test is applied for a step or two while the loss still rides on the
        progress made at lower lrs, so its minimum sits at the edge of what a whole run at a
        constant lr survives. On the digits CNN (minimum near 0.25; 3 epochs, 2 seeds) runs end
        at 0.93 accuracy at lr 0.3, 0.97 at 0.1 and at chance at 1.0. A factor of 3 (half a
        decade, one step of the usual lr grid) keeps the suggestion on the side that trains.
        """
        return self.lr_at_min / self.safety


def ema(values: Sequence[float], beta: float) -> np.ndarray:
    """Exponential moving average with bias correction (the first points are not pulled to 0)."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def smooth(losses: Sequence[float], beta: float) -> np.ndarray:
    """The EMA run forwards then backwards, so the smoothed curve does not lag behind the lr.

    A one-way EMA of ~1/(1-beta) steps shifts the curve to higher lrs by as many steps, which
    would move the suggestion towards the explosion.
    """
    return ema(ema(losses, beta)[::-1], beta)[::-1]


def explosion_start(losses: Sequence[float], beta: float, diverge: float) -> int:
    """The first step whose loss exceeds `diverge` x the lowest smoothed loss before it.

    The points from there on are left out of the smoothing: smoothed backwards, an explosion to
    100x would leak into the steps before it and hide the minimum.
    """
    avg, best = 0.0, math.inf
    for i, loss in enumerate(losses):
        if loss > diverge * best:
            return i
        avg = beta * avg + (1 - beta) * loss
        best = min(best, avg / (1 - beta ** (i + 1)))
    return len(losses)


def suggest(lrs: Sequence[float], smoothed: Sequence[float], skip_start: int = 5
            ) -> tuple[float, float]:
    """(steepest-descent lr, lr at the minimum) of a smoothed loss-versus-lr curve.

    The slope is taken against log10(lr), the axis the lr moves along; only points before the
    minimum count, so the steepest point lies on the descending part of the curve.
    """
    lrs, smoothed = np.asarray(lrs, float), np.asarray(smoothed, float)
    if len(lrs) < 3:
        raise ValueError(f"need at least 3 points to suggest an lr, got {len(lrs)}")
    lowest = int(np.nanargmin(smoothed))
    start = min(skip_start, max(lowest - 1, 0))
    if lowest - start < 2:  # the minimum is at the start: the curve only rises
        return float(lrs[lowest]), float(lrs[lowest])
    slope = np.gradient(smoothed, np.log10(lrs))
    steepest = start + int(np.argmin(slope[start:lowest + 1]))
    return float(lrs[steepest]), float(lrs[lowest])


def bounds_from(result: LRFindResult) -> tuple[float, float]:
    """An lr search range read off a range test: (low, high) for a log-uniform search.

    high = the suggested lr (the minimum's / `safety`: a short run there still learns, where one
    at the minimum itself may not); low = a tenth of the smaller of the steepest-descent lr and
    high/10, so the range spans at least two decades and holds the steepest descent when that
    lies below high.
    """
    high = result.suggested
    low = min(result.steepest, high / 10) / 10
    return float(low), float(high)


def settings_of(cfg: DictConfig) -> DictConfig:
    """The `lr_find` settings of `cfg` on top of the group's defaults.

    A config composed without the group (the study's, from conf/sweep.yaml) gets
    conf/lr_find/default.yaml as it is; an experiment's partial `lr_find:` block still applies.
    """
    defaults = OmegaConf.load(CONF_DIR / "lr_find" / "default.yaml")
    return OmegaConf.merge(defaults, cfg.lr_find if "lr_find" in cfg else {})


def check(cfg: DictConfig) -> None:
    """The `lr_find` settings of `cfg` (`settings_of`), checked before anything is built; raises
    ConfigError. The app's check (conf/lr_find.yaml), run before Hydra's output folder exists."""
    s = settings_of(cfg)
    check_positive("lr_find.min_lr", s.min_lr)
    check_positive("lr_find.max_lr", s.max_lr)
    if not s.max_lr > s.min_lr:
        fail("lr_find.max_lr", s.max_lr, f"must be above lr_find.min_lr={s.min_lr}")
    check_int_at_least("lr_find.steps", s.steps, 3)
    check_in_range("lr_find.smoothing", s.smoothing, 0.0, 1.0, low_open=False, high_open=True)
    check_positive("lr_find.diverge", s.diverge)
    if s.diverge <= 1:
        fail("lr_find.diverge", s.diverge, "must be > 1 (a factor on the lowest smoothed loss)")
    check_int_at_least("lr_find.skip_start", s.skip_start, 0)
    check_positive("lr_find.safety", s.safety)
    if s.safety < 1:
        fail("lr_find.safety", s.safety, "must be >= 1 (the suggestion is the minimum's lr / it)")


def lr_find(cfg: DictConfig, settings: DictConfig | None = None, tracker: Any = None
            ) -> LRFindResult:
    """Run the range test on the configured model, data and optimizer (its lr is replaced).

    `settings` default to `settings_of(cfg)`; the caller has checked them and `cfg`.
    """
    s = settings if settings is not None else settings_of(cfg)

    # 1. Build the parts exactly as a training run would, then keep each group's lr ratio.
    parts = setup(cfg)
    model, optimizer, data, gen = parts.model, parts.optimizer, parts.data, parts.gen
    scales = [g["lr"] / cfg.optimizer.lr for g in optimizer.param_groups]  # per-layer lr_scale
    batch_size, num_workers = cfg.trainer.batch_size, cfg.trainer.num_workers

    # 2. lr_i = min_lr * (max_lr/min_lr)^(i/(steps-1)); stop once the smoothed loss explodes.
    result = LRFindResult(safety=float(s.safety))
    avg, best, step = 0.0, math.inf, 0
    model.train()
    while step < s.steps and result.status == "completed":
        for xb, yb in batches(data, parts.device, batch_size, num_workers, gen, parts.on_device):
            if data.augment:
                xb = augment_batch(xb, generator=gen, **data.augment)
            lr = s.min_lr * (s.max_lr / s.min_lr) ** (step / (s.steps - 1))
            for group, scale in zip(optimizer.param_groups, scales, strict=True):
                group["lr"] = lr * scale
            loss = parts.loss_fn(model(xb).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                result.status = "diverged"
                break
            avg = s.smoothing * avg + (1 - s.smoothing) * value
            online = avg / (1 - s.smoothing ** (step + 1))
            result.lrs.append(lr)
            result.losses.append(value)
            if tracker is not None:
                tracker.log_step(step, {"lr_find/lr": lr, "lr_find/loss": value,
                                        "lr_find/smoothed_online": online})
            best = min(best, online)
            step += 1
            if online > s.diverge * best:
                result.status = "diverged"
                break
            if step >= s.steps:
                break

    # 3. Read the suggestions off the zero-lag smoothed curve.
    if len(result.lrs) < 3:
        fail("lr_find.min_lr", s.min_lr, f"the loss exploded within {len(result.lrs) + 1} steps "
             "of it; choose a lower one")
    cut = max(explosion_start(result.losses, s.smoothing, s.diverge), 3)
    result.smoothed = smooth(result.losses[:cut], s.smoothing).tolist()
    result.steepest, result.lr_at_min = suggest(result.lrs[:cut], result.smoothed, s.skip_start)
    return result


def suggest_lr_bounds(cfg: DictConfig) -> tuple[float, float]:
    """Run the range test for `cfg` (no tracking) and return `bounds_from` its curve.

    What `study.lr_bounds=auto` uses to set the lr search range before the trials start; the
    settings are the group's defaults unless `cfg` has an `lr_find` block.
    """
    check(cfg)
    validate(cfg)
    return bounds_from(lr_find(cfg, settings_of(cfg)))


# --- outputs ----------------------------------------------------------------------------------

def lr_find_figure(result: LRFindResult, title: str = "LR range test"):
    """Loss against lr (log axis): raw steps faint, smoothed solid, both suggestions marked."""
    fig = Figure(figsize=(7, 4.5))  # matplotlib's Agg canvas: no display, no pyplot state
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="batch loss")
    ax.plot(result.lrs[:len(result.smoothed)], result.smoothed, color="C0", lw=2,
            label="smoothed (until the loss explodes)")
    for lr, color, label in ((result.steepest, "C3", "steepest descent"),
                             (result.suggested, "C2", f"suggested: minimum / {result.safety:g}")):
        ax.axvline(lr, color=color, ls="--", lw=1.2, label=f"{label}: {lr:.3g}")
    ax.axvline(result.lr_at_min, color="0.4", ls=":", lw=1,
               label=f"minimum: {result.lr_at_min:.3g}")
    # Keep the explosion from flattening the interesting part: cap at a bit above the start.
    smoothed = np.asarray(result.smoothed)
    top = max(smoothed[: max(len(smoothed) // 10, 1)].max(), smoothed.min()) * 1.3
    bottom = min(np.min(result.losses), smoothed.min())
    ax.set_ylim(bottom - 0.05 * (top - bottom), top)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"{title}\n{result.status} after {len(result.lrs)} steps", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curve_csv(result: LRFindResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "lr", "loss", "smoothed"])
    for i, (lr, loss) in enumerate(zip(result.lrs, result.losses, strict=True)):
        smoothed = f"{result.smoothed[i]:.6g}" if i < len(result.smoothed) else ""
        writer.writerow([i, f"{lr:.6g}", f"{loss:.6g}", smoothed])
    return buf.getvalue()


def lr_override(lr: float) -> str:
    """`optimizer.lr=0.00316`: three significant digits, about the precision a range test has."""
    return "optimizer.lr=" + override_text(float(f"{lr:.3g}"))


def summary(result: LRFindResult) -> str:
    """What to paste: the suggested lr as an override, with the steepest descent beside it."""
    low, high = bounds_from(result)
    return (f"lr range test {result.status} after {len(result.lrs)} steps "
            f"(lr {result.lrs[0]:.3g} -> {result.lrs[-1]:.3g}; lowest smoothed loss at "
            f"{result.lr_at_min:.3g})\n"
            f"suggested:                     {lr_override(result.suggested)}  "
            f"(that minimum / lr_find.safety={result.safety:g})\n"
            f"steepest descent:              {lr_override(result.steepest)}\n"
            f"search range for a study:      {low:.3g} .. {high:.3g}")


def run(cfg: DictConfig, out_dir: Path) -> LRFindResult:
    """The range test inside an MLflow run; writes the plot, the curve and the summary to
    `out_dir`. `cfg` (with its `lr_find` group) is checked already."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with mlflow_run(cfg, run_name_=f"lr_find-{run_name(cfg)}", tags={"kind": "lr_find"}) as tracker:
        result = lr_find(cfg, cfg.lr_find, tracker)
        fig = lr_find_figure(result, f"LR range test: {run_name(cfg)}")
        fig.savefig(out_dir / "lr_find.png", dpi=120)
        (out_dir / "lr_find.csv").write_text(curve_csv(result))
        (out_dir / "summary.txt").write_text(summary(result) + "\n")
        if tracker is not None:
            low, high = bounds_from(result)
            tracker.log_step(len(result.lrs), {
                "lr_find/steepest": result.steepest, "lr_find/lr_at_min": result.lr_at_min,
                "lr_find/suggested": result.suggested, "lr_find/bound_low": low,
                "lr_find/bound_high": high})
            tracker.set_tags({"status": result.status,
                              "suggested_override": lr_override(result.suggested)})
            tracker.log_artifact(out_dir / "lr_find.png", "plots")
            tracker.log_artifact(out_dir / "lr_find.csv")
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="lr_find")
def main(cfg: DictConfig) -> float:
    """Run the range test; returns the suggested lr, for multirun sweepers."""
    hydra_cfg = HydraConfig.get()
    cfg = with_choices(cfg, hydra_cfg.runtime.choices)
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        check(cfg)  # everything checkable, before the data loads or a run opens
        validate(cfg)
        result = run(cfg, out_dir)
    except (ConfigError, DataError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary(result))
    print(f"plot and curve written to {out_dir}")
    return result.suggested


if __name__ == "__main__":
    main()
