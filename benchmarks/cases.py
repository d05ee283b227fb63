"""What one benchmark row runs: the competing implementations of a partial-conv layer, and
a whole training step of the PConv UNet."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

import pconv_cuda
from pconv_cuda import reference

from .shapes import LayerShape

# name -> fn(x, mask, weight, bias, stride, padding) -> output. "conv" ignores the mask:
# it is the plain nn.Conv2d of the same shape, the floor the fused op chases.
Impl = Callable[..., torch.Tensor]


def _conv(x, m, w, b, stride, padding):
    return F.conv2d(x, w, b, stride, padding)


def _first(fn):
    @functools.wraps(fn)
    def run(x, m, w, b, stride, padding):
        return fn(x, m, w, b, stride, padding)[0]
    return run


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    # One static graph per layer shape (dynamic shapes hit an Inductor range error on the
    # convolution's output size in torch 2.13); allow a recompile for every shape.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    return torch.compile(reference.partial_conv2d, dynamic=False)


def implementations(names) -> dict[str, Impl]:
    table = {
        "conv": _conv,
        "fused": _first(pconv_cuda.partial_conv2d),
        "reference": _first(reference.partial_conv2d),
        "lean": _first(reference.lean_partial_conv2d),
        "compiled": lambda *a: _compiled_reference()(*a)[0],
    }
    return {n: table[n] for n in names}


def make_inputs(shape: LayerShape, batch: int, mode: str, dtype, device, count: int,
                seed: int = 0):
    """``count`` independent input sets ``(x, mask, grad_out)`` of random data (never
    zeros) for one layer; masks have 1 = known, 0 = hole, about 30 % holes.

    Drawn on ``device`` with its own generator: at 512x512 and batch 8 one set holds up
    to 400 M values, which a CPU takes seconds to draw for every row of a GPU table."""
    g = torch.Generator(device=device).manual_seed(seed)
    out_h = (shape.h + 2 * shape.padding - shape.kernel) // shape.stride + 1
    out_w = (shape.w + 2 * shape.padding - shape.kernel) // shape.stride + 1
    mask_c = shape.c_in if mode == "multi" else 1
    sets = []
    for _ in range(count):
        x = torch.randn(batch, shape.c_in, shape.h, shape.w, generator=g, device=device)
        m = torch.rand(batch, mask_c, shape.h, shape.w, generator=g, device=device) > 0.3
        gy = torch.randn(batch, shape.c_out, out_h, out_w, generator=g, device=device)
        sets.append(tuple(t.to(dtype=dtype) for t in (x, m, gy)))
    return sets


WEIGHT_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def make_params(shape: LayerShape, dtype, device, seed: int = 1, weights: str = "nchw"):
    """(weight, bias) of one layer, leaves that require grad; ``weights`` is the weight's
    memory format (``channels_last``: what ``model.to(memory_format=torch.channels_last)``
    leaves), the same values either way."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    fan_in = shape.c_in * shape.kernel ** 2
    w = torch.randn(shape.c_out, shape.c_in, shape.kernel, shape.kernel, generator=g) / fan_in ** 0.5
    b = torch.randn(shape.c_out, generator=g) if shape.bias else None
    w = w.to(device=device, dtype=dtype, memory_format=WEIGHT_FORMATS[weights])
    w.requires_grad_(True)
    if b is not None:
        b = b.to(device=device, dtype=dtype).requires_grad_(True)
    return w, b


def forward_call(impl: Impl, shape: LayerShape, w, b):
    """Inference: forward only, no autograd graph."""
    def run(inputs):
        x, m, _ = inputs
        with torch.no_grad():
            return impl(x, m, w, b, shape.stride, shape.padding)
    return run


def train_call(impl: Impl, shape: LayerShape, w, b):
    """Forward and backward to the input, weight and bias (a middle layer of a UNet)."""
    params = [w] + ([b] if b is not None else [])

    def run(inputs):
        x, m, gy = inputs
        x = x.detach().requires_grad_(True)
        out = impl(x, m, w, b, shape.stride, shape.padding)
        return torch.autograd.grad(out, [x, *params], gy)
    return run


def unet_train_step(conv_layer, size: int, batch: int, device, dtype, *, layers=None,
                    base_channels: int = 64, multi_channel: bool = False, seed: int = 0,
                    weights: str = "nchw"):
    """One training step (forward, loss, backward, Adam) of the PConv UNet built on
    ``conv_layer``; returns a zero-argument callable. The loss is the full inpainting loss
    with a randomly initialised VGG16 (timing does not depend on its weights). ``weights``
    is the memory format of the UNet's weights; images and masks stay NCHW."""
    import warnings

    from train.losses import InpaintingLoss
    from train.models import PConvUNet
    from train.vgg import VGG16Features

    torch.manual_seed(seed)
    levels = layers if layers is not None else (8 if size >= 512 else 7)
    model = PConvUNet(levels, base_channels=base_channels, conv_layer=conv_layer,
                      multi_channel=multi_channel).to(device,
                                                      memory_format=WEIGHT_FORMATS[weights])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = VGG16Features.from_pretrained("/nonexistent", allow_random=True)
    loss_fn = InpaintingLoss(vgg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    g = torch.Generator(device="cpu").manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g).to(device)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.3).float().to(device)
    amp = dtype in (torch.bfloat16, torch.float16)

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=amp):
                out = model(image * mask, mask)
                total, _ = loss_fn(image, mask, out.float())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total

    return step
