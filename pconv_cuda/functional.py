"""Functional API of the fused partial convolution."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules.utils import _pair

from . import reference

__all__ = ["partial_conv2d"]

_op = torch.ops.pconv.partial_conv2d.default


def _autograd_outside_the_op() -> bool:
    """True under a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``vmap``,
    ``jvp``, ...) or inside ``torch.autograd.forward_ad.dual_level()``. The op's autograd is
    a C++ Function, which neither supports, so there the layer runs the reference (same
    results, plain PyTorch ops that both know). ``torch.compile`` traces the op itself."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


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
    """Fused partial convolution (``shared/DESIGN.md`` §1).

    Args:
        input: ``[N, C_in, H, W]`` floating point, NCHW or channels_last.
        mask: ``[N or 1, 1, H, W]`` (single-channel) or ``[N or 1, C_in, H, W]``
            (multi-channel), values in [0, 1] with 1 = known pixel and 0 = hole, same dtype
            and device as ``input`` (a bool mask is converted). A leading 1 broadcasts over
            the batch. ``None`` means all ones: partial-convolution padding.
        weight: ``[C_out, C_in / groups, kh, kw]``.
        bias: ``[C_out]`` or ``None``.
        stride, padding, dilation: an int or a pair, as in ``torch.nn.functional.conv2d``
            (padding is zeros and counts as hole).
        groups: as in ``torch.nn.functional.conv2d``.

    Returns:
        ``(output, updated_mask)``: output ``[N, C_out, H', W']`` in the input's dtype, in
        ``torch.nn.functional.conv2d``'s memory format (channels_last when the input or the
        weight is, else NCHW; the input's gradient comes back in the input's);
        updated_mask ``[N, 1, H', W']``, 1 where the window saw any known pixel (between 0
        and 1 for soft masks).
    """
    # (Under torch.fx symbolic tracing the mask is a proxy: the op checks its dtype.)
    if mask is not None and not is_fx_symbolic_tracing() and not mask.is_floating_point():
        if mask.dtype != torch.bool:
            raise TypeError(
                f"partial_conv2d: mask has dtype {mask.dtype}; pass a floating-point (or bool) "
                "mask with values in [0, 1], 1 = known and 0 = hole (an 8-bit image mask is "
                "0/255: divide it by 255)")
        mask = mask.to(input.dtype)
    if _autograd_outside_the_op():
        return reference.partial_conv2d(input, mask, weight, bias, stride, padding, dilation,
                                        groups)
    # Which tensors the backward keeps (x * m and the ratio when a weight gradient is
    # wanted, else the input) is decided by the op's autograd (csrc/autograd.cpp).
    return _op(input, mask, weight, bias, _pair(stride), _pair(padding), _pair(dilation),
               groups)
