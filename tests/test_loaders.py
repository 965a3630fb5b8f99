"""Loaders (data_pipeline.loader): parity with torchvision's preset, exact sharding, augmentation, bad input.

Real JPEG trees on disk (the demo generator, plus solid-colour images whose every pixel is known), real DALI
CPU pipelines and real DataLoaders. DALI's GPU path is checked by the `gpu`-marked test on a CUDA machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.models import VGG16_Weights

from data_pipeline import DataError, build_loader
from data_pipeline.demo import make_demo_dataset
from data_pipeline.loader import epoch_shards, train_steps, val_shard
from data_pipeline.transforms import PCA_EIGVAL, PCA_EIGVEC, TransformSpec
from train.config import load_config

BACKENDS = ["torchvision", "dali"]
# One uint8 level after normalisation, for the smallest std (0.224): 1 / (255 * 0.224).
ONE_LEVEL = 1 / (255 * min(0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """55 train / 35 val images (neither divisible by 2 or 3), 5 classes, ~200-480 px (downscaled to 256 like
    ImageNet's ~400x350), with greyscale, CMYK and PNG-named-.JPEG files in val."""
    root = tmp_path_factory.mktemp("loaders") / "demo"
    summary = make_demo_dataset(
        root, classes=5, train_per_class=11, val_per_class=7, min_size=200, max_size=480
    )
    kinds = {o.kind for o in summary.oddities if o.split == "val"}
    assert kinds == {"grayscale", "cmyk", "png"}, kinds
    return root


@pytest.fixture(scope="module")
def solid(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int, int]]]:
    """2 classes x 24 solid-colour JPEGs (train and val): every output pixel of an image is known."""
    root = tmp_path_factory.mktemp("solid")
    rng = np.random.default_rng(0)
    colours = {}
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(24):
                rgb = tuple(int(v) for v in rng.integers(40, 216, size=3))
                w, h = int(rng.integers(72, 120)), int(rng.integers(72, 120))
                path = folder / f"img_{i:02d}.JPEG"
                Image.new("RGB", (w, h), rgb).save(path, quality=95)
                decoded = np.asarray(Image.open(path).convert("RGB"))
                assert (decoded == decoded[0, 0]).all()  # a flat JPEG decodes flat (DC coefficients only)
                colours[str(path)] = tuple(int(v) for v in decoded[0, 0])
    return root, colours


def make_cfg(root: Path, backend: str, *overrides: str, batch: int = 8):
    return load_config(
        None,
        [
            f"data.root={root}",
            f"data.backend={backend}",
            f"data.batch_size={batch}",
            "data.workers=0" if backend == "torchvision" else "data.workers=1",
            "launch.gpus=1",
            *overrides,
        ],
    )


def collect(loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    xs, ys, sizes = [], [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        sizes.append(len(y))
    if not xs:  # a rank with no images (more ranks than val images)
        return torch.empty(0), torch.empty(0, dtype=torch.int64), sizes
    return torch.cat(xs), torch.cat(ys), sizes


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_parity_with_torchvision_preset(tree, backend):
    """Val tensors vs torchvision's own VGG16 preset (ImageClassification: PIL resize 256 bilinear antialias,
    centre crop 224) on every val file, greyscale, CMYK and PNG included.

    torchvision backend: the same PIL operations, so only the normalisation's float rounding differs.
    DALI-CPU: the same libjpeg-turbo decode (bit-identical), DALI's INTERP_LINEAR + antialias resize (the triangle
    filter PIL's bilinear also uses), the same output sizes and crop offsets (computed as torchvision does); the
    filters' rounding to uint8 differs by at most one level. Measured on this tree: max 0.0175 (= one level),
    mean 0.0028. (DALI's resize_shorter + crop_pos 0.5 instead gave max 1.75, mean 0.022: half-pixel shifts.)
    """
    cfg = make_cfg(tree, backend)
    loader = build_loader(cfg, "val")
    images, labels, _ = collect(loader)
    preset = VGG16_Weights.IMAGENET1K_V1.transforms()
    reference = torch.stack([preset(Image.open(p).convert("RGB")) for p, _ in loader.index.samples])
    assert images.shape == reference.shape == (35, 3, 224, 224)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    diff = (images - reference).abs()
    print(f"\n{loader.backend} vs ImageClassification preset: max {diff.max():.6f} mean {diff.mean():.6f}")
    if backend == "torchvision":
        assert diff.max() < 1e-5
    else:
        assert diff.max() <= ONE_LEVEL * 1.001, f"max abs diff {diff.max():.4f} > one uint8 level"
        assert diff.mean() < 0.25 * ONE_LEVEL, f"mean abs diff {diff.mean():.4f}"
    # Label order: torchvision's ImageFolder, file by file.
    folder = ImageFolder(str(tree / "val"))
    assert [p for p, _ in loader.index.samples] == [p for p, _ in folder.samples]
    assert labels.tolist() == folder.targets
    assert loader.classes == folder.classes


def test_transform_spec_reads_config(tree):
    cfg = make_cfg(
        tree, "dali", "data.interpolation=bicubic", "data.mean=[0.5,0.5,0.5]", "data.val_resize=300"
    )
    spec = TransformSpec.from_config(cfg)
    assert spec == TransformSpec.from_config(cfg.data)
    assert spec.interpolation == "bicubic" and spec.mean == (0.5, 0.5, 0.5) and spec.val_resize == 300
    assert spec.mean255 == (127.5, 127.5, 127.5)
    with pytest.raises(dataclasses.FrozenInstanceError):  # one definition, not mutated by a backend
        spec.val_crop = 10  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- sharding


def test_shard_math_matches_distributed_sampler():
    for n in (10, 35, 55):
        for ws in (1, 2, 3):
            for epoch in (0, 1, 5):
                shards = epoch_shards(n, ws, seed=7, epoch=epoch)
                for r in range(ws):
                    sampler = DistributedSampler(
                        range(n), num_replicas=ws, rank=r, shuffle=True, seed=7, drop_last=True
                    )
                    sampler.set_epoch(epoch)
                    assert shards[r] == list(sampler)
                flat = [i for s in shards for i in s]
                assert len(flat) == len(set(flat)) == (n // ws) * ws
            blocks = [val_shard(n, r, ws) for r in range(ws)]
            assert [i for b in blocks for i in b] == list(range(n))
    assert epoch_shards(55, 2, 0, 0) != epoch_shards(55, 2, 0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3, 40])
def test_val_shards_disjoint_and_complete(tree, backend, world_size):
    """Ranks' val outputs, concatenated in rank order, are exactly the single-process output: every image once.
    40 ranks for 35 images: five ranks have none (DALI's own sharding refuses more shards than images)."""
    overrides = ("data.val_resize=73", "data.val_crop=64")
    whole, whole_labels, _ = collect(build_loader(make_cfg(tree, backend, *overrides, batch=6), "val"))
    assert len(whole) == 35
    cfg = make_cfg(tree, backend, *overrides, batch=6 if 6 % world_size == 0 else world_size)
    parts, part_labels, counts = [], [], []
    for rank in range(world_size):
        loader = build_loader(cfg, "val", rank=rank, world_size=world_size)
        x, y, sizes = collect(loader)
        assert len(sizes) == len(loader) == math.ceil(loader.num_samples / loader.batch_size)
        assert len(x) == loader.num_samples == len(val_shard(35, rank, world_size))
        assert all(s == loader.batch_size for s in sizes[:-1])
        parts.append(x)
        part_labels.append(y)
        counts.append(len(sizes))
    assert sum(len(p) for p in parts) == 35
    assert max(counts) - min(counts) <= 1
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(torch.cat(part_labels), whole_labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_shards_equal_steps_and_sampler_order(tree, backend, world_size):
    """Every rank runs (N // W) // batch steps; labels follow DistributedSampler's order for (seed, epoch)."""
    cfg = make_cfg(tree, backend, "data.train_crop=32", "seed=3", batch=6)
    per_rank = 6 // world_size
    lengths = []
    for rank in range(world_size):
        loader = build_loader(cfg, "train", rank=rank, world_size=world_size)
        assert len(loader) == train_steps(55, world_size, per_rank)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            _, labels, sizes = collect(loader)
            assert sizes == [per_rank] * len(loader)
            order = epoch_shards(55, world_size, seed=3, epoch=epoch)[rank][: len(loader) * per_rank]
            assert labels.tolist() == [loader.index.samples[i][1] for i in order]
        lengths.append(len(loader))
    assert len(set(lengths)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_are_a_function_of_seed_and_epoch(tree, backend):
    """Same (seed, epoch): identical augmented batches from a fresh loader, another worker count, a repeated
    pass; another epoch: different. Loading in the main process leaves the global torch RNG alone."""
    extra = ("data.train_crop=32", "data.color_pca_std=0.1", "data.augment=rrc")
    first = build_loader(make_cfg(tree, backend, *extra), "train")
    first.set_epoch(1)
    torch.manual_seed(123)
    untouched = torch.rand(4, generator=torch.Generator().manual_seed(123))  # what torch.rand(4) gives next
    x1, y1, _ = collect(first)
    assert torch.equal(
        torch.rand(4), untouched
    )  # the trainer's RNG stream (dropout) is not shifted by loading
    other = build_loader(make_cfg(tree, backend, *extra, "data.workers=2"), "train")
    other.set_epoch(1)
    x2, y2, _ = collect(other)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _, _ = collect(first)
    assert torch.equal(x1, x3)
    first.set_epoch(2)
    x4, _, _ = collect(first)
    assert not torch.equal(x1, x4)
    other.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_and_broken_off_passes(tree, backend):
    """A second val pass repeats the first; a pass broken off early does not shift the next one."""
    loader = build_loader(make_cfg(tree, backend, "data.val_resize=40", "data.val_crop=32"), "val")
    first, labels, _ = collect(loader)
    for _ in loader:
        break
    second, labels2, _ = collect(loader)
    assert torch.equal(first, second) and torch.equal(labels, labels2)


# ------------------------------------------------------------------------------------------ augmentation


def test_scale_jitter_range_torchvision(tree):
    """Paper scale jitter: the shorter side before the crop is an integer S in [scale_min, scale_max]."""
    spec = TransformSpec.from_config(
        make_cfg(
            tree,
            "torchvision",
            "data.augment=scale",
            "data.train_crop=64",
            "data.scale_min=70",
            "data.scale_max=90",
        ).data
    )
    resize = spec.train_transform().transforms[0]
    assert type(resize) is type(spec.train_resize())
    image = Image.open(next((tree / "train").rglob("*.JPEG"))).convert("RGB")
    torch.manual_seed(0)
    shorter = [min(resize(image).size) for _ in range(300)]
    assert min(shorter) == 70 and max(shorter) == 90, (min(shorter), max(shorter))
    assert len(set(shorter)) == 21


def _dali_train_debug(tree: Path, *overrides: str, batch: int = 55):
    from data_pipeline.dali_backend import build_pipeline
    from data_pipeline.layout import index_split

    spec = TransformSpec.from_config(make_cfg(tree, "dali", *overrides))
    samples = index_split(tree, "train").samples
    files, labels = [p for p, _ in samples], [lab for _, lab in samples]
    pipe = build_pipeline(spec, files, labels, split="train", batch_size=batch, seed=1, debug=True)
    pipe.build()
    return spec, files, pipe


def test_scale_jitter_range_dali(tree):
    """DALI's pipeline with its debug outputs: the image is rescaled so its shorter side is S in [scale_min,
    scale_max] (covering the range; the longer side int(S x long / short)) before a random 64 crop. The crop is
    computed from the source window directly (no full-size resize), so the pixels are checked too: they are PIL's
    resize to that size, then the crop, within one uint8 level."""
    spec, files, pipe = _dali_train_debug(
        tree,
        "data.augment=scale",
        "data.train_crop=64",
        "data.scale_min=70",
        "data.scale_max=90",
        "data.hflip=false",
    )
    shorter = []
    for rep in range(4):
        images, _, geometry, _ = pipe.run()
        assert np.array(images.as_tensor()).shape == (55, 3, 64, 64)
        for i, path in enumerate(files):
            h, w, top, left = (int(v) for v in np.array(geometry[i]))
            s = min(h, w)
            original = Image.open(path).convert("RGB")
            w0, h0 = original.size
            assert (h, w) == ((s * h0) // min(h0, w0), (s * w0) // min(h0, w0))
            assert 0 <= top <= h - 64 and 0 <= left <= w - 64
            shorter.append(s)
            if rep == 0 and i < 12:
                resized = original.resize((w, h), Image.Resampling.BILINEAR).crop(
                    (left, top, left + 64, top + 64)
                )
                reference = spec.normalize(torch.from_numpy(np.array(resized)).permute(2, 0, 1))
                diff = (torch.from_numpy(np.array(images[i])) - reference).abs().max()
                assert diff <= ONE_LEVEL * 1.001, (path, float(diff))
    assert min(shorter) == 70 and max(shorter) == 90, (min(shorter), max(shorter))
    assert len(set(shorter)) >= 18


def test_rrc_window_dali(tree):
    """DALI's RandomResizedCrop window (decoded region) has the configured area fraction and aspect ratio."""
    _, files, pipe = _dali_train_debug(tree, "data.train_crop=32", "data.rrc_scale=[0.25,0.5]")
    sizes = {f: Image.open(f).size for f in files}
    fractions, ratios = [], []
    for _ in range(3):
        images, _, geometry, _ = pipe.run()
        assert np.array(images.as_tensor()).shape == (55, 3, 32, 32)
        for i, path in enumerate(files):
            h, w = (int(v) for v in np.array(geometry[i])[:2])
            w0, h0 = sizes[path]
            fractions.append(h * w / (h0 * w0))
            ratios.append(w / h)
    # Integer window sides: a few % of rounding on these ~200-480 px images.
    assert min(fractions) >= 0.25 * 0.95 and max(fractions) <= 0.5 * 1.05, (min(fractions), max(fractions))
    assert min(ratios) >= 0.75 * 0.95 and max(ratios) <= 4 / 3 * 1.05, (min(ratios), max(ratios))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", ["rrc", "scale"])
def test_train_batches_shapes_and_normalisation(solid, backend, augment):
    """rrc/scale + flip on flat images: shape, dtype, and every pixel = (colour - 255 mean) / (255 std)."""
    root, colours = solid
    cfg = make_cfg(
        root,
        backend,
        f"data.augment={augment}",
        "data.train_crop=48",
        "data.scale_min=60",
        "data.scale_max=80",
        "data.color_pca_std=0",
        batch=16,
    )
    loader = build_loader(cfg, "train")
    spec = loader.spec
    order = epoch_shards(48, 1, seed=0, epoch=0)[0]
    seen = 0
    for b, (x, y) in enumerate(loader):
        assert x.shape == (16, 3, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.int64
        for j in range(16):
            path, label = loader.index.samples[order[b * 16 + j]]
            expected = (
                torch.tensor(colours[path], dtype=torch.float32) - torch.tensor(spec.mean255)
            ) / torch.tensor(spec.std255)
            assert y[j] == label
            assert torch.allclose(x[j], expected.view(3, 1, 1).expand(3, 48, 48), atol=1e-5), (
                path,
                x[j].mean((1, 2)),
            )
            seen += 1
    assert seen == 48


def _expected_shift_std() -> np.ndarray:
    """Std of each RGB channel's PCA shift on the 0..255 scale per unit alpha std: ||row of V diag(lambda)||."""
    v = np.asarray(PCA_EIGVEC) * np.asarray(PCA_EIGVAL)
    return 255 * np.sqrt((v**2).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pca_lighting_magnitude(solid, backend):
    """Colour shift on flat images: constant per image, std per channel = sigma x 255 x ||V_c diag(lambda)||
    (about 3.2 levels at sigma 0.1; we use 0.5 for a clear signal), channels strongly correlated (the first
    eigenvector is ~(-0.57, -0.58, -0.58)), and different every epoch."""
    root, colours = solid
    sigma = 0.5
    cfg = make_cfg(root, backend, "data.train_crop=32", f"data.color_pca_std={sigma}", batch=16)
    loader = build_loader(cfg, "train")
    spec = loader.spec
    shifts = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        order = epoch_shards(48, 1, seed=0, epoch=epoch)[0]
        for b, (x, _) in enumerate(loader):
            rgb = x * torch.tensor(spec.std255).view(1, 3, 1, 1) + torch.tensor(spec.mean255).view(1, 3, 1, 1)
            for j in range(len(x)):
                colour = torch.tensor(
                    colours[loader.index.samples[order[b * 16 + j]][0]], dtype=torch.float32
                )
                shift = rgb[j] - colour.view(3, 1, 1)
                assert (shift - shift[:, :1, :1]).abs().max() < 1e-3  # one shift for the whole image
                shifts.append(shift[:, 0, 0].numpy())
    s = np.stack(shifts)  # 144 x 3
    measured, expected = s.std(0), sigma * _expected_shift_std()
    print(f"\n{loader.backend}: shift std {measured.round(2)} expected {expected.round(2)}")
    assert np.all(np.abs(measured / expected - 1) < 0.3), (measured, expected)
    assert np.corrcoef(s.T)[0, 2] > 0.9
    assert np.abs(s.mean(0)).max() < 0.3 * expected.max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_honoured(tree, backend):
    overrides = ("data.val_resize=40", "data.val_crop=32")
    plain, _, _ = collect(build_loader(make_cfg(tree, backend, *overrides), "val"))
    loader = build_loader(make_cfg(tree, backend, *overrides, "train.channels_last=true"), "val")
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    cl, _, _ = collect(loader)
    assert torch.equal(cl, plain)
    train = build_loader(make_cfg(tree, backend, "data.train_crop=32", "train.channels_last=true"), "train")
    x, _ = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)


def test_torchvision_workers_persistent_and_deterministic(tree):
    """With worker processes: persistent across epochs, same order as without, pinned only for CUDA."""
    cfg = make_cfg(tree, "torchvision", "data.workers=2", "data.val_resize=40", "data.val_crop=32")
    loader = build_loader(cfg, "val")
    assert loader._dl.persistent_workers and not loader._dl.pin_memory
    x1, y1, _ = collect(loader)
    x2, _, _ = collect(loader)
    x0, y0, _ = collect(
        build_loader(make_cfg(tree, "torchvision", "data.val_resize=40", "data.val_crop=32"), "val")
    )
    assert torch.equal(x1, x0) and torch.equal(x2, x0) and torch.equal(y1, y0)
    loader.close()


def test_torchvision_workers_outlive_stop_signals(tree):
    """SLURM signals every process of a job step (scancel's SIGTERM, --signal's USR2): the workers, the forkserver
    and its resource tracker must live on until the training process has saved, so the next batch still comes."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    import signal

    cfg = make_cfg(tree, "torchvision", "data.workers=2", "data.val_resize=40", "data.val_crop=32")
    loader = build_loader(cfg, "val")
    x1, y1, _ = collect(loader)
    workers = [w.pid for w in loader._dl._iterator._workers]
    helpers = [multiprocessing.forkserver._forkserver._forkserver_pid]
    helpers.append(multiprocessing.resource_tracker._resource_tracker._pid)
    assert len(workers) == 2 and all(helpers)
    pids = [str(pid) for pid in workers + helpers]
    for name in ("TERM", "USR2", "USR1", "INT"):  # sent by another process, as SLURM's are
        subprocess.run(["kill", "-s", name, *pids], check=True)
    time.sleep(0.5)
    x2, y2, _ = collect(loader)  # a worker killed by one of them: "DataLoader worker ... exited unexpectedly"
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # The owner's own SIGTERM (how torch and multiprocessing end a worker that did not exit) still ends one.
    os.kill(workers[0], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{workers[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{workers[0]}").exists() and Path(f"/proc/{workers[1]}").exists()
    loader.close()
    fresh = build_loader(cfg, "val")  # a new loader's workers come from the same (live) forkserver
    assert torch.equal(collect(fresh)[0], x1)
    fresh.close()


# ------------------------------------------------------------------------------------- mid-epoch resume

_opened: list[str] | None = None  # while opened_files() is active: every path this process opens


def _record_open(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | os.PathLike):
        _opened.append(os.fspath(args[0]))


sys.addaudithook(_record_open)  # Python's own audit event for open(): a counter, nothing is replaced


@contextlib.contextmanager
def opened_files(under: Path) -> Iterator[list[str]]:
    """The files under ``under`` that this process opens inside the block, in order."""
    global _opened
    seen: list[str] = []
    _opened = seen
    try:
        yield seen
    finally:
        _opened = None
        seen[:] = [f for f in seen if Path(f).is_relative_to(under)]


@pytest.mark.parametrize(
    ("backend", "workers"),
    [("torchvision", 0), ("torchvision", 2), ("dali", 1)],
    ids=["tv-w0", "tv-w2", "dali"],
)
def test_set_epoch_start_batch_yields_the_rest_of_the_epoch(tree, backend, workers):
    """set_epoch(e, start_batch=k) yields batches k.. of epoch e (len - k of them) on every rank, for one pass.

    torchvision: bitwise those of a full pass: images (per-image augmentation and the per-batch PCA colour
    shifts) and labels. DALI: the same images in the same order (labels; the reader holds only the remaining
    files), same shapes; its augmentation is drawn afresh from (seed, rank, epoch, k), and deterministic."""
    cfg = make_cfg(
        tree,
        backend,
        "data.train_crop=32",
        "data.color_pca_std=0.1",
        f"data.workers={workers}",
        "seed=5",
        batch=6,
    )
    for rank in (0, 1) if backend == "dali" else (1,):  # DALI's shard layout changes with k: check every rank
        loader = build_loader(cfg, "train", rank=rank, world_size=2)
        steps, b = len(loader), loader.batch_size
        assert (steps, b) == (train_steps(55, 2, 3), 3) == (9, 3)
        order = epoch_shards(55, 2, seed=5, epoch=1)[rank]
        loader.set_epoch(1)
        full = list(loader)
        assert torch.cat([y for _, y in full]).tolist() == [
            loader.index.samples[i][1] for i in order[: steps * b]
        ]
        resumed = {}
        for k in (4, steps - 1, steps):
            loader.set_epoch(1, start_batch=k)
            part = list(loader)
            assert len(part) == steps - k
            for (x, y), (fx, fy) in zip(part, full[k:], strict=True):
                assert torch.equal(y, fy)
                if backend == "torchvision":
                    assert torch.equal(x, fx)
                else:
                    assert x.shape == fx.shape == (3, 3, 32, 32) and x.dtype == fx.dtype
            if backend == "dali" and k < steps:  # DALI's reader holds only this rank's remaining images
                assert loader._pipe.reader_meta("Reader")["epoch_size"] == 55 // 2 - k * b
            resumed[k] = part
        # One-shot: the pass after a resumed one, and the next set_epoch without start_batch, are full passes.
        loader.set_epoch(1, start_batch=4)
        again = list(loader)
        for after in (list(loader), (loader.set_epoch(1), list(loader))[1]):
            assert len(after) == steps
            for (x, y), (fx, fy) in zip(after, full, strict=True):
                assert torch.equal(x, fx) and torch.equal(y, fy)
        for (x, y), (rx, ry) in zip(again, resumed[4], strict=True):  # the same (epoch, k): the same batches
            assert torch.equal(x, rx) and torch.equal(y, ry)
        loader.close()


def test_torchvision_start_batch_never_decodes_the_skipped_images(tree):
    """The skipped batches' images are never opened: the pass opens exactly batches k..'s files, in order.
    (Counted with Python's audit event for open(), in the main process: workers=0.)"""
    loader = build_loader(make_cfg(tree, "torchvision", "data.train_crop=32", batch=6), "train", 0, 2)
    steps, b, k = len(loader), loader.batch_size, 5
    files = [loader.index.samples[i][0] for i in epoch_shards(55, 2, seed=0, epoch=3)[0]]
    loader.set_epoch(3, start_batch=k)
    with opened_files(tree / "train") as opened:
        assert sum(1 for _ in loader) == steps - k
    assert opened == files[k * b : steps * b]
    loader.set_epoch(3)  # the counter sees every decode of a full pass
    with opened_files(tree / "train") as opened:
        assert sum(1 for _ in loader) == steps
    assert opened == files[: steps * b]


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_bad_start_batch(tree, backend):
    train = build_loader(make_cfg(tree, backend, "data.train_crop=32"), "train")
    steps = len(train)
    train.set_epoch(2, start_batch=steps - 1)
    for bad in (-1, steps + 1):
        with pytest.raises(ValueError, match=rf"start_batch must be in \[0, {steps}\].*got {bad}$"):
            train.set_epoch(5, start_batch=bad)
    assert train.epoch == 2 and len(list(train)) == 1  # a refused call changes nothing
    val = build_loader(make_cfg(tree, backend, "data.val_resize=40", "data.val_crop=32"), "val")
    with pytest.raises(ValueError, match="start_batch is for train loaders only"):
        val.set_epoch(0, start_batch=1)
    val.set_epoch(1, start_batch=0)
    assert sum(len(y) for _, y in val) == 35


# --------------------------------------------------------------------------------------------- bad input


def _copy(tree: Path, dst: Path) -> Path:
    shutil.copytree(tree, dst)
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_root_and_split(tmp_path, backend):
    with pytest.raises(DataError, match="does not exist"):
        build_loader(make_cfg(tmp_path / "nope", backend), "val")
    (tmp_path / "only_train" / "train" / "n1").mkdir(parents=True)
    with pytest.raises(DataError, match="val is missing"):
        build_loader(make_cfg(tmp_path / "only_train", backend), "val")


def test_empty_class_folder_and_class_mismatch(tree, tmp_path):
    root = _copy(tree, tmp_path / "t")
    (root / "val" / "n99000099").mkdir()
    with pytest.raises(DataError) as e:
        build_loader(make_cfg(root, "dali"), "val")
    assert "n99000099" in str(e.value) and "\n" not in str(e.value)
    (root / "val" / "n99000099" / "x.JPEG").write_bytes(
        (tree / "val").rglob("*.JPEG").__next__().read_bytes()
    )
    with pytest.raises(DataError, match=r"class folders differ.*1 only in val \['n99000099'\]"):
        build_loader(make_cfg(root, "torchvision"), "val")
    with pytest.raises(DataError, match="class folders differ"):
        build_loader(make_cfg(root, "dali"), "train")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_unreadable_image_is_one_line_naming_the_file(tree, tmp_path, backend, damage):
    root = _copy(tree, tmp_path / "t")
    victim = sorted((root / "val").rglob("*.JPEG"))[17]
    if damage == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.write_text("this is not an image\n")
    workers = ("data.workers=1",) if backend == "torchvision" else ()  # re-raised from a worker process
    loader = build_loader(make_cfg(root, backend, "data.val_resize=40", "data.val_crop=32", *workers), "val")
    with pytest.raises(DataError) as e:
        collect(loader)
    message = str(e.value)
    assert str(victim) in message and "\n" not in message, message
    assert "Traceback" not in message and "Critical error" not in message


def test_dali_gpu_without_cuda_is_an_error(tree):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: data.dali_device=gpu is valid")
    with pytest.raises(DataError, match=r"data\.dali_device=gpu needs a CUDA device"):
        build_loader(make_cfg(tree, "dali", "data.dali_device=gpu"), "val")
    assert (
        build_loader(make_cfg(tree, "dali"), "val").backend == "dali-cpu"
    )  # auto on CPU: stated, not hidden


def test_train_smaller_than_one_global_batch(tree):
    with pytest.raises(DataError, match="not one full batch"):
        build_loader(make_cfg(tree, "dali", batch=64), "train", rank=0, world_size=1)


# -------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI device='mixed')")
def test_dali_gpu_matches_cpu_and_lands_on_device(tree):
    device = torch.device("cuda", 0)
    cpu, cpu_labels, _ = collect(build_loader(make_cfg(tree, "dali", "data.dali_device=cpu"), "val"))
    loader = build_loader(make_cfg(tree, "dali", "data.dali_device=gpu"), "val", device=device)
    assert loader.backend == "dali-gpu"
    gpu, gpu_labels, _ = collect(loader)
    assert gpu.device.type == "cuda" and gpu_labels.device.type == "cuda" and gpu_labels.dtype == torch.int64
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    diff = (gpu.cpu() - cpu).abs()
    print(f"\ndali-gpu vs dali-cpu val: max {diff.max():.5f} mean {diff.mean():.6f}")
    # nvJPEG's IDCT (with fancy upsampling on) differs from libjpeg-turbo's by a level or two on some pixels.
    assert diff.mean() < ONE_LEVEL
    preset = VGG16_Weights.IMAGENET1K_V1.transforms()
    reference = torch.stack([preset(Image.open(p).convert("RGB")) for p, _ in loader.index.samples])
    print(
        f"dali-gpu vs preset: max {(gpu.cpu() - reference).abs().max():.5f} mean {(gpu.cpu() - reference).abs().mean():.6f}"
    )
    for augment in ("rrc", "scale"):
        cfg = make_cfg(
            tree,
            "dali",
            f"data.augment={augment}",
            "data.color_pca_std=0.1",
            "train.channels_last=true",
            "data.train_crop=64",
            "data.scale_min=70",
            "data.scale_max=90",
            batch=6,
        )
        train = build_loader(cfg, "train", rank=1, world_size=2, device=device)
        n = 0
        for x, y in train:
            assert (
                x.device == device
                and x.shape == (3, 3, 64, 64)
                and x.is_contiguous(memory_format=torch.channels_last)
            )
            assert y.device == device and y.dtype == torch.int64
            n += 1
        assert n == len(train) == train_steps(55, 2, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_labels_reach_the_gpu_through_pinned_memory_without_a_sync():
    """DALI's CPU labels (a pack's .cls bytes, parsed on the host) are copied with non_blocking from pinned memory:
    the copy is queued behind a long kernel instead of waiting for it."""
    from data_pipeline.dali_backend import to_device

    device = torch.device("cuda", 0)
    labels = torch.arange(256, dtype=torch.int64)
    a = torch.randn(8192, 8192, device=device)
    to_device(labels, device)  # warm-up: the first pinned block is allocated once
    torch.cuda.synchronize()
    for _ in range(10):  # ~10 TFLOP queued: the GPU is busy for a good fraction of a second
        busy = a @ a
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    out = to_device(labels, device)
    queued = not start.query()  # the host got here while the matmul still runs: no sync happened
    assert out.device == device and torch.equal(out.cpu(), labels)
    assert queued, "to_device waited for the GPU"
    assert to_device(out, device) is out and busy.shape == a.shape
