"""The CUDA op's two routes for layers with few output channels, timed side by side.

Layers with at most 4 output channels and 9 taps (the UNets' last layers, 64->3 and 67->3)
take the direct kernels of csrc/cuda/few_outputs_kernel.cuh: the forward renormalises before
its one write (and masks on load in inference), and the input gradient comes masked from its
kernel. ``PCONV_CUDA_DIRECT`` picks them: unset or 1 both, 0 neither (cuDNN and the passes
around it), ``forward`` or ``input_grad`` one. This times those routes and the plain
``nn.Conv2d`` of the same shape, interleaved in one process (the variable is read at every
call), for every such layer of the two UNets, so that the rule can follow the device. The
forward rows time both and neither (the input gradient's kernel has no part there); the
forward + backward rows all four:

    python -m benchmarks.routes                      # GPU: 256² and 512², batch 8
    python -m benchmarks.routes --json routes.json   # written row by row

Each shape and dtype is timed in each layout of ``--layouts`` (NCHW, then channels_last:
inputs, masks, gradients and weights all in that layout, as
``model.to(memory_format=torch.channels_last)`` runs them), so that the rule can follow the
layout too, and a run cut short by ``--max-minutes`` has both layouts of the shapes it did.

Only the CUDA op reads the variable: on a CPU the two routes are the same code, and a run
there only checks that the tool works.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch

from . import bounds, cases, timing
from .markdown import geomean
from .shapes import distinct_across_sizes

ROUTE_VARIABLE = "PCONV_CUDA_DIRECT"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def few_output_shapes(sizes):
    """The distinct UNet layer shapes (both models, every size) that take the direct
    kernels."""
    planned = distinct_across_sizes(sizes)
    return [p.shape for p in planned if bounds.takes_direct_kernels(p.shape)]


# Route name -> the variable's value (None: unset, both kernels).
ROUTES = {"direct": None, "forward": "forward", "input_grad": "input_grad", "cudnn": "0"}
PASS_ROUTES = {"fwd": ("direct", "cudnn"), "fwd+bwd": tuple(ROUTES)}


def _on_route(call, value):
    """call, run with the route variable set to value for it (None: unset), and put back
    after."""
    def run(inputs):
        saved = os.environ.get(ROUTE_VARIABLE)
        _set(value)
        try:
            return call(inputs)
        finally:
            _set(saved)
    return run


def _set(value):
    if value is None:
        os.environ.pop(ROUTE_VARIABLE, None)
    else:
        os.environ[ROUTE_VARIABLE] = value


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def measure(shapes, batch, dtypes, modes, device, warmup, repeats, layouts=("nchw",),
            log=print, on_row=None, deadline=None):
    """One row per (shape, dtype, layout, mask mode, pass): median times in ms of the plain
    conv and of the fused op on each route of PASS_ROUTES, and the paired ratios of each
    route to the conv and to the cuDNN route. on_row(rows) follows every row; past
    ``deadline`` (a time.monotonic() value) no new row starts."""
    impls = cases.implementations(["conv", "fused"])
    rows = []
    for shape, dtype_name, layout in itertools.product(shapes, dtypes, layouts):
        if deadline is not None and time.monotonic() >= deadline:
            log(f"# time limit reached: {len(rows)} rows measured")
            break
        fmt = LAYOUTS[layout]
        w, b = cases.make_params(shape, DTYPES[dtype_name], device, weights=layout)
        for mode in modes:
            inputs = [tuple(t.contiguous(memory_format=fmt) for t in s)
                      for s in cases.make_inputs(shape, batch, mode, DTYPES[dtype_name], device, 4)]
            for pass_, make_call in timing_passes():
                calls = {"conv": make_call(impls["conv"], shape, w, b)}
                for route in PASS_ROUTES[pass_]:
                    calls[route] = _on_route(make_call(impls["fused"], shape, w, b),
                                             ROUTES[route])
                samples = timing.interleaved_samples(calls, inputs, device, warmup, repeats)
                t = samples.device_ms
                routes = PASS_ROUTES[pass_]
                row = dict(layer=shape.label, shape=shape.__dict__, dtype=dtype_name,
                           mode=mode, pass_=pass_, batch=batch, layout=layout,
                           ms={n: statistics.median(v) for n, v in t.items()},
                           vs_conv={r: timing.paired_ratio(t[r], t["conv"]) for r in routes},
                           vs_cudnn={r: timing.paired_ratio(t[r], t["cudnn"])
                                     for r in routes if r != "cudnn"})
                rows.append(row)
                log(format_row(row))
                if on_row is not None:
                    on_row(rows)
    return rows


def timing_passes():
    return (("fwd", cases.forward_call), ("fwd+bwd", cases.train_call))


HEADER = ("layer | layout | dtype | mask | pass | conv ms | route / conv: direct, forward, "
          "input_grad, cudnn | route / cudnn route: direct, forward, input_grad")


def _cells(ratios, routes):
    return ", ".join(f"{ratios[r]:.3f}" if r in ratios else "-" for r in routes)


def format_row(r) -> str:
    return (f"{r['layer']} | {r['layout']} | {r['dtype']} | {r['mode']} | {r['pass_']} | "
            f"{r['ms']['conv']:.4f} | "
            f"{_cells(r['vs_conv'], ROUTES)} | {_cells(r['vs_cudnn'], list(ROUTES)[:3])}")


def summary(rows) -> str:
    """Per layout, pass and route: the geometric mean over the rows of route / cuDNN route,
    and in how many rows the route was the faster."""
    lines = []
    for layout, (pass_, routes) in itertools.product(LAYOUTS, PASS_ROUTES.items()):
        picked = [r for r in rows if r["pass_"] == pass_ and r["layout"] == layout]
        for route in routes:
            if route == "cudnn" or not picked:
                continue
            values = [r["vs_cudnn"][route] for r in picked]
            lines.append(f"{layout} {pass_}: {route} / cuDNN route, geometric mean "
                         f"{geomean(values):.3f}, faster in {sum(v < 1 for v in values)} of "
                         f"{len(values)} rows")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.routes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="+", help="UNet input sizes (default: 256 512)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bfloat16", "float32"])
    p.add_argument("--modes", nargs="+", choices=["single", "multi"], default=["single", "multi"])
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                   help="memory formats, timed one after the other (default: both)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="write the rows and the environment here")
    p.add_argument("--max-minutes", type=float,
                   help="start no (shape, dtype, layout) group of rows after this long")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.sizes = args.sizes or [256, 512]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.routes: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    env = timing.environment(args.device)
    print(f"# routes of few-output layers on {env['device']} (torch {env['torch']}, "
          f"CUDA {env['cuda']}, cuDNN {env['cudnn']}), batch {args.batch}")
    if args.device != "cuda":
        print("# CPU: both routes run the same code (only the CUDA op reads "
              f"{ROUTE_VARIABLE})")
    print(HEADER)

    def save(rows):  # after every row, so that a run stopped by a time limit keeps its rows
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"environment": env, "rows": rows}, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    rows = measure(few_output_shapes(args.sizes), args.batch, args.dtypes, args.modes,
                   args.device, args.warmup, args.repeats, args.layouts, on_row=save,
                   deadline=deadline)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
