"""The ImageNet folder layout every backend reads: ``ROOT/{train,val}/<wnid>/*.JPEG``.

Class index = position of the wnid in sorted order, as torchvision's ``ImageFolder`` assigns it, so labels agree
between backends, with torchvision's released weights, and with ``imagenet_class_index.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A dataset problem, described in one line."""


@dataclass(frozen=True)
class SplitIndex:
    root: Path
    classes: list[str]  # sorted wnids; index = label
    samples: list[tuple[str, int]]  # (path, label), sorted by class then file name

    def __len__(self) -> int:
        return len(self.samples)


def index_split(root: str | Path, split: str) -> SplitIndex:
    """List ``root/split/<class>/<image>`` files (extensions as torchvision's ImageFolder accepts them)."""
    # imported here so `from data_pipeline.layout import DataError` (the CLIs) does not import torch
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data root {str(root)!r} does not exist (expected {root}/train/<wnid>/*.JPEG and val/...)"
        )
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder} is missing: the data root must hold train/ and val/ class folders")
    try:
        classes, class_to_idx = find_classes(str(folder))
    except FileNotFoundError:
        raise DataError(f"{folder} has no class folders") from None
    try:
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        # torchvision names the empty class folders in its message
        raise DataError(f"{folder}: {str(e).splitlines()[0]}") from None
    return SplitIndex(folder, classes, samples)
