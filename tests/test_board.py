"""The mask board's server (train/apps/board.py) through Flask's test client: the page,
good requests, bad uploads, limits, concurrency, and the command line."""
from __future__ import annotations

import base64
import io
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("flask")
import werkzeug.formparser  # noqa: E402
import werkzeug.serving  # noqa: E402
import werkzeug.test  # noqa: E402
from werkzeug.datastructures import FileStorage  # noqa: E402

from train.apps import board  # noqa: E402
from train.apps.board import create_app, decode_upload  # noqa: E402
from train.checkpoint import CheckpointError, build_model, save_checkpoint  # noqa: E402
from train.images import IMAGE_FORMATS  # noqa: E402

from conftest import TINY_MODEL as SPEC  # noqa: E402
SAMPLES = Path(__file__).resolve().parents[1] / "train" / "samples"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(SPEC).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"model_spec": SPEC, "model": model.state_dict()})
    return path


@pytest.fixture(scope="module")
def client(model):
    return create_app(model).test_client()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _photo(h=37, w=53, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h=37, w=53, box=(10, 20, 15, 30)) -> np.ndarray:
    """White = known, black = hole (the board's mask file), hole rows/cols ``box``."""
    mask = np.full((h, w), 255, dtype=np.uint8)
    r0, r1, c0, c1 = box
    mask[r0:r1, c0:c1] = 0
    return mask


def _post(client, image: bytes | None, mask: bytes | None, name="photo.png"):
    data = {}
    if image is not None:
        data["image"] = (io.BytesIO(image), name)
    if mask is not None:
        data["mask"] = (io.BytesIO(mask), "mask.png")
    return client.post("/api/inpaint", data=data, content_type="multipart/form-data")


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _check_result(response, photo: np.ndarray, mask: np.ndarray):
    assert response.status_code == 200, response.get_json()
    data = response.get_json()
    assert (data["width"], data["height"]) == (photo.shape[1], photo.shape[0])
    assert set(data["images"]) == {"pconv", "ns", "telea"}
    known = mask >= 128
    for method, b64 in data["images"].items():
        result = _decode(b64)
        assert result.shape == photo.shape, method
        assert np.array_equal(result[known], photo[known]), method  # known pixels exact
        assert not np.array_equal(result[~known], photo[~known]), method
    assert data["hole_percent"] == pytest.approx(100 * (~known).mean(), abs=0.01)
    return data


def test_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for element in ('id="file"', 'id="size"', 'id="eraser"', 'id="undo"', 'id="clear"',
                    'id="inpaint"', 'id="strokes"', 'id="download"', 'id="result-ns"',
                    'id="result-telea"'):
        assert element in html
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/") for a in assets if not a.startswith("#"))
    for asset in assets:
        with client.get(asset) as body:
            assert body.status_code == 200, asset
            # Works offline: no outside host is ever referenced (an SVG's xmlns is a
            # name, not a fetch).
            text = re.sub(r'xmlns="[^"]*"', "", body.get_data(as_text=True))
        assert not re.search(r"https?://", text), asset
    assert "<script>" not in html  # no inline code (the CSP forbids it)


def test_inpaint_png(client):
    photo, mask = _photo(), _mask()
    data = _check_result(_post(client, _png(photo), _png(mask)), photo, mask)
    assert set(data["seconds"]) == {"pconv", "ns", "telea"}


def test_inpaint_jpeg_and_rgba_mask(client):
    photo = _photo(64, 48, seed=1)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    mask = _mask(64, 48, (5, 40, 5, 20))
    # A canvas export: RGBA, opaque.
    rgba = np.dstack([mask, mask, mask, np.full_like(mask, 255)])
    _check_result(_post(client, buffer.getvalue(), _png(rgba), "p.jpg"), decoded, mask)


def test_exif_orientation_is_applied(client):
    photo = _photo(20, 30)
    image = Image.fromarray(photo)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    # The browser shows (and the canvas is sized) upright: 20 wide, 30 high.
    response = _post(client, buffer.getvalue(), _png(_mask(30, 20, (5, 10, 5, 10))))
    assert response.status_code == 200, response.get_json()
    assert (response.get_json()["width"], response.get_json()["height"]) == (20, 30)


@pytest.mark.parametrize("payload, message", [
    (b"", "empty"),
    (b"hello, I am a text file", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image"),
])
def test_not_an_image(client, payload, message):
    response = _post(client, payload, _png(_mask()))
    assert response.status_code == 400
    assert message in response.get_json()["error"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(client, fmt):
    buffer = io.BytesIO()
    Image.fromarray(_photo(64, 64)).save(buffer, format=fmt)
    data = buffer.getvalue()
    response = _post(client, data[: len(data) // 2], _png(_mask(64, 64)))
    assert response.status_code == 400
    assert "could not be decoded" in response.get_json()["error"]


def test_unsupported_format(client):
    buffer = io.BytesIO()
    Image.fromarray(_photo()).save(buffer, format="TIFF")
    response = _post(client, buffer.getvalue(), _png(_mask()))
    assert response.status_code == 400 and "supported format" in response.get_json()["error"]


def test_request_too_large(model):
    small = create_app(model, max_upload_bytes=20_000).test_client()
    response = _post(small, b"\x00" * 30_000, _png(_mask()))
    assert response.status_code == 413
    assert "too large" in response.get_json()["error"]
    assert "MB" in response.get_json()["error"]


def test_too_many_pixels(client, model):
    # Tiny files with huge headers: refused before any pixel is decoded.
    wide = _png(np.zeros((1, 4097, 3), dtype=np.uint8))
    response = _post(client, wide, _png(np.zeros((1, 4097), dtype=np.uint8)))
    assert response.status_code == 413
    assert "4097x1" in response.get_json()["error"] and "4096x4096" in response.get_json()["error"]
    small = create_app(model, max_image_side=32).test_client()
    response = _post(small, _png(_photo()), _png(_mask()))
    assert response.status_code == 413 and "53x37" in response.get_json()["error"]


def test_mask_problems(client):
    photo = _png(_photo())
    response = _post(client, photo, _png(_mask(36, 53)))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert "53x36" in error and "53x37" in error and "match" in error
    response = _post(client, photo, _png(np.full((37, 53), 255, dtype=np.uint8)))
    assert response.status_code == 400 and "no hole" in response.get_json()["error"]
    response = _post(client, photo, b"garbage")
    assert response.status_code == 400 and "mask" in response.get_json()["error"]
    response = _post(client, photo, None)
    assert response.status_code == 400 and "'mask'" in response.get_json()["error"]
    response = _post(client, None, _png(_mask()))
    assert response.status_code == 400 and "'image'" in response.get_json()["error"]


def test_api_errors_are_json(client):
    missing = client.get("/api/nothing")
    assert missing.status_code == 404 and "error" in missing.get_json()
    wrong = client.get("/api/inpaint")
    assert wrong.status_code == 405 and "error" in wrong.get_json()
    assert client.get("/api/health").get_json()["size_multiple"] == 8


def test_uploads_never_touch_the_disk(client, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    # Werkzeug's form parser spools big file parts with its own import of
    # SpooledTemporaryFile; the board must never get there.
    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    # Noise does not compress: well above Werkzeug's 500 KB spooling threshold.
    photo, mask = _photo(420, 420, seed=3), _mask(420, 420, (100, 200, 100, 300))
    data = _png(photo)
    assert len(data) > 500 * 1024
    # The body is encoded here, in memory: the test client would spool a request this
    # big to a temporary file of its own (and leave it open).
    boundary, body = werkzeug.test.encode_multipart({
        "image": FileStorage(io.BytesIO(data), "photo.png"),
        "mask": FileStorage(io.BytesIO(_png(mask)), "mask.png")})
    response = client.post("/api/inpaint", data=body,
                           content_type=f"multipart/form-data; boundary={boundary}")
    _check_result(response, photo, mask)


def test_concurrent_requests_are_safe(model):
    app = create_app(model)
    active, overlaps = [0], []
    forward = type(model).forward
    lock = threading.Lock()

    def watched(self, *args):
        with lock:
            active[0] += 1
            overlaps.append(active[0])
        time.sleep(0.02)  # widen the window in which a second call could sneak in
        try:
            return forward(self, *args)
        finally:
            with lock:
                active[0] -= 1

    photo, mask = _photo(40, 40, seed=5), _mask(40, 40, (5, 25, 5, 25))
    results, errors = [], []

    def worker():
        try:
            response = _post(app.test_client(), _png(photo), _png(mask))
            results.append(response.get_json()["images"]["pconv"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "forward", watched)
        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors and len(results) == 6
    assert max(overlaps) == 1  # the shared model never ran twice at once
    assert len(set(results)) == 1  # and every request got the same answer


def test_amp_bf16_board_and_fp16_refused_on_cpu(model):
    photo, mask = _photo(), _mask()
    client = create_app(model, amp="bf16").test_client()
    _check_result(_post(client, _png(photo), _png(mask)), photo, mask)
    with pytest.raises(ValueError, match="'fp16' is for CUDA devices"):
        create_app(model, amp="fp16")


def test_create_app_needs_a_model(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="needs a model"):
        create_app(None)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        create_app(tmp_path / "missing.pt")
    app = create_app(checkpoint)
    assert app.config["PCONV_MODEL"].training is False


def test_decode_upload_limits():
    with pytest.raises(board.UploadError) as exc:
        decode_upload(_png(_photo(10, 70)), "image", max_side=64)
    assert exc.value.status == 413
    assert decode_upload(_png(_photo(10, 64)), "image", max_side=64).size == (64, 10)


@pytest.fixture
def served(monkeypatch):
    """The servers the board started: ``(host, port, threaded)``; each returns at once
    instead of serving."""
    calls = []

    def serve_forever(self, *args, **kwargs):
        calls.append((self.host, self.port, self.multithread))

    monkeypatch.setattr(werkzeug.serving.BaseWSGIServer, "serve_forever", serve_forever)
    return calls


def test_board_cli(checkpoint, tmp_path, served, capsys):
    assert board.main([]) == 1
    err = capsys.readouterr().err
    # The board has no classical method to offer instead.
    assert "--checkpoint PATH is required" in err and "classical" not in err
    assert "--method" not in err
    assert board.main(["--checkpoint", str(tmp_path / "x.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert board.main(["--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu"]) == 0
    [(host, port, threaded)] = served
    assert host == "127.0.0.1" and port > 0 and threaded
    assert f"serving on http://127.0.0.1:{port}/" in capsys.readouterr().err


def test_board_cli_warns_when_listening_beyond_this_machine(checkpoint, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(board, "_serve", lambda app, host, port: calls.append((host, port)))
    assert board.main(["--checkpoint", str(checkpoint), "--host", "0.0.0.0"]) == 0
    assert calls == [("0.0.0.0", 8000)]
    assert "warning" in capsys.readouterr().err


def test_board_cli_busy_port_is_a_clear_error(checkpoint, served, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert board.main(["--checkpoint", str(checkpoint), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert "serving on" not in err and served == []


def test_run_folder_as_checkpoint(model, tmp_path, served, capsys):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_00000010.pt").write_bytes(b"an older, broken checkpoint")
    save_checkpoint(folder / "step_00000020.pt", {"model_spec": SPEC, "model": model.state_dict()})
    app = create_app(tmp_path / "run")
    assert type(app.config["PCONV_MODEL"]) is type(model)
    assert board.main(["--checkpoint", str(tmp_path / "run"), "--port", "0"]) == 0, \
        capsys.readouterr().err
    assert len(served) == 1


def test_16_bit_greyscale_upload_keeps_its_levels(client):
    levels = np.random.default_rng(4).integers(0, 256, (37, 53)).astype(np.uint8)
    # 16-bit levels that are exactly the 8-bit ones (65535 = 255 * 257).
    upload = _png(levels.astype(np.uint16) * 257)
    assert Image.open(io.BytesIO(upload)).mode == "I;16"
    photo = np.repeat(levels[:, :, None], 3, axis=2)
    _check_result(_post(client, upload, _png(_mask())), photo, _mask())


def test_transparent_mask_upload_marks_the_holes(client):
    photo, mask = _photo(), _mask()
    # Everything white, the hole only in the alpha channel.
    rgba = np.dstack([np.full_like(mask, 255)] * 3 + [mask])
    _check_result(_post(client, _png(photo), _png(rgba)), photo, mask)


def test_upload_formats_come_from_the_shared_list():
    assert set(board.UPLOAD_FORMATS) == set(IMAGE_FORMATS.values()) - {"TIFF"}
