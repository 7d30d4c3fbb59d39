"""Time fused trials against the same runs one after another; print unfused / fused wall time.

The work is the BN article's MLP (3 hidden layers of 4, tanh) on its synthetic regression data,
plain SGD, 40 epochs in batches of 50, at lrs 0.1, 0.03, 0.01 and 0.005 crossed with seeds (16 or
64 members); 16 members with BatchNorm before the activation; and 16 of the default digits CNN
(dropout 0.25), 5 epochs, SGD with momentum, on both cores (`--device cuda` on a GPU). One
after another is `sweep.train.train(cfg)` per config; fused is `sweep.fused.train_fused(cfgs)`.
Both evaluate
after every epoch (val and the training split in eval mode) and track nothing (tracking=none:
MLflow's per-run cost is the study's, not the trainer's). Each case is timed twice: end to end
(each member's config checked, its data, model, optimizer and schedule built, then trained), and
training only (`setup(cfg)` / `member_parts(cfgs)` built outside the clock; both still check
each config and build its schedule). Both run on one torch thread, as the BN study does
(several threads are slower on width-4 nets). Repeats are interleaved, unfused then fused; the
ratio is each repeat's pair, printed as the median and range.

`--engines` times the choice inside fusion: one training step of 16 members by
`torch.func.vmap` over `functional_call` with stacked module state, against `sweep.fused`'s
batched matmuls (both forward, backward and the same SGD update).

`--study-bn` times the whole command a user types, `make study-bn` with 5 seeds (80 runs, MLflow
on, a SQLite store in a scratch folder that a first untimed run of each kind creates):
`python -m sweep.sensitivity experiment=bn_sensitivity sensitivity.seeds=[929,1,2,3,4]` with
`fuse=1` against the default `fuse=auto`, each in its own process, interleaved. It prints the
command's wall time (Python's start and imports included) and the study's own seconds (its grid
trained and tracked, then read back from the store and analysed); then a bound: the fused
command with `tracking=none` plus the seconds MLflow's public API alone takes to write the same
runs (each created, its params, metric points and tags in a `log_batch` each, and ended, into a
fresh SQLite store), against `fuse=1`.

`resnet8` (for a GPU: `--device cuda --only cnn16 resnet8`) is 8 ResNet-18s on CIFAR-10-sized
random images (`dataset=synthetic_images`), 2 epochs, bf16 autocast (trainer.amp=auto on CUDA);
on CUDA each timed block also samples the GPU's utilisation through NVML.

    python scripts/bench_fused.py [--repeats 5] [--only mlp16 mlp64 bn16 cnn16] [--engines]
    python scripts/bench_fused.py --device cuda --only cnn16 resnet8 [--repeats 3]
    python scripts/bench_fused.py --study-bn [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from sweep.config import compose
from sweep.fused import member_parts, train_fused
from sweep.fused.model import LayerFusedModel
from sweep.train import setup, train

ARTICLE = ["dataset=synthetic_regression", "model=mlp", "model.hidden=[4,4,4]",
           "model.activation=tanh", "optimizer=sgd", "optimizer.momentum=0",
           "scheduler=constant", "trainer.epochs=40", "trainer.batch_size=50", "trainer.loss=mse",
           "trainer.amp=off", "trainer.device=cpu", "trainer.progress=false", "tracking=none"]
LRS = (0.1, 0.03, 0.01, 0.005)
# The default CNN (32 and 64 channels, dropout 0.25) on digits, 5 epochs in batches of 64, on
# both cores: its convolutions use them, alone as fused.
DIGITS_CNN = ["dataset=digits", "model=cnn", "optimizer=sgd", "optimizer.momentum=0.9",
              "scheduler=constant", "trainer.epochs=5", "trainer.device=cpu",
              "trainer.progress=false", "tracking=none"]
# ResNet-18 on CIFAR-10-sized random images (synthetic_images: 4096 training and 1024 validation
# images of 3x32x32), 2 epochs in batches of 128, SGD with momentum; for a GPU (`--device cuda`),
# where `fuse=auto` fuses it (on a CPU it trains alone).
RESNET = ["dataset=synthetic_images", "dataset.n_samples=5120", "model=resnet18", "optimizer=sgd",
          "optimizer.momentum=0.9", "scheduler=cosine", "trainer.epochs=2",
          "trainer.batch_size=128", "trainer.progress=false", "tracking=none"]
CASES = {"mlp16": (16, "none"), "mlp64": (64, "none"), "bn16": (16, "pre"), "cnn16": (16, "cnn"),
         "resnet8": (8, "resnet")}
# Cases whose models run on `--device` (the others are the BN study's, on the CPU).
ON_DEVICE = ("cnn", "resnet")


def configs(members: int, bn: str) -> list:
    """`members` configs: each lr with seeds 929, 1, 2, ... (the BN study's grid); bn="cnn": the
    digits CNN instead, at lrs a tenth of those."""
    seeds = [929, *range(1, members // len(LRS))]
    if bn == "resnet":
        return [compose([*RESNET, f"seed={seed}", f"optimizer.lr={lr}"])
                for seed in seeds for lr in LRS]
    if bn == "cnn":
        return [compose([*DIGITS_CNN, f"seed={seed}", f"optimizer.lr={lr / 10}"])
                for seed in seeds for lr in LRS]
    return [compose([*ARTICLE, f"model.bn={bn}", f"seed={seed}", f"optimizer.lr={lr}"])
            for seed in seeds for lr in LRS]


class GpuLoad:
    """The GPU's utilisation (NVML's share of time a kernel ran, in %) sampled every 20 ms while
    the block runs; `mean` is None where NVML (nvidia-ml-py) or a GPU is not there."""

    def __init__(self, device: str):
        self.samples: list[int] = []
        self.handle = None
        if device.startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            except Exception:  # no NVML here: times only
                self.handle = None

    def __enter__(self) -> GpuLoad:
        self.samples, self.running = [], True
        if self.handle is not None:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        if self.handle is not None:
            self.thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def one_after_another(cfgs: list, out: str, built: bool) -> float:
    """Seconds to train each config alone; `built`: each member's parts built outside the clock."""
    parts = [setup(cfg) for cfg in cfgs] if built else [None] * len(cfgs)
    start = time.perf_counter()
    for cfg, part in zip(cfgs, parts, strict=True):
        train(cfg, output_dir=out, parts=part)
    return time.perf_counter() - start


def fused(cfgs: list, built: bool) -> float:
    """Seconds to train the configs fused; `built`: the members' parts built outside the clock."""
    parts = member_parts(cfgs) if built else None
    start = time.perf_counter()
    train_fused(cfgs, parts=parts)
    return time.perf_counter() - start


def engine_steps(bn: str) -> dict:
    """For 16 members: one training step by vmap, and one by batched matmuls, on one batch."""
    parts = member_parts(configs(16, bn))
    models = [p.model for p in parts]
    x = torch.stack([p.data.x_train[:50] for p in parts])
    y = torch.stack([p.data.y_train[:50] for p in parts])
    lr = torch.full((16, 1), 0.01)

    params, buffers = stack_module_state(copy.deepcopy(models))
    base = copy.deepcopy(models[0]).to("meta")

    def member_loss(p, b, xb, yb):
        return F.mse_loss(functional_call(base, (p, b), (xb,)), yb)

    step_grads = vmap(grad_and_value(member_loss), randomness="different")

    def by_vmap() -> None:
        grads, _ = step_grads(params, buffers, x, y)
        with torch.no_grad():
            for key, p in params.items():
                p.sub_(grads[key] * lr.view(-1, *[1] * (p.dim() - 1)))

    model = LayerFusedModel(models)

    def by_bmm() -> None:
        loss = F.mse_loss(model.forward(x, True), y, reduction="none").flatten(1).mean(1)
        grad = model.flat_grads(torch.autograd.grad(loss.sum(), model.params))
        with torch.no_grad():
            model.flat.sub_(grad * lr)

    return {"vmap": by_vmap, "bmm": by_bmm}


def engines(steps: int, repeats: int) -> None:
    """Milliseconds a step of each engine, interleaved, medians of `repeats` x `steps`."""
    for bn in ("none", "pre"):
        runs = engine_steps(bn)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                for _ in range(steps):
                    run()
                times[name].append((time.perf_counter() - start) / steps * 1e3)
        v, b = statistics.median(times["vmap"]), statistics.median(times["bmm"])
        print(f"engines, 16 members, bn={bn}: vmap {v:.3f} ms a step, bmm {b:.3f} ms a step, "
              f"vmap / bmm {v / b:.2f} (medians of {repeats} x {steps} steps; vmap "
              f"{min(times['vmap']):.3f}-{max(times['vmap']):.3f}, bmm "
              f"{min(times['bmm']):.3f}-{max(times['bmm']):.3f})")


def bare_fused(cfgs: list, built: bool) -> float:
    """Seconds for the least an eager fused loop can do for the same work: the members' batches
    (each its own order), the fused forward, backward and one SGD update of every member's
    weights, and each epoch's evaluation (validation and training splits, eval mode), with no
    schedule, checks, history, divergence test or per-member bookkeeping. A bound on what any
    loop around these kernels reaches on this machine, not a way to train. `built`:
    `member_parts` (each member's data, model and optimizer, as the fused trainer builds them)
    outside the clock."""
    start = time.perf_counter()
    parts = member_parts(cfgs)
    if built:
        start = time.perf_counter()
    model = LayerFusedModel([p.model for p in parts])
    gens = [torch.Generator().manual_seed(cfg.seed) for cfg in cfgs]
    lr = torch.tensor([[cfg.optimizer.lr] for cfg in cfgs])
    x = torch.stack([p.data.x_train for p in parts])
    y = torch.stack([p.data.y_train for p in parts])
    xv = torch.stack([p.data.x_val for p in parts])
    yv = torch.stack([p.data.y_val for p in parts])
    t = cfgs[0].trainer
    who = torch.arange(len(cfgs)).unsqueeze(1)
    for _ in range(t.epochs):
        perm = torch.stack([torch.randperm(x.shape[1], generator=g) for g in gens])
        xe, ye = x[who, perm], y[who, perm]
        for b in range(0, x.shape[1], t.batch_size):
            out = model.forward(xe[:, b:b + t.batch_size], True)
            loss = F.mse_loss(out, ye[:, b:b + t.batch_size], reduction="none").mean((1, 2))
            grad = model.flat_grads(torch.autograd.grad(loss.sum(), model.params))
            with torch.no_grad():
                model.flat.sub_(grad * lr)
        with torch.no_grad():
            torch.cat([F.mse_loss(model.forward(xs, False), ys, reduction="none").mean((1, 2))
                       for xs, ys in ((xv, yv), (x, y))]).tolist()
    return time.perf_counter() - start


def floor(name: str, repeats: int) -> None:
    """Runs alone against `bare_fused`, interleaved, end to end and training only as above."""
    members, bn = CASES[name]
    cfgs = configs(members, bn)
    out = tempfile.mkdtemp(prefix="bench-fused-")
    for built in (False, True):
        alone, bare = [], []
        for _ in range(repeats):
            alone.append(one_after_another(cfgs, out, built))
            bare.append(bare_fused(cfgs, built))
        ratios = sorted(a / b for a, b in zip(alone, bare, strict=True))
        what = "training only" if built else "end to end   "
        print(f"{name:6s} {members} members, bn={bn}, {what}, bare fused loop: one after "
              f"another {statistics.median(alone):6.2f} s, bare {statistics.median(bare):5.2f} s "
              f"({min(bare):.2f}-{max(bare):.2f}), ratio {statistics.median(ratios):5.1f} "
              f"(paired, {ratios[0]:.1f}-{ratios[-1]:.1f}; {repeats} repeats)")


STUDY_BN = [sys.executable, "-m", "sweep.sensitivity", "experiment=bn_sensitivity",
            "sensitivity.seeds=[929,1,2,3,4]"]


def study_bn(fuse: str, folder: Path, *extra: str) -> tuple[float, float]:
    """(the command's wall seconds, the study's own seconds) of `make study-bn`, 5 seeds."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    start = time.perf_counter()
    done = subprocess.run([*STUDY_BN, f"fuse={fuse}", f"hydra.run.dir={folder / 'out'}", *extra],
                          cwd=folder, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    own = float(re.search(r"(\d+) runs, (\d+) s;", done.stdout).group(2))
    return wall, own


def mlflow_records(folder: Path) -> list[dict]:
    """What the newest study in `folder`'s store wrote for each of its runs: params, metric
    points, tags."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    parent = client.search_runs(ids, "attributes.run_name = 'bn_sensitivity'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    children = client.search_runs(ids, f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000)
    return [{"name": run.info.run_name, "params": run.data.params,
             "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
             "metrics": [m for key in run.data.metrics
                         for m in client.get_metric_history(run.info.run_id, key)]}
            for run in children]


def mlflow_alone(records: list[dict]) -> float:
    """Seconds MLflow's public API takes to write these runs into a fresh SQLite store: each
    run created, its params, metric points and tags in one `log_batch` each, and ended. What
    tracking the study costs even if `sweep` itself cost nothing."""
    import mlflow
    from mlflow.entities import Param, RunTag

    folder = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.create_experiment("replay")  # the store's creation: outside the clock
    start = time.perf_counter()
    for record in records:
        run = client.create_run(experiment, run_name=record["name"])
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
        for k in range(0, len(record["metrics"]), 1000):
            client.log_batch(run_id, metrics=record["metrics"][k:k + 1000])
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        client.set_terminated(run_id)
    return time.perf_counter() - start


def study_bn_ratio(repeats: int) -> None:
    folders = {fuse: Path(tempfile.mkdtemp(prefix=f"bench-study-bn-{fuse}-"))
               for fuse in ("1", "auto")}
    for fuse, folder in folders.items():
        study_bn(fuse, folder)  # creates the store (its migrations are a first run's alone)
    times: dict[str, list[tuple[float, float]]] = {"1": [], "auto": []}
    untracked, tracking = [], []
    records = mlflow_records(folders["auto"])
    for _ in range(repeats):
        for fuse, folder in folders.items():
            times[fuse].append(study_bn(fuse, folder))
        untracked.append(study_bn("auto", folders["auto"], "tracking=none")[0])
        tracking.append(mlflow_alone(records))
    for k, what in enumerate(("command (wall)", "study's own")):
        alone = [t[k] for t in times["1"]]
        fused_ = [t[k] for t in times["auto"]]
        ratios = sorted(a / f for a, f in zip(alone, fused_, strict=True))
        print(f"make study-bn, 80 runs, {what:15s}: fuse=1 {statistics.median(alone):5.1f} s "
              f"({min(alone):.1f}-{max(alone):.1f}), fuse=auto {statistics.median(fused_):5.1f} s "
              f"({min(fused_):.1f}-{max(fused_):.1f}), ratio {statistics.median(ratios):4.1f} "
              f"(paired, {ratios[0]:.1f}-{ratios[-1]:.1f}; {repeats} repeats)")
    # A bound: the fused command untracked, plus MLflow's own writes of the same runs.
    points = sum(len(r["metrics"]) for r in records)
    bound = sorted(a[0] / (u + m) for a, u, m in zip(times["1"], untracked, tracking,
                                                     strict=True))
    print(f"make study-bn, fuse=auto, tracking=none: {statistics.median(untracked):.1f} s "
          f"({min(untracked):.1f}-{max(untracked):.1f}); MLflow's public API alone writing the "
          f"same {len(records)} runs ({points} metric points): {statistics.median(tracking):.1f} s "
          f"({min(tracking):.1f}-{max(tracking):.1f}); so fused with tracking that cost nothing "
          f"beyond MLflow's own calls: at most {statistics.median(bound):.1f}x "
          f"({bound[0]:.1f}-{bound[-1]:.1f}) against fuse=1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=list(CASES), help="cases (default: all)")
    parser.add_argument("--engines", action="store_true", help="also vmap against bmm")
    parser.add_argument("--device", default="cpu", help="trainer.device of the CNN and ResNet "
                        "cases (cuda on a GPU machine, where GPU utilisation is printed too)")
    parser.add_argument("--floor", action="store_true", help="also, for the MLP cases without "
                        "BatchNorm, the engine's kernels in a bare loop (an upper bound)")
    parser.add_argument("--study-bn", action="store_true",
                        help="only `make study-bn` end to end, fuse=1 against fuse=auto")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    if args.study_bn:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} "
              f"cores, load average {load:.2f} at the start")
        study_bn_ratio(args.repeats)
        if hasattr(os, "getloadavg"):
            print(f"load average {os.getloadavg()[0]:.2f} at the end")
        return
    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="bench-fused-")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} cores, 1 torch thread, load average {load:.2f} at the start")
    if args.engines:
        engines(steps=200, repeats=args.repeats)
    for name in args.only or CASES:
        members, bn = CASES[name]
        torch.set_num_threads(threads if bn in ON_DEVICE else 1)
        cfgs = configs(members, bn)
        if bn in ON_DEVICE:
            for cfg in cfgs:
                cfg.trainer.device = args.device
        one_after_another(cfgs[:2], out, False)  # warm-up: imports, the first dataset and model
        fused(cfgs[:2], False)
        load = GpuLoad(args.device)
        for built in (False, True):
            alone, together = [], []
            alone_load, together_load = [], []
            for _ in range(args.repeats):
                with load:
                    alone.append(one_after_another(cfgs, out, built))
                alone_load.append(load.mean)
                with load:
                    together.append(fused(cfgs, built))
                together_load.append(load.mean)
            ratios = sorted(a / f for a, f in zip(alone, together, strict=True))
            what = "training only" if built else "end to end   "
            print(f"{name:6s} {members} members, bn={bn}, {what}: one after another "
                  f"{statistics.median(alone):6.2f} s ({min(alone):.2f}-{max(alone):.2f}), "
                  f"fused {statistics.median(together):5.2f} s "
                  f"({min(together):.2f}-{max(together):.2f}), ratio "
                  f"{statistics.median(ratios):5.1f} (paired, {ratios[0]:.1f}-{ratios[-1]:.1f}; "
                  f"{args.repeats} repeats)")
            if None not in alone_load + together_load:
                print(f"{'':6s} GPU utilisation (NVML, mean over each timed block): one after "
                      f"another {statistics.median(alone_load):.0f}% "
                      f"({min(alone_load):.0f}-{max(alone_load):.0f}), fused "
                      f"{statistics.median(together_load):.0f}% "
                      f"({min(together_load):.0f}-{max(together_load):.0f})")
    if args.floor:
        torch.set_num_threads(1)
        for name in args.only or CASES:
            if CASES[name][1] == "none":
                floor(name, args.repeats)
    if hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
