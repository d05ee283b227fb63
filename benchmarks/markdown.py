"""The runner's rows as Markdown, in the form the README shows them.

    python -m benchmarks --preset cpu --models pconv --markdown cpu.md

One table per dtype (a row per layer shape and mask mode: the plain conv's time and every
other implementation as a ratio to it, forward and forward + backward, peak memory), the
geometric means, the training step, the rows where the fused op is slower than the
reference or the lean style, and each speed goal of the device kind with its figure.
Ratios are paired: the median over repeats of the ratio of two calls timed back to back
(see ``timing.paired_ratio``).
"""
from __future__ import annotations

import math

COMPARED = ("fused", "reference", "lean", "compiled")
PASSES = ("fwd", "fwd+bwd")


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


def _layer_rows(rows):
    return [r for r in rows if r["pass_"] in PASSES and "conv" in r["ms"]]


def _present(rows):
    return [i for i in COMPARED if any(i in r["ms"] for r in rows)]


def _dtype_table(rows, dtype, impls) -> list[str]:
    head = ["layer (C_in→C_out, kernel, stride, input)"]
    for pass_ in PASSES:
        head += [f"conv {pass_} ms"] + [f"{i} {pass_}" for i in impls]
    head.append("peak MB fused / ref")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {(r["layer"], r["mode"], r["pass_"]): r for r in rows if r["dtype"] == dtype}
    keys = []
    for r in rows:
        key = (r["layer"], r["mode"])
        if r["dtype"] == dtype and key not in keys:
            keys.append(key)
    for layer, mode in keys:
        cells = [f"{layer.replace('->', '→')} ({mode})"]
        peak = None
        for pass_ in PASSES:
            r = by_key.get((layer, mode, pass_))
            if r is None:
                cells += ["-"] * (1 + len(impls))
                continue
            cells.append(f"{r['ms']['conv']:.2f}")
            cells += [f"{ratio(r, i):.2f}×" if i in r["ms"] else "-" for i in impls]
            peak = r.get("peak_mb") or peak
        cells.append(f"{peak['fused']:.1f} / {peak['reference']:.1f}" if peak else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _slower_rows(rows) -> list[str]:
    lines = []
    for other in ("reference", "lean"):
        both = [r for r in rows if other in r["ms"] and "fused" in r["ms"]]
        slower = [r for r in both if ratio(r, "fused", other) > 1]
        worst = max((ratio(r, "fused", other) - 1 for r in slower), default=0.0)
        lines.append(f"- fused slower than {other}: {len(slower)} of {len(both)} rows"
                     + (f" (by at most {100 * worst:.1f}%)" if slower else ""))
        for r in slower:
            lines.append(f"  - {r['dtype']} {r['mode']} {r['layer']} {r['pass_']}: "
                         f"{r['ms']['fused']:.3f} vs {r['ms'][other]:.3f} ms (median), "
                         f"+{100 * (ratio(r, 'fused', other) - 1):.1f}% (paired)")
    return lines


def format_markdown(rows, env) -> str:
    """Markdown tables of the runner's rows (see the module docstring)."""
    layers = _layer_rows(rows)
    impls = _present(layers)
    out = [f"Device: {env['device']}; torch {env['torch']}; CUDA {env['cuda']}; "
           f"cuDNN {env['cudnn']}; TF32 matmul={env['tf32_matmul']} cudnn={env['tf32_cudnn']}; "
           f"malloc: {env.get('malloc', 'default')}; weights: {env.get('weights', 'nchw')}.", ""]
    for dtype in dict.fromkeys(r["dtype"] for r in layers):
        out += [f"{dtype}:", ""] + _dtype_table(layers, dtype, impls) + [""]
    out += ["Geometric means of the ratio to the plain conv:", "",
            "| dtype, mask, pass | " + " | ".join(impls) + " |",
            "|---|" + "---|" * len(impls)]
    for dtype, mode, pass_ in dict.fromkeys((r["dtype"], r["mode"], r["pass_"]) for r in layers):
        sel = [r for r in layers if (r["dtype"], r["mode"], r["pass_"]) == (dtype, mode, pass_)]
        means = [geomean(ratio(r, i) for r in sel if i in r["ms"]) for i in impls]
        name = {"fwd": "forward", "fwd+bwd": "forward + backward"}[pass_]
        out.append(f"| {dtype}, {mode}, {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    steps = [r for r in rows if r["pass_"] == "step"]
    if steps:
        out += ["", "Training step of the PConv UNet:", ""]
        out += [f"- {r['dtype']}, {r['mode']}-channel masks: fused {r['ms']['fused']:.1f} ms, "
                f"reference {r['ms']['reference']:.1f} ms "
                f"(reference / fused: {r['ms']['reference'] / r['ms']['fused']:.2f})"
                for r in steps]
    out += ["", "Rows where the fused op is slower:", ""] + _slower_rows(layers)
    out += ["", "Goals:", ""] + format_goals(rows, env.get("kind", "cpu"))
    return "\n".join(out) + "\n"


# The speed goals the fused op is held to, per device kind.
GPU_MAX_TRAIN_VS_CONV = 1.15  # fused fwd+bwd / plain conv, every shape, bfloat16 and float32
GPU_MIN_SPEEDUP_MULTI = 2.0  # reference / fused, multi-channel masks, every shape and pass
GPU_MAX_PEAK_VS_REFERENCE = 0.7  # fused / reference peak memory of fwd+bwd
GPU_MIN_STEP_SPEEDUP = 1.4  # reference / fused, one PConv UNet training step
CPU_MAX_FWD_GEOMEAN = 1.10  # fused / plain conv, geometric mean over the shapes
CPU_MAX_TRAIN_GEOMEAN = 1.05


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _worst(rows, value, pick=max):
    """(worst value, its row) over rows, or (nan, None) when there are none."""
    scored = [(value(r), r) for r in rows]
    if not scored:
        return float("nan"), None
    return pick(scored, key=lambda vr: vr[0])


def _where(row) -> str:
    return "" if row is None else f" ({row['dtype']} {row['mode']} {row['layer']} {row['pass_']})"


def _slower_goal(layers, other) -> str:
    both = [r for r in layers if other in r["ms"] and "fused" in r["ms"]]
    if not both:
        return f"- fused faster than {other} at every shape: not measured"
    slower = [r for r in both if ratio(r, "fused", other) > 1]
    worst, row = _worst(both, lambda r: ratio(r, "fused", other))
    return (f"- fused faster than {other} at every shape: {_verdict(not slower)}: slower in "
            f"{len(slower)} of {len(both)} rows; worst fused / {other} {worst:.3f}"
            + _where(row))


def format_goals(rows, kind: str) -> list[str]:
    """One line per speed goal of ``kind`` ("cuda" or "cpu"): met or not, with the figure
    that decides it (the worst row, or the geometric mean) and how many rows it covers."""
    layers = _layer_rows(rows)
    lines = []
    if kind == "cuda":
        for dtype in ("bfloat16", "float32"):
            sel = [r for r in layers if r["dtype"] == dtype and r["pass_"] == "fwd+bwd"
                   and "fused" in r["ms"]]
            if not sel:
                lines.append(f"- {dtype} fused fwd+bwd within {GPU_MAX_TRAIN_VS_CONV}x of the "
                             "plain conv: not measured")
                continue
            worst, row = _worst(sel, lambda r: ratio(r, "fused"))
            over = sum(ratio(r, "fused") > GPU_MAX_TRAIN_VS_CONV for r in sel)
            lines.append(f"- {dtype} fused fwd+bwd within {GPU_MAX_TRAIN_VS_CONV}x of the plain "
                         f"conv at every shape: {_verdict(over == 0)}: worst {worst:.3f}"
                         f"{_where(row)}; {over} of {len(sel)} rows over")
        multi = [r for r in layers if r["mode"] == "multi" and "reference" in r["ms"]
                 and "fused" in r["ms"]]
        if multi:
            worst, row = _worst(multi, lambda r: 1 / ratio(r, "fused", "reference"), min)
            lines.append(f"- at least {GPU_MIN_SPEEDUP_MULTI}x faster than the reference with "
                         f"multi-channel masks: {_verdict(worst >= GPU_MIN_SPEEDUP_MULTI)}: "
                         f"smallest reference / fused {worst:.2f}{_where(row)} over "
                         f"{len(multi)} rows")
        else:
            lines.append(f"- at least {GPU_MIN_SPEEDUP_MULTI}x faster than the reference with "
                         "multi-channel masks: not measured")
        lines += [_slower_goal(layers, "lean"), _slower_goal(layers, "compiled")]
        peaks = [r for r in layers if r.get("peak_mb")]
        if peaks:
            worst, row = _worst(peaks, lambda r: r["peak_mb"]["fused"] / r["peak_mb"]["reference"])
            lines.append(f"- peak memory at most {GPU_MAX_PEAK_VS_REFERENCE}x the reference's: "
                         f"{_verdict(worst <= GPU_MAX_PEAK_VS_REFERENCE)}: worst fused / reference "
                         f"{worst:.2f}{_where(row)} over {len(peaks)} rows")
        else:
            lines.append(f"- peak memory at most {GPU_MAX_PEAK_VS_REFERENCE}x the reference's: "
                         "not measured")
        steps = [r for r in rows if r["pass_"] == "step"]
        for r in steps:
            speedup = r["ms"]["reference"] / r["ms"]["fused"]
            lines.append(f"- training step at least {GPU_MIN_STEP_SPEEDUP}x faster "
                         f"({r['dtype']}, {r['mode']}): {_verdict(speedup >= GPU_MIN_STEP_SPEEDUP)}: "
                         f"{speedup:.2f}x")
        if not steps:
            lines.append(f"- training step at least {GPU_MIN_STEP_SPEEDUP}x faster: not measured")
        return lines
    for dtype, mode in dict.fromkeys((r["dtype"], r["mode"]) for r in layers):
        for pass_, bound in (("fwd", CPU_MAX_FWD_GEOMEAN), ("fwd+bwd", CPU_MAX_TRAIN_GEOMEAN)):
            sel = [r for r in layers if (r["dtype"], r["mode"], r["pass_"]) == (dtype, mode, pass_)
                   and "fused" in r["ms"]]
            if sel:
                mean = geomean(ratio(r, "fused") for r in sel)
                lines.append(f"- {dtype} {mode} {pass_}: geometric mean within {bound}x of the "
                             f"plain conv: {_verdict(mean <= bound)}: {mean:.3f} over "
                             f"{len(sel)} shapes")
    return lines + [_slower_goal(layers, "reference"), _slower_goal(layers, "lean")]
