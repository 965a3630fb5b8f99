"""Helpers shared by the benchmark scripts: the benchmark JPEG trees, machine/version records, result files,
timers, and the scaling model of benchmarks/README.md.

    from benchmarks.common import make_tree, machine_info, write_result

Every script writes one JSON file (machine, versions, exact command, every figure, notes) and appends a markdown
table to ``benchmarks/results/README.md`` (newest last).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
RESULTS_README = RESULTS / "README.md"
MANIFEST = "bench_manifest.json"

# The GPU benchmarks' tree (train_throughput.py, eval_throughput.py): ImageNet-weight JPEGs, generated on the
# machine that runs the benchmark. Measured on 9,644 of the 13,000 files: 111.2 KB at ~449×416 on average
# (ImageNet's typical 500×375 has about the same pixel count); ~55% 4:3 landscape, ~25% portrait, some square
# and very wide/tall (data_pipeline.demo's size draw). 10 classes × (1000 train + 300 val) = 13,000 files
# (~1.4 GB, in the page cache during the runs): 78 training batches of 128 per epoch, enough for a warm-up and a
# timed window inside one epoch.
GPU_TREE = dict(
    classes=10, train_per_class=1000, val_per_class=300, min_size=330, max_size=540, noise=12.0, quality=95
)
# --smoke: tiny images, a few dozen files (seconds on a CPU).
GPU_SMOKE = dict(
    classes=2, train_per_class=24, val_per_class=8, min_size=48, max_size=72, noise=8.0, quality=90
)
# Smoke runs of the GPU benchmarks (CPU, seconds): a narrow classifier and 32-pixel crops on GPU_SMOKE's tree.
GPU_SMOKE_OVERRIDES = [
    "model.classifier_width=64",
    "data.train_crop=32",
    "data.val_resize=36",
    "data.val_crop=32",
]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ...`` on stderr, exit status 2. ``--out`` and ``--readme`` (the
    result JSON and the markdown table) are checked to be writable files here, before any work."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        from train.run import output_file_problem

        ns, extras = super().parse_known_args(args, namespace)
        for name in ("out", "readme"):
            value = getattr(ns, name, None)
            problem = output_file_problem(value) if value is not None else None
            if problem:
                self.error(f"argument --{name}: {problem}")
        return ns, extras


def fail(message: str, status: int = 2) -> SystemExit:
    """``raise fail("...")``: print ``error: ...`` and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(status)


def slug(text: str) -> str:
    """A file-name-safe lower-case form: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(part for part in out.split("-") if part)


def resolve_archs(text: str) -> list[str]:
    """``--arch``: a name, a comma list, or ``all`` (the 8 torchvision VGGs); bad names are one error line."""
    from train.models import ARCHS, TORCHVISION_ARCHS

    if text == "all":
        return list(TORCHVISION_ARCHS)
    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS or a == "custom"]
    if not archs or bad:
        valid = ", ".join(a for a in ARCHS if a != "custom")
        raise fail(f"--arch {text!r}: {', '.join(bad) or 'empty'} is not one of: all, {valid}")
    return archs


# ------------------------------------------------------------------------------------------------ the data


def _write_image(job: tuple[str, int, int, int, dict]) -> int:
    """Draw image (split, class, index) and save it; returns its size in bytes."""
    from PIL import Image

    from data_pipeline.demo import class_specs, render_image

    path, split_id, cls, idx, p = job
    rng = np.random.default_rng(np.random.SeedSequence([7, split_id, cls, idx]))
    img = render_image(class_specs(p["classes"])[cls], rng, p["min_size"], p["max_size"])
    # Sensor noise: the entropy-coded data, the bulk of a JPEG decode, then weighs what ImageNet's does.
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, p["noise"], (img.height, img.width, 3))
    Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).save(
        path, format="JPEG", quality=p["quality"]
    )
    return os.path.getsize(path)


def make_tree(root: Path, params: dict, workers: int) -> dict:
    """ImageNet-layout tree of ImageNet-weight JPEGs at ``root``, drawn with the demo dataset's renderer
    (``data_pipeline.demo.render_image``) plus sensor noise. Reused when its manifest holds ``params``; a
    non-empty folder without that manifest is refused (``SystemExit`` with an ``error:`` line)."""
    from data_pipeline.demo import class_specs

    manifest = root / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old.get("params") == params:
            return old
        raise SystemExit(
            f"error: {root} holds a benchmark tree made with other parameters; delete it or use --data"
        )
    if root.exists() and not root.is_dir():
        raise SystemExit(f"error: {root} is not a folder; use another --data")
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"error: {root} is not empty and holds no {MANIFEST}; use another --data")
    jobs = []
    for split_id, split in enumerate(("train", "val")):
        for spec in class_specs(params["classes"]):
            folder = root / split / spec.wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(params[f"{split}_per_class"]):
                jobs.append((str(folder / f"{spec.wnid}_{i + 1}.JPEG"), split_id, spec.index, i, params))
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        sizes = pool.map(_write_image, jobs, chunksize=16)
    info = {
        "params": params,
        "images": len(sizes),
        "mean_kb": round(sum(sizes) / len(sizes) / 1000, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    manifest.write_text(json.dumps(info, indent=1) + "\n")
    return info


def tree_stats(root: Path) -> dict:
    """Files, mean size (KB) and mean width/height (from up to ~400 files) of a tree."""
    from PIL import Image

    files = sorted(root.rglob("*.JPEG"))
    sizes = [f.stat().st_size for f in files]
    dims = np.array([Image.open(f).size for f in files[:: max(1, len(files) // 400)]])
    return {
        "files": len(files),
        "mean_kb": round(float(np.mean(sizes)) / 1000, 1),
        "mean_width": round(float(dims[:, 0].mean())),
        "mean_height": round(float(dims[:, 1].mean())),
    }


def warm_page_cache(root: Path) -> int:
    """Read every JPEG once so that the timed runs read from memory; returns the bytes read."""
    return sum(len(f.read_bytes()) for f in sorted(root.rglob("*.JPEG")))


def prepare_tree(root: Path, params: dict, workers: int) -> dict:
    """The benchmark tree, ready to time: made (or reused) with ``make_tree``, described, read into the page
    cache. Returns its record for the result JSON: ``tree_stats`` + ``root`` + ``generation`` (make_tree's)."""
    print(f"data: {root}", flush=True)
    made = make_tree(root, params, workers)
    stats = {**tree_stats(root), "root": str(root), "generation": made}
    print(
        f"  {stats['files']} JPEGs, {stats['mean_kb']} KB, ~{stats['mean_width']}x{stats['mean_height']}",
        flush=True,
    )
    warm_page_cache(root)
    return stats


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------- machine, versions


def _cpu_model() -> str:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def gpu_info() -> dict | None:
    """Name, driver, CUDA/cuDNN versions, memory and SM count of GPU 0; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            driver = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            driver = None
    return {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "driver": driver,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
    }


def device_used_gib() -> float:
    """GPU memory in use on the current device as the driver reports it (total − free), GiB: unlike
    ``torch.cuda.max_memory_allocated`` it includes DALI's pools and the CUDA context. Other processes on the same
    GPU count too."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2**30, 2)


def machine_info() -> dict:
    """CPU, GPU (or None), library versions and the load average: the header of every result file."""
    import PIL
    import torch
    import torchvision
    from PIL import features

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": gpu_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "nvidia_dali": dali_version,
        "timm": timm_version,
        "pillow": PIL.__version__,
        "pillow_libjpeg_turbo": features.version("jpg"),
        "platform": platform.platform(),
    }


def device_label(info: dict) -> str:
    """ "NVIDIA H100 80GB HBM3 (driver 580.159.04, CUDA 13.0)" or "CPU: <model>, N usable CPUs"."""
    g = info.get("gpu")
    if g:
        return f"{g['name']} (driver {g['driver'] or '?'}, CUDA {g['cuda_runtime']}, cuDNN {g['cudnn']})"
    return f"CPU only: {info['cpu_model']}, {info['usable_cpus']} usable CPUs"


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The exact command that produced a result: ``sys.argv`` when run as a script, else ``script`` + argv."""
    if argv is None:
        return "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    return f"python {script} " + " ".join(shlex.quote(a) for a in argv)


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def publish(result: dict, name_parts: Sequence[str], table: str, args: Any, smoke: bool) -> int:
    """Write the JSON (``args.out`` or a file named from ``name_parts``) and append ``table`` to the results README
    (smoke runs go to runs/bench_smoke/, never to benchmarks/results/); print the table. Returns exit status 0."""
    default_dir = REPO / "runs/bench_smoke" if smoke else RESULTS
    out = args.out or default_dir / f"{'_'.join(name_parts)}.json"
    readme = args.readme or (default_dir / "README.md" if smoke else RESULTS_README)
    write_result(result, out, readme, table)
    print(table)
    print(f"wrote {out} and appended to {readme}", flush=True)
    return 0


def write_result(result: dict, out: Path, readme: Path, table: str) -> None:
    """Write ``result`` as JSON to ``out`` (atomically) and append ``table`` to ``readme`` (created with a
    header when missing)."""
    from train.files import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    readme.parent.mkdir(parents=True, exist_ok=True)
    if not readme.exists():
        readme.write_text("# Benchmark results\n\nWritten by the scripts in `benchmarks/`; newest last.\n\n")
    with readme.open("a") as f:
        f.write(table + "\n")


# ------------------------------------------------------------------------------------------------- timing


class StepTimer:
    """Times a window of work: CUDA events on a GPU (the GPU's own clock, stream-ordered), ``perf_counter``
    on a CPU. ``start()`` synchronises first, so the window holds only work enqueued after it."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self._sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._b = torch.cuda.Event(enable_timing=True)
        self._t0 = 0.0

    @property
    def clock(self) -> str:
        return "CUDA events" if self.cuda else "time.perf_counter"

    def start(self) -> None:
        self._sync()
        if self.cuda:
            self._a.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since ``start()``, once everything enqueued since has finished."""
        if self.cuda:
            self._b.record()
            self._b.synchronize()
            return self._a.elapsed_time(self._b) / 1000.0
        return time.perf_counter() - self._t0


def gemm_tflops(device: Any, n: int, reps: int = 10, rounds: int = 3, warmup: int = 3) -> dict:
    """Measured bf16 matrix-product rate: ``rounds`` timed rounds of ``reps`` products of two n×n bf16 random
    matrices after ``warmup`` untimed ones; FLOPs = 2·n³ each; the best round counts (the least disturbed, the
    highest rate: the conservative MFU denominator). The denominator of MFU (same run, same GPU, same clocks)."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(warmup):
        a @ b
    timer = StepTimer(device)
    rates = []
    for _ in range(rounds):
        timer.start()
        for _ in range(reps):
            a @ b
        rates.append(2 * n**3 * reps / timer.stop() / 1e12)
    return {
        "n": n,
        "reps": reps,
        "rounds_tflops": rates,
        "tflops": max(rates),
        "dtype": "bfloat16",
        "clock": timer.clock,
    }


def shared_machine_note(info: dict, cpus: int | None = None) -> str | None:
    """A note for the result when the machine was busy at the start (load average above half of ``cpus``, by
    default the usable CPUs of ``info``): absolute numbers are then noisy, ratios of one run still compare."""
    cpus = info["usable_cpus"] if cpus is None else cpus
    load = info["load_average_at_start"][0]
    if load <= 0.5 * cpus:
        return None
    return (
        f"The machine was shared (load average {load} on {cpus} CPUs at start): absolute numbers are noisy; "
        "the ratios come from the same run."
    )


def best_of(runs: Sequence[float]) -> dict:
    """images/s of repeated runs: the best (least disturbed), the median and every run."""
    return {
        "images_per_s": round(max(runs), 1),
        "median_images_per_s": round(float(np.median(runs)), 1),
        "runs": [round(x, 1) for x in runs],
    }


# --------------------------------------------------------------------------------------- the scaling model

IMAGENET_TRAIN = 1_281_167
# Stated interconnect of the scaling note (benchmarks/README.md): ASSUMED effective all-reduce bus bandwidths,
# not measured here. Intra-node: 8 × H100 SXM on NVLink 4 / NVSwitch (900 GB/s per GPU, both directions
# together); inter-node: one 400 Gb/s InfiniBand NDR port per GPU (50 GB/s line rate), ~90% usable.
INTRA_NODE_BUS_GBPS = 360.0
INTER_NODE_BUS_GBPS = 45.0
GPUS_PER_NODE = 8


def ring_allreduce_seconds(nbytes: float, gpus: int, bus_gbps: float) -> float:
    """Ring all-reduce time: each GPU sends and receives 2(N−1)/N × bytes over its link."""
    if gpus <= 1:
        return 0.0
    return 2 * (gpus - 1) / gpus * nbytes / (bus_gbps * 1e9)


def allreduce_seconds(
    nbytes: float,
    gpus: int,
    gpus_per_node: int = GPUS_PER_NODE,
    intra_gbps: float = INTRA_NODE_BUS_GBPS,
    inter_gbps: float = INTER_NODE_BUS_GBPS,
) -> float:
    """All-reduce time under the stated interconnect: NVLink within one node, the per-GPU InfiniBand link
    (the slowest hop of every ring) once the job spans nodes."""
    return ring_allreduce_seconds(nbytes, gpus, intra_gbps if gpus <= gpus_per_node else inter_gbps)


def predicted_efficiency(
    images_per_s: float,
    batch_per_gpu: int,
    grad_bytes: float,
    gpus: int,
    overlap_fraction: float,
    allreduce: Callable[[float, int], float] = allreduce_seconds,
) -> dict:
    """Weak-scaling efficiency of DDP at ``gpus`` GPUs (per-GPU batch fixed) from the single-GPU throughput.

    Step compute T = batch / images_per_s; the all-reduce (``allreduce(bytes, gpus)``) overlaps the part of the
    backward pass that runs after the first (largest) buckets are ready: ``overlap_fraction`` × T (for VGG:
    backward ≈ 2/3 of the step, and the classifier — 89% of the gradient bytes — is ready after ~1% of it).
    Exposed communication = max(0, all-reduce − overlap window). Returns the efficiency with that overlap and
    without any (the floor).
    """
    step = batch_per_gpu / images_per_s
    comm = allreduce(grad_bytes, gpus)
    exposed = max(0.0, comm - overlap_fraction * step)
    return {
        "gpus": gpus,
        "step_compute_s": step,
        "allreduce_s": comm,
        "exposed_comm_s": exposed,
        "efficiency": step / (step + exposed),
        "efficiency_no_overlap": step / (step + comm),
    }


def recipe_hours(images_per_s: float, epochs: int, gpus: int = 1, efficiency: float = 1.0) -> dict:
    """Epoch time (training images only) and GPU-hours of a recipe at a per-GPU throughput."""
    epoch_s = IMAGENET_TRAIN / (images_per_s * gpus * efficiency)
    return {
        "epochs": epochs,
        "gpus": gpus,
        "epoch_hours": epoch_s / 3600,
        "total_hours": epochs * epoch_s / 3600,
        "gpu_hours": epochs * epoch_s * gpus / 3600,
    }


def recipe_epochs() -> dict[str, int]:
    """Epochs of each recipe family, from its configs (vgg16's: every arch of a family trains as long)."""
    from train.config import load_config

    return {recipe: load_config(f"{recipe}/vgg16").sched.epochs for recipe in ("torchvision", "paper")}


def scaling_report(
    params: int,
    conv_mac_share: float,
    images_per_s: float,
    batch_per_gpu: int,
    gpu_counts: Sequence[int] = (8, 16, 32, 64),
) -> dict:
    """The scaling note's predictions (benchmarks/README.md) from a measured single-GPU throughput: gradient
    all-reduce volume, predicted DDP efficiency at each GPU count for fp32 gradients (what DDP reduces under
    autocast, the engine's default) and bf16 gradients (with a bf16 compression comm hook), and epoch time /
    GPU-hours of each recipe."""
    overlap = (
        2 / 3 * conv_mac_share
    )  # backward ≈ 2/3 of a step; the convs' share of it follows the classifier
    grads = {"fp32": 4 * params, "bf16": 2 * params}
    efficiency = {
        dtype: [predicted_efficiency(images_per_s, batch_per_gpu, nbytes, n, overlap) for n in gpu_counts]
        for dtype, nbytes in grads.items()
    }
    recipes = {}
    for recipe, epochs in recipe_epochs().items():
        rows = [recipe_hours(images_per_s, epochs)]
        for e in efficiency["fp32"]:
            rows.append(recipe_hours(images_per_s, epochs, e["gpus"], e["efficiency"]))
        recipes[recipe] = rows
    return {
        "assumptions": {
            "intra_node_bus_gbps": INTRA_NODE_BUS_GBPS,
            "inter_node_bus_gbps": INTER_NODE_BUS_GBPS,
            "gpus_per_node": GPUS_PER_NODE,
            "overlap_fraction_of_step": overlap,
            "weak_scaling_batch_per_gpu": batch_per_gpu,
            "images_per_s_per_gpu": images_per_s,
            "note": "interconnect bandwidths are assumed, not measured; training images only (no val pass)",
        },
        "allreduce_bytes_per_step": grads,
        "efficiency": efficiency,
        "recipes": recipes,
    }
