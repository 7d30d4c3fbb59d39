"""Many runs to train: fused in groups where their configs allow it, one at a time where not.

Every command that trains several configs (the sensitivity grid, a study's confirmations and
search, a Hydra multirun with `hydra/launcher=fused`) plans them with `groups(cfgs, fuse)` and
trains each group with `train_group`, so a user who never sets `fuse` gets the same runs sooner
(the same computation; in float32 the same to rounding, which a chaotic run amplifies as it
would any change of summation order), and one log line for what trains alone and why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sweep.config import AUTO_FUSE
from sweep.data import dataset_key, load_data
from sweep.fused.groups import fusable, slower_fused
from sweep.fused.loop import train_fused
from sweep.train import Callback, TrainResult, train

log = logging.getLogger("sweep.fused")


def fuse_size(value: Any) -> int:
    """The most runs one group may hold."""
    return AUTO_FUSE if value == "auto" else int(value)


def groups(cfgs: Sequence[DictConfig], fuse: Any) -> list[list[int]]:
    """Indices of `cfgs` to train together, each group at most `fuse` runs, in the order of their
    first run; a config that cannot fuse (or, under `fuse=auto`, would train slower fused) is a
    group of one, and one log line per reason says so.
    """
    size = fuse_size(fuse)
    if size == 1 or len(cfgs) < 2:
        return [[i] for i in range(len(cfgs))]
    # `auto` fuses what pays; an explicit size fuses whatever can.
    slower = {i: why for i, cfg in enumerate(cfgs)
              if fuse == "auto" and (why := slower_fused(cfg)) is not None}
    rest = [i for i in range(len(cfgs)) if i not in slower]
    together, reasons = fusable([cfgs[i] for i in rest], size)
    together = [[rest[k] for k in group] for group in together]
    reasons = {**{rest[k]: why for k, why in reasons.items()}, **slower}
    by_reason: dict[str, list[int]] = {}
    for i, why in reasons.items():
        by_reason.setdefault(why, []).append(i)
    for why, alone in by_reason.items():
        log.warning("fuse=%s: %d of %d runs train one at a time: %s", fuse, len(alone), len(cfgs),
                    why)
    planned = [part for group in together for part in fitting(cfgs, group, fuse)]
    planned += [[i] for i in reasons]
    return sorted(planned, key=lambda group: group[0])


def fitting(cfgs: Sequence[DictConfig], group: list[int], fuse: Any) -> list[list[int]]:
    """`group` in parts whose members' data fit `trainer.device_data_max_mb` on the device.

    Members whose seed gives them their own split (`dataset.seed: ${seed}`) each hold a copy of
    the data, twice while fused (loaded, and stacked beside the others'): 16 MNIST members would
    be 6 GB. Members that share one dataset share its memory.
    """
    if len({dataset_key(cfgs[i].dataset) for i in group}) == 1:
        return [group]
    each = load_data(cfgs[group[0]].dataset).nbytes  # what the first member trains on anyway
    budget = cfgs[group[0]].trainer.device_data_max_mb * 2**20
    most = max(1, int(budget // (2 * each)))
    if most >= len(group):
        return [group]
    log.warning("fuse=%s: at most %d runs at once here: each has its own split of %s (%.0f MB, "
                "twice while fused) within trainer.device_data_max_mb=%s", fuse, most,
                cfgs[group[0]].dataset.get("_target_"), each / 2**20,
                cfgs[group[0]].trainer.device_data_max_mb)
    return [group[k:k + most] for k in range(0, len(group), most)]


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
