"""Distributed setup in one place: torchrun's variables, else SLURM's, else a single process.

    torchrun --nproc_per_node=2 -m train --config demo          # CPU: gloo; GPU: NCCL, one process per GPU
    srun --ntasks-per-node=8 --gpus-per-node=8 python -m train ...  # SLURM: SLURM_PROCID / SLURM_NTASKS / ...

The device (``dist.device``, :func:`choose_device`): ``auto`` takes the GPU when torch sees one, and the CPU
otherwise, except in a task that SLURM gave GPUs (``SLURM_GPUS_ON_NODE``, ``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``):
there a torch that sees none (a driver too old for its CUDA build, a broken node) stops the task with one line
(:func:`no_gpu_reason`) instead of training on the CPU for days. ``cpu`` trains on the CPU on purpose (the local
test cluster's fake GPUs); ``cuda`` requires a GPU anywhere. One visible GPU per task (sites that bind GPUs to
tasks: ``--gpus-per-task=1``, ``--gpu-bind``) is used whatever the local rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


class DistError(RuntimeError):
    """A distributed-setup problem, described in one line."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hostnames of a SLURM node list, expanded by SLURM itself: ``gpu-a[001-002],gpu-b7`` → ``gpu-a001``,
    ``gpu-a002``, ``gpu-b7``.

    ``scontrol show hostnames`` is SLURM's own parser (every form SLURM writes, also ones like ``n[1-2]-ib[3-4]``),
    and it is on PATH wherever a job runs. Without it (a node list copied to a machine without SLURM's clients)
    submitit's parser is used, the one behind ``submitit.JobEnvironment().hostnames`` (the rendezvous address of
    jobs launched through ``slurm/launch.py``).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise DistError("empty SLURM node list")
    scontrol = shutil.which("scontrol")
    failed = ""
    if scontrol:
        proc = subprocess.run(
            [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60
        )
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()
        # e.g. "Could not establish a configuration source": a machine with SLURM's clients but no slurm.conf
        lines = (proc.stderr.strip() or "no output").splitlines()
        failed = f"; scontrol show hostnames failed: {lines[-1]}"
    from submitit.slurm.slurm import SlurmParseException, _parse_node_list

    try:
        return _parse_node_list(nodelist)
    except SlurmParseException:
        raise DistError(f"cannot parse SLURM node list {nodelist!r}{failed}") from None


def first_host(nodelist: str) -> str:
    """The first hostname of a SLURM node list (rank 0 runs there): the rendezvous host, ``MASTER_ADDR``."""
    return slurm_hostnames(nodelist)[0]


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistError(f"environment variable {name}={value!r} is not an integer") from None


def detect() -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, source) from the environment, without initialising anything.

    torchrun's RANK/WORLD_SIZE/LOCAL_RANK win over SLURM's, so ``srun torchrun ...`` and a torchrun inside an
    ``salloc`` shell both work. A SLURM allocation with one task is a single process.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        return _env_int("RANK"), local, _env_int("WORLD_SIZE"), "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and _env_int("SLURM_NTASKS") > 1:
        # SLURM_NTASKS is the world size: torchvision's SLURM branch never read it (a classic trap).
        local = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        return _env_int("SLURM_PROCID"), local, _env_int("SLURM_NTASKS"), "slurm"
    return 0, 0, 1, "single"


def ephemeral_port_range() -> tuple[int, int]:
    """Linux's range for outgoing connections' local ports (``net.ipv4.ip_local_port_range``)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def master_port(job_id: str, restart: int) -> int:
    """The rendezvous port of one run of a job: the same on every task (no communication needed), different per
    job and per requeue, and below the ephemeral range.

    submitit's default derives a port in 20000-60000 from the job id alone, which overlaps Linux's ephemeral ports
    (32768-60999): an outgoing connection can hold it, and ``init_process_group`` fails with EADDRINUSE while the
    other ranks wait for their rendezvous timeout. Ports below the ephemeral range are only taken by explicit
    binds. crc32, not ``hash()``: Python randomises string hashes per process.
    """
    lo_eph, hi_eph = ephemeral_port_range()
    lo, hi = 20000, lo_eph  # [20000, 32768) with Linux's defaults
    if hi - lo < 1000:  # an unusual ephemeral range: use what lies above it instead
        lo, hi = hi_eph + 1, 65536
    if hi - lo < 1000:
        lo, hi = 20000, 32768
    return lo + zlib.crc32(f"{job_id}:{restart}".encode()) % (hi - lo)


def restart_count() -> int:
    """How often SLURM has restarted this job (requeue, node failure); 0 on the first run and off SLURM."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")  # set where SLURM gave GPUs


def slurm_gpus(env: Mapping[str, str] | None = None) -> str | None:
    """How SLURM says this task got GPUs (``SLURM_GPUS_ON_NODE=8``), or None where it gave none."""
    env = os.environ if env is None else env
    for var in SLURM_GPU_VARS:
        value = env.get(var, "").strip()
        if value and not (
            var == "SLURM_GPUS_ON_NODE" and value == "0"
        ):  # a count; the others list GPU indices
            return f"{var}={value}"
    return None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def nvidia_driver() -> str:
    """The NVIDIA driver on this machine, for error messages: ``driver 535.104.05 (CUDA 12.2)``, or why unknown."""
    version = ""
    with contextlib.suppress(OSError):
        m = re.search(
            r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", Path("/proc/driver/nvidia/version").read_text()
        )
        version = m.group(1) if m else ""
    cuda = ""
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
            m = re.search(r"Driver Version:\s*(\S+).*?CUDA Version:\s*(\S+)", out, re.S)
            if m:
                version, cuda = version or m.group(1), m.group(2)
    if not version:
        return "no NVIDIA driver loaded (/proc/driver/nvidia/version is missing)"
    return f"NVIDIA driver {version}" + (f" (supports CUDA ≤ {cuda})" if cuda else "")


def no_gpu_reason(allocated: str) -> str:
    """One line for a task that SLURM gave GPUs but where torch sees none: what was allocated, what torch sees,
    the torch build's CUDA version, the driver's, and the fix."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    build = f"torch {torch.__version__} " + (
        f"is built for CUDA {torch.version.cuda}" if torch.version.cuda else "is a CPU-only build"
    )
    why = ""
    if torch.version.cuda:
        try:  # is_available() hides the reason; init() raises with it ("The NVIDIA driver ... is too old")
            torch.cuda.init()
        except Exception as e:
            why = f" ({_first_line(str(e))[:200]})"
    return (
        f"SLURM gave this task GPUs ({allocated}"
        + (f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")
        + f") but torch sees none{why}: {build}, {nvidia_driver()}; install the torch (and DALI) build for this "
        "driver (README: Install on a cluster), or set dist.device=cpu to train on the CPU on purpose"
    )


def choose_device(
    requested: str,
    local_rank: int,
    cuda_available: bool,
    device_count: int,
    env: Mapping[str, str] | None = None,
) -> torch.device:
    """This process's device for ``dist.device`` (auto | cuda | cpu), from what torch sees.

    One visible GPU is this task's whatever its local rank (SLURM bound one GPU to each task); with several, the
    local rank picks one (one process per GPU). Raises :class:`DistError` with one line where the run cannot be
    what was asked: no GPU under ``cuda``, or under ``auto`` in a task SLURM gave GPUs (:func:`no_gpu_reason`).
    """
    if requested not in ("auto", "cuda", "cpu"):
        raise DistError(f"dist.device={requested!r}: use auto, cuda or cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if not cuda_available or device_count < 1:
        allocated = slurm_gpus(env)
        if requested == "cuda":
            raise DistError(no_gpu_reason(allocated) if allocated else "dist.device=cuda but torch sees no GPU "
                            f"(torch {torch.__version__}, {nvidia_driver()}); dist.device=auto uses the CPU")  # fmt: skip
        if allocated:
            raise DistError(no_gpu_reason(allocated))
        return torch.device("cpu")
    if device_count == 1:
        return torch.device("cuda", 0)
    if local_rank >= device_count:
        visible = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES", "unset")
        raise DistError(
            f"local rank {local_rank} but only {device_count} visible GPUs (CUDA_VISIBLE_DEVICES={visible}): "
            "start one process per visible GPU, or bind one GPU to each task (srun --gpus-per-task=1)"
        )
    return torch.device("cuda", local_rank)


def setup(backend: str = "auto", timeout_min: int = 30, device: str = "auto") -> DistInfo:
    """Initialise the process group (if more than one process) and pick this process's device
    (``dist.device``: :func:`choose_device`)."""
    rank, local_rank, world_size, source = detect()
    if not 0 <= rank < world_size:
        raise DistError(f"rank {rank} is outside world size {world_size} ({source} environment)")
    available = device != "cpu" and torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    device = choose_device(device, local_rank, available, count)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistError("dist.backend=nccl needs CUDA GPUs; use dist.backend=gloo (or auto) on CPU")
    if world_size > 1 and not dist.is_initialized():
        if source == "slurm":
            os.environ.setdefault(
                "MASTER_ADDR", first_host(os.environ.get("SLURM_JOB_NODELIST", "localhost"))
            )
            # One port per job run (job id, restart), so two jobs sharing a node do not collide, and below the
            # ephemeral range, so no outgoing connection holds it (master_port).
            port = master_port(os.environ.get("SLURM_JOB_ID", "0"), restart_count())
            os.environ.setdefault("MASTER_PORT", str(port))
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DistError(f"{var} is not set: launch with torchrun, srun or slurm/launch.py")
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_min),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world_size, device, source)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (a no-op for one process). Counts, never averages."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=src)


def all_gather_object(obj):
    """List of ``obj`` from every rank (``[obj]`` for one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
