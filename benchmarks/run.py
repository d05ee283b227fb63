"""Benchmark runner: one table of every UNet layer shape, written as JSON too.

    python -m benchmarks                       # preset for the machine (GPU if present)
    python -m benchmarks --preset cpu --json out.json --markdown out.md
    python -m benchmarks --smoke               # tiny shapes, a few repeats (CI)

Each layer row times, in the same run, the plain ``nn.Conv2d`` of the same shape (the
floor), the fused op, the reference (NVIDIA formulation, eager), the lean pure-PyTorch
style and ``torch.compile`` of the reference, as ms and as a ratio to the plain conv;
forward alone (inference) and forward + backward; and the peak memory of forward +
backward of the fused op and of the reference. A last row times one training step of the
PConv UNet with the fused layer and with the reference layer.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import torch

from . import cases, timing
from .markdown import format_markdown, geomean, ratio
from .shapes import LayerShape, distinct, unet_layer_shapes

IMPLS = ("conv", "fused", "reference", "lean", "compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PRESETS = {
    # Batch 1 on CPU: the inference case, and what 2 cores can time in minutes.
    # torch.compile is left out on CPU (a compile per shape and dtype costs more than the
    # whole table); name it with --skip to keep it (--skip with no value).
    "cpu": dict(sizes=[256], batch=1, dtypes=["float32", "bfloat16"], warmup=3, repeats=41,
                model_size=256, model_batch=1, skip=["compiled"], malloc="retain"),
    "gpu": dict(sizes=[256, 512], batch=8, dtypes=["float32", "bfloat16", "float16"],
                warmup=5, repeats=30, model_size=256, model_batch=8),
    "smoke": dict(sizes=[16], batch=2, dtypes=["float32"], warmup=1, repeats=2,
                  model_size=128, model_batch=1),
}

SMOKE_SHAPES = [LayerShape(3, 8, 7, 2, 3, 16, 16), LayerShape(8, 16, 3, 1, 1, 8, 8, False),
                LayerShape(19, 3, 3, 1, 1, 16, 16)]


def record_times(row, times, base):
    """Fill ``row`` from interleaved samples: ``ms`` (medians), ``ratio`` (paired ratio of
    each implementation to ``base``, named in ``ratio_base``) and ``fused_vs`` (paired ratio of the fused op to each
    other one; above 1 means the fused op is slower)."""
    row["ms"] = {name: statistics.median(v) for name, v in times.items()}
    row["ratio"] = {name: timing.paired_ratio(v, times[base]) for name, v in times.items()}
    row["ratio_base"] = base
    if "fused" in times:
        row["fused_vs"] = {name: timing.paired_ratio(times["fused"], v)
                           for name, v in times.items() if name != "fused"}


def layer_rows(args, device, log):
    """Measure every (shape, dtype, mask mode, pass) and return one dict per row."""
    if args.smoke:
        shapes = [(f"smoke", s) for s in SMOKE_SHAPES]
        shapes = [(args.sizes[0], m, s) for m, s in shapes]
    else:
        shapes = [(size, m, s) for size in args.sizes
                  for m, s in distinct(unet_layer_shapes(size, which=args.models))]
    impls = cases.implementations([i for i in IMPLS if i not in args.skip])
    rows, probes = [], []
    total = len(shapes) * len(args.dtypes) * len(args.modes)
    done = 0
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for mode in args.modes:
            for size, model, shape in shapes:
                done += 1
                log(f"[{done}/{total}] {dtype_name} {mode} {model} {shape.label}")
                inputs = cases.make_inputs(shape, args.batch, mode, dtype, device, args.rotate)
                w, b = cases.make_params(shape, dtype, device)
                for pass_name, make_call in (("fwd", cases.forward_call),
                                             ("fwd+bwd", cases.train_call)):
                    row = dict(size=size, model=model, layer=shape.label, mode=mode,
                               dtype=dtype_name, pass_=pass_name, ms={})
                    calls = {name: make_call(impl, shape, w, b) for name, impl in impls.items()}
                    record_times(row, timing.interleaved_times_ms(
                        calls, inputs, device, args.warmup, args.repeats), base="conv")
                    if pass_name == "fwd+bwd":
                        probes.append((row, shape, mode, dtype))
                    rows.append(row)
                del inputs
    # Memory after the timings, so the profiler's bookkeeping never touches them.
    for row, shape, mode, dtype in probes:
        inputs = cases.make_inputs(shape, args.batch, mode, dtype, device, 1)
        w, b = cases.make_params(shape, dtype, device)
        row["peak_mb"] = {
            name: timing.peak_memory_mb(
                lambda: cases.train_call(impls[name], shape, w, b)(inputs[0]), device)
            for name in ("fused", "reference") if name in impls}
    return rows


def model_rows(args, device, log):
    """One PConv UNet training step with the fused layer and with the reference layer."""
    import pconv_cuda

    logging.getLogger("train.vgg").setLevel(logging.ERROR)  # random VGG: fine for timing
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        row = dict(size=args.model_size, model="pconv", layer="training step", mode="single",
                   dtype=dtype_name, pass_="step", ms={})
        log(f"training step {dtype_name}")
        kwargs = dict(layers=4, base_channels=8) if args.smoke else {}
        steps = {name: cases.unet_train_step(layer, args.model_size, args.model_batch, device,
                                             dtype, **kwargs)
                 for name, layer in (("fused", pconv_cuda.PartialConv2d),
                                     ("reference", pconv_cuda.ReferencePartialConv2d))}
        record_times(row, timing.interleaved_times_ms(
            {n: (lambda _, s=s: s()) for n, s in steps.items()}, [None], device,
            max(1, args.warmup), args.model_repeats), base="fused")
        rows.append(row)
    return rows


def _cell(row, impl, base):
    if impl not in row["ms"]:
        return "-"
    return f"{row['ms'][impl]:8.3f} ({ratio(row, impl, base):4.2f}x)"


def format_table(rows, env) -> str:
    head = (f"device: {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | "
            f"cuDNN {env['cudnn']} | TF32 matmul={env['tf32_matmul']} cudnn={env['tf32_cudnn']} | "
            f"malloc: {env.get('malloc', 'default')}")
    cols = ["size", "model", "layer", "mode", "dtype", "pass"] + list(IMPLS) + ["peak MB fused/ref"]
    lines = [head, "times in ms, (ratio to the plain conv); step rows: ratio to the fused step",
             " | ".join(cols)]
    for r in rows:
        base = "conv" if "conv" in r["ms"] else "fused"
        cells = [str(r["size"]), r["model"], r["layer"], r["mode"], r["dtype"], r["pass_"]]
        cells += [_cell(r, i, base) for i in IMPLS]
        peak = r.get("peak_mb")
        cells.append(f"{peak['fused']:.1f}/{peak['reference']:.1f}" if peak else "-")
        lines.append(" | ".join(cells))
    lines.append("")
    lines.append("geometric means of the ratio to the plain conv:")
    groups = sorted({(r["dtype"], r["mode"], r["pass_"]) for r in rows if "conv" in r["ms"]})
    for dtype, mode, pass_ in groups:
        sel = [r for r in rows if (r["dtype"], r["mode"], r["pass_"]) == (dtype, mode, pass_)
               and "conv" in r["ms"]]
        parts = [f"{i} {geomean([ratio(r, i) for r in sel if i in r['ms']]):.3f}"
                 for i in IMPLS[1:] if any(i in r["ms"] for r in sel)]
        lines.append(f"  {dtype:8s} {mode:6s} {pass_:7s} " + "  ".join(parts))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu if CUDA, else cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats (CI)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--batch", type=int)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--models", nargs="+", choices=["pconv", "modified"],
                   default=["pconv", "modified"], help="UNets whose layer shapes are measured")
    p.add_argument("--modes", nargs="+", choices=["single", "multi"], default=["single", "multi"])
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--rotate", type=int, default=3, help="input sets cycled through")
    p.add_argument("--skip", nargs="*", choices=IMPLS[1:],
                   help="implementations to leave out (e.g. compiled)")
    p.add_argument("--no-model", action="store_true", help="skip the training-step row")
    p.add_argument("--model-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--malloc", choices=["retain", "default"],
                   help="retain: glibc keeps freed memory, so no implementation pays page "
                        "faults on reused sizes (CPU preset); default: glibc as it comes")
    p.add_argument("--json", help="write the rows and the environment here")
    p.add_argument("--markdown", help="write the tables as Markdown here (the README's form)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset = "smoke"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("gpu" if device == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.skip = args.skip or []
    if args.smoke:
        args.model_repeats = min(args.model_repeats, 2)
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmarks: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = args.malloc == "retain" and timing.retain_freed_memory()
    start = time.time()

    def log(msg):
        if not args.quiet:
            print(f"[{time.time() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    env = timing.environment(device)
    env["malloc"] = "glibc, freed memory retained" if retained else "default"
    rows = layer_rows(args, device, log)
    if not args.no_model:
        rows += model_rows(args, device, log)
    table = format_table(rows, env)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": {k: v for k, v in vars(args).items()},
                       "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows, env))
    return 0
