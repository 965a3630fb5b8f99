"""DALI backend: ``fn.readers.file`` sharded by global rank → decode → resize/crop/flip → normalise, on the GPU
(``dali-gpu``) or with CPU operators only (``dali-cpu``, ``device_id=None``).

    loader = build_loader(cfg, "train", rank, world_size, device)   # cfg.data.backend=dali (data_pipeline.loader)
    pipe = build_pipeline(spec, files, labels, split="val", batch_size=64, gpu=False, num_threads=4)  # raw

Reader: explicit ``files``/``labels`` lists from the split's file table (``layout.file_table``: the file set and
label order of torchvision's ImageFolder; DALI's own directory walk filters extensions differently), each rank's
OWN list read as DALI's only shard (``shard_id=0, num_shards=1``; issue 28: a rank's pipeline holds N // W paths,
not every rank's N), ``pad_last_batch=True``, ``stick_to_shard=True``, no DALI shuffle:

* val: rank r reads only its block ``[N·r // W, N·(r+1) // W)`` of the sorted list (``loader.val_shard``), as a
  single DALI shard (DALI's own sharding refuses more shards than images; a rank with an empty block builds no
  pipeline and counts nothing); the iterator's ``LastBatchPolicy.PARTIAL`` with ``reader_name`` ends at the block's
  end, so each image is seen exactly once over all ranks. One pipeline serves every epoch.
* train: rank r's list is its share of the epoch's order (``base.epoch_shard``: DistributedSampler's permutation
  for (seed, epoch), every W-th index from r); every rank's list has N // W images and the iterator stops after
  ``(N // W) // batch`` full batches (``LastBatchPolicy.DROP``) on every rank. A pipeline is built per epoch (its
  list differs), ahead of time: once half of epoch e's batches are handed out, a thread builds epoch e + 1's
  pipeline (from batch 0) and starts its first batches, which the next pass takes when ``set_epoch`` asked for
  e + 1 (anything else, a resume at batch k, drops it and builds its own); the epoch boundary does not wait for a
  build, and the previous pipeline is torn down in a thread.
* train resumed mid-epoch (``set_epoch(epoch, start_batch=k, state=...)``), exactly: train pipelines are built
  with ``enable_checkpointing=True``; ``state_dict()`` takes DALI's checkpoint of the pass under way
  (``DALIGenericIterator.checkpoints()``: the file reader's position and the state of every random operator —
  crop windows, scale jitter, offsets, flips, colour shifts — after the last batch handed out; ~1-2 KB a rank).
  A resumed pass builds epoch e's full list with the same seed and ``checkpoint=`` that state: the batches from
  k on are bitwise those of the uninterrupted pass (tests/test_train.py). The state is used only when it was
  taken by this backend (dali-cpu and dali-gpu pipelines differ), this DALI version, at (epoch, k), by this rank of
  the same world size, batch, seed and dataset size, with this reader layout (``reader``: a state saved when every
  rank's list was one DALI shard of all N, before issue 28, is refused); otherwise (another process count, an
  older checkpoint)
  ``set_epoch`` returns why and the pass is fast-forwarded: every rank's list starts at its position
  ``k × batch`` (the first image of batch k), so every list has the same length, ``N // W - k × batch``, and
  every rank yields exactly ``steps - k`` full batches (``stick_to_shard``, ``pad_last_batch`` and ``DROP``
  unchanged); the skipped images are never read. Those are
  the same images in the same order as batches k.. of an uninterrupted pass with fresh augmentation: a
  fast-forwarded pipeline is seeded from (seed, rank, epoch, k). ``k = steps`` (stopped after the epoch's last
  batch) yields nothing and builds no pipeline. (GPU training is not bitwise reproducible anyway, the input is.)

Operators. Train ``rrc``: ``decoders.image_random_crop`` (DALI decodes only the random window) → ``resize`` to
crop×crop. Train ``scale``: ``decoders.image`` → the random crop×crop window of the image rescaled so its shorter
side is S ∈ [scale_min, scale_max] (integer, uniform; offsets uniform integers, as torchvision's RandomCrop).
Val: ``decoders.image`` → the centre crop of the image rescaled to shorter side val_resize. Sizes and offsets are
computed as torchvision computes them (longer side = int(S × long / short); centre offsets rounded half to even
like ``F.center_crop``), and only the crop window is resampled: ``fn.resize`` with ``roi_start``/``roi_end`` =
the window mapped back to the source, same scale factor and pixel centres as resizing the whole image, the
filter reading source pixels around the window; the same pixels as resize-then-crop (parity tests) for a fraction
of the cost (a 224² window instead of 256×341, or of 512×683 at the paper's largest S). Resizes use
``interp_type`` LINEAR (or CUBIC) with ``antialias=True`` (the triangle filter widened when shrinking, as PIL's
bilinear). Then ``crop_mirror_normalize`` (flip, mean/std on the 0..255 scale, float32, CHW — or HWC, handed to
torch as an NCHW channels_last view without a copy). The PCA colour shift is a per-sample ``mean``:
``mean − M·alpha`` (``fn.coord_transform``).

GPU (``device="mixed"``): nvJPEG with the A100/H100 hardware JPEG decoder taking ``HW_DECODER_LOAD`` of the
images. Preallocation (``device/host_memory_padding``, ``preallocate_width/height_hint``, sized as NVIDIA's older
DALI ResNet-50 example sized them for ImageNet's largest images) is off by default (``data.dali_nvjpeg_prealloc``):
it reserves hundreds of MB of device and pinned host memory per decoder thread, in every process, and NVIDIA's
current example dropped it; turn it on only where a GPU measurement shows nvJPEG reallocating mid-epoch.

Errors: DALI's exceptions (multi-line, C++ context) are caught at the iterator and re-raised as one-line
``DataError`` naming the file: DALI's message names it when the decoder knows it; otherwise the files of the
failing batches are decoded again with PIL to find it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nvidia.dali import __version__ as dali_version
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from data_pipeline.base import CHECK_HINT, Loader, decode_error_reason, epoch_shard, val_shard
from data_pipeline.layout import DataError
from data_pipeline.shard_reader import SHARD_CHECK_HINT, ShardFiles, ShardIndex, parse_labels
from data_pipeline.transforms import TransformSpec, load_rgb, open_rgb

__all__ = ["DaliLoader", "build_pipeline"]

log = logging.getLogger(__name__)

READER = "Reader"
READER_LAYOUT = "rank-list"  # DaliLoader's reader reads this rank's own list as its only shard (_identity)
PREFETCH = 2  # DALI prefetch_queue_depth: batches prepared ahead

# GPU decoding. Fraction of the JPEGs sent to the hardware JPEG decoder (A100/H100; ignored elsewhere): DALI's
# default, set explicitly so it is visible; the best value depends on CPU threads per GPU (NVIDIA: tune it).
HW_DECODER_LOAD = 0.65
# nvJPEG preallocation (data.dali_nvjpeg_prealloc=true only), from NVIDIA's older DALI ResNet-50 example (sized
# for ImageNet's largest images): bytes of device memory per decoder thread, pinned host memory per thread (×2,
# double-buffered), and the width/height hint for the hardware decoder's buffers.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
PREALLOCATE_WIDTH_HINT = 5980
PREALLOCATE_HEIGHT_HINT = 6430

CLS_WIDTH = 8  # bytes of a pack's .cls member handed out (labels up to 8 digits)

INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without a host sync: a CPU tensor bound for a GPU goes through pinned memory with
    ``non_blocking=True`` (a copy from pageable memory waits for the GPU's work queued before it: the step before).
    The pinned block comes from torch's caching host allocator, which keeps it until the copy has run."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _shorter_side_to(shape: Any, size: Any) -> tuple[Any, Any]:
    """(height, width) as int64 DataNodes after resizing the shorter side to ``size``: the longer side is
    int(size × long / short), as torchvision computes it (integer floor division gives exactly that for positive
    integers). ``shape`` is the (H, W, C) of the encoded image (``fn.peek_image_shape``)."""
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    return (size * h) // short, (size * w) // short


def _centre_offset(extent: Any, crop: int) -> Any:
    """torchvision's centre-crop offset: int(round((extent - crop) / 2)), Python's round (half to even)."""
    d = extent - crop
    half = d // 2
    odd = d - 2 * half
    return half + odd * (half - 2 * (half // 2))  # x.5 rounds up only when `half` is odd


def _random_offset(extent: Any, crop: int) -> Any:
    """A uniform integer in [0, extent - crop], like torchvision's RandomCrop."""
    d = fn.cast(extent - crop, dtype=types.FLOAT)
    u = fn.random.uniform(range=[0.0, 1.0])
    return dmath.min(fn.cast(dmath.floor(u * (d + 1.0)), dtype=types.INT64), extent - crop)


def _f(x: Any) -> Any:
    return fn.cast(x, dtype=types.FLOAT)


def _resize_window(
    images: Any, shape: Any, size: tuple[Any, Any], offset: tuple[Any, Any], crop: int, interp: Any
) -> Any:
    """The crop×crop window at ``offset`` (y, x) of the image resized to ``size`` (h, w), computed without
    resizing the rest: ``fn.resize`` of the matching source region (``roi_start``/``roi_end``, same scale factor,
    same pixel centres; the filter still reads source pixels around the region). The same pixels as resizing then
    cropping, at a fraction of the cost (the parity tests compare with PIL's resize-then-crop)."""
    fy, fx = _f(shape[0]) / _f(size[0]), _f(shape[1]) / _f(size[1])
    oy, ox = _f(offset[0]), _f(offset[1])
    start = fn.stack(oy * fy, ox * fx)
    end = fn.stack((oy + crop) * fy, (ox + crop) * fx)
    return fn.resize(
        images, size=[crop, crop], roi_start=start, roi_end=end, interp_type=interp, antialias=True
    )


def build_pipeline(
    spec: TransformSpec,
    files: list[str],
    labels: list[int],
    *,
    split: str,
    batch_size: int,
    shard_id: int = 0,
    num_shards: int = 1,
    gpu: bool = False,
    device_id: int | None = None,
    num_threads: int = 1,
    seed: int = 0,
    channels_last: bool = False,
    debug: bool = False,
    checkpointing: bool = False,
    checkpoint: bytes | None = None,
    tars: list[str] | None = None,
    tar_indices: list[str] | None = None,
    nvjpeg_prealloc: bool = False,
) -> Any:
    """A DALI pipeline (not built) returning (images, labels) batches; see the module docstring.

    ``nvjpeg_prealloc`` (GPU only): the preallocation hints of NVIDIA's older example (module docstring).

    ``checkpointing=True`` lets ``pipe.checkpoint()`` (or the iterator's ``checkpoints()``) save the reader's
    position and the random operators' state; ``checkpoint`` (implies it) is such a state to resume from.

    ``tars``/``tar_indices`` (instead of ``files``/``labels``): read a pack's samples with
    ``fn.readers.webdataset``, in the order the index files list them; the label output is then each sample's
    ``.cls`` member, its first ``CLS_WIDTH`` bytes zero-padded (``shard_reader.parse_labels`` reads them).

    ``debug=True`` adds two outputs for tests: the geometry, (resized height, resized width, crop top, crop left)
    for val and ``scale`` (for ``rrc``: the decoded window's height and width, then zeros), and the (3,) PCA
    colour shift on the 0..255 scale (zeros without one).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    interp = INTERP[spec.interpolation]
    decoder_device = "mixed" if gpu else "cpu"
    gpu_hints: dict[str, Any] = {}
    if gpu:
        gpu_hints = dict(hw_decoder_load=HW_DECODER_LOAD)
        if nvjpeg_prealloc:
            gpu_hints.update(
                device_memory_padding=DEVICE_MEMORY_PADDING,
                host_memory_padding=HOST_MEMORY_PADDING,
                preallocate_width_hint=PREALLOCATE_WIDTH_HINT,
                preallocate_height_hint=PREALLOCATE_HEIGHT_HINT,
            )
    mean = np.asarray(spec.mean255, dtype=np.float32)
    std = [float(s) for s in spec.std255]
    layout = "HWC" if channels_last else "CHW"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(1, num_threads),
        device_id=device_id if gpu else None,
        seed=seed,
        prefetch_queue_depth=PREFETCH,
        enable_checkpointing=checkpointing or checkpoint is not None,
        checkpoint=checkpoint,
    )
    def pipeline():  # type: ignore[no-untyped-def]
        sharding = dict(
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            stick_to_shard=True,
            random_shuffle=False,
            name=READER,
        )
        if tars is not None:
            jpegs, cls = fn.readers.webdataset(
                paths=tars,
                index_paths=tar_indices,
                ext=["jpg", "cls"],
                missing_component_behavior="error",
                # plain reads: a mapped tar stays resident as far as it was read, so a rank's RSS grew with the
                # data of its epoch (383 -> 223 MB above base at 200,000 files, W = 8); NVIDIA also advises it on
                # network filesystems
                dont_use_mmap=True,
                **sharding,
            )
            label = fn.slice(cls, 0, CLS_WIDTH, axes=[0], out_of_bounds_policy="pad", fill_values=0)
        else:
            jpegs, label = fn.readers.file(files=files, labels=labels, **sharding)
        mirror: Any = 0
        shift: Any = None
        if split == "train" and spec.augment == "rrc":
            images = fn.decoders.image_random_crop(  # decodes only the random window
                jpegs,
                device=decoder_device,
                output_type=types.RGB,
                random_area=list(spec.rrc_scale),
                random_aspect_ratio=list(spec.rrc_ratio),
                num_attempts=10,
                **gpu_hints,
            )
            crop = spec.train_crop
            window = images.shape(device="cpu") if debug else None
            images = fn.resize(images, size=[crop, crop], interp_type=interp, antialias=True)
            geometry = fn.cat(_f(window[0:2]), fn.constant(fdata=[0.0, 0.0], shape=[2])) if debug else None
        else:
            # Same chroma upsampling as libjpeg-turbo (the CPU decoders and PIL) in nvJPEG too, for val.
            extra = dict(jpeg_fancy_upsampling=True) if gpu and split == "val" else {}
            images = fn.decoders.image(
                jpegs, device=decoder_device, output_type=types.RGB, **gpu_hints, **extra
            )
            shape = fn.peek_image_shape(jpegs)
            if split == "val":
                crop = spec.val_crop
                size = _shorter_side_to(shape, spec.val_resize)
                offset = (_centre_offset(size[0], crop), _centre_offset(size[1], crop))
            else:  # the paper's scale jitter: shorter side to S, an integer in [scale_min, scale_max]
                crop = spec.train_crop
                scale = fn.random.uniform(
                    values=list(range(spec.scale_min, spec.scale_max + 1)), dtype=types.INT64
                )
                size = _shorter_side_to(shape, scale)
                offset = (_random_offset(size[0], crop), _random_offset(size[1], crop))
            images = _resize_window(images, shape, size, offset, crop, interp)
            geometry = fn.stack(_f(size[0]), _f(size[1]), _f(offset[0]), _f(offset[1])) if debug else None
        if split == "train":
            if spec.hflip:
                mirror = fn.random.coin_flip(probability=0.5)
            if spec.color_pca_std > 0:
                alpha = fn.random.normal(shape=[3], stddev=spec.color_pca_std)
                matrix = TransformSpec.pca_matrix255().flatten().tolist()
                shift = fn.reshape(fn.coord_transform(fn.reshape(alpha, shape=[1, 3]), M=matrix), shape=[3])
        norm_mean: Any = mean.tolist() if shift is None else types.Constant(mean) - shift
        out = fn.crop_mirror_normalize(
            images, mirror=mirror, mean=norm_mean, std=std, dtype=types.FLOAT, output_layout=layout
        )
        if gpu and tars is None:  # a pack's .cls bytes stay on the CPU: parsed and checked there, no GPU sync
            label = label.gpu()
        if not debug:
            return out, label
        if shift is None:
            shift = fn.constant(fdata=[0.0, 0.0, 0.0], shape=[3], dtype=types.FLOAT)
        return out, label, geometry, _f(shift)

    return pipeline()


def _one_line(e: BaseException) -> str:
    """The informative line of a DALI error (the text after "encountered:", without the pipeline boilerplate)."""
    text = str(e)
    text = text.split("encountered:", 1)[1] if "encountered:" in text else text
    boilerplate = ("Current pipeline object", "Critical error")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(boilerplate)]
    return lines[0] if lines else type(e).__name__


@dataclass
class _Built:
    """A built pipeline and its iterator, for pass ``key`` = (epoch, start batch, restored)."""

    key: tuple[int, int, bool]
    pipe: Any
    iterator: DALIGenericIterator
    shard_files: list[str]  # this rank's files from the start batch on (error messages)
    shard_ids: np.ndarray  # a pack: this rank's sample ids from the start batch on


class DaliLoader(Loader):
    """DALI pipeline + ``DALIGenericIterator`` behind the ``Loader`` interface; see the module docstring."""

    def __init__(self, *args: Any, gpu: bool = False, nvjpeg_prealloc: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gpu = gpu
        self.nvjpeg_prealloc = nvjpeg_prealloc
        self.backend = "dali-gpu" if gpu else "dali-cpu"
        if gpu and self.device.type != "cuda":
            raise DataError(f"dali-gpu needs a CUDA device, got {self.device}")
        self._device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if gpu
            else None
        )
        self._pipe: Any = None
        self._iter: DALIGenericIterator | None = None
        self._ready = False  # a built pipeline/iterator at the start of a pass for self._built_for
        self._built_for: tuple[int, int, bool] | None = (
            None  # (epoch, start batch, restored from a checkpoint)
        )
        self._restore: bytes | None = (
            None  # the DALI checkpoint the next pass (set_epoch's start batch) resumes
        )
        self._position = 0  # batches of the current train epoch handed out (the pass's start batch + yielded)
        self._shard_files: list[str] = []  # this rank's files from the pass's start batch on
        # data.format=shards: the pack's split, this rank's sample ids from the pass's start batch on, and the
        # folder of the index files written for each pass (the order DALI reads)
        self._pack: ShardIndex | None = self.index if isinstance(self.index, ShardIndex) else None
        self._shard_ids = np.empty(0, dtype=np.int64)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._passes = 0  # pack index folders written (one a pass)
        # train: the next epoch's pipeline, built in a thread from half of this one (data.dali_build_ahead)
        self.build_ahead = True
        self._ahead: tuple[threading.Thread, dict[str, Any]] | None = None

    # ------------------------------------------------------------------------------------------ resuming

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict[str, Any] | None = None) -> str | None:
        super().set_epoch(epoch, start_batch)
        self._restore = None
        if self.split != "train" or start_batch in (0, self.steps):  # a full pass, or nothing left of it
            return None
        why = self._unusable(state, start_batch)
        if why is None:
            self._restore = state["pipeline"]  # type: ignore[index]
            return None
        return f"{why}: batches {start_batch}.. of epoch {self.epoch + 1} are its images in order, with fresh crops/flips"

    def _identity(self) -> dict[str, Any]:
        """What a pipeline checkpoint is only valid for (besides its position)."""
        return {
            "backend": self.backend,
            "dali": dali_version,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "format": "shards" if self._pack is not None else "folder",
            # what the reader holds: this rank's list only, as one DALI shard (issue 28). A state saved while
            # every rank's list was one DALI shard each (no such key) has another reader position: refused.
            "reader": READER_LAYOUT,
        }

    def _unusable(self, state: dict[str, Any] | None, start: int) -> str | None:
        if not state or not state.get("pipeline"):
            return "no DALI pipeline state for this rank in the checkpoint"
        for key, value in self._identity().items():
            if state.get(key) != value:
                return f"the DALI pipeline state was saved with {key} {state.get(key)}, this run has {value}"
        if (state.get("epoch"), state.get("batch")) != (self.epoch, start):
            return (
                f"the DALI pipeline state is at epoch {state.get('epoch', -1) + 1} batch {state.get('batch')}, "
                f"not epoch {self.epoch + 1} batch {start}"
            )
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """The DALI checkpoint of the train pass under way after its last batch handed out (module docstring);
        None before a pass has handed out a batch, or where DALI cannot take one (logged)."""
        if self.split != "train" or self._iter is None or self._position == 0:
            return None
        try:
            pipeline = self._iter.checkpoints()[0]
        except (RuntimeError, ValueError) as e:
            log.warning("DALI could not checkpoint the train pipeline (%s): a resume draws fresh augmentation",
                        _one_line(e))  # fmt: skip
            return None
        return {**self._identity(), "epoch": self.epoch, "batch": self._position, "pipeline": bytes(pipeline)}

    # -------------------------------------------------------------------------------------------- building

    def _pack_lists(self, epoch: int, start: int, restore: bool) -> tuple[list[str], list[str], np.ndarray]:
        """(tars, index files, this rank's sample ids from batch ``start`` on) for a pass of a pack: one
        (tar, index) pair per run of this rank's ids from one shard, the index listing them in order (written
        under a private temporary folder, one sub-folder a pass; DALI reads them when the pipeline is built)."""
        pack = self._pack
        assert pack is not None
        if self.split == "val":
            block = val_shard(len(pack), self.rank, self.world_size)
            ids = shard_ids = np.arange(block.start, block.stop, dtype=np.int64)
        else:
            ids = pack.epoch_order(self.seed, epoch, self.world_size)[self.rank]
            skip = start * self.batch_size
            if not restore:  # fast-forwarded (or from 0): the list starts at batch k
                ids = ids[skip:]
                skip = 0
            shard_ids = ids[skip:]
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vgg-pack-index-")
        self._passes += 1
        folder = os.path.join(self._tmp.name, f"pass{self._passes:06d}")
        for old in os.listdir(self._tmp.name):  # earlier passes': their pipelines read them when built
            shutil.rmtree(os.path.join(self._tmp.name, old), ignore_errors=True)
        os.mkdir(folder)
        tars, indices = [], []
        for n, (shard, run) in enumerate(pack.runs(ids)):
            path = os.path.join(folder, f"{n:06d}.idx")
            with open(path, "w") as f:
                f.write(pack.index_text(run))
            tars.append(pack.tar_paths[shard])
            indices.append(path)
        return tars, indices, shard_ids

    def _epoch_lists(self, epoch: int, start: int, restore: bool) -> tuple[list[str], list[int], list[str]]:
        """(files, labels, this rank's files from batch ``start`` on) for a pass: val this rank's block, train
        its share of the epoch's order (``epoch_shard``: DistributedSampler's split), from batch ``start`` on unless
        restored (DALI's checkpoint skips those). Only this rank's N // W paths are read from the file table
        (issue 28: not all N, every epoch)."""
        table = self.index.samples
        skip = 0
        if self.split == "val":
            block = val_shard(len(table), self.rank, self.world_size)
            order = np.arange(block.start, block.stop, dtype=np.int64)
        else:
            order = epoch_shard(len(table), self.world_size, self.seed, epoch, self.rank)
            skip = start * self.batch_size
            if not restore:
                order = order[skip:]
                skip = 0
        files, labels = [table.path(i) for i in order.tolist()], table.labels[order].tolist()
        return files, labels, files[skip:]

    def _seed(self, epoch: int, start: int, restore: bool) -> int:
        entropy = [self.seed, self.rank, epoch, self.split == "val"]
        if start and not restore:  # a fast-forwarded pass draws its own augmentation
            entropy.append(start)
        state = np.random.SeedSequence(entropy).generate_state(1)
        return int(state[0] % (2**31 - 1))

    def _make(self, epoch: int, start: int, restore: bytes | None) -> _Built:
        """The pipeline and iterator of the pass of ``epoch`` from batch ``start`` (restored from the DALI
        checkpoint ``restore``, or fast-forwarded): this rank's own list as DALI's only shard. Touches no state
        that a pass under way reads, so it also runs in the build-ahead thread."""
        pack = self._pack is not None
        restored = restore is not None
        shard_files: list[str] = []
        shard_ids = np.empty(0, dtype=np.int64)
        if pack:
            files, labels = [], []
            tars, tar_indices, shard_ids = self._pack_lists(epoch, start, restored)
        else:
            files, labels, shard_files = self._epoch_lists(epoch, start, restored)
            tars = tar_indices = None
        pipe = build_pipeline(
            self.spec,
            files,
            labels,
            tars=tars,
            tar_indices=tar_indices,
            split=self.split,
            batch_size=self.batch_size,
            shard_id=0,  # this rank's own list (issue 28: not every rank's, sharded by DALI)
            num_shards=1,
            gpu=self.gpu,
            device_id=self._device_id,
            num_threads=self.workers,
            seed=self._seed(epoch, start, restored),
            channels_last=self.channels_last,
            checkpointing=self.split == "train",
            checkpoint=restore,
            nvjpeg_prealloc=self.nvjpeg_prealloc,
        )
        try:
            pipe.build()
            it = DALIGenericIterator(
                pipe,
                ["images", "labels"],
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.PARTIAL if self.split == "val" else LastBatchPolicy.DROP,
                auto_reset=self.split == "val",
                prepare_first_batch=False,
            )
        except RuntimeError as e:
            raise DataError(f"DALI could not build the {self.split} pipeline: {_one_line(e)}") from None
        # a restored iterator counts the whole epoch (its counter restored at batch k), a fast-forwarded one the rest
        expected = self.steps - (0 if restored else start) if self.split == "train" else None
        if expected is not None and len(it) != expected:
            raise AssertionError(f"DALI iterator has {len(it)} batches, expected {expected}")
        log.debug(
            "built the DALI %s pipeline (%s, epoch %d from batch %d%s, %d files)",
            self.split,
            self.backend,
            epoch,
            start,
            ", restored from its checkpoint" if restored else "",
            len(shard_ids) if pack else len(files),
        )
        key = (epoch if self.split == "train" else 0, start, restored)
        return _Built(key, pipe, it, shard_files, shard_ids)

    def _use(self, built: _Built) -> None:
        self._drop_ahead()
        # the previous pipeline is torn down (its threads joined, its buffers freed) in a thread: not a stall
        old = [self._iter, self._pipe]
        threading.Thread(target=old.clear, name="dali-close").start()
        self._pipe, self._iter = built.pipe, built.iterator
        self._shard_files, self._shard_ids = built.shard_files, built.shard_ids
        self._built_for = built.key
        self._ready = True

    def _build_ahead(self, epoch: int) -> None:
        """Start building the pipeline of the next pass, ``epoch`` from batch 0, in a thread (train), and its
        first batches: taken by that pass if ``set_epoch`` asks for it (the usual next epoch), dropped otherwise (a resume elsewhere)."""
        self._drop_ahead()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                built = box["built"] = self._make(epoch, 0, None)
                # Its first PREFETCH batches are prepared now, as the first next() would have them prepared
                # (DALI's own step, run earlier: the same batches, and checkpoints, as a pipeline started then).
                built.iterator._schedule_runs(False)
            except BaseException as e:  # raised again by the main thread's own build
                box["error"] = e

        # not a daemon: an interpreter that exits meanwhile (after the last epoch) waits for the build to end
        # instead of killing the thread inside DALI
        thread = threading.Thread(target=run, name="dali-build-ahead")
        thread.start()
        self._ahead = (thread, box)

    def _take_ahead(self, key: tuple[int, int, bool]) -> _Built | None:
        """The build-ahead's pipeline if it is for ``key`` (waiting for it to finish); else None (dropped)."""
        if self._ahead is None:
            return None
        thread, box = self._ahead
        self._ahead = None
        thread.join()
        built = box.get("built")
        if built is not None and built.key == key:
            return built
        return (
            None  # another pass (dropped with `built`), or it failed: the caller builds (and raises) itself
        )

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[0].join()
            self._ahead = None

    def close(self) -> None:
        """Drop the pipeline (its threads and buffers); the next iteration builds a new one."""
        self._drop_ahead()
        self._iter = None
        self._pipe = None
        self._ready = False

    # ------------------------------------------------------------------------------------------- iterating

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(self._take_start_batch())

    def _batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass, from batch ``start`` of the epoch on (train)."""
        steps = self.steps - start
        if self.num_samples == 0 or steps == 0:
            return
        if start == 0:
            self._restore = None  # set_epoch's state is for the pass from its start batch
        want = (self.epoch if self.split == "train" else 0, start, self._restore is not None)
        if not self._ready or self._built_for != want:
            ahead = self._take_ahead(want)
            self._use(ahead if ahead is not None else self._make(self.epoch, start, self._restore))
        assert self._iter is not None
        self._ready = False  # a pass is under way; a second pass (or a broken-off one) rebuilds
        self._restore = None  # used: a later pass of this epoch starts over
        it, yielded = self._iter, 0
        self._position = start
        # train: the next epoch's pipeline is built (and its first batches prepared) once half of this pass is
        # handed out, so it is ready at the boundary even when batches come fast (a build of 25,000 paths took
        # 0.23 s on 2 loaded cores, 16 benchmark batches 0.07 s); the two pipelines coexist meanwhile (+2-13 MB)
        ahead_at = steps // 2 if self.split == "train" and self.build_ahead else -1
        # Val runs until DALI's StopIteration (which rewinds the iterator, auto_reset); train stops at `steps`
        # (the next epoch reads another list: another pipeline, built ahead).
        while self.split == "val" or yielded < steps:
            if yielded == ahead_at:
                self._build_ahead(self.epoch + 1)
            try:
                out = next(it)
            except StopIteration:
                break
            except RuntimeError as e:
                self.close()
                raise self._error(e, yielded) from None
            images, labels = out[0]["images"], out[0]["labels"]
            if labels.numel() == 0:  # DALI pads a shorter shard with an empty batch
                continue
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last, no copy
            if self._pack is not None:  # the .cls members' bytes
                labels = self._pack_labels(labels, yielded)
            labels = labels.view(-1).to(torch.int64)
            if images.device != self.device:
                images = images.to(self.device, non_blocking=True)
            labels = to_device(labels, self.device)
            yielded += 1
            self._position = (
                start + yielded
            )  # before the yield: a checkpoint taken now resumes after this batch
            yield images, labels
        if yielded != steps:
            raise AssertionError(f"DALI yielded {yielded} batches, expected {steps}")
        if self.split == "val":  # auto_reset rewound the iterator: reusable for the next epoch
            self._ready = True

    def _pack_labels(self, cls: torch.Tensor, yielded: int) -> torch.Tensor:
        """Labels of batch ``yielded`` (of this pass) from its .cls bytes; DataError naming a bad member."""
        labels = parse_labels(cls)
        bad = (labels < 0) | (labels >= len(self.classes))
        if bool(bad.any()):
            assert self._pack is not None
            j = int(bad.nonzero()[0, 0])
            i = int(self._shard_ids[yielded * self.batch_size + j])
            _, label = self._pack.read(i, ShardFiles(self._pack.tar_paths))  # raises, naming the member
            raise DataError(
                f"{self._pack.member(i)}: DALI read label {int(labels[j])}, the tar holds {label}"
            )
        return labels

    def _error(self, e: RuntimeError, yielded: int) -> DataError:
        """One-line DataError naming the file DALI failed on."""
        if self._pack is not None:
            return self._pack_error(e, yielded)
        m = re.search(r"Failed to decode sample #?\d+ *: *(\S.*?)\s*$", str(e), re.M)
        if m:
            return DataError(f"cannot decode {m.group(1)} (DALI's decoder rejected it); {CHECK_HINT}")
        # The failing batch is one of the next PREFETCH + 1 after the last delivered one: decode those again.
        b = self.batch_size
        window = self._shard_files[max(0, (yielded - 1) * b) : (yielded + PREFETCH + 2) * b]
        for path in window:
            try:
                load_rgb(path)
            except Exception as pe:
                return DataError(f"cannot decode {path} ({decode_error_reason(pe)}); {CHECK_HINT}")
        return DataError(
            f"DALI failed in the {self.split} pipeline ({self.backend}) near batch {yielded + 1}: {_one_line(e)}"
        )

    def _pack_error(self, e: RuntimeError, yielded: int) -> DataError:
        """One-line DataError naming the pack member DALI failed on: the samples of the failing batches are read
        and decoded again with PIL to find it."""
        pack = self._pack
        assert pack is not None
        b = self.batch_size
        files = ShardFiles(pack.tar_paths)
        try:
            for i in self._shard_ids[max(0, (yielded - 1) * b) : (yielded + PREFETCH + 2) * b].tolist():
                data, _ = pack.read(i, files)  # a cut member or a bad label raises here, named
                try:
                    open_rgb(data)
                except Exception as pe:
                    return DataError(
                        f"cannot decode {pack.member(i)} ({decode_error_reason(pe)}); {SHARD_CHECK_HINT}"
                    )
        except DataError as de:
            return de
        finally:
            files.close()
        return DataError(
            f"DALI failed in the {self.split} pipeline ({self.backend}, {pack.root}) near batch {yielded + 1}: "
            f"{_one_line(e)}"
        )
