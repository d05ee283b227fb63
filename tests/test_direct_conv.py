"""The CPU kernel that runs convolutions with at most 4 outputs directly (a band of x * m in
cache, every output channel of a run of pixels accumulated in registers, the epilogue on
the accumulators): the forward of the last layers and the input gradient of the first.
Which layers take it, and that it gives the reference's values, gradients and stable
bits, in its AVX-512 body and in the generic one."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import pconv_cuda
from pconv_cuda import reference

from conftest import Case, make_inputs

OP = torch.ops.pconv.partial_conv2d
TRAIN_OP = torch.ops.pconv.partial_conv2d_train
PASS = "pconv::direct_conv"


def _passes(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _geo(case):
    return list(case.stride), list(case.padding), list(case.dilation), case.groups


def _double(*tensors):
    return [None if t is None else t.double() for t in tensors]


# Stride 1, groups 1, 1 to 4 output channels: kernels square, oblong, even and 1x1;
# padding none, "same", wider than the kernel and different per axis; dilation; masks
# binary, soft, all holes, absent, multi-channel and broadcast over the batch; rows
# shorter and longer than a run of pixels (32 or 64 floats), a single row.
DIRECT_CASES = [
    Case(2, 64, 3, 13, 37, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2),
    Case(2, 67, 3, 11, 70, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "soft", True, 1),
    Case(1, 5, 4, 10, 17, (5, 3), (1, 1), (2, 0), (1, 1), 1, True, "binary", True, 1),
    Case(3, 6, 1, 9, 9, (7, 7), (1, 1), (3, 3), (1, 1), 1, True, "zeros", False, 3),
    Case(2, 7, 2, 8, 12, (2, 4), (1, 1), (1, 2), (1, 1), 1, True, "none", False, 1),
    Case(2, 9, 3, 12, 12, (3, 3), (1, 1), (2, 2), (2, 2), 1, False, "soft", False, 1),
    Case(1, 8, 3, 9, 14, (3, 2), (1, 1), (0, 1), (1, 3), 1, False, "binary", True, 1),
    Case(2, 16, 2, 6, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, "binary", True, 2),
    Case(1, 3, 3, 2, 3, (3, 3), (1, 1), (4, 4), (1, 1), 1, True, "binary", False, 1),
    Case(2, 12, 4, 1, 150, (1, 5), (1, 1), (0, 2), (1, 1), 1, True, "ones", True, 2),
]


@pytest.mark.parametrize("case", DIRECT_CASES, ids=[c.ids() for c in DIRECT_CASES])
def test_direct_conv_matches_reference_float64(case):
    x, m, w, b = make_inputs(case, torch.float64, seed=7, requires_grad=False)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert PASS in _passes(run)
    y, u = run()
    y_ref, u_ref = reference.partial_conv2d(x, m, w, b, *_geo(case))
    assert y.is_contiguous() and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u, u_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", DIRECT_CASES[:4], ids=[c.ids() for c in DIRECT_CASES[:4]])
def test_direct_conv_matches_reference_in_lower_precision(case, dtype):
    """Against a float64 reference on the same (rounded) inputs: float32 to 1e-5, 16-bit
    types to their output rounding (the sums run in float32)."""
    x, m, w, b = make_inputs(case, torch.float32, seed=8, requires_grad=False)
    x, w = x.to(dtype), w.to(dtype)
    m = None if m is None else m.to(dtype)
    b = None if b is None else b.to(dtype)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert PASS in _passes(run)
    y, u = run()
    y_ref, u_ref = reference.partial_conv2d(*_double(x, m, w, b), *_geo(case))
    assert y.dtype == dtype and u.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    torch.testing.assert_close(u.double(), u_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", DIRECT_CASES[:3], ids=[c.ids() for c in DIRECT_CASES[:3]])
def test_training_forward_gives_the_inference_bits(case, dtype):
    """In float32 and float64 the training op takes the same path (reading the NCHW x * m
    it keeps for the backward), so it gives the inference bits."""
    x, m, w, b = make_inputs(case, dtype, seed=9, requires_grad=False)
    assert PASS in _passes(lambda: TRAIN_OP(x, m, w, b, *_geo(case)))
    out, update, xm, _, _ = TRAIN_OP(x, m, w, b, *_geo(case))
    y, u = OP(x, m, w, b, *_geo(case))
    assert torch.equal(out, y) and torch.equal(update, u)
    assert torch.equal(xm, x * m) and xm.is_contiguous()


# Small enough for gradcheck's numerical Jacobian.
GRAD_CASES = [
    Case(1, 6, 3, 5, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 1),
    Case(2, 3, 2, 4, 6, (3, 2), (1, 1), (2, 0), (1, 2), 1, True, "soft", True, 1),
    Case(1, 4, 1, 5, 5, (2, 2), (1, 1), (0, 1), (1, 1), 1, False, "none", False, 1),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.ids() for c in GRAD_CASES])
def test_gradients_through_the_channels_last_backward(case):
    x, m, w, b = make_inputs(case, torch.float64, seed=9)
    assert PASS in _passes(lambda: pconv_cuda.partial_conv2d(x, m, w, b, *_geo(case)))
    params = tuple(t for t in (x, w, b) if t is not None)

    def f(*p):
        return pconv_cuda.partial_conv2d(p[0], m, p[1], p[2] if b is not None else None,
                                         *_geo(case))[0]

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)


def test_bfloat16_training_keeps_channels_last_and_stays_close_to_inference():
    case = DIRECT_CASES[0]
    x, m, w, b = make_inputs(case, torch.bfloat16, seed=12, requires_grad=False)
    assert PASS not in _passes(lambda: TRAIN_OP(x, m, w, b, *_geo(case)))
    out = TRAIN_OP(x, m, w, b, *_geo(case))[0]
    y = OP(x, m, w, b, *_geo(case))[0]
    y_ref, _ = reference.partial_conv2d(*_double(x, m, w, b), *_geo(case))
    scale = y_ref.abs().max().item()
    for got in (out, y):
        torch.testing.assert_close(got.double(), y_ref, rtol=1e-2, atol=1e-2 * scale)


def test_the_bits_do_not_depend_on_the_thread_count():
    """Many bands (and a last, shorter one) on two threads, the same on one thread."""
    case = Case(2, 64, 3, 91, 67, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2)
    x, m, w, b = make_inputs(case, torch.float32, seed=10, requires_grad=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = OP(x, m, w, b, *_geo(case))[0]
        torch.set_num_threads(1)
        one = OP(x, m, w, b, *_geo(case))[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many, one)
    y_ref, _ = reference.partial_conv2d(*_double(x, m, w, b), *_geo(case))
    torch.testing.assert_close(many.double(), y_ref, rtol=1e-5, atol=1e-4)


def test_generic_body_below_avx512():
    """With ATen held below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as on a CPU without it),
    float32 takes the generic vector body: the parity tests above must pass there too."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs an x86-64 CPU with AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    check = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "lower_precision or thread_count"],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert "13 passed" in check.stdout


BASE = DIRECT_CASES[0]


@pytest.mark.parametrize("change", ["stride", "outputs", "groups", "channels_last",
                                    "strided_mask"])
def test_other_layers_keep_onednn(change):
    """Strided layers, more than 4 output channels, groups and inputs or masks that are
    not NCHW-contiguous take the oneDNN convolution, and still give the reference's
    values."""
    case = {"stride": dataclasses.replace(BASE, stride=(1, 2)),
            "outputs": dataclasses.replace(BASE, c_out=5),
            "groups": dataclasses.replace(BASE, groups=2, c_out=4)}.get(change, BASE)
    x, m, w, b = make_inputs(case, torch.float64, seed=11, requires_grad=False)
    if change == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if change == "strided_mask":
        m = m.transpose(2, 3).contiguous().transpose(2, 3)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert PASS not in _passes(run)
    y, _ = run()
    y_ref, _ = reference.partial_conv2d(x, m, w, b, *_geo(case))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


# The first layers' input gradient, a convolution with few outputs, takes the same kernel:
# stride 1, up to 4 input channels, padding at most d (k - 1).
INPUT_GRAD_CASES = [
    Case(2, 3, 16, 13, 11, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2),
    Case(1, 4, 9, 10, 17, (5, 3), (1, 1), (2, 0), (1, 1), 1, True, "soft", True, 1),
    Case(2, 1, 12, 9, 9, (7, 7), (1, 1), (6, 6), (1, 1), 1, False, "binary", False, 1),
    Case(2, 2, 10, 12, 12, (3, 2), (1, 1), (0, 1), (2, 3), 1, True, "none", False, 1),
    Case(1, 3, 64, 20, 70, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", True, 1),
]


def _grads(fn, x, m, w, b, go, case):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    bias = leaves[2] if b is not None else None
    out = fn(leaves[0], m, leaves[1], bias, *_geo(case))[0]
    return torch.autograd.grad(out, leaves, go)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", INPUT_GRAD_CASES, ids=[c.ids() for c in INPUT_GRAD_CASES])
def test_first_layer_input_gradient_is_direct_and_exact(case, dtype):
    x, m, w, b = make_inputs(case, dtype, seed=13, requires_grad=False)
    y = OP(x, m, w, b, *_geo(case))[0]
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(14), dtype=dtype)
    names = _passes(lambda: _grads(pconv_cuda.partial_conv2d, x, m, w, b, go, case))
    assert "pconv::direct_input_grad" in names
    got = _grads(pconv_cuda.partial_conv2d, x, m, w, b, go, case)
    want = _grads(reference.partial_conv2d, *_double(x, m, w, b), go.double(), case)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()))
    if m is not None:  # holes get no gradient
        holes = (m == 0).expand_as(got[0])
        assert (got[0][holes] == 0).all()


@pytest.mark.parametrize("change", ["padding", "stride", "channels"])
def test_other_input_gradients_keep_onednn(change):
    """Padding over d (k - 1), strides and more than 4 input channels take oneDNN's
    input gradient, and still match the reference."""
    base = INPUT_GRAD_CASES[0]
    case = {"padding": dataclasses.replace(base, padding=(3, 1)),
            "stride": dataclasses.replace(base, stride=(2, 2)),
            "channels": dataclasses.replace(base, c_in=5)}[change]
    x, m, w, b = make_inputs(case, torch.float64, seed=15, requires_grad=False)
    go = torch.randn(OP(x, m, w, b, *_geo(case))[0].shape, dtype=torch.float64)
    assert "pconv::direct_input_grad" not in _passes(
        lambda: _grads(pconv_cuda.partial_conv2d, x, m, w, b, go, case))
    got = _grads(pconv_cuda.partial_conv2d, x, m, w, b, go, case)
    want = _grads(reference.partial_conv2d, x, m, w, b, go, case)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
