"""Named moments where a test can kill this process for real (`SWEEP_KILL_AT=<moment>`).

Crash-safety claims ("a trial whose training finished is never lost") are only worth what a real
SIGKILL at the worst moment shows. A timer in the test cannot hit a window of milliseconds; the
process itself can. Unset, each point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

MOMENTS = ("mid_trial", "pruned", "after_train", "confirm", "summary")


def point(moment: str) -> None:
    """SIGKILL this process here if `SWEEP_KILL_AT` names this moment."""
    if os.environ.get("SWEEP_KILL_AT") == moment:
        os.kill(os.getpid(), signal.SIGKILL)
