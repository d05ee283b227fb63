"""train.data: folders, splits, layouts, seeded transforms, bad files, DataLoader workers."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from train.data import (
    SPLIT_FRACTIONS,
    CelebAHQ,
    CenterCrop,
    Compose,
    ImageFolderDataset,
    InpaintingDataset,
    Places2,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    eval_transform,
    sample_rng,
    split_files,
    train_transform,
)
from train.images import load_image, save_image, save_mask
from train.masks import FreeFormMasks, MaskFolder, generate_mask


def write_images(folder: Path, names, size=(24, 32), seed=0) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    paths = []
    for name in names:
        path = folder / name
        save_image(torch.rand(3, *size, generator=g), path)
        paths.append(path)
    return paths


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- transforms


def test_resize_short_side_and_exact_size():
    x = torch.rand(3, 40, 60)
    assert Resize(20)(x).shape == (3, 20, 30)
    assert Resize(20)(torch.rand(3, 60, 40)).shape == (3, 30, 20)
    assert Resize((10, 12))(x).shape == (3, 10, 12)
    assert Resize(40)(x) is x  # nothing to do
    # Antialiased downscaling of a fine checkerboard gives flat grey, not aliasing.
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2).float().expand(3, -1, -1)
    assert (Resize(8)(checker) - 0.5).abs().max() < 0.05
    out = Resize(16, mode="bicubic")(torch.rand(3, 64, 64))
    assert out.min() >= 0 and out.max() <= 1


def test_crops_and_flip():
    x = torch.arange(5 * 7, dtype=torch.float32).view(1, 5, 7)
    assert torch.equal(CenterCrop(3)(x), x[:, 1:4, 2:5])
    with pytest.raises(ValueError):
        CenterCrop(6)(x)
    crop = RandomCrop((2, 3))
    a = crop(x, np.random.default_rng(1))
    assert a.shape == (1, 2, 3) and torch.equal(a, crop(x, np.random.default_rng(1)))
    spots = {crop(x, np.random.default_rng(s))[0, 0, 0].item() for s in range(30)}
    assert len(spots) > 5
    # An image smaller than the crop is scaled up to cover it.
    assert RandomCrop(16)(torch.rand(3, 8, 12), np.random.default_rng(0)).shape == (3, 16, 16)
    rng = np.random.default_rng(0)
    assert torch.equal(RandomHorizontalFlip(1.0)(x, rng), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x, rng), x)


def test_composed_transforms_are_seeded():
    x = torch.rand(3, 48, 64)
    t = train_transform(32)
    assert isinstance(t, Compose)
    a = t(x, sample_rng(0, 0, 5))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, t(x, sample_rng(0, 0, 5)))
    outs = {t(x, sample_rng(0, e, 5)).numpy().tobytes() for e in range(8)}
    assert len(outs) > 2
    assert eval_transform(32)(x, None).shape == (3, 32, 32)


def test_sample_rng_streams_are_independent():
    def draw(*key):
        return sample_rng(*key).random(4).tolist()

    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({tuple(draw(*k)) for k in [(1, 2, 3), (1, 2, 4), (1, 3, 3), (2, 2, 3), (1, 2, 3, 1)]}) == 5


# ----------------------------------------------------------------------------- folders


def test_image_folder_order_and_items(tmp_path):
    names = ["b/2.png", "a.jpg", "b/1.JPEG", "c.webp"]
    write_images(tmp_path, names)
    ds = ImageFolderDataset(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["a.jpg", "b/1.JPEG", "b/2.png", "c.webp"]
    x = ds[2]
    assert x.shape == (3, 24, 32) and x.dtype == torch.float32
    assert torch.equal(x, load_image(tmp_path / "b/2.png"))
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "b" / "nothing")


def test_corrupt_files_are_skipped_with_warnings(tmp_path, caplog):
    paths = write_images(tmp_path, ["0.jpg", "1.jpg", "2.jpg", "3.jpg"])
    truncate(paths[1])
    fake = tmp_path / "1b.jpg"
    fake.write_text("this is text, not a JPEG")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path)
    # Index time: the non-image goes (and is named); the truncated JPEG has a good header.
    assert str(fake) in caplog.text and str(paths[1]) not in caplog.text
    assert ds.files == paths

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = ds[1]
    # Load time: the truncated file is named and the next file stands in, deterministically.
    assert str(paths[1]) in caplog.text
    assert torch.equal(got, load_image(paths[2]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(ds[1], got)
    assert caplog.text == ""  # reported once

    with caplog.at_level(logging.WARNING):
        full = ImageFolderDataset(tmp_path, check="full")
    assert full.files == [paths[0], paths[2], paths[3]]


def test_corrupt_files_in_dataloader_workers(tmp_path):
    paths = write_images(tmp_path, [f"{i}.jpg" for i in range(6)])
    truncate(paths[3])
    ds = ImageFolderDataset(tmp_path)
    batches = list(DataLoader(ds, batch_size=3, num_workers=2))
    got = torch.cat(batches)
    assert got.shape == (6, 3, 24, 32)
    assert torch.equal(got[3], load_image(paths[4]))


def test_all_files_bad_raises_clearly(tmp_path):
    paths = write_images(tmp_path, ["0.jpg", "1.jpg"])
    for p in paths:
        truncate(p)
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(RuntimeError, match="could be read"):
        ds[0]


# ----------------------------------------------------------------------------- splits


def test_split_proportions_disjointness_and_stability():
    root = Path("/data/celeba_hq")
    files = [root / f"{i:05d}.jpg" for i in range(1000)]
    parts = {s: split_files(files, root, s) for s in SPLIT_FRACTIONS}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [700, 150, 150]
    sets = {s: set(p) for s, p in parts.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(files)
    assert parts["val"] == sorted(parts["val"])
    # Listing order does not matter.
    shuffled = files[:]
    random.Random(0).shuffle(shuffled)
    assert all(split_files(shuffled, root, s) == parts[s] for s in SPLIT_FRACTIONS)
    # Nor where the data set lives: only names relative to the root count.
    other = Path("/elsewhere")
    moved = split_files([other / f.name for f in files], other, "test")
    assert [f.name for f in moved] == [f.name for f in parts["test"]]
    # It is a shuffle, not a cut of the sorted names.
    assert parts["train"][:5] != files[:5]
    # Pinned: the split is a published part of the experiment and must never drift.
    assert [f.name for f in parts["test"][:3]] == PINNED_TEST_HEAD
    with pytest.raises(ValueError):
        split_files(files, root, "holdout")


PINNED_TEST_HEAD = ["00001.jpg", "00003.jpg", "00018.jpg"]


@pytest.mark.parametrize("n", [1, 2, 7, 20, 101])
def test_split_sizes_for_small_sets(n):
    root = Path("/d")
    files = [root / f"{i}.png" for i in range(n)]
    sizes = [len(split_files(files, root, s)) for s in ("train", "val", "test")]
    assert sum(sizes) == n
    assert sizes[0] == round(0.7 * n) and sizes[1] == round(0.15 * n)


def test_celeba_hq_splits_partition_the_folder(tmp_path):
    write_images(tmp_path, [f"img/{i:05d}.jpg" for i in range(20)], size=(8, 8))
    parts = {s: CelebAHQ(tmp_path, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    everything = sorted(f for p in parts.values() for f in p.files)
    assert everything == sorted((tmp_path / "img").glob("*.jpg"))
    assert parts["val"][0].shape == (3, 8, 8)


# ----------------------------------------------------------------------------- Places2


def test_places2_standard_layout(tmp_path):
    write_images(tmp_path, ["data_256/a/airfield/00000001.jpg", "data_256/b/bakery/00000001.jpg"], size=(8, 8))
    write_images(tmp_path, [f"val_256/Places365_val_{i:08d}.jpg" for i in (1, 2, 3)], size=(8, 8))
    write_images(tmp_path, ["test_256/Places365_test_00000001.jpg"], size=(8, 8))
    assert len(Places2(tmp_path, "train")) == 2
    assert len(Places2(tmp_path, "val")) == 3
    assert len(Places2(tmp_path, "test")) == 1
    assert Places2(tmp_path, "train").root == tmp_path / "data_256"


def test_places2_generic_layout_file_list_and_errors(tmp_path):
    write_images(tmp_path, ["train/x/1.jpg", "train/x/2.jpg", "train/y/3.jpg", "val/4.jpg"], size=(8, 8))
    assert len(Places2(tmp_path, "train")) == 3
    assert len(Places2(tmp_path, "val")) == 1
    listing = tmp_path / "places365_train_standard.txt"
    listing.write_text("/y/3.jpg 7\n/x/1.jpg 3\n\n")
    listed = Places2(tmp_path, "train", file_list=listing)
    assert [p.relative_to(tmp_path).as_posix() for p in listed.files] == ["train/x/1.jpg", "train/y/3.jpg"]
    assert len(Places2(tmp_path, "train", folder="val")) == 1
    with pytest.raises(FileNotFoundError, match="test_256"):
        Places2(tmp_path, "test")
    with pytest.raises(ValueError):
        Places2(tmp_path, "extra")


# ----------------------------------------------------------------------------- pairs, workers


@pytest.fixture
def paired(tmp_path):
    write_images(tmp_path, [f"{i:02d}.png" for i in range(10)], size=(40, 48))
    images = ImageFolderDataset(tmp_path, train_transform(32), seed=11)
    return InpaintingDataset(images, FreeFormMasks(hole_ratio=(0.05, 0.5)), seed=5)


def test_pairs_have_matching_shapes(paired):
    image, mask = paired[3]
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert bool(((mask == 0) | (mask == 1)).all()) and 0 < mask.mean() < 1


def test_pairs_with_a_mask_folder(tmp_path, paired):
    for i in range(3):
        save_mask(generate_mask(64, 64, 0.2, rng=i), tmp_path / "masks" / f"{i}.png")
    ds = InpaintingDataset(paired.images, MaskFolder(tmp_path / "masks"), seed=0)
    image, mask = ds[0]
    assert mask.shape == (1, 32, 32)
    a, b = ds[4], ds[4]
    assert torch.equal(a[1], b[1])


def epoch_batches(loader, dataset, epochs):
    out = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out.append([torch.cat([i.flatten(1), m.flatten(1)], 1) for i, m in loader])
    return [torch.cat(b) for b in out]


@pytest.mark.parametrize("context, persistent", [("fork", False), ("fork", True), ("spawn", True)])
def test_dataloader_workers_reproduce_the_main_process(paired, context, persistent):
    reference = epoch_batches(DataLoader(paired, batch_size=3), paired, [0, 1])
    loader = DataLoader(paired, batch_size=3, num_workers=2, persistent_workers=persistent,
                        multiprocessing_context=context)
    got = epoch_batches(loader, paired, [0, 1, 0])
    assert torch.equal(got[0], reference[0])
    assert torch.equal(got[1], reference[1])
    assert torch.equal(got[2], reference[0])  # back to epoch 0: the same samples again
    # Different epochs give different crops, flips and masks for every sample.
    assert all(not torch.equal(a, b) for a, b in zip(reference[0], reference[1]))


def test_seed_and_order_independence(paired):
    forward = [paired[i] for i in range(10)]
    backward = [paired[i] for i in reversed(range(10))][::-1]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(forward, backward))
    reseeded = InpaintingDataset(paired.images, paired.masks, seed=6)
    assert not torch.equal(reseeded[0][1], forward[0][1])  # the mask seed moved
    assert torch.equal(reseeded[0][0], forward[0][0])  # the image seed did not
    # A sample depends on its index only, not on when the sampler asks for it.
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    images, masks = next(iter(DataLoader(paired, batch_size=10, sampler=perm)))
    assert all(torch.equal(images[k], forward[i][0]) and torch.equal(masks[k], forward[i][1])
               for k, i in enumerate(perm))
    with pytest.raises(ValueError):
        paired.set_epoch(-1)
    paired.set_epoch(3)
    assert paired.epoch == 3 and paired.images.epoch == 3
