"""VGG16 feature extractor for the perceptual and style losses, without torchvision.

The layers are torchvision's ``vgg16().features[:17]`` with the same indices, so the
``features.N.weight`` / ``features.N.bias`` keys of a torchvision VGG16 checkpoint load as
they are. The ImageNet weights come from a file (``vgg16-397923af.pth``); nothing is ever
downloaded at run time.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
from torch import Tensor, nn

__all__ = ["VGG16Features", "VGG16_FILENAME", "VGG16_URL", "default_weights_path"]

logger = logging.getLogger(__name__)

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"

# torchvision's vgg16 "D" configuration up to pool3 ("M" = 2x2 max-pool).
_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_weights_path() -> str:
    """Where torchvision caches the VGG16 weights: ``<torch.hub.get_dir()>/checkpoints/``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILENAME)


def _features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for item in _CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = item
    return nn.Sequential(*layers)


class VGG16Features(nn.Module):
    """Frozen VGG16 (torchvision layout) returning the pool1, pool2 and pool3 outputs.

    ``forward(x [N, 3, H, W])`` with RGB values in [0, 1] (ImageNet normalisation is applied
    inside) returns ``(pool1 [N, 64, H/2, W/2], pool2 [N, 128, H/4, W/4],
    pool3 [N, 256, H/8, W/8])``. Parameters never require grad and the module stays in eval
    mode; gradients still flow to ``x``.

    Build it with :meth:`from_pretrained`. A directly constructed instance has random
    weights (``pretrained`` is False) and warns on every forward call.
    """

    def __init__(self):
        super().__init__()
        self.features = _features()
        # Not persistent: the state dict keeps exactly torchvision's keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        self.pretrained = False
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *,
                        allow_random: bool = False) -> VGG16Features:
        """Load torchvision-format VGG16 weights (a full ``vgg16`` state dict; keys outside
        this module's ``features.*`` layers, such as ``classifier.*``, are ignored).

        Args:
            path: the ``.pth`` file; ``None`` looks in :func:`default_weights_path`.
            allow_random: when the file does not exist, return a randomly initialised model
                (for tests and smoke runs; it warns on every use) instead of raising.

        Raises:
            FileNotFoundError: no file at the path, saying where it looked and how to get
                the weights.
            ValueError: the file lacks a key this module needs or has the wrong shape.
        """
        where = os.fspath(path) if path is not None else default_weights_path()
        model = cls()
        if not os.path.isfile(where):
            if allow_random:
                logger.warning("VGG16 weights not found at %s; using RANDOM weights", where)
                return model
            raise FileNotFoundError(
                f"VGG16Features: no VGG16 weights at {where}. On a machine with internet, "
                f"download {VGG16_URL} and copy it to {default_weights_path()} (the torch hub "
                "cache, see torch.hub.get_dir() / $TORCH_HOME) or pass its path; or ask for "
                "random weights explicitly with allow_random=True (tests and smoke runs only).")
        state = torch.load(where, map_location="cpu", weights_only=True)
        model.load_torchvision_state_dict(state, source=where)
        return model

    def load_torchvision_state_dict(self, state: dict[str, Tensor], source: str = "state dict"):
        """Copy the ``features.*`` weights of a torchvision VGG16 state dict into this module
        (other keys ignored) and mark it ``pretrained``."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [f"{k}: {list(state[k].shape)} != {list(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or wrong:
            raise ValueError(f"VGG16Features: {source} is not a torchvision VGG16 state dict "
                             f"(missing keys {missing}, wrong shapes {wrong})")
        self.load_state_dict({k: state[k] for k in own})
        self.pretrained = True

    def train(self, mode: bool = True) -> VGG16Features:
        """Always eval mode: the extractor is frozen."""
        return super().train(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [N, 3, H, W]`` in [0, 1] -> ``(pool1, pool2, pool3)`` (see the class)."""
        if not self.pretrained:
            message = ("VGG16Features is running with RANDOM weights: perceptual and style "
                       "losses are meaningless (load ImageNet weights with from_pretrained)")
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        pools = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                pools.append(x)
        return tuple(pools)
