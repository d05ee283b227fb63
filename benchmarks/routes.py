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

With ``--igemm`` it times the implicit-GEMM kernels instead (``PCONV_CUDA_IGEMM``, off by
default: 1 the forward and the input gradient, ``forward`` or ``input_grad`` one) for every
3x3 unit-stride layer of the two UNets with more than 4 outputs, in bfloat16 and float16,
against the cuDNN route (0). Its fwd+bwd rows are the training pair, whose forward runs the
same kernel on the x * m it keeps:

    python -m benchmarks.routes --igemm --json igemm_routes.json

Only the CUDA op reads the variables: on a CPU the routes are the same code, and a run
there only checks that the tool works.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

from . import bounds, cases, timing
from .markdown import geomean
from .shapes import distinct_across_sizes

ROUTE_VARIABLE = "PCONV_CUDA_DIRECT"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Route name -> the variable's value (None: unset, both kernels).
ROUTES = {"direct": None, "forward": "forward", "input_grad": "input_grad", "cudnn": "0"}
PASS_ROUTES = {"fwd": ("direct", "cudnn"), "fwd+bwd": tuple(ROUTES)}


@dataclasses.dataclass(frozen=True)
class RouteSet:
    """Routes of the CUDA op that one environment variable picks, and the layers they
    concern."""

    what: str                   # the layers, as the log names them
    variable: str
    routes: dict                # route -> the variable's value (None: unset)
    pass_routes: dict           # pass -> the routes timed in it
    takes: Callable             # LayerShape -> whether the routes differ for it
    dtypes: tuple               # the default --dtypes
    largest_first: bool = False  # shapes by output plane, largest first (else UNet order)

    @property
    def others(self):
        """The routes set against the cuDNN route."""
        return [r for r in self.routes if r != "cudnn"]

    @property
    def header(self) -> str:
        return (f"layer | layout | dtype | mask | pass | conv ms | route / conv: "
                f"{', '.join(self.routes)} | route / cudnn route: {', '.join(self.others)}")


FEW_OUTPUTS = RouteSet("few-output layers", ROUTE_VARIABLE, ROUTES, PASS_ROUTES,
                       bounds.takes_direct_kernels, ("bfloat16", "float32"))
IGEMM_ROUTES = {"igemm": "1", "forward": "forward", "input_grad": "input_grad", "cudnn": "0"}
IGEMM = RouteSet("implicit-GEMM layers", "PCONV_CUDA_IGEMM", IGEMM_ROUTES,
                 {"fwd": ("igemm", "cudnn"), "fwd+bwd": tuple(IGEMM_ROUTES)},
                 bounds.takes_implicit_gemm, ("bfloat16", "float16"), largest_first=True)
HEADER = FEW_OUTPUTS.header


def few_output_shapes(sizes):
    """The distinct UNet layer shapes (both models, every size) that take the direct
    kernels."""
    return shapes_taking(sizes, FEW_OUTPUTS)


def shapes_taking(sizes, route_set):
    """The distinct UNet layer shapes (both models, every size) whose routes differ; for the
    implicit GEMM the largest output planes first, where the passes it saves weigh most, so
    that a run cut short by --max-minutes has those."""
    shapes = [p.shape for p in distinct_across_sizes(sizes) if route_set.takes(p.shape)]
    if route_set.largest_first:
        shapes.sort(key=lambda s: -(s.out_hw[0] * s.out_hw[1] * s.c_out))
    return shapes


def _on_route(call, value, variable=ROUTE_VARIABLE):
    """call, run with the route variable set to value for it (None: unset), and put back
    after."""
    def run(inputs):
        saved = os.environ.get(variable)
        _set(value, variable)
        try:
            return call(inputs)
        finally:
            _set(saved, variable)
    return run


def _set(value, variable=ROUTE_VARIABLE):
    if value is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = value


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def measure(shapes, batch, dtypes, modes, device, warmup, repeats, layouts=("nchw",),
            log=print, on_row=None, deadline=None, route_set=FEW_OUTPUTS):
    """One row per (shape, dtype, layout, mask mode, pass): median times in ms of the plain
    conv and of the fused op on each route of the set's pass, and the paired ratios of each
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
                for route in route_set.pass_routes[pass_]:
                    calls[route] = _on_route(make_call(impls["fused"], shape, w, b),
                                             route_set.routes[route], route_set.variable)
                samples = timing.interleaved_samples(calls, inputs, device, warmup, repeats)
                t = samples.device_ms
                routes = route_set.pass_routes[pass_]
                row = dict(layer=shape.label, shape=shape.__dict__, dtype=dtype_name,
                           mode=mode, pass_=pass_, batch=batch, layout=layout,
                           ms={n: statistics.median(v) for n, v in t.items()},
                           vs_conv={r: timing.paired_ratio(t[r], t["conv"]) for r in routes},
                           vs_cudnn={r: timing.paired_ratio(t[r], t["cudnn"])
                                     for r in routes if r != "cudnn"})
                rows.append(row)
                log(format_row(row, route_set))
                if on_row is not None:
                    on_row(rows)
    return rows


def timing_passes():
    return (("fwd", cases.forward_call), ("fwd+bwd", cases.train_call))


def _cells(ratios, routes):
    return ", ".join(f"{ratios[r]:.3f}" if r in ratios else "-" for r in routes)


def format_row(r, route_set=FEW_OUTPUTS) -> str:
    return (f"{r['layer']} | {r['layout']} | {r['dtype']} | {r['mode']} | {r['pass_']} | "
            f"{r['ms']['conv']:.4f} | "
            f"{_cells(r['vs_conv'], route_set.routes)} | "
            f"{_cells(r['vs_cudnn'], route_set.others)}")


def summary(rows, route_set=FEW_OUTPUTS) -> str:
    """Per layout, pass and route: the geometric mean over the rows of route / cuDNN route,
    and in how many rows the route was the faster."""
    lines = []
    for layout, (pass_, routes) in itertools.product(LAYOUTS, route_set.pass_routes.items()):
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
    p.add_argument("--igemm", action="store_true",
                   help="time the implicit-GEMM forward against cuDNN (PCONV_CUDA_IGEMM) "
                        "instead of the few-output layers' direct kernels")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                   help="default: bfloat16 float32 (--igemm: bfloat16 float16)")
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
    args.route_set = IGEMM if args.igemm else FEW_OUTPUTS
    args.dtypes = args.dtypes or list(args.route_set.dtypes)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.routes: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    route_set = args.route_set
    env = timing.environment(args.device)
    print(f"# routes of {route_set.what} on {env['device']} (torch {env['torch']}, "
          f"CUDA {env['cuda']}, cuDNN {env['cudnn']}), batch {args.batch}")
    if args.device != "cuda":
        print("# CPU: both routes run the same code (only the CUDA op reads "
              f"{route_set.variable})")
    print(route_set.header)

    def save(rows):  # after every row, so that a run stopped by a time limit keeps its rows
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"environment": env, "rows": rows}, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    rows = measure(shapes_taking(args.sizes, route_set), args.batch, args.dtypes, args.modes,
                   args.device, args.warmup, args.repeats, args.layouts, on_row=save,
                   deadline=deadline, route_set=route_set)
    print(summary(rows, route_set))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
