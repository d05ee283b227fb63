"""Image data sets, seeded transforms, and image/mask pairs for training.

Images are float32 tensors ``[3, H, W]`` in ``[0, 1]``; masks are float32 ``[1, H, W]``,
**1 = known pixel, 0 = hole**.

Reproducibility: nothing here reads global random state. Sample ``i`` of epoch ``e``
draws from a generator seeded with ``(seed, e, i)`` (:func:`sample_rng`), so it is the
same whichever DataLoader worker makes it, in whatever order, in the main process or
not. Call ``set_epoch(e)`` before each epoch. The epoch lives in shared memory, so
``persistent_workers=True`` loaders see the change too.

Bad files never stop a run: at index time a cheap header check drops non-image files,
and a file that fails to decode later (e.g. a truncated JPEG) is logged and replaced by
the next readable one, the same one every time.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .images import PathLike, find_images, load_image, load_readable, readable_images
from .masks import MaskSource

__all__ = [
    "sample_rng",
    "Transform",
    "Compose",
    "Resize",
    "CenterCrop",
    "RandomCrop",
    "RandomHorizontalFlip",
    "train_transform",
    "eval_transform",
    "ImageFolderDataset",
    "SPLIT_FRACTIONS",
    "split_files",
    "CelebAHQ",
    "Places2",
    "InpaintingDataset",
]

logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one sample: a pure function of ``(seed, epoch, index, stream)``.

    ``stream`` separates independent uses within one sample (0 = image transform,
    1 = mask), so changing one does not shift the other's random numbers.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, stream]))


# ----------------------------------------------------------------------------------
# Transforms: callables ``(tensor [C, H, W], rng) -> tensor [C, H', W']``

Transform = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class Compose:
    """Apply transforms in order, all drawing from the same per-sample generator."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, rng)
        return x


class Resize:
    """Resize ``[C, H, W]``: an int sets the short side (aspect kept), ``(h, w)`` sets both.

    ``mode`` is a ``torch.nn.functional.interpolate`` mode; bilinear and bicubic use
    antialiasing so downscaling does not alias. Use ``"nearest-exact"`` for masks.
    """

    def __init__(self, size: int | Sequence[int], mode: str = "bilinear"):
        self.size = size
        self.mode = mode

    def _target(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.size, int):
            scale = self.size / min(h, w)
            return max(self.size, round(h * scale)), max(self.size, round(w * scale))
        return _size2(self.size)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        size = self._target(*x.shape[-2:])
        if size == tuple(x.shape[-2:]):
            return x
        smooth = self.mode in ("bilinear", "bicubic")
        out = F.interpolate(
            x[None], size=size, mode=self.mode, antialias=smooth, **({"align_corners": False} if smooth else {})
        )[0]
        # Bicubic overshoots at edges; images must stay in [0, 1].
        return out.clamp(0.0, 1.0) if self.mode == "bicubic" else out


class CenterCrop:
    """Crop the centre ``size`` (int or ``(h, w)``) of ``[C, H, W]``; must fit."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _size2(size)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        (h, w), (th, tw) = x.shape[-2:], self.size
        if th > h or tw > w:
            raise ValueError(f"CenterCrop {th}x{tw} does not fit a {h}x{w} image")
        top, left = (h - th) // 2, (w - tw) // 2
        return x[..., top : top + th, left : left + tw]


class RandomCrop:
    """Crop ``size`` (int or ``(h, w)``) at a random place of ``[C, H, W]``.

    An image smaller than the crop is first scaled up (aspect kept) until it covers
    it, so odd small files in a big data set do not stop a run.
    """

    def __init__(self, size: int | Sequence[int], mode: str = "bilinear"):
        self.size = _size2(size)
        self.mode = mode

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        (h, w), (th, tw) = x.shape[-2:], self.size
        if h < th or w < tw:
            grow = max(th / h, tw / w)
            h, w = max(th, math.ceil(h * grow)), max(tw, math.ceil(w * grow))
            x = Resize((h, w), self.mode)(x)
        top = int(rng.integers(0, h - th + 1))
        left = int(rng.integers(0, w - tw + 1))
        return x[..., top : top + th, left : left + tw]


class RandomHorizontalFlip:
    """Mirror ``[C, H, W]`` left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return x.flip(-1) if rng.random() < self.p else x


def train_transform(size: int) -> Compose:
    """Short side to ``size``, random ``size x size`` crop, random left-right flip."""
    return Compose([Resize(size), RandomCrop(size), RandomHorizontalFlip()])


def eval_transform(size: int) -> Compose:
    """Short side to ``size``, centre ``size x size`` crop: deterministic."""
    return Compose([Resize(size), CenterCrop(size)])


# ----------------------------------------------------------------------------------
# Data sets


class _Epoch:
    """An epoch counter in shared memory: set in the main process, read in workers.

    DataLoader workers get a pickled copy of the data set; a plain int set later in
    the main process would never reach persistent workers. A shared tensor does.
    """

    def __init__(self) -> None:
        self._value = torch.zeros((), dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self._value.item())

    def set(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._value.fill_(epoch)


class ImageFolderDataset(Dataset):
    """Images under a folder, recursively: ``dataset[i] -> Tensor [3, H, W]`` in [0, 1].

    Files with extension jpg, jpeg, png or webp (any case) are used, in the order of
    :func:`train.images.find_images` (relative path, so the same on every machine).
    ``transform(image, rng)`` gets the per-sample generator ``sample_rng(seed, epoch, i)``.

    Bad files: ``check`` (``"header"``, ``"full"`` or ``"none"``, see
    :func:`train.images.readable_images`) drops unreadable files at index time with a
    logging warning naming each. If a file still fails to decode at load time, a
    warning names it and sample ``i`` is taken from the next readable file instead.

    Args:
        root: the folder.
        transform: optional seeded transform, e.g. :func:`train_transform`.
        files: use these files instead of searching ``root`` (their order is kept).
        seed: base seed of the per-sample generators.
        check: index-time check.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Transform | None = None,
        *,
        files: Sequence[PathLike] | None = None,
        seed: int = 0,
        check: str = "header",
    ):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.root = Path(root)
        self.transform = transform
        self.seed = seed
        self.files = readable_images(find_images(self.root) if files is None else files, check)
        if not self.files:
            raise FileNotFoundError(f"no readable images under {self.root}")
        self._epoch = _Epoch()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def epoch(self) -> int:
        """The epoch set by :meth:`set_epoch` (0 at first)."""
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random transforms ``__getitem__`` draws."""
        self._epoch.set(epoch)

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` untransformed ``[3, H, W]``, or the next readable one if it is bad."""
        try:
            return load_readable(self.files, index, lambda j: load_image(self.files[j]),
                                 self._bad, "image")
        except RuntimeError as e:
            raise RuntimeError(f"{e} (under {self.root})") from None

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image, sample_rng(self.seed, self.epoch, index))
        return image


SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


def split_files(files: Sequence[PathLike], root: PathLike, split: str) -> list[Path]:
    """The ``split`` part (``"train"``, ``"val"`` or ``"test"``) of a 70/15/15 split.

    Each file's key is the SHA-256 of its path relative to ``root`` (written with
    ``/``); files are ordered by key and the first 70 % (rounded) are train, the next
    15 % val, the rest test. The split therefore depends only on the file names:
    not on listing order, filesystem, machine, or numpy version, and the parts are
    disjoint and cover every file. The returned files are in name order.
    """
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"split must be one of {sorted(SPLIT_FRACTIONS)}, got {split!r}")
    root = Path(root)
    rel = sorted({Path(f).relative_to(root).as_posix() for f in files})
    by_key = sorted(rel, key=lambda r: (hashlib.sha256(r.encode("utf-8")).hexdigest(), r))
    n_train = round(SPLIT_FRACTIONS["train"] * len(rel))
    n_val = round(SPLIT_FRACTIONS["val"] * len(rel))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(rel))}
    lo, hi = bounds[split]
    return [root / r for r in sorted(by_key[lo:hi])]


class CelebAHQ(ImageFolderDataset):
    """CelebA-HQ images under ``root`` (any layout, searched recursively), one split.

    There is no official split for inpainting; this is the deterministic 70/15/15
    split of :func:`split_files` (by hash of file name). The split is made before
    the file check, so a corrupt file only removes itself, never moves others
    between splits. Keyword arguments go to :class:`ImageFolderDataset`.
    """

    def __init__(self, root: PathLike, split: str = "train", transform: Transform | None = None, **kwargs):
        self.split = split
        files = split_files(find_images(root), root, split)
        super().__init__(root, transform, files=files, **kwargs)


class Places2(ImageFolderDataset):
    """Places2 (Places365) images of one split, in any of its public folder layouts.

    ``root`` is the folder holding the split folders; the first of these that exists
    is used (or name one with ``folder=``):

    - train: ``data_256/`` (Places365-Standard / -Challenge, 256x256, e.g.
      ``data_256/a/airfield/00000001.jpg``), ``data_large/`` (high resolution),
      ``train_256/``, ``train_large/``, ``train/``;
    - val: ``val_256/`` (flat, ``Places365_val_00000001.jpg``), ``val_large/``, ``val/``;
    - test: ``test_256/``, ``test_large/``, ``test/``.

    ``file_list`` may name a devkit list such as ``places365_train_standard.txt``
    (lines like ``/a/airfield/00000001.jpg 0``) or ``places365_val.txt``: the first
    token of each line is a path relative to the split folder. That skips walking
    1.8 million files; with ``check="none"`` the header check of every file is
    skipped too (unreadable files are still caught, at load time). Keyword arguments
    go to :class:`ImageFolderDataset`.
    """

    LAYOUTS = {
        "train": ("data_256", "data_large", "train_256", "train_large", "train"),
        "val": ("val_256", "val_large", "val"),
        "test": ("test_256", "test_large", "test"),
    }

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Transform | None = None,
        *,
        folder: str | None = None,
        file_list: PathLike | None = None,
        **kwargs,
    ):
        if split not in self.LAYOUTS:
            raise ValueError(f"split must be one of {sorted(self.LAYOUTS)}, got {split!r}")
        self.split = split
        split_dir = self.find_split_folder(root, split, folder)
        files = None
        if file_list is not None:
            lines = Path(file_list).read_text().splitlines()
            rel = sorted(line.split()[0].lstrip("/") for line in lines if line.strip())
            files = [split_dir / r for r in rel]
        super().__init__(split_dir, transform, files=files, **kwargs)

    @classmethod
    def find_split_folder(cls, root: PathLike, split: str, folder: str | None = None) -> Path:
        """The folder holding ``split`` under ``root`` (see the class docs for the layouts)."""
        root = Path(root)
        names = (folder,) if folder is not None else cls.LAYOUTS[split]
        for name in names:
            if (root / name).is_dir():
                return root / name
        raise FileNotFoundError(f"no Places2 {split} folder under {root}; looked for {', '.join(names)}")


class InpaintingDataset(Dataset):
    """Pairs images with masks: ``dataset[i] -> (image [3, H, W], mask [1, H, W])``.

    The mask (1 = known, 0 = hole) has the image's size and comes from
    ``masks(H, W, rng)`` with ``rng = sample_rng(seed, epoch, i, stream=1)``, e.g. a
    :class:`train.masks.FreeFormMasks` or :class:`train.masks.MaskFolder`. The image
    is not masked here: the model applies the mask. :meth:`set_epoch` also sets the
    epoch of ``images`` when it has one.
    """

    def __init__(self, images: Dataset, masks: MaskSource, seed: int = 0):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.images = images
        self.masks = masks
        self.seed = seed
        self._epoch = _Epoch()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def epoch(self) -> int:
        """The epoch set by :meth:`set_epoch` (0 at first)."""
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for both the masks and the image transforms."""
        self._epoch.set(epoch)
        if hasattr(self.images, "set_epoch"):
            self.images.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        h, w = image.shape[-2:]
        mask = self.masks(h, w, sample_rng(self.seed, self.epoch, index, stream=1))
        return image, mask
