"""One training per run folder (train/run.py's lock), and startup errors every rank agrees on.

    .venv/bin/python -m pytest tests/test_run_dir.py -q

Real processes throughout: a holder in another Python process (killed with SIGKILL), two ``python -m train`` on
one run_dir at once, and two DDP ranks (gloo) on a run_dir rank 0 cannot write.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from train import run as run_module
from train.run import RunError, check_run_dir_free, lock_run_dir

SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"  # UTC, ISO 8601
HOLD = """
import sys, time
from train.run import lock_run_dir
lock = lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def overrides(tree: Path, run_dir: Path, *extra: str) -> list[str]:
    """The demo recipe shrunk to seconds per epoch on 2 cores (as in tests/test_train.py)."""
    return [f"data.root={tree}", f"run_dir={run_dir}", "data.backend=torchvision", "data.batch_size=8",
            "data.workers=0", "data.train_crop=32", "data.val_resize=36", "data.val_crop=32", "model.num_classes=4",
            "model.classifier_width=32", "sched.epochs=1", "sched.warmup_epochs=0", "optim.lr=0.01",
            "train.print_every=2", "log.wandb_mode=disabled", "launch.gpus=2", *extra]  # fmt: skip


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: no W&B or distributed settings, no SLURM job."""
    drop = ("WANDB_", "SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def wait_until(what: str, predicate, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)
    return value


def note(run_dir: Path) -> dict | None:
    """The holder note in run_dir/.lock, or None (no file, empty: free or being written)."""
    try:
        return json.loads((run_dir / ".lock").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- lock


def test_lock_names_the_holder_and_is_dropped_when_it_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    # a holder in another process, inside a (restarted) SLURM job: the variables srun gives a task
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env=child_env(SLURM_JOB_ID="5678", SLURM_RESTART_COUNT="1"))  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunError) as refused:
            lock_run_dir(run_dir)
        message = str(refused.value)
        assert re.fullmatch(
            rf"run_dir {re.escape(str(run_dir))} is in use by pid {holder.pid} on {re.escape(socket.gethostname())} "
            rf"\(SLURM job 5678, restart 1\) since {SINCE}; wait for it to end, scancel 5678 if it still runs, or use "
            r"another run_dir",
            message,
        ), message
        with pytest.raises(RunError, match=f"in use by pid {holder.pid} "):
            check_run_dir_free(run_dir)  # the launcher's early check says the same
        # SIGKILL: no Python cleanup runs, the kernel drops the lock with the process's files
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        holder.kill()
    assert note(run_dir)["pid"] == holder.pid  # the dead holder's note is left: text only, no lock behind it
    lock = lock_run_dir(run_dir)
    assert lock.held and lock.locked and lock.warning is None
    mine = note(run_dir)
    assert (mine["pid"], mine["host"]) == (os.getpid(), socket.gethostname()) and "slurm_job_id" not in mine
    assert re.fullmatch(SINCE, mine["since"])
    # the lock belongs to the open file: this same process cannot take it a second time
    with pytest.raises(
        RunError, match=f"in use by pid {os.getpid()} .*; wait for it, stop it, or use another"
    ):
        lock_run_dir(run_dir)
    lock.release()
    lock.release()  # idempotent
    assert not lock.held and (run_dir / ".lock").read_text() == ""  # released: the file stays, empty
    with lock_run_dir(run_dir) as again:  # reacquired after release; released by the with block
        assert again.held
    assert not again.held
    check_run_dir_free(run_dir)


def test_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    """Lustre without ``-o flock`` (ENOSYS) or NFS without a lock manager (ENOLCK) cannot lock at all; this
    machine's filesystems can, so flock's failure is simulated here (the only stand-in in this file)."""

    def flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_module.fcntl, "flock", flock)
    lock = lock_run_dir(tmp_path / "run")
    assert not lock.locked and not lock.held
    assert lock.warning == (
        f"the filesystem of {tmp_path / 'run'} cannot lock files (No locks available): nothing stops another "
        f"training from writing into this run_dir at the same time"
    )
    lock.release()


# ------------------------------------------------------------------------------------------ end to end


def test_two_trainings_on_one_run_dir_one_succeeds(small_tree, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--config", "demo", *overrides(small_tree, run_dir)]
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]  # started together
    try:
        # Whichever took the lock is paused while holding it, so the other certainly meets it (without the pause a
        # slow start could come after the winner has finished, and then resume its finished run instead).
        pids = {p.pid: p for p in procs}

        def holder() -> int | None:
            pid = (note(run_dir) or {}).get("pid")
            return pid if pid in pids else None

        winner = pids[wait_until("one of them holding the lock", holder)]
        loser = procs[1 - procs.index(winner)]
        winner.send_signal(signal.SIGSTOP)
        try:
            _, err = loser.communicate(timeout=300)
        finally:
            winner.send_signal(signal.SIGCONT)
        out, werr = winner.communicate(timeout=300)
    finally:
        for p in procs:
            p.kill()
    assert winner.returncode == 0, werr[-3000:]
    assert "epoch 1/1 done" in out
    assert loser.returncode == 1
    assert err.count("\n") == 1, err  # one line, nothing else
    assert re.fullmatch(
        rf"error: run_dir {re.escape(str(run_dir))} is in use by pid {winner.pid} on "
        rf"{re.escape(socket.gethostname())} since {SINCE}; wait for it, stop it, or use another run_dir\n",
        err,
    ), err
    assert note(run_dir) is None  # the winner released it at the end (an empty file)
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.fixture
def unwritable_run_dir(tmp_path) -> Path:
    """A run_dir rank 0 cannot create: under a read-only (0o500) parent, or, for root (who ignores permission
    bits), under a parent that is a regular file."""
    if os.geteuid() == 0:
        parent = tmp_path / "a-file"
        parent.write_text("not a folder\n")
        yield parent / "run"
        return
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o500)
    yield parent / "run"
    parent.chmod(0o700)


# Rank 1 runs the same train() as `python -m train` and prints what it raised (the CLI prints errors on rank 0
# only, once).
RANK_DRIVER = """
import sys
from train.config import load_config
from train.engine import train
from train.run import RunError
try:
    train(load_config("demo", sys.argv[1:]))
except RunError as e:
    print(f"RunError: {e}", flush=True)
    sys.exit(1)
"""


def test_unwritable_run_dir_stops_every_rank_at_once(small_tree, unwritable_run_dir):
    """Two gloo ranks started the way srun starts them: nobody kills the other ranks when one fails (torchrun
    would, hiding a rank left waiting in a barrier), so every rank must stop by itself with the same error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = overrides(small_tree, unwritable_run_dir, "dist.timeout_min=5")
    commands = [
        [sys.executable, "-m", "train", "--config", "demo", *args],
        [sys.executable, "-c", RANK_DRIVER, *args],
    ]
    ddp = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.monotonic()
    ranks = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_env(**ddp, RANK=str(rank), LOCAL_RANK=str(rank)))
        for rank, command in enumerate(commands)
    ]  # fmt: skip
    try:
        (_, err0), (out1, err1) = (p.communicate(timeout=280) for p in ranks)
    finally:
        for p in ranks:
            p.kill()
    elapsed = time.monotonic() - t0
    print(f"both ranks stopped after {elapsed:.1f} s (dist.timeout_min=5)")
    assert [p.returncode for p in ranks] == [1, 1], err0[-2000:] + err1[-2000:]
    assert err0.count("\n") == 1 and err0.startswith(
        f"error: run_dir {str(unwritable_run_dir)!r} is not writable: "
    )
    assert out1 == f"RunError: {err0.removeprefix('error: ')}" and err1 == ""
    assert elapsed < 150  # well under dist.timeout_min = 300 s; in practice the time to import torch
    assert not unwritable_run_dir.exists()
