"""Partial convolution in plain PyTorch: the oracle every kernel is tested against.

Two formulations of the same operation (``shared/DESIGN.md`` §1), both stateless:

* :func:`partial_conv2d` follows the published NVIDIA ``PartialConv2d`` step by step: the
  window sum is a convolution of the mask with a ones kernel (a full ``C_in -> C_out``
  convolution in multi-channel mode), the bias is added by the convolution, taken away,
  and added back after renormalisation. It is the reference of the parity tests and the
  "reference" column of the benchmarks.
* :func:`lean_partial_conv2d` is the leaner pure-PyTorch style: the window sum of the
  channel-summed mask by a ``1 -> 1`` convolution and a ``[N, 1, H', W']`` ratio that
  broadcasts, applied with in-place ops. Benchmarks measure it as a competitor.

Mask convention: 1 = known pixel, 0 = hole, values in [0, 1]; shape ``[N or 1, 1, H, W]``
(single-channel) or ``[N or 1, C_in, H, W]`` (multi-channel); ``None`` means all ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = ["partial_conv2d", "lean_partial_conv2d", "ratio_dtype"]

EPS = 1e-8


def ratio_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the window sum and ratio for inputs of ``dtype``: float64 or float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
           groups: int = 1) -> Tensor:
    """:func:`torch.nn.functional.conv2d`, with the way around a bug of torch 2.13's CPU
    bfloat16 convolution that the op's kernels take too (``convolution_without_bias`` in
    ``csrc/pconv.h``): with one output column and a column stride over 1, about half the
    calls return wrong values, some NaN. One output column does not depend on the column
    stride, so the convolution runs with stride 1 there and keeps its first column."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and stride[1] > 1:
        out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
        if out_w == 1:
            return F.conv2d(x, weight, bias, (stride[0], 1), padding, dilation, groups)[..., :1]
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def partial_conv2d(
    input: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Partial convolution, NVIDIA formulation.

    Args:
        input: ``[N, C_in, H, W]``.
        mask: ``[N or 1, 1 or C_in, H, W]``, 1 = known, 0 = hole; ``None`` = all ones.
        weight: ``[C_out, C_in / groups, kh, kw]``; bias: ``[C_out]`` or ``None``.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`.

    Returns:
        ``(output [N, C_out, H', W'], updated_mask [N, 1, H', W'])`` in the input's dtype.
    """
    n, c_in, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    acc = ratio_dtype(input.dtype)
    m = torch.ones(1, 1, h, w, dtype=acc, device=input.device) if mask is None else mask.to(acc)
    mask_channels = m.shape[1]
    # As published: multi-channel masks go through a full C_in -> C_out conv of ones.
    ones = torch.ones(c_out if mask_channels > 1 else 1, mask_channels, kh, kw,
                      dtype=acc, device=input.device)
    with torch.no_grad():
        window_sum = F.conv2d(m, ones, None, stride, padding, dilation)
        ratio = (mask_channels * kh * kw) / (window_sum + EPS)
        update = torch.clamp(window_sum, 0, 1)
        ratio = ratio * update
    # The mask is not differentiable (DESIGN.md §1), here as in the op.
    x = input if mask is None else input * mask.detach().to(input.dtype)
    raw = conv2d(x, weight, bias, stride, padding, dilation, groups)
    if bias is not None:
        b = bias.view(1, c_out, 1, 1)
        out = ((raw - b) * ratio + b) * update
    else:
        out = raw * ratio
    update = update[:, :1].expand(n, 1, -1, -1).to(input.dtype)
    return out.to(input.dtype), update


def lean_partial_conv2d(
    input: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Partial convolution, lean pure-PyTorch style (same arguments and results as
    :func:`partial_conv2d`): single-channel window sum, broadcast ratio, in-place ops."""
    n, c_in, h, w = input.shape
    kh, kw = weight.shape[2:]
    acc = ratio_dtype(input.dtype)
    m = torch.ones(1, 1, h, w, dtype=acc, device=input.device) if mask is None else mask
    mask_channels = m.shape[1]
    with torch.no_grad():
        m1 = m.to(acc).sum(1, keepdim=True) if mask_channels > 1 else m.to(acc)
        ones = torch.ones(1, 1, kh, kw, dtype=acc, device=input.device)
        window_sum = F.conv2d(m1, ones, None, stride, padding, dilation)
        update = window_sum.clamp(0, 1)
        ratio = window_sum.add_(EPS).reciprocal_().mul_(mask_channels * kh * kw).mul_(update)
    x = input if mask is None else input * mask.detach()
    out = conv2d(x, weight, None, stride, padding, dilation, groups)
    if bias is not None:
        out = (out * ratio.to(out.dtype) + bias.view(1, -1, 1, 1)) * update.to(out.dtype)
    else:
        out = out * ratio.to(out.dtype)
    return out, update.to(input.dtype).expand(n, 1, -1, -1)

