"""The registered op: gradcheck, opcheck, torch.compile, autocast, layouts, edge cases."""

import os

import pytest
import torch
import torch.nn.functional as F

import pconv_cuda
from benchmarks.timing import peak_memory_mb
from pconv_cuda import reference

from conftest import Case, make_inputs, pass_names, random_cases, run_tests_below_avx512

OP = torch.ops.pconv.partial_conv2d


def _args(case):
    return case.stride, case.padding, case.dilation, case.groups


GRAD_CASES = random_cases(12, seed=99)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.ids() for c in GRAD_CASES])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_gradcheck_float64(case, impl):
    fn = pconv_cuda.partial_conv2d if impl == "op" else reference.partial_conv2d
    x, m, w, b = make_inputs(case, torch.float64, seed=3)
    params = tuple(t for t in (x, w, b) if t is not None)

    def f(*p):
        bias = p[2] if b is not None else None
        return fn(p[0], m, p[1], bias, *_args(case))[0]

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)


def _opcheck_samples():
    cases = [
        Case(2, 4, 6, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2),
        Case(2, 4, 4, 8, 8, (5, 3), (2, 1), (2, 1), (1, 2), 2, False, "soft", True, 1),
        Case(1, 3, 5, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1, True, "none", False, 1),
    ]
    for case in cases:
        x, m, w, b = make_inputs(case, torch.float32, seed=5)
        yield (x, m, w, b, list(case.stride), list(case.padding), list(case.dilation), case.groups)


@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=["single", "multi", "nomask"])
def test_opcheck(sample):
    torch.library.opcheck(OP, sample)


def test_opcheck_backward_op():
    case = Case(2, 4, 6, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2)
    x, m, w, b = make_inputs(case, torch.float32, seed=5, requires_grad=False)
    gy = torch.randn(2, 6, 9, 7)
    for output_mask in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(torch.ops.pconv.partial_conv2d_backward.default,
                              (gy, x, m, w, True, [1, 1], [1, 1], [1, 1], 1, output_mask))


class _Stack(torch.nn.Module):
    """A small encoder of partial convs passing masks along, like the UNet's."""

    def __init__(self):
        super().__init__()
        self.a = pconv_cuda.PartialConv2d(3, 8, 5, stride=2, padding=2, return_mask=True)
        self.b = pconv_cuda.PartialConv2d(8, 8, 3, padding=1, bias=False, return_mask=True)
        self.c = pconv_cuda.PartialConv2d(8, 4, 3, padding=1, multi_channel=True,
                                          return_mask=True)

    def forward(self, x, m):
        x, m = self.a(x, m)
        x, m = self.b(torch.relu(x), m)
        x, m = self.c(x, m.expand(-1, 8, -1, -1))
        return x, m


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = _Stack()
    x = torch.randn(2, 3, 16, 16)
    m = (torch.rand(2, 1, 16, 16) > 0.5).float()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, mask = compiled(x, m)
    ref_out, ref_mask = model(x, m)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mask, ref_mask)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_out.sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4)


def test_import_adds_the_fake_contract_to_the_compile_cache_tag(monkeypatch):
    """A tag already set stays in front; tagging again adds nothing."""
    from pconv_cuda import ops

    config = torch.compiler.config
    assert ops.FAKE_CONTRACT in config.cache_key_tag.split(";")
    monkeypatch.setattr(config, "cache_key_tag", "mine")
    ops._tag_compile_caches()
    assert config.cache_key_tag == "mine;" + ops.FAKE_CONTRACT
    ops._tag_compile_caches()
    assert config.cache_key_tag == "mine;" + ops.FAKE_CONTRACT


_CACHE_PROBE = """
import sys, torch, pconv_cuda
if sys.argv[1] == "untagged":  # as a build whose fakes predate the tag
    torch.compiler.config.cache_key_tag = ""
layer = pconv_cuda.PartialConv2d(8, 8, 3, padding=1, return_mask=True).to(
    memory_format=torch.channels_last)
with torch.no_grad():
    out, _ = torch.compile(layer, fullgraph=True)(torch.randn(1, 8, 10, 10),
                                                  torch.ones(1, 1, 10, 10))
counters = torch._dynamo.utils.counters["inductor"]
print(counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"], out.stride(1))
"""


def test_graphs_compiled_under_other_fakes_are_not_reused(tmp_path):
    """Inductor's on-disk cache keys a graph by its code alone; the contract tag keeps a
    graph compiled under other fake kernels (here: without the tag) from being loaded."""
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path),
               TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)

    def run(mode):
        done = subprocess.run([sys.executable, "-c", _CACHE_PROBE, mode], env=env, check=True,
                              capture_output=True, text=True)
        return [int(v) for v in done.stdout.split()]

    assert run("untagged")[:2] == [0, 1]
    hits, misses, channel_stride = run("tagged")
    assert (hits, misses) == (0, 1)  # the untagged graph was not taken
    assert channel_stride == 1  # channels_last output, as nn.Conv2d's
    assert run("tagged")[:2] == [1, 0]  # and the tagged one is


def test_autocast_cpu_runs_in_bfloat16_with_float32_ratio():
    case = Case(2, 8, 16, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2)
    x, m, w, b = make_inputs(case, torch.float32, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, update = pconv_cuda.partial_conv2d(x, m, w, b, 1, 1)
    assert out.dtype == torch.bfloat16 and update.dtype == torch.bfloat16
    ref, _ = reference.partial_conv2d(x, m, w, b, 1, 1)
    # Error of the fused op against float32 at most ~2x that of the reference run in bf16.
    ref_bf16, _ = reference.partial_conv2d(x.bfloat16(), m.bfloat16(), w.bfloat16(),
                                           b.bfloat16(), 1, 1)
    err = (out.float() - ref).abs().max()
    err_ref = (ref_bf16.float() - ref).abs().max()
    assert err <= 2 * err_ref + 1e-2, (err, err_ref)
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_autocast_cpu_follows_conv2d_policy():
    """As nn.Conv2d under autocast, float64 stays float64; a float16 region works as well
    as a bfloat16 one (the dtype is read when the op runs)."""
    x64 = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    w64 = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    m64 = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = pconv_cuda.partial_conv2d(x64, m64, w64, None, 1, 1)
        conv = torch.nn.functional.conv2d(x64, w64, None, 1, 1)
    assert out.dtype == conv.dtype == torch.float64
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out, update = pconv_cuda.partial_conv2d(x, m64.float(), w, None, 1, 1)
    assert out.dtype == update.dtype == torch.float16
    ref, _ = reference.partial_conv2d(x, m64.float(), w, None, 1, 1)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_empty_windows_give_zero_not_nan(dtype):
    x = torch.randn(2, 4, 12, 12, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(5, dtype=dtype, requires_grad=True)
    m = torch.ones(2, 1, 12, 12, dtype=dtype)
    m[:, :, 2:9, 2:9] = 0  # a hole wider than the kernel: windows inside see no known pixel
    out, update = pconv_cuda.partial_conv2d(x, m, w, b, 1, 1)
    assert torch.isfinite(out).all()
    assert (out[:, :, 4:7, 4:7] == 0).all() and (update[:, :, 4:7, 4:7] == 0).all()
    assert (update[:, :, 0, 0] == 1).all()
    out.float().sum().backward()
    for t in (x, w, b):
        assert torch.isfinite(t.grad).all()
    assert (x.grad[:, :, 2:9, 2:9] == 0).all()  # no gradient into holes


def test_all_ones_mask_renormalises_the_border():
    """Partial-convolution padding: border windows see fewer pixels and are scaled up."""
    x = torch.ones(1, 1, 6, 6)
    w = torch.ones(1, 1, 3, 3)
    out, update = pconv_cuda.partial_conv2d(x, None, w, None, 1, 1)
    torch.testing.assert_close(out, torch.full_like(out, 9.0))  # every window renormalised to 9
    assert (update == 1).all()
    plain = F.conv2d(x, w, padding=1)
    assert plain[0, 0, 0, 0] == 4 and out[0, 0, 0, 0] == 9


def test_maskless_equals_all_ones_mask():
    case = Case(2, 3, 4, 9, 10, (5, 5), (2, 2), (2, 2), (1, 1), 1, True, "none", False, 1)
    x, _, w, b = make_inputs(case, torch.float64, seed=2, requires_grad=False)
    out_none, upd_none = pconv_cuda.partial_conv2d(x, None, w, b, 2, 2)
    ones = torch.ones(2, 1, 9, 10, dtype=torch.float64)
    out_ones, upd_ones = pconv_cuda.partial_conv2d(x, ones, w, b, 2, 2)
    torch.testing.assert_close(out_none, out_ones, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(upd_none, upd_ones)


def _all_grads(x, m, w, b, **kw):
    out, update = pconv_cuda.partial_conv2d(x, m, w, b, **kw)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    return out, update, gx, gw, gb


@pytest.mark.parametrize("c_in", [1, 3, 16])
def test_channels_last_and_non_contiguous_inputs(c_in):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, c_in, 11, 13, dtype=torch.float64, generator=g)
    m = (torch.rand(2, c_in, 11, 13, generator=g) > 0.3).double()
    w = torch.randn(6, c_in, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    kw = dict(stride=2, padding=1)
    x = base.clone().requires_grad_(True)
    want = _all_grads(x, m, w, b, **kw)

    x_cl = base.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    got = _all_grads(x_cl, m.contiguous(memory_format=torch.channels_last), w, b, **kw)
    if c_in > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[2].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)

    # Non-contiguous: a transposed view of the spatial dims and a strided mask.
    wide = torch.randn(2, c_in, 13, 11, dtype=torch.float64, generator=g)
    x_t = base.detach().clone()
    x_nc = wide.transpose(2, 3).copy_(x_t).requires_grad_(True)
    assert not x_nc.is_contiguous()
    m_nc = torch.zeros(2, c_in, 11, 26, dtype=torch.float64)[..., ::2].copy_(m)
    assert not m_nc.is_contiguous()
    got = _all_grads(x_nc, m_nc, w, b, **kw)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_batch_broadcast_mask_equals_expanded_mask():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    m1 = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).double()
    got = _all_grads(x, m1, w, b, padding=1)
    want = _all_grads(x, m1.expand(3, 1, 8, 8).contiguous(), w, b, padding=1)
    assert got[1].shape == (3, 1, 8, 8)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_empty_batch():
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    out, update = pconv_cuda.partial_conv2d(x, torch.ones(0, 1, 8, 8), w, None, 1, 1)
    assert out.shape == (0, 5, 8, 8) and update.shape == (0, 1, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all()


@pytest.mark.parametrize("input_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_empty_batch_gradients_take_the_promised_layouts(input_layout, weight_layout):
    """Batch 0 on the training path: the input gradient in the input's layout and the
    weight gradient in the weight's, as the fake kernels say (x * m may be in another)."""
    cl = torch.channels_last
    x = torch.randn(0, 4, 8, 8)
    w = torch.randn(5, 4, 3, 3)
    x = (x.to(memory_format=cl) if input_layout == "channels_last" else x).requires_grad_()
    w = (w.to(memory_format=cl) if weight_layout == "channels_last" else w).requires_grad_()
    out, _ = pconv_cuda.partial_conv2d(x, torch.ones(0, 1, 8, 8), w, None, 1, 1)
    out.sum().backward()
    # (Every layout counts as contiguous at batch 0: compare the strides.)
    assert_same_layout(x.grad, x)
    assert_same_layout(w.grad, w)


@pytest.mark.parametrize("fn", [pconv_cuda.partial_conv2d, reference.partial_conv2d,
                                reference.lean_partial_conv2d], ids=["op", "reference", "lean"])
def test_mask_gets_no_gradient(fn):
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    m = torch.rand(1, 1, 6, 6, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    out, update = fn(x, m, w, None, 1, 1)
    assert not update.requires_grad
    out.sum().backward()
    assert m.grad is None and x.grad is not None


def test_only_weight_gradient_requested():
    """First-layer case: the image needs no gradient, the weight does."""
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    m = (torch.rand(2, 1, 10, 10) > 0.5).double()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out, _ = pconv_cuda.partial_conv2d(x, m, w, None, 2, 1)
    (gw,) = torch.autograd.grad(out.sum(), (w,))
    out_r, _ = reference.partial_conv2d(x, m, w, None, 2, 1)
    (gw_r,) = torch.autograd.grad(out_r.sum(), (w,))
    torch.testing.assert_close(gw, gw_r, rtol=1e-10, atol=1e-10)


def test_bfloat16_forward_close_to_float32():
    case = Case(2, 16, 16, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "soft", True, 2)
    x, m, w, b = make_inputs(case, torch.float32, seed=8, requires_grad=False)
    ref, ref_u = reference.partial_conv2d(x, m, w, b, 1, 1)
    out, update = pconv_cuda.partial_conv2d(x.bfloat16(), m.bfloat16(), w.bfloat16(),
                                            b.bfloat16(), 1, 1)
    low, _ = reference.partial_conv2d(x.bfloat16(), m.bfloat16(), w.bfloat16(), b.bfloat16(), 1, 1)
    err = (out.float() - ref).abs().max()
    err_low = (low.float() - ref).abs().max()
    assert out.dtype == torch.bfloat16
    assert err <= 2 * err_low + 1e-2, (err, err_low)


# ------------------------------------------------------------------ the training pair
TRAIN_OP = torch.ops.pconv.partial_conv2d_train.default


def assert_same_layout(actual, like, what=""):
    """Same shape, and the same strides in every dimension of size over 1 (a layout fixes
    only those)."""
    assert actual.shape == like.shape, (what, actual.shape, like.shape)
    for dim, size in enumerate(actual.shape):
        if size > 1:
            assert actual.stride(dim) == like.stride(dim), (what, actual.stride(), like.stride())


# The CPU kernels choose where x * m lives (channels_last inside for few outputs and large
# 16-bit planes, NCHW for the direct convolution's layers), and the fake kernels must say
# the same: inductor asserts every stride they give. Last layers, strided first layers, a
# band too wide for the direct convolution, and random layers, in three dtypes and both
# input layouts.
FAKE_CASES = [
    Case(2, 8, 3, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 2),
    Case(1, 6, 4, 9, 11, (3, 3), (2, 2), (1, 1), (1, 1), 1, False, "soft", True, 1),
    Case(2, 3, 16, 20, 18, (7, 7), (2, 2), (3, 3), (1, 1), 1, True, "binary", False, 1),
    Case(1, 3, 8, 70, 66, (3, 3), (1, 2), (1, 1), (1, 1), 1, True, "binary", True, 1),
    Case(1, 1024, 3, 3, 1400, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", False, 1),
    # deep layers, whose channels_last weight sets the layout (and one whose does not)
    Case(1, 48, 40, 6, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", True, 1),
    Case(2, 32, 64, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1), 1, True, "soft", False, 2),
    Case(2, 32, 64, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "soft", False, 2),
] + random_cases(16, seed=23)


@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FAKE_CASES, ids=[c.ids() for c in FAKE_CASES])
def test_fake_kernels_describe_the_cpu_outputs(case, dtype, layout, weight_layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pconv_cuda import ops as fakes

    x, m, w, b = make_inputs(case, dtype, seed=21, requires_grad=False)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    if m is None:
        m = torch.ones(case.n, 1, case.h, case.w, dtype=dtype)
    geo = [list(case.stride), list(case.padding), list(case.dilation), case.groups]
    real = torch.ops.pconv.partial_conv2d_train(x, m, w, b, *geo)
    with FakeTensorMode() as mode:
        fake = fakes._partial_conv2d_train_fake(
            *(None if t is None else mode.from_tensor(t) for t in (x, m, w, b)), *geo)
    for name, r, f in zip(("output", "updated mask", "x * m", "ratio", "update"), real, fake):
        assert r.dtype == f.dtype, name
        assert_same_layout(r, f, name)


def test_fake_kernels_describe_the_cpu_outputs_below_avx512():
    """Below AVX-512 the strided first layers keep oneDNN's layout; the fakes follow."""
    out = run_tests_below_avx512(__file__, "test_fake_kernels_describe_the_cpu_outputs and float32")
    assert f"{4 * len(FAKE_CASES)} passed" in out


@pytest.mark.parametrize("sample", list(_opcheck_samples())[:2], ids=["single", "multi"])
def test_opcheck_train_op(sample):
    torch.library.opcheck(TRAIN_OP, sample)


def test_opcheck_train_backward_op():
    case = Case(2, 4, 6, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "soft", True, 1)
    x, m, w, b = make_inputs(case, torch.float32, seed=5, requires_grad=False)
    _, _, xm, ratio, update = TRAIN_OP(x, m, w, b, [1, 1], [1, 1], [1, 1], 1)
    gy = torch.randn(2, 6, 9, 7)
    for output_mask in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(torch.ops.pconv.partial_conv2d_train_backward.default,
                              (gy, xm, m, ratio, update, w, True, [1, 1], [1, 1], [1, 1], 1,
                               output_mask))


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.ids() for c in GRAD_CASES])
def test_gradcheck_float64_recomputing_backward(case):
    """The path autograd takes when no weight gradient is wanted, or there is no mask (its
    backward forms x * m and the ratio again), has a correct gradient too."""
    x, m, w, b = make_inputs(case, torch.float64, seed=3)
    geo = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
    # Input gradient alone, weight and bias frozen.
    assert torch.autograd.gradcheck(
        lambda x: OP(x, m, w.detach(), None if b is None else b.detach(), *geo)[0], (x,),
        eps=1e-6, atol=1e-7)
    # Every gradient of a mask-less call (partial-convolution padding).
    params = tuple(t for t in (x, w, b) if t is not None)

    def f(*p):
        return OP(p[0], None, p[1], p[2] if b is not None else None, *geo)[0]

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)


GRADGRAD_CASES = random_cases(4, seed=123)


@pytest.mark.parametrize("case", GRADGRAD_CASES, ids=[c.ids() for c in GRADGRAD_CASES])
@pytest.mark.parametrize("wanted", ["all", "input"])
def test_gradgradcheck_float64(case, wanted):
    """A recorded backward (create_graph=True, as gradient penalties take) is itself
    differentiable, on the training path (every gradient, with a mask) and on the
    recomputing one (input gradient alone, or no mask)."""
    x, m, w, b = make_inputs(case, torch.float64, seed=4)
    geo = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
    if wanted == "input":
        w, b = w.detach(), None if b is None else b.detach()
        params = (x,)
    else:
        params = tuple(t for t in (x, w, b) if t is not None)

    def f(*p):
        weight = p[1] if len(p) > 1 else w
        bias = p[2] if len(p) > 2 else b
        return OP(p[0], m, weight, bias, *geo)[0]

    assert torch.autograd.gradgradcheck(f, params, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_gradient_penalty_matches_reference(multi):
    """The gradient of a penalty on dL/dx reaches the weights (the pattern of WGAN-GP and
    R1 penalties), as through the reference."""
    torch.manual_seed(0)
    layers = [pconv_cuda.PartialConv2d(3, 4, 3, padding=1, multi_channel=multi).double()]
    layers.append(pconv_cuda.ReferencePartialConv2d(3, 4, 3, padding=1, multi_channel=multi)
                  .double())
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(2, 3 if multi else 1, 7, 6) > 0.4).double()
    grads = []
    for layer in layers:
        (gx,) = torch.autograd.grad(layer(x, m).square().sum(), x, create_graph=True)
        penalty = gx.square().sum()
        grads.append(torch.autograd.grad(penalty, (x, layer.weight, layer.bias)))
    for ours, ref in zip(*grads):
        assert ours.abs().max() > 0
        torch.testing.assert_close(ours, ref)


def test_torch_func_transforms_and_forward_ad_run_the_reference():
    """torch.func (vmap of grad for per-sample gradients, jvp, jacrev) and forward-mode AD
    give the reference's results through the functional API and the module; the op itself
    refuses forward-mode AD rather than returning zero tangents."""
    from torch.func import functional_call, grad, jacrev, jvp, vmap
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    layer = pconv_cuda.PartialConv2d(2, 3, 3, padding=1).double()
    ref = pconv_cuda.ReferencePartialConv2d(2, 3, 3, padding=1).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 2, 6, 5, dtype=torch.float64)
    m = (torch.rand(4, 1, 6, 5) > 0.4).double()
    v = torch.randn_like(x)

    tangent = jvp(lambda a: layer(a, m), (x,), (v,))[1]
    torch.testing.assert_close(tangent, jvp(lambda a: ref(a, m), (x,), (v,))[1])
    assert tangent.abs().max() > 0
    with fwAD.dual_level():
        dual = layer(fwAD.make_dual(x, v), m)
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, tangent)
        with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported by the op"):
            OP(fwAD.make_dual(x, v), m, layer.weight.detach(), None, [1, 1], [1, 1], [1, 1], 1)

    params = {k: p.detach() for k, p in layer.named_parameters()}

    def loss(p, xi, mi):
        return functional_call(layer, p, (xi[None], mi[None])).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, m)
    for i in range(x.shape[0]):
        layer.zero_grad()
        layer(x[i:i + 1], m[i:i + 1]).square().sum().backward()
        torch.testing.assert_close(per_sample["weight"][i], layer.weight.grad)
        torch.testing.assert_close(per_sample["bias"][i], layer.bias.grad)

    jac = jacrev(lambda a: layer(a, m[:1]))(x[:1])
    torch.testing.assert_close(jac, jacrev(lambda a: ref(a, m[:1]))(x[:1]))


def test_train_op_returns_what_the_backward_needs():
    case = Case(2, 4, 6, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "soft", True, 1)
    x, m, w, b = make_inputs(case, torch.float64, seed=5, requires_grad=False)
    out, update, xm, ratio, update_acc = TRAIN_OP(x, m, w, b, [1, 1], [1, 1], [1, 1], 1)
    ref_out, ref_update = OP(x, m, w, b, [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(update, ref_update, rtol=0, atol=0)
    torch.testing.assert_close(xm, x * m, rtol=0, atol=0)
    # r and u as DESIGN.md defines them, for the mask's own batch (1 here, broadcast).
    window = F.conv2d(m.sum(1, keepdim=True), torch.ones(1, 1, 3, 3, dtype=m.dtype), padding=1)
    u = window.clamp(0, 1)
    torch.testing.assert_close(update_acc, u, rtol=0, atol=0)
    torch.testing.assert_close(ratio, 3 * 3 * 4 / (window + 1e-8) * u, rtol=1e-14, atol=1e-14)
    assert ratio.shape == (1, 1, 9, 7) and update.shape == (2, 1, 9, 7)
    assert update_acc.data_ptr() != update.data_ptr()


def test_training_forward_keeps_masked_input_not_input():
    """With a weight gradient wanted, the saved tensor is x * m: changing x in place after
    the forward does not disturb the backward (the recomputing op would refuse)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g)
    m = (torch.rand(2, 1, 8, 8, generator=g) > 0.4).double()
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    out_r, _ = reference.partial_conv2d(x, m, w, None, 1, 1)
    (want,) = torch.autograd.grad(out_r.sum(), (w,))
    out, _ = pconv_cuda.partial_conv2d(x, m, w, None, 1, 1)
    x.add_(100.0)
    (got,) = torch.autograd.grad(out.sum(), (w,))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    # The recomputing op keeps the input itself, so the same change is caught there.
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g, requires_grad=True) * 1
    out, _ = OP(z, m, w.detach(), None, [1, 1], [1, 1], [1, 1], 1)
    with torch.no_grad():
        z.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_inference_and_input_only_gradients_use_the_recomputing_op():
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    m = torch.ones(1, 1, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    out, _ = pconv_cuda.partial_conv2d(x, m, w, None, 1, 1)
    assert "RecomputingPartialConv2d" in out.grad_fn.name()
    out, _ = pconv_cuda.partial_conv2d(x, None, w.requires_grad_(), None, 1, 1)
    assert "RecomputingPartialConv2d" in out.grad_fn.name()
    out, _ = pconv_cuda.partial_conv2d(x, m, w, None, 1, 1)
    assert "TrainingPartialConv2d" in out.grad_fn.name()
    with torch.no_grad():
        out, _ = pconv_cuda.partial_conv2d(x, m, w, None, 1, 1)
    assert out.grad_fn is None


def test_cpu_block_cache_reuses_and_releases():
    pconv_cuda.release_cpu_cache()
    x = torch.randn(1, 8, 32, 32)
    m = (torch.rand(1, 1, 32, 32) > 0.3).float()
    layer = pconv_cuda.PartialConv2d(8, 8, 3, padding=1)

    def step():
        out = layer(x, m)
        out.sum().backward()

    step()
    kept = pconv_cuda._C.cpu_cache_bytes()
    assert kept == x.numel() * 4  # the x * m block, back in the cache after the backward
    for _ in range(3):
        step()
    assert pconv_cuda._C.cpu_cache_bytes() == kept  # reused, not grown
    assert pconv_cuda.release_cpu_cache() == kept
    assert pconv_cuda._C.cpu_cache_bytes() == 0


def _profiled_memory_events(fn) -> list[int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in sorted(prof.profiler.kineto_results.events(),
                                       key=lambda e: e.start_ns()) if e.name() == "[memory]"]


def test_memory_from_the_op_caches_is_reported_to_the_profiler():
    """x * m kept for the backward (a cached block) and x * m of an inference call (a
    scratch buffer) come from the op's own caches, which reuse memory after the first
    call; the profiler still sees them taken and given back, so peak-memory figures count
    them. (8 -> 5 channels: no other tensor of the calls has x's size.)"""
    x = torch.randn(1, 8, 32, 32)
    m = (torch.rand(1, 1, 32, 32) > 0.3).float()
    w = torch.randn(5, 8, 3, 3)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    plane = x.numel() * 4
    for call in (lambda: torch.ops.pconv.partial_conv2d_train(x, m, w, None, *geo),
                 lambda: OP(x, m, w, None, *geo)):
        call()  # fills the caches: the profiled call takes from them
        events = _profiled_memory_events(call)
        assert plane in events and -plane in events
        assert sum(events) == 0


@pytest.mark.parametrize("mask_channels", [1, 40])
def test_last_layer_backward_frees_its_copies_before_the_input_gradient(mask_channels):
    """A float32 layer with few outputs keeps x * m NCHW and runs its backward
    channels_last: the layout copy of x * m and g_raw must be gone before the input
    gradient changes layout (another input-sized buffer), so forward + backward peaks no
    higher than the reference's (it peaked at 1.17x with them alive)."""
    x = torch.randn(1, 40, 96, 96, requires_grad=True)
    m = (torch.rand(1, mask_channels, 96, 96) > 0.3).float()
    w = torch.randn(3, 40, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)

    def step(fn):
        def run():
            out, _ = fn(x, m, w, b, 1, 1)
            out.sum().backward()
        return run

    peaks = {name: peak_memory_mb(step(fn), "cpu")
             for name, fn in (("op", pconv_cuda.partial_conv2d),
                              ("reference", reference.partial_conv2d))}
    assert peaks["op"] <= peaks["reference"], peaks


def test_autocast_cpu_training_path():
    case = Case(2, 8, 16, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "binary", True, 2)
    x, m, w, b = make_inputs(case, torch.float32, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, update, xm, ratio, u = TRAIN_OP(x, m, w, b, [1, 1], [1, 1], [1, 1], 1)
        fused, _ = pconv_cuda.partial_conv2d(x, m, w, b, 1, 1)
    assert out.dtype == xm.dtype == update.dtype == torch.bfloat16
    assert ratio.dtype == u.dtype == torch.float32
    fused.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("mask_kind", ["single", "multi", "none"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_few_output_channels_run_channels_last_inside(mask_kind, layout):
    """A layer with few output channels (the UNets' last layer) convolves in channels_last
    even for an NCHW input, changing layout inside the masking and epilogue passes; results
    and the layouts handed back are those of the reference."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(21)
    x0 = torch.randn(2, 19, 13, 11, dtype=torch.float64, generator=g)
    m = {"single": (torch.rand(2, 1, 13, 11, generator=g) > 0.4).double(),
         "multi": (torch.rand(2, 19, 13, 11, generator=g) > 0.4).double(), "none": None}[mask_kind]
    w = torch.randn(3, 19, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    x = x0.contiguous(memory_format=fmt).requires_grad_(True)
    out, update = pconv_cuda.partial_conv2d(x, m, w, b, 1, 1)
    gy = torch.randn(out.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, (x, w, b), gy)
    xr = x0.clone().requires_grad_(True)
    ref_out, ref_update = reference.partial_conv2d(xr, m, w, b, 1, 1)
    want = torch.autograd.grad(ref_out, (xr, w, b), gy)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(update, ref_update)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=fmt)
    assert got[0].is_contiguous(memory_format=fmt)

    # The masking pass that changes layout rounds as at::mul does, also in bfloat16.
    if m is not None:
        xb, mb, wb = x.detach().bfloat16(), m.bfloat16(), w.detach().bfloat16()
        _, _, xm, _, _ = torch.ops.pconv.partial_conv2d_train(xb, mb, wb, None, [1, 1], [1, 1],
                                                              [1, 1], 1)
        assert xm.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xm, xb * mb, rtol=0, atol=0)


def _forward_backward_match_reference(x, m, w, b, stride, g, padding=1):
    """Runs the op forward and backward (a random g_y drawn from ``g``) and checks output,
    updated mask and the three gradients against the float64 reference, with tolerances by
    dtype; returns (output, grad_input, grad_weight, grad_bias)."""
    out, update = pconv_cuda.partial_conv2d(x, m, w, b, stride, padding)
    gy = torch.randn(out.shape, generator=g).to(x.dtype)
    got = torch.autograd.grad(out, (x, w, b), gy)
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref_out, ref_update = reference.partial_conv2d(xr, m.double(), wr, br, stride, padding)
    want = torch.autograd.grad(ref_out, (xr, wr, br), gy.double())
    rel = {torch.float64: 1e-10, torch.float32: 1e-4}.get(x.dtype, 2e-2)
    for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                          (out,) + got, (ref_out,) + want):
        atol = rel * (1.0 if x.dtype == torch.float64 else max(1.0, e.abs().max().item()))
        torch.testing.assert_close(a.double(), e, rtol=rel, atol=atol,
                                   msg=lambda s: f"{name}: {s}")
    torch.testing.assert_close(update.double(), ref_update)
    return (out,) + got


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", ["single", "multi"])
@pytest.mark.parametrize("c_in,c_out,stride", [(19, 35, 1), (19, 35, 2), (3, 16, 2)])
def test_large_planes_run_channels_last_inside(dtype, mask_kind, c_in, c_out, stride):
    """From 64 x 64 pixels an NCHW layer convolves in channels_last (float32 and float64
    only when strided, with 8 input channels or more). The layout changes happen in tiles
    of pixels x channels inside the masking pass, the epilogue, the gradient prologue and
    the masking of the input gradient; 64 x 65 pixels and 19, 35 channels leave partial
    tiles. Results match the reference, outputs come back NCHW, and the fake kernel agrees
    with the real one on the layout of the saved x * m."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, c_in, 64, 65, generator=g).to(dtype).requires_grad_(True)
    m = (torch.rand(2, c_in if mask_kind == "multi" else 1, 64, 65, generator=g) > 0.4).to(dtype)
    w = torch.randn(c_out, c_in, 3, 3, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(c_out, generator=g).to(dtype).requires_grad_(True)
    results = _forward_backward_match_reference(x, m, w, b, stride, g)
    assert all(t.is_contiguous() for t in results)

    args = ([stride, stride], [1, 1], [1, 1], 1)
    xm = TRAIN_OP(x.detach(), m, w.detach(), b.detach(), *args)[2]
    channels_last = dtype.itemsize == 2 or (stride > 1 and c_in >= 8)
    assert xm.is_contiguous(memory_format=torch.channels_last if channels_last
                            else torch.contiguous_format)
    bits = {2: torch.int16, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(xm.contiguous().view(bits), (x.detach() * m).view(bits))
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = (x.detach(), m, w.detach(), b.detach())
    with FakeTensorMode() as mode:
        fake = TRAIN_OP(*(mode.from_tensor(t) for t in real), *args)[2]
    assert fake.stride() == xm.stride()




# (C_in, C_out, kernel, stride, plane): layers that take each path of the CPU kernel: deep
# and large-plane layers (oneDNN), one input channel and 1x1 kernels (NCHW inside), few
# outputs (the direct convolution, up to 4; channels_last inside, up to 8), the strided RGB
# first layer (direct convolution in float32 with NCHW weights) and the stride-1 one
# (implicit GEMM).
OUTPUT_LAYOUT_LAYERS = [(40, 40, 3, 2, 9), (16, 16, 3, 1, 64), (1, 8, 3, 1, 12), (16, 24, 1, 2, 10),
                        (16, 3, 3, 1, 20), (16, 6, 3, 1, 12), (3, 16, 7, 2, 24), (3, 16, 3, 1, 20)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("layer", OUTPUT_LAYOUT_LAYERS, ids=lambda l: "{}-{}-k{}-s{}-@{}".format(*l))
def test_output_takes_the_layout_of_nn_conv2d(layer, layout, weight_layout, dtype):
    """The output has nn.Conv2d's layout for the same input and weight: channels_last when
    either is (a channels_last model given an NCHW image turns channels_last at its first
    layer), NCHW otherwise; in inference and in training. The input gradient keeps the
    input's layout and the weight gradient the weight's, and the results match the
    reference."""
    c_in, c_out, k, stride, plane = layer
    g = torch.Generator().manual_seed(29)
    cl = torch.channels_last
    x = torch.randn(2, c_in, plane, plane, generator=g).to(dtype)
    m = (torch.rand(2, c_in, plane, plane, generator=g) > 0.4).to(dtype)
    w = torch.randn(c_out, c_in, k, k, generator=g).to(dtype)
    b = torch.randn(c_out, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=cl)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=cl)
    want = F.conv2d(x, w, b, stride, k // 2)

    args = ([stride, stride], [k // 2, k // 2], [1, 1], 1)
    assert_same_layout(OP(x, m, w, b, *args)[0], want)
    assert_same_layout(TRAIN_OP(x, m, w, b, *args)[0], want)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    out, grad_input, grad_weight, _ = _forward_backward_match_reference(x, m, w, b, stride, g,
                                                                        k // 2)
    assert_same_layout(out, want)
    assert_same_layout(grad_input, x)
    assert_same_layout(grad_weight, w)


# (input layout, C_out, kernel, layout of x * m): the three layout paths of the one-read
# pass: NCHW kept, NCHW into channels_last (few output channels: 5, as up to 4 take the
# direct convolution), channels_last into NCHW (1x1 kernel).
ONE_READ_PATHS = {"nchw": ("nchw", 16, 3, torch.contiguous_format),
                  "to_channels_last": ("nchw", 5, 3, torch.channels_last),
                  "from_channels_last": ("channels_last", 16, 1, torch.contiguous_format)}


@pytest.mark.parametrize("path", list(ONE_READ_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", ["train", "inference"])
def test_multi_channel_mask_read_once_gives_the_same_bits(path, dtype, op):
    """A per-sample multi-channel mask is read once for x * m and the channel sum. Every
    output equals, bit for bit, the two-pass result (forced by a mask with other strides):
    x * m rounds as at::mul, and each pixel's channel sum adds the channels in the same
    order, also for soft masks and for planes split over several tasks (60 x 60)."""
    layout, c_out, k, xm_format = ONE_READ_PATHS[path]
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 12, 60, 60, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    m = torch.rand(2, 12, 60, 60, generator=g)
    m = torch.where(m > 0.5, torch.ones_like(m), m * m).to(dtype)  # soft and binary values
    w = torch.randn(c_out, 12, k, k, generator=g).to(dtype)
    b = torch.randn(c_out, generator=g).to(dtype)
    m_strided = m.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not m_strided.is_contiguous()
    args = ([1, 1], [k // 2, k // 2], [1, 1], 1)
    call = (lambda mask: TRAIN_OP(x, mask, w, b, *args)) if op == "train" else (
        lambda mask: OP(x, mask, w, b, *args))

    assert "pconv::masked_input_with_channel_sum" in pass_names(lambda: call(m))
    assert "pconv::masked_input_with_channel_sum" not in pass_names(lambda: call(m_strided))
    got, want = call(m), call(m_strided)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.stride() == e.stride()
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    if op == "train":
        assert got[2].is_contiguous(memory_format=xm_format)
        torch.testing.assert_close(got[2], x * m, rtol=0, atol=0)
        window = F.conv2d(m.double().sum(1, keepdim=True), torch.ones(1, 1, k, k, dtype=torch.float64),
                          padding=k // 2)
        torch.testing.assert_close(got[4].double(), window.clamp(0, 1), rtol=1e-6, atol=1e-6)



def _same_bits(a, b):
    """a and b hold the same values bit for bit (signed zeros included), NaN where the other
    has NaN (NaN payloads aside)."""
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a[~nan].view(int_type), b[~nan].view(int_type))


# The passes that mask: mask_planes (single-channel masks), the one-read pass on its three
# layout paths, and mask_elements (multi-channel masks on planes too small for one read).
MASKING_PATHS = {"single": ("nchw", 16, 3, 60, "pconv::mask_planes"),
                 "small_planes": ("nchw", 16, 3, 30, "pconv::mask_elements"),
                 **{name: (layout, c_out, k, 60, "pconv::masked_input_with_channel_sum")
                    for name, (layout, c_out, k, _) in ONE_READ_PATHS.items()}}


@pytest.mark.parametrize("path", list(MASKING_PATHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_zero_one_masks_mask_by_bits_exactly_as_at_mul(path, dtype):
    """With 0/1 masks, x * m in 16-bit types is formed by bit operations. It must equal
    at::mul bit for bit: x * 1 = x, x * 0 a zero with x's sign, and NaN for Inf * 0 and
    NaN * m. Masks mix 0/1 regions with soft ones, so runs of both kinds meet in one call."""
    layout, c_out, k, size, pass_name = MASKING_PATHS[path]
    g = torch.Generator().manual_seed(71)
    x = torch.randn(2, 12, size, size, generator=g)
    x[0, :, :4] = 0.0
    x[0, :, 4:8] = -0.0
    special = torch.rand(x.shape, generator=g) < 0.01
    x[special] = torch.tensor([float("inf"), float("-inf"), float("nan")])[
        torch.randint(0, 3, (int(special.sum()),), generator=g)]
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mask_c = 1 if path == "single" else 12
    m = (torch.rand(2, mask_c, size, size, generator=g) > 0.3).float()
    m[1, :, size // 2:] = torch.rand(mask_c, size - size // 2, size, generator=g)  # soft rows
    m = m.to(dtype)
    w = torch.randn(c_out, 12, k, k, generator=g).to(dtype)
    call = lambda: TRAIN_OP(x, m, w, None, [1, 1], [k // 2, k // 2], [1, 1], 1)
    assert pass_name in pass_names(call)
    _, _, xm, _, _ = call()
    want = x * m
    assert torch.isnan(want).any() and (want == 0).any()
    assert _same_bits(xm, want)
    # Sample 0 is all 0/1 (the bit path), sample 1 partly soft: both as at::mul.
    assert _same_bits(xm[0], want[0]) and _same_bits(xm[1], want[1])
    # The input gradient is masked in place by the same loops; a mask with other strides
    # (same values) takes at::mul instead.
    if path in ("single", "small_planes"):
        gy = torch.randn(2, c_out, size, size, generator=g).to(dtype)
        m_strided = m.transpose(2, 3).contiguous().transpose(2, 3)
        grads = [torch.ops.pconv.partial_conv2d_backward(
            gy, x.nan_to_num(0.0, 0.0, 0.0), mask, w, False, [1, 1], [k // 2, k // 2], [1, 1], 1,
            [True, False, False])[0] for mask in (m, m_strided)]
        assert pass_name in pass_names(lambda: torch.ops.pconv.partial_conv2d_backward(
            gy, x, m, w, False, [1, 1], [k // 2, k // 2], [1, 1], 1, [True, False, False]))
        assert (grads[0] == 0).any() and torch.signbit(grads[0][grads[0] == 0]).any()
        assert _same_bits(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mask_batch", [1, 3])
def test_single_channel_mask_pass_equals_at_mul(dtype, mask_batch):
    """x * m with a single-channel mask, from the op's own plane loop (small planes, no
    parallel region), equals at::mul bit for bit, for a per-sample and a broadcast mask."""
    g = torch.Generator().manual_seed(51)
    x = torch.randn(3, 40, 5, 7, generator=g).to(dtype)
    m = torch.rand(mask_batch, 1, 5, 7, generator=g)
    m = torch.where(m < 0.3, torch.zeros_like(m), m).to(dtype)  # holes, and soft values
    w = torch.randn(16, 40, 3, 3, generator=g).to(dtype)
    call = lambda: TRAIN_OP(x, m, w, None, [1, 1], [1, 1], [1, 1], 1)
    assert "pconv::mask_planes" in pass_names(call)
    _, _, xm, _, _ = call()
    torch.testing.assert_close(xm, x * m, rtol=0, atol=0)
    # The input gradient is masked by the same loop, in place.
    gx = torch.ops.pconv.partial_conv2d_backward(
        torch.ones(3, 16, 5, 7, dtype=dtype), x, m, w, False, [1, 1], [1, 1], [1, 1], 1,
        [True, False, False])[0]
    holes = (m == 0).expand_as(gx)
    assert gx.shape == x.shape and torch.isfinite(gx).all() and holes.any()
    assert (gx[holes] == 0).all() and (gx[~holes] != 0).any()


# The float32 masking passes with x * m over 1 MiB, which they write by streaming stores:
# (mask channels, input channels, H, W, pass). Odd plane sizes start and end most runs off
# the alignment the stores need, so the scalar head and tail run too.
STREAMING_PATHS = {"single": (1, 16, 97, 101, "pconv::mask_planes"),
                   "one_read": (16, 16, 97, 101, "pconv::masked_input_with_channel_sum"),
                   "small_planes": (96, 96, 39, 41, "pconv::mask_elements")}


@pytest.mark.parametrize("path", list(STREAMING_PATHS))
@pytest.mark.parametrize("op", ["train", "inference"])
def test_large_float32_masking_streams_and_equals_at_mul(path, op):
    """Over 1 MiB, float32 x * m is written by streaming stores. Every output must equal,
    bit for bit, the result of a mask with other strides (at::mul and a separate channel
    sum), x * m must equal at::mul (signed zeros, Inf, NaN, soft mask values), and the
    same pass with a third of the channels (under 1 MiB) must not stream."""
    mask_c, channels, h, w, pass_name = STREAMING_PATHS[path]
    g = torch.Generator().manual_seed(83)

    def call_with(c):
        x = torch.randn(2, c, h, w, generator=g)
        x[0, :, :3] = -0.0
        special = torch.rand(x.shape, generator=g) < 0.001
        x[special] = torch.tensor([float("inf"), float("-inf"), float("nan")])[
            torch.randint(0, 3, (int(special.sum()),), generator=g)]
        m = (torch.rand(2, min(mask_c, c), h, w, generator=g) > 0.3).float()
        m[1, :, h // 2:] = torch.rand(m.shape[1], h - h // 2, w, generator=g)  # soft rows
        wt = torch.randn(16, c, 3, 3, generator=g)
        b = torch.randn(16, generator=g)
        fn = TRAIN_OP if op == "train" else OP
        run = lambda mask: fn(x, mask, wt, b, [1, 1], [1, 1], [1, 1], 1)
        m_strided = m.transpose(2, 3).contiguous().transpose(2, 3)  # same values
        return x, m, run, m_strided

    x, m, run, m_strided = call_with(channels)
    names = pass_names(lambda: run(m))
    assert pass_name in names and "pconv::streaming_stores" in names
    assert "pconv::streaming_stores" not in pass_names(lambda: run(m_strided))
    got, want = run(m), run(m_strided)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.stride() == e.stride()
        assert _same_bits(a, e)
    if op == "train":
        assert torch.isnan(got[2]).any() and _same_bits(got[2], x * m)

    _, m_small, run_small, _ = call_with(channels // 3)  # 5 channels: not the implicit GEMM
    names = pass_names(lambda: run_small(m_small))
    assert pass_name in names and "pconv::streaming_stores" not in names


def test_streaming_stores_below_avx512_give_the_same_bits():
    """With ATen held below AVX-512 the streaming stores take their SSE2 body: the
    streaming test above must pass there too."""
    out = run_tests_below_avx512(__file__, "test_large_float32_masking_streams_and_equals_at_mul")
    assert "6 passed" in out


# (C_in, C_out, H, W, kernel, stride, padding, dilation): one output column and a column
# stride over 1, where torch 2.13's CPU bfloat16 convolution returns wrong values.
ONE_COLUMN = [
    (1, 1, 23, 9, (7, 7), (3, 2), (1, 2), (1, 2)),
    (3, 4, 23, 9, (7, 7), (3, 2), (1, 2), (1, 2)),
    (1, 1, 17, 7, (6, 7), (3, 3), (2, 1), (1, 1)),
    (4, 3, 8, 5, (3, 7), (1, 3), (2, 2), (1, 1)),
]


@pytest.mark.parametrize("geometry", ONE_COLUMN, ids=str)
def test_bfloat16_one_output_column_with_a_column_stride(geometry):
    """The op and the reference take the way around that bug (convolution_without_bias):
    forward and gradients match float64 on the same bfloat16 values."""
    c_in, c_out, h, w, kernel, stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, h, w, generator=g).bfloat16()
    wt = (torch.randn(c_out, c_in, *kernel, generator=g) * 0.3).bfloat16()
    b = torch.randn(c_out, generator=g).bfloat16()
    m = (torch.rand(2, 1, h, w, generator=g) > 0.3).bfloat16()
    go = torch.randn(2, c_out, *_out_hw(h, w, kernel, stride, padding, dilation), generator=g)
    assert go.shape[-1] == 1

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, wt, b)]
        out, _ = fn(leaves[0], m.to(dtype), leaves[1], leaves[2], stride=stride,
                    padding=padding, dilation=dilation)
        return (out, *torch.autograd.grad(out, leaves, go.to(dtype)))

    expected = run(reference.partial_conv2d, torch.float64)
    for fn in (pconv_cuda.partial_conv2d, reference.partial_conv2d):
        for name, got, want in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                   run(fn, torch.bfloat16), expected):
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got.double(), want, atol=2e-2 * scale, rtol=2e-2,
                                       msg=lambda s: f"{fn.__module__} {name}: {s}")


def _out_hw(h, w, kernel, stride, padding, dilation):
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("channels", [2, 3, 16, 35, 67])
@pytest.mark.parametrize("mask_channels", ["single", "multi"])
@pytest.mark.parametrize("direction", ["to_channels_last", "from_channels_last"])
def test_layout_change_of_x_times_m_is_exact(dtype, channels, mask_channels, direction):
    """The relayout passes move x * m between NCHW and channels_last in tiles of pixels x
    channels (23 x 29 pixels and 35 or 67 channels leave partial tiles both ways; 2 and 3
    channels go into whole pixels by their own loop). The x * m the training op keeps must
    equal torch's x * m in that layout, bit for bit."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, channels, 23, 29, generator=g).to(dtype)
    m = (torch.rand(2, channels if mask_channels == "multi" else 1, 23, 29, generator=g) > 0.4)
    m = m.to(dtype)
    if direction == "to_channels_last":  # 5 outputs: convolved in channels_last, not direct
        c_out, k, fmt = 5, 3, torch.channels_last
    else:  # channels_last input, 1x1 kernel: convolved in NCHW
        x = x.contiguous(memory_format=torch.channels_last)
        c_out, k, fmt = 16, 1, torch.contiguous_format
    w = torch.randn(c_out, channels, k, k, generator=g).to(dtype)
    xm = TRAIN_OP(x, m, w, None, [1, 1], [k // 2, k // 2], [1, 1], 1)[2]
    assert xm.is_contiguous(memory_format=fmt)
    want = (x * m).contiguous(memory_format=fmt)
    assert xm.stride() == want.stride()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(xm.view(bits), want.view(bits))  # signed zeros included
