"""The OpenCV baselines: known pixels untouched, holes filled plausibly, shapes, dtypes and
errors."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("cv2")

from train.classical import METHODS, inpaint_classical  # noqa: E402


def smooth_image(h=48, w=40, seed=0, dtype=torch.float32):
    """A smooth colour image (bilinear upsampling of a 4x4 grid) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                           align_corners=True)[0].to(dtype)


def stroke_mask(h=48, w=40):
    """1 = known, 0 = hole: a thick horizontal bar and a square."""
    mask = torch.ones(1, h, w)
    mask[:, 20:26, 5:35] = 0
    mask[:, 5:12, 28:36] = 0
    return mask


@pytest.mark.parametrize("method", METHODS)
def test_known_pixels_identical_and_holes_filled(method):
    image = smooth_image()
    mask = stroke_mask()
    corrupted = image * mask  # the holes hold zeros: the method must not copy them
    out = inpaint_classical(corrupted, mask, method)
    known = mask.expand_as(image).bool()
    assert torch.equal(out[known], corrupted[known])  # bit for bit, not re-quantised
    holes = ~known
    # Filled from the surroundings of a smooth image: close to the truth, far from zero.
    assert (out[holes] - image[holes]).abs().mean() < 0.04
    assert out[holes].min() > 0.02


@pytest.mark.parametrize("method", METHODS)
def test_constant_image_is_filled_with_its_colour(method):
    image = torch.full((3, 24, 24), 0.5)
    mask = stroke_mask(24, 24)
    out = inpaint_classical(image * mask, mask, method)
    # 0.5 is not an 8-bit level: the fill is the nearest one, 128/255.
    torch.testing.assert_close(out, torch.where(mask.bool().expand(3, -1, -1), image,
                                                torch.full_like(image, 128 / 255)))


def test_batch_broadcast_dtype_and_no_holes():
    images = torch.stack([smooth_image(seed=s, dtype=torch.float64) for s in range(3)])
    mask = stroke_mask()[None]  # [1, 1, H, W] broadcast over the batch
    out = inpaint_classical(images, mask, "telea")
    assert out.shape == images.shape and out.dtype == torch.float64
    for i in range(3):
        torch.testing.assert_close(out[i], inpaint_classical(images[i], mask[0], "telea"))
    full = torch.ones(1, 48, 40)
    assert torch.equal(inpaint_classical(images[0], full, "ns"), images[0])


def test_soft_mask_threshold():
    image = smooth_image()
    mask = stroke_mask()
    soft = mask.clone()
    soft[:, 0:4, :] = 0.7  # counted as known: not filled by OpenCV, blended by the composite
    out = inpaint_classical(image, soft, "ns")
    # 0.7 * image + 0.3 * (OpenCV's copy of it, rounded to 8 bits): off by <= 0.3 / 510.
    torch.testing.assert_close(out[:, 0:4], image[:, 0:4], rtol=0, atol=0.3 / 510 + 1e-6)


def test_errors():
    image, mask = smooth_image(), stroke_mask()
    with pytest.raises(ValueError, match="method must be one of"):
        inpaint_classical(image, mask, "patchmatch")
    with pytest.raises(ValueError, match="expected image"):
        inpaint_classical(image, mask[:, :10], "ns")
    with pytest.raises(ValueError, match="does not fit"):
        inpaint_classical(image[None].expand(2, -1, -1, -1), mask.expand(3, -1, -1)[:, None],
                          "ns")
