"""Faults inside a job: a crashed or hung rank ends the job in bounded time, named, and the job comes back by itself
(slurm/retry.py, train/watchdog.py); a configuration error is not retried; a deterministic failure stops retrying.

    .venv/bin/python -m pytest tests/test_faults.py -rA      # SLURM tests need root (slurm/local_cluster.sh)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from slurm import retry
from tests.conftest import REPO, run_cli
from tests.slurm_cluster import SlurmCluster
from tests.test_launch import LAUNCH, STEPS, assert_same_weights, clean_env, small, submitted, val_metrics
from train.watchdog import HANG_EXIT, Heartbeat

HANG_S = 10  # dist.hang_timeout_s in the tests (production default: 300 s)


@pytest.fixture(scope="module")
def tree(small_tree: Path) -> Path:
    return small_tree


# ---------------------------------------------------------------------------------------------- in process


def test_a_frozen_rank_is_named_by_the_others_heartbeat(tmp_path: Path) -> None:
    """Two ranks' heartbeats in one process: rank 1's thread stops (a frozen process), rank 0 stops making
    progress (waiting for it): rank 0 names rank 1, its host, step and last log line, records it and exits 75."""
    log = tmp_path / "rank1.out"
    log.write_text("epoch 1/2  step 3/7  loss 1.3\n")
    exits, records = [], []
    r0 = Heartbeat(tmp_path, 0, 2, timeout_s=1.5, interval_s=0.2, on_hang=records.append, exit=exits.append)
    r1 = Heartbeat(tmp_path, 1, 2, timeout_s=1.5, interval_s=0.2, log=str(log), exit=exits.append)
    r0.start(), r1.start()
    r0.tick(3, "data", arm=True)
    r1.tick(3, "data", arm=True)
    time.sleep(0.3)
    r1.stop()  # frozen: no more beats, no more ticks
    t0 = time.monotonic()
    while not exits and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    r0.stop()
    assert exits == [HANG_EXIT]
    assert (
        1.0 < time.monotonic() - t0 < 5.0
    )  # the timeout (1.5 s from the last tick) plus a beat (0.2 s), + load
    (rec,) = records
    assert (rec["cause"], rec["rank"], rec["step"]) == ("hang", 1, 3)
    assert rec["last_line"] == "epoch 1/2  step 3/7  loss 1.3"
    assert "rank 1 on" in rec["message"] and "its process stopped running" in rec["message"]


def test_retry_decisions(tmp_path: Path) -> None:
    """A configuration error is never retried; the same error at the same step as the previous failure stops;
    launch.max_failures caps the requeues of one job."""
    crash = {"cause": "crash", "retry": True, "rank": 1, "rank_host": "n1", "step": 5, "error": "Killed",
             "last_line": ""}  # fmt: skip
    assert retry.decide(tmp_path, "7", {**crash, "retry": False}, 3)[0] == "stopped"
    assert retry.decide(tmp_path, "7", crash, 3) == (
        "requeued",
        "retry 1 of 3: requeued, resumes from last.pth",
    )
    (tmp_path / retry.RETRIES).write_text(json.dumps({**crash, "job_id": "7", "action": "requeued"}) + "\n")
    action, why = retry.decide(tmp_path, "7", crash, 3)
    assert action == "stopped" and "the same error at the same step (5) twice" in why
    assert retry.decide(tmp_path, "7", {**crash, "step": 9}, 3)[0] == "requeued"
    assert retry.decide(tmp_path, "7", {**crash, "step": 9}, 1)[1].startswith("launch.max_failures=1 retries")


# ---------------------------------------------------------------------------------------------- on SLURM


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory) -> Path:
    """The uninterrupted run (``--cluster local``, the same job code) the faulted jobs must end equal to."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    out = run_cli(LAUNCH, *small(tree, run_dir, "--cluster", "local"), env=clean_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return run_dir


def _step(run_dir: Path) -> int:
    path = run_dir / "steps.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(x)["step"] for x in lines if x.endswith("}")), default=0)


def _pid(run_dir: Path, rank: int) -> int:
    return json.loads((run_dir / "heartbeat" / f"rank{rank}.json").read_text())["pid"]


@pytest.mark.slurm
def test_killed_then_hung_rank_job_requeues_itself_and_ends_with_the_same_weights(
    slurm_env: SlurmCluster, tree: Path, tmp_path: Path, reference: Path
) -> None:
    """Rank 1 SIGKILLed mid-epoch: srun ends rank 0 at once (--kill-on-bad-exit), the batch script names rank 1
    and requeues the job. In the resumed start rank 1 is frozen (SIGSTOP): rank 0's heartbeat names it within
    dist.hang_timeout_s and ends the step, and the job requeues itself again. It then finishes with the weights of
    the uninterrupted run, bitwise; retries.jsonl and the log record both faults."""
    run_dir = tmp_path / "run"
    args = small(tree, run_dir, "--cluster", "slurm", "--partition", slurm_env.partition, "train.print_every=1",
                 "ckpt.every_steps=3", f"dist.hang_timeout_s={HANG_S}")  # fmt: skip
    t0 = time.monotonic()
    out = run_cli(LAUNCH, *args, env=clean_env())
    assert out.returncode == 0, out.stderr
    job_id = submitted(out.stdout)
    folder = run_dir / "slurm" / job_id
    log = folder / f"{job_id}_0_log.out"

    # 1. SIGKILL rank 1 after its first steps (a periodic save at step 3 is then on disk or near)
    slurm_env.wait_for("step 4", lambda: _step(run_dir) >= 4, timeout=300)
    killed = _pid(run_dir, 1)
    os.kill(killed, signal.SIGKILL)
    t_kill = time.monotonic()
    slurm_env.wait_for("the job requeued", lambda: "REQUEUED" in slurm_env.sacct_states(job_id, True), 60)
    t_requeued = time.monotonic() - t_kill
    slurm_env.start_requeued_now(job_id, timeout=120)

    # 2. SIGSTOP rank 1 of the resumed start, once it trained a step
    slurm_env.wait_for("the resumed start's rank 1", lambda: (run_dir / "heartbeat" / "rank1.json").is_file()
                       and _pid(run_dir, 1) != killed, 120)  # fmt: skip
    resumed_at = int(re.findall(r"resumed from .*last\.pth at .* \(step (\d+)\)", log.read_text())[-1])
    slurm_env.wait_for("a step after the resume", lambda: _step(run_dir) > resumed_at, timeout=120)
    frozen = _pid(run_dir, 1)
    os.kill(frozen, signal.SIGSTOP)
    t_stop = time.monotonic()
    slurm_env.wait_for(
        "requeued again", lambda: slurm_env.sacct_states(job_id, True).count("REQUEUED") == 2, 120
    )
    t_hang = time.monotonic() - t_stop
    slurm_env.start_requeued_now(job_id, timeout=120)

    job = submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id, tasks=[0, 1])
    results = job.results()
    print(f"SIGKILL → requeued {t_requeued:.1f} s; SIGSTOP → requeued {t_hang:.1f} s; "
          f"submit → done {time.monotonic() - t0:.1f} s")  # fmt: skip
    assert [(r["status"], r["epoch"], r["step"]) for r in results] == [("done", 2, STEPS)] * 2
    slurm_env.wait_for("sacct COMPLETED", lambda: slurm_env.sacct_states(job_id)[-1:] == ["COMPLETED"])
    assert slurm_env.sacct_states(job_id, duplicates=True) == ["REQUEUED", "REQUEUED", "COMPLETED"]
    assert t_requeued < 30, t_requeued  # srun ends the step at once; python's start-up dominates here
    assert t_hang < HANG_S + 30, t_hang

    rows = retry.read_retries(run_dir)
    assert [(r["cause"], r["rank"], r["action"]) for r in rows] == [
        ("crash", 1, "requeued"),
        ("hang", 1, "requeued"),
    ]
    assert rows[0]["error"] == "Killed" and rows[0]["restart"] == 0 and rows[1]["restart"] == 1
    text = log.read_text()
    assert re.search(rf"job {job_id} failed \(srun exited \d+\): crash: rank 1 on \S+, step \d+: Killed; its last "
                     r"line: .+; retry 1 of 3: requeued", text), text[-3000:]  # fmt: skip
    assert re.search(rf"hang: rank 0 made no progress for \d+ s \(dist.hang_timeout_s={HANG_S}\) .* stalled: rank 1 "
                     rf"on \S+ \(pid {frozen}\)", text), text[-3000:]  # fmt: skip
    assert "periodic save: saved" in text
    assert_same_weights(reference, run_dir)
    assert val_metrics(run_dir) == val_metrics(reference)


@pytest.mark.slurm
def test_configuration_error_is_not_retried(slurm_env: SlurmCluster, tree: Path, tmp_path: Path) -> None:
    """A job whose last.pth is corrupt fails on every rank with a CheckpointError: recorded, not requeued. (The
    launcher refuses such a folder before submitting; --force submits it anyway, as a folder damaged between
    submission and start would be.)"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pth").write_bytes(b"not a checkpoint")
    args = small(tree, run_dir, "--cluster", "slurm", "--partition", slurm_env.partition, "--wait", "--force")
    out = run_cli(LAUNCH, *args, env=clean_env(), timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    job_id = submitted(out.stdout)
    slurm_env.wait_for("sacct FAILED", lambda: slurm_env.sacct_states(job_id)[-1:] == ["FAILED"], 60)
    assert slurm_env.sacct_states(job_id, duplicates=True) == ["FAILED"]
    (row,) = retry.read_retries(run_dir)
    assert (row["cause"], row["action"]) == ("fatal", "stopped")
    assert row["error"].startswith(f"CheckpointError: {run_dir}/last.pth is not")
    assert retry.NOT_RETRIED in out.stdout  # --wait follows rank 0's log to the batch script's end


def test_report_shows_a_runs_retries(tmp_path: Path) -> None:
    """``python evaluate --report`` names each run's faults and retries (from retries.jsonl), console and markdown."""
    from evaluate.report import RunRow, format_console, format_markdown, retries_text

    rows = [
        {"time": "T1", "job_id": "7", "cause": "crash", "rank": 1, "rank_host": "n2", "step": 5, "action": "requeued"},
        {"time": "T2", "job_id": "7", "cause": "hang", "rank": 3, "rank_host": "n4", "step": 9, "action": "stopped",
         "why": "the same error at the same step (9) twice: deterministic, not retried"},
    ]  # fmt: skip
    (tmp_path / retry.RETRIES).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    text = retries_text(tmp_path)
    assert text == (
        "2 fault(s), 1 automatic retry; last: hang of rank 3 on n4 at step 9 (job 7, T2); not retried: the same "
        "error at the same step (9) twice: deterministic, not retried"
    )
    row = RunRow(
        str(tmp_path), "vgg11", "demo", "stopped", "1/2 epochs", 1, 2, retries=text, name="demo-vgg11"
    )
    assert f"demo-vgg11: faults: {text}" in format_console([row])  # the run's one name (its folder's)
    assert f"faults: {text}" in format_markdown([row], "t")
    assert retries_text(tmp_path / "none") == ""


def test_a_rank_stuck_reading_is_named_before_those_waiting_for_it() -> None:
    """Every thread still beats (nothing is frozen): the rank still waiting for its batch holds up the ranks that
    are in the step's all-reduce; with nothing to tell them apart, every rank is named."""
    from train.watchdog import culprits

    now = 1000.0
    beat = {"host": "n", "pid": 1, "beat": now - 0.1, "step": 7}
    beats = [{**beat, "rank": 0, "phase": "step", "progress": now - 30},
             {**beat, "rank": 1, "phase": "data", "progress": now - 30.5},
             {**beat, "rank": 2, "phase": "step", "progress": now - 29}]  # fmt: skip
    named, why = culprits(beats, now, interval_s=1.0)
    assert [b["rank"] for b in named] == [1] and "waits for its next batch" in why
    named, why = culprits([{**b, "phase": "step", "progress": now - 30} for b in beats], now, interval_s=1.0)
    assert [b["rank"] for b in named] == [0, 1, 2] and why == "every rank stalled at the same time"
    frozen = [{**beats[0], "beat": now - 5}, *beats[1:]]
    assert [b["rank"] for b in culprits(frozen, now, interval_s=1.0)[0]] == [0]


def test_the_sbatch_script_ends_the_step_on_a_bad_exit_and_decides_the_retry(tmp_path: Path) -> None:
    """What the submitted script holds (rendered by submitit, as --dry-run shows it): srun's --kill-on-bad-exit,
    then srun's status handed to slurm.retry with the run folder and launch.max_failures, and kept as the exit."""
    from slurm.submit import make_plan, sbatch_script
    from train.config import load_config

    run_dir = tmp_path / "run"
    cfg = load_config("demo", [f"run_dir={run_dir}", f"data.root={tmp_path}", "launch.cluster=slurm",
                               "launch.gpus=2", "launch.max_failures=5"])  # fmt: skip
    lines = sbatch_script(make_plan(cfg)).splitlines()
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert " --kill-on-bad-exit=1 " in srun
    after = lines[lines.index(srun) + 1 :]
    body = [line for line in after if line.strip() and not line.startswith("#")]
    assert body[0] == "rc=$?" and body[-1] == "exit $rc"
    assert body[1].endswith(f"-m slurm.retry --run-dir {run_dir} --max-failures 5 --rc $rc")


@pytest.mark.parametrize(
    "site",
    [
        ["launch.container_image=nvcr.io#nvidia/pytorch:25.01-py3", "launch.python=/usr/bin/python"],  # pyxis
        [
            "launch.python='apptainer exec --nv /shared/vgg.sif python'"
        ],  # apptainer: the interpreter is a command
    ],
    ids=["pyxis", "apptainer"],
)
def test_the_retry_step_runs_outside_the_container_with_the_nodes_python3(
    tmp_path: Path, site: list[str]
) -> None:
    """The batch script's retry step runs on the node, outside the tasks' container: not with the container's
    interpreter (absent there, or a command quoted into one word), but with the node's python3 from this
    repository. The rendered lines, run in an environment without the project's venv, decide and record."""
    from slurm.submit import make_plan, sbatch_script
    from train.config import load_config

    run_dir = tmp_path / "run"
    cfg = load_config("demo", [f"run_dir={run_dir}", f"data.root={tmp_path}", "launch.cluster=slurm",
                               "launch.gpus=2", "launch.max_failures=2", *site])  # fmt: skip
    lines = sbatch_script(make_plan(cfg)).splitlines()
    (srun,) = [line for line in lines if line.startswith("srun ")]
    body = [line for line in lines[lines.index(srun) + 1 :] if line.strip() and not line.startswith("#")]
    assert (
        body[1] == f"PYTHONPATH={REPO} python3 -m slurm.retry --run-dir {run_dir} --max-failures 2 --rc $rc"
    )
    run_dir.mkdir()
    # srun failed with 3 in job 999999 (no such job): the step names no rank, records a retry, and keeps srun's 3
    # as the job's status where scontrol cannot requeue it
    script = "\n".join(["cd /", "false || (exit 3)", *body])
    out = subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "999999"},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 3, out.stderr
    (row,) = [json.loads(line) for line in (run_dir / "retries.jsonl").read_text().splitlines()]
    assert (row["job_id"], row["rc"], row["action"]) == ("999999", 3, "requeued"), row
    assert "job 999999 failed (srun exited 3)" in out.stdout
