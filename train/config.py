"""Typed configuration: one tree of dataclasses, recipes in ``configs/``, dotted command-line overrides.

    python -m train --config vgg16_bn --print-config                   # configs/torchvision/vgg16_bn.yaml
    python -m train --config paper/vgg16 data.root=/datasets/imagenet  # configs/paper/vgg16.yaml
    python -m train --config my_run/config.yaml optim.lr=0.02          # any YAML file, e.g. a saved run config

Order of precedence (later wins): the dataclass defaults below, the YAML file's ``base:`` chain, the YAML file
itself, then ``key=value`` overrides. ``base:`` names one YAML file or a list of them (each may have its own
``base:``), looked up relative to the file that names it first, then in the project's ``configs/`` folder (leading
``../`` dropped), so a recipe copied out of the repository, e.g. with ``base: ../_base/torchvision.yaml``, still
finds configs/_base/torchvision.yaml. Unknown keys, wrong types and impossible values raise ``ConfigError`` with
a one-line message. The resolved config is written next to every run (``config.yaml``) and into checkpoints as a
plain dict, and loading that file gives the same config back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.files import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_FAMILY = "torchvision"  # `--config vgg16_bn` means configs/torchvision/vgg16_bn.yaml

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


@dataclass
class DataConfig:
    root: str = "data/imagenet"  # holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG
    # folder: ROOT/{train,val}/<wnid>/*.JPEG | shards: ROOT is a pack (python -m data_pipeline pack): tar shards
    # read by offset from their index files (data_pipeline.shard_reader)
    format: str = "folder"
    backend: str = "dali"  # dali | torchvision
    # backend=dali: auto = GPU decoding (device="mixed") when the process's device is CUDA, else CPU-only; gpu =
    # insist on it (an error without CUDA, no fallback); cpu = CPU operators even on a GPU node (then copied over)
    dali_device: str = "auto"  # auto | gpu | cpu
    # nvJPEG preallocation hints of NVIDIA's older DALI example (~200 MiB of GPU and ~270 MiB of pinned memory per
    # decoder thread, per process); off as in NVIDIA's current example (data_pipeline/dali_backend.py)
    dali_nvjpeg_prealloc: bool = False
    # DALI train: the next epoch's pipeline built in a thread from half of each epoch, so none is built at the
    # boundary (data_pipeline/dali_backend.py); false builds it at the boundary (not yet run on a GPU: the switch)
    dali_build_ahead: bool = True
    batch_size: int = 256  # global: summed over all processes (GPUs)
    workers: int = 8  # loader threads (DALI) or worker processes (torchvision) per process
    augment: str = "rrc"  # rrc: torchvision RandomResizedCrop | scale: the paper's rescale-to-S + random crop
    train_crop: int = 224
    val_resize: int = 256  # shorter side, then centre crop val_crop
    val_crop: int = 224
    interpolation: str = "bilinear"  # bilinear | bicubic
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # area fraction range
    rrc_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # aspect ratio range
    scale_min: int = 256  # paper's training scale S range; fixed-S training when scale_min == scale_max
    scale_max: int = 512
    hflip: bool = True
    color_pca_std: float = 0.0  # AlexNet PCA lighting ("RGB colour shift"); 0 disables, the paper uses 0.1
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


@dataclass
class ModelConfig:
    arch: str = "vgg16_bn"  # one of train.models.ARCHS
    num_classes: int = 1000
    dropout: float = 0.5
    classifier_width: int = 4096  # torchvision's; only the CPU demo shrinks it
    layers: list[Any] | None = None  # arch=custom: [64, 'M', 128, ..., 'LRN', '1x1:512', ...]
    batch_norm: bool | None = None  # arch=custom only
    # torchvision: torchvision's VGG init (kaiming conv) | paper: §3.1's N(0, 0.01²) | glorot: xavier_uniform_
    # (train.models.init_weights); applied before init_from copies net A's layers over it
    init: str = "torchvision"
    init_from: str | None = None  # paper §3.1: initialise from a trained net A (first 4 conv + 3 FC)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # at the global batch data.batch_size (see lr_scaling)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw only
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True  # False: no weight decay on BatchNorm parameters and biases
    lr_scaling: str = "none"  # none | linear: lr × data.batch_size / lr_reference_batch
    lr_reference_batch: int = 256
    label_smoothing: float = 0.0
    clip_grad_norm: float = 0.0  # 0 disables


@dataclass
class SchedConfig:
    name: str = "step"  # step | plateau (paper: ÷gamma when val top-1 stops improving) | cosine
    epochs: int = 90
    step_size: int = 30  # step: epochs between drops
    gamma: float = 0.1
    plateau_patience: int = 5  # plateau: epochs without improvement before a drop
    plateau_threshold: float = 0.1  # plateau: minimum top-1 improvement, in percentage points
    plateau_max_drops: int = 3
    warmup_epochs: int = 0
    warmup_factor: float = 0.1  # warmup starts at lr × warmup_factor


@dataclass
class TrainConfig:
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16 (the last two: autocast; fp16 adds GradScaler)
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False  # deterministic algorithms; on CUDA ops without one warn
    print_every: int = 50  # steps between console progress lines


@dataclass
class CkptConfig:
    resume: str = "auto"  # auto: latest checkpoint in run_dir if any | never | a checkpoint path
    keep_recent: int = 3  # epoch checkpoints kept besides last.pth and best.pth
    every_epochs: int = 1
    # mid-epoch saves of last.pth (0: off), to bound the work a crash loses: every N global steps, and/or every M
    # minutes (rank 0's clock, agreed at a print interval). One vgg16 save (138 M params + SGD momentum, 1.11 GB)
    # took 2.6-5.8 s on this project's build machine's disk: every 10 minutes costs <= 1 % of the time and bounds
    # a fault's lost training to 10 minutes (slurm/README.md, "Faults inside a job").
    every_steps: int = 0
    every_minutes: float = 10.0


@dataclass
class LogConfig:
    wandb_mode: str = "auto"  # auto: online with an API key, else offline | online | offline | disabled
    project: str = "vgg-imagenet"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    log_checkpoint: bool = False  # log best.pth as a W&B artifact
    # every rank appends the train images of each batch it trains to run_dir/samples/epochNNN_rankR.txt (one
    # path per line, relative to data.root): sharding checks across processes and nodes; torchvision backend only
    sample_ids: bool = False


@dataclass
class DistConfig:
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU | nccl | gloo
    # auto: the GPU where torch sees one, else the CPU, but a task SLURM gave GPUs stops when torch sees none (a
    # driver too old for the torch build) | cuda: a GPU or stop | cpu: the CPU on purpose (fake-GPU test clusters)
    device: str = "auto"
    timeout_min: int = 30
    # a rank whose training makes no progress (no step, validation batch or save) for this long is named and ends
    # the job (slurm.job / train.watchdog); 0 disables. Must exceed the slowest legitimate gap: a save, an epoch's
    # first batch, a validation batch. Not armed before a start's first step (start-up, torch.compile).
    hang_timeout_s: int = 300
    # none | fp16 | bf16: DDP all-reduces gradients cast to this dtype (PyTorch's fp16/bf16_compress_hook; half
    # the bytes) and casts them back. none (fp32 all-reduce) is what the published recipes used. bf16 keeps fp32's
    # range with 8 mantissa bits; fp16 keeps 11 but overflows above 65504. No effect with one process.
    grad_compression: str = "none"


@dataclass
class LaunchConfig:
    cluster: str = "slurm"  # slurm | local | debug (submitit's executors)
    gpus: int = 1  # total; one task per GPU
    gpus_per_node: int = 8
    nodes: int = 0  # 0: ceil(gpus / gpus_per_node)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str = "72:00:00"  # per job; requeue continues where it stopped
    # --cluster slurm: unless the user or the recipe sets them, each GPU's share of the partition's nodes (sinfo:
    # slurm/resources.py); these where sinfo cannot answer
    mem_per_gpu: str = "64G"
    cpus_per_gpu: int = 10
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint and requeue
    max_num_timeout: int = 20
    # What real sites need around the job (slurm/launch.py --setup, --sbatch, --srun, --container-image, --python):
    setup: list[str] = field(
        default_factory=list
    )  # shell lines before srun: module load ..., conda activate ...
    sbatch_args: dict[str, Any] = field(
        default_factory=dict
    )  # more #SBATCH options: {exclusive: true, gres: ...}
    srun_args: list[str] = field(default_factory=list)  # more srun options: [--cpu-bind=cores, --mpi=pmix]
    container_image: str | None = None  # pyxis/enroot: srun --container-image=IMAGE
    python: str | None = None  # the interpreter the tasks run (default: the launcher's own, sys.executable)
    # a job that failed (a rank crashed or hung; not a configuration error, not scancel) requeues itself and
    # resumes from last.pth up to this many times per job (slurm/retry.py; <run_dir>/retries.jsonl)
    max_failures: int = 3


@dataclass
class Config:
    recipe: str = "torchvision"  # torchvision | paper | demo: which published schedule this follows
    run_dir: str = ""  # empty: runs/<recipe>-<arch>
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": ("torchvision", "paper", "demo"),
    "data.backend": ("dali", "torchvision"),
    "data.format": ("folder", "shards"),
    "data.dali_device": ("auto", "gpu", "cpu"),
    "data.augment": ("rrc", "scale"),
    "data.interpolation": ("bilinear", "bicubic"),
    "model.init": ("torchvision", "paper", "glorot"),  # train.models.INITS
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.lr_scaling": ("none", "linear"),
    "sched.name": ("step", "plateau", "cosine"),
    "train.precision": ("fp32", "tf32", "bf16", "fp16"),
    "log.wandb_mode": ("auto", "online", "offline", "disabled"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "dist.device": ("auto", "cuda", "cpu"),
    "dist.grad_compression": ("none", "fp16", "bf16"),
    "launch.cluster": ("slurm", "local", "debug"),
}


# --------------------------------------------------------------------------------------------- loading


def resolve_config_path(name: str | Path) -> Path:
    """``vgg16_bn`` → configs/torchvision/vgg16_bn.yaml; ``paper/vgg16`` → configs/paper/vgg16.yaml; a path as is."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path
        raise ConfigError(f"config file not found: {path}")
    for candidate in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / DEFAULT_FAMILY / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    from train.flags import did_you_mean

    hint = did_you_mean(str(name), available_recipes())
    if hint:
        raise ConfigError(f"unknown config {str(name)!r} (did you mean {hint}?)")
    known = ", ".join(available_recipes())
    raise ConfigError(f"unknown config {str(name)!r}: give a YAML path or one of: {known}")


def available_recipes() -> list[str]:
    """Recipe names accepted by ``--config`` (files under configs/, files starting with '_' excluded)."""
    names = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        if path.name.startswith("_") or any(p.startswith("_") for p in path.relative_to(CONFIG_DIR).parts):
            continue
        rel = path.relative_to(CONFIG_DIR).with_suffix("")
        names.append(rel.name if rel.parts[0] == DEFAULT_FAMILY else rel.as_posix())
    return names


def _find_base(path: Path, base: Any) -> Path:
    """The file a ``base:`` entry of ``path`` names: relative to ``path``'s folder if there, else relative to
    CONFIG_DIR with leading ``..`` parts dropped (``../_base/paper.yaml``, as written in configs/paper/, and
    ``_base/paper.yaml`` both mean configs/_base/paper.yaml), so a recipe copied elsewhere keeps its bases."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be a YAML file path or a list of them, got {base!r}")
    rel = Path(base)
    tried = [path.parent / rel]
    if not rel.is_absolute():
        parts = list(rel.parts)
        while parts and parts[0] == "..":
            parts.pop(0)
        if parts:
            tried.append(CONFIG_DIR.joinpath(*parts))
    tried = list(dict.fromkeys(p.resolve() for p in tried))
    where = f"tried {', '.join(str(p) for p in tried)}"
    if rel.suffix not in (".yaml", ".yml"):
        near = any(p.with_name(p.name + ".yaml").is_file() for p in tried)
        hint = f"; did you mean {base + '.yaml'!r}?" if near else ""
        raise ConfigError(f"{path}: base {base!r} is not a .yaml file path ({where}){hint}")
    for candidate in tried:
        if candidate.is_file():
            return candidate
    kind = "is a directory, not a YAML file" if any(p.is_dir() for p in tried) else "not found"
    raise ConfigError(f"{path}: base {base!r} {kind} ({where})")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The YAML file and its ``base:`` files, bases first (each base found by ``_find_base``)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    layers: list[DictConfig] = []
    base = raw.pop("base", None)
    if base is not None:
        for b in base if isinstance(base, list) else [base]:
            layers += _read_yaml(_find_base(path, b), (*chain, path))
    layers.append(_to_omegaconf(raw, source=str(path)))
    return layers


def _to_omegaconf(raw: dict, source: str) -> DictConfig:
    _check_keys(raw, Config(), source)
    try:
        return OmegaConf.create(raw)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_first_line(e)}") from None


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", key):
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=0.02)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value  # e.g. an unquoted path with a colon: keep the text
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is set as a value and as a section")
            node = child
        node[leaf] = parsed
    return _to_omegaconf(tree, source="command line")


def load_config(
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    world_size: int | None = None,
    batch_split: bool = True,
) -> Config:
    """Load a recipe (name or YAML path), apply ``key=value`` overrides, resolve derived values and validate.

    ``world_size``, when known (inside a job), is checked against the global batch; ``batch_split=False`` leaves
    that check to the caller (the launcher, whose message names the flag the user typed).
    """
    layers: list[tuple[str, DictConfig]] = []
    if config is not None:
        path = resolve_config_path(config)
        layers += [(str(path), layer) for layer in _read_yaml(path)]
    if overrides:
        layers.append(("command line", _parse_overrides(overrides)))
    return _merged(OmegaConf.structured(Config), layers, world_size, batch_split)


def with_overrides(
    cfg: Config, overrides: Sequence[str], world_size: int | None = None, batch_split: bool = True
) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied, parsed and checked as ``load_config`` does (unknown
    keys and wrong types are errors that name the command line; ``batch_split``: see ``validate``)."""
    layers = [("command line", _parse_overrides(overrides))] if overrides else []
    return _merged(OmegaConf.structured(cfg), layers, world_size, batch_split)


def _merged(
    base: DictConfig,
    layers: Sequence[tuple[str, DictConfig]],
    world_size: int | None,
    batch_split: bool = True,
) -> Config:
    """``base`` with each (source, layer) merged over it in order (errors name the source), finalised, validated."""
    merged = base
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {_describe(e)}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg = finalize(cfg)
    validate(cfg, world_size=world_size, batch_split=batch_split)
    return cfg


def finalize(cfg: Config) -> Config:
    """Fill derived values (so the saved config states them): run_dir, launch.nodes."""
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{cfg.recipe}-{cfg.model.arch}"
    if cfg.launch.nodes == 0:
        cfg.launch.nodes = -(-cfg.launch.gpus // cfg.launch.gpus_per_node) if cfg.launch.gpus > 0 else 0
    return cfg


def all_keys(node: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a config (dataclass) tree, dotted, in field order."""
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _check_keys(raw: Any, schema: Any, source: str, prefix: str = "") -> None:
    """Unknown keys and section/value mix-ups, with the full dotted key and a suggestion."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            hint = _suggest(full)
            if hint:
                raise ConfigError(f"{source}: unknown key {full!r} (did you mean {hint}?)")
            listing = ", ".join(fields)
            raise ConfigError(
                f"{source}: unknown key {full!r} (valid keys{' in ' + prefix[:-1] if prefix else ''}: {listing})"
            )
        child = getattr(schema, key)
        if dataclasses.is_dataclass(child):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: {full!r} is a section (keys: {', '.join(_field_names(child))}), not a value"
                )
            _check_keys(value, child, source, f"{full}.")
        elif isinstance(value, dict) and not isinstance(child, dict):  # (a dict-valued key takes a dict)
            raise ConfigError(f"{source}: {full!r} is a value, not a section")


def _suggest(full: str) -> str:
    """Did-you-mean for an unknown dotted key: the same leaf name in another section (``train.epochs``, ``epochs``
    → ``sched.epochs``), else a close dotted key (``optim.lrr`` → ``optim.lr``), else a close leaf name in any
    section (``epoch`` → ``sched.epochs``). '' when nothing is close."""
    valid = all_keys(Config())
    leaf = full.rpartition(".")[2]
    by_leaf: dict[str, list[str]] = {}
    for k in valid:
        by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
    matches = by_leaf.get(leaf, [])
    if not matches:
        matches = difflib.get_close_matches(full, valid, n=1, cutoff=0.7)
    if not matches:
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        matches = by_leaf[close[0]] if close else []
    return " or ".join(repr(k) for k in matches)


def _field_names(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)]


def _describe(e: OmegaConfBaseException) -> str:
    """Turn OmegaConf's multi-line type errors into one line naming the key and the expected type."""
    key = getattr(e, "full_key", None) or ""
    msg = _first_line(e)
    expected = _expected_type(key) if key else None
    if expected:
        return f"{key}: expected {expected}, got {_offending_value(msg)}"
    return f"{key}: {msg}" if key else msg


def _expected_type(key: str) -> str | None:
    node: Any = Config()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        f = fields[part]
        node = getattr(node, part)
    return str(f.type).replace("typing.", "")


def _offending_value(msg: str) -> str:
    if re.match(r"Incompatible value 'None' for field|field '.*' is not Optional", msg):
        return "null"  # `key=null` / `key: null` / `key: ~` for a key that has no null
    m = re.search(r"Value '(.*?)'", msg, re.S)
    if m:
        return repr(m.group(1))
    m = re.search(r"(\w+Node|str|int|float|bool) is not a", msg)
    return "a single value" if m else msg


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ------------------------------------------------------------------------------------------ validation


def validate(cfg: Config, world_size: int | None = None, batch_split: bool = True) -> None:
    """Raise ConfigError (one line) for the first impossible value. ``batch_split``: check that the global batch
    divides over ``world_size`` (else ``launch.gpus``); off for a stored config, whose run may have had another
    process count than its ``launch.gpus`` (torchrun decides it)."""
    from train.models import ARCHS, validate_layers  # late import: torch is heavy and not needed to parse

    # Every float and list of floats (YAML's .inf / .nan, or 1e400, which overflows): one check for all keys, as
    # inf passes the range checks below (lr > 0) and nan fails them with a misleading message.
    for key in all_keys(cfg):
        value = get(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if isinstance(value, list) and any(isinstance(x, float) and not math.isfinite(x) for x in value):
            raise ConfigError(f"{key} must hold finite numbers, got {value}")
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")

    d, m, o, s = cfg.data, cfg.model, cfg.optim, cfg.sched
    checks: list[tuple[bool, str]] = [
        (bool(cfg.run_dir), "run_dir must not be empty"),
        (bool(d.root), "data.root must not be empty"),
        (d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}"),
        (d.workers >= 0, f"data.workers must be >= 0, got {d.workers}"),
        (d.train_crop > 0 and d.val_crop > 0, "data.train_crop and data.val_crop must be positive"),
        (
            d.val_resize >= d.val_crop,
            f"data.val_resize ({d.val_resize}) must be >= data.val_crop ({d.val_crop})",
        ),
        (
            len(d.rrc_scale) == 2 and 0 < d.rrc_scale[0] <= d.rrc_scale[1] <= 1,
            f"data.rrc_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(d.rrc_scale)}",
        ),
        (
            len(d.rrc_ratio) == 2 and 0 < d.rrc_ratio[0] <= d.rrc_ratio[1],
            f"data.rrc_ratio must be [lo, hi] with 0 < lo <= hi, got {list(d.rrc_ratio)}",
        ),
        (
            d.train_crop <= d.scale_min <= d.scale_max,
            f"data.scale_min/scale_max must satisfy train_crop ({d.train_crop}) <= scale_min ({d.scale_min})"
            f" <= scale_max ({d.scale_max})",
        ),
        (d.color_pca_std >= 0, f"data.color_pca_std must be >= 0, got {d.color_pca_std}"),
        (
            len(d.mean) == 3 and len(d.std) == 3 and all(x > 0 for x in d.std),
            "data.mean and data.std must have 3 entries each (RGB), std positive",
        ),
        (m.arch in ARCHS, f"model.arch={m.arch!r} is not one of: {', '.join(ARCHS)}{_arch_hint(m.arch)}"),
        (m.num_classes >= 2, f"model.num_classes must be >= 2, got {m.num_classes}"),
        (0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}"),
        (m.classifier_width > 0, f"model.classifier_width must be positive, got {m.classifier_width}"),
        (
            m.arch == "custom" or m.layers is None,
            f"model.layers is only for model.arch=custom (arch is {m.arch!r})",
        ),
        (
            m.arch == "custom" or m.batch_norm is None,
            f"model.batch_norm is only for model.arch=custom ({m.arch!r} fixes it; use the _bn arch)",
        ),
        (
            m.arch != "custom" or m.layers is not None,
            "model.arch=custom needs model.layers, e.g. [64, M, 128, M, ...]",
        ),
        (o.lr > 0, f"optim.lr must be positive, got {o.lr}"),
        (0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}"),
        (
            not o.nesterov or (o.name == "sgd" and o.momentum > 0),
            "optim.nesterov needs optim.name=sgd and momentum > 0",
        ),
        (
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            f"optim.betas must be two values in [0, 1), got {list(o.betas)}",
        ),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (o.lr_reference_batch > 0, f"optim.lr_reference_batch must be positive, got {o.lr_reference_batch}"),
        (0 <= o.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}"),
        (o.clip_grad_norm >= 0, f"optim.clip_grad_norm must be >= 0 (0 disables), got {o.clip_grad_norm}"),
        (s.epochs > 0, f"sched.epochs must be positive, got {s.epochs}"),
        (s.step_size > 0, f"sched.step_size must be positive, got {s.step_size}"),
        (0 < s.gamma <= 1, f"sched.gamma must be in (0, 1], got {s.gamma}"),
        (
            s.plateau_patience >= 0 and s.plateau_max_drops >= 0 and s.plateau_threshold >= 0,
            "sched.plateau_patience, plateau_max_drops and plateau_threshold must be >= 0",
        ),
        (
            0 <= s.warmup_epochs < s.epochs,
            f"sched.warmup_epochs must be in [0, sched.epochs), got {s.warmup_epochs}",
        ),
        (0 < s.warmup_factor <= 1, f"sched.warmup_factor must be in (0, 1], got {s.warmup_factor}"),
        (cfg.train.print_every > 0, f"train.print_every must be positive, got {cfg.train.print_every}"),
        (cfg.ckpt.keep_recent >= 0, f"ckpt.keep_recent must be >= 0, got {cfg.ckpt.keep_recent}"),
        (cfg.ckpt.every_epochs > 0, f"ckpt.every_epochs must be positive, got {cfg.ckpt.every_epochs}"),
        (
            cfg.ckpt.every_steps >= 0 and cfg.ckpt.every_minutes >= 0,
            "ckpt.every_steps and ckpt.every_minutes must be >= 0 (0 disables)",
        ),
        (cfg.dist.hang_timeout_s >= 0, f"dist.hang_timeout_s must be >= 0, got {cfg.dist.hang_timeout_s}"),
        (cfg.launch.max_failures >= 0, f"launch.max_failures must be >= 0, got {cfg.launch.max_failures}"),
        (bool(cfg.ckpt.resume), "ckpt.resume must be auto, never or a checkpoint path"),
        (cfg.dist.timeout_min > 0, f"dist.timeout_min must be positive, got {cfg.dist.timeout_min}"),
        (cfg.launch.gpus >= 1, f"launch.gpus must be >= 1, got {cfg.launch.gpus}"),
        (cfg.launch.gpus_per_node >= 1, f"launch.gpus_per_node must be >= 1, got {cfg.launch.gpus_per_node}"),
        (cfg.launch.nodes >= 1, f"launch.nodes must be >= 1, got {cfg.launch.nodes}"),
        (
            cfg.launch.nodes * cfg.launch.gpus_per_node >= cfg.launch.gpus,
            f"launch.gpus={cfg.launch.gpus} does not fit on launch.nodes={cfg.launch.nodes}"
            f" × launch.gpus_per_node={cfg.launch.gpus_per_node}",
        ),
        (
            re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", cfg.launch.time) is not None,
            f"launch.time must be SLURM's [D-]HH:MM:SS, got {cfg.launch.time!r}",
        ),
        (cfg.launch.cpus_per_gpu >= 1, f"launch.cpus_per_gpu must be >= 1, got {cfg.launch.cpus_per_gpu}"),
        (
            cfg.launch.signal_delay_s >= 0 and cfg.launch.max_num_timeout >= 0,
            "launch.signal_delay_s and launch.max_num_timeout must be >= 0",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if m.layers is not None:
        try:
            layers = validate_layers(list(m.layers))
        except ValueError as e:
            raise ConfigError(f"model.layers: {e}") from None
    else:
        layers = list(ARCHS[m.arch].layers or ())
    # Each 'M' (2x2 max pool, stride 2) halves the side; below 2**pools px one fails ("Output size is too small").
    # scale_min >= train_crop and val_resize >= val_crop are checked above.
    pools = layers.count("M")
    net = "model.layers (arch=custom)" if m.arch == "custom" else m.arch
    for key in ("data.train_crop", "data.val_crop"):
        if get(cfg, key) < 2**pools:
            raise ConfigError(
                f"{key}={get(cfg, key)}: {net} has {pools} max pools, so crops must be >= {2**pools} px"
            )
    divisor, what = world_size or cfg.launch.gpus, "world size" if world_size else "launch.gpus"
    if batch_split and d.batch_size % divisor:
        raise ConfigError(
            f"data.batch_size={d.batch_size} (global) is not divisible by the {what} {divisor}; "
            f"choose a multiple of {divisor} (and scale optim.lr with it, or set optim.lr_scaling=linear)"
        )


def _arch_hint(arch: str) -> str:
    """`` (did you mean vgg16_bn?)`` for a misspelt model.arch, else ''."""
    from train.flags import did_you_mean
    from train.models import ARCHS

    hint = None if arch in ARCHS else did_you_mean(arch, list(ARCHS))
    return f" (did you mean {hint}?)" if hint else ""


# ----------------------------------------------------------------------------------------- utilities


def get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of builtins (safe for ``torch.save`` + ``weights_only=True`` and for W&B)."""
    return dataclasses.asdict(cfg)


def from_dict(raw: dict[str, Any], batch_split: bool = False) -> Config:
    """Inverse of to_dict (e.g. the config stored in a checkpoint), validated the same way as a YAML file, except
    that the global batch is not checked against ``launch.gpus`` unless asked (``batch_split``): the stored run
    may have used another process count."""
    layers = [("stored config", _to_omegaconf(raw, source="stored config"))]
    return _merged(OmegaConf.structured(Config), layers, None, batch_split)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


def save_yaml(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config atomically; ``load_config(path)`` gives it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, to_yaml(cfg))


def per_process_batch(cfg: Config, world_size: int) -> int:
    """Per-GPU batch = global batch / world size (validated to divide)."""
    if cfg.data.batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the world size {world_size}"
        )
    return cfg.data.batch_size // world_size


def effective_lr(cfg: Config) -> float:
    """optim.lr, scaled by global batch / lr_reference_batch when optim.lr_scaling=linear (Goyal et al. 2017)."""
    if cfg.optim.lr_scaling == "linear":
        return cfg.optim.lr * cfg.data.batch_size / cfg.optim.lr_reference_batch
    return cfg.optim.lr


__all__ = [
    "CHOICES",
    "CONFIG_DIR",
    "Config",
    "ConfigError",
    "all_keys",
    "available_recipes",
    "effective_lr",
    "from_dict",
    "get",
    "load_config",
    "per_process_batch",
    "resolve_config_path",
    "save_yaml",
    "to_dict",
    "to_yaml",
    "validate",
]
