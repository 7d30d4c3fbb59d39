"""The BN article's lr experiment in plain PyTorch, without `sweep`: an independent check.

The article ("包含BN层的神经网络的学习率优化", test_lr) trains tanh MLPs net_class3 and net_class4
(hidden layers of width 4), each without BN and with BN before the activation (BN_model='pre'), with
optim.SGD (no momentum) on nn.MSELoss, batches of 50, 40 epochs, at lr 0.1, 0.03, 0.01 and 0.005,
on tensorGenReg(w=[2,-1,3,1,2], bias=False, deg=2) split 70/30 by split_loader, after
torch.manual_seed(929). Its curve is mse_cal: the MSE over the whole training split in eval mode,
after each epoch. The helpers below are ported from the course's torchLearning.py, which the
article imports; nothing here imports `sweep`.

Two seeding schemes:

- `article`: test_lr as written: one torch.manual_seed(seed); the data, the split, every model's
  initial weights and every epoch's shuffle come from the global RNG in program order (the four
  models of an lr are built together, then trained epoch by epoch in turn). No per-run tool can
  repeat this (each cell's weights depend on every cell trained before it), so compare it with
  `sweep` across seeds.
- `per-run` (default): each (model, lr) cell is a run of its own, seeded the way a run-per-cell
  tool seeds it: the data and split as the article makes them after torch.manual_seed(seed), the
  weights from torch.manual_seed(seed) just before the model is built, and the batch order from
  a torch.Generator seeded with `seed`. `sweep` seeds its runs this way, so each cell compares
  with sweep's run of that seed number by number.

Two training loops:

- `epochs` (default): `--epochs` passes over the data, the curve measured after each; what the
  article describes ("num_epochs = 40").
- `article`: model_comparison as the course's helper is written: at its e-th point it calls
  fit(..., epochs=e), so the curve's point e follows 0 + 1 + ... + e passes (780 passes in all
  for 40 points; the first point is the untrained model). A quirk of the helper, kept here so its
  figure can be reproduced; `sweep` trains the 40 epochs the article describes.

    python scripts/bn_reference.py --seeds 929 1 2 3 4 [--scheme per-run|article]
                                   [--loop epochs|article] [--epochs 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset, Sampler, random_split

LRS = (0.1, 0.03, 0.01, 0.005)
MODELS = ("mlp3", "mlp3_bn", "mlp4", "mlp4_bn")  # tanh_model3, ..._norml, tanh_model4, ..._norml


# --- the course's helpers (torchLearning.py), as the article calls them -------------------------

def tensor_gen_reg(num_examples: int = 1000, w: tuple = (2, -1, 3, 1, 2), bias: bool = False,
                   delta: float = 0.01, deg: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """tensorGenReg: features ~ randn, labels = (features ** deg) @ w (+ b) + delta * randn."""
    if bias:
        features_true = torch.randn(num_examples, len(w) - 1)
        w_true = torch.tensor(w[:-1]).reshape(-1, 1).float()
        labels_true = torch.mm(torch.pow(features_true, deg), w_true) + torch.tensor(w[-1]).float()
        features = torch.cat((features_true, torch.ones(len(features_true), 1)), 1)
    else:
        features = torch.randn(num_examples, len(w))
        w_true = torch.tensor(w).reshape(-1, 1).float()
        labels_true = torch.mm(torch.pow(features, deg), w_true)
    labels = labels_true + torch.randn(size=labels_true.shape) * delta
    return features, labels


class GenData(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels, self.lens = features, labels, len(features)

    def __getitem__(self, index):
        return self.features[index, :], self.labels[index]

    def __len__(self) -> int:
        return self.lens


def split_data(features: torch.Tensor, labels: torch.Tensor, rate: float = 0.7):
    """split_loader's split: random_split on the global RNG, training first."""
    data = GenData(features, labels)
    num_train = int(data.lens * rate)
    return random_split(data, [num_train, data.lens - num_train])


class NetClass(nn.Module):
    """net_class3 / net_class4: Linear (+ BN when 'pre') + act per hidden layer, then Linear.

    Layers are created in the article's order (linear1, normalize1, linear2, ...), so the
    initial weights are drawn in its order too; BatchNorm1d draws nothing.
    """

    def __init__(self, depth: int, act_fun=torch.tanh, in_features: int = 5, n_hidden: int = 4,
                 out_features: int = 1, bias: bool = True, BN_model: str | None = None,
                 momentum: float = 0.1):
        super().__init__()
        widths = [in_features] + [n_hidden] * depth
        for i in range(depth):
            setattr(self, f"linear{i + 1}", nn.Linear(widths[i], widths[i + 1], bias=bias))
            setattr(self, f"normalize{i + 1}", nn.BatchNorm1d(widths[i + 1], momentum=momentum))
        setattr(self, f"linear{depth + 1}", nn.Linear(n_hidden, out_features, bias=bias))
        self.depth, self.act_fun, self.BN_model = depth, act_fun, BN_model

    def forward(self, x):
        for i in range(1, self.depth + 1):
            z = getattr(self, f"linear{i}")(x)
            if self.BN_model == "pre":
                z = getattr(self, f"normalize{i}")(z)
            x = self.act_fun(z)
        return getattr(self, f"linear{self.depth + 1}")(x)


def new_model(name: str) -> NetClass:
    return NetClass(depth=3 if name.startswith("mlp3") else 4,
                    BN_model="pre" if name.endswith("_bn") else None)


def fit(net: nn.Module, criterion, optimizer, batchdata, epochs: int = 3) -> None:
    for _ in range(epochs):
        for X, y in batchdata:
            yhat = net.forward(X)
            loss = criterion(yhat, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def mse_cal(data_loader: DataLoader, net: nn.Module) -> torch.Tensor:
    """The MSE over the loader's whole dataset in one forward pass (the caller sets eval mode)."""
    data = data_loader.dataset
    X, y = data[:][0], data[:][1]
    return F.mse_loss(net(X), y)


def passes_before_point(e: int, loop: str) -> int:
    """How many passes over the data come before the curve's e-th point (e from 0)."""
    return e if loop == "article" else 1


def train_curve(model: nn.Module, loader: DataLoader, lr: float, points: int, loop: str
                ) -> list[float]:
    """The article's model_train_test for one model: train, then the eval-mode training MSE."""
    curve = []
    for e in range(points):
        model.train()
        fit(model, nn.MSELoss(), optim.SGD(model.parameters(), lr=lr), loader,
            epochs=passes_before_point(e, loop))
        model.eval()
        with torch.no_grad():
            curve.append(mse_cal(loader, model).item())
    return curve


# --- the two seeding schemes ----------------------------------------------------------------------

def article_data(seed: int):
    """The training and test splits test_lr builds after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    features, labels = tensor_gen_reg()
    return split_data(features, labels)


class EpochPermutation(Sampler):
    """One torch.randperm of the split per epoch, from `generator`.

    RandomSampler with a generator draws a second, unused permutation at the end of each epoch
    (its generator asks for the `num_samples % n` remainder), which a run-per-cell tool need not
    do; this is the plain rule: epoch k's order is the k-th permutation the generator gives.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


def run_per_run(seed: int, epochs: int, loop: str) -> dict[tuple[str, float], list[float]]:
    """Every (model, lr) as its own run: data, weights and batch order each seeded with `seed`."""
    curves = {}
    for name in MODELS:
        for lr in LRS:
            train_set, _ = article_data(seed)
            torch.manual_seed(seed)  # the weights: drawn first thing after seeding
            model = new_model(name)
            sampler = EpochPermutation(len(train_set), torch.Generator().manual_seed(seed))
            loader = DataLoader(train_set, batch_size=50, sampler=sampler)
            curves[name, lr] = train_curve(model, loader, lr, epochs, loop)
    return curves


def run_article(seed: int, epochs: int, loop: str) -> dict[tuple[str, float], list[float]]:
    """test_lr as written: one seed, everything drawn from the global RNG in program order."""
    train_set, _ = article_data(seed)
    loader = DataLoader(train_set, batch_size=50, shuffle=True)
    curves = {}
    for lr in LRS:
        models = [new_model(name) for name in MODELS]  # built together, as test_lr does
        per_model: list[list[float]] = [[] for _ in MODELS]
        for e in range(epochs):  # model_comparison: each epoch, every model in turn
            for i, model in enumerate(models):
                model.train()
                fit(model, nn.MSELoss(), optim.SGD(model.parameters(), lr=lr), loader,
                    epochs=passes_before_point(e, loop))
                model.eval()
                with torch.no_grad():
                    per_model[i].append(mse_cal(loader, model).item())
        for name, curve in zip(MODELS, per_model, strict=True):
            curves[name, lr] = curve
    return curves


def reproduce(seeds: list[int], scheme: str = "per-run", loop: str = "epochs", epochs: int = 40
              ) -> dict[tuple[str, float, int], list[float]]:
    """(model, lr, seed) -> the curve of eval-mode training MSE, one point per epoch."""
    run = run_per_run if scheme == "per-run" else run_article
    out = {}
    for seed in seeds:
        for (name, lr), curve in run(seed, epochs, loop).items():
            out[name, lr, seed] = curve
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[929])
    parser.add_argument("--scheme", choices=["per-run", "article"], default="per-run")
    parser.add_argument("--loop", choices=["epochs", "article"], default="epochs")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--json", help="also write {model: {lr: {seed: final}}} here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # width-4 nets: one thread is fastest, and runs are reproducible
    curves = reproduce(args.seeds, args.scheme, args.loop, args.epochs)

    print(f"final eval-mode training MSE after {args.epochs} points, scheme {args.scheme}, "
          f"loop {args.loop}, seeds {args.seeds}")
    print(f"{'model':9} {'lr':>6} {'mean':>9} {'sd':>8}  per seed")
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in MODELS:
        for lr in LRS:
            finals = [curves[name, lr, s][-1] for s in args.seeds]
            table.setdefault(name, {})[str(lr)] = dict(zip(map(str, args.seeds), finals,
                                                           strict=True))
            sd = statistics.stdev(finals) if len(finals) > 1 else math.nan
            print(f"{name:9} {lr:>6g} {statistics.fmean(finals):9.4g} {sd:8.3g}  "
                  + " ".join(f"{f:.4g}" for f in finals))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
