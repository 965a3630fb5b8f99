r"""Pack an ImageNet-layout tree into WebDataset tar shards with DALI index files, for shared filesystems.

    python -m data_pipeline pack /datasets/imagenet /datasets/imagenet-shards            # 1 GB shards, both splits
    python -m data_pipeline pack data/demo data/demo-shards --shard-size 500MB --split train --seed 0

Layout of OUT:

    OUT/manifest.json                     format version, classes, per split: options, shards (samples, bytes,
                                          sha256) and totals
    OUT/train/shard-000000.tar            WebDataset samples: <key>.jpg (the source file's bytes, unchanged) and
    OUT/train/shard-000000.idx            <key>.cls (the label as ASCII text); the .idx is DALI's wds2idx index
    OUT/val/...                           ("v1.2 <samples>", then per sample "<ext> <data offset> <size> <name>"
                                          for each component), for ``fn.readers.webdataset(index_paths=...)``

Labels are indices into the class list (sorted wnids: ``data_pipeline.layout``'s order, torchvision ImageFolder's).
Train samples are shuffled across classes at pack time (``random.Random(seed)``); val keeps every image exactly
once in folder order. A shard closes before the sample that would take it over ``--shard-size`` bytes (a shard
always holds at least one sample). Keys are ``<position in the split>_<source file stem>`` (characters other than
letters, digits, ``-`` and ``_`` replaced by ``_``), unique in the split.

Every core: shards are written by worker processes (``workers``, default every core this process may use), each
writing whole shards (tar, index) from the plan the parent made, so the shards are the same whatever the number
of workers. The manifest is written at the start and end of each split; a shard finished in between is one line
appended to ``OUT/manifest.journal`` (folded into the manifest when the split ends, or by the next pack).

Resumable: each shard is written under a temporary name, renamed, then recorded (journal, then manifest). Packing
again into the same OUT skips recorded shards and redoes any other (truncated, altered, missing), one line each:
a recorded shard whose size, mtime and first and last 64 KiB match its record is trusted without being read in
full (the line says so; ``check`` reads every byte), one whose mtime differs is re-hashed (sha256 against the
record). An OUT packed from other inputs (file list, sizes, mtimes, labels) or other options (--shard-size,
--seed) is refused in one line. The tar members are written with fixed metadata (mtime 0, mode 0644), so the
same inputs give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from data_pipeline.layout import DataError, index_split
from train.files import atomic_write_text

__all__ = ["FORMAT_VERSION", "PackError", "PackSummary", "default_workers", "pack", "parse_size"]

FORMAT_VERSION = 1
BLOCK = 512  # tar block size
ENDS = 1 << 16  # bytes at each end of a shard that a resumed pack hashes (with size and mtime) to trust it
JOURNAL = "manifest.journal"  # shards finished since the manifest was last written, one JSON line each
SPLITS = ("train", "val")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class PackError(DataError):
    """A pack that cannot be done (bad option, an OUT made from other inputs), described in one line."""


def parse_size(text: str) -> int:
    """Bytes in ``1GB``, ``500MB``, ``10KB``, ``64MiB``, ``123`` (KB/MB/GB/TB: powers of 1000; KiB/MiB/GiB/TiB:
    of 1024). Raises ``PackError`` for anything else or a size under one tar block (512 bytes)."""
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise PackError(f"--shard-size {text!r} is not a size like 1GB, 500MB, 10KB or 64MiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < BLOCK:
        raise PackError(f"--shard-size {text!r} is under one tar block ({BLOCK} bytes)")
    return size


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@dataclass(frozen=True)
class _Sample:
    path: str  # source file
    rel: str  # path below the split folder, for the fingerprint
    size: int
    label: int
    key: str

    @property
    def cls(self) -> bytes:
        return str(self.label).encode("ascii")

    @property
    def tar_bytes(self) -> int:
        """Bytes the sample takes in a tar: a header block and the padded data, per member."""
        return 2 * BLOCK + _padded(self.size) + _padded(len(self.cls))


def _key(position: int, path: str) -> str:
    stem = os.path.basename(path).split(".", 1)[0]
    # a dot starts the extension in WebDataset and a space separates fields in the DALI index: neither in keys;
    # the stem is cut so a member name stays under ustar's 100 characters
    return f"{position:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)[:60]}"


def _plan_split(root: Path, split: str, seed: int) -> tuple[list[str], list[_Sample], str]:
    """(classes, samples in pack order, sha256 of the source listing in folder order)."""
    index = index_split(root, split)
    listing = hashlib.sha256()
    entries = []
    for path, label in index.samples:
        st = os.stat(path)
        rel = os.path.relpath(path, index.root)
        listing.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode())
        entries.append((path, rel, st.st_size, label))
    if split == "train":
        random.Random(seed).shuffle(entries)
    samples = [_Sample(p, rel, size, label, _key(i, p)) for i, (p, rel, size, label) in enumerate(entries)]
    return index.classes, samples, listing.hexdigest()


def _cut(samples: Sequence[_Sample], shard_size: int) -> list[list[_Sample]]:
    """Consecutive groups, each as many samples as fit in ``shard_size`` tar bytes (the two end blocks
    included), at least one."""
    shards: list[list[_Sample]] = []
    current: list[_Sample] = []
    used = 2 * BLOCK
    for s in samples:
        if current and used + s.tar_bytes > shard_size:
            shards.append(current)
            current, used = [], 2 * BLOCK
        current.append(s)
        used += s.tar_bytes
    if current:
        shards.append(current)
    return shards


def _index_text(shard: Sequence[_Sample]) -> str:
    """The shard's DALI index (wds2idx's format, v1.2): offsets follow from the sizes, as ``_write_shard`` lays
    the members out (a 512-byte header before each member's data)."""
    lines = [f"v1.2 {len(shard)}"]
    offset = 0
    for s in shard:
        jpg = offset + BLOCK
        cls = jpg + _padded(s.size) + BLOCK
        lines.append(f"jpg {jpg} {s.size} {s.key}.jpg cls {cls} {len(s.cls)} {s.key}.cls")
        offset += s.tar_bytes
    return "\n".join(lines) + "\n"


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    buf = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    assert len(buf) == BLOCK, name  # keys are short: one header block (what _index_text assumes)
    return buf


def _write_shard(shard: Sequence[_Sample], tmp: Path) -> str:
    """Write the tar to ``tmp``; returns its sha256. Raises PackError when a source file changed size."""
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:

        def put(b: bytes) -> None:
            digest.update(b)
            f.write(b)

        for s in shard:
            with open(s.path, "rb") as src:
                data = src.read()
            if len(data) != s.size:
                raise PackError(f"{s.path} changed while packing ({s.size} bytes listed, {len(data)} read)")
            for name, payload in ((f"{s.key}.jpg", data), (f"{s.key}.cls", s.cls)):
                put(_header(name, len(payload)))
                put(payload)
                put(b"\0" * (_padded(len(payload)) - len(payload)))
        put(b"\0" * (2 * BLOCK))
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _ends_sha256(path: Path) -> str:
    """sha256 of the file's first and last ``ENDS`` bytes (all of it when smaller): the cheap check a resumed
    pack makes on a shard whose size and mtime match its record, instead of reading it all."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(f.read(min(size, ENDS)))
        if size > ENDS:
            f.seek(max(ENDS, size - ENDS))
            digest.update(f.read())
    return digest.hexdigest()


def _pack_shard(folder: Path, i: int, shard: Sequence[_Sample]) -> dict[str, Any]:
    """Write shard ``i`` of a split (tar under a temporary name, its index, then the rename); returns its
    manifest record. Runs in a worker process: everything it needs comes in its arguments."""
    name, idx_name = f"shard-{i:06d}.tar", f"shard-{i:06d}.idx"
    tmp = folder / f".{name}.tmp"
    sha = _write_shard(shard, tmp)
    atomic_write_text(folder / idx_name, _index_text(shard))
    os.replace(tmp, folder / name)
    st = (folder / name).stat()
    return {
        "name": name,
        "index": idx_name,
        "samples": len(shard),
        "bytes": st.st_size,
        "sha256": sha,
        "mtime_ns": st.st_mtime_ns,
        "ends_sha256": _ends_sha256(folder / name),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class PackSummary:
    out: Path
    manifest: Path
    written: dict[str, int] = field(default_factory=dict)  # shards packed now, per split
    skipped: dict[str, int] = field(default_factory=dict)  # shards already complete
    trusted: dict[str, int] = field(default_factory=dict)  # of the skipped: not re-hashed (size, mtime, ends)
    redone: dict[str, int] = field(default_factory=dict)  # of the written: found truncated/altered
    images: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    seconds: float = 0.0


def _record(
    manifest: dict[str, Any], mpath: Path, entry: dict[str, Any], recorded: dict[int, dict], planned: int
) -> None:
    """Write the manifest with the split's shards recorded so far (at the start of a split and at its end; the
    journal holds the shards finished in between)."""
    entry["shards"] = [recorded[i] for i in sorted(recorded)]
    entry["bytes"] = sum(r["bytes"] for r in entry["shards"])
    entry["complete"] = len(recorded) == planned
    atomic_write_text(mpath, json.dumps(manifest, indent=1) + "\n")


def _load_manifest(out: Path) -> dict[str, Any] | None:
    path = out / "manifest.json"
    if not path.exists():
        if out.exists() and any(p.name not in SPLITS for p in out.iterdir()):
            raise PackError(f"{out} holds other files and no manifest.json: pack into an empty or new folder")
        return None
    try:
        manifest = json.loads(path.read_text())
        version = manifest["format_version"]
    except (ValueError, KeyError, TypeError):
        raise PackError(f"{path} is not a pack manifest: pack into an empty or new folder") from None
    if version != FORMAT_VERSION:
        raise PackError(
            f"{path} has format version {version}, this code writes {FORMAT_VERSION}: use a new OUT"
        )
    journal = out / JOURNAL
    if journal.exists():  # shards an interrupted pack finished after it last wrote the manifest
        for line in journal.read_text().splitlines():
            try:
                rec = json.loads(line)
                shards = manifest["splits"][rec.pop("split")].setdefault("shards", [])
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut by the kill, or for a split the manifest lacks: that shard is redone
            shards[:] = [s for s in shards if s.get("name") != rec.get("name")] + [rec]
    return manifest


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for k, what in (("source_sha256", "source files"), ("shard_size", "--shard-size"), ("seed", "--seed")):
        if old.get(k) != new.get(k):
            if k == "source_sha256":
                return f"other {what} (list, sizes, mtimes or labels: {old.get('images')} images there, {new['images']} here)"
            return f"other {what} ({old.get(k)} there, {new.get(k)} here)"
    return None


def _recorded_problem(tar: Path, rec: dict[str, Any]) -> tuple[str | None, bool]:
    """(what is wrong with a shard the manifest records, None if nothing; whether it was trusted without reading
    it all). A shard whose size, mtime and first/last ``ENDS`` bytes match its record is trusted; any other is
    re-hashed in full (and its record's mtime refreshed when the sha256 matches)."""
    try:
        st = tar.stat()
    except FileNotFoundError:
        return "missing", False
    if st.st_size != rec["bytes"]:
        return f"{st.st_size:,} bytes, {rec['bytes']:,} in the manifest (truncated or altered)", False
    if st.st_mtime_ns == rec.get("mtime_ns") and _ends_sha256(tar) == rec.get("ends_sha256"):
        return None, True
    if _sha256(tar) != rec["sha256"]:
        return "sha256 differs from the manifest's (altered)", False
    rec["mtime_ns"], rec["ends_sha256"] = st.st_mtime_ns, _ends_sha256(tar)
    return None, False


def default_workers() -> int:
    """The cores this process may run on (``sched_getaffinity``: SLURM's and taskset's limits, not the node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pack(
    root: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 10**9,
    splits: Iterable[str] = SPLITS,
    seed: int = 0,
    stream: TextIO | None = None,
    workers: int | None = None,
) -> PackSummary:
    """Pack ``root/{train,val}`` into ``out`` (see the module docstring); returns what was done. Shards are
    written by ``workers`` processes (default: every core this process may use; 1: in this process). Lines
    (skips, redone shards) and progress go to ``stream`` (stderr by default). Raises ``DataError``/``PackError``,
    one line, for a bad tree or an ``out`` packed from other inputs or options."""
    from data_pipeline.prepare import Progress

    stream = stream if stream is not None else sys.stderr
    start = time.perf_counter()
    root, out = Path(root), Path(out)
    workers = max(1, workers if workers is not None else default_workers())
    splits = [s for s in SPLITS if s in set(splits)]
    manifest = _load_manifest(out)
    plans: dict[str, tuple[list[list[_Sample]], dict[str, Any]]] = {}
    classes: list[str] | None = None
    for split in splits:
        split_classes, samples, listing = _plan_split(root, split, seed)
        if classes is not None and split_classes != classes:
            raise DataError(f"train/ and val/ class folders differ under {root}")
        classes = split_classes
        options = {
            "source_sha256": listing,
            "shard_size": shard_size,
            "seed": seed if split == "train" else None,
            "images": len(samples),
        }
        plans[split] = (_cut(samples, shard_size), options)
    assert classes is not None
    if manifest is None:
        manifest = {"format_version": FORMAT_VERSION, "classes": classes, "splits": {}}
    elif manifest.get("classes") != classes:
        raise PackError(
            f"{out} was packed with other classes ({len(manifest.get('classes') or [])} there, "
            f"{len(classes)} here): use another OUT or delete it"
        )
    for split, (_, options) in plans.items():
        old = manifest["splits"].get(split)
        why = old and _mismatch(old["options"], options)
        if why:
            raise PackError(f"{out / split} was packed from {why}: use another OUT or delete it")
    manifest["source"] = str(root.resolve())
    mpath, jpath = out / "manifest.json", out / JOURNAL
    summary = PackSummary(out, mpath, workers=workers)

    pool = None
    if workers > 1:
        # fork: the workers need nothing but their arguments, and start in milliseconds (spawn re-imports)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    try:
        for split, (shards, options) in plans.items():
            folder = out / split
            folder.mkdir(parents=True, exist_ok=True)
            old = manifest["splits"].get(split) or {}
            old_shards = {s["name"]: s for s in old.get("shards", [])}
            entry: dict[str, Any] = {
                "options": options,
                "shards": [],
                "planned_shards": len(shards),
                "images": sum(len(s) for s in shards),
                "bytes": 0,
                "complete": False,
            }
            manifest["splits"][split] = entry
            todo: list[int] = []
            recorded: dict[int, dict[str, Any]] = {}
            summary.skipped[split] = summary.redone[split] = summary.written[split] = 0
            summary.trusted[split] = 0
            for i, shard in enumerate(shards):  # pass 1: what is already complete
                name = f"shard-{i:06d}.tar"
                rec = old_shards.get(name)
                if rec is None:
                    todo.append(i)
                    continue
                problem, trusted = _recorded_problem(folder / name, rec)
                if problem:
                    print(f"{split}/{name}: {problem}; packing it again", file=stream, flush=True)
                    summary.redone[split] += 1
                    todo.append(i)
                    continue
                idx = folder / rec["index"]
                text = _index_text(shard)
                if not idx.exists() or idx.read_text() != text:
                    print(
                        f"{split}/{rec['index']}: missing or altered; writing it again",
                        file=stream,
                        flush=True,
                    )
                    atomic_write_text(idx, text)
                recorded[i] = rec
                summary.skipped[split] += 1
                summary.trusted[split] += trusted
            if summary.skipped[split]:
                hashed = summary.skipped[split] - summary.trusted[split]
                print(
                    f"{split}: {summary.skipped[split]:,} of {len(shards):,} shards already complete; skipped "
                    f"({summary.trusted[split]:,} trusted: size, mtime and first/last {ENDS // 1024} KiB match "
                    f"the manifest's record, not re-hashed; {hashed:,} re-hashed, sha256 matches)",
                    file=stream,
                    flush=True,
                )
            progress = Progress(f"pack {split}", sum(len(shards[i]) for i in todo), stream=stream)
            _record(manifest, mpath, entry, recorded, len(shards))
            jpath.unlink(missing_ok=True)  # now in the manifest
            if pool is None:
                results = ((i, _pack_shard(folder, i, shards[i])) for i in todo)
            else:
                futures = {pool.submit(_pack_shard, folder, i, shards[i]): i for i in todo}
                results = ((futures[f], f.result()) for f in as_completed(futures))
            with open(jpath, "a") as journal:
                for i, rec in results:  # in the order they finish
                    recorded[i] = rec
                    summary.written[split] += 1
                    journal.write(json.dumps({"split": split, **rec}) + "\n")
                    journal.flush()
                    progress.update(progress.done + rec["samples"])
            progress.close()
            _record(manifest, mpath, entry, recorded, len(shards))
            jpath.unlink(missing_ok=True)
            summary.images[split] = entry["images"]
            summary.bytes[split] = entry["bytes"]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    summary.seconds = time.perf_counter() - start
    return summary
