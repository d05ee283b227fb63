"""What one benchmark row runs: the competing implementations of a partial-conv layer, and
a whole training step of the PConv UNet."""
from __future__ import annotations

import functools
import math
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


# Dynamo's limits on graphs per code object and per process: every row of the
# torch.compile column is a new static graph of the same function, hundreds in a GPU run.
GRAPH_LIMIT = 1 << 16


class EagerFallback(RuntimeError):
    """torch.compile ran the reference eagerly: its row would time eager code."""


def _allow_a_graph_per_row() -> None:
    """Raise Dynamo's recompile limits past the rows of any run, and make a limit that is
    hit anyway an error. Past a limit Dynamo otherwise runs the function eagerly, silently:
    the per-process limit (``accumulated_recompile_limit``, 256 graphs in torch 2.13) is
    reached within a third of a GPU table. The names differ between torch versions (older
    ones say ``cache_size``), so each is set where it exists."""
    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), GRAPH_LIMIT))
    # Dynamo refuses this flag together with suppress_errors; the probe in
    # _reference_compiled_only catches an eager run either way.
    if hasattr(config, "fail_on_recompile_limit_hit") and not config.suppress_errors:
        config.fail_on_recompile_limit_hit = True


def _reference_compiled_only(x, m, w, b, stride, padding):
    """The reference, for torch.compile, raising :class:`EagerFallback` if it ever runs
    outside a compiled graph. Dynamo reads ``is_compiling()`` as True while it traces, so
    the branch is not in the graph and costs the compiled calls nothing; it runs only where
    Dynamo gave up on the frame and called it as plain Python (a recompile limit, a
    suppressed error)."""
    if not torch.compiler.is_compiling():
        raise EagerFallback("torch.compile ran the reference eagerly, not a compiled graph "
                            "(a recompile limit hit?)")
    return reference.partial_conv2d(x, m, w, b, stride, padding)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    # One static graph per layer shape (dynamic shapes hit an Inductor range error on the
    # convolution's output size in torch 2.13).
    _allow_a_graph_per_row()
    return torch.compile(_reference_compiled_only, dynamic=False)


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
    sets = []
    x_size, m_size, gy_size = _input_sizes(shape, batch, mode)
    for _ in range(count):
        x = torch.randn(x_size, generator=g, device=device)
        m = torch.rand(m_size, generator=g, device=device) > 0.3
        gy = torch.randn(gy_size, generator=g, device=device)
        sets.append(tuple(t.to(dtype=dtype) for t in (x, m, gy)))
    return sets


def _input_sizes(shape: LayerShape, batch: int, mode: str):
    """Sizes of x, the mask (C_in channels for "multi" masks, 1 for "single") and the
    output's gradient."""
    mask_c = shape.c_in if mode == "multi" else 1
    return ((batch, shape.c_in, shape.h, shape.w), (batch, mask_c, shape.h, shape.w),
            (batch, shape.c_out, *shape.out_hw))


def input_set_bytes(shape: LayerShape, batch: int, mode: str, dtype) -> int:
    """Bytes of one input set of :func:`make_inputs`."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(size) for size in _input_sizes(shape, batch, mode)) * element


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
