"""A hung rank ends the job in bounded time, named: one heartbeat thread per rank.

    hb = Heartbeat(run_dir, rank, world_size, timeout_s=300).start()
    hb.tick(step, "data")       # the training loop, at each batch, step, validation batch and save
    hb.stop()

Every ``interval_s`` each rank's thread writes ``<run_dir>/heartbeat/rank<R>.json``: host, pid, its log, the
last step and phase, when the loop last made progress (``progress``) and when the thread last ran (``beat``).
A rank whose loop made no progress for ``timeout_s`` (once armed by the start's first step) is stalled: it is
either the hung rank or waiting for it in a collective. It reads every rank's file and names the culprit: a
rank whose thread stopped beating (a frozen or dead process: SIGSTOP, a stuck node), else the ranks still reading
their next batch while the others are in the step (a stuck read: their all-reduce waits for it), else the ranks
that made progress longest ago. It prints one
line, writes the job's fault record (``on_hang``) and ends its own process with :data:`HANG_EXIT`; srun's
``--kill-on-bad-exit`` then ends every other task of the step, the frozen one included (SIGKILL).

Without this the others wait in the collective for ``dist.timeout_min`` (30 min) and nothing says which rank.
The files are written with one ``os.replace`` each, on the run folder every node shares.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.files import atomic_write_text

HANG_EXIT = 75  # a stalled rank's exit status (EX_TEMPFAIL: retry may help)


def last_line(path: str | os.PathLike[str] | None, max_bytes: int = 8192) -> str:
    """The last non-empty line of a text file ('' when unreadable); reads only its tail."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def read_beats(folder: Path) -> list[dict[str, Any]]:
    beats = []
    for p in sorted(folder.glob("rank*.json")):
        try:
            beats.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return beats


def culprits(beats: list[dict[str, Any]], now: float, interval_s: float) -> tuple[list[dict[str, Any]], str]:
    """Which ranks hold the others up, and why: frozen (no heartbeat for 3 intervals), else still reading their
    next batch while others are in the step (its collective waits for them), else least recent progress (within
    one interval of the oldest)."""
    frozen = [b for b in beats if now - b["beat"] > 3 * interval_s]
    if frozen:
        return frozen, "its process stopped running (no heartbeat)"
    if not beats:
        return [], ""
    reading = [b for b in beats if b["phase"] == "data"]
    if reading and len(reading) < len(beats) and any(b["phase"] == "step" for b in beats):
        return reading, "it waits for its next batch while the others wait in the step's all-reduce"
    oldest = min(b["progress"] for b in beats)
    behind = [b for b in beats if b["progress"] - oldest <= interval_s]
    if len(behind) == len(beats):
        return behind, "every rank stalled at the same time"
    return behind, "it stopped making progress first"


def describe(b: dict[str, Any], now: float) -> str:
    line = last_line(b.get("log"))
    return (
        f"rank {b['rank']} on {b['host']} (pid {b['pid']}): step {b['step']} ({b['phase']}), last progress "
        f"{now - b['progress']:.0f} s ago, heartbeat {now - b['beat']:.0f} s ago; its last line: {line!r}"
    )


class Heartbeat:
    """One rank's heartbeat thread and hang detector (see the module docstring)."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        rank: int,
        world_size: int,
        timeout_s: float,
        interval_s: float | None = None,
        log: str | None = None,
        on_hang: Callable[[dict[str, Any]], None] | None = None,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.folder = Path(run_dir) / "heartbeat"
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        # a beat often enough that a frozen rank shows (3 missed beats) well within the timeout
        self.interval_s = interval_s if interval_s is not None else max(0.5, min(10.0, timeout_s / 10))
        self.log, self.on_hang, self._exit = log, on_hang, exit
        self.step, self.phase = 0, "start"
        self.progress = time.time()
        self.armed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{rank}", daemon=True)

    def start(self) -> Heartbeat:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def tick(self, step: int, phase: str, arm: bool = False) -> None:
        """Progress of the training loop (no I/O but the first armed tick's: the thread writes the others)."""
        self.step, self.phase, self.progress = step, phase, time.time()
        if arm and not self.armed:
            self.armed = True
            self._write()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _write(self) -> None:
        record = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "log": self.log,
                  "step": self.step, "phase": self.phase, "progress": self.progress, "beat": time.time()}  # fmt: skip
        path = self.folder / f"rank{self.rank}.json"
        # a full or vanished folder must not stop training; a peer then sees this rank as frozen
        with contextlib.suppress(OSError):
            atomic_write_text(path, json.dumps(record))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()
            now = time.time()
            if self.armed and now - self.progress > self.timeout_s:
                self._hang(now)
                return

    def _hang(self, now: float) -> None:
        beats = [b for b in read_beats(self.folder) if b.get("rank", -1) < self.world_size]
        named, why = culprits(beats, now, self.interval_s)
        missing = sorted(set(range(self.world_size)) - {b["rank"] for b in beats})
        text = "; ".join(describe(b, now) for b in named) or "no heartbeat file of any rank"
        if missing:
            text += f"; ranks without a heartbeat file: {missing}"
        message = (
            f"hang: rank {self.rank} made no progress for {now - self.progress:.0f} s (dist.hang_timeout_s="
            f"{self.timeout_s:g}) at step {self.step} ({self.phase}); stalled: {text} [{why}]; ending this task"
        )
        print(message, flush=True)
        print(message, file=sys.stderr, flush=True)
        first = named[0] if named else {}
        if self.on_hang is not None:
            try:
                self.on_hang({"cause": "hang", "rank": first.get("rank"), "host": first.get("host"),
                              "step": self.step, "error": f"no progress for {self.timeout_s:g} s "
                              f"({why})", "last_line": last_line(first.get("log")), "message": message})  # fmt: skip
            except Exception as e:  # the exit below matters more than the record
                print(f"hang: could not write the fault record ({type(e).__name__}: {e})", flush=True)
        self._exit(HANG_EXIT)


__all__ = ["HANG_EXIT", "Heartbeat", "culprits", "last_line", "read_beats"]
