"""N members of one model as one wider model, each member's computation exactly its own.

Two engines behind one interface (`StackedModel`): inputs are (members, batch, *in_shape),
outputs (members, batch, outputs), and all of a member's parameters are one row of `flat`. Both
fuse HFTA's way (Wang et al., MLSys 2021): a grouped convolution per Conv2d over the members'
channels side by side, BatchNorm over all of them (each channel's statistics one member's), a
batched matmul per Linear.

- `LayerFusedModel`, for an `nn.Sequential` of layers it knows (the MLP family and the CNN), layer
  by layer; vectors stay (members, batch, features) between Linears, and each member's dropout
  masks come from its own generator.
- `TreeFusedModel`, for a module tree built of such layers (ResNet-18), by swapping each layer of
  a copy for its fused twin and running the copy's own forward.

Why not `torch.func.vmap`: measured slower in both places that matter (`sweep.fused` for the
CPU's MLPs; on an H200, a training step of 8 ResNet-18s took 48 ms vmapped and 22 ms fused by
hand, batch 128; docs/benchmarks.md).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Elementwise modules act on any layout as on one member's.
ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Identity)
# Modules that act on each channel of (batch, channels, H, W) alone: the members' channels side by
# side give each member what its own module computes.
PER_CHANNEL = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
# Every layer LayerFusedModel fuses.
LAYERS = (nn.Flatten, nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.Dropout, *ELEMENTWISE,
          *PER_CHANNEL)


def fuse_models(models: Sequence[nn.Module], generators: Sequence[torch.Generator] | None = None,
                amp: torch.dtype | None = None) -> StackedModel:
    """The members as one model: layer by layer where `LayerFusedModel` knows every layer of a
    Sequential, else by module surgery. `generators[i]`: member i's dropout masks."""
    first = models[0]
    if isinstance(first, nn.Sequential) and all(isinstance(m, LAYERS) for m in first):
        return LayerFusedModel(models, generators, amp)
    return TreeFusedModel(models, amp)


def grouped_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple) -> Tensor:
    """Every member's Conv2d as one convolution over their channels side by side: `weight`
    (members, out, in, k, k), `bias` (members, out), `conv` the layer's (stride, padding,
    dilation)."""
    return F.conv2d(x, weight.reshape(-1, *weight.shape[2:]),
                    None if bias is None else bias.reshape(-1), *conv, groups=len(weight))


def wide_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                    var: Tensor, training: bool, momentum: float, eps: float) -> Tensor:
    """Every member's BatchNorm as one over their channels side by side (batch, members x C,
    ...): each channel's statistics are one member's, exactly what its own BatchNorm computes.
    `mean` and `var` (members, C) are updated in place in training."""
    return F.batch_norm(x, mean.view(-1), var.view(-1),
                        None if weight is None else weight.reshape(-1),
                        None if bias is None else bias.reshape(-1), training, momentum, eps)


def check_conv(conv: nn.Conv2d, where: str) -> tuple:
    """The layer's (stride, padding, dilation), for a Conv2d fusion takes."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"fusion takes ungrouped, zero-padded Conv2d layers ({where})")
    return conv.stride, conv.padding, conv.dilation


class StackedModel:
    """What both engines share. All of a member's parameters are one row of `flat`
    (members, numel), in the order of its `named_parameters()`; `params` are views of it shaped
    as the forward pass uses them (the leaves gradients are taken of), so an optimizer updates
    every layer of every member with a few ops on `flat`. `stats`: buffers (BatchNorm's running
    statistics), stacked over the members."""

    names: list[str]
    shapes: list[torch.Size]
    params: list[Tensor]
    stats: list[Tensor]
    stat_names: list[str]  # each of `stats`' buffer name in a member's own model
    transposed: frozenset[int] = frozenset()  # params stored as the transpose of a member's
    flat: Tensor
    generators: list[torch.Generator] | None = None
    amp: torch.dtype | None = None  # autocast (bf16 or fp16), as `train` runs a model alone

    def _stack_params(self, stacked: Sequence[Tensor]) -> None:
        self.shapes = [p.shape[1:] for p in stacked]
        self.flat = torch.cat([p.flatten(1) for p in stacked], dim=1)
        self._views()

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

    def columns(self, names: Sequence[str]) -> list[range]:
        """The columns of `flat` that hold the named parameters, a range per parameter (ranges,
        not lists: a ResNet-18 has 11 million columns)."""
        starts, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            starts[name] = range(start, start + shape.numel())
            start += shape.numel()
        return [starts[name] for name in names]

    def shaped(self, row: Tensor, model: nn.Module) -> list[Tensor]:
        """A member's row like `flat`'s (its weights, or an optimizer's state of them) as the
        tensors of `model.parameters()`, in that order: its own model's shapes."""
        values = {}
        for k, (name, cols, shape) in enumerate(zip(self.names, self.columns(self.names),
                                                    self.shapes, strict=True)):
            value = row[cols.start:cols.stop].view(shape)
            values[name] = value.T if k in self.transposed else value
        return [values[name].reshape(p.shape) for name, p in model.named_parameters()]

    @torch.no_grad()
    def member_state(self, row: int, model: nn.Module, batches: int) -> dict[str, Tensor]:
        """Member `row`'s weights and BatchNorm statistics copied into `model` (its own, which
        training fused leaves as it was built), whose `state_dict()` this returns: its run
        alone's. `batches`: the training batches it has seen (BatchNorm's num_batches_tracked)."""
        for param, value in zip(model.parameters(), self.shaped(self.flat[row], model),
                                strict=True):
            param.copy_(value)
        buffers = dict(model.named_buffers())
        for name, stat in zip(self.stat_names, self.stats, strict=True):
            buffers[name].copy_(stat[row])
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and (
                    module.num_batches_tracked is not None):
                module.num_batches_tracked.fill_(batches)
        return model.state_dict()

    def forward(self, x: Tensor, training: bool) -> Tensor:
        """(members, batch, *in_shape) -> (members, batch, outputs); `training`: BatchNorm's and
        dropout's mode. Under `amp` the outputs come back in float32, as `train` takes them."""
        if self.amp is None:
            return self._forward(x, training)
        with torch.autocast(x.device.type, dtype=self.amp):
            return self._forward(x, training).float()

    def _forward(self, x: Tensor, training: bool) -> Tensor:
        raise NotImplementedError

    def keep(self, rows: Tensor) -> None:
        """Keep only these members (a stopped member's rows leave the computation)."""
        self.flat = self.flat.index_select(0, rows)
        self._views()
        self.stats = [s.index_select(0, rows) for s in self.stats]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in rows.tolist()]


class LayerFusedModel(StackedModel):
    """The members' `nn.Sequential`s of Flatten, Linear, Conv2d, BatchNorm1d, pooling, Dropout and
    activations (the MLP family and the CNN of `sweep.models`), fused layer by layer.

    Between layers activations are either vectors, (members, batch, features), where a Linear is
    one `bmm`, or images, (batch, members x channels, H, W), where a Conv2d is one convolution
    with groups=members and pooling acts per channel.

    `generators[i]`: member i's randomness (its dropout masks), at the state the global RNG has
    when its model alone starts training, so each member draws the masks its run alone draws.
    """

    def __init__(self, models: Sequence[nn.Sequential],
                 generators: Sequence[torch.Generator] | None = None,
                 amp: torch.dtype | None = None):
        first = models[0]
        self.amp = amp  # autocast (bf16 or fp16), as `train` runs a model alone
        self.names = [name for name, _ in first.named_parameters()]
        self.params: list[Tensor] = []
        self.stats: list[Tensor] = []  # BatchNorm running means and variances, (members, h) each
        self.stat_names: list[str] = []
        transposed = set()
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
                transposed.add(weight)
                bias = None if module.bias is None else self._stack(
                    m.bias.unsqueeze(0) for m in same)
                self.layers.append(("linear", weight, bias))
            elif isinstance(module, nn.Conv2d):
                self.layers.append(self._conv(module, same, index))
            elif isinstance(module, nn.BatchNorm1d):
                self.layers.append(self._batch_norm(module, same))
                self.stat_names += [f"{index}.running_mean", f"{index}.running_var"]
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
        self.transposed = frozenset(transposed)
        self._stack_params(self.params)

    def _stack(self, tensors) -> int:
        self.params.append(torch.stack([t.detach() for t in tensors]))
        return len(self.params) - 1

    def _conv(self, module: nn.Conv2d, same: list[nn.Conv2d], index: int) -> tuple:
        conv = check_conv(module, f"layer {index}")
        weight = self._stack(m.weight for m in same)
        bias = None if module.bias is None else self._stack(m.bias for m in same)
        return ("conv", weight, bias, conv)

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
                _, w, b, conv = layer
                x = grouped_conv2d(x, p[w], None if b is None else p[b], conv)
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
        p = self.params
        out = wide_batch_norm(x.transpose(0, 1).reshape(batch, members * h),
                              None if w is None else p[w], None if b is None else p[b],
                              self.stats[s], self.stats[s + 1], training, momentum, eps)
        return out.view(batch, members, h).transpose(0, 1)


class TreeFusedModel(StackedModel):
    """A module tree such as torchvision's ResNet-18, fused by module surgery (HFTA's way): a copy
    of the first member whose every Conv2d is one convolution with groups=members over the
    members' channels side by side, every BatchNorm2d one over all of them (each channel's
    statistics one member's), and every Linear (the head, after the flatten) one batched matmul.
    The copy's own forward runs: activations, pooling and residual additions act on each channel
    alone, so on each member's channels as on its own.

    Only for models known to be built that way (`sweep.fused.groups.TREE_MODELS`): a forward that
    mixed channels any other way would mix members. On CUDA activations are channels-last, which
    cuDNN's grouped convolutions run fastest in.
    """

    def __init__(self, models: Sequence[nn.Module], amp: torch.dtype | None = None):
        first = models[0]
        self.amp = amp
        self.names = [name for name, _ in first.named_parameters()]
        index = {name: i for i, name in enumerate(self.names)}
        own = [dict(m.named_modules()) for m in models]
        self.stats, self.stat_names = [], []
        self.tree = copy.deepcopy(first)
        for name, module in list(self.tree.named_modules()):
            same = [modules[name] for modules in own]
            weight, bias = index.get(f"{name}.weight"), index.get(f"{name}.bias")
            if isinstance(module, nn.Conv2d):
                fused = _GroupedConv2d(self, weight, bias, check_conv(module, name))
            elif isinstance(module, nn.BatchNorm2d):
                if not module.track_running_stats or module.momentum is None or not module.affine:
                    raise ValueError(f"fusion needs affine BatchNorm2d with running statistics "
                                     f"and a momentum ({name})")
                self.stats += [torch.stack([m.running_mean for m in same]),
                               torch.stack([m.running_var for m in same])]
                self.stat_names += [f"{name}.running_mean", f"{name}.running_var"]
                fused = _WideBatchNorm2d(self, weight, bias, len(self.stats) - 2, module)
            elif isinstance(module, nn.Linear):
                fused = _BatchedLinear(self, weight, bias)
            elif isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                # One mask over the wide tensor would not be any member's own masks.
                raise ValueError(f"cannot fuse dropout inside a module tree ({name})")
            else:
                continue
            parent, _, leaf = name.rpartition(".")
            setattr(self.tree.get_submodule(parent), leaf, fused)
        if list(self.tree.parameters()):
            left = [name for name, _ in self.tree.named_parameters()]
            raise ValueError(f"cannot fuse {type(first).__name__}: fusion knows no layer of {left}")
        members = [dict(m.named_parameters()) for m in models]
        self._stack_params([torch.stack([mine[n].detach() for mine in members])
                            for n in self.names])

    def _forward(self, x: Tensor, training: bool) -> Tensor:
        members, batch = x.shape[:2]
        self.tree.train(training)
        x = x.transpose(0, 1).reshape(batch, members * x.shape[2], *x.shape[3:])
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.tree(x).view(batch, members, -1).transpose(0, 1)


class _GroupedConv2d(nn.Module):
    def __init__(self, model: StackedModel, weight: int, bias: int | None, conv: tuple):
        super().__init__()
        self.model, self.weight, self.bias, self.conv = model, weight, bias, conv

    def forward(self, x: Tensor) -> Tensor:
        p = self.model.params
        return grouped_conv2d(x, p[self.weight], None if self.bias is None else p[self.bias],
                              self.conv)


class _WideBatchNorm2d(nn.Module):
    def __init__(self, model: StackedModel, weight: int, bias: int, stats: int,
                 bn: nn.BatchNorm2d):
        super().__init__()
        self.model, self.weight, self.bias, self.stats = model, weight, bias, stats
        self.momentum, self.eps = bn.momentum, bn.eps

    def forward(self, x: Tensor) -> Tensor:
        p, s = self.model.params, self.model.stats
        return wide_batch_norm(x, p[self.weight], p[self.bias], s[self.stats], s[self.stats + 1],
                               self.training, self.momentum, self.eps)


class _BatchedLinear(nn.Module):
    def __init__(self, model: StackedModel, weight: int, bias: int | None):
        super().__init__()
        self.model, self.weight, self.bias = model, weight, bias

    def forward(self, x: Tensor) -> Tensor:  # (batch, members x in) -> (batch, members x out)
        p = self.model.params
        members, batch = len(p[self.weight]), len(x)
        x = x.reshape(batch, members, -1).transpose(0, 1)
        weight = p[self.weight].transpose(1, 2)  # (members, in, out)
        out = torch.bmm(x, weight) if self.bias is None else torch.baddbmm(
            p[self.bias].unsqueeze(1), x, weight)
        return out.transpose(0, 1).reshape(batch, -1)
