"""The ImageNet folder layout every backend reads: ``ROOT/{train,val}/<wnid>/*.JPEG``.

Class index = position of the wnid in sorted order, as torchvision's ``ImageFolder`` assigns it, so labels agree
between backends, with torchvision's released weights, and with ``imagenet_class_index.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.files import atomic_write_text, atomically

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset problem, described in one line."""


@dataclass(frozen=True)
class SplitIndex:
    root: Path
    classes: list[str]  # sorted wnids; index = label
    # (path, label), sorted by class then file name: a list (index_split) or a SampleTable (file_table)
    samples: Sequence[tuple[str, int]]

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


# ------------------------------------------------------------------------------------- the shared file table


class SampleTable:
    """``(path, label)`` pairs held in three numpy arrays: the paths below their common prefix as one byte string
    (os.fsencode's encoding, each ended by a NUL), the offsets of those ends, the labels. ``table[i]`` is the pair
    the list held (same order), so resume and every bitwise test see the same samples.

    Built from a listing (``SampleTable(samples)``) or opened from files written by ``file_table`` (memory-mapped:
    a process touches only the pages of the samples it reads). What a DataLoader worker receives with the dataset:
    a mapped table pickles as its file names (each worker maps the same pages), an in-memory one as three buffers,
    where the list of tuples was 1.28 M Python objects to pickle and unpickle in every worker (issue 28)."""

    def __init__(self, samples: Sequence[tuple[str, int]] = ()) -> None:
        paths = [p for p, _ in samples]
        self.prefix = os.path.commonprefix(paths) if paths else ""  # noqa: RUF071 - a string, cut and put back
        cut = len(self.prefix)
        # each path ends with a NUL (never in a path), so the ends are found in the bytes, whatever the encoding
        data = ("\0".join(p[cut:] for p in paths) + "\0").encode("utf-8", "surrogateescape") if paths else b""
        self.blob = np.frombuffer(data, dtype=np.uint8)
        self.ends = np.flatnonzero(self.blob == 0)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.files: dict[str, str] | None = None  # the .npy files it was opened from (None: built in memory)

    @classmethod
    def from_arrays(
        cls, prefix: str, arrays: dict[str, np.ndarray], files: dict[str, str] | None = None
    ) -> SampleTable:
        """The table of ``arrays`` (``arrays()``'s), mapped from ``files`` (the same keys → .npy paths) if given."""
        table = cls.__new__(cls)
        table.prefix = prefix
        table.blob, table.ends, table.labels = (arrays[k] for k in ("blob", "ends", "labels"))
        if len(table.ends) != len(table.labels):
            raise ValueError(f"{prefix}: {len(table.ends)} path ends for {len(table.labels)} labels")
        table.files = dict(files) if files else None
        return table

    @classmethod
    def open(cls, prefix: str, files: dict[str, str]) -> SampleTable:
        """The table written to ``files`` (``{"blob", "ends", "labels"}`` → .npy paths), memory-mapped."""
        return cls.from_arrays(prefix, {k: np.load(f, mmap_mode="r") for k, f in files.items()}, files)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"blob": self.blob, "ends": self.ends, "labels": self.labels}

    def __reduce__(self) -> tuple[Any, ...]:
        if self.files is not None:  # a worker maps the same files (the pages are shared, nothing is copied)
            return (SampleTable.open, (self.prefix, self.files))
        return super().__reduce__()

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        i = range(len(self.labels))[i]  # an IndexError past the end, negative indices as a list's
        start = int(self.ends[i - 1]) + 1 if i else 0
        return self.prefix + bytes(self.blob[start : int(self.ends[i])]).decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.path(i), int(self.labels[range(len(self.labels))[i]])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:  # compares as the list of pairs it holds
        if isinstance(other, SampleTable | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


TABLE_DIR = "file_tables"  # under the run folder: the cached file tables (``file_table``)
LOCK_WAIT_S = (
    600.0  # a rank waits this long for another's build before listing by itself; an older lock is stale
)
_POLL_S = 0.05


def _save_npy(path: str, a: np.ndarray) -> None:
    """``a`` as a .npy file at ``path``, atomically (``train.files.atomically``)."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
            np.save(f, a, allow_pickle=False)

    atomically(path, save)


def _lock_stale(lock: str) -> bool:
    """Whether the build lock ``lock`` was left by a process that is gone (this host) or is older than
    ``LOCK_WAIT_S`` (any host: a build never takes that long)."""
    try:
        with open(lock) as f:
            text = f.read().split()
        age = time.time() - os.stat(lock).st_mtime
    except (OSError, ValueError):
        return False  # gone meanwhile (or being written): look again
    if age > LOCK_WAIT_S:
        return True
    if len(text) == 2 and text[0] == socket.gethostname() and text[1].isdigit():
        try:
            os.kill(int(text[1]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return False


def cached_arrays(
    folder: str | os.PathLike | None,
    name: str,
    valid: Callable[[dict[str, Any]], bool],
    build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``build()``'s (arrays, meta), made once and shared through ``folder`` by every process that asks for the
    same ``name``: memory-mapped from ``folder/name-<token>-<key>.npy`` while ``valid(meta)`` holds.

    Who builds: the first process to create ``folder/name.lock`` (``O_EXCL``); the others wait for it to go and
    then map what it wrote (or raise the same ``DataError`` it raised, from ``name.error``). The arrays are written
    first, each to a temporary file then ``os.replace``d, and the meta (which names them) last, so a reader sees a
    whole table or none. A lock left by a process that died is taken over; a rank that waited ``LOCK_WAIT_S``
    builds by itself. ``folder=None``, or a folder that cannot be written: built in memory, not shared."""
    if folder is None:
        return build()
    folder = os.fspath(folder)
    meta_path, lock, error = (os.path.join(folder, f"{name}.{ext}") for ext in ("json", "lock", "error"))
    for _ in range(3):
        found = _open_cached(folder, meta_path, valid)
        if found is not None:
            return found
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _wait_for_build(lock, error):  # waited LOCK_WAIT_S: list by ourselves
                break
            continue
        except OSError as e:  # a read-only run folder, ...: every process lists by itself
            log.warning("cannot share the file table %s in %s (%s): listing in this process", name, folder, e)
            return build()
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            os.close(fd)
            found = _open_cached(folder, meta_path, valid)  # built by another while we looked
            if found is not None:
                return found
            try:
                arrays, meta = build()
            except DataError as e:
                atomic_write_text(error, json.dumps({"message": str(e)}))
                raise
            return _write_cached(folder, name, meta_path, arrays, meta)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
    return build()


def _wait_for_build(lock: str, error: str) -> bool:
    """Wait while another process holds ``lock`` (building); False after ``LOCK_WAIT_S``. Raises the DataError
    that build raised (recorded at ``error``); a stale lock is removed (and the caller takes it)."""
    since = time.time()
    while os.path.exists(lock):
        if time.time() - since > LOCK_WAIT_S:
            return False
        if _lock_stale(lock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            return True
        time.sleep(_POLL_S)
    failed = _build_error(error, since - 1)
    if failed:  # the builder we waited for failed: the same error here
        raise DataError(failed)
    return True


def _build_error(path: str, since: float) -> str | None:
    """The message of the DataError a build raised, recorded at ``path`` after ``since`` (time.time())."""
    try:
        if os.stat(path).st_mtime < since:
            return None
        with open(path) as f:
            return str(json.load(f)["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _open_cached(
    folder: str, meta_path: str, valid: Callable[[dict[str, Any]], bool]
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not valid(meta):
            return None
        return {k: np.load(os.path.join(folder, f), mmap_mode="r") for k, f in meta["arrays"].items()}, meta
    except (OSError, ValueError, KeyError, TypeError):  # none, half gone (rebuilt meanwhile), not ours
        return None


def _write_cached(
    folder: str, name: str, meta_path: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        token = f"{os.getpid()}{time.time_ns()}"
        files = {k: f"{name}-{token}-{k}.npy" for k in arrays}
        for k, a in arrays.items():
            _save_npy(os.path.join(folder, files[k]), a)
        meta = {**meta, "arrays": files}
        atomic_write_text(meta_path, json.dumps(meta))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, f"{name}.error"))
        for old in os.listdir(
            folder
        ):  # the tables this one replaces (a process that mapped one keeps its pages)
            if old.startswith(f"{name}-") and old.endswith(".npy") and old not in files.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, old))
        return {k: np.load(os.path.join(folder, f), mmap_mode="r") for k, f in files.items()}, meta
    except OSError as e:
        log.warning("cannot write the file table %s in %s (%s): using it from memory", name, folder, e)
        return arrays, meta


def _dir_stat(path: str) -> list[int]:
    st = os.stat(path)  # follows links, as the listing (os.walk(followlinks=True)) does
    return [st.st_ino, st.st_mtime_ns]


def file_table(root: str | Path, split: str, cache: str | os.PathLike | None = None) -> SplitIndex:
    """``index_split(root, split)`` with its samples as a ``SampleTable``: listed once and shared through the
    folder ``cache`` (``cached_arrays``: one process of a job lists, the others map its table) while the tree is
    as it was listed, i.e. while the split folder, every class folder and every folder below one holding images
    has the (inode, mtime_ns) it had before the listing (a file added, removed or renamed changes its folder's
    mtime; a class folder added or removed, the split folder's). The same files in the same order with the same
    labels as ``index_split``, whose checks (and ``DataError``s) apply when the table is built. ``cache=None``:
    listed here, not shared."""
    folder = str(Path(root) / split)

    def current_classes() -> list[str]:  # ImageFolder's class folders (FileNotFoundError for none: rebuilt)
        from torchvision.datasets.folder import find_classes

        return find_classes(folder)[0]

    def valid(meta: dict[str, Any]) -> bool:
        if meta.get("folder") != folder or meta.get("classes") != current_classes():
            return False
        return all(_dir_stat(os.path.join(folder, rel)) == st for rel, st in meta["dirs"].items())

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        dirs: dict[str, list[int]] = {}
        with contextlib.suppress(OSError):  # before listing: a change made while it lists invalidates it
            dirs = {rel: _dir_stat(os.path.join(folder, rel)) for rel in ["", *current_classes()]}
        index = index_split(root, split)
        cut = len(folder) + 1
        nested = {p.rpartition(os.sep)[0][cut:] for p, _ in index.samples} - set(dirs)
        dirs.update({rel: _dir_stat(os.path.join(folder, rel)) for rel in sorted(nested)})
        table = SampleTable(index.samples)
        meta = {"folder": folder, "classes": index.classes, "prefix": table.prefix, "dirs": dirs}
        return table.arrays(), meta

    arrays, meta = cached_arrays(cache, f"{split}-folder", valid, build)
    files = meta.get("arrays")
    mapped = {k: os.path.join(os.fspath(cache), f) for k, f in files.items()} if files and cache else None
    return SplitIndex(
        Path(folder), list(meta["classes"]), SampleTable.from_arrays(meta["prefix"], arrays, mapped)
    )
