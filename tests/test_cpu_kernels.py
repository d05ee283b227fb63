"""The CPU kernels of the first and last layers, which replace oneDNN and the separate
passes:

- the implicit GEMM (stride 1, up to 4 input channels, forward): window columns of x * m a
  tile at a time, a BLAS GEMM, the epilogue on the tile in cache;
- the direct convolution: the forward of layers with up to 4 outputs (the last layers) and
  of strided layers with up to 4 inputs (where AVX-512 is there, float32 and float64), and
  the first layers' input gradient. A run of pixels accumulates up to 4 output channels in
  registers; the band of x * m it reads is split into stride phases; a multi-channel mask
  per sample is summed over its channels there too, for r and u.

Which layers take them, and that they give the reference's values, gradients and stable
bits, in the direct convolution's AVX-512 body and in its generic one."""
import dataclasses

import pytest
import torch

import pconv_cuda
from pconv_cuda import reference

from conftest import Case, make_inputs, pass_names, run_tests_below_avx512

OP = torch.ops.pconv.partial_conv2d
TRAIN_OP = torch.ops.pconv.partial_conv2d_train
DIRECT_DX = "pconv::direct_input_grad"
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A family of layers and the kernel that takes their forward."""

    label: str  # in test ids
    range: str  # the kernel's profiler range
    low: tuple  # the dtypes below float64 it takes


IMPLICIT = Kernel("implicit_gemm", "pconv::implicit_gemm", (torch.float32,))
DIRECT = Kernel("direct_conv", "pconv::direct_conv", (torch.float32, torch.bfloat16, torch.float16))
# Strided first layers: 4 outputs a run, AVX-512 only.
STRIDED = Kernel("strided_direct_conv", "pconv::direct_conv", (torch.float32,))


def _geo(case):
    return list(case.stride), list(case.padding), list(case.dilation), case.groups


def _double(*tensors):
    return [None if t is None else t.double() for t in tensors]


# Kernels square, oblong, even and 1x1; padding none, "same", wider than the kernel and
# different per axis; dilation; masks binary, soft, all holes, absent, multi-channel and
# broadcast over the batch; planes narrower than the kernel's span, single rows, rows
# shorter and longer than the direct convolution's run of pixels (32 or 64 floats).
def _variants(c_in, c_out):
    """Stride-1 cases with input channels from c_in and output channels from c_out."""
    ci, co = c_in, c_out
    return [
        Case(2, ci[0], co[0], 13, 37, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2),
        Case(2, ci[1], co[1], 11, 70, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, "soft", True, 1),
        Case(1, ci[2], co[2], 10, 17, (5, 3), (1, 1), (2, 0), (1, 1), 1, True, "binary", True, 1),
        Case(3, ci[3], co[3], 9, 9, (7, 7), (1, 1), (3, 3), (1, 1), 1, True, "zeros", False, 3),
        Case(2, ci[4], co[4], 8, 12, (2, 4), (1, 1), (1, 2), (1, 1), 1, True, "none", False, 1),
        Case(2, ci[5], co[5], 12, 12, (3, 3), (1, 1), (2, 2), (2, 2), 1, True, "soft", False, 1),
        Case(1, ci[6], co[6], 9, 14, (3, 2), (1, 1), (0, 1), (1, 3), 1, False, "binary", True, 1),
        Case(2, ci[7], co[7], 6, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, "binary", True, 2),
        Case(1, ci[8], co[8], 2, 3, (3, 3), (1, 1), (4, 4), (1, 1), 1, True, "binary", False, 1),
        Case(2, ci[9], co[9], 1, 150, (1, 5), (1, 1), (0, 2), (1, 1), 1, True, "ones", True, 2),
    ]


# Strides 2 and 3, equal and per axis; the PConv UNet's 7x7 stride-2 first layer; with
# dilation, padding wider than the kernel, odd and single-column outputs, outputs wider
# than a run, all mask kinds and both mask modes.
def _strided_variants(c_in, c_out):
    """Strided cases with input channels from c_in and output channels from c_out."""
    ci, co = c_in, c_out
    return [
        Case(2, ci[0], co[0], 40, 45, (7, 7), (2, 2), (3, 3), (1, 1), 1, True, "binary", False, 2),
        Case(2, ci[1], co[1], 13, 37, (3, 3), (2, 1), (1, 1), (1, 1), 1, False, "soft", True, 1),
        Case(1, ci[2], co[2], 11, 150, (5, 3), (1, 2), (2, 1), (1, 1), 1, True, "binary", True, 1),
        Case(3, ci[3], co[3], 17, 19, (3, 3), (3, 3), (4, 2), (1, 1), 1, True, "zeros", False, 3),
        Case(2, ci[4], co[4], 14, 21, (4, 2), (2, 3), (1, 0), (1, 1), 1, True, "none", False, 1),
        Case(2, ci[5], co[5], 16, 20, (3, 3), (2, 2), (2, 2), (2, 2), 1, True, "ones", False, 1),
        Case(1, ci[6], co[6], 9, 4, (1, 1), (2, 2), (0, 0), (1, 1), 1, True, "binary", True, 1),
    ]


# The implicit GEMM: stride 1, up to 4 inputs and more than 8 outputs (8 or fewer run
# channels_last). The direct convolution: up to 4 outputs, any inputs and stride; or
# strided, up to 4 inputs, any outputs (not a multiple of 4 too).
CASES = {
    IMPLICIT: _variants([3, 3, 4, 1, 2, 3, 3, 4, 3, 3], [16, 12, 9, 10, 11, 9, 10, 13, 9, 16]),
    DIRECT: _variants([64, 67, 5, 6, 7, 9, 8, 16, 3, 12], [3, 3, 4, 1, 2, 3, 3, 2, 3, 4])
    + _strided_variants([64, 6, 5, 9, 7, 8, 12], [3, 4, 1, 2, 3, 4, 3]),
    STRIDED: _strided_variants([3, 4, 3, 1, 2, 3, 4], [64, 13, 5, 9, 6, 16, 7]),
}
ALL = [(k, c) for k, cases in CASES.items() for c in cases]
FEW = [(k, c) for k, cases in CASES.items() for c in cases[:4]] + [
    (DIRECT, c) for c in CASES[DIRECT][10:13]]


def _ids(rows):
    """Test ids of (kernel, case, ...) rows: the kernel's label, the case, the rest."""
    return ["-".join([r[0].label, r[1].ids(), *map(str, r[2:])]) for r in rows]


def _check_kernel(kernel):
    if kernel == IMPLICIT and not torch.backends.mkl.is_available():
        pytest.skip("the implicit GEMM needs the BLAS ATen was built with")
    if kernel == STRIDED and not AVX512:
        pytest.skip("strided first layers take the direct convolution with AVX-512 only")


@pytest.mark.parametrize("kernel,case", ALL, ids=_ids(ALL))
def test_kernel_matches_reference_float64(kernel, case):
    _check_kernel(kernel)
    x, m, w, b = make_inputs(case, torch.float64, seed=7, requires_grad=False)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert kernel.range in pass_names(run)
    y, u = run()
    y_ref, u_ref = reference.partial_conv2d(x, m, w, b, *_geo(case))
    assert y.is_contiguous() and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u, u_ref, rtol=0, atol=0)


LOW = [(k, c, d) for k, c in FEW for d in k.low]


@pytest.mark.parametrize("kernel,case,dtype", LOW, ids=_ids(LOW))
def test_kernel_matches_reference_in_lower_precision(kernel, case, dtype):
    """Against a float64 reference on the same (rounded) inputs: float32 to 1e-5, 16-bit
    types (the last layers' direct convolution) to their output rounding (the sums run in
    float32)."""
    _check_kernel(kernel)
    x, m, w, b = make_inputs(case, torch.float32, seed=8, requires_grad=False)
    x, w = x.to(dtype), w.to(dtype)
    m = None if m is None else m.to(dtype)
    b = None if b is None else b.to(dtype)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert kernel.range in pass_names(run)
    y, u = run()
    y_ref, u_ref = reference.partial_conv2d(*_double(x, m, w, b), *_geo(case))
    assert y.dtype == dtype and u.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    torch.testing.assert_close(u.double(), u_ref, rtol=0, atol=0)


TRAIN = [(k, c, d) for k in CASES for c in CASES[k][:3] for d in (torch.float64, torch.float32)]


@pytest.mark.parametrize("kernel,case,dtype", TRAIN, ids=_ids(TRAIN))
def test_training_forward_gives_the_inference_bits(kernel, case, dtype):
    """In float32 and float64 the training op takes the same kernel, reading the NCHW
    x * m it keeps for the backward, so it gives the inference bits."""
    _check_kernel(kernel)
    x, m, w, b = make_inputs(case, dtype, seed=9, requires_grad=False)
    assert kernel.range in pass_names(lambda: TRAIN_OP(x, m, w, b, *_geo(case)))
    out, update, xm, _, _ = TRAIN_OP(x, m, w, b, *_geo(case))
    y, u = OP(x, m, w, b, *_geo(case))
    assert torch.equal(out, y) and torch.equal(update, u)
    assert torch.equal(xm, x * m) and xm.is_contiguous()


# Small enough for gradcheck's numerical Jacobian.
GRAD = [
    (IMPLICIT, Case(1, 3, 9, 5, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 1)),
    (IMPLICIT, Case(2, 2, 10, 4, 6, (3, 2), (1, 1), (2, 0), (1, 2), 1, True, "soft", True, 1)),
    (DIRECT, Case(1, 6, 3, 5, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 1)),
    (DIRECT, Case(2, 3, 2, 4, 6, (3, 2), (1, 1), (2, 0), (1, 2), 1, True, "soft", True, 1)),
    (DIRECT, Case(1, 4, 1, 5, 5, (2, 2), (1, 1), (0, 1), (1, 1), 1, False, "none", False, 1)),
    (DIRECT, Case(1, 5, 2, 7, 6, (3, 3), (2, 1), (1, 1), (1, 1), 1, True, "binary", True, 1)),
    (STRIDED, Case(1, 3, 6, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, True, "binary", False, 1)),
    (STRIDED, Case(2, 2, 5, 7, 9, (4, 3), (1, 2), (2, 1), (2, 1), 1, True, "soft", True, 1)),
]


@pytest.mark.parametrize("kernel,case", GRAD, ids=_ids(GRAD))
def test_gradcheck_float64(kernel, case):
    """Every gradient of layers whose forward takes the kernels (the implicit GEMM's layers
    also take the direct input gradient; the direct convolution's backward runs
    channels_last from an NCHW x * m)."""
    _check_kernel(kernel)
    x, m, w, b = make_inputs(case, torch.float64, seed=9)
    assert kernel.range in pass_names(lambda: pconv_cuda.partial_conv2d(x, m, w, b, *_geo(case)))
    params = tuple(t for t in (x, w, b) if t is not None)

    def f(*p):
        return pconv_cuda.partial_conv2d(p[0], m, p[1], p[2] if b is not None else None,
                                         *_geo(case))[0]

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)


def test_bfloat16_training_keeps_channels_last_and_stays_close_to_inference():
    case = CASES[DIRECT][0]
    x, m, w, b = make_inputs(case, torch.bfloat16, seed=12, requires_grad=False)
    assert DIRECT.range not in pass_names(lambda: TRAIN_OP(x, m, w, b, *_geo(case)))
    out = TRAIN_OP(x, m, w, b, *_geo(case))[0]
    y = OP(x, m, w, b, *_geo(case))[0]
    y_ref, _ = reference.partial_conv2d(*_double(x, m, w, b), *_geo(case))
    scale = y_ref.abs().max().item()
    for got in (out, y):
        torch.testing.assert_close(got.double(), y_ref, rtol=1e-2, atol=1e-2 * scale)


# Many tiles or bands (and a last, shorter one).
LARGE = [(IMPLICIT, Case(2, 3, 64, 101, 67, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary",
                         False, 2)),
         (DIRECT, Case(2, 64, 3, 91, 67, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary",
                       False, 2)),
         (STRIDED, Case(2, 3, 64, 101, 67, (7, 7), (2, 2), (3, 3), (1, 1), 1, True, "binary",
                        True, 2))]


@pytest.mark.parametrize("kernel,case", LARGE, ids=_ids(LARGE))
def test_the_bits_do_not_depend_on_the_thread_count(kernel, case):
    _check_kernel(kernel)
    x, m, w, b = make_inputs(case, torch.float32, seed=10, requires_grad=False)
    assert kernel.range in pass_names(lambda: OP(x, m, w, b, *_geo(case)))
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


def test_direct_convolution_generic_body_below_avx512():
    """Below AVX-512 float32 takes the direct convolution's generic vector body: the last
    layers' lower-precision and thread-count tests must pass there too."""
    out = run_tests_below_avx512(
        __file__, "direct_conv and not strided and (lower_precision or thread_count)")
    expected = sum(r[0] == DIRECT for r in LOW) + sum(r[0] == DIRECT for r in LARGE)
    assert f"{expected} passed" in out


@pytest.mark.parametrize("case", CASES[STRIDED][:3], ids=[c.ids() for c in CASES[STRIDED][:3]])
def test_strided_first_layers_follow_the_cpu(case):
    """Strided first layers take the direct convolution where ATen runs AVX-512 and oneDNN
    below it (run so by the test after this one), with the reference's values in both."""
    x, m, w, b = make_inputs(case, torch.float64, seed=17, requires_grad=False)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert (STRIDED.range in pass_names(run)) == AVX512
    y_ref, _ = reference.partial_conv2d(x, m, w, b, *_geo(case))
    torch.testing.assert_close(run()[0], y_ref, rtol=1e-10, atol=1e-10)


def test_strided_first_layers_keep_onednn_below_avx512():
    out = run_tests_below_avx512(__file__, "follow_the_cpu")
    assert "3 passed" in out


ONEDNN = {
    IMPLICIT: {"channels": {"c_in": 5}, "groups": {"groups": 3, "c_out": 15},
               "few_outputs": {"c_out": 8}},
    DIRECT: {"outputs": {"c_out": 5}, "groups": {"groups": 2, "c_out": 4, "c_in": 64}},
    STRIDED: {"channels": {"c_in": 5}, "groups": {"groups": 2, "c_in": 4, "c_out": 8}},
}
KEEP = [(k, change, changes) for k in ONEDNN
        for change, changes in list(ONEDNN[k].items()) + [("channels_last", {}), ("strided_mask", {})]]


@pytest.mark.parametrize("kernel,change,changes", KEEP,
                         ids=[f"{k.label}-{c}" for k, c, _ in KEEP])
def test_other_layers_keep_onednn(kernel, change, changes):
    """Too many input (implicit GEMM, strided first layers) or output channels, groups, 8
    output channels or fewer for the implicit GEMM (they run channels_last), and inputs or
    masks that are not NCHW-contiguous take oneDNN, and still give the reference's values."""
    _check_kernel(kernel)
    case = dataclasses.replace(CASES[kernel][0], **changes)
    x, m, w, b = make_inputs(case, torch.float64, seed=11, requires_grad=False)
    if change == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if change == "strided_mask":
        m = m.transpose(2, 3).contiguous().transpose(2, 3)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert kernel.range not in pass_names(run)
    y, _ = run()
    y_ref, _ = reference.partial_conv2d(x, m, w, b, *_geo(case))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


def test_implicit_gemm_layers_take_the_direct_convolution_when_strided():
    """A stride on either axis sends an implicit GEMM layer to the direct convolution."""
    _check_kernel(STRIDED)
    for stride in [(2, 1), (1, 2)]:
        case = dataclasses.replace(CASES[IMPLICIT][0], stride=stride)
        x, m, w, b = make_inputs(case, torch.float64, seed=11, requires_grad=False)
        names = pass_names(lambda: OP(x, m, w, b, *_geo(case)))
        assert STRIDED.range in names and IMPLICIT.range not in names


@pytest.mark.parametrize("kernel", [IMPLICIT, STRIDED], ids=lambda k: k.label)
def test_first_layers_keep_onednn_in_bfloat16(kernel):
    """16-bit first layers convolve channels_last in oneDNN, faster on this path."""
    _check_kernel(kernel)
    case = CASES[kernel][0]
    x, m, w, b = make_inputs(case, torch.bfloat16, seed=11, requires_grad=False)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert kernel.range not in pass_names(run)
    y_ref, _ = reference.partial_conv2d(*_double(x, m, w, b), *_geo(case))
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(run()[0].double(), y_ref, rtol=2e-2, atol=2e-2 * scale)


# Multi-channel masks: many bands (and a last, shorter one), a stride and a dilation,
# soft values so that the sums' order shows in the bits.
RATIO = [
    Case(2, 64, 3, 91, 67, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "soft", True, 2),
    Case(1, 16, 4, 40, 33, (5, 3), (2, 1), (2, 1), (1, 2), 1, True, "soft", True, 1),
    Case(3, 9, 2, 23, 19, (3, 3), (1, 1), (2, 2), (2, 2), 1, False, "binary", True, 3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", RATIO, ids=[c.ids() for c in RATIO])
def test_direct_convolution_forms_the_ratio_of_multi_channel_masks(case, dtype):
    """A multi-channel mask per sample is read once: the direct convolution sums its
    channels over each band as it masks them and forms r and u there, with no mask pass.
    It gives the mask pass's bits: the training op, which takes the pass, gives the same
    output and updated mask."""
    x, m, w, b = make_inputs(case, dtype, seed=18, requires_grad=False)
    names = pass_names(lambda: OP(x, m, w, b, *_geo(case)))
    assert DIRECT.range in names and "pconv::mask_ratio" not in names
    y, u = OP(x, m, w, b, *_geo(case))
    out, update = TRAIN_OP(x, m, w, b, *_geo(case))[:2]
    assert torch.equal(y, out) and torch.equal(u, update)
    y_ref, u_ref = reference.partial_conv2d(*_double(x, m, w, b), *_geo(case))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    torch.testing.assert_close(u.double(), u_ref, rtol=tol, atol=tol)


def test_a_multi_channel_mask_shared_by_the_batch_keeps_the_mask_pass():
    """One mask for the whole batch has one plane of r and u, which the pass forms once."""
    case = dataclasses.replace(RATIO[0], mask_batch=1)
    x, m, w, b = make_inputs(case, torch.float64, seed=18, requires_grad=False)
    names = pass_names(lambda: OP(x, m, w, b, *_geo(case)))
    assert DIRECT.range in names and "pconv::mask_ratio" in names
    y_ref, _ = reference.partial_conv2d(x, m, w, b, *_geo(case))
    torch.testing.assert_close(OP(x, m, w, b, *_geo(case))[0], y_ref, rtol=1e-10, atol=1e-10)


# The first layers' input gradient: stride 1, up to 4 input channels, padding at most
# d (k - 1).
INPUT_GRAD = [
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
@pytest.mark.parametrize("case", INPUT_GRAD, ids=[c.ids() for c in INPUT_GRAD])
def test_first_layer_input_gradient_is_direct_and_exact(case, dtype):
    x, m, w, b = make_inputs(case, dtype, seed=13, requires_grad=False)
    y = OP(x, m, w, b, *_geo(case))[0]
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(14), dtype=dtype)
    assert DIRECT_DX in pass_names(lambda: _grads(pconv_cuda.partial_conv2d, x, m, w, b, go, case))
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
    base = INPUT_GRAD[0]
    case = {"padding": dataclasses.replace(base, padding=(3, 1)),
            "stride": dataclasses.replace(base, stride=(2, 2)),
            "channels": dataclasses.replace(base, c_in=5)}[change]
    x, m, w, b = make_inputs(case, torch.float64, seed=15, requires_grad=False)
    go = torch.randn(OP(x, m, w, b, *_geo(case))[0].shape, dtype=torch.float64)
    assert DIRECT_DX not in pass_names(
        lambda: _grads(pconv_cuda.partial_conv2d, x, m, w, b, go, case))
    got = _grads(pconv_cuda.partial_conv2d, x, m, w, b, go, case)
    want = _grads(reference.partial_conv2d, x, m, w, b, go, case)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", [IMPLICIT, DIRECT])
def test_very_wide_rows_keep_onednn(kernel):
    """Where one output row's window columns (implicit GEMM) or input band (direct
    convolution) would pass 16 MiB, a buffer each thread keeps, the layer takes oneDNN."""
    _check_kernel(kernel)
    if kernel == IMPLICIT:  # 4 x 31 x 31 taps x 1170 output columns x 4 bytes = 18 MB
        case = Case(1, 4, 16, 31, 1200, (31, 31), (1, 1), (0, 0), (1, 1), 1, True, "binary",
                    False, 1)
    else:  # 1024 channels x 3 rows x 1400+ columns x 4 bytes = 17 MB
        case = Case(1, 1024, 3, 3, 1400, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary",
                    False, 1)
    x, m, w, b = make_inputs(case, torch.float32, seed=16, requires_grad=False)
    run = lambda: OP(x, m, w, b, *_geo(case))
    assert kernel.range not in pass_names(run)
    narrower = dataclasses.replace(case, w=case.w // 2)
    xs, ms, ws, bs = make_inputs(narrower, torch.float32, seed=16, requires_grad=False)
    assert kernel.range in pass_names(lambda: OP(xs, ms, ws, bs, *_geo(narrower)))
    y_ref, _ = reference.partial_conv2d(*_double(x, m, w, b), *_geo(case))
    torch.testing.assert_close(run()[0].double(), y_ref, rtol=1e-4, atol=1e-3)
