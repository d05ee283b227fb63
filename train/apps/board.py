"""``pconv-board``: a local web page to paint a mask on a photo and inpaint it.

The person opens the page, chooses a photo, paints the part to remove with a brush (size
slider, eraser, undo, clear), presses *Inpaint* and sees the partial-convolution result
next to OpenCV's Navier-Stokes and Telea, and can download it. The page is plain HTML, CSS
and JavaScript served by this Flask app (no build step, nothing fetched from the internet).

Example::

    pconv-board --checkpoint runs/demo               # then open http://127.0.0.1:8000/

``--checkpoint`` takes a checkpoint file or a run folder (its newest checkpoint).

API: ``POST /api/inpaint`` with a multipart form holding ``image`` (the photo's file, sent
as is) and ``mask`` (a PNG of the same size, white = known, black = hole; a mask with
transparency is read by its alpha, transparent = hole) returns JSON
``{"width", "height", "hole_percent", "seconds": {...}, "images": {"pconv", "ns",
"telea"}}`` with each result a base64 PNG; errors are JSON ``{"error": message}`` with a
4xx status, shown on the page.

Uploads are checked on the server: the whole request is capped by Flask's
``MAX_CONTENT_LENGTH``; the files are decoded in memory by Pillow, restricted to a few
formats, after their header's size is checked against the pixel limit (so a decompression
bomb is never decoded), and converted to tensors as files are
(:func:`train.images.image_from_pil`, so a 16-bit greyscale PNG keeps its levels); the
mask must have the image's size and at least one hole. Nothing the client sends is written
to disk or used as a path. The model is shared by Flask's threads and runs under a lock
(partial-convolution layers may cache per-shape data); the classical methods share no
state and run outside it.

Mask convention everywhere: 1 = known pixel, 0 = hole (in the mask file: white = known).
"""
from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from ..amp import check_inference_amp
from ..checkpoint import load_model, resolve_checkpoint
from ..images import IMAGE_FORMATS, image_from_pil, image_to_numpy, mask_from_pil
from ..inpaint import PADDING_MODES, inpaint, resolve_device
from . import AppError, add_device_arg, load_network, run_main

__all__ = ["UploadError", "create_app", "decode_upload", "encode_png", "build_parser", "main"]

PROG = "pconv-board"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
NETWORK_MAX_SIDE = 1024
# The project's image formats (train.images.IMAGE_FORMATS) that a browser can show, since
# the page paints on the photo: all but TIFF. Nothing that needs an outside program (EPS)
# or that is a container of other files.
UPLOAD_FORMATS = tuple(dict.fromkeys(f for f in IMAGE_FORMATS.values() if f != "TIFF"))

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent


class UploadError(ValueError):
    """A request the client must fix; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, what: str, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """Decode uploaded bytes into a Pillow image, in memory, EXIF orientation applied.

    The header is read first and a side above ``max_side`` is refused before any pixel is
    decoded. ``what`` names the upload in messages ("image", "mask").

    Raises:
        UploadError: empty data, not an image of :data:`UPLOAD_FORMATS`, too many pixels,
            or truncated / corrupt pixel data.
    """
    if not data:
        raise UploadError(f"the {what} file is empty")
    try:
        # Image.open reads only the header; the pixels are decoded by load(), after the
        # size check. (Pillow's own bomb check at open only warns below ~179 MP.)
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
            w, h = im.size
            if w < 1 or h < 1:
                raise UploadError(f"the {what} is empty ({w}x{h} pixels)")
            if w > max_side or h > max_side:
                raise UploadError(f"the {what} is {w}x{h} pixels; the limit is "
                                  f"{max_side}x{max_side}", status=413)
            im.load()
            try:
                return ImageOps.exif_transpose(im)
            except (ValueError, TypeError, KeyError, SyntaxError):
                return im.copy()  # broken EXIF must not reject good pixels
    except UploadError:
        raise
    except UnidentifiedImageError as exc:
        raise UploadError(f"the {what} file is not an image in a supported format "
                          f"({', '.join(UPLOAD_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UploadError(f"the {what} could not be decoded (truncated or corrupt): "
                          f"{exc}") from exc


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of an image ``[3, H, W]`` in [0, 1] (8 bits, lossless, so known pixels of
    an 8-bit input come back exactly)."""
    buffer = io.BytesIO()
    # Level 3: a fraction of the time of the default level for a few percent more bytes.
    Image.fromarray(image_to_numpy(image)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def create_app(model_or_checkpoint: nn.Module | str | os.PathLike, *, device: str = "auto",
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_image_side: int = MAX_IMAGE_SIDE,
               network_max_side: int | None = NETWORK_MAX_SIDE, padding: str = "reflect",
               amp: str = "off"):
    """The board's Flask app.

    Args:
        model_or_checkpoint: an inpainting model (used as is, switched to eval mode) or a
            checkpoint file or run folder (its newest checkpoint; loaded with
            :func:`train.checkpoint.load_model`).
        device: where a loaded checkpoint runs (``auto``: CUDA if available).
        max_upload_bytes: cap on a whole request (Flask's ``MAX_CONTENT_LENGTH``).
        max_image_side: largest width or height accepted, in pixels.
        network_max_side: the network runs at most at this longer side and its fill is
            pasted back at full size (keeps big photos interactive); ``None``: full size.
        padding, amp: see :func:`train.inpaint.inpaint`.

    Raises:
        ValueError: no model given, or a bad option.
        train.checkpoint.CheckpointError: the checkpoint is missing or does not fit.
    """
    try:
        from flask import Flask, jsonify, render_template, request
        from werkzeug.exceptions import HTTPException
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the mask board needs Flask: pip install flask (or pip install "
                          "'pconv[apps]')") from exc

    if model_or_checkpoint is None:
        raise ValueError("create_app needs a model or a checkpoint path (from pconv-train)")
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint.eval()
    else:
        model, _ = load_model(resolve_checkpoint(model_or_checkpoint), resolve_device(device))
    param = next(model.parameters(), None)
    check_inference_amp(param.device if param is not None else "cpu", amp)
    model_lock = threading.Lock()

    app = Flask(__name__, static_folder=str(_HERE / "static"),
                template_folder=str(_HERE / "templates"))
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.config["PCONV_MODEL"] = model

    class _MemoryRequest(app.request_class):
        # Werkzeug spools file parts above 500 KB to a temporary file; keep them in memory
        # instead: the whole request is capped above, and no upload ever touches the disk.
        def _get_file_stream(self, total_content_length, content_type, filename=None,
                             content_length=None):
            return io.BytesIO()

    app.request_class = _MemoryRequest

    def limit_text() -> str:
        return f"{max_upload_bytes / 2 ** 20:.3g} MB"

    @app.after_request
    def security_headers(response):
        # Everything comes from this server; inline code and outside hosts are refused.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.errorhandler(UploadError)
    def upload_error(exc: UploadError):
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(413)
    def too_large(exc):
        return jsonify(error=f"the upload is too large: the limit is {limit_text()} per "
                             "request"), 413

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if request.path.startswith("/api/"):
            return jsonify(error=f"{exc.code} {exc.name}: {exc.description}"), exc.code
        return exc

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        logger.exception("pconv-board: request failed")
        return jsonify(error=f"internal error while inpainting: {type(exc).__name__}: "
                             f"{exc}"), 500

    @app.get("/")
    def index():
        return render_template("board.html", max_bytes=max_upload_bytes,
                               max_side=max_image_side, limit_text=limit_text())

    @app.get("/api/health")
    def health():
        return jsonify(ok=True, model=type(model).__name__,
                       size_multiple=int(getattr(model, "size_multiple", 1)))

    @app.post("/api/inpaint")
    def inpaint_route():
        uploads = {}
        for field in ("image", "mask"):
            part = request.files.get(field)
            if part is None:
                raise UploadError(f"the request has no {field!r} file (send multipart form "
                                  "fields 'image' and 'mask')")
            uploads[field] = decode_upload(part.read(), field, max_image_side)
        photo, mask_im = uploads["image"], uploads["mask"]
        if photo.size != mask_im.size:
            raise UploadError(f"the mask is {mask_im.width}x{mask_im.height} pixels but the "
                              f"image is {photo.width}x{photo.height}; they must match")
        image, mask = image_from_pil(photo), mask_from_pil(mask_im)
        holes = float((mask < 0.5).float().mean())
        if holes == 0.0:
            raise UploadError("the mask has no hole: paint over the part to fill first")
        seconds, encoded = {}, {}
        for method in ("pconv", "ns", "telea"):
            start = time.perf_counter()
            if method == "pconv":
                with model_lock:
                    result = inpaint(model, image, mask, method="pconv", padding=padding,
                                     max_side=network_max_side, amp=amp)
            else:
                result = inpaint(None, image, mask, method=method)
            seconds[method] = round(time.perf_counter() - start, 3)
            encoded[method] = base64.b64encode(encode_png(result)).decode("ascii")
        return jsonify(width=photo.width, height=photo.height,
                       hole_percent=round(100.0 * holes, 2), seconds=seconds, images=encoded)

    return app


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``pconv-board``."""
    p = argparse.ArgumentParser(prog=PROG, description="Serve the mask board: a local web "
                                "page to paint a mask on a photo and inpaint it.")
    p.add_argument("--checkpoint", help="checkpoint written by pconv-train, or its run folder "
                                        "(the newest checkpoint); required")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000,
                   help="port (default: 8000; 0 = any free port)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2 ** 20,
                   help="largest request in MB (default: 10)")
    p.add_argument("--max-image-side", type=int, default=MAX_IMAGE_SIDE,
                   help="largest image width or height in pixels (default: 4096)")
    p.add_argument("--network-max-side", type=int, default=NETWORK_MAX_SIDE,
                   help="run the network at most at this longer side, 0 = full size "
                        "(default: 1024)")
    add_device_arg(p)
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pconv-board``: serve until interrupted; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args))


def _bind(app, host: str, port: int):
    """A Werkzeug server for ``app`` on a socket already bound to ``host:port``.

    Bound here rather than by ``app.run``, which prints its own lines and exits the process
    when the port is taken: a busy port or a bad address becomes an AppError, before any
    "serving on" line.
    """
    from werkzeug.serving import make_server, select_address_family

    try:
        listener = socket.create_server((host, port), family=select_address_family(host, port))
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise AppError(f"cannot listen on {host}:{port}: {reason}; choose another --port "
                       "(or --host)") from exc
    with listener:  # the server serves a duplicate of the socket
        # threaded: requests are served concurrently; the model runs under the app's lock.
        return make_server(host, port, app, threaded=True, fd=listener.fileno())


def _serve(app, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until Ctrl+C."""
    server = _bind(app, host, port)
    print(f"{PROG}: serving on http://{host}:{server.port}/ (Ctrl+C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"{PROG}: stopped", file=sys.stderr)
    finally:
        server.server_close()


def _run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise AppError(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_image_side < 1 or args.network_max_side < 0:
        raise AppError("--max-upload-mb and --max-image-side must be positive, "
                       "--network-max-side >= 0")
    model = load_network(args.checkpoint, args.device, amp=args.amp)
    try:
        app = create_app(model, max_upload_bytes=int(args.max_upload_mb * 2 ** 20),
                         max_image_side=args.max_image_side,
                         network_max_side=args.network_max_side or None, amp=args.amp)
    except ImportError as exc:
        raise AppError(str(exc)) from exc
    if not _is_loopback(args.host):
        print(f"{PROG}: warning: listening on {args.host}: anyone who can reach this "
              "address can use the board", file=sys.stderr)
    _serve(app, args.host, args.port)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
