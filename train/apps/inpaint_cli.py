"""``pconv-inpaint``: inpaint an image, or a folder of images, with a mask file or folder.

Examples::

    pconv-inpaint photo.jpg hole.png -o filled.png --checkpoint runs/best.pt
    pconv-inpaint photos/ masks/ -o filled/ --checkpoint runs/best.pt --batch-size 8
    pconv-inpaint photos/ masks/ -o filled_ns/ --method ns --invert

Mask files are white = known, black = hole (``--invert`` for files drawn the other way,
like NVIDIA's irregular test masks). With a folder of images, a mask *file* applies to
every image, and a mask *folder* is matched by the relative path without extension
(``photos/a/x.jpg`` <- ``masks/a/x.png``), else by the file name without extension when
that is unique. Results keep the relative paths and are written as PNG by default:
lossless, so the known pixels in the file are those of the decoded input exactly.

Images of any size are accepted; images of equal size are inpainted in batches. An
unreadable image or a mask of the wrong size is reported and skipped (exit status 1 at
the end); a missing mask, a bad checkpoint or a bad option stops before any work.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..images import IMAGE_EXTENSIONS, ImageLoadError, find_images, is_image_file, load_image, \
    load_mask, save_image
from ..inpaint import METHODS, PADDING_MODES, inpaint, resolve_device
from ..masks import resize_mask
from . import AppError, add_device_arg, load_network, run_main

__all__ = ["Job", "build_parser", "plan_jobs", "main"]

PROG = "pconv-inpaint"


@dataclass(frozen=True)
class Job:
    """One image to inpaint: its file, its mask file and where the result goes."""

    image: Path
    mask: Path
    output: Path


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``pconv-inpaint``."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Inpaint images (a file or a folder) where a mask is black "
                               "(hole); known pixels are kept exactly.")
    p.add_argument("input", help="an image file or a folder of images (searched recursively)")
    p.add_argument("mask", help="a mask file (used for every image) or a folder of masks "
                                "matched by file name; white = known, black = hole")
    p.add_argument("-o", "--output", required=True,
                   help="output file (for one input image: a name with an image extension) "
                        "or folder")
    p.add_argument("--method", choices=METHODS, default="pconv",
                   help="pconv: the trained network (needs --checkpoint); ns / telea: "
                        "OpenCV's Navier-Stokes / Telea (default: pconv)")
    p.add_argument("--checkpoint", help="checkpoint written by pconv-train (for --method pconv)")
    p.add_argument("--invert", action="store_true",
                   help="mask files are white = hole, black = known")
    p.add_argument("--resize-mask", action="store_true",
                   help="scale masks (nearest neighbour) to their image's size instead of "
                        "reporting a size mismatch")
    p.add_argument("--batch-size", type=int, default=4, help="images per network call "
                                                             "(default: 4)")
    p.add_argument("--padding", choices=PADDING_MODES, default="reflect",
                   help="how images are padded to the network's size multiple "
                        "(default: reflect)")
    p.add_argument("--max-side", type=int, default=None,
                   help="run the network on a copy downscaled to this longer side and paste "
                        "the fill back at full size (bounds memory and time on huge images)")
    p.add_argument("--ext", default=".png",
                   help="file type of results in an output folder (default: .png, lossless)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arg(p)
    return p


def _match_masks(images: list[Path], image_root: Path, mask_root: Path) -> dict[Path, Path]:
    """Mask file of each image: same relative path without extension, else the same unique
    file name without extension. Raises AppError listing the images without a mask."""
    masks = find_images(mask_root)
    by_rel = {m.relative_to(mask_root).with_suffix("").as_posix(): m for m in masks}
    by_stem: dict[str, list[Path]] = {}
    for m in masks:
        by_stem.setdefault(m.stem, []).append(m)
    matched, missing = {}, []
    for image in images:
        rel = image.relative_to(image_root).with_suffix("").as_posix()
        candidates = [by_rel[rel]] if rel in by_rel else by_stem.get(image.stem, [])
        if len(candidates) == 1:
            matched[image] = candidates[0]
        else:
            why = f" ({len(candidates)} masks named {image.stem})" if candidates else ""
            missing.append(f"{image.relative_to(image_root)}{why}")
    if missing:
        shown = ", ".join(missing[:10])
        if len(missing) > 10:
            shown += f", ... ({len(missing)} in all)"
        raise AppError(f"no unique mask in {mask_root} for: {shown}. Masks are matched by "
                       "relative path or file name, without extension")
    return matched


def plan_jobs(input_path: str | Path, mask_path: str | Path, output: str | Path,
              ext: str = ".png") -> list[Job]:
    """The :class:`Job` list for the command's three paths (see the module docstring).

    Raises:
        AppError: a path that does not exist, no images, a folder input with a file
            output, images without a mask, two inputs that would write one output, or an
            output that would overwrite an input.
    """
    input_path, mask_path, output = Path(input_path), Path(mask_path), Path(output)
    ext = ext if ext.startswith(".") else f".{ext}"
    if ext.lower() not in IMAGE_EXTENSIONS:
        raise AppError(f"--ext must be one of {', '.join(IMAGE_EXTENSIONS)}, got {ext}")
    for what, path in (("input", input_path), ("mask", mask_path)):
        if not path.exists():
            raise AppError(f"{what} {path} does not exist")
    if input_path.is_file():
        if mask_path.is_dir():
            matched = _match_masks([input_path], input_path.parent, mask_path)
            mask_file = matched[input_path]
        else:
            mask_file = mask_path
        # A name without extension is a folder (created if needed), like an existing one.
        if output.is_dir() or not output.suffix:
            out = output / (input_path.stem + ext)
        elif is_image_file(output):
            out = output
        else:
            raise AppError(f"output {output} is neither a folder nor an image file name "
                           f"(end it with one of {', '.join(IMAGE_EXTENSIONS)})")
        jobs = [Job(input_path, mask_file, out)]
    else:
        if output.exists() and not output.is_dir():
            raise AppError(f"input {input_path} is a folder, so the output must be a folder; "
                           f"{output} is a file")
        images = find_images(input_path)
        if not images:
            raise AppError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {input_path}")
        if mask_path.is_dir():
            matched = _match_masks(images, input_path, mask_path)
        else:
            matched = dict.fromkeys(images, mask_path)
        jobs = [Job(image, matched[image],
                    output / image.relative_to(input_path).with_suffix(ext))
                for image in images]
    seen: dict[Path, Path] = {}
    inputs = {job.image.resolve() for job in jobs}
    for job in jobs:
        target = job.output.resolve()
        if target in inputs:
            raise AppError(f"{job.output} would overwrite an input image; choose another "
                           "output or --ext")
        if target in seen:
            raise AppError(f"{seen[target]} and {job.image} would both be written to "
                           f"{job.output}")
        seen[target] = job.image
    return jobs


class _Progress:
    """A tqdm bar on stderr, or nothing when tqdm is missing or ``quiet``; :meth:`say`
    prints a message without breaking the bar."""

    def __init__(self, total: int, quiet: bool):
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the apps extra
            tqdm = None
        self._tqdm = tqdm
        self._bar = None if tqdm is None or quiet else tqdm(
            total=total, unit="img", desc=PROG, file=sys.stderr, dynamic_ncols=True)

    def say(self, message: str) -> None:
        if self._bar is not None:
            self._tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pconv-inpaint``; returns the exit status (0 ok, 1 errors, 2 usage)."""
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise AppError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_side is not None and args.max_side < 1:
        raise AppError(f"--max-side must be >= 1, got {args.max_side}")
    jobs = plan_jobs(args.input, args.mask, args.output, args.ext)
    model = None
    if args.method == "pconv":
        model = load_network(args.checkpoint, args.device, amp=args.amp)
    else:
        try:
            resolve_device(args.device)
        except ValueError as exc:
            raise AppError(str(exc)) from exc

    bar = _Progress(len(jobs), args.quiet)
    failures = 0
    # Pending work grouped by image size, so equal sizes share a batch; flushed when a
    # group is full or when too much is pending (bounded memory with many sizes).
    pending: dict[tuple[int, int], list[tuple[Job, torch.Tensor, torch.Tensor]]] = {}

    def flush(size: tuple[int, int]) -> None:
        nonlocal failures
        group = pending.pop(size)
        images = torch.stack([image for _, image, _ in group])
        masks = torch.stack([mask for _, _, mask in group])
        results = inpaint(model, images, masks, method=args.method, batch_size=args.batch_size,
                          padding=args.padding, max_side=args.max_side, amp=args.amp)
        for (job, _, _), result in zip(group, results):
            try:
                save_image(result, job.output)
            except (OSError, ValueError) as exc:
                failures += 1
                bar.say(f"{PROG}: error: cannot write {job.output}: {exc}")
            bar.update(1)

    for job in jobs:
        try:
            image = load_image(job.image)
            mask = load_mask(job.mask, invert=args.invert)
        except ImageLoadError as exc:
            failures += 1
            bar.say(f"{PROG}: error: {exc}; skipped")
            bar.update(1)
            continue
        size = tuple(image.shape[-2:])
        if tuple(mask.shape[-2:]) != size:
            if not args.resize_mask:
                failures += 1
                bar.say(f"{PROG}: error: mask {job.mask} is {mask.shape[-1]}x{mask.shape[-2]} "
                          f"but image {job.image} is {size[1]}x{size[0]} (width x height); "
                          "use --resize-mask to scale masks; skipped")
                bar.update(1)
                continue
            mask = resize_mask(mask, *size)
        pending.setdefault(size, []).append((job, image, mask))
        if len(pending[size]) >= args.batch_size:
            flush(size)
        elif sum(map(len, pending.values())) >= 2 * args.batch_size:
            for key in list(pending):
                flush(key)
    for key in list(pending):
        flush(key)
    bar.close()
    if failures:
        print(f"{PROG}: {failures} of {len(jobs)} images failed", file=sys.stderr)
        return 1
    if len(jobs) == 1:
        print(f"wrote {jobs[0].output}", file=sys.stderr)
    else:
        print(f"wrote {len(jobs)} images to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
