"""torchvision backend: decode + per-image transforms in DataLoader worker processes, normalise on the device.

    loader = build_loader(cfg, "val")                    # cfg.data.backend=torchvision (see data_pipeline.loader)
    TorchvisionLoader(..., decoder="torchvision.io")     # the decode_image variant (benchmarks)

Each worker decodes an image with PIL (``decoder="pil"``, as torchvision's references/classification does:
``Image.open(f).convert("RGB")``, so greyscale and CMYK JPEGs become RGB and a PNG named .JPEG is read as PNG) or
with ``torchvision.io.decode_image`` (``decoder="torchvision.io"``, libjpeg-turbo on a tensor; same RGB
conversions), applies ``TransformSpec.train_transform()`` / ``val_transform()`` (torchvision.transforms.v2) and
returns uint8. Batches cross the worker → main process boundary as uint8 (4× less than float32); the main
process moves them to the device (pinned memory + non_blocking on CUDA), applies the PCA colour shift and
normalises there (``TransformSpec.normalize``), in channels_last when asked.

Train: ``DistributedSampler(shuffle=True, drop_last=True, seed=cfg.seed)`` + ``DataLoader(drop_last=True)``:
``(N // W) // batch`` steps on every rank. Each image's augmentation is seeded from (seed, epoch, index) and the
colour shifts from (seed, epoch, rank), so an epoch's batches are a function of (seed, epoch), whatever the
worker count. Val: the rank's contiguous block ``val_shard`` (no padding), in sorted order. Workers are
persistent when ``workers > 0``. An image that does not decode raises ``DataError`` naming the file.

A pack (``data.format=shards``, ``data_pipeline.shard_reader``): ``ShardImages`` reads sample i with one
``os.pread`` from a tar each worker opens once and keeps open (descriptors are per process, never pickled), and
decodes it from memory; train order is ``ShardEpochOrder`` (``ShardIndex.epoch_order``: N // W ids per rank, the
order DALI's webdataset reader gets), val the same contiguous blocks as on folders.

Mid-epoch resume, ``set_epoch(epoch, start_batch=k)``: the sampler drops the first ``k × batch`` indices of the
rank's epoch order (``EpochIndices.start``), so those images are never read or decoded, and the colour-shift
generator makes the ``k`` skipped batches' draws before the first batch. Batches k.. are bitwise those of an
uninterrupted pass (images, labels, colour shifts), whatever the worker count.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from data_pipeline.base import CHECK_HINT, Loader, decode_error_reason, val_shard, worker_error_line
from data_pipeline.layout import DataError, SampleTable
from data_pipeline.shard_reader import SHARD_CHECK_HINT, ShardFiles, ShardIndex
from data_pipeline.transforms import open_rgb

__all__ = ["DECODERS", "SampleTable", "TorchvisionLoader", "decode"]

DECODERS = ("pil", "torchvision.io")


def decode(source: str | bytes, decoder: str = "pil") -> Any:
    """An RGB image from a file, or from an encoded image in memory (a pack's member): a PIL image (``pil``) or a
    uint8 (3, H, W) tensor (``torchvision.io``)."""
    if decoder == "pil":
        return open_rgb(source)  # loads the pixels; a truncated file raises here
    from torchvision.io import ImageReadMode, decode_image, read_file

    data = (
        torch.frombuffer(bytearray(source), dtype=torch.uint8)
        if isinstance(source, bytes)
        else read_file(source)
    )
    return decode_image(data, mode=ImageReadMode.RGB)


# The signals that stop a training run (train.engine.StopOnSignals, slurm.job.StopOnSignal). They reach every
# process, not only the training one: a terminal's Ctrl-C the whole process group, SLURM's scancel / requeue
# (SIGTERM) and its --signal (USR2, before the time limit) every process of the job step.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2})
# What the forkserver imports before it forks any worker, so that each DataLoader worker starts with torch and
# this module imported instead of importing them itself. multiprocessing's default preload is ``__main__``, which
# it skips under ``python -m`` (no main path): there every worker paid the whole torch import (issue 28).
FORKSERVER_PRELOAD = ["torch", "torchvision", "data_pipeline.torchvision_backend"]


def start_forkserver_shielded() -> None:
    """Start multiprocessing's forkserver (and its resource tracker) with STOP_SIGNALS blocked, so that neither
    they nor the workers forked from them (which inherit the blocked mask) die of a stop signal. A dead worker
    fails the next batch, and a dead forkserver the next loader, before the training process has stopped
    cleanly and saved; the training process alone acts on the signals and shuts its workers down itself.
    A signal that comes meanwhile is delivered to this process when the mask is restored. No-op once the
    forkserver runs (one started elsewhere first is not shielded: this project starts none). The forkserver
    imports ``FORKSERVER_PRELOAD`` once, before its first worker."""
    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the server starts, not after
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # The resource tracker first: its start unblocks SIGINT and SIGTERM here (it ignores both itself), and a
        # forkserver it started would inherit that. A forkserver that dies takes its workers with it: their
        # exit status comes through its socket, and torch counts them as "exited unexpectedly".
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _shield_worker(owner: int, worker_id: int) -> None:
    """worker_init_fn: keep STOP_SIGNALS blocked in this worker (inherited from the forkserver, and blocked here for
    the threads it starts later). A thread then ends the worker on a SIGTERM from its owner (the training process):
    that is how multiprocessing and torch end a worker that did not exit in time, at interpreter exit too, where a
    worker that ignored it would hang the owner's join; and when the owner is gone (torch's own watchdog watches
    the forkserver, the workers' parent, which lives as long as they do)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_serve_owner, args=(owner,), name="owner-watch", daemon=True).start()


def _serve_owner(owner: int) -> None:
    try:
        handle = os.pidfd_open(owner)  # readable once the owner has exited (Linux ≥ 5.3)
    except (AttributeError, OSError):
        handle = None
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        if info is not None and info.si_pid == owner:
            os._exit(0)  # like torch's own worker SIGTERM handler: a clean exit, not "killed by signal"
        if handle is not None:
            if select.select([handle], [], [], 0)[0]:
                os._exit(0)
        else:
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(0)


class ImageFiles(Dataset):
    """(uint8 (3, h, w) tensor, label) for each (path, label) of ``samples``, decoded with ``decoder``.

    Indexed with ``(index, epoch)`` (``EpochIndices``): when ``seed`` is set (training), the transform's random
    draws are seeded from (seed, epoch, index), so an image's augmentation does not depend on which worker
    process made it, on the worker count, or on what ran before: a resumed run reproduces it. In the main
    process (``workers=0``) the global torch RNG is saved and restored around it, so loading never shifts the
    training loop's own random numbers (dropout).
    """

    def __init__(
        self,
        samples: SampleTable | list[tuple[str, int]],
        transform: Any,
        decoder: str = "pil",
        seed: int | None = None,
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        # a table mapped from the run folder's file_tables/ reaches each worker as its file names (shared pages)
        self.samples = samples if isinstance(samples, SampleTable) else SampleTable(samples)
        self.transform = transform
        self.decoder = decoder
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[Any, int]:
        """(decoded RGB image, label) of sample ``i``."""
        path, label = self.samples[i]
        try:
            return decode(path, self.decoder), label
        except Exception as e:  # PIL: OSError/UnidentifiedImageError; torchvision.io: RuntimeError
            raise DataError(f"cannot decode {path} ({decode_error_reason(e)}); {CHECK_HINT}") from None

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label = self._load(i)
        if self.seed is None:
            return self.transform(image), label
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1, np.uint64)[0] >> 1)
        if get_worker_info() is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return self.transform(image), label
        torch.manual_seed(sample_seed)  # a worker process: its global RNG serves only the transforms
        return self.transform(image), label


class ShardImages(ImageFiles):
    """``ImageFiles`` over a pack's split (``data.format=shards``): sample ``i`` is one ``os.pread`` of its
    members from a tar this process keeps open (``shard_reader.ShardFiles``), decoded from memory."""

    def __init__(
        self, index: ShardIndex, transform: Any, decoder: str = "pil", seed: int | None = None
    ) -> None:
        super().__init__([], transform, decoder, seed)
        self.index = index
        self.files = ShardFiles(index.tar_paths)

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, i: int) -> tuple[Any, int]:
        data, label = self.index.read(i, self.files)
        try:
            return decode(data, self.decoder), label
        except Exception as e:
            raise DataError(
                f"cannot decode {self.index.member(i)} ({decode_error_reason(e)}); {SHARD_CHECK_HINT}"
            ) from None


class ShardEpochOrder(Sampler):
    """Rank ``rank``'s sample ids of a pack's train epoch (``ShardIndex.epoch_order``): ``N // world_size`` of
    them, a function of (seed, epoch); ``set_epoch`` and ``epoch`` as ``DistributedSampler``'s."""

    def __init__(self, index: ShardIndex, rank: int, world_size: int, seed: int) -> None:
        self.index, self.rank, self.world_size, self.seed = index, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.index.epoch_order(self.seed, self.epoch, self.world_size)[self.rank].tolist())

    def __len__(self) -> int:
        return len(self.index) // self.world_size


class EpochIndices(Sampler):
    """Yields ``(index, epoch)`` for the indices of ``indices`` (a DistributedSampler, whose ``epoch`` it reads,
    or a fixed list), so the dataset can seed each sample's augmentation (``ImageFiles``), from position
    ``start`` on (mid-epoch resume: the indices before it are never handed to the dataset)."""

    def __init__(self, indices: DistributedSampler | list[int]) -> None:
        self.indices = indices
        self.start = 0  # indices skipped at the beginning of the next iteration

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(getattr(self.indices, "epoch", 0))
        return ((int(i), epoch) for i in itertools.islice(self.indices, self.start, None))

    def __len__(self) -> int:
        return max(0, len(self.indices) - self.start)


class TorchvisionLoader(Loader):
    """DataLoader-based loader; see the module docstring."""

    backend = "torchvision"

    def __init__(self, *args: Any, decoder: str = "pil", prefetch_factor: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoder = decoder
        train = self.split == "train"
        transform = self.spec.train_transform() if train else self.spec.val_transform()
        seed = self.seed if train else None
        shards = isinstance(self.index, ShardIndex)
        dataset = (
            ShardImages(self.index, transform, decoder, seed)
            if shards
            else ImageFiles(self.index.samples, transform, decoder, seed)
        )
        self.sampler: DistributedSampler | ShardEpochOrder | None = None
        if train and shards:
            self.sampler = ShardEpochOrder(self.index, self.rank, self.world_size, self.seed)
            sampler = EpochIndices(self.sampler)
        elif train:
            self.sampler = DistributedSampler(
                dataset,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=True,
                seed=self.seed,
                drop_last=True,
            )
            sampler = EpochIndices(self.sampler)
        else:
            sampler = EpochIndices(list(val_shard(len(dataset), self.rank, self.world_size)))
        self._indices = sampler
        self._pin = self.device.type == "cuda"
        # DataLoader draws a base seed per pass; from its own generator, so the global RNG is left alone.
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1000 + self.rank)
        self._dl = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.workers,
            pin_memory=self._pin,
            drop_last=train,
            persistent_workers=self.workers > 0,
            # Not fork: a forked worker inherits whatever the parent holds, and a DALI pipeline (or any object
            # owning threads) garbage-collected in the child deadlocks it. forkserver workers start from a
            # clean process (the server imports torch once, FORKSERVER_PRELOAD; workers are persistent).
            multiprocessing_context="forkserver" if self.workers > 0 else None,
            prefetch_factor=prefetch_factor if self.workers > 0 else None,
            generator=generator,
            worker_init_fn=functools.partial(_shield_worker, os.getpid()) if self.workers > 0 else None,
        )
        if self.workers > 0:
            start_forkserver_shielded()
        if len(self._dl) != self.steps:  # the sharding math of data_pipeline.base, checked against torch's
            raise AssertionError(f"DataLoader has {len(self._dl)} batches, expected {self.steps}")
        self._colour = torch.Generator(device=self.device)  # PCA colour shifts, drawn where they are used
        self.sample_log: Path | None = None  # log.sample_ids: folder of the per-rank, per-epoch image lists

    def _log_samples(self, order: list[int], batch: int) -> None:
        """Append the images of train batch ``batch`` of this epoch to this rank's list (log.sample_ids)."""
        assert self.sample_log is not None
        root = Path(self.index.root)
        lines = [
            f"{Path(self.index.samples[i][0]).relative_to(root)}\n"
            for i in order[batch * self.batch_size : (batch + 1) * self.batch_size]
        ]
        with open(self.sample_log / f"epoch{self.epoch + 1:03d}_rank{self.rank}.txt", "a") as f:
            f.writelines(lines)

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict[str, Any] | None = None) -> str | None:
        super().set_epoch(epoch, start_batch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        return None  # exact from the position alone (``state`` is another backend's, if any)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(self._take_start_batch())

    def _batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass, from batch ``start`` of the epoch on."""
        train = self.split == "train"
        lighting = train and self.spec.color_pca_std > 0
        if lighting:  # the colour shifts of an epoch: a function of (seed, rank, epoch)
            self._colour.manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
            for _ in range(start):  # the skipped batches' draws, exactly as they are drawn below
                self.spec.pca_shift(self.batch_size, self._colour)
        # Read when DataLoader iterates the sampler (now with workers, at the first batch without): every pass
        # sets it. Train batches are full (drop_last), so batch k begins at index k × batch.
        self._indices.start = start * self.batch_size
        if start == self.steps:  # resumed after the epoch's last batch: nothing left to read
            return
        # log.sample_ids: this epoch's order on this rank (the sampler's, fixed by (seed, epoch)), batch by batch
        order = list(self.sampler) if self.sample_log is not None and self.sampler is not None else None
        if order is not None:
            self.sample_log.mkdir(parents=True, exist_ok=True)
        batch = start
        batches = iter(self._dl)
        while True:
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            except DataError as e:  # re-raised from a worker with its traceback: keep the one line
                raise DataError(worker_error_line(str(e))) from None
            images = images.to(self.device, non_blocking=self._pin)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            shift = self.spec.pca_shift(len(images), self._colour) if lighting else None
            if order is not None:  # handed to the training loop now
                self._log_samples(order, batch)
                batch += 1
            yield self.spec.normalize(images, shift), labels.to(self.device, non_blocking=self._pin)

    def close(self) -> None:
        """Stop the persistent workers."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None
