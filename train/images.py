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
order. Pillow conversions (:func:`image_from_pil`, :func:`mask_from_pil`) are what the
file loaders use, so an image decoded elsewhere (an upload in memory) is read the same way.

Files are written atomically (a temporary file in the same folder, then a rename), so an
interrupted run never leaves a truncated image behind.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_FORMATS",
    "IMAGE_EXTENSIONS",
    "LOSSLESS_EXTENSIONS",
    "ALPHA_EXTENSIONS",
    "ImageLoadError",
    "ImageFile",
    "is_image_file",
    "is_lossless",
    "keeps_alpha",
    "find_images",
    "find_non_images",
    "check_image",
    "readable_images",
    "read_image",
    "load_image",
    "load_mask",
    "image_from_pil",
    "mask_from_pil",
    "save_image",
    "save_mask",
    "image_to_numpy",
    "image_from_numpy",
    "mask_to_numpy",
    "mask_from_numpy",
    "load_readable",
]

IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP",
                 ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF"}
"""The image files of the whole project, by extension, with Pillow's name of each format.
Folder searches, output names and the board's uploads all take theirs from here."""

IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)
"""File extensions treated as images (compared case-insensitively)."""

LOSSLESS_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
"""Extensions whose files keep 8-bit RGB exactly (JPEG and WebP are lossy as written here,
GIF has a 256-colour palette)."""

ALPHA_EXTENSIONS = (".png", ".webp", ".tif", ".tiff")
"""Extensions :func:`save_image` can write an alpha channel to."""

# Pillow modes with more than 8 bits per sample, decoded as greyscale in [0, 1].
_DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I", "F")

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


@dataclass(frozen=True)
class ImageFile:
    """An image file as :func:`read_image` decodes it.

    Attributes:
        image: float32 ``[3, H, W]`` in [0, 1], RGB (as :func:`load_image` returns it).
        alpha: float32 ``[1, H, W]`` in [0, 1] (1 = opaque), or ``None`` when the file has
            no transparency (no alpha channel, or a fully opaque one).
        deep: the file stores more than 8 bits per channel (16-bit PNG or TIFF).
    """

    image: torch.Tensor
    alpha: torch.Tensor | None
    deep: bool


def is_image_file(path: PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_lossless(path: PathLike) -> bool:
    """True when :func:`save_image` keeps every 8-bit pixel of an image written to ``path``
    exactly (its extension is one of :data:`LOSSLESS_EXTENSIONS`)."""
    return Path(path).suffix.lower() in LOSSLESS_EXTENSIONS


def keeps_alpha(path: PathLike) -> bool:
    """True when :func:`save_image` can write an alpha channel to ``path``."""
    return Path(path).suffix.lower() in ALPHA_EXTENSIONS


def _visible_files(root: PathLike, exclude: Iterable[PathLike], what: str = "image"
                   ) -> list[Path]:
    """Files under ``root``, recursively, sorted by their ``/``-joined relative path;
    hidden files and folders and the sub-folders in ``exclude`` are left out. ``what``
    names the folder in the error ("image", "mask")."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root} does not exist or is not a folder")
    excluded = {Path(e).resolve() for e in exclude}
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not (excluded and (Path(folder) / d).resolve() in excluded)]
        rel = Path(folder).relative_to(root)
        found.extend((rel / n).as_posix() for n in names if not n.startswith("."))
    return [root / rel for rel in sorted(found)]


def find_images(root: PathLike, exclude: Iterable[PathLike] = (), what: str = "image"
                ) -> list[Path]:
    """All image files under ``root``, recursively, in a fixed order.

    The order is that of the path relative to ``root`` written with ``/``, so it is
    the same on every filesystem and machine. Hidden files and folders (name starting
    with ``.``, e.g. macOS ``._x.jpg`` shadow files, or the temporary files of an
    unfinished :func:`save_image`) are left out, and so are the sub-folders of ``root``
    named in ``exclude`` (e.g. an output folder inside an input folder). Symlinked folders
    are followed, since data sets are often assembled from links. ``what`` names the
    folder in the error of a missing one ("image", "mask").
    """
    return [p for p in _visible_files(root, exclude, what) if is_image_file(p)]


def find_non_images(root: PathLike, exclude: Iterable[PathLike] = ()) -> list[Path]:
    """The files :func:`find_images` passes over for their extension (same order and
    rules), so a caller can say how many it skipped."""
    return [p for p in _visible_files(root, exclude) if not is_image_file(p)]


def check_image(path: PathLike, full: bool = False) -> None:
    """Raise :class:`ImageLoadError` unless ``path`` looks like a readable image.

    The default check parses only the header (format, size): cheap enough to run over
    a whole data set, and it catches files that are not images at all. ``full=True``
    decodes the pixels too, which also catches truncated or corrupt image data.
    """
    _open(path, decode=full)


def readable_images(paths: Iterable[PathLike], check: str = "header", what: str = "image"
                    ) -> list[Path]:
    """The paths that pass :func:`check_image`, in their order; the rest are logged and dropped.

    ``check`` is ``"header"`` (cheap: catches non-image files), ``"full"`` (decodes
    every file: also catches truncated data, slow on big sets) or ``"none"``. Each
    dropped file gets a logging warning naming its path, so a run never stops on one
    bad file but the bad file is not silent either. ``what`` names the files in the warning.
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
            logger.warning("skipping unreadable %s %s: %s", what, e.path, e.reason)
            continue
        good.append(path)
    return good


def _stores_deep_samples(im: Image.Image) -> bool:
    """Whether the file behind ``im`` holds more than 8 bits per sample; call before
    ``load()``. Pillow decodes 16-bit colour PNG and TIFF to 8-bit "RGB" and says so
    only in the raw mode of its tiles (e.g. ``RGB;16B``)."""
    if im.mode in _DEEP_GREY_MODES:
        return True
    # tile[3] is the decoder's arguments: the raw mode, or a tuple that starts with it.
    rawmodes = (t[3] if isinstance(t[3], str) else (t[3] or ("",))[0] for t in im.tile)
    return any(";16" in str(raw) or ";32" in str(raw) for raw in rawmodes)


def _open(path: PathLike, decode: bool = True) -> tuple[Image.Image, bool] | None:
    """Open ``path`` with Pillow, EXIF orientation applied; all failures -> ImageLoadError.

    Returns the decoded image and whether the file has more than 8 bits per sample. With
    ``decode=False`` only the header is read and nothing is returned.
    """
    try:
        with Image.open(path) as im:
            if im.width <= 0 or im.height <= 0:
                raise ImageLoadError(path, f"empty image ({im.width}x{im.height})")
            if not decode:
                return None
            deep = _stores_deep_samples(im)
            im.load()
            try:
                # A new image (or a copy) either way, so the file can close.
                return ImageOps.exif_transpose(im), deep
            except (ValueError, TypeError, KeyError, SyntaxError, struct.error):
                # Broken EXIF metadata must not throw away good pixels.
                return im.copy(), deep
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


def _alpha_array(im: Image.Image) -> np.ndarray | None:
    """The alpha channel of ``im`` as float32 ``H x W`` in [0, 1], or None when ``im`` has
    none or it is fully opaque (so an opaque canvas export reads like a plain picture)."""
    if "A" in im.getbands():
        alpha = np.asarray(im.getchannel("A"))
    elif "transparency" in im.info or "a" in im.getbands():
        # A palette or a colour key marked transparent, or premultiplied alpha.
        alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    else:
        return None
    if alpha.min() == 255:
        return None
    return alpha.astype(np.float32) / 255.0


def image_from_pil(im: Image.Image) -> torch.Tensor:
    """A Pillow image as a float32 tensor ``[3, H, W]`` in [0, 1] (RGB).

    Greyscale is repeated over three channels; 16-bit greyscale is scaled by 65535 rather
    than clipped at 255 (Pillow's ``convert("RGB")`` would turn it white); an alpha
    channel is dropped (the colour under transparent pixels is kept as stored).
    """
    if im.mode in _DEEP_GREY_MODES:
        grey = torch.from_numpy(_grey_array(im))
        return grey.unsqueeze(0).expand(3, -1, -1).contiguous()
    return image_from_numpy(np.asarray(im.convert("RGB")))


def mask_from_pil(im: Image.Image, invert: bool = False,
                  threshold: float | None = 0.5) -> torch.Tensor:
    """A Pillow image as a mask tensor ``[1, H, W]``, 1 = known, 0 = hole.

    A picture with transparency (an alpha channel that is not fully opaque) is read by its
    alpha alone: opaque = known, transparent = hole, the colours ignored. That is what an
    editor leaves when the part to remove is erased from a copy of the photo; without this
    rule Pillow would read the colour stored under the erased pixels, usually black or
    white, and the hole would be anything. Otherwise the luminance is used, white = known.
    ``invert`` and ``threshold`` are as in :func:`load_mask`.
    """
    alpha = _alpha_array(im)
    grey = alpha if alpha is not None else _grey_array(im)
    return _grey_to_mask(grey, invert, threshold)


def read_image(path: PathLike) -> ImageFile:
    """Load an image file with what 8-bit RGB leaves out: its alpha channel and whether it
    has more than 8 bits per channel (see :class:`ImageFile`). The pixels are those of
    :func:`load_image`.

    Raises:
        ImageLoadError: the file is missing, not an image, or its data is corrupt.
    """
    im, deep = _open(path)
    alpha = _alpha_array(im)
    return ImageFile(image_from_pil(im),
                     None if alpha is None else torch.from_numpy(alpha).unsqueeze(0), deep)


def load_image(path: PathLike) -> torch.Tensor:
    """Load an image file as a float32 tensor ``[3, H, W]`` in ``[0, 1]`` (RGB).

    The EXIF orientation tag is applied, so phone photos come out upright. Greyscale
    files are repeated over three channels (16-bit ones scaled, not clipped); an alpha
    channel is dropped (the colour under transparent pixels is kept as stored; use
    :func:`read_image` to have it).

    Raises:
        ImageLoadError: the file is missing, not an image, or its data is corrupt.
    """
    im, _ = _open(path)
    return image_from_pil(im)


def load_mask(path: PathLike, invert: bool = False, threshold: float | None = 0.5) -> torch.Tensor:
    """Load a mask file as a float32 tensor ``[1, H, W]`` with 1 = known, 0 = hole.

    Args:
        path: a greyscale (or colour: its luminance is used) picture. A file with
            transparency is read by its alpha channel instead: opaque = known,
            transparent = hole (see :func:`mask_from_pil`); a fully opaque alpha channel
            is ignored.
        invert: ``False`` for files where white = known (our convention and what
            :func:`save_mask` writes); ``True`` for files where white = hole, such as
            NVIDIA's irregular test mask set (and, for a file with transparency, opaque
            = hole).
        threshold: grey levels ``>= threshold`` (in [0, 1]) count as white, the rest as
            black, giving a binary mask; ``None`` keeps the grey levels as a soft mask.

    Raises:
        ImageLoadError: the file is missing, not an image, or its data is corrupt.
    """
    im, _ = _open(path)
    return mask_from_pil(im, invert, threshold)


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


def _write_atomically(path: PathLike, write: Callable[[Path], None]) -> None:
    """``write(temporary path)``, then rename the temporary file onto ``path``.

    The temporary file lies in the same folder, so the rename is atomic: whoever reads
    ``path`` sees the old file or the whole new one, never a truncated one, even when the
    process is interrupted mid-write. On any exception (KeyboardInterrupt included) it is
    removed and ``path`` is left as it was. Its name keeps ``path``'s extension, from which
    Pillow picks the format, and starts with a dot, so :func:`find_images` never lists a
    leftover. Not ``tempfile.mkstemp``: its files are private (mode 0600), and the
    result would keep that mode instead of the umask's. No fsync: that guards against a
    power cut, not an interrupted run, and would cost a disk flush per image.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _rgba_array(image: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
    """uint8 ``H x W x 4`` from an image ``[3, H, W]`` and an alpha ``[1, H, W]`` in [0, 1]."""
    rgb = image_to_numpy(image)
    opacity = _to_uint8(_check_hw(alpha, "alpha", (1,)))[0]
    if opacity.shape != rgb.shape[:2]:
        raise ValueError(f"alpha is {opacity.shape[1]}x{opacity.shape[0]} but the image is "
                         f"{rgb.shape[1]}x{rgb.shape[0]}")
    return np.dstack([rgb, opacity])


def save_image(image: torch.Tensor, path: PathLike, quality: int = 95,
               alpha: torch.Tensor | None = None) -> None:
    """Save an image tensor ``[3, H, W]`` (or ``[1, 3, H, W]``, or one channel) in [0, 1].

    The format follows the file extension; values are clamped and rounded to 8 bits,
    so a PNG round trip of an 8-bit image is exact. ``quality`` applies to JPEG/WebP.
    ``alpha`` (``[1, H, W]`` in [0, 1], 1 = opaque) is written as an alpha channel; it
    needs one of :data:`ALPHA_EXTENSIONS`. Parent folders are created; the write is
    atomic (see the module docstring).

    Raises:
        ValueError: a bad shape, an unknown extension, or ``alpha`` for a format without
            one.
    """
    if alpha is not None and not keeps_alpha(path):
        raise ValueError(f"{Path(path).suffix or 'a file without extension'} cannot store "
                         f"an alpha channel; use one of {', '.join(ALPHA_EXTENSIONS)}")
    array = image_to_numpy(image) if alpha is None else _rgba_array(image, alpha)
    _write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, quality=quality))


def save_mask(mask: torch.Tensor, path: PathLike, invert: bool = False) -> None:
    """Save a mask tensor ``[1, H, W]`` (1 = known) as an 8-bit greyscale file.

    The file has white = known, black = hole, or the reverse with ``invert=True``.
    Use a lossless format (PNG): JPEG artefacts would blur the hole boundary.
    Parent folders are created; the write is atomic (see the module docstring).
    """
    array = mask_to_numpy(mask, invert=invert)
    _write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp))


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
