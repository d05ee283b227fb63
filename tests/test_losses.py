"""InpaintingLoss: every term against a hand computation, weights, ablations, autocast."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from train.losses import DEFAULT_WEIGHTS, InpaintingLoss, gram_matrix, total_variation
from train.vgg import VGG16Features

random_vgg_warning = pytest.mark.filterwarnings("ignore:VGG16Features is running with RANDOM")


class ScaledCopies(nn.Module):
    """Stand-in for VGG16: three "pool" outputs x, 2x and 3x; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x, 2 * x, 3 * x


def tiny():
    """1x1x2x2 ground truth, output and mask (left column known, right column hole)."""
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    output = torch.tensor([[[[1.0, 1.0], [0.0, 5.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    return image, mask, output


def test_terms_by_hand():
    image, mask, output = tiny()
    # out - gt = [[1, 0], [-2, 2]]; comp = [[0, 1], [2, 5]]; comp - gt = [[0, 0], [0, 2]].
    # Gram (1 channel, 4 pixels) = sum of squares / 4: gt 14/4, out 27/4, comp 30/4;
    # layer k scales features by k, Grams by k^2.
    # Dilated hole = every pixel; TV pairs: across |1-0| + |5-2|, down |2-0| + |5-1| -> 10.
    want = {"valid": (1 + 2) / 4,
            "hole": 2 / 4,
            "perceptual": (1 + 2 + 3) * ((1 + 0 + 2 + 2) / 4 + 2 / 4),
            "style": (1 + 4 + 9) * (abs(27 - 14) / 4 + abs(30 - 14) / 4),
            "tv": 10 / 4}
    loss = InpaintingLoss(ScaledCopies())
    total, terms = loss(image, mask, output)
    assert set(terms) == set(want)
    for name, value in want.items():
        assert terms[name].item() == pytest.approx(value), name
    assert total.item() == pytest.approx(sum(DEFAULT_WEIGHTS[k] * v for k, v in want.items()))


def test_default_weights_as_paper():
    assert DEFAULT_WEIGHTS == {"valid": 1.0, "hole": 6.0, "perceptual": 0.05, "style": 120.0,
                               "tv": 0.1}
    assert InpaintingLoss(ScaledCopies()).weights == DEFAULT_WEIGHTS


def test_custom_weights():
    image, mask, output = tiny()
    weights = {"valid": 2.0, "hole": 0.5, "perceptual": 3.0, "style": 0.25, "tv": 7.0}
    loss = InpaintingLoss(ScaledCopies(), valid_weight=2.0, hole_weight=0.5,
                          perceptual_weight=3.0, style_weight=0.25, tv_weight=7.0)
    total, terms = loss(image, mask, output)
    assert total.item() == pytest.approx(sum(weights[k] * terms[k].item() for k in weights))


def test_gram_by_hand():
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # C=2, H=1, W=2
    # F F^T = [[5, 11], [11, 25]], divided by C*H*W = 4.
    torch.testing.assert_close(gram_matrix(features),
                               torch.tensor([[[1.25, 2.75], [2.75, 6.25]]]))


def test_style_mean_over_gram_entries():
    # Two channels, one pixel, all hole (comp == out). Gram = f f^T / 2:
    # gt [1, 2] -> [[.5, 1], [1, 2]]; out [3, 0] -> [[4.5, 0], [0, 0]]; |diff| mean = 8/4.
    image = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    output = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1)
    mask = torch.zeros(1, 1, 1, 1)
    _, terms = InpaintingLoss(ScaledCopies(), use_perceptual=False)(image, mask, output)
    assert terms["style"].item() == pytest.approx((1 + 4 + 9) * (2 + 2))


def test_total_variation_over_dilated_hole():
    image = (torch.arange(16.0) ** 2).view(1, 1, 4, 4)
    mask = torch.ones(1, 1, 4, 4)
    mask[..., 0, 0] = 0
    # The hole dilated by one pixel is the 2x2 corner {0, 1, 4, 5}: pairs 0-1, 4-5 across and
    # 0-4, 1-5 down; squares 0, 1, 16, 25. Normalised by the 16 elements.
    want = ((1 - 0) + (25 - 16) + (16 - 0) + (25 - 1)) / 16
    assert total_variation(image, mask).item() == pytest.approx(want)
    # Per-element normalisation: copies over batch and channels do not change it.
    assert total_variation(image.expand(2, 3, 4, 4), mask).item() == pytest.approx(want)
    assert total_variation(image, torch.ones(1, 1, 4, 4)).item() == 0


@pytest.mark.parametrize("use_perceptual,use_style", [(False, True), (True, False)])
def test_ablation_switches(use_perceptual, use_style):
    image, mask, output = tiny()
    vgg = ScaledCopies()
    loss = InpaintingLoss(vgg, use_perceptual=use_perceptual, use_style=use_style)
    total, terms = loss(image, mask, output)
    assert ("perceptual" in terms) == use_perceptual and ("style" in terms) == use_style
    assert vgg.calls == 1
    assert total.item() == pytest.approx(sum(DEFAULT_WEIGHTS[k] * v.item()
                                             for k, v in terms.items()))


def test_no_vgg_when_both_off(tmp_path, monkeypatch):
    # No weights anywhere: building the loss must not even try to load VGG.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    image, mask, output = tiny()
    vgg = ScaledCopies()
    for given in (vgg, None):
        loss = InpaintingLoss(given, use_perceptual=False, use_style=False)
        assert loss.vgg is None
        total, terms = loss(image, mask, output)
        assert set(terms) == {"valid", "hole", "tv"}
    assert vgg.calls == 0
    with pytest.raises(FileNotFoundError):
        InpaintingLoss()


@random_vgg_warning
def test_real_vgg_terms_match_separate_passes():
    g = torch.Generator().manual_seed(0)
    image, output = torch.rand(2, 2, 3, 16, 16, generator=g)
    mask = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    vgg = VGG16Features()
    output.requires_grad_(True)
    total, terms = InpaintingLoss(vgg)(image, mask, output)
    comp = mask * image + (1 - mask) * output
    f_out, f_comp, f_gt = vgg(output), vgg(comp), vgg(image)
    perceptual = sum((o - t).abs().mean() + (c - t).abs().mean()
                     for o, c, t in zip(f_out, f_comp, f_gt))
    style = sum((gram_matrix(o) - gram_matrix(t)).abs().mean()
                + (gram_matrix(c) - gram_matrix(t)).abs().mean()
                for o, c, t in zip(f_out, f_comp, f_gt))
    torch.testing.assert_close(terms["perceptual"], perceptual)
    torch.testing.assert_close(terms["style"], style)
    total.backward()
    assert torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0


def test_gram_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 16, 16, generator=g).to(torch.bfloat16)
    exact = gram_matrix(features.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.matmul(features, features.transpose(2, 3)).dtype == torch.bfloat16
        gram = gram_matrix(features)
    assert gram.dtype == torch.float32
    # A bfloat16 product would be off by ~1e-2 relative; float32 is exact to ~1e-6.
    torch.testing.assert_close(gram.double(), exact, rtol=1e-5, atol=1e-6)


@random_vgg_warning
def test_loss_under_autocast():
    g = torch.Generator().manual_seed(0)
    image, output = torch.rand(2, 1, 3, 16, 16, generator=g)
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = InpaintingLoss(VGG16Features())(image, mask, output.to(torch.bfloat16))
    assert torch.isfinite(total) and terms["style"].dtype == torch.float32
