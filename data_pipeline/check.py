"""Verify an ImageNet root, or a pack of one, before training: folders, classes, counts, every image decoded.

    python -m data_pipeline check /datasets/imagenet                # exit 0: sound; 1: problems listed
    python -m data_pipeline check /datasets/imagenet --workers 16   # processes (default: all cores)
    python -m data_pipeline check /datasets/imagenet --quick        # headers + one image per class: minutes
    python -m data_pipeline check /datasets/imagenet --full         # also require the full ILSVRC2012 sizes
    python -m data_pipeline check /datasets/imagenet-shards         # a pack: ROOT holds manifest.json

What is a problem (one line each on stdout, exit status 1): a missing root, train/ or val/; a split without
class folders; a class folder without images (ImageFolder refuses those); class folders that differ between
train/ and val/; a hidden folder (``.ipynb_checkpoints``) the loaders would take as a class; a file that cannot be
read, is empty, is not an image, or does not decode (truncated or corrupt); a GIF image under any name (PIL
and so the torchvision backend read it; DALI, the default backend, cannot decode GIF, and DALI 2.4's CPU decoder
can crash the process on one, so GIFs are never handed to it); a directory inside a class folder that leads back
to the class folder or above it (a link loop) or into another class's folder (``layout.NestedDirCheck``: the
loaders follow links, and would label other classes' images as this class; ``layout.index_split`` refuses such
a tree); with ``--full``, sizes other than ILSVRC2012's (1,000 classes, 1,281,167 train and 50,000 val images,
50 val images per class).

What is a note (reported, not a problem): ImageNet's own oddities, which every pipeline converts to RGB: images in
another format under a .JPEG name (train has one PNG, n02105855_2933.JPEG), CMYK JPEGs (22 in train) and
greyscale JPEGs; files the loaders skip (names without an image extension, files directly in train/ or val/,
e.g. left there by ``prepare-val --link``).

Images are decoded with the decoder of the DALI pipeline (``fn.decoders.image``, DALI's nvImageCodec with
libjpeg-turbo) in a CPU-only pipeline (``device_id=None``), batch by batch; a batch that fails is decoded again
file by file so each bad file is named with the decoder's own reason. On a GPU the training pipeline decodes
with nvJPEG (``device="mixed"``); this check uses the CPU path on every machine. From ``PROCESS_MIN`` (4,096)
images on, the images are shared, ``CHUNK`` at a time, by ``--workers`` processes (each reading, looking at
headers with PIL and decoding with a one-thread DALI pipeline: PIL's header parsing holds the GIL, which
threads share); below it, this process reads with ``--workers`` threads and decodes with as many DALI
threads. The processes are spawned (``_pool``): a script that calls ``check_root`` needs the
``if __name__ == "__main__":`` guard.

``--quick`` (``quick=True``) decodes one image per class folder (the first without a problem) and only looks at
the others: magic bytes, for a JPEG its frame header walked from the start marker by marker (width and height
not zero; 1 component: the greyscale note, 4: the CMYK note) and the end-of-image marker (FFD9) in its last
``QUICK_TAIL`` bytes, for a PNG its IEND chunk there; the first ``QUICK_HEAD`` and last ``QUICK_TAIL`` bytes of
each file are read, no more. It finds what the full check finds of a file that is empty, unreadable, not an
image, a GIF, truncated or with a broken header, with the same notes, but not damage inside the compressed
data (a full check decodes every image: the default, for a tree never checked before).

On a pack (``python -m data_pipeline pack``: ROOT holds manifest.json; ``check_pack``), what is a problem, one
line each naming the shard, and the member where there is one: anything ``shard_reader.open_shards`` refuses,
one line per split (no manifest, an incomplete pack, a missing shard or index file, an index line without .jpg
or .cls, a tar cut mid-member, sizes or sample counts other than the manifest's; the samples of a refused
split are not read); every shard read through (``--workers`` at once, progress with ETA on stderr): a size
or sha256 other than the manifest's, a tar that ``tarfile`` cannot read to its end (a damaged header, cut
mid-member), members of the tar that its index file does not list, index entries that are not in the tar, and
members whose data offset or size in the index is not the tar's (a shard that ``open_shards``' line already
names is not reported again); every sample its index lists, read as the loaders read it (``ShardIndex.read``):
a .cls that is not a label in [0, number of manifest classes), and the .jpg looked at and decoded as a
folder's image files are (problems and notes as above); a class of the manifest without samples in a split;
with ``--full``, ILSVRC2012's sizes as for folders. Counts are per split the samples listed and per class the
samples with that label (the manifest's one class list for both splits): for a pack of a tree, the folder
check's counts of it. Each shard is read once: hashed as a mapped file while its header blocks are walked
(``_walk``: a plain ustar file as ``pack`` writes it; anything else is read again with ``tarfile``, which names
what is wrong), by ``--workers`` processes from ``PROCESS_MIN_BYTES`` (256 MiB) of tar on. The samples are then
decoded as a folder's images are: by ``--workers`` processes from ``PROCESS_MIN`` samples on, ``CHUNK`` consecutive
samples a task (``_decode_pack_here``: each process opens the pack's index once and reads its samples with
``ShardIndex.read``), by threads of this process below it. ``--quick`` on a
pack: each shard's size against the manifest (no sha256) and its header blocks against its index, every
sample's label and header looked at as above, one sample per class decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import multiprocessing
import os
import re
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

from data_pipeline.layout import NestedDirCheck
from data_pipeline.prepare import Progress
from data_pipeline.shard_reader import PACK_HINT  # numpy, not torch (imported where used there)

__all__ = [
    "FULL_CLASSES",
    "FULL_COUNTS",
    "FULL_VAL_PER_CLASS",
    "IMG_EXTENSIONS",
    "MANIFEST",
    "CheckReport",
    "Note",
    "check_pack",
    "check_root",
    "decode_files",
]

FULL_CLASSES = 1000
FULL_COUNTS = {"train": 1_281_167, "val": 50_000}
FULL_VAL_PER_CLASS = 50
SPLITS = ("train", "val")
# shard_reader.MANIFEST, spelled out for the same reason (shard_reader imports torch): a pack's root holds it
MANIFEST = "manifest.json"
_T = TypeVar("_T")
BLOCK = 512  # tar block size
QUICK_HEAD = (
    1 << 16
)  # bytes --quick reads from the start of an image (the frame header is in them, or read on)
QUICK_TAIL = 1 << 10  # bytes from its end, where the end-of-image marker must be
# Fewer images or shards than this are looked at in this process (threads): worker processes pay an import of
# this module (and of DALI, to decode) before they start, seconds that only a large tree earns back.
PROCESS_MIN = 4096
CHUNK = 512  # images per task handed to a worker process
PROCESS_MIN_BYTES = 1 << 28  # a pack of fewer tar bytes is read by threads of this process
# torchvision.datasets.folder.IMG_EXTENSIONS, which ImageFolder and data_pipeline.layout use: a file without one of
# these is skipped by the loaders. Spelled out so that `check` does not import torch (seconds); a test compares.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_JPEG_NAME = (".jpeg", ".jpg")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Magic bytes of what the decoder accepts, for naming what a file is when it does not decode.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WebP"),
)


@dataclass(frozen=True)
class Note:
    """Something worth knowing that is not a problem. ``kind``: png (or another format) under a .JPEG name,
    cmyk, grayscale, skipped (a file the loaders do not read)."""

    kind: str
    path: str  # relative to the root
    detail: str = ""


@dataclass
class CheckReport:
    """Result of ``check_root`` or ``check_pack``: sound when ``problems`` is empty."""

    root: Path
    # split -> sorted class folders (a pack: the manifest's class list, the same for both splits)
    classes: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # split -> image files (a pack: samples listed)
    # split -> class -> image files (a pack: samples whose .cls holds the class's label)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    decoded: int = 0  # images that decoded
    decode_seconds: float = 0.0
    workers: int = 0
    pack: bool = False  # checked by check_pack
    shards: dict[str, int] = field(default_factory=dict)  # a pack: split -> shards
    read_bytes: int = 0  # a pack: tar bytes read for the sha256 and member checks
    read_seconds: float = 0.0
    quick: bool = False  # --quick: headers looked at, one image per class decoded
    looked: int = 0  # --quick: images whose header was looked at
    look_seconds: float = 0.0
    processes: bool = False  # the work was shared by ``workers`` processes (else threads of this one)
    read_processes: bool = False  # a pack: shards read by ``workers`` processes

    @property
    def sound(self) -> bool:
        return not self.problems

    @property
    def full(self) -> bool:
        """Whether the tree has exactly the sizes of the full ILSVRC2012 train and val sets."""
        return all(len(self.classes.get(s, ())) == FULL_CLASSES for s in SPLITS) and all(
            self.counts.get(s) == n for s, n in FULL_COUNTS.items()
        )


def _scan_split(root: Path, split: str, report: CheckReport, images: list[str]) -> None:
    folder = root / split
    if not folder.is_dir():
        report.problems.append(
            f"{split}/ is missing: {folder} must hold one folder per class (<wnid>/*.JPEG)"
        )
        return
    classes: list[str] = []
    loose: list[str] = []
    with os.scandir(folder) as it:
        for entry in sorted(it, key=lambda e: e.name):
            if entry.is_dir():
                classes.append(entry.name)
            else:
                loose.append(entry.name)
    report.classes[split] = classes
    counts: dict[str, int] = {}
    nested = NestedDirCheck(folder, classes)
    for cls in classes:
        if cls.startswith("."):
            report.problems.append(f"{split}/{cls}/ is a hidden folder: the loaders would take it as a class")
        n = 0
        # Recursively, following links, as ImageFolder's make_dataset does; top-down, so a directory that loops
        # back or leads into another class is reported once and not walked into.
        top = str(folder / cls)
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            if dirpath != top and (found := nested.problem(cls, dirpath)):
                report.problems.append(f"{os.path.relpath(found[0], root)}: {found[1]}")
                dirnames.clear()
                continue
            dirnames.sort()
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if name.lower().endswith(IMG_EXTENSIONS):
                    images.append(rel)
                    n += 1
                else:
                    report.notes.append(Note("skipped", rel, "not an image file name: the loaders skip it"))
        counts[cls] = n
        if n == 0:
            report.problems.append(f"{split}/{cls}/ has no images (ImageFolder refuses empty class folders)")
    report.per_class[split] = counts
    report.counts[split] = sum(counts.values())
    if not classes:
        hint = ""
        if split == "val" and any(n.lower().endswith(_JPEG_NAME) for n in loose):
            hint = ": the images are flat; run python -m data_pipeline prepare-val first"
        elif any(n.endswith(".tar") for n in loose):
            hint = ": extract the per-class archives first (tar -xf n01440764.tar -C n01440764/, ...)"
        report.problems.append(f"{split}/ has no class folders ({len(loose):,} files directly in it){hint}")
    elif loose:
        report.notes.append(
            Note(
                "skipped",
                f"{split}/",
                f"{len(loose):,} files directly in {split}/, outside the class folders (the loaders skip them; "
                f"left by prepare-val --link?), first: {loose[0]}",
            )
        )


def _compare_classes(report: CheckReport) -> None:
    train, val = report.classes.get("train"), report.classes.get("val")
    if not train or not val:
        return  # already reported as missing / without class folders
    for cls in sorted(set(train) - set(val)):
        report.problems.append(f"{cls}: class folder in train/ but not in val/")
    for cls in sorted(set(val) - set(train)):
        report.problems.append(f"{cls}: class folder in val/ but not in train/")


def _check_full(report: CheckReport) -> None:
    for split in SPLITS:
        if split not in report.counts:
            continue
        n_cls, n_img = len(report.classes[split]), report.counts[split]
        if n_cls != FULL_CLASSES:
            report.problems.append(f"--full: {split}/ has {n_cls:,} classes, ILSVRC2012 has {FULL_CLASSES:,}")
        if n_img != FULL_COUNTS[split]:
            report.problems.append(
                f"--full: {split}/ has {n_img:,} images, ILSVRC2012 {split} has {FULL_COUNTS[split]:,}"
            )
    for cls, n in report.per_class.get("val", {}).items():
        if n and n != FULL_VAL_PER_CLASS:
            where = f"val class {cls}" if report.pack else f"val/{cls}/"
            report.problems.append(
                f"--full: {where} has {n} images, ILSVRC2012 has {FULL_VAL_PER_CLASS} per class"
            )


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class _Read:
    rel: str  # names the image in problem lines and notes
    data: bytes | None = None  # None: not sent to the decoder (problem set)
    problem: str = ""  # the whole problem line, naming the image
    note: Note | None = None


def _what_is(data: bytes) -> str | None:
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _read(root: Path, rel: str) -> _Read:
    """Read one file and look at its header (``_inspect``)."""
    try:
        data = (root / rel).read_bytes()
    except OSError as e:
        why = (
            "broken symbolic link" if (root / rel).is_symlink() and not (root / rel).exists() else e.strerror
        )
        return _Read(rel, problem=f"{rel}: cannot be read: {why}")
    return _inspect(rel, data)


def _inspect(rel: str, data: bytes, what: str = "file") -> _Read:
    """Look at an image's header (PIL reads the header only) for the problems before decoding and the notes.
    ``rel`` names the image (a path below the root, or a pack's ``split/shard-XXXXXX.tar: KEY.jpg``)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return _Read(rel, problem=f"{rel}: empty {what} (0 bytes)")
    out = _Read(rel, data)
    fmt = _what_is(data)
    if fmt is None:
        out.data = None
        out.problem = f"{rel}: not an image: no known image header (starts with {data[:12]!r})"
        return out
    if fmt == "GIF":  # not for DALI's decoder: it cannot decode GIF, and 2.4's CPU decoder may crash on one
        out.data = None
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as e:  # UnidentifiedImageError's message names the BytesIO object: not worth a line
            why = "PIL cannot identify it" if isinstance(e, UnidentifiedImageError) else f"PIL says {e}"
            out.problem = (
                f"{rel}: GIF data that does not decode (truncated or corrupt): {why.splitlines()[0]}"
            )
        else:
            out.problem = (
                f"{rel}: GIF data (PIL reads it, DALI cannot decode GIF: convert it to JPEG or use "
                "data.backend=torchvision)"
            )
        return out
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format or fmt, img.mode
    except Exception:  # PIL cannot parse it: the decoder below says whether it is broken
        return out
    if rel.lower().endswith(_JPEG_NAME) and fmt != "JPEG":
        out.note = Note(fmt.lower(), rel, f"a {fmt} image named {Path(rel).suffix} (the pipelines decode it)")
    elif fmt == "JPEG" and mode == "CMYK":
        out.note = Note("cmyk", rel, "a CMYK JPEG (the pipelines convert it to RGB)")
    elif fmt == "JPEG" and mode in ("L", "1"):
        out.note = Note("grayscale", rel, "a greyscale JPEG (the pipelines convert it to RGB)")
    return out


# ------------------------------------------------------------------------------------------- quick looks


def _jpeg_frame(head: bytes, pread: Callable[[int, int], bytes]) -> tuple[int, int, int] | str:
    """(height, width, components) from a JPEG's frame header (SOFn), walking the marker segments from the start
    without decoding; ``head`` is the file's start, ``pread(n, offset)`` reads on. A string says what is wrong."""
    pos = 2
    while True:
        seg = head[pos : pos + 4] if pos + 4 <= len(head) else pread(4, pos)
        if len(seg) < 4:
            return "it ends before its frame header (truncated)"
        if seg[0] != 0xFF:
            return f"no marker at byte {pos:,} (corrupt)"
        m = seg[1]
        if m == 0xFF:  # fill byte
            pos += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            pos += 2
            continue
        if m in (0xD9, 0xDA):
            return "no frame header (SOF) before its scan or end (corrupt)"
        length = (seg[2] << 8) | seg[3]
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            sof = head[pos + 4 : pos + 10] if pos + 10 <= len(head) else pread(6, pos + 4)
            if len(sof) < 6:
                return "it ends inside its frame header (truncated)"
            return (sof[1] << 8) | sof[2], (sof[3] << 8) | sof[4], sof[5]
        if length < 2:
            return f"a segment length of {length} at byte {pos:,} (corrupt)"
        pos += 2 + length


def _quick_look(rel: str, size: int, pread: Callable[[int, int], bytes], what: str = "file") -> _Read:
    """``--quick``'s look at one image of ``size`` bytes read through ``pread(n, offset)``: its magic bytes, for a
    JPEG the frame header (dimensions, components: greyscale and CMYK notes) and the end-of-image marker in its
    last ``QUICK_TAIL`` bytes, for a PNG its IEND chunk there. The first ``QUICK_HEAD`` bytes and the last
    ``QUICK_TAIL`` are read, no more (a GIF is read whole: it is a problem anyway, and ``_inspect`` says which).
    Problems and notes as ``_inspect``'s, with the same words where the finding is the same."""
    if size == 0:
        return _Read(rel, problem=f"{rel}: empty {what} (0 bytes)")
    head = pread(min(size, QUICK_HEAD), 0)
    fmt = _what_is(head)
    if fmt is None:
        return _Read(rel, problem=f"{rel}: not an image: no known image header (starts with {head[:12]!r})")
    if fmt == "GIF":
        return _inspect(rel, pread(size, 0), what)
    tail = head[-QUICK_TAIL:] if size <= len(head) else pread(QUICK_TAIL, size - QUICK_TAIL)
    out = _Read(rel)
    if rel.lower().endswith(_JPEG_NAME) and fmt != "JPEG":
        out.note = Note(fmt.lower(), rel, f"a {fmt} image named {Path(rel).suffix} (the pipelines decode it)")
    if fmt == "JPEG":
        frame = _jpeg_frame(head, pread)
        if isinstance(frame, str):
            out.problem = f"{rel}: JPEG data with a bad header: {frame}"
        elif not (frame[0] and frame[1]):
            out.problem = f"{rel}: JPEG data whose header gives {frame[1]}x{frame[0]} pixels (corrupt)"
        elif b"\xff\xd9" not in tail:
            out.problem = (
                f"{rel}: JPEG data without an end-of-image marker (FFD9) in its last bytes (truncated)"
            )
        elif frame[2] == 4:
            out.note = Note("cmyk", rel, "a CMYK JPEG (the pipelines convert it to RGB)")
        elif frame[2] == 1:
            out.note = Note("grayscale", rel, "a greyscale JPEG (the pipelines convert it to RGB)")
    elif fmt == "PNG" and b"IEND" not in tail:
        out.problem = f"{rel}: PNG data without its IEND chunk at the end (truncated)"
    return out


def _quick_file(root: Path, rel: str) -> _Read:
    path = root / rel
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        why = "broken symbolic link" if path.is_symlink() and not path.exists() else e.strerror
        return _Read(rel, problem=f"{rel}: cannot be read: {why}")
    try:
        return _quick_look(rel, os.fstat(fd).st_size, lambda n, off: os.pread(fd, n, off))
    except OSError as e:
        return _Read(rel, problem=f"{rel}: cannot be read: {e.strerror}")
    finally:
        os.close(fd)


def _quick_files(root: str, rels: Sequence[str]) -> list[tuple[str, str, Note | None]]:
    """(path, problem line, note) of each of ``rels`` with a problem or a note (a worker process's task)."""
    looks = (_quick_file(Path(root), rel) for rel in rels)
    return [(r.rel, r.problem, r.note) for r in looks if r.problem or r.note]


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes started fresh (spawn): never a fork of a process running DALI's or torch's threads, and
    not multiprocessing's one forkserver, which the torchvision backend starts with stop signals blocked
    (``torchvision_backend.start_forkserver_shielded``) and must stay its own. Each pays the import of this module
    (and DALI's, to decode) once: under a second, earned back from ``PROCESS_MIN`` images on."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _in_chunks(
    task: Callable[..., _T], args: Sequence[tuple], sizes: Sequence[int], workers: int, progress: Progress
) -> list[_T]:
    """``task(*a)`` for each of ``args`` in ``workers`` processes; results in the order of ``args``. ``sizes``:
    what each task counts for in ``progress``."""
    done = 0
    with _pool(workers) as pool:
        futures = {pool.submit(task, *a): n for a, n in zip(args, sizes, strict=True)}
        try:
            for fut in as_completed(futures):
                fut.result()
                done += futures[fut]
                progress.update(done)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    progress.close()
    return [f.result() for f in futures]


def _first_per_class(images: Sequence[str], bad: set[str]) -> list[str]:
    """The first image (listing order) of each split's class folder that has no problem."""
    seen: set[tuple[str, str]] = set()
    first = []
    for rel in images:
        split, cls = rel.split(os.sep, 2)[:2]
        if (split, cls) not in seen and rel not in bad:
            seen.add((split, cls))
            first.append(rel)
    return first


def _quick_root(root: Path, images: list[str], report: CheckReport, stream: TextIO | None) -> None:
    """--quick on a folder tree: every image looked at (``_quick_look``), one per class decoded."""
    start = time.perf_counter()
    progress = Progress("check: looked at", len(images), stream=stream)
    chunks = [images[i : i + CHUNK * 4] for i in range(0, len(images), CHUNK * 4)]
    if report.workers > 1 and len(images) >= PROCESS_MIN:
        report.processes = True
        found = _in_chunks(
            _quick_files, [(str(root), c) for c in chunks], [len(c) for c in chunks], report.workers, progress
        )
    else:
        found = []
        for c in chunks:
            found.append(_quick_files(str(root), c))
            progress.update(progress.done + len(c))
        progress.close()
    report.looked = len(images)
    report.look_seconds = time.perf_counter() - start
    bad = set()
    for part in found:
        for rel, problem, note in part:
            if problem:
                report.problems.append(problem)
                bad.add(rel)
            elif note is not None:
                report.notes.append(note)
    samples = _first_per_class(images, bad)
    if samples:
        import nvidia.dali  # noqa: F401 - imported before the clock starts (about a second)

        start = time.perf_counter()
        problems, notes, report.decoded = decode_files(root, samples, report.workers)
        report.decode_seconds = time.perf_counter() - start
        report.problems += problems
        noted = {n.path for n in report.notes}
        report.notes += [n for n in notes if n.path not in noted]


# ----------------------------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _native_stderr(sink: BinaryIO) -> Iterator[None]:
    """Send file descriptor 2 to ``sink`` for the duration: nvImageCodec logs decode errors from C++ straight to
    stderr, which would interleave with the report; captured, they become the reason on the problem line."""
    sys.stderr.flush()
    saved = os.dup(2)
    sink.seek(0)
    sink.truncate()
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _decoder_message(sink: BinaryIO) -> str:
    sink.seek(0)
    lines = [_ANSI.sub("", ln).strip() for ln in sink.read().decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln]
    # e.g. "[ERROR] [libjpeg_turbo_decoder] Could not decode jpeg code stream - Premature end of JPEG data."
    msg = lines[-1] if lines else ""
    return re.sub(r"^(\[[^\]]*\]\s*)+", "", msg)


class _Decoder:
    """DALI CPU pipeline: external_source (encoded bytes) -> fn.decoders.image(device="cpu", RGB)."""

    def __init__(self, batch_size: int, threads: int, sink: BinaryIO):
        self.batch_size, self.threads, self.sink = batch_size, threads, sink
        self.pipe = self._build()

    def _build(self):  # -> nvidia.dali.Pipeline (imported lazily: DALI is only needed for decoding)
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(
            batch_size=self.batch_size, num_threads=self.threads, device_id=None, prefetch_queue_depth=1
        )
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        pipe = decode()
        pipe.build()
        return pipe

    def _run(self, arrays: list) -> bool:
        try:
            with _native_stderr(self.sink):
                self.pipe.feed_input("encoded", arrays)
                self.pipe.run()
            return True
        except RuntimeError:
            # DALI says the pipeline "is no longer valid" after an operator error: build a fresh one.
            self.pipe = self._build()
            return False

    def decode(self, batch: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
        """Decode a batch; return (relative path, decoder message) for each file that does not decode."""
        import numpy as np

        arrays = [np.frombuffer(data, dtype=np.uint8) for _, data in batch]
        if self._run(arrays):
            return []
        failed = []
        for (rel, _), arr in zip(batch, arrays, strict=True):
            if not self._run([arr]):
                failed.append((rel, _decoder_message(self.sink)))
        return failed


def decode_files(
    root: str | os.PathLike,
    files: list[str],
    workers: int,
    batch_size: int = 0,
    progress: Progress | None = None,
) -> tuple[list[str], list[Note], int]:
    """Read and decode ``files`` (paths relative to ``root``) with DALI's CPU decoder.

    Returns (problem lines, notes, images decoded). ``workers`` is both the number of reading threads and of
    DALI decoder threads; ``batch_size`` defaults to 4 per worker (at least 32). Reading runs ahead of decoding
    by up to ``workers + 2`` batches, capped at ~2,048 files (~225 MB of ImageNet JPEGs) in memory.
    """
    root = Path(root)
    return _decode_all(files, lambda rel: _read(root, rel), workers, batch_size, progress)


def _decode_all(
    items: Sequence[_T],
    read: Callable[[_T], _Read],
    workers: int,
    batch_size: int = 0,
    progress: Progress | None = None,
    decoder: _Decoder | None = None,
) -> tuple[list[str], list[Note], int]:
    """``decode_files`` for any images: ``read(item)`` (called in ``workers`` threads) gives each one's bytes,
    or its problem line, and its note; the bytes are decoded batch by batch (by ``decoder``, a worker process's
    own, or a new one)."""
    batch_size = decoder.batch_size if decoder is not None else batch_size or max(32, 4 * workers)
    ahead = min(workers + 2, max(2, 2048 // batch_size))
    problems: list[str] = []
    notes: list[Note] = []
    decoded = done = 0
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def read_batch(batch: Sequence[_T]) -> list[_Read]:
        return [read(item) for item in batch]

    with (
        tempfile.TemporaryFile() as sink,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check-read") as pool,
    ):
        decoder = decoder or _Decoder(batch_size, workers, sink)
        pending: deque[Future] = deque()
        it = iter(batches)
        for batch in it:
            pending.append(pool.submit(read_batch, batch))
            if len(pending) >= ahead:
                break
        while pending:
            reads = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(read_batch, nxt))
            good = []
            for r in reads:
                if r.problem:
                    problems.append(r.problem)
                else:
                    good.append((r.rel, r.data))
                    if r.note is not None:
                        notes.append(r.note)
            bad = decoder.decode(good) if good else []
            if bad:
                data = dict(good)
                for rel, msg in bad:
                    problems.append(
                        f"{rel}: {_what_is(data[rel])} data that does not decode (truncated or corrupt): "
                        f"{msg or 'no message from the decoder'}"
                    )
                bad_rels = {rel for rel, _ in bad}
                notes[:] = [n for n in notes if n.path not in bad_rels]
            decoded += len(good) - len(bad)
            done += len(reads)
            if progress is not None:
                progress.update(done)
    if progress is not None:
        progress.close()
    return problems, notes, decoded


_HERE: dict[str, Any] = {}  # a worker process's own: its decoder, the packs it has opened


def _worker_decoder() -> _Decoder:
    """This worker process's decoder: one DALI CPU thread (the processes are the parallelism), built once."""
    if "decoder" not in _HERE:
        _HERE["decoder"] = _Decoder(32, 1, tempfile.TemporaryFile())  # noqa: SIM115 - lives with the process
    return _HERE["decoder"]


def _decode_files_here(root: str, rels: Sequence[str]) -> tuple[list[str], list[Note], int]:
    """A worker process's task: read, look at and decode ``rels`` (``decode_files`` with its own decoder)."""
    return _decode_all(rels, partial(_read, Path(root)), 1, decoder=_worker_decoder())


def _read_sample(index: Any, files: Any, i: int, name: str, quick: bool) -> tuple[_Read, int | None]:
    """Sample ``i`` of a pack's split (``index``: a ``ShardIndex``; ``files``: its open tars) read as the loaders
    read it (``ShardIndex.read``: the label checked), then looked at (``quick``: the header only); with its label,
    None where it could not be read."""
    from data_pipeline.layout import DataError

    try:
        jpg, label = index.read(i, files)
    except DataError as e:  # a label out of range (or a tar cut since open_shards looked)
        return _Read(name, problem=str(e)), None
    except OSError as e:
        return _Read(name, problem=f"{name}: cannot be read: {e.strerror}"), None
    if quick:
        return _quick_look(name, len(jpg), lambda n, off: jpg[off : off + n], what="member"), label
    return _inspect(name, jpg, what="member"), label


def _decode_pack_here(
    root: str, items: Sequence[tuple[str, int, str]], classes: int
) -> tuple[list[str], list[Note], int, dict[str, list[int]]]:
    """A worker process's task in a full check of a pack: read (``_read_sample``), look at and decode ``items``
    (split, sample id, name), with this process's decoder and its own open of each split's index (once per process).
    Returns ``_decode_all``'s (problems, notes, decoded) and the label counts per split."""
    from data_pipeline.shard_reader import ShardFiles, open_shards

    labels: dict[str, list[int]] = {}
    tars: dict[tuple[str, int], ShardFiles] = {}  # this task's few shards (its items are consecutive)

    def read(item: tuple[str, int, str]) -> _Read:
        split, i, name = item
        index = _HERE.get(("pack", root, split))
        if index is None:
            index = _HERE["pack", root, split] = open_shards(root, split)
        files = tars.setdefault((split, int(index.shard_of[i])), ShardFiles(index.tar_paths))
        r, label = _read_sample(index, files, i, name, quick=False)
        if label is not None:
            labels.setdefault(split, [0] * classes)[label] += 1
        return r

    try:
        found = _decode_all(items, read, 1, decoder=_worker_decoder())
    finally:
        for files in tars.values():
            files.close()
    return (*found, labels)


def _merge(results: Sequence[tuple[list[str], list[Note], int]]) -> tuple[list[str], list[Note], int]:
    problems = [p for r in results for p in r[0]]
    return problems, [n for r in results for n in r[1]], sum(r[2] for r in results)


# ------------------------------------------------------------------------------------------------- check


def _cores() -> int:
    """The cores this process may use (a SLURM allocation), not the whole node."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_root(
    root: str | os.PathLike,
    workers: int | None = None,
    full: bool = False,
    progress_stream: TextIO | None = None,
    quick: bool = False,
) -> CheckReport:
    """Check an ImageNet root (see the module docstring); problems and notes are in the returned report.
    ``quick``: every image's header looked at and one image per class decoded, instead of every image decoded."""
    root = Path(root)
    report = CheckReport(root, quick=quick)
    if not root.is_dir():
        report.problems.append(f"data root {root} does not exist or is not a directory")
        return report
    report.workers = workers or _cores()
    images: list[str] = []
    for split in SPLITS:
        _scan_split(root, split, report, images)
    _compare_classes(report)
    if full:
        _check_full(report)
    if images and quick:
        _quick_root(root, images, report, progress_stream)
    elif images:
        import nvidia.dali  # noqa: F401 - imported before the clock starts (about a second)

        start = time.perf_counter()
        progress = Progress("check: decoded", len(images), stream=progress_stream)
        if report.workers > 1 and len(images) >= PROCESS_MIN:
            report.processes = True
            chunks = [images[i : i + CHUNK] for i in range(0, len(images), CHUNK)]
            problems, notes, report.decoded = _merge(
                _in_chunks(
                    _decode_files_here,
                    [(str(root), c) for c in chunks],
                    [len(c) for c in chunks],
                    report.workers,
                    progress,
                )
            )
        else:
            problems, notes, report.decoded = decode_files(root, images, report.workers, progress=progress)
        report.decode_seconds = time.perf_counter() - start
        report.problems += problems
        report.notes += notes
    return report


# -------------------------------------------------------------------------------------------------- packs


class _Hashing:
    """A file read through: sha256 and byte count of everything read (tarfile's stream mode reads every byte)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.n += len(data)
        return data


def _few(names: list[str], show: int = 3) -> str:
    more = f", ... ({len(names) - show:,} more)" if len(names) > show else ""
    return ", ".join(names[:show]) + more


def _index_entries(path: Path, where: str) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Every component of a shard's index file: member name -> (data offset, size); problem lines."""
    from data_pipeline.layout import DataError
    from data_pipeline.shard_reader import PACK_HINT, index_lines

    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, [f"{where}: missing index file; {PACK_HINT}"]
    except (OSError, UnicodeDecodeError) as e:
        return {}, [f"{where}: cannot be read: {getattr(e, 'strerror', None) or e}"]
    try:
        lines = index_lines(text, where)
    except DataError as e:
        return {}, [str(e)]
    entries: dict[str, tuple[int, int]] = {}
    twice: list[str] = []
    for comps in lines:
        for _, offset, size, member in comps:
            if member in entries:
                twice.append(member)
            entries[member] = (offset, size)
    return entries, [f"{where}: lists {len(twice):,} member(s) twice: {_few(twice)}"] if twice else []


def _scan_shard_tarfile(root: Path, split: str, rec: dict) -> tuple[list[str], int]:
    """``_scan_shard`` with ``tarfile``: every byte read through it (a damaged or unusual tar; slower)."""
    name = str(rec.get("name"))
    where = f"{split}/{name}"
    try:
        f = open(root / split / name, "rb")  # noqa: SIM115 - closed below, after the tail is hashed
    except FileNotFoundError:
        return [f"{where}: missing shard; {PACK_HINT}"], 0
    except OSError as e:
        return [f"{where}: cannot be read: {e.strerror}"], 0
    problems: list[str] = []
    members: dict[str, tuple[int, int]] = {}
    after = "in its first header"
    readable = True
    stream = _Hashing(f)
    with f:
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tar:
                for m in tar:
                    if m.isfile():
                        members[m.name] = (m.offset_data, m.size)
                    after = f"after member {m.name}"
                # tarfile ends quietly at a block that is not a header: the end blocks are zeros
                if os.pread(f.fileno(), BLOCK, tar.offset).strip(b"\0"):
                    raise tarfile.ReadError(f"no tar header at byte {tar.offset:,}")
        except (tarfile.TarError, EOFError) as e:
            readable = False
            problems.append(f"{where}: not a readable tar ({e}) {after}; {PACK_HINT}")
        # the end blocks and anything after them: the sha256 covers the whole file
        while stream.read(1 << 22):
            pass
    return _judge(
        root, split, rec, stream.n, stream.sha.hexdigest(), members if readable else None, problems
    ), stream.n


def _walk(buf: memoryview, size: int) -> dict[str, tuple[int, int]] | None:
    """The members (name -> data offset, size) of a plain ustar file as ``pack`` writes it, from its header
    blocks alone; None at anything else (a bad checksum, a cut member, a link, pax or GNU headers, no end
    blocks): ``tarfile`` then reads it and names what is wrong."""
    members: dict[str, tuple[int, int]] = {}
    pos = 0
    while pos + BLOCK <= size:
        blk = bytes(buf[pos : pos + BLOCK])
        if not blk.strip(b"\0"):
            return members  # the end blocks (the sha256 covers what follows them)
        try:
            chksum = int(blk[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
            length = int(blk[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
        ok = chksum == sum(blk) - sum(blk[148:156]) + 8 * 32 and blk[257:262] == b"ustar"
        if not ok or blk[156:157] not in (b"0", b"\0") or blk[345:346] != b"\0":
            return None
        members[blk[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")] = (pos + BLOCK, length)
        pos += BLOCK + -(-length // BLOCK) * BLOCK
    return None  # ends inside a member or without end blocks


def _scan_shard(root: Path, split: str, rec: dict, quick: bool = False) -> tuple[list[str], int]:
    """Read one shard through (a worker process's task): its size and sha256 against the manifest's record, its
    tar members (names, data offsets, sizes) against its index file, in one read (the header blocks walked in
    the mapped file as it is hashed). ``quick``: the size only, no sha256: only the header blocks are read.
    Returns (problem lines, bytes read)."""
    name = str(rec.get("name"))
    try:
        f = open(root / split / name, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return _scan_shard_tarfile(root, split, rec)  # which names the problem
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return _scan_shard_tarfile(root, split, rec)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                sha = None
                if not quick:
                    digest = hashlib.sha256()
                    for a in range(0, size, 1 << 22):
                        digest.update(buf[a : a + (1 << 22)])
                    sha = digest.hexdigest()
                members = _walk(buf, size)
            finally:
                buf.release()
    if members is None:
        return _scan_shard_tarfile(root, split, rec)
    read = (len(members) + 1) * BLOCK if quick else size
    return _judge(root, split, rec, size, sha, members, []), read


def _judge(
    root: Path,
    split: str,
    rec: dict,
    n: int,
    sha: str | None,
    members: dict[str, tuple[int, int]] | None,
    problems: list[str],
) -> list[str]:
    """``problems`` and those of a shard of ``n`` bytes with this ``sha`` (None: not hashed, --quick) and these
    members (None: the tar could not be read to its end) against the manifest's record and its index."""
    where = f"{split}/{rec.get('name')}"
    said = rec.get("bytes")
    if n != said:
        said = f"{said:,}" if isinstance(said, int) else repr(said)
        problems.append(f"{where}: {n:,} bytes, the manifest says {said} (truncated or altered); {PACK_HINT}")
    elif sha is not None and sha != rec.get("sha256"):
        problems.append(
            f"{where}: sha256 differs from the manifest's: not the bytes that were packed (altered or damaged); "
            f"{PACK_HINT}"
        )
    if members is None:  # the members after the damage are unknown: comparing would list them all
        return problems
    idx = str(rec.get("index"))
    listed, bad_index = _index_entries(root / split / idx, f"{split}/{idx}")
    problems += bad_index
    if bad_index:
        return problems
    only_tar = [m for m in members if m not in listed]
    only_index = [m for m in listed if m not in members]
    moved = [m for m in listed if m in members and listed[m] != members[m]]
    if only_tar:
        problems.append(
            f"{where}: {len(only_tar):,} member(s) that its index {idx} does not list: {_few(only_tar)}; {PACK_HINT}"
        )
    if only_index:
        problems.append(
            f"{where}: {len(only_index):,} member(s) that its index {idx} lists are not in the tar: "
            f"{_few(only_index)}; {PACK_HINT}"
        )
    if moved:
        shown = [
            f"{m} (index: at byte {listed[m][0]:,}, {listed[m][1]:,} bytes; tar: at byte {members[m][0]:,}, "
            f"{members[m][1]:,} bytes)"
            for m in moved
        ]
        problems.append(
            f"{where}: {len(moved):,} member(s) where its index {idx} gives another data offset or size than the "
            f"tar: {_few(shown)}; {PACK_HINT}"
        )
    return problems


def _names_shard(message: str, where: str) -> bool:
    """Whether a one-line ``DataError`` of ``open_shards`` is about ``where`` (it names the shard first)."""
    return message.startswith(where) and message[len(where) : len(where) + 1] in (":", " ")


def check_pack(
    root: str | os.PathLike,
    workers: int | None = None,
    full: bool = False,
    stream: TextIO | None = None,
    quick: bool = False,
) -> CheckReport:
    """Check a pack (``python -m data_pipeline pack``; see the module docstring): what ``open_shards`` refuses,
    every shard's sha256 and tar members against the manifest and its index, every sample's label and image.
    ``quick``: each shard's size instead of its sha256, every sample's label and header looked at
    (``_quick_look``) and one sample per class decoded. Progress goes to ``stream`` (stderr by default);
    problems and notes are in the returned report."""
    from data_pipeline.layout import DataError
    from data_pipeline.shard_reader import ShardFiles, load_manifest, member_names, open_shards

    root = Path(root)
    report = CheckReport(root, pack=True, quick=quick)
    if not (root / MANIFEST).is_file():
        report.problems.append(f"{root} has no {MANIFEST}: not a pack (check_root checks folder trees)")
        return report
    try:
        manifest = load_manifest(root)
    except DataError as e:
        report.problems.append(str(e))
        return report
    report.workers = workers or _cores()
    classes = [str(c) for c in manifest["classes"]]

    # What the loaders refuse, one line per split (open_shards stops at the first problem of a split).
    indexes, refused = {}, {}
    for split in SPLITS:
        try:
            indexes[split] = open_shards(root, split)
        except DataError as e:
            refused[split] = str(e)
            report.problems.append(str(e))

    # Every shard read through, in parallel: sha256 and tar members. A shard that open_shards' line names is not
    # reported again (a cut tar also differs in size and sha256 and ends inside a member).
    shards = [
        (split, rec)
        for split in SPLITS
        for rec in ((manifest["splits"].get(split) or {}).get("shards") or [])
        if isinstance(rec, dict)
    ]
    total = sum(int(rec.get("bytes") or 0) for _, rec in shards)
    progress = Progress("check: read MB", round(total / 1e6), stream=stream)
    start = time.perf_counter()
    # processes for a large pack (hashing releases the GIL, walking the headers does not); threads for a small one
    report.read_processes = report.workers > 1 and len(shards) > 1 and total >= PROCESS_MIN_BYTES
    with (
        _pool(report.workers)
        if report.read_processes
        else ThreadPoolExecutor(max_workers=report.workers, thread_name_prefix="check-shard")
    ) as pool:
        futures = [pool.submit(_scan_shard, root, split, rec, quick) for split, rec in shards]
        for fut in as_completed(futures):
            report.read_bytes += fut.result()[1]
            progress.update(round(report.read_bytes / 1e6))
    progress.close()
    report.read_seconds = time.perf_counter() - start
    for (split, rec), fut in zip(shards, futures, strict=True):
        said = refused.get(split, "")
        if not (
            _names_shard(said, f"{split}/{rec.get('name')}")
            or _names_shard(said, f"{split}/{rec.get('index')}")
        ):
            report.problems += fut.result()[0]

    # Every sample the index lists, as the loaders read it (ShardIndex.read: label checked), then decoded.
    items: list[tuple[str, int, str]] = []  # (split, sample id, "split/shard-XXXXXX.tar: KEY.jpg")
    labels = {split: [0] * len(classes) for split in indexes}
    for split, index in indexes.items():
        report.classes[split] = classes
        report.counts[split] = len(index)
        report.shards[split] = len(index.names)
        for s, name in enumerate(index.names):
            first = int(index.starts[s])
            members = member_names(index.index_paths[s])
            items += [(split, first + k, f"{split}/{name}: {m}") for k, m in enumerate(members)]
    # A ShardFiles per reading thread (its cache of open tars is not thread-safe), holding one tar open: samples
    # come shard by shard, and workers x shards descriptors (16 x 150 for ImageNet in 1 GB shards) would pass
    # the usual limit of 1,024 open files.
    local = threading.local()
    opened: list[ShardFiles] = []
    lock = threading.Lock()

    def read(item: tuple[str, int, str]) -> _Read:
        split, i, name = item
        index = indexes[split]
        shard = (split, int(index.shard_of[i]))
        if getattr(local, "shard", None) != shard:
            if getattr(local, "files", None) is not None:
                local.files.close()
            local.files, local.shard = ShardFiles(index.tar_paths), shard
            with lock:
                opened.append(local.files)
        r, label = _read_sample(index, local.files, i, name, quick)
        if label is None:
            return r
        with lock:
            labels[split][label] += 1
        if quick and not r.problem:
            with lock:  # the lowest sample id: the same sample whatever the threads' order
                firsts[split, label] = min(firsts.get((split, label), item), item)
        return r

    firsts: dict[tuple[str, int], tuple[str, int, str]] = {}  # --quick: the first sample of each class
    if items and quick:
        start = time.perf_counter()
        progress = Progress("check: looked at", len(items), stream=stream)
        with ThreadPoolExecutor(max_workers=report.workers, thread_name_prefix="check-look") as pool:
            for n, r in enumerate(pool.map(read, items, chunksize=256), start=1):
                if r.problem:
                    report.problems.append(r.problem)
                elif r.note is not None:
                    report.notes.append(r.note)
                if n % 4096 == 0:
                    progress.update(n)
        progress.close()
        for files in opened:
            files.close()
        opened.clear()
        report.looked, report.look_seconds = len(items), time.perf_counter() - start
        items = [firsts[k] for k in sorted(firsts)]
        quick = False  # the samples are now decoded as a full check does
        noted = {n.path for n in report.notes}
        looked_labels, labels = labels, {split: [0] * len(classes) for split in indexes}
    else:
        noted = set()
    if items:
        import nvidia.dali  # noqa: F401 - imported before the clock starts (about a second)

        start = time.perf_counter()
        progress = Progress("check: decoded", len(items), stream=stream)
        try:
            # every sample decoded: by every core (processes), as a folder's from PROCESS_MIN images on
            if report.workers > 1 and len(items) >= PROCESS_MIN:
                report.processes = True
                chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
                results = _in_chunks(_decode_pack_here, [(str(root), c, len(classes)) for c in chunks],
                                     [len(c) for c in chunks], report.workers, progress)  # fmt: skip
                problems, notes, report.decoded = _merge([r[:3] for r in results])
                for r in results:
                    for split, counts in r[3].items():
                        labels[split] = [a + b for a, b in zip(labels[split], counts, strict=True)]
            else:
                problems, notes, report.decoded = _decode_all(items, read, report.workers, progress=progress)
        finally:
            for files in opened:
                files.close()
        report.decode_seconds = time.perf_counter() - start
        report.problems += problems
        report.notes += [n for n in notes if n.path not in noted]
    if report.looked:  # the counts of the look at every sample, not of the decoded ones
        labels = looked_labels
    for split in indexes:
        report.per_class[split] = dict(zip(classes, labels[split], strict=True))
        empty = [c for c, n in report.per_class[split].items() if n == 0]
        if empty:
            report.problems.append(
                f"{split}: no samples of class {_few(empty)} ({len(empty):,} of the manifest's {len(classes):,} "
                "classes; ImageFolder refuses an empty class folder, so a pack of a sound tree has none)"
            )
    if full:
        _check_full(report)
    return report
