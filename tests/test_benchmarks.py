"""The benchmark runner in its smoke mode: the table is complete and finite (speed itself
is not asserted here), and the layer shapes are read off the real models."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import pconv_cuda
from benchmarks import cases, precompile, profile, run
from benchmarks.shapes import unet_layer_shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_table_is_complete_and_finite(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert run.main(["--smoke", "--quiet", "--json", str(out), "--markdown", str(md)]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    layer_rows = [r for r in rows if r["pass_"] in ("fwd", "fwd+bwd")]
    assert len(layer_rows) == len(run.SMOKE_SHAPES) * 2 * 2  # shapes x modes x passes
    for r in layer_rows:
        assert set(r["ms"]) == set(run.IMPLS)
        assert all(math.isfinite(v) and v > 0 for v in r["ms"].values())
        if r["pass_"] == "fwd+bwd":
            assert set(r["peak_mb"]) == {"fused", "reference"}
            assert all(math.isfinite(v) and v >= 0 for v in r["peak_mb"].values())
    step = [r for r in rows if r["pass_"] == "step"]
    assert sorted(r["mode"] for r in step) == ["multi", "single"]
    for r in step:
        assert set(r["ms"]) == {"fused", "reference"}
        assert all(math.isfinite(v) and v > 0 for v in r["ms"].values())
    assert data["environment"]["torch"]
    for label in ("fused", "reference", "lean", "compiled", "geometric means"):
        assert label in table
    assert "nan" not in table and "inf" not in table

    # The Markdown form: one table row per (shape, mode), every ratio finite.
    text = md.read_text()
    table_rows = [line for line in text.splitlines()
                  if line.startswith("| ") and ("(single)" in line or "(multi)" in line)]
    assert len(table_rows) == len(run.SMOKE_SHAPES) * 2
    for line in table_rows:
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        ratios = [float(c.rstrip("×")) for c in cells if c.endswith("×")]
        assert len(ratios) == 2 * (len(run.IMPLS) - 1)
        assert all(math.isfinite(v) and v > 0 for v in ratios)
    for label in ("Geometric means", "Training step", "fused slower than reference",
                  "fused slower than lean"):
        assert label in text
    assert "nan" not in text and "inf" not in text


def test_layer_shapes_follow_the_models():
    at256 = unet_layer_shapes(256)
    labels = [s.label for s in at256["pconv"]]
    assert labels[0] == "3->64 k7 s2 @256" and labels[-1] == "67->3 k3 s1 @256"
    assert "1024->512 k3 s1 @16" in labels and len(labels) == 14
    modified = [s.label for s in at256["modified"]]
    assert modified[0] == "3->64 k3 s1 @256" and "64->64 k3 s1 @256" in modified
    at512 = [s.label for s in unet_layer_shapes(512)["pconv"]]
    assert at512[0] == "3->64 k7 s2 @512" and "512->512 k3 s2 @4" in at512  # 8 levels


def test_paired_ratio_cancels_a_slow_stretch():
    """Two interleaved series, the second always 10% slower than the first; the machine is
    three times slower in some repeats. The paired ratio finds 1.1 exactly; the ratio of
    the medians does not."""
    import statistics

    from benchmarks.timing import paired_ratio

    load = [1, 1, 1, 1, 3, 3, 3]
    base = [1.0 * s for s in load]
    slow = [1.1 * s for s in load]
    slow[3] = 3.3  # this repeat of the second series alone ran in a busy stretch
    assert abs(paired_ratio(slow, base) - 1.1) < 1e-12
    assert abs(statistics.median(slow) / statistics.median(base) - 3.3) < 1e-12


def test_resume_keeps_measured_rows_and_measures_the_rest(tmp_path, capsys):
    """Rows are written as they are measured; --resume measures only the missing ones, and
    --max-minutes stops before new rows without losing the old."""
    path = tmp_path / "bench.json"
    common = ["--smoke", "--quiet", "--no-model", "--json", str(path)]
    assert run.main(common) == 0
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert len(rows) == len(run.SMOKE_SHAPES) * 2 * 2
    kept, dropped = rows[0], rows[-2:]
    kept["ms"]["fused"] = 123456.0  # a value no measurement gives: it must survive
    data["rows"] = rows[:-2]
    path.write_text(json.dumps(data))

    # No time left: nothing new is measured, the file keeps its rows, the run says so.
    assert run.main(common + ["--resume", "--max-minutes", "0"]) == 0
    assert "--resume" in capsys.readouterr().err
    assert len(json.loads(path.read_text())["rows"]) == len(rows) - 2

    assert run.main(common + ["--resume"]) == 0
    after = {run.row_key(r): r for r in json.loads(path.read_text())["rows"]}
    assert len(after) == len(rows)
    assert after[run.row_key(kept)]["ms"]["fused"] == 123456.0
    for r in dropped:
        assert math.isfinite(after[run.row_key(r)]["ms"]["fused"])

    # Rows from another device are never mixed in.
    data = json.loads(path.read_text())
    data["environment"]["device"] = "another machine"
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="another machine"):
        run.main(common + ["--resume"])


def test_precompile_workers_fill_the_cache_the_timings_load_from(tmp_path):
    """Worker processes compile the torch.compile column ahead; the timing process then
    loads every graph from Inductor's on-disk cache and compiles none itself."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--no-model", "--modes", "single",
         "--precompile-jobs", "2", "--json", str(tmp_path / "bench.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    tasks = len(run.SMOKE_SHAPES) * 2  # shapes x passes
    assert f"precompiled {tasks}/{tasks} graphs" in done.stderr
    # Forward rows are one graph, forward + backward rows two.
    graphs = len(run.SMOKE_SHAPES) * 3
    assert f"{graphs} loaded from Inductor's cache, 0 compiled here" in done.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == tasks and all(math.isfinite(r["ms"]["compiled"]) for r in rows)


def test_default_precompile_jobs_leave_two_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert precompile.default_jobs() == 12
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert precompile.default_jobs() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert precompile.default_jobs() == 0  # one worker would only add a process


def test_profile_names_the_passes_of_the_fused_op(tmp_path, capsys):
    out = tmp_path / "profile.txt"
    assert profile.main(["--device", "cpu", "--size", "256", "--layers", "1", "--iters", "1",
                         "--out", str(out)]) == 0
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    for head in ("fwd: conv", "fwd: fused", "fwd+bwd: conv", "fwd+bwd: fused"):
        assert f"3->64 k7 s2 @256 float32 {head}\n" in text
    fused_fwd = text.split("fwd: fused")[1].split("##")[0]
    # The first layer, float32, stride 2, multi-channel mask: where ATen runs AVX-512, the
    # direct convolution, which forms the ratio itself; else the mask pass, oneDNN's
    # convolution and the epilogue.
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        names = ("pconv::direct_conv",)
    else:
        names = ("pconv::mask_ratio", "pconv::epilogue", "aten::mkldnn_convolution")
    for name in names:
        assert name in fused_fwd
    per_call = [float(line.split(": ")[1].split(" ms")[0])
                for line in text.splitlines() if line.startswith("self CPU time per call")]
    assert len(per_call) == 4 and all(math.isfinite(v) and v > 0 for v in per_call)


def _row(dtype, mode, pass_, ms, peak=None, layer="8->16 k3 s1 @32"):
    row = dict(size=32, model="pconv", layer=layer, mode=mode, dtype=dtype, pass_=pass_, ms=ms)
    if peak:
        row["peak_mb"] = peak
    return row


def test_gpu_goals_name_the_row_that_decides_each():
    from benchmarks.markdown import format_goals

    impls = lambda fused, ref, lean, comp: dict(conv=1.0, fused=fused, reference=ref,  # noqa: E731
                                                lean=lean, compiled=comp)
    rows = [
        _row("bfloat16", "multi", "fwd+bwd", impls(1.10, 2.5, 1.3, 1.2),
             peak={"fused": 60.0, "reference": 100.0}),
        _row("bfloat16", "multi", "fwd", impls(1.05, 1.9, 1.2, 1.0), layer="3->64 k7 s2 @512"),
        _row("float32", "single", "fwd+bwd", impls(1.20, 1.5, 1.25, 1.3),
             peak={"fused": 80.0, "reference": 100.0}),
        dict(size=256, model="pconv", layer="training step", mode="multi", dtype="bfloat16",
             pass_="step", ms={"fused": 10.0, "reference": 15.0}),
    ]
    text = "\n".join(format_goals(rows, "cuda"))
    assert "bfloat16 fused fwd+bwd within 1.15x of the plain conv at every shape: met: worst 1.100" in text
    assert "float32 fused fwd+bwd within 1.15x of the plain conv at every shape: NOT met: worst 1.200" in text
    assert ("at least 2.0x faster than the reference with multi-channel masks: NOT met: smallest "
            "reference / fused 1.81 (bfloat16 multi 3->64 k7 s2 @512 fwd) over 2 rows") in text
    assert "faster than lean at every shape: met: slower in 0 of 3 rows" in text
    assert "faster than compiled at every shape: NOT met: slower in 1 of 3 rows; worst fused / compiled 1.050" in text
    assert "peak memory at most 0.7x the reference's: NOT met: worst fused / reference 0.80" in text
    assert "training step at least 1.4x faster (bfloat16, multi): met: 1.50x" in text


def test_cpu_goals_are_geometric_means_and_no_slower_rows():
    from benchmarks.markdown import format_goals

    rows = [_row("float32", "single", "fwd", dict(conv=1.0, fused=1.08, reference=1.2, lean=1.1)),
            _row("float32", "single", "fwd", dict(conv=1.0, fused=1.14, reference=1.3, lean=1.1),
                 layer="64->128 k5 s2 @128"),
            _row("float32", "single", "fwd+bwd", dict(conv=1.0, fused=1.02, reference=1.5, lean=1.3))]
    text = "\n".join(format_goals(rows, "cpu"))
    assert "float32 single fwd: geometric mean within 1.1x of the plain conv: NOT met: 1.110 over 2 shapes" in text
    assert "float32 single fwd+bwd: geometric mean within 1.05x of the plain conv: met: 1.020" in text
    assert "faster than lean at every shape: NOT met: slower in 1 of 3 rows" in text
    assert "faster than reference at every shape: met" in text


def test_skipped_reference_leaves_out_the_memory_column(tmp_path, capfd):
    """Peak memory compares the fused op with the reference, so a run that skips the
    reference measures none and still prints its table; the profiler behind the CPU peaks
    leaves stderr alone."""
    path = tmp_path / "bench.json"
    assert run.main(["--smoke", "--quiet", "--no-model", "--skip", "reference", "lean",
                     "compiled", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(set(r["ms"]) == {"conv", "fused"} and "peak_mb" not in r for r in rows)
    assert "peak MB" in capfd.readouterr().out

    assert run.main(["--smoke", "--quiet", "--no-model", "--modes", "single", "--skip", "lean",
                     "compiled", "--json", str(tmp_path / "peaks.json")]) == 0
    rows = json.loads((tmp_path / "peaks.json").read_text())["rows"]
    assert all(set(r["peak_mb"]) == {"fused", "reference"} for r in rows if r["pass_"] == "fwd+bwd")
    assert "profiler_start" not in capfd.readouterr().err


def test_rows_are_measured_steps_first_then_by_dtype_size_and_mode(tmp_path):
    """The order a run stopped by --max-minutes leaves complete: the training steps, then
    whole tables in the order of --dtypes, --sizes and --modes."""
    path = tmp_path / "bench.json"
    assert run.main(["--smoke", "--quiet", "--dtypes", "float32", "bfloat16", "--modes",
                     "multi", "single", "--skip", "compiled", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]  # in the order they were measured
    steps = [r for r in rows if r["pass_"] == "step"]
    assert len(steps) == 4 and rows[:4] == steps
    order = list(dict.fromkeys((r["dtype"], r["mode"]) for r in rows[4:]))
    assert order == [("float32", "multi"), ("float32", "single"), ("bfloat16", "multi"),
                     ("bfloat16", "single")]


def test_bounds_count_every_pass_of_the_cuda_op(tmp_path, capsys):
    from benchmarks import bounds
    from benchmarks.shapes import LayerShape

    shape = LayerShape(2, 3, 3, 1, 1, 4, 4)  # 2->3 k3 s1 p1 on 4x4: outputs 4x4
    fwd = bounds.pass_bytes(shape, 1, "single", "float32", "fwd")
    # x 128 B, single-channel m 64 B, y 192 B, r or u 64 B (float32 whatever the dtype).
    assert fwd == {"mask pass": 64 + 2 * 64 + 64, "masking": 2 * 128 + 64,
                   "epilogue": 2 * 192 + 2 * 64}
    train = bounds.pass_bytes(shape, 1, "multi", "bfloat16", "fwd+bwd")
    x, m, y, stats = 64, 64, 96, 64  # bfloat16, mask with C_in channels
    assert train == {"mask pass": m + 2 * stats + 32, "masking": 2 * x + m,
                     "epilogue": 2 * y + 2 * stats, "grad prologue": 2 * y + 2 * stats,
                     "dx * m": 2 * x + m}
    assert bounds.floor_us({"all": 4000}, bandwidth_gbs=4.0) == 1.0

    # Against a run: the floor is 1 + passes / conv time; rows over the goal are counted.
    label = "3->64 k7 s2 @256"
    row = dict(size=256, model="pconv", layer=label, mode="multi", dtype="bfloat16",
               pass_="fwd+bwd", ms={"conv": 0.05, "fused": 0.08})
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"environment": {"device": "GPU", "copy_bandwidth_gbs": 4000.0},
                                "args": {"batch": 8}, "rows": [row]}))
    assert bounds.main(["--json", str(path)]) == 0
    out = capsys.readouterr().out
    shapes = bounds._shapes([256], ["pconv"])
    us, floor = bounds.row_floor(row, shapes, 8, 4000.0)
    assert floor == pytest.approx(1 + us / 50.0) and floor > 1.15
    assert f"| {us:.1f} | 1.600 | {floor:.3f} |" in out
    assert "fwd+bwd rows whose floor alone is over 1.15: 1 of 1" in out
    with pytest.raises(SystemExit):
        bounds.main([])  # no run and no bandwidth: nothing to compute from


def test_channels_last_weights_reach_every_implementation(tmp_path, monkeypatch):
    """--weights channels_last gives every column the same channels_last weight, says so
    in the table, and never resumes from rows measured with the other format."""
    seen = []
    real = cases.implementations

    def spying(names):
        def spy(impl):
            def call(x, m, w, b, stride, padding):
                seen.append(w.is_contiguous(memory_format=torch.channels_last)
                            and not w.is_contiguous())
                return impl(x, m, w, b, stride, padding)
            return call
        return {n: spy(f) for n, f in real(names).items()}

    monkeypatch.setattr(cases, "implementations", spying)
    path, md = tmp_path / "cl.json", tmp_path / "cl.md"
    common = ["--smoke", "--quiet", "--no-model", "--skip", "compiled", "--json", str(path)]
    assert run.main(common + ["--weights", "channels_last", "--markdown", str(md)]) == 0
    assert seen and all(seen)
    assert json.loads(path.read_text())["environment"]["weights"] == "channels_last"
    assert "weights: channels_last" in md.read_text()
    with pytest.raises(SystemExit, match="weights"):
        run.main(common + ["--resume"])  # NCHW weights this time

    seen.clear()
    assert run.main(["--smoke", "--quiet", "--no-model", "--skip", "compiled"]) == 0
    assert seen and not any(seen)
    step = cases.unet_train_step(pconv_cuda.PartialConv2d, 64, 1, "cpu", torch.float32,
                                 layers=4, base_channels=8, weights="channels_last")
    step()
