"""Tests of the CUDA kernels of pconv (skipped where there is no CUDA device).

The configurations, inputs and tolerances are cuda_cases.py's (float32 with TF32 off). The
same kernels run without a GPU in test_cuda_host.py, through the host build.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

import pconv_cuda  # noqa: E402
from cuda_cases import (  # noqa: E402
    CL, CPU_CONFIGS, F32_CONFIGS, F64_CONFIGS, FEW_OUTPUT_CONFIGS, IGEMM_CONFIGS, LOWP_CONFIGS,
    assert_close_scaled,
    assert_low_precision_matches, assert_matches, check_layouts, expected_f64, make_cfg,
    make_inputs, run_with_grads)
from pconv_cuda import reference  # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 convolutions, so that float32 can be held to 1e-5."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def deterministic_cudnn():
    """For tests that compare two runs bit for bit: cuDNN's heuristics may pick a
    convolution algorithm that accumulates with atomics (several backward-data and
    backward-filter ones do), whose results vary from run to run."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = saved


# ----------------------------------------------------------------------------- parity


def test_cuda_kernels_registered():
    assert pconv_cuda.has_cuda_kernels(), (
        "pconv_cuda was built without its CUDA kernels on a machine with a GPU")


@pytest.mark.parametrize("cfg", F64_CONFIGS, ids=str)
def test_parity_float64(cfg):
    x, m, w, b, go = make_inputs(cfg, torch.float64, CUDA)
    out, upd, grads = run_with_grads(pconv_cuda.partial_conv2d, cfg, x, m, w, b, go)
    assert out.dtype == torch.float64
    assert_matches((out, upd, grads), expected_f64(cfg, x, m, w, b, go), 1e-10)
    check_layouts(cfg, x, w, out, upd, grads[0])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cfg", F32_CONFIGS, ids=str)
def test_parity_float32(cfg):
    x, m, w, b, go = make_inputs(cfg, torch.float32, CUDA)
    out, upd, grads = run_with_grads(pconv_cuda.partial_conv2d, cfg, x, m, w, b, go)
    assert out.dtype == torch.float32 and upd.dtype == torch.float32
    assert_matches((out, upd, grads), expected_f64(cfg, x, m, w, b, go), 1e-5, update_tol=1e-6)
    check_layouts(cfg, x, w, out, upd, grads[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", LOWP_CONFIGS, ids=str)
def test_parity_low_precision(cfg, dtype):
    x, m, w, b, go = make_inputs(cfg, dtype, CUDA)
    result = run_with_grads(pconv_cuda.partial_conv2d, cfg, x, m, w, b, go)
    assert_low_precision_matches(result, cfg, x, m, w, b, go)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_windows_are_zero_and_finite(dtype, layout):
    cfg = make_cfg(2, 8, 16, 24, 24, 3, 1, 1, 1, 1, "zeros", bias=True, layout=layout)
    x, _, w, b, go = make_inputs(cfg, dtype, CUDA)
    x = x * 100  # large features under the hole must not leak through
    m = torch.ones(2, 1, 24, 24, device=CUDA, dtype=dtype)
    m[:, :, 4:20, 4:20] = 0  # a hole larger than the 3x3 window
    m[1] = 0  # and one image with no known pixel at all
    out, upd, grads = run_with_grads(pconv_cuda.partial_conv2d, cfg, x, m, w, b, go)
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()
    hole = upd == 0
    assert hole[0, 0, 6:18, 6:18].all() and hole[1].all()
    assert (out[hole.expand_as(out)] == 0).all()
    assert (grads[0][1] == 0).all()  # the image with no known pixel gets no input gradient


@pytest.mark.parametrize("cfg", CPU_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_cuda_agreement(cfg, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    cpu = run_with_grads(pconv_cuda.partial_conv2d, cfg, *make_inputs(cfg, dtype, "cpu"))
    gpu = run_with_grads(pconv_cuda.partial_conv2d, cfg, *make_inputs(cfg, dtype, CUDA))
    assert_close_scaled(gpu[0].cpu(), cpu[0], tol, "output")
    assert_close_scaled(gpu[1].cpu(), cpu[1], tol, "updated mask")
    for name, g, c in zip(("grad_input", "grad_weight", "grad_bias"), gpu[2], cpu[2]):
        assert_close_scaled(g.cpu(), c, tol, name)
    for fmt in (torch.contiguous_format, CL):  # same layout (strides of size-1 dims aside)
        assert gpu[0].is_contiguous(memory_format=fmt) == cpu[0].is_contiguous(memory_format=fmt)
        assert gpu[2][0].is_contiguous(memory_format=fmt) == cpu[2][0].is_contiguous(memory_format=fmt)


# ------------------------------------------------------------------ op-level behaviour


def _op_args(cfg, dtype=torch.float32, requires_grad=False, seed=0):
    x, m, w, b, go = make_inputs(cfg, dtype, CUDA, seed)
    if requires_grad:
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        b = b.detach().requires_grad_() if b is not None else None
    return (x, m, w, b, list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups), go


def test_backward_output_mask_and_empty_grads(deterministic_cudnn):
    cfg = make_cfg(2, 4, 6, 9, 9, 3, 1, 1, 1, 2, "soft", multi=True)
    (x, m, w, b, *geo), go = _op_args(cfg)
    full = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, True, *geo, [True, True, True])
    for i in range(3):
        want = [j == i for j in range(3)]
        part = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, True, *geo, want)
        for j in range(3):
            if want[j]:
                torch.testing.assert_close(part[j], full[j], atol=0, rtol=0)
            else:
                assert part[j].shape == (0,)
    no_bias = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, False, *geo, [True, True, True])
    assert no_bias[2].shape == (0,)


def test_deterministic(deterministic_cudnn):
    """The bias gradient is reduced in two fixed-order stages (no atomics)."""
    cfg = make_cfg(4, 16, 32, 40, 40, 3, 1, 1, 1, 1, "soft", layout="channels_last")
    (x, m, w, b, *geo), go = _op_args(cfg)
    first = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
    db1 = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, True, *geo, [False, False, True])[2]
    for _ in range(3):
        again = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        db = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, True, *geo,
                                                     [False, False, True])[2]
        assert torch.equal(db, db1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_masking_that_sums_the_channels_gives_the_two_pass_bits(dtype, layout,
                                                                 deterministic_cudnn):
    """A multi-channel mask of x's layout takes the masking that also sums its channels; a
    mask of the same values in other strides takes the mask pass over the mask and a
    separate x * m. Every output of the training forward is the same bit for bit."""
    cfg = make_cfg(2, 16, 8, 24, 24, 3, 1, 1, 1, 1, "soft", multi=True, layout=layout)
    x, m, w, b, _ = make_inputs(cfg, dtype, CUDA)
    other = m.transpose(2, 3).contiguous().transpose(2, 3)
    assert other.stride() != m.stride() == x.stride()
    geo = (list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups)
    one_read = torch.ops.pconv.partial_conv2d_train(x, m, w, b, *geo)
    two_pass = torch.ops.pconv.partial_conv2d_train(x, other, w, b, *geo)
    for a, e in zip(one_read, two_pass):
        assert torch.equal(a, e)
    assert torch.equal(one_read[2], x * m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("cfg", FEW_OUTPUT_CONFIGS, ids=str)
def test_few_output_layers_direct_and_cudnn_agree(cfg, dtype, monkeypatch):
    """Layers with at most 4 outputs and 9 taps take the direct kernels for the forward and
    the input gradient (on tensor cores in 16-bit dtypes, for 3x3 layers of unit stride,
    from compute capability 8.0): they match the reference, and the cuDNN route
    (PCONV_CUDA_DIRECT=0) within rounding and in the same layouts; the training forward
    gives the inference output bit for bit."""
    x, m, w, b, go = make_inputs(cfg, dtype, CUDA)
    geo = (list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups)

    def run_ops():
        out, upd = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
        grads = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, b is not None, *geo,
                                                        [True, True, True])
        return out, upd, tuple(grads[:2]) + ((grads[2],) if b is not None else ())

    direct = run_ops()
    if m is not None:  # the training forward convolves its x * m with the same kernel
        train = torch.ops.pconv.partial_conv2d_train(x, m, w, b, *geo)
        assert torch.equal(train[0], direct[0]) and torch.equal(train[1], direct[1])
    monkeypatch.setenv("PCONV_CUDA_DIRECT", "0")
    cudnn = run_ops()
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5,
           torch.float64: 1e-12}[dtype]
    for name, d, c in zip(("output", "updated mask", "grad_input", "grad_weight", "grad_bias"),
                          direct[:2] + direct[2], cudnn[:2] + cudnn[2]):
        for layout in (torch.contiguous_format, CL):
            assert d.is_contiguous(memory_format=layout) == c.is_contiguous(memory_format=layout)
        assert_close_scaled(d, c, tol, name)
    if dtype in (torch.bfloat16, torch.float16):
        assert_low_precision_matches(direct, cfg, x, m, w, b, go)
    else:
        assert_matches(direct, expected_f64(cfg, x, m, w, b, go),
                       1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", IGEMM_CONFIGS, ids=str)
def test_implicit_gemm_and_cudnn_agree(cfg, dtype, monkeypatch):
    """With PCONV_CUDA_IGEMM=1, 16-bit 3x3 unit-stride layers with more than 4 outputs take
    the implicit-GEMM forward and input gradient on tensor cores (from compute capability
    8.0): they match the reference, and the cuDNN route within rounding and in the same
    layouts; the training forward gives the inference output bit for bit; a second call
    gives the same bits."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the implicit-GEMM kernels need compute capability 8.0")
    x, m, w, b, go = make_inputs(cfg, dtype, CUDA)
    geo = (list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups)

    def run_ops():
        out, upd = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
        grads = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, b is not None, *geo,
                                                        [True, True, True])
        return out, upd, tuple(grads[:2]) + ((grads[2],) if b is not None else ())

    monkeypatch.setenv("PCONV_CUDA_IGEMM", "1")
    igemm = run_ops()
    again = run_ops()
    assert torch.equal(again[0], igemm[0]) and torch.equal(again[2][0], igemm[2][0])
    if m is not None:
        train = torch.ops.pconv.partial_conv2d_train(x, m, w, b, *geo)
        assert torch.equal(train[0], igemm[0]) and torch.equal(train[1], igemm[1])
    assert_low_precision_matches(igemm, cfg, x, m, w, b, go)
    monkeypatch.setenv("PCONV_CUDA_IGEMM", "0")
    cudnn = run_ops()
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for name, d, c in zip(("output", "updated mask", "grad_input", "grad_weight", "grad_bias"),
                          igemm[:2] + igemm[2], cudnn[:2] + cudnn[2]):
        for layout in (torch.contiguous_format, CL):
            assert d.is_contiguous(memory_format=layout) == c.is_contiguous(memory_format=layout)
        assert_close_scaled(d, c, tol, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_implicit_gemm_at_a_unet_layer(dtype, monkeypatch):
    """The decoder's 192 -> 64 layer at 128 x 128, batch 2, channels_last (16-byte loads of
    x, the mask and g_raw) and NCHW: the implicit GEMM's output and input gradient match
    cuDNN's route within rounding."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the implicit-GEMM kernels need compute capability 8.0")
    for layout in ("nchw", "channels_last"):
        cfg = make_cfg(2, 192, 64, 128, 128, 3, 1, 1, 1, 1, "holes", multi=True, layout=layout)
        x, m, w, b, go = make_inputs(cfg, dtype, CUDA)
        geo = (list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups)
        results = {}
        for value in ("1", "0"):
            monkeypatch.setenv("PCONV_CUDA_IGEMM", value)
            out, _ = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
            dx = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, True, *geo,
                                                         [True, False, False])[0]
            results[value] = (out, dx)
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        for name, i, c in zip(("output", "grad_input"), results["1"], results["0"]):
            assert_close_scaled(i, c, tol, f"{layout} {name}")


@pytest.mark.parametrize("mask_batch", [0, 1])
def test_empty_batch(mask_batch):
    x = torch.randn(0, 3, 8, 8, device=CUDA)
    w = torch.randn(4, 3, 3, 3, device=CUDA)
    b = torch.randn(4, device=CUDA)
    m = torch.ones(mask_batch, 1, 8, 8, device=CUDA)
    out, upd = torch.ops.pconv.partial_conv2d(x, m, w, b, [1, 1], [1, 1], [1, 1], 1)
    assert out.shape == (0, 4, 8, 8) and upd.shape == (0, 1, 8, 8)
    go = torch.randn(0, 4, 8, 8, device=CUDA)
    gx, gw, gb = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, True, [1, 1], [1, 1],
                                                          [1, 1], 1, [True, True, True])
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (4,)
    assert (gw == 0).all() and (gb == 0).all()


def test_errors_name_the_argument():
    x = torch.randn(1, 3, 8, 8, device=CUDA)
    w = torch.randn(4, 3, 3, 3, device=CUDA)
    with pytest.raises(RuntimeError, match="mask"):
        pconv_cuda.partial_conv2d(x, torch.ones(1, 1, 8, 8), w)  # mask on the CPU
    with pytest.raises(RuntimeError, match="weight"):
        pconv_cuda.partial_conv2d(x, None, w.double())
    with pytest.raises(RuntimeError, match="mask"):
        pconv_cuda.partial_conv2d(x, torch.ones(1, 2, 8, 8, device=CUDA), w)


def test_current_stream_is_used(deterministic_cudnn):
    """Inputs written on a side stream after a long sleep: a kernel launched on another
    stream than the current one would read them before they are written."""
    cfg = make_cfg(2, 8, 16, 32, 32, 3, 1, 1, 1, 1, "holes", multi=True)
    (x_new, m_new, w, b, *geo), go = _op_args(cfg)
    expected = torch.ops.pconv.partial_conv2d(x_new, m_new, w, b, *geo)
    expected_grads = torch.ops.pconv.partial_conv2d_backward(go, x_new, m_new, w, True, *geo,
                                                              [True, True, True])
    x = torch.zeros_like(x_new)
    m = torch.zeros_like(m_new)
    g = torch.zeros_like(go)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.copy_(x_new)
        m.copy_(m_new)
        g.copy_(go)
        out, upd = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
        grads = torch.ops.pconv.partial_conv2d_backward(g, x, m, w, True, *geo,
                                                        [True, True, True])
    side.synchronize()
    torch.testing.assert_close(out, expected[0], atol=0, rtol=0)
    torch.testing.assert_close(upd, expected[1], atol=0, rtol=0)
    torch.testing.assert_close(grads[2], expected_grads[2], atol=0, rtol=0)
    torch.testing.assert_close(grads[0], expected_grads[0])
    torch.testing.assert_close(grads[1], expected_grads[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    cfg = make_cfg(2, 4, 8, 12, 12, 3, 1, 1, 1, 1, "soft")
    cpu = run_with_grads(pconv_cuda.partial_conv2d, cfg, *make_inputs(cfg, torch.float64, "cpu"))
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        gpu = run_with_grads(pconv_cuda.partial_conv2d, cfg,
                             *make_inputs(cfg, torch.float64, dev))
    assert gpu[0].device == dev and gpu[1].device == dev
    assert_close_scaled(gpu[0].cpu(), cpu[0], 1e-10, "output")
    for g, c in zip(gpu[2], cpu[2]):
        assert_close_scaled(g.cpu(), c, 1e-10, "grad")


# ----------------------------------------------------------------------- opcheck

OPCHECK_CONFIGS = [
    make_cfg(2, 4, 6, 9, 9, 3, 1, 1, 1, 1, "binary"),
    make_cfg(2, 4, 6, 9, 9, 3, 2, 1, 1, 2, "soft", multi=True, mb1=True, bias=False),
    make_cfg(1, 3, 8, 10, 10, 3, 1, 1, 1, 1, "none", layout="channels_last"),
    make_cfg(2, 3, 4, 8, 8, 5, 1, 2, 1, 1, "holes", layout="channels_last"),
]


@pytest.mark.parametrize("cfg", OPCHECK_CONFIGS, ids=str)
def test_opcheck_forward(cfg):
    args, _ = _op_args(cfg, requires_grad=True)
    torch.library.opcheck(torch.ops.pconv.partial_conv2d.default, args)


@pytest.mark.parametrize("cfg", OPCHECK_CONFIGS[:2] + OPCHECK_CONFIGS[3:], ids=str)
def test_opcheck_backward(cfg):
    (x, m, w, b, *geo), go = _op_args(cfg)
    args = (go, x, m, w, b is not None, *geo, [True, True, True])
    torch.library.opcheck(torch.ops.pconv.partial_conv2d_backward.default, args)


@pytest.mark.parametrize("cfg", [c for c in OPCHECK_CONFIGS if c.mask != "none"], ids=str)
def test_opcheck_train_pair(cfg):
    args, go = _op_args(cfg, requires_grad=True)
    torch.library.opcheck(torch.ops.pconv.partial_conv2d_train.default, args)
    x, m, w, b, *geo = (t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    _, _, xm, ratio, update = torch.ops.pconv.partial_conv2d_train(x, m, w, b, *geo)
    torch.testing.assert_close(xm, x * m, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.pconv.partial_conv2d_train_backward.default,
                          (go, xm, m, ratio, update, w, b is not None, *geo, [True, True, True]))


@pytest.mark.parametrize("cfg", F64_CONFIGS, ids=str)
def test_recomputing_op_parity_float64(cfg):
    """Autograd takes the training op when a weight gradient is wanted and a mask is
    given; partial_conv2d_backward (it forms x * m and the ratio again) must match as well,
    for all three gradients."""
    x, m, w, b, go = make_inputs(cfg, torch.float64, CUDA)
    geo = (list(_pair(cfg.stride)), list(_pair(cfg.padding)), list(_pair(cfg.dilation)),
           cfg.groups)
    out, _ = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
    grads = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, b is not None, *geo,
                                                    [True, True, True])
    e_out, e_upd, e_grads = expected_f64(cfg, x, m, w, b, go)
    assert_close_scaled(out, e_out, 1e-10, "output")
    for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), grads, e_grads):
        assert_close_scaled(g, e, 1e-10, name)


# ---------------------------------------------------------------- modules, compile, amp


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = pconv_cuda.PartialConv2d(3, 16, 5, stride=2, padding=2, return_mask=True)
        self.l2 = pconv_cuda.PartialConv2d(16, 16, 3, padding=1, return_mask=True)
        self.l3 = pconv_cuda.PartialConv2d(16, 8, 3, stride=2, padding=1, bias=False,
                                           return_mask=True)

    def forward(self, x, m):
        for layer in (self.l1, self.l2, self.l3):
            x, m = layer(x, m)
            x = F.relu(x)
        return x, m


def _holes_mask(n, h, w, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = (torch.rand(n, 1, h, w, generator=gen) > 0.3).float()
    m[:, :, h // 3: 2 * h // 3, w // 4: w // 2] = 0
    return m.to(device)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _Stack().to(CUDA)
    x = torch.randn(2, 3, 32, 32, device=CUDA)
    m = _holes_mask(2, 32, 32, CUDA)

    out, upd = model(x, m)
    out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True)
    c_out, c_upd = compiled(x, m)
    c_out.square().sum().backward()
    torch.testing.assert_close(c_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_upd, upd)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast(dtype):
    torch.manual_seed(0)
    layer = pconv_cuda.PartialConv2d(4, 8, 3, padding=1, return_mask=True).to(CUDA)
    x = torch.randn(2, 4, 16, 16, device=CUDA)
    m = _holes_mask(2, 16, 16, CUDA)
    ref_out, ref_upd = layer(x, m)
    with torch.autocast("cuda", dtype=dtype):
        out, upd = layer(x, m)
    assert out.dtype == dtype and upd.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    scale = max(1.0, ref_out.abs().max().item())
    torch.testing.assert_close(out.float(), ref_out.detach(), atol=tol * scale, rtol=tol)
    torch.testing.assert_close(upd.float(), ref_upd)
    out.float().square().mean().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    assert torch.isfinite(layer.bias.grad).all()


def _big_stack(cls):
    torch.manual_seed(0)
    return torch.nn.ModuleList([
        cls(3, 64, 7, stride=2, padding=3, return_mask=True),
        cls(64, 128, 5, stride=2, padding=2, return_mask=True),
        cls(128, 128, 3, padding=1, return_mask=True),
    ]).to(CUDA)


def _run_stack(layers, x, m):
    for layer in layers:
        x, m = layer(x, m)
        x = F.relu(x)
    return x, m


def test_large_batch_stack_forward_backward():
    """Batch 8 at 512x512 through 3->64 k7 s2, 64->128 k5 s2, 128->128 k3: finite, and equal
    to the reference layers with the same weights."""
    layers = _big_stack(pconv_cuda.PartialConv2d)
    ref_layers = _big_stack(pconv_cuda.ReferencePartialConv2d)
    ref_layers.load_state_dict(layers.state_dict())
    x = torch.randn(8, 3, 512, 512, device=CUDA)
    m = _holes_mask(8, 512, 512, CUDA)

    out, upd = _run_stack(layers, x, m)
    out.square().mean().backward()
    assert out.shape == (8, 128, 128, 128) and upd.shape == (8, 1, 128, 128)
    assert torch.isfinite(out).all()
    for p in layers.parameters():
        assert torch.isfinite(p.grad).all()

    r_out, r_upd = _run_stack(ref_layers, x, m)
    r_out.square().mean().backward()
    assert_close_scaled(out, r_out, 1e-4, "output")
    torch.testing.assert_close(upd, r_upd)
    for (name, p), rp in zip(layers.named_parameters(), ref_layers.parameters()):
        assert_close_scaled(p.grad, rp.grad, 1e-3, name)


def test_large_batch_stack_channels_last_autocast():
    layers = _big_stack(pconv_cuda.PartialConv2d).to(memory_format=CL)
    x = torch.randn(8, 3, 512, 512, device=CUDA).contiguous(memory_format=CL)
    m = _holes_mask(8, 512, 512, CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, upd = _run_stack(layers, x, m)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    for p in layers.parameters():
        assert torch.isfinite(p.grad).all()


def test_more_than_2_31_elements():
    """Output and gradients with more than 2**31 elements (64-bit indexing). A 1x1 kernel
    without padding makes every output row depend on the same input row only, so rows at
    the end of the tensor can be checked against the reference on a slice."""
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    n, cin, cout, h, w = 2, 3, 64, 4096, 4200
    assert n * cout * h * w > 2**31
    dtype = torch.float16
    gen = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(n, cin, h, w, device=CUDA, dtype=dtype, generator=gen)
    m = (torch.rand(n, 1, h, w, device=CUDA, generator=gen) > 0.5).to(dtype)
    wt = (torch.randn(cout, cin, 1, 1, device=CUDA, generator=gen) * 0.3).to(dtype)
    b = torch.randn(cout, device=CUDA, generator=gen).to(dtype)
    geo = ([1, 1], [0, 0], [1, 1], 1)
    out, upd = torch.ops.pconv.partial_conv2d(x, m, wt, b, *geo)
    rows = [slice(0, 4), slice(h // 2, h // 2 + 4), slice(h - 4, h)]
    for r in rows:
        e_out, e_upd = reference.partial_conv2d(x[:, :, r].float(), m[:, :, r].float(),
                                                wt.float(), b.float())
        torch.testing.assert_close(out[:, :, r].float(), e_out, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(upd[:, :, r].float(), e_upd)
    del out

    go = torch.randn(n, cout, h, w, device=CUDA, dtype=dtype, generator=gen)
    gx, gw, gb = torch.ops.pconv.partial_conv2d_backward(go, x, m, wt, True, *geo,
                                                          [True, True, True])
    assert torch.isfinite(gw).all()
    u = upd.float()
    e_gb = sum((go[i:i + 1].float() * u[i:i + 1]).sum(dim=(0, 2, 3)) for i in range(n))
    torch.testing.assert_close(gb.float(), e_gb, atol=1e-2 * e_gb.abs().max().item(), rtol=2e-3)
    for r in rows:
        xs = x[:, :, r].float().requires_grad_()
        e_out, _ = reference.partial_conv2d(xs, m[:, :, r].float(), wt.float(), b.float())
        (e_gx,) = torch.autograd.grad(e_out, xs, go[:, :, r].float())
        torch.testing.assert_close(gx[:, :, r].float(), e_gx, atol=2e-2, rtol=1e-2)
