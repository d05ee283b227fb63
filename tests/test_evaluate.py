"""pconv-eval and the ablation command end to end on tiny generated data: the table's
layout and finiteness, determinism, multiple named checkpoints, figures, baselines-only
mode, and agreement of one table cell with a direct computation."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from train import ablations, evaluate
from train.classical import inpaint_classical
from train.cli import train_main
from train.data import eval_transform
from train.images import load_image, load_mask, save_image, save_mask
from train.masks import REPORT_RATIOS, make_eval_masks
from train.metrics import inpainting_metrics

SIZE = 32


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, run folder) of a 2-step tiny training run."""
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        coarse = torch.rand(1, 3, 4, 4, generator=g)
        save_image(torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear",
                                                   align_corners=False)[0],
                   images / f"pic_{i}.png")
    config = root / "tiny.toml"
    config.write_text(f"""
name = "tiny"
[model]
kind = "pconv"
layers = 3
base_channels = 8
max_channels = 16
[data]
kind = "folder"
root = "{images.as_posix()}"
size = {SIZE}
num_workers = 0
[loss]
use_perceptual = false
use_style = false
[train]
steps = 2
batch_size = 2
progress = false
tensorboard = false
[val]
every = 0
[eval]
buckets = "report"
masks_per_bucket = 3
""")
    run = root / "run"
    assert train_main(["--config", str(config), "--out", str(run)]) == 0
    return images, run


def read_table(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_eval_table_layout_finite_and_figures(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    out = tmp_path / "eval"
    assert evaluate.main([str(run), "--out", str(out), "--no-progress", "--figures", "2"]) == 0
    rows = read_table(out / "table.csv")
    assert [(r["method"], r["region"]) for r in rows] == [
        (m, region) for region in ("whole", "hole") for m in ("tiny", "Navier-Stokes", "Telea")]
    columns = [f"r={r:g} {m}" for r in REPORT_RATIOS for m in ("L1", "MSE", "PSNR", "SSIM")]
    assert list(rows[0])[2:] == columns
    assert all(math.isfinite(float(r[c])) for r in rows for c in columns)
    for r in rows:  # SSIM in (0, 1], PSNR positive
        assert all(0 < float(r[f"r={x:g} SSIM"]) <= 1 for x in REPORT_RATIOS)
        assert all(float(r[f"r={x:g} PSNR"]) > 0 for x in REPORT_RATIOS)
    md = (out / "table.md").read_text()
    assert "## Whole image" in md and "## Hole only" in md and "sigma 1.5" in md
    assert "| Navier-Stokes |" in md and md in capsys.readouterr().out
    per_image = read_table(out / "per_image.csv")
    assert len(per_image) == 3 * len(REPORT_RATIOS) * 5
    figures = sorted((out / "figures").rglob("*.png"))
    assert len(figures) == 2 * len(REPORT_RATIOS)
    strip = load_image(figures[0])
    # 6 panels (masked input, mask, tiny, NS, Telea, ground truth) with 4-pixel gaps, plus
    # a 16-pixel label bar.
    assert strip.shape == (3, 16 + SIZE + 8, 6 * (SIZE + 4) + 4)


def test_eval_cell_matches_direct_computation(tiny_run, tmp_path):
    images, run = tiny_run
    out = tmp_path / "eval"
    assert evaluate.main([str(run), "--out", str(out), "--no-progress", "--figures", "0",
                          "--baselines", "ns"]) == 0
    rows = {r["method"]: r for r in read_table(out / "table.csv") if r["region"] == "hole"}
    assert set(rows) == {"tiny", "Navier-Stokes"}
    # Bucket r=0.1, Navier-Stokes: image i with mask i mod 3, metrics of the composite.
    masks = make_eval_masks(SIZE, SIZE, REPORT_RATIOS, 3, 0)["r=0.1"]
    files = sorted(images.glob("*.png"))
    values = []
    for i, file in enumerate(files):
        target = eval_transform(SIZE)(load_image(file), None)[None]
        mask = masks[i % 3][None]
        filled = inpaint_classical(target, mask, "ns").clamp(0, 1)
        values.append(inpainting_metrics(filled, target, mask)["hole_psnr"].item())
    assert float(rows["Navier-Stokes"]["r=0.1 PSNR"]) == pytest.approx(sum(values) / len(values),
                                                                       abs=1e-9)


def test_eval_deterministic_and_named_rows(tiny_run, tmp_path):
    _, run = tiny_run
    argv = ["--no-progress", "--figures", "0", "--max-images", "2", "--buckets", "paper",
            "--masks-per-bucket", "2"]
    assert evaluate.main([str(run), str(run), "--name", "A", "--name", "B", "--out",
                          str(tmp_path / "one")] + argv) == 0
    assert evaluate.main([str(run), str(run), "--name", "A", "--name", "B", "--out",
                          str(tmp_path / "two")] + argv) == 0
    one = (tmp_path / "one" / "table.csv").read_text()
    assert one == (tmp_path / "two" / "table.csv").read_text()
    rows = read_table(tmp_path / "one" / "table.csv")
    assert [r["method"] for r in rows[:4]] == ["A", "B", "Navier-Stokes", "Telea"]
    assert "(0.5,0.6] SSIM" in rows[0]
    # Same checkpoint twice: identical rows.
    assert list(rows[0].values())[2:] == list(rows[1].values())[2:]


def test_eval_on_mask_files(tiny_run, tmp_path):
    """--mask-root scores on mask files sorted into the buckets (NVIDIA's protocol); each
    cell is the mean over images i with file i mod K of its bucket."""
    images, run = tiny_run
    masks_dir = tmp_path / "masks"
    for name, hole_rows in {"m0": 3, "m1": 4, "m2": 10}.items():  # of 32: 9%, 12.5%, 31%
        mask = torch.ones(1, SIZE, SIZE)
        mask[:, :hole_rows] = 0
        save_mask(mask, masks_dir / f"{name}.png", invert=True)  # holes white
    out = tmp_path / "eval"
    assert evaluate.main([str(run), "--out", str(out), "--no-progress", "--figures", "0",
                          "--baselines", "ns", "--buckets", "paper", "--mask-root",
                          str(masks_dir)]) == 0
    rows = {r["method"]: r for r in read_table(out / "table.csv") if r["region"] == "hole"}
    assert [c for c in rows["Navier-Stokes"] if c.endswith(" L1")] == \
        ["(0.01,0.1] L1", "(0.1,0.2] L1", "(0.3,0.4] L1"]
    mask = load_mask(masks_dir / "m1.png", invert=True)[None]
    values = [inpainting_metrics(inpaint_classical(target, mask, "ns").clamp(0, 1), target,
                                 mask)["hole_l1"].item()
              for target in (eval_transform(SIZE)(load_image(f), None)[None]
                             for f in sorted(images.glob("*.png")))]
    assert float(rows["Navier-Stokes"]["(0.1,0.2] L1"]) == pytest.approx(
        sum(values) / len(values), abs=1e-9)
    assert f"files under {masks_dir.resolve()}" in (out / "table.md").read_text()
    assert evaluate.main([str(run), "--out", str(out), "--masks-per-bucket", "0"]) == 2


def test_eval_errors(tiny_run, tmp_path, caplog):
    images, run = tiny_run
    assert evaluate.main([str(run), "--size", "36", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "multiples of 8" in caplog.text
    assert evaluate.main([str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "no checkpoint" in caplog.text
    assert evaluate.main([str(run), "--name", "A", "--name", "B", "--out", str(tmp_path)]) == 2


def test_baselines_only(tiny_run, tmp_path):
    images, _ = tiny_run
    out = tmp_path / "base"
    assert evaluate.main(["--root", str(images), "--size", str(SIZE), "--buckets", "report",
                          "--masks-per-bucket", "2", "--figures", "1", "--out", str(out),
                          "--no-progress"]) == 0
    rows = read_table(out / "table.csv")
    assert [r["method"] for r in rows] == ["Navier-Stokes", "Telea"] * 2


def test_ablations_command_trains_three_and_tabulates(tiny_run, tmp_path, capsys):
    images, _ = tiny_run
    config = tmp_path / "abl.toml"
    config.write_text(f"""
name = "abl"
[model]
kind = "pconv"
layers = 3
base_channels = 8
max_channels = 16
[data]
root = "{images.as_posix()}"
size = {SIZE}
num_workers = 0
[vgg]
random = true
[train]
steps = 2
batch_size = 2
progress = false
tensorboard = false
[val]
every = 0
[eval]
buckets = "report"
masks_per_bucket = 2
""")
    out = tmp_path / "abl"
    argv = ["--config", str(config), "--out", str(out), "--figures", "1", "--max-images", "3",
            "--no-progress"]
    with pytest.warns(RuntimeWarning, match="RANDOM weights"):
        assert ablations.main(argv) == 0
    rows = read_table(out / "eval" / "table.csv")
    labels = [v["label"] for v in ablations.DEFAULT_VARIANTS.values()]
    assert [r["method"] for r in rows] == (labels + ["Navier-Stokes", "Telea"]) * 2
    assert all(math.isfinite(float(v)) for r in rows for k, v in r.items()
               if k not in ("method", "region"))
    for name in ablations.DEFAULT_VARIANTS:
        ckpt = torch.load(out / name / "checkpoints" / "step_00000002.pt", weights_only=True)
        assert ckpt["config"]["name"] == f"abl-{name}"
        expected = ablations.DEFAULT_VARIANTS[name]["loss"]
        assert {k: ckpt["config"]["loss"][k] for k in expected} == expected
    assert "PConv, no style loss" in capsys.readouterr().out
    # A rerun finds every variant finished: nothing is trained again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("step_*.pt")}
    assert ablations.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("step_*.pt")} == before


def test_variants_of_config_tables():
    from train import config as cfglib
    config = cfglib.load_config("ablations_samples")
    variants = ablations.variants_of(config, ["no_perceptual"])
    label, variant = variants["no_perceptual"]
    assert label == "PConv, no perceptual loss"
    assert variant["loss"]["use_perceptual"] is False and variant["loss"]["use_style"] is True
    with pytest.raises(cfglib.ConfigError, match="no \\[ablation.nope\\]"):
        ablations.variants_of(config, ["nope"])
