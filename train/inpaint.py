"""Inference: inpaint images of any size with a trained network or a classical baseline.

The one entry point is :func:`inpaint`. The applications (``pconv-inpaint``,
``pconv-remove``, ``pconv-board``) all go through it, so they share its guarantees:

- **Known pixels are untouched.** The mask is binarised (``mask >= 0.5`` is known) and the
  result is ``torch.where(known, image, filled)`` at the input's full resolution, so every
  known pixel of the result is bit-identical to the input, whatever the network outputs
  (even NaN) and whatever padding or rescaling happened on the way.
- **Any size.** The networks need sizes that are multiples of ``model.size_multiple``
  (``2 ** layers``). The image and its mask are padded up to the next multiple, together
  and the same way (see *Padding* below), and the padding is cropped off again.
- **Huge inputs.** ``max_side`` runs the network on a downscaled copy when the longer side
  is larger, upsamples the filled copy and pastes only its hole pixels into the full-size
  image (known pixels stay exact; hole detail is limited by ``max_side``).
- Batched over images of one size, under ``torch.no_grad()``, with the model in eval mode,
  on the model's device; the result comes back on the input's device and in its dtype.

Padding. ``padding="reflect"`` (the default) mirrors the image *and the mask* into the
padding, so the network sees a full frame of plausible content, as in training where every
crop is full of picture and never shows a large hole along an edge; a hole touching the
border is mirrored as a hole, so no pixel hidden under the hole leaks into the padding as
"known" context. ``padding="hole"`` marks the padding as hole instead (zeros the network
never reads, the same as its own partial-convolution padding at the border); it makes the
hole ratio larger, and with :class:`~train.models.PConvUNet` large holes can leave
unfilled pixels (see its docstring), which is why reflection is the default. Reflection
needs a pad smaller than the side it mirrors; for tiny images where that fails the image
edge is replicated instead.

Mask convention everywhere: 1 = known pixel, 0 = hole; images are float ``[3, H, W]`` in
``[0, 1]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import amp as amplib
from .classical import DEFAULT_RADIUS, inpaint_classical

__all__ = ["METHODS", "PADDING_MODES", "inpaint", "pad_to_multiple", "resolve_device"]

METHODS = ("pconv", "ns", "telea")
"""``"pconv"``: the network; ``"ns"`` / ``"telea"``: OpenCV's Navier-Stokes / Telea."""

PADDING_MODES = ("reflect", "hole")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``): CUDA when available, else CPU; anything else as given.

    Raises ValueError for an unknown name or ``cuda`` on a machine without a GPU.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA device")
    return device


def pad_to_multiple(image: Tensor, mask: Tensor, multiple: int,
                    mode: str = "reflect") -> tuple[Tensor, Tensor, tuple[int, int, int, int]]:
    """Pad ``image`` ``[N, C, H, W]`` and ``mask`` ``[N, 1, H, W]`` to multiples of ``multiple``.

    The padding is split evenly between the two sides of each axis (the extra pixel of an
    odd pad goes to the bottom / right), so the picture stays centred.

    Args:
        mode: ``"reflect"`` mirrors image and mask alike (falling back to replicating the
            edge where a pad is not smaller than the side); ``"hole"`` pads the mask with
            0 (hole) and the image with 0.

    Returns:
        ``(image [N, C, H', W'], mask [N, 1, H', W'], (top, bottom, left, right))`` where
        ``H' = H + top + bottom`` and ``W' = W + left + right`` are multiples of
        ``multiple``; mask convention 1 = known, 0 = hole.
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {mode!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = image.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    top, left = ph // 2, pw // 2
    pads = (top, ph - top, left, pw - left)
    if ph == 0 and pw == 0:
        return image, mask, pads
    # F.pad takes (left, right, top, bottom).
    fpad = (pads[2], pads[3], pads[0], pads[1])
    if mode == "hole":
        return F.pad(image, fpad), F.pad(mask, fpad), pads
    # One call over image and mask together guarantees they are mirrored identically.
    both = torch.cat([image, mask.to(image.dtype)], 1)
    # Reflection cannot mirror a pad as wide as the side itself; replicate then.
    reflectable = max(pads[0], pads[1]) < h and max(pads[2], pads[3]) < w
    both = F.pad(both, fpad, mode="reflect" if reflectable else "replicate")
    return both[:, :-1], both[:, -1:].to(mask.dtype), pads


def _downscaled_size(h: int, w: int, max_side: int | None) -> tuple[int, int] | None:
    """The ``(h, w)`` to run the network at when ``max(h, w) > max_side``, else None."""
    if not max_side or max(h, w) <= max_side:
        return None
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _fill_with_network(model: nn.Module, image: Tensor, known: Tensor, padding: str,
                       max_side: int | None, amp: str) -> Tensor:
    """The network's fill of ``image`` ``[N, 3, H, W]`` where ``known`` ``[N, 1, H, W]``
    (float, 1 = known) is 0, at full size; only its hole pixels are used by the caller."""
    h, w = image.shape[-2:]
    small = _downscaled_size(h, w, max_side)
    if small is not None:
        image_s = F.interpolate(image, size=small, mode="area")
        # A low-resolution pixel is known only if every full-resolution pixel under it is
        # (an average of exact ones is exactly one): no hole pixel leaks in as context.
        known_s = (F.interpolate(known, size=small, mode="area") >= 1.0).to(known.dtype)
    else:
        image_s, known_s = image, known
    multiple = int(getattr(model, "size_multiple", 1))
    image_p, known_p, (top, bottom, left, right) = pad_to_multiple(image_s, known_s, multiple,
                                                                   padding)
    with amplib.autocast(image.device, amp):
        output = model(image_p, known_p)
    output = output.to(image.dtype)[..., top:output.shape[-2] - bottom,
                                    left:output.shape[-1] - right]
    if small is None:
        return output
    # Composite at low resolution before upsampling, so hole pixels next to the boundary
    # are interpolated between the real (downscaled) surroundings and the fill.
    output = torch.where(known_s.bool(), image_s, output)
    return F.interpolate(output, size=(h, w), mode="bilinear", align_corners=False)


def _check_inputs(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Batched views ``[N, 3, H, W]`` and ``[N or 1, 1, H, W]``, and whether to unbatch."""
    single = image.dim() == 3
    if single:
        image = image.unsqueeze(0)
        if mask.dim() == 3:
            mask = mask.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"inpaint: image must be [3, H, W] or [N, 3, H, W], got "
                         f"{list(image.shape)}")
    n, _, h, w = image.shape
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, n) \
            or tuple(mask.shape[2:]) != (h, w):
        want = f"[1, {h}, {w}]" if single else f"[{n} or 1, 1, {h}, {w}]"
        raise ValueError(f"inpaint: mask must be {want} for image "
                         f"{list(image.shape[1:] if single else image.shape)}, got "
                         f"{list(mask.shape[1:] if single and mask.dim() == 4 else mask.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"inpaint: image must be a float tensor in [0, 1], got {image.dtype}")
    return image, mask.to(image.device), single


@torch.no_grad()
def inpaint(model: nn.Module | None, image: Tensor, mask: Tensor, *, method: str = "pconv",
            batch_size: int = 8, padding: str = "reflect",
            max_side: int | None = None, amp: str = "off", radius: int = DEFAULT_RADIUS) -> Tensor:
    """Fill the holes of ``image`` where ``mask`` is 0; known pixels are returned unchanged.

    Args:
        model: a :class:`~train.models.PConvUNet` / :class:`~train.models.ModifiedUNet`
            (e.g. from :func:`train.checkpoint.load_model`); only needed for
            ``method="pconv"``. It runs where its parameters are (move it to the GPU to
            use one; inputs are moved there and results back), switched to eval mode for
            the call and back after.
        image: ``[3, H, W]`` or ``[N, 3, H, W]`` float in [0, 1], any ``H`` and ``W``.
        mask: ``[1, H, W]`` (single image) or ``[N or 1, 1, H, W]``; 1 = known, 0 = hole.
            Binarised at 0.5: ``mask >= 0.5`` is known (the networks were trained on
            binary masks and the classical methods threshold at 0.5 too).
        method: ``"pconv"`` (the network), ``"ns"`` (Navier-Stokes) or ``"telea"``.
        batch_size: images per network call.
        padding: ``"reflect"`` or ``"hole"``, see the module docstring.
        max_side: run the network at most at this longer side (downscaled copy, fill
            pasted back at full resolution); ``None`` or 0 runs at full resolution.
        amp: ``"off"`` (the model's dtype), ``"bf16"`` or ``"fp16"`` (CUDA only): run the
            network under autocast (see :mod:`train.amp`); faster, the fill differs from
            float32's by the 16-bit rounding, the known pixels are exact either way.
        radius: neighbourhood radius in pixels of ``"ns"`` and ``"telea"`` (unused by
            the network).

    Returns:
        A new tensor shaped, typed and placed like ``image``: the input's known pixels
        bit for bit, the holes filled (clamped to [0, 1]).
    """
    if method not in METHODS:
        raise ValueError(f"inpaint: method must be one of {METHODS}, got {method!r}")
    if method == "pconv" and model is None:
        raise ValueError("inpaint: method 'pconv' needs a model (load one with "
                         "train.checkpoint.load_model)")
    if batch_size < 1:
        raise ValueError(f"inpaint: batch_size must be >= 1, got {batch_size}")
    if padding not in PADDING_MODES:
        raise ValueError(f"inpaint: padding must be one of {PADDING_MODES}, got {padding!r}")
    if amp not in amplib.AMP_MODES:
        raise ValueError(f"inpaint: amp must be one of {amplib.AMP_MODES}, got {amp!r}")
    if radius < 1:
        raise ValueError(f"inpaint: radius must be >= 1, got {radius}")
    batch, mask, single = _check_inputs(image, mask)
    known = mask >= 0.5
    result = batch.clone()
    if method == "pconv":
        param = next(model.parameters(), None)
        run_device = param.device if param is not None else torch.device("cpu")
        run_dtype = param.dtype if param is not None else torch.float32
        amplib.check_inference_amp(run_device, amp)
        was_training = model.training
        model.eval()
    try:
        for start in range(0, batch.shape[0], batch_size):
            stop = start + batch_size
            chunk = batch[start:stop]
            chunk_known = known[start:stop] if known.shape[0] > 1 else known
            chunk_known = chunk_known.expand(chunk.shape[0], -1, -1, -1)
            if bool(chunk_known.all()):
                continue  # nothing to fill; the clone already holds the answer
            if method == "pconv":
                filled = _fill_with_network(
                    model, chunk.to(run_device, run_dtype),
                    chunk_known.to(run_device, run_dtype), padding, max_side, amp)
            else:
                filled = inpaint_classical(chunk, chunk_known.to(chunk.dtype), method, radius)
            filled = filled.to(batch.device, batch.dtype).clamp(0.0, 1.0)
            # torch.where, not mask * image + (1 - mask) * output: it copies known pixels
            # bit for bit even where the fill is NaN or Inf (0 * Inf is NaN).
            result[start:stop] = torch.where(chunk_known, chunk, filled)
    finally:
        if method == "pconv":
            model.train(was_training)
    return result[0] if single else result
