"""train.images: loading and saving images and masks, numpy conversions, bad files."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    check_image,
    find_images,
    image_from_numpy,
    image_to_numpy,
    is_image_file,
    load_image,
    load_mask,
    mask_from_numpy,
    mask_to_numpy,
    readable_images,
    save_image,
    save_mask,
)

SAMPLES = Path(__file__).resolve().parents[1] / "train" / "samples"


def quantised_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A random image whose values are exact 8-bit levels, so a PNG round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 255.0


def truncated_jpeg(path: Path) -> Path:
    save_image(quantised_image(64, 64), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ----------------------------------------------------------------------------- round trips


def test_png_round_trip_is_exact(tmp_path):
    x = quantised_image(17, 23)
    save_image(x, tmp_path / "deep" / "x.png")  # parent folders are created
    y = load_image(tmp_path / "deep" / "x.png")
    assert y.shape == (3, 17, 23) and y.dtype == torch.float32
    assert torch.equal(x, y)


@pytest.mark.parametrize("ext", [".jpg", ".JPEG", ".webp"])
def test_lossy_round_trip_is_close(tmp_path, ext):
    # Smooth content: lossy codecs keep it within a few levels.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    x = torch.stack([yy, xx, (yy + xx) / 2])
    save_image(x, tmp_path / f"x{ext}")
    y = load_image(tmp_path / f"x{ext}")
    assert y.shape == x.shape
    assert (y - x).abs().mean() < 0.02


def test_save_image_clamps_and_rounds(tmp_path):
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7]).view(1, 1, 5).expand(3, 1, 5)
    save_image(x, tmp_path / "c.png")
    got = np.asarray(Image.open(tmp_path / "c.png"))[0, :, 0]
    assert got.tolist() == [0, 0, 128, 255, 255]


def test_save_image_accepts_batch_of_one_and_rejects_others(tmp_path):
    x = quantised_image(8, 8)
    save_image(x[None], tmp_path / "a.png")
    assert torch.equal(load_image(tmp_path / "a.png"), x)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        save_image(torch.rand(2, 3, 8, 8), tmp_path / "b.png")
    with pytest.raises(ValueError):
        save_image(torch.rand(4, 8, 8), tmp_path / "b.png")


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)  # 10 high, 20 wide
    stored[0, 0] = (255, 0, 0)  # red at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    y = load_image(tmp_path / "o.png")
    assert y.shape == (3, 20, 10)
    # Clockwise rotation carries the top-left corner to the top-right.
    assert y[:, 0, -1].tolist() == [1.0, 0.0, 0.0]
    assert y[:, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_grey_rgba_palette_and_16bit_files_become_rgb(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey).save(tmp_path / "g.png")
    y = load_image(tmp_path / "g.png")
    assert y.shape == (3, 6, 8)
    assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])
    assert torch.equal(y[0], torch.from_numpy(grey).float() / 255)

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 200
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert torch.allclose(load_image(tmp_path / "a.png")[1], torch.full((4, 4), 200 / 255))

    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (3, 6, 8)

    deep = np.full((3, 5), 65535, np.uint16)
    deep[0, 0] = 0
    Image.fromarray(deep).save(tmp_path / "d.png")
    y = load_image(tmp_path / "d.png")
    assert y[:, 0, 0].tolist() == [0.0] * 3 and y[:, 1, 1].tolist() == [1.0] * 3


# ----------------------------------------------------------------------------- masks


def test_mask_file_conventions(tmp_path):
    grey = np.array([[0, 255], [100, 200]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "m.png")
    plain = load_mask(tmp_path / "m.png")
    assert plain.shape == (1, 2, 2) and plain.dtype == torch.float32
    assert plain[0].tolist() == [[0.0, 1.0], [0.0, 1.0]]  # white = known
    inverted = load_mask(tmp_path / "m.png", invert=True)
    assert inverted[0].tolist() == [[1.0, 0.0], [1.0, 0.0]]  # white = hole
    assert load_mask(tmp_path / "m.png", threshold=0.3)[0].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    soft = load_mask(tmp_path / "m.png", threshold=None)
    assert torch.allclose(soft[0], torch.from_numpy(grey).float() / 255)
    assert torch.allclose(load_mask(tmp_path / "m.png", invert=True, threshold=None), 1 - soft)


def test_colour_mask_file_uses_luminance(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert load_mask(tmp_path / "c.png")[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("invert", [False, True])
def test_mask_round_trip(tmp_path, invert):
    g = torch.Generator().manual_seed(1)
    m = (torch.rand(1, 19, 13, generator=g) > 0.3).float()
    save_mask(m, tmp_path / "m.png", invert=invert)
    stored = np.asarray(Image.open(tmp_path / "m.png"))
    assert stored.dtype == np.uint8 and stored.ndim == 2
    white = stored == 255
    assert np.array_equal(white, (m[0] == (0 if invert else 1)).numpy())
    assert torch.equal(load_mask(tmp_path / "m.png", invert=invert), m)
    assert torch.equal(load_mask(tmp_path / "m.png", invert=not invert), 1 - m)


def test_save_mask_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="mask"):
        save_mask(torch.ones(3, 4, 4), tmp_path / "m.png")


# ----------------------------------------------------------------------------- numpy


def test_numpy_image_conversions():
    x = quantised_image(5, 7)
    a = image_to_numpy(x)
    assert a.shape == (5, 7, 3) and a.dtype == np.uint8
    assert np.array_equal(a[..., 0], (x[0] * 255).round().numpy().astype(np.uint8))
    bgr = image_to_numpy(x, bgr=True)
    assert np.array_equal(bgr, a[..., ::-1])
    assert torch.equal(image_from_numpy(a), x)
    assert torch.equal(image_from_numpy(bgr, bgr=True), x)
    # The tensor does not alias the caller's array.
    b = a.copy()
    y = image_from_numpy(b)
    b[:] = 0
    assert torch.equal(y, x)
    grey = image_from_numpy(a[..., 0])
    assert grey.shape == (3, 5, 7) and torch.equal(grey[2], x[0])
    as_float = image_from_numpy(np.full((2, 2, 3), 1.5, np.float32))
    assert as_float.max().item() == 1.0
    with pytest.raises(ValueError):
        image_from_numpy(np.zeros((2, 2, 4), np.uint8))


def test_numpy_mask_conversions():
    m = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    a = mask_to_numpy(m)
    assert a.dtype == np.uint8 and a.tolist() == [[255, 0], [0, 255]]
    assert mask_to_numpy(m, invert=True).tolist() == [[0, 255], [255, 0]]
    assert torch.equal(mask_from_numpy(a), m)
    assert torch.equal(mask_from_numpy(255 - a, invert=True), m)
    assert torch.equal(mask_from_numpy(a.astype(bool)), m)
    assert torch.equal(mask_from_numpy(a[..., None]), m)
    with pytest.raises(ValueError):
        mask_from_numpy(np.zeros((2, 2, 3), np.uint8))


# ----------------------------------------------------------------------------- bad files


def test_truncated_jpeg_fails_to_load_with_its_path(tmp_path):
    path = truncated_jpeg(tmp_path / "cut.jpg")
    check_image(path)  # the header is intact: the cheap check passes
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.path == path and str(path) in str(info.value)
    with pytest.raises(ImageLoadError):
        check_image(path, full=True)


def test_non_image_and_missing_files_raise_image_load_error(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    for call in (load_image, load_mask, check_image):
        with pytest.raises(ImageLoadError, match="fake.png"):
            call(fake)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    assert issubclass(ImageLoadError, OSError)


def test_readable_images_drops_and_names_bad_files(tmp_path, caplog):
    good = tmp_path / "good.png"
    save_image(quantised_image(4, 4), good)
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\x00" * 100)
    cut = truncated_jpeg(tmp_path / "cut.jpg")
    with caplog.at_level(logging.WARNING, logger="train.images"):
        assert readable_images([good, fake, cut]) == [good, cut]
    assert str(fake) in caplog.text and str(cut) not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train.images"):
        assert readable_images([good, fake, cut], check="full") == [good]
    assert str(fake) in caplog.text and str(cut) in caplog.text
    assert readable_images([good, fake], check="none") == [good, fake]
    with pytest.raises(ValueError):
        readable_images([good], check="sometimes")


# ----------------------------------------------------------------------------- listing


def test_find_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    names = ["b/z.PNG", "a.jpg", "b/a.JpEg", "c/d/e.webp", "b.png", ".hidden.jpg", ".cache/x.png", "notes.txt", "x.gif"]
    for name in reversed(names):  # creation order must not matter
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.jpg", "b.png", "b/a.JpEg", "b/z.PNG", "c/d/e.webp"]
    assert all(is_image_file(n) for n in found)
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".webp"}
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- samples


def test_shipped_samples_load_and_stay_small():
    images = [p for p in find_images(SAMPLES) if not p.name.startswith("mask_")]
    assert 4 <= len(images) <= 8
    for path in images:
        x = load_image(path)
        assert x.shape == (3, 256, 256)
        assert x.std() > 0.05  # real content, not a flat fill
    total = sum(p.stat().st_size for p in SAMPLES.iterdir() if p.is_file())
    assert total < 1.5 * 1024 * 1024
    assert (SAMPLES / "SOURCES.md").is_file() and (SAMPLES / "make_samples.py").is_file()
    for name, ratio in (("mask_strokes_10.png", 0.10), ("mask_strokes_30.png", 0.30)):
        m = load_mask(SAMPLES / name)
        assert abs((1 - m).mean().item() - ratio) <= 0.005
