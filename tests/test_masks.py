"""train.masks: the free-form generator, mask files and their augmentation, buckets."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from train.images import save_mask
from train.masks import (
    NVIDIA_TEST_MASKS_INVERT,
    PAPER_BUCKETS,
    RANDOM_RATIO_RANGE,
    REPORT_RATIOS,
    FreeFormMasks,
    MaskFolder,
    as_rng,
    bucket_label,
    bucket_of,
    dilate_holes,
    eval_masks_from_folder,
    generate_mask,
    group_by_bucket,
    hole_ratio,
    make_eval_masks,
    resize_mask,
    rotate_mask,
)


def is_binary(m: torch.Tensor) -> bool:
    return bool(((m == 0) | (m == 1)).all())


# ----------------------------------------------------------------------------- generator

RATIOS = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]


@pytest.mark.parametrize("tolerance", [0.02, 0.005])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_generator_hits_ratio_within_tolerance(size, tolerance):
    errors = []
    for ratio in RATIOS:
        for seed in range(8):
            m = generate_mask(*size, hole_ratio=ratio, tolerance=tolerance, rng=seed)
            assert m.shape == (1, *size) and m.dtype == torch.float32 and is_binary(m)
            errors.append(hole_ratio(m) - ratio)
    errors = np.array(errors)
    assert np.abs(errors).max() <= tolerance + 1e-12
    # Centred on the target, not piled up at the low edge of the band.
    assert abs(errors.mean()) < tolerance / 2


def test_generator_exact_ratio_with_zero_tolerance():
    m = generate_mask(32, 32, hole_ratio=0.25, tolerance=0.0, rng=3)
    assert (m == 0).sum().item() == 256


def test_generator_is_a_pure_function_of_the_seed():
    a = generate_mask(40, 40, 0.3, rng=5)
    assert torch.equal(a, generate_mask(40, 40, 0.3, rng=5))
    assert torch.equal(a, generate_mask(40, 40, 0.3, rng=np.random.default_rng(5)))
    assert not torch.equal(a, generate_mask(40, 40, 0.3, rng=6))
    # Global random state plays no part.
    np.random.seed(123)
    torch.manual_seed(123)
    assert torch.equal(a, generate_mask(40, 40, 0.3, rng=5))


def test_random_ratio_spans_the_paper_range():
    ratios = [hole_ratio(generate_mask(48, 48, None, rng=s)) for s in range(40)]
    lo, hi = RANDOM_RATIO_RANGE
    assert all(lo - 0.02 <= r <= hi + 0.02 for r in ratios)
    hit = {bucket_of(r) for r in ratios} - {None}
    assert len(hit) >= 5  # not stuck in one bucket


def test_generator_makes_strokes_not_noise():
    # Holes come as a few thick shapes: most hole pixels have hole neighbours.
    m = generate_mask(96, 96, 0.2, rng=0)[0]
    hole = m == 0
    inner = hole[1:-1, 1:-1] & hole[:-2, 1:-1] & hole[2:, 1:-1] & hole[1:-1, :-2] & hole[1:-1, 2:]
    assert inner.sum() > 0.6 * hole.sum()


def test_generator_edge_cases_and_errors():
    assert torch.equal(generate_mask(5, 6, 0.0, rng=0), torch.ones(1, 5, 6))
    assert torch.equal(generate_mask(5, 6, 1.0, rng=0), torch.zeros(1, 5, 6))
    # A tiny target with a wide tolerance still gets at least one hole.
    assert hole_ratio(generate_mask(32, 32, 0.005, tolerance=0.02, rng=0)) > 0
    with pytest.raises(ValueError, match="hole_ratio"):
        generate_mask(8, 8, 1.5)
    with pytest.raises(ValueError, match="tolerance"):
        generate_mask(8, 8, 0.3, tolerance=-0.1)
    with pytest.raises(ValueError, match="tolerance"):
        generate_mask(10, 10, 0.305, tolerance=0.0)  # 30.5 hole pixels do not exist
    with pytest.raises(ValueError):
        generate_mask(0, 8, 0.3)


def test_free_form_source_and_ranges():
    source = FreeFormMasks(hole_ratio=(0.2, 0.4), tolerance=0.01)
    ratios = [hole_ratio(source(32, 40, np.random.default_rng(s))) for s in range(10)]
    assert all(0.19 <= r <= 0.41 for r in ratios) and max(ratios) - min(ratios) > 0.05
    fixed = FreeFormMasks(hole_ratio=0.1, tolerance=0.01)
    m = fixed(30, 20, 4)
    assert m.shape == (1, 30, 20) and abs(hole_ratio(m) - 0.1) <= 0.01
    assert torch.equal(m, fixed(30, 20, 4))
    assert isinstance(as_rng(None), np.random.Generator)


# ----------------------------------------------------------------------------- augmentation


def test_dilate_holes_grows_a_hole_by_half_the_window():
    m = torch.ones(1, 9, 9)
    m[0, 4, 4] = 0
    for size in (1, 3, 5):
        d = dilate_holes(m, size)
        r = size // 2
        expected = torch.ones(1, 9, 9)
        expected[0, 4 - r : 5 + r, 4 - r : 5 + r] = 0
        assert torch.equal(d, expected)
    assert torch.equal(m[0, 4, 4], torch.tensor(0.0))  # the input is untouched
    with pytest.raises(ValueError):
        dilate_holes(m, 4)


def test_rotate_mask_matches_rot90_and_fills_corners_as_known():
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(1, 12, 12, generator=g) > 0.5).float()
    assert torch.equal(rotate_mask(m, 90), torch.rot90(m, 1, dims=(1, 2)))
    assert torch.equal(rotate_mask(m, 0), m)
    all_hole = rotate_mask(torch.zeros(1, 32, 32), 45)
    assert is_binary(all_hole)
    assert all_hole[0, 0, 0] == 1 and all_hole[0, 16, 16] == 0


def test_resize_mask_stays_binary():
    m = generate_mask(40, 40, 0.3, rng=1)
    r = resize_mask(m, 57, 23)
    assert r.shape == (1, 57, 23) and is_binary(r)
    assert abs(hole_ratio(r) - hole_ratio(m)) < 0.05


# ----------------------------------------------------------------------------- mask folders


@pytest.fixture
def nvidia_like(tmp_path):
    """Six 64x64 masks written NVIDIA-test-set style: white = hole."""
    folder = tmp_path / "masks"
    masks = [generate_mask(64, 64, r, 0.01, rng=i) for i, r in enumerate((0.05, 0.1, 0.15, 0.2, 0.25, 0.3))]
    for i, m in enumerate(masks):
        save_mask(m, folder / f"{i:05d}.png", invert=True)
    return folder, masks


def test_mask_folder_reads_white_as_hole_with_invert(nvidia_like, caplog):
    folder, masks = nvidia_like
    with caplog.at_level(logging.WARNING, logger="train.masks"):
        source = MaskFolder(folder, invert=NVIDIA_TEST_MASKS_INVERT, augment=False)
    assert caplog.text == ""
    assert len(source) == 6
    for i, m in enumerate(masks):
        assert torch.equal(source[i], m)
    # The wrong setting reads the set as mostly hole, and says so.
    with caplog.at_level(logging.WARNING, logger="train.masks"):
        wrong = MaskFolder(folder, invert=False, augment=False)
    assert "invert" in caplog.text and str(folder) in caplog.text
    assert torch.equal(wrong[0], 1 - masks[0])


def test_mask_folder_without_augmentation_returns_files(nvidia_like):
    folder, masks = nvidia_like
    source = MaskFolder(folder, invert=True, augment=False)
    picks = [source(64, 64, np.random.default_rng(s)) for s in range(10)]
    assert all(any(torch.equal(p, m) for m in masks) for p in picks)
    assert source(32, 48, 0).shape == (1, 32, 48)


def test_mask_folder_augmentation_is_seeded_and_varied(nvidia_like):
    folder, _ = nvidia_like
    source = MaskFolder(folder, invert=True)
    for h, w in ((32, 32), (48, 64), (100, 90)):  # crops, and scaling up past the files
        a = source(h, w, np.random.default_rng(7))
        assert a.shape == (1, h, w) and is_binary(a)
        assert torch.equal(a, source(h, w, np.random.default_rng(7)))
    outs = [source(32, 32, np.random.default_rng(s)) for s in range(6)]
    assert len({o.numpy().tobytes() for o in outs}) == 6


def test_mask_folder_dilation_only_grows_holes(nvidia_like):
    folder, masks = nvidia_like
    plain = MaskFolder(folder, invert=True, augment=False)
    dilated = MaskFolder(folder, invert=True, max_dilation=3, max_rotation=0, flip=False)
    grew = 0
    for s in range(12):
        m = dilated(64, 64, np.random.default_rng(s))
        base = plain(64, 64, np.random.default_rng(s))  # same file: the first draw picks it
        assert bool((m <= base).all())  # every hole stays a hole
        grew += hole_ratio(m) > hole_ratio(base)
    assert grew >= 6  # radius 0 is one of four choices


def test_mask_folder_rotation_changes_masks(nvidia_like):
    folder, _ = nvidia_like
    plain = MaskFolder(folder, invert=True, augment=False)
    rotated = MaskFolder(folder, invert=True, max_dilation=0, max_rotation=90, flip=False)
    changed = sum(
        not torch.equal(rotated(64, 64, np.random.default_rng(s)), plain(64, 64, np.random.default_rng(s)))
        for s in range(6)
    )
    assert changed == 6


def test_mask_folder_skips_bad_files(nvidia_like, caplog):
    folder, masks = nvidia_like
    (folder / "99998.png").write_text("not a png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "99999.png")  # incompressible: the cut lands in pixel data
    data = (folder / "99999.png").read_bytes()
    (folder / "99999.png").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        source = MaskFolder(folder, invert=True, augment=False)
    assert "99998.png" in caplog.text and "99999.png" not in caplog.text
    assert len(source) == 7  # the truncated file passes the header check
    caplog.clear()
    seed = next(s for s in range(100) if np.random.default_rng(s).integers(7) == 6)  # picks 99999.png
    with caplog.at_level(logging.WARNING, logger="train.masks"):
        got = source(64, 64, seed)
    assert "99999.png" in caplog.text
    assert torch.equal(got, masks[0])  # wrapped round to the next readable file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train.masks"):
        assert torch.equal(source(64, 64, seed), masks[0])
    assert caplog.text == ""  # each bad file is reported once


def test_mask_folder_empty_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        MaskFolder(tmp_path)


# ----------------------------------------------------------------------------- buckets


def test_hole_ratio_shapes_and_exactness():
    m = torch.ones(1, 10, 10)
    m[0, 0, :] = 0
    assert hole_ratio(m) == 0.1  # exactly, in float64
    assert hole_ratio(m[0]) == 0.1
    batch = torch.stack([m, torch.zeros(1, 10, 10), torch.full((1, 10, 10), 0.75)])
    assert torch.allclose(hole_ratio(batch), torch.tensor([0.1, 1.0, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError):
        hole_ratio(torch.ones(3, 4, 4))
    with pytest.raises(ValueError):
        hole_ratio(torch.ones(2, 3, 4, 4))


def test_bucket_edges_are_open_below_closed_above():
    assert bucket_of(0.0) is None
    assert bucket_of(0.01) is None
    assert bucket_of(0.0100001) == (0.01, 0.1)
    assert bucket_of(0.1) == (0.01, 0.1)
    assert bucket_of(0.1000001) == (0.1, 0.2)
    assert bucket_of(0.2) == (0.1, 0.2)
    assert bucket_of(0.5) == (0.4, 0.5)
    assert bucket_of(0.6) == (0.5, 0.6)
    assert bucket_of(0.6000001) is None
    # A real mask with exactly 10 % holes belongs to the first bucket.
    m = torch.ones(1, 10, 10)
    m[0, 3, :] = 0
    assert bucket_of(hole_ratio(m)) == (0.01, 0.1)
    assert bucket_of(0.15, [(0.0, 0.5), (0.1, 0.2)]) == (0.0, 0.5)  # first match
    assert len(PAPER_BUCKETS) == 6 and REPORT_RATIOS == (0.05, 0.1, 0.2)


def test_bucket_labels_and_grouping():
    assert bucket_label((0.01, 0.1)) == "(0.01,0.1]"
    assert bucket_label(0.05) == "r=0.05"
    masks = [generate_mask(32, 32, r, 0.005, rng=i) for i, r in enumerate((0.05, 0.15, 0.16, 0.7))]
    groups = group_by_bucket(masks)
    assert list(groups) == [bucket_label(b) for b in PAPER_BUCKETS]
    assert [len(v) for v in groups.values()] == [1, 2, 0, 0, 0, 0]


def test_eval_masks_fall_in_their_buckets_and_are_fixed():
    buckets = list(PAPER_BUCKETS) + list(REPORT_RATIOS)
    sets = make_eval_masks(48, 48, buckets, per_bucket=4, seed=3)
    assert list(sets) == [bucket_label(b) for b in buckets]
    for bucket in buckets:
        masks = sets[bucket_label(bucket)]
        assert len(masks) == 4
        for m in masks:
            assert m.shape == (1, 48, 48) and is_binary(m)
            if isinstance(bucket, tuple):
                assert bucket_of(hole_ratio(m), [bucket]) == bucket
            else:
                assert abs(hole_ratio(m) - bucket) <= 0.005
    # Ratios spread across a bucket rather than sitting at one value.
    spread = [hole_ratio(m) for m in sets["(0.3,0.4]"]]
    assert max(spread) - min(spread) > 0.02

    again = make_eval_masks(48, 48, [(0.3, 0.4), 0.1], per_bucket=5, seed=3)
    # Same seed: same masks, regardless of the other buckets and of per_bucket.
    for label in ("(0.3,0.4]", "r=0.1"):
        for a, b in zip(sets[label], again[label][:4]):
            assert torch.equal(a, b)
    other = make_eval_masks(48, 48, [(0.3, 0.4)], per_bucket=4, seed=4)
    assert not any(torch.equal(a, b) for a, b in zip(sets["(0.3,0.4]"], other["(0.3,0.4]"]))


def _mask_with_hole_rows(size: int, hole_rows: int) -> torch.Tensor:
    mask = torch.ones(1, size, size)
    mask[:, :hole_rows] = 0
    return mask


def test_eval_masks_from_folder_sort_files_into_buckets(tmp_path, caplog):
    """Files (holes white, as NVIDIA's test set) are resized and sorted by hole ratio; a
    bucket keeps the first K that fall in it, and a bucket none falls in is left out."""
    rows = {"a": 4, "b": 10, "c": 12, "d": 11, "e": 22, "f": 58}  # of 64: 6%, 16%, 19%, ...
    for name, hole_rows in rows.items():
        save_mask(_mask_with_hole_rows(64, hole_rows), tmp_path / f"{name}.png", invert=True)
    with caplog.at_level(logging.WARNING):
        sets = eval_masks_from_folder(tmp_path, 32, 32, PAPER_BUCKETS, per_bucket=2)
    assert list(sets) == ["(0.01,0.1]", "(0.1,0.2]", "(0.3,0.4]"]
    assert [len(v) for v in sets.values()] == [1, 2, 1]
    # b and c came first into (0.1, 0.2]; d, also 17%, found it full.
    torch.testing.assert_close(sets["(0.1,0.2]"][1], _mask_with_hole_rows(32, 6))
    for label, masks in sets.items():
        for mask in masks:
            assert mask.shape == (1, 32, 32) and is_binary(mask)
            assert bucket_label(bucket_of(hole_ratio(mask), PAPER_BUCKETS)) == label
    assert "falls in bucket (0.2,0.3]" in caplog.text and "fewer than 2" in caplog.text
    # Read with the wrong convention, every file is mostly hole: none fits a bucket.
    with pytest.raises(FileNotFoundError, match="invert=False: is that right"):
        eval_masks_from_folder(tmp_path, 32, 32, [(0.2, 0.3)], per_bucket=2, invert=False)


def test_mask_folder_messages_say_mask(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="mask folder .* does not exist"):
        MaskFolder(tmp_path / "missing")
    save_mask(_mask_with_hole_rows(16, 2), tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    with caplog.at_level(logging.WARNING):
        assert len(MaskFolder(tmp_path)) == 1
    assert "skipping unreadable mask" in caplog.text
