"""Mixed precision, in one place: the ``amp`` modes every command accepts and the autocast
context they run the network under.

``"off"`` runs in the parameters' dtype (float32); ``"bf16"`` / ``"fp16"`` run the network
under :func:`torch.autocast` in bfloat16 / float16, where the partial convolutions take
the autocast dtype and keep their window sums and ratios in float32.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_MODES", "amp_dtype", "autocast", "check_inference_amp"]

AMP_MODES = ("off", "bf16", "fp16")

_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` mode, ``None`` for ``"off"``.

    Raises ValueError for a mode not in :data:`AMP_MODES`."""
    if amp not in _DTYPES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    return _DTYPES[amp]


def autocast(device: torch.device | str, amp: str):
    """A context that runs the code inside under ``amp`` on ``device``'s type (a no-op
    context for ``"off"``)."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def check_inference_amp(device: torch.device | str, amp: str) -> None:
    """Refuse ``amp`` modes that would make inference on ``device`` slower, not faster:
    float16 on the CPU, whose convolutions have no fast float16 path there (a 256x256
    PConv UNet forward on 2 cores: 38 s in float16, 0.11 s in bfloat16, 0.15 s in
    float32)."""
    amp_dtype(amp)
    if amp == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("amp 'fp16' is for CUDA devices: float16 convolutions on the CPU "
                         "are far slower than float32; use 'bf16' on the CPU")
