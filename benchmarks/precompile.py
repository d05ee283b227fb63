"""The ``torch.compile`` column's graphs, compiled ahead of the timings by parallel workers.

Every row of the compiled reference is its own static graph (one per shape, dtype, mask mode
and pass), and Inductor compiles them one at a time, seconds each: at the GPU preset's
hundreds of rows the compiles, not the timings, would take most of a run. Worker processes
compile disjoint sets of those graphs at once and leave them in Inductor's on-disk caches
(FX graph and AOTAutograd caches, shared through the cache directory), from which the
timing process then loads each graph in about a tenth of a second. A graph a worker fails
to compile is simply compiled again by the timing process, so this only ever saves time;
why it failed goes to a log (``precompile(failure_log=...)``).

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
               out_of_time: Callable[[], bool] = lambda: False,
               failure_log: str | None = None) -> int:
    """Compile ``tasks`` in ``jobs`` worker processes (round robin, so the first rows of the
    plan are ready first); returns how many compiled. Workers still running when
    ``out_of_time()`` turns true are stopped. The graphs that failed, and the output of
    workers that failed as a whole, go to ``failure_log`` (appended to), so that a
    column compiled by the timing process instead says why."""
    if not tasks or jobs < 1:
        return 0
    jobs = min(jobs, len(tasks))
    start = time.time()
    stopped = False
    with tempfile.TemporaryDirectory(prefix="pconv-precompile-") as tmp:
        workers = [_start_worker(tasks[j::jobs], os.path.join(tmp, f"tasks{j}.json"))
                   for j in range(jobs)]
        log(f"precompiling {len(tasks)} torch.compile graphs in {jobs} worker processes")
        last = 0.0
        while any(w.proc.poll() is None for w in workers):
            if out_of_time():
                for w in workers:
                    w.proc.kill()
                stopped = True
                log("precompile stopped: out of time")
                break
            time.sleep(0.5)
            if time.time() - last >= 30:
                last = time.time()
                log(f"precompiled {_count(workers)}/{len(tasks)} graphs")
        for w in workers:
            w.proc.wait()
        compiled = _count(workers)
        failures = _failures(workers, stopped)
        for w in workers:
            w.output.close()
    log(f"precompiled {compiled}/{len(tasks)} graphs in {time.time() - start:.0f} s")
    if failures and failure_log:
        with open(failure_log, "a") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {len(tasks)} graphs\n")
            f.write("\n".join(failures) + "\n")
        log(f"precompile failures: {len(failures)} (the timing process compiles those graphs "
            f"again); see {failure_log}")
    return compiled


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    done_path: str  # a line per task: "ok" or "failed ..."
    output: object  # the file the worker's stdout and stderr go to


def _start_worker(tasks: list[dict], path: str) -> _Worker:
    with open(path, "w") as f:
        json.dump(tasks, f)
    # Each worker compiles serially: the workers are the parallelism.
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    output = open(path + ".log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.precompile", path, path + ".done"],
                            env=env, stdout=output, stderr=subprocess.STDOUT,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return _Worker(proc, path + ".done", output)


def _done_lines(worker: _Worker) -> list[str]:
    if not os.path.exists(worker.done_path):
        return []
    with open(worker.done_path) as f:
        return [line.strip() for line in f if line.strip()]


def _count(workers) -> int:
    return sum(line == "ok" for w in workers for line in _done_lines(w))


# The end of a failed worker's output kept in the failure log: the traceback's last lines.
OUTPUT_TAIL_CHARS = 4000


def _failures(workers, stopped: bool) -> list[str]:
    """The tasks that failed, and the output's end of each worker that exited with an error
    (one stopped for lack of time is not a failure)."""
    lines = []
    for w in workers:
        lines += [line for line in _done_lines(w) if line.startswith("failed")]
        if w.proc.returncode != 0 and not stopped:
            w.output.seek(0)
            tail = w.output.read()[-OUTPUT_TAIL_CHARS:]
            lines.append(f"worker exited with status {w.proc.returncode}; its output ends:\n{tail}")
    return lines


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


def _describe(t: dict) -> str:
    """The row of a task, for the failure log."""
    try:
        shape = LayerShape(**t["shape"]).label
    except (KeyError, TypeError):
        shape = "?"
    return f"{shape} {t.get('mode')} {t.get('dtype')} {t.get('pass_')}"


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
                what = f"{_describe(t)}: {type(e).__name__}: {e}".replace("\n", " ")
                done.write(f"failed {what}\n")
            done.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker(sys.argv[1], sys.argv[2]))
