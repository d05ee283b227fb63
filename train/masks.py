"""Building masks: the one place that makes them.

A mask is a float32 tensor ``[1, H, W]`` in ``[0, 1]``, **1 = known pixel, 0 = hole**
(``[N, 1, H, W]`` when batched). Everything random takes a ``numpy.random.Generator``
(or a seed, see :func:`as_rng`) and draws from nothing else, so a mask is a pure
function of its seed.

Three parts:

- :func:`generate_mask` / :class:`FreeFormMasks`: irregular free-form masks (thick
  random-walk brush strokes plus rotated ellipses) that can hit a requested hole ratio;
- :class:`MaskFolder`: mask files on disk, e.g. NVIDIA's irregular mask set, with the
  random dilation, rotation, flips and crops the paper uses for training;
- hole-ratio buckets for evaluation: :func:`hole_ratio`, :func:`bucket_of`,
  :func:`make_eval_masks`.

A *mask source* is any callable ``source(height, width, rng) -> Tensor[1, H, W]``;
both :class:`FreeFormMasks` and :class:`MaskFolder` are one, and
``train.data.InpaintingDataset`` pairs images with masks from any of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from .images import (
    ImageLoadError,
    PathLike,
    find_images,
    load_mask,
    load_readable,
    mask_from_numpy,
    mask_to_numpy,
    readable_images,
)

__all__ = [
    "RngLike",
    "MaskSource",
    "as_rng",
    "RANDOM_RATIO_RANGE",
    "generate_mask",
    "FreeFormMasks",
    "dilate_holes",
    "rotate_mask",
    "resize_mask",
    "MaskFolder",
    "NVIDIA_TEST_MASKS_INVERT",
    "PAPER_BUCKETS",
    "REPORT_RATIOS",
    "hole_ratio",
    "bucket_label",
    "bucket_of",
    "group_by_bucket",
    "make_eval_masks",
    "eval_masks_from_folder",
]

logger = logging.getLogger(__name__)

RngLike = np.random.Generator | np.random.SeedSequence | int | None


class MaskSource(Protocol):
    """Anything that makes a mask ``[1, height, width]`` (1 = known) from a generator."""

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> torch.Tensor: ...


def as_rng(rng: RngLike) -> np.random.Generator:
    """A ``numpy.random.Generator`` from a generator (returned as is), a seed or a
    ``SeedSequence``. ``None`` gives a fresh, unseeded generator (not reproducible)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# ----------------------------------------------------------------------------------
# Free-form masks

RANDOM_RATIO_RANGE = (0.01, 0.6)
"""Hole ratios drawn (uniformly) when ``generate_mask`` gets ``hole_ratio=None``: the
span of the paper's six evaluation buckets, so training sees every difficulty."""

# Shape sizes as fractions of min(H, W); chosen so one stroke covers a few percent of
# the image, which makes every ratio up to ~0.9 reachable in tens of strokes.
_BRUSH_WIDTH = (0.02, 0.09)
_SEGMENT_LENGTH = (0.04, 0.2)
_VERTICES = (2, 9)  # [low, high) vertices per stroke
_ELLIPSE_RADIUS = (0.03, 0.15)
_SHRINK = 0.7  # shape scale factor after a shape overshoots the requested ratio


def _draw_stroke(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int, scale: float) -> None:
    """One thick polyline whose heading does a random walk: the paper's 'irregular' look."""
    size = min(h, w) * scale
    width = max(1, round(rng.uniform(*_BRUSH_WIDTH) * size))
    x, y = rng.uniform(0, w), rng.uniform(0, h)
    heading = rng.uniform(0, 2 * math.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(*_VERTICES)) - 1):
        heading += rng.normal(0.0, 0.9)
        length = rng.uniform(*_SEGMENT_LENGTH) * size
        x, y = x + length * math.cos(heading), y + length * math.sin(heading)
        points.append((x, y))
    draw.line(points, fill=255, width=width, joint="curve")
    # Pillow's wide lines have square ends; discs at the vertices round them like a brush.
    r = width / 2
    for px, py in points:
        draw.ellipse([px - r, py - r, px + r, py + r], fill=255)


def _draw_ellipse(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int, scale: float) -> None:
    """One filled ellipse, rotated (Pillow's own ellipses are axis-aligned only)."""
    a, b = np.maximum(rng.uniform(*_ELLIPSE_RADIUS, size=2) * min(h, w) * scale, 0.5)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    theta = rng.uniform(0, math.pi)
    t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    xs = cx + a * np.cos(t) * math.cos(theta) - b * np.sin(t) * math.sin(theta)
    ys = cy + a * np.cos(t) * math.sin(theta) + b * np.sin(t) * math.cos(theta)
    draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)


def generate_mask(
    height: int,
    width: int,
    hole_ratio: float | None = None,
    tolerance: float = 0.02,
    rng: RngLike = None,
    *,
    ellipse_prob: float = 0.15,
    max_shapes: int = 10_000,
) -> torch.Tensor:
    """An irregular free-form mask ``[1, height, width]``, float32, 1 = known, 0 = hole.

    Holes are thick brush strokes (polylines whose direction does a random walk,
    width 2-9 % of the short side) and, with probability ``ellipse_prob`` per shape,
    rotated ellipses. Shapes are added until the hole ratio (fraction of hole
    pixels) reaches ``hole_ratio``; a shape that would overshoot ``hole_ratio +
    tolerance`` is removed again and later shapes are drawn smaller, and the last
    shape is kept only if that ends nearer the target. So the ratio always lands
    within ``hole_ratio +- tolerance``, centred on the target, with at least one
    hole pixel when ``hole_ratio > 0``.

    Args:
        height, width: mask size.
        hole_ratio: target fraction of hole pixels in [0, 1]; ``None`` draws one
            uniformly from :data:`RANDOM_RATIO_RANGE` (the paper's range).
        tolerance: allowed absolute deviation from ``hole_ratio``.
        rng: generator or seed (see :func:`as_rng`); the mask is a pure function of it.
        ellipse_prob: chance that a shape is an ellipse instead of a stroke.
        max_shapes: safety limit on attempts; raises ``RuntimeError`` beyond it.
    """
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    rng = as_rng(rng)
    if hole_ratio is None:
        hole_ratio = float(rng.uniform(*RANDOM_RATIO_RANGE))
    if not 0.0 <= hole_ratio <= 1.0:
        raise ValueError(f"hole_ratio must lie in [0, 1], got {hole_ratio}")
    if hole_ratio == 0.0:
        return torch.ones(1, height, width)
    if hole_ratio == 1.0:
        return torch.zeros(1, height, width)

    total = height * width
    # Pixel-count band; the 1e-9 keeps float noise in (ratio -+ tol) * total from
    # excluding an exactly-on-the-edge count.
    lo = max(1, math.ceil((hole_ratio - tolerance) * total - 1e-9))
    hi = min(total, math.floor((hole_ratio + tolerance) * total + 1e-9))
    if lo > hi:
        raise ValueError(
            f"no {height}x{width} mask has a hole ratio within {tolerance} of {hole_ratio}; "
            "raise the tolerance"
        )

    target = min(max(round(hole_ratio * total), lo), hi)

    canvas = Image.new("L", (width, height), 0)  # 255 = hole while drawing
    holes, scale = 0, 1.0
    for _ in range(max_shapes):
        if holes >= target:
            break
        trial = canvas.copy()
        draw = ImageDraw.Draw(trial)
        if rng.random() < ellipse_prob:
            _draw_ellipse(draw, rng, height, width, scale)
        else:
            _draw_stroke(draw, rng, height, width, scale)
        count = trial.histogram()[255]
        if count > hi:
            scale *= _SHRINK
            continue
        # The shape that crosses the target: keep it or not, whichever ends nearer the
        # target; stopping at the first in-band count would bias ratios low.
        if count >= target and holes >= lo and target - holes < count - target:
            break
        canvas, holes = trial, count
    else:
        raise RuntimeError(f"generate_mask did not reach hole ratio {hole_ratio} in {max_shapes} shapes")
    return mask_from_numpy(np.asarray(canvas), invert=True)


@dataclass(frozen=True)
class FreeFormMasks:
    """Mask source of :func:`generate_mask` masks: ``FreeFormMasks(...)(h, w, rng) -> [1, h, w]``.

    ``hole_ratio`` is a fixed ratio, a ``(low, high)`` range drawn from uniformly per
    mask, or ``None`` for :data:`RANDOM_RATIO_RANGE`. 1 = known, 0 = hole.
    """

    hole_ratio: float | tuple[float, float] | None = None
    tolerance: float = 0.02
    ellipse_prob: float = 0.15

    def __call__(self, height: int, width: int, rng: RngLike) -> torch.Tensor:
        rng = as_rng(rng)
        ratio = self.hole_ratio
        if isinstance(ratio, (tuple, list)):
            ratio = float(rng.uniform(*ratio))
        return generate_mask(height, width, ratio, self.tolerance, rng, ellipse_prob=self.ellipse_prob)


# ----------------------------------------------------------------------------------
# Mask files and their augmentation

NVIDIA_TEST_MASKS_INVERT = True
"""``invert`` for NVIDIA's irregular mask *test* set (12,000 512x512 PNGs, six
hole-ratio groups, from the paper's project page): its files draw holes in **white**.
The separately released training masks are reported to draw holes in black
(``invert=False``). When unsure, look at one file: holes are the thin, scribbly part."""


def _check_mask(mask: torch.Tensor) -> None:
    if mask.dim() != 3 or mask.shape[0] != 1:
        raise ValueError(f"mask must have shape [1, H, W], got {list(mask.shape)}")


def dilate_holes(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Grow the holes of a binary mask ``[1, H, W]`` (1 = known) by a ``size x size`` square.

    ``size`` is odd; each hole grows by ``size // 2`` pixels on every side, and
    ``size = 1`` returns an unchanged copy.
    """
    _check_mask(mask)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"dilation size must be odd and >= 1, got {size}")
    if size == 1:
        return mask.clone()
    # A pixel stays known only if its whole window is known: a min filter on "known"
    # is a max filter (dilation) on "hole".
    known = Image.fromarray(mask_to_numpy(mask)).filter(ImageFilter.MinFilter(size))
    return mask_from_numpy(np.asarray(known))


def rotate_mask(mask: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a binary mask ``[1, H, W]`` (1 = known) about its centre, counter-clockwise.

    The size is kept; corners that rotate in from outside the picture are known
    (no hole is invented there). Nearest-neighbour sampling keeps the mask binary.
    """
    _check_mask(mask)
    im = Image.fromarray(mask_to_numpy(mask))
    rotated = im.rotate(degrees, resample=Image.Resampling.NEAREST, expand=False, fillcolor=255)
    return mask_from_numpy(np.asarray(rotated))


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a mask ``[1, H, W]`` to ``[1, height, width]`` by nearest neighbour (stays binary)."""
    _check_mask(mask)
    if tuple(mask.shape[-2:]) == (height, width):
        return mask.clone()
    return F.interpolate(mask[None], size=(height, width), mode="nearest-exact")[0]


class MaskFolder:
    """Mask files in a folder (searched recursively) as a mask source.

    ``masks(h, w, rng)`` picks a file with ``rng`` and returns a ``[1, h, w]`` mask,
    1 = known, 0 = hole. With ``augment=True`` (training) the mask is, in this order,
    dilated by a random radius in ``[0, max_dilation]``, rotated by a random angle in
    ``[-max_rotation, max_rotation]`` degrees, flipped left-right and up-down with
    probability 1/2 each, scaled up (nearest) if smaller than ``h x w``, and cropped at
    a random place to ``h x w`` -- the paper's dilation / rotation / cropping. With
    ``augment=False`` (evaluation) the file is only resized to ``h x w`` if needed.

    ``masks[i]`` / ``masks.load(i)`` give file ``i`` as stored (no augmentation).

    Args:
        root: the folder. Files are taken in :func:`train.images.find_images` order.
        invert: ``False`` when the files draw known pixels white; ``True`` when they
            draw holes white, as NVIDIA's test set does (see
            :data:`NVIDIA_TEST_MASKS_INVERT`).
        threshold: grey level in [0, 1] splitting black from white.
        check: index-time file check, see :func:`train.images.readable_images`.
    """

    def __init__(
        self,
        root: PathLike,
        invert: bool = False,
        threshold: float = 0.5,
        augment: bool = True,
        max_dilation: int = 4,
        max_rotation: float = 180.0,
        flip: bool = True,
        check: str = "header",
    ):
        self.root = Path(root)
        self.invert = invert
        self.threshold = threshold
        self.augment = augment
        self.max_dilation = max_dilation
        self.max_rotation = max_rotation
        self.flip = flip
        self.files = readable_images(find_images(self.root, what="mask"), check, what="mask")
        if not self.files:
            raise FileNotFoundError(f"no readable mask files under {self.root}")
        self._bad: set[int] = set()
        self._warn_if_inverted()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.load(index)

    def load(self, index: int) -> torch.Tensor:
        """File ``index`` as a mask ``[1, H, W]`` (1 = known), no augmentation.

        Raises:
            ImageLoadError: the file is unreadable.
        """
        return load_mask(self.files[index], invert=self.invert, threshold=self.threshold)

    def _load_some(self, index: int) -> torch.Tensor:
        """File ``index``, or the next readable one after it; bad files are logged once."""
        try:
            return load_readable(self.files, index, self.load, self._bad, "mask")
        except RuntimeError as e:
            raise RuntimeError(f"{e} (under {self.root})") from None

    def _warn_if_inverted(self) -> None:
        # Mask sets have small holes on average; a set that is mostly "hole" was almost
        # certainly read with the wrong invert setting, which would silently train on
        # near-empty inputs.
        picks = np.linspace(0, len(self.files) - 1, num=min(8, len(self.files))).astype(int)
        ratios = []
        for i in picks:
            try:
                ratios.append(hole_ratio(self.load(int(i))))
            except ImageLoadError:
                continue
        if ratios and float(np.mean(ratios)) > 0.6:
            logger.warning(
                "masks under %s are %.0f%% hole on average: is invert=%s right?",
                self.root, 100 * float(np.mean(ratios)), self.invert,
            )

    def __call__(self, height: int, width: int, rng: RngLike) -> torch.Tensor:
        rng = as_rng(rng)
        mask = self._load_some(int(rng.integers(len(self.files))))
        if not self.augment:
            return resize_mask(mask, height, width)
        if self.max_dilation > 0:
            mask = dilate_holes(mask, 2 * int(rng.integers(0, self.max_dilation + 1)) + 1)
        if self.max_rotation > 0:
            mask = rotate_mask(mask, float(rng.uniform(-self.max_rotation, self.max_rotation)))
        if self.flip:
            if rng.random() < 0.5:
                mask = mask.flip(-1)
            if rng.random() < 0.5:
                mask = mask.flip(-2)
        h, w = mask.shape[-2:]
        if h < height or w < width:
            grow = max(height / h, width / w)
            h, w = max(height, math.ceil(h * grow)), max(width, math.ceil(w * grow))
            mask = resize_mask(mask, h, w)
        top = int(rng.integers(0, h - height + 1))
        left = int(rng.integers(0, w - width + 1))
        return mask[:, top : top + height, left : left + width].contiguous()


# ----------------------------------------------------------------------------------
# Hole-ratio buckets for evaluation

PAPER_BUCKETS: tuple[tuple[float, float], ...] = (
    (0.01, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6),
)
"""The paper's hole-ratio buckets, each the half-open interval ``(low, high]``."""

REPORT_RATIOS: tuple[float, ...] = (0.05, 0.1, 0.2)
"""Fixed hole ratios our report evaluates at (each met within a small tolerance)."""

Bucket = tuple[float, float] | float


def hole_ratio(mask: torch.Tensor) -> float | torch.Tensor:
    """Fraction of hole pixels (mean of ``1 - mask``; soft masks count fractionally).

    ``[1, H, W]`` or ``[H, W]`` gives a float; ``[N, 1, H, W]`` gives a float64 tensor
    ``[N]``. Computed in float64 so that, e.g., 10 holes in 100 pixels is exactly 0.1
    and lands on the right side of a bucket edge.
    """
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"batched mask must have shape [N, 1, H, W], got {list(mask.shape)}")
        return (1.0 - mask.double()).flatten(1).mean(1)
    if mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != 1):
        raise ValueError(f"mask must have shape [1, H, W], [H, W] or [N, 1, H, W], got {list(mask.shape)}")
    return float((1.0 - mask.double()).mean())


def bucket_label(bucket: Bucket) -> str:
    """Display name: ``(0.01,0.1]`` for an interval, ``r=0.05`` for a fixed ratio."""
    if isinstance(bucket, (tuple, list)):
        lo, hi = bucket
        return f"({lo:g},{hi:g}]"
    return f"r={bucket:g}"


def bucket_of(ratio: float, buckets: Sequence[tuple[float, float]] = PAPER_BUCKETS) -> tuple[float, float] | None:
    """The bucket ``(low, high]`` holding ``ratio`` (first match), or ``None``.

    Buckets are open below and closed above, as in the paper: 0.1 belongs to
    ``(0.01, 0.1]``, not to ``(0.1, 0.2]``; 0.01 and anything above 0.6 belong to none
    of :data:`PAPER_BUCKETS`.
    """
    for lo, hi in buckets:
        if lo < ratio <= hi:
            return (lo, hi)
    return None


def group_by_bucket(
    masks: Iterable[torch.Tensor], buckets: Sequence[tuple[float, float]] = PAPER_BUCKETS
) -> dict[str, list[torch.Tensor]]:
    """Sort existing masks ``[1, H, W]`` into buckets by :func:`hole_ratio`.

    Returns ``{bucket_label: [mask, ...]}`` with every bucket present (possibly
    empty), in ``buckets`` order; masks outside all buckets are dropped.
    """
    groups: dict[str, list[torch.Tensor]] = {bucket_label(b): [] for b in buckets}
    for mask in masks:
        bucket = bucket_of(hole_ratio(mask), buckets)
        if bucket is not None:
            groups[bucket_label(bucket)].append(mask)
    return groups


def _in_bucket(ratio: float, bucket: Bucket, tolerance: float) -> bool:
    if isinstance(bucket, (tuple, list)):
        return bucket_of(ratio, [bucket]) is not None
    return abs(ratio - float(bucket)) <= tolerance


def eval_masks_from_folder(
    root: PathLike,
    height: int,
    width: int,
    buckets: Sequence[Bucket] = PAPER_BUCKETS,
    per_bucket: int = 100,
    invert: bool = NVIDIA_TEST_MASKS_INVERT,
    tolerance: float = 0.005,
) -> dict[str, list[torch.Tensor]]:
    """Evaluation masks from mask files (NVIDIA's irregular test masks, the paper's
    protocol), sorted into hole-ratio buckets.

    Files are read in :func:`train.images.find_images` order and resized (nearest) to
    ``height x width``; each goes to the bucket its resized hole ratio falls in
    (:func:`bucket_of` for an interval, ``r +- tolerance`` for a fixed ratio) until that
    bucket holds ``per_bucket`` masks. The same folder always gives the same masks.

    Returns:
        ``{bucket_label(b): [mask [1, height, width], ...]}`` in ``buckets`` order, 1 =
        known, 0 = hole; a bucket no file falls in is left out, with a warning.

    Raises:
        FileNotFoundError: no readable mask file under ``root``, or no file in any bucket.
    """
    folder = MaskFolder(root, invert=invert, augment=False)
    groups: dict[str, list[torch.Tensor]] = {bucket_label(b): [] for b in buckets}
    for index in range(len(folder)):
        if all(len(g) >= per_bucket for g in groups.values()):
            break
        mask = resize_mask(folder._load_some(index), height, width)
        ratio = hole_ratio(mask)
        for bucket in buckets:
            group = groups[bucket_label(bucket)]
            if _in_bucket(ratio, bucket, tolerance) and len(group) < per_bucket:
                group.append(mask)
                break
    empty = [label for label, group in groups.items() if not group]
    if len(empty) == len(groups):
        raise FileNotFoundError(f"no mask under {root} has a hole ratio in any of the buckets "
                                f"{', '.join(groups)} (invert={invert}: is that right?)")
    for label in empty:
        logger.warning("no mask under %s falls in bucket %s: it is left out", root, label)
    short = {label: len(g) for label, g in groups.items() if 0 < len(g) < per_bucket}
    if short:
        logger.warning("masks under %s: fewer than %d in %s", root, per_bucket,
                       ", ".join(f"{label} ({n})" for label, n in short.items()))
    return {label: group for label, group in groups.items() if group}


def _bucket_key(bucket: Bucket) -> list[int]:
    # Seeds come from the bucket's own bounds, not its position in the list, so a
    # bucket's masks do not change when other buckets are added or removed.
    if isinstance(bucket, (tuple, list)):
        return [0, round(bucket[0] * 1_000_000), round(bucket[1] * 1_000_000)]
    return [1, round(bucket * 1_000_000), 0]


def make_eval_masks(
    height: int,
    width: int,
    buckets: Sequence[Bucket] = PAPER_BUCKETS,
    per_bucket: int = 100,
    seed: int = 0,
    tolerance: float = 0.005,
) -> dict[str, list[torch.Tensor]]:
    """A fixed, seeded set of free-form evaluation masks per bucket.

    Each bucket is either an interval ``(low, high)`` -- masks get a ratio in
    ``(low, high]``, targets spread uniformly across it -- or a fixed ratio ``r``
    -- masks get ``r +- tolerance``. Mask ``i`` of a bucket depends only on
    ``(seed, bucket bounds, i)``, so asking for more masks keeps the first ones.

    Returns:
        ``{bucket_label(b): [mask [1, height, width], ...]}`` in ``buckets`` order,
        1 = known, 0 = hole.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    total = height * width
    out: dict[str, list[torch.Tensor]] = {}
    for bucket in buckets:
        masks = []
        for i in range(per_bucket):
            rng = np.random.default_rng(np.random.SeedSequence([seed, *_bucket_key(bucket), i]))
            if isinstance(bucket, (tuple, list)):
                lo, hi = bucket
                tol = min(tolerance, (hi - lo) / 4)
                # Keep the whole +-tol band strictly inside (lo, hi].
                target = rng.uniform(lo + tol + 1.0 / total, hi - tol)
                mask = generate_mask(height, width, target, tol, rng)
                if bucket_of(hole_ratio(mask), [bucket]) is None:  # the band rules this out
                    raise RuntimeError(f"eval mask fell outside bucket {bucket_label(bucket)}")
            else:
                mask = generate_mask(height, width, float(bucket), tolerance, rng)
            masks.append(mask)
        out[bucket_label(bucket)] = masks
    return out
