"""Evaluate a checkpoint on ImageNet val (or any tree in its layout): the library behind ``python evaluate``.

    from evaluate.evaluator import EvalOptions, run_evaluation, format_result
    result = run_evaluation(EvalOptions(checkpoint="vgg16_bn-6c64b313.pth", data="/datasets/imagenet"))
    print(format_result(result))        # arch, our error, the reference error, the difference, PASS/FAIL

Settings come from the checkpoint's stored training config (val resize/crop, interpolation, mean/std, data
root, backend), or from the defaults (resize 256, centre crop 224, bilinear, ImageNet mean/std) for a bare
state dict; options and ``key=value`` overrides (``data.val_resize=73``) change them. The model is fixed by the
checkpoint. ``--batch-size`` is per process.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipeline.layout import DataError, SplitIndex, index_split
from data_pipeline.shard_reader import ShardIndex, is_pack, open_shards
from data_pipeline.transforms import TransformSpec
from evaluate.core import PRECISIONS, Counts, count_loader
from evaluate.imagenet_classes import NUM_CLASSES, imagenet_wnids
from evaluate.loading import LoadedModel, describe, load_model
from evaluate.protocols import PROTOCOLS, default_scales, evaluate_protocol
from evaluate.reference import DEMO_BAND, PAPER_CONFIG, TORCHVISION, TORCHVISION_SOURCE, paper_row
from train import distributed
from train.config import Config, from_dict, to_dict, with_overrides
from train.files import atomic_write_text
from train.report import format_duration

__all__ = [
    "IMAGENET_VAL_IMAGES",
    "Comparison",
    "EvalError",
    "EvalOptions",
    "EvalResult",
    "format_result",
    "run_evaluation",
]

log = logging.getLogger("evaluate")

IMAGENET_VAL_IMAGES = 50_000
DEFAULT_BATCH_PER_PROCESS = 64
# Config sections an evaluation may override; the model comes from the checkpoint.
OVERRIDABLE = ("data.", "dist.", "log.")
MAX_TEST_SCALE = 2048  # px: 4x the paper's largest test scale (512)


class EvalError(ValueError):
    """A problem with the evaluation's inputs, described in one line."""


@dataclass
class EvalOptions:
    """What ``python evaluate --checkpoint ...`` was asked to do (see ``python evaluate --help``)."""

    checkpoint: str
    arch: str | None = None
    data: str | None = None
    backend: str | None = None  # dali | torchvision
    batch_size: int | None = None  # per process
    workers: int | None = None  # per process
    protocol: str = "1-crop"
    scales: list[int] | None = None  # test scales Q (dense / multi-crop)
    multi_scale: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    tolerance: float = 0.3  # top-1, percentage points
    overrides: Sequence[str] = ()
    json_path: str | None = None
    wandb: bool = False
    wandb_run: str | None = None


@dataclass(frozen=True)
class Comparison:
    """Our error against a reference row, or why there is none."""

    source: str | None
    top1_err: float | None
    top5_err: float | None
    diff_top1: float | None
    diff_top5: float | None
    tolerance: float
    verdict: str  # PASS | FAIL | no reference
    note: str = ""
    band: tuple[float, float] | None = None  # the demo band (its margin included): PASS when inside

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    arch: str
    protocol: str
    counts: Counts
    comparison: Comparison
    record: dict[str, Any]  # everything written to --json
    components: dict[str, tuple[Counts, Comparison]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- config


def eval_config(loaded: LoadedModel, opts: EvalOptions, world_size: int) -> Config:
    """The config this evaluation runs with: stored (or default) config, then overrides, then options."""
    if loaded.config is not None:
        base = loaded.config
    else:
        base = Config()
        base.model.arch = loaded.spec.arch
        base.model.num_classes = loaded.spec.num_classes
        base.model.classifier_width = loaded.spec.classifier_width
    for item in opts.overrides:
        key, sep, _ = item.partition("=")
        if sep and key and not key.startswith(OVERRIDABLE):
            raise EvalError(
                f"override {key}: only data.*, dist.* and log.* can be set here; the model comes from the "
                "checkpoint (--arch only checks it)"
            )
    tree = to_dict(with_overrides(base, opts.overrides, batch_split=False))  # the batch is set below
    if opts.data is not None:
        tree["data"]["root"] = opts.data
    # The format follows the data: --data (or the stored root) pointing at a pack reads its shards
    tree["data"]["format"] = "shards" if is_pack(tree["data"]["root"]) else "folder"
    if opts.backend is not None:
        tree["data"]["backend"] = opts.backend
    if opts.workers is not None:
        tree["data"]["workers"] = opts.workers
    per_process = DEFAULT_BATCH_PER_PROCESS if opts.batch_size is None else opts.batch_size
    if per_process < 1:
        raise EvalError(f"--batch-size must be positive, got {per_process}")
    tree["data"]["batch_size"] = per_process * world_size  # the config's batch is global
    tree["launch"].update(gpus=world_size, nodes=0)
    # The loader hands batches in the layout the model runs in (--channels-last), not the training run's: a
    # mismatch would cost a layout copy of every batch.
    tree["train"]["channels_last"] = opts.channels_last
    return from_dict(tree)


# ------------------------------------------------------------------------------------------- comparison


def _train_scale(cfg: Config | None) -> str | None:
    """The paper's S notation for a model trained with data.augment=scale: "256", "384" or "[256;512]"."""
    if cfg is None or cfg.data.augment != "scale":
        return None
    d = cfg.data
    return str(d.scale_min) if d.scale_min == d.scale_max else f"[{d.scale_min};{d.scale_max}]"


def _compare(
    counts: Counts, source: str | None, top1: float | None, top5: float | None, tol: float, note: str = ""
) -> Comparison:
    if source is None or top1 is None or top5 is None:
        return Comparison(None, None, None, None, None, tol, "no reference", note)
    d1, d5 = counts.top1_err - top1, counts.top5_err - top5
    verdict = "PASS" if abs(d1) <= tol + 1e-9 else "FAIL"
    return Comparison(source, top1, top5, d1, d5, tol, verdict, note)


def compare(
    arch: str,
    cfg: Config,
    trained: Config | None,
    protocol: str,
    scales: Sequence[int],
    counts: Counts,
    tol: float,
) -> Comparison:
    """The reference row that applies to this evaluation (torchvision's for 1-crop, the paper's otherwise; the
    demo band for a checkpoint of the demo recipe)."""
    demo = (
        _compare_demo(cfg, trained, protocol, counts)
        if trained is not None and trained.recipe == "demo"
        else None
    )
    if demo is not None:
        return demo
    d = cfg.data
    missing: list[str] = []
    if cfg.model.num_classes != 1000:
        missing.append(f"{cfg.model.num_classes} classes, not ImageNet-1k's 1000")
    if counts.n != IMAGENET_VAL_IMAGES:
        missing.append(f"{counts.n:,} images, not ImageNet val's {IMAGENET_VAL_IMAGES:,}")
    if protocol == "1-crop":
        if arch not in TORCHVISION:
            missing.insert(0, f"torchvision publishes no {arch} weights")
        if (d.val_resize, d.val_crop) != (256, 224):
            missing.append(f"resize {d.val_resize} / crop {d.val_crop}, the reference is 256 / 224")
        if trained is not None and trained.recipe != "torchvision":
            # torchvision's row measures torchvision's recipe; the paper reports no 1-crop figure.
            missing.append(
                f"trained with the {trained.recipe} recipe, the row is for torchvision's"
                + (" (the paper's rows: --protocol dense or multi-crop)" if trained.recipe == "paper" else "")
            )
        if missing:
            return _compare(counts, None, None, None, tol, "; ".join(missing))
        ref = TORCHVISION[arch]
        note = "" if d.interpolation == "bilinear" else f"reference used bilinear, this run {d.interpolation}"
        return _compare(counts, TORCHVISION_SOURCE, ref.top1_err, ref.top5_err, tol, note)
    letter = PAPER_CONFIG.get(arch)
    if letter is None:
        missing.insert(0, f"{arch} is not one of the paper's configurations")
    scale = _train_scale(trained)
    if scale is None:
        why = "bare state dict" if trained is None else f"data.augment={trained.data.augment}"
        missing.append(f"the paper's rows are for models trained at a scale S (data.augment=scale); {why}")
    if d.train_crop != 224:
        missing.append(f"training crop {d.train_crop}, the paper's is 224")
    if missing:
        return _compare(counts, None, None, None, tol, "; ".join(missing))
    row = paper_row(letter, scale, protocol, tuple(scales))
    if row is None:
        q = ",".join(map(str, scales))
        return _compare(
            counts, None, None, None, tol, f"the paper has no row for {letter}, S={scale}, Q={{{q}}}"
        )
    return _compare(counts, *row, tol)


# What a run must share with configs/demo.yaml for the demo band to apply (data.root, workers, seed, logging and
# where it ran do not move the result beyond the seeds' spread; the per-process batch does, through BatchNorm).
_DEMO_KEYS = ("data", "model", "optim", "sched", "launch.gpus")
_DEMO_FREE = ("data.root", "data.workers", "data.backend")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def demo_changes(trained: Config) -> list[str]:
    """How a demo-recipe run's training differs from configs/demo.yaml (``sched.epochs 8 → 2``), in the fields that
    move its result."""
    from train.config import load_config

    ours, recipe = _flat(to_dict(trained)), _flat(to_dict(load_config("demo")))
    keys = [k for k in recipe if k.startswith(_DEMO_KEYS) and not k.startswith(_DEMO_FREE)]
    return [f"{k} {recipe[k]!r} → {ours.get(k)!r}" for k in keys if ours.get(k) != recipe[k]]


def _compare_demo(cfg: Config, trained: Config, protocol: str, counts: Counts) -> Comparison | None:
    """The demo band's verdict for a checkpoint of configs/demo.yaml as ``make demo`` trains and evaluates it; None
    for any other demo-recipe run (changed recipe, other data or protocol), which then gets the usual reasons."""
    band, tol = DEMO_BAND, DEMO_BAND.margin
    if (
        protocol != "1-crop"
        or demo_changes(trained)
        or (cfg.data.val_resize, cfg.data.val_crop) != (trained.data.val_resize, trained.data.val_crop)
        or counts.n != band.val_images
    ):
        return None
    inside = band.contains(counts.top1_err)
    note = (
        f"inside the demo band ({band.describe()}): this install trains as it should"
        if inside
        else f"OUTSIDE the demo band ({band.describe()}): something differs from the measured runs (the "
        f"installed torch/torchvision, the demo dataset, the recipe); see README, 'The demo'"
    )
    limits = (band.low - band.margin, band.high + band.margin)
    verdict = "PASS" if inside else "FAIL"
    return Comparison(f"demo band, {band.source}", None, None, None, None, tol, verdict, note, limits)


# ---------------------------------------------------------------------------------------------- helpers


def _check_classes(loaded: LoadedModel, val: SplitIndex | ShardIndex) -> None:
    n = loaded.spec.num_classes
    folders = "class folders" if isinstance(val, SplitIndex) else "classes in its manifest (a pack)"
    if len(val.classes) != n:
        raise EvalError(
            f"{val.root} has {len(val.classes)} {folders} but the checkpoint's model has {n} outputs"
        )
    # The label order the weights expect: ours store their class folders; torchvision's index sorted ImageNet wnids.
    if loaded.classes is not None:
        expected, name = loaded.classes, "trained classes"
    elif loaded.kind == "state_dict" and n == NUM_CLASSES:
        expected, name = imagenet_wnids(), "ImageNet-1k wnids (torchvision's weights index sorted wnids)"
    else:
        return
    if val.classes != expected:  # same count: some folders are not expected ones (or in another order)
        extra = sorted(set(val.classes) - set(expected))
        missing = sorted(set(expected) - set(val.classes))
        what = (
            f"{len(extra)} {folders} are not {name} (e.g. {extra[0]!r}) and {len(missing)} are missing "
            f"(e.g. {missing[0]!r})"
            if extra
            else f"the {folders} are in another order than the {name}"
        )
        raise EvalError(f"{val.root}: {what}; labels would not match the model's outputs")


def _versions(backend: str) -> dict[str, str]:
    import torchvision

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    if backend.startswith("dali"):
        try:
            import nvidia.dali

            v["dali"] = nvidia.dali.__version__
        except ImportError:
            pass
    return v


def _write_json(path: str, record: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")


def _run_dir_of(path: Path) -> Path:
    """The training run folder of a checkpoint (run_dir/last.pth or run_dir/checkpoints/epoch_N.pth)."""
    parent = path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def _log_wandb(opts: EvalOptions, loaded: LoadedModel, cfg: Config, result: EvalResult, is_main: bool) -> str:
    """Attach the evaluation to the training run (--wandb-run, or the checkpoint's stored id) or its own run."""
    from train.tracking import Tracker

    resume_id = opts.wandb_run or loaded.wandb_id
    run_dir = _run_dir_of(loaded.path)
    wcfg = from_dict(to_dict(cfg))
    if resume_id is None:
        # Its own run, in its own folder: never touch the training run's wandb_id.txt.
        run_dir = run_dir / "eval_wandb"
        wcfg.ckpt.resume = "never"
        wcfg.log.name = wcfg.log.name or f"eval-{result.arch}-{result.protocol}"
    tracker = Tracker.create(wcfg, run_dir, is_main=is_main, resume_id=resume_id)
    prefix = f"eval/{result.protocol}"
    values: dict[str, Any] = {
        f"{prefix}/top1_err": result.counts.top1_err,
        f"{prefix}/top5_err": result.counts.top5_err,
        f"{prefix}/n_images": result.counts.n,
        f"{prefix}/verdict": result.comparison.verdict,
        f"{prefix}/checkpoint_sha256": loaded.sha256,
    }
    for name, (counts, _) in result.components.items():
        values[f"eval/{name}/top1_err"] = counts.top1_err
        values[f"eval/{name}/top5_err"] = counts.top5_err
    tracker.summary(**values)
    run_id = tracker.run_id or ""
    tracker.finish()
    return run_id


# ------------------------------------------------------------------------------------------------ main


def run_evaluation(opts: EvalOptions) -> EvalResult:
    """Load, evaluate (all processes), compare with the reference; rank 0 writes --json and W&B.

    Raises EvalError, CheckpointError, ConfigError, DataError or DistError (each one line) for bad input.
    """
    if opts.protocol not in PROTOCOLS:
        raise EvalError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {opts.protocol!r}")
    if opts.precision not in PRECISIONS:
        raise EvalError(f"--precision must be one of {', '.join(PRECISIONS)}, got {opts.precision!r}")
    if opts.protocol == "1-crop" and (opts.scales or opts.multi_scale):
        raise EvalError("--scales / --multi-scale are for --protocol dense, multi-crop or dense+multi-crop")
    if not math.isfinite(opts.tolerance) or opts.tolerance < 0:
        raise EvalError(f"--tolerance must be >= 0, got {opts.tolerance}")
    info = distributed.setup()
    loaded = load_model(opts.checkpoint, arch=opts.arch)
    cfg = eval_config(loaded, opts, info.world_size)
    try:
        if cfg.data.format == "shards" and opts.protocol != "1-crop":
            raise EvalError(
                f"--protocol {opts.protocol} reads image files: {cfg.data.root} is a pack, which only the "
                "1-crop protocol reads; give --data the folder tree"
            )
        val = (
            open_shards(cfg.data.root, "val")
            if cfg.data.format == "shards"
            else index_split(cfg.data.root, "val")
        )
    except DataError as e:
        # the same tree and the same error on every rank: evaluate/__main__.py says it once
        e.every_rank = True  # type: ignore[attr-defined]
        raise
    _check_classes(loaded, val)
    # One move (device and layout together): one copy of the weights, and the form tests/test_fake_cuda.py can
    # run on a fake CUDA device (a second .to of fake parameters cannot swap them).
    layout = torch.channels_last if opts.channels_last else torch.preserve_format
    model = loaded.model.to(info.device, memory_format=layout)
    arch = loaded.spec.arch

    def progress(batches: int, images: int) -> None:
        if info.is_main:  # rank 0's count × world size: shards differ by at most a batch
            done = min(images * info.world_size, len(val))
            rate = done / max(time.perf_counter() - start, 1e-9)
            eta = format_duration((len(val) - done) / max(rate, 1e-9))
            log.info(f"  {batches} steps, ~{done:,} of {len(val):,} images, ~{rate:,.0f} img/s, eta {eta}")

    log.info(
        f"evaluating {arch} ({loaded.arch_source}) from {loaded.path} on {len(val):,} images in {val.root}, "
        f"{opts.protocol}, {info.world_size} process(es) on {info.device.type}"
    )
    start = time.perf_counter()
    components: dict[str, tuple[Counts, Comparison]] = {}
    if opts.protocol == "1-crop":
        from data_pipeline import build_loader

        # One input shape (the crop; a last partial batch adds one more): cuDNN's autotuning pays off, as in
        # training. (The dense protocols run each image at its own size: they leave it as it is.)
        torch.backends.cudnn.benchmark = True
        loader = build_loader(cfg, "val", info.rank, info.world_size, info.device)  # classes: _check_classes
        backend = loader.backend
        try:
            counts = count_loader(
                model,
                loader,
                info.device,
                precision=opts.precision,
                channels_last=opts.channels_last,
                progress=progress,
            )
        finally:
            loader.close()
        expected = loader.dataset_size
        scales: list[int] = []
        protocol_info: dict[str, Any] = {
            "val_resize": cfg.data.val_resize,
            "val_crop": cfg.data.val_crop,
            "interpolation": cfg.data.interpolation,
        }
    else:
        d = cfg.data
        scales = list(
            opts.scales or default_scales(d.augment, d.scale_min, d.scale_max, d.val_resize, opts.multi_scale)
        )
        if min(scales) < d.train_crop:
            raise EvalError(
                f"test scales Q={scales}: every test scale must be >= the training crop {d.train_crop} "
                "(data.train_crop)"
            )
        if max(scales) > MAX_TEST_SCALE:
            values = 4 * max(scales) ** 2  # 3 channels of Q x 4Q/3 (a 4:3 image)
            raise EvalError(
                f"test scales Q={scales}: above {MAX_TEST_SCALE} px (the paper's largest is 512; a Q = "
                f"{max(scales)} view of a 4:3 image is {values / 1e9:.1f} GB in a loader worker and "
                f"{4 * values / 1e9:.1f} GB as float32 on the device)"
            )
        results = evaluate_protocol(
            model,
            val.samples,
            opts.protocol,
            scales,
            train_crop=d.train_crop,
            spec=TransformSpec.from_config(d),
            device=info.device,
            rank=info.rank,
            world_size=info.world_size,
            workers=d.workers,
            precision=opts.precision,
            progress=progress,
        )
        counts = results[opts.protocol]
        expected = len(val)
        backend = "torchvision (per-image)"
        protocol_info = {"test_scales": scales, "train_crop": d.train_crop, "interpolation": d.interpolation}
        for name, c in results.items():
            if name != opts.protocol:
                components[name] = (c, compare(arch, cfg, loaded.config, name, scales, c, opts.tolerance))
    seconds = time.perf_counter() - start
    if counts.n != expected:
        raise EvalError(
            f"counted {counts.n:,} images but the val set has {expected:,}: shards must cover every image once"
        )
    comparison = compare(arch, cfg, loaded.config, opts.protocol, scales, counts, opts.tolerance)
    record: dict[str, Any] = {
        "arch": arch,
        "protocol": opts.protocol,
        "top1_err": counts.top1_err,
        "top5_err": counts.top5_err,
        "n_images": counts.n,
        "correct1": counts.correct1,
        "correct5": counts.correct5,
        "error_formula": "100 * (1 - correct / n_images), float64 from summed int64 counts",
        "reference": comparison.as_dict(),
        **protocol_info,
        "components": {
            name: {
                "top1_err": c.top1_err,
                "top5_err": c.top5_err,
                "correct1": c.correct1,
                "correct5": c.correct5,
                "reference": cmp.as_dict(),
            }
            for name, (c, cmp) in components.items()
        },
        "checkpoint": describe(loaded),
        "data_root": str(Path(cfg.data.root).resolve()),
        "data_format": cfg.data.format,
        "backend": backend,
        "precision": opts.precision,
        "world_size": info.world_size,
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "batch_size_per_process": cfg.data.batch_size // info.world_size,
        "seconds": seconds,
        "images_per_s": counts.n / seconds if seconds > 0 else None,
        "versions": _versions(backend),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    result = EvalResult(arch, opts.protocol, counts, comparison, record, components)
    if opts.wandb or opts.wandb_run:
        record["wandb_run"] = _log_wandb(opts, loaded, cfg, result, info.is_main) or None
    if info.is_main and opts.json_path:
        _write_json(opts.json_path, record)
    distributed.barrier()
    return result


def format_result(result: EvalResult) -> str:
    """The console table: arch, our error, the reference error, the difference, PASS/FAIL; then the details."""

    def num(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    rows = [(result.protocol, result.counts, result.comparison)]
    rows += [(name, c, cmp) for name, (c, cmp) in result.components.items()]
    header = (
        f"{'arch':<10} {'protocol':<17} {'images':>7}  {'top-1 err':>9} {'ref':>7} {'diff':>7}  "
        f"{'top-5 err':>9} {'ref':>7} {'diff':>7}  result"
    )
    lines = [header, "-" * len(header)]
    for name, c, cmp in rows:
        verdict = cmp.verdict
        if cmp.band is not None:
            verdict += f" (top-1 err in {cmp.band[0]:.1f}–{cmp.band[1]:.1f})"
        elif verdict in ("PASS", "FAIL"):
            verdict += f" (|diff top-1| <= {cmp.tolerance:g})"
        lines.append(
            f"{result.arch:<10} {name:<17} {c.n:>7,}  {c.top1_err:>9.3f} {num(cmp.top1_err):>7} "
            f"{num(cmp.diff_top1, '+.3f'):>7}  {c.top5_err:>9.3f} {num(cmp.top5_err):>7} "
            f"{num(cmp.diff_top5, '+.3f'):>7}  {verdict}"
        )
    r = result.record
    for name, _, cmp in rows:
        if cmp.band is not None:
            lines.append(f"reference ({name}): {cmp.source}")
        elif cmp.source:
            lines.append(f"reference ({name}): {cmp.source}" + (f"; {cmp.note}" if cmp.note else ""))
        elif cmp.note:
            lines.append(f"no reference ({name}): {cmp.note}")
    how = (
        f"resize {r['val_resize']} / centre crop {r['val_crop']} ({r['interpolation']})"
        if "val_resize" in r
        else f"test scales Q={r['test_scales']}, training crop {r['train_crop']} ({r['interpolation']})"
    )
    lines.append(
        f"{how}; backend {r['backend']}; {r['world_size']} process(es) on {r['device']}, {r['precision']}; "
        f"{r['seconds']:.1f} s ({r['images_per_s']:,.1f} img/s)"
    )
    ck = r["checkpoint"]
    lines.append(
        f"checkpoint {ck['path']} ({ck['kind']}, arch from {ck['arch_source']}) sha256 {ck['sha256']}"
    )
    cmp = result.comparison
    if cmp.band is not None:  # last: what `make demo` ends with
        lines.append(f"demo: val top-1 err {result.counts.top1_err:.1f} % is {cmp.note}")
    return "\n".join(lines)
