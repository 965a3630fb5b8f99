"""Reading packs (data.format=shards; data_pipeline/shard_reader.py and both backends' readers), on real JPEG
trees packed by `python -m data_pipeline pack` into several shards: val from shards is the folder's val (same
images, same pixels, each once, per rank), train gives every rank the same steps and both backends the same
order, mid-epoch resume, files opened, class order from the manifest, and bad packs one line each."""

from __future__ import annotations

import gc
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import DataError, build_loader
from data_pipeline.base import train_steps, val_shard
from data_pipeline.demo import make_demo_dataset
from data_pipeline.shard_reader import ShardFiles, open_shards, parse_labels
from data_pipeline.shards import pack
from evaluate.evaluator import EvalOptions, run_evaluation
from tests.conftest import run_cli
from tests.test_loaders import BACKENDS, collect, make_cfg
from train.config import load_config
from train.engine import train

SHARD_SIZE = 60_000  # bytes: the trees below pack into 4-8 train shards and 3-4 val shards


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    """(folder tree, its pack): 5 classes, 55 train / 35 val images (neither divisible by 2 or 3), with the
    greyscale, CMYK and PNG-named-.JPEG oddities."""
    base = tmp_path_factory.mktemp("shard_reader")
    root = base / "demo"
    make_demo_dataset(root, classes=5, train_per_class=11, val_per_class=7, min_size=60, max_size=120)
    out = base / "pack"
    pack(root, out, shard_size=SHARD_SIZE, stream=io.StringIO())
    return root, out


def shard_cfg(out: Path, backend: str, *overrides: str, batch: int = 8):
    return make_cfg(out, backend, "data.format=shards", *overrides, batch=batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_the_demo_recipe_from_shards_and_evaluate_from_shards(trees, tmp_path, backend):
    """What the issue is checked by: one epoch of the demo recipe trained from the pack, evaluated from the pack
    by the CLI (--data at the pack): its counts equal the folder's evaluation of the same checkpoint, and the
    training loop's own validation."""
    root, out = trees
    run = tmp_path / "run"
    cfg = load_config("demo", [f"data.root={out}", "data.format=shards", f"data.backend={backend}",
                               f"run_dir={run}", "sched.epochs=1", "model.num_classes=5", "data.batch_size=8",
                               f"data.workers={int(backend == 'dali')}", "log.wandb_mode=disabled"])  # fmt: skip
    result = train(cfg)
    assert result["status"] == "done" and result["epoch"] == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 55 // 8 and rows[-1]["val_images"] == 35
    ckpt = run / "last.pth"
    if backend == "dali":  # the command line, as a user runs it (the default backend)
        proc = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(out), "--backend", backend,
                       "--json", str(tmp_path / "shards.json"))  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: outside the demo band (1 epoch): no error
        from_shards = json.loads((tmp_path / "shards.json").read_text())
    else:
        from_shards = run_evaluation(EvalOptions(checkpoint=str(ckpt), data=str(out), backend=backend)).record
    folder = run_evaluation(EvalOptions(checkpoint=str(ckpt), data=str(root), backend=backend)).record
    assert from_shards["data_format"] == "shards" and folder["data_format"] == "folder"
    for key in ("n_images", "correct1", "correct5"):
        assert from_shards[key] == folder[key], key
    assert from_shards["n_images"] == 35
    assert from_shards["top1_err"] == pytest.approx(rows[-1]["val_top1_err"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI device='mixed')")
def test_dali_gpu_val_from_shards_is_its_folder_val(trees):
    """nvJPEG from a pack: the same tensors as nvJPEG from the folder, on the device, labels included."""
    root, out = trees
    folder = collect(build_loader(make_cfg(root, "dali"), "val", device="cuda"))
    shards = collect(build_loader(shard_cfg(out, "dali"), "val", device="cuda"))
    assert shards[0].device.type == "cuda" and shards[1].device.type == "cuda"
    assert folder[2] == shards[2] and torch.equal(folder[1], shards[1]) and torch.equal(folder[0], shards[0])


def test_the_pack_has_several_shards(trees):
    _, out = trees
    train, val = open_shards(out, "train"), open_shards(out, "val")
    assert (len(train), len(val)) == (55, 35)
    assert len(train.names) >= 3 and len(val.names) >= 2, (train.names, val.names)
    assert train.classes == val.classes == sorted(p.name for p in (trees[0] / "train").iterdir())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_from_shards_is_the_folder_val(trees, backend, world_size):
    """Rank by rank the same images (bitwise the same tensors) and labels as the folder loader, each once."""
    root, out = trees
    seen = 0
    for rank in range(world_size):
        batch = 4 * world_size
        folder = build_loader(make_cfg(root, backend, batch=batch), "val", rank, world_size)
        shards = build_loader(shard_cfg(out, backend, batch=batch), "val", rank, world_size)
        assert shards.num_samples == folder.num_samples == len(val_shard(35, rank, world_size))
        assert len(shards) == len(folder) and shards.classes == folder.classes
        fx, fy, fs = collect(folder)
        sx, sy, ss = collect(shards)
        assert fs == ss and torch.equal(fy, sy) and torch.equal(fx, sx)
        seen += len(sy)
    assert seen == 35


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_order_same_steps_every_rank_and_in_both_backends(trees, world_size):
    """Every rank runs (N // W) // batch steps; the ranks' images are disjoint; both backends read the same
    labels in the same order; the order changes with the epoch and is a function of (seed, epoch)."""
    _, out = trees
    index = open_shards(out, "train")
    batch = 4
    steps = train_steps(55, world_size, batch)
    for epoch in (0, 1):
        orders = index.epoch_order(seed=3, epoch=epoch, world_size=world_size)
        assert all(len(o) == 55 // world_size for o in orders)
        flat = np.concatenate(orders)
        assert len(np.unique(flat)) == len(flat)
        labels = {}
        for backend in BACKENDS:
            for rank in range(world_size):
                cfg = shard_cfg(out, backend, "seed=3", "data.train_crop=32", batch=batch * world_size)
                loader = build_loader(cfg, "train", rank, world_size)
                assert len(loader) == steps
                loader.set_epoch(epoch)
                x, y, sizes = collect(loader)
                assert sizes == [batch] * steps and x.shape == (steps * batch, 3, 32, 32)
                labels[backend, rank] = y.tolist()
                loader.close()
        for rank in range(world_size):
            assert labels["dali", rank] == labels["torchvision", rank]
            expected = [_label(out, index, i) for i in orders[rank][: steps * batch]]
            assert labels["torchvision", rank] == expected
    e0, e1 = (index.epoch_order(3, e, 1)[0] for e in (0, 1))
    assert not np.array_equal(e0, e1) and np.array_equal(e0, index.epoch_order(3, 0, 1)[0])


def _label(out: Path, index, i: int) -> int:
    return index.read(int(i), ShardFiles(index.tar_paths))[1]


def test_a_rank_block_is_a_few_runs_of_whole_shards(trees):
    """Rank r's block is a run of shards (cut at its ends): DALI gets one (tar, index) pair per shard it reads,
    and the reader opens each tar once."""
    _, out = trees
    index = open_shards(out, "train")
    for world_size in (1, 2, 3):
        for order in index.epoch_order(0, 2, world_size):
            runs = index.runs(order)
            assert len({s for s, _ in runs}) == len(runs)  # no shard twice
            assert sum(len(r) for _, r in runs) == len(order)


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_start_batch_from_shards(trees, backend):
    """Mid-epoch resume from a pack: batches k.. are those of a full pass (torchvision: bitwise; DALI: bitwise
    when its pipeline state is handed back, the same labels otherwise)."""
    _, out = trees
    cfg = shard_cfg(out, backend, "data.train_crop=32", "seed=5", batch=6)
    loader = build_loader(cfg, "train", rank=1, world_size=2)
    steps = len(loader)
    assert steps == train_steps(55, 2, 3) == 9
    loader.set_epoch(1)
    full = []
    states = {}
    for k, batch in enumerate(loader, start=1):
        full.append(batch)
        states[k] = loader.state_dict()
    for k in (4, steps - 1):
        why = loader.set_epoch(1, start_batch=k, state=states[k])
        assert why is None
        part = list(loader)
        assert len(part) == steps - k
        for (x, y), (fx, fy) in zip(part, full[k:], strict=True):
            assert torch.equal(y, fy) and torch.equal(x, fx)
        why = loader.set_epoch(1, start_batch=k)  # no state: fast-forwarded, the same images in order
        part = list(loader)
        assert len(part) == steps - k
        assert all(torch.equal(y, fy) for (_, y), (_, fy) in zip(part, full[k:], strict=True))
        assert (why is None) == (backend == "torchvision")
    loader.close()


def test_torchvision_workers_open_each_shard_once(trees):
    """Workers keep their tars open: over two epochs each worker opens each shard of its reads once."""
    _, out = trees
    cfg = shard_cfg(out, "torchvision", "data.train_crop=32", "data.workers=0", batch=5)
    loader = build_loader(cfg, "train")
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        list(loader)
    files = loader._dl.dataset.files
    assert files.opened == len(open_shards(out, "train").names)
    loader.close()


def test_parse_labels():
    rows = [b"0", b"17", b"4", b"12345678", b"", b"1a", b"1 2", b"x"]
    t = torch.zeros(len(rows), 8, dtype=torch.uint8)
    for j, r in enumerate(rows):
        t[j, : len(r)] = torch.tensor(list(r), dtype=torch.uint8)
    assert parse_labels(t).tolist() == [0, 17, 4, 12345678, -1, -1, -1, -1]


def test_folder_format_on_a_pack_and_shards_format_on_a_folder(trees):
    root, out = trees
    with pytest.raises(DataError, match=r"is a pack .* set data.format=shards"):
        build_loader(make_cfg(out, "torchvision"), "val")
    with pytest.raises(DataError, match=r"has no manifest.json .* data.format=folder reads those"):
        build_loader(shard_cfg(root, "torchvision"), "val")


# ------------------------------------------------------------------------------------------------ bad packs


def _damaged(trees, tmp_path: Path) -> Path:
    out = tmp_path / "pack"
    shutil.copytree(trees[1], out)
    return out


def _rewrite_shard(out: Path, split: str, name: str, members) -> None:
    """Replace a shard by a tar of ``members`` [(name, bytes)], with its index as wds2idx writes it and the
    manifest updated (size, count): a pack made by another tool, sound in structure."""
    tar_path = out / split / name
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    lines, count = [], 0
    with tarfile.open(tar_path) as tar:
        samples: dict[str, list[str]] = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
        for parts in samples.values():
            lines.append(" ".join(parts))
            count += 1
    (out / split / name.replace(".tar", ".idx")).write_text(f"v1.2 {count}\n" + "\n".join(lines) + "\n")
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"][split]
    for rec in entry["shards"]:
        if rec["name"] == name:
            entry["images"] += count - rec["samples"]
            rec["samples"], rec["bytes"] = count, tar_path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))


def _members(out: Path, split: str, name: str) -> list[tuple[str, bytes]]:
    with tarfile.open(out / split / name) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _first_error(out: Path, backend: str, split: str = "val") -> str:
    """The one-line DataError of reading ``split`` of ``out``. The loader is closed and collected before this
    returns: the caller damages the tars next, and a DALI pipeline still prefetching from a tar it has mapped
    into memory dies of SIGBUS when that file is truncated under it (``pack`` itself never truncates a shard:
    it writes a new file and renames it over the old)."""
    loader = None
    try:
        loader = build_loader(shard_cfg(out, backend), split)
        list(loader)
    except DataError as e:
        text = str(e)
    else:
        pytest.fail(f"no DataError reading {split} of {out}")
    finally:
        if loader is not None:
            loader.close()
        loader = None
        gc.collect()
    assert "\n" not in text
    return text


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_packs_are_one_line_naming_shard_and_member(trees, tmp_path, backend):
    out = _damaged(trees, tmp_path)
    members = _members(out, "val", "shard-000001.tar")
    first = members[0][0].split(".")[0]

    # a label out of range: a sound tar whose first sample's .cls says 7 with 5 classes
    bad_label = [(n, b"7" if n == f"{first}.cls" else d) for n, d in members]
    _rewrite_shard(out, "val", "shard-000001.tar", bad_label)
    msg = _first_error(out, backend)
    assert f"val/shard-000001.tar: {first}.jpg" in msg and "'7'" in msg and "[0, 5)" in msg

    # samples without .cls
    _rewrite_shard(out, "val", "shard-000001.tar", [(n, d) for n, d in members if n.endswith(".jpg")])
    msg = _first_error(out, backend)
    assert msg.startswith(f"val/shard-000001.tar: sample {first} has no .cls member"), msg

    # an empty shard
    _rewrite_shard(out, "val", "shard-000001.tar", [])
    assert _first_error(out, backend).startswith("val/shard-000001.tar: empty shard"), msg

    # a missing index file
    shutil.rmtree(out)
    out = _damaged(trees, tmp_path)
    (out / "val" / "shard-000000.idx").unlink()
    assert _first_error(out, backend).startswith(
        "val/shard-000000.idx: missing index file of val/shard-000000"
    )

    # a tar cut mid-member
    tar = out / "train" / "shard-000002.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    msg = _first_error(out, backend, "train")
    assert msg.startswith("val/") is False and "train/shard-000002.tar: cut mid-member " in msg, msg
    assert ".jpg" in msg or ".cls" in msg


def test_no_manifest_and_incomplete_pack(trees, tmp_path):
    out = _damaged(trees, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["complete"] = False
    manifest["splits"]["train"]["shards"].pop()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"pack is incomplete \(\d+ of \d+ shards\).*again finishes"):
        build_loader(shard_cfg(out, "torchvision"), "train")
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"has no manifest\.json"):
        build_loader(shard_cfg(out, "torchvision"), "val")


def test_a_bad_pack_stops_training_with_one_line(trees, tmp_path):
    """python -m train on a pack with a missing index file: exit 1, one `error:` line naming it, no traceback."""
    out = _damaged(trees, tmp_path)
    (out / "train" / "shard-000001.idx").unlink()
    proc = run_cli("-m", "train", "--config", "demo", f"data.root={out}", "data.format=shards",
                   f"run_dir={tmp_path / 'run'}", "model.num_classes=5", "data.batch_size=8",
                   "data.workers=0", "log.wandb_mode=disabled")  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: train/shard-000001.idx: missing index file of train/shard-000001.tar; "
        "`python -m data_pipeline pack SRC OUT` again finishes or repairs it"
    ], proc.stderr[-2000:]
