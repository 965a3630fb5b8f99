"""Issue 28: the file tables listed once per job and shared through the run folder (data_pipeline.layout's
``file_table`` / ``cached_arrays``, ``shard_reader.open_shards(cache=...)``), and DALI's per-rank reader with the
next epoch's pipeline built ahead (data_pipeline.dali_backend). Real trees, packs, threads and DALI pipelines."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import DataError, build_loader
from data_pipeline.layout import TABLE_DIR, cached_arrays, file_table, index_split
from data_pipeline.shard_reader import open_shards
from data_pipeline.shards import pack
from tests.test_loaders import make_cfg


def _same_listing(table, root: Path, split: str = "train") -> None:
    listed = index_split(root, split)
    assert table.classes == listed.classes and table.root == listed.root
    assert list(table.samples) == listed.samples  # the same files, order and labels


def test_file_table_is_the_listing_shared_and_rebuilt_when_the_tree_changes(small_tree, tmp_path):
    root = shutil.copytree(small_tree, tmp_path / "tree")
    cls = sorted(p.name for p in (root / "train").iterdir())[1]
    (root / "train" / cls / "sub").mkdir()
    shutil.copy(next((root / "train" / cls).glob("*.JPEG")), root / "train" / cls / "sub" / "nested.JPEG")
    cache = tmp_path / TABLE_DIR
    first = file_table(root, "train", cache)
    _same_listing(first, root)
    again = file_table(root, "train", cache)  # mapped from what the first call wrote: not listed again
    assert again.samples.files == first.samples.files and isinstance(again.samples.labels, np.memmap)
    blob = pickle.dumps(again.samples)  # what a DataLoader worker receives: the file names, not the table
    assert len(blob) < 1000 and list(pickle.loads(blob)) == list(again.samples)
    for change in (
        lambda: shutil.copy(
            root / "train" / cls / "sub" / "nested.JPEG", root / "train" / cls / "sub" / "n2.JPEG"
        ),
        lambda: (root / "train" / cls / "sub" / "nested.JPEG").unlink(),  # a folder below a class folder
        lambda: next((root / "train" / cls).glob("*.JPEG")).rename(root / "train" / cls / "renamed.JPEG"),
    ):
        before = file_table(root, "train", cache).samples.files
        time.sleep(0.05)  # a later tick of the clock that stamps folder mtimes (coarse: a few ms)
        change()
        changed = file_table(root, "train", cache)
        assert changed.samples.files != before
        _same_listing(changed, root)
    (
        root / "train" / "n99999999"
    ).mkdir()  # a new, empty class folder: index_split's error, from the table too
    with pytest.raises(DataError) as listed:
        index_split(root, "train")
    with pytest.raises(DataError) as tabled:
        file_table(root, "train", cache)
    assert str(tabled.value) == str(listed.value)
    assert sorted(p.name for p in cache.glob("train-folder-*.npy")) == sorted(  # the replaced tables are gone
        Path(f).name for f in changed.samples.files.values()
    )


def test_one_process_lists_the_others_wait_map_or_raise_its_error(tmp_path):
    """Four ranks at once: one builds, three wait and map its arrays; a build that fails fails them all with its
    one line, built once; a lock left by a process that died is taken over."""
    builds = []

    def build(fail: bool = False):
        builds.append(1)
        time.sleep(0.3)
        if fail:
            raise DataError("train/n1 is empty")
        return {"x": np.arange(10)}, {"what": "ten"}

    def rank(fail: bool, results: list) -> None:
        try:
            results.append(cached_arrays(tmp_path / "tables", f"t{fail}", lambda m: m["what"] == "ten",
                                         lambda: build(fail)))  # fmt: skip
        except DataError as e:
            results.append(str(e))

    for fail in (False, True):
        builds.clear()
        results: list = []
        threads = [threading.Thread(target=rank, args=(fail, results)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(builds) == 1
        if fail:
            assert results == ["train/n1 is empty"] * 4
        else:
            assert all(list(arrays["x"]) == list(range(10)) for arrays, _ in results)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "tables" / "stale.lock").write_text(f"{os.uname().nodename} {dead.pid}\n")
    start = time.monotonic()
    _, meta = cached_arrays(tmp_path / "tables", "stale", lambda m: True, lambda: build())
    assert (
        meta["what"] == "ten"
        and time.monotonic() - start < 5
        and not (tmp_path / "tables" / "stale.lock").exists()
    )


def test_pack_table_shared_and_rebuilt_when_a_shard_changes(small_tree, tmp_path):
    out = tmp_path / "pack"
    pack(small_tree, out, shard_size=60_000, stream=io.StringIO())
    cache = tmp_path / TABLE_DIR
    read = open_shards(out, "train")
    cached = open_shards(out, "train", cache)
    again = open_shards(out, "train", cache)
    assert isinstance(again.rows, np.memmap) and again.rows.filename == cached.rows.filename
    for index in (cached, again, pickle.loads(pickle.dumps(again))):  # a worker maps the same file
        assert (index.names, index.classes) == (read.names, read.classes)
        assert np.array_equal(index.rows, read.rows) and np.array_equal(index.sizes, read.sizes)
        ids = np.arange(len(read))
        assert np.array_equal(index.shard_of[ids], np.repeat(np.arange(len(read.names)), read.sizes))
    idx = out / "train" / read.index_paths[0].rsplit("/", 1)[1]
    idx.write_text(idx.read_text())  # rewritten: another mtime
    assert open_shards(out, "train", cache).rows.filename != again.rows.filename


def test_dali_reader_holds_this_rank_only_builds_ahead_and_refuses_old_states(small_tree, tmp_path):
    """Rank 0 of 2: DALI's reader holds its own N // W files; the next epoch's pipeline is built during the
    last batches and used, bitwise what a pipeline built then gives; a pipeline state without the reader
    layout (saved when every rank's list was one DALI shard each) is refused and the pass fast-forwarded."""
    (
        tmp_path / "run"
    ).mkdir()  # a run folder (the trainer makes it): the loaders share their table through it
    cfg = make_cfg(small_tree, "dali", "data.train_crop=32", f"run_dir={tmp_path / 'run'}", batch=8)
    loader = build_loader(cfg, "train", 0, 2)
    steps = len(loader)
    assert list(os.listdir(tmp_path / "run" / TABLE_DIR))  # the table shared through the run folder
    loader.set_epoch(0)
    assert sum(1 for _ in loader) == steps
    assert loader._pipe.reader_meta("Reader")["epoch_size"] == 56 // 2
    thread, box = loader._ahead
    thread.join()
    ahead = box["built"]
    assert ahead.key == (1, 0, False)
    loader.set_epoch(1)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    assert loader._pipe is ahead.pipe  # the pass runs the pipeline built ahead
    state = loader.state_dict()
    rest = list(it)
    fresh = build_loader(make_cfg(small_tree, "dali", "data.train_crop=32", f"run_dir={tmp_path / 'run'}",
                                  "data.dali_build_ahead=false", batch=8), "train", 0, 2)  # fmt: skip
    assert fresh.build_ahead is False
    fresh.set_epoch(1)
    for (x, y), (fx, fy) in zip(batches + rest, list(fresh), strict=True):
        assert torch.equal(x, fx) and torch.equal(y, fy)
    assert fresh._ahead is None  # data.dali_build_ahead=false: a whole pass, nothing built ahead
    assert fresh.set_epoch(1, start_batch=3, state=state) is None  # today's state: exact
    assert all(torch.equal(x, rx) for (x, _), (rx, _) in zip(list(fresh), rest, strict=True))
    old = {k: v for k, v in state.items() if k != "reader"}
    why = fresh.set_epoch(1, start_batch=3, state=old)
    assert why is not None and "reader None" in why
    assert [y.tolist() for _, y in fresh] == [y.tolist() for _, y in rest]  # fast-forwarded: same images
    loader.close()
    fresh.close()
