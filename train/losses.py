"""The inpainting loss of Liu et al. 2018: valid and hole L1, perceptual, style and total
variation.

Mask convention: 1 = known pixel, 0 = hole, values in [0, 1]. Images are RGB in [0, 1]
(the VGG16 features normalise them with ImageNet statistics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import composite
from .vgg import VGG16Features

__all__ = ["InpaintingLoss", "gram_matrix", "total_variation", "DEFAULT_WEIGHTS"]

DEFAULT_WEIGHTS = {"valid": 1.0, "hole": 6.0, "perceptual": 0.05, "style": 120.0, "tv": 0.1}


def gram_matrix(features: Tensor) -> Tensor:
    """Gram matrices ``[N, C, C]`` of ``features`` ``[N, C, H, W]``, divided by ``C*H*W``.

    Computed in float32 (float64 for float64 input) even under autocast: a sum of ``H*W``
    products loses too much in half precision.
    """
    n, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        f = features.to(torch.promote_types(features.dtype, torch.float32)).reshape(n, c, h * w)
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def total_variation(image: Tensor, mask: Tensor) -> Tensor:
    """Total variation of ``image`` ``[N, C, H, W]`` over the hole region dilated by one pixel.

    ``mask`` ``[N or 1, 1, H, W]``: 1 = known, 0 = hole. The region ``P`` is the 3×3
    max-pool of ``1 - mask`` (the hole grown by one pixel in all eight directions). As in the
    paper, the absolute differences of horizontally and vertically adjacent pixels that both
    lie in ``P`` are summed over channels and the batch and divided by the number of elements
    of ``image`` (``N*C*H*W``), not by the number of pairs. For soft masks a pair counts with
    weight ``P(a) * P(b)``.
    """
    region = F.max_pool2d(1 - mask, 3, stride=1, padding=1)
    across = region[..., 1:] * region[..., :-1] * (image[..., 1:] - image[..., :-1]).abs()
    down = (region[..., 1:, :] * region[..., :-1, :]
            * (image[..., 1:, :] - image[..., :-1, :]).abs())
    return (across.sum() + down.sum()) / image.numel()


class InpaintingLoss(nn.Module):
    """Weighted sum of the loss terms of Liu et al. 2018.

    With ``out`` the model output, ``gt`` the image, ``M`` the mask and
    ``comp = M*gt + (1-M)*out`` (:func:`composite`), the terms (each unweighted) are

    * ``valid``: mean of ``|M * (out - gt)|`` over all ``N*C*H*W`` elements;
    * ``hole``: mean of ``|(1 - M) * (out - gt)|`` likewise;
    * ``perceptual``: for each of VGG16 pool1, pool2, pool3, the mean L1 distance between the
      features of ``out`` and of ``gt`` plus that between ``comp`` and ``gt``; summed;
    * ``style``: the same with the Gram matrices of the features (:func:`gram_matrix`,
      normalised by ``C*H*W``, float32), mean L1 over ``N*C*C`` entries;
    * ``tv``: :func:`total_variation` of ``comp`` over the one-pixel-dilated hole.

    Args:
        vgg: the feature extractor; ``None`` loads :meth:`VGG16Features.from_pretrained`
            (which raises without weights). Not used, and not loaded, when both
            ``use_perceptual`` and ``use_style`` are False.
        valid_weight, hole_weight, perceptual_weight, style_weight, tv_weight: the weights
            of the total (defaults 1, 6, 0.05, 120, 0.1 as the paper).
        use_perceptual, use_style: ablation switches; a switched-off term is not computed.

    ``forward(image [N, 3, H, W], mask [N or 1, 1, H, W], output [N, 3, H, W])`` returns
    ``(total, terms)``: the weighted sum (a scalar tensor) and a dict of the *unweighted*
    terms (scalar tensors, still attached to the graph) keyed ``valid``, ``hole``,
    ``perceptual``, ``style``, ``tv``; switched-off terms are absent. ``self.weights`` holds
    the weights by the same keys.
    """

    def __init__(self, vgg: VGG16Features | None = None, *,
                 valid_weight: float = DEFAULT_WEIGHTS["valid"],
                 hole_weight: float = DEFAULT_WEIGHTS["hole"],
                 perceptual_weight: float = DEFAULT_WEIGHTS["perceptual"],
                 style_weight: float = DEFAULT_WEIGHTS["style"],
                 tv_weight: float = DEFAULT_WEIGHTS["tv"],
                 use_perceptual: bool = True, use_style: bool = True):
        super().__init__()
        self.weights = {"valid": valid_weight, "hole": hole_weight,
                        "perceptual": perceptual_weight, "style": style_weight, "tv": tv_weight}
        self.use_perceptual = use_perceptual
        self.use_style = use_style
        needs_vgg = use_perceptual or use_style
        self.vgg = (vgg if vgg is not None else VGG16Features.from_pretrained()) \
            if needs_vgg else None

    def forward(self, image: Tensor, mask: Tensor, output: Tensor) -> tuple[Tensor, dict]:
        """``(total, unweighted terms)`` for ground truth ``image``, ``mask`` (1 = known,
        0 = hole) and model ``output``; see the class docstring."""
        comp = composite(image, mask, output)
        error = output - image
        terms = {"valid": (mask * error).abs().mean(),
                 "hole": ((1 - mask) * error).abs().mean()}
        if self.vgg is not None:
            # One VGG pass over the three images; each pool output splits back into three.
            pools = [p.chunk(3) for p in self.vgg(torch.cat([output, comp, image]))]
            if self.use_perceptual:
                terms["perceptual"] = sum(F.l1_loss(o, g) + F.l1_loss(c, g) for o, c, g in pools)
            if self.use_style:
                grams = [[gram_matrix(f) for f in pool] for pool in pools]
                terms["style"] = sum(F.l1_loss(o, g) + F.l1_loss(c, g) for o, c, g in grams)
        terms["tv"] = total_variation(comp, mask)
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms
