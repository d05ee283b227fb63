"""Benchmark runner: one table of every UNet layer shape, written as JSON too.

    python -m benchmarks                       # preset for the machine (GPU if present)
    python -m benchmarks --preset cpu --json out.json --markdown out.md
    python -m benchmarks --smoke               # tiny shapes, a few repeats (CI)

Each layer row times, in the same run, the plain ``nn.Conv2d`` of the same shape (the
floor), the fused op, the reference (NVIDIA formulation, eager), the lean pure-PyTorch
style and ``torch.compile`` of the reference, as ms and as a ratio to the plain conv;
forward alone (inference) and forward + backward; and the peak memory of forward +
backward of the fused op and of the reference. A shape that several UNets or sizes share
is measured once. On a GPU the times are device times, with the host's launches hidden,
and the host's time per call is kept beside them. Last rows time one training step of the
PConv UNet with the fused layer and with the reference layer, in each mask mode.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

from . import cases, precompile, timing
from .markdown import device_label, format_markdown, geomean, ratio
from .shapes import LayerShape, PlannedShape, distinct_across_sizes

IMPLS = ("conv", "fused", "reference", "lean", "compiled")
STEP_IMPLS = ("fused", "reference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = (("fwd", cases.forward_call), ("fwd+bwd", cases.train_call))

# More input sets than implementations: no two calls of one repeat share inputs.
DEFAULT_ROTATE = len(IMPLS) + 1
# A row's input sets take at most this share of the GPU memory it has free.
INPUT_MEMORY_SHARE = 0.25

PRESETS = {
    # Batch 1 on CPU: the inference case, and what 2 cores can time in minutes. A training
    # step's paired ratio scatters by ±15% from one repeat to the next on a small VM, so
    # its median takes 11 (a minute and a half per step row).
    # torch.compile is left out on CPU (a compile per shape and dtype costs more than the
    # whole table); name it with --skip to keep it (--skip with no value).
    "cpu": dict(sizes=[256], batch=1, dtypes=["float32", "bfloat16"], warmup=3, repeats=41,
                model_size=256, model_batch=1, model_repeats=11, skip=["compiled"],
                malloc="retain"),
    # GPU: 660 rows (the 11 shapes both sizes share measured once). CUDA-event times
    # scatter far less than CPU wall times, so 20 repeats give a steady median and the
    # whole table fits in a few runs of tools/gpu_check.sh; a training step is short on a
    # GPU, so its paired ratio gets as many.
    "gpu": dict(sizes=[256, 512], batch=8, dtypes=["float32", "bfloat16", "float16"],
                warmup=3, repeats=20, model_size=256, model_batch=8, model_repeats=20),
    "smoke": dict(sizes=[16], batch=2, dtypes=["float32"], warmup=1, repeats=2,
                  model_size=128, model_batch=1, model_repeats=2),
}

SMOKE_SHAPES = [LayerShape(3, 8, 7, 2, 3, 16, 16), LayerShape(8, 16, 3, 1, 1, 8, 8, False),
                LayerShape(19, 3, 3, 1, 1, 16, 16)]

# What every row of one JSON file shares beyond the plan (dtypes, sizes, modes, models and
# implementations): the environment's part and the arguments' part.
CONFIG_ENV = ("device", "torch", "cuda", "cudnn", "tf32_matmul", "tf32_cudnn",
              "float32_matmul_precision", "fp16_reduced_precision_reduction",
              "bf16_reduced_precision_reduction", "cudnn_benchmark", "cudnn_deterministic",
              "timing", "malloc", "weights", "cpu_isa")
CONFIG_ARGS = ("smoke", "batch", "warmup", "repeats", "rotate", "model_size", "model_batch",
               "model_repeats")


def record_times(row, samples: timing.Samples, base):
    """Fill ``row`` from interleaved samples: ``ms`` (medians; device times on CUDA),
    ``ratio`` (paired ratio of each implementation to ``base``, named in ``ratio_base``),
    ``fused_vs`` (paired ratio of the fused op to each other one; above 1 means the fused op
    is slower), on CUDA ``host_ms`` (medians of the host's time to issue a call) and
    ``cover_ms`` (the GPU's sleep before each call), and ``errors`` (implementation: what
    it raised)."""
    times = samples.device_ms
    row["ms"] = {name: statistics.median(v) for name, v in times.items()}
    if samples.cover_ms is not None:
        row["host_ms"] = {name: statistics.median(v) for name, v in samples.host_ms.items()}
        row["cover_ms"] = samples.cover_ms
    if base in times:
        row["ratio"] = {name: timing.paired_ratio(v, times[base]) for name, v in times.items()}
        row["ratio_base"] = base
    if "fused" in times:
        row["fused_vs"] = {name: timing.paired_ratio(times["fused"], v)
                           for name, v in times.items() if name != "fused"}
    if samples.errors:
        row["errors"] = dict(samples.errors)


def row_key(row) -> tuple:
    """What a row measured: the layer's full shape (or the training step), the batch, the
    mask mode, the dtype and the pass. Where a table shows it (size, model) is not part of
    it, so a shape that two UNets or sizes share is one measurement."""
    if row["pass_"] == "step":
        return ("step", row["size"], row["batch"], row["mode"], row["dtype"])
    return (LayerShape(**row["shape"]), row["batch"], row["mode"], row["dtype"], row["pass_"])


def configuration(args, env) -> dict:
    """The settings every row of one JSON file must share (``CONFIG_ENV``, ``CONFIG_ARGS``):
    a row timed with another batch, repeat count, timer, library or math mode is not
    comparable with the rest of its table."""
    return {**{key: env.get(key) for key in CONFIG_ENV},
            **{key: getattr(args, key) for key in CONFIG_ARGS}}


def _check_configuration(path, old, new) -> None:
    if old is None:
        raise SystemExit(f"benchmarks: {path} records no configuration (an older runner "
                         "wrote it), so its rows cannot be checked against this run's; use "
                         "another --json file")
    diffs = [f"{key} {old.get(key)!r} there, {new.get(key)!r} here"
             for key in dict.fromkeys([*new, *old]) if old.get(key) != new.get(key)]
    if diffs:
        raise SystemExit(f"benchmarks: {path} was measured with other settings ("
                         + "; ".join(diffs) + "); resume with the same settings, or use "
                         "another --json file")


class RowStore:
    """The rows measured so far, written to ``path`` (JSON) after every row, so a run that
    is stopped keeps what it measured. With ``resume``, rows already in ``path`` are kept
    and not measured again; the file's configuration must be this run's."""

    def __init__(self, path, env, config, args, resume=False):
        self.path, self.env, self.config, self.args = path, env, config, args
        self.rows: dict[tuple, dict] = {}
        if resume and path and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            _check_configuration(path, data.get("configuration"), config)
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
            json.dump({"environment": self.env, "configuration": self.config,
                       "args": dict(vars(self.args)), "rows": list(self.rows.values())},
                      f, indent=1)
        os.replace(tmp, self.path)


def needs_measuring(row, impls, retry_errors=False) -> bool:
    """Whether ``row`` (None: not measured) lacks one of ``impls``: a file measured with
    ``--skip compiled`` is completed by a later run with the compiled column. An
    implementation that raised counts as measured unless ``retry_errors``."""
    if row is None:
        return True
    done = set(row["ms"]) | (set() if retry_errors else set(row.get("errors", {})))
    return not set(impls) <= done


def rotation(requested: int, set_bytes: int, device: str) -> int:
    """How many input sets a row cycles through: ``requested``, fewer on a GPU where that
    many would take more than ``INPUT_MEMORY_SHARE`` of the memory it has free, but two at
    least (one where asked), so that consecutive calls never share inputs."""
    if device != "cuda":
        return requested
    free = (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()
            - torch.cuda.memory_allocated())  # the allocator's cached blocks are free too
    fit = int(INPUT_MEMORY_SHARE * free) // max(1, set_bytes)
    return max(min(requested, 2), min(requested, fit))


def planned_shapes(args) -> list[PlannedShape]:
    if args.smoke:
        return [PlannedShape(args.sizes[0], "smoke", s) for s in SMOKE_SHAPES]
    return distinct_across_sizes(args.sizes, args.models)


def _layer_row(planned: PlannedShape, mode, dtype_name, pass_, batch) -> dict:
    """A layer row before it is measured: where the plan shows it, and what it measures."""
    return dict(size=planned.size, model=planned.model, layer=planned.shape.label,
                shape=dataclasses.asdict(planned.shape), mode=mode, dtype=dtype_name,
                pass_=pass_, batch=batch, also_in=[list(p) for p in planned.also_in], ms={})


def _placed(stored, planned_row):
    """A stored row, shown where this run's plan puts its shape."""
    for key in ("size", "model", "layer", "also_in"):
        stored[key] = planned_row[key]
    return stored


def _measure_entry(todo, shape: LayerShape, mode, dtype_name, impls, args, device, store):
    """Time the rows of one plan entry in ``todo`` ((row, make_call) per pass) and store
    them. A failure recorded in a row (out of memory, an implementation that raises) lets
    the rest of the table go on."""
    dtype = DTYPES[dtype_name]
    try:
        count = rotation(args.rotate, cases.input_set_bytes(shape, args.batch, mode, dtype),
                         device)
        inputs = cases.make_inputs(shape, args.batch, mode, dtype, device, count)
        w, b = cases.make_params(shape, dtype, device, weights=args.weights)
    except Exception as e:
        for row, _ in todo:
            row["errors"] = {name: "inputs: " + timing.describe_error(e) for name in impls}
            store.add(row)
        return
    for row, make_call in todo:
        calls = {name: make_call(impl, shape, w, b) for name, impl in impls.items()}
        record_times(row, timing.interleaved_samples(calls, inputs, device, args.warmup,
                                                     args.repeats, record_errors=True),
                     base="conv")
        store.add(row)


def _precompile_group(plan, group, impls, args, device, store, log, out_of_time):
    """Compile ahead, in worker processes, the torch.compile graphs of the rows of
    ``group`` (dtype, size) that this run measures."""
    tasks = [precompile.task(p.shape, args.batch, mode, dtype_name, pass_, device, args.weights)
             for dtype_name, mode, p in plan if (dtype_name, p.size) == group
             for pass_, _ in PASSES
             if needs_measuring(store.get(row_key(_layer_row(p, mode, dtype_name, pass_,
                                                             args.batch))),
                                impls, args.retry_errors)]
    failure_log = ((args.json + ".precompile.log") if args.json
                   else os.path.join(tempfile.gettempdir(), "pconv-precompile.log"))
    precompile.precompile(tasks, args.precompile_jobs, log, out_of_time, failure_log)


def _measure_peaks(rows, impls, args, device, store, out_of_time) -> bool:
    """Peak memory of forward + backward, fused and reference, for the rows that lack it;
    False when time ran out first. After the timings, so the profiler's bookkeeping never
    touches them, and only with both sides measured: the column is a comparison."""
    sides = ("fused", "reference")
    if not set(sides) <= set(impls):
        return True
    for row in rows:
        errors = row.get("errors", {})
        if (row["pass_"] != "fwd+bwd" or "peak_mb" in row or not set(sides) <= set(row["ms"])
                or ("peak_mb" in errors and not args.retry_errors)):
            continue
        if out_of_time():
            return False
        shape, dtype = LayerShape(**row["shape"]), DTYPES[row["dtype"]]
        try:
            inputs = cases.make_inputs(shape, args.batch, row["mode"], dtype, device, 1)
            w, b = cases.make_params(shape, dtype, device, weights=args.weights)
            row["peak_mb"] = {
                name: timing.peak_memory_mb(
                    lambda: cases.train_call(impls[name], shape, w, b)(inputs[0]), device)
                for name in sides}
            errors.pop("peak_mb", None)
        except Exception as e:
            row["errors"] = {**errors, "peak_mb": timing.describe_error(e)}
        store.add(row)
    return True


def layer_rows(args, device, log, store, out_of_time):
    """Measure every (shape, dtype, mask mode, pass) of the plan that ``store`` lacks (or
    holds without an implementation this run asks for); returns a row for every entry of
    the plan in order (with empty ``ms`` where none is measured yet) and whether all are
    measured.

    Each distinct layer shape is measured once, shown under the first size and model of
    the plan that has it. The plan runs in the order of ``args.dtypes``, then
    ``args.sizes``, then ``args.modes`` (a run stopped by ``--max-minutes`` has whole
    tables of the first ones), and the torch.compile graphs of each (dtype, size) are
    compiled ahead just before its rows."""
    impls = cases.implementations([i for i in IMPLS if i not in args.skip])
    shapes = planned_shapes(args)
    plan = [(dtype_name, mode, p) for dtype_name in args.dtypes for size in args.sizes
            for mode in args.modes for p in shapes if p.size == size]
    rows, complete, compiled_for = [], True, set()
    for done, (dtype_name, mode, p) in enumerate(plan, 1):
        wanted = [_layer_row(p, mode, dtype_name, pass_, args.batch) for pass_, _ in PASSES]
        todo = [(row, make_call) for row, (_, make_call) in zip(wanted, PASSES)
                if needs_measuring(store.get(row_key(row)), impls, args.retry_errors)]
        if todo and "compiled" in impls and args.precompile_jobs and not out_of_time() \
                and (dtype_name, p.size) not in compiled_for:
            compiled_for.add((dtype_name, p.size))
            _precompile_group(plan, (dtype_name, p.size), impls, args, device, store, log,
                              out_of_time)
        if todo and out_of_time():
            complete = False
        elif todo:
            log(f"[{done}/{len(plan)}] {dtype_name} {mode} {p.model} {p.shape.label}")
            for row, _ in todo:  # memory does not depend on which columns are timed
                old = store.get(row_key(row))
                if old and "peak_mb" in old:
                    row["peak_mb"] = old["peak_mb"]
            _measure_entry(todo, p.shape, mode, dtype_name, impls, args, device, store)
        for row in wanted:
            stored = store.get(row_key(row))
            rows.append(_placed(stored, row) if stored else row)
    if "compiled" in impls:
        counts = torch._dynamo.utils.counters["inductor"]
        log(f"torch.compile graphs: {counts['fxgraph_cache_hit']} loaded from Inductor's cache, "
            f"{counts['fxgraph_cache_miss']} compiled here")
    complete = _measure_peaks(rows, impls, args, device, store, out_of_time) and complete
    return rows, complete


def _measure_step(row, args, device, dtype):
    """Time one training step with each layer of ``STEP_IMPLS``; a step that fails to build
    or to run is recorded in the row."""
    import pconv_cuda

    layers = {"fused": pconv_cuda.PartialConv2d, "reference": pconv_cuda.ReferencePartialConv2d}
    kwargs = dict(layers=4, base_channels=8) if args.smoke else {}
    steps, errors = {}, {}
    for name in STEP_IMPLS:
        try:
            steps[name] = cases.unet_train_step(
                layers[name], args.model_size, args.model_batch, device, dtype,
                multi_channel=row["mode"] == "multi", weights=args.weights, **kwargs)
        except Exception as e:
            errors[name] = timing.describe_error(e)
    samples = timing.interleaved_samples({n: (lambda _, s=s: s()) for n, s in steps.items()},
                                         [None], device, max(1, args.warmup),
                                         args.model_repeats, record_errors=True)
    samples.errors.update(errors)
    record_times(row, samples, base="fused")


def model_rows(args, device, log, store, out_of_time):
    """One PConv UNet training step with the fused layer and with the reference layer, in
    each mask mode (multi: every layer gets a C_in-channel mask, the mode NVIDIA's README
    uses for inpainting); a row for each, with empty ``ms`` where none is measured yet."""
    logging.getLogger("train.vgg").setLevel(logging.ERROR)  # random VGG: fine for timing
    rows, complete = [], True
    for dtype_name, mode in ((d, m) for d in args.dtypes for m in args.modes):
        row = dict(size=args.model_size, model="pconv", layer="training step", mode=mode,
                   dtype=dtype_name, pass_="step", batch=args.model_batch, ms={})
        stored = store.get(row_key(row))
        if not needs_measuring(stored, STEP_IMPLS, args.retry_errors):
            rows.append(stored)
            continue
        if out_of_time():
            complete = False
            rows.append(stored or row)
            continue
        log(f"training step {dtype_name} {mode}")
        _measure_step(row, args, device, DTYPES[dtype_name])
        store.add(row)
        rows.append(row)
    return rows, complete


def _cell(row, impl, base):
    if impl in row.get("errors", {}):
        return "error"
    if impl not in row["ms"]:
        return "-"
    if base not in row["ms"]:
        return f"{row['ms'][impl]:8.3f}"
    return f"{row['ms'][impl]:8.3f} ({ratio(row, impl, base):4.2f}x)"


def _error_lines(rows) -> list[str]:
    return [f"  {r['dtype']} {r['mode']} {r['layer']} {r['pass_']} {name}: {message}"
            for r in rows for name, message in r.get("errors", {}).items()]


def format_table(rows, env) -> str:
    head = (f"device: {device_label(env)} | torch {env['torch']} | CUDA {env['cuda']} | "
            f"cuDNN {env['cudnn']} | TF32 matmul={env['tf32_matmul']} cudnn={env['tf32_cudnn']} | "
            f"malloc: {env.get('malloc', 'default')}; weights: {env.get('weights', 'nchw')}")
    cols = ["size", "model", "layer", "mode", "dtype", "pass"] + list(IMPLS) + ["peak MB fused/ref"]
    lines = [head, f"times in ms ({env.get('timing', timing.CPU_TIMING)}), (ratio to the plain "
                   "conv); step rows: ratio to the fused step; '-': not measured",
             " | ".join(cols)]
    for r in rows:
        base = "conv" if r["pass_"] != "step" else "fused"
        cells = [str(r["size"]), r["model"], r["layer"], r["mode"], r["dtype"], r["pass_"]]
        cells += [_cell(r, i, base) for i in IMPLS]
        peak = r.get("peak_mb")
        cells.append(f"{peak['fused']:.1f}/{peak['reference']:.1f}" if peak else "-")
        lines.append(" | ".join(cells))
    lines.append("")
    lines.append("geometric means of the ratio to the plain conv, over the distinct shapes:")
    measured = [r for r in rows if "conv" in r["ms"]]
    for dtype, mode, pass_ in dict.fromkeys((r["dtype"], r["mode"], r["pass_"]) for r in measured):
        sel = [r for r in measured if (r["dtype"], r["mode"], r["pass_"]) == (dtype, mode, pass_)]
        parts = [f"{i} {geomean([ratio(r, i) for r in sel if i in r['ms']]):.3f}"
                 for i in IMPLS[1:] if any(i in r["ms"] for r in sel)]
        lines.append(f"  {dtype:8s} {mode:6s} {pass_:7s} " + "  ".join(parts))
    errors = _error_lines(rows)
    if errors:
        lines += ["", "errors:"] + errors
    return "\n".join(lines)


def _int_at_least(low: int):
    """An argparse type: a whole number, ``low`` or more."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _preset_values(key: str, unset: str = "none") -> str:
    """The presets' values of ``key`` for a help text: 'presets: cpu 1, gpu 8, smoke 2';
    ``unset`` stands for a preset without one."""
    def show(value):
        if value is None or value == []:
            return unset
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return "presets: " + ", ".join(f"{name} {show(preset.get(key))}"
                                   for name, preset in PRESETS.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the defaults of the options marked 'presets' (default: gpu where "
                        "CUDA is visible, else cpu)")
    p.add_argument("--smoke", action="store_true",
                   help="the smoke preset: three tiny shapes, a small UNet, few repeats (CI)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda where it is visible, else cpu")
    p.add_argument("--sizes", type=_int_at_least(1), nargs="+",
                   help="UNet input sizes whose layer shapes are measured, in this order; a "
                        "shape of several sizes is measured under the first (" +
                        _preset_values("sizes") + ")")
    p.add_argument("--batch", type=_int_at_least(1),
                   help="batch of every layer row (" + _preset_values("batch") + ")")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                   help="in the order measured (" + _preset_values("dtypes") + ")")
    p.add_argument("--models", nargs="+", choices=["pconv", "modified"],
                   default=["pconv", "modified"],
                   help="UNets whose layer shapes are measured (default: both)")
    p.add_argument("--modes", nargs="+", choices=["single", "multi"], default=["single", "multi"],
                   help="mask modes, in the order measured: 1- or C_in-channel masks "
                        "(default: single multi)")
    p.add_argument("--warmup", type=_int_at_least(0),
                   help="untimed rounds before the timed ones (" + _preset_values("warmup") + ")")
    p.add_argument("--repeats", type=_int_at_least(1),
                   help="timed calls of each implementation per layer row (" +
                        _preset_values("repeats") + ")")
    p.add_argument("--rotate", type=_int_at_least(1), default=DEFAULT_ROTATE,
                   help="input sets a layer row cycles through, the next one for every call "
                        f"(default: {DEFAULT_ROTATE}, more than the implementations; fewer on "
                        f"a GPU where they would take over {100 * INPUT_MEMORY_SHARE:.0f}%% of its "
                        "free memory)")
    p.add_argument("--weights", choices=sorted(cases.WEIGHT_FORMATS), default="nchw",
                   help="memory format of every implementation's weights, and of the "
                        "UNet's in the training step (channels_last: what "
                        "model.to(memory_format=torch.channels_last) leaves; default: nchw)")
    p.add_argument("--skip", nargs="*", choices=IMPLS[1:],
                   help="implementations to leave out; --skip alone leaves out none, "
                        "e.g. to keep compiled on the CPU (" + _preset_values("skip") + ")")
    p.add_argument("--precompile-jobs", type=_int_at_least(0),
                   help="worker processes that compile the torch.compile column's graphs "
                        "before the timings (default: the cores but two, at most 12, none "
                        "below 4 cores or with --smoke; 0: compile each graph when its row "
                        "is timed)")
    p.add_argument("--no-model", action="store_true", help="skip the training-step rows")
    steps = ", ".join(f"{name} {preset['model_size']}² batch {preset['model_batch']}"
                      for name, preset in PRESETS.items())
    p.add_argument("--model-repeats", type=_int_at_least(1),
                   help="timed training steps with each layer (" +
                        _preset_values("model_repeats") + "; the step's UNet input and "
                        f"batch are the preset's: {steps})")
    p.add_argument("--threads", type=_int_at_least(1),
                   help="torch.set_num_threads on CPU (default: torch's)")
    p.add_argument("--malloc", choices=["retain", "default"],
                   help="retain: glibc keeps freed memory, so no implementation pays page "
                        "faults on reused sizes; default: glibc as it comes (" +
                        _preset_values("malloc", unset="default") + ")")
    p.add_argument("--json", help="write the rows, the environment and the configuration "
                                  "here, after every row (an existing file needs --resume)")
    p.add_argument("--markdown", help="write the tables as Markdown here (the README's form)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in the --json file and measure only the rest, "
                        "and the rows that lack an implementation this run measures; the "
                        "file's configuration (batch, repeats, versions, ...) must be this run's")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --resume, measure again the implementations whose rows "
                        "recorded an error (default: an error counts as measured)")
    p.add_argument("--max-minutes", type=_minutes,
                   help="measure no new row after this long; the rows so far are kept "
                        "(with --json, --resume goes on from there; default: no limit)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def parse_args(argv=None):
    p = build_parser()
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
    if args.json and os.path.exists(args.json) and not args.resume:
        p.error(f"--json {args.json} exists: add --resume to go on from its rows, or give "
                "another file")
    return args, device


def _stop_message(args) -> str:
    again = (f"run again with --resume --json {args.json} to measure the rest" if args.json
             else "give --json FILE to keep the rows, and --resume to go on from them")
    return (f"benchmarks: stopped after --max-minutes {args.max_minutes} with some rows "
            f"unmeasured; {again}")


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
    store = RowStore(args.json, env, configuration(args, env), args, resume=args.resume)

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
            f.write(format_markdown(rows, env, wanted=[i for i in IMPLS if i not in args.skip]))
    errors = _error_lines(rows)
    if errors:
        print(f"benchmarks: {len(errors)} measurements failed and are recorded as errors "
              "in their rows (see the table's end)", file=sys.stderr)
    if not complete:
        print(_stop_message(args), file=sys.stderr)
    return 0
