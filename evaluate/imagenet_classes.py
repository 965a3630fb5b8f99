"""ImageNet-1k (ILSVRC2012) class WordNet ids and names, read from the installed dependencies (nothing downloaded,
nothing copied into this project).

``imagenet_classes()[i] = (wnid, name)`` for class label ``i``: labels follow sorted wnid order (what torchvision's
``ImageFolder`` assigns to ``val/<wnid>/`` folders and what torchvision's released weights use).

- wnids: timm's ``timm/data/_info/imagenet_synsets.txt`` (the list ``timm.data.ImageNetInfo`` reads), located
  through the installed distribution's file list, so ``timm`` itself is not imported (that takes seconds).
- names: torchvision's ``VGG16_Weights.IMAGENET1K_V1.meta["categories"]``, the names torchvision's hub example prints.
"""

from __future__ import annotations

import functools
from importlib import metadata

SYNSETS_FILE = "timm/data/_info/imagenet_synsets.txt"
NUM_CLASSES = 1000


class ClassListError(RuntimeError):
    """The installed timm/torchvision do not hold ImageNet-1k's class list in the expected form."""


def _timm_file(relative: str) -> str:
    try:
        dist = metadata.distribution("timm")
    except metadata.PackageNotFoundError:
        raise ClassListError(
            "timm is not installed (pip install timm): its imagenet_synsets.txt names the wnids"
        ) from None
    path = dist.locate_file(relative)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ClassListError(f"timm {dist.version} has no readable {relative} ({e.strerror})") from None


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1,000 ``(wnid, name)`` pairs in label order; read once per process."""
    from torchvision.models import VGG16_Weights

    wnids = _timm_file(SYNSETS_FILE).split()
    names = VGG16_Weights.IMAGENET1K_V1.meta["categories"]
    if len(wnids) != NUM_CLASSES or wnids != sorted(wnids) or len(names) != NUM_CLASSES:
        raise ClassListError(
            f"expected {NUM_CLASSES} sorted wnids in timm's {SYNSETS_FILE} and {NUM_CLASSES} torchvision category "
            f"names; found {len(wnids)} wnids (sorted: {wnids == sorted(wnids)}) and {len(names)} names"
        )
    return tuple(zip(wnids, names, strict=True))


def imagenet_wnids() -> list[str]:
    return [w for w, _ in imagenet_classes()]


def imagenet_names() -> list[str]:
    return [n for _, n in imagenet_classes()]
