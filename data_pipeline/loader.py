"""Train/val loaders: one interface over the DALI backend (GPU or CPU-only) and the torchvision backend.

    from data_pipeline import build_loader
    loader = build_loader(cfg, "train", rank=rank, world_size=world_size, device=device)
    for epoch in range(epochs):
        loader.set_epoch(epoch)              # order: a function of (cfg.seed, epoch), as DistributedSampler's
        for images, labels in loader:        # float32 NCHW normalised, int64 labels, both on `device`
            ...
    # resuming from a checkpoint taken after batch k of epoch e (a SLURM time limit, a preemption):
    loader.set_epoch(e, start_batch=k)       # the next pass yields batches k.. of epoch e: len(loader) - k
    for i, (images, labels) in enumerate(loader, start=k):   # i: the batch index within the epoch
        ...

Mid-epoch resume (``set_epoch(epoch, start_batch=k)``, train loaders; ``0 <= k <= len(loader)``, a val loader
accepts only 0, anything else is a ``ValueError``): the next pass starts at batch ``k`` of that epoch's order
and never reads the first ``k`` batches' images; it applies to that one pass (a later pass, and every
``set_epoch`` without it, is a full epoch). Batches k.. are bitwise those of an uninterrupted pass: same images,
same crops, flips and colour shifts. torchvision backend: by construction (augmentation seeded per image, colour
shifts advanced past the skipped batches). DALI: from the pipeline checkpoint that ``state_dict()`` took at batch
k (``set_epoch(e, start_batch=k, state=...)``; DALI's random streams are per pipeline and restored, not
re-derived); without a usable one, the same images in the same order with fresh random augmentation, and
``set_epoch`` returns the one-line reason (see ``data_pipeline.dali_backend``). The trainer keeps every rank's
``state_dict()`` in ``last.pth``.

Which backend: ``data.backend=torchvision`` → PIL decoding + torchvision.transforms.v2 in DataLoader workers
(``torchvision``); ``data.backend=dali`` → DALI, with ``data.dali_device``: ``auto`` decodes on the GPU
(``dali-gpu``, nvJPEG/hardware decoder) when ``device`` is CUDA and with CPU operators (``dali-cpu``) otherwise;
``gpu`` insists on GPU decoding and is an error (``DataError``) when ``device`` is not a CUDA device — no silent
fallback; ``cpu`` always uses CPU operators. ``loader.backend`` says which path produced the numbers.

Sharding (``world_size`` processes, ``rank`` = the GLOBAL rank):

* train: every epoch is a permutation of the dataset drawn from ``cfg.seed + epoch`` (torch.randperm, as
  ``DistributedSampler``), cut to a multiple of ``world_size``; rank r takes every world_size-th index from r,
  exactly ``DistributedSampler(shuffle=True, drop_last=True)``'s split. Every rank runs
  ``(dataset_size // world_size) // batch`` steps (the same number on every rank: DDP never waits on a missing
  batch); the last partial batch is dropped. Both backends visit the same images in the same order.
* val: rank r reads the contiguous block ``[N·r // W, N·(r+1) // W)`` of the sorted file list (the split
  ``fn.readers.file`` makes with ``shard_id=rank, num_shards=W``), every image exactly once over all ranks, no
  padding duplicates; the last batch may be partial and batch counts may differ by one between ranks.

Source format (``data.format``): ``folder`` (default) reads ``ROOT/{train,val}/<wnid>/*.JPEG``; ``shards`` reads a
pack made by ``python -m data_pipeline pack`` (``data_pipeline.shard_reader``: tar shards read by offset, in an
epoch order of its own — shard order, then each shard's samples, permuted by (seed, epoch); the same
``(N // W) // batch`` steps on every rank; val the same blocks of the same images as the folder). A format is a
reader inside each backend: DALI's ``fn.readers.webdataset``, the torchvision backend's ``os.pread``.

File tables (issue 28): a split is listed once per job, not once per rank. ``layout.file_table`` (folders) and
``shard_reader.open_shards`` (a pack's index files) write the split's table as numpy arrays to the run folder's
``file_tables/`` (the first rank to take its lock lists, with every check of ``index_split`` / ``open_shards``;
the others wait, then map it, or raise the same ``DataError``); a rank then reads only its share of it. The table
is reused while the tree is as it was listed (the (inode, mtime_ns) of the split folder, every class folder and
every folder holding images; for a pack the manifest's, every tar's and index file's) and rebuilt otherwise.
Without a run folder on disk every rank lists by itself.

Per-process batch = ``data.batch_size // world_size``. Labels are indices into the sorted class folders
(``data_pipeline.layout``: torchvision ImageFolder's order). Bad input (missing root, empty class folder,
train/val class mismatch, an unreadable image) raises ``DataError`` with one line naming what is wrong.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torchvision.datasets.folder import find_classes

from data_pipeline.base import (
    CHECK_HINT,
    SPLITS,
    Loader,
    decode_error_reason,
    epoch_shards,
    train_steps,
    val_shard,
    worker_error_line,
)
from data_pipeline.layout import TABLE_DIR, DataError, SplitIndex, class_folders_differ, file_table
from data_pipeline.shard_reader import MANIFEST, ShardIndex, is_pack, open_shards
from data_pipeline.transforms import TransformSpec

# CHECK_HINT, decode_error_reason, ...: defined in data_pipeline.base, re-exported for existing callers
__all__ = [
    "CHECK_HINT",
    "SPLITS",
    "Loader",
    "build_loader",
    "decode_error_reason",
    "epoch_shards",
    "train_steps",
    "val_shard",
    "worker_error_line",
]

log = logging.getLogger(__name__)


def _index(
    root: str, split: str, fmt: str = "folder", cache: str | Path | None = None
) -> SplitIndex | ShardIndex:
    """Index the split; when the other split's folder exists too, its class folders must be the same. A pack
    (``fmt="shards"``) has one class list for both splits (its manifest's). ``cache``: the folder where one
    process of the job writes the split's file table and the others map it (``layout.file_table``,
    ``shard_reader.open_shards``)."""
    if fmt == "shards":
        return open_shards(root, split, cache)
    if fmt != "folder":
        raise DataError(f"data.format={fmt!r} is not one of: folder, shards")
    if is_pack(root):
        raise DataError(f"{root} is a pack (it holds {MANIFEST}): set data.format=shards to read it")
    index = file_table(root, split, cache)
    other = Path(root) / ("val" if split == "train" else "train")
    if other.is_dir():
        try:
            other_classes, _ = find_classes(str(other))
        except FileNotFoundError:
            raise DataError(f"{other} has no class folders") from None
        train, val = (index.classes, other_classes) if split == "train" else (other_classes, index.classes)
        differ = class_folders_differ(root, train, val)
        if differ:
            raise DataError(differ)
    return index


DALI_BUILDS = {"nvidia-dali-cuda120": 12, "nvidia-dali-cuda130": 13}  # pip distribution → its CUDA major


def dali_builds() -> dict[str, str]:
    """The DALI builds installed in this environment ({distribution: version})."""
    from importlib import metadata

    found = {}
    for name in DALI_BUILDS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def check_dali_cuda() -> None:
    """Refuse, in one line, a DALI build that cannot run GPU pipelines here: two builds installed over each other,
    or a build for a newer CUDA than the NVIDIA driver supports (torch may still work: its CUDA is another
    build's). Called where DALI is about to decode on the GPU."""
    builds = dali_builds()
    if len(builds) > 1:
        raise DataError(
            f"two DALI builds are installed ({', '.join(builds)}): they overwrite each other; keep the one for "
            f"torch's CUDA {torch.version.cuda} (pip uninstall the other, then reinstall it)"
        )
    driver = torch._C._cuda_getDriverVersion() if torch.cuda.is_available() else 0  # e.g. 12040: CUDA 12.4
    for name, major in DALI_BUILDS.items():
        if name in builds and driver and driver // 1000 < major:
            raise DataError(
                f"{name} needs a driver for CUDA {major}, this NVIDIA driver supports CUDA "
                f"{driver // 1000}.{driver % 1000 // 10}: pip install nvidia-dali-cuda{driver // 1000}0 instead (and "
                "a torch built for it: README, Install on a cluster), or data.dali_device=cpu"
            )


def _dali_wants_gpu(dali_device: str, device: torch.device) -> bool:
    if dali_device == "cpu":
        return False
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"device {device} was asked for but CUDA is not available")
        check_dali_cuda()
        return True
    if dali_device == "gpu":
        raise DataError(
            f"data.dali_device=gpu needs a CUDA device, but this process runs on {device}"
            f"{'' if torch.cuda.is_available() else ' (no CUDA here)'}: set data.dali_device=cpu (DALI's "
            "CPU-only pipeline) or data.backend=torchvision"
        )
    return False  # auto on a CPU device


def build_loader(
    cfg,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    *,
    decoder: str = "pil",
) -> Loader:
    """The ``split`` ("train" | "val") loader of process ``rank`` (global) of ``world_size`` for ``cfg``
    (a ``train.config.Config``). Raises ``DataError`` (one line) for a bad dataset or an impossible request.

    ``decoder`` (torchvision backend only): ``pil`` (default, as torchvision's reference scripts) or
    ``torchvision.io`` (``decode_image`` on tensors; the benchmarks compare both)."""
    device = torch.device(device)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    d = cfg.data
    if d.batch_size % world_size:
        raise DataError(
            f"data.batch_size={d.batch_size} (global) is not divisible by the world size {world_size}"
        )
    batch = d.batch_size // world_size
    # The file table is listed once per job and shared through the run folder (issue 28: not once per rank), when
    # there is one (the trainer makes it before its loaders; an evaluation of a copied checkpoint may have none).
    run_dir = getattr(cfg, "run_dir", "")
    cache = Path(run_dir) / TABLE_DIR if run_dir and Path(run_dir).is_dir() else None
    index = _index(d.root, split, getattr(d, "format", "folder"), cache)
    if split == "train" and train_steps(len(index), world_size, batch) == 0:
        raise DataError(
            f"{index.root} has {len(index)} images: not one full batch of {batch} for each of {world_size} "
            "processes; lower data.batch_size"
        )
    common = dict(
        index=index,
        split=split,
        spec=TransformSpec.from_config(d),
        batch_size=batch,
        rank=rank,
        world_size=world_size,
        device=device,
        seed=int(cfg.seed),
        channels_last=bool(cfg.train.channels_last),
        workers=int(d.workers),
    )
    loader: Loader
    if d.backend == "torchvision":
        from data_pipeline.torchvision_backend import TorchvisionLoader

        loader = TorchvisionLoader(**common, decoder=decoder)
        if split == "train" and getattr(cfg.log, "sample_ids", False):
            if isinstance(index, ShardIndex):
                raise DataError("log.sample_ids=true lists image files: it needs data.format=folder")
            loader.sample_log = Path(cfg.run_dir) / "samples"
    elif d.backend == "dali":
        if getattr(cfg.log, "sample_ids", False):
            raise DataError("log.sample_ids=true needs data.backend=torchvision")
        gpu = _dali_wants_gpu(getattr(d, "dali_device", "auto"), device)
        try:
            from data_pipeline.dali_backend import DaliLoader
        except ImportError as e:
            raise DataError(
                f"data.backend=dali but NVIDIA DALI cannot be imported ({e}): pip install -e '.[cuda13]' (torch "
                f"built for CUDA 13) or '.[cuda12]' (CUDA 12; this torch: {torch.version.cuda or 'CPU-only'}), or set "
                "data.backend=torchvision"
            ) from None
        loader = DaliLoader(**common, gpu=gpu, nvjpeg_prealloc=getattr(d, "dali_nvjpeg_prealloc", False))
        loader.build_ahead = getattr(d, "dali_build_ahead", True)
    else:
        raise DataError(f"data.backend={d.backend!r} is not one of: dali, torchvision")
    log.info(loader.describe())
    return loader
