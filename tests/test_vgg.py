"""VGG16 feature extractor: torchvision-format loading, features, errors, random weights."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from train import vgg as vgg_module
from train.vgg import VGG16_FILENAME, VGG16_URL, VGG16Features

# Every parameter of torchvision's vgg16(): conv index -> (C_out, C_in), linear -> (out, in).
CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128),
         12: (256, 256), 14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512),
         24: (512, 512), 26: (512, 512), 28: (512, 512)}
LINEARS = {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}
# The convs before pool1, pool2 and pool3.
STAGES = [(0, 2), (5, 7), (10, 12, 14)]


def torchvision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly torchvision vgg16's keys and shapes. The layers up to pool3
    are random; the rest are one zero expanded to full shape, which keeps the shapes exact
    but the file tiny (torch.save stores the one-element storage)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, (c_out, c_in) in CONVS.items():
        if index <= 14:
            state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.1
            state[f"features.{index}.bias"] = torch.randn(c_out, generator=g) * 0.1
        else:
            state[f"features.{index}.weight"] = torch.zeros(()).expand(c_out, c_in, 3, 3)
            state[f"features.{index}.bias"] = torch.zeros(()).expand(c_out)
    for index, (out, inp) in LINEARS.items():
        state[f"classifier.{index}.weight"] = torch.zeros(()).expand(out, inp)
        state[f"classifier.{index}.bias"] = torch.zeros(()).expand(out)
    return state


def expected_pools(state, x):
    """pool1..3 computed straight from the state dict, torchvision's layer order."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    pools = []
    for stage in STAGES:
        for index in stage:
            x = F.relu(F.conv2d(x, state[f"features.{index}.weight"],
                                state[f"features.{index}.bias"], padding=1))
        x = F.max_pool2d(x, 2)
        pools.append(x)
    return pools


def test_round_trip_from_path(tmp_path):
    state = torchvision_state_dict()
    path = tmp_path / VGG16_FILENAME
    torch.save(state, path)
    assert path.stat().st_size < 20_000_000
    model = VGG16Features.from_pretrained(path)
    assert model.pretrained
    assert set(model.state_dict()) == {f"features.{i}.{p}" for i in CONVS if i <= 14
                                       for p in ("weight", "bias")}
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        got = model(x)
    want = expected_pools(state, x)
    assert [tuple(p.shape) for p in got] == [(2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_loads_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    state = torchvision_state_dict(seed=1)
    torch.save(state, tmp_path / "checkpoints" / VGG16_FILENAME)
    model = VGG16Features.from_pretrained()
    torch.testing.assert_close(model.features[14].weight, state["features.14.weight"])


def test_missing_weights_error_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        VGG16Features.from_pretrained()
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILENAME) in message
    assert VGG16_URL in message and "allow_random=True" in message
    missing = tmp_path / "elsewhere.pth"
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        VGG16Features.from_pretrained(missing)


def test_rejects_foreign_state_dict(tmp_path):
    state = torchvision_state_dict()
    state["features.5.weight"] = torch.zeros(128, 32, 3, 3)
    del state["features.12.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"features\.12\.bias.*features\.5\.weight"):
        VGG16Features.from_pretrained(tmp_path / "bad.pth")


def test_random_weights_only_on_request_and_warn_every_use(tmp_path, caplog):
    model = VGG16Features.from_pretrained(tmp_path / "absent.pth", allow_random=True)
    assert not model.pretrained
    x = torch.rand(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger=vgg_module.__name__):
        for _ in range(2):
            with pytest.warns(RuntimeWarning, match="RANDOM weights"):
                model(x)
    assert sum("RANDOM weights" in r.getMessage() for r in caplog.records) >= 2


def test_frozen_and_always_eval():
    model = VGG16Features()
    assert all(not p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    with pytest.warns(RuntimeWarning):
        pools = model(x)
    sum(p.sum() for p in pools).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
