"""The study's progress line, counted from a real Optuna storage as any process would see it."""

import optuna
from optuna.trial import TrialState

from sweep.study_progress import Progress, duration


def schedule_study(storage, name, states):
    """A study whose trials ended in `states` (our names: complete, pruned, diverged, running)."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for state in states:
        trial = study.ask()
        if state == "running":
            continue
        trial.set_user_attr("state", state)
        if state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:  # a diverged trial is told as COMPLETE with the schedule's worst value
            study.tell(trial, 0.1 if state == "diverged" else 0.9)
    return study


def test_the_line_counts_every_state_per_schedule_and_estimates_the_time_left():
    storage = optuna.storages.InMemoryStorage()
    studies = {"step": schedule_study(storage, "s/step", ["complete", "pruned", "running"]),
               "cosine": schedule_study(storage, "s/cosine", ["diverged"])}
    progress = Progress("search")
    first = progress.line(studies, {"step": 4, "cosine": 4})
    assert first.startswith("  [search 3/8 (step 2/4, cosine 1/4) | 1 running, 1 pruned, "
                            "1 diverged | ")
    assert first.endswith("elapsed, time left: ?]")  # nothing finished since it started

    studies["cosine"].tell(studies["cosine"].ask(), 0.8)  # another process finishes a trial
    assert "search 4/8 (step 2/4, cosine 2/4)" in progress.line(studies, {"step": 4, "cosine": 4})
    assert "left]" in progress.line(studies, {"step": 4, "cosine": 4})


def test_a_finished_phase_says_done():
    storage = optuna.storages.InMemoryStorage()
    studies = {"step": schedule_study(storage, "s/step/confirm", ["complete", "complete"])}
    line = Progress("confirm").line(studies, {"step": 2})
    assert line.startswith("  [confirm 2/2 (step 2/2) | 0 running | ") and line.endswith(", done]")


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (4.4, 59.6, 185, 3725)] == ["4s", "1m00s", "3m05s", "1h02m"]
