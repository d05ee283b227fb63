"""Loading and saving images and mask files: the one place that touches image files.

Conventions (the whole of ``train/`` relies on them):

- an image is a float32 tensor ``[3, H, W]`` with values in ``[0, 1]``, RGB order;
- a mask is a float32 tensor ``[1, H, W]`` with values in ``[0, 1]``,
  **1 = known pixel, 0 = hole**;
- a mask *file* is a greyscale picture where, by default, **white = known** and
  black = hole. Files made the other way round (white = hole, as in NVIDIA's
  irregular *test* mask set) are read and written with ``invert=True``.

Numpy conversions (:func:`image_to_numpy`, :func:`image_from_numpy`,
:func:`mask_to_numpy`, :func:`mask_from_numpy`) use uint8 ``H x W x 3`` / ``H x W``
arrays, the layout OpenCV-style code expects; pass ``bgr=True`` for OpenCV's channel
order.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "is_image_file",
    "find_images",
    "check_image",
    "readable_images",
    "load_image",
    "load_mask",
    "save_image",
    "save_mask",
    "image_to_numpy",
    "image_from_numpy",
    "mask_to_numpy",
    "mask_from_numpy",
    "load_readable",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
"""File extensions treated as images (compared case-insensitively)."""

logger = logging.getLogger(__name__)

# Everything Pillow raises for a file it cannot decode: unknown format, truncated
# data, bad chunks, absurd sizes. Caught in one place so callers see one type.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

PathLike = str | os.PathLike


class ImageLoadError(OSError):
    """An image or mask file could not be read or decoded.

    Attributes:
        path: the offending file.
    """

    def __init__(self, path: PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def is_image_file(path: PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def find_images(root: PathLike) -> list[Path]:
    """All image files under ``root``, recursively, in a fixed order.

    The order is that of the path relative to ``root`` written with ``/``, so it is
    the same on every filesystem and machine. Hidden files and folders (name starting
    with ``.``, e.g. macOS ``._x.jpg`` shadow files) are left out. Symlinked folders
    are followed, since data sets are often assembled from links.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        found.extend((rel / n).as_posix() for n in names if not n.startswith(".") and is_image_file(n))
    return [root / rel for rel in sorted(found)]


def check_image(path: PathLike, full: bool = False) -> None:
    """Raise :class:`ImageLoadError` unless ``path`` looks like a readable image.

    The default check parses only the header (format, size): cheap enough to run over
    a whole data set, and it catches files that are not images at all. ``full=True``
    decodes the pixels too, which also catches truncated or corrupt image data.
    """
    _open(path, decode=full)


def readable_images(paths: Iterable[PathLike], check: str = "header") -> list[Path]:
    """The paths that pass :func:`check_image`, in their order; the rest are logged and dropped.

    ``check`` is ``"header"`` (cheap: catches non-image files), ``"full"`` (decodes
    every file: also catches truncated data, slow on big sets) or ``"none"``. Each
    dropped file gets a logging warning naming its path, so a run never stops on one
    bad file but the bad file is not silent either.
    """
    if check not in ("none", "header", "full"):
        raise ValueError(f"check must be 'none', 'header' or 'full', got {check!r}")
    paths = [Path(p) for p in paths]
    if check == "none":
        return paths
    good = []
    for path in paths:
        try:
            check_image(path, full=check == "full")
        except ImageLoadError as e:
            logger.warning("skipping unreadable image %s: %s", e.path, e.reason)
            continue
        good.append(path)
    return good


def _open(path: PathLike, decode: bool = True) -> Image.Image | None:
    """Open ``path`` with Pillow, EXIF orientation applied; all failures -> ImageLoadError.

    With ``decode=False`` only the header is read and nothing is returned.
    """
    try:
        with Image.open(path) as im:
            if im.width <= 0 or im.height <= 0:
                raise ImageLoadError(path, f"empty image ({im.width}x{im.height})")
            if not decode:
                return None
            im.load()
            try:
                # A new image (or a copy) either way, so the file can close.
                return ImageOps.exif_transpose(im)
            except (ValueError, TypeError, KeyError, SyntaxError, struct.error):
                # Broken EXIF metadata must not throw away good pixels.
                return im.copy()
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(path, "no such file") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, "not a recognised image format") from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e


def _grey_array(im: Image.Image) -> np.ndarray:
    """A single-channel float32 array in [0, 1] from any Pillow mode."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale PNGs: converting to "L" would clip at 255, so scale instead.
        return np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def load_image(path: PathLike) -> torch.Tensor:
    """Load an image file as a float32 tensor ``[3, H, W]`` in ``[0, 1]`` (RGB).

    The EXIF orientation tag is applied, so phone photos come out upright. Greyscale
    files are repeated over three channels; an alpha channel is dropped (the colour
    under transparent pixels is kept as stored).

    Raises:
        ImageLoadError: the file is missing, not an image, or its data is corrupt.
    """
    im = _open(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = torch.from_numpy(_grey_array(im))
        return grey.unsqueeze(0).expand(3, -1, -1).contiguous()
    return image_from_numpy(np.asarray(im.convert("RGB")))


def load_mask(path: PathLike, invert: bool = False, threshold: float | None = 0.5) -> torch.Tensor:
    """Load a mask file as a float32 tensor ``[1, H, W]`` with 1 = known, 0 = hole.

    Args:
        path: a greyscale (or colour: its luminance is used) picture.
        invert: ``False`` for files where white = known (our convention and what
            :func:`save_mask` writes); ``True`` for files where white = hole, such as
            NVIDIA's irregular test mask set.
        threshold: grey levels ``>= threshold`` (in [0, 1]) count as white, the rest as
            black, giving a binary mask; ``None`` keeps the grey levels as a soft mask.

    Raises:
        ImageLoadError: the file is missing, not an image, or its data is corrupt.
    """
    grey = _grey_array(_open(path))
    return _grey_to_mask(grey, invert, threshold)


def _grey_to_mask(grey: np.ndarray, invert: bool, threshold: float | None) -> torch.Tensor:
    if threshold is not None:
        grey = (grey >= threshold).astype(np.float32)
    if invert:
        grey = 1.0 - grey
    return torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32)).unsqueeze(0)


def _check_hw(t: torch.Tensor, name: str, channels: tuple[int, ...]) -> torch.Tensor:
    """Accept ``[C, H, W]`` or ``[1, C, H, W]`` with C in ``channels``; return ``[C, H, W]``."""
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2 and 1 in channels:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in channels:
        want = " or ".join(f"[{c}, H, W]" for c in channels)
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    return t


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """Float in [0, 1] (clamped) -> uint8, rounded to nearest so load(save(x)) is exact."""
    t = t.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    return (t * 255.0).round().to(torch.uint8).numpy()


def image_to_numpy(image: torch.Tensor, bgr: bool = False) -> np.ndarray:
    """Image tensor ``[3, H, W]`` (or ``[1, 3, H, W]``) in [0, 1] -> uint8 array ``H x W x 3``.

    Values are clamped to [0, 1] and rounded. ``bgr=True`` gives OpenCV's channel order.
    A one-channel tensor is repeated to three channels.
    """
    image = _check_hw(image, "image", (1, 3))
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    hwc = _to_uint8(image).transpose(1, 2, 0)
    if bgr:
        hwc = hwc[:, :, ::-1]
    return np.ascontiguousarray(hwc)


def image_from_numpy(array: np.ndarray, bgr: bool = False) -> torch.Tensor:
    """uint8 array ``H x W x 3`` (or ``H x W`` grey) -> float32 image tensor ``[3, H, W]`` in [0, 1].

    ``bgr=True`` reads OpenCV's channel order. Float arrays are taken to be in [0, 1]
    already and are clamped.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"array must have shape HxWx3 or HxW, got {array.shape}")
    if bgr:
        array = array[:, :, ::-1]
    # A copy: Pillow hands out read-only arrays, and the caller's array must not alias ours.
    if array.dtype == np.uint8:
        out = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float() / 255.0
    else:
        out = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).permute(2, 0, 1)
        out = out.clamp(0.0, 1.0)
    return out.contiguous()


def mask_to_numpy(mask: torch.Tensor, invert: bool = False) -> np.ndarray:
    """Mask tensor ``[1, H, W]`` (1 = known) -> uint8 array ``H x W``, 255 = known, 0 = hole.

    ``invert=True`` gives 255 = hole instead. Soft masks keep their grey levels.
    """
    mask = _check_hw(mask, "mask", (1,))
    if invert:
        mask = 1.0 - mask
    return _to_uint8(mask)[0]


def mask_from_numpy(array: np.ndarray, invert: bool = False, threshold: float | None = 0.5) -> torch.Tensor:
    """Array ``H x W`` (uint8 0..255, bool, or float in [0, 1]) -> mask tensor ``[1, H, W]``.

    White (255 / True / 1.0) means known unless ``invert=True``; ``threshold`` as in
    :func:`load_mask` (``None`` keeps grey levels).
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ValueError(f"mask array must have shape HxW, got {array.shape}")
    if array.dtype == np.uint8:
        grey = array.astype(np.float32) / 255.0
    else:
        grey = np.clip(array.astype(np.float32), 0.0, 1.0)
    return _grey_to_mask(grey, invert, threshold)


def _prepare_path(path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_image(image: torch.Tensor, path: PathLike, quality: int = 95) -> None:
    """Save an image tensor ``[3, H, W]`` (or ``[1, 3, H, W]``, or one channel) in [0, 1].

    The format follows the file extension; values are clamped and rounded to 8 bits,
    so a PNG round trip of an 8-bit image is exact. ``quality`` applies to JPEG/WebP.
    Parent folders are created.
    """
    path = _prepare_path(path)
    Image.fromarray(image_to_numpy(image)).save(path, quality=quality)


def save_mask(mask: torch.Tensor, path: PathLike, invert: bool = False) -> None:
    """Save a mask tensor ``[1, H, W]`` (1 = known) as an 8-bit greyscale file.

    The file has white = known, black = hole, or the reverse with ``invert=True``.
    Use a lossless format (PNG): JPEG artefacts would blur the hole boundary.
    Parent folders are created.
    """
    path = _prepare_path(path)
    Image.fromarray(mask_to_numpy(mask, invert=invert)).save(path)


def load_readable(files: list[Path], index: int, load, bad: set[int], what: str):
    """``load(j)`` for the first readable file ``j`` at or after ``index`` (wrapping round).

    A file that fails with :class:`ImageLoadError` is added to ``bad`` (the caller's
    per-process set, so each worker warns about a file once), logged as a warning naming
    the path, and skipped. ``what`` names the files in messages ("image", "mask").

    Raises:
        RuntimeError: no file could be read.
    """
    n = len(files)
    for k in range(n):
        j = (index + k) % n
        if j in bad:
            continue
        try:
            return load(j)
        except ImageLoadError as e:
            bad.add(j)
            logger.warning("skipping unreadable %s %s: %s", what, e.path, e.reason)
    raise RuntimeError(f"none of the {n} {what} files could be read")
