"""`check --quick` and the check's worker processes (data_pipeline/check.py) on real JPEG trees and packs: quick
finds what full finds of the damage a header shows (empty, not an image, unreadable, truncated, a broken frame
header), with the same notes and counts; the worker processes give what this process's threads give; the fast
tar walk sees the members tarfile sees."""

from __future__ import annotations

import io
import mmap
import shutil
import tarfile
from pathlib import Path

import pytest

from data_pipeline import check
from data_pipeline.__main__ import main
from data_pipeline.check import check_pack, check_root
from data_pipeline.shards import pack


def _damage(root: Path) -> dict[str, str]:
    """Damage a copy of a demo tree; {path: words its quick problem line holds}."""
    files = sorted((root / "train" / "n99000000").iterdir()) + sorted((root / "val" / "n99000001").iterdir())
    jpegs = [p for p in files if p.read_bytes()[:3] == b"\xff\xd8\xff"]
    cut, empty, sof, first = jpegs[1], jpegs[2], jpegs[3], jpegs[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    empty.write_bytes(b"")
    data = bytearray(sof.read_bytes())
    at = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    data[at] = 0x00  # the frame header's marker gone
    sof.write_bytes(bytes(data))
    first.write_text("<html>this download failed</html>\n")  # the class's first file: another one is decoded
    (root / "val" / "n99000001" / "gone.JPEG").symlink_to(root / "nothing.JPEG")
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    return {
        rel(cut): "(truncated)",
        rel(empty): "empty file (0 bytes)",
        rel(sof): "bad header",
        rel(first): "not an image",
        "val/n99000001/gone.JPEG": "cannot be read: broken symbolic link",
    }


@pytest.fixture(scope="module")
def damaged(small_tree, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("quick") / "data"
    shutil.copytree(small_tree, root)
    return root, _damage(root)


def _paths(report) -> set[str]:
    return {p.split(": ", 1)[0] for p in report.problems}


def test_quick_finds_what_full_finds_in_headers(damaged, capsys):
    root, expected = damaged
    full = check_root(root, workers=2)
    quick = check_root(root, workers=2, quick=True)
    assert _paths(quick) == _paths(full) == set(expected)
    for path, words in expected.items():
        assert any(p.startswith(f"{path}: ") and words in p for p in quick.problems), (path, quick.problems)
    assert sorted(quick.notes, key=repr) == sorted(full.notes, key=repr) and quick.notes
    assert (quick.counts, quick.per_class) == (full.counts, full.per_class)
    assert quick.looked == sum(full.counts.values()) and full.looked == 0
    assert quick.decoded == 8  # one per class folder of each split, the broken first file passed over
    assert main(["check", str(root), "--quick", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert (
        f"--quick: looked at {quick.looked} image headers" in out
        and "decoded 8 images (one per class)" in out
    )


def test_worker_processes_give_what_threads_give(damaged, monkeypatch):
    root, _ = damaged
    threads = [check_root(root, workers=2, quick=q) for q in (True, False)]
    monkeypatch.setattr(check, "PROCESS_MIN", 1)
    procs = [check_root(root, workers=2, quick=q) for q in (True, False)]
    for t, p in zip(threads, procs, strict=True):
        assert p.processes and not t.processes
        assert (p.problems, p.notes, p.decoded, p.looked) == (t.problems, t.notes, t.decoded, t.looked)


@pytest.fixture(scope="module")
def packed(small_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick_pack") / "pack"
    pack(small_tree, out, shard_size=50_000, stream=io.StringIO(), workers=1)
    return out


def test_quick_on_a_pack(packed, monkeypatch):
    full = check_pack(packed, workers=2, stream=io.StringIO())
    quick = check_pack(packed, workers=2, quick=True, stream=io.StringIO())
    assert full.sound and quick.sound, quick.problems
    assert (quick.counts, quick.per_class, quick.shards) == (full.counts, full.per_class, full.shards)
    assert sorted(quick.notes, key=repr) == sorted(full.notes, key=repr) and quick.notes
    assert quick.decoded == 8 and full.decoded == sum(full.counts.values())
    members = 2 * sum(quick.counts.values())  # .jpg and .cls
    assert quick.read_bytes == (members + sum(quick.shards.values())) * 512  # header blocks and one end block
    monkeypatch.setattr(check, "PROCESS_MIN_BYTES", 0)
    procs = check_pack(packed, workers=2, stream=io.StringIO())
    assert procs.read_processes and procs.sound and procs.read_bytes == full.read_bytes


def test_the_fast_walk_sees_the_members_tarfile_sees(packed):
    for tar in sorted(packed.glob("*/shard-*.tar")):
        with tarfile.open(tar) as t:
            want = {m.name: (m.offset_data, m.size) for m in t.getmembers()}
        with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            assert check._walk(buf, len(mm)) == want
            assert check._walk(buf[: len(mm) - 1024], len(mm) - 1024) is None  # no end blocks
            buf.release()


def test_quick_on_a_damaged_pack_names_the_damage(packed, tmp_path):
    out = tmp_path / "pack"
    shutil.copytree(packed, out)
    tar = next((out / "val").glob("shard-*.tar"))
    tar.write_bytes(tar.read_bytes()[:-3000])  # cut: the size and a member
    quick = check_pack(out, workers=2, quick=True, stream=io.StringIO())
    full = check_pack(out, workers=2, stream=io.StringIO())
    assert quick.problems == full.problems and any("cut mid-member" in p for p in quick.problems)


def test_a_packs_full_check_in_worker_processes_gives_what_threads_give(packed, tmp_path, monkeypatch):
    """Every sample of a pack decoded by worker processes (each opening the pack's index once): the same problems,
    notes, decoded count and label counts as this process's threads."""
    out = tmp_path / "pack"
    shutil.copytree(packed, out)
    tar = sorted((out / "train").glob("shard-*.tar"))[0]
    with tarfile.open(tar) as t:
        a, b = [m for m in t.getmembers() if m.name.endswith(".jpg")][:2]
    data = bytearray(tar.read_bytes())
    data[a.offset_data : a.offset_data + a.size] = bytes(a.size)  # not an image
    data[b.offset_data + 3 : b.offset_data + b.size] = bytes(b.size - 3)  # a JPEG's first bytes, then zeros
    tar.write_bytes(bytes(data))
    threads = check_pack(out, workers=2, stream=io.StringIO())
    monkeypatch.setattr(check, "PROCESS_MIN", 1)
    procs = check_pack(out, workers=2, stream=io.StringIO())
    assert procs.processes and not threads.processes
    assert (procs.problems, procs.notes, procs.decoded, procs.per_class) == (
        threads.problems,
        threads.notes,
        threads.decoded,
        threads.per_class,
    )
    assert any(a.name in p for p in procs.problems) and any(b.name in p for p in procs.problems), (
        procs.problems
    )
    assert procs.decoded == sum(procs.counts.values()) - 2 and procs.notes
