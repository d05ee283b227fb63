"""Benchmark runner: one table of every UNet layer shape, written as JSON too.

    python -m benchmarks                       # preset for the machine (GPU if present)
    python -m benchmarks --preset cpu --json out.json --markdown out.md
    python -m benchmarks --smoke               # tiny shapes, a few repeats (CI)

Each layer row times, in the same run, the plain ``nn.Conv2d`` of the same shape (the
floor), the fused op, the reference (NVIDIA formulation, eager), the lean pure-PyTorch
style and ``torch.compile`` of the reference, as ms and as a ratio to the plain conv;
forward alone (inference) and forward + backward; and the peak memory of forward +
backward of the fused op and of the reference. Last rows time one training step of the
PConv UNet with the fused layer and with the reference layer, in each mask mode.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

from . import cases, precompile, timing
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
    # GPU: 792 rows. CUDA-event times scatter far less than CPU wall times, so 20 repeats
    # give a steady median and the whole table fits in a few runs of tools/gpu_check.sh.
    "gpu": dict(sizes=[256, 512], batch=8, dtypes=["float32", "bfloat16", "float16"],
                warmup=3, repeats=20, model_size=256, model_batch=8),
    "smoke": dict(sizes=[16], batch=2, dtypes=["float32"], warmup=1, repeats=2,
                  model_size=128, model_batch=1),
}

SMOKE_SHAPES = [LayerShape(3, 8, 7, 2, 3, 16, 16), LayerShape(8, 16, 3, 1, 1, 8, 8, False),
                LayerShape(19, 3, 3, 1, 1, 16, 16)]


def record_times(row, times, base):
    """Fill ``row`` from interleaved samples: ``ms`` (medians), ``ratio`` (paired ratio of
    each implementation to ``base``, named in ``ratio_base``) and ``fused_vs`` (paired
    ratio of the fused op to each other one; above 1 means the fused op is slower)."""
    row["ms"] = {name: statistics.median(v) for name, v in times.items()}
    row["ratio"] = {name: timing.paired_ratio(v, times[base]) for name, v in times.items()}
    row["ratio_base"] = base
    if "fused" in times:
        row["fused_vs"] = {name: timing.paired_ratio(times["fused"], v)
                           for name, v in times.items() if name != "fused"}


def row_key(row) -> tuple:
    return (row["size"], row["model"], row["layer"], row["mode"], row["dtype"], row["pass_"])


class RowStore:
    """The rows measured so far, written to ``path`` (JSON) after every row, so a run that
    is stopped keeps what it measured. With ``resume``, rows already in ``path`` are kept
    and not measured again; they must come from the same device and torch."""

    def __init__(self, path, env, args, resume=False):
        self.path, self.env, self.args = path, env, args
        self.rows: dict[tuple, dict] = {}
        if resume and path and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            # Files written before --weights existed hold NCHW-weight rows.
            old = {"weights": "nchw", **data.get("environment", {})}
            for key in ("device", "torch", "weights"):
                if old.get(key) != env.get(key):
                    raise SystemExit(f"benchmarks: {path} holds rows from {key} "
                                     f"{old.get(key)!r}, this run has {env.get(key)!r}; "
                                     "use another --json file")
            for row in data.get("rows", []):
                self.rows[row_key(row)] = row

    def get(self, key):
        return self.rows.get(key)

    def add(self, row):
        self.rows[row_key(row)] = row
        self.save()

    def save(self):
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"environment": self.env, "args": dict(vars(self.args)),
                       "rows": list(self.rows.values())}, f, indent=1)
        os.replace(tmp, self.path)


def layer_rows(args, device, log, store, out_of_time):
    """Measure every (shape, dtype, mask mode, pass) not yet in ``store``; returns the rows
    of this plan in order, and whether every one of them is there.

    The plan runs in the order of ``args.dtypes``, then ``args.sizes``, then ``args.modes``
    (a run stopped by ``--max-minutes`` has whole tables of the first ones), and the
    torch.compile graphs of each (dtype, size) are compiled ahead just before its rows."""
    if args.smoke:
        shapes = {args.sizes[0]: [("smoke", s) for s in SMOKE_SHAPES]}
    else:
        shapes = {size: distinct(unet_layer_shapes(size, which=args.models))
                  for size in args.sizes}
    impls = cases.implementations([i for i in IMPLS if i not in args.skip])
    plan = [(dtype_name, mode, size, model, shape) for dtype_name in args.dtypes
            for size in shapes for mode in args.modes for model, shape in shapes[size]]
    passes = (("fwd", cases.forward_call), ("fwd+bwd", cases.train_call))
    rows, complete, compiled_for = [], True, set()
    for done, (dtype_name, mode, size, model, shape) in enumerate(plan, 1):
        keys = [(size, model, shape.label, mode, dtype_name, p) for p, _ in passes]
        if all(store.get(k) for k in keys):
            rows += [store.get(k) for k in keys]
            continue
        if out_of_time():
            complete = False
            continue
        if "compiled" in impls and args.precompile_jobs and (dtype_name, size) not in compiled_for:
            compiled_for.add((dtype_name, size))
            precompile.precompile(
                [precompile.task(sh, args.batch, md, dt, p, device, args.weights)
                 for dt, md, sz, mo, sh in plan if (dt, sz) == (dtype_name, size)
                 for p, _ in passes if not store.get((sz, mo, sh.label, md, dt, p))],
                args.precompile_jobs, log, out_of_time)
            if out_of_time():
                complete = False
                continue
        log(f"[{done}/{len(plan)}] {dtype_name} {mode} {model} {shape.label}")
        dtype = DTYPES[dtype_name]
        inputs = cases.make_inputs(shape, args.batch, mode, dtype, device, args.rotate)
        w, b = cases.make_params(shape, dtype, device, weights=args.weights)
        for (pass_name, make_call), key in zip(passes, keys):
            row = dict(size=size, model=model, layer=shape.label, mode=mode,
                       dtype=dtype_name, pass_=pass_name, ms={})
            calls = {name: make_call(impl, shape, w, b) for name, impl in impls.items()}
            record_times(row, timing.interleaved_times_ms(
                calls, inputs, device, args.warmup, args.repeats), base="conv")
            store.add(row)
            rows.append(row)
        del inputs
    if "compiled" in impls:
        counts = torch._dynamo.utils.counters["inductor"]
        log(f"torch.compile graphs: {counts['fxgraph_cache_hit']} loaded from Inductor's cache, "
            f"{counts['fxgraph_cache_miss']} compiled here")
    # Memory after the timings, so the profiler's bookkeeping never touches them. Only with
    # both sides measured: the column is a comparison.
    compare_memory = {"fused", "reference"} <= set(impls)
    for row in rows:
        if not compare_memory or row["pass_"] != "fwd+bwd" or "peak_mb" in row:
            continue
        if out_of_time():
            complete = False
            break
        shape = next(s for _, s in shapes[row["size"]] if s.label == row["layer"])
        inputs = cases.make_inputs(shape, args.batch, row["mode"], DTYPES[row["dtype"]],
                                   device, 1)
        w, b = cases.make_params(shape, DTYPES[row["dtype"]], device, weights=args.weights)
        row["peak_mb"] = {
            name: timing.peak_memory_mb(
                lambda: cases.train_call(impls[name], shape, w, b)(inputs[0]), device)
            for name in ("fused", "reference")}
        store.add(row)
    return rows, complete


def model_rows(args, device, log, store, out_of_time):
    """One PConv UNet training step with the fused layer and with the reference layer, in
    each mask mode (multi: every layer gets a C_in-channel mask, the mode NVIDIA's README
    uses for inpainting)."""
    import pconv_cuda

    logging.getLogger("train.vgg").setLevel(logging.ERROR)  # random VGG: fine for timing
    rows, complete = [], True
    for dtype_name, mode in ((d, m) for d in args.dtypes for m in args.modes):
        row = dict(size=args.model_size, model="pconv", layer="training step", mode=mode,
                   dtype=dtype_name, pass_="step", ms={})
        if store.get(row_key(row)):
            rows.append(store.get(row_key(row)))
            continue
        if out_of_time():
            complete = False
            continue
        dtype = DTYPES[dtype_name]
        log(f"training step {dtype_name} {mode}")
        kwargs = dict(layers=4, base_channels=8) if args.smoke else {}
        steps = {name: cases.unet_train_step(layer, args.model_size, args.model_batch, device,
                                             dtype, multi_channel=mode == "multi",
                                             weights=args.weights, **kwargs)
                 for name, layer in (("fused", pconv_cuda.PartialConv2d),
                                     ("reference", pconv_cuda.ReferencePartialConv2d))}
        record_times(row, timing.interleaved_times_ms(
            {n: (lambda _, s=s: s()) for n, s in steps.items()}, [None], device,
            max(1, args.warmup), args.model_repeats), base="fused")
        store.add(row)
        rows.append(row)
    return rows, complete


def _cell(row, impl, base):
    if impl not in row["ms"]:
        return "-"
    return f"{row['ms'][impl]:8.3f} ({ratio(row, impl, base):4.2f}x)"


def format_table(rows, env) -> str:
    head = (f"device: {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | "
            f"cuDNN {env['cudnn']} | TF32 matmul={env['tf32_matmul']} cudnn={env['tf32_cudnn']} | "
            f"malloc: {env.get('malloc', 'default')}; weights: {env.get('weights', 'nchw')}")
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
    p.add_argument("--weights", choices=sorted(cases.WEIGHT_FORMATS), default="nchw",
                   help="memory format of every implementation's weights, and of the "
                        "UNet's in the training step (channels_last: what "
                        "model.to(memory_format=torch.channels_last) leaves)")
    p.add_argument("--skip", nargs="*", choices=IMPLS[1:],
                   help="implementations to leave out (e.g. compiled)")
    p.add_argument("--precompile-jobs", type=int,
                   help="worker processes that compile the torch.compile column's graphs "
                        "before the timings (default: the cores but two, at most 12; 0: "
                        "compile each graph when its row is timed)")
    p.add_argument("--no-model", action="store_true", help="skip the training-step rows")
    p.add_argument("--model-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--malloc", choices=["retain", "default"],
                   help="retain: glibc keeps freed memory, so no implementation pays page "
                        "faults on reused sizes (CPU preset); default: glibc as it comes")
    p.add_argument("--json", help="write the rows and the environment here")
    p.add_argument("--markdown", help="write the tables as Markdown here (the README's form)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in the --json file and measure only the rest")
    p.add_argument("--max-minutes", type=float,
                   help="measure no new row after this long; the rows so far are kept "
                        "(with --json, --resume goes on from there)")
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
    if args.precompile_jobs is None:
        args.precompile_jobs = 0 if args.smoke else precompile.default_jobs()
    if args.resume and not args.json:
        p.error("--resume needs --json FILE (the rows to go on from)")
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
    env["weights"] = args.weights
    store = RowStore(args.json, env, args, resume=args.resume)

    def out_of_time():
        return args.max_minutes is not None and time.time() - start > 60 * args.max_minutes

    # The training steps first: a handful of rows, and one of the goals on their own.
    step_rows, complete = ([], True) if args.no_model else model_rows(args, device, log, store,
                                                                        out_of_time)
    rows, layers_complete = layer_rows(args, device, log, store, out_of_time)
    rows += step_rows
    complete = complete and layers_complete
    print(format_table(rows, env))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows, env))
    if not complete:
        print(f"benchmarks: stopped after --max-minutes {args.max_minutes} with some rows "
              f"unmeasured; run again with --resume --json {args.json} to measure the rest",
              file=sys.stderr)
    return 0
