"""pconv-inpaint (train/apps/inpaint_cli.py) on CPU with a tiny random checkpoint: files and
folders, mask matching, known pixels exact in the written files, and its error messages."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


# --- checkpoints ----------------------------------------------------------------------


def _run_folder(tmp_path: Path, checkpoint: Path) -> Path:
    """A pconv-train run folder: an unreadable older checkpoint and the tiny one newest,
    so only taking the newest works."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_00000010.pt").write_bytes(b"an older, broken checkpoint")
    shutil.copy(checkpoint, folder / "step_00000020.pt")
    return tmp_path / "run"


def test_run_folder_as_checkpoint(tmp_path, checkpoint, capsys):
    run = _run_folder(tmp_path, checkpoint)
    out = tmp_path / "o.png"
    rc = main([str(SAMPLES / "tiles.png"), str(SAMPLES / "mask_strokes_10.png"), "-o", str(out),
               "--checkpoint", str(run), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    _assert_known_exact(out, SAMPLES / "tiles.png", load_mask(SAMPLES / "mask_strokes_10.png"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main([str(SAMPLES / "tiles.png"), str(SAMPLES / "mask_strokes_10.png"), "-o",
                 str(out), "--checkpoint", str(empty)]) == 1
    assert "no checkpoints" in capsys.readouterr().err


def test_missing_checkpoint_message_offers_the_classical_methods(tmp_path, capsys):
    assert main([str(SAMPLES / "tiles.png"), str(SAMPLES / "mask_strokes_10.png"), "-o",
                 str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint PATH is required" in err and "--method ns or --method telea" in err


# --- what is never overwritten or taken for an image ----------------------------------


def test_masks_are_never_overwritten(tmp_path, checkpoint, capsys):
    images, masks = tmp_path / "img", tmp_path / "masks"
    _write_pair(images, "a.png", 16, 16, 0, mask_folder=masks)
    mask_file = masks / "a.png"
    before = mask_file.read_bytes()
    base = ["--checkpoint", str(checkpoint), "--quiet"]
    assert main([str(images / "a.png"), str(mask_file), "-o", str(mask_file)] + base) == 1
    assert "would overwrite an input mask" in capsys.readouterr().err
    assert main([str(images), str(masks), "-o", str(masks)] + base) == 1
    assert "overwrite an input mask" in capsys.readouterr().err
    # Not a collision, but results inside the mask folder would be read as masks.
    assert main([str(images), str(masks), "-o", str(masks / "filled")] + base) == 1
    assert "lies in the mask folder" in capsys.readouterr().err
    assert main([str(images), str(masks), "-o", str(masks), "--ext", ".jpg"] + base) == 1
    assert "lies in the mask folder" in capsys.readouterr().err
    assert mask_file.read_bytes() == before and sorted(p.name for p in masks.iterdir()) == ["a.png"]


def test_images_and_masks_in_one_folder_need_a_suffix(tmp_path, checkpoint, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    _, city = _write_pair(data, "city.png", 24, 40, 0, mask_folder=data,
                          mask_name="city_mask.png")
    _, sub = _write_pair(data, "sub/road.jpg", 16, 16, 1, mask_folder=data,
                         mask_name="sub/road_mask.png")
    base = ["-o", str(out), "--checkpoint", str(checkpoint), "--quiet"]
    assert main([str(data), str(data)] + base) == 1
    err = capsys.readouterr().err
    assert "matched with itself" in err and "--mask-suffix _mask" in err
    assert not out.exists()
    assert main([str(data), str(data), "--mask-suffix", "_mask"] + base) == 0
    # Only the two photos were inpainted: the masks are not images to fill.
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["city.png", "sub/road.png"]
    _assert_known_exact(out / "city.png", data / "city.png", city)
    _assert_known_exact(out / "sub/road.png", data / "sub/road.jpg", sub)
    # One image of the folder, its mask found by the suffix.
    assert main([str(data / "city.png"), str(data), "--mask-suffix", "_mask", "-o",
                 str(tmp_path / "one.png"), "--checkpoint", str(checkpoint), "--quiet"]) == 0
    _assert_known_exact(tmp_path / "one.png", data / "city.png", city)
    assert main([str(data / "sub/road.jpg"), str(data), "--mask-suffix", "_mask", "-o",
                 str(tmp_path / "two.png"), "--checkpoint", str(checkpoint), "--quiet"]) == 0
    _assert_known_exact(tmp_path / "two.png", data / "sub/road.jpg", sub)
    assert main([str(data / "city.png"), str(data / "city_mask.png"), "--mask-suffix",
                 "_mask"] + base) == 1
    assert "--mask-suffix names the masks of a mask folder" in capsys.readouterr().err


def test_mask_folder_holding_the_image_folder(tmp_path, checkpoint, capsys):
    # data/photos/sub/a.png is an image file under data/ too, named like the mask data/a.png,
    # but never a mask, least of all its own.
    root, out = tmp_path / "data", tmp_path / "out"
    _, mask = _write_pair(root / "photos", "sub/a.png", 20, 20, 0, mask_folder=root,
                          mask_name="a.png")
    rc = main([str(root / "photos"), str(root), "-o", str(out), "--checkpoint", str(checkpoint),
               "--quiet"])
    assert rc == 0, capsys.readouterr().err
    _assert_known_exact(out / "sub/a.png", root / "photos" / "sub/a.png", mask)


def test_mask_folder_inside_the_image_folder_is_not_inpainted(tmp_path, checkpoint, capsys):
    photos, out = tmp_path / "photos", tmp_path / "out"
    _, mask = _write_pair(photos, "a.png", 20, 20, 0, mask_folder=photos / "masks")
    rc = main([str(photos), str(photos / "masks"), "-o", str(out), "--checkpoint",
               str(checkpoint), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.png")] == ["a.png"]
    # Nor a single mask file that lies among the images.
    hole = tmp_path / "more" / "hole.png"
    _write_pair(hole.parent, "b.png", 20, 20, 1)
    save_mask(mask, hole)
    rc = main([str(hole.parent), str(hole), "-o", str(tmp_path / "out2"), "--checkpoint",
               str(checkpoint), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out2").rglob("*.png")] == ["b.png"]


def test_output_folder_inside_the_input_folder(tmp_path, checkpoint, capsys):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    _, mask = _write_pair(photos, "a.png", 20, 20, 0, mask_folder=masks)
    args = [str(photos), str(masks), "-o", str(photos / "filled"), "--checkpoint",
            str(checkpoint), "--quiet"]
    assert main(args) == 0
    assert main(args) == 0, capsys.readouterr().err  # the first run's results are no inputs
    _assert_known_exact(photos / "filled" / "a.png", photos / "a.png", mask)
    assert not (photos / "filled" / "filled").exists()


def test_folder_input_refuses_an_image_file_name_as_output(tmp_path, checkpoint, capsys):
    images, masks = tmp_path / "img", tmp_path / "masks"
    _write_pair(images, "a.png", 16, 16, 0, mask_folder=masks)
    assert main([str(images), str(masks), "-o", str(tmp_path / "c.png"), "--checkpoint",
                 str(checkpoint)]) == 1
    assert "named like an image file" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


# --- interrupted runs -------------------------------------------------------------------


def test_skip_existing_resumes_a_folder_run(tmp_path, checkpoint, capsys):
    images, masks, out = tmp_path / "img", tmp_path / "masks", tmp_path / "out"
    pairs = {name: _write_pair(images, name, 20, 24, i, mask_folder=masks)
             for i, name in enumerate(("a.png", "b.png", "c.png"))}
    args = [str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint), "--quiet"]
    assert main(args) == 0
    (out / "b.png").unlink()
    marker = torch.zeros(3, 20, 24)
    save_image(marker, out / "a.png")  # an existing result is left alone, even a wrong one
    capsys.readouterr()
    assert main(args + ["--skip-existing"]) == 0
    err = capsys.readouterr().err
    assert "wrote 1 image to" in err and "2 existing results kept" in err
    assert torch.equal(load_image(out / "a.png"), marker)
    _assert_known_exact(out / "b.png", images / "b.png", pairs["b.png"][1])
    assert main(args + ["--skip-existing"]) == 0
    assert "nothing to do: all 3 results exist" in capsys.readouterr().err
    assert main(args) == 0  # without the option everything is redone
    _assert_known_exact(out / "a.png", images / "a.png", pairs["a.png"][1])


# --- masks that look wrong ------------------------------------------------------------


def test_masks_without_hole_or_mostly_hole_are_warned_about(tmp_path, checkpoint, capsys):
    images, masks, out = tmp_path / "img", tmp_path / "masks", tmp_path / "out"
    for name in ("full.png", "inverted.png", "fine.png"):
        save_image(torch.rand(3, 16, 16), images / name)
    save_mask(torch.ones(1, 16, 16), masks / "full.png")
    drawn_backwards = torch.zeros(1, 16, 16)
    drawn_backwards[:, 4:8, 4:8] = 1
    save_mask(drawn_backwards, masks / "inverted.png")
    fine = torch.ones(1, 16, 16)
    fine[:, 4:8, 4:8] = 0
    save_mask(fine, masks / "fine.png")
    args = [str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint), "--quiet"]
    assert main(args) == 0  # warnings, not errors
    err = capsys.readouterr().err
    assert "full.png has no hole" in err and "nothing to fill" in err
    assert "inverted.png is 94% hole; white = known here; did you mean --invert?" in err
    assert "fine.png" not in err
    assert torch.equal(load_image(out / "full.png"), load_image(images / "full.png"))
    assert main(args + ["--invert"]) == 0
    err = capsys.readouterr().err
    assert "fine.png is 94% hole" in err and "leave out --invert" in err


def test_one_mask_for_a_folder_is_checked_once(tmp_path, checkpoint, capsys):
    images = tmp_path / "img"
    for i in range(3):
        save_image(torch.rand(3, 16, 16), images / f"{i}.png")
    hole_everywhere = tmp_path / "black.png"
    save_mask(torch.zeros(1, 16, 16), hole_everywhere)
    assert main([str(images), str(hole_everywhere), "-o", str(tmp_path / "out"),
                 "--checkpoint", str(checkpoint), "--quiet"]) == 0
    assert capsys.readouterr().err.count("did you mean --invert?") == 1


# --- memory ---------------------------------------------------------------------------


def test_max_side_defaults_to_2048_and_0_means_no_limit(tmp_path, checkpoint, monkeypatch):
    import train.apps.inpaint_cli as cli

    seen, real = [], cli.inpaint

    def recording(*args, **kwargs):
        seen.append(kwargs["max_side"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "inpaint", recording)
    args = [str(SAMPLES / "tiles.png"), str(SAMPLES / "mask_strokes_10.png"), "-o",
            str(tmp_path / "o.png"), "--checkpoint", str(checkpoint), "--quiet"]
    assert main(args) == 0
    assert main(args + ["--max-side", "0"]) == 0
    assert seen == [2048, None]
    assert main(args + ["--max-side", "-1"]) == 1


def test_max_side_keeps_known_pixels_and_full_size(tmp_path, checkpoint):
    images, masks, out = tmp_path / "img", tmp_path / "masks", tmp_path / "out"
    _, mask = _write_pair(images, "big.png", 70, 90, 0, mask_folder=masks)
    assert main([str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint),
                 "--max-side", "24", "--quiet"]) == 0
    _assert_known_exact(out / "big.png", images / "big.png", mask)  # same size, known exact


def test_out_of_memory_is_a_per_image_error(tmp_path, checkpoint, monkeypatch, capsys):
    import train.apps.inpaint_cli as cli

    images, masks, out = tmp_path / "img", tmp_path / "masks", tmp_path / "out"
    _write_pair(images, "big1.png", 40, 40, 0, mask_folder=masks)
    _write_pair(images, "big2.png", 40, 40, 1, mask_folder=masks)
    _, small_mask = _write_pair(images, "small.png", 16, 16, 2, mask_folder=masks)
    real = cli.inpaint

    def runs_out_on_big_images(model, images, *args, **kwargs):
        if images.shape[-1] == 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(cli, "inpaint", runs_out_on_big_images)
    rc = main([str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint),
               "--quiet", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("out of memory inpainting") == 2 and "big1.png (40x40" in err
    assert "--max-side (now 2048)" in err and "--batch-size (now 2)" in err
    assert "2 of 3 images failed" in err
    _assert_known_exact(out / "small.png", images / "small.png", small_mask)
    assert not (out / "big1.png").exists()

    def cpu_allocator_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 99999999 bytes")

    monkeypatch.setattr(cli, "inpaint", cpu_allocator_fails)
    assert main([str(images / "small.png"), str(masks / "small.png"), "-o",
                 str(tmp_path / "o.png"), "--checkpoint", str(checkpoint), "--quiet"]) == 1
    assert "out of memory" in capsys.readouterr().err


# --- what the results lose ------------------------------------------------------------


def test_lossy_extension_is_warned_about_once(tmp_path, checkpoint, capsys):
    images, masks = tmp_path / "img", tmp_path / "masks"
    for i, name in enumerate(("a.png", "b.png")):
        _write_pair(images, name, 16, 16, i, mask_folder=masks)
    assert main([str(images), str(masks), "-o", str(tmp_path / "out"), "--ext", ".jpg",
                 "--checkpoint", str(checkpoint), "--quiet"]) == 0
    assert capsys.readouterr().err.count(".jpg is a lossy format") == 1
    assert main([str(images), str(masks), "-o", str(tmp_path / "png"), "--checkpoint",
                 str(checkpoint), "--quiet"]) == 0
    assert "lossy format" not in capsys.readouterr().err


def test_16_bit_inputs_are_warned_about_once(tmp_path, checkpoint, capsys):
    images, masks = tmp_path / "img", tmp_path / "masks"
    for name in ("a.png", "b.png"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(images / name)
        mask = torch.ones(1, 16, 16)
        mask[:, 4:8, 4:8] = 0
        save_mask(mask, masks / name)
    assert main([str(images), str(masks), "-o", str(tmp_path / "out"), "--checkpoint",
                 str(checkpoint), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("more than 8 bits per channel") == 1 and "not repeated" in err
    # The levels are kept to 8 bits, not clipped.
    assert torch.equal(load_image(tmp_path / "out" / "a.png")[:, 0, 0],
                       torch.full((3,), round(40000 / 65535 * 255) / 255))


def test_transparency_is_kept_where_the_format_can(tmp_path, checkpoint, capsys):
    images, masks = tmp_path / "img", tmp_path / "masks"
    _, mask = _write_pair(images, "x.png", 20, 24, 0, mask_folder=masks)
    rgba = np.array(Image.open(images / "x.png").convert("RGBA"))
    rgba[:5, :, 3] = 0  # a transparent band along the top
    Image.fromarray(rgba).save(images / "x.png")
    args = [str(images), str(masks), "--checkpoint", str(checkpoint), "--quiet"]
    assert main(args + ["-o", str(tmp_path / "out")]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "x.png"))
    assert written.shape == (20, 24, 4) and np.array_equal(written[..., 3], rgba[..., 3])
    _assert_known_exact(tmp_path / "out" / "x.png", images / "x.png", mask)
    assert "has transparency" not in capsys.readouterr().err
    assert main(args + ["-o", str(tmp_path / "jpg"), "--ext", ".jpg"]) == 0
    assert "has transparency, which .jpg files cannot keep" in capsys.readouterr().err


# --- formats, options -----------------------------------------------------------------


def test_folder_takes_every_image_format_and_counts_other_files(tmp_path, checkpoint, capsys):
    images, masks, out = tmp_path / "img", tmp_path / "masks", tmp_path / "out"
    pairs = {name: _write_pair(images, name, 16, 20, i, mask_folder=masks)
             for i, name in enumerate(("a.tif", "b.bmp", "c.png"))}
    (images / "notes.txt").write_text("not an image")
    (images / "raw.cr2").write_bytes(b"raw")
    rc = main([str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    for name, (_, mask) in pairs.items():
        _assert_known_exact(out / Path(name).with_suffix(".png"), images / name, mask)
    assert "skipped 2 file(s)" in err and ".cr2, .txt" in err and ".tif" in err


def test_radius_reaches_the_classical_methods(tmp_path):
    results = []
    for radius in ("1", "15"):
        out = tmp_path / f"r{radius}.png"
        assert main([str(SAMPLES / "bricks.jpg"), str(SAMPLES / "mask_strokes_30.png"), "-o",
                     str(out), "--method", "telea", "--radius", radius, "--quiet"]) == 0
        results.append(load_image(out))
    assert not torch.equal(results[0], results[1])
    assert main([str(SAMPLES / "bricks.jpg"), str(SAMPLES / "mask_strokes_30.png"), "-o",
                 str(tmp_path / "o.png"), "--method", "ns", "--radius", "0"]) == 1
