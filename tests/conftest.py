"""Shared helpers of the test suite: random inputs for the partial convolution."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch


@dataclasses.dataclass(frozen=True)
class Case:
    """One partial-convolution call: shapes, conv arguments and the kind of mask."""

    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    mask_kind: str  # "binary", "soft", "zeros", "ones", "none"
    multi_channel: bool
    mask_batch: int  # n or 1

    def ids(self) -> str:
        return (f"n{self.n}c{self.c_in}-{self.c_out}_{self.h}x{self.w}_k{self.kernel}"
                f"s{self.stride}p{self.padding}d{self.dilation}g{self.groups}"
                f"{'b' if self.bias else ''}_{self.mask_kind}{'M' if self.multi_channel else 'S'}"
                f"{self.mask_batch}")


def random_cases(count: int, seed: int) -> list[Case]:
    """Random valid configurations: kernel 1-7, stride 1-3, dilation 1-2, padding, groups,
    odd sizes, both mask modes, every mask kind, batch-broadcast masks."""
    rng = random.Random(seed)
    kinds = ["binary", "soft", "zeros", "ones", "none"]
    cases = []
    while len(cases) < count:
        kh = rng.randint(1, 7)
        kw = kh if rng.random() < 0.7 else rng.randint(1, 7)
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 2), rng.randint(1, 2)) if rng.random() < 0.4 else (1, 1)
        padding = (rng.randint(0, kh // 2 + 1), rng.randint(0, kw // 2 + 1))
        groups = rng.choice([1, 1, 1, 2, 3])
        c_in = groups * rng.randint(1, 3)
        c_out = groups * rng.randint(1, 3)
        h, w = rng.randint(3, 15), rng.randint(3, 15)
        span = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
        if h + 2 * padding[0] < span[0] or w + 2 * padding[1] < span[1]:
            continue
        n = rng.randint(1, 3)
        cases.append(Case(n, c_in, c_out, h, w, (kh, kw), stride, padding, dilation, groups,
                          rng.random() < 0.7, kinds[len(cases) % len(kinds)],
                          rng.random() < 0.5, rng.choice([n, 1])))
    return cases


def make_mask(kind: str, shape, dtype, generator: torch.Generator, device="cpu"):
    """A mask of ``shape`` (1 = known, 0 = hole): random binary, random soft in [0, 1],
    all zeros, all ones, or ``None`` for kind "none"."""
    if kind == "none":
        return None
    if kind == "binary":
        return (torch.rand(shape, generator=generator) > 0.4).to(dtype).to(device)
    if kind == "soft":
        m = torch.rand(shape, generator=generator)
        m[m < 0.3] = 0  # soft masks still have holes
        return m.to(dtype).to(device)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    raise ValueError(kind)


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    """(input, mask, weight, bias) for ``case``; random data, never zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c_in, case.h, case.w, generator=g, dtype=dtype)
    wt = torch.randn(case.c_out, case.c_in // case.groups, *case.kernel, generator=g, dtype=dtype)
    b = torch.randn(case.c_out, generator=g, dtype=dtype) if case.bias else None
    mc = case.c_in if case.multi_channel else 1
    m = make_mask(case.mask_kind, (case.mask_batch, mc, case.h, case.w), dtype, g, device)
    tensors = [t.to(device) if t is not None else None for t in (x, wt, b)]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    x, wt, b = tensors
    return x, m, wt, b


def pass_names(fn) -> set[str]:
    """Names of the profiler ranges recorded while ``fn()`` runs: the op's passes show
    there (``pconv::epilogue``, ``pconv::direct_conv``, ...), so a test can tell which path
    a call took."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def run_tests_below_avx512(test_file: str, select: str) -> str:
    """Runs the tests of ``test_file`` that ``-k select`` picks in a subprocess whose ATen
    is held below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as on a CPU without it), so that the
    op's narrower vector bodies run on an AVX-512 machine too; returns pytest's output
    after asserting that it passed. Skips on CPUs without AVX2."""
    import os
    import subprocess
    import sys

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs an x86-64 CPU with AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    check = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "AVX2"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", select],
        env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


TINY_MODEL = {"kind": "pconv", "layers": 3, "base_channels": 8}
"""The model of the application tests: randomly initialised, small enough for the CPU."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pconv-train checkpoint of :data:`TINY_MODEL` with seeded random weights."""
    from train.checkpoint import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"model_spec": TINY_MODEL,
                           "model": build_model(TINY_MODEL).state_dict()})
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the CI machine's two cores are shared, and the
    trainer tests compare in-process results bit for bit with subprocesses that run with
    OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
