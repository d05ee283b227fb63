"""The least the fused op can cost on a GPU beyond its convolution: the bytes its own passes
move (csrc/cuda: mask pass, masking, epilogue; in backward the gradient prologue and
``dx * m``), taken as time at the device's copy bandwidth.

Layers with at most 4 output channels and 9 taps (the UNets' last layers) take the direct
kernels of csrc/cuda/few_outputs_kernel.cuh instead: the forward convolves with the
epilogue inside (masking on load in inference; on the x * m it keeps in training), and the
input gradient comes masked from its kernel. Their floor counts what those kernels read beyond a plain convolution's operands
(the mask), not what they compute, whose time against cuDNN's only a run shows.

The CUDA op runs cuDNN's convolution on ``x * m`` plus those passes, so no tuning of the
passes brings a row's fused / conv ratio under its floor, ``1 + t_passes / t_conv``. With a
benchmark JSON this floor is set against each GPU row's measured conv time and fused ratio:
what is left above the floor is launches, passes below bandwidth, or a convolution of
``x * m`` slower than the plain one. Where the floor is itself over a goal, the passes have
to move into the convolution, with an implicit-GEMM kernel that masks on load and
renormalises in its epilogue.

    python -m benchmarks.bounds --bandwidth 4000            # floors in µs per shape (GB/s)
    python -m benchmarks.bounds --json gpu.json            # against a GPU run's rows

The runner records the device's copy bandwidth (``timing.copy_bandwidth_gbs``) in the JSON
it writes on a GPU; --bandwidth overrides it.
"""
from __future__ import annotations

import argparse
import json
import math

from .markdown import GPU_MAX_TRAIN_VS_CONV, ratio
from .shapes import LayerShape, distinct, unet_layer_shapes

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RATIO_BYTES = 4  # r and u are float32 whatever the input dtype


FEW_OUTPUTS, FEW_OUTPUT_TAPS = 4, 9  # kFewOutputs, kFewOutputsTaps of csrc/cuda/params.cuh


def takes_direct_kernels(shape: LayerShape) -> bool:
    """The CUDA op's rule (few_outputs_direct, groups 1 as in every UNet layer)."""
    return shape.c_out <= FEW_OUTPUTS and shape.kernel ** 2 <= FEW_OUTPUT_TAPS


def takes_implicit_gemm(shape: LayerShape) -> bool:
    """The layers the implicit-GEMM forward takes with PCONV_CUDA_IGEMM=1 in 16-bit dtypes
    (takes_implicit_gemm of csrc/cuda; groups 1 and dilation 1 as in every UNet layer)."""
    return shape.c_out > FEW_OUTPUTS and shape.kernel == 3 and shape.stride == 1


def pass_bytes(shape: LayerShape, batch: int, mode: str, dtype: str, pass_: str) -> dict[str, int]:
    """Bytes each of the CUDA op's own passes reads and writes at the least (every value
    once, halos of the mask windows left out) for one benchmark row; masks have the batch
    of the input and C_in channels ("multi") or 1 ("single"). A "fwd" row is inference (the
    op without autograd), a "fwd+bwd" row training (the training pair)."""
    e = ELEMENT_BYTES[dtype]
    oh, ow = shape.out_hw
    n = batch
    x = n * shape.c_in * shape.h * shape.w * e
    m = n * (shape.c_in if mode == "multi" else 1) * shape.h * shape.w * e
    y = n * shape.c_out * oh * ow * e
    stats = n * oh * ow * RATIO_BYTES  # one of r, u
    direct = takes_direct_kernels(shape)
    if direct and pass_ == "fwd":
        # The mask pass, then the direct forward, which reads m besides x.
        return {"mask pass": m + 2 * stats + n * oh * ow * e, "direct forward: m": m}
    if mode == "multi":
        # The masking reads the mask and writes its channel sum (float32, a plane per
        # sample), which the mask pass reads instead of the mask.
        channel_sum = n * shape.h * shape.w * RATIO_BYTES
        parts = {
            "masking": 2 * x + m + channel_sum,
            "mask pass": channel_sum + 2 * stats + n * oh * ow * e,
        }
    else:
        parts = {
            "mask pass": m + 2 * stats + n * oh * ow * e,  # reads m; writes r, u and u as dtype
            "masking": 2 * x + m,  # reads x and m, writes x * m
        }
    if not direct:
        parts["epilogue"] = 2 * y + 2 * stats  # reads raw, r and u, writes y in place
    if pass_ == "fwd+bwd":
        parts["grad prologue"] = 2 * y + 2 * stats  # reads g_y, r and u, writes g_raw
        if direct:
            parts["direct input gradient: m"] = m  # masks dx before its one write
        else:
            parts["dx * m"] = 2 * x + m  # reads dx and m, writes dx
    return parts


def floor_us(parts: dict[str, int], bandwidth_gbs: float) -> float:
    return sum(parts.values()) / (bandwidth_gbs * 1e9) * 1e6


def row_floor(row: dict, shape: LayerShape, batch: int,
              bandwidth_gbs: float) -> tuple[float, float]:
    """(floor of the passes in µs, floor of the fused / conv ratio) for a benchmark row of
    ``shape``."""
    us = floor_us(pass_bytes(shape, batch, row["mode"], row["dtype"], row["pass_"]),
                  bandwidth_gbs)
    return us, 1 + us / (1e3 * row["ms"]["conv"])


def _shapes(sizes, models) -> dict[tuple[int, str], LayerShape]:
    return {(size, s.label): s for size in sizes
            for _, s in distinct(unet_layer_shapes(size, which=models))}


def row_shapes(rows) -> list[LayerShape | None]:
    """The layer shape of each row: the one it records, else (rows of runners before rows
    recorded their shape) the UNet layer of its size and label; None where neither is known
    (the smoke preset's shapes are in no UNet)."""
    sizes = sorted({r["size"] for r in rows if "shape" not in r})
    by_label = {}
    for size in sizes:
        try:
            by_label.update(_shapes([size], ["pconv", "modified"]))
        except Exception:  # a size too small for the UNets: its rows stay unknown
            continue
    return [LayerShape(**r["shape"]) if "shape" in r else by_label.get((r["size"], r["layer"]))
            for r in rows]


def format_rows(rows, env, batch: int, bandwidth_gbs: float) -> str:
    """One line per layer row: the conv's time, the fused ratio measured, its floor, and
    what is left above it; rows whose floor is over the fwd+bwd goal are marked."""
    layer_rows = [r for r in rows if r["pass_"] in ("fwd", "fwd+bwd") and "conv" in r["ms"]
                  and "fused" in r["ms"]]
    lines = [f"device: {env.get('device')} | copy bandwidth {bandwidth_gbs:.0f} GB/s | batch {batch}",
             "size | layer | mode | dtype | pass | conv ms | passes floor us | fused | floor | left"]
    over = unknown = train = 0
    for r, shape in zip(layer_rows, row_shapes(layer_rows)):
        if shape is None:
            unknown += 1
            continue
        us, floor = row_floor(r, shape, batch, bandwidth_gbs)
        fused = ratio(r, "fused")
        mark = ""
        if r["pass_"] == "fwd+bwd":
            train += 1
            if floor > GPU_MAX_TRAIN_VS_CONV:
                over += 1
                mark = f"  floor over {GPU_MAX_TRAIN_VS_CONV}"
        lines.append(f"{r['size']} | {r['layer']} | {r['mode']} | {r['dtype']} | {r['pass_']} | "
                     f"{r['ms']['conv']:.3f} | {us:.1f} | {fused:.3f} | {floor:.3f} | "
                     f"{fused - floor:+.3f}{mark}")
    lines.append(f"fwd+bwd rows whose floor alone is over {GPU_MAX_TRAIN_VS_CONV}: {over} of "
                 f"{train}")
    if unknown:
        lines.append(f"rows left out, their layer shape unknown: {unknown}")
    return "\n".join(lines)


def format_shapes(sizes, batch: int, bandwidth_gbs: float, dtypes) -> str:
    """Without measurements: the bytes and the time floor of the passes per shape."""
    lines = [f"copy bandwidth {bandwidth_gbs:.0f} GB/s | batch {batch}",
             "size | layer | dtype | mode | fwd MB | fwd floor us | fwd+bwd MB | fwd+bwd floor us"]
    for (size, label), shape in _shapes(sizes, ["pconv", "modified"]).items():
        for dtype in dtypes:
            for mode in ("single", "multi"):
                cells = []
                for pass_ in ("fwd", "fwd+bwd"):
                    parts = pass_bytes(shape, batch, mode, dtype, pass_)
                    cells += [f"{sum(parts.values()) / 1e6:.1f}", f"{floor_us(parts, bandwidth_gbs):.1f}"]
                lines.append(f"{size} | {label} | {dtype} | {mode} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bounds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="a GPU run of python -m benchmarks (--json)")
    p.add_argument("--bandwidth", type=float,
                   help="device copy bandwidth in GB/s, bytes read plus written (default: "
                        "the one the run recorded)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                   choices=sorted(ELEMENT_BYTES))
    args = p.parse_args(argv)
    if args.json:
        with open(args.json) as f:
            data = json.load(f)
        env = data.get("environment", {})
        bandwidth = args.bandwidth or env.get("copy_bandwidth_gbs")
        if not bandwidth or not math.isfinite(bandwidth):
            p.error(f"{args.json} records no copy bandwidth: give --bandwidth GB/s")
        batch = (data.get("configuration", {}).get("batch") or data.get("args", {}).get("batch")
                 or args.batch)
        print(format_rows(data["rows"], env, batch, bandwidth))
        return 0
    if not args.bandwidth:
        p.error("--bandwidth GB/s is needed without --json")
    print(format_shapes(args.sizes, args.batch, args.bandwidth, args.dtypes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
