"""Verify an ImageNet root before training: folders, class lists, counts, and every image decoded.

    python -m data_pipeline check /datasets/imagenet                # exit 0: sound; 1: problems listed
    python -m data_pipeline check /datasets/imagenet --workers 16   # decoder threads (default: all cores)
    python -m data_pipeline check /datasets/imagenet --full         # also require the full ILSVRC2012 sizes

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
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from data_pipeline.layout import NestedDirCheck
from data_pipeline.prepare import Progress

__all__ = [
    "FULL_CLASSES",
    "FULL_COUNTS",
    "FULL_VAL_PER_CLASS",
    "IMG_EXTENSIONS",
    "CheckReport",
    "Note",
    "check_root",
    "decode_files",
]

FULL_CLASSES = 1000
FULL_COUNTS = {"train": 1_281_167, "val": 50_000}
FULL_VAL_PER_CLASS = 50
SPLITS = ("train", "val")
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
    """Result of ``check_root``: sound when ``problems`` is empty."""

    root: Path
    classes: dict[str, list[str]] = field(default_factory=dict)  # split -> sorted class folders
    counts: dict[str, int] = field(default_factory=dict)  # split -> image files
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> image files
    problems: list[str] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    decoded: int = 0  # images that decoded
    decode_seconds: float = 0.0
    workers: int = 0

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
            report.problems.append(
                f"--full: val/{cls}/ has {n} images, ILSVRC2012 has {FULL_VAL_PER_CLASS} per class"
            )


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class _Read:
    rel: str
    data: bytes | None = None  # None: not sent to the decoder (problem set)
    problem: str = ""
    note: Note | None = None


def _what_is(data: bytes) -> str | None:
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _read(root: Path, rel: str) -> _Read:
    """Read one file and look at its header (PIL reads the header only) for the notes."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = (root / rel).read_bytes()
    except OSError as e:
        why = (
            "broken symbolic link" if (root / rel).is_symlink() and not (root / rel).exists() else e.strerror
        )
        return _Read(rel, problem=f"cannot be read: {why}")
    if not data:
        return _Read(rel, problem="empty file (0 bytes)")
    out = _Read(rel, data)
    fmt = _what_is(data)
    if fmt is None:
        out.data = None
        out.problem = f"not an image: no known image header (starts with {data[:12]!r})"
        return out
    if fmt == "GIF":  # not for DALI's decoder: it cannot decode GIF, and 2.4's CPU decoder may crash on one
        out.data = None
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as e:  # UnidentifiedImageError's message names the BytesIO object: not worth a line
            why = "PIL cannot identify it" if isinstance(e, UnidentifiedImageError) else f"PIL says {e}"
            out.problem = f"GIF data that does not decode (truncated or corrupt): {why.splitlines()[0]}"
        else:
            out.problem = (
                "GIF data (PIL reads it, DALI cannot decode GIF: convert it to JPEG or use "
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
    batch_size = batch_size or max(32, 4 * workers)
    ahead = min(workers + 2, max(2, 2048 // batch_size))
    problems: list[str] = []
    notes: list[Note] = []
    decoded = done = 0
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]

    def read_batch(rels: list[str]) -> list[_Read]:
        return [_read(root, r) for r in rels]

    with (
        tempfile.TemporaryFile() as sink,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check-read") as pool,
    ):
        decoder = _Decoder(batch_size, workers, sink)
        pending: deque[Future] = deque()
        it = iter(batches)
        for rels in it:
            pending.append(pool.submit(read_batch, rels))
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
                    problems.append(f"{r.rel}: {r.problem}")
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
    if workers is None:  # the cores this process may use (a SLURM allocation), not the whole node
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    report.workers = workers
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
