"""train.metrics against scikit-image (the reference implementation of the conventions) and
against direct numpy formulas for the region-weighted (hole-only) variants."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train import metrics

skimage_metrics = pytest.importorskip("skimage.metrics")


def _pair(n, c, h, w, seed, smooth=False):
    """Two related random images in [0, 1] (``b`` = ``a`` plus noise), optionally smoothed
    so the SSIM map spans its range instead of sitting near 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    if smooth:
        a = F.avg_pool2d(F.pad(a, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    b = (a + 0.15 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def _sk_ssim(a, b, full=False):
    # [C, H, W] tensors -> skimage with the Wang et al. settings our module documents.
    return skimage_metrics.structural_similarity(
        a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2, full=full)


@pytest.mark.parametrize("shape, smooth, seed", [
    ((3, 3, 32, 32), False, 0), ((2, 3, 45, 61), True, 1), ((2, 1, 11, 11), False, 2),
    ((1, 3, 64, 40), True, 3)])
def test_ssim_matches_skimage(shape, smooth, seed):
    a, b = _pair(*shape, seed, smooth)
    ours = metrics.ssim(a, b)
    expected = torch.tensor([_sk_ssim(a[i], b[i]) for i in range(shape[0])], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


def test_ssim_float32_inputs_close_to_skimage():
    a, b = _pair(2, 3, 48, 48, 7, smooth=True)
    ours = metrics.ssim(a.float(), b.float())  # computed in float64 by default
    expected = torch.tensor([_sk_ssim(a[i].float().double(), b[i].float().double())
                             for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
    low = metrics.ssim(a.float(), b.float(), dtype=torch.float32)
    torch.testing.assert_close(low.double(), expected, rtol=0, atol=2e-4)


def test_ssim_map_matches_skimage_full_map_cropped():
    a, b = _pair(1, 3, 40, 36, 4, smooth=True)
    ours = metrics.ssim_map(a, b)  # [1, 3, 30, 26]
    _, full = _sk_ssim(a[0], b[0], full=True)  # [H, W, C], border from reflect padding
    expected = torch.from_numpy(full[5:-5, 5:-5].transpose(2, 0, 1)).unsqueeze(0)
    assert ours.shape == (1, 3, 30, 26)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_mse_l1_match_skimage_and_numpy(seed):
    a, b = _pair(3, 3, 24, 17, seed)
    expected = [skimage_metrics.peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(),
                                                        data_range=1.0) for i in range(3)]
    torch.testing.assert_close(metrics.psnr(a, b), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-10)
    mse = [skimage_metrics.mean_squared_error(a[i].numpy(), b[i].numpy()) for i in range(3)]
    torch.testing.assert_close(metrics.mse(a, b), torch.tensor(mse, dtype=torch.float64))
    l1 = [float(np.abs(a[i].numpy() - b[i].numpy()).mean()) for i in range(3)]
    torch.testing.assert_close(metrics.l1(a, b), torch.tensor(l1, dtype=torch.float64))


def test_identical_images():
    a, _ = _pair(2, 3, 16, 16, 0)
    assert torch.equal(metrics.ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert torch.equal(metrics.l1(a, a), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(metrics.psnr(a, a), torch.full((2,), metrics.PSNR_MAX_DB,
                                                      dtype=torch.float64))
    assert torch.isinf(metrics.psnr(a, a, max_db=None)).all()


def test_hole_only_metrics_are_means_over_hole_pixels():
    a, b = _pair(2, 3, 32, 32, 5, smooth=True)
    g = torch.Generator().manual_seed(9)
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.4).double()  # 1 = known, 0 = hole
    hole = 1 - mask
    for i in range(2):
        sel = hole[i, 0].bool()
        diff = (a[i] - b[i])[:, sel]  # [3, holes]
        assert metrics.l1(a, b, hole)[i].item() == pytest.approx(diff.abs().mean().item(),
                                                                  abs=1e-12)
        hole_mse = diff.square().mean().item()
        assert metrics.mse(a, b, hole)[i].item() == pytest.approx(hole_mse, abs=1e-12)
        assert metrics.psnr(a, b, hole)[i].item() == pytest.approx(
            10 * np.log10(1 / hole_mse), abs=1e-9)
        # SSIM: skimage's full map, cropped to the valid region, averaged over the window
        # centres that are hole pixels.
        _, full = _sk_ssim(a[i], b[i], full=True)
        centres = sel[5:-5, 5:-5].numpy()
        expected = full[5:-5, 5:-5][centres].mean()
        assert metrics.ssim(a, b, hole)[i].item() == pytest.approx(expected, abs=1e-10)


def test_weight_broadcasts_over_batch_and_channels():
    a, b = _pair(3, 3, 20, 20, 6)
    w = torch.rand(1, 1, 20, 20, dtype=torch.float64)
    for fn in (metrics.l1, metrics.mse, metrics.ssim):
        per_channel = fn(a, b, w.expand(3, 3, -1, -1))
        torch.testing.assert_close(fn(a, b, w), per_channel)
    # A weight of ones is the unweighted metric.
    ones = torch.ones(1, 1, 20, 20, dtype=torch.float64)
    torch.testing.assert_close(metrics.ssim(a, b, ones), metrics.ssim(a, b))


def test_empty_region_is_nan():
    a, b = _pair(1, 3, 16, 16, 0)
    zero = torch.zeros(1, 1, 16, 16)
    assert torch.isnan(metrics.l1(a, b, zero)).all()
    assert torch.isnan(metrics.psnr(a, b, zero)).all()
    assert torch.isnan(metrics.ssim(a, b, zero)).all()


def test_inpainting_metrics_keys_and_consistency():
    a, b = _pair(2, 3, 24, 24, 8, smooth=True)
    mask = torch.ones(2, 1, 24, 24)
    mask[:, :, 6:18, 6:18] = 0
    out = metrics.inpainting_metrics(b, a, mask)
    assert set(out) == {f"{r}_{m}" for r in metrics.REGIONS for m in metrics.METRIC_NAMES}
    hole = 1 - mask.double()
    torch.testing.assert_close(out["hole_l1"], metrics.l1(b, a, hole))
    torch.testing.assert_close(out["hole_ssim"], metrics.ssim(b, a, hole))
    torch.testing.assert_close(out["whole_psnr"], metrics.psnr(b, a))
    torch.testing.assert_close(out["whole_ssim"], metrics.ssim(b, a))
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values())


def test_gaussian_window_matches_scipy_taps():
    ndimage = pytest.importorskip("scipy.ndimage")
    impulse = np.zeros(21)
    impulse[10] = 1
    taps = ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5)[5:16]
    torch.testing.assert_close(metrics.gaussian_window(), torch.from_numpy(taps))


def test_shape_errors_name_the_shapes():
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[1, 3, 16, 16\] and \[1, 3, 16, 15\]"):
        metrics.l1(a, torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match="weight must be"):
        metrics.mse(a, a, torch.rand(1, 2, 16, 16))
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        metrics.ssim(torch.rand(1, 3, 10, 16), torch.rand(1, 3, 10, 16))
