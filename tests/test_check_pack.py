"""`python -m data_pipeline check PACK` (data_pipeline/check.py, check_pack) on a real JPEG tree packed into
several shards: a sound pack passes with the folder check's counts of its tree; each kind of damage is exit 1
with its problem lines, each naming the shard (and the member, where there is one)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.__main__ import main
from data_pipeline.check import MANIFEST, check_pack, check_root
from data_pipeline.demo import make_demo_dataset
from data_pipeline.shard_reader import MANIFEST as READER_MANIFEST
from data_pipeline.shard_reader import PACK_HINT
from data_pipeline.shards import pack
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    """(folder tree, its pack): 4 classes, 48 train / 20 val images with the greyscale, CMYK and PNG-named-.JPEG
    oddities, in 5 train and 2 val shards."""
    base = tmp_path_factory.mktemp("check_pack")
    root, out = base / "demo", base / "pack"
    make_demo_dataset(root, classes=4, train_per_class=12, val_per_class=5)
    pack(root, out, shard_size=60_000, stream=io.StringIO())
    return root, out


def run_check(capsys, root: Path, *args: str) -> tuple[int, list[str], str]:
    """(exit status, problem lines, stdout) of `python -m data_pipeline check ROOT --workers 2 ARGS`."""
    capsys.readouterr()
    status = main(["check", str(root), "--workers", "2", *args])
    out = capsys.readouterr().out
    return status, [ln[len("problem: ") :] for ln in out.splitlines() if ln.startswith("problem: ")], out


def test_a_sound_pack_passes_with_the_folder_checks_counts(trees, capsys):
    root, out = trees
    assert MANIFEST == READER_MANIFEST  # what the CLI looks for to call check_pack
    folder, packed = check_root(root, workers=2), check_pack(out, workers=2, stream=io.StringIO())
    assert folder.sound and packed.sound, packed.problems
    assert packed.pack and not folder.pack
    assert packed.counts == folder.counts == {"train": 48, "val": 20}
    assert packed.per_class == folder.per_class and packed.classes == folder.classes
    assert packed.decoded == folder.decoded == 68
    assert packed.shards == {"train": 5, "val": 2}
    kinds = lambda r: Counter(n.kind for n in r.notes if n.kind != "skipped")  # noqa: E731
    assert kinds(packed) == kinds(folder) and sum(kinds(packed).values()) > 0  # the oddities, found again
    assert all(re.fullmatch(r"(train|val)/shard-\d{6}\.tar: \d{8}_\S+\.jpg", n.path) for n in packed.notes)
    assert packed.read_bytes == sum(t.stat().st_size for t in out.glob("*/shard-*.tar"))

    status, problems, text = run_check(capsys, out)
    assert (status, problems) == (0, [])
    assert (
        "train: 48 images in 4 classes, 5 shards" in text and "val: 20 images in 4 classes, 2 shards" in text
    )
    assert f"OK: {out} is sound" in text
    status, _, text = run_check(capsys, root)  # and the folder check of the tree: the same counts
    assert status == 0
    assert "train: 48 images in 4 class folders" in text and "val: 20 images in 4 class folders" in text


def test_full_on_a_pack_is_the_folder_checks_full(trees):
    root, out = trees
    folder = check_root(root, workers=2, full=True)
    packed = check_pack(out, workers=2, full=True, stream=io.StringIO())
    assert (
        packed.problems[:4]
        == folder.problems[:4]
        == [
            "--full: train/ has 4 classes, ILSVRC2012 has 1,000",
            "--full: train/ has 48 images, ILSVRC2012 train has 1,281,167",
            "--full: val/ has 4 classes, ILSVRC2012 has 1,000",
            "--full: val/ has 20 images, ILSVRC2012 val has 50,000",
        ]
    )
    assert packed.problems[4:] == [
        p.replace("val/n", "val class n").replace("/ has", " has") for p in folder.problems[4:]
    ]
    assert len(packed.problems) == 8


# ------------------------------------------------------------------------------------------------ damage


def _first_sample(out: Path, split: str, shard: str) -> dict[str, tuple[int, int, str]]:
    """The first sample of a shard, read with tarfile: ext -> (data offset, size, member name)."""
    with tarfile.open(out / split / shard) as tar:
        first = tar.getmembers()[:2]
    return {m.name.rsplit(".", 1)[1]: (m.offset_data, m.size, m.name) for m in first}


def _manifest(out: Path, split: str, shard: str, **changes) -> None:
    """Set fields of one shard's manifest record (``images``: of the split)."""
    manifest = json.loads((out / MANIFEST).read_text())
    entry = manifest["splits"][split]
    entry["images"] += changes.pop("images", 0)
    next(r for r in entry["shards"] if r["name"] == shard).update(changes)
    (out / MANIFEST).write_text(json.dumps(manifest))


def _resha(out: Path, split: str, shard: str) -> None:
    _manifest(out, split, shard, sha256=hashlib.sha256((out / split / shard).read_bytes()).hexdigest())


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flipped_jpg_byte(out: Path) -> list[str]:
    """One byte of a JPEG's scan header (its component count) flipped: the decoder refuses it."""
    off, size, name = _first_sample(out, "val", "shard-000001.tar")["jpg"]
    tar = out / "val" / "shard-000001.tar"
    pos = off + tar.read_bytes()[off : off + size].index(b"\xff\xda") + 4
    _patch(tar, pos, bytes([tar.read_bytes()[pos] ^ 0xFF]))
    return [
        "val/shard-000001.tar: sha256 differs from the manifest's: not the bytes that were packed (altered or "
        f"damaged); {PACK_HINT}",
        f"val/shard-000001.tar: {name}: JPEG data that does not decode (truncated or corrupt): Bogus marker length",
    ]


def cls_out_of_range(out: Path) -> list[str]:
    """A .cls that says 9 with 4 classes, in a tar and manifest otherwise sound (same size, sha256 updated)."""
    sample = _first_sample(out, "val", "shard-000001.tar")
    assert sample["cls"][1] == 1  # a one-digit label: "9" takes its place
    _patch(out / "val" / "shard-000001.tar", sample["cls"][0], b"9")
    _resha(out, "val", "shard-000001.tar")
    return [
        f"val/shard-000001.tar: {sample['jpg'][2]}: its .cls holds '9', not a label in [0, 4) (4 classes in the "
        "manifest)"
    ]


def member_missing_from_index(out: Path) -> list[str]:
    """The index (and the manifest's counts) without the tar's first sample."""
    idx = out / "val" / "shard-000001.idx"
    head, _, *rest = idx.read_text().splitlines()
    idx.write_text("\n".join([f"v1.2 {int(head.split()[1]) - 1}", *rest]) + "\n")
    rec = json.loads((out / MANIFEST).read_text())["splits"]["val"]["shards"][1]
    _manifest(out, "val", "shard-000001.tar", samples=rec["samples"] - 1, images=-1)
    sample = _first_sample(out, "val", "shard-000001.tar")
    return [
        "val/shard-000001.tar: 2 member(s) that its index shard-000001.idx does not list: "
        f"{sample['jpg'][2]}, {sample['cls'][2]}"
    ]


def index_offset_wrong(out: Path) -> list[str]:
    """The index puts the first .jpg one block later than the tar does (the reader gets the wrong bytes)."""
    idx = out / "val" / "shard-000001.idx"
    lines = idx.read_text().splitlines()
    parts = lines[1].split()
    off, size, name = int(parts[1]), int(parts[2]), parts[3]
    parts[1] = str(off + 512)
    idx.write_text("\n".join([lines[0], " ".join(parts), *lines[2:]]) + "\n")
    return [
        f"val/shard-000001.tar: 1 member(s) where its index shard-000001.idx gives another data offset or size "
        f"than the tar: {name} (index: at byte {off + 512:,}, {size:,} bytes; tar: at byte {off:,}, {size:,} bytes)",
        f"val/shard-000001.tar: {name}: not an image: no known image header",
    ]


def index_names_another_member(out: Path) -> list[str]:
    """The index's first .cls entry under another name (same offset and size): each side has one the other lacks."""
    idx = out / "val" / "shard-000001.idx"
    lines = idx.read_text().splitlines()
    name = lines[1].split()[7]
    lines[1] = lines[1].replace(f" {name}", f" x{name}")
    idx.write_text("\n".join(lines) + "\n")
    return [
        f"val/shard-000001.tar: 1 member(s) that its index shard-000001.idx does not list: {name}; {PACK_HINT}",
        f"val/shard-000001.tar: 1 member(s) that its index shard-000001.idx lists are not in the tar: x{name}; "
        f"{PACK_HINT}",
    ]


def garbage_tar_header(out: Path) -> list[str]:
    """A member's header block overwritten (sha256 updated): tarfile would stop there without an error."""
    tar = out / "train" / "shard-000001.tar"
    with tarfile.open(tar) as t:
        before, hit = t.getmembers()[3:5]
    _patch(tar, hit.offset, b"x" * 512)
    _resha(out, "train", "shard-000001.tar")
    return [
        f"train/shard-000001.tar: not a readable tar (no tar header at byte {hit.offset:,}) after member "
        f"{before.name}; {PACK_HINT}"
    ]


def truncated_tar(out: Path) -> list[str]:
    tar = out / "train" / "shard-000002.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    return ["train/shard-000002.tar: cut mid-member "]  # named by open_shards; the rest of the line: below


def missing_idx(out: Path) -> list[str]:
    (out / "val" / "shard-000000.idx").unlink()
    return [f"val/shard-000000.idx: missing index file of val/shard-000000.tar; {PACK_HINT}"]


def missing_shard(out: Path) -> list[str]:
    (out / "val" / "shard-000000.tar").unlink()
    return [f"val/shard-000000.tar: missing shard; {PACK_HINT}"]


DAMAGE = [
    flipped_jpg_byte,
    cls_out_of_range,
    member_missing_from_index,
    index_offset_wrong,
    index_names_another_member,
    garbage_tar_header,
    truncated_tar,
    missing_idx,
    missing_shard,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_damage_is_exit_1_with_its_problem_lines(trees, tmp_path, capsys, damage):
    out = tmp_path / "pack"
    shutil.copytree(trees[1], out)
    expected = damage(out)
    status, problems, text = run_check(capsys, out)
    assert status == 1 and f"FAILED: {len(expected)} problem(s) in {out}" in text, text
    assert len(problems) == len(expected), problems
    for got, want in zip(problems, expected, strict=True):
        assert got.startswith(want), (got, want)
    if damage is truncated_tar:  # the sample the tar ends inside, by the intact tar's own member list
        size = (out / "train" / "shard-000002.tar").stat().st_size
        with tarfile.open(trees[1] / "train" / "shard-000002.tar") as tar:
            cut = next(m.name for m in tar.getmembers() if m.offset_data + m.size > size)
        assert problems[0].startswith(f"train/shard-000002.tar: cut mid-member {cut.rsplit('.', 1)[0]}."), (
            problems
        )
    if damage in (truncated_tar, missing_idx, missing_shard):  # open_shards refuses the split: it is not read
        split, other = ("train", "val") if damage is truncated_tar else ("val", "train")
        assert not [ln for ln in text.splitlines() if ln.startswith(f"{split}: ")], text
        assert f"{other}: " in text  # the other split is


def test_the_command_line_on_a_damaged_pack(trees, tmp_path):
    """`python -m data_pipeline check PACK` in its own process: the decoder's own log lines stay out of the output."""
    out = tmp_path / "pack"
    shutil.copytree(trees[1], out)
    expected = flipped_jpg_byte(out)
    done = run_cli("-m", "data_pipeline", "check", str(out), "--workers", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert [ln for ln in done.stdout.splitlines() if ln.startswith("problem: ")] == [
        f"problem: {p}" for p in expected
    ]
    assert "[ERROR]" not in done.stdout + done.stderr
