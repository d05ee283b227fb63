"""Training configuration: TOML files, inheritance and command-line overrides.

A configuration is a plain nested dict (so it can be stored in a checkpoint and loaded with
``weights_only=True``) with the tables of :data:`DEFAULTS`. A TOML file only needs the keys
it changes::

    extends = "samples.toml"     # optional: start from another file (path relative to this one)
    name = "my-run"

    [model]                      # keywords of PConvUNet / ModifiedUNet, plus kind
    kind = "pconv"               # "pconv" | "modified"
    layers = 5

    [train]
    steps = 300

Rules:

* Unknown keys are errors (a typo must not silently train with a default), except inside
  ``[model]`` (any constructor keyword, checked when the model is built) and
  ``[ablation.*]`` (override tables of :mod:`train.ablations`).
* Values must have the type of the default; an integer is accepted where a float is
  expected. TOML has no null: an empty string means "not set" for paths.
* Paths (:data:`PATH_KEYS`) written in a file are relative to that file's folder; paths
  given on the command line are relative to the current directory. Both are stored
  absolute.
* ``--set section.key=value`` overrides one key; ``value`` is parsed as a TOML value
  (``--set train.steps=100``, ``--set loss.use_style=false``,
  ``--set masks.hole_ratio=[0.1,0.3]``, ``--set data.root=/data/celeba``: a value that is
  not valid TOML is taken as a string).
"""
from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path
from typing import Any

from .amp import AMP_MODES

__all__ = ["DEFAULTS", "PATH_KEYS", "ConfigError", "CONFIG_DIR", "find_config", "load_config",
           "default_config", "apply_override", "merge", "validate", "to_toml", "model_spec",
           "diff"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS: dict[str, Any] = {
    "name": "pconv",
    # Seeds model initialisation, data order, crops and training masks.
    "seed": 0,
    "model": {"kind": "pconv", "layers": 7},
    "data": {
        "kind": "folder",        # "folder" | "celebahq" | "places2"
        "root": "",              # folder: the images; celebahq: any layout; places2: split folders
        "size": 256,             # training crop (H = W), a multiple of model.size_multiple
        "load_size": 0,          # short side is resized to this before the crop; 0 = size
        "flip": True,            # random left-right flips in training
        "val_root": "",          # folder only: validation images (default: root)
        "test_root": "",         # folder only: pconv-eval's default test images (default: root)
        "exclude": [],           # folder only: glob patterns of files to leave out ("mask_*")
        "places2_folder": "",    # places2: force a split folder name (e.g. "data_large")
        "file_list": "",         # places2: devkit list of training files (skips the walk)
        "check": "header",       # index-time file check: "header" | "full" | "none"
        "num_workers": 4,        # DataLoader workers per process
    },
    "masks": {
        "kind": "freeform",      # "freeform" (generated) | "folder" (e.g. NVIDIA's masks)
        "hole_ratio": [0.01, 0.6],  # freeform: ratio range drawn per mask
        "root": "",              # folder: the mask files
        "invert": False,         # folder: True when files draw holes white (NVIDIA test set)
        "augment": True,         # folder: random dilation, rotation, flips, crops
        "max_dilation": 4,
        "max_rotation": 180.0,
    },
    "loss": {
        # Weights of the unweighted terms of InpaintingLoss (defaults: Liu et al.).
        "valid": 1.0, "hole": 6.0, "perceptual": 0.05, "style": 120.0, "tv": 0.1,
        # Ablation switches.
        "use_perceptual": True, "use_style": True,
    },
    "vgg": {
        "path": "",              # "" = the torch hub cache (train.vgg.default_weights_path)
        "random": False,         # random weights when the file is missing (smoke runs; warns)
    },
    "optim": {
        "lr": 2e-4,              # Adam, initial phase
        "finetune_lr": 5e-5,     # fine-tuning phase (encoder batch norm frozen)
        "finetune_step": -1,     # optimizer steps before fine-tuning starts; -1 = never
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "grad_clip": 0.0,        # max gradient norm; 0 = off
    },
    "train": {
        "steps": 1000,           # total optimizer steps (resuming continues up to this)
        "batch_size": 6,         # GLOBAL batch: divided among the DDP processes
        "device": "auto",        # "auto" | "cpu" | "cuda" | "cuda:N"
        "amp": "off",            # "off" | "bf16" | "fp16" (fp16 adds a GradScaler)
        "channels_last": False,
        "log_every": 10,         # loss scalars, progress-bar values, log.jsonl lines
        "image_every": 500,      # TensorBoard image grids; 0 = never
        "checkpoint_every": 1000,  # 0 = only at the end and on SIGINT/SIGTERM
        "keep_checkpoints": 3,   # newest step_*.pt files kept; 0 = keep all
        "progress": True,        # tqdm bar (rank 0)
        "tensorboard": True,
    },
    "val": {
        "every": 1000,           # validation PSNR/SSIM every N steps; 0 = never
        "images": 16,            # first N images of the validation split, fixed masks
        "hole_ratio": [0.01, 0.6],
        "seed": 12345,
        "batch_size": 8,
    },
    "eval": {
        # Defaults that pconv-eval takes from a checkpoint's config.
        "size": 0,               # evaluation size; 0 = data.size
        "buckets": "paper",      # "paper" | "report"
        "masks_per_bucket": 100,
        "seed": 0,
    },
}

PATH_KEYS = {("data", "root"), ("data", "val_root"), ("data", "test_root"),
             ("data", "file_list"), ("masks", "root"), ("vgg", "path")}

# Tables whose keys are free-form (checked elsewhere).
_FREE_TABLES = {"model", "ablation"}
_CHOICES = {("data", "kind"): ("folder", "celebahq", "places2"),
            ("data", "check"): ("header", "full", "none"),
            ("masks", "kind"): ("freeform", "folder"),
            ("train", "amp"): AMP_MODES,
            ("eval", "buckets"): ("paper", "report")}


class ConfigError(ValueError):
    """A configuration file or override is invalid (message names the key and the file)."""


def default_config() -> dict[str, Any]:
    """A deep copy of :data:`DEFAULTS`."""
    return copy.deepcopy(DEFAULTS)


def find_config(name: str | Path) -> Path:
    """The config file ``name``: a path, or the bare name of a shipped config (``"samples"``
    or ``"samples.toml"`` -> ``train/configs/samples.toml``)."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    shipped = CONFIG_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"no config file {name} (shipped configs: {known})")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in recursively (tables merge, other values replace);
    neither argument is modified."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_paths(tree: dict[str, Any], folder: Path) -> None:
    """Make the :data:`PATH_KEYS` of ``tree`` (a file's or override's partial config)
    absolute relative to ``folder``, in place; empty strings stay empty."""
    for section, key in PATH_KEYS:
        value = tree.get(section, {}).get(key) if isinstance(tree.get(section), dict) else None
        if isinstance(value, str) and value:
            tree[section][key] = str((folder / Path(value).expanduser()).resolve())


def _read_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A file's partial config with its ``extends`` chain merged below it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files extend each other in a loop: "
                          f"{' -> '.join(str(p) for p in (*seen, path))}")
    try:
        tree = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    _resolve_paths(tree, path.parent)
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file name, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        parent_path = find_config(parent)
    parent_tree = _read_file(parent_path, (*seen, path))
    if "model" in tree:
        # One model per file: a child's [model] replaces its parent's, so keywords of
        # another model kind do not leak in (as load_config does with the defaults).
        parent_tree.pop("model", None)
    return merge(parent_tree, tree)


def _parse_value(text: str) -> Any:
    """A TOML value, or the text itself when it is not one (bare strings on the CLI)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(config: dict[str, Any], assignment: str, cwd: Path | None = None
                   ) -> dict[str, Any]:
    """``config`` with one ``"section.key=value"`` override applied (a new dict).

    The value is parsed as TOML (a string if it does not parse); paths are relative to
    ``cwd`` (default: the current directory). The result is validated.
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    parts = [p.strip() for p in dotted.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {assignment!r}: bad key {dotted!r}")
    tree: dict[str, Any] = {}
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = _parse_value(text.strip())
    _resolve_paths(tree, cwd or Path.cwd())
    return validate(merge(config, tree), source=f"--set {assignment}")


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list)
    return isinstance(value, type(default))


def validate(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Check keys, types and choices of a full config against :data:`DEFAULTS`; floats given
    as integers become floats. Returns ``config`` (modified in place). Raises
    :class:`ConfigError` naming the key and ``source``."""
    for key, value in config.items():
        if key in _FREE_TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            continue
        if key not in DEFAULTS:
            hint = difflib.get_close_matches(key, list(DEFAULTS), n=1)
            raise ConfigError(f"{source}: unknown key {key!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        default = DEFAULTS[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a table [{key}]")
            for sub, sub_value in value.items():
                name = f"{key}.{sub}"
                if sub not in default:
                    hint = difflib.get_close_matches(sub, list(default), n=1)
                    raise ConfigError(f"{source}: unknown key {name!r}"
                                      + (f" (did you mean '{key}.{hint[0]}'?)" if hint else ""))
                if not _type_ok(default[sub], sub_value):
                    raise ConfigError(f"{source}: {name} must be {type(default[sub]).__name__}"
                                      f" like {default[sub]!r}, got {sub_value!r}")
                if isinstance(default[sub], float):
                    value[sub] = float(sub_value)
                choices = _CHOICES.get((key, sub))
                if choices and sub_value not in choices:
                    raise ConfigError(f"{source}: {name} must be one of {choices}, got "
                                      f"{sub_value!r}")
        elif not _type_ok(default, value):
            raise ConfigError(f"{source}: {key} must be {type(default).__name__}, got {value!r}")
    if "kind" not in config.get("model", {}):
        raise ConfigError(f"{source}: model.kind is required (\"pconv\" or \"modified\")")
    _check_ranges(config, source)
    return config


# The least value of each number: (section, key) -> bound; None is a top-level key.
_AT_LEAST = {
    (None, "seed"): 0,
    ("data", "size"): 1, ("data", "load_size"): 0, ("data", "num_workers"): 0,
    ("masks", "max_dilation"): 0,
    ("optim", "lr"): 0.0, ("optim", "finetune_lr"): 0.0, ("optim", "weight_decay"): 0.0,
    ("optim", "grad_clip"): 0.0,
    ("train", "steps"): 1, ("train", "batch_size"): 1, ("train", "log_every"): 1,
    ("train", "image_every"): 0, ("train", "checkpoint_every"): 0,
    ("train", "keep_checkpoints"): 0,
    ("val", "every"): 0, ("val", "images"): 0, ("val", "seed"): 0, ("val", "batch_size"): 1,
    ("eval", "size"): 0, ("eval", "masks_per_bucket"): 1, ("eval", "seed"): 0,
}


def _check_ranges(config: dict[str, Any], source: str) -> None:
    """Values in range, checked at start-up: a zero interval or a hole ratio over 1 would
    otherwise pass and fail mid-run, perhaps at the first validation hours in."""
    for (section, key), least in _AT_LEAST.items():
        table = config if section is None else config.get(section, {})
        if key in table and table[key] < least:
            name = key if section is None else f"{section}.{key}"
            raise ConfigError(f"{source}: {name} must be at least {least}, got {table[key]!r}")
    data = config.get("data", {})
    if data.get("load_size", 0) and data["load_size"] < data.get("size", 0):
        raise ConfigError(f"{source}: data.load_size {data['load_size']} is smaller than the "
                          f"crop data.size {data['size']} (0 means data.size)")
    for name in ("masks", "val"):
        ratio = config.get(name, {}).get("hole_ratio")
        if ratio is not None and not (
                len(ratio) == 2 and all(isinstance(r, (int, float)) for r in ratio)
                and 0 <= ratio[0] <= ratio[1] <= 1):
            raise ConfigError(f"{source}: {name}.hole_ratio must be [low, high] with "
                              f"0 <= low <= high <= 1, got {ratio!r}")
    betas = config.get("optim", {}).get("betas")
    if betas is not None and not (len(betas) == 2 and all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{source}: optim.betas must be two numbers in [0, 1), got {betas!r}")


def load_config(path: str | Path | None = None, overrides: list[str] = (), *,
                base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full config: :data:`DEFAULTS` (or ``base``, e.g. a checkpoint's config), then the
    file at ``path`` (see :func:`find_config`) with its ``extends`` chain, then each
    ``"section.key=value"`` of ``overrides`` in order. Raises :class:`ConfigError`."""
    config = copy.deepcopy(base) if base is not None else default_config()
    source = "defaults"
    if path is not None:
        file = find_config(path)
        source = str(file)
        tree = _read_file(file)
        # A file's [model] table describes one model: it replaces the base's, so keywords
        # of another model kind do not leak in from the defaults or a parent file.
        if "model" in tree:
            config.pop("model", None)
        config = merge(config, tree)
    validate(config, source)
    for assignment in overrides:
        config = apply_override(config, assignment)
    return config


def model_spec(config: dict[str, Any]) -> dict[str, Any]:
    """The ``build_model`` description in ``config["model"]`` (a copy)."""
    return copy.deepcopy(config["model"])


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable ``key: old -> new`` lines for the leaves that differ."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff(a, b, name + ".")
        elif a != b:
            lines.append(f"{name}: {a!r} -> {b!r}")
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def to_toml(config: dict[str, Any]) -> str:
    """``config`` as TOML text that :func:`load_config` reads back to the same dict (top-level
    scalars first, then one ``[table]`` per section; deeper tables inline)."""
    # Sections in the order of DEFAULTS (then any others), whatever order merging left.
    rank = {key: i for i, key in enumerate(DEFAULTS)}
    ordered = sorted(config.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    lines = [f"{k} = {_toml_value(v)}" for k, v in ordered if not isinstance(v, dict)]
    for key, table in ordered:
        if isinstance(table, dict):
            lines += ["", f"[{key}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
