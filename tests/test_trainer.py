"""The training loop end to end on tiny generated data: config parsing, steps, checkpoints,
fine-tuning phase, resume (in process and after a real SIGTERM), DDP with gloo, AMP,
TensorBoard logs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import config as cfglib
from train.checkpoint import latest_checkpoint, list_checkpoints
from train.cli import train_main
from train.images import save_image
from train.trainer import ShardedBatchSampler, capture_rng_state, restore_rng_state

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """12 smooth random 40x40 RGB images (crops of 32 are taken from them)."""
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        coarse = torch.rand(1, 3, 5, 5, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=(40, 40), mode="bilinear",
                                                align_corners=False)[0]
        save_image(image, folder / f"img_{i:02d}.png")
    return folder


TINY_PCONV = 'kind = "pconv"\nlayers = 3\nbase_channels = 8\nmax_channels = 16'
TINY_MODIFIED = 'kind = "modified"\nlevels = 3\nbase_channels = 8\nmax_channels = 16'


def write_config(folder: Path, images: Path, extra: str = "", model: str = TINY_PCONV,
                 name: str = "tiny.toml") -> Path:
    """A tiny training config: PConvUNet(layers=3, base_channels=8) on 32x32 crops;
    ``extra`` adds tables the base does not have ([optim], [vgg])."""
    path = folder / name
    path.write_text(f"""
name = "tiny"
seed = 3
[model]
{model}
[data]
kind = "folder"
root = "{images.as_posix()}"
size = {SIZE}
load_size = 40
num_workers = 0
[loss]
use_perceptual = false
use_style = false
[train]
steps = 4
batch_size = 4
log_every = 1
image_every = 0
checkpoint_every = 2
keep_checkpoints = 0
progress = false
tensorboard = false
[val]
every = 0
images = 4
batch_size = 4
{extra}
""")
    return path


def read_log(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def final_state(run: Path) -> dict:
    return torch.load(latest_checkpoint(run), weights_only=True)["model"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


# ----------------------------------------------------------------------------------
# Config


def test_config_overrides_types_and_paths(tmp_path, tiny_images):
    path = write_config(tmp_path, tiny_images)
    config = cfglib.load_config(path, ["train.steps=7", "loss.use_style=true",
                                       "masks.hole_ratio=[0.1, 0.3]", "optim.lr=1",
                                       "data.root=rel/images", 'train.amp="bf16"'])
    assert config["train"]["steps"] == 7
    assert config["loss"]["use_style"] is True
    assert config["masks"]["hole_ratio"] == [0.1, 0.3]
    assert config["optim"]["lr"] == 1.0 and isinstance(config["optim"]["lr"], float)
    assert config["data"]["root"] == str((Path.cwd() / "rel/images").resolve())
    assert config["train"]["amp"] == "bf16"
    assert config["model"] == {"kind": "pconv", "layers": 3, "base_channels": 8,
                               "max_channels": 16}
    # A bare string parses as a string.
    assert cfglib.apply_override(config, "name=foo")["name"] == "foo"


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "did you mean 'train.steps'"),
    ("train.steps=three", "must be int"),
    ("train.amp=fp8", "must be one of"),
    ("bogus=1", "unknown key 'bogus'"),
    ("train.steps", "section.key=value"),
    # Values out of range fail at start-up, not mid-run.
    ("train.steps=0", "train.steps must be at least 1"),
    ("train.log_every=0", "train.log_every must be at least 1"),
    ("val.batch_size=0", "val.batch_size must be at least 1"),
    ("data.num_workers=-1", "data.num_workers must be at least 0"),
    ("seed=-1", "seed must be at least 0"),
    ("masks.hole_ratio=[0.5]", r"masks.hole_ratio must be \[low, high\]"),
    ("masks.hole_ratio=[0.5, 1.5]", r"masks.hole_ratio must be \[low, high\]"),
    ("val.hole_ratio=[0.6, 0.1]", r"val.hole_ratio must be \[low, high\]"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("data.load_size=16", "data.load_size 16 is smaller than the crop data.size 32"),
])
def test_config_errors_name_the_key(tmp_path, tiny_images, override, message):
    with pytest.raises(cfglib.ConfigError, match=message):
        cfglib.load_config(write_config(tmp_path, tiny_images), [override])


def test_config_extends_relative_paths_and_roundtrip(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.toml").write_text('name = "base"\n[data]\nroot = "imgs"\nsize = 64\n'
                                        '[model]\nkind = "modified"\nlevels = 3\n')
    (tmp_path / "sub" / "child.toml").write_text('extends = "../base.toml"\n[data]\nsize = 32\n')
    config = cfglib.load_config(tmp_path / "sub" / "child.toml")
    assert config["data"]["root"] == str((tmp_path / "imgs").resolve())  # base's folder
    assert config["data"]["size"] == 32 and config["name"] == "base"
    assert config["model"] == {"kind": "modified", "levels": 3}  # replaces the default model
    again = tmp_path / "again.toml"
    again.write_text(cfglib.to_toml(config))
    assert cfglib.load_config(again) == config


def test_child_model_table_replaces_the_parents(tmp_path, tiny_images):
    """A [model] of another kind in a file that extends a shipped one keeps none of the
    parent's model keywords (they would not fit the other model's constructor)."""
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{write_config(tmp_path, tiny_images).as_posix()}"\n'
                     f"[model]\n{TINY_MODIFIED}\n")
    config = cfglib.load_config(child)
    assert config["model"] == {"kind": "modified", "levels": 3, "base_channels": 8,
                               "max_channels": 16}
    assert train_main(["--config", str(child), "--out", str(tmp_path / "run"),
                       "--steps", "1"]) == 0


def test_bad_model_table_is_a_config_error(tmp_path, tiny_images, caplog):
    config = str(write_config(tmp_path, tiny_images, model='kind = "pconv"\nlayer = 3'))
    assert train_main(["--config", config, "--out", str(tmp_path / "run")]) == 2
    assert "[model]: bad model description" in caplog.text and "layer" in caplog.text


def test_shipped_configs_load():
    names = sorted(p.stem for p in cfglib.CONFIG_DIR.glob("*.toml"))
    assert {"samples", "celebahq", "places2", "ablations", "ablations_samples"} <= set(names)
    for name in names:
        config = cfglib.load_config(name)
        from train.checkpoint import build_model
        model = build_model(config["model"])
        assert config["data"]["size"] % model.size_multiple == 0, name
        assert config["train"]["batch_size"] >= 1


# ----------------------------------------------------------------------------------
# Sampler and RNG state


def test_sampler_deterministic_sharded_and_resumable():
    full = ShardedBatchSampler(10, 4, seed=1)
    assert full.batches_per_epoch == 2
    batches = list(full)
    assert batches == list(ShardedBatchSampler(10, 4, seed=1))  # deterministic
    full.set_position(1)
    assert list(full) != batches  # another epoch, another order
    shards = [ShardedBatchSampler(10, 4, rank=r, world=2, seed=1) for r in range(2)]
    for b, (x, y) in enumerate(zip(*[list(s) for s in shards])):
        assert len(x) == len(y) == 2 and x + y == batches[b]  # ranks split each batch
    full.set_position(0, start=1)
    assert list(full) == batches[1:]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ShardedBatchSampler(10, 3, world=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatchSampler(3, 4)


def test_rng_state_roundtrip_weights_only(tmp_path):
    import random

    import numpy as np
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(path, weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# ----------------------------------------------------------------------------------
# Training in process


def test_train_steps_checkpoints_and_log(tmp_path, tiny_images):
    run = tmp_path / "run"
    assert train_main(["--config", str(write_config(tmp_path, tiny_images)),
                       "--out", str(run)]) == 0
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    ckpt = torch.load(latest_checkpoint(run), weights_only=True)  # plain data only
    assert ckpt["format"] == "pconv-checkpoint"
    assert ckpt["step"] == 4 and ckpt["phase"] == "initial"
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert ckpt["model_spec"] == {"kind": "pconv", "layers": 3, "base_channels": 8,
                                  "max_channels": 16}
    # 12 images / batch 4 = 3 batches an epoch: after 4 steps, epoch 1 batch 1.
    assert (ckpt["epoch"], ckpt["position"]) == (1, 1)
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(set(r["terms"]) == {"valid", "hole", "tv"} for r in log)
    assert all(r["lr"] == 2e-4 and r["images_per_s"] > 0 for r in log)
    assert cfglib.load_config(run / "config.toml")["train"]["steps"] == 4


def test_progress_off_a_terminal_is_plain_lines(tmp_path, tiny_images, capsys):
    """Standard error here is not a terminal (a log file, a batch job): the progress is a
    plain line with the count, rate and loss, not a bar's carriage returns."""
    assert train_main(["--config", str(write_config(tmp_path, tiny_images)),
                       "--out", str(tmp_path / "run"), "--set", "train.progress=true"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "tiny: 4/4 step (100%)" in err and "loss=" in err and "img_s=" in err


def test_refuses_to_overwrite_and_resume_errors(tmp_path, tiny_images, caplog):
    config = str(write_config(tmp_path, tiny_images))
    run = tmp_path / "run"
    assert train_main(["--config", config, "--out", str(run), "--steps", "2"]) == 0
    assert train_main(["--config", config, "--out", str(run)]) == 2
    assert "already holds checkpoints" in caplog.text
    assert train_main(["--config", config, "--out", str(tmp_path / "empty"),
                       "--resume", "latest"]) == 2
    assert "no checkpoints" in caplog.text
    # Truncated and foreign checkpoints: a clear error, no traceback.
    good = latest_checkpoint(run)
    bad = tmp_path / "bad" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "step_00000002.pt").write_bytes(good.read_bytes()[:5000])
    assert train_main(["--out", str(bad.parent), "--resume", "latest"]) == 2
    assert "not a readable checkpoint" in caplog.text
    torch.save({"state_dict": {"w": torch.zeros(1)}}, bad / "step_00000002.pt")
    assert train_main(["--config", config, "--out", str(bad.parent), "--resume", "latest"]) == 2
    assert "not a pconv checkpoint" in caplog.text


def test_resume_survives_damage_a_kill_or_disk_leaves(tmp_path, tiny_images, caplog):
    """A torn last log line, the temporary file of a cut-short checkpoint write, and an
    unreadable newest checkpoint: --resume latest goes on from the newest good one."""
    config = str(write_config(tmp_path, tiny_images))
    run = tmp_path / "run"
    assert train_main(["--config", config, "--out", str(run), "--steps", "4"]) == 0
    folder = run / "checkpoints"
    newest = folder / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    tmp = folder / ".step_00000006.pt.x1y2.tmp"
    tmp.write_bytes(b"partial")
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 5, "epo')
    assert train_main(["--out", str(run), "--resume", "latest", "--steps", "6"]) == 0
    assert "trying the checkpoint before it" in caplog.text
    assert "dropping a line that does not parse" in caplog.text
    assert not tmp.exists()
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]


def test_validation_means_leave_out_undefined_values(tmp_path, tiny_images, monkeypatch):
    """A hole metric that is NaN for one image (undefined there) is left out of the mean,
    not counted as 0."""
    from train import trainer as trainer_module

    config = cfglib.load_config(write_config(tmp_path, tiny_images), ["val.every=1"])
    trainer = trainer_module.Trainer(config, tmp_path / "run")
    real = trainer_module.inpainting_metrics

    def with_one_nan(result, image, mask):
        values = real(result, image, mask)
        values["hole_ssim"] = values["hole_ssim"].clone()
        values["hole_ssim"][0] = float("nan")
        return values

    expected = real
    monkeypatch.setattr(trainer_module, "inpainting_metrics", with_one_nan)
    scores = trainer.validate()
    monkeypatch.setattr(trainer_module, "inpainting_metrics", expected)
    image, mask = trainer._val_batches()[0]
    with torch.no_grad():
        output = trainer.model.eval()(image, mask)
    values = real(trainer_module.composite(image, mask, output).clamp(0, 1), image, mask)
    assert scores["hole_ssim"] == pytest.approx(float(values["hole_ssim"][1:].mean()), rel=1e-5)
    assert scores["whole_psnr"] == pytest.approx(float(values["whole_psnr"].mean()), rel=1e-5)


def test_resume_in_process_matches_uninterrupted(tmp_path, tiny_images, one_thread):
    config = str(write_config(tmp_path, tiny_images, "[optim]\nfinetune_step = 3\n"))
    assert train_main(["--config", config, "--out", str(tmp_path / "a"), "--steps", "6"]) == 0
    assert train_main(["--config", config, "--out", str(tmp_path / "b"), "--steps", "2"]) == 0
    assert train_main(["--out", str(tmp_path / "b"), "--resume", "latest",
                       "--steps", "6"]) == 0
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert (x["loss"], x["terms"], x["phase"], x["lr"]) == \
            (y["loss"], y["terms"], y["phase"], y["lr"])
    sa, sb = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hard_kill_resumes_from_last_checkpoint(tmp_path, tiny_images, one_thread):
    # A SIGKILL leaves the steps after the last periodic checkpoint in the log only: the
    # resumed run recomputes them identically and the log keeps one line per step.
    config = str(write_config(tmp_path, tiny_images))
    run = tmp_path / "run"
    assert train_main(["--config", config, "--out", str(run)]) == 0
    original = read_log(run)
    (run / "checkpoints" / "step_00000004.pt").unlink()  # died before writing it
    assert train_main(["--out", str(run), "--resume", "latest"]) == 0
    assert read_log(run) == [dict(r, images_per_s=x["images_per_s"])
                             for r, x in zip(original, read_log(run))]


def test_loader_workers_give_the_same_batches(tmp_path, tiny_images, one_thread):
    # Crops and masks are functions of (seed, epoch, index): a worker process (persistent
    # across the epoch boundary at step 3) must produce exactly the main process's batches.
    config = str(write_config(tmp_path, tiny_images))
    assert train_main(["--config", config, "--out", str(tmp_path / "w0")]) == 0
    assert train_main(["--config", config, "--out", str(tmp_path / "w1"),
                       "--set", "data.num_workers=1"]) == 0
    assert [r["loss"] for r in read_log(tmp_path / "w0")] == \
        [r["loss"] for r in read_log(tmp_path / "w1")]


def test_finetune_phase_freezes_encoder_batch_norm(tmp_path, tiny_images):
    config = str(write_config(tmp_path, tiny_images, "[optim]\nfinetune_step = 2\n"))
    run = tmp_path / "run"
    assert train_main(["--config", config, "--out", str(run)]) == 0
    log = read_log(run)
    assert [(r["phase"], r["lr"]) for r in log] == [("initial", 2e-4)] * 2 + \
        [("finetune", 5e-5)] * 2
    (_, at2), (_, at4) = list_checkpoints(run)
    s2 = torch.load(at2, weights_only=True)
    s4 = torch.load(at4, weights_only=True)
    assert (s2["phase"], s4["phase"]) == ("initial", "finetune")
    m2, m4 = s2["model"], s4["model"]
    enc = [k for k in m2 if k.startswith("encoder.") and "running_mean" in k]
    dec = [k for k in m2 if k.startswith("decoder.") and "running_mean" in k]
    assert enc and dec
    assert all(torch.equal(m2[k], m4[k]) for k in enc)  # frozen statistics
    assert not all(torch.equal(m2[k], m4[k]) for k in dec)  # still updating
    enc_w = [k for k in m2 if k.startswith("encoder.") and k.endswith("bn.weight")]
    assert not all(torch.equal(m2[k], m4[k]) for k in enc_w)  # affine parameters train


@pytest.mark.parametrize("model, sets", [
    (TINY_PCONV, ['train.amp="bf16"', "train.channels_last=true"]),
    (TINY_PCONV, ['train.amp="fp16"']),
    (TINY_MODIFIED, []),
])
def test_amp_channels_last_and_modified_model(tmp_path, tiny_images, model, sets):
    config = str(write_config(tmp_path, tiny_images, model=model))
    run = tmp_path / "run"
    argv = ["--config", config, "--out", str(run), "--steps", "2"]
    for assignment in sets:
        argv += ["--set", assignment]
    assert train_main(argv) == 0
    log = read_log(run)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    ckpt = torch.load(latest_checkpoint(run), weights_only=True)
    assert bool(ckpt["scaler"]) == ('train.amp="fp16"' in sets)  # GradScaler state kept


def test_tensorboard_scalars_images_and_validation(tmp_path, tiny_images):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    config = str(write_config(tmp_path, tiny_images, "[vgg]\nrandom = true\n"))
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="RANDOM weights"):
        assert train_main(["--config", config, "--out", str(run), "--steps", "2",
                           "--set", "train.tensorboard=true", "--set", "train.image_every=2",
                           "--set", "val.every=2", "--set", "loss.use_perceptual=true",
                           "--set", "loss.use_style=true"]) == 0
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for term in ("total", "valid", "hole", "perceptual", "style", "tv"):
        assert f"loss/{term}" in scalars
    assert {"train/lr", "train/images_per_s", "val/psnr", "val/ssim", "val_hole/psnr"} <= scalars
    assert {"train/samples", "val/samples"} <= set(events.Tags()["images"])
    val = [record for record in map(json.loads, (run / "log.jsonl").read_text().splitlines())
           if "val" in record]
    assert len(val) == 1 and 0 < val[0]["val"]["whole_ssim"] <= 1


# ----------------------------------------------------------------------------------
# Real processes: a SIGTERM in the middle of training, and DDP


def _wait_for_log_lines(proc: subprocess.Popen, run: Path, lines: int) -> None:
    """Until the training process ``proc`` has logged ``lines`` lines (2 minutes at most)."""
    deadline = time.monotonic() + 120
    while not (run / "log.jsonl").exists() or \
            len((run / "log.jsonl").read_text().splitlines()) < lines:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"training never logged {lines} lines"
        time.sleep(0.01)


def test_sigterm_saves_and_resume_continues_bitwise(tmp_path, tiny_images, one_thread):
    config = str(write_config(tmp_path, tiny_images, "[optim]\nfinetune_step = 5\n"))
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--config", config, "--out",
                             str(run), "--steps", "100000", "--set", "train.checkpoint_every=0"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_log_lines(proc, run, 3)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "received SIGTERM" in output and "Traceback" not in output
    (stopped, _), = list_checkpoints(run)  # one checkpoint: the one written on SIGTERM
    assert stopped >= 3 and read_log(run)[-1]["step"] == stopped
    # Resume with the stored config for three more steps (crossing the phase change when
    # the kill came early), in another process.
    total = stopped + 3
    done = subprocess.run([sys.executable, "-m", "train", "--out", str(run), "--resume",
                           "latest", "--steps", str(total)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resumed = read_log(run)
    assert [r["step"] for r in resumed] == list(range(1, total + 1))
    # The uninterrupted reference run.
    assert train_main(["--config", config, "--out", str(tmp_path / "ref"), "--steps",
                       str(total), "--set", "train.checkpoint_every=0"]) == 0
    reference = read_log(tmp_path / "ref")
    for r, x in zip(reference[stopped:], resumed[stopped:]):
        assert (r["step"], r["loss"], r["terms"], r["phase"]) == \
            (x["step"], x["loss"], x["terms"], x["phase"])
    sr, sx = final_state(tmp_path / "ref"), final_state(run)
    assert all(torch.equal(sr[k], sx[k]) for k in sr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path, tiny_images, one_thread):
    """Slurm's scancel and systemd send SIGTERM to every process of the job: the loader
    workers must outlive it, so that the main process saves a checkpoint and exits 143."""
    config = str(write_config(tmp_path, tiny_images))
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--config", config, "--out",
                             str(run), "--steps", "100000", "--set", "train.checkpoint_every=0",
                             "--set", "data.num_workers=2"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_log_lines(proc, run, 2)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    (stopped, _), = list_checkpoints(run)
    assert stopped >= 2


def _torchrun_two_ranks(tmp_path: Path, config: str, run: Path, steps: int) -> str:
    """Train ``steps`` steps with 2 gloo processes; returns their output (exit 0 asserted)."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={_free_port()}", "-m", "train", "--config", config, "--out",
         str(run), "--steps", str(steps)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_ddp_batch_norm_model_saves_at_the_end(tmp_path, tiny_images, one_thread):
    """With batch norm, each rank ends holding the statistics of its own last batch; rank
    0's (the ones DDP broadcasts) are given to all before the check, and the run ends with
    its checkpoint."""
    config = str(write_config(tmp_path, tiny_images, name="ddp_bn.toml"))
    run = tmp_path / "ddp"
    output = _torchrun_two_ranks(tmp_path, config, run, steps=3)
    assert "all 2 ranks hold identical parameters and buffers" in output
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == 3


def test_ddp_two_processes_gloo(tmp_path, tiny_images, one_thread):
    # The modified UNet has no batch norm, so 2 ranks x 2 images must train like 1 x 4
    # (gradients are averaged over ranks): the global batch is divided, not multiplied.
    config = str(write_config(tmp_path, tiny_images, model=TINY_MODIFIED, name="ddp.toml"))
    run = tmp_path / "ddp"
    output = _torchrun_two_ranks(tmp_path, config, run, steps=3)
    assert "[rank 0]" in output and "[rank 1]" in output
    assert "rank 1 of 2: finished at step 3" in output
    assert "all 2 ranks hold identical parameters and buffers" in output
    ckpt = torch.load(latest_checkpoint(run), weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and ckpt["global_batch"] == 4
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3]  # rank 0 alone writes the log
    assert train_main(["--config", config, "--out", str(tmp_path / "single"),
                       "--steps", "3"]) == 0
    single = read_log(tmp_path / "single")
    for d, s in zip(log, single):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5)
    sd, ss = ckpt["model"], final_state(tmp_path / "single")
    for k in sd:
        torch.testing.assert_close(sd[k], ss[k], rtol=1e-4, atol=1e-6)
