r"""Reading a pack (``python -m data_pipeline pack``, ``data_pipeline.shards``): ``data.format=shards``.

    index = open_shards("/datasets/imagenet-shards", "train")   # manifest + index files, checked; DataError if bad
    orders = index.epoch_order(seed=0, epoch=3, world_size=8)   # per-rank sample ids of epoch 3
    jpeg, label = index.read(i, files)                          # one pread at the sample's offset

A source format is a reader inside each backend (``dali_backend`` reads a pack with ``fn.readers.webdataset``,
``torchvision_backend`` with ``os.pread``), both from this module's one sample table and one epoch order, so both
backends visit the same images in the same order, as they do on folders.

Why read by offset, not stream the tars: the pack's index files (DALI's wds2idx format) give every member's
offset, so a sample is one positioned read in a tar kept open. The shared filesystem sees each shard opened
once per reader (a few hundred files for ImageNet instead of 1.33 M opens an epoch), and the sharding stays exact:
every rank reads exactly ``N // W`` samples and runs ``(N // W) // batch`` steps, validation reads each image
once. Streaming a tar (the ``webdataset`` package, ``tarfile``) reads members in tar order only, so an epoch's
order would be a shard order plus a shuffle buffer, and exactness per rank needs the same bookkeeping anyway;
no new dependency either.

Epoch order (train), a function of (seed, epoch), the same on every rank and in both backends:

1. one ``torch.Generator`` seeded with ``seed + epoch`` (as ``DistributedSampler``) draws a permutation of the
   shards, then one permutation of each shard's samples (in shard order);
2. the shards in their permuted order, each's samples in their permuted order, make one sequence of N ids;
3. rank r takes positions ``[r·n, (r+1)·n)`` of it, ``n = N // W`` (the last ``N mod W`` ids sit out the epoch).

The pack's samples were shuffled across classes at pack time, so a shard is a random subset of the dataset and a
batch drawn from one or two shards is a random batch; what stays fixed across epochs is which ~shard-sized group
of images travels together (a batch's images always come from the same one or two shards). A rank's block is a
run of whole shards (cut at its two ends), so each rank opens only ~``n / samples_per_shard + 2`` tars.

Val: the pack keeps folder order, so rank r reads ids ``[N·r // W, N·(r+1) // W)`` (``base.val_shard``): the
same images as the folder run's rank r, each exactly once.

Labels: each sample's ``.cls`` member (ASCII digits) is read with it and checked against the manifest's class
count. Errors (``DataError``, one line naming the shard and the member): no manifest, an incomplete pack, a
missing shard or index file, an empty shard, an index line without ``.jpg`` or ``.cls``, a member past the end of
its tar (cut mid-member), a shard whose size or sample count is not the manifest's, a label out of range.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipeline.layout import DataError, cached_arrays

if TYPE_CHECKING:  # imported where used: `check` reads packs in worker processes that need no torch (seconds)
    import torch

__all__ = [
    "MANIFEST",
    "SHARD_CHECK_HINT",
    "ShardFiles",
    "ShardIndex",
    "is_pack",
    "load_manifest",
    "open_shards",
    "parse_labels",
]

MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"  # the pack writes wds2idx's v1.2 (with member names)
PACK_HINT = "`python -m data_pipeline pack SRC OUT` again finishes or repairs it"
SHARD_CHECK_HINT = "`python -m data_pipeline check PACK` checks every sample"


def is_pack(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds a pack's manifest (what ``data.format=shards`` reads)."""
    return (Path(root) / MANIFEST).is_file()


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The pack's manifest; ``DataError`` (one line) when there is none or it is not one."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = (
            "it holds train/ or val/ folders: data.format=folder reads those"
            if (root / "train").is_dir() or (root / "val").is_dir()
            else "make one with `python -m data_pipeline pack SRC OUT`"
        )
        raise DataError(f"data.format=shards but {root} has no {MANIFEST} ({hint})")
    try:
        manifest = json.loads(path.read_text())
        manifest["classes"], manifest["splits"]  # the keys a reader needs
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not a pack manifest (python -m data_pipeline pack writes one)") from None
    return manifest


def index_lines(text: str, where: str) -> list[list[tuple[str, int, int, str]]]:
    """The sample lines of an index file's ``text``: per line its components, ``(ext, offset, size, member)``.
    ``DataError`` naming ``where`` (``split/shard-XXXXXX.idx``) and the line for a bad header or line."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise DataError(f"{where}: not a {INDEX_VERSION} index file (first line {lines[:1]})")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) % 4:
            raise DataError(f"{where} line {n}: not '<ext> <offset> <size> <name>' fields")
        try:
            out.append(
                [
                    (parts[j], int(parts[j + 1]), int(parts[j + 2]), parts[j + 3])
                    for j in range(0, len(parts), 4)
                ]
            )
        except ValueError:
            raise DataError(f"{where} line {n}: offset or size is not a number") from None
    return out


def _parse_index(idx: Path, tar_name: str, split: str) -> np.ndarray:
    """The (n, 4) table (jpg offset, jpg size, cls offset, cls size) of one index file; DataError naming the
    shard and member for a bad one."""
    where = f"{split}/{tar_name}"
    try:
        text = idx.read_text()
    except FileNotFoundError:
        raise DataError(f"{split}/{idx.name}: missing index file of {where}; {PACK_HINT}") from None
    head = text.split("\n", 1)[0].split()
    count = int(head[1]) if len(head) == 2 and head[0] == INDEX_VERSION and head[1].isdigit() else -1
    tokens = text.split()[2:]
    if (
        count > 0
        and len(tokens) == 8 * count
        and set(tokens[0::8]) == {"jpg"}
        and set(tokens[4::8]) == {"cls"}
    ):
        try:  # the pack's own layout, one "jpg <off> <size> <name> cls <off> <size> <name>" line a sample: fast
            cols = [np.fromiter(map(int, tokens[j::8]), dtype=np.int64, count=count) for j in (1, 2, 5, 6)]
            return np.stack(cols, axis=1)
        except ValueError:
            pass  # the line by line parse below names the bad line
    lines = index_lines(text, f"{split}/{idx.name}")
    if not lines or count == 0:
        raise DataError(f"{where}: empty shard (its index lists no samples)")
    if len(lines) != count:
        raise DataError(f"{split}/{idx.name}: says {count} samples, lists {len(lines)}")
    rows = np.empty((count, 4), dtype=np.int64)
    for n, comps in enumerate(lines):
        by_ext = {ext: (offset, size) for ext, offset, size, _ in comps}
        for ext in ("jpg", "cls"):
            if ext not in by_ext:
                stem = comps[0][3].rsplit(".", 1)[0] if comps else f"sample {n + 1}"
                raise DataError(f"{where}: sample {stem} has no .{ext} member (index line {n + 2})")
        rows[n] = [*by_ext["jpg"], *by_ext["cls"]]
    return rows


def member_names(index_path: str | os.PathLike) -> list[str]:
    """The ``.jpg`` member names of a shard, in index order (for error messages; read when one is needed)."""
    lines = index_lines(Path(index_path).read_text(), str(index_path))
    return [next((name for ext, _, _, name in comps if ext == "jpg"), "?") for comps in lines]


class ShardFiles:
    """Open tar files, by shard id: each opened once (per process), kept open. ``opened`` counts the opens."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._fds: dict[int, int] = {}
        self.opened = 0

    def fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
            self.opened += 1
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # handed to worker processes without the parent's descriptors
        return {"paths": self.paths, "_fds": {}, "opened": 0}


class ShardOf:
    """``shard_of[ids]``: the shard of sample id(s) ``ids`` (an int or an array), found in the shards' first ids
    (``starts``) instead of a per-sample array (10 MB at ImageNet's 1.28 M, built by every rank)."""

    def __init__(self, starts: np.ndarray) -> None:
        self.starts = starts

    def __getitem__(self, ids: Any) -> Any:
        n = int(self.starts[-1])
        if np.any((np.asarray(ids) < 0) | (np.asarray(ids) >= n)):
            raise IndexError(f"sample id out of range [0, {n})")
        return np.searchsorted(self.starts, ids, side="right") - 1


class ShardIndex:
    """One split of a pack: quacks like ``layout.SplitIndex`` for the loaders (``root``, ``classes``, ``len``)
    and adds the sample table (shard of each sample, offsets) and the epoch order (module docstring)."""

    def __init__(
        self, root: Path, split: str, classes: list[str], names: list[str], shard_rows: list[np.ndarray]
    ) -> None:
        rows = np.concatenate(shard_rows) if shard_rows else np.empty((0, 4), np.int64)
        self._set(root, split, classes, names, rows, np.array([len(r) for r in shard_rows], dtype=np.int64))

    @classmethod
    def from_table(
        cls, root: Path, split: str, classes: list[str], names: list[str], rows: np.ndarray, sizes: np.ndarray
    ) -> ShardIndex:
        """The split from its sample table (``rows``, possibly memory-mapped) and the shards' sample counts."""
        index = cls.__new__(cls)
        index._set(root, split, classes, names, rows, np.asarray(sizes, dtype=np.int64))
        return index

    def _set(
        self,
        root: Path,
        split: str,
        classes: list[str],
        names: list[str],
        rows: np.ndarray,
        sizes: np.ndarray,
    ) -> None:
        self.root = root
        self.split = split
        self.classes = classes
        self.names = names  # tar file names, manifest order
        self.tar_paths = [str(root / split / n) for n in names]
        self.index_paths = [str(root / split / (n[: -len(".tar")] + ".idx")) for n in names]
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # sample id of each shard's first sample
        self.rows = (
            rows  # (N, 4): jpg offset, jpg size, cls offset, cls size; a rank reads only its samples' rows
        )
        self.shard_of = ShardOf(self.starts)  # shard_of[ids]: the shard of sample id(s) ids

    def __getstate__(self) -> dict[str, Any]:
        """A table mapped from a file (``open_shards``' cache) reaches a worker process as the file's name, and
        the worker maps the same pages; an in-memory one is copied."""
        state = dict(self.__dict__)
        filename = getattr(self.rows, "filename", None)
        if filename:
            state["rows"] = ("mapped", filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rows = state["rows"]
        if isinstance(rows, tuple):
            state["rows"] = np.load(rows[1], mmap_mode="r")
        self.__dict__.update(state)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def samples(self) -> list[tuple[str, int]]:
        raise AttributeError("a pack has no per-image files: read samples with ShardIndex.read")

    # ------------------------------------------------------------------------------------------ order

    def epoch_sequence(self, seed: int, epoch: int) -> np.ndarray:
        """All N sample ids in epoch ``epoch``'s order (module docstring, steps 1-2)."""
        import torch

        g = torch.Generator()
        g.manual_seed(seed + epoch)
        shard_perm = torch.randperm(len(self.names), generator=g).numpy()
        within = [torch.randperm(int(n), generator=g).numpy() for n in self.sizes]
        return np.concatenate([self.starts[s] + within[s] for s in shard_perm])

    def epoch_order(self, seed: int, epoch: int, world_size: int) -> list[np.ndarray]:
        """Per-rank sample ids of a train epoch: rank r's block of ``N // world_size`` ids (module docstring)."""
        seq = self.epoch_sequence(seed, epoch)
        n = len(self) // world_size
        return [seq[r * n : (r + 1) * n] for r in range(world_size)]

    def runs(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``ids`` cut into maximal runs from one shard: (shard, ids) in order (DALI's (tar, index) pairs)."""
        if len(ids) == 0:
            return []
        cuts = np.flatnonzero(np.diff(self.shard_of[ids])) + 1
        return [(int(self.shard_of[p[0]]), p) for p in np.split(ids, cuts)]

    def index_text(self, ids: np.ndarray) -> str:
        """A v1.1 index (no member names) listing samples ``ids`` (all from one shard) in this order."""
        r = self.rows[ids]
        body = "\n".join(f"jpg {a} {b} cls {c} {d}" for a, b, c, d in r.tolist())
        return f"v1.1 {len(ids)}\n{body}\n"

    # --------------------------------------------------------------------------------------- reading

    def member(self, i: int) -> str:
        """``split/shard-XXXXXX.tar: <member>.jpg`` of sample ``i`` (reads that shard's index again)."""
        s = int(self.shard_of[i])
        try:
            name = member_names(self.index_paths[s])[i - int(self.starts[s])]
        except (OSError, IndexError):
            name = f"sample {i - int(self.starts[s]) + 1}"
        return f"{self.split}/{self.names[s]}: {name}"

    def read(self, i: int, files: ShardFiles) -> tuple[bytes, int]:
        """(JPEG bytes, label) of sample ``i``: one pread covering its .jpg and .cls members."""
        jpg_off, jpg_size, cls_off, cls_size = (int(x) for x in self.rows[i])
        start, end = min(jpg_off, cls_off), max(jpg_off + jpg_size, cls_off + cls_size)
        data = os.pread(files.fd(int(self.shard_of[i])), end - start, start)
        if len(data) != end - start:
            raise DataError(f"{self.member(i)} is cut short: the tar ends inside it; {PACK_HINT}")
        jpg = data[jpg_off - start : jpg_off - start + jpg_size]
        cls = data[cls_off - start : cls_off - start + cls_size]
        text = cls.decode("ascii", "replace")
        if not text.isdigit() or not 0 <= int(text) < len(self.classes):
            raise DataError(
                f"{self.member(i)}: its .cls holds {text[:20]!r}, not a label in [0, {len(self.classes)}) "
                f"({len(self.classes)} classes in the manifest)"
            )
        return jpg, int(text)


def _file_stat(path: str | os.PathLike) -> list[int]:
    st = os.stat(path)
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def open_shards(root: str | os.PathLike, split: str, cache: str | os.PathLike | None = None) -> ShardIndex:
    """The ``split`` of the pack at ``root``, checked: manifest complete, every shard and index file present,
    sizes and sample counts as the manifest says, every index line with a .jpg and a .cls member inside its tar.
    Raises ``DataError`` (one line naming the shard and member) otherwise. Labels are checked as samples are read.

    ``cache`` (a folder, the run folder's ``file_tables/``): the index files are read and checked by one process
    of the job, which writes the sample table there (``layout.cached_arrays``); the others map it (each touches
    only its samples' rows) while the manifest, every tar and every index file have the (inode, mtime_ns, size)
    they had when it was read. ``None``: read here, not shared."""
    root = Path(root)

    def valid(meta: dict[str, Any]) -> bool:
        if meta.get("root") != str(root) or meta["manifest"] != _file_stat(root / MANIFEST):
            return False
        return all(_file_stat(root / split / name) == st for name, st in meta["files"].items())

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        files: dict[str, list[int]] = {}
        manifest_stat = None
        with contextlib.suppress(OSError, DataError, KeyError, TypeError, AttributeError):  # before reading
            manifest_stat = _file_stat(root / MANIFEST)
            for rec in load_manifest(root)["splits"][split]["shards"]:
                for name in (rec["name"], rec["index"]):
                    files[name] = _file_stat(root / split / name)
        index = _read_shards(root, split)
        meta = {"root": str(root), "classes": index.classes, "names": index.names, "manifest": manifest_stat}
        return {"rows": index.rows, "sizes": index.sizes}, {**meta, "files": files}

    if cache is None:
        return _read_shards(root, split)
    arrays, meta = cached_arrays(cache, f"{split}-pack", valid, build)
    return ShardIndex.from_table(
        root, split, list(meta["classes"]), list(meta["names"]), arrays["rows"], arrays["sizes"]
    )


def _read_shards(root: Path, split: str) -> ShardIndex:
    """``open_shards`` without a cache: every index file read and checked here."""
    manifest = load_manifest(root)
    classes = list(manifest["classes"])
    entry = manifest["splits"].get(split)
    if entry is None:
        raise DataError(
            f"{root} holds no {split} split (packed with --split {', '.join(manifest['splits'])})"
        )
    shards = entry.get("shards") or []
    planned = entry.get("planned_shards", len(shards))
    if not entry.get("complete") or len(shards) != planned:
        raise DataError(
            f"{root / split}: the pack is incomplete ({len(shards)} of {planned} shards); {PACK_HINT}"
        )
    names, rows = [], []
    for rec in shards:
        tar = root / split / rec["name"]
        where = f"{split}/{rec['name']}"
        try:
            size = tar.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{where}: missing shard; {PACK_HINT}") from None
        table = _parse_index(root / split / rec["index"], rec["name"], split)
        ends = np.maximum(table[:, 0] + table[:, 1], table[:, 2] + table[:, 3])
        past = np.flatnonzero(ends > size)
        if len(past):
            k = int(past[0])
            name = member_names(root / split / rec["index"])[k]
            raise DataError(
                f"{where}: cut mid-member {name} (the tar ends at byte {size:,}, the member at {int(ends[k]):,}); "
                f"{PACK_HINT}"
            )
        if size != rec["bytes"] or len(table) != rec["samples"]:
            raise DataError(
                f"{where}: {size:,} bytes and {len(table):,} samples, the manifest says {rec['bytes']:,} and "
                f"{rec['samples']:,} (altered or from another pack); {PACK_HINT}"
            )
        names.append(rec["name"])
        rows.append(table)
    if not names:
        raise DataError(f"{root / split}: the pack lists no shards")
    index = ShardIndex(root, split, classes, names, rows)
    if len(index) != entry.get("images", len(index)):
        raise DataError(
            f"{root / split}: {len(index):,} samples in the shards, the manifest says {entry['images']:,}"
        )
    return index


def parse_labels(cls: torch.Tensor) -> torch.Tensor:
    """Labels from a (B, L) uint8 batch of ``.cls`` members zero-padded to L (DALI's output): ASCII digits,
    left-aligned. Returns int64 (B,); -1 where a row is not a number (the caller names the member)."""
    import torch

    cls = cls.to(torch.int64)
    digit = (cls >= 48) & (cls <= 57)
    pad = cls == 0
    value = torch.zeros(cls.shape[0], dtype=torch.int64, device=cls.device)
    for j in range(cls.shape[1]):
        value = torch.where(digit[:, j], value * 10 + (cls[:, j] - 48), value)
    ok = (digit | pad).all(1) & digit[:, 0] & ~(pad[:, :-1] & digit[:, 1:]).any(1)  # digits, then padding
    return torch.where(ok, value, torch.full_like(value, -1))
