"""train.images: loading and saving images and masks, numpy conversions, bad files."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.images import (
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    ImageLoadError,
    check_image,
    find_images,
    find_non_images,
    image_from_numpy,
    image_from_pil,
    image_to_numpy,
    is_image_file,
    is_lossless,
    keeps_alpha,
    load_image,
    load_mask,
    mask_from_numpy,
    mask_from_pil,
    mask_to_numpy,
    read_image,
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


@pytest.mark.parametrize("save", [lambda path: save_image(quantised_image(8, 8, 2), path),
                                  lambda path: save_mask(torch.zeros(1, 8, 8), path)])
def test_interrupted_save_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch, save):
    path = tmp_path / "x.png"
    old = quantised_image(8, 8, seed=1)
    save_image(old, path)

    def killed_mid_write(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half an image")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", killed_mid_write)
        with pytest.raises(KeyboardInterrupt):
            save(path)
        with pytest.raises(KeyboardInterrupt):
            save(tmp_path / "new.png")
    assert torch.equal(load_image(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left


def test_saved_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    save_image(quantised_image(4, 4), tmp_path / "x.png")
    save_mask(torch.ones(1, 4, 4), tmp_path / "m.png")
    for name in ("x.png", "m.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_save_image_with_alpha(tmp_path):
    x = quantised_image(6, 9)
    alpha = (torch.arange(54).view(1, 6, 9) % 3).float() / 2  # 0, 0.5, 1
    save_image(x, tmp_path / "a.png", alpha=alpha)
    stored = np.asarray(Image.open(tmp_path / "a.png"))
    assert stored.shape == (6, 9, 4)
    assert np.array_equal(stored[..., 3], (alpha[0] * 255).round().numpy().astype(np.uint8))
    back = read_image(tmp_path / "a.png")
    assert torch.equal(back.image, x)  # the colour under transparent pixels is kept
    assert torch.allclose(back.alpha, alpha, atol=0.5 / 255)
    with pytest.raises(ValueError, match="alpha"):
        save_image(x, tmp_path / "a.jpg", alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        save_image(x, tmp_path / "b.png", alpha=alpha[:, :3])
    assert keeps_alpha("a.PNG") and keeps_alpha("a.tif") and not keeps_alpha("a.jpg")
    assert is_lossless("a.png") and is_lossless("a.TIFF") and is_lossless("a.bmp")
    assert not any(is_lossless(f"a{ext}") for ext in (".jpg", ".jpeg", ".webp", ".gif"))


def test_read_image_reports_alpha_and_depth(tmp_path):
    rgb = quantised_image(5, 7)
    save_image(rgb, tmp_path / "plain.png")
    plain = read_image(tmp_path / "plain.png")
    assert torch.equal(plain.image, rgb) and plain.alpha is None and not plain.deep
    rgba = np.dstack([image_to_numpy(rgb), np.full((5, 7), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert read_image(tmp_path / "opaque.png").alpha is None  # fully opaque: no alpha
    Image.fromarray(np.full((5, 7), 40000, np.uint16)).save(tmp_path / "grey16.png")
    deep = read_image(tmp_path / "grey16.png")
    assert deep.deep and torch.allclose(deep.image, torch.full((3, 5, 7), 40000 / 65535))
    cv2 = pytest.importorskip("cv2")
    colour16 = np.random.default_rng(0).integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "colour16.png"), colour16)
    assert read_image(tmp_path / "colour16.png").deep  # Pillow decodes it to 8 bits


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


def test_image_from_pil_is_what_load_image_uses(tmp_path):
    deep = Image.fromarray(np.array([[0, 257 * 100], [65535, 30000]], np.uint16))
    assert deep.mode.startswith("I;16")
    y = image_from_pil(deep)
    assert y.shape == (3, 2, 2)
    assert torch.allclose(y[0], torch.tensor([[0.0, 100 / 255], [1.0, 30000 / 65535]]))
    deep.save(tmp_path / "d.png")
    assert torch.equal(load_image(tmp_path / "d.png"), y)


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


def test_transparent_mask_pixels_are_holes(tmp_path):
    # An erased copy of a photo: colours everywhere (black under the erased part, as
    # editors store it), transparency where the object was.
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = 255
    rgba[1:3, 2:5] = (0, 0, 0, 0)
    rgba[0, 0] = (0, 0, 0, 255)  # a black but opaque pixel: known, the colour is ignored
    Image.fromarray(rgba).save(tmp_path / "erased.png")
    expected = torch.ones(1, 4, 6)
    expected[:, 1:3, 2:5] = 0
    assert torch.equal(load_mask(tmp_path / "erased.png"), expected)
    assert torch.equal(load_mask(tmp_path / "erased.png", invert=True), 1 - expected)
    assert torch.equal(mask_from_pil(Image.open(tmp_path / "erased.png")), expected)
    # Fully opaque: the alpha says nothing, the luminance is used as before.
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    luminance = torch.ones(1, 4, 6)
    luminance[:, 1:3, 2:5] = 0
    luminance[:, 0, 0] = 0
    assert torch.equal(load_mask(tmp_path / "opaque.png"), luminance)
    # Palette transparency counts too.
    grey = Image.fromarray(np.where(expected[0].numpy() > 0, 200, 7).astype(np.uint8)).convert("P")
    grey.info["transparency"] = grey.getpixel((2, 1))
    grey.save(tmp_path / "palette.png", transparency=grey.info["transparency"])
    assert torch.equal(load_mask(tmp_path / "palette.png"), expected)


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
    names = ["b/z.PNG", "a.jpg", "b/a.JpEg", "c/d/e.webp", "b.png", ".hidden.jpg", ".cache/x.png",
             "notes.txt", "x.gif", "scan.TIF", "y.tiff", "old.bmp", "c/readme"]
    for name in reversed(names):  # creation order must not matter
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.jpg", "b.png", "b/a.JpEg", "b/z.PNG", "c/d/e.webp", "old.bmp",
                     "scan.TIF", "x.gif", "y.tiff"]
    assert all(is_image_file(n) for n in found)
    others = [p.relative_to(tmp_path).as_posix() for p in find_non_images(tmp_path)]
    assert others == ["c/readme", "notes.txt"]
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "nowhere")


def test_one_list_of_image_extensions():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif",
                                     ".tiff"}
    assert set(IMAGE_FORMATS) == set(IMAGE_EXTENSIONS)
    registered = Image.registered_extensions()
    assert all(registered[ext] == fmt for ext, fmt in IMAGE_FORMATS.items())


def test_find_images_leaves_out_excluded_sub_folders(tmp_path, monkeypatch):
    for name in ("a.png", "out/a.png", "out/deep/b.png", "masks/a.png", "keep/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_images(tmp_path, exclude=[tmp_path / "out", str(tmp_path / "masks")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png", "keep/c.png"]
    # The root itself is never left out, and a relative spelling of a folder counts.
    assert len(find_images(tmp_path / "out", exclude=[tmp_path / "out"])) == 2
    monkeypatch.chdir(tmp_path)
    assert len(find_images(tmp_path, exclude=["out", "masks", "keep"])) == 1


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
