"""A preflight job: the same resources as the real launch, a few minutes, the whole stack checked and the run costed.

    python slurm/launch.py --arch vgg16_bn --gpus 16 --data /datasets/imagenet --partition gpu --preflight
    python slurm/launch.py --config demo --cluster slurm --nodes 2 --gpus 2 dist.device=cpu --preflight
    python slurm/launch.py ... --preflight --preflight-steps 50 --preflight-images 2000

``--preflight`` takes the real launch's flags (so the same plan: nodes, tasks, CPUs, memory, partition, setup
lines, container) and submits :class:`PreflightJob` instead of the training. Every task checks, and rank 0 writes
``<run_dir>/preflight/preflight.json`` and ``preflight.md`` (the job folder is ``<run_dir>/preflight/jobs/%j``:
nothing the real launch looks at, so a launch into the same run folder afterwards is neither refused nor confused):

- builds: NVIDIA driver, torch (its CUDA, cuDNN and NCCL), torchvision, DALI (its CUDA build; absent is a problem
  only when ``data.backend=dali``);
- what each task sees: host, CPUs it may run on (``os.sched_getaffinity``) against what SLURM granted
  (``--cpus-per-gpu``), the GPUs torch sees and SLURM gave, the one it uses (two tasks on one GPU: a problem);
- all-reduce bus bandwidth (nccl-tests' definition: busbw = algbw × 2(n-1)/n, algbw = bytes / time of the slowest
  rank) within each node and over all ranks (across nodes), NCCL on GPUs, gloo on CPUs, against a reference
  (:func:`link_reference`, :func:`network_reference`); gloo has none: the number is reported;
- the run folder written by every node and read back by every other node (a node-local run folder fails here);
- the data tree listed and a batch decoded by the configured loader (``data_pipeline.build_loader``);
- ``--preflight-steps`` timed training steps of the recipe (the training loop's ``train_step`` under DDP, after
  ``WARMUP_STEPS`` untimed ones) and as many validation batches: img/s, data wait, peak memory;
- the projected epoch time, wall time and GPU-hours of the recipe (epochs × steps per epoch at the measured step
  time, plus validation and start-up), and the ``--time`` to ask for, given the partition's limit and
  ``launch.max_num_timeout`` (each requeue continues the run);
- torchvision's released weights for the arch, when torch.hub's cache holds them and the data has ImageNet's 1,000
  classes: their 1-crop top-1 error on ``--preflight-images`` val images beside torchvision's figure.

One verdict line ends it: ``preflight OK: ...`` or ``preflight found N problem(s): ...``, each with its fix. The
launcher waits for the job, prints the verdict and the two paths, and exits 0 (OK) or 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import submitit

from train.files import atomic_write_text

PREFLIGHT_DIR = "preflight"  # <run_dir>/preflight: this job's folder, outputs and node files
PREFLIGHT_TIME_MIN = 30  # the preflight job's own time limit (at most the run's --time)
WARMUP_STEPS = 2  # untimed steps before the timed ones (cuDNN autotuning, DALI's first prefetch, compilation)
# the --time suggested: the projected wall time × this (the measured rate comes from a few steps)
HEADROOM = 1.2
LOW_BUSBW = 0.5  # a bus bandwidth below this fraction of its reference is a problem
# all-reduce message: large, so the time measures bandwidth rather than latency (nccl-tests' doc/PERFORMANCE.md)
NCCL_BYTES, NCCL_ITERS, NCCL_WARMUP = 256 * 2**20, 20, 5
GLOO_BYTES, GLOO_ITERS, GLOO_WARMUP = 16 * 2**20, 5, 1

# Per-GPU NVLink bandwidth, one direction (GB/s): half of NVIDIA's bidirectional per-GPU figure on each product's
# datasheet. nccl-tests (doc/PERFORMANCE.md) defines busbw so that it compares with this hardware peak whatever the
# rank count. (name pattern, excluded patterns, GB/s, what it is). PCIe cards and unknown GPUs: no reference.
NVLINK_GBS = (
    ("B200", ("PCIE",), 900.0, "NVLink 5, 1.8 TB/s per GPU"),
    ("H200", ("NVL", "PCIE"), 450.0, "NVLink 4, 900 GB/s per GPU"),
    ("H100", ("NVL", "PCIE"), 450.0, "NVLink 4, 900 GB/s per GPU"),
    ("A100-SXM", (), 300.0, "NVLink 3, 600 GB/s per GPU"),
    ("V100-SXM", (), 150.0, "NVLink 2, 300 GB/s per GPU"),
)


@dataclasses.dataclass(frozen=True)
class Options:
    steps: int = 20  # timed training steps (and at most this many validation batches)
    images: int = 500  # val images for torchvision's released weights, when cached


# ------------------------------------------------------------------------------------------ references


def link_reference(gpu_name: str) -> tuple[float, str] | None:
    """(GB/s, where it comes from) that an all-reduce among this node's GPUs should approach, or None."""
    upper = gpu_name.upper()
    for pattern, excluded, gbs, what in NVLINK_GBS:
        if pattern in upper and not any(x in upper for x in excluded):
            return gbs, f"{gpu_name}: {what} = {gbs:g} GB/s each way (NVIDIA datasheet)"
    return None


def network_reference(sys_root: str = "/sys/class/infiniband") -> tuple[float, str] | None:
    """(GB/s, where it comes from): this node's active InfiniBand/RoCE ports' line rate, summed, or None.

    A ring all-reduce across nodes moves 2(n-1)/n of the message through each node's network ports, so its busbw
    cannot exceed the node's aggregate line rate (nor the links inside the node)."""
    total, ports = 0.0, []
    root = Path(sys_root)
    if not root.is_dir():
        return None
    for port in sorted(root.glob("*/ports/*")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if "ACTIVE" not in (port / "state").read_text():
                continue
            rate = (port / "rate").read_text().strip()  # "400 Gb/sec (4X NDR)"
            total += float(rate.split()[0]) / 8
            ports.append(f"{port.parent.parent.name}/{port.name} {rate}")
    if not ports:
        return None
    return total, f"{len(ports)} active InfiniBand/RoCE port(s) ({', '.join(ports)}) = {total:g} GB/s"


# ------------------------------------------------------------------------------------------ per task


def _process_age_s() -> float | None:
    """Seconds since this process started (interpreter, imports and unpickling included), from /proc."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def builds(backend: str) -> dict[str, Any]:
    """Driver, torch, torchvision and DALI builds on this node, with their CUDA versions."""
    import torch
    import torchvision

    from data_pipeline.loader import DALI_BUILDS, dali_builds
    from train.distributed import nvidia_driver

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "driver": nvidia_driver(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": _cudnn(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "nccl": None,
        "torchvision": torchvision.__version__,
    }
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()  # (2, 21, 5); an int (2708) in older torch
            out["nccl"] = (
                ".".join(map(str, v)) if isinstance(v, tuple) else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"
            )
    try:
        import nvidia.dali as dali

        found = dali_builds()
        out["dali"] = dali.__version__
        out["dali_cuda"] = (
            ", ".join(f"{name} (CUDA {DALI_BUILDS[name]})" for name in found) or "unknown build"
        )
    except ImportError as e:
        out["dali"] = None
        out["dali_missing"] = f"not installed ({e})" + (
            "" if backend == "dali" else "; not needed: data.backend=torchvision"
        )
    return out


def _cudnn(v: int | None) -> str | None:
    """cuDNN's version number as text: 92400 → 9.24.0 (cuDNN 9: M×10000 + m×100 + p), 8902 → 8.9.2 (cuDNN 8)."""
    if not v:
        return None
    return (
        f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
        if v >= 90000
        else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"
    )


def task_view(device: Any) -> dict[str, Any]:
    """What this task sees: host, CPUs it may run on (and SLURM's ``--cpus-per-task``), CUDA devices, the device it
    uses (its UUID: two tasks on one GPU are found by it)."""
    import torch

    from slurm.job import cpu_affinity
    from train.distributed import slurm_gpus

    asked = os.environ.get("SLURM_CPUS_PER_TASK", "")
    view: dict[str, Any] = {
        "host": socket.gethostname(),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_list": cpu_affinity(),
        "cpus_asked": int(asked) if asked.isdigit() else None,  # what SLURM granted (--cpus-per-task)
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_gpus": slurm_gpus(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            view["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
        if device.type == "cuda":
            view["device_uuid"] = str(getattr(torch.cuda.get_device_properties(device), "uuid", "")) or None
    return view


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce_busbw(device: Any, group: Any = None) -> dict[str, Any]:
    """Time all-reduces of one float32 message over ``group`` (every rank of it calls this): nccl-tests' algbw
    (bytes / time of the slowest rank) and busbw = algbw × 2(n-1)/n, in GB/s (10^9 bytes)."""
    import torch
    import torch.distributed as dist

    nccl = dist.get_backend(group) == "nccl"
    size, iters, warmup = (
        (NCCL_BYTES, NCCL_ITERS, NCCL_WARMUP) if nccl else (GLOO_BYTES, GLOO_ITERS, GLOO_WARMUP)
    )
    n = dist.get_world_size(group)
    x = torch.zeros(size // 4, dtype=torch.float32, device=device)  # zeros: the sums stay finite
    for _ in range(warmup):
        dist.all_reduce(x, group=group)
    _sync(device)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x, group=group)
    _sync(device)
    took = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group)
    seconds = float(took.item())
    algbw = size / seconds / 1e9
    return {
        "backend": dist.get_backend(group),
        "ranks": n,
        "bytes": size,
        "iters": iters,
        "time_ms": seconds * 1e3,
        "algbw_gbs": algbw,
        "busbw_gbs": algbw * 2 * (n - 1) / n,
    }


def check_shared_folder(folder: Path, job_id: str, node: int, is_node_main: bool) -> list[str]:
    """Every node's first task writes a file into ``folder``; after a barrier every node reads every other's.
    Returns what this node could not read back (empty: shared)."""
    from train import distributed

    token = uuid.uuid4().hex
    mine = folder / f"{job_id}-node{node}.txt"
    problems: list[str] = []
    if is_node_main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(mine, f"{socket.gethostname()} {token}\n")
        except OSError as e:
            problems.append(f"{socket.gethostname()} cannot write {mine}: {e.strerror or e}")
    tokens = distributed.all_gather_object((node, token) if is_node_main else None)
    distributed.barrier()
    if is_node_main:
        for other, want in (t for t in tokens if t is not None):
            path = folder / f"{job_id}-node{other}.txt"
            try:
                host, got = path.read_text().split()
            except (OSError, ValueError):
                problems.append(f"{socket.gethostname()} cannot read node {other}'s {path.name}")
                continue
            if got != want:
                problems.append(f"{socket.gethostname()} reads another {path.name} than {host} wrote")
    distributed.barrier()
    if is_node_main:
        with contextlib.suppress(OSError):
            mine.unlink()
    return problems


def _endless(loader: Any):
    """Batches of ``loader`` epoch after epoch (a few steps may outrun a tiny tree's epoch)."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


class PreflightJob:
    """The preflight on one task: ``PreflightJob(to_dict(cfg), Options())()``; rank 0 returns the report."""

    def __init__(self, config: dict[str, Any], options: Options) -> None:
        self.config, self.options = config, options

    def __call__(self) -> dict[str, Any]:

        from slurm.job import start_task
        from train import distributed
        from train.config import from_dict

        started = time.perf_counter()
        age = _process_age_s() or 0.0
        cfg = from_dict(self.config)
        job_env = submitit.JobEnvironment()
        start_task(job_env)
        info = distributed.setup(cfg.dist.backend, cfg.dist.timeout_min, device=cfg.dist.device)
        try:
            return Checks(cfg, info, self.options, job_env, age, started).run()
        finally:
            distributed.cleanup()


class Checks:
    """The checks of one task, in lockstep with the other tasks (every collective is called on every rank)."""

    def __init__(
        self, cfg: Any, info: Any, options: Options, job_env: Any, age_s: float, started: float
    ) -> None:
        self.cfg, self.info, self.options = cfg, info, options
        self.job_id = str(job_env.job_id)
        self.cluster = job_env.cluster
        self.node = job_env.node if self.cluster != "debug" else 0
        self.num_nodes = job_env.num_nodes if self.cluster != "debug" else 1
        self.local_rank = info.local_rank
        # start-up: the age at `started` + the time since (less the checks a training does not run)
        self.started, self.age_s = started, age_s
        self.folder = Path(cfg.run_dir) / PREFLIGHT_DIR

    def say(self, text: str) -> None:
        if self.info.is_main:
            print(f"preflight: {text}", flush=True)

    def run(self) -> dict[str, Any]:
        from train import distributed

        cfg, info = self.cfg, self.info
        report: dict[str, Any] = {"job_id": self.job_id, "cluster": self.cluster, "nodes": self.num_nodes,
                                  "tasks": info.world_size, "arch": cfg.model.arch, "recipe": cfg.recipe,
                                  "run_dir": cfg.run_dir, "data_root": cfg.data.root,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        mine = {
            "rank": info.rank,
            "node": self.node,
            "local_rank": self.local_rank,
            **task_view(info.device),
            "builds": builds(cfg.data.backend),
        }
        tasks = distributed.all_gather_object(mine)
        report["tasks_seen"] = tasks
        self.say(f"{info.world_size} task(s) on {self.num_nodes} node(s), device {info.device}")
        self.say("run folder: written and read back by every node")
        t0 = time.perf_counter()  # what a training does not do: not counted in its start-up
        shared = check_shared_folder(self.folder / "nodes", self.job_id, self.node, self.local_rank == 0)
        report["run_folder_problems"] = sorted(
            {p for ps in distributed.all_gather_object(shared) for p in ps}
        )
        self.say("all-reduce bus bandwidth")
        report["all_reduce"] = self.bandwidth(tasks)
        self.started += time.perf_counter() - t0
        self.say("data: listing the tree, decoding a batch")
        loaders, report["data"] = self.data()
        errors = distributed.all_gather_object((mine["host"], report["data"].get("error")))
        failed = [(host, error) for host, error in errors if error]
        if not failed:
            self.say(f"training: {WARMUP_STEPS} + {self.options.steps} steps")
            try:
                report["training"] = self.training(*loaders)
            except (
                Exception
            ) as e:  # out of memory, ...: the same on every rank, as the same step runs everywhere
                report["training"] = {"error": _one_line(e)}
            if "error" not in report["training"]:
                report["weights"] = self.released_weights(loaders[1])
            else:
                report["weights"] = {"skipped": "the training steps failed"}
            for loader in loaders:
                loader.close()
        else:
            if "error" not in report["data"]:  # another rank's: name it
                report["data"]["error"] = f"on {failed[0][0]}: {failed[0][1]}"
            report["training"] = {"skipped": "the data check failed"}
            report["weights"] = {"skipped": "the data check failed"}
        if not info.is_main:
            return {"rank": info.rank}
        report["projection"] = project(cfg, report, info.world_size)
        report["problems"] = problems(cfg, report)
        report["verdict"] = verdict(report["problems"])
        return write_report(self.folder, report)

    # ----------------------------------------------------------------------------------- bandwidth

    def bandwidth(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        """Within each node (all nodes at once, one group per node; the slowest node is reported, with each
        node's figure) and over all ranks (across nodes)."""
        import torch.distributed as dist

        from train import distributed

        info, out = self.info, {}
        by_node: dict[int, list[int]] = {}
        for task in tasks:  # the ranks of each node, whatever SLURM's distribution (block, cyclic)
            by_node.setdefault(task["node"], []).append(task["rank"])
        hosts = {task["node"]: task["host"] for task in tasks}
        gpu = tasks[0]["gpus"][0]["name"] if info.device.type == "cuda" and tasks[0]["gpus"] else None
        link = link_reference(gpu) if gpu else None
        nets = distributed.all_gather_object(network_reference())
        if info.world_size == 1:
            one = {"skipped": "one task: nothing to all-reduce (DDP is not used)"}
            return {"within_node": one, "across_nodes": one}
        per_node = max(len(ranks) for ranks in by_node.values())
        if per_node == 1:
            out["within_node"] = {"skipped": "1 task per node"}
        else:
            groups = {}
            if len(by_node) > 1:  # every rank creates every group, in the same order
                groups = {n: dist.new_group(sorted(by_node[n])) for n in sorted(by_node)}
            res = all_reduce_busbw(info.device, groups.get(self.node))  # one node: the default group
            res["reference"] = _reference(res["backend"], link, None)
            every = dict(distributed.all_gather_object((self.node, res)))  # each node's figure
            slowest = min(every, key=lambda n: every[n]["busbw_gbs"])
            res = {**every[slowest], "node": hosts[slowest],
                   "per_node_busbw_gbs": {hosts[n]: every[n]["busbw_gbs"] for n in sorted(every)}}  # fmt: skip
            out["within_node"] = res
            for group in groups.values():
                with contextlib.suppress(Exception):
                    dist.destroy_process_group(group)
        if len(by_node) == 1:
            out["across_nodes"] = {"skipped": "1 node"}
        else:
            res = all_reduce_busbw(info.device)
            net = min(nets, key=lambda n: n[0]) if all(n is not None for n in nets) else None
            res["reference"] = _reference(res["backend"], link if per_node > 1 else None, net)
            out["across_nodes"] = res
        return out

    # ---------------------------------------------------------------------------------------- data

    def data(self) -> tuple[tuple[Any, Any] | None, dict[str, Any]]:
        from data_pipeline import build_loader
        from data_pipeline.layout import DataError

        cfg, info = self.cfg, self.info
        out: dict[str, Any] = {"backend": cfg.data.backend, "format": cfg.data.format}
        try:
            t0 = time.perf_counter()
            train = build_loader(cfg, "train", rank=info.rank, world_size=info.world_size, device=info.device)
            val = build_loader(cfg, "val", rank=info.rank, world_size=info.world_size, device=info.device)
            out["list_s"] = time.perf_counter() - t0
            out.update(loader=train.backend, train_images=train.dataset_size, val_images=val.dataset_size,
                       classes=len(train.classes), steps_per_epoch=len(train), val_batches=len(val))  # fmt: skip
            if len(train.classes) != cfg.model.num_classes:
                raise DataError(
                    f"{cfg.data.root} has {len(train.classes)} classes but model.num_classes="
                    f"{cfg.model.num_classes}: set model.num_classes={len(train.classes)}, or check --data"
                )
            t0 = time.perf_counter()
            batches = _endless(train)
            images, labels = next(batches)
            out["first_batch_s"] = time.perf_counter() - t0
            out["sample"] = {"shape": list(images.shape), "dtype": str(images.dtype), "device": str(images.device),
                             "labels": [int(x) for x in labels[:8].tolist()],
                             "mean": float(images.float().mean()), "std": float(images.float().std())}  # fmt: skip
            self._batches = itertools.chain([(images, labels)], batches)
            return (train, val), out
        except Exception as e:  # DataError: its own line; anything else: with its type
            out["error"] = str(e) if isinstance(e, DataError) else _one_line(e)
            return None, out

    # ------------------------------------------------------------------------------------ training

    def training(self, train_loader: Any, val_loader: Any) -> dict[str, Any]:
        import torch

        from train import distributed
        from train.engine import autocast, set_backend_flags, train_step, wrap_for_training
        from train.models import build_model_from_config
        from train.optim import build_optimizer
        from train.report import max_memory_gb

        cfg, info, device = self.cfg, self.info, self.info.device
        set_backend_flags(cfg)
        torch.manual_seed(cfg.seed)
        model = build_model_from_config(cfg.model)
        model.to(
            device, memory_format=torch.channels_last if cfg.train.channels_last else torch.preserve_format
        )
        optimizer = build_optimizer(cfg, model)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        # the trainer's own wrapping: DDP, dist.grad_compression's hook, torch.compile
        _, forward = wrap_for_training(cfg, model, device, info.distributed, logging.getLogger(__name__))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        startup_s = self.age_s + time.perf_counter() - self.started
        forward.train()
        t0 = time.perf_counter()
        for _ in range(WARMUP_STEPS):
            images, labels = next(self._batches)
            train_step(cfg, forward, model, optimizer, scaler, images, labels)
        _sync(device)
        warmup_s = time.perf_counter() - t0
        steps, data_wait = self.options.steps, 0.0
        distributed.barrier()
        t0 = end = time.perf_counter()
        for _ in range(steps):
            images, labels = next(self._batches)
            data_wait += time.perf_counter() - end
            _, loss = train_step(cfg, forward, model, optimizer, scaler, images, labels)
            end = time.perf_counter()
        _sync(device)
        step_s = (time.perf_counter() - t0) / steps
        loss_value = float(loss.detach().float().item())
        peak = max_memory_gb(device)
        # validation: forward only, the training loop's autocast, on the bare model (as Trainer._end_epoch)
        model.eval()
        val_n = min(steps, len(val_loader))
        distributed.barrier()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(cfg, device):
            for images, _ in itertools.islice(val_loader, val_n):
                model(images)
        _sync(device)
        val_step_s = (time.perf_counter() - t0) / max(1, val_n)
        slowest = distributed.all_gather_object(
            {
                "step_s": step_s,
                "val_step_s": val_step_s,
                "data_wait_s": data_wait / steps,
                "peak_gib": peak,
                "startup_s": startup_s,
                "warmup_s": warmup_s,
                "loss": loss_value,
            }
        )
        step_s = max(r["step_s"] for r in slowest)
        return {
            "warmup_steps": WARMUP_STEPS,
            "steps": steps,
            "global_batch": cfg.data.batch_size,
            "step_s": step_s,
            "img_per_s": cfg.data.batch_size / step_s,
            "data_wait_s": max(r["data_wait_s"] for r in slowest),
            "data_wait_share": max(r["data_wait_s"] for r in slowest) / step_s,
            "peak_memory_gib": max(r["peak_gib"] for r in slowest),
            "peak_memory_what": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS",
            "warmup_s": max(r["warmup_s"] for r in slowest),
            "val_batches": val_n,
            "val_step_s": max(r["val_step_s"] for r in slowest),
            "startup_s": max(r["startup_s"] for r in slowest),
            "last_loss": slowest[0]["loss"],
            "precision": cfg.train.precision,
            "compile": cfg.train.compile,
        }

    # ---------------------------------------------------------------------------- released weights

    def released_weights(self, val_loader: Any) -> dict[str, Any]:
        """torchvision's weights for the arch on K val images, when every node's torch.hub cache holds them."""
        from evaluate.core import count_loader
        from evaluate.loading import load_model, released_weights
        from train import distributed
        from train.models import ARCHS

        cfg, info = self.cfg, self.info
        arch, why = cfg.model.arch, None
        if self.options.images == 0:
            why = "--preflight-images 0"
        elif arch not in ARCHS or not ARCHS[arch].in_torchvision:
            why = f"torchvision released no weights for {arch}"
        elif cfg.model.num_classes != 1000 or cfg.model.classifier_width != 4096:
            why = f"model.num_classes={cfg.model.num_classes}: not ImageNet's 1,000 classes"
        weights = None
        if why is None:
            weights = released_weights("DEFAULT", arch=arch)
            if not weights.path.is_file():
                why = (
                    f"{weights.name} is not in torch.hub's cache ({weights.path}): `python evaluate --weights "
                    f"{weights.name}` downloads it"
                )
        whys = distributed.all_gather_object(why)
        why = next((w for w in whys if w), None)
        if why or weights is None:
            return {"skipped": why}
        from torchvision.models import get_weight

        expected = round(100.0 - get_weight(weights.name).meta["_metrics"]["ImageNet-1K"]["acc@1"], 3)
        per_rank = val_loader.batch_size
        batches = max(1, math.ceil(self.options.images / (per_rank * info.world_size)))
        model = load_model(weights.path, arch=arch).model.to(self.info.device)

        class Few:
            def __len__(self) -> int:
                return min(batches, len(val_loader))

            def __iter__(self):
                return itertools.islice(val_loader, len(self))

        counts = count_loader(model, Few(), info.device, cfg.train.precision, cfg.train.channels_last)
        sigma = 100.0 * math.sqrt(max(expected / 100 * (1 - expected / 100), 1e-4) / max(1, counts.n))
        return {"weights": weights.name, "images": counts.n, "top1_err": counts.top1_err,
                "torchvision_top1_err": expected, "sigma": sigma, "val_resize": cfg.data.val_resize,
                "val_crop": cfg.data.val_crop, "backend": cfg.data.backend}  # fmt: skip


def _reference(backend: str, link: tuple[float, str] | None, net: tuple[float, str] | None) -> dict[str, Any]:
    """The figure a busbw should approach: the slower of the node's GPU links and its network, with its source."""
    if backend != "nccl":
        return {
            "gbs": None,
            "source": f"{backend} on CPUs: no reference (nccl-tests measures NCCL); reported only",
        }
    known = [r for r in (link, net) if r is not None]
    if not known:
        return {"gbs": None, "source": "no reference known for these GPUs/ports (PCIe, or no InfiniBand)"}
    gbs, source = min(known, key=lambda r: r[0])
    return {"gbs": gbs, "source": source + "; busbw as nccl-tests defines it (doc/PERFORMANCE.md)"}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------------------------------ rank 0


def partition_limit_min(partition: str | None) -> int | None:
    """The partition's time limit in minutes (``sinfo -h -o %l``), or None: unlimited, or SLURM cannot say."""
    from slurm.resources import SINFO_TIMEOUT_S, SinfoUnavailable, run_sinfo
    from slurm.submit import LaunchError, parse_time_min

    part = partition or os.environ.get("SLURM_JOB_PARTITION")
    if not part:
        return None
    try:
        text = run_sinfo(["sinfo", "-h", "-p", part, "-o", "%l"], SINFO_TIMEOUT_S).split()
        return parse_time_min(text[0]) if text and text[0] not in ("infinite", "n/a") else None
    except (SinfoUnavailable, LaunchError):
        return None


def format_time(minutes: int) -> str:
    """Minutes as SLURM's ``[D-]HH:MM:SS``."""
    days, rest = divmod(int(minutes), 24 * 60)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def suggest_minutes(work_s: float, overhead_s: float = 0.0) -> int:
    """A --time for one job that trains ``work_s`` (× HEADROOM) after ``overhead_s`` (start-up, and the stop
    signal's lead): up to 15 minutes at least (a job of 10 minutes or less has every signal counted as a timeout
    by submitit), to the next quarter hour up to an hour, to the next half hour past it."""
    minutes = math.ceil((work_s * HEADROOM + overhead_s) / 60)
    step = 30 if minutes > 60 else 15
    return max(15, math.ceil(minutes / step) * step)


def project(cfg: Any, report: dict[str, Any], gpus: int) -> dict[str, Any]:
    """Epoch time, wall time and GPU-hours of the recipe at the measured rate, and the --time to ask for: one job
    for the whole run where the partition allows it, else its limit and the jobs (requeues) that takes."""
    from slurm.submit import parse_time_min

    t, d = report.get("training") or {}, report.get("data") or {}
    if "step_s" not in t:
        return {"skipped": "no training steps were timed"}
    train_s = d["steps_per_epoch"] * t["step_s"]
    val_s = d["val_batches"] * t["val_step_s"]
    epoch_s = train_s + val_s
    startup_s = t["startup_s"] + t["warmup_s"]  # each job (start) pays it again
    epochs = cfg.sched.epochs
    work_s = epochs * epoch_s
    la = cfg.launch
    overhead_s = startup_s + la.signal_delay_s  # per job: start-up, and the stop signal's lead on the limit

    def jobs(minutes: int) -> int:
        return math.ceil(work_s * HEADROOM / max(60.0, minutes * 60 - overhead_s))

    asked = parse_time_min(la.time)
    limit = partition_limit_min(la.partition)
    suggest = suggest_minutes(work_s, overhead_s)
    if limit and suggest > limit:
        suggest = limit
    used = (report.get("tasks_seen") or [{}])[0].get("device", "cpu")
    return {
        "epochs": epochs,
        "steps_per_epoch": d["steps_per_epoch"],
        "train_epoch_s": train_s,
        "val_epoch_s": val_s,
        "epoch_s": epoch_s,
        "startup_s": startup_s,
        "total_s": startup_s + work_s,  # in one job; each requeue adds a start-up
        "gpu_hours": (startup_s + work_s) / 3600 * gpus,
        "gpus": gpus,
        "device_hours_what": "GPU-hours" if used.startswith("cuda") else "CPU-process-hours",
        "time_asked": la.time,
        "time_asked_min": asked,
        "max_num_timeout": la.max_num_timeout,
        "signal_delay_s": la.signal_delay_s,
        "partition_limit_min": limit,
        "jobs_at_time_asked": jobs(asked),
        "time_suggested": format_time(suggest),
        "jobs_at_time_suggested": jobs(suggest),
        "headroom": HEADROOM,
    }


def problems(cfg: Any, r: dict[str, Any]) -> list[str]:
    """Each problem found, in one line naming its fix."""
    out: list[str] = []
    for task in r["tasks_seen"]:
        b = task["builds"]
        if b.get("dali") is None and cfg.data.backend == "dali":
            out.append(
                f"{task['host']}: DALI {b['dali_missing']}, but data.backend=dali: pip install -e '.[cuda12]' or "
                "'.[cuda13]' for torch's CUDA, or data.backend=torchvision"
            )
            break
    for task in r["tasks_seen"]:
        if task["cpus_asked"] and task["cpus"] < task["cpus_asked"]:
            out.append(
                f"rank {task['rank']} on {task['host']} may run on {task['cpus']} CPU(s), SLURM granted "
                f"{task['cpus_asked']} (--cpus-per-gpu): srun did not pass --cpus-per-task on; check --srun options"
            )
            break
    used: dict[tuple[str, str], int] = {}
    for task in r["tasks_seen"]:
        key = (task["host"], task.get("device_uuid") or "")
        if key[1] and key in used:
            out.append(
                f"ranks {used[key]} and {task['rank']} on {task['host']} train on the same GPU ({key[1]}): one GPU "
                "per task (leave CUDA_VISIBLE_DEVICES to SLURM; a site binding GPUs: srun --gpus-per-task=1)"
            )
            break
        used[key] = task["rank"]
    for p in r["run_folder_problems"][:1]:
        out.append(f"run folder not shared by all nodes ({p}): put --run-dir on storage every node mounts")
    for where, res in (r.get("all_reduce") or {}).items():
        ref = (res.get("reference") or {}).get("gbs") if isinstance(res, dict) else None
        if ref and res["busbw_gbs"] < LOW_BUSBW * ref:
            out.append(
                f"all-reduce {where.replace('_', ' ')}: busbw {res['busbw_gbs']:.1f} GB/s is under half of "
                f"{ref:g} GB/s: run with NCCL_DEBUG=INFO to see the transport (NET/Socket instead of IB?), check "
                "NCCL_IB_HCA/NCCL_SOCKET_IFNAME and `nvidia-smi topo -m`"
            )
    if "error" in r["data"]:
        out.append(f"data: {r['data']['error']}")
    error = (r.get("training") or {}).get("error")
    if error:
        per_gpu = cfg.data.batch_size // max(1, r["tasks"])
        fix = (
            f"lower data.batch_size ({per_gpu} per GPU now; the lr stays the recipe's unless "
            "optim.lr_scaling=linear), or train.precision=bf16"
            if "out of memory" in error.lower()
            else "see the job's log for the traceback"
        )
        out.append(f"training steps failed: {error}: {fix}")
    t = r.get("training") or {}
    if "data_wait_share" in t and t["data_wait_share"] > 0.2:
        out.append(
            f"data loading stalls training: {100 * t['data_wait_share']:.0f}% of a step waits for data "
            "(raise --cpus-per-gpu / data.workers, or use data.backend=dali)"
        )
    w = r.get("weights") or {}
    if "top1_err" in w and abs(w["top1_err"] - w["torchvision_top1_err"]) > max(2.0, 3 * w["sigma"]):
        out.append(
            f"{w['weights']}: top-1 err {w['top1_err']:.2f}% on {w['images']} val images vs torchvision's "
            f"{w['torchvision_top1_err']:.2f}%: check the val tree's labels (sorted wnid folders) and preprocessing"
        )
    p = r.get("projection") or {}
    if "jobs_at_time_asked" in p and p["jobs_at_time_asked"] - 1 > p["max_num_timeout"]:
        out.append(
            f"--time {p['time_asked']} needs {p['jobs_at_time_asked']} jobs (requeues) for the projected "
            f"{_hours(p['total_s'])}, launch.max_num_timeout={p['max_num_timeout']} allows "
            f"{p['max_num_timeout'] + 1}: give --time {p['time_suggested']} or "
            f"launch.max_num_timeout={p['jobs_at_time_asked']}"
        )
    return out


def verdict(found: list[str]) -> str:
    if not found:
        return "preflight OK: every check passed"
    return f"preflight found {len(found)} problem(s): " + " | ".join(found)


def _hours(seconds: float) -> str:
    """``12.3 s`` under a minute, else ``H:MM:SS``."""
    from train.report import format_duration

    return f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds)


def write_report(folder: Path, r: dict[str, Any]) -> dict[str, Any]:
    """preflight.json and preflight.md in ``folder``; returns what the launcher prints."""

    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "preflight.json", folder / "preflight.md"
    atomic_write_text(json_path, json.dumps(r, indent=2, default=str) + "\n")
    atomic_write_text(md_path, markdown(r))
    print(r["verdict"], flush=True)
    return {"verdict": r["verdict"], "ok": not r["problems"], "json": str(json_path), "md": str(md_path)}


def markdown(r: dict[str, Any]) -> str:
    """The report as a page a person reads: verdict first, then each check."""
    lines = [f"# Preflight of {r['arch']} ({r['recipe']} recipe), job {r['job_id']}", "",
             f"**{r['verdict']}**", "",
             f"{r['tasks']} task(s) on {r['nodes']} node(s) ({r['cluster']}), {r['created']}; run folder "
             f"`{r['run_dir']}`, data `{r['data_root']}`.", ""]  # fmt: skip
    lines += [f"- problem: {p}" for p in r["problems"]] + ([""] if r["problems"] else [])
    p = r.get("projection") or {}
    lines += ["## Cost of the run", ""]
    if "total_s" in p:
        lines += [
            f"- epoch: {_hours(p['epoch_s'])} ({p['steps_per_epoch']} steps: {_hours(p['train_epoch_s'])} training "
            f"+ {_hours(p['val_epoch_s'])} validation)",
            f"- whole run: {p['epochs']} epochs + start-up {p['startup_s']:.0f} s = {_hours(p['total_s'])} wall, "
            f"{p['gpu_hours']:.2f} {p['device_hours_what']} ({p['gpus']} task(s))",
            f"- `--time`: asked {p['time_asked']}, i.e. {p['jobs_at_time_asked']} job(s) (requeues continue the "
            f"run; launch.max_num_timeout={p['max_num_timeout']} allows {p['max_num_timeout'] + 1}); suggested "
            f"`--time {p['time_suggested']}` ({p['jobs_at_time_suggested']} job(s); {p['headroom']:g}× headroom"
            + (
                f", partition limit {format_time(p['partition_limit_min'])}"
                if p["partition_limit_min"]
                else ""
            )
            + ")",
        ]
    else:
        lines.append(f"- not projected: {p.get('skipped')}")
    t = r.get("training") or {}
    lines += ["", "## Training steps", ""]
    if "step_s" in t:
        lines += [
            f"- {t['steps']} timed steps after {t['warmup_steps']} warm-up ({t['warmup_s']:.1f} s), global batch "
            f"{t['global_batch']}, {t['precision']}{', compiled' if t['compile'] else ''}: {t['step_s'] * 1e3:.1f} "
            f"ms/step, {t['img_per_s']:.1f} img/s",
            f"- data wait {t['data_wait_s'] * 1e3:.1f} ms/step ({100 * t['data_wait_share']:.0f}% of a step); peak "
            f"memory {t['peak_memory_gib']:.2f} GiB ({t['peak_memory_what']}, the largest task)",
            f"- validation: {t['val_step_s'] * 1e3:.1f} ms per batch ({t['val_batches']} batches); start-up "
            f"{t['startup_s']:.1f} s (process start to the first step, slowest task)",
        ]
    else:
        lines.append(f"- failed: {t['error']}" if "error" in t else f"- skipped: {t.get('skipped')}")
    lines += ["", "## All-reduce bus bandwidth", "",
              "busbw = algbw × 2(n-1)/n, algbw = message bytes / time of the slowest rank (nccl-tests).", ""]  # fmt: skip
    for where, res in (r.get("all_reduce") or {}).items():
        name = where.replace("_", " ")
        if "busbw_gbs" in res:
            ref = res["reference"]
            against = f"reference {ref['gbs']:g} GB/s: " if ref["gbs"] else ""
            if len(res.get("per_node_busbw_gbs", {})) > 1:
                each = ", ".join(f"{h} {g:.2f}" for h, g in res["per_node_busbw_gbs"].items())
                name += f" (the slowest node, {res['node']}; each: {each} GB/s)"
            lines.append(
                f"- {name}: {res['busbw_gbs']:.2f} GB/s busbw ({res['algbw_gbs']:.2f} algbw), {res['backend']}, "
                f"{res['ranks']} ranks, {res['bytes'] // 2**20} MiB × {res['iters']}; {against}{ref['source']}"
            )
        else:
            lines.append(f"- {name}: {res.get('skipped')}")
    d = r.get("data") or {}
    lines += ["", "## Data", ""]
    if "error" in d:
        lines.append(f"- failed: {d['error']}")
    else:
        s = d["sample"]
        lines += [
            f"- {d['loader']} ({d['format']}): {d['train_images']:,} train / {d['val_images']:,} val images, "
            f"{d['classes']} classes, listed in {d['list_s']:.1f} s; {d['steps_per_epoch']} steps per epoch",
            f"- first batch decoded in {d['first_batch_s']:.2f} s: {s['shape']} {s['dtype']} on {s['device']}, "
            f"mean {s['mean']:.3f}, std {s['std']:.3f}",
        ]
    w = r.get("weights") or {}
    lines += ["", "## torchvision's released weights", ""]
    if "top1_err" in w:
        lines.append(
            f"- {w['weights']}: top-1 err {w['top1_err']:.2f}% (± {w['sigma']:.2f}) on {w['images']} val images "
            f"(1 crop, resize {w['val_resize']} / crop {w['val_crop']}, {w['backend']}); torchvision's figure "
            f"{w['torchvision_top1_err']:.2f}% (50,000 images)"
        )
    else:
        lines.append(f"- skipped: {w.get('skipped')}")
    lines += ["", "## Run folder", ""]
    lines.append(
        "- every node wrote a file and read every other node's back"
        if not r["run_folder_problems"]
        else "- " + "; ".join(r["run_folder_problems"])
    )
    lines += [
        "",
        "## Tasks",
        "",
        "| rank | host | node | CPUs | device | GPUs torch sees | SLURM's GPUs |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in r["tasks_seen"]:
        gpus = ", ".join(g["name"] for g in task["gpus"]) or "none"
        lines.append(f"| {task['rank']} | {task['host']} | {task['node']} | {task['cpu_list']} | {task['device']} | "
                     f"{gpus} | {task['slurm_gpus'] or 'none'} |")  # fmt: skip
    lines += ["", "## Builds", ""]
    builds_of: dict[str, list[str]] = {}  # the same builds on several nodes: one line
    for task in r["tasks_seen"]:
        hosts = builds_of.setdefault(json.dumps(task["builds"], sort_keys=True), [])
        if task["host"] not in hosts:
            hosts.append(task["host"])
    for key, hosts in builds_of.items():
        b = json.loads(key)
        dali = f"DALI {b['dali']} ({b['dali_cuda']})" if b.get("dali") else f"DALI {b.get('dali_missing')}"
        lines.append(
            f"- {', '.join(hosts)}: {b['driver']}"
            + f"; torch {b['torch']} (CUDA {b['torch_cuda'] or 'none: CPU build'}, cuDNN {b['cudnn'] or 'n/a'}, "
            f"NCCL {b['nccl'] or 'n/a'}); torchvision {b['torchvision']}; {dali}; Python {b['python']}"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ launcher


def preflight_plan(plan: Any) -> Any:
    """The real launch's plan with the preflight's job folder and a short time limit (the same resources)."""
    folder = (
        Path(plan.cfg.run_dir) / PREFLIGHT_DIR / "jobs" / "%j"
    )  # not "slurm": evaluate --report would take it for a run
    return dataclasses.replace(plan, folder=folder, timeout_min=min(plan.timeout_min, PREFLIGHT_TIME_MIN))


def make_preflight_executor(plan: Any) -> submitit.Executor:
    """The real launch's executor for ``plan`` (site options, container, setup lines), as a plain job: no requeue
    and no retry teardown (a preflight is not resumed)."""
    from slurm.submit import make_executor

    executor = make_executor(plan)
    if plan.cluster == "slurm":
        extra = {
            k: v for k, v in executor.parameters.get("additional_parameters", {}).items() if k != "requeue"
        }
        executor.update_parameters(
            job_name=f"preflight-{Path(plan.cfg.run_dir).name}", teardown=[], additional_parameters=extra
        )
    return executor


def run_preflight(plan: Any, options: Options, force: bool = False, out: TextIO | None = None) -> int:
    """Submit the preflight job of ``plan``, follow rank 0's log, print the verdict and the report's paths.
    0: every check passed; 1: problems (named) or the job failed. LaunchError for what refuses a launch."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError

    from slurm.submit import (
        LaunchError,
        _failure,
        _sbatch_error,
        _submission_env,
        follow,
        log_paths,
        never_starts,
        node_local_problem,
        presubmit_problem,
        require_slurm_clients,
    )
    from train.config import to_dict

    out = out or sys.stdout
    plan = preflight_plan(plan)
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if plan.cluster == "slurm":
        require_slurm_clients()
    problem = node_local_problem(plan.cfg) or (None if force else presubmit_problem(plan.cfg))
    if problem:
        raise LaunchError(problem)
    (Path(plan.cfg.run_dir) / PREFLIGHT_DIR).mkdir(parents=True, exist_ok=True)
    executor = make_preflight_executor(plan)
    job_fn = PreflightJob(to_dict(plan.cfg), options)
    try:
        with _submission_env():
            job = executor.submit(job_fn)
    except (FailedJobError, FailedSubmissionError) as e:
        raise LaunchError(_sbatch_error(e)) from None
    where = {"slurm": "SLURM", "local": "this machine", "debug": "this process"}[plan.cluster]
    print(f"submitted preflight job {job.job_id} to {where}: {plan.summary()}", file=out)
    if plan.cluster != "debug":
        stdout, stderr = log_paths(job)
        print(f"logs: {stdout} (rank 0; stderr: {stderr.name})", file=out, flush=True)
        reason = never_starts(job.job_id) if plan.cluster == "slurm" else None
        if reason:  # the real launch would wait forever too: that is the preflight's finding
            job.cancel(check=False)
            part = (
                f"partition {plan.cfg.launch.partition}"
                if plan.cfg.launch.partition
                else "the default partition"
            )
            print(
                f"preflight found 1 problem(s): job {job.job_id} was pending for {reason}, which SLURM never starts "
                f"while it holds (over the limits of {part}, or its nodes are down or drained: scontrol show "
                f"partition); cancelled it: launch fewer --gpus/--nodes, CPUs or memory, or another --partition",
                file=out,
            )
            return 1
        if plan.cluster == "slurm":
            print(f"waiting for job {job.job_id} to start and end (Ctrl-C stops waiting; scancel {job.job_id})",
                  file=out, flush=True)  # fmt: skip
        try:
            follow(job, out)
        except KeyboardInterrupt:
            print(f"\nstopped following; preflight job {job.job_id} keeps running", file=sys.stderr)
            return 130
    try:
        result = job.results()[0]
    except UncompletedJobError as e:
        _, err = log_paths(job)
        print(f"error: preflight job {job.job_id} failed: {_failure(e)} (log: {err})", file=sys.stderr)
        return 1
    print(result["verdict"], file=out)
    print(f"report: {result['md']} (and {Path(result['json']).name})", file=out)
    return 0 if result["ok"] else 1


__all__ = [
    "Options",
    "PreflightJob",
    "link_reference",
    "make_preflight_executor",
    "markdown",
    "network_reference",
    "preflight_plan",
    "project",
    "run_preflight",
    "suggest_minutes",
]
