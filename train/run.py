"""The run folder: created (or refused, in one line, when not writable), locked for the life of the training,
with the resolved config in it.

    from train.run import lock_run_dir
    with lock_run_dir("runs/demo") as lock:    # RunError if another training holds runs/demo
        ...                                    # only this process trains into runs/demo

    cat runs/demo/.lock                        # who holds it: host, pid, SLURM job, since (empty once released)

One run folder, one training: two trainings writing the same ``run_dir`` (the same command launched twice, a
local run and a SLURM job sharing a folder) would both write ``last.pth``, ``metrics.jsonl`` and the W&B files and
corrupt each other. Rank 0 therefore holds an exclusive ``flock`` on ``run_dir/.lock`` from before it writes
anything there until the training ends; :func:`claim_run_dir` makes every rank agree on the outcome.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from train.config import Config, save_yaml

LOCK_NAME = ".lock"
# flock errors meaning "this filesystem cannot lock" (not "someone holds it"): Lustre without -o flock gives
# ENOSYS, NFS without a lock manager ENOLCK, some FUSE filesystems EOPNOTSUPP.
_CANNOT_LOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
# How long a process that found the lock taken waits for the holder's note to be readable (the holder writes it
# right after taking the lock, and clears it right before releasing): then it names the holder, or takes the lock.
_NOTE_WAIT_S = 2.0

T = TypeVar("T")


class RunError(RuntimeError):
    """A problem that stops a run before it starts, described in one line."""


def make_run_dir(run_dir: str | Path) -> Path:
    """Create ``run_dir`` (and parents); RunError in one line if it cannot be created or written."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(f"no write permission on {run_dir}")
    except OSError as e:
        raise RunError(f"run_dir {str(run_dir)!r} is not writable: {e.strerror or e}") from None
    return run_dir


def output_file_problem(path: str | os.PathLike[str], example: str = "result.json") -> str | None:
    """Why a result file cannot be written at ``path``, or None when it can: it is an existing folder, a part of its
    parent is a file, or a folder cannot be made in the nearest existing one of its parent and the parent's
    ancestors (a probe folder, made and removed; the parent itself is not made here). For CLIs that check
    ``--json``/``--out`` before any work rather than fail at the end."""
    out = Path(path)
    if out.is_dir():
        return f"{out} is a folder; give a file path such as {out / example}"
    parent = ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=ancestor))
    except OSError as e:
        where = f"write in {parent}" if ancestor == parent else f"create {parent} in {ancestor}"
        return f"cannot {where}: {e.strerror or e}"
    return None


def write_run_config(cfg: Config) -> Path:
    """Write the resolved config to run_dir/config.yaml (RunError in one line if it cannot be written)."""
    path = Path(cfg.run_dir) / "config.yaml"
    try:
        return save_yaml(cfg, path)
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None


def agreed(is_main: bool, action: Callable[[], T]) -> T | None:
    """Run ``action`` on rank 0 only; every rank learns its outcome (a broadcast) and raises the same one-line
    ``RunError`` if it failed, so no rank waits in a barrier for the process-group timeout. Returns rank 0's
    result (None on other ranks). Call it on every rank, after ``train.distributed.setup``."""
    from train import distributed

    result: T | None = None
    error: str | None = None
    unexpected: BaseException | None = None
    if is_main:
        try:
            result = action()
        except RunError as e:
            error = str(e)
        except Exception as e:  # a bug, not bad input: rank 0 re-raises it, the others still stop
            error = f"rank 0: {type(e).__name__}: {e}"
            unexpected = e
    error = distributed.broadcast_object(error, src=0)
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise RunError(error)
    return result


# ------------------------------------------------------------------------------------------------ lock


def holder_note() -> dict[str, Any]:
    """Who this process is, as written into the lock file: host, pid, SLURM job (and array task, restart count)
    when inside one, and the time the lock was taken (UTC, ISO 8601)."""
    note: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        note["slurm_job_id"] = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            note["slurm_array"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        if env.get("SLURM_RESTART_COUNT"):
            note["slurm_restart_count"] = env["SLURM_RESTART_COUNT"]
    note["since"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return note


def describe_holder(run_dir: str | Path, note: dict[str, Any]) -> str:
    """The one-line refusal for a run folder held by ``note``'s process."""
    job = note.get("slurm_job_id")
    if job:
        parts = [f"SLURM job {job}"]
        if note.get("slurm_array"):
            parts.append(f"array task {note['slurm_array']}")
        if note.get("slurm_restart_count") not in (None, "", "0"):
            parts.append(f"restart {note['slurm_restart_count']}")
        where = f" ({', '.join(parts)})"
        # a job that was just cancelled or requeued still holds it while it saves: "wait" comes first
        job_ref = note.get("slurm_array") or job
        what = f"wait for it to end, scancel {job_ref} if it still runs, or use another run_dir"
    else:
        where = ""
        what = "wait for it, stop it, or use another run_dir"
    return (
        f"run_dir {run_dir} is in use by pid {note.get('pid', '?')} on {note.get('host', '?')}{where} "
        f"since {note.get('since', '?')}; {what}"
    )


def _read_note(fd: int) -> dict[str, Any] | None:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        note = json.loads(text)
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) and "pid" in note else None


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` held by this process; see :func:`lock_run_dir`.

    ``locked`` is False when the filesystem could not lock (``warning`` then says why). ``release()`` is
    idempotent; the lock is also released when the process exits, however it exits.
    """

    def __init__(self, path: Path, fd: int | None, warning: str | None = None) -> None:
        self.path = path
        self._fd = fd
        self.locked = fd is not None and warning is None
        self.warning = warning

    @property
    def held(self) -> bool:
        """True until :meth:`release` (when the lock was taken)."""
        return self.locked and self._fd is not None

    def release(self) -> None:
        """Clear the holder note, drop the lock and close the file. The file itself stays: deleting a lock file
        would let a process that opened the old file and one that creates a new one both "hold" the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self.locked:
                os.ftruncate(fd, 0)  # an empty .lock reads as free; a crashed holder's note stays, unlocked
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass  # closing the file below drops the lock anyway
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # e.g. at interpreter shutdown; the process's exit drops the lock anyway
        with contextlib.suppress(Exception):
            self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else ("not lockable" if self.warning else "released")
        return f"RunLock({str(self.path)!r}, {state})"


def lock_run_dir(run_dir: str | Path) -> RunLock:
    """Take the run folder's lock (exclusive, non-blocking ``flock`` on ``<run_dir>/.lock``) and write who holds
    it into the file: host, pid, SLURM job id (``SLURM_JOB_ID``; array task and ``SLURM_RESTART_COUNT`` when
    set), start time (UTC). Creates ``run_dir`` if needed.

    When another process holds it: ``RunError`` in one line naming the holder, e.g. ``run_dir /x is in use by pid
    1234 on node7 (SLURM job 5678) since 2026-11-22T14:00:00Z; wait for it to end, scancel 5678 if it still runs,
    or use another run_dir``.

    The kernel drops a ``flock`` when the holder's file is closed, which happens when the process exits however
    it exits (crash, ``SIGKILL``, OOM kill, the end of a SLURM time limit). A requeued SLURM job (new processes)
    therefore takes the lock again, and there is no stale lock to clean up: a note left by a dead holder is only
    text, and the next taker overwrites it. The lock belongs to the open file, not the process: a second
    ``lock_run_dir`` in the same process is refused too, until :meth:`RunLock.release`; a child forked while it is
    held shares it until the child exits (the file is closed on ``exec``; the loaders' worker processes start from
    a forkserver, so they hold nothing).

    Shared filesystems: on Linux NFS (v4, and v3 with a lock manager) ``flock`` is emulated with byte-range locks
    that every client sees, so two nodes are kept apart; a lock of a node that died is dropped when the server's
    lease ends (NFSv4: 90 s by default, less than SLURM's requeue delay of ~120 s). Mounts with ``nolock`` or
    ``local_lock=flock`` (and BeeGFS without global locks) only lock within one node. Where the filesystem cannot
    lock at all (``ENOLCK``, ``EOPNOTSUPP``, ``ENOSYS``: e.g. Lustre mounted without ``flock``), the run goes on
    unlocked: the returned lock has ``locked=False`` and a ``warning`` for the caller to log.
    """
    run_dir = make_run_dir(run_dir)
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    except OSError as e:
        raise RunError(
            f"run_dir {str(run_dir)!r}: cannot open its lock file {path}: {e.strerror or e}"
        ) from None
    deadline = time.monotonic() + _NOTE_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            note = _read_note(fd)
            if note is not None or time.monotonic() > deadline:
                os.close(fd)
                if note is None:
                    raise RunError(
                        f"run_dir {run_dir} is in use by another process (its lock {path} names no holder); "
                        f"wait for it, stop it, or use another run_dir"
                    ) from None
                raise RunError(describe_holder(run_dir, note)) from None
            time.sleep(0.05)  # the holder is between taking the lock and writing its note, or releasing it
        except OSError as e:
            if e.errno in _CANNOT_LOCK:
                return RunLock(
                    path,
                    fd,
                    warning=f"the filesystem of {run_dir} cannot lock files ({e.strerror}): nothing stops another "
                    f"training from writing into this run_dir at the same time",
                )
            os.close(fd)
            raise RunError(f"run_dir {str(run_dir)!r}: cannot lock {path}: {e.strerror or e}") from None
    lock = RunLock(path, fd)
    data = (json.dumps(holder_note()) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError as e:
        lock.release()
        raise RunError(f"run_dir {str(run_dir)!r} is not writable: {e.strerror or e}") from None
    return lock


def check_run_dir_free(run_dir: str | Path) -> None:
    """RunError (naming the holder) if a training holds ``run_dir`` now; creates nothing. A launcher's early
    check: the training's own lock is what keeps two runs apart."""
    if (Path(run_dir) / LOCK_NAME).is_file():
        lock_run_dir(run_dir).release()


def claim_run_dir(cfg: Config, is_main: bool) -> RunLock | None:
    """Rank 0 locks run_dir (creating it; it must be writable); every rank raises the same one-line ``RunError`` on
    failure (``agreed``). Returns rank 0's lock (None on other ranks). config.yaml is written later, once the run
    is known to go ahead (a refused resume must not overwrite the folder's config)."""

    def claim() -> RunLock:
        lock = lock_run_dir(cfg.run_dir)  # before anything is written into the folder
        try:
            make_run_dir(cfg.run_dir)
        except BaseException:
            lock.release()
            raise
        return lock

    return agreed(is_main, claim)


__all__ = [
    "LOCK_NAME",
    "RunError",
    "RunLock",
    "agreed",
    "check_run_dir_free",
    "claim_run_dir",
    "describe_holder",
    "holder_note",
    "lock_run_dir",
    "make_run_dir",
    "output_file_problem",
    "write_run_config",
]
