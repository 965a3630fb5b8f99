r"""ImageNet scale (issue 28): what the data path costs per rank as the file count grows, on an ImageNet-shaped
tree whose files are hard links to ~100 small real JPEGs (only inodes cost disk).

    python benchmarks/scale.py --files 200000 --world-size 8          # the issue's check
    python benchmarks/scale.py                                       # 1,281,000 train files, as ImageNet
    python benchmarks/scale.py --files 50000 --backends dali --formats folder --skip-check
    python benchmarks/scale.py --smoke                               # a tiny tree, seconds (the test runs it)

Builds ROOT/{train,val}/<1000 class folders>/ (``--files`` train files, ``--val-files`` val files, default in
ImageNet's proportion, 50,000 at 1,281,000), reused when its record matches, and packs it (timed), then measures:

* per loader backend (``dali``: DALI's CPU-only pipeline; ``torchvision``: the DataLoader with ``--workers``
  worker processes) and format (``folder``, ``shards``), rank 0 of ``--world-size`` W, ``--batch-size`` images per
  rank, each in a fresh child process: start to first batch (wall and the process's CPU-s, after imports), the
  epoch-boundary stall (last batch of epoch 0 to the first of epoch 1, wall and CPU-s), the process's peak RSS
  above its RSS after imports (and the worker processes' peak RSS, summed), and the files and directories opened
  to the first batch (a second child under ``strace -f``; skipped, and said so, without strace). The file
  tables are listed once per job into the run folder (``runs/scale/run_<files>_w<W>/file_tables``): a first
  child with that folder emptied is the rank that lists (its start to first batch and peak RSS are reported
  apart, ``the_rank_that_lists``); the figures above are those of the ranks that map its table;
* ``check --quick``, ``check`` (full decode) and ``pack``: wall and CPU-s (this process and its workers).

The loaders run with 64-pixel crops: the figures are about listing, indexing and building, not decoding. The
machine may be shared: the JSON holds the load average before and after, and CPU-s next to every wall time.
Writes ``benchmarks/results/scale_<files>_w<W>.json`` (``--out``) and appends a table to results/README.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, Parser, machine_info, now_utc, publish

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_000, 50_000
SOURCES = 100  # distinct JPEGs the tree links to
SMOKE = dict(files=400, classes=10, world_size=2, batch_size=8, workers=1, shard_size="40KB")
CROPS = ["data.train_crop=64", "data.val_resize=73", "data.val_crop=64"]
# The figures at 1.28 M images (rank 0 of W = 8 or 64, 2-core machine), for the table beside ours.
BEFORE = {
    "listing the train tree, per rank": "4.5 CPU-s (same at W = 8 and 64)",
    "DALI train pipeline first build": "+5-6 CPU-s, peak RSS 2.5 GB",
    "DALI rebuilt every epoch (stall)": "~5 CPU-s, +1.5 GB peak per epoch",
    "check (folder, tiny files)": "5 min 28 s",
    "check (pack)": "11 min 34 s",
    "pack": "5 min 52 s, one process",
}


# ------------------------------------------------------------------------------------------------ the tree


def _sources(folder: Path, n: int) -> list[Path]:
    """``n`` small real JPEGs (noise over a gradient, 48-96 px, some greyscale), drawn with a fixed seed."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(48, 97, size=2))
        img = (rng.random((h, w, 3)) * 255).astype("uint8")
        im = Image.fromarray(img).convert("L") if i % 10 == 9 else Image.fromarray(img)
        p = folder / f"src_{i:03d}.JPEG"
        im.save(p, quality=85)
        paths.append(p)
    return paths


def build_tree(root: Path, files: int, val_files: int, classes: int) -> dict[str, Any]:
    """ROOT/{train,val}/n%08d/ with ``files`` / ``val_files`` hard links spread over ``classes`` folders; reused
    when ROOT's record says the same. Returns the record (with the seconds it took, 0 when reused)."""
    record = {"files": files, "val_files": val_files, "classes": classes, "sources": SOURCES}
    marker = root / "scale_tree.json"
    if marker.exists() and json.loads(marker.read_text()).get("params") == record:
        return {**json.loads(marker.read_text()), "built_seconds": 0.0, "reused": True}
    if root.exists():
        shutil.rmtree(root)
    start = time.perf_counter()
    srcs = _sources(root / "_sources", SOURCES)
    rng = random.Random(0)
    for split, n in (("train", files), ("val", val_files)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            k = n // classes + (1 if c < n % classes else 0)
            for j in range(k):
                name = f"n{c:08d}_{j}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * k + j:08d}.JPEG"
                os.link(srcs[rng.randrange(SOURCES)], folder / name)
    out = {"params": record, "built_seconds": round(time.perf_counter() - start, 1), "reused": False}
    marker.write_text(json.dumps(out))
    return out


# ------------------------------------------------------------------------------------------------- timing


def _cpu(children: bool = True) -> float:
    """CPU-s of this process (and of its waited-for children: a process pool's workers once it is shut down)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    t = s.ru_utime + s.ru_stime
    if children:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        t += c.ru_utime + c.ru_stime
    return t


def timed(fn, *args, **kwargs) -> tuple[Any, dict[str, float]]:
    wall, cpu = time.perf_counter(), _cpu()
    out = fn(*args, **kwargs)
    return out, {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu() - cpu, 2)}


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, bytes."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _children() -> list[int]:
    """Every descendant of this process (DataLoader workers, DALI has none), from /proc."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [os.getpid()]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _cpu_of(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


# ------------------------------------------------------------------------------------------ loader child


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One loader measured in this (fresh) process: see the module docstring."""
    t0, c0 = time.perf_counter(), _cpu(children=False)
    import torch

    from data_pipeline import build_loader
    from train.config import load_config

    torch.set_num_threads(1)
    imports = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(_cpu(False) - c0, 2)}
    base = _status()["VmRSS"]
    cfg = load_config(None, spec["overrides"])
    t1, c1 = time.perf_counter(), _cpu(False)
    loader = build_loader(cfg, "train", rank=0, world_size=spec["world_size"])
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    first = {"wall_s": round(time.perf_counter() - t1, 3), "cpu_s": round(_cpu(False) - c1, 3)}
    out: dict[str, Any] = {
        "imports": imports,
        "start_to_first_batch": first,
        "batches_per_epoch": len(loader),
    }
    if spec.get("first_batch_only"):
        out["peak_rss_above_base_mb"] = round((_status()["VmHWM"] - base) / 1e6, 1)
        loader.close()
        return out
    n = 1
    for _ in it:
        n += 1
    t_last, c_last = time.perf_counter(), _cpu(False)
    loader.set_epoch(1)
    it = iter(loader)
    next(it)
    out["epoch_boundary_stall"] = {
        "wall_s": round(time.perf_counter() - t_last, 3),
        "cpu_s": round(_cpu(False) - c_last, 3),
    }
    out["batches_epoch0"] = n
    st = _status()
    kids = _children()
    out["peak_rss_above_base_mb"] = round((st["VmHWM"] - base) / 1e6, 1)
    out["base_rss_mb"] = round(base / 1e6, 1)
    out["workers"] = {
        "processes": len(kids),
        "peak_rss_sum_mb": round(sum(_status(k).get("VmHWM", 0) for k in kids) / 1e6, 1),
        "cpu_s_sum": round(sum(_cpu_of(k) for k in kids), 2),
    }
    for _ in it:
        pass
    loader.close()
    return out


def _run_child(
    spec: dict[str, Any], strace: str | None = None, timeout: float = 3600
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the child's figures, or its error; the files it opened, counted when ``strace`` is given)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, log = Path(tmp) / "spec.json", Path(tmp) / "strace.txt"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
        if strace:
            cmd = [
                strace,
                "-f",
                "-qq",
                "--seccomp-bpf",
                "-e",
                "trace=open,openat",
                "-e",
                "signal=none",
                "-o",
                str(log),
                *cmd,
            ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}, None
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if not strace:
            return result, None
        if not log.exists() or not log.stat().st_size:
            return result, {"skipped": "strace traced nothing here"}
        return result, _count_opens(log.read_text(), spec["root"])


def _count_opens(text: str, root: str) -> dict[str, int]:
    """Successful opens of files and of directories (O_DIRECTORY) under ``root``, all processes of the child."""
    files = dirs = 0
    for line in text.splitlines():
        if root not in line or "= -1" in line or ("resumed" in line and "<unfinished" in line):
            continue
        if "O_DIRECTORY" in line:
            dirs += 1
        else:
            files += 1
    return {"files": files, "directories": dirs}


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=IMAGENET_TRAIN, help="train files (default 1,281,000)")
    p.add_argument("--val-files", type=int, default=None, help="val files (default: ImageNet's proportion)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--world-size", type=int, default=8, help="W: rank 0 of W is measured")
    p.add_argument("--batch-size", type=int, default=32, help="images per rank")
    p.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers per rank")
    p.add_argument("--root", type=Path, default=None, help="the tree (default runs/scale/tree_<files>)")
    p.add_argument("--shard-size", default="16MB", help="pack shard size (default 16MB)")
    p.add_argument("--backends", default="dali,torchvision")
    p.add_argument("--formats", default="folder,shards")
    p.add_argument("--skip-check", action="store_true", help="do not time check --quick and check")
    p.add_argument("--smoke", action="store_true", help="a tiny tree, seconds: the test runs this")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--readme", type=Path, default=None)
    p.add_argument("--child", type=Path, default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child.read_text()))), flush=True)
        return 0
    if args.smoke:
        for k, v in SMOKE.items():
            if k == "shard_size":
                args.shard_size = v
            elif k == "files":
                args.files = v
            else:
                setattr(args, k, v)
    val_files = args.val_files or max(args.classes, args.files * IMAGENET_VAL // IMAGENET_TRAIN)
    runs = REPO / ("runs/bench_smoke" if args.smoke else "runs/scale")
    root = args.root or runs / f"tree_{args.files}"
    pack_root = root.with_name(root.name + "_pack")
    backends = [b for b in args.backends.split(",") if b]
    formats = [f for f in args.formats.split(",") if f]
    if set(backends) - {"dali", "torchvision"} or set(formats) - {"folder", "shards"}:
        p.error("--backends takes dali,torchvision and --formats folder,shards")

    from data_pipeline.check import check_root
    from data_pipeline.shards import pack, parse_size

    info = machine_info()
    result: dict[str, Any] = {
        "benchmark": "scale",
        "date": now_utc(),
        "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "smoke": args.smoke,
        "tree": {"root": str(root), "files": args.files, "val_files": val_files, "classes": args.classes},
        "world_size": args.world_size,
        "batch_size_per_rank": args.batch_size,
        "workers": args.workers,
        "before_issue_28_at_1.28M": BEFORE,
    }
    print(f"tree: {args.files:,} train / {val_files:,} val files under {root} ...", flush=True)
    result["tree"].update(build_tree(root, args.files, val_files, args.classes))
    if pack_root.exists():
        shutil.rmtree(pack_root)
    print("pack ...", flush=True)
    summary, t = timed(pack, root, pack_root, shard_size=parse_size(args.shard_size), stream=io.StringIO())
    result["pack"] = {
        **t,
        "workers": summary.workers,
        "shards": {s: summary.written[s] for s in summary.written},
    }
    _, t = timed(pack, root, pack_root, shard_size=parse_size(args.shard_size), stream=io.StringIO())
    result["pack_rerun_nothing_to_do"] = t
    if not args.skip_check:
        for name, quick in (("check_quick", True), ("check_full", False)):
            print(f"{name} ...", flush=True)
            report, t = timed(check_root, root, quick=quick, progress_stream=io.StringIO())
            result[name] = {
                **t,
                "sound": report.sound,
                "images": sum(report.counts.values()),
                "decoded": report.decoded,
                "workers": report.workers,
                "processes": report.processes,
            }
    strace = shutil.which("strace")
    result["loaders"] = {}
    for backend in backends:
        for fmt in formats:
            key = f"{backend}-{fmt}"
            data_root = str(pack_root if fmt == "shards" else root)
            overrides = [
                f"data.root={data_root}",
                f"data.format={fmt}",
                f"data.backend={backend}",
                "data.dali_device=cpu",
                f"data.batch_size={args.batch_size * args.world_size}",
                f"data.workers={args.workers}",
                f"launch.gpus={args.world_size}",
                *CROPS,
            ]
            # The file tables are listed once per job into the run folder (issue 28 item 1): the rank that lists
            # (a fresh run folder: "cold") is timed apart from the ranks that map its table (the rest).
            run_dir = runs / f"run_{args.files}_w{args.world_size}"
            tables = run_dir / "file_tables"
            spec = {
                "overrides": [*overrides, f"run_dir={run_dir}"],
                "world_size": args.world_size,
                "root": str(Path(data_root).resolve()),
            }
            print(f"loader {key} (rank 0 of {args.world_size}) ...", flush=True)
            shutil.rmtree(tables, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            if args.smoke:  # one child, under strace: its times are not the point
                row, opened = _run_child({**spec, "first_batch_only": True}, strace=strace)
            else:
                cold, _ = _run_child({**spec, "first_batch_only": True})
                row, _ = _run_child(spec)
                row["the_rank_that_lists"] = {
                    k: cold.get(k) for k in ("start_to_first_batch", "peak_rss_above_base_mb", "error")
                }
                opened = _run_child({**spec, "first_batch_only": True}, strace=strace)[1] if strace else None
            row["opened_to_first_batch"] = opened or {"skipped": "strace not found"}
            result["loaders"][key] = row
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    table = _table(result)
    name = ["scale", "smoke" if args.smoke else f"{args.files}", f"w{args.world_size}"]
    return publish(result, name, table, args, args.smoke)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def _lister(cold: dict[str, Any] | None) -> str:
    if not cold or not cold.get("start_to_first_batch"):
        return "-" if not cold else f"error: {cold.get('error')}"
    first = cold["start_to_first_batch"]
    return f"{first['wall_s']:.2f} ({first['cpu_s']:.2f}), {cold.get('peak_rss_above_base_mb', '-')}"


def _table(r: dict[str, Any]) -> str:
    def f(d: dict | None, k: str = "wall_s") -> str:
        return "-" if not d or k not in d else f"{d[k]:.2f}"

    lines = [
        f"### scale.py {r['date']}: {r['tree']['files']:,} files, rank 0 of W = {r['world_size']} "
        f"(load {r['machine']['load_average_at_start']} -> {r['load_average_at_end']})",
        "",
        "| loader | first batch s (CPU-s) | stall s (CPU-s) | peak RSS +MB | workers' peak MB | opened files/dirs "
        "| the rank that lists: first batch s (CPU-s), peak RSS +MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, row in r["loaders"].items():
        if "error" in row:
            lines.append(f"| {key} | error: {row['error']} | | | | | |")
            continue
        o = row.get("opened_to_first_batch", {})
        opened = f"{o['files']:,} / {o['directories']:,}" if "files" in o else o.get("skipped", "-")
        lines.append(
            f"| {key} | {f(row['start_to_first_batch'])} ({f(row['start_to_first_batch'], 'cpu_s')}) | "
            f"{f(row.get('epoch_boundary_stall'))} ({f(row.get('epoch_boundary_stall'), 'cpu_s')}) | "
            f"{row.get('peak_rss_above_base_mb', '-')} | {row.get('workers', {}).get('peak_rss_sum_mb', '-')} | "
            f"{opened} | {_lister(row.get('the_rank_that_lists'))} |"
        )
    for k in ("pack", "pack_rerun_nothing_to_do", "check_quick", "check_full"):
        if k in r:
            lines.append(f"| {k} | {f(r[k])} ({f(r[k], 'cpu_s')}) | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
