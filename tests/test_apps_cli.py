"""pconv-inpaint (train/apps/inpaint_cli.py) on CPU with a tiny random checkpoint: files and
folders, mask matching, known pixels exact in the written files, and its error messages."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.apps.inpaint_cli import main
from train.checkpoint import build_model, save_checkpoint
from train.images import load_image, load_mask, save_image, save_mask

SAMPLES = Path(__file__).resolve().parents[1] / "train" / "samples"
from conftest import TINY_MODEL as SPEC  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _write_pair(folder: Path, name: str, h: int, w: int, seed: int, mask_name=None,
                mask_folder: Path | None = None):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g)
    mask = torch.ones(1, h, w)
    mask[:, h // 4: h // 2 + 1, w // 4: w // 2 + 1] = 0
    save_image(image, folder / name)
    if mask_folder is not None:
        save_mask(mask, mask_folder / (mask_name or Path(name).with_suffix(".png")))
    return image, mask


def _assert_known_exact(result_path: Path, input_path: Path, mask: torch.Tensor):
    result, original = load_image(result_path), load_image(input_path)
    known = (mask >= 0.5).expand_as(original)
    assert result.shape == original.shape
    assert torch.equal(result[known], original[known])
    assert not torch.equal(result[~known], original[~known])


def test_single_image_with_sample_mask(tmp_path, checkpoint, capsys):
    out = tmp_path / "filled.png"
    rc = main([str(SAMPLES / "city.jpg"), str(SAMPLES / "mask_strokes_30.png"), "-o", str(out),
               "--checkpoint", str(checkpoint)])
    assert rc == 0, capsys.readouterr().err
    _assert_known_exact(out, SAMPLES / "city.jpg", load_mask(SAMPLES / "mask_strokes_30.png"))
    err = capsys.readouterr().err
    assert "pconv-inpaint" in err and "wrote" in err  # progress bar and summary on stderr


def test_output_folder_for_single_image(tmp_path, checkpoint, capsys):
    mask = load_mask(SAMPLES / "mask_strokes_10.png")
    for out in (tmp_path, tmp_path / "new_folder"):
        rc = main([str(SAMPLES / "tiles.png"), str(SAMPLES / "mask_strokes_10.png"), "-o",
                   str(out), "--checkpoint", str(checkpoint), "--quiet"])
        assert rc == 0
        _assert_known_exact(out / "tiles.png", SAMPLES / "tiles.png", mask)
    rc = main([str(SAMPLES / "tiles.png"), str(SAMPLES / "mask_strokes_10.png"), "-o",
               str(tmp_path / "x.txt"), "--checkpoint", str(checkpoint)])
    assert rc == 1 and "neither a folder nor an image" in capsys.readouterr().err


def test_folder_of_mixed_sizes_matched_masks(tmp_path, checkpoint):
    images, masks, out = tmp_path / "img", tmp_path / "masks", tmp_path / "out"
    pairs = {
        "a.png": _write_pair(images, "a.png", 37, 53, 0, mask_folder=masks),
        "b.png": _write_pair(images, "b.png", 37, 53, 1, mask_folder=masks),
        "c.png": _write_pair(images, "c.png", 37, 53, 2, mask_folder=masks),
        "sub/d.png": _write_pair(images, "sub/d.png", 20, 31, 3, mask_name="sub/d.png",
                                 mask_folder=masks),
        # Matched by file name alone: the mask is not in the same sub-folder.
        "sub/e.png": _write_pair(images, "sub/e.png", 64, 16, 4, mask_name="e.png",
                                 mask_folder=masks),
    }
    rc = main([str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint),
               "--batch-size", "2", "--quiet"])
    assert rc == 0
    for name, (_, mask) in pairs.items():
        _assert_known_exact(out / name, images / name, mask)


def test_one_mask_for_a_folder_and_invert(tmp_path, checkpoint):
    images = tmp_path / "img"
    _, mask = _write_pair(images, "x.png", 33, 29, 0)
    _write_pair(images, "y.png", 33, 29, 1)
    inverted = tmp_path / "hole_white.png"
    save_mask(mask, inverted, invert=True)  # white = hole
    out = tmp_path / "out"
    rc = main([str(images), str(inverted), "-o", str(out), "--invert", "--checkpoint",
               str(checkpoint), "--quiet"])
    assert rc == 0
    for name in ("x.png", "y.png"):
        _assert_known_exact(out / name, images / name, mask)


@pytest.mark.parametrize("method", ["ns", "telea"])
def test_classical_methods_need_no_checkpoint(tmp_path, method):
    out = tmp_path / "o.png"
    rc = main([str(SAMPLES / "bricks.jpg"), str(SAMPLES / "mask_strokes_10.png"), "-o", str(out),
               "--method", method, "--quiet"])
    assert rc == 0
    _assert_known_exact(out, SAMPLES / "bricks.jpg", load_mask(SAMPLES / "mask_strokes_10.png"))


def test_max_side_and_hole_padding_options(tmp_path, checkpoint):
    out = tmp_path / "o.png"
    rc = main([str(SAMPLES / "wood.jpg"), str(SAMPLES / "mask_strokes_30.png"), "-o", str(out),
               "--checkpoint", str(checkpoint), "--max-side", "100", "--padding", "hole",
               "--quiet"])
    assert rc == 0
    _assert_known_exact(out, SAMPLES / "wood.jpg", load_mask(SAMPLES / "mask_strokes_30.png"))


def test_amp_option(tmp_path, checkpoint, capsys):
    """--amp bf16 inpaints with known pixels exact; --amp fp16 on the CPU is refused
    before any work, with the reason."""
    out = tmp_path / "o.png"
    args = [str(SAMPLES / "wood.jpg"), str(SAMPLES / "mask_strokes_30.png"), "-o", str(out),
            "--checkpoint", str(checkpoint), "--quiet", "--device", "cpu"]
    assert main(args + ["--amp", "bf16"]) == 0
    _assert_known_exact(out, SAMPLES / "wood.jpg", load_mask(SAMPLES / "mask_strokes_30.png"))
    out.unlink()
    capsys.readouterr()
    assert main(args + ["--amp", "fp16"]) == 1
    assert "'fp16' is for CUDA devices" in capsys.readouterr().err
    assert not out.exists()


def test_checkpoint_missing_or_wrong(tmp_path, checkpoint, capsys):
    args = [str(SAMPLES / "city.jpg"), str(SAMPLES / "mask_strokes_10.png"), "-o",
            str(tmp_path / "o.png"), "--quiet"]
    assert main(args) == 1
    assert "--checkpoint PATH is required" in capsys.readouterr().err
    assert main(args + ["--checkpoint", str(tmp_path / "nope.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main(args + ["--checkpoint", str(garbage)]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
    # Weights of a 4-level model under a 3-level description: does not match.
    mismatched = tmp_path / "mismatch.pt"
    other = build_model({**SPEC, "layers": 4})
    save_checkpoint(mismatched, {"model_spec": SPEC, "model": other.state_dict()})
    assert main(args + ["--checkpoint", str(mismatched)]) == 1
    assert "weights do not match" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_missing_files(tmp_path, checkpoint, capsys):
    rc = main([str(tmp_path / "none.jpg"), str(SAMPLES / "mask_strokes_10.png"), "-o",
               str(tmp_path / "o.png"), "--checkpoint", str(checkpoint)])
    assert rc == 1 and "input" in capsys.readouterr().err
    rc = main([str(SAMPLES / "city.jpg"), str(tmp_path / "none.png"), "-o",
               str(tmp_path / "o.png"), "--checkpoint", str(checkpoint)])
    assert rc == 1 and "mask" in capsys.readouterr().err


def test_mask_size_mismatch_and_resize_option(tmp_path, checkpoint, capsys):
    small = tmp_path / "small_mask.png"
    mask = torch.ones(1, 64, 64)
    mask[:, 10:30, 20:40] = 0
    save_mask(mask, small)
    out = tmp_path / "o.png"
    args = [str(SAMPLES / "city.jpg"), str(small), "-o", str(out), "--checkpoint",
            str(checkpoint), "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "64x64" in err and "256x256" in err and "--resize-mask" in err
    assert not out.exists()
    assert main(args + ["--resize-mask"]) == 0
    big = torch.nn.functional.interpolate(mask[None], size=(256, 256), mode="nearest-exact")[0]
    _assert_known_exact(out, SAMPLES / "city.jpg", big)


def test_unreadable_image_is_reported_and_others_done(tmp_path, checkpoint, capsys):
    images, masks, out = tmp_path / "img", tmp_path / "masks", tmp_path / "out"
    _, mask = _write_pair(images, "good.png", 24, 24, 0, mask_folder=masks)
    (images / "broken.jpg").write_bytes(b"this is text, not a JPEG")
    save_mask(mask, masks / "broken.png")
    good = (images / "good.png").read_bytes()
    (images / "cut.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    save_mask(mask, masks / "cut.png")
    rc = main([str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.jpg" in err and "cut.png" in err and "2 of 3 images failed" in err
    _assert_known_exact(out / "good.png", images / "good.png", mask)


def test_folder_without_masks_or_conflicting_outputs(tmp_path, checkpoint, capsys):
    images, masks = tmp_path / "img", tmp_path / "masks"
    _write_pair(images, "a.png", 16, 16, 0, mask_folder=masks)
    _write_pair(images, "b.png", 16, 16, 1)
    rc = main([str(images), str(masks), "-o", str(tmp_path / "out"), "--checkpoint",
               str(checkpoint)])
    err = capsys.readouterr().err
    assert rc == 1 and "no unique mask" in err and "b.png" in err
    _write_pair(images, "b.jpg", 16, 16, 2, mask_folder=masks)
    save_mask(torch.ones(1, 16, 16), masks / "b.png")
    rc = main([str(images), str(masks), "-o", str(tmp_path / "out"), "--checkpoint",
               str(checkpoint)])
    assert rc == 1 and "would both be written" in capsys.readouterr().err
    rc = main([str(images / "a.png"), str(masks), "-o", str(images / "a.png"), "--checkpoint",
               str(checkpoint)])
    assert rc == 1 and "overwrite" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([str(SAMPLES / "city.jpg"), str(SAMPLES / "mask_strokes_10.png"), "-o", "x.png",
              "--method", "magic"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([str(SAMPLES / "city.jpg")])
    assert exc.value.code == 2
