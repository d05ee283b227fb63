"""The fused op against the reference (the oracle) on many random configurations,
forward and every gradient."""
import pytest
import torch

import pconv_cuda
from pconv_cuda import reference

from conftest import make_inputs, random_cases

CASES = random_cases(120, seed=1234)

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _run(fn, case, dtype, seed):
    x, m, w, b = make_inputs(case, dtype, seed=seed)
    out, update = fn(x, m, w, b, case.stride, case.padding, case.dilation, case.groups)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    params = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(out, params, grad_out)
    return out.detach(), update, grads


def _scale(t):
    # Renormalisation multiplies sums by up to kh*kw*C_m: compare relative to the magnitude.
    return max(1.0, t.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c.ids() for c in CASES])
def test_forward_and_gradients_match_reference(case, dtype):
    out, update, grads = _run(pconv_cuda.partial_conv2d, case, dtype, seed=7)
    ref_out, ref_update, ref_grads = _run(reference.partial_conv2d, case, dtype, seed=7)
    tol = TOL[dtype]
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert update.shape == (case.n, 1, *out.shape[2:])
    torch.testing.assert_close(update, ref_update, **tol)
    torch.testing.assert_close(out, ref_out, rtol=tol["rtol"], atol=tol["atol"] * _scale(ref_out))
    for got, want, name in zip(grads, ref_grads, ["input", "weight", "bias"]):
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * _scale(want),
                                   msg=lambda s: f"grad {name}: {s}")


def _recomputing_backward(x, m, w, b, stride, padding, dilation, groups):
    """Forward and the gradients of partial_conv2d_backward, the op that forms x * m and
    the ratio again (autograd reaches it for input-only gradients and mask-less layers)."""
    geo = (list(stride), list(padding), list(dilation), groups)
    out, update = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
    return out, update, lambda gy: torch.ops.pconv.partial_conv2d_backward(
        gy, x, m, w, b is not None, *geo, [True, True, True])


@pytest.mark.parametrize("case", CASES, ids=[c.ids() for c in CASES])
def test_recomputing_backward_matches_reference(case):
    """Autograd takes the training op whenever a weight gradient is wanted and a mask is
    given; the other backward op must agree as well, for all three gradients."""
    x, m, w, b = make_inputs(case, torch.float64, seed=7, requires_grad=False)
    with torch.no_grad():
        out, update, backward = _recomputing_backward(x, m, w, b, case.stride, case.padding,
                                                      case.dilation, case.groups)
    g = torch.Generator().manual_seed(8)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = [t for t in backward(grad_out) if t.numel() > 0]
    ref_out, ref_update, ref_grads = _run(reference.partial_conv2d, case, torch.float64, seed=7)
    tol = TOL[torch.float64]
    torch.testing.assert_close(update, ref_update, **tol)
    torch.testing.assert_close(out, ref_out, rtol=tol["rtol"], atol=tol["atol"] * _scale(ref_out))
    assert len(grads) == len(ref_grads)
    for got, want, name in zip(grads, ref_grads, ["input", "weight", "bias"]):
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * _scale(want),
                                   msg=lambda s: f"grad {name}: {s}")


def test_cases_cover_the_space():
    """The random configurations really span what the parity test claims."""
    assert {c.kernel[0] for c in CASES} == set(range(1, 8))
    assert {c.stride[0] for c in CASES} == {1, 2, 3}
    assert {c.mask_kind for c in CASES} == {"binary", "soft", "zeros", "ones", "none"}
    assert any(c.groups > 1 for c in CASES) and any(c.dilation != (1, 1) for c in CASES)
    assert any(c.multi_channel for c in CASES) and any(not c.multi_channel for c in CASES)
    assert any(c.mask_batch == 1 and c.n > 1 for c in CASES)
    assert any(c.h % 2 == 1 for c in CASES)
