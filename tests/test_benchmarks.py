"""The benchmark runner in its smoke mode: the table is complete and finite (speed itself
is not asserted here), and the layer shapes are read off the real models."""
import json
import math
import os
import pathlib
import subprocess
import sys
import time
import types

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
    data["configuration"]["device"] = "another machine"
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

    shape = LayerShape(2, 5, 3, 1, 1, 4, 4)  # 2->5 k3 s1 p1 on 4x4: outputs 4x4
    fwd = bounds.pass_bytes(shape, 1, "single", "float32", "fwd")
    # x 128 B, single-channel m 64 B, y 320 B, r or u 64 B (float32 whatever the dtype).
    assert fwd == {"mask pass": 64 + 2 * 64 + 64, "masking": 2 * 128 + 64,
                   "epilogue": 2 * 320 + 2 * 64}
    train = bounds.pass_bytes(shape, 1, "multi", "bfloat16", "fwd+bwd")
    x, m, y, stats = 64, 64, 160, 64  # bfloat16, mask with C_in channels
    channel_sum = 64  # the masking sums the mask's channels (float32); the mask pass reads that
    assert train == {"masking": 2 * x + m + channel_sum, "mask pass": channel_sum + 2 * stats + 32,
                     "epilogue": 2 * y + 2 * stats, "grad prologue": 2 * y + 2 * stats,
                     "dx * m": 2 * x + m}
    # 2->3: the direct kernels (forward with its epilogue; masked input gradient).
    few = LayerShape(2, 3, 3, 1, 1, 4, 4)
    assert bounds.takes_direct_kernels(few) and not bounds.takes_direct_kernels(shape)
    assert not bounds.takes_direct_kernels(LayerShape(64, 3, 5, 1, 2, 8, 8))  # 25 taps
    assert bounds.pass_bytes(few, 1, "single", "float32", "fwd") == {
        "mask pass": 64 + 2 * 64 + 64, "direct forward: m": 64}
    y = 96  # 3 channels, bfloat16
    assert bounds.pass_bytes(few, 1, "multi", "bfloat16", "fwd+bwd") == {
        "masking": 2 * x + m + channel_sum, "mask pass": channel_sum + 2 * stats + 32,
        "grad prologue": 2 * y + 2 * stats, "direct input gradient: m": m}
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
    us, floor = bounds.row_floor(row, bounds._shapes([256], ["pconv"])[(256, label)], 8, 4000.0)
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


# --- Timing: device time on a GPU, a new input set for every call -------------------------


class _FakeCuda:
    """Stands in for the CUDA calls of benchmarks.timing and logs them in order: the GPU
    timer must be right before a GPU run, which has only minutes."""

    def __init__(self, monkeypatch, clock_rate=1_500_000, kernel_ms=0.25):
        self.log, self.kernel_ms, self.events = [], kernel_ms, 0
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.name = ("start", "end")[fake.events % 2]  # made in pairs
                fake.events += 1

            def record(self):
                fake.log.append(f"{self.name}.record")

            def synchronize(self):
                fake.log.append(f"{self.name}.synchronize")

            def elapsed_time(self, other):
                return fake.kernel_ms

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: self.log.append(f"sleep {cycles}"))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: self.log.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda _: types.SimpleNamespace(clock_rate=clock_rate))

    def call(self, name):
        def run(arg):
            self.log.append(f"call {name} {arg}")
        return run


def test_gpu_timer_queues_the_call_behind_a_sleep(monkeypatch):
    """The GPU sleeps before the start event, so the host has issued the whole call by the
    time the GPU reaches it, and the events time the kernels, not the launches; the host
    time is read without a synchronise."""
    from benchmarks import timing

    cuda = _FakeCuda(monkeypatch)
    device_ms, host_ms = timing._time_cuda_call(cuda.call("fused"), "x", sleep_cycles=3000)
    assert cuda.log == ["sleep 3000", "start.record", "call fused x", "end.record",
                        "end.synchronize"]
    assert device_ms == 0.25 and 0 <= host_ms < 1e3

    _FakeCuda(monkeypatch, clock_rate=1_500_000)  # kHz: 1.5 M cycles per ms
    assert timing.sleep_cycles_per_ms() == 1_500_000
    _FakeCuda(monkeypatch, clock_rate=0)  # torch reports no clock: assume 2 GHz
    assert timing.sleep_cycles_per_ms() == timing.FALLBACK_CYCLES_PER_MS


def test_gpu_sleep_covers_the_slowest_call_of_the_row(monkeypatch):
    """The sleep is sized from the warm-up: longer than the host's time to issue the
    slowest call (timed from an idle queue), within 1 and 50 ms; the row keeps it and the
    host's times beside the device times."""
    from benchmarks import timing

    assert timing.launch_cover_ms([]) == timing.LAUNCH_COVER_MIN_MS
    assert timing.launch_cover_ms([0.1, 0.3]) == timing.LAUNCH_COVER_MIN_MS
    assert timing.launch_cover_ms([0.5, 4.0]) == pytest.approx(6.0)
    assert timing.launch_cover_ms([400.0]) == timing.LAUNCH_COVER_MAX_MS

    cuda = _FakeCuda(monkeypatch)
    clock = iter(range(1000))  # every reading of perf_counter 1 ms after the one before
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock) * 1e-3)
    samples = timing.interleaved_samples({"conv": cuda.call("conv"), "fused": cuda.call("fused")},
                                         [0, 1, 2], "cuda", warmup=1, repeats=2)
    # Warm-up: an idle queue before each call; each call reads 1 ms of host time.
    assert cuda.log[:4] == ["synchronize", "call conv 0", "synchronize", "call fused 1"]
    assert samples.cover_ms == pytest.approx(1.5)
    assert samples.device_ms == {"conv": [0.25, 0.25], "fused": [0.25, 0.25]}
    assert samples.host_ms == {name: pytest.approx([1.0, 1.0]) for name in ("conv", "fused")}
    assert cuda.log.count(f"sleep {int(1.5 * 1_500_000)}") == 4

    row = {}
    run.record_times(row, samples, base="conv")
    assert row["host_ms"] == pytest.approx({"conv": 1.0, "fused": 1.0})
    assert row["cover_ms"] == pytest.approx(1.5)
    assert row["ms"] == {"conv": 0.25, "fused": 0.25} and row["ratio"]["fused"] == 1.0


def test_every_call_takes_the_next_input_set():
    """Consecutive calls never share inputs, and with more sets than implementations no two
    calls of a repeat do: a call never finds its inputs in cache from the call before."""
    from benchmarks import timing

    seen = []
    calls = {name: (lambda arg, name=name: seen.append((name, arg))) for name in "abc"}
    timing.interleaved_samples(calls, [0, 1, 2, 3], "cpu", warmup=1, repeats=3)
    assert [arg for _, arg in seen] == [i % 4 for i in range(12)]
    timed = seen[3:]
    for i in range(3):
        repeat = timed[3 * i:3 * i + 3]
        assert sorted(name for name, _ in repeat) == ["a", "b", "c"]
        assert len({arg for _, arg in repeat}) == 3
    assert run.DEFAULT_ROTATE > len(run.IMPLS)
    args, _ = run.parse_args(["--smoke"])
    assert args.rotate == run.DEFAULT_ROTATE


def test_input_sets_stay_within_a_share_of_free_gpu_memory(monkeypatch):
    from benchmarks.shapes import LayerShape

    shape = LayerShape(64, 64, 3, 1, 1, 512, 512)
    per_set = cases.input_set_bytes(shape, 8, "multi", torch.bfloat16)
    assert per_set == 3 * 8 * 64 * 512 * 512 * 2  # x, a C_in-channel mask, grad_out
    assert cases.input_set_bytes(shape, 8, "single", torch.float32) == \
        (2 * 8 * 64 + 8) * 512 * 512 * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (40 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    assert run.rotation(6, per_set, "cuda") == 6  # 4.8 GB of 44 GB free
    assert run.rotation(6, 4 * 2**30, "cuda") == 2  # 11 GB would fit 2, never fewer
    assert run.rotation(6, 30 * 2**30, "cuda") == 2
    assert run.rotation(1, 30 * 2**30, "cuda") == 1
    assert run.rotation(6, 30 * 2**30, "cpu") == 6


# --- Rows: shapes measured once, placed and keyed by their full shape ----------------------


def test_shapes_shared_by_sizes_are_planned_once():
    from benchmarks.shapes import distinct_across_sizes, distinct

    planned = distinct_across_sizes([256, 512])
    per_size = [distinct(unet_layer_shapes(s)) for s in (256, 512)]
    assert len(planned) == len(per_size[0]) + len(per_size[1]) - 11
    assert len({p.shape for p in planned}) == len(planned)
    deep = next(p for p in planned if p.shape.label == "512->512 k3 s2 @4")
    assert (deep.size, deep.model, deep.also_in) == (256, "pconv", ((512, "pconv"),))
    # The same label in both UNets, with and without bias: two shapes, two rows.
    at8 = [p for p in planned if p.shape.label == "1024->512 k3 s1 @8"]
    assert sorted((p.model, p.shape.bias) for p in at8) == [("modified", True), ("pconv", False)]
    first = distinct_across_sizes([512, 256])
    assert next(p for p in first if p.shape.label == "512->512 k3 s2 @4").size == 512


def _layer(size, model, shape, mode="multi", pass_="fwd+bwd", dtype="bfloat16", ms=None,
           also_in=(), **extra):
    import dataclasses

    return dict(size=size, model=model, layer=shape.label, shape=dataclasses.asdict(shape),
                mode=mode, dtype=dtype, pass_=pass_, batch=8,
                also_in=[list(a) for a in also_in], ms=ms or {}, **extra)


def test_markdown_has_a_table_per_size_and_model():
    """Rows of two sizes, and one label in two UNets (with and without bias), all show;
    a shape that a later UNet shares is shown once, and the later table says so."""
    from benchmarks.markdown import format_markdown
    from benchmarks.shapes import LayerShape

    ms = dict(conv=1.0, fused=1.1, reference=2.0, lean=1.3, compiled=1.2)
    deep = LayerShape(512, 512, 3, 2, 1, 4, 4, False)
    rows = [_layer(256, "pconv", LayerShape(3, 64, 7, 2, 3, 256, 256), ms=ms),
            _layer(256, "pconv", deep, ms=ms, also_in=[(512, "pconv")]),
            _layer(256, "pconv", LayerShape(1024, 512, 3, 1, 1, 8, 8, False), ms=ms),
            _layer(256, "modified", LayerShape(1024, 512, 3, 1, 1, 8, 8, True), ms=ms),
            _layer(512, "pconv", LayerShape(3, 64, 7, 2, 3, 512, 512), ms=ms)]
    text = format_markdown(rows, {"device": "GPU", "torch": "2", "cuda": "12", "cudnn": 9,
                                  "tf32_matmul": False, "tf32_cudnn": False, "kind": "cuda"})
    heads = [line for line in text.splitlines() if line.startswith("bfloat16, ")]
    assert heads == ["bfloat16, PConv UNet at 256×256:", "bfloat16, modified UNet at 256×256:",
                     "bfloat16, PConv UNet at 512×512:"]
    body = [line for line in text.splitlines() if line.startswith("| ") and "(multi)" in line]
    assert len(body) == len(rows)
    at512 = text.split("PConv UNet at 512×512:")[1].split("Geometric")[0]
    assert "Measured once and shown in a table above, this UNet also has: " in at512
    assert "512→512 k3 s2 @4" in at512 and "| 512→512" not in at512


def test_a_stored_row_is_found_wherever_the_plan_shows_its_shape():
    from benchmarks.shapes import LayerShape, PlannedShape

    shape = LayerShape(512, 512, 3, 2, 1, 4, 4, False)
    stored = _layer(512, "pconv", shape, ms={"conv": 1.0})
    wanted = run._layer_row(PlannedShape(256, "pconv", shape, ((512, "pconv"),)), "multi",
                            "bfloat16", "fwd+bwd", 8)
    assert run.row_key(stored) == run.row_key(wanted)
    placed = run._placed(stored, wanted)
    assert placed["size"] == 256 and placed["also_in"] == [[512, "pconv"]]
    assert placed["ms"] == {"conv": 1.0}
    other_batch = dict(wanted, batch=1)
    assert run.row_key(other_batch) != run.row_key(wanted)


def test_peak_memory_is_measured_for_the_rows_own_shape(monkeypatch):
    """Two shapes with one label (the modified UNet's has a bias): each row's memory is
    measured for its own."""
    from benchmarks.shapes import LayerShape

    seen = []
    monkeypatch.setattr(cases, "make_params",
                        lambda shape, *a, **k: seen.append(shape) or (None, None))
    monkeypatch.setattr(cases, "make_inputs", lambda *a, **k: [None])
    monkeypatch.setattr(run.timing, "peak_memory_mb", lambda fn, device: 1.0)
    with_bias = LayerShape(1024, 512, 3, 1, 1, 8, 8, True)
    row = _layer(256, "modified", with_bias, ms={"fused": 1.0, "reference": 2.0})
    args = types.SimpleNamespace(batch=8, weights="nchw", retry_errors=False)
    store = types.SimpleNamespace(add=lambda r: None)
    impls = {"fused": None, "reference": None}
    assert run._measure_peaks([row], impls, args, "cpu", store, lambda: False)
    assert seen == [with_bias] and row["peak_mb"] == {"fused": 1.0, "reference": 1.0}


# --- Resume: one configuration per file, missing columns measured ----------------------------


def test_resume_refuses_another_configuration(tmp_path):
    path = tmp_path / "bench.json"
    common = ["--smoke", "--quiet", "--no-model", "--skip", "lean", "compiled", "--modes",
              "single", "--json", str(path)]
    assert run.main(common) == 0
    config = json.loads(path.read_text())["configuration"]
    for key in ("batch", "repeats", "warmup", "rotate", "model_batch", "model_repeats", "cuda",
                "cudnn", "tf32_matmul", "cudnn_benchmark", "cudnn_deterministic", "timing",
                "malloc", "weights", "torch", "device", "cpu_isa"):
        assert key in config
    with pytest.raises(SystemExit, match="repeats 2 there, 3 here"):
        run.main(common + ["--resume", "--repeats", "3"])
    with pytest.raises(SystemExit, match="batch 2 there, 4 here"):
        run.main(common + ["--resume", "--batch", "4"])
    data = json.loads(path.read_text())
    del data["configuration"]  # as an older runner wrote it
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="records no configuration"):
        run.main(common + ["--resume"])


def test_resume_measures_the_columns_a_first_run_skipped(tmp_path):
    path = tmp_path / "bench.json"
    common = ["--smoke", "--quiet", "--no-model", "--modes", "single", "--json", str(path)]
    assert run.main(common + ["--skip", "lean", "compiled"]) == 0
    first = json.loads(path.read_text())["rows"]
    assert first and all("lean" not in r["ms"] for r in first)
    assert run.main(common + ["--skip", "compiled", "--resume"]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == len(first) and all("lean" in r["ms"] for r in rows)
    # Memory does not depend on the columns: it is kept, not measured again.
    assert [r.get("peak_mb") for r in rows] == [r.get("peak_mb") for r in first]


def test_a_half_measured_plan_entry_stays_in_the_output(tmp_path, capsys):
    """A stopped run saved an entry's forward row but not its forward + backward row: both
    the text table and the Markdown still show the forward row, and the goals that need
    the missing row say incomplete, never met."""
    path, md = tmp_path / "bench.json", tmp_path / "bench.md"
    common = ["--smoke", "--quiet", "--no-model", "--device", "cpu", "--modes", "single",
              "--skip", "compiled", "--json", str(path)]  # the CPU's goals
    assert run.main(common) == 0
    data = json.loads(path.read_text())
    label = run.SMOKE_SHAPES[-1].label
    data["rows"] = [r for r in data["rows"] if (r["layer"], r["pass_"]) != (label, "fwd+bwd")]
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert run.main(common + ["--resume", "--max-minutes", "0", "--markdown", str(md)]) == 0
    out = capsys.readouterr()
    assert f"| {label} | single | float32 | fwd |" in out.out
    text = md.read_text()
    line = next(x for x in text.splitlines() if x.startswith(f"| {label.replace('->', '→')} "))
    assert line.count("×") == 3 and " - |" in line  # forward measured, the rest not
    assert "float32 single fwd+bwd: geometric mean within 1.05x of the plain conv: incomplete " \
           "(2 of 3 rows)" in text
    assert "--resume --json" in out.err


def test_goals_are_incomplete_while_rows_are_missing():
    from benchmarks.markdown import format_goals
    from benchmarks.shapes import LayerShape

    a, b = LayerShape(8, 16, 3, 1, 1, 32, 32), LayerShape(16, 32, 3, 2, 1, 32, 32)
    ms = dict(conv=1.0, fused=1.05, reference=3.0, lean=1.2, compiled=1.1)
    rows = [_layer(32, "pconv", a, ms=ms, peak_mb={"fused": 50.0, "reference": 100.0}),
            _layer(32, "pconv", b),  # planned, not measured
            dict(size=256, model="pconv", layer="training step", mode="multi",
                 dtype="bfloat16", pass_="step", batch=8, ms={})]
    text = "\n".join(format_goals(rows, "cuda"))
    assert "bfloat16 fused fwd+bwd within 1.15x of the plain conv at every shape: " \
           "incomplete (1 of 2 rows)" in text
    assert "multi-channel masks: incomplete (1 of 2 rows)" in text
    assert "peak memory at most 0.7x the reference's: incomplete (1 of 2 rows)" in text
    assert "training step at least 1.4x faster (bfloat16, multi): not measured" in text
    assert ": met" not in text
    # A measured row over a worst-row goal fails it whatever the missing rows give.
    rows[0]["ms"]["fused"] = 1.3
    text = "\n".join(format_goals(rows, "cuda"))
    assert "at every shape: NOT met (1 of 2 rows measured): worst 1.300" in text
    # A column the run asked for but that a row lacks (it raised) leaves its goal open.
    rows[0]["ms"]["fused"] = 1.05
    rows[1]["ms"] = dict(ms, fused=1.0)
    del rows[1]["ms"]["compiled"]
    rows[1]["errors"] = {"compiled": "EagerFallback: ..."}
    text = "\n".join(format_goals(rows, "cuda"))
    assert "fused faster than compiled at every shape: incomplete (1 of 2 rows)" in text
    assert "fused faster than lean at every shape: met" in text


def test_the_training_step_ratio_is_the_paired_one_everywhere():
    """Markdown and goals give the step's paired ratio (the text table's), not the ratio
    of the medians; the GPU preset times enough steps for it."""
    from benchmarks.markdown import format_goals, format_markdown

    step = dict(size=256, model="pconv", layer="training step", mode="multi", dtype="bfloat16",
                pass_="step", batch=8, ms={"fused": 10.0, "reference": 15.0},
                ratio={"fused": 1.0, "reference": 1.32}, ratio_base="fused",
                fused_vs={"reference": 0.76})
    assert "training step at least 1.4x faster (bfloat16, multi): NOT met: 1.32x" in \
        "\n".join(format_goals([step], "cuda"))
    text = format_markdown([step], {"device": "GPU", "torch": "2", "cuda": "12", "cudnn": 9,
                                    "tf32_matmul": False, "tf32_cudnn": False, "kind": "cuda"})
    assert "reference / fused 1.32 (paired)" in text and "1.50" not in text
    assert run.PRESETS["gpu"]["model_repeats"] >= 20


# --- Failures: recorded in their rows, the table goes on -----------------------------------


def test_an_implementation_that_raises_is_recorded_and_the_table_goes_on(tmp_path, monkeypatch,
                                                                          capsys):
    real = cases.implementations

    def with_a_broken_lean(names):
        impls = real(names)
        if "lean" in impls:
            def lean(*a):
                raise RuntimeError("lean broke\nsecond line")
            impls["lean"] = lean
        return impls

    monkeypatch.setattr(cases, "implementations", with_a_broken_lean)
    path, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert run.main(["--smoke", "--quiet", "--no-model", "--modes", "single", "--skip",
                     "compiled", "--json", str(path), "--markdown", str(md)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == len(run.SMOKE_SHAPES) * 2
    for r in rows:
        assert r["errors"] == {"lean": "RuntimeError: lean broke"}
        assert set(r["ms"]) == {"conv", "fused", "reference"}
    out = capsys.readouterr()
    assert "| error |" in out.out and "lean: RuntimeError: lean broke" in out.out
    assert "measurements failed" in out.err
    text = md.read_text()
    assert "error" in text and "fused faster than lean at every shape: not measured" in text


def test_a_compiled_column_run_eagerly_is_an_error_in_its_row(tmp_path, monkeypatch):
    """Where Dynamo runs the reference as plain Python (past a recompile limit) the row
    records an error for the compiled column instead of an eager time under its name."""
    monkeypatch.setattr(cases, "_compiled_reference", lambda: cases._reference_compiled_only)
    path = tmp_path / "bench.json"
    assert run.main(["--smoke", "--quiet", "--no-model", "--modes", "single", "--skip",
                     "lean", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert rows and all("compiled" not in r["ms"] for r in rows)
    assert all(r["errors"]["compiled"].startswith("EagerFallback") for r in rows)
    assert all({"conv", "fused", "reference"} <= set(r["ms"]) for r in rows)


def test_precompile_failures_are_logged(tmp_path):
    from benchmarks.shapes import LayerShape

    bad = precompile.task(LayerShape(3, 8, 3, 1, 1, 8, 8), 1, "single", "float64", "fwd", "cpu")
    log_path = tmp_path / "precompile.log"
    lines = []
    assert precompile.precompile([bad], 1, lines.append, failure_log=str(log_path)) == 0
    text = log_path.read_text()
    assert "failed 3->8 k3 s1 @8 single float64 fwd: KeyError: 'float64'" in text
    assert any("precompile failures: 1" in line and str(log_path) in line for line in lines)


# --- Command line ---------------------------------------------------------------------------


def test_command_line_refuses_what_it_cannot_do(tmp_path, capsys):
    for bad in (["--repeats", "0"], ["--rotate", "0"], ["--model-repeats", "0"],
                ["--warmup", "-1"], ["--batch", "0"], ["--max-minutes", "-1"],
                ["--repeats", "two"]):
        with pytest.raises(SystemExit) as stop:
            run.parse_args(["--smoke"] + bad)
        assert stop.value.code == 2
        assert f"argument {bad[0]}" in capsys.readouterr().err
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        run.parse_args(["--smoke", "--json", str(existing)])
    assert "add --resume" in capsys.readouterr().err
    args, _ = run.parse_args(["--smoke", "--json", str(existing), "--resume"])
    assert args.resume


def test_help_names_every_preset_default(capsys):
    assert all(action.help for action in run.build_parser()._actions)
    with pytest.raises(SystemExit):
        run.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("presets: cpu 1, gpu 8, smoke 2", "presets: cpu 41, gpu 20, smoke 2",
                   "presets: cpu 11, gpu 20, smoke 2", "presets: cpu 256, gpu 256 512, smoke 16",
                   "cpu compiled, gpu none", "--retry-errors"):
        assert phrase in text


def test_the_stop_message_without_json_says_how_to_keep_rows(capsys):
    assert run.main(["--smoke", "--quiet", "--no-model", "--max-minutes", "0"]) == 0
    err = capsys.readouterr().err
    assert "None" not in err and "give --json FILE" in err


def test_environment_records_cudnn_flags_and_the_driver(monkeypatch):
    from benchmarks import timing

    env = timing.environment("cpu")
    for key in ("cudnn_benchmark", "cudnn_deterministic", "float32_matmul_precision"):
        assert key in env
    assert env["timing"] == timing.CPU_TIMING
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: nvidia-smi answers
    monkeypatch.setattr(timing.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(timing.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="550.54.15\n", stderr=""))
    assert timing.driver_version() == "550.54.15"
    monkeypatch.setattr(timing.shutil, "which", lambda name: None)
    assert timing.driver_version() is None


def test_cpu_environment_names_the_instruction_sets(tmp_path):
    """Two CPUs of one model name, with and without AMX, are told apart in the JSON and in
    the table's head."""
    from benchmarks import markdown, timing

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\n"
                    "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    isa = timing.cpu_isa(str(info))
    capability = torch.backends.cpu.get_cpu_capability()
    assert isa == f"{capability}; avx2 avx512f avx512_bf16 amx_bf16; no avx512_fp16"
    info.write_text("flags\t\t: fpu sse avx2\n")
    assert timing.cpu_isa(str(info)) == (
        f"{capability}; avx2; no avx512f avx512_bf16 avx512_fp16 amx_bf16")
    assert timing.cpu_isa(str(tmp_path / "absent")).startswith(f"{capability}; none of avx2")
    env = timing.environment("cpu")
    assert env["cpu_isa"] == timing.cpu_isa()
    assert f"[{env['cpu_isa']}]" in markdown.format_markdown([], env).splitlines()[0]
    assert f"[{env['cpu_isa']}]" in run.format_table([], env).splitlines()[0]


def test_bounds_read_the_shapes_a_run_recorded(tmp_path, capsys):
    """The smoke preset's shapes are in no UNet: bounds take each row's own shape."""
    from benchmarks import bounds

    path = tmp_path / "bench.json"
    assert run.main(["--smoke", "--quiet", "--no-model", "--modes", "single", "--skip", "lean",
                     "reference", "compiled", "--json", str(path)]) == 0
    capsys.readouterr()
    assert bounds.main(["--json", str(path), "--bandwidth", "100"]) == 0
    out = capsys.readouterr().out
    assert "| batch 2" in out
    assert sum(line.startswith("16 | ") for line in out.splitlines()) == len(run.SMOKE_SHAPES) * 2
    assert "fwd+bwd rows whose floor alone is over 1.15" in out


def test_profile_counts_each_kernel_once():
    """An operator's event on the CPU carries its kernels' device time: only the device's
    own events are summed."""
    from benchmarks.profile import device_time_us

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [types.SimpleNamespace(device_type=cpu, self_device_time_total=30.0),
              types.SimpleNamespace(device_type=cuda, self_device_time_total=20.0),
              types.SimpleNamespace(device_type=cuda, self_device_time_total=10.0)]
    assert device_time_us(events) == 30.0


# --- On a GPU (pytest -m gpu): the timer's CUDA path, in seconds -----------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_times_are_device_times_with_launches_hidden():
    """Tiny kernels issued slowly: the host takes far longer to issue them than the GPU to
    run them. The device time is the kernels' (events straight around the call would give
    the host's time instead)."""
    import statistics

    from benchmarks import timing

    x = torch.zeros(1, device="cuda")

    def slow_launches(arg):
        for _ in range(50):
            x.add_(1)
            until = time.perf_counter() + 20e-6  # 20 µs of host work per launch
            while time.perf_counter() < until:
                pass

    samples = timing.interleaved_samples({"slow": slow_launches}, [None], "cuda", warmup=2,
                                         repeats=5)
    device = statistics.median(samples.device_ms["slow"])
    host = statistics.median(samples.host_ms["slow"])
    assert host >= 50 * 20e-3 and samples.cover_ms > host
    assert 0 < device < 0.5 * host


@pytest.mark.gpu
@needs_cuda
def test_smoke_table_on_a_gpu_records_device_and_host_times(tmp_path):
    from benchmarks import timing

    path = tmp_path / "bench.json"
    assert run.main(["--smoke", "--quiet", "--device", "cuda", "--no-model", "--modes",
                     "single", "--skip", "compiled", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["environment"]["timing"] == timing.CUDA_TIMING
    assert data["environment"]["sleep_cycles_per_ms"] > 0
    for r in data["rows"]:
        assert "errors" not in r and set(r["ms"]) == {"conv", "fused", "reference", "lean"}
        assert set(r["host_ms"]) == set(r["ms"]) and r["cover_ms"] >= 1.0
        assert all(math.isfinite(v) and v > 0 for v in r["ms"].values())


# Last: it resets Dynamo, after which the tests above would compile their graphs again.
def test_dynamo_limits_allow_a_graph_per_row_and_an_eager_run_raises():
    from benchmarks.shapes import LayerShape

    cases._compiled_reference()
    config = torch._dynamo.config
    # The names torch 2.13 uses, else the older ones.
    per_code = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    assert getattr(config, per_code) >= cases.GRAPH_LIMIT
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            assert getattr(config, name) >= cases.GRAPH_LIMIT
    if hasattr(config, "fail_on_recompile_limit_hit"):
        assert config.fail_on_recompile_limit_hit

    def call(compiled, c_in):
        shape = LayerShape(c_in, 2, 3, 1, 1, 5, 5)
        (inputs,) = cases.make_inputs(shape, 1, "single", torch.float32, "cpu", 1)
        w, b = cases.make_params(shape, torch.float32, "cpu")
        return cases.forward_call(lambda *a: compiled(*a)[0], shape, w, b)(inputs)

    with pytest.raises(cases.EagerFallback):
        call(cases._reference_compiled_only, 1)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(cases._reference_compiled_only, dynamic=False)
        one_graph = {per_code: 1}
        if hasattr(config, "fail_on_recompile_limit_hit"):
            one_graph["fail_on_recompile_limit_hit"] = False  # the probe alone must catch it
        with torch._dynamo.config.patch(one_graph):
            call(compiled, 1)  # the one graph the limit allows
            with pytest.raises(cases.EagerFallback):
                call(compiled, 2)  # past it: Dynamo runs the function eagerly
    finally:
        torch._dynamo.reset()


def test_routes_time_both_routes_of_the_few_output_layers(tmp_path, capsys, monkeypatch):
    """benchmarks.routes finds the UNets' layers that take the CUDA op's direct kernels,
    runs each call on its route (the variable set for the call, then put back) and writes
    complete, finite rows."""
    import math
    import os

    from benchmarks import routes

    assert [s.label for s in routes.few_output_shapes([256, 512])] == [
        "67->3 k3 s1 @256", "64->3 k3 s1 @256", "67->3 k3 s1 @512", "64->3 k3 s1 @512"]
    seen = []
    monkeypatch.setenv(routes.ROUTE_VARIABLE, "1")
    for value in routes.ROUTES.values():
        routes._on_route(lambda _: seen.append(os.environ.get(routes.ROUTE_VARIABLE)), value)(None)
    assert seen == [None, "forward", "input_grad", "0"]
    assert os.environ[routes.ROUTE_VARIABLE] == "1"
    monkeypatch.delenv(routes.ROUTE_VARIABLE)

    path = tmp_path / "routes.json"
    layouts, interleaved = [], routes.timing.interleaved_samples

    def spy(calls, inputs, *args):
        x, m, _ = inputs[0]
        layouts.append((x.is_contiguous(memory_format=torch.channels_last),
                        m.is_contiguous(memory_format=torch.channels_last)))
        return interleaved(calls, inputs, *args)

    monkeypatch.setattr(routes.timing, "interleaved_samples", spy)
    saved = []
    monkeypatch.setattr(routes.os, "replace", lambda a, b: (saved.append(
        len(json.loads(pathlib.Path(a).read_text())["rows"])), os.rename(a, b)))
    assert routes.main(["--device", "cpu", "--sizes", "256", "--batch", "1", "--dtypes",
                        "float32", "--modes", "single", "--warmup", "1", "--repeats", "2",
                        "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert routes.HEADER in out and "both routes run the same code" in out
    rows = json.loads(path.read_text())["rows"]
    # Each shape in NCHW, then channels_last (inputs and weights), the file written after
    # each row.
    assert [(r["layer"], r["layout"], r["pass_"]) for r in rows] == [
        (layer, layout, pass_) for layer in ("67->3 k3 s1 @256", "64->3 k3 s1 @256")
        for layout in ("nchw", "channels_last") for pass_ in ("fwd", "fwd+bwd")]
    assert saved == list(range(1, 9))
    # [N, 1, H, W] masks count as both layouts.
    assert layouts == [(False, True), (False, True), (True, True), (True, True)] * 2
    for r in rows:
        timed = set(routes.PASS_ROUTES[r["pass_"]])
        assert set(r["ms"]) == {"conv"} | timed and set(r["vs_conv"]) == timed
        assert set(r["vs_cudnn"]) == timed - {"cudnn"}
        values = [*r["ms"].values(), *r["vs_conv"].values(), *r["vs_cudnn"].values()]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert routes.format_row(r) in out
    assert len(routes.PASS_ROUTES["fwd+bwd"]) == 4 and routes.PASS_ROUTES["fwd"] == ("direct", "cudnn")
    # Past --max-minutes no new group starts: here, none after the first.
    assert routes.main(["--device", "cpu", "--sizes", "256", "--batch", "1", "--dtypes",
                        "float32", "--modes", "single", "--layouts", "nchw", "--warmup", "1",
                        "--repeats", "1", "--max-minutes", "0", "--json", str(path)]) == 0
    assert "time limit reached: 0 rows measured" in capsys.readouterr().out
    for line in ("nchw fwd: direct / cuDNN route, geometric mean",
                 "channels_last fwd+bwd: input_grad / cuDNN route, geometric mean"):
        assert line in out


def test_routes_of_the_implicit_gemm(tmp_path, capsys):
    """``--igemm`` times the implicit-GEMM kernels (PCONV_CUDA_IGEMM: both, each, neither)
    against the cuDNN route for the UNet layers they take (3x3, unit stride, more than 4
    outputs), in the 16-bit dtypes by default, and writes complete, finite rows."""
    import math

    from benchmarks import routes

    labels = [s.label for s in routes.shapes_taking([256], routes.IGEMM)]
    assert "64->64 k3 s1 @256" in labels and "1024->512 k3 s1 @4" in labels
    assert not any(label.endswith(("k7 s2 @256", "k5 s2 @128")) or "->3 " in label
                   for label in labels)
    assert all(" k3 s1 " in label for label in labels)
    planes = [s.out_hw[0] * s.out_hw[1] * s.c_out for s in routes.shapes_taking([256], routes.IGEMM)]
    assert planes == sorted(planes, reverse=True)  # the largest outputs first
    seen = []
    routes._on_route(lambda _: seen.append(os.environ.get("PCONV_CUDA_IGEMM")), "1",
                     "PCONV_CUDA_IGEMM")(None)
    assert seen == ["1"] and "PCONV_CUDA_IGEMM" not in os.environ

    path = tmp_path / "igemm.json"
    assert routes.main(["--igemm", "--device", "cpu", "--sizes", "256", "--batch", "1",
                        "--modes", "single", "--layouts", "nchw", "--warmup", "1",
                        "--repeats", "1", "--max-minutes", "0.05", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert routes.IGEMM.header in out and "PCONV_CUDA_IGEMM" in out
    rows = json.loads(path.read_text())["rows"]
    assert rows and {r["dtype"] for r in rows} <= {"bfloat16", "float16"}
    for r in rows:
        timed = set(routes.IGEMM.pass_routes[r["pass_"]])
        assert set(r["ms"]) == {"conv"} | timed and set(r["vs_cudnn"]) == timed - {"cudnn"}
        values = [*r["ms"].values(), *r["vs_conv"].values(), *r["vs_cudnn"].values()]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert routes.format_row(r, routes.IGEMM) in out
    assert "nchw fwd: igemm / cuDNN route, geometric mean" in out
    assert routes.IGEMM.pass_routes["fwd+bwd"] == ("igemm", "forward", "input_grad", "cudnn")
