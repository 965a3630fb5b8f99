"""Loader throughput on CPU cores: DALI-CPU vs torchvision DataLoader (PIL) vs torchvision (decode_image), train
and val pipelines, each reading the JPEG tree (folder) and a pack of the same images (shards), against the
decode-only ceiling (libjpeg-turbo on the same files and cores), in one run; plus the files each loader opens
per epoch, counted with strace.

    python benchmarks/loader_throughput.py                   # ~4,000 ImageNet-like JPEGs, all cores (~5 min)
    python benchmarks/loader_throughput.py --demo            # the demo dataset (data/demo), its recipe's crops (~1 min)
    python benchmarks/loader_throughput.py --threads 4 --reps 3 --data data/bench_loader --shard-size 50MB
    python benchmarks/loader_throughput.py --smoke --out /tmp/lt.json --readme /tmp/lt.md   # seconds (tests)

The images are the demo dataset's drawings (data_pipeline.demo.render_image) with extra sensor noise, saved at
JPEG quality 95 so they weigh what ImageNet's do (~110 KB at ~400×340, 4:2:0): the entropy decoding, the bulk of
a JPEG decode, then costs what it costs on ImageNet. They are generated once into ``--data`` (reused when the
parameters match). ``--demo`` reads the demo dataset instead (``python -m data_pipeline demo``'s default tree:
1,000 train / 200 val small JPEGs with ImageNet's oddities, made there when missing) through the demo recipe's
transforms (``configs/demo.yaml``: 32 px crops).

The pack: ``python -m data_pipeline pack DATA PACK --shard-size S`` (``data_pipeline.shards.pack``) into ``--pack``
(default ``<data>-pack``), made once and reused while the tree is unchanged (the packer skips shards whose size
and sha256 match; a pack of an older version of the tree is made again). The default shard size gives several
shards a split: 25MB for the ~4,000-image tree (13 train, 5 val shards), 400KB for the demo tree.

Every loader is built with ``data_pipeline.build_loader`` (the product's code path; ``data.format=shards`` for
the pack), with ``--threads`` DALI threads or DataLoader worker processes, batch 64, outputs float32 NCHW
normalised (the torchvision backends normalise in the main process, limited to one torch thread; ``--smoke``
starts the DataLoader workers from a forkserver that imported torch once, which saves start-up time only). The
decode-only ceiling decodes every file (read + decode to RGB) in ``--threads`` processes, with PIL and with
torchvision.io, and takes the faster. After a warm-up (workers started, pipelines built, a few batches),
``--reps`` rounds time one full epoch of every subject in turn (round-robin, so on a shared machine each sees the
same mix of quiet and busy moments; a loader's folder and pack subjects run back to back); images/s is the best
round (the least disturbed), the median is recorded too. An epoch's clock stops when this process's threads are
idle again (``idle_since``): DALI goes on filling its prefetch queue (2 batches) after the last batch is handed
out, work that otherwise runs inside the next subject's timed epoch (timed that way, as runs before 2026-12-04
were, DALI's val pack/folder ratio read 0.90 on the 4,000-image tree and 0.64 on the demo tree, and the
DataLoader after it 1.11 and 1.28).

Files opened: after the timed rounds, one child process builds every loader again, one after another, and runs
two epochs of each under ``strace -f -e trace=open,openat,openat2`` (workers and DALI's threads included). Each
successful open of a path under the loader's data root (the tree or the pack) counts, in the window it happens
in: building the loader, epoch 1 (which starts the workers / builds the DALI pipeline), epoch 2 (the same
persistent workers; DALI's train pipeline is rebuilt each epoch, as in training). Directories (``O_DIRECTORY``)
and failed opens are counted apart; DALI's per-pass index files of a pack (written to a private temporary
folder) too. Without a usable strace the JSON says why and nothing is counted.

Writes ``--out`` (JSON: machine, versions, command, every figure, ratios, notes) and appends markdown tables to
``--readme``. Goals (issue 3): DALI-CPU ≥ 1.3× the PIL DataLoader and ≥ 0.7× the decode-only ceiling; the
``dali_stages_cpu`` times DALI pipelines cut after read, decode and resize (same rounds; not with ``--demo``) to
show what bounds them. Issue 15: the pack's throughput against the folder's, per backend, and files opened.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402  (after the sys.path line above)
    Parser,
    best_of,
    command_line,
    fail,
    machine_info,
    now_utc,
    prepare_tree,
    publish,
    shared_machine_note,
    tree_stats,
    usable_cpus,
    warm_page_cache,
)

FULL = dict(
    classes=10, train_per_class=300, val_per_class=100, min_size=280, max_size=470, noise=24.0, quality=95
)
SMOKE = dict(classes=2, train_per_class=12, val_per_class=6, min_size=64, max_size=96, noise=8.0, quality=90)
# --shard-size defaults: several shards a split (~240 samples a shard on the ~4,000-image tree, ~100 on the demo's)
SHARD_SIZE = {"bench": "25MB", "demo": "400KB", "smoke": "40KB"}
VARIANTS = [("dali-cpu", "dali", "pil"), ("torchvision-pil", "torchvision", "pil"),
            ("torchvision-decode_image", "torchvision", "torchvision.io")]  # fmt: skip
FORMATS = ("folder", "shards")
OPEN_EPOCHS = 2
PRELOAD = [
    "torch",
    "torchvision",
    "data_pipeline.torchvision_backend",
]  # forkserver preload (start-up time only)


# ---------------------------------------------------------------------------------------------- measuring


IDLE_WINDOW_S = 0.002  # idle: this process's threads used under 10% of one core over the last 2 ms


def idle_since(limit_s: float = 30.0) -> float:
    """``perf_counter`` time from which this process's threads have been idle: after a loader hands out an
    epoch's last batch, DALI's threads go on filling its prefetch queue (2 batches, ~0.13 s at 2 threads on the
    4,000-image tree); that work belongs to the loader's epoch, not to the next subject's timed one. Waits at most
    ``limit_s`` (then returns now, and says so)."""
    end = time.perf_counter() + limit_s
    while True:
        t, cpu = time.perf_counter(), time.process_time()
        time.sleep(IDLE_WINDOW_S)
        if time.process_time() - cpu < 0.1 * IDLE_WINDOW_S:
            return t
        if t > end:
            print(f"  (this process did not go idle within {limit_s:.0f} s)", flush=True)
            return time.perf_counter()


def _decode_chunk(args: tuple[list[str], str]) -> int:
    files, how = args
    if how == "pil":
        from PIL import Image

        for f in files:
            with open(f, "rb") as fh:
                Image.open(io.BytesIO(fh.read())).convert("RGB")
    else:
        import torch
        from torchvision.io import ImageReadMode, decode_image, read_file

        torch.set_num_threads(1)
        for f in files:  # decode_image: decode_jpeg for a JPEG; the demo tree has a PNG named .JPEG too
            decode_image(read_file(f), mode=ImageReadMode.RGB)
    return len(files)


class DecodeOnly:
    """The decode-only ceiling: every file read and decoded to RGB once, split over ``processes`` processes."""

    def __init__(self, files: list[str], processes: int, how: str) -> None:
        self.how, self.processes = how, processes
        self.chunks = [(files[i::processes], how) for i in range(processes)]
        self.pool = mp.get_context("fork").Pool(processes)
        self.pool.map(_decode_chunk, [(files[:4], how)] * processes)  # start and import in every process

    def epoch(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        n = sum(self.pool.map(_decode_chunk, self.chunks))
        return n, idle_since() - t0

    def per_core(self) -> float:
        files = self.chunks[0][0][:200]
        t0 = time.perf_counter()
        _decode_chunk((files, self.how))
        return len(files) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class LoaderEpoch:
    """One timed epoch of a ``data_pipeline`` loader per call (the epoch number advances: new order each time)."""

    def __init__(self, loader: Any, warmup_batches: int) -> None:
        self.loader, self.epochs = loader, 0
        for i, _ in enumerate(loader):  # start workers / build the pipeline, fill the prefetch queues
            if i + 1 >= warmup_batches:
                break

    def epoch(self) -> tuple[int, float]:
        self.epochs += 1
        self.loader.set_epoch(self.epochs)
        n, t0 = 0, time.perf_counter()
        for _, labels in self.loader:
            n += len(labels)
        return n, idle_since() - t0  # until DALI's threads have filled its prefetch queue too

    def close(self) -> None:
        self.loader.close()


class DaliStage:
    """A DALI CPU pipeline run directly (no torch): ``steps`` batches per call."""

    def __init__(self, pipe: Any, steps: int, batch: int) -> None:
        self.pipe, self.steps, self.batch = pipe, steps, batch
        pipe.build()
        for _ in range(2):
            pipe.run()

    def epoch(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        for _ in range(self.steps):
            self.pipe.run()
        return self.steps * self.batch, idle_since() - t0

    def close(self) -> None:
        self.pipe = None


def round_robin(subjects: dict[str, Any], reps: int) -> dict[str, dict]:
    """``reps`` rounds, each subject once per round, in turn: on a shared machine every subject sees the same
    mix of quiet and busy moments. images/s: best (least disturbed) and median over the rounds."""
    runs: dict[str, list[float]] = {k: [] for k in subjects}
    counts: dict[str, int] = {}
    for r in range(reps):
        for name, subject in subjects.items():
            idle_since()  # nothing of the previous subject's still running (each epoch ends idle already)
            n, dt = subject.epoch()
            runs[name].append(n / dt)
            counts[name] = n
            print(f"  round {r + 1}/{reps}  {name:40s} {n / dt:8.1f} img/s", flush=True)
    return {k: {**best_of(v), "images_per_epoch": counts[k]} for k, v in runs.items()}


def dali_stage_pipelines(
    root: Path, pack_root: Path, split: str, threads: int, batch: int, spec: Any
) -> dict[str, DaliStage]:
    """DALI CPU pipelines cut after each stage: what the full pipeline's time is made of; and the pack's reader
    (``fn.readers.webdataset`` over the pack's own index files) alone and under the full pipeline."""
    from nvidia.dali import fn, pipeline_def, types

    from data_pipeline.dali_backend import READER, build_pipeline
    from data_pipeline.layout import index_split
    from data_pipeline.shard_reader import open_shards

    samples = index_split(root, split).samples
    files, labels = [p for p, _ in samples], [lab for _, lab in samples]
    steps = len(files) // batch

    def cut(stage: str) -> Any:
        @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1, prefetch_queue_depth=2)
        def pipe():  # type: ignore[no-untyped-def]
            jpegs, label = fn.readers.file(files=files, labels=labels, name="Reader")
            if stage == "read":
                return jpegs, label
            if split == "train":
                images = fn.decoders.image_random_crop(
                    jpegs,
                    device="cpu",
                    output_type=types.RGB,
                    random_area=list(spec.rrc_scale),
                    random_aspect_ratio=list(spec.rrc_ratio),
                )
                if stage == "resize":
                    images = fn.resize(images, size=[spec.train_crop] * 2, antialias=True)
            else:
                images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
                if stage == "resize":  # the loader's window resize: only the centre crop is resampled
                    c = spec.val_crop
                    images = fn.resize(
                        images,
                        size=[c, c],
                        roi_start=[16.0, 16.0],
                        roi_end=[16.0 + c * 1.4, 16.0 + c * 1.4],
                        antialias=True,
                    )
            return images, label

        return pipe()

    full = build_pipeline(spec, files, labels, split=split, batch_size=batch, num_threads=threads, seed=1)
    pack = open_shards(pack_root, split)

    def pack_read() -> Any:
        @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1, prefetch_queue_depth=2)
        def pipe():  # type: ignore[no-untyped-def]
            jpegs, cls = fn.readers.webdataset(
                paths=pack.tar_paths, index_paths=pack.index_paths, ext=["jpg", "cls"], name=READER
            )
            return jpegs, cls

        return pipe()

    pack_full = build_pipeline(spec, [], [], tars=pack.tar_paths, tar_indices=pack.index_paths, split=split,
                               batch_size=batch, num_threads=threads, seed=1)  # fmt: skip
    return {
        "read": DaliStage(cut("read"), steps, batch),
        "decode": DaliStage(cut("decode"), steps, batch),
        "decode+resize": DaliStage(cut("resize"), steps, batch),
        "full pipeline (no torch)": DaliStage(full, steps, batch),
        "pack: read": DaliStage(pack_read(), steps, batch),
        "pack: full pipeline (no torch)": DaliStage(pack_full, steps, batch),
    }


# ------------------------------------------------------------------------------------------- the data sets


def prepare_demo(root: Path) -> dict:
    """The demo dataset at ``root`` (``python -m data_pipeline demo ROOT``'s default tree: made when missing,
    reused when complete), described and read into the page cache, as ``prepare_tree`` does."""
    from data_pipeline.demo import DemoTreeError, make_demo_dataset

    print(f"data: {root} (demo dataset)", flush=True)
    try:
        made = make_demo_dataset(root)
    except DemoTreeError as e:
        raise fail(f"--demo: {e}") from None
    stats = {
        **tree_stats(root),
        "root": str(root),
        "generation": {"demo_dataset": True, "created_now": made.created, "seconds": round(made.seconds, 1)},
    }
    print(f"  {stats['files']} files, {stats['mean_kb']} KB, ~{stats['mean_width']}x{stats['mean_height']}")
    warm_page_cache(root)
    return stats


def prepare_pack(tree: Path, out: Path, shard_size: str) -> dict:
    """The pack of ``tree`` at ``out`` (``data_pipeline.shards.pack``, what ``python -m data_pipeline pack`` runs):
    made once, reused while the tree is unchanged (the packer skips shards whose size and sha256 match). A pack of
    an older version of this tree, or of other options, which the packer refuses, is deleted and made again; any
    other folder there is an error. Read into the page cache; returns its record for the JSON."""
    from data_pipeline.shard_reader import load_manifest
    from data_pipeline.shards import PackError, pack, parse_size

    size = parse_size(shard_size)
    lines = io.StringIO()
    print(f"pack: {out} (--shard-size {shard_size})", flush=True)
    try:
        summary = pack(tree, out, shard_size=size, stream=lines)
    except PackError as e:
        manifest = out / "manifest.json"
        try:
            source = json.loads(manifest.read_text()).get("source")
        except (OSError, ValueError, AttributeError):
            source = None
        extra = {p.name for p in out.iterdir()} - {"manifest.json", "train", "val"} if out.is_dir() else set()
        if source != str(tree.resolve()) or extra:
            raise fail(f"--pack {out}: {e}") from None
        print(f"  {e}: a pack of an older version of {tree} or of other options; packing again", flush=True)
        shutil.rmtree(out)
        summary = pack(tree, out, shard_size=size, stream=lines)
    manifest = load_manifest(out)
    shards = {split: len(entry["shards"]) for split, entry in manifest["splits"].items()}
    record = {
        "root": str(out),
        "command": f"python -m data_pipeline pack {tree} {out} --shard-size {shard_size}",
        "shard_size": shard_size,
        "shard_size_bytes": size,
        "shards": shards,
        "images": summary.images,
        "bytes": summary.bytes,
        "reused": not any(summary.written.values()),
        "seconds": round(summary.seconds, 1),
    }
    print(
        f"  {'reused' if record['reused'] else 'packed'} in {record['seconds']} s: "
        + ", ".join(
            f"{split} {n} shards ({summary.bytes[split] / 1e6:.1f} MB)" for split, n in shards.items()
        ),
        flush=True,
    )
    for tar in sorted(out.rglob("*.tar")):  # every run reads from memory
        tar.read_bytes()
    return record


# ------------------------------------------------------------------------------------------- files opened

OPEN_CALLS = ("open", "openat", "openat2")
OPENS_METHOD = (
    "strace -f -e trace=open,openat,openat2 of one child process that builds each loader (same config, threads and "
    "batch as the timed subjects) and runs two epochs of it, one loader after another; every successful open of a "
    "path under the loader's data root (the tree, or the pack) counts in the window it happens in: build (loader "
    "construction: the folder walk or the pack's manifest and index files), epoch_1 (starts the DataLoader workers "
    "/ builds the DALI pipeline), epoch_2 (persistent DataLoader workers; DALI's val pipeline persists, its train "
    "pipeline is rebuilt each epoch as in training), close. Windows are cut by marker opens of a missing path from "
    "the main process; a pipeline that reads ahead (DALI's prefetch queue) opens the next epoch's first files in "
    "the window where that happens. directories: opens with O_DIRECTORY (os.scandir); failed opens are not "
    "counted; private_index_files: DALI's per-pass index files of a pack, in a private temporary folder; "
    "relative_to_dir_fd: successful opens of a path relative to a directory descriptor, which cannot be placed "
    "(imports walking site-packages), not counted as files. The child's forkserver preloads torch (start-up time "
    "only; imports open nothing under a data root)."
)


def _strace_version(strace: str) -> str:
    try:
        out = subprocess.run([strace, "-V"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def parse_strace(text: str, marker: str, roots: dict[str, str], cwd: str) -> dict[str, dict[str, dict]]:
    """Successful opens per subject and window from ``strace -f`` output (one line per call, ``PID call(...) =
    result``, or split into ``<unfinished ...>`` and ``<... call resumed>``). Windows are set by opens of
    ``marker/<subject>/<window>`` (a missing path); an open counts where it was entered. ``roots``: subject → its
    data root (absolute)."""
    calls = "|".join(OPEN_CALLS)
    whole = re.compile(rf"^(\d+)\s+({calls})\((.*)$")
    resumed = re.compile(rf"^(\d+)\s+<\.\.\. ({calls}) resumed>(.*)$")
    quoted = re.compile(r'"((?:[^"\\]|\\.)*)"')
    counts: dict[str, dict[str, dict]] = {}
    distinct: dict[tuple[str, str], set[str]] = {}
    pending: dict[str, tuple[tuple[str, str] | None, str, str, str]] = {}  # pid -> (window, call, path, text)
    where: tuple[str, str] | None = None

    def finish(at: tuple[str, str] | None, call: str, path: str, text: str) -> None:
        head, _, result = text.rpartition(" = ")
        value = result.strip().split(" ")[0]
        if at is None or not head or not value.lstrip("-").isdigit() or int(value) < 0:
            return  # outside the subjects, or a failed open
        c = counts.setdefault(at[0], {}).setdefault(at[1], _window())
        if not path.startswith("/"):
            if call != "open" and text.split(",", 1)[0].strip() != "AT_FDCWD":
                c["relative_to_dir_fd"] += 1  # relative to a directory descriptor: not placed
                return
            path = os.path.join(cwd, path)
        path = os.path.normpath(path)
        root = roots.get(at[0], "")
        if root and (path == root or path.startswith(root + "/")):
            if "O_DIRECTORY" in head:
                c["directories"] += 1
            else:
                c["files"] += 1
                distinct.setdefault(at, set()).add(path)
        elif "/vgg-pack-index-" in path:
            c["private_index_files"] += 1

    for line in text.splitlines():
        m = whole.match(line)
        if m:
            pid, call, rest = m.groups()
            q = quoted.search(rest)
            if q is None:
                continue
            if q.group(1).startswith(marker + "/"):  # the main process moves to the next window
                where = tuple(q.group(1)[len(marker) + 1 :].split("/", 1))  # type: ignore[assignment]
                continue
            if rest.endswith("<unfinished ...>"):
                pending[pid] = (where, call, q.group(1), rest[: -len("<unfinished ...>")])
            else:
                finish(where, call, q.group(1), rest)
            continue
        m = resumed.match(line)
        if m and m.group(1) in pending:
            at, call, path, first = pending.pop(m.group(1))
            finish(at, call, path, first + m.group(3))
    for (subject, window), paths in distinct.items():
        counts[subject][window]["distinct_files"] = len(paths)
    return counts


def _window() -> dict[str, int]:
    return {
        "files": 0,
        "distinct_files": 0,
        "directories": 0,
        "private_index_files": 0,
        "relative_to_dir_fd": 0,
    }


def count_opens(subjects: list[dict], config: str | None, timeout: float) -> dict:
    """Files opened per subject and window (``OPENS_METHOD``), measured in a child process under strace.
    ``subjects``: {name, split, decoder, overrides, root}. A machine without a usable strace gives
    ``{"skipped": why}``; a child that fails otherwise is an error."""
    strace = shutil.which("strace")
    if strace is None:
        return {"method": OPENS_METHOD, "skipped": "strace not found: files opened were not counted"}
    print(f"files opened: {len(subjects)} loaders, {OPEN_EPOCHS} epochs each, under strace ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="vgg-bench-opens-") as tmp:
        marker = os.path.join(tmp, "no-such-folder")
        spec = {"config": config, "epochs": OPEN_EPOCHS, "marker": marker, "subjects": subjects}
        spec_path, log = Path(tmp) / "spec.json", Path(tmp) / "strace.txt"
        spec_path.write_text(json.dumps(spec))
        cmd = [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=" + ",".join(OPEN_CALLS), "-e", "signal=none",
               "-o", str(log), sys.executable, str(Path(__file__).resolve()), "--opens-child", str(spec_path)]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        seconds = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            if not log.exists() or log.stat().st_size == 0:  # strace traced nothing (no ptrace here, ...)
                why = next(
                    (e for e in err if e.startswith("strace")), err[0] if err else f"exit {proc.returncode}"
                )
                return {"method": OPENS_METHOD, "skipped": f"strace cannot run here: {why}"}
            tail = " | ".join(err[-3:])
            raise fail(f"the files-opened child failed (exit {proc.returncode}): {tail}")
        images = json.loads((Path(tmp) / "images.json").read_text())
        roots = {s["name"]: os.path.normpath(os.path.abspath(s["root"])) for s in subjects}
        counted = parse_strace(log.read_text(), marker, roots, str(REPO))
    out: dict[str, Any] = {}
    for s in subjects:
        windows = {
            w: counted.get(s["name"], {}).get(w, _window()) for w in ("build", "epoch_1", "epoch_2", "close")
        }
        out[s["name"]] = {"root": s["root"], "images_per_epoch": images[s["name"]], **windows}
    return {
        "method": OPENS_METHOD,
        "tool": _strace_version(strace),
        "epochs": OPEN_EPOCHS,
        "seconds": seconds,
        "subjects": out,
    }


def opens_child(spec_path: Path) -> int:
    """The child ``count_opens`` runs under strace: each subject's loader built, two epochs, closed, in turn;
    marker opens of a missing path cut the windows."""
    import torch

    from data_pipeline import build_loader
    from train.config import load_config

    torch.set_num_threads(1)
    # The forkserver imports torch once, not every DataLoader worker: only start-up time (imports open no file
    # under a data root), so the counts are those of the timed loaders.
    mp.set_forkserver_preload(PRELOAD)
    spec = json.loads(spec_path.read_text())

    def mark(subject: str, window: str) -> None:
        with contextlib.suppress(OSError):  # the marker is missing by design: strace records the attempt
            os.close(os.open(os.path.join(spec["marker"], subject, window), os.O_RDONLY))

    images: dict[str, list[int]] = {}
    for s in spec["subjects"]:
        mark(s["name"], "build")
        loader = build_loader(load_config(spec["config"], s["overrides"]), s["split"], decoder=s["decoder"])
        images[s["name"]] = []
        for epoch in range(1, spec["epochs"] + 1):
            mark(s["name"], f"epoch_{epoch}")
            loader.set_epoch(epoch)
            images[s["name"]].append(sum(len(labels) for _, labels in loader))
        mark(s["name"], "close")
        loader.close()
        del loader
        gc.collect()
    mark("-", "end")
    (spec_path.parent / "images.json").write_text(json.dumps(images))
    return 0


# ---------------------------------------------------------------------------------------------------- main


def _opened(result: dict, subject: str) -> str:
    """``build / epoch 1 / epoch 2``: files opened under the subject's data root in each window."""
    opened = result["files_opened"].get("subjects", {}).get(subject)
    if not opened:
        return "–"
    return " / ".join(f"{opened[w]['files']:,}" for w in ("build", "epoch_1", "epoch_2"))


def markdown(result: dict) -> str:
    m, r = result["machine"], result["results"]
    ceiling = result["decode_only"]["ceiling"]["images_per_s"]
    pack = result["pack"]
    smoke = ", smoke run" if result["smoke"] else ""
    lines = [
        f"### Loader throughput, CPU ({result['date']}, {result['dataset']}{smoke})",
        "",
        f"{m['cpu_model']}, {result['threads']} threads/workers of {m['usable_cpus']} usable CPUs "
        f"(load average {m['load_average_at_start'][0]} at start; {result['load_average_at_end'][0]} at the end, "
        "this run's own processes included), "
        f"batch {result['batch']}, {result['data']['files']} JPEGs of {result['data']['mean_kb']} KB, "
        f"~{result['data']['mean_width']}×{result['data']['mean_height']} ({result['transforms']}); pack: "
        f"--shard-size {pack['shard_size']}, {pack['shards']['train']} train / {pack['shards']['val']} val shards; "
        f"torch {m['torch']}, torchvision {m['torchvision']}, DALI {m['nvidia_dali']}, Pillow {m['pillow']}. "
        f"`{result['command']}`",
        "",
        "| pipeline | DALI-CPU | torchvision (PIL) | torchvision (decode_image) | DALI / PIL | DALI / decode ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split in ("train", "val"):
        d, p, t = (r[split][k]["images_per_s"] for k, _, _ in VARIANTS)
        lines.append(f"| {split} | {d:.0f} | {p:.0f} | {t:.0f} | {d / p:.2f}× | {d / ceiling:.2f}× |")
    lines.append(
        f"| decode only (ceiling, {result['decode_only']['ceiling']['decoder']}) | | | | | {ceiling:.0f} img/s |"
    )
    lines += [
        "",
        "Folder (the JPEG tree) vs pack (shards) of the same images, same rounds; files opened under the data root, "
        "counted with strace: building the loader / epoch 1 / epoch 2:",
        "",
        "| pipeline | loader | folder img/s | pack img/s | pack / folder | files opened, folder | files opened, pack |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split in ("train", "val"):
        for name, _, _ in VARIANTS:
            f, s = r[split][name]["images_per_s"], r[split]["shards"][name]["images_per_s"]
            lines.append(
                f"| {split} | {name} | {f:.0f} | {s:.0f} | {s / f:.2f}× | {_opened(result, f'{split} {name}')} | "
                f"{_opened(result, f'{split} {name} shards')} |"
            )
    if "skipped" in result["files_opened"]:
        lines += ["", f"Files opened: {result['files_opened']['skipped']}."]
    lines += ["", f"images/s, best of {result['reps']} round-robin rounds. " + " ".join(result["notes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="benchmark JPEG tree (default data/bench_loader; --demo: data/demo; --smoke: runs/bench_smoke/data_loader)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="the demo dataset (python -m data_pipeline demo; made when missing) with the demo recipe's transforms",
    )
    parser.add_argument("--pack", type=Path, default=None, help="the pack of --data (default: <data>-pack)")
    parser.add_argument(
        "--shard-size",
        default=None,
        help=f"the pack's --shard-size (default {SHARD_SIZE['bench']}; --demo {SHARD_SIZE['demo']}; "
        f"--smoke {SHARD_SIZE['smoke']})",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="DALI threads = DataLoader workers (default: all)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed rounds: one epoch of everything each (default 3; smoke 1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON (default benchmarks/results/loader_throughput_cpu_{bench,demo}.json; smoke: runs/bench_smoke/)",
    )
    parser.add_argument(
        "--readme", type=Path, help="results table to append to (default: beside the JSON's folder)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny images and counts: checks the script in about a minute on 2 CPU cores",
    )
    parser.add_argument("--opens-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.opens_child is not None:  # count_opens' child, under strace
        return opens_child(args.opens_child)
    if args.smoke and args.demo:
        parser.error("--smoke and --demo: choose one")
    tag = "smoke" if args.smoke else "demo" if args.demo else "bench"
    usable = usable_cpus()
    threads = args.threads or (1 if args.smoke else usable)
    reps = args.reps or (1 if args.smoke else 3)
    batch = 4 if args.smoke and args.batch == 64 else args.batch
    if threads < 1 or batch < 1 or reps < 1:
        print("error: --threads, --batch and --reps must be positive", file=sys.stderr)
        return 2
    from data_pipeline.shards import PackError, parse_size

    shard_size = args.shard_size or SHARD_SIZE[tag]
    try:
        parse_size(shard_size)
    except PackError as e:
        parser.error(str(e))
    default_data = {
        "smoke": "runs/bench_smoke/data_loader",
        "demo": "data/demo",
        "bench": "data/bench_loader",
    }
    data = (args.data or REPO / default_data[tag]).absolute()
    pack_root = (args.pack or data.with_name(data.name + "-pack")).absolute()
    if pack_root == data or data in pack_root.parents:
        parser.error(f"--pack {pack_root} lies inside --data {data}: put it beside the tree")
    params = SMOKE if args.smoke else FULL

    import torch

    from data_pipeline import build_loader
    from data_pipeline.transforms import TransformSpec
    from train.config import load_config

    # The main process normalises the torchvision backends' batches on one core; the workers do the rest.
    torch.set_num_threads(1)
    if args.smoke:  # start-up only: DataLoader workers fork from a forkserver that imported torch once
        mp.set_forkserver_preload(PRELOAD)
    info = machine_info()
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    # every run reads from memory
    stats = prepare_demo(data) if args.demo else prepare_tree(data, params, usable)
    pack_record = prepare_pack(data, pack_root, shard_size)
    files = [str(f) for f in sorted(data.rglob("*.JPEG"))]
    seconds["data_and_pack"] = round(time.perf_counter() - t0, 1)

    config = "demo" if args.demo else None  # --demo: the demo recipe's crops and augmentation
    small = [
        "data.train_crop=64",
        "data.val_resize=73",
        "data.val_crop=64",
    ]  # smoke: small images, small crops
    common = [
        f"data.batch_size={batch}",
        f"data.workers={threads}",
        "launch.gpus=1",
        *(small if args.smoke else []),
    ]
    roots = {"folder": [f"data.root={data}"], "shards": [f"data.root={pack_root}", "data.format=shards"]}
    print(f"building loaders and decode pools ({threads} threads/workers/processes each) ...", flush=True)
    subjects: dict[str, Any] = {}
    backends: dict[str, str] = {}
    opens_subjects: list[dict] = []
    for how in ("pil", "torchvision.io"):
        subjects[f"decode-only {how}"] = DecodeOnly(files, threads, how)
    for split in ("train", "val"):
        for name, backend, decoder in VARIANTS:
            for fmt in FORMATS:  # a loader's folder and pack subjects back to back in every round
                key = f"{split} {name}" + (" shards" if fmt == "shards" else "")
                overrides = [*roots[fmt], *common, f"data.backend={backend}", "data.dali_device=cpu"]
                loader = build_loader(load_config(config, overrides), split, decoder=decoder)
                backends[key] = loader.backend
                subjects[key] = LoaderEpoch(loader, warmup_batches=2 if args.smoke else 4)
                root = str(pack_root if fmt == "shards" else data)
                opens_subjects.append(
                    {"name": key, "split": split, "decoder": decoder, "overrides": overrides, "root": root}
                )
    cfg = load_config(config, [*roots["folder"], *common])
    spec = TransformSpec.from_config(cfg.data)
    if tag == "bench":  # the DALI-CPU pipelines cut after each stage, timed in the same rounds
        for split in ("train", "val"):
            for stage, pipe in dali_stage_pipelines(data, pack_root, split, threads, batch, spec).items():
                subjects[f"stage {split} {stage}"] = pipe
    per_core = {how: round(subjects[f"decode-only {how}"].per_core()) for how in ("pil", "torchvision.io")}
    seconds["build_and_warm_up"] = round(time.perf_counter() - t0 - sum(seconds.values()), 1)
    measured = round_robin(subjects, reps)
    for subject in subjects.values():
        subject.close()
    del subjects
    gc.collect()
    seconds["timed_rounds"] = round(time.perf_counter() - t0 - sum(seconds.values()), 1)
    opened = count_opens(opens_subjects, config, timeout=600 if args.smoke else 3600)
    seconds["files_opened"] = round(time.perf_counter() - t0 - sum(seconds.values()), 1)
    print("  " + ", ".join(f"{k} {v} s" for k, v in seconds.items()), flush=True)
    load_at_end = [round(x, 2) for x in os.getloadavg()]  # this run's own load included

    ceiling = {
        how: {**measured[f"decode-only {how}"], "per_core_images_per_s": per_core[how]} for how in per_core
    }
    best = max(per_core, key=lambda h: ceiling[h]["images_per_s"])
    ceiling["ceiling"] = {"decoder": best, "images_per_s": ceiling[best]["images_per_s"]}
    results: dict[str, dict] = {}
    for split in ("train", "val"):
        results[split] = {}
        for name, _, _ in VARIANTS:
            results[split][name] = {**measured[f"{split} {name}"], "backend": backends[f"{split} {name}"]}
        results[split]["shards"] = {
            name: {**measured[f"{split} {name} shards"], "backend": backends[f"{split} {name} shards"]}
            for name, _, _ in VARIANTS
        }
        d, p = results[split]["dali-cpu"]["images_per_s"], results[split]["torchvision-pil"]["images_per_s"]
        results[split]["ratios"] = {
            "dali_over_pil_dataloader": round(d / p, 3),
            "dali_over_decode_image_dataloader": round(
                d / results[split]["torchvision-decode_image"]["images_per_s"], 3
            ),
            "dali_over_decode_ceiling": round(d / ceiling["ceiling"]["images_per_s"], 3),
            "shards_over_folder": {
                name: round(
                    results[split]["shards"][name]["images_per_s"] / results[split][name]["images_per_s"], 3
                )
                for name, _, _ in VARIANTS
            },
        }

    stages: dict[str, dict[str, float]] = {}
    for key, value in measured.items():
        if key.startswith("stage "):
            _, split, stage = key.split(" ", 2)
            stages.setdefault(split, {})[stage] = value["images_per_s"]

    notes = []
    if args.demo:
        notes.append(
            "Data: the demo dataset (python -m data_pipeline demo's default tree, with its greyscale, CMYK and "
            "PNG-named-.JPEG files) through the demo recipe's transforms (configs/demo.yaml: 32 px crops), not the "
            "ImageNet-weight benchmark tree; no DALI stage profile on it."
        )
    for split in ("train", "val"):
        d = results[split]["dali-cpu"]["images_per_s"]
        over_pil = d / results[split]["torchvision-pil"]["images_per_s"]
        over_ceiling = d / ceiling["ceiling"]["images_per_s"]
        notes.append(
            f"{split}: DALI-CPU/PIL {over_pil:.2f}× (goal 1.3×: {'met' if over_pil >= 1.3 else 'missed'}), "
            f"DALI-CPU/decode ceiling {over_ceiling:.2f}× (goal 0.7×: {'met' if over_ceiling >= 0.7 else 'missed'})."
        )
    for split, st in stages.items():
        # Cost per image on one thread's worth of time: each stage's extra time over the previous cut.
        ms = {k: 1000.0 / v for k, v in st.items()}
        full = 1000.0 / results[split]["dali-cpu"]["images_per_s"]
        notes.append(
            f"DALI-CPU {split} profile (wall ms per image at {threads} threads): read {ms['read']:.3f}, decode "
            f"{ms['decode'] - ms['read']:.3f}, resize {ms['decode+resize'] - ms['decode']:.3f}, crop/flip/normalise "
            f"{ms['full pipeline (no torch)'] - ms['decode+resize']:.3f}, hand-off to torch "
            f"{full - ms['full pipeline (no torch)']:.3f}; total {full:.3f}."
        )
        decode_ms, resize_ms = ms["decode"] - ms["read"], ms["decode+resize"] - ms["decode"]
        if results[split]["dali-cpu"]["images_per_s"] < 0.7 * ceiling["ceiling"]["images_per_s"]:
            notes.append(
                f"What bounds DALI-CPU {split}: its reader + decoder alone run at "
                f"{st['decode'] / ceiling['ceiling']['images_per_s']:.2f}× the decode-only ceiling, but the "
                f"antialiased resize (of the crop window only) costs {resize_ms / decode_ms:.2f}× the decode, so "
                "decode + resize cannot reach 0.7× of a ceiling that only decodes; the other stages are small."
            )
        pack_ms = 1000.0 / results[split]["shards"]["dali-cpu"]["images_per_s"]
        pack_no_torch = ms["pack: full pipeline (no torch)"]
        notes.append(
            f"DALI-CPU {split} on the pack, wall ms per image (folder's in brackets): webdataset reader alone "
            f"{ms['pack: read']:.3f} ({ms['read']:.3f}), full pipeline without torch {pack_no_torch:.3f} "
            f"({ms['full pipeline (no torch)']:.3f}), hand-off to torch with the .cls labels parsed "
            f"{pack_ms - pack_no_torch:.3f} ({full - ms['full pipeline (no torch)']:.3f}); total {pack_ms:.3f} "
            f"({full:.3f})."
        )
    notes.append(
        "Folder and pack read the same images from the page cache (both read once before timing), so pack / folder "
        "is the reader's own cost; on a shared filesystem the files opened per epoch are what differs."
    )
    if note := shared_machine_note(info, usable):
        notes.append(note)
    result = {
        "benchmark": "loader_throughput_cpu",
        "date": now_utc(),
        "command": command_line("benchmarks/loader_throughput.py", argv),
        "smoke": args.smoke,
        "dataset": {"smoke": "smoke tree", "demo": "demo tree", "bench": "benchmark tree"}[tag],
        "machine": info,
        "load_average_at_end": load_at_end,
        "threads": threads,
        "batch": batch,
        "reps": reps,
        "config": config,
        "transforms": f"train crop {spec.train_crop}, val resize {cfg.data.val_resize} / crop {spec.val_crop}",
        "data": stats,
        "pack": pack_record,
        "decode_only": ceiling,
        "results": results,
        "files_opened": opened,
        "dali_stages_cpu": stages,
        "goals": {"dali_over_pil_dataloader": 1.3, "dali_over_decode_ceiling": 0.7},
        "seconds": seconds,
        "notes": notes,
    }
    table = markdown(result)
    return publish(result, ["loader_throughput_cpu", tag], table, args, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
