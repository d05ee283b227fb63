"""Tests of the CUDA kernels of pconv (skipped where there is no CUDA device).

The oracle is ``pconv_cuda.reference.partial_conv2d`` (shared/DESIGN.md, §1). Tolerances:
float64 to 1e-10 and float32 (TF32 off) to 1e-5, both against the reference computed in
float64 and scaled by the magnitude of the expected tensor; float16/bfloat16 by the
flash-attention rule: the kernel's error against a float32 reference is at most twice the
error of the reference computed in that dtype, plus a small atol.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

import pconv_cuda  # noqa: E402
from pconv_cuda import reference  # noqa: E402

CUDA = torch.device("cuda")
CL = torch.channels_last


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


# ------------------------------------------------------------------------------ configs

MASK_KINDS = ("binary", "soft", "holes", "zeros", "ones", "none")
LAYOUTS = ("nchw", "channels_last", "mixed", "noncontig")


@dataclasses.dataclass(frozen=True)
class Cfg:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    mask: str  # one of MASK_KINDS
    multi: bool  # mask with C_in channels (else 1)
    mask_batch1: bool  # one mask broadcast over the batch
    bias: bool
    layout: str  # one of LAYOUTS

    def __str__(self):
        return (f"n{self.n}_c{self.cin}-{self.cout}_{self.h}x{self.w}_k{self.kernel[0]}x{self.kernel[1]}"
                f"_s{self.stride[0]}{self.stride[1]}_p{self.padding[0]}{self.padding[1]}"
                f"_d{self.dilation[0]}{self.dilation[1]}_g{self.groups}_{self.mask}"
                f"{'_multi' if self.multi else ''}{'_mb1' if self.mask_batch1 else ''}"
                f"{'_bias' if self.bias else ''}_{self.layout}")

    def valid(self):
        return all(size + 2 * p >= d * (k - 1) + 1 for size, p, d, k in zip(
            (self.h, self.w), self.padding, self.dilation, self.kernel))


def random_configs(seed: int, count: int) -> list[Cfg]:
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        groups = rng.choice([1, 1, 1, 2, 3])
        kh = rng.randint(1, 7)
        cfg = Cfg(
            n=rng.randint(1, 3),
            cin=groups * rng.randint(1, 4),
            cout=groups * rng.randint(1, 4),
            h=rng.randint(5, 23),
            w=rng.randint(5, 23),
            kernel=(kh, rng.choice([kh, rng.randint(1, 7)])),
            stride=(rng.randint(1, 3), rng.randint(1, 3)),
            padding=(rng.randint(0, 3), rng.randint(0, 3)),
            dilation=(rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2])),
            groups=groups,
            mask=MASK_KINDS[len(configs) % len(MASK_KINDS)],
            multi=rng.random() < 0.4,
            mask_batch1=rng.random() < 0.3,
            bias=rng.random() < 0.7,
            layout=LAYOUTS[(len(configs) // len(MASK_KINDS)) % len(LAYOUTS)],
        )
        if cfg.valid():
            configs.append(cfg)
    return configs


def _cfg(n, cin, cout, h, w, k, s, p, d, g, mask, multi=False, mb1=False, bias=True,
         layout="nchw"):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return Cfg(n, cin, cout, h, w, pair(k), pair(s), pair(p), pair(d), g, mask, multi, mb1, bias,
               layout)


# Shapes the random draw may miss: depthwise, 1x1 output, C_out = 1, a dilation whose
# footprint exceeds shared memory (the unstaged mask path), rows longer than one chunk of
# the backward kernel, many pixels in channels_last, 8-aligned channels (vectorised paths).
EDGE_CONFIGS = [
    _cfg(2, 8, 8, 9, 9, 3, 1, 1, 1, 8, "binary", multi=True),
    _cfg(2, 8, 8, 9, 9, 3, 1, 1, 1, 8, "holes", layout="channels_last"),
    _cfg(1, 3, 4, 3, 3, 3, 1, 0, 1, 1, "binary"),
    _cfg(2, 3, 1, 7, 7, 3, 1, 1, 1, 1, "soft", layout="channels_last"),
    _cfg(1, 2, 3, 24, 40, 3, 1, 95, 100, 1, "binary", multi=True),
    _cfg(2, 3, 8, 72, 72, 3, 1, 1, 1, 1, "holes"),
    _cfg(4, 8, 24, 20, 20, 3, 1, 1, 1, 1, "soft", mb1=True, layout="channels_last"),
    _cfg(2, 16, 32, 16, 16, 3, 1, 1, 1, 1, "binary", layout="channels_last"),
    _cfg(2, 16, 32, 16, 16, 4, 2, 1, 1, 1, "holes", multi=True),
    _cfg(3, 4, 6, 11, 13, (2, 5), (2, 3), (0, 2), (1, 2), 2, "soft", multi=True, bias=False),
    _cfg(2, 3, 64, 32, 32, 7, 2, 3, 1, 1, "holes", layout="mixed"),
    _cfg(2, 6, 6, 10, 10, 3, 1, 1, 2, 3, "zeros", multi=True, layout="noncontig"),
]

F64_CONFIGS = random_configs(1, 36) + EDGE_CONFIGS
F32_CONFIGS = random_configs(2, 36) + EDGE_CONFIGS
LOWP_CONFIGS = random_configs(3, 12) + EDGE_CONFIGS[:6]
CPU_CONFIGS = random_configs(4, 12)


def _make_mask(kind, shape, gen):
    if kind == "none":
        return None
    if kind == "binary":
        return (torch.rand(shape, generator=gen) > 0.4).double()
    if kind == "soft":  # bilinear-upsampled masks look like this: values in (0, 1) and holes
        return torch.rand(shape, generator=gen, dtype=torch.float64) * (
            torch.rand(shape, generator=gen) > 0.3).double()
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.float64)
    if kind == "holes":  # one big hole: some windows see no known pixel
        m = (torch.rand(shape, generator=gen) > 0.2).double()
        h, w = shape[-2:]
        m[..., h // 4: 3 * h // 4 + 1, w // 4: 3 * w // 4 + 1] = 0
        return m
    raise ValueError(kind)


def _apply_layout(t, layout, is_mask=False):
    if t is None or layout == "nchw":
        return t
    if layout == "channels_last" or (layout == "mixed" and not is_mask):
        return t.contiguous(memory_format=CL)
    if layout == "noncontig":  # same values, permuted strides
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def make_inputs(cfg: Cfg, dtype, device, seed=0):
    """(x, mask, weight, bias, grad_out) with the same values whatever the device/dtype."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.n, cfg.cin, cfg.h, cfg.w, generator=gen, dtype=torch.float64)
    mshape = (1 if cfg.mask_batch1 else cfg.n, cfg.cin if cfg.multi else 1, cfg.h, cfg.w)
    m = _make_mask(cfg.mask, mshape, gen)
    w = torch.randn(cfg.cout, cfg.cin // cfg.groups, *cfg.kernel, generator=gen,
                    dtype=torch.float64) * 0.3
    b = torch.randn(cfg.cout, generator=gen, dtype=torch.float64) if cfg.bias else None
    out_h = (cfg.h + 2 * cfg.padding[0] - cfg.dilation[0] * (cfg.kernel[0] - 1) - 1) // cfg.stride[0] + 1
    out_w = (cfg.w + 2 * cfg.padding[1] - cfg.dilation[1] * (cfg.kernel[1] - 1) - 1) // cfg.stride[1] + 1
    go = torch.randn(cfg.n, cfg.cout, out_h, out_w, generator=gen, dtype=torch.float64)
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x, m, w, b, go = map(conv, (x, m, w, b, go))
    x = _apply_layout(x, cfg.layout)
    m = _apply_layout(m, cfg.layout, is_mask=True)
    w = _apply_layout(w, cfg.layout)
    if cfg.layout in ("channels_last", "mixed"):
        go = go.contiguous(memory_format=CL)
    return x, m, w, b, go


def run_with_grads(fn, cfg, x, m, w, b, go):
    """out, updated mask and the gradients (x, w[, b]) of <out, go>."""
    leaves = [x.detach().requires_grad_(), w.detach().requires_grad_()]
    if b is not None:
        leaves.append(b.detach().requires_grad_())
    out, upd = fn(leaves[0], m, leaves[1], leaves[2] if b is not None else None, cfg.stride,
                  cfg.padding, cfg.dilation, cfg.groups)
    grads = torch.autograd.grad(out, leaves, go)
    return out.detach(), upd.detach(), grads


def assert_close_scaled(actual, expected, tol, what=""):
    """|actual - expected| <= tol * max(1, max|expected|) + tol * |expected|."""
    actual = actual.detach().to(device=expected.device, dtype=torch.float64)
    expected = expected.detach().double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol,
                               msg=lambda msg: f"{what}: {msg}")


def expected_f64(cfg, x, m, w, b, go):
    """The reference, in float64 on the inputs' device."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return run_with_grads(reference.partial_conv2d, cfg, d(x), d(m), d(w), d(b), d(go))


def check_layouts(cfg, x, out, upd, gx):
    assert upd.shape == (cfg.n, 1, out.shape[2], out.shape[3])
    assert upd.is_contiguous()
    assert upd.dtype == x.dtype
    fmt = CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else None
    if fmt is not None:
        assert out.is_contiguous(memory_format=CL), "output must keep the input's channels_last"
        assert gx.is_contiguous(memory_format=CL), "grad_input must keep the input's channels_last"


# ----------------------------------------------------------------------------- parity


def test_cuda_kernels_registered():
    assert pconv_cuda.has_cuda_kernels(), (
        "pconv_cuda was built without its CUDA kernels on a machine with a GPU")


@pytest.mark.parametrize("cfg", F64_CONFIGS, ids=str)
def test_parity_float64(cfg):
    x, m, w, b, go = make_inputs(cfg, torch.float64, CUDA)
    out, upd, grads = run_with_grads(pconv_cuda.partial_conv2d, cfg, x, m, w, b, go)
    e_out, e_upd, e_grads = expected_f64(cfg, x, m, w, b, go)
    assert out.dtype == torch.float64
    assert_close_scaled(out, e_out, 1e-10, "output")
    assert_close_scaled(upd, e_upd, 1e-10, "updated mask")
    for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), grads, e_grads):
        assert_close_scaled(g, e, 1e-10, name)
    check_layouts(cfg, x, out, upd, grads[0])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cfg", F32_CONFIGS, ids=str)
def test_parity_float32(cfg):
    x, m, w, b, go = make_inputs(cfg, torch.float32, CUDA)
    out, upd, grads = run_with_grads(pconv_cuda.partial_conv2d, cfg, x, m, w, b, go)
    e_out, e_upd, e_grads = expected_f64(cfg, x, m, w, b, go)
    assert out.dtype == torch.float32 and upd.dtype == torch.float32
    assert_close_scaled(out, e_out, 1e-5, "output")
    assert_close_scaled(upd, e_upd, 1e-6, "updated mask")
    for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), grads, e_grads):
        assert g.dtype == torch.float32
        assert_close_scaled(g, e, 1e-5, name)
    check_layouts(cfg, x, out, upd, grads[0])


LOWP_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _lowp_check(actual, ref_lowp, ref32, dtype, what):
    """Flash-attention rule: err(kernel) <= 2 * err(reference in dtype) + atol."""
    assert actual.dtype == dtype, (what, actual.dtype)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, ref32.abs().max().item()) if ref32.numel() else 1.0
    err = (actual.float() - ref32.float()).abs().max().item() if ref32.numel() else 0.0
    base = (ref_lowp.float() - ref32.float()).abs().max().item() if ref32.numel() else 0.0
    assert err <= 2 * base + LOWP_ATOL[dtype] * scale, (
        f"{what}: kernel error {err:.3g} vs reference-in-{dtype} error {base:.3g} (scale {scale:.3g})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", LOWP_CONFIGS, ids=str)
def test_parity_low_precision(cfg, dtype):
    x, m, w, b, go = make_inputs(cfg, dtype, CUDA)
    out, upd, grads = run_with_grads(pconv_cuda.partial_conv2d, cfg, x, m, w, b, go)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    r32 = run_with_grads(reference.partial_conv2d, cfg, f(x), f(m), f(w), f(b), f(go))
    rlow = run_with_grads(reference.partial_conv2d, cfg, x, m, w, b, go)
    _lowp_check(out, rlow[0], r32[0], dtype, "output")
    _lowp_check(upd, rlow[1], r32[1], dtype, "updated mask")
    for name, g, gl, g32 in zip(("grad_input", "grad_weight", "grad_bias"), grads, rlow[2], r32[2]):
        _lowp_check(g, gl, g32, dtype, name)
    # Windows without a known pixel are exactly zero (1e-8 underflows in float16).
    hole = (r32[1] == 0).expand_as(out)
    assert (out[hole] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_windows_are_zero_and_finite(dtype, layout):
    cfg = _cfg(2, 8, 16, 24, 24, 3, 1, 1, 1, 1, "zeros", bias=True, layout=layout)
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
    cfg = _cfg(2, 4, 6, 9, 9, 3, 1, 1, 1, 2, "soft", multi=True)
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
    cfg = _cfg(4, 16, 32, 40, 40, 3, 1, 1, 1, 1, "soft", layout="channels_last")
    (x, m, w, b, *geo), go = _op_args(cfg)
    first = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
    db1 = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, True, *geo, [False, False, True])[2]
    for _ in range(3):
        again = torch.ops.pconv.partial_conv2d(x, m, w, b, *geo)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        db = torch.ops.pconv.partial_conv2d_backward(go, x, m, w, True, *geo,
                                                     [False, False, True])[2]
        assert torch.equal(db, db1)


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
    cfg = _cfg(2, 8, 16, 32, 32, 3, 1, 1, 1, 1, "holes", multi=True)
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
    cfg = _cfg(2, 4, 8, 12, 12, 3, 1, 1, 1, 1, "soft")
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
    _cfg(2, 4, 6, 9, 9, 3, 1, 1, 1, 1, "binary"),
    _cfg(2, 4, 6, 9, 9, 3, 2, 1, 1, 2, "soft", multi=True, mb1=True, bias=False),
    _cfg(1, 3, 8, 10, 10, 3, 1, 1, 1, 1, "none", layout="channels_last"),
    _cfg(2, 3, 4, 8, 8, 5, 1, 2, 1, 1, "holes", layout="channels_last"),
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
