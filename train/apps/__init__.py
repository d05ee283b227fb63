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
from ..inpaint import resolve_device

__all__ = ["AppError", "add_device_arg", "load_network", "run_main"]


class AppError(Exception):
    """An error the person running a command can fix (bad file, bad option): reported as
    one line, without a traceback."""


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option every application has."""
    parser.add_argument("--device", default="auto",
                        help="where the network runs: auto (CUDA if available), cpu, cuda, "
                             "cuda:N (default: auto)")


def load_network(checkpoint: str | None, device: str = "auto", *,
                 option: str = "--checkpoint") -> nn.Module:
    """The model in ``checkpoint`` (a file written by ``pconv-train``), in eval mode on
    ``device``.

    Raises:
        AppError: no checkpoint given, an unknown device, or the checkpoint is missing,
            unreadable or does not fit its model (the :class:`CheckpointError` message).
    """
    if not checkpoint:
        raise AppError(f"{option} PATH is required for the partial-convolution network "
                       "(a checkpoint written by pconv-train); or choose a classical method")
    try:
        device = resolve_device(device)
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
