"""``pconv-eval``: score checkpoints and the classical baselines on fixed masks per hole-ratio
bucket, into one table (Markdown + CSV) and a figure per sample.

Usage::

    pconv-eval CHECKPOINT_OR_RUN [CHECKPOINT_OR_RUN ...] [--name NAME ...] [--out DIR=runs/eval]
               [--data folder|celebahq|places2] [--root DIR] [--split test|val]
               [--size S] [--buckets paper|report] [--masks-per-bucket K] [--mask-seed N]
               [--mask-root DIR [--mask-holes white|black]]
               [--max-images N] [--baselines ns,telea|none] [--figures N]
               [--batch-size B] [--device auto|cpu|cuda] [--amp off|bf16] [--threads T]

A checkpoint argument is a file or a run folder (its newest checkpoint). Data, size,
buckets, masks per bucket and mask seed default to the first checkpoint's config (its
``[data]`` and ``[eval]`` tables); a folder data set is read from ``data.test_root``
(default ``data.root``), CelebA-HQ from its test split, Places2 from its validation set.

Protocol: every test image is evaluated once per bucket. Bucket ``b`` has ``K`` seeded
free-form masks (:func:`train.masks.make_eval_masks`: the same masks for every method,
run and machine), or with ``--mask-root`` the first ``K`` mask files whose hole ratio
falls in it (:func:`train.masks.eval_masks_from_folder`: NVIDIA's irregular test masks,
the paper's protocol); image ``i`` gets mask ``i mod K``. The paper's buckets are the hole
ratios (0.01, 0.1], (0.1, 0.2], ..., (0.5, 0.6]; ``--buckets report`` uses r = 0.05, 0.1,
0.2 (± 0.005). Each method's output is composited with the known pixels and clamped to
[0, 1]; the metrics (:mod:`train.metrics`, conventions in :data:`train.metrics.CONVENTIONS`,
repeated in the report) compare it with the ground truth over the whole image and over the
hole only. The classical rows are OpenCV's Navier-Stokes and Telea methods
(:mod:`train.classical`, radius 3) on the same masks.

Outputs in ``--out``: ``table.md`` (conventions, then one table per region: rows = methods,
columns = bucket × metric), ``table.csv`` (the same numbers, one row per method and
region), ``per_image.csv`` (every score), ``figures/<bucket>/<i>_<name>.png`` (masked input,
mask, each model, Navier-Stokes, ground truth).

Mask convention everywhere: 1 = known pixel, 0 = hole.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from . import amp as amplib
from . import config as cfglib
from .checkpoint import CheckpointError, load_model, resolve_checkpoint
from .classical import inpaint_classical
from .data import eval_transform
from .images import image_from_numpy, save_image
from .masks import (NVIDIA_TEST_MASKS_INVERT, PAPER_BUCKETS, REPORT_RATIOS, bucket_label,
                    eval_masks_from_folder, make_eval_masks)
from .metrics import CONVENTIONS, METRIC_NAMES, REGIONS, inpainting_metrics
from .models import composite
from .progress import Progress

__all__ = ["EvalOptions", "BASELINES", "BUCKET_SETS", "evaluate", "write_report",
           "run_evaluation", "load_named_models", "main"]

logger = logging.getLogger(__name__)

BASELINES = {"ns": "Navier-Stokes", "telea": "Telea"}
BUCKET_SETS = {"paper": PAPER_BUCKETS, "report": REPORT_RATIOS}
METRIC_LABELS = {"l1": "L1", "mse": "MSE", "psnr": "PSNR", "ssim": "SSIM"}
_FORMATS = {"l1": "{:.4f}", "mse": "{:.5f}", "psnr": "{:.2f}", "ssim": "{:.4f}"}


@dataclasses.dataclass
class EvalOptions:
    """Settings of one evaluation (``None`` = take it from the first checkpoint's config)."""

    data: str | None = None          # "folder" | "celebahq" | "places2"
    root: str | None = None
    split: str = "test"
    size: int | None = None
    buckets: str | None = None       # "paper" | "report"
    masks_per_bucket: int | None = None
    mask_seed: int | None = None
    mask_root: str | None = None     # mask files (NVIDIA's test masks) instead of free-form
    mask_invert: bool = NVIDIA_TEST_MASKS_INVERT  # the files draw holes white
    max_images: int = 0              # 0 = all
    baselines: tuple[str, ...] = ("ns", "telea")
    figures: int = 4                 # figures per bucket (first N images)
    batch_size: int = 8
    device: str = "auto"
    amp: str = "off"                 # "off" | "bf16"
    threads: int = 0                 # classical baselines in parallel; 0 = min(8, cores)
    workers: int = 0                 # DataLoader workers for the test images
    progress: bool = True


# ----------------------------------------------------------------------------------
# Inputs


def load_named_models(checkpoints: list[tuple[str | None, str | os.PathLike]], device
                      ) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    """``(name, model in eval mode on device, checkpoint)`` for each ``(name or None,
    file or run folder)``; a missing name becomes the run's config name (else the file's
    folder name)."""
    out, seen = [], set()
    for name, path in checkpoints:
        file = resolve_checkpoint(path)
        model, ckpt = load_model(file, device)
        if not name:
            stored = ckpt.get("config") or {}
            name = stored.get("name") or file.parent.parent.name
        base, k = name, 2
        while name in seen:  # two runs of one config: keep rows apart
            name, k = f"{base} ({k})", k + 1
        seen.add(name)
        out.append((name, model, ckpt))
    return out


def _eval_config(options: EvalOptions, stored: dict[str, Any] | None) -> dict[str, Any]:
    """The config whose ``[data]`` and ``[eval]`` tables drive the evaluation: the first
    checkpoint's (or the defaults) with the explicit options on top."""
    config = cfglib.merge(cfglib.default_config(), stored or {})
    if options.data is not None:
        config["data"]["kind"] = options.data
    if options.root is not None:
        root = str(Path(options.root).resolve())
        config["data"]["root"] = root
        # An explicit root is the test set itself, whatever the run trained on.
        config["data"]["test_root"] = ""
        config["data"]["val_root"] = ""
        if options.data is not None and options.data != "folder":
            config["data"]["exclude"] = []
    ev = config["eval"]
    if options.size is not None:
        ev["size"] = options.size
    if options.buckets is not None:
        ev["buckets"] = options.buckets
    if options.masks_per_bucket is not None:
        ev["masks_per_bucket"] = options.masks_per_bucket
    if options.mask_seed is not None:
        ev["seed"] = options.mask_seed
    ev["size"] = ev["size"] or config["data"]["size"]
    if ev["buckets"] not in BUCKET_SETS:
        raise cfglib.ConfigError(f"--buckets must be one of {sorted(BUCKET_SETS)}, got "
                                 f"{ev['buckets']!r}")
    return config


def test_images(config: dict[str, Any], split: str = "test", max_images: int = 0):
    """The test images of ``config["data"]`` at ``config["eval"]["size"]`` (short side
    resized, centre crop): ``dataset[i] -> [3, S, S]`` in [0, 1]."""
    from .trainer import image_dataset  # the one place data sets are built from a config

    dataset = image_dataset(config, split, eval_transform(config["eval"]["size"]))
    if max_images and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    return dataset


def _names(dataset) -> list[str]:
    """File stems of a (possibly ``Subset``-wrapped) image folder data set."""
    if isinstance(dataset, Subset):
        inner = _names(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return [Path(f).stem for f in getattr(dataset, "files", [])] or \
        [f"{i:05d}" for i in range(len(dataset))]


# ----------------------------------------------------------------------------------
# Figures


def _label_bar(labels: list[str], width: int, panel: int, pad: int, height: int = 16) -> Tensor:
    """A white strip ``[3, height, width]`` with ``labels`` centred over the panels."""
    bar = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(bar)
    font = ImageFont.load_default()
    for j, text in enumerate(labels):
        left = pad + j * (panel + pad)
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((left + max(0, (panel - (box[2] - box[0])) // 2), 2), text, fill="black",
                  font=font)
    return image_from_numpy(np.asarray(bar))


def figure_strip(panels: list[tuple[str, Tensor]], pad: int = 4) -> Tensor:
    """One figure ``[3, H', W']``: ``(label, [3 or 1, H, W] in [0, 1])`` panels side by
    side on white, labels above."""
    h, w = panels[0][1].shape[-2:]
    width = len(panels) * (w + pad) + pad
    body = torch.ones(3, h + 2 * pad, width)
    for j, (_, panel) in enumerate(panels):
        left = pad + j * (w + pad)
        body[:, pad:pad + h, left:left + w] = panel.detach().float().cpu().clamp(0, 1) \
            .expand(3, -1, -1)
    return torch.cat([_label_bar([p[0] for p in panels], width, w, pad), body], 1)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


# ----------------------------------------------------------------------------------
# The evaluation


def _autocast(device: torch.device, amp: str):
    if amp not in ("off", "bf16"):
        raise ValueError(f"--amp must be 'off' or 'bf16', got {amp!r}")
    return amplib.autocast(device, amp)


def evaluate(models: list[tuple[str, nn.Module]], images, *, buckets, masks_per_bucket: int,
             mask_seed: int = 0, mask_root: str | os.PathLike | None = None,
             mask_invert: bool = NVIDIA_TEST_MASKS_INVERT, baselines=("ns", "telea"), batch_size: int = 8,
             device: torch.device | str = "cpu", amp: str = "off", figures: int = 0,
             figure_dir: Path | None = None, threads: int = 0, workers: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Score every model and baseline on every image of ``images`` in every bucket.

    Args:
        models: ``(row name, model)`` pairs; models are used in eval mode, no gradients.
        images: a data set of ``[3, S, S]`` images in [0, 1] (one size; ``S`` a multiple of
            every model's ``size_multiple``).
        buckets: hole-ratio buckets (intervals or fixed ratios, :func:`make_eval_masks`).
        masks_per_bucket: masks per bucket (image ``i`` uses mask ``i mod K``); at most the
            number of images are generated.
        mask_seed: seed of the free-form masks (:func:`make_eval_masks`).
        mask_root, mask_invert: take the masks from these files instead
            (:func:`eval_masks_from_folder`; a bucket no file falls in is left out).
        baselines: keys of :data:`BASELINES` to add as rows.
        figures, figure_dir: save a figure for the first ``figures`` images of each bucket.

    Returns:
        ``{"methods": [row names], "buckets": [labels], "names": [image names],
        "scores": {method: {bucket: {metric key: [per-image values]}}}}`` with the metric
        keys of :func:`train.metrics.inpainting_metrics` (``whole_l1`` ... ``hole_ssim``).
    """
    device = torch.device(device)
    n = len(images)
    if n == 0:
        raise ValueError("evaluate: no test images")
    size = tuple(images[0].shape[-2:])
    for name, model in models:
        if size[0] % model.size_multiple or size[1] % model.size_multiple:
            raise ValueError(f"evaluate: {name} needs sizes that are multiples of "
                             f"{model.size_multiple}; the test images are {size[0]}x{size[1]}"
                             " (choose --size)")
    count = max(1, min(masks_per_bucket, n))
    if mask_root is not None:
        masks = eval_masks_from_folder(mask_root, size[0], size[1], buckets, count,
                                       invert=mask_invert)
    else:
        masks = make_eval_masks(size[0], size[1], buckets, count, mask_seed)
    labels = list(masks)
    rows = [name for name, _ in models] + [BASELINES[b] for b in baselines]
    scores = {row: {label: {} for label in labels} for row in rows}
    names = _names(images)
    pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1))
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers)
    bar = Progress(n * len(labels), desc="evaluating", unit="img", enabled=progress,
                   say=logger.info)

    def record(row, label, result, target, mask):
        for key, values in inpainting_metrics(result, target, mask).items():
            scores[row][label].setdefault(key, []).extend(values.tolist())

    try:
        start = 0
        for target in loader:
            idx = list(range(start, start + target.shape[0]))
            start += target.shape[0]
            target = target.to(device)
            for label in labels:
                group = masks[label]
                mask = torch.stack([group[i % len(group)] for i in idx]).to(device)
                results = {}
                for name, model in models:
                    with torch.no_grad(), _autocast(device, amp):
                        output = model(target, mask).float()
                    results[name] = composite(target, mask, output).clamp(0, 1)
                for key in baselines:
                    # OpenCV releases the GIL: the images of a batch run in parallel.
                    filled = pool.map(lambda im_m: inpaint_classical(im_m[0], im_m[1], key),
                                      zip(target.cpu(), mask.cpu()))
                    results[BASELINES[key]] = torch.stack(list(filled)).to(device).clamp(0, 1)
                for row, result in results.items():
                    record(row, label, result, target, mask)
                if figure_dir is not None:
                    for j, i in enumerate(idx):
                        if i >= figures:
                            break
                        panels = [("masked input", target[j] * mask[j] + (1 - mask[j])),
                                  ("mask", mask[j])]
                        panels += [(row, results[row][j]) for row in rows]
                        panels.append(("ground truth", target[j]))
                        save_image(figure_strip(panels), figure_dir / _slug(label) /
                                   f"{i:04d}_{_slug(names[i])}.png")
                bar.update(len(idx))
    finally:
        bar.close()
        pool.shutdown()
    return {"methods": rows, "buckets": labels, "names": names, "scores": scores,
            "images": n, "masks_per_bucket": count,
            "mask_source": "files" if mask_root is not None else "seeded"}


def _mean(values: list[float]) -> float:
    # NaN marks an image whose hole lies entirely in SSIM's 5-pixel border: undefined there.
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def summarise(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {bucket: {metric key: mean over images}}}`` of :func:`evaluate`'s scores."""
    return {method: {bucket: {key: _mean(values) for key, values in per_bucket.items()}
                     for bucket, per_bucket in by_bucket.items()}
            for method, by_bucket in results["scores"].items()}


def write_report(results: dict[str, Any], out_dir: str | os.PathLike,
                 meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``per_image.csv`` into ``out_dir`` (see the
    module docstring); returns their paths by name ``"md"``, ``"csv"``, ``"per_image"``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    means = summarise(results)
    methods, buckets = results["methods"], results["buckets"]
    columns = [f"{b} {METRIC_LABELS[m]}" for b in buckets for m in METRIC_NAMES]

    lines = ["# Inpainting evaluation", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += [f"- **images**: {results['images']} per bucket; "
              f"{results['masks_per_bucket']} {results.get('mask_source', 'seeded')} masks per "
              "bucket at most (image i uses mask i mod K)", "", f"Conventions: {CONVENTIONS}", ""]
    for region in REGIONS:
        title = "Whole image" if region == "whole" else "Hole only"
        lines += [f"## {title}", "", "| method | " + " | ".join(columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for method in methods:
            cells = [_FORMATS[m].format(means[method][b][f"{region}_{m}"])
                     for b in buckets for m in METRIC_NAMES]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    md = out / "table.md"
    md.write_text("\n".join(lines))

    table = out / "table.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "region"] + columns)
        for region in REGIONS:
            for method in methods:
                writer.writerow([method, region] + [repr(means[method][b][f"{region}_{m}"])
                                                    for b in buckets for m in METRIC_NAMES])
    per_image = out / "per_image.csv"
    keys = [f"{r}_{m}" for r in REGIONS for m in METRIC_NAMES]
    with per_image.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "bucket", "image"] + keys)
        for method in methods:
            for b in buckets:
                scores = results["scores"][method][b]
                for i, name in enumerate(results["names"][:len(scores[keys[0]])]):
                    writer.writerow([method, b, name] + [repr(scores[k][i]) for k in keys])
    return {"md": md, "csv": table, "per_image": per_image}


def run_evaluation(checkpoints: list[tuple[str | None, str | os.PathLike]],
                   out_dir: str | os.PathLike, options: EvalOptions | None = None
                   ) -> dict[str, Any]:
    """Load the checkpoints, evaluate them and the baselines, write the report.

    Returns ``{"results": ..., "means": ..., "paths": ..., "seconds": ...}``.
    """
    options = options or EvalOptions()
    from .trainer import pick_device

    device = pick_device(options.device)
    started = time.perf_counter()
    loaded = load_named_models(checkpoints, device) if checkpoints else []
    stored = loaded[0][2].get("config") if loaded else None
    config = _eval_config(options, stored if isinstance(stored, dict) else None)
    images = test_images(config, options.split, options.max_images)
    ev = config["eval"]
    buckets = BUCKET_SETS[ev["buckets"]]
    results = evaluate([(name, model) for name, model, _ in loaded], images,
                       buckets=buckets, masks_per_bucket=ev["masks_per_bucket"],
                       mask_seed=ev["seed"], mask_root=options.mask_root,
                       mask_invert=options.mask_invert, baselines=options.baselines,
                       batch_size=options.batch_size, device=device, amp=options.amp,
                       figures=options.figures, figure_dir=Path(out_dir) / "figures",
                       threads=options.threads, workers=options.workers,
                       progress=options.progress)
    seconds = time.perf_counter() - started
    meta = {"checkpoints": "; ".join(f"{name} = {resolve_checkpoint(path)} (step "
                                     f"{ckpt.get('step', '?')})"
                                     for (name, _, ckpt), (_, path) in zip(loaded, checkpoints))
            or "none (baselines only)",
            "data": f"{config['data']['kind']} "
                    f"{config['data']['test_root'] or config['data']['root']} "
                    f"({options.split} split), {ev['size']}x{ev['size']}",
            "buckets": f"{ev['buckets']}: " + ", ".join(bucket_label(b) for b in buckets),
            "masks": (f"files under {Path(options.mask_root).resolve()} (invert="
                      f"{options.mask_invert})" if options.mask_root
                      else f"free-form, seed {ev['seed']}"),
            "device": str(device),
            "time": f"{seconds:.1f} s"}
    paths = write_report(results, out_dir, meta)
    return {"results": results, "means": summarise(results), "paths": paths,
            "seconds": seconds}


# ----------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pconv-eval``."""
    p = argparse.ArgumentParser(prog="pconv-eval", description=(
        "Evaluate inpainting checkpoints and the OpenCV baselines per hole-ratio bucket."))
    p.add_argument("checkpoints", nargs="*", help="checkpoint files or run folders")
    p.add_argument("--name", action="append", default=[],
                   help="row name per checkpoint, in order (repeatable)")
    p.add_argument("--out", "-o", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--data", choices=("folder", "celebahq", "places2"))
    p.add_argument("--root", help="data set folder (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="celebahq: test or val split; places2: always its val set")
    p.add_argument("--size", type=int, help="evaluation size (default: eval.size)")
    p.add_argument("--buckets", choices=sorted(BUCKET_SETS),
                   help="paper: (0.01,0.1] ... (0.5,0.6]; report: r = 0.05, 0.1, 0.2")
    p.add_argument("--masks-per-bucket", type=int)
    p.add_argument("--mask-seed", type=int)
    p.add_argument("--mask-root", help="score on these mask files (e.g. NVIDIA's irregular "
                   "test masks), sorted into the buckets, instead of seeded free-form masks")
    p.add_argument("--mask-holes", default="white", choices=("white", "black"),
                   help="how the --mask-root files draw holes (default white, as NVIDIA's "
                   "test set; black for files in this project's 1 = known convention)")
    p.add_argument("--max-images", type=int, default=0, help="first N test images (0 = all)")
    p.add_argument("--baselines", default="ns,telea",
                   help="comma list of ns, telea, or 'none'")
    p.add_argument("--figures", type=int, default=4, help="figures per bucket")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    p.add_argument("--threads", type=int, default=0,
                   help="threads for the classical baselines (0 = min(8, cores))")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, else a line a minute)")
    return p


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """:class:`EvalOptions` from parsed ``pconv-eval`` arguments."""
    if args.masks_per_bucket is not None and args.masks_per_bucket < 1:
        raise cfglib.ConfigError(f"--masks-per-bucket must be at least 1, got "
                                 f"{args.masks_per_bucket}")
    baselines = tuple(b for b in args.baselines.split(",") if b and b != "none")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise cfglib.ConfigError(f"--baselines: unknown {unknown} (have {sorted(BASELINES)})")
    return EvalOptions(data=args.data, root=args.root, split=args.split, size=args.size,
                       buckets=args.buckets, masks_per_bucket=args.masks_per_bucket,
                       mask_seed=args.mask_seed, mask_root=args.mask_root,
                       mask_invert=args.mask_holes == "white", max_images=args.max_images,
                       baselines=baselines, figures=args.figures, batch_size=args.batch_size,
                       device=args.device, amp=args.amp, threads=args.threads,
                       workers=args.workers, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pconv-eval``; prints the Markdown table and returns the exit status
    (2 for bad arguments, data or checkpoints)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    if args.name and len(args.name) != len(args.checkpoints):
        logger.error("--name given %d times for %d checkpoints", len(args.name),
                     len(args.checkpoints))
        return 2
    names = args.name or [None] * len(args.checkpoints)
    try:
        options = options_from_args(args)
        if not args.checkpoints and (args.root is None or args.size is None):
            raise cfglib.ConfigError("without a checkpoint, pass --root and --size "
                                     "(baselines only)")
        report = run_evaluation(list(zip(names, args.checkpoints)), args.out, options)
    except (cfglib.ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    print(report["paths"]["md"].read_text())
    logger.info("wrote %s, %s, %s and figures/ in %.1f s", report["paths"]["md"],
                report["paths"]["csv"], report["paths"]["per_image"], report["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
