"""pytest-benchmark view of the same measurements (not part of the default test run):

    pytest benchmarks/ --benchmark-only [--benchmark-group-by=param:shape]

Each layer shape of the PConv UNet at 256x256 is timed for every implementation, forward
and forward + backward; batch 8 on a GPU, 1 on the CPU.
"""
import pytest
import torch

from benchmarks import cases
from benchmarks.shapes import unet_layer_shapes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 8 if DEVICE == "cuda" else 1
SHAPES = unet_layer_shapes(256, which=("pconv",))["pconv"]
IMPLS = ["conv", "fused", "reference", "lean"] + (["compiled"] if DEVICE == "cuda" else [])


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["single", "multi"])
@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.label for s in SHAPES])
def test_layer(benchmark, shape, impl, pass_name, mode):
    inputs = cases.make_inputs(shape, BATCH, mode, torch.float32, DEVICE, count=3)
    w, b = cases.make_params(shape, torch.float32, DEVICE)
    make = cases.forward_call if pass_name == "fwd" else cases.train_call
    call = make(cases.implementations([impl])[impl], shape, w, b)
    state = {"i": 0}

    def run():
        state["i"] += 1
        out = call(inputs[state["i"] % len(inputs)])
        _sync()
        return out

    benchmark.group = f"{shape.label} {mode} {pass_name}"
    benchmark.pedantic(run, warmup_rounds=2, rounds=10, iterations=1)
