"""Time sweep's trainer against a plain hand-written PyTorch loop on the same work; print the ratio.

Both sides load the same data, build the same model, see the same batches (same seed, same
permutations) for the same epochs, and evaluate on the validation split after every epoch. Both
also measure what the trainer logs by default where the data lives on the device: the loss over
the whole training split in eval mode (`trainer.train_eval_loss`), before training and after every
epoch; the plain loop does that pass by hand, so the ratio is the trainer's own overhead. The
trainer side runs with MLflow logging on (a real SQLite store: per-epoch metrics inside the timed
region) and its progress bar off. Target: trainer / plain <= 1.10. Opening and closing the MLflow
run (params, config artifact, final plots) is a fixed cost per run, timed and printed separately.
Runs are interleaved and repeated; medians are reported. The trainer also runs with tracking
off, which splits the overhead into the trainer's own and MLflow's.

    python scripts/bench_trainer.py [--repeats 5] [--device cpu] [--only cnn/digits]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from sweep.config import compose
from sweep.data import load_data, tensor_batches
from sweep.models import build_model
from sweep.track import mlflow_run
from sweep.train import train

CASES = {
    # The BN article's MLP on its synthetic regression data: many tiny steps, so per-step
    # overhead is what shows.
    "mlp/synthetic_regression": ["model=mlp", "dataset=synthetic_regression", "optimizer=sgd",
                                 "optimizer.momentum=0", "optimizer.lr=0.03", "scheduler=step",
                                 "trainer.batch_size=50", "trainer.epochs=150"],
    "cnn/digits": ["model=cnn", "dataset=digits", "optimizer=sgd", "scheduler=cosine",
                   "trainer.batch_size=64", "trainer.epochs=8"],
}


def plain_loop(cfg, device: torch.device) -> float:
    """What a person would write by hand: no schedule bookkeeping, no logging, no checks."""
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.dataset)
    model = build_model(cfg.model, data).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr,
                          momentum=cfg.optimizer.momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    loss_fn = F.cross_entropy if data.task == "classification" else F.mse_loss
    x, y = data.x_train.to(device), data.y_train.to(device)
    xv, yv = data.x_val.to(device), data.y_val.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.eval()
    with torch.inference_mode():
        loss_fn(model(x), y).item()  # the loss at initialisation, over the training split
    for _ in range(cfg.trainer.epochs):
        model.train()
        for xb, yb in tensor_batches(x, y, cfg.trainer.batch_size, True, gen):
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.inference_mode():
            val = loss_fn(model(xv), yv).item()
            loss_fn(model(x), y).item()  # the loss over the training split, in eval mode
    return val


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_plain(cfg, device: torch.device) -> float:
    sync()
    start = time.perf_counter()
    plain_loop(cfg, device)
    sync()
    return time.perf_counter() - start


def timed_trainer(cfg) -> tuple[float, float]:
    """Seconds in `train` (per-epoch MLflow logging included) and in opening/closing the run."""
    start = time.perf_counter()
    with mlflow_run(cfg) as tracker:
        opened = time.perf_counter()
        sync()
        result = train(cfg, tracker=tracker, output_dir=tempfile.gettempdir())
        if tracker is not None:
            tracker.flush()
        sync()
        trained = time.perf_counter()
        if tracker is not None:
            tracker.finish(result)  # the final plots
    return trained - opened, (opened - start) + (time.perf_counter() - trained)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", nargs="*", help="cases to run (default: all)")
    args = parser.parse_args()
    store = tempfile.mkdtemp(prefix="bench-mlflow-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for name, overrides in [(k, v) for k, v in CASES.items() if k in (args.only or CASES)]:
        common = [*overrides, f"trainer.device={args.device}", "trainer.progress=false",
                  "trainer.amp=off"]
        cfg, untracked = compose(common), compose([*common, "tracking=none"])
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
        timed_trainer(cfg)  # warm-up: imports, the MLflow store's first migration
        plain_loop(cfg, device)
        plain, ours, fixed, bare = [], [], [], []
        for _ in range(args.repeats):
            plain.append(timed_plain(cfg, device))
            loop, run = timed_trainer(cfg)
            ours.append(loop)
            fixed.append(run)
            bare.append(timed_trainer(untracked)[0])
        p, o, b = statistics.median(plain), statistics.median(ours), statistics.median(bare)
        # MLflow's own cost: each repeat's tracked run over its untracked run, which ran right
        # after it, so a change in the machine's load between repeats mostly cancels out.
        paired = sorted(on / off for on, off in zip(ours, bare, strict=True))
        # Other processes only ever add time, so the ratio of the fastest runs is printed too.
        print(f"{name:26s} plain {p:6.3f} s  sweep {o:6.3f} s  ratio {o / p:5.3f}  "
              f"(medians of {args.repeats}; plain {min(plain):.3f}-{max(plain):.3f}, "
              f"sweep {min(ours):.3f}-{max(ours):.3f}; ratio of minima "
              f"{min(ours) / min(plain):5.3f}); tracking off {b:6.3f} s, ratio {b / p:5.3f}; "
              f"MLflow on/off {statistics.median(paired):5.3f} (paired, "
              f"{paired[0]:.3f}-{paired[-1]:.3f}); "
              f"MLflow run open+close+plots {statistics.median(fixed):.2f} s per run")


if __name__ == "__main__":
    main()
