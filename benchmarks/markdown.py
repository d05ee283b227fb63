"""The runner's rows as Markdown, in the form the README shows them.

    python -m benchmarks --preset cpu --models pconv --markdown cpu.md

One table per dtype, UNet input size and model (a row per layer shape and mask mode: the
plain conv's time and every other implementation as a ratio to it, forward and forward +
backward, peak memory; a shape that an earlier table shows is named under the later one
and not repeated), the geometric means over the distinct shapes, the training step, the
rows where the fused op is slower than the reference or the lean style, the errors that
rows recorded, and each speed goal of the device kind with its figure: met, NOT met, or
incomplete while rows it covers are missing. Ratios are paired, the training step's too:
the median over repeats of the ratio of two calls timed back to back (see
``timing.paired_ratio``).
"""
from __future__ import annotations

import math

COMPARED = ("fused", "reference", "lean", "compiled")
PASSES = ("fwd", "fwd+bwd")
STEP_IMPLS = ("fused", "reference")


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def ratio(row, impl, base="conv") -> float:
    """Ratio of ``impl`` to ``base`` in ``row``: the paired ratio the runner recorded (the
    median over repeats of the per-repeat ratio), or the ratio of the medians for rows
    without one."""
    if base == row.get("ratio_base", "conv") and impl in row.get("ratio", {}):
        return row["ratio"][impl]
    if impl == "fused" and base in row.get("fused_vs", {}):
        return row["fused_vs"][base]
    return row["ms"][impl] / row["ms"][base]


MODEL_NAMES = {"pconv": "PConv UNet", "modified": "modified UNet", "smoke": "smoke shapes"}


def _layer_rows(rows):
    """The layer rows, measured or only planned (empty ``ms``)."""
    return [r for r in rows if r["pass_"] in PASSES]


def _with(rows, impls):
    """The rows that measured every implementation in ``impls``."""
    return [r for r in rows if all(i in r["ms"] for i in impls)]


def _wanted(rows, wanted):
    """The compared implementations a run asked for; from a file alone, those that any
    row measured or tried."""
    if wanted is None:
        wanted = {i for r in rows for i in [*r["ms"], *r.get("errors", {})]}
    return [i for i in COMPARED if i in wanted]


def _shape_id(row):
    return tuple(row["shape"].values()) if "shape" in row else row["layer"]


def _cell(row, impl) -> str:
    if impl in row.get("errors", {}):
        return "error"
    if impl not in row["ms"] or "conv" not in row["ms"]:
        return "-"
    return f"{ratio(row, impl):.2f}×"


def _table(rows, impls) -> list[str]:
    """The Markdown table of the layer rows of one (dtype, size, model): a line per shape
    and mask mode."""
    head = ["layer (C_in→C_out, kernel, stride, input)"]
    for pass_ in PASSES:
        head += [f"conv {pass_} ms"] + [f"{i} {pass_}" for i in impls]
    head.append("peak MB fused / ref")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {(_shape_id(r), r["mode"], r["pass_"]): r for r in rows}
    for shape_id, mode in dict.fromkeys((_shape_id(r), r["mode"]) for r in rows):
        first = next(r for r in rows if (_shape_id(r), r["mode"]) == (shape_id, mode))
        cells = [f"{first['layer'].replace('->', '→')} ({mode})"]
        peak = None
        for pass_ in PASSES:
            r = by_key.get((shape_id, mode, pass_))
            if r is None:
                cells += ["-"] * (1 + len(impls))
                continue
            conv = r["ms"].get("conv")
            cells.append("error" if "conv" in r.get("errors", {})
                         else "-" if conv is None else f"{conv:.2f}")
            cells += [_cell(r, i) for i in impls]
            peak = r.get("peak_mb") or peak
        cells.append(f"{peak['fused']:.1f} / {peak['reference']:.1f}" if peak else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _groups(layers) -> list[tuple]:
    """(dtype, size, model) of every table: those the rows are shown in, in their order,
    then any whose shapes are all shown under others."""
    own = dict.fromkeys((r["dtype"], r["size"], r["model"]) for r in layers)
    shared = dict.fromkeys((r["dtype"], *where) for r in layers for where in r.get("also_in", []))
    return list(own) + [g for g in shared if g not in own]


def _shared_note(layers, dtype, size, model) -> list[str]:
    """A line naming the shapes of this UNet that a table before it shows (each distinct
    shape is measured once)."""
    labels = dict.fromkeys(r["layer"].replace("->", "→") for r in layers
                           if r["dtype"] == dtype and [size, model] in r.get("also_in", []))
    if not labels:
        return []
    return [f"Measured once and shown in a table above, this UNet also has: "
            f"{', '.join(labels)}.", ""]


def _heading(dtype, size, model) -> str:
    return f"{dtype}, {MODEL_NAMES.get(model, model)} at {size}×{size}:"


def _slower_rows(rows) -> list[str]:
    lines = []
    for other in ("reference", "lean"):
        both = _with(rows, ("fused", other))
        slower = [r for r in both if ratio(r, "fused", other) > 1]
        worst = max((ratio(r, "fused", other) - 1 for r in slower), default=0.0)
        lines.append(f"- fused slower than {other}: {len(slower)} of {len(both)} rows"
                     + (f" (by at most {100 * worst:.1f}%)" if slower else ""))
        for r in slower:
            lines.append(f"  - {r['dtype']} {r['mode']} {r['layer']} {r['pass_']}: "
                         f"{r['ms']['fused']:.3f} vs {r['ms'][other]:.3f} ms (median), "
                         f"+{100 * (ratio(r, 'fused', other) - 1):.1f}% (paired)")
    return lines


def _step_line(row) -> str:
    where = f"- {row['dtype']}, {row['mode']}-channel masks: "
    if not _with([row], STEP_IMPLS):
        return where + "not measured"
    return (where + f"fused {row['ms']['fused']:.1f} ms, reference {row['ms']['reference']:.1f} ms "
            f"(medians); reference / fused {ratio(row, 'reference', 'fused'):.2f} (paired)")


def _error_lines(rows) -> list[str]:
    return [f"- {r['dtype']} {r['mode']} {r['layer']} {r['pass_']}, {name}: {message}"
            for r in rows for name, message in r.get("errors", {}).items()]


def device_label(env: dict) -> str:
    """The device of an environment, with its CPU's instruction sets where recorded."""
    return env["device"] + (f" [{env['cpu_isa']}]" if env.get("cpu_isa") else "")


def format_markdown(rows, env, wanted=None) -> str:
    """Markdown tables of the runner's rows (see the module docstring); ``wanted``: the
    implementations the run measured (default: those in the rows), which the goals need."""
    layers = _layer_rows(rows)
    impls = _wanted(layers, wanted)
    measured = _with(layers, ("conv",))
    out = [f"Device: {device_label(env)}; torch {env['torch']}; CUDA {env['cuda']}; "
           f"cuDNN {env['cudnn']}; TF32 matmul={env['tf32_matmul']} cudnn={env['tf32_cudnn']}; "
           f"malloc: {env.get('malloc', 'default')}; weights: {env.get('weights', 'nchw')}; "
           f"times: {env.get('timing', 'wall time')}.", ""]
    for dtype, size, model in _groups(layers):
        group = [r for r in layers if (r["dtype"], r["size"], r["model"]) == (dtype, size, model)]
        out += [_heading(dtype, size, model), ""]
        out += (_table(group, impls) + [""]) if group else []
        out += _shared_note(layers, dtype, size, model)
    out += ["Geometric means of the ratio to the plain conv, over the distinct layer shapes "
            "measured (a shape that several UNets share counts once):", "",
            "| dtype, mask, pass | " + " | ".join(impls) + " |",
            "|---|" + "---|" * len(impls)]
    for dtype, mode, pass_ in dict.fromkeys((r["dtype"], r["mode"], r["pass_"]) for r in measured):
        sel = [r for r in measured if (r["dtype"], r["mode"], r["pass_"]) == (dtype, mode, pass_)]
        means = [geomean(ratio(r, i) for r in sel if i in r["ms"]) for i in impls]
        name = {"fwd": "forward", "fwd+bwd": "forward + backward"}[pass_]
        out.append(f"| {dtype}, {mode}, {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    steps = [r for r in rows if r["pass_"] == "step"]
    if steps:
        out += ["", "Training step of the PConv UNet:", ""] + [_step_line(r) for r in steps]
    out += ["", "Rows where the fused op is slower:", ""] + _slower_rows(measured)
    errors = _error_lines(rows)
    if errors:
        out += ["", "Errors (recorded in the rows; the rest of the table went on):", ""] + errors
    out += ["", "Goals:", ""] + format_goals(rows, env.get("kind", "cpu"), wanted)
    return "\n".join(out) + "\n"


# The speed goals the fused op is held to, per device kind.
GPU_MAX_TRAIN_VS_CONV = 1.15  # fused fwd+bwd / plain conv, every shape, bfloat16 and float32
GPU_MIN_SPEEDUP_MULTI = 2.0  # reference / fused, multi-channel masks, every shape and pass
GPU_MAX_PEAK_VS_REFERENCE = 0.7  # fused / reference peak memory of fwd+bwd
GPU_MIN_STEP_SPEEDUP = 1.4  # reference / fused, one PConv UNet training step
CPU_MAX_FWD_GEOMEAN = 1.10  # fused / plain conv, geometric mean over the shapes
CPU_MAX_TRAIN_GEOMEAN = 1.05


def _verdict(ok: bool, have: int, want: int, fail_is_final: bool = True) -> str:
    """'met' or 'NOT met' over ``have`` of the ``want`` rows a goal covers. While rows are
    missing it is 'incomplete (N of M rows)', never 'met'; but a goal on the worst row that
    a measured row fails (``fail_is_final``) is not met whatever the rest give."""
    if have >= want:
        return "met" if ok else "NOT met"
    if not ok and fail_is_final:
        return f"NOT met ({have} of {want} rows measured)"
    return f"incomplete ({have} of {want} rows)"


def _worst(rows, value, pick=max):
    """(worst value, its row) over rows, or (nan, None) when there are none."""
    scored = [(value(r), r) for r in rows]
    if not scored:
        return float("nan"), None
    return pick(scored, key=lambda vr: vr[0])


def _where(row) -> str:
    return "" if row is None else f" ({row['dtype']} {row['mode']} {row['layer']} {row['pass_']})"


def _slower_goal(layers, other, wanted) -> str:
    goal = f"- fused faster than {other} at every shape"
    have = _with(layers, ("fused", other))
    if other not in wanted or not have:
        return f"{goal}: not measured"
    slower = [r for r in have if ratio(r, "fused", other) > 1]
    worst, row = _worst(have, lambda r: ratio(r, "fused", other))
    return (f"{goal}: {_verdict(not slower, len(have), len(layers))}: slower in "
            f"{len(slower)} of {len(have)} rows; worst fused / {other} {worst:.3f}" + _where(row))


def _train_goal(layers, dtype) -> str:
    goal = f"- {dtype} fused fwd+bwd within {GPU_MAX_TRAIN_VS_CONV}x of the plain conv"
    sel = [r for r in layers if r["dtype"] == dtype and r["pass_"] == "fwd+bwd"]
    have = _with(sel, ("conv", "fused"))
    if not have:
        return f"{goal}: not measured"
    worst, row = _worst(have, lambda r: ratio(r, "fused"))
    over = sum(ratio(r, "fused") > GPU_MAX_TRAIN_VS_CONV for r in have)
    return (f"{goal} at every shape: {_verdict(over == 0, len(have), len(sel))}: worst "
            f"{worst:.3f}{_where(row)}; {over} of {len(have)} rows over")


def _multi_goal(layers, wanted) -> str:
    goal = f"- at least {GPU_MIN_SPEEDUP_MULTI}x faster than the reference with multi-channel masks"
    sel = [r for r in layers if r["mode"] == "multi"]
    have = _with(sel, ("fused", "reference"))
    if "reference" not in wanted or not have:
        return f"{goal}: not measured"
    worst, row = _worst(have, lambda r: 1 / ratio(r, "fused", "reference"), min)
    return (f"{goal}: {_verdict(worst >= GPU_MIN_SPEEDUP_MULTI, len(have), len(sel))}: "
            f"smallest reference / fused {worst:.2f}{_where(row)} over {len(have)} rows")


def _peak_goal(layers, wanted) -> str:
    goal = f"- peak memory at most {GPU_MAX_PEAK_VS_REFERENCE}x the reference's"
    sel = [r for r in layers if r["pass_"] == "fwd+bwd"]
    have = [r for r in sel if r.get("peak_mb")]
    if not {"fused", "reference"} <= set(wanted) or not have:
        return f"{goal}: not measured"
    worst, row = _worst(have, lambda r: r["peak_mb"]["fused"] / r["peak_mb"]["reference"])
    return (f"{goal}: {_verdict(worst <= GPU_MAX_PEAK_VS_REFERENCE, len(have), len(sel))}: "
            f"worst fused / reference {worst:.2f}{_where(row)} over {len(have)} rows")


def _step_goals(rows) -> list[str]:
    goal = f"- training step at least {GPU_MIN_STEP_SPEEDUP}x faster"
    steps = [r for r in rows if r["pass_"] == "step"]
    if not steps:
        return [f"{goal}: not measured"]
    lines = []
    for r in steps:
        where = f"{goal} ({r['dtype']}, {r['mode']})"
        if not _with([r], STEP_IMPLS):
            lines.append(f"{where}: not measured")
            continue
        speedup = ratio(r, "reference", "fused")  # paired, like every other ratio
        lines.append(f"{where}: {_verdict(speedup >= GPU_MIN_STEP_SPEEDUP, 1, 1)}: "
                     f"{speedup:.2f}x")
    return lines


def _cpu_goals(layers) -> list[str]:
    lines = []
    for dtype, mode in dict.fromkeys((r["dtype"], r["mode"]) for r in layers):
        for pass_, bound in (("fwd", CPU_MAX_FWD_GEOMEAN), ("fwd+bwd", CPU_MAX_TRAIN_GEOMEAN)):
            goal = f"- {dtype} {mode} {pass_}: geometric mean within {bound}x of the plain conv"
            sel = [r for r in layers if (r["dtype"], r["mode"], r["pass_"]) == (dtype, mode, pass_)]
            have = _with(sel, ("conv", "fused"))
            if not sel:
                continue
            if not have:
                lines.append(f"{goal}: not measured")
                continue
            mean = geomean(ratio(r, "fused") for r in have)
            verdict = _verdict(mean <= bound, len(have), len(sel), fail_is_final=False)
            lines.append(f"{goal}: {verdict}: {mean:.3f} over {len(have)} shapes")
    return lines


def format_goals(rows, kind: str, wanted=None) -> list[str]:
    """One line per speed goal of ``kind`` ("cuda" or "cpu"): met or not, with the figure
    that decides it (the worst row, or the geometric mean) and how many rows it covers;
    "incomplete (N of M rows)" while rows of the plan (rows with empty ``ms``) or
    implementations in ``wanted`` (default: those in the rows) are missing."""
    layers = _layer_rows(rows)
    wanted = _wanted(rows, wanted)
    if kind == "cuda":
        return ([_train_goal(layers, dtype) for dtype in ("bfloat16", "float32")]
                + [_multi_goal(layers, wanted), _slower_goal(layers, "lean", wanted),
                   _slower_goal(layers, "compiled", wanted), _peak_goal(layers, wanted)]
                + _step_goals(rows))
    return _cpu_goals(layers) + [_slower_goal(layers, "reference", wanted),
                                 _slower_goal(layers, "lean", wanted)]
