"""Timers and memory probes that measure asynchronous work honestly.

CPU: ``time.perf_counter`` around each call. CUDA: a pair of events around each call on
the current stream, read after a synchronise. Both take the median of many repeats after a
warm-up, and rotate through several input sets so caches do not flatter a repeat.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Mapping, Sequence

import torch


def _time_once_ms(fn: Callable[[object], object], arg: object, device: str) -> float:
    if device == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(arg)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(arg)
    return (time.perf_counter() - t0) * 1e3


def interleaved_times_ms(calls: Mapping[str, Callable[[object], object]],
                        inputs: Sequence[object], device: str, warmup: int,
                        repeats: int) -> dict[str, list[float]]:
    """Wall times in ms of ``repeats`` calls of each ``calls[name](inputs[i % len(inputs)])``.

    The calls are interleaved: every repeat runs each of them once, in an order rotated
    from one repeat to the next, so a slow stretch of the machine (another process, clock
    changes, allocator state) lands on all of them alike rather than on whichever was being
    timed at that moment. ``warmup`` untimed rounds come first. Entry i of every list comes
    from repeat i, so the lists can be compared pairwise (:func:`paired_ratio`)."""
    names = list(calls)
    for i in range(warmup):
        for name in names:
            calls[name](inputs[i % len(inputs)])
    if device == "cuda":
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_time_once_ms(calls[name], inputs[i % len(inputs)], device))
    return times


def median_times_ms(calls: Mapping[str, Callable[[object], object]], inputs: Sequence[object],
                    device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median of :func:`interleaved_times_ms` for each call."""
    times = interleaved_times_ms(calls, inputs, device, warmup, repeats)
    return {name: statistics.median(v) for name, v in times.items()}


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over repeats of times[i] / base[i]: the ratio of two interleaved series.

    Each pair ran back to back, so a slow stretch of the machine cancels out of the ratio;
    the ratio of the two medians can instead pair a quiet stretch of one with a busy
    stretch of the other."""
    return statistics.median(t / b for t, b in zip(times, base))


def median_time_ms(fn: Callable[[object], object], inputs: Sequence[object], device: str,
                   warmup: int, repeats: int) -> float:
    """Median wall time in ms of ``fn(inputs[i % len(inputs)])`` over ``repeats`` calls,
    after ``warmup`` untimed calls."""
    return median_times_ms({"fn": fn}, inputs, device, warmup, repeats)["fn"]


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
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    if device == "cuda":
        info["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    return info


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


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return "CPU"
