"""The classical inpainting baselines: OpenCV's Navier-Stokes and Telea methods.

OpenCV marks holes with non-zero mask pixels; this module converts from the project's
convention (1 = known, 0 = hole) in one place. Results are composited so that known pixels
are exactly those of the input.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .images import image_from_numpy, image_to_numpy
from .models import composite

__all__ = ["METHODS", "DEFAULT_RADIUS", "inpaint_classical"]

METHODS = ("ns", "telea")

DEFAULT_RADIUS = 3
"""Neighbourhood radius in pixels of both methods unless told otherwise (OpenCV's own
examples use 3)."""


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the classical baselines need OpenCV: pip install "
                          "opencv-python-headless (or pip install 'pconv[train]')") from exc
    return cv2


def inpaint_classical(image: Tensor, mask: Tensor, method: str = "ns",
                      radius: int = DEFAULT_RADIUS) -> Tensor:
    """Inpaint with OpenCV's Navier-Stokes (``"ns"``) or Telea (``"telea"``) method.

    Args:
        image: ``[3, H, W]`` or ``[N, 3, H, W]`` float in [0, 1].
        mask: ``[1, H, W]`` or ``[N, 1, H, W]``, 1 = known, 0 = hole; pixels below 0.5
            are filled.
        method: ``"ns"`` or ``"telea"``.
        radius: the methods' neighbourhood radius in pixels (larger: smoother fills that
            draw on more of the surroundings, and slower).

    Returns:
        The composite (known pixels from ``image``, holes filled), same shape, dtype and
        device as ``image``.
    """
    if method not in METHODS:
        raise ValueError(f"inpaint_classical: method must be one of {METHODS}, got {method!r}")
    if image.dim() == 4:
        if mask.dim() != 4 or mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"inpaint_classical: mask shape {list(mask.shape)} does not fit "
                             f"image batch {list(image.shape)}")
        return torch.stack([inpaint_classical(img, mask[i if mask.shape[0] > 1 else 0], method,
                                              radius) for i, img in enumerate(image)])
    if image.dim() != 3 or mask.dim() != 3 or mask.shape[0] != 1 or \
            mask.shape[1:] != image.shape[1:]:
        raise ValueError(f"inpaint_classical: expected image [3, H, W] and mask [1, H, W], got "
                         f"{list(image.shape)} and {list(mask.shape)}")
    cv2 = _cv2()
    flag = cv2.INPAINT_NS if method == "ns" else cv2.INPAINT_TELEA
    holes = (mask[0] < 0.5).cpu().numpy().astype(np.uint8) * 255
    filled = cv2.inpaint(image_to_numpy(image.detach().cpu()), holes, radius, flag)
    result = image_from_numpy(filled).to(device=image.device, dtype=image.dtype)
    return composite(image, mask, result)
