"""The training loop: data, model, loss, optimizer, phases, logging, checkpoints, DDP.

What one run does (see :mod:`train.config` for every setting):

* Adam at ``optim.lr`` (2e-4); after ``optim.finetune_step`` optimizer steps the
  fine-tuning phase of Liu et al. starts: learning rate ``optim.finetune_lr`` (5e-5) and the
  encoder's batch norm frozen (:meth:`PConvUNet.freeze_encoder_bn`; the modified UNet has
  no batch norm and only changes the rate).
* Data order: epoch ``e`` visits the training images in a permutation seeded by
  ``(seed, e)``, in global batches of ``train.batch_size``; an epoch has
  ``len(data) // batch_size`` batches (the rest, a different few each epoch, is dropped).
  Crops, flips and masks are pure functions of ``(seed, epoch, index)``
  (:mod:`train.data`), so a batch does not depend on who loads it or when.
* Multi-GPU (``torchrun --nproc_per_node=K -m train ...``): DistributedDataParallel,
  backend nccl on CUDA and gloo on CPU. ``train.batch_size`` is the **global** batch: each
  global batch is cut into K consecutive slices of ``batch_size / K`` (it must divide),
  so the images seen per step do not depend on K. Batch-norm statistics are per process
  (DDP broadcasts rank 0's buffers each step). Rank 0 logs, validates and writes
  checkpoints; a stop signal on any rank stops all ranks at the same step.
* Nothing lost: a checkpoint (atomic, :func:`train.checkpoint.save_checkpoint`) every
  ``train.checkpoint_every`` steps, at the end, and after SIGINT/SIGTERM: the handlers only
  set a flag, and the loop saves and returns at the next step boundary (a second SIGINT
  aborts at once). A checkpoint holds model, optimizer, grad scaler, step, phase, epoch and
  position in the epoch, the config and the RNG states (torch, CUDA, numpy, python random,
  as tensors and plain numbers so ``weights_only=True`` loads them); resuming continues
  with exactly the batch that came next, so a killed and resumed run computes the same
  steps as an uninterrupted one (bit for bit on the same machine and thread count).
* Logging (rank 0): every ``train.log_every`` steps a line in ``<run>/log.jsonl``
  (step, epoch, phase, lr, total loss, every unweighted term, images/s), TensorBoard
  scalars for the same, and loss and images/s on the progress (a tqdm bar on a terminal,
  else a line a minute, :mod:`train.progress`); every ``train.image_every``
  steps an image grid (masked input, mask, output, composite, ground truth); every
  ``val.every`` steps the PSNR/SSIM of a fixed validation set (:mod:`train.metrics`).

Run folder: ``config.toml`` (resolved config), ``log.jsonl``, ``checkpoints/step_*.pt``,
``tb/`` (TensorBoard).

Mask convention everywhere: 1 = known pixel, 0 = hole.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from . import amp as amplib
from . import config as cfglib
from .checkpoint import (CheckpointError, build_model, checkpoint_name, latest_checkpoint,
                         list_checkpoints, load_checkpoint, load_newest_readable,
                         save_checkpoint, CHECKPOINT_DIR)
from .data import (CelebAHQ, Compose, CenterCrop, ImageFolderDataset, InpaintingDataset,
                   Places2, RandomCrop, RandomHorizontalFlip, Resize)
from .images import find_images
from .losses import InpaintingLoss
from .masks import FreeFormMasks, MaskFolder
from .metrics import inpainting_metrics
from .models import composite
from .progress import Progress
from .vgg import VGG16Features

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "pick_device",
           "ShardedBatchSampler", "build_datasets", "build_mask_source",
           "capture_rng_state", "restore_rng_state", "Trainer", "train",
           "EXIT_INTERRUPTED_BASE"]

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED_BASE = 128  # exit status 128 + signal number, as a shell reports a kill
LOG_FILE = "log.jsonl"


# ----------------------------------------------------------------------------------
# Processes and devices


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world`` processes, its ``local_rank`` on
    the node and its ``device``. ``world == 1`` means no process group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; ``"cuda"``
    -> ``cuda:<local_rank>``; anything else as ``torch.device`` reads it."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise cfglib.ConfigError("device 'cuda' asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device(preference)


def setup_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), if any: backend nccl for CUDA,
    gloo for CPU. Idempotent: a group that already exists is reused. Without those
    variables (a plain ``python -m train``) it is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", world_size=world,
                                rank=rank)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    """Leave the process group if there is one (call once, at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------
# Data


class ShardedBatchSampler:
    """Deterministic, resumable, sharded batches of indices into a data set of ``size``.

    Epoch ``e`` orders the indices by a permutation seeded by ``(seed, e)`` and cuts it into
    ``batches_per_epoch = size // global_batch`` global batches (the tail is dropped, so
    every process gets the same number of equal batches). Process ``rank`` of ``world``
    gets slice ``rank`` of ``world`` equal consecutive slices of each global batch.
    ``set_position(epoch, start)`` makes the next iteration yield the batches of
    ``epoch`` from batch ``start`` on (for resuming mid-epoch).
    """

    def __init__(self, size: int, global_batch: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0):
        if global_batch < 1 or global_batch % world:
            raise ValueError(f"the global batch size ({global_batch}) must be a positive "
                             f"multiple of the number of processes ({world})")
        if size < global_batch:
            raise ValueError(f"the training set has {size} images, fewer than one global "
                             f"batch of {global_batch}: lower train.batch_size")
        self.size, self.global_batch = size, global_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.local_batch = global_batch // world
        self.batches_per_epoch = size // global_batch
        self.epoch, self.start = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch ``epoch`` (the same on every process and machine)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x5A3]))
        return rng.permutation(self.size)

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Start the next iteration at batch ``start`` of ``epoch``."""
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"batch {start} is outside epoch of {self.batches_per_epoch}")
        self.epoch, self.start = epoch, start

    def global_batch_indices(self, epoch: int, batch: int) -> list[int]:
        """All indices of global batch ``batch`` of ``epoch``."""
        order = self.order(epoch)
        return order[batch * self.global_batch:(batch + 1) * self.global_batch].tolist()

    def __iter__(self):
        order = self.order(self.epoch)
        lo = self.rank * self.local_batch
        for b in range(self.start, self.batches_per_epoch):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield chunk[lo:lo + self.local_batch].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


def _transform(size: int, load_size: int, *, train: bool, flip: bool) -> Compose:
    """Short side to ``load_size`` (0 = ``size``), then a ``size`` crop: random (and a random
    flip) in training, central otherwise, so validation sees the training scale."""
    steps = [Resize(load_size or size)]
    if train:
        steps.append(RandomCrop(size))
        if flip:
            steps.append(RandomHorizontalFlip())
    else:
        steps.append(CenterCrop(size))
    return Compose(steps)


def image_dataset(config: dict[str, Any], split: str, transform, *, seed: int = 0):
    """The image data set of ``config["data"]`` for ``split`` ("train", "val" or "test"):
    ``dataset[i] -> [3, H, W]`` in [0, 1]. A folder data set uses ``root`` for training,
    ``val_root`` / ``test_root`` (default ``root``) otherwise; CelebA-HQ uses its hashed
    70/15/15 split; Places2 its split folders (``test`` means ``val`` there, as the
    public test set has no ground truth)."""
    data = config["data"]
    kind, root = data["kind"], data["root"]
    if not root:
        raise cfglib.ConfigError("data.root is not set (the folder of the images)")
    common = {"seed": seed, "check": data["check"]}
    if kind == "folder":
        folder = Path({"train": root, "val": data["val_root"] or root,
                       "test": data["test_root"] or root}[split])
        files = [f for f in find_images(folder)
                 if not any(fnmatch.fnmatch(f.relative_to(folder).as_posix(), pattern)
                            for pattern in data["exclude"])]
        if not files:
            raise FileNotFoundError(f"no images under {folder} (after data.exclude "
                                    f"{data['exclude']})")
        return ImageFolderDataset(folder, transform, files=files, **common)
    if kind == "celebahq":
        return CelebAHQ(root, split, transform, **common)
    if kind == "places2":
        if split == "train":
            return Places2(root, "train", transform, folder=data["places2_folder"] or None,
                           file_list=data["file_list"] or None, **common)
        return Places2(root, "val", transform, **common)
    raise cfglib.ConfigError(f"data.kind {kind!r} is not one of folder, celebahq, places2")


def build_mask_source(config: dict[str, Any], *, train: bool = True):
    """The training mask source of ``config["masks"]``: generated free-form masks with a
    ratio drawn from ``hole_ratio``, or a :class:`MaskFolder` (augmented in training)."""
    masks = config["masks"]
    if masks["kind"] == "folder":
        if not masks["root"]:
            raise cfglib.ConfigError("masks.kind is 'folder' but masks.root is not set")
        return MaskFolder(masks["root"], invert=masks["invert"],
                          augment=masks["augment"] and train,
                          max_dilation=masks["max_dilation"], max_rotation=masks["max_rotation"])
    lo, hi = masks["hole_ratio"]
    return FreeFormMasks(hole_ratio=(float(lo), float(hi)))


def build_datasets(config: dict[str, Any]) -> tuple[InpaintingDataset, InpaintingDataset]:
    """``(train, val)`` image/mask pair data sets: ``dataset[i] -> (image [3, S, S], mask
    [1, S, S])``, 1 = known, 0 = hole, S = ``data.size``. The validation set is the first
    ``val.images`` images of the validation split, centrally cropped, with free-form masks
    seeded by ``val.seed`` (fixed: it never calls ``set_epoch``)."""
    data = config["data"]
    size, load = data["size"], data["load_size"]
    train_images = image_dataset(config, "train", _transform(size, load, train=True,
                                                             flip=data["flip"]),
                                 seed=config["seed"])
    train_set = InpaintingDataset(train_images, build_mask_source(config), seed=config["seed"])
    val_images = image_dataset(config, "val", _transform(size, load, train=False, flip=False))
    count = min(config["val"]["images"], len(val_images))
    lo, hi = config["val"]["hole_ratio"]
    val_set = InpaintingDataset(Subset(val_images, range(count)),
                                FreeFormMasks(hole_ratio=(float(lo), float(hi))),
                                seed=config["val"]["seed"])
    return train_set, val_set


def _ignore_stop_signals(_worker_id: int) -> None:
    # A Ctrl-C, and the SIGTERM of Slurm's scancel or systemd, reach the whole process
    # group; the main process handles them and stops at a step boundary, so a worker must
    # not die of them mid-batch (it exits when the main process closes the loader).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------
# RNG states in weights_only-loadable form


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and python's
    ``random``, as tensors, numbers and lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng_state`'s dict (CUDA states only where
    the same number of devices is present)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()),
                     p["gauss_next"]))


# ----------------------------------------------------------------------------------
# Signals


class _StopFlag:
    """SIGINT/SIGTERM set ``signum``; the loop stops at the next step boundary. A second
    SIGINT raises KeyboardInterrupt at once. Handlers are installed only in the main
    thread (Python allows no other) and restored on exit."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write: safe inside a handler, unlike the logging/tqdm locks it may interrupt.
        os.write(2, f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the "
                    f"end of this step, then stopping\n".encode())

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _OnceFilter(logging.Filter):
    """Lets each distinct message through once (the random-weight VGG warns every call)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


# ----------------------------------------------------------------------------------
# Image grids


def image_grid(columns: list[Tensor], pad: int = 2) -> Tensor:
    """Tile ``columns`` (each ``[n, 3 or 1, H, W]`` in [0, 1]) into one image ``[3, H', W']``:
    one row per sample, one column per tensor, white ``pad``-pixel gaps."""
    cols = [c.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1) for c in columns]
    n, _, h, w = cols[0].shape
    grid = torch.ones(3, n * (h + pad) + pad, len(cols) * (w + pad) + pad)
    for j, col in enumerate(cols):
        for i in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = col[i]
    return grid


def masked_input(image: Tensor, mask: Tensor) -> Tensor:
    """What the model sees, for display: ``image`` ``[N, 3, H, W]`` with the holes of
    ``mask`` ``[N or 1, 1, H, W]`` (1 = known, 0 = hole) painted white."""
    return image * mask + (1 - mask)


# ----------------------------------------------------------------------------------
# The trainer


class Trainer:
    """One training run of ``config`` into the run folder ``out``.

    Args:
        config: a validated config (:func:`train.config.load_config`).
        out: the run folder (created).
        resume: ``None`` (a fresh run; refuses a folder that already has checkpoints),
            a checkpoint path, ``"latest"`` (the newest in ``out``; error if none) or
            ``"auto"`` (the newest if any, else fresh: for job scripts that may be
            preempted and restarted).
        dist_info: from :func:`setup_distributed` (default: call it).

    :meth:`fit` trains to ``train.steps`` and returns ``"finished"``, or ``"interrupted"``
    after a stop signal (``self.signal`` holds its number); a checkpoint is on disk either way.
    """

    def __init__(self, config: dict[str, Any], out: str | os.PathLike,
                 resume: str | os.PathLike | None = None, dist_info: DistInfo | None = None):
        self.dist = dist_info or setup_distributed(config["train"]["device"])
        self.device = self.dist.device
        self.out = Path(out)
        self.signal = 0
        resume_path, ckpt = self._load_resume(resume)
        if ckpt is not None:
            self._check_resume_config(ckpt, config, resume_path)
        self.config = config
        tc = config["train"]

        # numpy's and Python's too: nothing here draws from them, but a checkpoint stores
        # their states, and identical runs should store identical ones.
        torch.manual_seed(config["seed"])
        np.random.seed(config["seed"])
        random.seed(config["seed"])
        self.spec = cfglib.model_spec(config)
        try:
            self.model = build_model(self.spec)
        except ValueError as exc:
            raise cfglib.ConfigError(f"[model]: {exc}") from exc
        size = config["data"]["size"]
        if size % self.model.size_multiple:
            raise cfglib.ConfigError(
                f"data.size {size} is not a multiple of the model's size_multiple "
                f"{self.model.size_multiple}")
        self.memory_format = torch.channels_last if tc["channels_last"] else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)

        lc = config["loss"]
        vgg = None
        if lc["use_perceptual"] or lc["use_style"]:
            vgg = VGG16Features.from_pretrained(config["vgg"]["path"] or None,
                                                allow_random=config["vgg"]["random"])
        self._random_vgg = vgg is not None and not vgg.pretrained
        self.loss_fn = InpaintingLoss(
            vgg, valid_weight=lc["valid"], hole_weight=lc["hole"],
            perceptual_weight=lc["perceptual"], style_weight=lc["style"], tv_weight=lc["tv"],
            use_perceptual=lc["use_perceptual"], use_style=lc["use_style"]
        ).to(self.device, memory_format=self.memory_format)

        oc = config["optim"]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=oc["lr"],
                                          betas=tuple(oc["betas"]),
                                          weight_decay=oc["weight_decay"])
        amp = tc["amp"]
        try:
            amplib.check_inference_amp(self.device, amp)
        except ValueError as exc:
            # A warning, not an error, in training: the GradScaler path stays runnable
            # (and testable) without a GPU.
            if self.dist.is_main:
                logger.warning("train.amp: %s (this run will be many times slower)", exc)
        self.amp = amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

        self.train_set, self.val_set = build_datasets(config)
        if config["val"]["every"] and len(self.val_set):
            # Load one validation sample now: a crop that does not fit shows at start-up,
            # not at the first validation, hours and maybe a checkpoint later.
            try:
                self.val_set[0]
            except ValueError as exc:
                raise cfglib.ConfigError(f"validation images: {exc}") from exc
        try:
            self.sampler = ShardedBatchSampler(len(self.train_set), tc["batch_size"],
                                               rank=self.dist.rank, world=self.dist.world,
                                               seed=config["seed"])
        except ValueError as exc:
            raise cfglib.ConfigError(f"train.batch_size: {exc}") from exc
        workers = config["data"]["num_workers"]
        self.loader = DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=_ignore_stop_signals,
            # Its own generator: the loader draws a base seed per iterator, which must not
            # move the global RNG (resuming mid-epoch creates iterators at other times).
            generator=torch.Generator().manual_seed(config["seed"]))

        self.step, self.epoch, self.position, self.phase = 0, 0, 0, "initial"
        self.status: str | None = None
        self._val_cache: list[tuple[Tensor, Tensor]] | None = None
        self._last: tuple[Tensor, dict[str, Tensor]] | None = None
        self._last_epoch = 0
        if ckpt is not None:
            self._restore(ckpt, resume_path)
        self._apply_phase()

        self.ddp = self.model
        if self.dist.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- resume -------------------------------------------------------------------

    def _load_resume(self, resume) -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from and its contents. For ``latest`` and ``auto`` an
        unreadable newest checkpoint (a damaged disk) gives way to the one before it."""
        path = self._find_resume(resume)
        if path is None:
            return None, None
        if resume in ("latest", "auto"):
            return load_newest_readable(self.out)
        return path, load_checkpoint(path)

    def _find_resume(self, resume) -> Path | None:
        existing = latest_checkpoint(self.out)
        if resume is None:
            if existing is not None:
                raise CheckpointError(
                    f"{self.out} already holds checkpoints (newest {existing.name}); pass "
                    "--resume latest to continue that run, or choose another --out")
            return None
        if resume == "auto":
            return existing
        if resume == "latest":
            if existing is None:
                raise CheckpointError(
                    f"--resume latest: no checkpoints in {self.out / CHECKPOINT_DIR}")
            return existing
        path = Path(resume)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise CheckpointError(f"--resume {path}: no checkpoints there")
            return found
        return path

    def _check_resume_config(self, ckpt: dict, config: dict, path: Path) -> None:
        if ckpt.get("model_spec") != cfglib.model_spec(config):
            raise CheckpointError(f"{path} holds model {ckpt.get('model_spec')}, but the config "
                                  f"asks for {cfglib.model_spec(config)}")
        stored = ckpt.get("config")
        if isinstance(stored, dict):
            changes = [line for line in cfglib.diff(stored, config)
                       if not line.startswith(("train.steps", "train.progress"))]
            if changes and self.dist.is_main:
                logger.warning("resuming %s with a changed config:\n  %s", path,
                               "\n  ".join(changes))

    def _restore(self, ckpt: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.step = int(ckpt["step"])
            self.epoch, self.position = int(ckpt["epoch"]), int(ckpt["position"])
            self.phase = str(ckpt["phase"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a training checkpoint that fits this run: "
                                  f"{exc}") from exc
        old_batch = int(ckpt.get("global_batch", self.sampler.global_batch))
        if old_batch != self.sampler.global_batch or \
                int(ckpt.get("dataset_size", self.sampler.size)) != self.sampler.size:
            # Same point of the epoch in images seen; the order itself differs now.
            self.position = math.ceil(self.position * old_batch / self.sampler.global_batch)
            logger.warning("batch size or data set size changed since %s: the data order "
                           "does not continue exactly", path)
        if self.position >= self.sampler.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if "rng" in ckpt:
            restore_rng_state(ckpt["rng"])
        if self.dist.is_main:
            # The phase the next step runs in (the stored one may end at this very step).
            oc = self.config["optim"]
            phase = "finetune" if 0 <= oc["finetune_step"] <= self.step else "initial"
            logger.info("resumed %s at step %d (epoch %d, batch %d, phase %s)", path,
                        self.step, self.epoch, self.position, phase)

    # -- phases -------------------------------------------------------------------

    def _apply_phase(self) -> None:
        """Set the learning rate and batch-norm freezing of the phase ``self.step`` is in
        (also after a resume, so a changed ``finetune_lr`` takes effect)."""
        oc = self.config["optim"]
        start = oc["finetune_step"]
        self.phase = "finetune" if 0 <= start <= self.step else "initial"
        lr = oc["finetune_lr"] if self.phase == "finetune" else oc["lr"]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if hasattr(self.model, "freeze_encoder_bn"):
            self.model.freeze_encoder_bn(self.phase == "finetune")

    # -- checkpoints ----------------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        """What a checkpoint holds (see the module docstring)."""
        return {
            "model_spec": self.spec,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "phase": self.phase,
            "global_batch": self.sampler.global_batch, "dataset_size": self.sampler.size,
            "world_size": self.dist.world,
            "config": self.config,
            "rng": capture_rng_state(),
        }

    def save(self) -> Path | None:
        """Write the checkpoint of the current step (rank 0; the others wait) and prune old
        ones beyond ``train.keep_checkpoints``. Returns its path on rank 0."""
        path = None
        if self.dist.is_main:
            path = self.out / CHECKPOINT_DIR / checkpoint_name(self.step)
            save_checkpoint(path, self.payload())
            keep = self.config["train"]["keep_checkpoints"]
            if keep > 0:
                for _, old in list_checkpoints(self.out)[:-keep]:
                    old.unlink(missing_ok=True)
        if self.dist.distributed:
            dist.barrier()
        return path

    # -- one step ---------------------------------------------------------------------

    def _autocast(self):
        return amplib.autocast(self.device, self.amp)

    def _to_device(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        nb = self.device.type == "cuda"
        return (image.to(self.device, non_blocking=nb, memory_format=self.memory_format),
                mask.to(self.device, non_blocking=nb, memory_format=self.memory_format))

    def train_step(self, image: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """One optimizer step on a local batch ``image [n, 3, S, S]``, ``mask [n, 1, S, S]``
        (1 = known). Returns ``(total, unweighted terms, output)``, detached."""
        self.ddp.train()
        with self._autocast():
            output = self.ddp(image, mask)
            total, terms = self.loss_fn(image, mask, output)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        clip = self.config["optim"]["grad_clip"]
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total.detach(), {k: v.detach() for k, v in terms.items()}, output.detach()

    def _global_mean(self, values: Tensor) -> Tensor:
        if self.dist.distributed:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.dist.world
        return values

    def _should_stop(self, flag: _StopFlag) -> int:
        """The stop signal, agreed on by all ranks (the largest signal number any saw)."""
        if not self.dist.distributed:
            return flag.signum
        t = torch.tensor([flag.signum], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers. DDP broadcasts them at the start of each
        forward, so after the last step each rank still holds the batch-norm statistics of
        its own batch; the next forward (or a resumed run) would use rank 0's."""
        for buffer in self.model.buffers():
            dist.broadcast(buffer, src=0)

    def check_replicas(self) -> None:
        """Verify that every rank holds exactly rank 0's parameters and buffers (after
        :meth:`sync_buffers`; DDP keeps parameters in lockstep, so a difference means a bug
        or a non-deterministic collective, and would make rank 0's checkpoint
        unrepresentative). Raises RuntimeError."""
        state = self.model.state_dict()
        flat = torch.cat([t.detach().double().reshape(-1) for t in state.values()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        mismatch = torch.tensor([0 if torch.equal(flat, reference) else 1], device=self.device)
        dist.all_reduce(mismatch)
        logger.info("rank %d of %d: finished at step %d, %d parameter/buffer values",
                    self.dist.rank, self.dist.world, self.step, flat.numel())
        if mismatch.item():
            raise RuntimeError(f"{int(mismatch.item())} of {self.dist.world} DDP ranks hold "
                               "parameters that differ from rank 0's")
        if self.dist.is_main:
            logger.info("all %d ranks hold identical parameters and buffers", self.dist.world)

    # -- validation ------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean whole-image and hole-only L1/PSNR/SSIM of the composite over the fixed
        validation set (:func:`train.metrics.inpainting_metrics`), model in eval mode."""
        model = self.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for image, mask in self._val_batches():
            image, mask = self._to_device(image, mask)
            with self._autocast():
                output = model(image, mask)
            result = composite(image, mask, output.float()).clamp(0, 1)
            for key, values in inpainting_metrics(result, image, mask).items():
                # A hole metric is NaN where it is undefined (hole SSIM of a hole that lies
                # within the window's reach of the border): left out, not counted as 0.
                finite = ~values.isnan()
                sums[key] = sums.get(key, 0.0) + float(values[finite].sum())
                counts[key] = counts.get(key, 0) + int(finite.sum())
        model.train(was_training)
        return {key: value / counts[key] if counts[key] else math.nan
                for key, value in sums.items()}

    def _val_batches(self) -> list[tuple[Tensor, Tensor]]:
        """The validation set as CPU batches, loaded once (it is small and fixed)."""
        if self._val_cache is None:
            bs = self.config["val"]["batch_size"]
            pairs = [self.val_set[i] for i in range(len(self.val_set))]
            self._val_cache = [(torch.stack([p[0] for p in pairs[i:i + bs]]),
                                torch.stack([p[1] for p in pairs[i:i + bs]]))
                               for i in range(0, len(pairs), bs)]
        return self._val_cache

    def _val_grid(self) -> Tensor:
        image, mask = self._val_batches()[0]
        image, mask = self._to_device(image[:4], mask[:4])
        self.model.eval()
        with torch.no_grad(), self._autocast():
            output = self.model(image, mask).float()
        self.model.train()
        return image_grid([masked_input(image, mask), mask, output,
                           composite(image, mask, output), image])

    # -- the loop ----------------------------------------------------------------------

    def fit(self) -> str:
        """Train up to ``train.steps``; see the class docstring."""
        tc = self.config["train"]
        total_steps = tc["steps"]
        main = self.dist.is_main
        writer = None
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(cfglib.to_toml(self.config))
            if tc["tensorboard"]:
                writer = _summary_writer(self.out / "tb", purge_step=self.step + 1)
        bar = Progress(total_steps, desc=self.config["name"], unit="step", initial=self.step,
                       enabled=main and tc["progress"], say=logger.info)
        if main:
            self._trim_log()
            self._remove_unfinished_saves()
        log_file = (self.out / LOG_FILE).open("a") if main else None
        last_time, last_step = time.perf_counter(), self.step
        first_step = self.step
        # A random-weight VGG logs a warning on every forward: once per run is enough.
        # Only for the duration of fit, so nobody else's logging changes.
        once = _OnceFilter() if self._random_vgg else None
        if once is not None:
            logging.getLogger("train.vgg").addFilter(once)
        try:
            with _StopFlag() as flag:
                while self.step < total_steps and not self.signal:
                    self.sampler.set_position(self.epoch, self.position)
                    self.train_set.set_epoch(self.epoch)
                    for image, mask in self.loader:
                        self._run_step(image, mask, bar, log_file, writer)
                        if self.step % tc["log_every"] == 0 or self.step == total_steps:
                            now = time.perf_counter()
                            rate = (self.step - last_step) * self.sampler.global_batch / \
                                max(now - last_time, 1e-9)
                            last_time, last_step = now, self.step
                            self._log(self._last, rate, bar, log_file, writer)
                        self.signal = self._should_stop(flag)
                        if self.signal or self.step >= total_steps:
                            break
                        if tc["checkpoint_every"] and self.step % tc["checkpoint_every"] == 0:
                            self.save()
                status = "interrupted" if self.signal else "finished"
                if self.dist.distributed:
                    self.sync_buffers()
                # A resumed run that had nothing left to do keeps its checkpoint as it is.
                path = self.save() if self.step > first_step or self.signal else None
                if self.dist.distributed:
                    # After the save: rank 0's state, the one DDP keeps, is on disk whatever
                    # the check finds.
                    self.check_replicas()
            if main:
                bar.close()
                if status == "interrupted":
                    logger.warning("stopped by %s after step %d; checkpoint %s (continue "
                                   "with --resume latest)", signal.Signals(self.signal).name,
                                   self.step, path)
                else:
                    saved = path or latest_checkpoint(self.out)
                    logger.info("finished at step %d; %s", self.step,
                                f"checkpoint {saved}" if saved else "no checkpoint written")
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
            if writer is not None:
                writer.close()
            if once is not None:
                logging.getLogger("train.vgg").removeFilter(once)
        return status

    def _remove_unfinished_saves(self) -> None:
        """Delete the temporary files of checkpoint writes that a kill cut short (each the
        size of a checkpoint; ``save_checkpoint`` renames a finished one into place)."""
        folder = self.out / CHECKPOINT_DIR
        for tmp in folder.glob(".step_*.pt.*.tmp") if folder.is_dir() else ():
            logger.info("removing %s, left by an interrupted checkpoint write", tmp.name)
            tmp.unlink(missing_ok=True)

    def _trim_log(self) -> None:
        """Drop log lines of steps after the current one: a run killed hard (SIGKILL, power
        loss) logged steps after its last checkpoint, and the resumed run logs them again
        (TensorBoard gets the same treatment through ``purge_step``)."""
        path = self.out / LOG_FILE
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                # The torn last line of a write cut short (power loss, full disk).
                logger.warning("%s: dropping a line that does not parse: %.60s", path, line)
                continue
            if record is not None and record.get("step", 0) <= self.step:
                kept.append(line)
        if len(kept) != len(lines):
            path.write_text("".join(line + "\n" for line in kept))

    def _run_step(self, image: Tensor, mask: Tensor, bar, log_file, writer) -> None:
        """One step of the loop: phase switch, optimizer step, data position, images and
        validation at their intervals. Leaves ``(total, terms)`` in ``self._last``."""
        tc, oc = self.config["train"], self.config["optim"]
        main = self.dist.is_main
        if self.step == oc["finetune_step"]:
            self._apply_phase()
            if main:
                bar.write(f"step {self.step}: fine-tuning phase starts (lr "
                          f"{oc['finetune_lr']:g}, encoder batch norm frozen)")
        image, mask = self._to_device(image, mask)
        total, terms, output = self.train_step(image, mask)
        self._last = (total, terms)
        self._last_epoch = self.epoch  # the log's epoch: the one this step ran in
        self.step += 1
        self.position += 1
        if self.position == self.sampler.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        bar.update(1)
        if main and writer is not None and tc["image_every"] and \
                self.step % tc["image_every"] == 0:
            image, mask, output = image[:4], mask[:4], output[:4].float()
            writer.add_image("train/samples", image_grid(
                [masked_input(image, mask), mask, output, composite(image, mask, output),
                 image]), self.step)
        every = self.config["val"]["every"]
        if main and every and self.step % every == 0 and len(self.val_set):
            self._log_validation(bar, log_file, writer)

    def _log(self, last, rate, bar, log_file, writer) -> None:
        """Log the step's loss (averaged over ranks; every rank takes part) on rank 0."""
        total, terms = last
        names = list(terms)
        values = self._global_mean(torch.stack([total.float()] + [terms[k].float()
                                                                   for k in names]))
        values = values.tolist()
        # Checked on every rank (the values are all-reduced), so all stop together.
        if not math.isfinite(values[0]):
            raise FloatingPointError(f"the loss is {values[0]} at step {self.step}: stopping "
                                     f"(terms {dict(zip(names, values[1:]))}); the last "
                                     "checkpoint is intact")
        if not self.dist.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"step": self.step, "epoch": self._last_epoch, "phase": self.phase, "lr": lr,
                  "loss": values[0], "terms": dict(zip(names, values[1:])),
                  "images_per_s": rate}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        bar.set_postfix(loss=f"{values[0]:.4f}", img_s=f"{rate:.1f}")
        if writer is not None:
            writer.add_scalar("loss/total", values[0], self.step)
            for name, value in zip(names, values[1:]):
                writer.add_scalar(f"loss/{name}", value, self.step)
                writer.add_scalar(f"loss_weighted/{name}",
                                  value * self.loss_fn.weights[name], self.step)
            writer.add_scalar("train/lr", lr, self.step)
            writer.add_scalar("train/images_per_s", rate, self.step)

    def _log_validation(self, bar, log_file, writer) -> None:
        scores = self.validate()
        log_file.write(json.dumps({"step": self.step, "val": scores}) + "\n")
        log_file.flush()
        bar.write(f"step {self.step}: validation PSNR {scores['whole_psnr']:.2f} dB, "
                  f"SSIM {scores['whole_ssim']:.4f} (hole PSNR {scores['hole_psnr']:.2f} dB)")
        if writer is not None:
            for key, value in scores.items():
                region, metric = key.split("_", 1)
                writer.add_scalar(f"val/{metric}" if region == "whole" else f"val_hole/{metric}",
                                  value, self.step)
            writer.add_image("val/samples", self._val_grid(), self.step)


def _summary_writer(folder: Path, purge_step: int):
    """A TensorBoard writer, or ``None`` (with a warning) when tensorboard is missing.
    ``purge_step`` drops events a killed run logged after its last checkpoint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - depends on the environment
        logger.warning("tensorboard is not installed: no TensorBoard logs "
                       "(pip install tensorboard, or set train.tensorboard = false)")
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def train(config: dict[str, Any], out: str | os.PathLike,
          resume: str | os.PathLike | None = None) -> Trainer:
    """Build a :class:`Trainer` for ``config`` in ``out`` and run :meth:`Trainer.fit`;
    returns the trainer (``trainer.status``, ``trainer.signal``, ``trainer.step``)."""
    trainer = Trainer(config, out, resume)
    trainer.status = trainer.fit()
    return trainer
