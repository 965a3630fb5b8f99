"""Exact top-1 / top-5 counting over a val loader, on one or many processes.

    from evaluate.core import count_loader
    counts = count_loader(model, loader, device)        # all-reduced over processes when distributed
    counts.top1_err, counts.top5_err                     # percent, float64, from the integer counts

Each process counts (correct@1, correct@5, n) as int64 tensors over its own shard; the three integers are
summed across processes (never averaged), and the errors are computed once from the sums as
``100 * (1 - correct / n)`` in float64 (the training loop's formula, so its val error and ours agree). The numbers therefore depend only on each image's logits: they are
bit-identical across backends fed the same tensors and across 1 vs N processes whose shards are disjoint and
cover every image once (checked: the summed n must equal the dataset size).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train import distributed

__all__ = ["PRECISIONS", "Counts", "count_loader", "precision_context", "reduce_counts", "topk_hits"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass(frozen=True)
class Counts:
    """Summed integer counts; the errors derive from them. ``loss_sum`` (the summed cross-entropy, float64) is
    there when asked for (``count_loader(..., with_loss=True)``, the training loop's validation)."""

    correct1: int
    correct5: int
    n: int
    loss_sum: float | None = None

    @property
    def top1_err(self) -> float:
        """Top-1 error in percent: 100 * (1 - correct@1 / n), float64 (nan for no images)."""
        return 100.0 * (1.0 - self.correct1 / self.n) if self.n else float("nan")

    @property
    def top5_err(self) -> float:
        """Top-5 error in percent (top-k with k = min(5, classes): 0 when there are <= 5 classes)."""
        return 100.0 * (1.0 - self.correct5 / self.n) if self.n else float("nan")

    @property
    def loss(self) -> float:
        """Mean cross-entropy per image (nan without ``loss_sum`` or images)."""
        return self.loss_sum / self.n if self.loss_sum is not None and self.n else float("nan")


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of rows whose label is the top-1 / among the top-k scores, as int64 tensors on scores' device."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hit = top == labels.view(-1, 1)
    return hit[:, 0].sum(dtype=torch.int64), hit.any(dim=1).sum(dtype=torch.int64)


def reduce_counts(
    correct1: torch.Tensor, correct5: torch.Tensor, n: torch.Tensor, loss_sum: torch.Tensor | None = None
) -> Counts:
    """Sum the per-process int64 counts (and the float64 loss sum, when given) over all processes (a no-op for
    one process)."""
    stacked = torch.stack([correct1, correct5, n]).to(torch.int64)
    distributed.all_reduce_sum(stacked)
    c1, c5, total = (int(x) for x in stacked.tolist())
    if loss_sum is None:
        return Counts(c1, c5, total)
    loss = loss_sum.detach().to(torch.float64).reshape(1)
    distributed.all_reduce_sum(loss)
    return Counts(c1, c5, total, float(loss.item()))


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """fp32: true fp32 (TF32 off for matmuls and cuDNN convs); tf32: TF32 on; bf16/fp16: autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.inference_mode()
def count_loader(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    progress: Callable[[int, int], None] | None = None,
    with_loss: bool = False,
) -> Counts:
    """Top-1/top-5 counts of ``model`` over ``loader`` (batches of normalised images and int64 labels).

    Counts stay on the device during the loop (no per-batch host sync) and are all-reduced at the end.
    ``progress(batches_done, images_done_here)`` is called every 10% of the batches when given.
    ``with_loss``: also sum the cross-entropy (float64; ``Counts.loss``), as the training loop's validation does.
    """
    model.eval()
    zero = torch.zeros((), dtype=torch.int64, device=device)
    c1, c5, n = zero.clone(), zero.clone(), zero.clone()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device) if with_loss else None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = 0
    every = max(1, total // 10) if total else 50
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images_here = 0
    with precision_context(precision, device):
        for i, (images, labels) in enumerate(loader, 1):
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            logits = model(images).float()
            if loss_sum is not None:
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            a, b = topk_hits(logits, labels)
            c1 += a
            c5 += b
            n += labels.numel()
            images_here += labels.numel()
            if progress is not None and i % every == 0:
                progress(i, images_here)
    return reduce_counts(c1, c5, n, loss_sum)
