"""One optimizer step for every member: PyTorch's update rule, each member's hyperparameters a row.

Each member keeps its own `torch.optim` optimizer over its own (unused) model: the view its
scheduler steps, and where its lr, momentum, betas and weight decay are read from, per parameter
group. The update itself runs on the fused model's `flat` (members, numel) with those values as
tensors: the arithmetic of `torch.optim`'s single-tensor SGD, Adam, RMSprop and Adagrad, in
their order of operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# The update rule each optimizer class follows; Adam's and AdamW's differ only in
# `decoupled_weight_decay`, which every member's groups carry.
RULES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam",
         torch.optim.RMSprop: "rmsprop", torch.optim.Adagrad: "adagrad"}
KEYS = {"sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
        "adam": ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay"),
        "rmsprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
        "adagrad": ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value")}


class FusedOptimizer:
    """Steps `flat` (members, numel) as each member's optimizer (`views`) would step its model.

    `columns[g]`: the ranges of columns of `flat` that parameter group g holds (the same in every
    member; `StackedModel.columns`).
    """

    def __init__(self, flat: Tensor, views: Sequence[torch.optim.Optimizer],
                 columns: Sequence[Sequence[range]]):
        self.rule = RULES[type(views[0])]
        self.views = list(views)
        # Each member's steps applied: fp16's loss scaler may skip a step for some members only.
        self.steps = torch.zeros(len(views), 1, dtype=torch.float64, device=flat.device)
        self.started = False  # every member has applied its first step
        self.state: dict[str, Tensor] = {}
        numel = flat.shape[1]
        group = torch.full((numel,), -1, dtype=torch.long)
        held = 0
        for g, ranges in enumerate(columns):
            for cols in ranges:
                group[cols.start:cols.stop] = g
                held += len(cols)
        if held != numel or bool((group < 0).any()):
            raise ValueError("the parameter groups must hold every column once")
        # One group: a (members, 1) column broadcasts; several: each column picks its group's.
        self.group = None if len(columns) == 1 else group.to(flat.device)
        self.dtype, self.device = flat.dtype, flat.device
        self.h: dict[str, Tensor] = {}  # each key's values, float64 (members, 1 or numel)
        self.c: dict[str, Tensor | None] = {}  # what steps multiply by, in the weights' dtype
        self.refresh(everything=True)

    def refresh(self, everything: bool = False) -> None:
        """Read the views' values again: the lr after a schedule stepped, or every key
        (`everything`: once, and whenever a schedule cycles momentum or betas)."""
        for key in KEYS[self.rule] if everything else ("lr",):
            rows = [[g[key] for g in view.param_groups] for view in self.views]
            if key == "betas":
                self._set("beta1", [[b[0] for b in row] for row in rows])
                self._set("beta2", [[b[1] for b in row] for row in rows])
            else:
                self._set(key, rows)
        # Rounded once to the weights' dtype; derived values (1 - alpha) are computed in float64
        # first, as PyTorch computes them in Python floats. None: no member uses it.
        h, c = self.h, self.c
        c["lr"] = self._cast(h["lr"])
        if everything:
            c["weight_decay"] = self._some(h["weight_decay"])
            c["eps"] = self._cast(h["eps"]) if "eps" in h else None
            getattr(self, f"_constants_{self.rule}")(h, c)
        if self.rule == "adam":
            # AdamW: param * (1 - lr * weight_decay); a factor of 1 for Adam's members
            c["decay"] = self._cast(1 - h["lr"] * self.h["decoupled"]) if (
                self.any_decoupled) else None

    def _constants_sgd(self, h: dict[str, Tensor], c: dict[str, Tensor | None]) -> None:
        c["momentum"] = self._some(h["momentum"])
        c["dampening"] = self._cast(1 - h["dampening"])
        c["nesterov"] = (h["nesterov"] != 0) if bool(h["nesterov"].any()) else None
        c["momentum_rows"] = None if bool((h["momentum"] != 0).all()) else h["momentum"] != 0

    def _constants_adam(self, h: dict[str, Tensor], c: dict[str, Tensor | None]) -> None:
        decoupled = h["decoupled_weight_decay"] != 0
        c["weight_decay"] = self._some(h["weight_decay"] * ~decoupled)  # Adam's, on the grad
        h["decoupled"] = h["weight_decay"] * decoupled  # AdamW's, on the weights
        self.any_decoupled = bool(h["decoupled"].any())
        c["one_minus_beta1"], c["beta2"] = self._cast(1 - h["beta1"]), self._cast(h["beta2"])
        c["one_minus_beta2"] = self._cast(1 - h["beta2"])

    def _constants_rmsprop(self, h: dict[str, Tensor], c: dict[str, Tensor | None]) -> None:
        c["alpha"], c["one_minus_alpha"] = self._cast(h["alpha"]), self._cast(1 - h["alpha"])
        c["momentum"] = self._some(h["momentum"])
        c["momentum_rows"] = None if bool((h["momentum"] != 0).all()) else h["momentum"] != 0
        centered = h["centered"] != 0
        c["centered"] = None if not bool(centered.any()) else centered

    def _constants_adagrad(self, h: dict[str, Tensor], c: dict[str, Tensor | None]) -> None:
        c["initial_accumulator_value"] = self._cast(h["initial_accumulator_value"])

    def _set(self, key: str, rows: list[list[float]]) -> None:
        values = torch.tensor(rows, dtype=torch.float64, device=self.device)
        self.h[key] = values if self.group is None else values[:, self.group]

    def _cast(self, values: Tensor) -> Tensor:
        return values.to(self.dtype)

    def _some(self, values: Tensor) -> Tensor | None:
        return self._cast(values) if bool(values.any()) else None

    def step(self, flat: Tensor, grad: Tensor, applied: Tensor | None = None) -> None:
        """One update of every member's row of `flat` in place; `grad` is its gradient.

        `applied` (members, 1) bool: only those members step (fp16's scaler skips the others, as
        `GradScaler.step` skips a run alone's `optimizer.step`): their rows, state and step
        counts are left as they were.
        """
        with torch.no_grad():
            if applied is None:
                self.steps += 1
                self._update(flat, grad)
            else:
                self.steps += applied
                before = {key: value.clone() for key, value in self.state.items()}
                was = flat.clone()
                self._update(flat, grad)
                flat.copy_(torch.where(applied, flat, was))
                for key, value in self.state.items():
                    value.copy_(torch.where(applied, value, before.get(key, self._initial(key))))
            if not self.started:
                self.started = bool((self.steps > 0).all())

    def _update(self, flat: Tensor, grad: Tensor) -> None:
        if self.c["weight_decay"] is not None:  # coupled: grad + weight_decay * param
            grad = grad.add(flat * self.c["weight_decay"])
        getattr(self, f"_{self.rule}")(flat, grad, self.c)

    def _initial(self, key: str) -> Tensor:
        """A state's value before a member's first step (a state the skipped step created)."""
        if key == "sum":
            return self.c["initial_accumulator_value"]
        return torch.zeros((), dtype=self.dtype, device=self.device)

    def _zeros(self, key: str, like: Tensor) -> Tensor:
        if key not in self.state:
            self.state[key] = torch.zeros_like(like)
        return self.state[key]

    def _sgd(self, p: Tensor, grad: Tensor, c: dict[str, Tensor | None]) -> None:
        m = c["momentum"]
        if m is not None:
            buf = self.state.get("momentum_buffer")
            if buf is None:  # PyTorch's first step: the buffer is the gradient itself
                buf = self.state["momentum_buffer"] = grad.clone()
            else:
                buf.mul_(m).add_(grad * c["dampening"])
                if not self.started:  # members whose first step was skipped take it now
                    buf.copy_(torch.where(self.steps == 1, grad, buf))
            d = buf if c["nesterov"] is None else torch.where(c["nesterov"], grad.add(buf * m),
                                                               buf)
            grad = d if c["momentum_rows"] is None else torch.where(c["momentum_rows"], d, grad)
        p.sub_(grad * c["lr"])  # param - lr * d_p

    def _adam(self, p: Tensor, grad: Tensor, c: dict[str, Tensor | None]) -> None:
        exp_avg, exp_avg_sq = self._zeros("exp_avg", p), self._zeros("exp_avg_sq", p)
        if c["decay"] is not None:
            p.mul_(c["decay"])
        exp_avg.lerp_(grad, c["one_minus_beta1"])
        exp_avg_sq.mul_(c["beta2"]).addcmul_(grad * c["one_minus_beta2"], grad)
        h = self.h
        step_size = h["lr"] / (1 - h["beta1"] ** self.steps)
        bias_correction2_sqrt = (1 - h["beta2"] ** self.steps) ** 0.5
        denom = (exp_avg_sq.sqrt() / self._cast(bias_correction2_sqrt)).add_(c["eps"])
        p.add_(self._cast(-step_size) * exp_avg / denom)  # PyTorch's addcdiv, in its order

    def _rmsprop(self, p: Tensor, grad: Tensor, c: dict[str, Tensor | None]) -> None:
        square_avg = self._zeros("square_avg", p)
        square_avg.mul_(c["alpha"]).addcmul_(grad * c["one_minus_alpha"], grad)
        avg = square_avg.sqrt()
        if c["centered"] is not None:
            grad_avg = self._zeros("grad_avg", p)
            grad_avg.lerp_(grad, c["one_minus_alpha"])
            avg = torch.where(c["centered"],
                              square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_(), avg)
        avg = avg.add_(c["eps"])
        step = -c["lr"] * grad / avg  # param + (-lr) * grad / avg
        if c["momentum"] is not None:
            buf = self._zeros("momentum_buffer", p)
            buf.mul_(c["momentum"]).addcdiv_(grad, avg)
            moved = -c["lr"] * buf  # param + (-lr) * buf
            step = moved if c["momentum_rows"] is None else torch.where(c["momentum_rows"],
                                                                        moved, step)
        p.add_(step)

    def _adagrad(self, p: Tensor, grad: Tensor, c: dict[str, Tensor | None]) -> None:
        if "sum" not in self.state:
            self.state["sum"] = torch.zeros_like(p) + c["initial_accumulator_value"]
        state_sum = self.state["sum"]
        clr = self.h["lr"] / (1 + (self.steps - 1) * self.h["lr_decay"])
        state_sum.addcmul_(grad, grad)
        std = state_sum.sqrt().add_(c["eps"])
        p.add_(self._cast(-clr) * grad / std)  # PyTorch's addcdiv, in its order

    def member_state_dict(self, row: int, shaped: Callable[[Tensor], list[Tensor]]
                          ) -> dict[str, Any]:
        """Member `row`'s optimizer as its run alone's `state_dict()` holds it: the view's own
        groups, and the state of `torch.optim`'s rule (its keys, only where that rule keeps
        them) from this optimizer's rows. `shaped`: a row like `flat`'s as the tensors of the
        view's parameters, in their order (`StackedModel.shaped`)."""
        view = self.views[row]
        saved = view.state_dict()
        steps = float(self.steps[row].item())
        if steps == 0:  # no step applied yet: the state it was built with (Adagrad's sums)
            return saved
        rows = {key: shaped(value[row]) for key, value in self.state.items()}
        groups = [g for g in view.param_groups for _ in g["params"]]
        state: dict[int, dict[str, Any]] = {}
        for i, group in enumerate(groups):
            entry = {key: values[i].clone() for key, values in rows.items()}
            if self.rule == "sgd":
                if group["momentum"] == 0:
                    continue  # SGD without momentum keeps no state
            else:
                # A float tensor, as `torch.optim` makes it (Adagrad's, made when it was built)
                built = saved["state"].get(i, {}).get("step")
                entry["step"] = torch.tensor(steps, dtype=None if built is None else built.dtype)
                if self.rule == "rmsprop":
                    if group["momentum"] == 0:
                        entry.pop("momentum_buffer", None)
                    if not group["centered"]:
                        entry.pop("grad_avg", None)
            state[i] = entry
        saved["state"] = state
        return saved

    def keep(self, rows: Tensor) -> None:
        """Keep only these members' rows, state and views (`rows` index the current members)."""
        for key, value in self.state.items():
            self.state[key] = value.index_select(0, rows)
        self.steps = self.steps.index_select(0, rows)
        self.views = [self.views[i] for i in rows.tolist()]
        self.refresh(everything=True)


class LossScales:
    """fp16's loss scaling with a scale per member: each member's the `torch.amp.GradScaler` of
    its run alone, the same arithmetic on a (members,) tensor. A member whose gradients overflow
    skips its step and halves its scale; the others step."""

    def __init__(self, members: int, device: torch.device):
        defaults = torch.amp.GradScaler(device.type)  # a run alone's settings, read once
        self.growth, self.backoff = defaults.get_growth_factor(), defaults.get_backoff_factor()
        self.interval = defaults.get_growth_interval()
        self.scale = torch.full((members,), defaults.get_scale(), dtype=torch.float32,
                                device=device)
        self.tracker = torch.zeros(members, dtype=torch.int32, device=device)

    def scaled(self, losses: Tensor) -> Tensor:
        """The sum to differentiate: each member's loss times its own scale."""
        return (losses * self.scale).sum()

    def unscale_(self, grad: Tensor) -> Tensor:
        """Divide each member's row of gradients by its scale in place (`GradScaler.unscale_`'s
        float32 reciprocal); return which members' gradients hold inf or nan, (members,)."""
        grad.mul_(self.scale.double().reciprocal().float().unsqueeze(1))
        return ~torch.isfinite(grad).all(1)

    def update(self, found_inf: Tensor) -> None:
        """`GradScaler.update`, each member on its own: back off after an overflow, grow after
        `growth_interval` clean steps in a row."""
        tracker = torch.where(found_inf, 0, self.tracker + 1)
        grow = tracker == self.interval
        grown = self.scale * self.growth
        grown = torch.where(torch.isfinite(grown), grown, self.scale)
        self.scale = torch.where(found_inf, self.scale * self.backoff,
                                 torch.where(grow, grown, self.scale))
        self.tracker = torch.where(grow, 0, tracker)

    def keep(self, rows: Tensor) -> None:
        self.scale, self.tracker = self.scale.index_select(0, rows), self.tracker.index_select(
            0, rows)
