"""The CUDA sources, run without a GPU.

The host build (cuda_host.py) compiles the CUDA op code, launchers and kernels with the host
compiler; each launch runs its blocks in turn and the threads of a block as fibers that meet
at every barrier and shuffle (csrc/cuda/host/runtime.h). These tests hold that build to the
reference with the configurations of the GPU tests (cuda_cases.py), so the launch plans,
the index math, the vectorised and scalar paths, the barriers and the shuffles of the CUDA
code are checked on every run, with or without a GPU. The convolutions themselves are
ATen's CPU ones here and cuDNN's on a GPU: test_cuda.py checks the kernels there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os

import pytest
import torch

import cuda_host
from cuda_cases import (
    EDGE_CONFIGS, F32_CONFIGS, F64_CONFIGS, FEW_OUTPUT_CONFIGS, IGEMM_CONFIGS, LOWP_CONFIGS,
    assert_close_scaled, assert_low_precision_matches, assert_matches, check_layouts,
    expected_f64, make_cfg, make_inputs)
from torch._prims_common import suggest_memory_format

ALL = [True, True, True]


@pytest.fixture(scope="module")
def host():
    """The host build's module (built on first use), with its runtime reset to the defaults:
    two multiprocessors (so that grid-stride loops wrap at small sizes), threads in order.
    test_cuda_host_asan.py runs this file with PCONV_CUDA_HOST_ASAN=1 and the ASan runtime
    preloaded: the build is then the instrumented one. New CPU allocations are filled with
    junk meanwhile."""
    if os.environ.get("PCONV_CUDA_HOST_ASAN") == "1":
        os.environ.pop("LD_PRELOAD", None)  # this process has it; the compilers need not
        module = cuda_host.load(address_sanitizer=True)
    else:
        module = cuda_host.load()
    module.set_multiprocessor_count(2)
    module.set_reverse_schedule(False)
    module.take_launch_log()
    # New CPU memory holds junk (NaN for floats) while these tests run, so an output element
    # a kernel never writes fails the comparison instead of reading as a zero.
    module.set_junk_fill(True)
    yield module
    module.set_junk_fill(False)


def ops():
    return torch.ops.pconv_cuda_host


@contextlib.contextmanager
def runtime(host, multiprocessors=2, reverse=False):
    """The host runtime with another multiprocessor count or thread order, for a block."""
    host.set_multiprocessor_count(multiprocessors)
    host.set_reverse_schedule(reverse)
    try:
        yield
    finally:
        host.set_multiprocessor_count(2)
        host.set_reverse_schedule(False)


def geometry(cfg):
    return list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups


def nchw(*tensors):
    """Copies with NCHW strides, for the reference: ATen's CPU convolution in channels_last
    is wrong for one input channel in torch 2.13 (see op_context.h). Not .contiguous(): a
    channels_last tensor with one channel is NCHW-contiguous as it is."""
    return [None if t is None else t.clone(memory_format=torch.contiguous_format)
            for t in tensors]


def expected(cfg, *tensors):
    """The reference in float64 on NCHW copies of (x, m, w, b, go)."""
    return expected_f64(cfg, *nchw(*tensors))


def host_run(cfg, x, m, w, b, go, train, output_mask=ALL):
    """(out, updated mask, (dx, dW, db)) from the host build's ops, by the backward
    autograd takes: the training pair (it keeps x * m, r and u) when `train` and a mask is
    given, else the forward and the recomputing backward."""
    geo = geometry(cfg)
    if train and m is not None:
        out, upd, xm, ratio, update = ops().partial_conv2d_train(x, m, w, b, *geo)
        grads = ops().partial_conv2d_train_backward(go, xm, m, ratio, update, w, b is not None,
                                                    *geo, output_mask, suggest_memory_format(x))
    else:
        out, upd = ops().partial_conv2d(x, m, w, b, *geo)
        grads = ops().partial_conv2d_backward(go, x, m, w, b is not None, *geo, output_mask)
    grads = tuple(grads[:2]) + ((grads[2],) if b is not None else ())
    return out, upd, grads


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("train", [True, False], ids=["train_pair", "recompute"])
@pytest.mark.parametrize("cfg", F64_CONFIGS, ids=str)
def test_parity_float64(host, cfg, train):
    x, m, w, b, go = make_inputs(cfg, torch.float64, "cpu")
    out, upd, grads = host_run(cfg, x, m, w, b, go, train)
    assert out.dtype == torch.float64
    assert_matches((out, upd, grads), expected(cfg, x, m, w, b, go), 1e-10)
    check_layouts(cfg, x, w, out, upd, grads[0])


@pytest.mark.parametrize("cfg", F32_CONFIGS, ids=str)
def test_parity_float32(host, cfg):
    x, m, w, b, go = make_inputs(cfg, torch.float32, "cpu")
    out, upd, grads = host_run(cfg, x, m, w, b, go, train=True)
    assert out.dtype == torch.float32 and upd.dtype == torch.float32
    assert_matches((out, upd, grads), expected(cfg, x, m, w, b, go), 1e-5, update_tol=1e-6)
    check_layouts(cfg, x, w, out, upd, grads[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", LOWP_CONFIGS, ids=str)
def test_parity_low_precision(host, cfg, dtype):
    x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
    result = host_run(cfg, x, m, w, b, go, train=True)
    assert_low_precision_matches(result, cfg, *nchw(x, m, w, b, go))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_windows_are_zero_and_finite(host, dtype, layout):
    cfg = make_cfg(2, 8, 16, 24, 24, 3, 1, 1, 1, 1, "zeros", layout=layout)
    x, _, w, b, go = make_inputs(cfg, dtype, "cpu")
    x = x * 100  # large features under the hole must not leak through
    m = torch.ones(2, 1, 24, 24, dtype=dtype)
    m[:, :, 4:20, 4:20] = 0
    m[1] = 0  # one image with no known pixel at all
    out, upd, grads = host_run(cfg, x, m, w, b, go, train=True)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    hole = upd == 0
    assert hole[0, 0, 6:18, 6:18].all() and hole[1].all()
    assert (out[hole.expand_as(out)] == 0).all()
    assert (grads[0][1] == 0).all()


# ------------------------------------------------------------------ the runtime's views

# Grids from one multiprocessor (every grid-stride loop wraps) to a device's 132.
@pytest.mark.parametrize("multiprocessors", [1, 132])
@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=str)
def test_results_do_not_depend_on_grid_size(host, cfg, multiprocessors):
    x, m, w, b, go = make_inputs(cfg, torch.float64, "cpu")
    base = host_run(cfg, x, m, w, b, go, train=True)
    with runtime(host, multiprocessors=multiprocessors):
        other = host_run(cfg, x, m, w, b, go, train=True)
    for a, e in zip(base[:2] + base[2], other[:2] + other[2]):
        # The bias gradient's partial sums change with the grid; everything else may not.
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(base[0], other[0], atol=0, rtol=0)
    torch.testing.assert_close(base[1], other[1], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
# NCHW planes of 13 x 16 and 13 x 13: a multiple of every vector width, and of none.
@pytest.mark.parametrize("width", [16, 13], ids=["w16", "w13"])
def test_masking_that_sums_the_channels_gives_the_two_pass_bits(host, dtype, layout, width):
    """A multi-channel mask of x's shape and layout is summed over its channels by the
    masking pass, and the mask pass reads that sum: x * m, r and u come out bit for bit as
    from a mask of other strides (same values), which takes the mask pass over the
    C-channel mask and a separate x * m; the results match the reference."""
    cfg = make_cfg(2, 8, 6, 13, width, 3, 1, 1, 1, 1, "soft", multi=True, layout=layout)
    x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
    other = m.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert other.stride() != m.stride() == x.stride()
    geo = geometry(cfg)
    host.take_launch_log()
    one_read = ops().partial_conv2d_train(x, m, w, b, *geo)
    fused = {_kernel_name(r) for r in host.take_launch_log()}
    two_pass = ops().partial_conv2d_train(x, other, w, b, *geo)
    separate = {_kernel_name(r) for r in host.take_launch_log()}
    assert any(k.startswith("masked_input_kernel") for k in fused)
    assert not any(k.startswith("masked_input_kernel") for k in separate)
    # The mask pass reads the float channel sum in one case, the mask's own dtype in the other.
    acc = ACC[dtype]
    assert f"mask_ratio_kernel<{acc}, {acc}, true, true>" in fused
    assert f"mask_ratio_kernel<{SCALAR[dtype]}, {acc}, true, true>" in separate
    for a, e in zip(one_read, two_pass):
        assert a.stride() == e.stride()
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    torch.testing.assert_close(one_read[2], x * m, atol=0, rtol=0)  # x * m, rounded as at::mul
    _check_result(host_run(cfg, x, m, w, b, go, train=True), cfg, dtype, x, m, w, b, go)


def _check_result(result, cfg, dtype, x, m, w, b, go):
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_matches(result, cfg, *nchw(x, m, w, b, go))
    else:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert_matches(result, expected(cfg, x, m, w, b, go), tol, update_tol=min(tol, 1e-6))


def _mma_input_grad_fits(cfg):
    """Whether the tensor-core input gradient's shared memory (g_raw of 10 x 66 pixels per
    output channel in 16 bits, the weight in fragments of 16 values of k = (output, tap))
    stays within 48 KiB."""
    steps = -(-9 * cfg.cout // 16)
    staged = -(-cfg.cout * 660 * 2 // 16) * 16
    return staged + -(-cfg.cin // 8) * steps * 256 <= 48 * 1024


def _direct_kernel(cfg, which, dtype):
    """The direct kernel ("forward" or "input_grad") a few-output layer takes, with its
    template arguments: for 3x3 layers of unit stride and dilation one that stages tiles
    (the forward on tensor cores in 16-bit dtypes), else one pixel per thread."""
    t, a, masked = SCALAR[dtype], ACC[dtype], str(cfg.mask != "none").lower()
    tiled = cfg.kernel == (3, 3) and cfg.stride == (1, 1) and cfg.dilation == (1, 1)
    if tiled and dtype in (torch.float16, torch.bfloat16) and (
            which == "forward" or _mma_input_grad_fits(cfg)):
        return f"few_outputs_3x3_mma_{which}_kernel<{t}, {cfg.cout}, {masked}>"
    return f"few_outputs_{'3x3_' if tiled else ''}{which}_kernel<{t}, {a}, {cfg.cout}, {masked}>"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cfg", FEW_OUTPUT_CONFIGS, ids=str)
def test_few_output_layers_take_the_direct_kernels(host, cfg, dtype, monkeypatch):
    """A layer with at most 4 outputs and 9 taps: the inference forward is the mask pass
    and one direct kernel (no x * m, no epilogue), the training forward the same kernel on
    its x * m, and both backward ops take the input gradient, already masked, from the other
    direct kernel (no dx * m pass). The results match the reference, the same bits with
    the threads of a block in reverse order, and the cuDNN route (PCONV_CUDA_DIRECT=0)
    within rounding."""
    x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
    geo = geometry(cfg)
    host.take_launch_log()
    out, upd = ops().partial_conv2d(x, m, w, b, *geo)
    forward = [_kernel_name(r) for r in host.take_launch_log()]
    assert forward[1:] == [_direct_kernel(cfg, "forward", dtype)]
    assert forward[0].startswith("mask_ratio_kernel")
    grads = ops().partial_conv2d_backward(go, x, m, w, b is not None, *geo, ALL)
    input_grad = _direct_kernel(cfg, "input_grad", dtype)
    assert input_grad in {_kernel_name(r) for r in host.take_launch_log()}
    grads = tuple(grads[:2]) + ((grads[2],) if b is not None else ())
    _check_result((out, upd, grads), cfg, dtype, x, m, w, b, go)
    check_layouts(cfg, x, w, out, upd, grads[0])
    # The training pair convolves the x * m it keeps for dW with the same kernel, unmasked:
    # the output is the inference output bit for bit.
    train = host_run(cfg, x, m, w, b, go, train=True)
    if m is not None:
        launched = {_kernel_name(r) for r in host.take_launch_log()}
        assert input_grad in launched
        unmasked = dataclasses.replace(cfg, mask="none")
        assert _direct_kernel(unmasked, "forward", dtype) in launched
        assert torch.equal(train[0], out) and torch.equal(train[1], upd)
    _check_result(train, cfg, dtype, x, m, w, b, go)

    with runtime(host, reverse=True):
        again = host_run(cfg, x, m, w, b, go, train=False)
    for e, r in zip((out, upd) + grads, again[:2] + again[2]):
        assert torch.equal(e, r)

    host.take_launch_log()
    monkeypatch.setenv("PCONV_CUDA_DIRECT", "0")
    cudnn = host_run(cfg, x, m, w, b, go, train=False)
    assert not any("few_outputs" in r[0] for r in host.take_launch_log())
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for name, e, r in zip(("output", "updated mask", "grad_input", "grad_weight", "grad_bias"),
                          (out, upd) + grads, cudnn[:2] + cudnn[2]):
        for layout in (torch.contiguous_format, torch.channels_last):
            assert e.is_contiguous(memory_format=layout) == r.is_contiguous(memory_format=layout)
        assert_close_scaled(e, r, tol, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tensor_cores_take_the_16_bit_forward_from_compute_capability_8(host, dtype):
    """In bfloat16 and float16 the 3x3 forward and input gradient of a few-output layer run
    on tensor cores (mma.sync, compute capability 8.0 on); below 8.0, or where the input
    gradient's weight does not fit in shared memory, the CUDA-core tiled kernels take them.
    Both match the reference, and each other within the rounding of float32 sums."""
    cfg = FEW_OUTPUT_CONFIGS[4]  # 400 channels: 25 groups of 16, the weight in 4 chunks
    x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
    t, masked = SCALAR[dtype], str(m is not None).lower()
    results = {}
    for capability, kernel in ((90, f"few_outputs_3x3_mma_forward_kernel<{t}, 4, {masked}>"),
                               (75, f"few_outputs_3x3_forward_kernel<{t}, float, 4, {masked}>")):
        host.set_compute_capability(capability)
        try:
            host.take_launch_log()
            results[capability] = ops().partial_conv2d(x, m, w, b, *geometry(cfg))
            assert kernel in {_kernel_name(r) for r in host.take_launch_log()}
        finally:
            host.set_compute_capability(90)
        # The forward alone: no gradients to check.
        assert_low_precision_matches((*results[capability], ()), cfg, *nchw(x, m, w, b, go))
    assert_close_scaled(results[90][0], results[75][0], 1e-2, "output")
    assert torch.equal(results[90][1], results[75][1])

    # 480 input channels at 4 outputs: the tensor-core input gradient's weight does not fit
    # in shared memory, and the CUDA-core kernel takes it.
    cfg = make_cfg(1, 480, 4, 6, 7, 3, 1, 1, 1, 1, "binary")
    assert not _mma_input_grad_fits(cfg)
    x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
    host.take_launch_log()
    result = host_run(cfg, x, m, w, b, go, train=True)
    assert _direct_kernel(cfg, "input_grad", dtype) in {
        _kernel_name(r) for r in host.take_launch_log()}
    assert_low_precision_matches(result, cfg, *nchw(x, m, w, b, go))

    # 18 tiles of 8 x 64 pixels: with one multiprocessor (16 blocks) blocks take a second
    # tile, and each tile's outputs and input gradients are the same bits.
    cfg = make_cfg(1, 5, 3, 72, 70, 3, 1, 1, 1, 1, "holes")
    x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
    spread = host_run(cfg, x, m, w, b, go, train=False)
    host.take_launch_log()
    with runtime(host, multiprocessors=1):
        wrapped = host_run(cfg, x, m, w, b, go, train=False)
    grids = {_kernel_name(r).split("<")[0]: r[1]
             for r in host.take_launch_log() if "_mma_" in r[0]}
    assert grids == {"few_outputs_3x3_mma_forward_kernel": (16, 1, 1),
                     "few_outputs_3x3_mma_input_grad_kernel": (16, 1, 1)}
    assert torch.equal(spread[0], wrapped[0]) and torch.equal(spread[2][0], wrapped[2][0])
    assert_low_precision_matches(wrapped, cfg, *nchw(x, m, w, b, go))


@pytest.mark.parametrize("value, forward, input_grad", [
    (None, True, True), ("1", True, True), ("0", False, False), ("forward", True, False),
    ("input_grad", False, True)])
def test_direct_kernels_follow_the_variable(host, monkeypatch, value, forward, input_grad):
    """PCONV_CUDA_DIRECT picks the direct kernels of a few-output layer one by one (for
    timing the routes apart); the results stay within rounding of each other."""
    cfg = FEW_OUTPUT_CONFIGS[0]
    x, m, w, b, go = make_inputs(cfg, torch.float64, "cpu")
    if value is None:
        monkeypatch.delenv("PCONV_CUDA_DIRECT", raising=False)
    else:
        monkeypatch.setenv("PCONV_CUDA_DIRECT", value)
    host.take_launch_log()
    result = host_run(cfg, x, m, w, b, go, train=True)
    launched = " ".join(r[0] for r in host.take_launch_log())
    assert ("few_outputs_3x3_forward_kernel" in launched) == forward
    assert ("epilogue_kernel" in launched) == (not forward)
    assert ("few_outputs_3x3_input_grad_kernel" in launched) == input_grad
    assert_matches(result, expected(cfg, x, m, w, b, go), 1e-10)


def test_an_unknown_route_is_an_error(host, monkeypatch):
    cfg = FEW_OUTPUT_CONFIGS[0]
    x, m, w, b, go = make_inputs(cfg, torch.float32, "cpu")
    monkeypatch.setenv("PCONV_CUDA_DIRECT", "fast")
    with pytest.raises(RuntimeError, match="PCONV_CUDA_DIRECT must be 0, 1, forward or "
                                           "input_grad, not 'fast'"):
        ops().partial_conv2d(x, m, w, b, *geometry(cfg))


LOWP = [torch.bfloat16, torch.float16]


def _igemm_kernel(dtype, masked):
    return f"implicit_gemm_forward_kernel<{SCALAR[dtype]}, {str(masked).lower()}>"


def _igemm_input_grad_kernel(dtype):
    return f"implicit_gemm_input_grad_kernel<{SCALAR[dtype]}>"


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("cfg", IGEMM_CONFIGS, ids=str)
def test_implicit_gemm_forward_and_input_grad(host, cfg, dtype, monkeypatch):
    """With PCONV_CUDA_IGEMM=1 a 16-bit 3x3 unit-stride layer with more than 4 outputs
    runs its inference forward as the mask pass and one implicit GEMM on tensor cores that
    masks on load (no x * m, no epilogue), its training forward as the same kernel on the
    x * m it keeps, unmasked (the same bits), and the input gradient of both backward ops as
    the same GEMM on g_raw with the weight flipped, masked at its store (no dx * m pass).
    All match the reference, the same bits with the threads of a block in reverse order,
    and the cuDNN route within rounding, in the same layouts."""
    monkeypatch.setenv("PCONV_CUDA_IGEMM", "1")
    x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
    geo = geometry(cfg)
    host.take_launch_log()
    out, upd = ops().partial_conv2d(x, m, w, b, *geo)
    forward = [_kernel_name(r) for r in host.take_launch_log()]
    assert forward[0].startswith("mask_ratio_kernel")
    assert forward[1:] == [_igemm_kernel(dtype, m is not None)]
    grads = ops().partial_conv2d_backward(go, x, m, w, b is not None, *geo, ALL)
    assert _igemm_input_grad_kernel(dtype) in {_kernel_name(r) for r in host.take_launch_log()}
    grads = tuple(grads[:2]) + ((grads[2],) if b is not None else ())
    _check_result((out, upd, grads), cfg, dtype, x, m, w, b, go)
    check_layouts(cfg, x, w, out, upd, grads[0])

    train = host_run(cfg, x, m, w, b, go, train=True)
    if m is not None:
        launched = [_kernel_name(r) for r in host.take_launch_log()]
        assert _igemm_kernel(dtype, False) in launched
        assert _igemm_input_grad_kernel(dtype) in launched
        assert not any(k.startswith("epilogue_kernel") for k in launched)
        assert torch.equal(train[0], out) and torch.equal(train[1], upd)
    _check_result(train, cfg, dtype, x, m, w, b, go)

    with runtime(host, reverse=True):
        again = host_run(cfg, x, m, w, b, go, train=False)
    for e, r in zip((out, upd) + grads, again[:2] + again[2]):
        assert torch.equal(e, r)

    monkeypatch.setenv("PCONV_CUDA_IGEMM", "0")
    host.take_launch_log()
    cudnn = host_run(cfg, x, m, w, b, go, train=False)
    assert not any("implicit_gemm" in r[0] for r in host.take_launch_log())
    for name, e, r in zip(("output", "updated mask", "grad_input", "grad_weight", "grad_bias"),
                          (out, upd) + grads, cudnn[:2] + cudnn[2]):
        assert e.stride() == r.stride(), name
        assert_close_scaled(e, r, 1e-2, name)
    assert torch.equal(cudnn[1], upd)


ON = (True, True)


@pytest.mark.parametrize("value, dtype, capability, cfg, taken", [
    ("1", torch.bfloat16, 90, IGEMM_CONFIGS[0], ON),
    ("forward", torch.bfloat16, 90, IGEMM_CONFIGS[0], (True, False)),
    ("input_grad", torch.float16, 90, IGEMM_CONFIGS[0], (False, True)),
    (None, torch.bfloat16, 90, IGEMM_CONFIGS[0], (False, False)),
    ("0", torch.float16, 90, IGEMM_CONFIGS[0], (False, False)),
    ("1", torch.float32, 90, IGEMM_CONFIGS[0], (False, False)),
    ("1", torch.bfloat16, 75, IGEMM_CONFIGS[0], (False, False)),
    ("1", torch.float16, 80, IGEMM_CONFIGS[0], ON),
    ("1", torch.bfloat16, 90, make_cfg(2, 16, 32, 16, 16, 3, 2, 1, 1, 1, "holes"), (False, False)),
    ("1", torch.bfloat16, 90, make_cfg(2, 16, 32, 16, 16, 3, 1, 2, 2, 1, "holes"), (False, False)),
    ("1", torch.bfloat16, 90, make_cfg(2, 16, 32, 16, 16, 5, 1, 2, 1, 1, "holes"), (False, False)),
    ("1", torch.bfloat16, 90, make_cfg(2, 16, 32, 16, 16, 3, 1, 1, 1, 2, "holes"), (False, False)),
    # Padding 3 and 0: the input gradient's GEMM pads by -1 and by 2.
    ("1", torch.bfloat16, 90, make_cfg(1, 16, 8, 6, 7, 3, 1, 3, 1, 1, "holes"), ON),
    ("1", torch.float16, 90, make_cfg(1, 8, 16, 7, 9, 3, 1, 0, 1, 1, "soft", multi=True,
                                      layout="channels_last"), ON),
], ids=["on", "forward", "input_grad", "unset", "off", "float32", "sm75", "sm80", "stride2",
        "dilation2", "5x5", "groups2", "pad3", "pad0"])
def test_implicit_gemm_takes_only_its_layers(host, monkeypatch, value, dtype, capability, cfg,
                                             taken):
    """The implicit-GEMM forward and input gradient run only where PCONV_CUDA_IGEMM names
    them (1 both), on 16-bit inputs on compute capability 8.0 and later, for 3x3
    unit-stride, undilated, ungrouped layers; every other layer keeps cuDNN with its
    epilogue and its dx * m, and all match the reference."""
    if value is None:
        monkeypatch.delenv("PCONV_CUDA_IGEMM", raising=False)
    else:
        monkeypatch.setenv("PCONV_CUDA_IGEMM", value)
    x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
    host.set_compute_capability(capability)
    try:
        host.take_launch_log()
        result = host_run(cfg, x, m, w, b, go, train=False)
        launched = " ".join(r[0] for r in host.take_launch_log())
    finally:
        host.set_compute_capability(90)
    assert ("implicit_gemm_forward_kernel" in launched) == taken[0]
    assert ("epilogue_kernel" in launched) == (not taken[0])
    assert ("implicit_gemm_input_grad_kernel" in launched) == taken[1]
    _check_result(result, cfg, dtype, x, m, w, b, go)


def test_implicit_gemm_variable_names_a_route(host, monkeypatch):
    cfg = IGEMM_CONFIGS[0]
    x, m, w, b, go = make_inputs(cfg, torch.bfloat16, "cpu")
    monkeypatch.setenv("PCONV_CUDA_IGEMM", "yes")
    with pytest.raises(RuntimeError, match="PCONV_CUDA_IGEMM must be 0, 1, forward or "
                                           "input_grad, not 'yes'"):
        ops().partial_conv2d(x, m, w, b, *geometry(cfg))


def test_implicit_gemm_blocks_take_several_tiles(host, monkeypatch):
    """18 tiles of 8 x 32 pixels by 64 outputs (two output tiles for 72 channels): with one
    multiprocessor the grid has 8 blocks, each takes two or three tiles, and the output is
    the same bits as with a block per tile."""
    monkeypatch.setenv("PCONV_CUDA_IGEMM", "1")
    cfg = make_cfg(1, 20, 72, 24, 70, 3, 1, 1, 1, 1, "holes", multi=True)
    x, m, w, b, go = make_inputs(cfg, torch.bfloat16, "cpu")
    with runtime(host, multiprocessors=3):  # 24 blocks: one tile each
        spread = ops().partial_conv2d(x, m, w, b, *geometry(cfg))
    host.take_launch_log()
    with runtime(host, multiprocessors=1):
        wrapped = ops().partial_conv2d(x, m, w, b, *geometry(cfg))
    grids = [r[1] for r in host.take_launch_log() if "implicit_gemm" in r[0]]
    assert grids == [(8, 1, 1)]
    assert torch.equal(spread[0], wrapped[0])
    assert_low_precision_matches((*wrapped, ()), cfg, *nchw(x, m, w, b, go))


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "reversed"])
def test_blocks_that_loop_over_several_tiles(host, reverse):
    """With one multiprocessor the mask pass gets 64 blocks for 80 tiles (5 planes of 16
    tiles of 32 x 8), so blocks stage a second footprint over the first one: the barrier
    before staging keeps it from overwriting values still being summed."""
    cfg = make_cfg(5, 3, 4, 64, 64, 3, 1, 1, 1, 1, "holes", multi=True)
    x, m, w, b, go = make_inputs(cfg, torch.float64, "cpu")
    host.take_launch_log()
    with runtime(host, multiprocessors=1, reverse=reverse):
        result = host_run(cfg, x, m, w, b, go, train=True)
    mask_launch = next(r for r in host.take_launch_log() if "mask_ratio_kernel" in r[0])
    assert mask_launch[1] == (64, 1, 1) and mask_launch[2] == (32, 8, 1)
    assert_matches(result, expected(cfg, x, m, w, b, go), 1e-10)


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=str)
def test_thread_order_does_not_matter(host, cfg):
    """Threads run in reverse between barriers: a shared-memory read that races with
    another thread's write would change a result bit."""
    x, m, w, b, go = make_inputs(cfg, torch.float32, "cpu")
    forward = host_run(cfg, x, m, w, b, go, train=True)
    with runtime(host, reverse=True):
        backward = host_run(cfg, x, m, w, b, go, train=True)
    for a, e in zip(forward[:2] + forward[2], backward[:2] + backward[2]):
        assert torch.equal(a, e)


def test_backward_output_mask_and_empty_grads(host):
    cfg = make_cfg(2, 4, 6, 9, 9, 3, 1, 1, 1, 2, "soft", multi=True)
    x, m, w, b, go = make_inputs(cfg, torch.float32, "cpu")
    geo = geometry(cfg)
    full = ops().partial_conv2d_backward(go, x, m, w, True, *geo, ALL)
    for i in range(3):
        want = [j == i for j in range(3)]
        part = ops().partial_conv2d_backward(go, x, m, w, True, *geo, want)
        for j in range(3):
            if want[j]:
                torch.testing.assert_close(part[j], full[j], atol=0, rtol=0)
            else:
                assert part[j].shape == (0,)
    assert ops().partial_conv2d_backward(go, x, m, w, False, *geo, ALL)[2].shape == (0,)


@pytest.mark.parametrize("mask_batch", [0, 1])
def test_empty_batch(host, mask_batch):
    x = torch.randn(0, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    b = torch.randn(4)
    m = torch.ones(mask_batch, 1, 8, 8)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    out, upd = ops().partial_conv2d(x, m, w, b, *geo)
    assert out.shape == (0, 4, 8, 8) and upd.shape == (0, 1, 8, 8)
    go = torch.randn(0, 4, 8, 8)
    gx, gw, gb = ops().partial_conv2d_backward(go, x, m, w, True, *geo, ALL)
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (4,)
    assert (gw == 0).all() and (gb == 0).all()


def test_host_build_takes_cpu_tensors_only(host):
    x = torch.randn(1, 3, 8, 8, device="meta")
    w = torch.randn(4, 3, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match="the CUDA kernel got input on meta"):
        ops().partial_conv2d(x, None, w, None, [1, 1], [1, 1], [1, 1], 1)


# -------------------------------------------------- the fake kernels' view of the outputs

def _meta(t):
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                      device="meta")


def _assert_same_meta(real, fake, what):
    """Shape, dtype and strides (of the dimensions longer than 1, the only ones a layout
    fixes) of a kernel's output and of the fake kernel's."""
    assert real.shape == fake.shape and real.dtype == fake.dtype, (what, real, fake)
    for dim, size in enumerate(real.shape):
        if size > 1:
            assert real.stride(dim) == fake.stride(dim), (what, real.stride(), fake.stride())


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=str)
def test_fake_kernels_describe_the_cuda_outputs(host, cfg):
    """torch.compile and opcheck trust the fake kernels (pconv_cuda/ops.py) for the outputs'
    shapes, dtypes and layouts; the CUDA op code must give exactly those. Meta tensors take
    the fakes' non-CPU branch, which is the CUDA one."""
    from pconv_cuda import ops as fakes

    x, m, w, b, go = make_inputs(cfg, torch.float32, "cpu")
    geo = geometry(cfg)
    meta = [_meta(t) for t in (x, m, w, b, go)]
    real = ops().partial_conv2d(x, m, w, b, *geo)
    for name, r, f in zip(("output", "updated mask"), real,
                          fakes._partial_conv2d_fake(*meta[:4], *geo)):
        _assert_same_meta(r, f, name)
    real = ops().partial_conv2d_backward(go, x, m, w, b is not None, *geo, ALL)
    fake = fakes._partial_conv2d_backward_fake(meta[4], *meta[:3], b is not None, *geo, ALL)
    for name, r, f in zip(("grad_input", "grad_weight", "grad_bias"), real, fake):
        _assert_same_meta(r, f, name)
    if m is None:
        return
    real = ops().partial_conv2d_train(x, m, w, b, *geo)
    fake = fakes._partial_conv2d_train_fake(*meta[:4], *geo)
    for name, r, f in zip(("output", "updated mask", "x * m", "ratio", "update"), real, fake):
        _assert_same_meta(r, f, name)
    fmt = suggest_memory_format(x)
    saved = (real[2], m, real[3], real[4])  # x * m, mask, ratio, update
    back = ops().partial_conv2d_train_backward(go, *saved, w, b is not None, *geo, ALL, fmt)
    fake = fakes._partial_conv2d_train_backward_fake(meta[4], *(_meta(t) for t in saved),
                                                     meta[2], b is not None, *geo, ALL, fmt)
    for name, r, f in zip(("grad_input", "grad_weight", "grad_bias"), back, fake):
        _assert_same_meta(r, f, name)


# ------------------------------------------------------------ every kernel, every path

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ACC = {torch.float64: "double", torch.float32: "float", torch.float16: "float",
       torch.bfloat16: "float"}
SCALAR = {torch.float64: "double", torch.float32: "float", torch.float16: "c10::Half",
          torch.bfloat16: "c10::BFloat16"}
VEC = {torch.float64: 2, torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}


def expected_kernels(dtype):
    """Every kernel instantiation a launcher can pick for dtype, by the name the runtime
    logs (template arguments as the demangler prints them)."""
    t, a, v = SCALAR[dtype], ACC[dtype], VEC[dtype]
    names = set()
    for has_mask, staged in ((False, False), (True, True), (True, False)):
        names.add(f"mask_ratio_kernel<{t}, {a}, {str(has_mask).lower()}, {str(staged).lower()}>")
    # A multi-channel mask of x's layout: the masking sums its channels, and the mask pass
    # reads that sum (in the ratio dtype).
    for staged in (True, False):
        names.add(f"mask_ratio_kernel<{a}, {a}, true, {str(staged).lower()}>")
    for vec, cl in itertools.product((v, 1), (True, False)):
        names.add(f"masked_input_kernel<{t}, {a}, {vec}, {str(cl).lower()}>")
    for vec, cl in itertools.product((v, 1), (True, False)):
        names.add(f"epilogue_kernel<{t}, {a}, {vec}, {str(cl).lower()}>")
    for vec in (v, 1):
        names.add(f"grad_prologue_nchw_kernel<{t}, {a}, {vec}, 4>")
        names.add(f"grad_prologue_cl_kernel<{t}, {a}, {vec}>")
    names.add(f"bias_grad_finalize_kernel<{t}, {a}>")
    for outputs, has_mask in itertools.product((1, 2, 3, 4), ("true", "false")):
        names.add(f"few_outputs_forward_kernel<{t}, {a}, {outputs}, {has_mask}>")
        if dtype in (torch.float16, torch.bfloat16):
            for which in ("forward", "input_grad"):
                names.add(f"few_outputs_3x3_mma_{which}_kernel<{t}, {outputs}, {has_mask}>")
        else:
            names.add(f"few_outputs_3x3_forward_kernel<{t}, {a}, {outputs}, {has_mask}>")
            names.add(f"few_outputs_3x3_input_grad_kernel<{t}, {a}, {outputs}, {has_mask}>")
        names.add(f"few_outputs_input_grad_kernel<{t}, {a}, {outputs}, {has_mask}>")
    return names


# Reaches every path: NCHW and channels_last, inner sizes that are and are not multiples
# of the vector width, no mask, a footprint too large for shared memory.
COVERAGE_CONFIGS = [
    make_cfg(2, 3, 8, 16, 16, 3, 1, 1, 1, 1, "binary"),  # H'W' = 256: vectorised NCHW
    make_cfg(2, 3, 5, 13, 11, 3, (2, 1), 1, 1, 1, "soft", multi=True),  # 77: scalar NCHW
    make_cfg(2, 3, 16, 12, 12, 3, 1, 1, 1, 1, "holes", layout="channels_last"),  # C 16: vector
    make_cfg(2, 3, 5, 12, 12, 3, 1, 1, 1, 1, "holes", mb1=True, layout="channels_last"),  # C 5
    make_cfg(1, 2, 4, 9, 9, 3, 1, 1, 1, 1, "none"),
    make_cfg(1, 2, 3, 24, 40, 3, 1, 95, 100, 1, "binary"),  # unstaged mask pass
    # Multi-channel masks of x's layout, summed by the masking: the plane of 256 and the
    # 16 channels take vectors, the plane of 143 and the 5 channels do not; the dilation
    # of 100 leaves the mask pass over that sum unstaged.
    make_cfg(2, 3, 8, 16, 16, 3, 1, 1, 1, 1, "holes", multi=True),
    make_cfg(2, 16, 8, 12, 12, 3, 1, 1, 1, 1, "soft", multi=True, layout="channels_last"),
    make_cfg(2, 5, 4, 12, 12, 3, 1, 1, 1, 1, "binary", multi=True, layout="channels_last"),
    make_cfg(1, 2, 3, 24, 40, 3, 1, 95, 100, 1, "binary", multi=True),
    # The direct kernels of 1 to 4 output channels, with a mask and without: the 3x3
    # forward of unit stride (C_out 4 with a mask is above) and, at stride 2, the forward
    # of one pixel per thread (C_out 3 with a mask is above, at dilation 100).
    make_cfg(2, 3, 1, 9, 9, 3, 1, 1, 1, 1, "soft"),
    make_cfg(1, 3, 2, 9, 9, 3, 1, 1, 1, 1, "binary", multi=True, layout="channels_last"),
    make_cfg(1, 3, 3, 9, 10, 3, 1, 1, 1, 1, "holes"),
    make_cfg(1, 2, 1, 8, 8, 3, 1, 1, 1, 1, "none"),
    make_cfg(1, 2, 2, 8, 8, 3, 1, 1, 1, 1, "none"),
    make_cfg(1, 2, 3, 8, 8, 3, 1, 1, 1, 1, "none"),
    make_cfg(1, 2, 1, 9, 9, 3, 2, 1, 1, 1, "binary"),
    make_cfg(1, 2, 2, 9, 9, 3, 2, 1, 1, 1, "soft", multi=True),
    make_cfg(1, 2, 4, 9, 9, 3, 2, 1, 1, 1, "holes", layout="channels_last"),
    make_cfg(1, 2, 1, 8, 8, 3, 2, 1, 1, 1, "none"),
    make_cfg(1, 2, 2, 8, 8, 3, 2, 1, 1, 1, "none"),
    make_cfg(1, 2, 3, 8, 8, 3, 2, 1, 1, 1, "none"),
    make_cfg(1, 2, 4, 8, 8, 3, 2, 1, 1, 1, "none"),
]


def _kernel_name(record):
    name = record[0]
    return name[len("void pconv::cuda::"):name.index("(")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_kernel_instantiation_runs_and_matches(host, dtype):
    """The configurations above launch every instantiation the launchers can pick, each
    result matching the reference; the log shows which ran, and with which shapes."""
    host.take_launch_log()
    for cfg, train in itertools.product(COVERAGE_CONFIGS, (True, False)):
        x, m, w, b, go = make_inputs(cfg, dtype, "cpu")
        result = host_run(cfg, x, m, w, b, go, train=train)
        if dtype in (torch.float16, torch.bfloat16):
            assert_low_precision_matches(result, cfg, *nchw(x, m, w, b, go))
        else:
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            assert_matches(result, expected(cfg, x, m, w, b, go), tol)
    launched = {_kernel_name(r) for r in host.take_launch_log()}
    missing = expected_kernels(dtype) - launched
    assert not missing, f"never launched: {sorted(missing)}"
    assert launched <= expected_kernels(dtype), sorted(launched - expected_kernels(dtype))
