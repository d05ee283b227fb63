"""The applications: ``pconv-inpaint`` (files and folders), ``pconv-remove`` (object
removal with a segmentation model) and ``pconv-board`` (a local web page to paint a mask).

They all inpaint through :func:`train.inpaint.inpaint` and load networks through
:func:`train.checkpoint.load_model`. This module holds what the command lines share: the
user-facing error type, the checkpoint loading with its messages, what a written result
loses against its input, the recognition of out-of-memory errors, and the ``main``
wrapper that turns errors into ``prog: error: message`` and an exit status.

Mask convention everywhere: 1 = known pixel, 0 = hole.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_model, resolve_checkpoint
from ..amp import AMP_MODES, check_inference_amp
from ..images import ImageFile, is_lossless, keeps_alpha
from ..inpaint import resolve_device

__all__ = ["AppError", "DEFAULT_MAX_SIDE", "HOLE_WARNING_SHARE", "add_device_arg",
           "add_max_side_arg", "load_network", "output_losses", "is_out_of_memory", "same_file",
           "run_main"]

DEFAULT_MAX_SIDE = 2048
"""Longest side the command-line tools run the network at by default. Inference with the
default model takes about 1 GB per megapixel in float32 (1.1 GB above the baseline for one
1024 x 1024 image on a CPU), so 2048 x 1536 needs about 3 GB where a 24-megapixel photo at
full size would need over 20."""

HOLE_WARNING_SHARE = 0.5
"""A mask with more hole than this is warned about: drawn the other way round (white =
hole), or grown far past its object; the fill of so large a hole is poor."""


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


def add_max_side_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--max-side`` option of the command-line tools (default
    :data:`DEFAULT_MAX_SIDE`; 0 = no limit)."""
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="PIXELS",
                        help="run the network on a copy downscaled to this longer side and "
                             "paste its fill into the full-size image: known pixels stay "
                             "exact and the result keeps the input's size; bounds memory "
                             "(about 1 GB per megapixel with the default model) and time; "
                             f"0 = no limit (default: {DEFAULT_MAX_SIDE})")


def load_network(checkpoint: str | os.PathLike | None, device: str = "auto", *,
                 amp: str = "off", option: str = "--checkpoint",
                 alternative: str = "") -> nn.Module:
    """The model in ``checkpoint`` (a file written by ``pconv-train``, or a run folder: its
    newest checkpoint, as ``pconv-eval`` takes it), in eval mode on ``device``, checked to
    run there under ``amp``. ``alternative`` is how this command runs without a network
    (e.g. ``"--method ns or telea"``), offered when no checkpoint is given.

    Raises:
        AppError: no checkpoint given, an unknown device, an ``amp`` mode the device should
            not run (:func:`train.amp.check_inference_amp`), or the checkpoint is missing,
            unreadable or does not fit its model (the :class:`CheckpointError` message).
    """
    if not checkpoint:
        offer = f"; or use {alternative}" if alternative else ""
        raise AppError(f"{option} PATH is required for the partial-convolution network "
                       f"(a checkpoint written by pconv-train, or its run folder){offer}")
    try:
        device = resolve_device(device)
        check_inference_amp(device, amp)
    except ValueError as exc:
        raise AppError(str(exc)) from exc
    try:
        model, _ = load_model(resolve_checkpoint(checkpoint), device)
    except CheckpointError as exc:
        raise AppError(f"cannot use checkpoint: {exc}") from exc
    return model


def output_losses(source: ImageFile, source_path: str | os.PathLike,
                  output: str | os.PathLike) -> dict[str, str]:
    """What writing an inpainting of ``source`` (read from ``source_path``) to ``output``
    loses, as ``{kind: message}`` with kinds ``"lossy"`` (the format changes known
    pixels), ``"deep"`` (more than 8 bits per channel in, 8 out) and ``"alpha"``
    (transparency the format cannot hold). The kinds let a folder run warn once per kind
    rather than once per image."""
    ext = Path(output).suffix.lower()
    losses = {}
    if not is_lossless(output):
        losses["lossy"] = (f"{ext} is a lossy format: known pixels of the results will not "
                           "be exactly the input's (.png keeps them exact)")
    if source.deep:
        losses["deep"] = (f"{source_path} has more than 8 bits per channel; results are "
                          "written with 8")
    if source.alpha is not None and not keeps_alpha(output):
        losses["alpha"] = (f"{source_path} has transparency, which {ext} files cannot keep: "
                           "results are written opaque")
    return losses


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure of torch: CUDA's ``OutOfMemoryError``, or the
    ``RuntimeError`` a CPU allocator raises ("can't allocate memory", "not enough
    memory")."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "can't allocate memory",
                                      "not enough memory"))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (resolved, so ``./x.png`` and ``x.png`` are one),
    whether or not it exists yet."""
    return Path(a).resolve() == Path(b).resolve()


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
