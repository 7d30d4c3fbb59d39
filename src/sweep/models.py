"""Model factories: hyperparameters come from conf/model, `in_shape`/`num_outputs` from the data."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch.nn as nn

from sweep.data import Data, arguments_checked, check_arguments, instantiate_checked
from sweep.validation import (
    check_choice,
    check_in_range,
    check_int_at_least,
    check_positive_ints,
    fail,
)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
BN_PLACEMENTS = ("none", "pre", "post")


def build_model(cfg_model: Mapping, data: Data) -> nn.Module:
    """Build the model a `conf/model/*.yaml` describes, sized for `data`."""
    return model_factory(cfg_model, data)()


def model_factory(cfg_model: Mapping, data: Data) -> Callable[[], nn.Module]:
    """What builds that model: each call a new one, its weights drawn from the global RNG. A
    fused group's members (one config, each drawn after its own seed) share one: composing
    Hydra's call costs more than building a small MLP."""
    return instantiate_checked(cfg_model, "model", partial=True, in_shape=data.in_shape,
                               num_outputs=data.num_outputs)


def validate_model(cfg_model: Mapping) -> None:
    """Check the model's hyperparameters without the data or a single layer; raises ConfigError.

    Each factory checks its own arguments, then calls `arguments_checked()`, where this stops it;
    what depends on the data (an image model on vectors) is checked when the model is built.
    """
    check_arguments(cfg_model, "model", ("in_shape", "num_outputs"))


def _widths(key: str, value: object, what: str) -> None:
    check_positive_ints(key, value, f"a non-empty list of integer {what} >= 1")


def _flag(key: str, value: object) -> None:
    if not isinstance(value, bool):
        fail(key, value, "true or false")


def mlp(in_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (4, 4, 4),
        activation: str = "tanh", bn: str | None = "none", bn_momentum: float = 0.1,
        bias: bool = True) -> nn.Sequential:
    """The BN article's net_class2/3/4: Linear+act per hidden layer, BatchNorm `pre`/`post` act."""
    check_choice("model.activation", activation, ACTIVATIONS)
    bn = "none" if bn is None else bn  # the article spells "no BN" as BN_model=None
    check_choice("model.bn", bn, BN_PLACEMENTS)
    check_in_range("model.bn_momentum", bn_momentum, 0, 1)
    _widths("model.hidden", hidden, "layer widths")
    _flag("model.bias", bias)
    arguments_checked()
    # Flatten always comes first, even for vectors, so the first Linear is `1.` on every dataset
    # and per-layer lr rules (`^1\.`) mean the same layer whatever the data.
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for h in hidden:
        layers.append(nn.Linear(width, h, bias=bias))
        act = ACTIVATIONS[activation]()
        if bn == "pre":  # normalise the pre-activations z = Wx + b
            layers += [nn.BatchNorm1d(h, momentum=bn_momentum), act]
        elif bn == "post":  # normalise the activations, i.e. the next layer's inputs
            layers += [act, nn.BatchNorm1d(h, momentum=bn_momentum)]
        else:
            layers.append(act)
        width = h
    layers.append(nn.Linear(width, num_outputs, bias=bias))  # never BN on the output
    return nn.Sequential(*layers)


def _image_channels(in_shape: Sequence[int], model: str) -> int:
    if len(in_shape) != 3:
        fail("model", model, f"needs images (C, H, W) but the dataset gives in_shape={in_shape}; "
                             "use model=mlp or a dataset without flatten")
    return in_shape[0]


def cnn(in_shape: Sequence[int], num_outputs: int, channels: Sequence[int] = (32, 64),
        hidden: int = 128, dropout: float = 0.25) -> nn.Sequential:
    """Small conv net (convs, max-pool, adaptive pool to 4x4, dropout, MLP head), 8x8 to 32x32."""
    check_int_at_least("model.hidden", hidden, 1)
    check_in_range("model.dropout", dropout, 0, 1, low_open=False, high_open=True)
    _widths("model.channels", channels, "conv widths")
    arguments_checked()
    c = _image_channels(in_shape, "cnn")
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        c = out
    # Adaptive pooling fixes the head's size: 8x8 digits and 28x28 MNIST share one architecture.
    layers += [nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4), nn.Dropout(dropout), nn.Flatten(),
               nn.Linear(c * 16, hidden), nn.ReLU(), nn.Dropout(dropout),
               nn.Linear(hidden, num_outputs)]
    return nn.Sequential(*layers)


def resnet18(in_shape: Sequence[int], num_outputs: int, small_input: bool = True) -> nn.Module:
    """torchvision's ResNet-18 from scratch; `small_input` swaps in the usual CIFAR stem."""
    _flag("model.small_input", small_input)
    arguments_checked()
    c = _image_channels(in_shape, "resnet18")
    from torchvision import models as tv_models  # about 1 s to import: only when used

    model = tv_models.resnet18(weights=None, num_classes=num_outputs)
    if small_input:
        # The ImageNet stem (7x7 stride 2 + maxpool) would shrink 32x32 images to 8x8 at once.
        model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
