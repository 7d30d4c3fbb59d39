"""Where a study's extra workers run: processes on this machine, or Ray tasks on a cluster.

A launcher only places workers; every worker runs the same loop (`sweep.study_worker.Worker`)
and takes its work from the storage, so a worker started by Ray, by hand in another terminal or
on another machine is the same thing.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
from collections.abc import Callable

from sweep.study_plan import Plan


def work(plan: Plan) -> None:
    """One worker: share the cores, then pull work from the storage until none is left."""
    import optuna
    import torch

    from sweep.study_worker import Worker

    torch.set_num_threads(plan.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Worker(plan).run()


def worker_process(plan: Plan) -> None:
    try:
        work(plan)
    except KeyboardInterrupt:  # its trial is already recorded as interrupted
        sys.exit(130)


def local_processes(plan: Plan, count: int) -> Callable[[], None]:
    """Start `count` worker processes; returns the function that waits for them."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch threads or MLflow state
    procs = [ctx.Process(target=worker_process, args=(plan,), name=f"worker-{i + 1}")
             for i in range(count)]
    for p in procs:
        p.start()

    def join() -> None:
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:  # they got the same Ctrl-C; let them record their trial
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
            raise
        for p in procs:
            if p.exitcode:
                print(f"warning: {p.name} exited with code {p.exitcode}; its running trial is "
                      "re-run by another worker once its heartbeat is stale", file=sys.stderr)
    return join


def ray_tasks(plan: Plan, count: int) -> Callable[[], None]:
    """Start `count` workers as Ray tasks with the study's resources per trial.

    `ray.init` connects to `study.ray_address`, else $RAY_ADDRESS, else starts a local Ray. Ray
    re-runs a task whose node died (max_retries); its trial is re-run through the heartbeat.
    """
    import ray

    s = plan.settings
    # Ray holds back lines that look alike for seconds to merge them; a trial log reads in order.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started_here = not ray.is_initialized()
    if started_here:
        address = s["ray_address"] or os.environ.get("RAY_ADDRESS")
        kwargs = {} if address else {"num_cpus": cores(), "include_dashboard": False}
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True,
                 logging_level="WARNING", **kwargs)
    task = ray.remote(num_cpus=s["cpus_per_trial"], num_gpus=s["gpus_per_trial"],
                      max_retries=3)(work)
    refs = [task.remote(plan) for _ in range(count)]

    def join() -> None:
        try:
            ray.get(refs)
        finally:
            if started_here:
                ray.shutdown()
    return join


def launch(plan: Plan) -> Callable[[], None]:
    """Start the study's extra workers; returns the function that waits for them.

    Locally the command itself is one of `study.workers`; with Ray every worker is a task and the
    command only picks up what is left when they are done.
    """
    if plan.settings["launcher"] == "ray":
        return ray_tasks(plan, plan.workers)
    if plan.workers > 1:
        return local_processes(plan, plan.workers - 1)
    return lambda: None


def cores() -> int:
    """The cores this process may use (`taskset` and containers limit them), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_worker(settings: dict, workers: int) -> int:
    """Torch threads per worker: the trial's CPUs on Ray, else this machine's cores shared, so N
    workers on N cores each get one instead of oversubscribing them."""
    if settings["launcher"] == "ray":
        return max(1, math.ceil(settings["cpus_per_trial"]))
    return max(1, cores() // workers)
