"""Fake kernels of the pconv ops.

The ops themselves (schema, CPU and CUDA kernels, argument checks, autograd, autocast) live
in the compiled library; this module gives the dispatcher what C++ does not: the shapes,
dtypes and layouts of the outputs, for tracing (``torch.compile``, ``opcheck``).
"""
from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

# The version of what these fakes say about the outputs (their layouts above all). Inductor
# keys its on-disk caches by a graph's code, not by the fake kernels of the custom ops in
# it (torch 2.13), so a graph compiled under fakes that described other layouts would be
# loaded after an upgrade and fail a stride assertion when it runs. This tag joins the key
# (torch.compiler.config.cache_key_tag, after any tag already set): bump it with every
# change of the outputs' shapes, dtypes or strides.
FAKE_CONTRACT = "pconv-outputs-2"


def _tag_compile_caches() -> None:
    config = torch.compiler.config
    tags = [t for t in config.cache_key_tag.split(";") if t]
    if FAKE_CONTRACT not in tags:
        config.cache_key_tag = ";".join(tags + [FAKE_CONTRACT])


_tag_compile_caches()


def _out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_format(input, weight):
    # conv_output_format of the C++ op, ATen's rule for convolutions: channels_last when the
    # input or the weight is.
    if torch.channels_last in (suggest_memory_format(input), suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


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
    fmt = _output_format(input, weight)
    out = input.new_empty((n, weight.shape[0], out_h, out_w)).contiguous(memory_format=fmt)
    update = input.new_empty((n, 1, out_h, out_w))
    return out, update


def _ratio_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_MAX_CHANNELS_FOR_CHANNELS_LAST = 8  # as in the CPU kernel
_MIN_PLANE_FOR_CHANNELS_LAST = 64 * 64
_MIN_FLOAT_CHANNELS_FOR_CHANNELS_LAST = 8


def _compute_format(input, weight, stride, groups):
    # Mirrors compute_format of the CPU kernel (the layout x * m is kept in); on the GPU
    # x * m has the output's layout.
    fmt = _output_format(input, weight)
    if input.device.type != "cpu":
        return fmt
    if input.shape[1] == 1 or tuple(weight.shape[2:]) == (1, 1):
        return torch.contiguous_format
    if fmt == torch.channels_last:
        return fmt
    large_plane = (input.shape[2] * input.shape[3] >= _MIN_PLANE_FOR_CHANNELS_LAST
                   and (input.element_size() == 2
                        or (max(stride) > 1
                            and input.shape[1] >= _MIN_FLOAT_CHANNELS_FOR_CHANNELS_LAST)))
    if groups == 1 and (weight.shape[0] <= _MAX_CHANNELS_FOR_CHANNELS_LAST or large_plane):
        return torch.channels_last
    return torch.contiguous_format


_MAX_DIRECT_OUTPUTS = 4  # as in the CPU direct convolution
_MAX_DIRECT_INPUTS = 4


def _direct_conv_layer(input, mask, weight, stride, groups, out_plane):
    # Mirrors direct_conv_takes_layer of the CPU kernel: the layers whose x * m the
    # training forward keeps NCHW.
    if groups != 1 or input.shape[0] == 0 or out_plane == 0:
        return False
    few_inputs = (input.shape[1] <= _MAX_DIRECT_INPUTS and max(stride) > 1
                  and input.dtype in (torch.float32, torch.float64)
                  and torch.backends.cpu.get_cpu_capability() == "AVX512"
                  and _output_format(input, weight) == torch.contiguous_format)
    if weight.shape[0] > _MAX_DIRECT_OUTPUTS and not few_inputs:
        return False
    return input.is_contiguous() and (mask is None or mask.is_contiguous())


def _masked_input_format(input, mask, weight, stride, groups, out_plane):
    """The layout the training forward keeps x * m in."""
    if (input.device.type == "cpu" and input.element_size() >= 4
            and _direct_conv_layer(input, mask, weight, stride, groups, out_plane)):
        return torch.contiguous_format
    return _compute_format(input, weight, stride, groups)


@torch.library.register_fake("pconv::partial_conv2d_train")
def _partial_conv2d_train_fake(input, mask, weight, bias, stride, padding, dilation, groups):
    out, update = _partial_conv2d_fake(input, mask, weight, bias, stride, padding, dilation,
                                       groups)
    masked = input.new_empty(input.shape).contiguous(memory_format=_masked_input_format(
        input, mask, weight, stride, groups, out.shape[2] * out.shape[3]))
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


@torch.library.register_fake("pconv::partial_conv2d_train_backward")
def _partial_conv2d_train_backward_fake(grad_output, masked_input, mask, ratio, update, weight,
                                        has_bias, stride, padding, dilation, groups, output_mask,
                                        input_format=None):
    grads = _partial_conv2d_backward_fake(grad_output, masked_input, mask, weight, has_bias,
                                          stride, padding, dilation, groups, output_mask)
    if output_mask[0] and input_format is not None:
        grads = (grads[0].contiguous(memory_format=input_format),) + grads[1:]
    return grads
