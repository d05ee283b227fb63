"""Object removal (train/apps/remove.py, train/apps/segment.py): class names, the colour
stand-in segmenter, the torchvision loader (with a fake torchvision on every machine and
the real one where it imports), and pconv-remove end to end on CPU."""
from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from train.apps import segment
from train.apps.remove import comparison_strip, main, removal_mask
from train.apps.segment import (VOC_CLASSES, Segmenter, SegmenterError,
                                TorchvisionSegmenter, class_mask, make_segmenter, parse_classes)
from train.images import load_image, load_mask, save_image

PERSON, CAR = VOC_CLASSES.index("person"), VOC_CLASSES.index("car")
# Where the synthetic picture has its red "person" and blue "car".
RED = (slice(20, 36), slice(30, 51))
BLUE = (slice(45, 56), slice(5, 16))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def scene(tmp_path):
    """A 64x80 PNG: grey noise (never near pure red or blue), a red and a blue block."""
    g = torch.Generator().manual_seed(0)
    image = 0.2 + 0.25 * torch.rand(3, 64, 80, generator=g)
    image[:, RED[0], RED[1]] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    image[:, BLUE[0], BLUE[1]] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    path = tmp_path / "scene.png"
    save_image(image, path)
    return path


def _expected_hole(block, dilate, h=64, w=80):
    hole = torch.zeros(h, w, dtype=torch.bool)
    r = dilate // 2
    rows, cols = block
    hole[max(rows.start - r, 0):rows.stop + r, max(cols.start - r, 0):cols.stop + r] = True
    return hole


def test_parse_classes_names_aliases_and_errors():
    assert parse_classes("person,car") == [PERSON, CAR]
    assert parse_classes(["Person", " car ", "person"]) == [PERSON, CAR]
    assert parse_classes("airplane,tv,Dining Table,potted-plant") == [
        VOC_CLASSES.index(c) for c in ("aeroplane", "tvmonitor", "diningtable", "pottedplant")]
    with pytest.raises(ValueError, match=r"unknown class 'persn' \(did you mean person\?\); "
                                         r"choose from: aeroplane, bicycle"):
        parse_classes("persn")
    with pytest.raises(ValueError, match="background"):
        parse_classes("background")
    with pytest.raises(ValueError, match="no class given"):
        parse_classes(" , ")
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"


def test_class_mask_and_color_segmenter(scene):
    image = load_image(scene)
    seg = make_segmenter("color:person=ff0000,car=#0000FF,tol=30")
    assert isinstance(seg, Segmenter) and seg.classes == VOC_CLASSES
    labels = seg(image)
    assert labels.shape == (64, 80) and labels.dtype == torch.long
    assert (labels[RED] == PERSON).all() and (labels[BLUE] == CAR).all()
    assert (labels == 0).sum() == 64 * 80 - 16 * 21 - 11 * 11
    mask = class_mask(labels, [PERSON])
    assert mask.shape == (1, 64, 80) and mask.dtype == torch.float32
    assert (mask[0][RED] == 0).all() and mask.sum() == 64 * 80 - 16 * 21
    dilated = removal_mask(seg, image, [PERSON, CAR], dilate=5)
    expected = _expected_hole(RED, 5) | _expected_hole(BLUE, 5)
    assert torch.equal(dilated[0] == 0, expected)


@pytest.mark.parametrize("spec, message", [
    ("color:", "at least one"),
    ("color:person=red", "6 hex digits"),
    ("color:persn=ff0000", "did you mean person"),
    ("color:person", "NAME=RRGGBB"),
    ("resnet", "unknown segmenter"),
])
def test_segmenter_spec_errors(spec, message):
    with pytest.raises(SegmenterError, match=message):
        make_segmenter(spec)


def test_comparison_strip_layout():
    panels = [torch.full((3, 5, 7), v) for v in (0.1, 0.2, 0.3, 0.4)]
    strip = comparison_strip(panels, gutter=2)
    assert strip.shape == (3, 5, 4 * 7 + 3 * 2)
    assert torch.equal(strip[:, :, 7:9], torch.ones(3, 5, 2))
    assert torch.equal(strip[:, :, 27:], panels[3])


def test_remove_end_to_end_with_color_segmenter(scene, tmp_path, checkpoint, capsys):
    out = tmp_path / "clean.png"
    rc = main([str(scene), "--classes", "person,car", "--segmenter",
               "color:person=ff0000,car=0000ff", "-o", str(out), "--checkpoint",
               str(checkpoint), "--dilate", "5", "--save-mask", str(tmp_path / "mask.png"),
               "--amp", "bf16"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "removed person, car" in err
    image, result = load_image(scene), load_image(out)
    hole = _expected_hole(RED, 5) | _expected_hole(BLUE, 5)
    assert torch.equal(load_mask(tmp_path / "mask.png")[0] == 0, hole)
    known = (~hole).expand(3, -1, -1)
    assert torch.equal(result[known], image[known])  # untouched outside the holes
    # The red and blue blocks are gone: nothing in the holes is still pure red / blue.
    assert not (result[:, RED[0], RED[1]] == torch.tensor([1.0, 0, 0])[:, None, None]).all(0).any()
    strip = load_image(tmp_path / "clean_strip.png")
    assert strip.shape == (3, 64, 4 * 80 + 3 * 4)
    assert torch.equal(strip[:, :, :80], image)
    assert torch.equal(strip[:, :, 2 * 84:2 * 84 + 80], result)
    masked = strip[:, :, 84:164]
    assert (masked[:, hole] == 1).all()  # holes drawn white in the mask panel


def test_remove_nothing_found_is_an_error_unless_allowed(scene, tmp_path, capsys):
    out = tmp_path / "o.png"
    # Green is a colour the scene does not have: the segmenter finds no dog.
    args = [str(scene), "--classes", "dog", "--segmenter", "color:dog=00ff00", "-o", str(out),
            "--method", "ns"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "no dog found" in err and "nothing written" in err and "--allow-empty" in err
    assert not out.exists() and not (tmp_path / "o_strip.png").exists()
    assert main(args + ["--allow-empty"]) == 0
    err = capsys.readouterr().err
    assert "no dog found" in err and "removed" not in err
    assert torch.equal(load_image(out), load_image(scene))


def test_remove_refuses_a_class_the_colour_segmenter_cannot_find(scene, tmp_path, capsys):
    rc = main([str(scene), "--classes", "person,dog", "--segmenter", "color:person=ff0000",
               "-o", str(tmp_path / "o.png"), "--method", "ns"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "no colour for dog (it has person)" in err and "color:dog=RRGGBB" in err
    assert not (tmp_path / "o.png").exists()


def test_remove_warns_about_a_hole_over_half_the_image(scene, tmp_path, capsys):
    args = [str(scene), "--classes", "person", "--segmenter", "color:person=ff0000", "-o",
            str(tmp_path / "o.png"), "--method", "ns"]
    assert main(args) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(args + ["--dilate", "41"]) == 0
    err = capsys.readouterr().err
    assert "the hole covers" in err and "--dilate 41" in err


@pytest.mark.parametrize("outputs, message", [
    (["-o", "{scene}"], "-o {scene} is the input image"),
    (["-o", "{tmp}/r.png", "--strip", "{scene}"], "--strip {scene} is the input image"),
    (["-o", "{tmp}/r.png", "--strip", "{tmp}/r.png"], "-o and --strip are both"),
    (["-o", "{tmp}/r.png", "--save-mask", "{tmp}/r.png"], "-o and --save-mask are both"),
    (["-o", "{tmp}/r.png", "--save-mask", "{tmp}/r_strip.png"], "--strip and --save-mask"),
    (["-o", "{tmp}/r.png", "--save-mask", "{tmp}/./../{name}/r_strip.png"],
     "--strip and --save-mask"),
])
def test_remove_outputs_never_overwrite_the_input_or_each_other(scene, tmp_path, capsys,
                                                                 outputs, message):
    fill = dict(scene=scene, tmp=tmp_path, name=tmp_path.name)
    before = scene.read_bytes()
    rc = main([str(scene), "--classes", "person", "--segmenter", "color:person=ff0000",
               "--method", "ns"] + [o.format(**fill) for o in outputs])
    assert rc == 1
    assert message.format(**fill) in capsys.readouterr().err
    assert scene.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]


def test_remove_takes_a_run_folder_and_keeps_transparency(scene, tmp_path, checkpoint, capsys):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "step_00000001.pt").write_bytes(b"an older, broken checkpoint")
    shutil.copy(checkpoint, run / "step_00000002.pt")
    rgba = np.array(Image.open(scene).convert("RGBA"))
    rgba[:4, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "see_through.png")
    out = tmp_path / "o.png"
    rc = main([str(tmp_path / "see_through.png"), "--classes", "person", "--segmenter",
               "color:person=ff0000", "-o", str(out), "--checkpoint", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out))[..., 3], rgba[..., 3])
    assert main([str(scene), "--classes", "person", "--segmenter", "color:person=ff0000",
                 "-o", str(tmp_path / "o.jpg"), "--method", "ns"]) == 0
    assert ".jpg is a lossy format" in capsys.readouterr().err


def test_remove_max_side_default_and_out_of_memory(scene, tmp_path, checkpoint, monkeypatch,
                                                   capsys):
    import train.apps.remove as remove

    seen = []

    def out_of_memory(*args, **kwargs):
        seen.append(kwargs.get("max_side"))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(remove, "inpaint", out_of_memory)
    args = [str(scene), "--classes", "person", "--segmenter", "color:person=ff0000", "-o",
            str(tmp_path / "o.png"), "--checkpoint", str(checkpoint)]
    assert main(args) == 1
    assert "out of memory inpainting" in capsys.readouterr().err
    assert main(args + ["--max-side", "0"]) == 1
    assert "lower --max-side (now none)" in capsys.readouterr().err
    assert seen == [2048, None]
    assert not (tmp_path / "o.png").exists()


def test_remove_errors(scene, tmp_path, checkpoint, capsys):
    base = [str(scene), "--segmenter", "color:person=ff0000", "-o", str(tmp_path / "o.png")]
    assert main(base + ["--classes", "persn", "--checkpoint", str(checkpoint)]) == 1
    assert "did you mean person" in capsys.readouterr().err
    assert main(base + ["--classes", "person"]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint PATH is required" in err and "--method ns or --method telea" in err
    assert main(base + ["--classes", "person", "--checkpoint", str(tmp_path / "x.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(base + ["--classes", "person", "--method", "ns", "--dilate", "4"]) == 1
    assert "odd" in capsys.readouterr().err
    assert main([str(tmp_path / "none.png")] + base[1:] + ["--classes", "person",
                                                           "--method", "ns"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


# --- the torchvision path -------------------------------------------------------------


class _FakeSegNet(nn.Module):
    """Stands in for torchvision's FCN: a 1x1 conv whose person logit follows the
    (normalised) red channel, so red pixels become 'person'."""

    def __init__(self, num_classes, aux_loss):
        super().__init__()
        self.classifier = nn.Conv2d(3, num_classes, 1)
        if aux_loss:
            self.aux_classifier = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return {"out": self.classifier(x)}


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A torchvision with the two segmentation builders and weight enums, and a record of
    how they were called (weights must never be fetched)."""
    calls = []

    def builder(*, weights, weights_backbone, num_classes, aux_loss):
        calls.append(dict(weights=weights, weights_backbone=weights_backbone,
                          num_classes=num_classes, aux_loss=aux_loss))
        return _FakeSegNet(num_classes, aux_loss)

    def weights_enum(url):
        return types.SimpleNamespace(COCO_WITH_VOC_LABELS_V1=types.SimpleNamespace(url=url))

    seg = types.ModuleType("torchvision.models.segmentation")
    seg.fcn_resnet101 = seg.deeplabv3_resnet101 = builder
    seg.FCN_ResNet101_Weights = weights_enum("https://x/fcn_resnet101_coco-7ecb50ca.pth")
    seg.DeepLabV3_ResNet101_Weights = weights_enum(
        "https://x/deeplabv3_resnet101_coco-586e9e4e.pth")
    models = types.ModuleType("torchvision.models")
    models.segmentation = seg
    tv = types.ModuleType("torchvision")
    tv.models = models
    for name, module in (("torchvision", tv), ("torchvision.models", models),
                         ("torchvision.models.segmentation", seg)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def _fake_weights(path, aux=True):
    net = _FakeSegNet(21, aux)
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        net.classifier.weight[PERSON, 0] = 10.0  # red above the ImageNet mean -> person
    # Saved as a DataParallel model would be, to exercise the prefix handling.
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    return path


def test_torchvision_segmenter_with_fake_torchvision(fake_torchvision, scene, tmp_path):
    weights = _fake_weights(tmp_path / "fcn.pth")
    seg = TorchvisionSegmenter("fcn", weights, resize=32)
    assert fake_torchvision == [dict(weights=None, weights_backbone=None, num_classes=21,
                                     aux_loss=True)]
    labels = seg(load_image(scene))
    assert labels.shape == (64, 80) and labels.dtype == torch.long
    assert (labels[24:32, 34:47] == PERSON).all()  # the red block, away from its edges
    assert (labels[:15] == 0).all()


def test_remove_cli_with_fake_torchvision(fake_torchvision, scene, tmp_path):
    out = tmp_path / "o.png"
    rc = main([str(scene), "--classes", "person", "--segmenter", "deeplab", "--seg-weights",
               str(_fake_weights(tmp_path / "d.pth", aux=False)), "-o", str(out),
               "--method", "telea", "--dilate", "3"])
    assert rc == 0
    assert fake_torchvision[-1]["aux_loss"] is False
    result, image = load_image(out), load_image(scene)
    assert not torch.equal(result[:, RED[0], RED[1]], image[:, RED[0], RED[1]])
    assert torch.equal(result[:, :15], image[:, :15])


def test_torchvision_weights_errors(fake_torchvision, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SegmenterError, match=r"fcn_resnet101_coco-7ecb50ca\.pth.*--seg-weights"):
        TorchvisionSegmenter("fcn")
    assert segment.hub_weights_path("deeplab") == \
        tmp_path / "hub" / "checkpoints" / "deeplabv3_resnet101_coco-586e9e4e.pth"
    bad = tmp_path / "bad.pth"
    torch.save({"classifier.weight": torch.zeros(3, 3, 1, 1)}, bad)
    with pytest.raises(SegmenterError, match="does not fit"):
        TorchvisionSegmenter("fcn", bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(SegmenterError, match="cannot read"):
        TorchvisionSegmenter("fcn", junk)
    assert main([str(tmp_path / "x.png"), "--classes", "person", "-o", str(tmp_path / "o.png"),
                 "--method", "ns"]) == 1  # the missing image is reported first
    assert "does not exist" in capsys.readouterr().err


def test_missing_torchvision_is_a_clear_error(monkeypatch, scene, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(SegmenterError, match="need torchvision.*--segmenter color"):
        TorchvisionSegmenter("fcn", tmp_path / "w.pth")
    rc = main([str(scene), "--classes", "person", "--segmenter", "fcn", "-o",
               str(tmp_path / "o.png"), "--method", "ns"])
    assert rc == 1 and "need torchvision" in capsys.readouterr().err


def _real_torchvision():
    try:
        import torchvision.models.segmentation as seg
    except Exception as exc:  # missing, or built for another torch
        pytest.skip(f"torchvision is not importable here: {type(exc).__name__}: {exc}")
    return seg


@pytest.mark.parametrize("arch, builder", [("fcn", "fcn_resnet101"),
                                           ("deeplab", "deeplabv3_resnet101")])
def test_real_torchvision_random_weights(arch, builder, tmp_path, scene):
    tv = _real_torchvision()
    torch.manual_seed(0)
    # Random initialisation, nothing downloaded: no weights and no backbone weights.
    net = getattr(tv, builder)(weights=None, weights_backbone=None, num_classes=21,
                               aux_loss=True)
    path = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), path)
    seg = TorchvisionSegmenter(arch, path, resize=64)
    for key, value in net.state_dict().items():
        assert torch.equal(seg.model.state_dict()[key], value), key
    image = load_image(scene)
    labels = seg(image)
    assert labels.shape == (64, 80) and labels.dtype == torch.long
    assert 0 <= int(labels.min()) and int(labels.max()) < 21
    if arch == "fcn":
        out = tmp_path / "o.png"
        rc = main([str(scene), "--classes", "person,car,dog", "--segmenter", "fcn",
                   "--seg-weights", str(path), "-o", str(out), "--method", "ns"])
        assert rc == 0 and out.exists()
