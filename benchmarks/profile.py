"""Where the time of a layer goes: the kernels of the fused op next to those of the plain conv.

The runner says how far the fused op is from the plain convolution; this says why. For a
few representative layer shapes of the PConv UNet it profiles the plain ``nn.Conv2d`` and
the fused op, forward and forward + backward, and prints for each the operators and
kernels that took the time (device time on CUDA, self CPU time on CPU), per call. On a GPU
that shows, for instance, whether cuDNN runs layout transposes around the convolution and
what each of the op's own passes (mask pass, masking, epilogue, gradient prologue) costs.

    python -m benchmarks.profile                          # GPU: 512², batch 8, bf16 and fp32
    python -m benchmarks.profile --size 256 --batch 1 --out profile.txt
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import cases, timing
from .shapes import unet_layer_shapes

# Positions in the PConv UNet's list of distinct shapes: the first layer (few input
# channels, large output), the second (a strided encoder layer), the deepest strided one,
# the last decoder layer with many channels, and the output layer (few output channels).
REPRESENTATIVE = (0, 1, 4, -2, -1)


def representative_shapes(size: int, count: int):
    shapes = unet_layer_shapes(size, which=("pconv",))["pconv"]
    picked = []
    for i in REPRESENTATIVE[:count]:
        if shapes[i] not in picked:
            picked.append(shapes[i])
    return picked


def device_time_us(events) -> float:
    """Device time of the profiled calls: the kernels' and copies' own events. An operator's
    event on the CPU carries in its device time the kernels it launched, so summing those
    too would count each kernel twice."""
    return sum(e.self_device_time_total for e in events
               if e.device_type != torch.autograd.DeviceType.CPU)


def profile_call(call, inputs, device: str, iters: int) -> str:
    """The profiler's table of ``iters`` calls of ``call(inputs)``, after a warm-up, with
    times per call."""
    for _ in range(3):
        call(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            call(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total_us = (device_time_us(events) if device == "cuda"
                else sum(e.self_cpu_time_total for e in events)) / iters
    table = events.table(sort_by=sort, row_limit=14, max_name_column_width=70)
    unit = "device" if device == "cuda" else "self CPU"
    return f"{unit} time per call: {total_us / 1e3:.3f} ms (the table's totals cover {iters} calls)\n{table}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--size", type=int, help="input size of the UNet (default: 512 GPU, 256 CPU)")
    p.add_argument("--batch", type=int, help="default: 8 GPU, 1 CPU")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mode", choices=["single", "multi"], default="multi")
    p.add_argument("--layers", type=int, default=len(REPRESENTATIVE),
                   help="how many of the representative shapes")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", help="also write the report here")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"
    args.size = args.size or (512 if gpu else 256)
    args.batch = args.batch or (8 if gpu else 1)
    args.dtypes = args.dtypes or (["bfloat16", "float32"] if gpu else ["float32"])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.profile: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    env = timing.environment(args.device)
    lines = [f"# layer profiles on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, "
             f"cuDNN {env['cudnn']}), {args.size}² UNet input, batch {args.batch}, "
             f"{args.mode}-channel masks"]
    impls = cases.implementations(["conv", "fused"])
    for shape in representative_shapes(args.size, args.layers):
        for dtype_name in args.dtypes:
            (inputs,) = cases.make_inputs(shape, args.batch, args.mode, dtypes[dtype_name],
                                          args.device, 1)
            w, b = cases.make_params(shape, dtypes[dtype_name], args.device)
            for pass_name, make_call in (("fwd", cases.forward_call),
                                         ("fwd+bwd", cases.train_call)):
                for name, impl in impls.items():
                    report = profile_call(make_call(impl, shape, w, b), inputs, args.device,
                                          args.iters)
                    lines.append(f"\n## {shape.label} {dtype_name} {pass_name}: {name}\n{report}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
