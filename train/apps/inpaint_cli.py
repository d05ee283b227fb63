"""``pconv-inpaint``: inpaint an image, or a folder of images, with a mask file or folder.

Examples::

    pconv-inpaint photo.jpg hole.png -o filled.png --checkpoint runs/demo
    pconv-inpaint photos/ masks/ -o filled/ --checkpoint runs/best.pt --batch-size 8
    pconv-inpaint photos/ masks/ -o filled_ns/ --method ns --invert
    pconv-inpaint data/ data/ -o filled/ --mask-suffix _mask --checkpoint runs/demo

``--checkpoint`` takes a checkpoint file or a run folder (its newest checkpoint). Mask
files are white = known, black = hole (``--invert`` for files drawn the other way, like
NVIDIA's irregular test masks); a mask with transparency is read by its alpha channel,
transparent = hole. With a folder of images, a mask *file* applies to every image, and a
mask *folder* is matched by the relative path without extension (``photos/a/x.jpg`` <-
``masks/a/x.png``), else by the file name without extension when that is unique; with
``--mask-suffix _mask`` the mask of ``x.jpg`` is ``x_mask.<any extension>``, which lets
images and masks share a folder (LaMa's layout). An image is never its own mask, and mask
files and the output folder are never taken for images to inpaint. Results keep the
relative paths and are written as PNG by default: lossless, so the known pixels in the file
are those of the decoded input exactly; an input's transparency is kept where the format
can hold it (PNG, WebP, TIFF).

Images of any size are accepted; images of equal size are inpainted in batches, and the
network runs at most at ``--max-side`` (default 2048; the fill is pasted back at full
size). An unreadable image, a mask of the wrong size or a batch that runs out of memory is
reported and skipped (exit status 1 at the end); a missing mask, a bad checkpoint or a bad
option stops before any work. Results are written atomically, so an interrupted run leaves
no truncated file and ``--skip-existing`` resumes it.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..classical import DEFAULT_RADIUS
from ..images import IMAGE_EXTENSIONS, ImageLoadError, find_images, find_non_images, \
    is_image_file, keeps_alpha, load_mask, read_image, save_image
from ..inpaint import METHODS, PADDING_MODES, inpaint, resolve_device
from ..masks import resize_mask
from ..progress import Progress
from . import HOLE_WARNING_SHARE, AppError, add_device_arg, add_max_side_arg, \
    is_out_of_memory, load_network, output_losses, run_main, same_file

__all__ = ["Job", "build_parser", "plan_jobs", "non_image_files", "main"]

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
    p.add_argument("--checkpoint", help="checkpoint written by pconv-train, or its run folder "
                                        "(the newest checkpoint), for --method pconv")
    p.add_argument("--invert", action="store_true",
                   help="mask files are white = hole, black = known")
    p.add_argument("--mask-suffix", default="", metavar="SUFFIX",
                   help="a mask is named like its image plus SUFFIX (with --mask-suffix "
                        "_mask, city.png <- city_mask.<any extension>); needed when images "
                        "and masks share a folder")
    p.add_argument("--resize-mask", action="store_true",
                   help="scale masks (nearest neighbour) to their image's size instead of "
                        "reporting a size mismatch")
    p.add_argument("--batch-size", type=int, default=4, help="images per network call "
                                                             "(default: 4)")
    p.add_argument("--padding", choices=PADDING_MODES, default="reflect",
                   help="how images are padded to the network's size multiple "
                        "(default: reflect)")
    add_max_side_arg(p)
    p.add_argument("--radius", type=int, default=DEFAULT_RADIUS, metavar="PIXELS",
                   help="neighbourhood radius of --method ns / telea "
                        f"(default: {DEFAULT_RADIUS})")
    p.add_argument("--ext", default=".png",
                   help="file type of results in an output folder (default: .png, lossless)")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave out images whose result file exists (results are written "
                        "atomically, so an existing one is whole): resumes a stopped run")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (a bar on a terminal, else a line a minute)")
    add_device_arg(p)
    return p


def _is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _find_masks(mask_root: Path, suffix: str, image_root: Path, output: Path) -> list[Path]:
    """The mask files of a mask folder, less the output folder where it lies inside: with
    ``suffix``, the images whose name ends with it; without, every image outside the image
    folder (there each one would be a candidate mask of its namesake, itself)."""
    if suffix:
        return [m for m in find_images(mask_root, exclude=[output]) if m.stem.endswith(suffix)]
    return find_images(mask_root, exclude=[image_root, output])


def _other_than(image: Path, masks: list[Path]) -> list[Path]:
    """``masks`` less ``image`` itself (a mask folder may hold the image folder)."""
    return [m for m in masks if not same_file(m, image)]


def _match_masks(images: list[Path], image_root: Path, masks: list[Path], mask_root: Path,
                 suffix: str = "") -> dict[Path, Path]:
    """Mask file of each image: same relative path without extension (plus ``suffix``),
    else the same unique file name without extension (plus ``suffix``); never the image
    itself. Raises AppError listing the images without a mask."""
    by_rel = {m.relative_to(mask_root).with_suffix("").as_posix(): m for m in masks}
    by_stem: dict[str, list[Path]] = {}
    for m in masks:
        by_stem.setdefault(m.stem, []).append(m)
    matched, missing = {}, []
    for image in images:
        rel = image.relative_to(image_root).with_suffix("").as_posix() + suffix
        stem = image.stem + suffix
        candidates = _other_than(image, [by_rel[rel]] if rel in by_rel else []) or \
            _other_than(image, by_stem.get(stem, []))
        if len(candidates) == 1:
            matched[image] = candidates[0]
        else:
            why = f" ({len(candidates)} masks named {stem})" if candidates else ""
            missing.append(f"{image.relative_to(image_root)}{why}")
    if missing:
        shown = ", ".join(missing[:10])
        if len(missing) > 10:
            shown += f", ... ({len(missing)} in all)"
        rule = f"file name plus {suffix}" if suffix else "file name"
        raise AppError(f"no unique mask in {mask_root} for: {shown}. Masks are matched by "
                       f"relative path or {rule}, without extension")
    return matched


def _checked_ext(ext: str) -> str:
    """``ext`` with its leading dot; AppError unless it is an image extension."""
    ext = ext if ext.startswith(".") else f".{ext}"
    if ext.lower() not in IMAGE_EXTENSIONS:
        raise AppError(f"--ext must be one of {', '.join(IMAGE_EXTENSIONS)}, got {ext}")
    return ext


def _single_output(image: Path, output: Path, ext: str) -> Path:
    """Where the result of one input image goes: ``output`` itself when it is an image
    file name, else a file named like the image in the folder ``output``."""
    # A name without extension is a folder (created if needed), like an existing one.
    if output.is_dir() or not output.suffix:
        return output / (image.stem + ext)
    if is_image_file(output):
        return output
    raise AppError(f"output {output} is neither a folder nor an image file name "
                   f"(end it with one of {', '.join(IMAGE_EXTENSIONS)})")


def _check_folder_output(input_path: Path, output: Path) -> None:
    """AppError unless ``output`` can be the output folder of the folder ``input_path``."""
    if output.exists() and not output.is_dir():
        raise AppError(f"input {input_path} is a folder, so the output must be a folder; "
                       f"{output} is a file")
    if not output.exists() and is_image_file(output):
        raise AppError(f"input {input_path} is a folder, so the output must be a folder; "
                       f"{output} is named like an image file (a folder of that name would "
                       "be created): give a folder name")


def _image_search_exclusions(mask_path: Path, output: Path) -> list[Path]:
    """Sub-folders of an input folder that hold no images to inpaint: the output folder
    (else a second run would take the first one's results for inputs) and the mask
    folder."""
    return [output, mask_path] if mask_path.is_dir() else [output]


def _folder_images(input_path: Path, mask_path: Path, masks: list[Path],
                   output: Path) -> list[Path]:
    """The images to inpaint in the folder ``input_path``: its image files, less the masks
    and what :func:`_image_search_exclusions` names."""
    mask_files = {m.resolve() for m in masks}
    images = [image for image in find_images(input_path,
                                             _image_search_exclusions(mask_path, output))
              if image.resolve() not in mask_files]
    if not images:
        raise AppError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {input_path}")
    return images


def _check_outputs(jobs: list[Job], image_root: Path, mask_path: Path) -> None:
    """AppError when a result would overwrite an input image or mask, land in the mask
    folder (unless images and masks share it), or be written by two inputs."""
    images = {job.image.resolve() for job in jobs}
    masks = {job.mask.resolve() for job in jobs}
    mask_folder = mask_path if mask_path.is_dir() and not same_file(mask_path, image_root) \
        else None
    seen: dict[Path, Path] = {}
    for job in jobs:
        target = job.output.resolve()
        if target in images or target in masks:
            what = "image" if target in images else "mask"
            raise AppError(f"{job.output} would overwrite an input {what}; choose another "
                           "output or --ext")
        if mask_folder is not None and _is_inside(target, mask_folder):
            raise AppError(f"{job.output} lies in the mask folder {mask_path}: results would "
                           "mix with the masks (and be read as masks next time); choose an "
                           "output outside it")
        if target in seen:
            raise AppError(f"{seen[target]} and {job.image} would both be written to "
                           f"{job.output}")
        seen[target] = job.image


def plan_jobs(input_path: str | Path, mask_path: str | Path, output: str | Path,
              ext: str = ".png", mask_suffix: str = "") -> list[Job]:
    """The :class:`Job` list for the command's three paths (see the module docstring).

    Raises:
        AppError: a path that does not exist, no images, a folder input with a file
            output, images and masks in one folder without ``mask_suffix``, images
            without a mask, two inputs that would write one output, or an output that
            would overwrite an input image or mask or lie in the mask folder.
    """
    input_path, mask_path, output = Path(input_path), Path(mask_path), Path(output)
    ext = _checked_ext(ext)
    for what, path in (("input", input_path), ("mask", mask_path)):
        if not path.exists():
            raise AppError(f"{what} {path} does not exist")
    if mask_suffix and not mask_path.is_dir():
        raise AppError(f"--mask-suffix names the masks of a mask folder, but {mask_path} "
                       "is a file")
    image_root = input_path if input_path.is_dir() else input_path.parent
    if mask_path.is_dir() and same_file(mask_path, image_root) and not mask_suffix:
        raise AppError(f"images and masks are both in {mask_path}, so each image would be "
                       "matched with itself: name the masks like their image plus a "
                       "suffix and give it, e.g. --mask-suffix _mask for city.png and "
                       "city_mask.png")
    masks = _find_masks(mask_path, mask_suffix, image_root, output) if mask_path.is_dir() \
        else [mask_path]
    if input_path.is_file():
        images = [input_path]
    else:
        _check_folder_output(input_path, output)
        images = _folder_images(input_path, mask_path, masks, output)
    if mask_path.is_dir():
        matched = _match_masks(images, image_root, masks, mask_path, mask_suffix)
    else:
        matched = dict.fromkeys(images, mask_path)
    if input_path.is_file():
        jobs = [Job(input_path, matched[input_path], _single_output(input_path, output, ext))]
    else:
        jobs = [Job(image, matched[image],
                    output / image.relative_to(input_path).with_suffix(ext))
                for image in images]
    _check_outputs(jobs, image_root, mask_path)
    return jobs


def non_image_files(input_path: str | Path, mask_path: str | Path,
                    output: str | Path) -> list[Path]:
    """The files of a folder input that :func:`plan_jobs` passes over because their
    extension is not an image's (same folders searched); empty for a file input."""
    input_path, mask_path, output = Path(input_path), Path(mask_path), Path(output)
    if not input_path.is_dir():
        return []
    return find_non_images(input_path, _image_search_exclusions(mask_path, output))


@dataclass
class _Queued:
    """A loaded job waiting for its batch."""

    job: Job
    image: torch.Tensor
    mask: torch.Tensor
    alpha: torch.Tensor | None  # written back with the result, where the format keeps it


class _Run:
    """One run over the jobs: load each image and mask, group equal sizes into batches,
    inpaint, write. Errors are reported per image and counted in :attr:`failures`; what
    the results lose (lossy format, 16 bits, transparency) is reported once per kind."""

    def __init__(self, args: argparse.Namespace, model, total: int):
        self.args = args
        self.model = model
        self.bar = Progress(total, desc=PROG, unit="img", enabled=not args.quiet)
        self.total = total
        self.failures = 0
        self._warned: set[str] = set()
        # Pending work grouped by image size, so equal sizes share a batch; flushed when a
        # group is full or when too much is pending (bounded memory with many sizes).
        self._pending: dict[tuple[int, int], list[_Queued]] = {}
        # The last mask loaded: one mask file for a whole folder is decoded (and its hole
        # checked) once, not once per image.
        self._last_mask: tuple[Path, torch.Tensor] | None = None

    def add(self, job: Job) -> None:
        """Load ``job`` and queue it; inpaint a batch when one is ready."""
        queued = self._load(job)
        if queued is None:
            return
        size = tuple(queued.image.shape[-2:])
        self._pending.setdefault(size, []).append(queued)
        if len(self._pending[size]) >= self.args.batch_size:
            self._flush(size)
        elif sum(map(len, self._pending.values())) >= 2 * self.args.batch_size:
            self.finish()

    def finish(self) -> None:
        """Inpaint and write everything still queued."""
        for size in list(self._pending):
            self._flush(size)

    def close(self) -> None:
        self.bar.close()

    def _fail(self, message: str) -> None:
        self.failures += 1
        self.bar.write(f"{PROG}: error: {message}; skipped")
        self.bar.update()

    def _warn(self, message: str) -> None:
        self.bar.write(f"{PROG}: warning: {message}")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            more = " (not repeated for other images)" if self.total > 1 else ""
            self._warn(message + more)

    def _load(self, job: Job) -> _Queued | None:
        try:
            source = read_image(job.image)
            mask = self._mask(job.mask)
        except ImageLoadError as exc:
            self._fail(str(exc))
            return None
        size = tuple(source.image.shape[-2:])
        if tuple(mask.shape[-2:]) != size:
            if not self.args.resize_mask:
                self._fail(f"mask {job.mask} is {mask.shape[-1]}x{mask.shape[-2]} but image "
                           f"{job.image} is {size[1]}x{size[0]} (width x height); use "
                           "--resize-mask to scale masks")
                return None
            mask = resize_mask(mask, *size)
        for kind, message in output_losses(source, job.image, job.output).items():
            self._warn_once(kind, message)
        alpha = source.alpha if keeps_alpha(job.output) else None
        return _Queued(job, source.image, mask, alpha)

    def _mask(self, path: Path) -> torch.Tensor:
        if self._last_mask is None or self._last_mask[0] != path:
            mask = load_mask(path, invert=self.args.invert)
            self._check_hole(path, mask)
            self._last_mask = (path, mask)
        return self._last_mask[1]

    def _check_hole(self, path: Path, mask: torch.Tensor) -> None:
        """Warn about a mask with nothing to fill or one that looks drawn the other way."""
        hole = float((mask < 0.5).float().mean())
        if hole == 0.0:
            self._warn(f"mask {path} has no hole (black = hole): nothing to fill; the "
                       "result is the input")
        elif hole > HOLE_WARNING_SHARE:
            hint = ("white = hole here (--invert); did you mean to leave out --invert?"
                    if self.args.invert else "white = known here; did you mean --invert?")
            self._warn(f"mask {path} is {100 * hole:.0f}% hole; {hint}")

    def _flush(self, size: tuple[int, int]) -> None:
        group = self._pending.pop(size)
        args = self.args
        try:
            results = inpaint(self.model, torch.stack([q.image for q in group]),
                              torch.stack([q.mask for q in group]), method=args.method,
                              batch_size=args.batch_size, padding=args.padding,
                              max_side=args.max_side or None, amp=args.amp,
                              radius=args.radius)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            self._out_of_memory(group)
            return
        for queued, result in zip(group, results):
            try:
                save_image(result, queued.job.output, alpha=queued.alpha)
            except (OSError, ValueError) as exc:
                self._fail(f"cannot write {queued.job.output}: {exc}")
                continue
            self.bar.update()

    def _out_of_memory(self, group: list[_Queued]) -> None:
        """Report each image of a batch that ran out of memory, with the options that
        bound memory; the run goes on with the next batch."""
        if torch.cuda.is_available():
            # The failed batch's blocks stay in the allocator's cache otherwise, and the
            # next batch would fail for want of them.
            torch.cuda.empty_cache()
        limit = self.args.max_side or "none"
        for queued in group:
            h, w = queued.image.shape[-2:]
            self._fail(f"out of memory inpainting {queued.job.image} ({w}x{h}, in a batch "
                       f"of {len(group)}): lower --max-side (now {limit}) or --batch-size "
                       f"(now {self.args.batch_size})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pconv-inpaint``; returns the exit status (0 ok, 1 errors, 2 usage)."""
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args))


def _check_options(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise AppError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_side < 0:
        raise AppError(f"--max-side must be >= 0 (0 = no limit), got {args.max_side}")
    if args.radius < 1:
        raise AppError(f"--radius must be >= 1, got {args.radius}")


def _load_method(args: argparse.Namespace):
    """The network for ``--method pconv`` (None for the classical methods), after the
    device is checked."""
    if args.method == "pconv":
        return load_network(args.checkpoint, args.device, amp=args.amp,
                            alternative="--method ns or --method telea")
    try:
        resolve_device(args.device)
    except ValueError as exc:
        raise AppError(str(exc)) from exc
    return None


def _report_non_images(args: argparse.Namespace) -> None:
    others = non_image_files(args.input, args.mask, args.output)
    if others:
        kinds = sorted({p.suffix.lower() or "no extension" for p in others})
        print(f"{PROG}: skipped {len(others)} file(s) under {args.input} that are not images "
              f"({', '.join(kinds[:6])}{', ...' if len(kinds) > 6 else ''}); images are "
              f"{', '.join(IMAGE_EXTENSIONS)}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    _check_options(args)
    jobs = plan_jobs(args.input, args.mask, args.output, args.ext, args.mask_suffix)
    _report_non_images(args)
    todo = [job for job in jobs if not (args.skip_existing and job.output.exists())]
    existing = len(jobs) - len(todo)
    if not todo:
        print(f"{PROG}: nothing to do: all {len(jobs)} results exist (--skip-existing)",
              file=sys.stderr)
        return 0
    model = _load_method(args)
    run = _Run(args, model, len(todo))
    try:
        for job in todo:
            run.add(job)
        run.finish()
    finally:
        run.close()
    kept = f" ({existing} existing results kept, --skip-existing)" if existing else ""
    if run.failures:
        print(f"{PROG}: {run.failures} of {len(todo)} images failed{kept}", file=sys.stderr)
        return 1
    if len(jobs) == 1:
        print(f"wrote {jobs[0].output}", file=sys.stderr)
    else:
        count = f"{len(todo)} image" + ("s" if len(todo) > 1 else "")
        print(f"wrote {count} to {args.output}{kept}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
