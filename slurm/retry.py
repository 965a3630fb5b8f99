"""Automatic retry of a failed SLURM job: the batch script's last step decides, requeues, and records why.

    python -m slurm.retry --run-dir R --folder R/slurm/J --rc $rc --max-failures 3   # the sbatch script, after srun

Why the batch script and not submitit: submitit requeues only from its ``USR2`` handler (time limit, preemption)
through ``checkpoint()``; a task that crashes or is killed never gets there, and a task cannot requeue for a peer
that died (it may be the dead one: rank 0 SIGKILLed, a node gone). The batch script outlives the step on the
first node whatever the tasks do, sees srun's exit status, and ``scontrol requeue`` from it brings the same job
id back (same submission pickle, ``SLURM_RESTART_COUNT`` + 1, so ``slurm.job.TrainJob`` resumes from
``last.pth``; SLURM holds a requeued job back by its requeue delay, ~120 s by default). srun runs with
``--kill-on-bad-exit=1``, so one task's bad exit (crash, SIGKILL, a hang named by ``train.watchdog``) ends the
whole step at once and this runs seconds later.

What it decides, after a non-zero srun status:

- the job was already requeued (submitit's time-limit path, SLURM's node-failure or preemption requeue) or
  cancelled (``scancel``: SLURM also kills this script): nothing to do;
- a task recorded a configuration error (``<run_dir>/faults/<job>-<restart>-rank<R>.json`` with
  ``retry: false``: a bad config, data or checkpoint, a non-finite loss) → not retried: it would fail again;
- the same error at the same step as the previous failure of this run → deterministic, not retried;
- ``launch.max_failures`` requeues of this job already → not retried;
- otherwise: requeued. Each decision is one row of ``<run_dir>/retries.jsonl`` (time, job, restart, host, cause,
  rank and its host, step, error, the rank's last log line, action) and one line in the job's log;
  ``python evaluate --report`` shows the count and the last cause.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from train.files import atomic_write_text, read_json_lines

RETRIES = "retries.jsonl"
FAULTS = "faults"
NOT_RETRIED = (
    "a configuration, data or checkpoint error (or submitit's time-out count) fails again: not retried"
)


def fault_path(run_dir: str | os.PathLike[str], job_id: str, restart: int, rank: int) -> Path:
    return Path(run_dir) / FAULTS / f"{job_id}-{restart}-rank{rank}.json"


def write_fault(
    run_dir: str | os.PathLike[str], job_id: str, restart: int, rank: int, record: dict[str, Any]
) -> None:
    """A task's own account of how it failed (called by ``slurm.job`` on an exception and by the hang watchdog)."""
    path = fault_path(run_dir, job_id, restart, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "host": socket.gethostname(), **record}
    atomic_write_text(path, json.dumps(record) + "\n")


def read_faults(run_dir: str | os.PathLike[str], job_id: str, restart: int) -> list[dict[str, Any]]:
    out = []
    for p in sorted((Path(run_dir) / FAULTS).glob(f"{job_id}-{restart}-rank*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def read_retries(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/retries.jsonl`` (a torn last line is skipped)."""
    return read_json_lines(Path(run_dir) / RETRIES)


def _scontrol_job(job_id: str) -> dict[str, str]:
    try:
        proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


# srun's lines for a task that ended badly: "srun: error: node1: task 1: Killed", "... task 0: Exited with exit
# code 75"
_SRUN_TASK = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+)$", re.M)


def srun_culprit(err_log: Path) -> tuple[int, str, str] | None:
    """(rank, host, how) of the first task srun reported as ended badly in this start's part of the batch log."""
    try:
        text = err_log.read_text(errors="replace")
    except OSError:
        return None
    start = text.rfind("Starting with JobEnvironment")  # submitit's first line of each start (rank 0)
    m = _SRUN_TASK.search(text, max(start, 0))
    if not m:
        return None
    rank = int(re.split(r"[,\-]", m[2])[0])
    return rank, m[1], m[3].strip()


def _log_path(folder: Path, job_id: str, rank: int, suffix: str) -> Path:
    return folder / f"{job_id}_{rank}_log.{suffix}"


def diagnose(run_dir: Path, folder: Path, job_id: str, restart: int, rc: int) -> dict[str, Any]:
    """What ended this start: the tasks' fault records, srun's report, the heartbeat files."""
    from train.watchdog import last_line, read_beats

    faults = read_faults(run_dir, job_id, restart)
    fatal = [f for f in faults if f.get("retry") is False]
    hang = [f for f in faults if f.get("cause") == "hang"]
    srun = srun_culprit(_log_path(folder, job_id, 0, "err"))
    if fatal:
        f = fatal[0]
        return {"cause": "fatal", "retry": False, **_pick(f)}
    if hang:
        return {"cause": "hang", "retry": True, **_pick(hang[0])}
    if srun is not None:
        rank, host, how = srun
        own = [f for f in faults if f.get("rank") == rank]
        # the step the job stalled at: the furthest heartbeat (each is at most one beat old)
        steps = [b.get("step") for b in read_beats(run_dir / "heartbeat") if isinstance(b.get("step"), int)]
        step = own[0].get("step") if own else max(steps, default=None)
        error = own[0]["error"] if own else how
        line = last_line(_log_path(folder, job_id, rank, "err")) or last_line(
            _log_path(folder, job_id, rank, "out")
        )
        return {"cause": "crash", "retry": True, "rank": rank, "rank_host": host, "step": step, "error": error,
                "last_line": line}  # fmt: skip
    if faults:
        return {"cause": "crash", "retry": True, **_pick(faults[0])}
    return {"cause": "unknown", "retry": True, "rank": None, "rank_host": None, "step": None,
            "error": f"srun exited {rc}", "last_line": ""}  # fmt: skip


def _pick(f: dict[str, Any]) -> dict[str, Any]:
    return {"rank": f.get("rank"), "rank_host": f.get("host"), "step": f.get("step"), "error": f.get("error", ""),
            "last_line": f.get("last_line", "")}  # fmt: skip


def decide(run_dir: Path, job_id: str, found: dict[str, Any], max_failures: int) -> tuple[str, str]:
    """(action, why): "requeued", or "stopped" with the reason."""
    if not found["retry"]:
        return "stopped", NOT_RETRIED
    rows = read_retries(run_dir)
    if rows:
        prev = rows[-1]
        if (
            prev.get("error") == found["error"]
            and prev.get("step") == found["step"]
            and found["step"] is not None
        ):
            return (
                "stopped",
                f"the same error at the same step ({found['step']}) twice: deterministic, not retried",
            )
    done = sum(1 for r in rows if r.get("job_id") == job_id and r.get("action") == "requeued")
    if done >= max_failures:
        return "stopped", f"launch.max_failures={max_failures} retries of job {job_id} used: not retried"
    return "requeued", f"retry {done + 1} of {max_failures}: requeued, resumes from last.pth"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--folder", help="submitit's job folder (default: <run dir>/slurm/<job id>)")
    p.add_argument("--rc", type=int, required=True, help="srun's exit status")
    p.add_argument("--max-failures", type=int, required=True)
    args = p.parse_args(argv)
    if args.rc == 0:
        return 0
    job_id = os.environ.get("SLURM_JOB_ID") or Path(args.folder).name
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    job = _scontrol_job(job_id)
    state = job.get("JobState", "")
    if (
        int(job.get("Restarts", restart) or restart) > restart
        or "REQUEUE" in state
        or state in ("CANCELLED",)
    ):
        return args.rc  # requeued already (submitit, SLURM) or cancelled: not ours to decide
    run_dir = Path(args.run_dir)
    folder = Path(args.folder) if args.folder else run_dir / "slurm" / job_id
    found = diagnose(run_dir, folder, job_id, restart, args.rc)
    action, why = decide(run_dir, job_id, found, args.max_failures)
    row = {"time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "job_id": job_id,
           "restart": restart, "host": socket.gethostname(), "rc": args.rc, **found, "action": action, "why": why}  # fmt: skip
    with open(run_dir / RETRIES, "a") as f:
        f.write(json.dumps(row) + "\n")
    who = f"rank {found['rank']} on {found['rank_host']}" if found["rank"] is not None else "no rank named"
    print(
        f"job {job_id} failed (srun exited {args.rc}): {found['cause']}: {who}, step {found['step']}: "
        f"{found['error']}; its last line: {found['last_line']!r}; {why}",
        flush=True,
    )
    if action != "requeued":
        return args.rc
    for pkl in folder.glob(
        f"{job_id}_*_result.pkl"
    ):  # else submitit reads this start's errors as the job's end
        pkl.unlink(missing_ok=True)
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        print(f"scontrol requeue {job_id} failed: {proc.stderr.strip()}", flush=True)
        return args.rc
    return 0


def teardown_lines(
    run_dir: str, max_failures: int, python: str | None = None, container: str | None = None
) -> list[str]:
    """The sbatch script's lines after srun (submitit's ``teardown``): srun's status first, then the decision.

    They run in the batch script, on the job's first node and outside any container, so the interpreter is the
    tasks' one (``python``: ``launch.python``, default this one) only where that is a path on the node itself.
    Where the tasks run in a container (``container``: ``launch.container_image``, pyxis) or ``python`` is a
    command (``apptainer exec --nv vgg.sif python``), that interpreter does not exist outside the container: the
    node's own ``python3`` runs this module from this repository (``PYTHONPATH``), which it can, as the module and
    what it imports (``train.watchdog``) use the standard library only."""
    import shlex

    args = ["-m", "slurm.retry", "--run-dir", run_dir, "--max-failures", str(max_failures)]
    python = python or sys.executable
    if container or len(shlex.split(python)) > 1:
        root = str(Path(__file__).resolve().parents[1])
        cmd = f"PYTHONPATH={shlex.quote(root)} python3 {shlex.join(args)}"
    else:
        cmd = shlex.join([python, *args])
    return ["rc=$?", f"{cmd} --rc $rc", "exit $rc"]


if __name__ == "__main__":
    sys.exit(main())
