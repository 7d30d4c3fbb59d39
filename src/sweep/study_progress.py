"""The study's progress in one line, read from the storage after each trial or confirmation run:
trials done of the budget per schedule, how many run now, were pruned or diverged, the time
since this process started, and the time left at the rate the study has been finishing work
meanwhile. Every number comes from the storage, so it counts the work of every process."""

from __future__ import annotations

import math
import time
from collections import Counter

import optuna

from sweep.study_optuna import trial_state

FINISHED = ("complete", "pruned", "diverged", "failed")


class Progress:
    """One phase's progress (search or confirmation), as seen by this process."""

    def __init__(self, phase: str):
        self.phase = phase
        self.started = time.monotonic()
        self.done_at_start: int | None = None  # work finished before this process looked

    def line(self, studies: dict[str, optuna.Study], totals: dict[str, int]) -> str:
        """`search 14/32 (step 4/8, cosine 3/8, ...) | 2 running, 3 pruned, 1 diverged |
        1m12s elapsed, about 2m left`; `studies` and `totals` by schedule."""
        states = {name: Counter(trial_state(t) for t in study.get_trials(deepcopy=False))
                  for name, study in studies.items()}
        done = {name: min(sum(c[s] for s in FINISHED), totals[name])
                for name, c in states.items()}
        overall = Counter()
        for c in states.values():
            overall.update(c)
        finished, total = sum(done.values()), sum(totals[name] for name in studies)
        if self.done_at_start is None:
            self.done_at_start = finished
        elapsed = time.monotonic() - self.started
        rate = (finished - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        left = "done" if finished >= total else (
            f"about {duration((total - finished) / rate)} left" if rate > 0 else "time left: ?")
        per_schedule = ", ".join(f"{name} {done[name]}/{totals[name]}" for name in studies)
        counts = [f"{overall['running']} running"] + [
            f"{overall[s]} {s}" for s in ("pruned", "diverged", "failed") if overall[s]]
        return (f"  [{self.phase} {finished}/{total} ({per_schedule}) | {', '.join(counts)} | "
                f"{duration(elapsed)} elapsed, {left}]")


def duration(seconds: float) -> str:
    """`45s`, `3m05s`, `1h02m`: as precise as a person reads an estimate."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
