"""The ``torch.compile`` column's graphs, compiled ahead of the timings by parallel workers.

Every row of the compiled reference is its own static graph (one per shape, dtype, mask mode
and pass), and Inductor compiles them one at a time, seconds each: at the GPU preset's
hundreds of rows the compiles, not the timings, would take most of a run. Worker processes
compile disjoint sets of those graphs at once and leave them in Inductor's on-disk caches
(FX graph and AOTAutograd caches, shared through the cache directory), from which the
timing process then loads each graph in about a tenth of a second. A graph a worker fails
to compile is simply compiled again by the timing process, so this only ever saves time.

    python -m benchmarks.precompile TASKS.json    # a worker (run.py starts them)
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

from .shapes import LayerShape


def task(shape: LayerShape, batch: int, mode: str, dtype: str, pass_: str, device: str,
         weights: str = "nchw") -> dict:
    """One graph to compile: the compiled reference's call of one benchmark row."""
    return dict(shape=dataclasses.asdict(shape), batch=batch, mode=mode, dtype=dtype,
                pass_=pass_, device=device, weights=weights)


def default_jobs() -> int:
    """Workers for this machine: all cores but two (left to the system and the parent), at
    most 12; none where that leaves fewer than two (one worker saves no time)."""
    jobs = min(12, (os.cpu_count() or 2) - 2)
    return jobs if jobs >= 2 else 0


def precompile(tasks: list[dict], jobs: int, log: Callable[[str], None],
               out_of_time: Callable[[], bool] = lambda: False) -> int:
    """Compile ``tasks`` in ``jobs`` worker processes (round robin, so the first rows of the
    plan are ready first); returns how many compiled. Workers still running when
    ``out_of_time()`` turns true are stopped."""
    if not tasks or jobs < 1:
        return 0
    jobs = min(jobs, len(tasks))
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="pconv-precompile-") as tmp:
        workers = []
        for j in range(jobs):
            path = os.path.join(tmp, f"tasks{j}.json")
            with open(path, "w") as f:
                json.dump(tasks[j::jobs], f)
            env = dict(os.environ,
                       # Each worker compiles serially: the workers are the parallelism.
                       TORCHINDUCTOR_COMPILE_THREADS="1")
            done_path = path + ".done"
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.precompile", path, done_path],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            workers.append((proc, done_path))
        log(f"precompiling {len(tasks)} torch.compile graphs in {jobs} worker processes")
        last = 0.0
        while any(p.poll() is None for p, _ in workers):
            if out_of_time():
                for p, _ in workers:
                    p.kill()
                log("precompile stopped: out of time")
                break
            time.sleep(0.5)
            if time.time() - last >= 30:
                last = time.time()
                log(f"precompiled {_count(workers)}/{len(tasks)} graphs")
        for p, _ in workers:
            p.wait()
        compiled = _count(workers)
    log(f"precompiled {compiled}/{len(tasks)} graphs in {time.time() - start:.0f} s")
    return compiled


def _count(workers) -> int:
    total = 0
    for _, done_path in workers:
        if os.path.exists(done_path):
            with open(done_path) as f:
                total += sum(1 for line in f if line.strip() == "ok")
    return total


def _compile_one(t: dict) -> None:
    import torch

    from . import cases
    from .run import DTYPES

    shape = LayerShape(**t["shape"])
    dtype = DTYPES[t["dtype"]]
    (inputs,) = cases.make_inputs(shape, t["batch"], t["mode"], dtype, t["device"], 1)
    w, b = cases.make_params(shape, dtype, t["device"], weights=t["weights"])
    make_call = {"fwd": cases.forward_call, "fwd+bwd": cases.train_call}[t["pass_"]]
    make_call(cases.implementations(["compiled"])["compiled"], shape, w, b)(inputs)
    if t["device"] == "cuda":
        torch.cuda.synchronize()


def worker(tasks_path: str, done_path: str) -> int:
    """Compile every task in ``tasks_path``, writing ``ok`` or ``failed`` per task to
    ``done_path`` as it goes."""
    with open(tasks_path) as f:
        tasks = json.load(f)
    with open(done_path, "w") as done:
        for t in tasks:
            try:
                _compile_one(t)
                done.write("ok\n")
            except Exception as e:  # the timing process compiles it again and reports
                done.write(f"failed {type(e).__name__}: {e}\n".replace("\n", " ").strip() + "\n")
            done.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker(sys.argv[1], sys.argv[2]))
