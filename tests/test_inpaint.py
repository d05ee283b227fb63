"""The inference core, train/inpaint.py: known pixels bit-identical at any size, padding,
batching, downscaled runs, eval mode, errors."""
from __future__ import annotations

import pytest
import torch

from train.checkpoint import build_model
from train.inpaint import inpaint, pad_to_multiple, resolve_device

SPECS = {
    "pconv": {"kind": "pconv", "layers": 3, "base_channels": 8},
    "modified": {"kind": "modified", "levels": 3, "base_channels": 8},
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def model(request):
    torch.manual_seed(0)
    return build_model(SPECS[request.param]).eval()


def _pair(n, h, w, seed=0, hole=0.3):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, h, w, generator=g)
    mask = (torch.rand(n, 1, h, w, generator=g) > hole).float()
    return image, mask


def _assert_known_identical(result, image, mask):
    known = (mask >= 0.5).expand_as(image)
    assert result.shape == image.shape and result.dtype == image.dtype
    # Bit for bit: equal as integers, so even -0.0 vs 0.0 or NaN would be caught.
    a = result[known].view(torch.int32) if image.dtype == torch.float32 else \
        result[known].view(torch.int64)
    b = image[known].view(torch.int32) if image.dtype == torch.float32 else \
        image[known].view(torch.int64)
    assert torch.equal(a, b)


@pytest.mark.parametrize("size", [(37, 53), (1, 1), (5, 3), (64, 64), (129, 8)])
@pytest.mark.parametrize("padding", ["reflect", "hole"])
def test_known_pixels_bit_identical_odd_sizes(model, size, padding):
    image, mask = _pair(2, *size)
    result = inpaint(model, image, mask, padding=padding)
    _assert_known_identical(result, image, mask)
    holes = (mask < 0.5).expand_as(image)
    assert torch.isfinite(result).all()
    assert result.min() >= 0 and result.max() <= 1
    if holes.any():
        assert not torch.equal(result[holes], image[holes])  # the holes were filled


def test_known_pixels_bit_identical_large(model):
    image, mask = _pair(1, 517, 389, seed=3, hole=0.5)
    result = inpaint(model, image, mask)
    _assert_known_identical(result, image, mask)


@pytest.mark.parametrize("method", ["ns", "telea"])
def test_classical_methods_keep_known_pixels(method):
    image, mask = _pair(2, 37, 53, seed=1)
    result = inpaint(None, image, mask, method=method)
    _assert_known_identical(result, image, mask)
    assert not torch.equal(result, image)


def test_single_image_shapes_and_float64(model):
    image, mask = _pair(1, 37, 53)
    result = inpaint(model, image[0].double(), mask[0])
    assert result.shape == (3, 37, 53) and result.dtype == torch.float64
    _assert_known_identical(result, image[0].double(), mask[0])


def test_soft_mask_is_binarised_at_half(model):
    image, _ = _pair(1, 16, 16)
    mask = torch.full((1, 1, 16, 16), 0.7)
    mask[..., 4:9, 4:9] = 0.3
    result = inpaint(model, image, mask)
    _assert_known_identical(result, image, mask)
    assert not torch.equal(result[..., 4:9, 4:9], image[..., 4:9, 4:9])


def test_nan_output_never_reaches_known_pixels():
    class NanNet(torch.nn.Module):
        size_multiple = 4

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, image, mask):
            return torch.full_like(image, float("nan"))

    image, mask = _pair(1, 9, 11)
    result = inpaint(NanNet(), image, mask)
    _assert_known_identical(result, image, mask)


def test_batching_and_broadcast_mask_match_single_calls(model):
    image, mask = _pair(5, 24, 40, seed=2)
    batched = inpaint(model, image, mask, batch_size=2)
    single = torch.stack([inpaint(model, image[i], mask[i]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    shared = inpaint(model, image, mask[:1], batch_size=3)
    for i in range(5):
        _assert_known_identical(shared[i:i + 1], image[i:i + 1], mask[:1])


def test_no_holes_and_empty_batch_are_copies(model):
    image, _ = _pair(2, 10, 10)
    out = inpaint(model, image, torch.ones(2, 1, 10, 10))
    assert torch.equal(out, image) and out.data_ptr() != image.data_ptr()
    empty = inpaint(model, image[:0], torch.ones(0, 1, 10, 10))
    assert empty.shape == (0, 3, 10, 10)


def test_max_side_runs_downscaled_and_keeps_known_pixels(model, monkeypatch):
    image, mask = _pair(1, 203, 97, seed=4)
    seen = []
    forward = type(model).forward

    def spy(self, x, m):
        seen.append(tuple(x.shape[-2:]))
        return forward(self, x, m)

    monkeypatch.setattr(type(model), "forward", spy)
    result = inpaint(model, image, mask, max_side=50)
    _assert_known_identical(result, image, mask)
    assert max(seen[0]) <= 50 + model.size_multiple  # padded up from at most 50
    assert result.shape == image.shape


def test_model_runs_in_eval_mode_without_grad_and_mode_is_restored():
    torch.manual_seed(0)
    net = build_model(SPECS["pconv"])
    net.train()
    image, mask = _pair(2, 16, 16)
    modes = []
    handle = net.register_forward_pre_hook(lambda mod, args: modes.append(
        (mod.training, torch.is_grad_enabled())))
    result = inpaint(net, image, mask)
    handle.remove()
    assert modes == [(False, False)]
    assert net.training and not result.requires_grad


def test_amp_bf16_runs_the_network_in_bfloat16(model):
    """amp="bf16": the partial convolutions run in bfloat16 (seen in their outputs; their
    inputs may come from float32 ops such as bilinear upsampling), the fill stays close to
    float32's, and the known pixels are still the input's bits."""
    image, mask = _pair(2, 40, 56, seed=5)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out[0].dtype))
             for m in model.modules() if type(m).__name__ == "PartialConv2d"]
    try:
        fp32 = inpaint(model, image, mask)
        assert set(seen) == {torch.float32}
        seen.clear()
        bf16 = inpaint(model, image, mask, amp="bf16")
        assert set(seen) == {torch.bfloat16}
    finally:
        for h in hooks:
            h.remove()
    _assert_known_identical(bf16, image, mask)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    holes = (mask < 0.5).expand_as(image)
    assert not torch.equal(bf16[holes], fp32[holes])  # it did run in another precision
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.05)


def test_amp_errors(model):
    image, mask = _pair(1, 16, 16)
    with pytest.raises(ValueError, match="amp must be one of"):
        inpaint(model, image, mask, amp="float16")
    with pytest.raises(ValueError, match="'fp16' is for CUDA devices"):
        inpaint(model, image, mask, amp="fp16")
    # Classical methods ignore amp, but a bad value is still an error.
    with pytest.raises(ValueError, match="amp must be one of"):
        inpaint(None, image, mask, method="ns", amp="half")


def test_pad_to_multiple_reflects_image_and_mask_together():
    image = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    mask = torch.ones(2, 1, 5, 6)
    mask[:, :, 1, 1] = 0
    img_p, mask_p, (top, bottom, left, right) = pad_to_multiple(image, mask, 4)
    assert img_p.shape[-2:] == (8, 8) and mask_p.shape[-2:] == (8, 8)
    assert (top, bottom, left, right) == (1, 2, 1, 1)  # split evenly, extra pixel after
    assert torch.equal(img_p[..., top:top + 5, left:left + 6], image)
    assert torch.equal(img_p[..., 0, left:left + 6], image[..., 1, :])  # row -1 = row 1
    # The hole at (1, 1) sits at padded (2, 2) and is mirrored with the image into the
    # padding row 0 and column 0: a hole stays a hole in its mirror image.
    holes = sorted(map(tuple, (mask_p[0, 0] == 0).nonzero().tolist()))
    assert holes == [(0, 0), (0, 2), (2, 0), (2, 2)]
    hole = pad_to_multiple(image, mask, 4, mode="hole")[1]
    assert hole[..., 0, :].sum() == 0 and hole[..., top:top + 5, left:left + 6].equal(mask)


def test_pad_to_multiple_tiny_image_falls_back_to_replicate():
    image = torch.rand(1, 3, 2, 1)
    mask = torch.ones(1, 1, 2, 1)
    img_p, mask_p, pads = pad_to_multiple(image, mask, 8)
    assert img_p.shape[-2:] == (8, 8) and mask_p.shape[-2:] == (8, 8)
    assert torch.equal(img_p[..., pads[0]:pads[0] + 2, pads[2]:pads[2] + 1], image)


def test_errors_name_the_shapes(model):
    image, mask = _pair(2, 8, 8)
    with pytest.raises(ValueError, match=r"mask must be \[2 or 1, 1, 8, 8\]"):
        inpaint(model, image, mask[:, :, :4])
    with pytest.raises(ValueError, match=r"image must be"):
        inpaint(model, image[:, :2], mask)
    with pytest.raises(ValueError, match="needs a model"):
        inpaint(None, image, mask)
    with pytest.raises(ValueError, match="method must be one of"):
        inpaint(model, image, mask, method="magic")
    with pytest.raises(ValueError, match="padding must be"):
        inpaint(model, image, mask, padding="zeros")
    with pytest.raises(ValueError, match="float tensor"):
        inpaint(model, (image * 255).to(torch.uint8), mask)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_gpu_inputs_on_cpu(monkeypatch):
    # Full float32 convolutions on the GPU (cuDNN's default TF32 differs from the CPU's
    # float32 by up to 5e-4 here).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    net = build_model(SPECS["pconv"]).cuda().eval()
    image, mask = _pair(3, 37, 53)
    result = inpaint(net, image, mask, batch_size=2)
    assert result.device.type == "cpu"
    _assert_known_identical(result, image, mask)
    on_cpu = inpaint(net.cpu(), image, mask)
    torch.testing.assert_close(result, on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_on_gpu(amp):
    """16-bit inference on the GPU: the fill stays close to float32's and finite (float16
    ratios of empty windows would be Inf; the op keeps them in float32), the known pixels
    exact."""
    torch.manual_seed(0)
    net = build_model(SPECS["pconv"]).cuda().eval()
    image, mask = _pair(2, 64, 48, seed=9, hole=0.6)
    fp32 = inpaint(net, image, mask)
    half = inpaint(net, image, mask, amp=amp)
    _assert_known_identical(half, image, mask)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, fp32, rtol=0, atol=0.05)
