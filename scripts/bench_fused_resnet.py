"""One training step (forward and backward, bf16 autocast) of 8 ResNet-18s on 32x32 images, four
ways, on a GPU: what fusing ResNets gains there, and by which engine.

- alone: each model on its own batch, one after another (what `fuse=1` does);
- alone, channels-last: the same with NHWC weights and inputs;
- vmap: `torch.func.vmap` over `functional_call` with stacked module state (each BatchNorm in
  float32 on bf16 activations: CUDA's batch norm backward refuses the mix under vmap);
- fused: `sweep.fused.model.TreeFusedModel`, what `fuse` trains ResNet-18 with (HFTA's fusion:
  grouped convolutions over the members' channels side by side, channels-last on CUDA).

Times are medians of `--steps` steps after 5 warm-up steps, on CUDA events, with cuDNN's
autotuner on (as `trainer.deterministic=false` sets it); ratios are alone's time over each
variant's, in the same run.

    python scripts/bench_fused_resnet.py [--members 8] [--batch 32 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from sweep.fused.model import TreeFusedModel
from sweep.models import resnet18


def float32_batch_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(module).forward(module, x.float()).to(x.dtype)


def vmapped(models: list[nn.Module]):
    """(forward of (members, batch, ...) inputs, the stacked parameters)."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    for module in base.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.forward = functools.partial(float32_batch_norm, module)

    def member(p, b, x):
        return functional_call(base, (p, b), (x,))

    return (lambda x: vmap(member)(params, buffers, x)), list(params.values())


def timed(step, steps: int) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def variants(models: list[nn.Module], batch: int) -> dict:
    """Each way's training step of the members, on one batch of random images each."""
    m, device = len(models), next(models[0].parameters()).device
    x = torch.randn(m, batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (m, batch), device=device)
    last = [copy.deepcopy(model).to(memory_format=torch.channels_last) for model in models]
    x_last = [x[i].contiguous(memory_format=torch.channels_last) for i in range(m)]
    vm_forward, vm_params = vmapped(models)
    fused = TreeFusedModel(models, amp=torch.bfloat16)

    def alone(nets=models, xs=x):
        for i, net in enumerate(nets):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = net(xs[i])
            F.cross_entropy(out.float(), y[i]).backward()

    def by_vmap():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = vm_forward(x)
        torch.autograd.grad(F.cross_entropy(out.float().flatten(0, 1), y.flatten()), vm_params)

    def by_fusion():
        out = fused.forward(x, True)
        torch.autograd.grad(F.cross_entropy(out.flatten(0, 1), y.flatten()), fused.params)

    return {"alone": alone, "alone, channels-last": lambda: alone(last, x_last),
            "vmap": by_vmap, "fused (TreeFusedModel)": by_fusion}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    models = [resnet18((3, 32, 32), 10).cuda() for _ in range(args.members)]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.members} "
          f"ResNet-18s, bf16 autocast, forward and backward, medians of {args.steps} steps")
    for batch in args.batch:
        times = {name: timed(step, args.steps) for name, step in variants(models, batch).items()}
        for name, ms in times.items():
            print(f"batch {batch:4d}  {name:24s} {ms:8.2f} ms a step   "
                  f"alone / this {times['alone'] / ms:5.2f}")


if __name__ == "__main__":
    main()
