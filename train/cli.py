"""``pconv-train``: train an inpainting model from a TOML config plus overrides.

Usage::

    pconv-train --config CONFIG [--set section.key=value ...] [--out RUN_DIR]
                [--resume PATH|latest|auto] [--variant NAME]
                [--steps N] [--batch-size N] [--device auto|cpu|cuda] [--amp off|bf16|fp16]
                [--channels-last] [--vgg-random] [--no-progress] [--print-config]

    python -m train ...                                 # the same
    torchrun --nproc_per_node=K -m train ...            # K processes, DDP

``CONFIG`` is a path or the name of a shipped config (``samples``, ``celebahq``,
``places2``, ``ablations``, ``ablations_samples``; see :mod:`train.config` for the format).
Overrides apply in this order: the file, ``--variant`` (an ``[ablation.NAME]`` table of the
file), ``--set`` in order, then the explicit flags. ``--resume`` without ``--config``
continues with the config stored in the checkpoint (``--set`` still applies, e.g.
``--set train.steps=20000`` to train longer).

Exit status: 0 when training finished; 128 + the signal number (130 SIGINT, 143 SIGTERM)
when a signal stopped it after saving a checkpoint; 2 for a bad config, command line or
checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from . import config as cfglib
from .checkpoint import CheckpointError, load_checkpoint, load_newest_readable

__all__ = ["train_main", "build_parser", "config_from_args", "setup_logging"]

logger = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pconv-train``."""
    p = argparse.ArgumentParser(
        prog="pconv-train", description="Train a partial-convolution inpainting model.",
        epilog="Configs: TOML, see train/configs/*.toml. Exit status 0 = finished, "
               "130/143 = stopped by SIGINT/SIGTERM after saving (resume with "
               "--resume latest), 2 = bad input.")
    p.add_argument("--config", "-c", help="TOML config file or shipped config name")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one key, value in TOML syntax "
                   "(repeatable), e.g. --set train.steps=100 --set loss.use_style=false")
    p.add_argument("--out", "-o", help="run folder (default runs/<name>)")
    p.add_argument("--resume", metavar="PATH|latest|auto",
                   help="continue from a checkpoint file or run folder; 'latest' = newest "
                        "in --out; 'auto' = newest if any, else start fresh")
    p.add_argument("--variant", help="apply the [ablation.VARIANT] table of the config")
    p.add_argument("--steps", type=int, help="= --set train.steps=N")
    p.add_argument("--batch-size", type=int, help="global batch, = --set train.batch_size=N")
    p.add_argument("--device", help="= --set train.device=...")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), help="= --set train.amp=...")
    p.add_argument("--channels-last", action="store_true", help="= --set train.channels_last=true")
    p.add_argument("--vgg-random", action="store_true",
                   help="= --set vgg.random=true (smoke runs without VGG weights; warns)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, else a line a minute)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML and exit")
    return p


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    sets = []
    if args.steps is not None:
        sets.append(f"train.steps={args.steps}")
    if args.batch_size is not None:
        sets.append(f"train.batch_size={args.batch_size}")
    if args.device is not None:
        sets.append(f'train.device="{args.device}"')
    if args.amp is not None:
        sets.append(f'train.amp="{args.amp}"')
    if args.channels_last:
        sets.append("train.channels_last=true")
    if args.vgg_random:
        sets.append("vgg.random=true")
    if args.no_progress:
        sets.append("train.progress=false")
    return sets


def apply_variant(config: dict, variant: str) -> dict:
    """``config`` with its ``[ablation.<variant>]`` override table merged in (the table's
    ``label`` key names the variant in tables and is not a setting)."""
    tables = config.get("ablation", {})
    if variant not in tables:
        raise cfglib.ConfigError(f"no [ablation.{variant}] table in the config (have: "
                                 f"{', '.join(sorted(tables)) or 'none'})")
    update = {k: v for k, v in tables[variant].items() if k != "label"}
    return cfglib.validate(cfglib.merge(config, update), source=f"[ablation.{variant}]")


def config_from_args(args: argparse.Namespace) -> tuple[dict, Path, str | None]:
    """``(config, run folder, resume)`` from parsed arguments (see the module docstring)."""
    base = None
    if args.config is None:
        if args.resume is None:
            raise cfglib.ConfigError("--config is required (or --resume to continue a run "
                                     "with its stored config)")
        if args.resume in ("latest", "auto"):
            if args.out is None:
                raise cfglib.ConfigError(f"--resume {args.resume} needs --out (the run folder)")
            newest = load_newest_readable(args.out)
            if newest is None:
                raise CheckpointError(f"--resume {args.resume}: no checkpoints in {args.out}, "
                                      "and no --config to start a new run")
            found, ckpt = newest
        else:
            found, ckpt = args.resume, load_checkpoint(args.resume)
        stored = ckpt.get("config")
        if not isinstance(stored, dict):
            raise CheckpointError(f"{found} stores no training config: pass --config")
        base = stored
    config = cfglib.load_config(args.config, base=base)
    if args.variant:
        config = apply_variant(config, args.variant)
    for assignment in list(args.overrides) + _flag_overrides(args):
        config = cfglib.apply_override(config, assignment)
    out = Path(args.out) if args.out else Path("runs") / config["name"]
    return config, out, args.resume


def setup_logging(rank: int = 0) -> None:
    """INFO logs of the ``train`` package to stderr, each line tagged with the rank when
    there are several processes (only rank 0 logs progress; the others report start-up
    problems and their final state).

    The handler sits on the ``train`` logger, not the root: a program (or test) that
    imports :func:`train_main` keeps its own logging set-up. Calling again replaces it.
    """
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tag = f"[rank {rank}] " if world > 1 else ""
    package = logging.getLogger("train")
    for handler in [h for h in package.handlers if getattr(h, "_pconv_cli", False)]:
        package.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._pconv_cli = True
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(name)s: "
                                           "%(message)s", datefmt="%H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def _redirect_logging():
    """Logging lines printed above the progress bar instead of through it."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        return contextlib.nullcontext()
    return logging_redirect_tqdm([logging.getLogger("train")])


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pconv-train`` / ``python -m train``; returns the exit status."""
    import os

    from .trainer import EXIT_INTERRUPTED_BASE, Trainer, cleanup_distributed, setup_distributed

    args = build_parser().parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        config, out, resume = config_from_args(args)
        if args.print_config:
            sys.stdout.write(cfglib.to_toml(config))
            return 0
        info = setup_distributed(config["train"]["device"])
        setup_logging(info.rank)
        try:
            with _redirect_logging():
                trainer = Trainer(config, out, resume, dist_info=info)
                status = trainer.fit()
        finally:
            cleanup_distributed()
    except (cfglib.ConfigError, CheckpointError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    if status == "interrupted":
        return EXIT_INTERRUPTED_BASE + trainer.signal
    return 0
