"""Python-side registrations of the pconv ops: fake kernels, autograd and autocast.

The ops themselves (schema, CPU and CUDA kernels, argument checks) live in the compiled
library; this module teaches the dispatcher what it cannot learn from C++: output shapes
for tracing (``torch.compile``, ``opcheck``), the backward, and autocast casting.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

_lib = torch.library.Library("pconv", "FRAGMENT")
_forward = torch.ops.pconv.partial_conv2d.default
_backward = torch.ops.pconv.partial_conv2d_backward.default
_train_forward = torch.ops.pconv.partial_conv2d_train.default
_train_backward = torch.ops.pconv.partial_conv2d_train_backward.default


def _out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.register_fake("pconv::partial_conv2d")
def _partial_conv2d_fake(input, mask, weight, bias, stride, padding, dilation, groups):
    # Shape and dtype checks live in the C++ op alone (a traced graph reports them when it
    # runs); devices are checked here too, since mixed devices never reach a C++ kernel.
    for name, t in (("weight", weight), ("bias", bias), ("mask", mask)):
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"partial_conv2d: {name} is on {t.device} but input is on {input.device}")
    n, _, h, w = input.shape
    out_h = _out_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
    out_w = _out_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
    fmt = suggest_memory_format(input)
    out = input.new_empty((n, weight.shape[0], out_h, out_w)).contiguous(memory_format=fmt)
    update = input.new_empty((n, 1, out_h, out_w))
    return out, update


def _ratio_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_MAX_CHANNELS_FOR_CHANNELS_LAST = 8  # as in the CPU kernel


def _compute_format(input, weight, groups):
    # Mirrors compute_format of the CPU kernel (the layout x * m is kept in); on the GPU
    # x * m has the input's layout.
    fmt = suggest_memory_format(input)
    if input.device.type != "cpu":
        return fmt
    if input.shape[1] == 1 or tuple(weight.shape[2:]) == (1, 1):
        return torch.contiguous_format
    if fmt == torch.channels_last:
        return fmt
    if groups == 1 and weight.shape[0] <= _MAX_CHANNELS_FOR_CHANNELS_LAST:
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("pconv::partial_conv2d_train")
def _partial_conv2d_train_fake(input, mask, weight, bias, stride, padding, dilation, groups):
    out, update = _partial_conv2d_fake(input, mask, weight, bias, stride, padding, dilation,
                                       groups)
    masked = input.new_empty(input.shape).contiguous(
        memory_format=_compute_format(input, weight, groups))
    stats_shape = (mask.shape[0], 1, out.shape[2], out.shape[3])
    ratio = input.new_empty(stats_shape, dtype=_ratio_dtype(input.dtype))
    return out, update, masked, ratio, torch.empty_like(ratio)


@torch.library.register_fake("pconv::partial_conv2d_backward")
def _partial_conv2d_backward_fake(grad_output, input, mask, weight, has_bias, stride, padding,
                                  dilation, groups, output_mask):
    empty = (0,)
    grad_input = (input.new_empty(input.shape).contiguous(memory_format=suggest_memory_format(input))
                  if output_mask[0] else input.new_empty(empty))
    grad_weight = (weight.new_empty(weight.shape).contiguous(
        memory_format=suggest_memory_format(weight)) if output_mask[1] else weight.new_empty(empty))
    grad_bias = (input.new_empty((weight.shape[0],)) if output_mask[2] and has_bias
                 else input.new_empty(empty))
    return grad_input, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    input, mask, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, mask, weight)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _wanted_grads(ctx) -> list[bool]:
    """output_mask of the backward ops: gradients of (input, weight, bias)."""
    needs = ctx.needs_input_grad
    return [needs[0], needs[2], bool(needs[3]) and ctx.has_bias]


def _forward_input_grads(want, grads=(None, None, None)):
    """The gradients of the forward's 8 inputs (input, mask, weight, bias, geometry)."""
    grad_input, grad_weight, grad_bias = grads
    return (grad_input if want[0] else None, None, grad_weight if want[1] else None,
            grad_bias if want[2] else None, None, None, None, None)


def _backward_fn(ctx, grad_output: Tensor, _grad_update: Tensor):
    input, mask, weight = ctx.saved_tensors
    want = _wanted_grads(ctx)
    if grad_output is None or not any(want):
        return _forward_input_grads([False] * 3)
    return _forward_input_grads(want, _backward(
        grad_output, input, mask, weight, ctx.has_bias, *ctx.conv_args, want))


torch.library.register_autograd("pconv::partial_conv2d", _backward_fn, setup_context=_setup_context)


@torch.library.register_fake("pconv::partial_conv2d_train_backward")
def _partial_conv2d_train_backward_fake(grad_output, masked_input, mask, ratio, update, weight,
                                        has_bias, stride, padding, dilation, groups, output_mask,
                                        input_format=None):
    grads = _partial_conv2d_backward_fake(grad_output, masked_input, mask, weight, has_bias,
                                          stride, padding, dilation, groups, output_mask)
    if output_mask[0] and input_format is not None:
        grads = (grads[0].contiguous(memory_format=input_format),) + grads[1:]
    return grads


def _train_setup_context(ctx, inputs, output):
    input, mask, weight, bias, stride, padding, dilation, groups = inputs
    _, update, masked, ratio, update_acc = output
    ctx.save_for_backward(masked, mask, ratio, update_acc, weight)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups)
    # x * m has the layout the convolution ran in, which may differ from the input's.
    ctx.input_format = suggest_memory_format(input)
    ctx.mark_non_differentiable(update, masked, ratio, update_acc)
    # Otherwise autograd fills an input-sized zero tensor for the gradient of x * m.
    ctx.set_materialize_grads(False)


def _train_backward_fn(ctx, grad_output, _g_update, _g_masked, _g_ratio, _g_update_acc):
    masked, mask, ratio, update_acc, weight = ctx.saved_tensors
    want = _wanted_grads(ctx)
    if grad_output is None or not any(want):
        return _forward_input_grads([False] * 3)
    return _forward_input_grads(want, _train_backward(
        grad_output, masked, mask, ratio, update_acc, weight, ctx.has_bias, *ctx.conv_args, want,
        ctx.input_format))


torch.library.register_autograd("pconv::partial_conv2d_train", _train_backward_fn,
                                setup_context=_train_setup_context)


def _register_autocast(device_type: str) -> None:
    """Run the op in the autocast dtype of ``device_type`` (the ratio stays float32 inside
    the kernels). Unlike torch.library.register_autocast, the target dtype is read when the
    op runs, so bfloat16 and float16 autocast both work."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def cast(t, dtype):
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    for name, op in (("partial_conv2d", _forward), ("partial_conv2d_train", _train_forward)):
        def kernel(_keyset, input, mask, weight, bias, stride, padding, dilation, groups, op=op):
            dtype = torch.get_autocast_dtype(device_type)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
                return op(cast(input, dtype), cast(mask, dtype), cast(weight, dtype),
                          cast(bias, dtype), stride, padding, dilation, groups)

        _lib.impl(name, kernel, key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)
