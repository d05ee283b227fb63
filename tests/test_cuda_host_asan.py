"""The host build of the CUDA sources under AddressSanitizer: the host's counterpart of
compute-sanitizer's memcheck.

test_cuda_host.py runs again in a process of its own, against a build instrumented by
AddressSanitizer, with the ASan runtime loaded first. The CPU tensors that the kernels read
and write there are separate allocations of exactly their size, so a kernel access past the
end of any of them (or before its start) aborts the run with a report naming the kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_host

HERE = Path(__file__).resolve().parent


def test_host_kernels_stay_inside_their_tensors():
    preload = cuda_host.asan_preload()
    if preload is None:
        pytest.skip("the host compiler has no AddressSanitizer runtime (libasan)")
    env = dict(os.environ, LD_PRELOAD=preload, PCONV_CUDA_HOST_ASAN="1",
               # Python and torch hold memory until exit by design: no leak report.
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "--capture=sys",
         str(HERE / "test_cuda_host.py")],
        env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=1200)
    report = proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "ERROR: AddressSanitizer" not in proc.stderr, report
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "failed" not in proc.stdout, report
