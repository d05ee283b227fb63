"""The loss ablation in one command: train the full-loss, no-style and no-perceptual variants
of a config, then evaluate them with the Navier-Stokes and Telea baselines into one table.

Usage::

    python -m train.ablations --config CONFIG --out DIR [--set section.key=value ...]
                              [--variants full,no_style,no_perceptual] [--steps N]
                              [--vgg-random] [--eval-only] [--no-progress]
                              [--size S] [--buckets paper|report] [--masks-per-bucket K]
                              [--max-images N] [--figures N] [--batch-size B] [--device D]
    torchrun --nproc_per_node=K -m train.ablations ...   # each variant trains with DDP

Variants are the config's ``[ablation.NAME]`` tables (overrides of the config plus a
``label``, the row name in the table); a config without them gets :data:`DEFAULT_VARIANTS`.
Variant ``NAME`` trains into ``DIR/NAME`` and resumes there when rerun (a finished
variant is not trained again), so an interrupted ablation loses nothing: rerun the same
command. The table goes to ``DIR/eval/`` (``table.md``, ``table.csv``, figures), with the
evaluation settings of the config's ``[eval]`` table unless given here.

Exit status: 0 done; 128 + signal number when a signal stopped a training (checkpoint
saved, rerun to continue); 2 for bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import config as cfglib
from .checkpoint import CheckpointError
from .cli import apply_variant, setup_logging
from .evaluate import EvalOptions, run_evaluation

__all__ = ["DEFAULT_VARIANTS", "variants_of", "run_ablations", "main"]

logger = logging.getLogger("train.ablations")

DEFAULT_VARIANTS = {
    "full": {"label": "PConv (full loss)",
             "loss": {"use_perceptual": True, "use_style": True}},
    "no_style": {"label": "PConv, no style loss",
                 "loss": {"use_perceptual": True, "use_style": False}},
    "no_perceptual": {"label": "PConv, no perceptual loss",
                      "loss": {"use_perceptual": False, "use_style": True}},
}


def variants_of(config: dict, only: list[str] | None = None) -> dict[str, tuple[str, dict]]:
    """``{variant: (label, its full config)}`` in the config's order (``only``: a subset,
    in that order). Each variant's ``name`` becomes ``<name>-<variant>``."""
    if not config.get("ablation"):
        config = cfglib.merge(config, {"ablation": DEFAULT_VARIANTS})
    names = only or list(config["ablation"])
    out = {}
    for name in names:
        variant = apply_variant(config, name)
        variant["name"] = f"{config['name']}-{name}"
        out[name] = (config["ablation"][name].get("label", name), variant)
    return out


def run_ablations(config: dict, out: str | Path, *, only: list[str] | None = None,
                  eval_options: EvalOptions | None = None, train: bool = True) -> dict:
    """Train (or resume, or skip when finished) every variant of ``config`` into
    ``out/<variant>``, then evaluate all into ``out/eval``.

    Returns ``{"status": "finished" | "interrupted", "signal": int, "report": the
    evaluation's result or None}``; only rank 0 evaluates under DDP.
    """
    from .trainer import Trainer, setup_distributed

    out = Path(out)
    variants = variants_of(config, only)
    info = setup_distributed(config["train"]["device"])
    if train:
        for name, (label, variant) in variants.items():
            if info.is_main:
                logger.info("ablation %s (%s): training into %s", name, label, out / name)
            trainer = Trainer(variant, out / name, resume="auto", dist_info=info)
            if trainer.fit() == "interrupted":
                return {"status": "interrupted", "signal": trainer.signal, "report": None}
    report = None
    if info.is_main:
        report = run_evaluation([(label, out / name) for name, (label, _) in variants.items()],
                                out / "eval", eval_options or EvalOptions())
    return {"status": "finished", "signal": 0, "report": report}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m train.ablations``."""
    p = argparse.ArgumentParser(prog="python -m train.ablations", description=(
        "Train the loss ablations of a config and evaluate them into one table."))
    p.add_argument("--config", "-c", required=True, help="TOML config or shipped name")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override for every variant (repeatable)")
    p.add_argument("--variants", help="comma list of variants (default: all)")
    p.add_argument("--steps", type=int, help="= --set train.steps=N")
    p.add_argument("--vgg-random", action="store_true", help="= --set vgg.random=true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="evaluate existing runs only")
    p.add_argument("--size", type=int)
    p.add_argument("--buckets", choices=("paper", "report"))
    p.add_argument("--masks-per-bucket", type=int)
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--figures", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch")
    p.add_argument("--device", default="auto", help="evaluation device")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m train.ablations``; returns the exit status."""
    import os

    from .trainer import EXIT_INTERRUPTED_BASE, cleanup_distributed

    args = build_parser().parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    sets = list(args.overrides)
    if args.steps is not None:
        sets.append(f"train.steps={args.steps}")
    if args.vgg_random:
        sets.append("vgg.random=true")
    if args.no_progress:
        sets.append("train.progress=false")
    options = EvalOptions(size=args.size, buckets=args.buckets,
                          masks_per_bucket=args.masks_per_bucket, max_images=args.max_images,
                          figures=args.figures, batch_size=args.batch_size,
                          device=args.device, progress=not args.no_progress)
    try:
        config = cfglib.load_config(args.config, sets)
        only = [v.strip() for v in args.variants.split(",")] if args.variants else None
        try:
            result = run_ablations(config, args.out, only=only, eval_options=options,
                                   train=not args.eval_only)
        finally:
            cleanup_distributed()
    except (cfglib.ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if result["status"] == "interrupted":
        return EXIT_INTERRUPTED_BASE + result["signal"]
    if result["report"] is not None:
        sys.stdout.write(result["report"]["paths"]["md"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
