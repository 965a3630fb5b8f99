"""What the loader dispatcher (``data_pipeline.loader``) and both backends (``dali_backend``,
``torchvision_backend``) share: the ``Loader`` base class, the sharding math and the decode-error helpers.

It imports neither the dispatcher nor a backend, so the backends no longer import their base from the module that
imports them (``data_pipeline.loader`` re-exports these names for existing callers).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data_pipeline.layout import SplitIndex
from data_pipeline.transforms import TransformSpec

__all__ = [
    "CHECK_HINT",
    "SPLITS",
    "Loader",
    "decode_error_reason",
    "epoch_shard",
    "epoch_shards",
    "train_steps",
    "val_shard",
    "worker_error_line",
]

SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------- sharding math


def val_shard(n: int, rank: int, world_size: int) -> range:
    """Indices of the sorted val list that ``rank`` reads: ``[n·rank // W, n·(rank+1) // W)``."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def train_steps(n: int, world_size: int, batch: int) -> int:
    """Training steps per epoch, the same on every rank: ``(n // world_size) // batch``."""
    return (n // world_size) // batch


def epoch_shards(n: int, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Per-rank index lists of one training epoch, identical to what
    ``DistributedSampler(shuffle=True, drop_last=True, seed=seed)`` gives each rank after ``set_epoch(epoch)``
    (one ``torch.randperm`` seeded with ``seed + epoch``, cut to a multiple of ``world_size``, strided)."""
    perm, total = _epoch_perm(n, world_size, seed, epoch)
    return [perm[r:total:world_size].tolist() for r in range(world_size)]


def _epoch_perm(n: int, world_size: int, seed: int, epoch: int) -> tuple[torch.Tensor, int]:
    """DistributedSampler's permutation for (seed, epoch) and the samples it keeps (a multiple of world_size)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g), (n // world_size) * world_size


def epoch_shard(n: int, world_size: int, seed: int, epoch: int, rank: int) -> np.ndarray:
    """``epoch_shards(n, world_size, seed, epoch)[rank]`` as an int64 array, without the other ranks' lists
    (N // W Python ints, not N)."""
    perm, total = _epoch_perm(n, world_size, seed, epoch)
    return perm[rank:total:world_size].numpy()


# ---------------------------------------------------------------------------------------------- the API


class Loader:
    """What every backend provides (see the module docstring). Iterate for ``(images, labels)`` batches."""

    backend: str  # "dali-gpu" | "dali-cpu" | "torchvision"

    def __init__(
        self,
        index: SplitIndex,
        split: str,
        spec: TransformSpec,
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        channels_last: bool,
        workers: int,
    ) -> None:
        self.index = index
        self.split = split
        self.spec = spec
        self.batch_size = batch_size  # per process
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.seed = seed
        self.channels_last = channels_last
        self.workers = workers
        self.epoch = 0
        self._start_batch = 0  # set by set_epoch, taken by the next pass (_take_start_batch)
        n = len(index)
        if split == "train":
            self.steps = train_steps(n, world_size, batch_size)
            self.num_samples = self.steps * batch_size
        else:
            shard = val_shard(n, rank, world_size)
            self.num_samples = len(shard)
            self.steps = math.ceil(len(shard) / batch_size)

    @property
    def dataset_size(self) -> int:
        """Images in the split (all ranks together)."""
        return len(self.index)

    @property
    def classes(self) -> list[str]:
        """Sorted wnids; a label is an index into this list."""
        return self.index.classes

    def __len__(self) -> int:
        """Batches this rank yields per epoch (train: the same on every rank)."""
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict[str, Any] | None = None) -> str | None:
        """Train: the next pass uses epoch ``epoch``'s order (a function of (seed, epoch)) and starts at batch
        ``start_batch`` of it (``len(self) - start_batch`` batches; mid-epoch resume), a one-shot setting: the
        pass after it, and the next ``set_epoch`` without it, start at 0. Val: no effect; ``start_batch`` must be
        0. Raises ``ValueError`` for a ``start_batch`` outside ``[0, len(self)]``.

        ``state``: this rank's ``state_dict()`` taken after batch ``start_batch`` of ``epoch`` (a backend whose
        position alone does not fix its batches needs it). Returns None when batches ``start_batch``.. will be
        exactly those of an uninterrupted pass, else one line saying why not (what the caller warns about)."""
        start = operator.index(start_batch)
        if self.split != "train" and start != 0:
            raise ValueError(
                f"start_batch is for train loaders only; a {self.split} loader takes 0, got {start}"
            )
        if not 0 <= start <= self.steps:
            raise ValueError(f"start_batch must be in [0, {self.steps}] (batches per epoch), got {start}")
        self.epoch = int(epoch)
        self._start_batch = start
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """What a resume needs besides (epoch, batch) to continue the current train pass exactly, at the position
        after the last batch it yielded; None when the position alone does (torchvision backend, val)."""
        return None

    def _take_start_batch(self) -> int:
        """The batch a pass beginning now starts at; resets it to 0 (it applies to one pass)."""
        start, self._start_batch = self._start_batch, 0
        return start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes / DALI pipelines now (they are also released when the loader is collected)."""

    def describe(self) -> str:
        """One line for the log: backend, split, shard and batch."""
        return (
            f"{self.split} loader: backend {self.backend}, rank {self.rank}/{self.world_size}, "
            f"{self.num_samples:,} of {self.dataset_size:,} images in {len(self):,} batches of "
            f"{self.batch_size} on {self.device}"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


CHECK_HINT = "`python -m data_pipeline check ROOT` lists every unreadable file"


def decode_error_reason(e: BaseException) -> str:
    """A short reason for an exception from decoding an image (PIL, torchvision.io)."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can read"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def worker_error_line(message: str) -> str:
    """The original one-line message of a ``DataError`` that DataLoader re-raises from a worker process with the
    worker's traceback around it."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else message
    prefix = "data_pipeline.layout.DataError: "
    return last[len(prefix) :] if last.startswith(prefix) else last
