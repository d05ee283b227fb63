"""The inpainting UNets: architecture, shapes, size errors, mask propagation, BN freezing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pconv_cuda
from train.models import ModifiedUNet, PConvUNet, _concat, composite

SMALL = dict(base_channels=4, max_channels=16)
MODELS = [pytest.param(PConvUNet, 128, id="PConvUNet"),  # default 7 levels: multiple 128
          pytest.param(ModifiedUNet, 64, id="ModifiedUNet")]  # default 7 levels: multiple 64


def inputs(size, n=2, seed=0, hole=0.5):
    """A random image [n, 3, size, size] and a random per-pixel binary mask [n, 1, size, size]
    with about ``hole`` of its pixels 0 (hole)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, size, size, generator=g)
    mask = (torch.rand(n, 1, size, size, generator=g) > hole).float()
    return image, mask


def convs(model):
    """The model's partial convs in forward order."""
    return [m for m in model.modules() if isinstance(m, pconv_cuda.PartialConv2d)]


def final_mask(model, image, mask):
    """The updated mask of the model's last partial conv."""
    seen = []
    hook = convs(model)[-1].register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    with torch.no_grad():
        model(image, mask)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("model_cls,size", MODELS)
def test_forward_backward_default_depth(model_cls, size, multi_channel):
    model = model_cls(multi_channel=multi_channel, **SMALL)
    image, mask = inputs(size)
    out = model(image, mask)
    assert out.shape == image.shape
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("model_cls,size", MODELS)
def test_every_layer_gets_its_mask_channels(model_cls, size, multi_channel):
    model = model_cls(multi_channel=multi_channel, **SMALL).eval()
    seen = []
    for conv in convs(model):
        conv.register_forward_pre_hook(
            lambda mod, args: seen.append((args[1].shape[1], mod.in_channels)))
    model(*inputs(size, n=1))
    assert len(seen) == len(convs(model))
    assert all(got == (c_in if multi_channel else 1) for got, c_in in seen)


def test_pconv_unet_paper_default_channels_256():
    model = PConvUNet().eval()
    assert [c.out_channels for c in convs(model)] == [64, 128, 256, 512, 512, 512, 512,
                                                      512, 512, 512, 256, 128, 64, 3]
    with torch.no_grad():
        out = model(*inputs(256, n=1))
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


def test_modified_unet_default_channels():
    model = ModifiedUNet().eval()
    encoder = [64, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
    decoder = [512, 512, 512, 512, 512, 512, 512, 512, 256, 256, 128, 128, 64, 3]
    assert [c.out_channels for c in convs(model)] == encoder + decoder
    with torch.no_grad():
        out = model(*inputs(64, n=1))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("layers", [7, 8])
def test_pconv_unet_architecture(layers):
    model = PConvUNet(layers)
    kernels = [7, 5, 5] + [3] * (layers - 3)
    widths = [3, 64, 128, 256] + [512] * (layers - 3)
    for i, block in enumerate(model.encoder):
        assert block.conv.kernel_size == (kernels[i],) * 2 and block.conv.stride == (2, 2)
        assert block.conv.padding == (kernels[i] // 2,) * 2
        assert (block.conv.in_channels, block.conv.out_channels) == (widths[i], widths[i + 1])
        assert isinstance(block.bn, nn.BatchNorm2d) == (i > 0)
        assert (block.conv.bias is None) == (i > 0)
        assert isinstance(block.act, nn.ReLU)
    for j, block in enumerate(model.decoder):
        i = layers - 1 - j  # decoder[0] is the deepest level
        assert block.conv.kernel_size == (3, 3) and block.conv.stride == (1, 1)
        assert (block.conv.in_channels, block.conv.out_channels) == \
            (widths[i + 1] + widths[i], widths[i])
        assert isinstance(block.bn, nn.BatchNorm2d) == (i > 0)
        assert (block.conv.bias is None) == (i > 0)
        if i > 0:
            assert isinstance(block.act, nn.LeakyReLU) and block.act.negative_slope == 0.2
        else:
            assert isinstance(block.act, nn.Identity)
    assert (model.decoder[-1].conv.in_channels, model.decoder[-1].conv.out_channels) == (67, 3)
    assert model.size_multiple == 2 ** layers


def test_modified_unet_levels_kernels_and_sizes():
    kernels = (5, 3, 7)
    model = ModifiedUNet(3, kernel_sizes=kernels, **SMALL)
    assert model.size_multiple == 4
    sizes = []
    for level in list(model.encoder) + list(model.decoder):
        for block in (level.first, level.second):
            block.register_forward_hook(lambda mod, args, out: sizes.append(out[0].shape[-1]))
    model(*inputs(16, n=1))
    assert sizes == [16, 16, 8, 8, 4, 4, 4, 4, 8, 8, 16, 16]
    encoder, decoder = model.encoder, model.decoder[::-1]  # both in level order 1..3
    for i, k in enumerate(kernels):
        for block in (encoder[i].first, encoder[i].second, decoder[i].first, decoder[i].second):
            assert block.conv.kernel_size == (k, k) and block.conv.padding == (k // 2, k // 2)
            assert block.conv.stride == (1, 1) and block.conv.bias is not None
    acts = [type(b.act) for lv in model.encoder for b in (lv.first, lv.second)]
    assert acts == [nn.ReLU] * 6
    acts = [type(b.act) for lv in model.decoder for b in (lv.first, lv.second)]
    assert acts == [nn.LeakyReLU] * 5 + [nn.Identity]
    assert model.decoder[-1].second.conv.out_channels == 3
    with pytest.raises(ValueError, match="odd kernel size"):
        ModifiedUNet(3, kernel_sizes=(3, 4, 3))
    with pytest.raises(ValueError, match="odd kernel size"):
        ModifiedUNet(3, kernel_sizes=(3, 3))


@pytest.mark.parametrize("model_cls,size", MODELS)
def test_size_errors(model_cls, size):
    model = model_cls(**SMALL)
    assert model.size_multiple == size
    image, mask = inputs(size + 32, n=1)
    with pytest.raises(ValueError, match=rf"{size + 32}x{size + 32}.*multiple of {size}"):
        model(image, mask)
    image, mask = inputs(size, n=2)
    with pytest.raises(ValueError, match="mask must be"):
        model(image, mask.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="mask must be"):
        model(image, mask[..., :-1])
    with pytest.raises(ValueError, match="image must be"):
        model(image[:, :1], mask)
    assert model(image, mask[:1]).shape == image.shape  # a batch-1 mask broadcasts


@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("model_cls,depth", [(PConvUNet, 4), (ModifiedUNet, 3)])
def test_mask_filled_for_every_single_known_pixel(model_cls, depth, multi_channel):
    # 16x16: PConvUNet(4) has a 1x1 bottleneck, ModifiedUNet(3) a 4x4 one. One image per
    # pixel position, with only that pixel known.
    model = model_cls(depth, multi_channel=multi_channel, **SMALL).eval()
    masks = torch.eye(256).view(256, 1, 16, 16)
    image = torch.rand(1, 3, 16, 16).expand(256, -1, -1, -1)
    assert torch.all(final_mask(model, image, masks) == 1)
    assert torch.all(final_mask(model, image[:1], torch.zeros(1, 1, 16, 16)) == 0)
    with torch.no_grad():
        assert torch.all(model(image[:1], torch.zeros(1, 1, 16, 16)) == 0)


@pytest.mark.parametrize("model_cls,size", MODELS)
def test_mask_filled_at_default_depth(model_cls, size):
    # At the size multiple: known corners, centre and edge pixels reach every output.
    model = model_cls(**SMALL).eval()
    last = size - 1
    positions = [(0, 0), (0, last), (last, 0), (last, last), (size // 2, size // 3), (0, 5)]
    masks = torch.zeros(len(positions), 1, size, size)
    for i, (y, x) in enumerate(positions):
        masks[i, 0, y, x] = 1
    image = torch.rand(1, 3, size, size).expand(len(positions), -1, -1, -1)
    assert torch.all(final_mask(model, image, masks) == 1)


def test_mask_filled_at_256_for_paper_hole_ratios():
    # Holes of about 56% (the paper's largest bucket is 50-60%), square or scattered.
    pconv, modified = PConvUNet(**SMALL).eval(), ModifiedUNet(**SMALL).eval()
    masks = torch.ones(4, 1, 256, 256)
    for i, (top, left) in enumerate([(64, 64), (56, 56), (64, 0), (0, 64)]):
        masks[i, :, top:top + 192, left:left + 192] = 0
    g = torch.Generator().manual_seed(0)
    blocks = (torch.rand(2, 1, 16, 16, generator=g) > 0.4).float()
    masks = torch.cat([masks, 1 - blocks.repeat_interleave(16, 2).repeat_interleave(16, 3)])
    assert 0.5 < 1 - masks[4:].mean() < 0.7
    image = torch.rand(1, 3, 256, 256).expand(len(masks), -1, -1, -1)
    assert torch.all(final_mask(pconv, image, masks) == 1)
    assert torch.all(final_mask(modified, image, masks) == 1)


def test_pconv_unet_documented_corner_limit():
    # The paper's network at 256 has a 2x2 bottleneck whose top-left cell sees input rows and
    # columns 0..135 only: a hole over that whole block leaves the corner pixel unfilled.
    model = PConvUNet(**SMALL).eval()
    masks = torch.ones(2, 1, 256, 256)
    masks[0, :, :135, :135] = 0
    masks[1, :, :136, :136] = 0
    final = final_mask(model, torch.rand(2, 3, 256, 256), masks)
    assert torch.all(final[0] == 1)
    assert final[1, 0, 0, 0] == 0 and final[1].sum() == 256 * 256 - 1


@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("model_cls", [PConvUNet, ModifiedUNet])
def test_output_ignores_hole_pixels(model_cls, multi_channel):
    # Partial convs never read a hole: whatever the image holds there, the output is the same.
    model = model_cls(4, multi_channel=multi_channel, **SMALL).eval()
    image, mask = inputs(32)
    noisy = torch.where(mask.bool(), image, torch.randn_like(image) * 100)
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, mask), model(image, mask))


@pytest.mark.parametrize("model_cls,mode", [(PConvUNet, "nearest"), (ModifiedUNet, "bilinear")])
def test_upsampling_of_features_and_masks(model_cls, mode, monkeypatch):
    calls = []
    interpolate = F.interpolate

    def spy(x, **kwargs):
        calls.append((x.shape[1], kwargs))
        return interpolate(x, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    model = model_cls(3, **SMALL).eval()
    seen = []
    for conv in convs(model):
        conv.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 0, 0] = 1  # holes survive down to the bottom and back up
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32), mask)
    want = dict(scale_factor=2, mode=mode)
    if mode == "bilinear":
        want["align_corners"] = False
    assert len(calls) == 2 * (2 if model_cls is ModifiedUNet else 3)
    assert all(kwargs == want for _, kwargs in calls)
    assert [channels for channels, _ in calls[1::2]] == [1] * (len(calls) // 2)  # the masks
    soft = [((m > 0) & (m < 1)).any().item() for m in seen]
    assert any(soft) == (mode == "bilinear")  # bilinear masks are soft


def test_binary_masks_same_in_both_modes():
    # For binary masks a window is known in single-channel mode iff some channel-pixel is
    # known in multi-channel mode: every updated mask agrees.
    image, mask = inputs(128, n=1, hole=0.9)
    masks = {}
    for multi_channel in (False, True):
        model = PConvUNet(multi_channel=multi_channel, **SMALL).eval()
        seen = masks[multi_channel] = []
        for conv in convs(model):
            conv.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out[1]))
        with torch.no_grad():
            model(image, mask)
    assert len(masks[True]) == 14
    for single, multi in zip(masks[False], masks[True]):
        assert single.shape[1] == 1 and torch.equal(single, multi[:, :1])
        assert torch.equal(multi, multi[:, :1].expand_as(multi))


def test_single_channel_concat_masks_each_part_once():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 3, 4, 4, generator=g)
    ma = torch.rand(1, 1, 4, 4, generator=g)
    mb = (torch.rand(1, 1, 4, 4, generator=g) > 0.5).float()
    mb[..., 0, 0] = ma[..., 0, 0] = 0  # a pixel unknown to both parts
    x, m = _concat([(a, ma), (b, mb)], multi_channel=False)
    torch.testing.assert_close(m, torch.maximum(ma, mb))
    # The layer multiplies by m: each part then carries exactly its own mask.
    torch.testing.assert_close(x * m, torch.cat([a * ma, b * mb], 1))
    x, m = _concat([(a, ma), (b, mb)], multi_channel=True)
    assert torch.equal(m, torch.cat([ma.expand(1, 3, 4, 4), mb.expand(1, 3, 4, 4)], 1))


@pytest.mark.parametrize("model_cls,size", MODELS)
def test_conv_layer_keyword(model_cls, size):
    fused = model_cls(**SMALL).eval()
    reference = model_cls(conv_layer=pconv_cuda.ReferencePartialConv2d, **SMALL).eval()
    reference.load_state_dict(fused.state_dict())
    assert all(type(c) is pconv_cuda.ReferencePartialConv2d for c in convs(reference))
    image, mask = inputs(size, n=1)
    with torch.no_grad():
        torch.testing.assert_close(reference(image, mask), fused(image, mask),
                                   rtol=1e-4, atol=1e-4)


def test_freeze_encoder_bn():
    model = PConvUNet(5, **SMALL)
    encoder_bns = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    decoder_bns = [m for m in model.decoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(encoder_bns) == 4 and len(decoder_bns) == 4
    assert model.freeze_encoder_bn() is model
    model.eval().train()
    assert model.training and all(bn.training for bn in decoder_bns)
    assert not any(bn.training for bn in encoder_bns)
    before = [bn.running_mean.clone() for bn in encoder_bns + decoder_bns]
    model(*inputs(32))
    after = [bn.running_mean for bn in encoder_bns + decoder_bns]
    assert all(torch.equal(x, y) for x, y in zip(before[:4], after[:4]))
    assert not any(torch.equal(x, y) for x, y in zip(before[4:], after[4:]))
    assert all(bn.weight.requires_grad for bn in encoder_bns)  # affine parameters still train
    model.freeze_encoder_bn(False)
    assert all(bn.training for bn in encoder_bns)


def test_autocast_bfloat16():
    model = ModifiedUNet(4, **SMALL)
    image, mask = inputs(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, mask)
    out.float().mean().backward()
    assert out.shape == image.shape and torch.isfinite(out).all()


def test_composite():
    image = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    output = torch.tensor([[[[10.0, 20.0], [30.0, 40.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.25, 1.0]]]])
    torch.testing.assert_close(composite(image, mask, output),
                               torch.tensor([[[[1.0, 20.0], [0.25 * 3 + 0.75 * 30, 4.0]]]]))
