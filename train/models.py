"""Inpainting UNets built on partial convolutions.

* :class:`PConvUNet` -- the network of Liu et al. 2018 (stride-2 partial convs, batch norm,
  nearest upsampling).
* :class:`ModifiedUNet` -- our design report's variant (two stride-1 partial convs per level,
  max-pool down, bilinear up, no batch norm).
* :func:`composite` -- paste the known pixels of the image over a model's output.

Mask convention everywhere: 1 = known pixel, 0 = hole, values in [0, 1].

Both models take ``forward(image [N, 3, H, W], mask [N or 1, 1, H, W])`` and return the raw
output ``[N, 3, H, W]``. ``H`` and ``W`` must be multiples of ``model.size_multiple``.

Mask modes. With ``multi_channel=True`` every layer gets a mask with its ``C_in`` channels, as
in the published layer: the input mask is expanded to the image channels and at a skip
concatenation the masks are concatenated like the features. With ``multi_channel=False``
every layer gets a single-channel mask; at a concatenation each part's features are
multiplied by their own mask (relative to the merged one) and the merged mask is the
elementwise maximum, so the layer's masked input equals the multi-channel one and only the
renormalisation counts pixels instead of channel-pixels. Internally a mask is always kept as
``[N, 1, H, W]``: partial convolutions give every channel the same updated mask, so one
channel carries all the information and is expanded only where a layer needs it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pconv_cuda

__all__ = ["PConvUNet", "ModifiedUNet", "composite", "channel_widths"]

IMAGE_CHANNELS = 3


def composite(image: Tensor, mask: Tensor, output: Tensor) -> Tensor:
    """``mask * image + (1 - mask) * output``: the known pixels of ``image`` over ``output``.

    ``image`` and ``output`` are ``[N, C, H, W]``; ``mask`` broadcasts against them
    (``[N or 1, 1 or C, H, W]``), 1 = known, 0 = hole.
    """
    return mask * image + (1 - mask) * output


def channel_widths(levels: int, base: int, cap: int) -> list[int]:
    """Channels of levels 1..``levels``: ``base`` doubling at every level, capped at ``cap``
    (64, 128, 256, 512, 512, ... for the defaults)."""
    return [min(base * 2 ** i, cap) for i in range(levels)]


_Part = tuple[Tensor, Tensor]  # (features [N, C, H, W], mask [N, 1, H, W])


def _concat(parts: list[_Part], multi_channel: bool) -> _Part:
    """Features and the mask a partial conv gets for the channel concatenation of ``parts``
    (see the module docstring for the two mask modes)."""
    if len(parts) == 1:
        x, m = parts[0]
        return x, (m.expand(-1, x.shape[1], -1, -1) if multi_channel else m)
    if multi_channel:
        return (torch.cat([x for x, _ in parts], 1),
                torch.cat([m.expand(-1, x.shape[1], -1, -1) for x, m in parts], 1))
    merged = functools.reduce(torch.maximum, [m for _, m in parts])
    # The layer multiplies by the merged mask; scaling each part by m / merged first makes
    # the product m exactly (where merged is 0, m is 0 too, so the clamp only avoids 0/0).
    safe = merged.clamp_min(torch.finfo(merged.dtype).tiny)
    return torch.cat([x * (m / safe) for x, m in parts], 1), merged


class _PConvBlock(nn.Module):
    """Partial conv (padding ``kernel // 2``), optional batch norm, optional activation.

    ``forward(parts)`` takes a list of ``(features, mask [N, 1, H, W])`` concatenated along
    channels and returns ``(features [N, C_out, H', W'], updated mask [N, 1, H', W'])``.
    """

    def __init__(self, conv_layer, c_in: int, c_out: int, kernel: int, stride: int, *,
                 batch_norm: bool, activation: nn.Module | None, multi_channel: bool):
        super().__init__()
        # A bias right before batch norm is cancelled by its mean subtraction.
        self.conv = conv_layer(c_in, c_out, kernel, stride, kernel // 2, bias=not batch_norm,
                               multi_channel=multi_channel, return_mask=True)
        self.bn = nn.BatchNorm2d(c_out) if batch_norm else nn.Identity()
        self.act = activation if activation is not None else nn.Identity()

    def forward(self, parts: list[_Part]) -> _Part:
        x, m = _concat(parts, self.conv.multi_channel)
        y, update = self.conv(x, m)
        return self.act(self.bn(y)), update[:, :1]


class _InpaintingUNet(nn.Module):
    """Input checks shared by the UNets; subclasses set ``size_multiple`` and
    ``multi_channel`` and implement ``_forward(image, mask [N, 1, H, W])``."""

    size_multiple: int

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        """Inpaint ``image`` ``[N, 3, H, W]`` where ``mask`` ``[N or 1, 1, H, W]`` is 0.

        Mask: 1 = known pixel, 0 = hole, values in [0, 1]. ``H`` and ``W`` must be
        multiples of ``self.size_multiple``. Returns the raw output ``[N, 3, H, W]`` (use
        :func:`composite` to keep the known pixels).
        """
        name = type(self).__name__
        if image.dim() != 4 or image.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"{name}: image must be [N, {IMAGE_CHANNELS}, H, W], got "
                             f"{list(image.shape)}")
        n, _, h, w = image.shape
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, n) \
                or mask.shape[2:] != image.shape[2:]:
            raise ValueError(f"{name}: mask must be [{n} or 1, 1, {h}, {w}] for image "
                             f"{list(image.shape)}, got {list(mask.shape)}")
        k = self.size_multiple
        if h % k or w % k:
            raise ValueError(
                f"{name}: input size {h}x{w} is not a multiple of {k} (the model's total "
                f"downsampling); pad or crop to e.g. {-(-h // k) * k}x{-(-w // k) * k}")
        return self._forward(image, mask.to(image.dtype).expand(n, -1, -1, -1))

    def _forward(self, image: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


class PConvUNet(_InpaintingUNet):
    """The partial-convolution UNet of Liu et al. 2018.

    Encoder level i (1..``layers``): partial conv with stride 2, kernels 7, 5, 5, 3, 3, ...,
    padding ``k // 2``, channels ``channel_widths(layers, base_channels, max_channels)``
    (64, 128, 256, 512, 512, ...), batch norm except at level 1, ReLU. Decoder level i
    (``layers``..1): nearest ×2 upsampling of features and mask, concatenation with the
    encoder level i-1 output (level 1: the input image and its mask), partial conv k3 s1 p1
    to the channels of level i-1 (level 1: 3), batch norm and LeakyReLU(0.2) except at
    level 1, which has a bias and no activation. Convs followed by batch norm have no bias.

    Mask propagation: when the bottleneck is 1×1 (input size = ``size_multiple``) the mask
    after the last decoder is all ones as soon as one input pixel is known. At larger inputs
    (256×256 with 7 levels: a 2×2 bottleneck) a bottleneck cell can stay a hole, and nearest
    upsampling plus k3 convs then shrink the hole to one pixel but never fill it: e.g. a hole
    covering the top-left 136×136 at 256×256 leaves pixel (0, 0) with mask 0 and raw output
    0 (the paper's network behaves the same). Holes of the paper's sizes (up to 60%) away
    from that corner block fill (see tests/test_models.py).

    Args:
        layers: encoder levels: 7 for 256×256 inputs, 8 for 512×512 (inputs must be
            multiples of ``2 ** layers``).
        base_channels, max_channels: channel widths (defaults as the paper).
        conv_layer: the partial-conv class (``pconv_cuda.PartialConv2d`` or a same-signature
            layer such as ``pconv_cuda.ReferencePartialConv2d``).
        multi_channel: mask mode (see the module docstring).

    ``forward(image [N, 3, H, W], mask [N or 1, 1, H, W])`` -> raw output ``[N, 3, H, W]``;
    mask 1 = known, 0 = hole.
    """

    def __init__(self, layers: int = 7, *, base_channels: int = 64, max_channels: int = 512,
                 conv_layer=pconv_cuda.PartialConv2d, multi_channel: bool = False):
        super().__init__()
        if layers < 1:
            raise ValueError(f"PConvUNet: layers must be >= 1, got {layers}")
        self.layers = layers
        self.multi_channel = multi_channel
        self.size_multiple = 2 ** layers
        self._encoder_bn_frozen = False
        widths = [IMAGE_CHANNELS] + channel_widths(layers, base_channels, max_channels)
        kernels = ([7, 5, 5] + [3] * layers)[:layers]
        block = functools.partial(_PConvBlock, conv_layer, multi_channel=multi_channel)
        self.encoder = nn.ModuleList(
            block(widths[i], widths[i + 1], kernels[i], 2, batch_norm=i > 0,
                  activation=nn.ReLU())
            for i in range(layers))
        # decoder[0] is the deepest level: it turns widths[i + 1] + widths[i] into widths[i].
        self.decoder = nn.ModuleList(
            block(widths[i + 1] + widths[i], widths[i], 3, 1, batch_norm=i > 0,
                  activation=nn.LeakyReLU(0.2) if i > 0 else None)
            for i in reversed(range(layers)))

    def _forward(self, image: Tensor, mask: Tensor) -> Tensor:
        skips = [(image, mask)]
        for block in self.encoder:
            skips.append(block([skips[-1]]))
        x, m = skips.pop()
        for block in self.decoder:
            up = (F.interpolate(x, scale_factor=2, mode="nearest"),
                  F.interpolate(m, scale_factor=2, mode="nearest"))
            x, m = block([up, skips.pop()])
        return x

    def freeze_encoder_bn(self, frozen: bool = True) -> PConvUNet:
        """Keep the encoder's batch-norm layers in eval mode (running statistics fixed, as
        in the paper's fine-tuning phase), also through later ``train()`` calls; their affine
        parameters still train. ``frozen=False`` undoes it. Returns ``self``."""
        self._encoder_bn_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> PConvUNet:
        """``nn.Module.train``, except that frozen encoder batch norms stay in eval mode."""
        super().train(mode)
        if self._encoder_bn_frozen:
            for module in self.encoder.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


class _Level(nn.Module):
    """Two partial-conv blocks in a row; ``forward(parts)`` as :class:`_PConvBlock`."""

    def __init__(self, first: _PConvBlock, second: _PConvBlock):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, parts: list[_Part]) -> _Part:
        return self.second([self.first(parts)])


class ModifiedUNet(_InpaintingUNet):
    """The modified partial-convolution UNet of our design report.

    ``levels`` (7) encoder levels and as many decoder levels; level i works at
    ``H / 2**(i-1) × W / 2**(i-1)`` with ``channel_widths(levels, base_channels,
    max_channels)[i-1]`` channels (64 doubling to 512 by default). Every level is two
    partial convs with kernel ``kernel_sizes[i-1] = 2n+1``, padding n, stride 1, with bias
    and no batch norm.

    * Encoder level i: 2×2 max-pool of features and mask (not at level 1), two convs, ReLU
      after each.
    * Decoder level ``levels`` (the bottom) takes the last encoder output; decoder level
      i < ``levels`` upsamples the level below bilinearly ×2 (the mask too, giving soft
      masks; ``align_corners=False``) and concatenates encoder level i's output and mask.
      Two convs, LeakyReLU(0.2) after each, except the very last conv (decoder level 1,
      output 3 channels), which has no activation.

    Args:
        levels: number of levels (inputs must be multiples of ``2 ** (levels - 1)``).
        kernel_sizes: odd kernel size of each level, used by encoder and decoder level i
            alike; default all 3.
        base_channels, max_channels: channel widths.
        conv_layer, multi_channel: as :class:`PConvUNet`.

    ``forward(image [N, 3, H, W], mask [N or 1, 1, H, W])`` -> raw output ``[N, 3, H, W]``;
    mask 1 = known, 0 = hole.
    """

    def __init__(self, levels: int = 7, *, kernel_sizes: tuple[int, ...] | None = None,
                 base_channels: int = 64, max_channels: int = 512,
                 conv_layer=pconv_cuda.PartialConv2d, multi_channel: bool = False):
        super().__init__()
        kernels = tuple(kernel_sizes) if kernel_sizes is not None else (3,) * levels
        if levels < 1 or len(kernels) != levels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"ModifiedUNet: need levels >= 1 and one odd kernel size per "
                             f"level, got levels={levels}, kernel_sizes={kernel_sizes}")
        self.levels = levels
        self.kernel_sizes = kernels
        self.multi_channel = multi_channel
        self.size_multiple = 2 ** (levels - 1)
        widths = channel_widths(levels, base_channels, max_channels)
        block = functools.partial(_PConvBlock, conv_layer, stride=1, batch_norm=False,
                                  multi_channel=multi_channel)

        def level(c_in, c_mid, c_out, kernel, act, last_act):
            return _Level(block(c_in, c_mid, kernel, activation=act),
                          block(c_mid, c_out, kernel, activation=last_act))

        self.encoder = nn.ModuleList(
            level(([IMAGE_CHANNELS] + widths)[i], widths[i], widths[i], kernels[i],
                  nn.ReLU(), nn.ReLU())
            for i in range(levels))
        # decoder[0] is the bottom level; the others add the skip's channels to their input.
        self.decoder = nn.ModuleList(
            level(widths[i] + (widths[i + 1] if i + 1 < levels else 0), widths[i],
                  widths[i] if i > 0 else IMAGE_CHANNELS, kernels[i], nn.LeakyReLU(0.2),
                  nn.LeakyReLU(0.2) if i > 0 else None)
            for i in reversed(range(levels)))

    def _forward(self, image: Tensor, mask: Tensor) -> Tensor:
        skips = []
        x, m = image, mask
        for i, level in enumerate(self.encoder):
            if i:
                x, m = F.max_pool2d(x, 2), F.max_pool2d(m, 2)
            x, m = level([(x, m)])
            skips.append((x, m))
        x, m = self.decoder[0]([skips.pop()])
        for level in self.decoder[1:]:
            up = (F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
                  F.interpolate(m, scale_factor=2, mode="bilinear", align_corners=False))
            x, m = level([up, skips.pop()])
        return x
