"""Datasets as in-memory tensors, and the batching and augmentation the trainer runs on-device."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sweep.archives import official_train_set
from sweep.validation import (
    ConfigError,
    DataError,
    check_in_range,
    check_int_at_least,
    check_positive_ints,
    fail,
    locate,
)


@dataclass
class Data:
    """One dataset's train/val tensors (on the CPU) and what models and the trainer need to know."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    task: str  # "regression": y float (N, num_outputs); "classification": y int64 (N,)
    in_shape: tuple[int, ...]
    num_outputs: int
    name: str
    augment: dict | None = None  # {"crop_padding": int, "hflip": bool}, images only

    @property
    def nbytes(self) -> int:
        """Bytes held by the four tensors (the trainer keeps small datasets on the device)."""
        tensors = (self.x_train, self.y_train, self.x_val, self.y_val)
        return sum(t.element_size() * t.numel() for t in tensors)

    def to(self, device: torch.device | str) -> Data:
        """The same dataset with its tensors on `device` (batches are then sliced there)."""
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val")}
        return dataclasses.replace(self, **moved)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one epoch over the training split, the last partial batch included."""
        return math.ceil(len(self.x_train) / batch_size)


# --- configs -> objects --------------------------------------------------------------------------

_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def checked_target(cfg: Mapping, group: str, runtime: Iterable[str] = ()) -> Callable:
    """The function `cfg._target_` names, once every key of `cfg` is one of its arguments and
    every argument it needs is given (`runtime`: those the code supplies)."""
    target = cfg.get("_target_")
    if not target or not isinstance(target, str):
        fail(f"{group}._target_", target, "every option needs a _target_ (a function to call)")
    try:
        fn = locate(target)
    except Exception as err:
        fail(f"{group}._target_", target, f"names no function that can be imported ({err})")
    if not callable(fn):
        fail(f"{group}._target_", target, "names no function")
    params = inspect.signature(fn).parameters
    runtime = list(runtime)
    allowed = [p for p in params if p not in runtime]
    for key in cfg:
        if key not in _HYDRA_KEYS and key not in params:
            fail(f"{group}.{key}", cfg[key], f"{target} takes only {', '.join(allowed)}")
    for name in allowed:
        if params[name].default is inspect.Parameter.empty and name not in cfg:
            fail(f"{group}.{name}", None, f"{target} needs it")
    return fn


class _ArgumentsChecked(Exception):
    """Stops a factory at `arguments_checked()` when its arguments are only being checked."""


_checking_only: ContextVar[bool] = ContextVar("sweep_checking_only", default=False)


def arguments_checked() -> None:
    """A model or dataset function calls this once its arguments are checked, before the costly
    part (reading files, building layers); `check_arguments` stops it there."""
    if _checking_only.get():
        raise _ArgumentsChecked


def check_arguments(cfg: Mapping, group: str, runtime: Iterable[str] = ()) -> None:
    """Check a model's or dataset's config without loading or building anything.

    Its keys against its function's arguments, then the function's own checks: it is called
    with `runtime` arguments as None and stopped at its `arguments_checked()`. A function without
    that call is run whole here; one that fails on the missing runtime values (a function of
    your own) is left to be checked when it is built, still before any MLflow run opens.
    """
    fn = checked_target(cfg, group, runtime)
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    kwargs = {k: v for k, v in values.items() if k not in _HYDRA_KEYS}
    token = _checking_only.set(True)
    try:
        fn(**kwargs, **dict.fromkeys(runtime))
    except _ArgumentsChecked:
        pass
    except ConfigError:
        raise
    except Exception:  # needs what only the run has: checked when it is built
        pass
    finally:
        _checking_only.reset(token)


def instantiate_checked(cfg: Mapping, group: str, partial: bool = False, **runtime: Any) -> Any:
    """Hydra's instantiate, but unknown keys and bad values raise ConfigError naming `group.key`.
    `partial`: the call, prepared (Hydra's `_partial_`), to make as often as needed."""
    checked_target(cfg, group, runtime)
    try:
        return instantiate(cfg, **runtime, _convert_="all", _partial_=partial)
    except InstantiationException as e:
        # Hydra wraps whatever the target raises; our own errors already say what to fix.
        if isinstance(e.__cause__, ConfigError | DataError):
            raise e.__cause__ from None
        raise


def task(kind: str) -> Callable[[Callable], Callable]:
    """Declares what a dataset function returns ("regression" or "classification"), so the loss and
    the metric a study optimises are known from the config without loading the data."""
    def mark(fn: Callable) -> Callable:
        fn.task = kind
        return fn
    return mark


def declared_task(cfg_dataset: Mapping) -> str | None:
    """The task the dataset's function declares with `@task`, or None for one that does not."""
    return getattr(checked_target(cfg_dataset, "dataset"), "task", None)


def load_data(cfg_dataset: Mapping) -> Data:
    """Build the dataset a `conf/dataset/*.yaml` describes (`_target_: sweep.data.<function>`).

    The last dataset loaded is kept: an app's checks build the run's parts on its data before Hydra
    creates the output folder, and the run, a multirun's next job or a sensitivity grid's next
    point then reuse it. Dataset functions draw from their own seeded generators and nothing
    modifies a Data in place, so the same config always gives the same tensors.
    """
    return _load_cached(dataset_key(cfg_dataset))


def dataset_key(cfg_dataset: Mapping) -> str:
    """The dataset config as text: equal for configs that give the same tensors."""
    values = OmegaConf.to_container(cfg_dataset, resolve=True) if isinstance(
        cfg_dataset, DictConfig) else dict(cfg_dataset)
    return json.dumps(values, sort_keys=True, default=str)


@functools.lru_cache(maxsize=1)
def _load_cached(cfg_json: str) -> Data:
    return instantiate_checked(json.loads(cfg_json), "dataset")


def validate_dataset(cfg_dataset: Mapping) -> None:
    """Check the dataset's config without reading or generating any data; raises ConfigError."""
    check_arguments(cfg_dataset, "dataset")


# --- validation and splitting --------------------------------------------------------------------

def _check_split(val_fraction: float, train_size: int | None = None) -> None:
    check_in_range("dataset.val_fraction", val_fraction, 0, 1, high_open=True)
    if train_size is not None:
        check_int_at_least("dataset.train_size", train_size, 1)


def _check_augment(augment: Mapping | None, in_shape: tuple[int, ...]) -> dict | None:
    if augment is None:
        return None
    if not isinstance(augment, Mapping) or set(augment) - {"crop_padding", "hflip"}:
        fail("dataset.augment", augment, "null or {crop_padding: int >= 0, hflip: bool}")
    if len(in_shape) != 3:
        fail("dataset.augment", augment, f"only for images (C, H, W); this data is {in_shape}")
    augment = {"crop_padding": augment.get("crop_padding", 0), "hflip": augment.get("hflip", False)}
    check_int_at_least("dataset.augment.crop_padding", augment["crop_padding"], 0)
    if not isinstance(augment["hflip"], bool):
        fail("dataset.augment.hflip", augment["hflip"], "must be true or false")
    return augment


def _split(x: Tensor, y: Tensor, val_fraction: float, generator: torch.Generator,
           train_size: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seeded shuffle; training takes the front of it and validation the last `val_fraction`.

    Training first, as `torch.utils.data.random_split(data, [n_train, n_val])` does: with the
    generator in the state the BN article's global RNG is in, the article's `split_loader` gives
    the same two splits.
    """
    n = len(x)
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        fail("dataset.val_fraction", val_fraction, f"must leave >= 1 sample in each split of {n}")
    perm = torch.randperm(n, generator=generator)
    # train_size trims only the training split, so val metrics stay comparable across sizes.
    train, val = perm[:n - n_val][:train_size], perm[n - n_val:]
    return x[train], y[train], x[val], y[val]


# --- synthetic data (the BN article's generators) ------------------------------------------------

def make_regression(n_samples: int, weights: Sequence[float], degree: int, bias: bool,
                    noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The BN article's `tensorGenReg`: y = (x ** degree) @ w (+ b) + noise * randn."""
    w = torch.tensor(list(weights), dtype=torch.float32).reshape(-1, 1)
    b = 0.0
    if bias:  # the last weight is the intercept and the features get a column of ones
        w, b = w[:-1], w[-1]
    x = torch.randn(n_samples, len(w), generator=generator)
    y = x.pow(degree) @ w + b
    if bias:
        x = torch.cat([x, torch.ones(n_samples, 1)], dim=1)
    y = y + torch.randn(y.shape, generator=generator) * noise
    return x, y


@task("regression")
def synthetic_regression(n_samples: int = 1000, weights: Sequence[float] = (2, -1, 3, 1, 2),
                         degree: int = 2, bias: bool = False, noise: float = 0.01, seed: int = 0,
                         val_fraction: float = 0.3) -> Data:
    """Polynomial regression from `make_regression`, split 70/30 like the article's split_loader."""
    check_int_at_least("dataset.n_samples", n_samples, 2)
    check_int_at_least("dataset.degree", degree, 1)
    check_in_range("dataset.noise", noise, 0, math.inf, low_open=False)
    _check_split(val_fraction)
    if not weights or not all(isinstance(v, int | float) for v in weights):
        fail("dataset.weights", weights, "a non-empty list of numbers")
    if bias and len(weights) < 2:
        fail("dataset.weights", weights, "with bias=true, at least one weight plus the bias")
    arguments_checked()
    g = torch.Generator().manual_seed(seed)
    x, y = make_regression(n_samples, weights, degree, bias, noise, g)
    return Data(*_split(x, y, val_fraction, g), task="regression", in_shape=(x.shape[1],),
                num_outputs=1, name="synthetic_regression")


@task("classification")
def synthetic_classification(n_samples: int = 1000, n_features: int = 2, n_classes: int = 3,
                             class_sep: float = 4.0, std: float = 2.0, seed: int = 0,
                             val_fraction: float = 0.3) -> Data:
    """Gaussian blobs like the article's `tensorGenCla`: class i is centred at i*class_sep - k."""
    check_int_at_least("dataset.n_samples", n_samples, 2)
    check_int_at_least("dataset.n_features", n_features, 1)
    check_int_at_least("dataset.n_classes", n_classes, 2)
    check_in_range("dataset.class_sep", class_sep, 0, math.inf, low_open=False)
    check_in_range("dataset.std", std, 0, math.inf)
    _check_split(val_fraction)
    arguments_checked()
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_samples) % n_classes  # balanced classes
    centre = y.float() * class_sep - class_sep * (n_classes - 1) / 2  # centred on the origin
    x = centre[:, None] + std * torch.randn(n_samples, n_features, generator=g)
    return Data(*_split(x, y, val_fraction, g), task="classification", in_shape=(n_features,),
                num_outputs=n_classes, name="synthetic_classification")


# --- image datasets ------------------------------------------------------------------------------

@task("classification")
def synthetic_images(n_samples: int = 1000, shape: Sequence[int] = (3, 32, 32),
                     n_classes: int = 10, signal: float = 0.5, seed: int = 0,
                     val_fraction: float = 0.2, augment: Mapping | None = None) -> Data:
    """Random images of CIFAR-10's shape (or any (C, H, W)): each class a fixed random pattern
    times `signal`, plus unit Gaussian noise per image. For timing image models where CIFAR-10 is
    not at hand, and for tests: a model can learn it, but not at once."""
    check_int_at_least("dataset.n_samples", n_samples, 2)
    check_int_at_least("dataset.n_classes", n_classes, 2)
    check_positive_ints("dataset.shape", shape, "three integers >= 1: [channels, height, width]",
                        length=3)
    check_in_range("dataset.signal", signal, 0, math.inf, low_open=False)
    _check_split(val_fraction)
    in_shape = tuple(shape)
    augment = _check_augment(augment, in_shape)
    arguments_checked()
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(n_classes, *in_shape, generator=g)
    y = torch.arange(n_samples) % n_classes  # balanced classes
    x = signal * patterns[y] + torch.randn(n_samples, *in_shape, generator=g)
    return Data(*_split(x, y, val_fraction, g), task="classification", in_shape=in_shape,
                num_outputs=n_classes, name="synthetic_images", augment=augment)


@task("classification")
def digits(val_fraction: float = 0.2, seed: int = 0, flatten: bool = False,
           augment: Mapping | None = None) -> Data:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), normalised on train only."""
    in_shape = (64,) if flatten else (1, 8, 8)
    _check_split(val_fraction)
    augment = _check_augment(augment, in_shape)
    arguments_checked()
    from sklearn.datasets import load_digits  # lazy: sklearn takes a second to import

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).reshape(-1, *in_shape) / 16  # pixels 0..16
    y = torch.tensor(bunch.target, dtype=torch.int64)
    x_train, y_train, x_val, y_val = _split(x, y, val_fraction, torch.Generator().manual_seed(seed))
    mean, std = x_train.mean(), x_train.std()  # train split only: val stays unseen
    return Data((x_train - mean) / std, y_train, (x_val - mean) / std, y_val,
                task="classification", in_shape=in_shape, num_outputs=10, name="digits",
                augment=augment)


# Per-channel pixel mean and std of each official training set (the usual published values).
CHANNEL_STATS = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _torchvision_data(name: str, cls_name: str, root: str | Path, archives: str | Path | None,
                      download: bool, val_fraction: float, seed: int, train_size: int | None,
                      augment: Mapping | None) -> Data:
    _check_split(val_fraction, train_size)
    if not isinstance(root, str | Path) or not str(root):
        fail("dataset.root", root, "a folder for the dataset's files")
    if archives is not None and (not isinstance(archives, str | Path) or not str(archives)):
        fail("dataset.archives", archives, "null, or a folder holding the archives")
    if not isinstance(download, bool):
        fail("dataset.download", download, "true or false")
    arguments_checked()
    images, labels = official_train_set(cls_name, root, archives, download)
    augment = _check_augment(augment, tuple(images.shape[1:]))
    mean, std = (torch.tensor(s).view(-1, 1, 1) for s in CHANNEL_STATS[cls_name])
    x = images.float().div_(255).sub_(mean).div_(std)
    split = _split(x, labels, val_fraction, torch.Generator().manual_seed(seed), train_size)
    return Data(*split, task="classification", in_shape=tuple(x.shape[1:]),
                num_outputs=int(labels.max()) + 1, name=name, augment=augment)


@task("classification")
def mnist(root: str | Path = "data", archives: str | Path | None = None, download: bool = False,
          val_fraction: float = 0.1, seed: int = 0, train_size: int | None = None,
          augment: Mapping | None = None) -> Data:
    """MNIST's 60000 training digits (1x28x28) split by seed; offline from .gz archives too."""
    return _torchvision_data("mnist", "MNIST", root, archives, download, val_fraction, seed,
                             train_size, augment)


@task("classification")
def fashion_mnist(root: str | Path = "data", archives: str | Path | None = None,
                  download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                  train_size: int | None = None, augment: Mapping | None = None) -> Data:
    """Fashion-MNIST's 60000 training images (1x28x28) split by seed, like `mnist`."""
    return _torchvision_data("fashion_mnist", "FashionMNIST", root, archives, download,
                             val_fraction, seed, train_size, augment)


@task("classification")
def cifar10(root: str | Path = "data", archives: str | Path | None = None, download: bool = False,
            val_fraction: float = 0.1, seed: int = 0, train_size: int | None = None,
            augment: Mapping | None = None) -> Data:
    """CIFAR-10's 50000 training images (3x32x32) split by seed, like `mnist`."""
    return _torchvision_data("cifar10", "CIFAR10", root, archives, download, val_fraction, seed,
                             train_size, augment)


# --- batching and augmentation (on the training device) ------------------------------------------

def tensor_batches(x: Tensor, y: Tensor, batch_size: int, shuffle: bool,
                   generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (xb, yb) minibatches of tensors already on the device, the last partial one too."""
    n = len(x)
    if not shuffle:
        for i in range(0, n, batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    # The permutation is drawn on the CPU, so CPU and CUDA runs with one seed see the same order.
    perm = torch.randperm(n, generator=generator).to(x.device)
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], y[idx]


def augment_batch(x: Tensor, crop_padding: int = 0, hflip: bool = False,
                  generator: torch.Generator | None = None) -> Tensor:
    """Random crop of the zero-padded image and horizontal flip (p=0.5), per sample, on-device."""
    check_int_at_least("dataset.augment.crop_padding", crop_padding, 0)
    if crop_padding == 0 and not hflip:
        return x
    n, _, h, w = x.shape
    p = crop_padding
    # Draw on the CPU generator then move: the same seed gives the same crops on every device.
    dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator).to(x.device)
    flip = (torch.rand(n, 1, 1, generator=generator) < 0.5).to(x.device) & hflip
    rows = dy + torch.arange(h, device=x.device).view(1, h, 1)  # (n, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    cols = dx + torch.where(flip, w - 1 - cols, cols)  # (n, 1, w); a flip reads columns backwards
    padded = F.pad(x, (p, p, p, p))
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # One gather does crop and flip: indices (n, h, w) pick (n, h, w, C); back to (n, C, h, w),
    # in the standard layout. (`.contiguous()` keeps the gather's strides when C is 1, which
    # PyTorch then reads as channels-last: every layer after would be too, dropout's masks drawn
    # in that memory order.)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format)
