"""N members of one `nn.Sequential` as one wider model (HFTA's horizontal fusion): a batched matmul
per Linear, a grouped convolution per Conv2d, BatchNorm and pooling over the members' channels, each
member's weights a row of a stacked tensor and its dropout masks drawn from its own generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Elementwise modules act on any layout as on one member's.
ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Identity)
# Modules that act on each channel of (batch, channels, H, W) alone: the members' channels side by
# side give each member what its own module computes.
PER_CHANNEL = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d)


class FusedModel:
    """The members' `nn.Sequential`s of Flatten, Linear, Conv2d, BatchNorm1d, pooling, Dropout and
    activations (the MLP family and the CNN of `sweep.models`), stacked.

    Inputs are (members, batch, *in_shape) and outputs (members, batch, outputs). Between layers
    activations are either vectors, (members, batch, features), where a Linear is one `bmm`, or
    images, (batch, members x channels, H, W), where a Conv2d is one convolution with
    groups=members and pooling acts per channel. All of a member's parameters are one row of
    `flat` (members, numel), in the order of its `named_parameters()`; `params` are views of it
    shaped as the forward pass uses them (the leaves gradients are taken of), so an optimizer
    updates every layer of every member with a few ops on `flat`.

    `generators[i]`: member i's randomness (its dropout masks), at the state the global RNG has
    when its model alone starts training, so each member draws the masks its run alone draws.
    """

    def __init__(self, models: Sequence[nn.Sequential],
                 generators: Sequence[torch.Generator] | None = None,
                 amp: torch.dtype | None = None):
        first = models[0]
        self.amp = amp  # bf16 autocast, as `train` runs a model alone with trainer.amp=bf16
        self.names = [name for name, _ in first.named_parameters()]
        self.params: list[Tensor] = []
        self.stats: list[Tensor] = []  # BatchNorm running means and variances, (members, h) each
        self.layers: list[tuple] = []  # what forward does, in order; indices into params/stats
        self.generators = list(generators) if generators is not None else None
        for index, module in enumerate(first):
            same = [m[index] for m in models]
            if isinstance(module, nn.Flatten):
                self.layers.append(("flatten",))
            elif isinstance(module, nn.Linear):
                # Stored as x @ weight and bias need them, (in, out) and (1, out): no transposes or
                # broadcasts to take (and differentiate) each step. named_parameters() order.
                weight = self._stack(m.weight.T for m in same)
                bias = None if module.bias is None else self._stack(
                    m.bias.unsqueeze(0) for m in same)
                self.layers.append(("linear", weight, bias))
            elif isinstance(module, nn.Conv2d):
                self.layers.append(self._conv(module, same))
            elif isinstance(module, nn.BatchNorm1d):
                self.layers.append(self._batch_norm(module, same))
            elif isinstance(module, (*ELEMENTWISE, *PER_CHANNEL)):
                self.layers.append(("module", module))
            elif isinstance(module, nn.Dropout):
                if module.p > 0 and self.generators is None:
                    raise ValueError("dropout needs each member's generator")
                self.layers.append(("dropout", module.p))
            else:
                raise ValueError(f"cannot fuse a {type(module).__name__} layer (layer {index})")
        if [p[0].numel() for p in self.params] != [p.numel() for p in first.parameters()]:
            raise ValueError("some parameters of the model are not in a layer fusion knows")
        self.shapes = [p.shape[1:] for p in self.params]
        self.flat = torch.cat([p.flatten(1) for p in self.params], dim=1)
        self._views()

    def _stack(self, tensors) -> int:
        self.params.append(torch.stack([t.detach() for t in tensors]))
        return len(self.params) - 1

    def _views(self) -> None:
        # Views of `flat` that are leaves of their own: `flat` has no grad, so in-place updates
        # of it between steps are what the next forward reads.
        self.params, start = [], 0
        for shape in self.shapes:
            size = shape.numel()
            view = self.flat[:, start:start + size].view(len(self.flat), *shape)
            self.params.append(view.requires_grad_())
            start += size

    def flat_grads(self, grads: Sequence[Tensor]) -> Tensor:
        """Gradients of `params` as rows like `flat`'s."""
        return torch.cat([g.flatten(1) for g in grads], dim=1)

    def columns(self, names: Sequence[str]) -> list[int]:
        """The columns of `flat` that hold the named parameters."""
        starts, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            starts[name] = range(start, start + shape.numel())
            start += shape.numel()
        return [c for name in names for c in starts[name]]

    def _conv(self, module: nn.Conv2d, same: list[nn.Conv2d]) -> tuple:
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError("fusion takes ungrouped, zero-padded Conv2d layers")
        weight = self._stack(m.weight for m in same)
        bias = None if module.bias is None else self._stack(m.bias for m in same)
        return ("conv", weight, bias, module.stride, module.padding, module.dilation)

    def _batch_norm(self, module: nn.BatchNorm1d, same: list[nn.BatchNorm1d]) -> tuple:
        if not module.track_running_stats or module.momentum is None:
            raise ValueError("fusion needs BatchNorm1d with running statistics and a momentum")
        weight = bias = None
        if module.affine:
            weight = self._stack(m.weight for m in same)
            bias = self._stack(m.bias for m in same)
        self.stats += [torch.stack([m.running_mean for m in same]),
                       torch.stack([m.running_var for m in same])]
        return ("batch_norm", weight, bias, len(self.stats) - 2, module.momentum, module.eps)

    def forward(self, x: Tensor, training: bool) -> Tensor:
        """(members, batch, *in_shape) -> (members, batch, outputs); `training`: BatchNorm's and
        dropout's mode. Under `amp` the outputs come back in float32, as `train` takes them."""
        if self.amp is None:
            return self._forward(x, training)
        with torch.autocast(x.device.type, dtype=self.amp):
            return self._forward(x, training).float()

    def _forward(self, x: Tensor, training: bool) -> Tensor:
        p = self.params
        members, batch = x.shape[:2]
        images = x.dim() == 5
        if images:  # the members' channels side by side
            x = x.transpose(0, 1).reshape(batch, members * x.shape[2], *x.shape[3:])
        for layer in self.layers:
            kind = layer[0]
            if kind == "linear":
                _, w, b = layer
                x = torch.bmm(x, p[w]) if b is None else torch.baddbmm(p[b], x, p[w])
            elif kind == "module":
                x = layer[1](x)
            elif kind == "conv":
                _, w, b, stride, padding, dilation = layer
                weight = p[w].reshape(-1, *p[w].shape[2:])  # (members x out, in, k, k)
                bias = None if b is None else p[b].reshape(-1)
                x = F.conv2d(x, weight, bias, stride, padding, dilation, groups=members)
            elif kind == "flatten":
                if images:  # back to vectors: each member's channels flattened as it does alone
                    x = x.reshape(batch, members, -1).transpose(0, 1)
                    images = False
                else:
                    x = x.flatten(2)
            elif kind == "dropout":
                if training and layer[1] > 0:
                    x = self._dropout(x, layer[1], images)
            else:
                x = self._normalise(x, layer, training)
        return x

    def _dropout(self, x: Tensor, p: float, images: bool) -> Tensor:
        # What F.dropout does for each member: a Bernoulli(1 - p) mask of its activations' shape
        # from its generator, scaled by 1 / (1 - p), then multiplied in.
        members = len(self.generators)
        shape = (x.shape[0], x.shape[1] // members, *x.shape[2:]) if images else x.shape[1:]
        masks = torch.stack([torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(
            1 - p, generator=g) for g in self.generators])
        masks.div_(1 - p)
        if images:  # (members, batch, C, H, W) -> (batch, members x C, H, W)
            masks = masks.transpose(0, 1).reshape(x.shape)
        return x * masks

    def _normalise(self, x: Tensor, layer: tuple, training: bool) -> Tensor:
        # Members side by side as channels: (batch, members * h). Each channel's statistics are
        # one member's feature over the batch, exactly what its own BatchNorm1d computes.
        _, w, b, s, momentum, eps = layer
        members, batch, h = x.shape
        weight = None if w is None else self.params[w].reshape(-1)
        bias = None if b is None else self.params[b].reshape(-1)
        out = F.batch_norm(x.transpose(0, 1).reshape(batch, members * h), self.stats[s].view(-1),
                           self.stats[s + 1].view(-1), weight, bias, training, momentum, eps)
        return out.view(batch, members, h).transpose(0, 1)

    def keep(self, rows: Tensor) -> None:
        """Keep only these members (a stopped member's rows leave the computation)."""
        self.flat = self.flat.index_select(0, rows)
        self._views()
        self.stats = [s.index_select(0, rows) for s in self.stats]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in rows.tolist()]
