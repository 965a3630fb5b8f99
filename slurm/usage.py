"""What each start of a training job used, recorded by the job itself: processes × wall time, for the report.

    from slurm.usage import UsageRecorder, read_usage
    with UsageRecorder(run_dir, processes=8, nodes=1, job_id="1234", cluster="slurm"):   # slurm/job.py, rank 0
        ...                                                                             # train
    usage = read_usage(run_dir)       # Usage(starts, wall_s, process_hours, source)

Every start (the first submission, each requeue, a resubmission) writes its own record,
``<run_dir>/usage/<job id>-<restart>.json``: processes (one per GPU, or CPU processes on a machine without one),
nodes, device kind, host, start time (the task process's own start: its Python start-up counts), a heartbeat rewritten every :data:`HEARTBEAT_S` seconds, and the end time
and status once the job returns or raises. A job killed hard (SIGKILL at the time limit, a node failure) never
writes its end: its last heartbeat is then its end, at most ``HEARTBEAT_S`` short. GPU-hours (process-hours on
CPU) = Σ processes × (end − start) over the run's starts, so a run requeued five times counts all six starts and
nothing of its time in the queue.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from train.files import atomic_write_text

USAGE_DIR = "usage"
HEARTBEAT_S = 30.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_start() -> str:
    """When this process started (Linux: /proc), so that a record covers the task's Python start-up and imports,
    not only the training; now where /proc cannot tell."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))  # fmt: skip
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _now()
    return datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


class UsageRecorder:
    """Writes one start's usage record (see the module docstring); a context manager, used on rank 0 only."""

    def __init__(
        self,
        run_dir: str | Path,
        processes: int,
        nodes: int,
        job_id: str,
        cluster: str,
        restart: int = 0,
        device: str = "cpu",
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.path = Path(run_dir) / USAGE_DIR / f"{job_id}-{restart}.json"
        self.heartbeat_s = heartbeat_s
        self.record: dict[str, Any] = {
            "job_id": job_id,
            "restart": restart,
            "cluster": cluster,
            "processes": processes,
            "nodes": nodes,
            "device": device,
            "host": socket.gethostname(),
            "start": process_start(),
            "heartbeat": None,
            "end": None,
            "status": "running",
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.record["heartbeat"] = _now()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.record) + "\n")
        except OSError as e:  # never stops a training: the report then falls back on the run's metrics
            print(f"warning: usage record {self.path} not written: {e}", flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._write()

    def __enter__(self) -> UsageRecorder:
        self._write()
        self._thread = threading.Thread(target=self._beat, name="usage-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.record["end"] = _now()
        if exc_type is None:
            self.record["status"] = "returned"
        elif issubclass(exc_type, SystemExit):
            self.record["status"] = "exited"  # a stop on a signal (saved, requeued) or Ctrl-C
        else:
            self.record["status"] = f"raised {exc_type.__name__}"
        self._write()


@dataclass(frozen=True)
class Usage:
    """A run's usage summed over its starts; ``source`` says where the numbers come from."""

    starts: int
    wall_s: float  # Σ (end − start): the run's time holding its processes, queue time excluded
    process_hours: float  # Σ processes × (end − start) / 3600: GPU-hours when each process drives a GPU
    device: str  # cuda | cpu | mixed | unknown
    source: str
    running: bool = False  # a start without an end whose heartbeat is recent: still running


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's usage records, oldest start first (unreadable files skipped)."""
    folder = Path(run_dir) / USAGE_DIR
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: r.get("start") or "")


def read_usage(run_dir: str | Path, processes: int | None = None) -> Usage | None:
    """The run's usage from its own records; without records (a run trained before they existed, or by
    ``python -m train``), the sum of ``metrics.jsonl``'s ``epoch_time_s`` × ``processes`` (training passes only:
    a lower bound, validation and start-up excluded), said in ``source``; None when neither is there."""
    records = read_records(run_dir)
    if records:
        wall = hours = 0.0
        running = False
        for r in records:
            end = r.get("end") or r.get("heartbeat") or r["start"]
            seconds = max(0.0, _seconds(r["start"], end))
            wall += seconds
            hours += r.get("processes", 1) * seconds / 3600
            if r.get("end") is None and r.get("heartbeat"):
                age = (datetime.now(timezone.utc) - datetime.fromisoformat(r["heartbeat"])).total_seconds()
                running = running or age < 3 * HEARTBEAT_S
        devices = {r.get("device", "unknown") for r in records}
        cut = sum(1 for r in records if r.get("end") is None)
        source = f"usage records ({len(records)} start(s)"
        source += f"; {cut} without an end: last heartbeat)" if cut else ")"
        return Usage(
            len(records), wall, hours, devices.pop() if len(devices) == 1 else "mixed", source, running
        )
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file() or not processes:
        return None
    times = []
    for line in metrics.read_text().splitlines():
        if line.strip():
            times.append(json.loads(line).get("epoch_time_s") or 0.0)
    if not times:
        return None
    wall = float(sum(times))
    source = "metrics.jsonl epoch_time_s (no usage records; training passes only, a lower bound)"
    return Usage(0, wall, processes * wall / 3600, "unknown", source)


__all__ = ["HEARTBEAT_S", "USAGE_DIR", "Usage", "UsageRecorder", "read_records", "read_usage"]
