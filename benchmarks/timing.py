"""Timers and memory probes that measure asynchronous work honestly.

CPU: ``time.perf_counter`` around each call. CUDA: device time, a pair of events around
each call on the current stream, read after a synchronise, with the start event queued
behind a GPU sleep so that the host's launches are hidden (see :func:`_time_cuda_call`);
the host's own time per call is kept beside it. Both take the median of many repeats after
a warm-up, and cycle through several input sets, a different one for every call, so caches
do not flatter a call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Mapping, Sequence

import torch

# The GPU sleep before each timed call lasts this many times the host's time to issue the
# slowest call of the row, within these bounds. At least 1 ms: the launches of one layer's
# forward and backward take a few hundred µs. At most 50 ms: a call that synchronises
# inside waits for the device whatever the sleep, and longer sleeps would only cost time.
LAUNCH_COVER_FACTOR = 1.5
LAUNCH_COVER_MIN_MS = 1.0
LAUNCH_COVER_MAX_MS = 50.0
FALLBACK_CYCLES_PER_MS = 2_000_000  # a 2 GHz SM clock, where torch reports none

# How a row's times were taken: recorded with every run, and part of the configuration a
# resumed run must share.
CUDA_TIMING = ("device time: CUDA events, launches hidden behind a GPU sleep; host_ms: "
               "the host's time to issue a call")
CPU_TIMING = "wall time: time.perf_counter around each call"


@dataclasses.dataclass
class Samples:
    """What :func:`interleaved_samples` measured. ``device_ms[name][i]`` and
    ``host_ms[name][i]`` come from repeat i (on the CPU the two are the same wall times);
    a call that raised is in ``errors`` instead, with none of its samples. ``cover_ms``:
    the GPU's sleep before each timed call (None on the CPU)."""

    device_ms: dict[str, list[float]]
    host_ms: dict[str, list[float]]
    errors: dict[str, str]
    cover_ms: float | None


def sleep_cycles_per_ms() -> int:
    """SM clock cycles per ms of the current CUDA device, for ``torch.cuda._sleep``: its
    peak clock where torch reports one (kHz, which is cycles per ms), so that a sleep lasts
    at least as long as asked; else a 2 GHz clock."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "clock_rate", 0) or FALLBACK_CYCLES_PER_MS)


def launch_cover_ms(host_ms: Sequence[float]) -> float:
    """The GPU sleep before each timed call of a row whose calls take ``host_ms`` each
    (their warm-up times) to issue: longer than the slowest, within the bounds above."""
    longest = max(host_ms, default=0.0)
    return min(LAUNCH_COVER_MAX_MS, max(LAUNCH_COVER_MIN_MS, LAUNCH_COVER_FACTOR * longest))


def _time_cuda_call(fn: Callable[[object], object], arg: object,
                    sleep_cycles: int) -> tuple[float, float]:
    """(device ms, host ms) of one call of ``fn(arg)``.

    Events recorded straight around the call would time the host: the GPU runs each
    kernel as soon as it is launched and then waits for the next launch, so at small
    shapes the interval is Python and dispatcher time. Here the GPU first sleeps for
    ``sleep_cycles``, longer than the host takes to issue the call; by the time the GPU
    reaches the start event the whole call is queued, and the events time its kernels back
    to back. The host time is read without a synchronise: the time to issue the call."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(sleep_cycles)
    start.record()
    t0 = time.perf_counter()
    fn(arg)
    host_ms = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end), host_ms


def _time_cpu_call(fn: Callable[[object], object], arg: object) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn(arg)
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms


def _warm_host_ms(fn: Callable[[object], object], arg: object, device: str) -> float:
    """One untimed call; on CUDA, the host's time to issue it from an idle queue (a full
    queue would make the host wait for the device)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(arg)
    return (time.perf_counter() - t0) * 1e3


def describe_error(error: Exception) -> str:
    """One line for a table: the exception's type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _rotated(names: list[str], i: int) -> list[str]:
    shift = i % len(names) if names else 0
    return names[shift:] + names[:shift]


def interleaved_samples(calls: Mapping[str, Callable[[object], object]],
                        inputs: Sequence[object], device: str, warmup: int, repeats: int,
                        record_errors: bool = False) -> Samples:
    """``repeats`` timed calls of each ``calls[name](input set)``, after ``warmup`` untimed
    rounds.

    The calls are interleaved: every repeat runs each of them once, in an order rotated
    from one repeat to the next, so a slow stretch of the machine (another process, clock
    changes, allocator state) lands on all of them alike rather than on whichever was being
    timed at that moment. Entry i of every list comes from repeat i, so the lists can be
    compared pairwise (:func:`paired_ratio`). Every call takes the next input set in turn,
    so no call finds the inputs of the one before it in cache (with more sets than calls,
    nor those of any call of the same repeat). With ``record_errors``, a call that raises
    is left out from then on and its error recorded; else the error propagates."""
    names = list(calls)
    errors: dict[str, str] = {}
    count = 0  # calls so far: the index of the next input set

    def run(name, timer):
        nonlocal count
        arg = inputs[count % len(inputs)]
        count += 1
        try:
            return timer(calls[name], arg)
        except Exception as e:  # the other implementations of the row are still timed
            if not record_errors:
                raise
            errors[name] = describe_error(e)
            return None

    warm: dict[str, float] = {}
    for _ in range(warmup):
        for name in [n for n in names if n not in errors]:
            host = run(name, functools.partial(_warm_host_ms, device=device))
            if host is not None:
                warm[name] = host
    cover_ms, timer = None, _time_cpu_call
    if device == "cuda":
        torch.cuda.synchronize()
        cover_ms = launch_cover_ms([warm[n] for n in warm if n not in errors])
        cycles = int(cover_ms * sleep_cycles_per_ms())
        timer = functools.partial(_time_cuda_call, sleep_cycles=cycles)
    device_ms: dict[str, list[float]] = {name: [] for name in names}
    host_ms: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in _rotated([n for n in names if n not in errors], i):
            times = run(name, timer)
            if times is not None:
                device_ms[name].append(times[0])
                host_ms[name].append(times[1])
    ok = [n for n in names if n not in errors]
    return Samples({n: device_ms[n] for n in ok}, {n: host_ms[n] for n in ok}, errors, cover_ms)


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over repeats of times[i] / base[i]: the ratio of two interleaved series.

    Each pair ran back to back, so a slow stretch of the machine cancels out of the ratio;
    the ratio of the two medians can instead pair a quiet stretch of one with a busy
    stretch of the other."""
    return statistics.median(t / b for t, b in zip(times, base))


def median_time_ms(fn: Callable[[object], object], inputs: Sequence[object], device: str,
                   warmup: int, repeats: int) -> float:
    """Median time in ms (device time on CUDA) of ``fn(input set)`` over ``repeats``
    calls, after ``warmup`` untimed calls."""
    samples = interleaved_samples({"fn": fn}, inputs, device, warmup, repeats)
    return statistics.median(samples.device_ms["fn"])


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 sent to /dev/null: Kineto prints two lines to it for every profile,
    whatever its log level, and the runner takes hundreds."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory in MB that ``fn()`` allocates above what was live before it, after one
    untimed call (so caches and scratch buffers are in their steady state).

    CUDA: the caching allocator's peak. CPU: the allocation and free events of the CPU
    allocator as the profiler records them (every tensor, inside compiled ops too), summed
    in time order."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                             profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process (no mmap for large blocks, no
    trimming), as jemalloc or tcmalloc would. Otherwise every multi-megabyte tensor is a
    fresh mapping whose first touch page-faults once per 4 KiB page: on small VMs that
    costs as much as a pass over the data, and how many faults a call takes depends on
    the heap's state, not on the code being timed. Applies to every implementation alike.
    Returns False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def environment(device: str) -> dict:
    """Versions and settings a reader needs to trust or reproduce a table."""
    info = {
        "kind": device,
        "device": (torch.cuda.get_device_name() if device == "cuda"
                   else _cpu_name() + f" ({torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        # Whether fp16 and bf16 matmuls may reduce in their own precision (cuBLAS).
        "fp16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "timing": CUDA_TIMING if device == "cuda" else CPU_TIMING,
    }
    if device == "cpu":
        info["cpu_isa"] = cpu_isa()
    if device == "cuda":
        info["driver"] = driver_version()
        info["sleep_cycles_per_ms"] = sleep_cycles_per_ms()
        info["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    return info


def driver_version() -> str | None:
    """The NVIDIA driver's version (NVML, else nvidia-smi), or None where neither answers;
    torch itself reports only the CUDA version it was built with."""
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pynvml shim warns that it is deprecated
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        lines = done.stdout.split()
        if done.returncode == 0 and lines:
            return lines[0]
    return None


def copy_bandwidth_gbs(megabytes: int = 1024, repeats: int = 10) -> float:
    """The CUDA device's copy rate in GB/s, bytes read plus bytes written (the median of
    ``repeats`` timed copies of ``megabytes`` of random bytes): the ceiling of a pass over
    memory, which ``benchmarks.bounds`` sets the op's own passes against."""
    def copy_ms():
        src = torch.randint(0, 256, (megabytes * 2**20,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return median_time_ms(lambda _: dst.copy_(src), [None], "cuda", 2, repeats)

    ms = copy_ms()
    torch.cuda.empty_cache()  # the 2 GB of the copy stay out of the rows' memory
    return 2 * megabytes * 2**20 / (ms * 1e-3) / 1e9


# The instruction-set extensions that decide which convolution kernels oneDNN and the op
# run: the same model name ("Intel(R) Xeon(R) Processor" on a VM) may come with or without
# AMX. Between two such VMs the plain bfloat16 convolutions of the CPU table took 2.5x as
# long without AMX (geometric mean), the float32 ones about the same.
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_isa(cpuinfo: str = "/proc/cpuinfo") -> str:
    """ATen's CPU capability and which of CPU_ISA_FLAGS the CPU has, e.g.
    ``"AVX512; avx2 avx512f avx512_bf16; no amx_bf16"``."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    have = [f for f in CPU_ISA_FLAGS if f in flags]
    lacking = [f for f in CPU_ISA_FLAGS if f not in flags]
    parts = [torch.backends.cpu.get_cpu_capability(), " ".join(have) or "none of " + " ".join(CPU_ISA_FLAGS)]
    if have and lacking:
        parts.append("no " + " ".join(lacking))
    return "; ".join(parts)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return "CPU"
