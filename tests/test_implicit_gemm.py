"""The CPU forward that runs layers with few input channels as an implicit GEMM (window
columns of x * m formed a tile at a time, BLAS, the epilogue on the tile in cache): which
layers take it, and that it gives the reference's values, gradients and stable bits."""
import pytest
import torch

import pconv_cuda
from pconv_cuda import reference

from conftest import Case, make_inputs

OP = torch.ops.pconv.partial_conv2d
TRAIN_OP = torch.ops.pconv.partial_conv2d_train
PASS = "pconv::implicit_gemm"

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(),
                                reason="the implicit GEMM needs the BLAS ATen was built with")


def _passes(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _geo(case):
    return list(case.stride), list(case.padding), list(case.dilation), case.groups


# Stride 1, groups 1, C_in <= 4, more than 8 output channels (fewer run channels_last):
# kernels square, oblong, even and 1x1; padding none, "same", wider than the kernel and
# different per axis; dilation; masks binary, soft, all holes, absent, multi-channel and
# broadcast over the batch; planes narrower than the kernel's span and a single row.
IMPLICIT_CASES = [
    Case(2, 3, 16, 13, 11, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2),
    Case(2, 3, 12, 13, 11, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, "soft", True, 1),
    Case(1, 4, 9, 10, 17, (5, 3), (1, 1), (2, 0), (1, 1), 1, True, "binary", True, 1),
    Case(3, 1, 10, 9, 9, (7, 7), (1, 1), (3, 3), (1, 1), 1, True, "zeros", False, 3),
    Case(2, 2, 11, 8, 12, (2, 4), (1, 1), (1, 2), (1, 1), 1, True, "none", False, 1),
    Case(2, 3, 9, 12, 12, (3, 3), (1, 1), (2, 2), (2, 2), 1, True, "soft", False, 1),
    Case(1, 3, 10, 9, 14, (3, 2), (1, 1), (0, 1), (1, 3), 1, False, "binary", True, 1),
    Case(2, 4, 13, 6, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, "binary", True, 2),
    Case(1, 3, 9, 2, 3, (3, 3), (1, 1), (4, 4), (1, 1), 1, True, "binary", False, 1),
    Case(2, 3, 16, 1, 20, (1, 5), (1, 1), (0, 2), (1, 1), 1, True, "ones", True, 2),
]


@pytest.mark.parametrize("case", IMPLICIT_CASES, ids=[c.ids() for c in IMPLICIT_CASES])
def test_implicit_gemm_matches_reference_float64(case):
    x, m, w, b = make_inputs(case, torch.float64, seed=7, requires_grad=False)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert PASS in _passes(run)
    y, u = run()
    y_ref, u_ref = reference.partial_conv2d(x, m, w, b, *_geo(case))
    assert y.is_contiguous() and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u, u_ref, rtol=0, atol=0)


@pytest.mark.parametrize("case", IMPLICIT_CASES[:4], ids=[c.ids() for c in IMPLICIT_CASES[:4]])
def test_implicit_gemm_matches_reference_float32(case):
    x, m, w, b = make_inputs(case, torch.float32, seed=8, requires_grad=False)
    y, _ = OP(x, m, w, b, *_geo(case))
    y_ref, _ = reference.partial_conv2d(x.double(), None if m is None else m.double(),
                                        w.double(), None if b is None else b.double(),
                                        *_geo(case))
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", IMPLICIT_CASES[:3], ids=[c.ids() for c in IMPLICIT_CASES[:3]])
def test_training_forward_gives_the_inference_bits_and_exact_gradients(case):
    """The training op takes the same path (reading the x * m it keeps for the backward),
    so training and inference give the same bits; its gradients pass gradcheck."""
    x, m, w, b = make_inputs(case, torch.float64, seed=9, requires_grad=False)
    assert PASS in _passes(lambda: TRAIN_OP(x, m, w, b, *_geo(case)))
    out, update, xm, _, _ = TRAIN_OP(x, m, w, b, *_geo(case))
    y, u = OP(x, m, w, b, *_geo(case))
    assert torch.equal(out, y) and torch.equal(update, u)
    assert torch.equal(xm, x * m) and xm.is_contiguous()

    x, m, w, b = make_inputs(case, torch.float64, seed=9)
    params = tuple(t for t in (x, w, b) if t is not None)

    def f(*p):
        return pconv_cuda.partial_conv2d(p[0], m, p[1], p[2] if b is not None else None,
                                         *_geo(case))[0]

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)


def test_the_bits_do_not_depend_on_the_thread_count():
    """Many tiles (and a last, shorter one) on two threads, the same on one thread."""
    case = Case(2, 3, 64, 101, 67, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2)
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
    y_ref, _ = reference.partial_conv2d(x, m, w, b, *_geo(case))
    torch.testing.assert_close(many, y_ref, rtol=1e-5, atol=1e-5)


BASE = IMPLICIT_CASES[0]


@pytest.mark.parametrize("change", ["stride", "channels", "groups", "few_outputs", "bfloat16",
                                    "channels_last", "strided_mask"])
def test_other_layers_keep_onednn(change):
    """Strided layers, more than 4 input channels, groups, 8 output channels or fewer (they
    run channels_last), 16-bit types and inputs or masks that are not NCHW-contiguous take
    the oneDNN convolution, and still give the reference's values."""
    import dataclasses
    dtype = torch.bfloat16 if change == "bfloat16" else torch.float64
    case = {"stride": dataclasses.replace(BASE, stride=(2, 1)),
            "channels": dataclasses.replace(BASE, c_in=5),
            "groups": dataclasses.replace(BASE, groups=3, c_out=15),
            "few_outputs": dataclasses.replace(BASE, c_out=8)}.get(change, BASE)
    x, m, w, b = make_inputs(case, dtype, seed=11, requires_grad=False)
    if change == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if change == "strided_mask":
        m = m.transpose(2, 3).contiguous().transpose(2, 3)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert PASS not in _passes(run)
    y, _ = run()
    y_ref, _ = reference.partial_conv2d(x.double(), m.double(), w.double(), b.double(),
                                        *_geo(case))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-10
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
