"""The applications: ``pconv-inpaint`` (files and folders), ``pconv-remove`` (object
removal with a segmentation model) and ``pconv-board`` (a local web page to paint a mask).

They all inpaint through :func:`train.inpaint.inpaint` and load networks through
:func:`train.checkpoint.load_model`. This module holds what the command lines share: the
user-facing error type, the checkpoint loading with its messages, and the ``main``
wrapper that turns errors into ``prog: error: message`` and an exit status.

Mask convention everywhere: 1 = known pixel, 0 = hole.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from torch import nn

from ..checkpoint import CheckpointError, load_model
from ..amp import AMP_MODES, check_inference_amp
from ..inpaint import resolve_device

__all__ = ["AppError", "add_device_arg", "load_network", "run_main"]


class AppError(Exception):
    """An error the person running a command can fix (bad file, bad option): reported as
    one line, without a traceback."""


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` and ``--amp`` options every application has."""
    parser.add_argument("--device", default="auto",
                        help="where the network runs: auto (CUDA if available), cpu, cuda, "
                             "cuda:N (default: auto)")
    parser.add_argument("--amp", choices=AMP_MODES, default="off",
                        help="run the network in bfloat16 (bf16) or float16 (fp16, CUDA "
                             "only): faster, the fill differs by 16-bit rounding; known "
                             "pixels stay exact (default: off, float32)")


def load_network(checkpoint: str | None, device: str = "auto", *, amp: str = "off",
                 option: str = "--checkpoint") -> nn.Module:
    """The model in ``checkpoint`` (a file written by ``pconv-train``), in eval mode on
    ``device``, checked to run there under ``amp``.

    Raises:
        AppError: no checkpoint given, an unknown device, an ``amp`` mode the device should
            not run (:func:`train.amp.check_inference_amp`), or the checkpoint is missing,
            unreadable or does not fit its model (the :class:`CheckpointError` message).
    """
    if not checkpoint:
        raise AppError(f"{option} PATH is required for the partial-convolution network "
                       "(a checkpoint written by pconv-train); or choose a classical method")
    try:
        device = resolve_device(device)
        check_inference_amp(device, amp)
    except ValueError as exc:
        raise AppError(str(exc)) from exc
    try:
        model, _ = load_model(checkpoint, device)
    except CheckpointError as exc:
        raise AppError(f"cannot use checkpoint: {exc}") from exc
    return model


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` and return its exit status; an :class:`AppError` is printed as
    ``prog: error: message`` on stderr and gives status 1."""
    try:
        return body()
    except AppError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
