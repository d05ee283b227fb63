"""``PartialConv2d``: a drop-in for ``nn.Conv2d`` and for NVIDIA's published layer."""
from __future__ import annotations

from torch import Tensor, nn

from . import functional, reference

__all__ = ["PartialConv2d", "ReferencePartialConv2d", "LeanPartialConv2d"]


class PartialConv2d(nn.Conv2d):
    """Partial convolution layer (Liu et al. 2018) on the fused op.

    Takes every ``nn.Conv2d`` argument (``padding_mode`` must be ``'zeros'``: padding is
    treated as hole) plus, as NVIDIA's ``PartialConv2d``:

    * ``multi_channel`` -- the mask has ``C_in`` channels (``[N, C_in, H, W]``) instead of
      one (``[N, 1, H, W]``); the window size counts every channel.
    * ``return_mask`` -- ``forward`` returns ``(output, updated_mask)`` instead of the output.

    ``forward(input [N, C_in, H, W], mask=None)``: mask values in [0, 1], 1 = known pixel,
    0 = hole; a leading 1 broadcasts over the batch; ``None`` means all ones
    (partial-convolution padding). The updated mask is ``[N, 1, H', W']``, or with
    ``multi_channel=True`` ``[N, C_out, H', W']`` (a broadcast view: all channels equal).

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
        self._op_padding = self._resolve_padding()

    def _resolve_padding(self) -> tuple[int, int]:
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(self.kernel_size, self.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(
                    f"{type(self).__name__}: padding='same' with kernel_size={self.kernel_size} "
                    f"and dilation={self.dilation} needs asymmetric padding, which is not "
                    "supported; pass explicit padding")
            pads.append(total // 2)
        return tuple(pads)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", multi_channel={self.multi_channel}"

    def forward(self, input: Tensor, mask: Tensor | None = None):
        if mask is not None and mask.dim() == 4:
            expected = self.in_channels if self.multi_channel else 1
            if mask.shape[1] != expected:
                mode = "multi_channel=True" if self.multi_channel else "multi_channel=False"
                raise ValueError(
                    f"{type(self).__name__}({mode}): mask must have {expected} channel(s), got "
                    f"mask shape {list(mask.shape)} for input shape {list(input.shape)}")
        out, update = self._impl(input, mask, self.weight, self.bias, self.stride,
                                 self._op_padding, self.dilation, self.groups)
        if self.multi_channel:
            update = update.expand(-1, self.out_channels, -1, -1)
        return (out, update) if self.return_mask else out


class ReferencePartialConv2d(PartialConv2d):
    """The same layer on :func:`pconv_cuda.reference.partial_conv2d` (NVIDIA formulation,
    eager PyTorch): the oracle and the benchmarks' baseline."""

    _impl = staticmethod(reference.partial_conv2d)


class LeanPartialConv2d(PartialConv2d):
    """The same layer on :func:`pconv_cuda.reference.lean_partial_conv2d` (single-channel
    window sum, broadcast ratio): the best pure-PyTorch competitor in the benchmarks."""

    _impl = staticmethod(reference.lean_partial_conv2d)
