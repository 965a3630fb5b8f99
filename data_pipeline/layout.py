"""The ImageNet folder layout every backend reads: ``ROOT/{train,val}/<wnid>/*.JPEG``.

Class index = position of the wnid in sorted order, as torchvision's ``ImageFolder`` assigns it, so labels agree
between backends, with torchvision's released weights, and with ``imagenet_class_index.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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


def _within(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or below it (both normalised, absolute)."""
    return path == top or path.startswith(top if top.endswith(os.sep) else top + os.sep)


class NestedDirCheck:
    """Whether a directory inside a class folder keeps to its class.

    ImageFolder (``make_dataset``) walks each class folder with ``followlinks=True``: a directory inside a class
    folder that resolves to the class folder or one of its ancestors (``ln -s .. loop``) is a loop, walked again and
    again until the path stops resolving (~40 links deep), and one that resolves into another class folder labels
    that class's images as this one. Only directories nested inside class folders are resolved (a normal ImageNet
    tree has none). Class folders that are links to other storage, and nested links to places outside the split
    folder (and outside the other classes' folders), are fine. Used by ``index_split`` and by ``check``.
    """

    def __init__(self, folder: str | os.PathLike, classes: Iterable[str]):
        self.folder = os.path.expanduser(os.fspath(folder))  # as make_dataset joins its paths
        self.classes = list(classes)
        self._split_abs = os.path.abspath(self.folder)
        self._split_real = os.path.realpath(self.folder)
        self._real: dict[str, str] = {}
        # every class folder's real path, resolved only once a nested directory leaves its class
        self._class_reals: dict[str, str] | None = None

    def _realpath(self, path: str) -> str:
        real = self._real.get(path)
        if real is None:
            real = self._real[path] = os.path.realpath(path)
        return real

    def problem(self, cls: str, directory: str) -> tuple[str, str] | None:
        """For ``directory``, a path below ``folder/cls``: (the first directory on the way down from the class
        folder that leaves the class, why) or None. Each directory on the way is resolved once (cached)."""
        class_dir = os.path.join(self.folder, cls)
        class_real = self._realpath(class_dir)
        chain = [(class_real, f"class folder {cls}/")]  # real paths walked so far, outermost first
        path = class_dir
        for part in directory[len(class_dir) + 1 :].split(os.sep):
            path = os.path.join(path, part)
            real = self._realpath(path)
            why = self._leaves(cls, class_real, real, chain)
            if why:
                return path, why
            chain.append((real, path))
        return None

    def _leaves(self, cls: str, class_real: str, real: str, chain: list[tuple[str, str]]) -> str | None:
        if _within(self._split_real, real) or _within(self._split_abs, real):
            return (
                f"leads to {real}, which holds the whole split folder: the loaders would walk it again and again "
                f"(a link loop) and label every class's images as {cls}"
            )
        for above, name in chain:
            if _within(above, real):
                which = f"the same directory as {name}" if real == above else f"which holds {name}"
                return (
                    f"leads back to {real}, {which}: a link loop, the loaders would read the same images again "
                    "and again"
                )
        if _within(real, class_real):
            return None
        if _within(real, self._split_real):
            inside = real[len(self._split_real) :].lstrip(os.sep).split(os.sep)[0]
            return (
                f"leads to {real}, inside the split folder but outside class folder {cls}/ (in {inside}/): the "
                f"loaders would label the images there as {cls}"
            )
        if self._class_reals is None:
            self._class_reals = {c: self._realpath(os.path.join(self.folder, c)) for c in self.classes}
        for other, other_real in self._class_reals.items():
            if other != cls and _within(real, other_real):
                return (
                    f"leads to {real}, inside class folder {other}/ ({other_real}): the loaders would label its "
                    f"images as {cls}"
                )
        return None


def _check_nested_dirs(folder: Path, classes: list[str], samples: list[tuple[str, int]]) -> None:
    """Raise DataError for a directory inside a class folder that leaves its class (see ``NestedDirCheck``).

    The directories ImageFolder walked are the samples' parent directories; only those below a class folder
    (none in a normal tree) are resolved. Collecting the parents costs ~0.15 s of CPU for ImageNet's 1.28 M
    paths (a set of 1,000 class folders in a normal tree); nothing is resolved unless there are nested ones."""
    check = NestedDirCheck(folder, classes)
    parents = {path.rpartition(os.sep)[0] for path, _ in samples}
    nested = parents - {os.path.join(check.folder, c) for c in classes}
    start = len(check.folder) + 1
    for directory in sorted(nested):
        found = check.problem(directory[start:].split(os.sep, 1)[0], directory)
        if found:
            raise DataError(f"{found[0]} {found[1]}")


def class_folders_differ(root: str | Path, train: list[str], val: list[str]) -> str | None:
    """One line saying how the class folders of ``root``'s train/ and val/ differ, or None when they are the same
    (the loaders' labels would not match otherwise). The loaders and the launcher's pre-submit check say it alike."""
    if train == val:
        return None
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    return (
        f"train/ and val/ class folders differ under {root}: {len(only_train)} only in train {only_train[:5]}, "
        f"{len(only_val)} only in val {only_val[:5]}"
    )


def index_split(root: str | Path, split: str) -> SplitIndex:
    """List ``root/split/<class>/<image>`` files (extensions as torchvision's ImageFolder accepts them).

    Raises DataError (one line) for a missing root or split, no class folders, an empty class folder, or a
    directory inside a class folder that loops back or leads into another class (``NestedDirCheck``)."""
    # imported here so `from data_pipeline.layout import DataError` (the CLIs) does not import torch
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist (expected {root}/{split}/<wnid>/*.JPEG)")
    folder = root / split
    if not folder.is_dir():
        hint = (
            f" (give the folder that holds {split}/, not a split folder itself)"
            if root.name in ("train", "val")
            else ""
        )
        raise DataError(f"{folder} is missing: expected {root}/{split}/<class>/<image>{hint}")
    try:
        classes, class_to_idx = find_classes(str(folder))
    except FileNotFoundError:
        raise DataError(f"{folder} has no class folders") from None
    try:
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        # torchvision names the empty class folders in its message
        raise DataError(f"{folder}: {str(e).splitlines()[0]}") from None
    _check_nested_dirs(folder, classes, samples)
    return SplitIndex(folder, classes, samples)
