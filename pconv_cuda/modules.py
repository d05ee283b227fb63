"""``PartialConv2d``: a drop-in for ``nn.Conv2d`` and for NVIDIA's published layer."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from . import functional, reference

__all__ = ["PartialConv2d", "ReferencePartialConv2d", "LeanPartialConv2d"]


class PartialConv2d(nn.Conv2d):
    """Partial convolution layer (Liu et al. 2018) on the fused op.

    Takes every ``nn.Conv2d`` argument (``padding_mode`` must be ``'zeros'``: padding is
    treated as hole) plus, as NVIDIA's ``PartialConv2d``:

    * ``multi_channel`` -- the mask has ``C_in`` channels (``[N, C_in, H, W]``) instead of
      one (``[N, 1, H, W]``); the window size counts every channel.
    * ``return_mask`` -- ``forward`` returns ``(output, updated_mask)`` instead of the output.

    ``forward(input [N, C_in, H, W] or unbatched [C_in, H, W], mask=None)``: mask values in
    [0, 1], 1 = known pixel, 0 = hole (NVIDIA's keyword ``mask_in=`` is taken too); a
    leading 1 broadcasts over the batch; ``None`` means all ones (partial-convolution
    padding). The updated mask is ``[N, 1, H', W']``, or with ``multi_channel=True``
    ``[N, C_out, H', W']``: a broadcast view, all channels equal, so ``clone()`` it before
    writing to it in place. ``padding='same'`` with an even kernel pads one more row and
    column at the bottom and right, as ``nn.Conv2d`` does, and they count as hole.

    The ``state_dict`` holds only ``weight`` and ``bias``, so weights load from
    ``nn.Conv2d`` and from NVIDIA's layer in either direction.
    """

    _impl = staticmethod(functional.partial_conv2d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, multi_channel: bool = False,
                 return_mask: bool = False):
        if padding_mode != "zeros":
            raise ValueError(
                f"{type(self).__name__}: padding_mode={padding_mode!r} is not supported; "
                "partial convolution treats padding as hole, so only 'zeros' is meaningful")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.multi_channel = multi_channel
        self.return_mask = return_mask
        self._string_padding = None  # (padding, kernel_size, dilation) -> resolved pads

    def _resolve_string_padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``'valid'`` or ``'same'`` as ``(symmetric padding, extra bottom/right padding)``.
        Resolved on use, so a ``padding`` set after construction takes effect."""
        key = (self.padding, self.kernel_size, self.dilation)
        cached = getattr(self, "_string_padding", None)  # absent in modules pickled before it
        if cached is None or cached[0] != key:
            if self.padding == "valid":
                pads = ((0, 0), (0, 0))
            else:
                total = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
                pads = (tuple(t // 2 for t in total), tuple(t % 2 for t in total))
            self._string_padding = (key, pads)
        return self._string_padding[1]

    def extra_repr(self) -> str:
        extra = ", multi_channel=True" if self.multi_channel else ""
        return super().extra_repr() + extra + (", return_mask=True" if self.return_mask else "")

    def forward(self, input: Tensor, mask: Tensor | None = None, *, mask_in: Tensor | None = None):
        if is_fx_symbolic_tracing():
            # Arguments are proxies here: no checks, no unbatched input, only the op.
            padding = self.padding
            if isinstance(padding, str):
                padding = self._resolve_string_padding()[0]
            result = self._impl(input, mask, self.weight, self.bias, self.stride, padding,
                                self.dilation, self.groups)
            return self._finish(result[0], result[1])
        if mask_in is not None:
            if mask is not None:
                raise TypeError(f"{type(self).__name__}: pass the mask as mask or as mask_in, "
                                "not both")
            mask = mask_in
        unbatched = input.dim() == 3
        if unbatched:
            input = input.unsqueeze(0)
            mask = mask.unsqueeze(0) if mask is not None and mask.dim() == 3 else mask
        if mask is not None and mask.dim() == 4:
            expected = self.in_channels if self.multi_channel else 1
            if mask.shape[1] != expected:
                mode = "multi_channel=True" if self.multi_channel else "multi_channel=False"
                raise ValueError(
                    f"{type(self).__name__}({mode}): mask must have {expected} channel(s), got "
                    f"mask shape {list(mask.shape)} for input shape {list(input.shape)}")
        padding = self.padding
        if isinstance(padding, str):
            padding, (extra_h, extra_w) = self._resolve_string_padding()
            if extra_h or extra_w:
                input, mask = _pad_bottom_right(input, mask, extra_h, extra_w)
        out, update = self._impl(input, mask, self.weight, self.bias, self.stride, padding,
                                 self.dilation, self.groups)
        if unbatched:
            out, update = out.squeeze(0), update.squeeze(0)
        return self._finish(out, update, unbatched)

    def _finish(self, out: Tensor, update: Tensor, unbatched: bool = False):
        if self.multi_channel:
            channels = (self.out_channels, -1, -1)
            update = update.expand(*channels) if unbatched else update.expand(-1, *channels)
        return (out, update) if self.return_mask else out


def _pad_bottom_right(input: Tensor, mask: Tensor | None, extra_h: int,
                      extra_w: int) -> tuple[Tensor, Tensor]:
    """``input`` and ``mask`` (``None``: all ones) with ``extra_h`` rows and ``extra_w``
    columns of zeros added at the bottom and right; the mask marks them as hole."""
    if mask is None:
        mask = input.new_ones((1, 1) + tuple(input.shape[2:]))
    pad = (0, extra_w, 0, extra_h)
    return F.pad(input, pad), F.pad(mask, pad)


class ReferencePartialConv2d(PartialConv2d):
    """The same layer on :func:`pconv_cuda.reference.partial_conv2d` (NVIDIA formulation,
    eager PyTorch): the oracle and the benchmarks' baseline."""

    _impl = staticmethod(reference.partial_conv2d)


class LeanPartialConv2d(PartialConv2d):
    """The same layer on :func:`pconv_cuda.reference.lean_partial_conv2d` (single-channel
    window sum, broadcast ratio): the best pure-PyTorch competitor in the benchmarks."""

    _impl = staticmethod(reference.lean_partial_conv2d)
