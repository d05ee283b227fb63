"""Timers and memory probes that measure asynchronous work honestly.

CPU: ``time.perf_counter`` around each call. CUDA: a pair of events around each call on
the current stream, read after a synchronise. Both take the median of many repeats after a
warm-up, and rotate through several input sets so caches do not flatter a repeat.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Sequence

import torch


def median_time_ms(fn: Callable[[object], object], inputs: Sequence[object], device: str,
                   warmup: int, repeats: int) -> float:
    """Median wall time in ms of ``fn(inputs[i % len(inputs)])`` over ``repeats`` calls,
    after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for i in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def environment(device: str) -> dict:
    """Versions and settings a reader needs to trust or reproduce a table."""
    info = {
        "device": (torch.cuda.get_device_name() if device == "cuda"
                   else _cpu_name() + f" ({torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return "CPU"
