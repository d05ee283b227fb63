"""The partial-convolution layer shapes the benchmarks measure, read off the real models.

Shapes come from running the UNets of ``train.models`` on the meta device with a hook on
every partial-conv layer, so they follow the models as they change and cost no compute.
"""
from __future__ import annotations

import dataclasses

import torch

import pconv_cuda


@dataclasses.dataclass(frozen=True, order=True)
class LayerShape:
    """One partial-conv call: input ``[batch, c_in, h, w]``, weight ``[c_out, c_in, k, k]``."""

    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    h: int
    w: int
    bias: bool = True

    @property
    def label(self) -> str:
        return (f"{self.c_in}->{self.c_out} k{self.kernel} s{self.stride} @{self.h}"
                + ("" if self.h == self.w else f"x{self.w}"))

    @property
    def out_hw(self) -> tuple[int, int]:
        """Height and width of the output."""
        return ((self.h + 2 * self.padding - self.kernel) // self.stride + 1,
                (self.w + 2 * self.padding - self.kernel) // self.stride + 1)


def layer_shapes(model: torch.nn.Module, size: int) -> list[LayerShape]:
    """Distinct shapes of the ``PartialConv2d`` layers of ``model`` for a ``size``² input,
    in the order the forward pass meets them."""
    seen: dict[LayerShape, None] = {}

    def hook(module, args, _out):
        x = args[0]
        shape = LayerShape(module.in_channels, module.out_channels, module.kernel_size[0],
                           module.stride[0], module.padding[0], x.shape[2], x.shape[3],
                           module.bias is not None)
        seen.setdefault(shape, None)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, pconv_cuda.PartialConv2d)]
    try:
        model = model.to("meta")
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device="meta"),
                  torch.empty(1, 1, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return list(seen)


def unet_layer_shapes(size: int, which=("pconv", "modified")) -> dict[str, list[LayerShape]]:
    """Layer shapes of the PConv UNet (Liu et al.) and of the modified 7-level UNet at a
    ``size``² input; the PConv UNet gets 8 levels at 512 and above, as in the paper."""
    from train.models import ModifiedUNet, PConvUNet

    out = {}
    if "pconv" in which:
        out["pconv"] = layer_shapes(PConvUNet(layers=8 if size >= 512 else 7), size)
    if "modified" in which:
        out["modified"] = layer_shapes(ModifiedUNet(), size)
    return out


def distinct(shapes: dict[str, list[LayerShape]]) -> list[tuple[str, LayerShape]]:
    """``(model, shape)`` pairs without repeats across models (the first model to use a
    shape names it)."""
    seen: dict[LayerShape, str] = {}
    for model, layer_list in shapes.items():
        for s in layer_list:
            seen.setdefault(s, model)
    return [(m, s) for s, m in seen.items()]


@dataclasses.dataclass(frozen=True)
class PlannedShape:
    """A layer shape to measure once, shown under the first UNet (``size``, ``model``) of
    the plan that has it; ``also_in`` names the other (size, model) UNets that have it."""

    size: int
    model: str
    shape: LayerShape
    also_in: tuple[tuple[int, str], ...] = ()


def distinct_across_sizes(sizes, models=("pconv", "modified")) -> list[PlannedShape]:
    """Every layer shape of the UNets at ``sizes`` once, in the order of ``sizes`` and then
    of the models. The deep layers of a UNet do not depend on its input size (512→512 k3
    s2 @4 is in both the 256² and the 512² PConv UNet), and timing them twice would only
    spend device time on the same measurement."""
    where: dict[LayerShape, list[tuple[int, str]]] = {}
    for size in sizes:
        for model, shapes in unet_layer_shapes(size, which=models).items():
            for s in shapes:
                where.setdefault(s, []).append((size, model))
    return [PlannedShape(places[0][0], places[0][1], s, tuple(places[1:]))
            for s, places in where.items()]
