"""Packing into WebDataset shards (`python -m data_pipeline pack`, data_pipeline/shards.py), on a real demo JPEG
tree: layout, manifest, DALI index offsets, every image exactly once, the seeded train shuffle, shard-size
splitting, resuming (complete shards skipped, altered ones redone), refused mismatching reruns, bad CLI input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from data_pipeline.__main__ import main as data_pipeline_main
from data_pipeline.demo import make_demo_dataset
from data_pipeline.layout import index_split
from data_pipeline.shards import FORMAT_VERSION, PackError, pack, parse_size
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """4 classes, 48 train / 20 val images (incl. the demo's PNG, greyscale and CMYK oddities)."""
    root = tmp_path_factory.mktemp("shards_tree") / "data"
    make_demo_dataset(root, classes=4, train_per_class=12, val_per_class=5)
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _samples(out: Path, split: str) -> list[tuple[str, bytes, int]]:
    """(key, jpg bytes, label) of every sample in the split's shards, in shard then member order."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = []
    for rec in manifest["splits"][split]["shards"]:
        with tarfile.open(out / split / rec["name"]) as tar:
            members = tar.getmembers()
            for jpg, cls in zip(members[::2], members[1::2], strict=True):
                key = jpg.name.removesuffix(".jpg")
                assert cls.name == f"{key}.cls"
                label = int(tar.extractfile(cls).read().decode("ascii"))
                found.append((key, tar.extractfile(jpg).read(), label))
    return found


def _source(tree: Path, split: str) -> list[tuple[bytes, int]]:
    return [(Path(p).read_bytes(), label) for p, label in index_split(tree, split).samples]


@pytest.fixture(scope="module")
def packed(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "out"
    pack(tree, out, shard_size=parse_size("20KB"), seed=0, stream=io.StringIO())
    return out


def test_layout_and_manifest(tree, packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["classes"] == index_split(tree, "train").classes  # the loaders' (ImageFolder's) order
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        names = sorted(p.name for p in (packed / split).iterdir())
        n = entry["planned_shards"]
        assert n > 1 and entry["complete"]
        assert names == sorted(
            [f"shard-{i:06d}.tar" for i in range(n)] + [f"shard-{i:06d}.idx" for i in range(n)]
        )
        assert [r["name"] for r in entry["shards"]] == [f"shard-{i:06d}.tar" for i in range(n)]
        for rec in entry["shards"]:
            data = (packed / split / rec["name"]).read_bytes()
            assert (len(data), _sha(data)) == (rec["bytes"], rec["sha256"])
        assert sum(r["samples"] for r in entry["shards"]) == entry["images"] == len(index_split(tree, split))
        assert entry["bytes"] == sum(r["bytes"] for r in entry["shards"])
        assert (entry["options"]["seed"], entry["options"]["shard_size"]) == (
            0 if split == "train" else None,
            20000,
        )


def test_index_offsets_point_at_the_source_bytes(tree, packed):
    """wds2idx's format: "v1.2 <samples>", then per sample "<ext> <data offset> <size> <name>" per component."""
    sources = {_sha(data): label for data, label in _source(tree, "train") + _source(tree, "val")}
    for split in ("train", "val"):
        for idx in sorted((packed / split).glob("*.idx")):
            lines = idx.read_text().splitlines()
            tar = idx.with_suffix(".tar").read_bytes()
            head, rows = lines[0].split(), lines[1:]
            assert head == ["v1.2", str(len(rows))]
            with tarfile.open(idx.with_suffix(".tar")) as t:
                names = t.getnames()
            assert [f for r in rows for f in r.split()[3::4]] == names  # every member, in tar order
            for row in rows:
                ext, off, size, name, ext2, off2, size2, name2 = row.split()
                assert (ext, ext2) == ("jpg", "cls") and name.endswith(".jpg") and name2.endswith(".cls")
                jpg = tar[int(off) : int(off) + int(size)]
                label = int(tar[int(off2) : int(off2) + int(size2)])
                assert sources[_sha(jpg)] == label  # the source file's bytes, unchanged, and its label


def test_every_image_exactly_once(tree, packed):
    for split in ("train", "val"):
        got = sorted((_sha(data), label) for _, data, label in _samples(packed, split))
        assert got == sorted((_sha(data), label) for data, label in _source(tree, split))
        keys = [k for k, _, _ in _samples(packed, split)]
        assert len(set(keys)) == len(keys) and all("." not in k and " " not in k for k in keys)


def test_val_in_folder_order_train_shuffled_and_seeded(tree, packed, tmp_path):
    val = [(_sha(d), lab) for _, d, lab in _samples(packed, "val")]
    assert val == [(_sha(d), lab) for d, lab in _source(tree, "val")]
    train = [_sha(d) for _, d, _ in _samples(packed, "train")]
    folder = [_sha(d) for d, _ in _source(tree, "train")]
    assert train != folder
    first = [lab for _, _, lab in _samples(packed, "train")][:12]
    assert len(set(first)) > 1  # mixed across classes, not one class per shard
    pack(tree, tmp_path / "same", shard_size=20000, splits=["train"], seed=0, stream=io.StringIO())
    pack(tree, tmp_path / "other", shard_size=20000, splits=["train"], seed=1, stream=io.StringIO())
    assert [_sha(d) for _, d, _ in _samples(tmp_path / "same", "train")] == train
    other = [_sha(d) for _, d, _ in _samples(tmp_path / "other", "train")]
    assert other != train and sorted(other) == sorted(train)
    for rec_a, rec_b in zip(
        json.loads((packed / "manifest.json").read_text())["splits"]["train"]["shards"],
        json.loads((tmp_path / "same" / "manifest.json").read_text())["splits"]["train"]["shards"],
        strict=True,
    ):
        assert rec_a["sha256"] == rec_b["sha256"]  # same inputs: byte-identical shards


@pytest.mark.parametrize("size", ["10KB", "30KB", "1MB"])
def test_shard_size_splitting(tree, tmp_path, size):
    limit = parse_size(size)
    pack(tree, tmp_path / "o", shard_size=limit, splits=["val"], stream=io.StringIO())
    entry = json.loads((tmp_path / "o" / "manifest.json").read_text())["splits"]["val"]
    sizes = [r["bytes"] for r in entry["shards"]]
    counts = [r["samples"] for r in entry["shards"]]
    for n, b in zip(counts, sizes, strict=True):
        assert b <= limit or n == 1  # one sample bigger than the limit still gets a shard
    if size == "1MB":
        assert counts == [20]
    else:
        assert len(counts) > 1
        # greedy: a shard closed only because the next sample did not fit
        samples = [len(d) for _, d, _ in _samples(tmp_path / "o", "val")]
        start = 0
        for n, b in zip(counts[:-1], sizes[:-1], strict=True):
            start += n
            nxt = 1024 + -(-samples[start] // 512) * 512 + 512  # headers + data + the one-block .cls
            assert b + nxt > limit


def test_parse_size():
    assert [parse_size(s) for s in ("1GB", "500MB", "10KB", "64MiB", "4096", "1.5kb")] == [
        10**9,
        5 * 10**8,
        10**4,
        64 * 2**20,
        4096,
        1500,
    ]
    for bad in ("", "1XB", "-1GB", "1 G B", "100"):
        with pytest.raises(PackError):
            parse_size(bad)


def test_rerun_skips_complete_shards(tree, tmp_path):
    out = tmp_path / "o"
    pack(tree, out, shard_size=20000, stream=io.StringIO())
    files = sorted((out / "train").iterdir()) + sorted((out / "val").iterdir())
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    log = io.StringIO()
    s = pack(tree, out, shard_size=20000, stream=log)
    assert s.written == {"train": 0, "val": 0} and s.skipped["train"] > 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == before
    assert "already complete" in log.getvalue()


def test_altered_and_truncated_shards_are_redone(tree, tmp_path):
    out = tmp_path / "o"
    pack(tree, out, shard_size=20000, splits=["val"], stream=io.StringIO())
    manifest = json.loads((out / "manifest.json").read_text())
    good = {r["name"]: (out / "val" / r["name"]).read_bytes() for r in manifest["splits"]["val"]["shards"]}
    a, b = out / "val" / "shard-000000.tar", out / "val" / "shard-000001.tar"
    b_stat = (out / "val" / "shard-000002.tar").stat()
    a.write_bytes(good[a.name][: len(good[a.name]) // 2])  # truncated
    flipped = bytearray(good[b.name])
    flipped[700] ^= 0xFF  # altered, same size
    b.write_bytes(bytes(flipped))
    log = io.StringIO()
    s = pack(tree, out, shard_size=20000, splits=["val"], stream=log)
    lines = log.getvalue().splitlines()
    assert s.redone["val"] == s.written["val"] == 2
    assert any(ln.startswith("val/shard-000000.tar:") and "truncated" in ln for ln in lines)
    assert any(ln.startswith("val/shard-000001.tar:") and "sha256" in ln for ln in lines)
    assert {n: (out / "val" / n).read_bytes() for n in good} == good
    after = (out / "val" / "shard-000002.tar").stat()
    assert (after.st_ino, after.st_mtime_ns) == (b_stat.st_ino, b_stat.st_mtime_ns)
    assert not list((out / "val").glob("*.tmp")) and not list((out / "val").glob(".*.tmp"))


def test_mismatching_rerun_is_refused_in_one_line(tree, tmp_path):
    out = tmp_path / "o"
    pack(tree, out, shard_size=20000, splits=["train"], seed=0, stream=io.StringIO())
    for extra in (["--seed", "1"], ["--shard-size", "30KB"]):
        r = run_cli(
            "-m",
            "data_pipeline",
            "pack",
            str(tree),
            str(out),
            "--shard-size",
            "20KB",
            "--split",
            "train",
            *extra,
        )
        assert r.returncode == 1, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "use another OUT" in errors[0]
    # other inputs: one more image in a copy of the tree
    other = tmp_path / "tree"
    shutil.copytree(tree, other)
    src = next((other / "train").glob("*/*.JPEG"))
    shutil.copy2(src, src.with_name("extra.JPEG"))
    with pytest.raises(PackError, match="other source files"):
        pack(other, out, shard_size=20000, splits=["train"], seed=0, stream=io.StringIO())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(PackError, match="holds other files"):
        pack(tree, tmp_path / "junk", stream=io.StringIO())


@pytest.mark.parametrize(
    ("args", "status", "words"),
    [
        (["--shard-size", "big"], 2, "--shard-size"),
        (["--shard-size", "100"], 2, "under one tar block"),
        (["--split", "test"], 2, "--split"),
        (["--seed", "x"], 2, "--seed"),
        (["--seed", "-3"], 2, "--seed"),
        (["--workers", "0"], 2, "--workers"),
    ],
)
def test_bad_cli_input_one_line(tree, tmp_path, capsys, args, status, words):
    assert data_pipeline_main(["pack", str(tree), str(tmp_path / "o"), *args]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_missing_root_one_line(tmp_path, capsys):
    assert data_pipeline_main(["pack", str(tmp_path / "nope"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not exist" in err[0], err


def test_cli_pack_then_nothing_to_do(tree, tmp_path, capsys):
    out = tmp_path / "o"
    assert data_pipeline_main(["pack", str(tree), str(out), "--shard-size", "50KB"]) == 0
    assert data_pipeline_main(["pack", str(tree), str(out), "--shard-size", "50KB"]) == 0
    text = capsys.readouterr().out
    assert "nothing to do" in text.splitlines()[-1]


def test_dali_reads_the_shards(packed, tree):
    """DALI's own webdataset reader (CPU) with our index files yields every val image and label."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    manifest = json.loads((packed / "manifest.json").read_text())
    shards = manifest["splits"]["val"]["shards"]
    n = manifest["splits"]["val"]["images"]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=[str(packed / "val" / r["name"]) for r in shards],
            index_paths=[str(packed / "val" / r["index"]) for r in shards],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
        )
        return jpg, cls

    p = pipe()
    p.build()
    jpg, cls = p.run()
    got = [(_sha(bytes(jpg.at(i))), int(bytes(cls.at(i)).decode())) for i in range(n)]
    assert got == [(_sha(d), lab) for d, lab in _source(tree, "val")]


def _records(out: Path, split: str) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["splits"][split]["shards"]


def test_the_same_shards_from_one_worker_or_several(tree, packed, tmp_path):
    """Workers write whole shards from the parent's plan: their number changes nothing in the output."""
    pack(tree, tmp_path / "one", shard_size=20000, seed=0, stream=io.StringIO(), workers=1)
    for split in ("train", "val"):
        one, many = _records(tmp_path / "one", split), _records(packed, split)
        assert [(r["name"], r["samples"], r["sha256"]) for r in one] == [
            (r["name"], r["samples"], r["sha256"]) for r in many
        ]
        for r in one:
            assert (tmp_path / "one" / split / r["index"]).read_text() == (
                packed / split / r["index"]
            ).read_text()
    assert not (tmp_path / "one" / "manifest.journal").exists()


def test_resume_trusts_recorded_shards_and_rehashes_touched_ones(tree, tmp_path):
    out = tmp_path / "o"
    pack(tree, out, shard_size=20000, splits=["val"], stream=io.StringIO())
    log = io.StringIO()
    s = pack(tree, out, shard_size=20000, splits=["val"], stream=log)
    n = len(_records(out, "val"))
    assert s.skipped["val"] == s.trusted["val"] == n and s.written["val"] == 0
    assert f"{n:,} trusted" in log.getvalue() and "not re-hashed" in log.getvalue()
    # same bytes, other mtime: re-hashed, kept, and its record's mtime refreshed (trusted on the next run)
    shard = out / "val" / "shard-000001.tar"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = pack(tree, out, shard_size=20000, splits=["val"], stream=io.StringIO())
    assert (s.skipped["val"], s.trusted["val"], s.written["val"]) == (n, n - 1, 0)
    s = pack(tree, out, shard_size=20000, splits=["val"], stream=io.StringIO())
    assert s.trusted["val"] == n
    # altered within its first 64 KiB, mtime put back: the cheap check catches it
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    st = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    log = io.StringIO()
    s = pack(tree, out, shard_size=20000, splits=["val"], stream=log)
    assert (
        s.redone["val"] == s.written["val"] == 1 and "val/shard-000001.tar: sha256 differs" in log.getvalue()
    )


def test_an_interrupted_pack_resumes_from_its_journal(tree, tmp_path):
    """The manifest as a pack killed mid-split left it (written at the split's start) and the journal of the
    shards it finished since, the last line cut by the kill: those shards are kept, the cut one is redone."""
    out = tmp_path / "o"
    pack(tree, out, shard_size=20000, splits=["val"], stream=io.StringIO())
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["val"]
    done, n = entry["shards"], entry["planned_shards"]
    assert n >= 3
    entry["shards"], entry["complete"] = done[:1], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    lines = [json.dumps({"split": "val", **r}) for r in done[1:]]
    (out / "manifest.journal").write_text("\n".join([*lines[:-1], lines[-1][:40]]))
    before = {r["name"]: (out / "val" / r["name"]).stat().st_ino for r in done}
    s = pack(tree, out, shard_size=20000, splits=["val"], stream=io.StringIO())
    assert (s.skipped["val"], s.trusted["val"], s.written["val"]) == (n - 1, n - 1, 1)
    assert not (out / "manifest.journal").exists()

    def same(e: dict) -> dict:  # a rewritten shard has the same bytes, not the same mtime
        return {**e, "shards": [{k: v for k, v in r.items() if k != "mtime_ns"} for r in e["shards"]]}

    now = json.loads((out / "manifest.json").read_text())["splits"]["val"]
    assert same(now) == same({**entry, "shards": done, "complete": True})
    after = {r["name"]: (out / "val" / r["name"]).stat().st_ino for r in done}
    assert [k for k in before if before[k] != after[k]] == [done[-1]["name"]]
