"""``pconv-remove``: remove objects of chosen classes from a photo.

A semantic segmentation model finds the pixels of the chosen Pascal VOC classes, the
holes are grown by a few pixels (segmentations hug the object too tightly and would leave
its outline and shadow behind), and the holes are inpainted. Writes the result and a
comparison strip: input | masked input (holes white) | ours | Navier-Stokes.

Examples::

    pconv-remove street.jpg --classes person,car -o street_clean.png --checkpoint best.pt
    pconv-remove dog.jpg --classes dog --segmenter deeplab --seg-weights deeplab.pth \\
        -o no_dog.png --checkpoint best.pt --dilate 11
    pconv-remove flat.png --classes person --segmenter color:person=ff0000 -o out.png \\
        --method ns

``--checkpoint`` takes a checkpoint file or a run folder (its newest checkpoint). When no
pixel of the chosen classes is found the command stops with exit status 1 and writes
nothing, unless ``--allow-empty`` (then the result is the input). No output may be the
input or another output. The network runs at most at ``--max-side`` (default 2048; the
fill is pasted back at full size).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..images import ImageLoadError, is_image_file, keeps_alpha, read_image, save_image, \
    save_mask
from ..inpaint import METHODS, inpaint, resolve_device
from ..masks import dilate_holes
from . import HOLE_WARNING_SHARE, AppError, add_device_arg, add_max_side_arg, \
    is_out_of_memory, load_network, output_losses, run_main, same_file
from .segment import VOC_CLASSES, ColorSegmenter, Segmenter, SegmenterError, class_mask, \
    make_segmenter, parse_classes

__all__ = ["build_parser", "removal_mask", "comparison_strip", "main"]

PROG = "pconv-remove"
GUTTER = 4  # white pixels between the strip's panels


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``pconv-remove``."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Remove objects of chosen classes from an image: segment, "
                               "dilate, inpaint.")
    p.add_argument("image", help="the input image")
    p.add_argument("--classes", required=True,
                   help=f"comma-separated classes to remove, from: {', '.join(VOC_CLASSES[1:])}")
    p.add_argument("-o", "--output", required=True, help="where the result is written")
    p.add_argument("--strip", metavar="PATH",
                   help="where the comparison strip is written (default: OUTPUT with _strip "
                        "added to its name)")
    p.add_argument("--save-mask", metavar="PATH",
                   help="also write the mask (white = known, black = hole)")
    p.add_argument("--dilate", type=int, default=7, metavar="SIZE",
                   help="grow the holes by an odd SIZE x SIZE square, 1 = not at all "
                        "(default: 7)")
    p.add_argument("--segmenter", default="fcn",
                   help="fcn (FCN-ResNet101), deeplab (DeepLabV3-ResNet101), both from "
                        "torchvision, or color:CLASS=RRGGBB,...[,tol=N] (default: fcn)")
    p.add_argument("--seg-weights", metavar="PATH",
                   help="segmentation weights file (default: the local torch hub cache)")
    p.add_argument("--method", choices=METHODS, default="pconv",
                   help="inpainting method (default: pconv, needs --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint written by pconv-train, or its run folder "
                                        "(the newest checkpoint)")
    add_max_side_arg(p)
    p.add_argument("--allow-empty", action="store_true",
                   help="when nothing of the classes is found, write the input unchanged "
                        "and exit 0 (default: an error, nothing written)")
    add_device_arg(p)
    return p


def removal_mask(segmenter: Segmenter, image: torch.Tensor, class_ids: list[int],
                 dilate: int = 7) -> torch.Tensor:
    """Mask ``[1, H, W]`` (1 = known, 0 = hole) that holes out ``class_ids`` in ``image``
    ``[3, H, W]``, grown by a ``dilate x dilate`` square (odd; 1 = unchanged)."""
    labels = segmenter(image)
    if tuple(labels.shape) != tuple(image.shape[1:]):
        raise ValueError(f"segmenter returned labels {list(labels.shape)} for image "
                         f"{list(image.shape)}; expected [H, W]")
    return dilate_holes(class_mask(labels.cpu(), class_ids), dilate)


def comparison_strip(panels: list[torch.Tensor], gutter: int = GUTTER) -> torch.Tensor:
    """Images ``[3, H, W]`` side by side, ``gutter`` white columns apart: ``[3, H, W']``."""
    h = panels[0].shape[1]
    space = torch.ones(3, h, gutter, dtype=panels[0].dtype, device=panels[0].device)
    parts = []
    for i, panel in enumerate(panels):
        if i:
            parts.append(space)
        parts.append(panel)
    return torch.cat(parts, dim=2)


def _strip_path(output: Path, strip: str | None) -> Path:
    if strip:
        return Path(strip)
    return output.with_name(f"{output.stem}_strip{output.suffix}")


def _check_output_paths(image: Path, outputs: dict[str, Path]) -> None:
    """AppError unless every output (by its option) has an image extension and is neither
    the input image nor another output."""
    seen: dict[str, Path] = {}
    for option, path in outputs.items():
        if not is_image_file(path):
            raise AppError(f"{path} needs an image file extension (.png, .jpg, ...)")
        if same_file(path, image):
            raise AppError(f"{option} {path} is the input image; choose another file")
        for other_option, other in seen.items():
            if same_file(path, other):
                raise AppError(f"{other_option} and {option} are both {path}; give each its "
                               "own file")
        seen[option] = path


def _check_segmenter_finds(segmenter: Segmenter, class_ids: list[int]) -> None:
    """AppError when a colour segmenter has no colour for a chosen class: it could never
    find it (a torchvision segmenter knows every class)."""
    if not isinstance(segmenter, ColorSegmenter):
        return
    coloured = {class_id for class_id, _ in segmenter.rules}
    missing = [segmenter.classes[i] for i in class_ids if i not in coloured]
    if missing:
        has = ", ".join(segmenter.classes[i] for i in sorted(coloured))
        raise AppError(f"the colour segmenter has no colour for {', '.join(missing)} (it has "
                       f"{has}); add one, e.g. color:{missing[0]}=RRGGBB")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pconv-remove``; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args))


def _check_options(args: argparse.Namespace) -> list[int]:
    """The class ids of ``--classes``, after the cheap checks of every option."""
    try:
        class_ids = parse_classes(args.classes)
    except ValueError as exc:
        raise AppError(f"--classes: {exc}") from exc
    if args.dilate < 1 or args.dilate % 2 == 0:
        raise AppError(f"--dilate must be an odd size >= 1, got {args.dilate}")
    if args.max_side < 0:
        raise AppError(f"--max-side must be >= 0 (0 = no limit), got {args.max_side}")
    return class_ids


def _inpaint(model, image: torch.Tensor, mask: torch.Tensor,
             args: argparse.Namespace) -> torch.Tensor:
    """The chosen method's result; running out of memory is an AppError naming the option
    that bounds it."""
    try:
        return inpaint(model, image, mask, method=args.method,
                       max_side=args.max_side or None, amp=args.amp)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        h, w = image.shape[-2:]
        limit = args.max_side or "none"
        raise AppError(f"out of memory inpainting {args.image} ({w}x{h}): lower --max-side "
                       f"(now {limit})") from exc


def _check_hole(share: float, names: str, args: argparse.Namespace) -> None:
    """Stop when nothing was found (unless ``--allow-empty``); warn when the hole, a
    ``share`` of the image, is so large that the fill will be poor."""
    if share == 0.0:
        if not args.allow_empty:
            raise AppError(f"no {names} found in {args.image}; nothing written "
                           "(--allow-empty writes the input unchanged)")
        print(f"{PROG}: warning: no {names} found in {args.image}; the result is the input",
              file=sys.stderr)
    elif share > HOLE_WARNING_SHARE:
        print(f"{PROG}: warning: the hole covers {100 * share:.0f}% of the image (--dilate "
              f"{args.dilate}); so large a hole is filled poorly", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    # Cheap checks first, so a typo never waits for a network to load.
    class_ids = _check_options(args)
    output = Path(args.output)
    strip = _strip_path(output, args.strip)
    outputs = {"-o": output, "--strip": strip}
    if args.save_mask:
        outputs["--save-mask"] = Path(args.save_mask)
    _check_output_paths(Path(args.image), outputs)
    if not Path(args.image).is_file():
        raise AppError(f"input image {args.image} does not exist")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise AppError(str(exc)) from exc
    model = (load_network(args.checkpoint, args.device, amp=args.amp,
                          alternative="--method ns or --method telea")
             if args.method == "pconv" else None)
    try:
        segmenter = make_segmenter(args.segmenter, args.seg_weights, device)
    except SegmenterError as exc:
        raise AppError(str(exc)) from exc
    _check_segmenter_finds(segmenter, class_ids)
    try:
        source = read_image(args.image)
    except ImageLoadError as exc:
        raise AppError(str(exc)) from exc
    image = source.image

    mask = removal_mask(segmenter, image, class_ids, args.dilate)
    names = ", ".join(segmenter.classes[i] for i in class_ids)
    share = float((mask < 0.5).float().mean())
    _check_hole(share, names, args)
    for message in output_losses(source, args.image, output).values():
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    ours = _inpaint(model, image, mask, args)
    ns = inpaint(None, image, mask, method="ns")
    # The masked input shows the holes white, as the paper's figures do.
    masked = torch.where(mask >= 0.5, image, torch.ones_like(image))
    save_image(ours, output, alpha=source.alpha if keeps_alpha(output) else None)
    save_image(comparison_strip([image, masked, ours, ns]), strip)
    if args.save_mask:
        save_mask(mask, args.save_mask)
    if share == 0.0:
        print(f"wrote {output} and {strip}", file=sys.stderr)
    else:
        print(f"removed {names} ({100 * share:.1f}% of the pixels); wrote {output} and "
              f"{strip}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
