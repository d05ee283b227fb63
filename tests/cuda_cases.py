"""The configurations, inputs and checks of the CUDA op tests, shared by the tests on a GPU
(test_cuda.py) and by the tests of the host build of the CUDA sources (test_cuda_host.py).

The oracle is ``pconv_cuda.reference.partial_conv2d`` (shared/DESIGN.md, §1). Tolerances:
float64 to 1e-10 and float32 to 1e-5, both against the reference computed in float64 and
scaled by the magnitude of the expected tensor; float16/bfloat16 by the flash-attention
rule: the kernel's error against a float32 reference is at most twice the error of the
reference computed in that dtype, plus a small atol.
"""
from __future__ import annotations

import dataclasses
import random

import torch
from torch._prims_common import suggest_memory_format

from pconv_cuda import reference

CL = torch.channels_last


MASK_KINDS = ("binary", "soft", "holes", "zeros", "ones", "none")
LAYOUTS = ("nchw", "channels_last", "mixed", "noncontig")
# Besides those the random draw takes: "weight_cl", an NCHW input for a channels_last weight
# (the first layer of a model moved to channels_last, given NCHW images).


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


def make_cfg(n, cin, cout, h, w, k, s, p, d, g, mask, multi=False, mb1=False, bias=True,
         layout="nchw"):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return Cfg(n, cin, cout, h, w, pair(k), pair(s), pair(p), pair(d), g, mask, multi, mb1, bias,
               layout)


# Shapes the random draw may miss: depthwise, 1x1 output, C_out = 1, a dilation whose
# footprint exceeds shared memory (the unstaged mask path), rows longer than one chunk of
# the backward kernel, many pixels in channels_last, 8-aligned channels (vectorised paths).
EDGE_CONFIGS = [
    make_cfg(2, 8, 8, 9, 9, 3, 1, 1, 1, 8, "binary", multi=True),
    make_cfg(2, 8, 8, 9, 9, 3, 1, 1, 1, 8, "holes", layout="channels_last"),
    make_cfg(1, 3, 4, 3, 3, 3, 1, 0, 1, 1, "binary"),
    make_cfg(2, 3, 1, 7, 7, 3, 1, 1, 1, 1, "soft", layout="channels_last"),
    make_cfg(1, 2, 3, 24, 40, 3, 1, 95, 100, 1, "binary", multi=True),
    make_cfg(2, 3, 8, 72, 72, 3, 1, 1, 1, 1, "holes"),
    make_cfg(4, 8, 24, 20, 20, 3, 1, 1, 1, 1, "soft", mb1=True, layout="channels_last"),
    make_cfg(2, 16, 32, 16, 16, 3, 1, 1, 1, 1, "binary", layout="channels_last"),
    make_cfg(2, 16, 32, 16, 16, 4, 2, 1, 1, 1, "holes", multi=True),
    make_cfg(3, 4, 6, 11, 13, (2, 5), (2, 3), (0, 2), (1, 2), 2, "soft", multi=True, bias=False),
    make_cfg(2, 3, 64, 32, 32, 7, 2, 3, 1, 1, "holes", layout="mixed"),
    make_cfg(2, 6, 6, 10, 10, 3, 1, 1, 2, 3, "zeros", multi=True, layout="noncontig"),
    make_cfg(2, 8, 16, 12, 12, 3, 1, 1, 1, 1, "holes", layout="weight_cl"),
    make_cfg(2, 3, 64, 32, 32, 7, 2, 3, 1, 1, "binary", multi=True, layout="weight_cl"),
    make_cfg(2, 16, 24, 9, 9, 1, 2, 0, 1, 1, "soft", mb1=True, layout="weight_cl"),
]

# Layers the direct kernels for few output channels take (at most 4 outputs and 9 taps,
# groups 1): the UNets' last layer in small, stride and padding over k // 2, a 1x3 kernel
# with a row dilation and one soft mask over the batch, no mask, more pixels than the blocks of
# two multiprocessors hold (the grid-stride loop wraps) with more input channels than one
# chunk of the staged weight (341 in float32, 170 in float64), no bias with a
# channels_last weight.
FEW_OUTPUT_CONFIGS = [
    make_cfg(2, 5, 3, 11, 13, 3, 1, 1, 1, 1, "holes"),
    make_cfg(2, 4, 1, 9, 10, 3, 2, 2, 1, 1, "soft", multi=True, layout="channels_last"),
    make_cfg(3, 6, 2, 12, 9, (1, 3), (1, 2), (0, 1), (1, 2), 1, "soft", mb1=True,
             layout="mixed"),
    make_cfg(2, 3, 4, 8, 8, 3, 1, 1, 2, 1, "none", layout="noncontig"),
    make_cfg(1, 400, 4, 46, 46, 3, 1, 1, 1, 1, "holes", multi=True),
    make_cfg(2, 7, 3, 10, 10, 3, 1, 1, 1, 1, "zeros", bias=False, layout="weight_cl"),
    # Padding 2 (window columns outside on both sides, a last row of 3 of 4 pixels) and a
    # soft single-channel mask, whose products are rounded.
    make_cfg(2, 5, 2, 10, 13, 3, 1, 2, 1, 1, "soft", layout="channels_last"),
    # Two tiles of 16 x 64 outputs down and across, the second ones partial.
    make_cfg(1, 3, 3, 17, 70, 3, 1, 1, 1, 1, "binary", mb1=True),
]

# Layers the implicit-GEMM forward takes (PCONV_CUDA_IGEMM=1; 16-bit, 3x3, unit stride and
# dilation, more than 4 outputs, groups 1): a group and a half of 16 input channels and a
# second tile of outputs 8 wide, with partial tiles of 8 x 32 pixels; the RGB layer in
# channels_last with C_in-channel masks; padding 0, 8 outputs and a soft mask over the
# batch; channels_last with 24 channels (16-byte loads of x and of the mask), padding 2, no
# bias; no mask on a strided input; empty windows and a channels_last weight with an NCHW
# input; 5 outputs over three tiles across; an NCHW mask with a channels_last input.
IGEMM_CONFIGS = [
    make_cfg(2, 40, 72, 10, 37, 3, 1, 1, 1, 1, "holes"),
    make_cfg(2, 3, 64, 9, 33, 3, 1, 1, 1, 1, "binary", multi=True, layout="channels_last"),
    make_cfg(1, 16, 8, 8, 8, 3, 1, 0, 1, 1, "soft", mb1=True),
    make_cfg(2, 24, 20, 12, 40, 3, 1, 2, 1, 1, "holes", multi=True, layout="channels_last",
             bias=False),
    make_cfg(2, 8, 16, 12, 12, 3, 1, 1, 1, 1, "none", layout="noncontig"),
    make_cfg(2, 16, 24, 12, 12, 3, 1, 1, 1, 1, "zeros", layout="weight_cl"),
    make_cfg(1, 32, 5, 20, 70, 3, 1, 1, 1, 1, "binary", multi=True),
    make_cfg(2, 8, 12, 9, 11, 3, 1, 1, 1, 1, "soft", multi=True, layout="mixed"),
]

F64_CONFIGS = random_configs(1, 36) + EDGE_CONFIGS
F32_CONFIGS = random_configs(2, 36) + EDGE_CONFIGS
LOWP_CONFIGS = random_configs(3, 12) + EDGE_CONFIGS[:6] + [
    c for c in EDGE_CONFIGS if c.layout == "weight_cl"]
CPU_CONFIGS = random_configs(4, 12)


def make_mask(kind, shape, gen):
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


def apply_layout(t, layout, is_mask=False, is_weight=False):
    if t is None or layout == "nchw":
        return t
    if layout == "weight_cl":
        return t.contiguous(memory_format=CL) if is_weight else t
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
    m = make_mask(cfg.mask, mshape, gen)
    w = torch.randn(cfg.cout, cfg.cin // cfg.groups, *cfg.kernel, generator=gen,
                    dtype=torch.float64) * 0.3
    b = torch.randn(cfg.cout, generator=gen, dtype=torch.float64) if cfg.bias else None
    out_h = (cfg.h + 2 * cfg.padding[0] - cfg.dilation[0] * (cfg.kernel[0] - 1) - 1) // cfg.stride[0] + 1
    out_w = (cfg.w + 2 * cfg.padding[1] - cfg.dilation[1] * (cfg.kernel[1] - 1) - 1) // cfg.stride[1] + 1
    go = torch.randn(cfg.n, cfg.cout, out_h, out_w, generator=gen, dtype=torch.float64)
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x, m, w, b, go = map(conv, (x, m, w, b, go))
    x = apply_layout(x, cfg.layout)
    m = apply_layout(m, cfg.layout, is_mask=True)
    w = apply_layout(w, cfg.layout, is_weight=True)
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


def check_layouts(cfg, x, w, out, upd, gx):
    """The updated mask is [N, 1, H', W'] contiguous; the output has nn.Conv2d's layout
    (channels_last when the input or the weight is); the input gradient keeps the input's."""
    assert upd.shape == (cfg.n, 1, out.shape[2], out.shape[3])
    assert upd.is_contiguous()
    assert upd.dtype == x.dtype
    if CL in (suggest_memory_format(x), suggest_memory_format(w)):
        assert out.is_contiguous(memory_format=CL), "output must be channels_last, as nn.Conv2d's"
    else:
        assert out.is_contiguous(), "output must be NCHW, as nn.Conv2d's"
    if x.is_contiguous(memory_format=CL) and not x.is_contiguous():
        assert gx.is_contiguous(memory_format=CL), "grad_input must keep the input's channels_last"
    elif x.is_contiguous():
        assert gx.is_contiguous(), "grad_input must keep the input's NCHW"


LOWP_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def lowp_check(actual, ref_lowp, ref32, dtype, what):
    """Flash-attention rule: err(kernel) <= 2 * err(reference in dtype) + atol."""
    assert actual.dtype == dtype, (what, actual.dtype)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, ref32.abs().max().item()) if ref32.numel() else 1.0
    err = (actual.float() - ref32.float()).abs().max().item() if ref32.numel() else 0.0
    base = (ref_lowp.float() - ref32.float()).abs().max().item() if ref32.numel() else 0.0
    assert err <= 2 * base + LOWP_ATOL[dtype] * scale, (
        f"{what}: kernel error {err:.3g} vs reference-in-{dtype} error {base:.3g} (scale {scale:.3g})")


def assert_matches(result, expected, tol, update_tol=None):
    """(output, updated mask, gradients) within ``tol`` (``update_tol`` for the mask) of the
    expected triple, by :func:`assert_close_scaled`."""
    (out, upd, grads), (e_out, e_upd, e_grads) = result, expected
    assert_close_scaled(out, e_out, tol, "output")
    assert_close_scaled(upd, e_upd, tol if update_tol is None else update_tol, "updated mask")
    assert len(grads) == len(e_grads)
    for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), grads, e_grads):
        assert g.dtype == out.dtype, (name, g.dtype)
        assert_close_scaled(g, e, tol, name)


def assert_low_precision_matches(result, cfg, x, m, w, b, go):
    """``result`` (output, updated mask, gradients), computed in the inputs' 16-bit dtype, by
    :func:`lowp_check` against the reference in float32 and in that dtype; windows without a
    known pixel exactly zero (1e-8 underflows in float16)."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    r32 = run_with_grads(reference.partial_conv2d, cfg, f(x), f(m), f(w), f(b), f(go))
    rlow = run_with_grads(reference.partial_conv2d, cfg, x, m, w, b, go)
    out, upd, grads = result
    lowp_check(out, rlow[0], r32[0], x.dtype, "output")
    lowp_check(upd, rlow[1], r32[1], x.dtype, "updated mask")
    for name, g, gl, g32 in zip(("grad_input", "grad_weight", "grad_bias"), grads, rlow[2], r32[2]):
        lowp_check(g, gl, g32, x.dtype, name)
    hole = (r32[1] == 0).expand_as(out)
    assert (out[hole] == 0).all()
