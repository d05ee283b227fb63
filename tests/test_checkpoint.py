"""train.checkpoint: round trip, atomic writes, clear errors for missing, truncated, foreign
and mismatched files, and finding a run's checkpoints."""
from __future__ import annotations

import pickle

import pytest
import torch

from train import checkpoint
from train.checkpoint import (CheckpointError, build_model, checkpoint_name, latest_checkpoint,
                              list_checkpoints, load_checkpoint, load_model, resolve_checkpoint,
                              save_checkpoint)
from train.models import ModifiedUNet, PConvUNet

SPEC = {"kind": "pconv", "layers": 2, "base_channels": 4, "max_channels": 8}


def payload(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(SPEC)
    return {"model_spec": dict(SPEC), "model": model.state_dict(), "step": 7,
            "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]},
            "nested": {"tuple": (1, 2.5, "x"), "none": None}}


class Foreign:
    """A class the weights-only unpickler refuses."""


def test_roundtrip_and_load_model(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    data = payload()
    save_checkpoint(path, data)
    loaded = load_checkpoint(path)
    assert loaded["format"] == "pconv-checkpoint" and loaded["version"] == checkpoint.VERSION
    assert loaded["step"] == 7 and loaded["nested"] == {"tuple": (1, 2.5, "x"), "none": None}
    assert all(torch.equal(loaded["model"][k], v) for k, v in data["model"].items())
    model, ckpt = load_model(path)
    assert isinstance(model, PConvUNet) and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in data["model"].items())
    assert ckpt["step"] == 7


def test_save_requires_model_and_spec(tmp_path):
    with pytest.raises(ValueError, match="lacks \\['model_spec'\\]"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}})


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, payload(0))
    before = path.read_bytes()

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # a write that stops in the middle
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, payload(1))
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left


def test_missing_truncated_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "none.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, payload())
    data = good.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(bad)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(text)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_files(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    with pytest.raises(CheckpointError, match="not a pconv checkpoint.*state_dict"):
        load_checkpoint(plain)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a pconv checkpoint.*Tensor"):
        load_checkpoint(tensor)
    objects = tmp_path / "objects.pt"
    torch.save({"format": "pconv-checkpoint", "obj": Foreign()}, objects)
    with pytest.raises(CheckpointError, match="other than tensors and plain data"):
        load_checkpoint(objects)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"format": "pconv-checkpoint"}))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    newer = tmp_path / "newer.pt"
    torch.save({**payload(), "format": "pconv-checkpoint", "version": 99}, newer)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(newer)


def test_load_model_mismatch(tmp_path):
    path = tmp_path / "ck.pt"
    data = payload()
    data["model_spec"] = {**SPEC, "base_channels": 8}  # weights were made with 4
    save_checkpoint(path, data)
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(path)
    data["model_spec"] = {"kind": "unet3000"}
    save_checkpoint(path, data)
    with pytest.raises(CheckpointError, match="model kind must be one of"):
        load_model(path)


def test_build_model():
    assert isinstance(build_model({"kind": "modified", "levels": 2, "kernel_sizes": [3, 5],
                                   "base_channels": 4}), ModifiedUNet)
    with pytest.raises(ValueError, match="bad model description"):
        build_model({"kind": "pconv", "levels": 3})


def test_finding_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None and list_checkpoints(run) == []
    folder = run / checkpoint.CHECKPOINT_DIR
    for step in (20, 3, 100):
        save_checkpoint(folder / checkpoint_name(step), payload())
    (folder / ".step_00000200.pt.abc.tmp").write_bytes(b"unfinished")
    (folder / "step_final.pt").write_bytes(b"other")
    assert [s for s, _ in list_checkpoints(run)] == [3, 20, 100]
    assert latest_checkpoint(run) == folder / "step_00000100.pt"
    assert latest_checkpoint(folder) == folder / "step_00000100.pt"
    assert resolve_checkpoint(run) == folder / "step_00000100.pt"
    assert resolve_checkpoint(folder / "step_00000003.pt") == folder / "step_00000003.pt"
    with pytest.raises(CheckpointError, match="no checkpoints"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "missing.pt")
