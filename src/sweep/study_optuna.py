"""The Optuna side of a study: search spaces, samplers, pruners, storage and trial accounting.

Every function here works on Optuna objects and plain settings (`cfg.study` as a dict), so the
study's orchestration in `sweep.study` reads without Optuna's details.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweep.study_plan import override_text

# --- search spaces -----------------------------------------------------------------------------

def optuna_choice(choice: Any) -> Any:
    # Optuna stores only scalars; a list choice (milestones) is kept as its override text.
    return override_text(choice) if isinstance(choice, list | tuple) else choice


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict[str, Any]:
    """Sample one value per search-space key (`optimizer.lr`, `scheduler.gamma`, ...), as the
    values to train with (a list choice comes back as the list, not Optuna's text for it)."""
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, spec["low"], spec["high"],
                                              log=bool(spec.get("log")), step=spec.get("step"))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, spec["low"], spec["high"],
                                            step=spec.get("step") or 1, log=bool(spec.get("log")))
        else:
            by_text = {optuna_choice(c): c for c in spec["choices"]}
            params[key] = by_text[trial.suggest_categorical(key, list(by_text))]
    return params


def grid_values(spec: dict, points: int) -> list[Any]:
    """The grid sampler's values for one key: `points` values across the range, or the choices."""
    import numpy as np

    if spec["type"] == "categorical":
        return [optuna_choice(c) for c in spec["choices"]]
    low, high = spec["low"], spec["high"]
    values = np.geomspace(low, high, points) if spec.get("log") else np.linspace(low, high, points)
    if spec.get("step"):  # snap onto the declared step
        values = low + np.round((values - low) / spec["step"]) * spec["step"]
    if spec["type"] == "int":
        return sorted({int(round(v)) for v in values})
    return sorted({float(v) for v in values})


# --- samplers, pruners, storage ----------------------------------------------------------------

def make_sampler(s: dict, space: dict[str, dict], seed: int) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded so that a study is reproducible."""
    if s["sampler"] == "tpe":
        # constant_liar: trials running in other processes count as bad guesses, so parallel
        # workers spread out instead of all proposing the current best region.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s["startup_trials"],
                                          constant_liar=True)
    if s["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s["sampler"] == "grid":
        grid = {key: grid_values(spec, s["grid_points"]) for key, spec in space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if s["sampler"] == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s["startup_trials"],
                                            warn_independent_sampling=False)
    return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)


def make_pruner(s: dict, epochs: int) -> optuna.pruners.BasePruner:
    """The configured pruner; trials report their validation metric once per epoch."""
    if s["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s["prune_after"],
                                           n_warmup_steps=s["warmup_epochs"])
    first_rung = max(1, s["warmup_epochs"])
    if s["pruner"] == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung,
                                                      reduction_factor=s["reduction_factor"])
    if s["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first_rung, max_resource=epochs,
                                              reduction_factor=s["reduction_factor"])
    return optuna.pruners.NopPruner()


# --- trials and the budget ---------------------------------------------------------------------

def trial_state(t: FrozenTrial) -> str:
    """complete | pruned | diverged | failed | interrupted | surplus | duplicate | running |
    waiting. A trial that FAILed without saying why was killed: its process never told."""
    if t.state == TrialState.FAIL:
        return t.user_attrs.get("state", "interrupted")
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return t.user_attrs.get("state", t.state.name.lower())
    return t.state.name.lower()


def counts(t: FrozenTrial) -> bool:
    """Whether a trial has used up budget. Interrupted, surplus and duplicate trials have not, so
    their work runs again; a trial that raised has (it would most likely raise again); a running
    trial will; a waiting (queued) one has not yet: the next `ask` runs it."""
    return trial_state(t) not in ("interrupted", "surplus", "duplicate", "waiting")


def used_budget(study: optuna.Study, before: int | None = None) -> int:
    trials = study.get_trials(deepcopy=False)
    return sum(counts(t) for t in trials if before is None or t.number < before)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best trial that ran to the end (diverged trials carry a penalty value, never best)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if trial_state(t) == "complete" and t.value is not None and math.isfinite(t.value)]
    if not done:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(done, key=lambda t: t.value)


def diverged_value(study: optuna.Study, metric: str, history: list[dict]) -> float:
    """The worst value this schedule's study has seen, given to a diverged trial.

    Diverged trials are told to Optuna as COMPLETE with this penalty rather than as FAIL: Optuna's
    samplers ignore FAIL trials, so TPE would keep proposing the lr that blew up, and parameter
    importances would miss that lr matters. `user_attrs["state"] = "diverged"` keeps them out of
    the best configurations and counts them apart in the summary.
    """
    seen = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    seen += [h[metric] for h in history if math.isfinite(h.get(metric, math.nan))]
    if study.direction == optuna.study.StudyDirection.MAXIMIZE:
        return min(seen, default=0.0)
    return max(seen, default=1e12)  # an error larger than anything a real run reports
