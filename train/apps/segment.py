"""Semantic segmentation for object removal: the :class:`Segmenter` interface and its
implementations.

A segmenter maps an image ``[3, H, W]`` (float in [0, 1]) to a label map ``[H, W]``
(``torch.long``, indices into its ``classes``). Two implementations:

- :class:`TorchvisionSegmenter`: torchvision's FCN-ResNet101 or DeepLabV3-ResNet101 with
  the 21 Pascal VOC labels (``fcn`` / ``deeplab``). torchvision is optional and imported
  only when one is built. Weights never download: they come from a file
  (``--seg-weights PATH``) or from the local torch hub cache, where torchvision itself
  stores them (``<torch.hub.get_dir()>/checkpoints/fcn_resnet101_coco-7ecb50ca.pth``).
- :class:`ColorSegmenter`: labels pixels by colour (``color:person=ff0000,car=0000ff``);
  a stand-in for tests and for pictures with flat-coloured objects.

:func:`class_mask` turns a label map into a mask (1 = known, 0 = hole) of the chosen
classes; :func:`parse_classes` checks class names with a helpful error.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["VOC_CLASSES", "Segmenter", "SegmenterError", "parse_classes", "class_mask",
           "ColorSegmenter", "TorchvisionSegmenter", "hub_weights_path", "make_segmenter"]

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
"""The 20 Pascal VOC classes plus background, in the label order of torchvision's
``COCO_WITH_VOC_LABELS_V1`` segmentation weights."""

# Everyday spellings of VOC names (compared after lower-casing and dropping spaces, "_"
# and "-"), so "--classes airplane,tv" works.
_ALIASES = {"airplane": "aeroplane", "plane": "aeroplane", "bike": "bicycle",
            "motorcycle": "motorbike", "table": "diningtable", "plant": "pottedplant",
            "tv": "tvmonitor", "monitor": "tvmonitor", "people": "person", "human": "person",
            "couch": "sofa", "automobile": "car"}

# torchvision architectures by their --segmenter name: (builder, weights enum).
_ARCHS = {"fcn": ("fcn_resnet101", "FCN_ResNet101_Weights"),
          "deeplab": ("deeplabv3_resnet101", "DeepLabV3_ResNet101_Weights")}

# What torchvision's COCO_WITH_VOC_LABELS_V1 weights were trained with (their transforms).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RESIZE = 520


class SegmenterError(RuntimeError):
    """A segmenter cannot be built: torchvision missing, weights missing or unfit, or a bad
    specification."""


@runtime_checkable
class Segmenter(Protocol):
    """``segmenter(image [3, H, W] float in [0, 1]) -> labels [H, W] long``, where label
    ``i`` means ``segmenter.classes[i]`` (``classes[0]`` is the background)."""

    classes: Sequence[str]

    def __call__(self, image: Tensor) -> Tensor: ...


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " _-")


def parse_classes(names: str | Iterable[str], classes: Sequence[str] = VOC_CLASSES) -> list[int]:
    """Label indices of class names (``"person,car"`` or a list), in ``classes``.

    Names are matched ignoring case, spaces, ``_`` and ``-``, plus a few everyday aliases
    (``airplane``, ``tv``, ``motorcycle``, ...). The background cannot be chosen.

    Raises:
        ValueError: no name, the background, or an unknown name (with the closest known
            names and the full list).
    """
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no class given; choose from: {', '.join(classes[1:])}")
    lookup = {_normalise(c): i for i, c in enumerate(classes)}
    ids = []
    for name in names:
        key = _normalise(name)
        key = _normalise(_ALIASES.get(key, key))
        if key not in lookup:
            close = difflib.get_close_matches(key, list(lookup)[1:], n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(classes[lookup[c]] for c in close)}?)" \
                if close else ""
            raise ValueError(f"unknown class {name!r}{hint}; choose from: "
                             f"{', '.join(classes[1:])}")
        if lookup[key] == 0:
            raise ValueError(f"{name!r} is the background and cannot be removed; choose from: "
                             f"{', '.join(classes[1:])}")
        if lookup[key] not in ids:
            ids.append(lookup[key])
    return ids


def class_mask(labels: Tensor, class_ids: Iterable[int]) -> Tensor:
    """Mask ``[1, H, W]`` float32 of a label map ``[H, W]``: 0 (hole) where the label is
    one of ``class_ids``, 1 (known) elsewhere."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [H, W], got {list(labels.shape)}")
    ids = torch.tensor(sorted(set(class_ids)), dtype=labels.dtype, device=labels.device)
    return (~torch.isin(labels, ids)).to(torch.float32).unsqueeze(0)


def _check_image(image: Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"segmenter: image must be [3, H, W], got {list(image.shape)}")


class ColorSegmenter:
    """Labels the pixels whose colour is within ``tolerance`` of a class's colour.

    Args:
        colors: ``{class name: (r, g, b)}`` with 0..255 components; a pixel matching
            several gets the last. Names are checked with :func:`parse_classes`.
        tolerance: largest difference per channel, in 0..255 units.
        classes: the label names (Pascal VOC by default, so labels mean the same as a
            torchvision segmenter's).

    ``segmenter(image [3, H, W] in [0, 1]) -> labels [H, W] long`` (0 = background).
    """

    def __init__(self, colors: dict[str, tuple[int, int, int]], tolerance: float = 40.0,
                 classes: Sequence[str] = VOC_CLASSES):
        self.classes = tuple(classes)
        self.tolerance = float(tolerance)
        self.rules = [(parse_classes([name], self.classes)[0],
                       torch.tensor(rgb, dtype=torch.float32)) for name, rgb in colors.items()]

    @classmethod
    def from_spec(cls, spec: str) -> ColorSegmenter:
        """Build from ``"person=ff0000,car=0000ff[,tol=40]"`` (hex colours, 0..255 tolerance).

        Raises:
            SegmenterError: a malformed entry or an unknown class.
        """
        colors, tolerance = {}, 40.0
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            name, sep, value = entry.partition("=")
            try:
                if not sep:
                    raise ValueError("expected NAME=RRGGBB")
                if name.strip() == "tol":
                    tolerance = float(value)
                    continue
                value = value.strip().lstrip("#")
                if len(value) != 6:
                    raise ValueError("colour must be 6 hex digits")
                colors[name.strip()] = tuple(int(value[i:i + 2], 16) for i in (0, 2, 4))
                parse_classes([name])
            except ValueError as exc:
                raise SegmenterError(f"bad colour segmenter entry {entry!r}: {exc}; expected "
                                     "e.g. color:person=ff0000,car=0000ff,tol=40") from exc
        if not colors:
            raise SegmenterError("the colour segmenter needs at least one CLASS=RRGGBB, e.g. "
                                 "color:person=ff0000")
        return cls(colors, tolerance)

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image)
        pixels = image.detach().to("cpu", torch.float32) * 255.0
        labels = torch.zeros(image.shape[1:], dtype=torch.long)
        for class_id, rgb in self.rules:
            near = ((pixels - rgb[:, None, None]).abs() <= self.tolerance).all(0)
            labels[near] = class_id
        return labels.to(image.device)


def _torchvision_segmentation():
    """``torchvision.models.segmentation``, or a SegmenterError saying how to get it."""
    try:
        import torchvision.models.segmentation as seg
    # Not only ImportError: a torchvision built for another torch fails at import with
    # RuntimeError (missing operators) or AttributeError.
    except Exception as exc:
        raise SegmenterError(
            "the fcn and deeplab segmenters need torchvision, which is not installed or "
            f"does not fit this torch ({type(exc).__name__}: {exc}): install the torchvision "
            "build that matches your torch (see https://pytorch.org/get-started/locally/), "
            "or use --segmenter color:...") from exc
    return seg


def hub_weights_path(arch: str) -> Path:
    """Where torchvision keeps the COCO-with-VOC-labels weights of ``arch`` (``fcn`` or
    ``deeplab``) in the local torch hub cache (they are not downloaded here)."""
    if arch not in _ARCHS:
        raise SegmenterError(f"unknown torchvision segmenter {arch!r}; choose from "
                             f"{', '.join(_ARCHS)}")
    weights_enum = getattr(_torchvision_segmentation(), _ARCHS[arch][1])
    url = weights_enum.COCO_WITH_VOC_LABELS_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a file: a bare one, or one under "model" / "state_dict"."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file
        raise SegmenterError(f"cannot read segmentation weights {path}: {exc}") from exc
    if isinstance(data, dict):
        for key in ("model", "state_dict"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise SegmenterError(f"{path} does not hold a state dict of tensors")
    # Weights saved from a DataParallel / DistributedDataParallel wrapper.
    return {k.removeprefix("module."): v for k, v in data.items()}


class TorchvisionSegmenter:
    """torchvision's FCN-ResNet101 (``arch="fcn"``) or DeepLabV3-ResNet101 (``"deeplab"``)
    with the 21 Pascal VOC labels.

    Args:
        arch: ``"fcn"`` or ``"deeplab"``.
        weights: a state-dict file (e.g. torchvision's ``fcn_resnet101_coco-7ecb50ca.pth``);
            ``None`` takes the file from the local torch hub cache (see
            :func:`hub_weights_path`). Nothing is downloaded.
        device: where the network runs.
        resize: the shorter side the image is resized to before the network (torchvision's
            transforms for these weights use 520); ``None`` keeps the size. The label map is
            always returned at the input size.

    ``segmenter(image [3, H, W] float in [0, 1]) -> labels [H, W] long`` on the image's
    device.

    Raises:
        SegmenterError: torchvision missing, no weights, or weights that do not fit.
    """

    classes = VOC_CLASSES

    def __init__(self, arch: str = "fcn", weights: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", resize: int | None = _RESIZE):
        if arch not in _ARCHS:
            raise SegmenterError(f"unknown torchvision segmenter {arch!r}; choose from "
                                 f"{', '.join(_ARCHS)}")
        seg = _torchvision_segmentation()
        path = Path(weights) if weights is not None else hub_weights_path(arch)
        if not path.is_file():
            builder = _ARCHS[arch][0]
            how = ("" if weights is not None else
                   f" (looked in the torch hub cache; put torchvision's {path.name} there, "
                   f"e.g. by running torchvision.models.segmentation.{builder}(weights="
                   f"'COCO_WITH_VOC_LABELS_V1') once on a machine with internet access, or "
                   "pass --seg-weights PATH)")
            raise SegmenterError(f"no segmentation weights at {path}{how}")
        state = _read_state_dict(path)
        # The published weights carry the auxiliary head; build the model to match the file.
        aux = any(k.startswith("aux_classifier.") for k in state)
        builder = getattr(seg, _ARCHS[arch][0])
        # weights_backbone=None: the default would fetch ImageNet weights from the internet.
        model = builder(weights=None, weights_backbone=None, num_classes=len(VOC_CLASSES),
                        aux_loss=aux)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise SegmenterError(f"{path} does not fit torchvision {_ARCHS[arch][0]} with "
                                 f"{len(VOC_CLASSES)} VOC classes: {exc}") from exc
        self.arch = arch
        self.resize = resize
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device)[:, None, None]
        self._std = torch.tensor(_IMAGENET_STD, device=self.device)[:, None, None]

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image)
        h, w = image.shape[1:]
        x = image.to(self.device, torch.float32)
        if self.resize:
            scale = self.resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                              antialias=True)[0]
        x = ((x - self._mean) / self._std)[None]
        logits = self.model(x)["out"]
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits[0].argmax(0).to(image.device)


def make_segmenter(spec: str, weights: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu") -> Segmenter:
    """A segmenter from its command-line name: ``fcn``, ``deeplab`` or ``color:...`` (see
    :meth:`ColorSegmenter.from_spec`).

    Raises:
        SegmenterError: an unknown name, or what building it raised.
    """
    if spec.startswith("color:"):
        return ColorSegmenter.from_spec(spec[len("color:"):])
    if spec in _ARCHS:
        return TorchvisionSegmenter(spec, weights, device)
    raise SegmenterError(f"unknown segmenter {spec!r}; choose fcn, deeplab or "
                         "color:CLASS=RRGGBB,...")
