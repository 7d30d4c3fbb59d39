"""Many runs to train: fused in groups where their configs allow it, one at a time where not.

Every command that trains several configs (the sensitivity grid, a study's confirmations and
search, a Hydra multirun with `hydra/launcher=fused`) plans them with `groups(cfgs, fuse)` and
trains each group with `train_group`, so a user who never sets `fuse` gets the same runs, sooner,
and one log line for what trains alone and why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sweep.config import AUTO_FUSE
from sweep.fused.groups import fusable
from sweep.fused.loop import train_fused
from sweep.train import Callback, TrainResult, train

log = logging.getLogger("sweep.fused")


def fuse_size(value: Any) -> int:
    """The most runs one group may hold."""
    return AUTO_FUSE if value == "auto" else int(value)


def groups(cfgs: Sequence[DictConfig], fuse: Any) -> list[list[int]]:
    """Indices of `cfgs` to train together, each group at most `fuse` runs, in the order of their
    first run; a config that cannot fuse is a group of one, and one log line per reason says so.
    """
    size = fuse_size(fuse)
    if size == 1 or len(cfgs) < 2:
        return [[i] for i in range(len(cfgs))]
    together, reasons = fusable(cfgs, size)
    by_reason: dict[str, list[int]] = {}
    for i, why in reasons.items():
        by_reason.setdefault(why, []).append(i)
    for why, alone in by_reason.items():
        log.warning("fuse=%s: %d of %d runs train one at a time: %s", fuse, len(alone), len(cfgs),
                    why)
    planned = together + [[i] for i in reasons]
    return sorted(planned, key=lambda group: group[0])


def train_group(cfgs: Sequence[DictConfig], callbacks: Sequence[Callback | None] | None = None,
                trackers: Sequence[Any] | None = None,
                output_dirs: Sequence[str | Path | None] | None = None) -> list[TrainResult]:
    """Train one group from `groups`: fused when it holds several configs, `train` when one.
    Each run's folder (`output_dirs[i]`) gets its metrics.csv and result.json either way."""
    n = len(cfgs)
    callbacks = list(callbacks) if callbacks is not None else [None] * n
    trackers = list(trackers) if trackers is not None else [None] * n
    output_dirs = list(output_dirs) if output_dirs is not None else [None] * n
    if n == 1:
        return [train(cfgs[0], callback=callbacks[0], tracker=trackers[0],
                      output_dir=output_dirs[0])]
    return train_fused(cfgs, callbacks=callbacks, trackers=trackers, output_dirs=output_dirs)
