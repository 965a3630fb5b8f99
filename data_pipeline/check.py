"""Verify an ImageNet root, or a pack of one, before training: folders, classes, counts, every image decoded.

    python -m data_pipeline check /datasets/imagenet                # exit 0: sound; 1: problems listed
    python -m data_pipeline check /datasets/imagenet --workers 16   # decoder threads (default: all cores)
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
libjpeg-turbo) in a CPU-only pipeline (``device_id=None``), batch by batch, with ``--workers`` threads; a batch
that fails is decoded again file by file so each bad file is named with the decoder's own reason. On a GPU the
training pipeline decodes with nvJPEG (``device="mixed"``); this check uses the CPU path on every machine.
Files are read with the same number of Python threads (network filesystems need parallel reads).

On a pack (``python -m data_pipeline pack``: ROOT holds manifest.json; ``check_pack``), what is a problem, one
line each naming the shard, and the member where there is one: anything ``shard_reader.open_shards`` refuses,
one line per split (no manifest, an incomplete pack, a missing shard or index file, an index line without .jpg
or .cls, a tar cut mid-member, sizes or sample counts other than the manifest's; the samples of a refused
split are not read); every shard read through (in ``--workers`` threads, progress with ETA on stderr): a size
or sha256 other than the manifest's, a tar that ``tarfile`` cannot read to its end (a damaged header, cut
mid-member), members of the tar that its index file does not list, index entries that are not in the tar, and
members whose data offset or size in the index is not the tar's (a shard that ``open_shards``' line already
names is not reported again); every sample its index lists, read as the loaders read it (``ShardIndex.read``):
a .cls that is not a label in [0, number of manifest classes), and the .jpg looked at and decoded as a
folder's image files are (problems and notes as above); a class of the manifest without samples in a split;
with ``--full``, ILSVRC2012's sizes as for folders. Counts are per split the samples listed and per class the
samples with that label (the manifest's one class list for both splits): for a pack of a tree, the folder
check's counts of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO, TypeVar

from data_pipeline.layout import NestedDirCheck
from data_pipeline.prepare import Progress

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
) -> tuple[list[str], list[Note], int]:
    """``decode_files`` for any images: ``read(item)`` (called in ``workers`` threads) gives each one's bytes,
    or its problem line, and its note; the bytes are decoded batch by batch."""
    batch_size = batch_size or max(32, 4 * workers)
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
        decoder = _Decoder(batch_size, workers, sink)
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


# ------------------------------------------------------------------------------------------------- check


def _cores() -> int:
    """The cores this process may use (a SLURM allocation), not the whole node."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_root(
    root: str | os.PathLike,
    workers: int | None = None,
    full: bool = False,
    progress_stream: TextIO | None = None,
) -> CheckReport:
    """Check an ImageNet root (see the module docstring); problems and notes are in the returned report."""
    root = Path(root)
    report = CheckReport(root)
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
    if images:
        import nvidia.dali  # noqa: F401 - imported before the clock starts (about a second)

        start = time.perf_counter()
        progress = Progress("check: decoded", len(images), stream=progress_stream)
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


def _scan_shard(root: Path, split: str, rec: dict) -> tuple[list[str], int]:
    """Read one shard through: its size and sha256 against the manifest's record, its tar members (names, data
    offsets, sizes) against its index file. Returns (problem lines, bytes read)."""
    from data_pipeline.shard_reader import PACK_HINT

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
    said = rec.get("bytes")
    if stream.n != said:
        said = f"{said:,}" if isinstance(said, int) else repr(said)
        problems.append(
            f"{where}: {stream.n:,} bytes, the manifest says {said} (truncated or altered); {PACK_HINT}"
        )
    elif stream.sha.hexdigest() != rec.get("sha256"):
        problems.append(
            f"{where}: sha256 differs from the manifest's: not the bytes that were packed (altered or damaged); "
            f"{PACK_HINT}"
        )
    if not readable:  # the members after the damage are unknown: comparing would list them all
        return problems, stream.n
    idx = str(rec.get("index"))
    listed, bad_index = _index_entries(root / split / idx, f"{split}/{idx}")
    problems += bad_index
    if bad_index:
        return problems, stream.n
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
    return problems, stream.n


def _names_shard(message: str, where: str) -> bool:
    """Whether a one-line ``DataError`` of ``open_shards`` is about ``where`` (it names the shard first)."""
    return message.startswith(where) and message[len(where) : len(where) + 1] in (":", " ")


def check_pack(
    root: str | os.PathLike,
    workers: int | None = None,
    full: bool = False,
    stream: TextIO | None = None,
) -> CheckReport:
    """Check a pack (``python -m data_pipeline pack``; see the module docstring): what ``open_shards`` refuses,
    every shard's sha256 and tar members against the manifest and its index, every sample's label and image.
    Progress goes to ``stream`` (stderr by default); problems and notes are in the returned report."""
    from data_pipeline.layout import DataError
    from data_pipeline.shard_reader import ShardFiles, load_manifest, member_names, open_shards

    root = Path(root)
    report = CheckReport(root, pack=True)
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
    with ThreadPoolExecutor(max_workers=report.workers, thread_name_prefix="check-shard") as pool:
        futures = [pool.submit(_scan_shard, root, split, rec) for split, rec in shards]
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
        try:
            jpg, label = index.read(i, local.files)
        except DataError as e:  # a label out of range (or a tar cut since open_shards looked)
            return _Read(name, problem=str(e))
        except OSError as e:
            return _Read(name, problem=f"{name}: cannot be read: {e.strerror}")
        with lock:
            labels[split][label] += 1
        return _inspect(name, jpg, what="member")

    if items:
        import nvidia.dali  # noqa: F401 - imported before the clock starts (about a second)

        start = time.perf_counter()
        progress = Progress("check: decoded", len(items), stream=stream)
        try:
            problems, notes, report.decoded = _decode_all(items, read, report.workers, progress=progress)
        finally:
            for files in opened:
                files.close()
        report.decode_seconds = time.perf_counter() - start
        report.problems += problems
        report.notes += notes
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
