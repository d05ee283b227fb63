"""Checkpoints: the one place that builds a model from its description and that writes
and reads checkpoint files.

A checkpoint is a dict saved with ``torch.save`` and read back with ``weights_only=True``:

    {"format": "pconv-checkpoint", "version": 1,
     "model_spec": {"kind": "pconv" | "modified", ...constructor keywords...},
     "model": state_dict, ...anything else the trainer stores (optimizer, scaler, step,
     RNG states) made of tensors, numbers, strings, lists, tuples and dicts}

Writes are atomic: a temporary file in the same folder, flushed and fsynced, then renamed
over the target, so a run killed mid-write never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import ModifiedUNet, PConvUNet

__all__ = ["CheckpointError", "MODEL_KINDS", "build_model", "save_checkpoint",
           "load_checkpoint", "load_model", "checkpoint_name", "list_checkpoints",
           "latest_checkpoint", "load_newest_readable", "resolve_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT = "pconv-checkpoint"
CHECKPOINT_DIR = "checkpoints"  # under a run folder
VERSION = 1
MODEL_KINDS = {"pconv": PConvUNet, "modified": ModifiedUNet}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, foreign, or does not fit the model."""


def build_model(spec: dict[str, Any], conv_layer=None) -> nn.Module:
    """A model from its description: ``{"kind": "pconv" | "modified", **keywords}`` where the
    keywords are those of :class:`PConvUNet` / :class:`ModifiedUNet` (``layers``,
    ``levels``, ``base_channels``, ``max_channels``, ``kernel_sizes``, ``multi_channel``).
    ``conv_layer`` swaps the partial-conv implementation (benchmarks, parity runs)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    if "kernel_sizes" in spec and spec["kernel_sizes"] is not None:
        spec["kernel_sizes"] = tuple(spec["kernel_sizes"])
    if conv_layer is not None:
        spec["conv_layer"] = conv_layer
    try:
        return MODEL_KINDS[kind](**spec)
    except TypeError as exc:
        raise ValueError(f"bad model description {spec!r} for kind {kind!r}: {exc}") from exc


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (must hold ``model_spec`` and ``model``) to ``path`` atomically."""
    missing = {"model_spec", "model"} - set(payload)
    if missing:
        raise ValueError(f"save_checkpoint: payload lacks {sorted(missing)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: no such file, a truncated or unreadable file, or a file that is
            not a pconv checkpoint (with what it looks like instead).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        # Corrupt bytes surface as almost any exception from the unpickler (KeyError from
        # a dangling memo reference, IndexError, struct.error, ...), not only the
        # documented ones: whatever the decoder raised, the file is unreadable.
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or holding objects "
            f"other than tensors and plain data): {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not a pconv checkpoint (found {what}); expected a "
                              "file written by pconv-train")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}, this "
                              f"pconv reads version {VERSION}")
    return data


def load_model(path: str | os.PathLike, device="cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model stored in a checkpoint, in eval mode on ``device``, with its checkpoint.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or weights that do not fit the model
            the checkpoint describes.
    """
    data = load_checkpoint(path)
    try:
        model = build_model(data["model_spec"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model "
                              f"{data['model_spec']}: {exc}") from exc
    return model.to(device).eval(), data


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint after ``step`` optimizer steps: ``step_00001234.pt``
    (zero-padded so names sort in step order)."""
    return f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step_*.pt`` files of a run, oldest first. ``run_dir`` is a
    run folder (its ``checkpoints/`` is searched) or the checkpoint folder itself; other
    files (and the temporary files of an unfinished write) are ignored."""
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINT_DIR if (run_dir / CHECKPOINT_DIR).is_dir() else run_dir
    found = []
    for path in folder.glob("step_*.pt") if folder.is_dir() else ():
        digits = path.stem[len("step_"):]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run (see :func:`list_checkpoints`), or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def load_newest_readable(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """``(path, contents)`` of the newest checkpoint of a run that loads, or ``None`` when
    the run has none. An unreadable newer one (a damaged disk; writes themselves are
    atomic) is passed over with a warning; when none loads, the newest one's error is
    raised (:class:`CheckpointError`)."""
    found = list_checkpoints(run_dir)
    first_error = None
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            first_error = first_error or exc
            logger.warning("%s; trying the checkpoint before it", exc)
    if first_error is not None:
        raise first_error
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file from a file path or a run folder (its newest checkpoint).

    Raises:
        CheckpointError: nothing there, or a folder without checkpoints.
    """
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoints (step_*.pt) in {path} or "
                                  f"{path / CHECKPOINT_DIR}")
        return latest
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path
