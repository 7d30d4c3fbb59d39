"""Named moments where a test can kill this process for real (`SWEEP_KILL_AT=<moment>`), or
press Ctrl-C in it (`SWEEP_INTERRUPT_AT=<moment>`).

Crash-safety claims ("a trial whose training finished is never lost") are only worth what a real
SIGKILL (or SIGINT) at the worst moment shows. A timer in the test cannot hit a window of
milliseconds; the process itself can. Unset, each point costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal

MOMENTS = ("asked", "mid_trial", "pruned", "after_train", "confirm", "summary")


def point(moment: str) -> None:
    """SIGKILL this process here if `SWEEP_KILL_AT` names this moment; SIGINT (Ctrl-C: Python's
    KeyboardInterrupt, raised right here) if `SWEEP_INTERRUPT_AT` does."""
    if os.environ.get("SWEEP_KILL_AT") == moment:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SWEEP_INTERRUPT_AT") == moment:
        os.kill(os.getpid(), signal.SIGINT)
