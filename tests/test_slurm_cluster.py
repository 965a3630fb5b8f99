"""The local SLURM cluster (slurm/local_cluster.sh) does what the launcher needs: GPU GRES, accounting (sacct),
multi-task submitit jobs, requeue (plain and submitit's checkpoint path), and a clean teardown.

    .venv/bin/python -m pytest tests/test_slurm_cluster.py -rA        # as root; installs packages on first use
"""

from __future__ import annotations

import datetime
import os
import socket
import stat
import time
from pathlib import Path

import pytest
import submitit

from tests.slurm_cluster import SlurmCluster, leftovers

pytestmark = pytest.mark.slurm

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _sbatch(cluster: SlurmCluster, *args: str) -> str:
    return cluster.run("sbatch", "--parsable", f"--partition={cluster.partition}", *args).stdout.strip()


def _final_sacct_state(cluster: SlurmCluster, job_id: str, timeout: float = 60) -> str:
    """Wait until accounting records a terminal state for the job and return it."""

    def terminal() -> str:
        states = cluster.sacct_states(job_id)
        return states[-1] if states and states[-1] in TERMINAL else ""

    return cluster.wait_for(f"job {job_id} to finish in sacct", terminal, timeout=timeout)


def test_node_has_eight_gpus_and_the_configured_plugins(slurm_cluster: SlurmCluster) -> None:
    node = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N|%P|%T|%c|%G").stdout.split()[0].split("|")
    _, partition, state, cpus, gres = node
    assert partition == "debug*", partition  # the default partition
    assert state in {"idle", "mixed", "allocated"}, state
    assert gres == "gpu:8", gres
    assert int(cpus) >= 32  # declared (config_overrides) so 8 tasks × several CPUs schedule on 2 cores

    config = {}
    for line in slurm_cluster.run("scontrol", "show", "config").stdout.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            config[key.strip()] = value.strip()
    assert config["ProctrackType"] == "proctrack/linuxproc"
    assert config["TaskPlugin"] == "task/none"
    assert config["SelectType"] == "select/cons_tres"
    assert config["GresTypes"] == "gpu"
    assert config["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert config["JobRequeue"] == "1"
    assert config["AuthType"] == "auth/munge"

    # gres.conf: autodetection off, File= names 8 character devices (fake GPUs from mknod).
    gres_conf = (slurm_cluster.state_dir / "etc" / "gres.conf").read_text()
    assert "AutoDetect=off" in gres_conf
    devices = sorted((slurm_cluster.state_dir / "dev").glob("nvidia*"))
    assert [d.name for d in devices] == [f"nvidia{i}" for i in range(8)]
    assert all(stat.S_ISCHR(d.stat().st_mode) for d in devices)


def test_eight_task_job_gets_eight_gpus_and_completes_in_sacct(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """A full-node request (8 tasks × 4 CPUs, 8 GPUs, 64 GB per GPU) schedules on this small machine, each task
    sees the GPUs SLURM bound, and accounting reports COMPLETED with the GPU TRES."""
    out = tmp_path / "out.txt"
    t0 = time.monotonic()
    job = _sbatch(
        slurm_cluster,
        "--nodes=1",
        "--ntasks-per-node=8",
        "--cpus-per-task=4",
        "--gres=gpu:8",
        "--mem-per-gpu=64G",
        "--time=00:05:00",
        f"--output={out}",
        "--wrap",
        "srun bash -c 'echo \"task $SLURM_PROCID of $SLURM_NTASKS cuda=$CUDA_VISIBLE_DEVICES\"'",
    )
    assert _final_sacct_state(slurm_cluster, job) == "COMPLETED", out.read_text() if out.exists() else ""
    print(f"sbatch → sacct COMPLETED round trip: {time.monotonic() - t0:.1f} s")
    lines = sorted(out.read_text().splitlines())
    assert lines == sorted(f"task {i} of 8 cuda=0,1,2,3,4,5,6,7" for i in range(8))
    tres = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job, "-o", "AllocTRES").stdout
    assert "gres/gpu=8" in tres, tres


def _probe() -> dict:
    """Runs inside each SLURM task: what the launcher's job will see."""
    import torch
    import torch.distributed as dist

    env = submitit.JobEnvironment()
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # env:// from the export
    total = torch.tensor([float(dist_env.rank)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {
        "job_id": env.job_id,
        "rank": env.global_rank,
        "local_rank": env.local_rank,
        "world_size": env.num_tasks,
        "cuda_visible_devices": cuda_visible,
        "cuda_available": torch.cuda.is_available(),
        "rank_sum": total.item(),
    }


def test_submitit_two_task_job_returns_and_sacct_says_completed(
    slurm_env: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submitit's slurm executor end to end: 2 tasks sharing 2 GPUs, a gloo process group across them, the
    result pickles come back, and ``job.state`` (sacct) reaches COMPLETED. CUDA_VISIBLE_DEVICES is set although
    there is no GPU, so code must decide by ``torch.cuda.is_available()``."""
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(
        nodes=1,
        tasks_per_node=2,
        gpus_per_node=2,
        cpus_per_task=1,
        mem_gb=4,
        timeout_min=5,
        slurm_partition=slurm_env.partition,
    )
    # submitit derives MASTER_PORT from the job id (20000-60000, overlapping the ephemeral range): it can be
    # taken (EADDRINUSE). Hand the job a port that is free now; sbatch exports our environment to it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    t0 = time.monotonic()
    job = executor.submit(_probe)
    results = job.results()
    print(f"submitit submit → results: {time.monotonic() - t0:.1f} s")
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["job_id"] == job.job_id
        assert r["world_size"] == 2
        assert r["local_rank"] == r["rank"]
        # SLURM binds 2 of the 8 (fake) GPUs to the job: "0,1" on an idle node.
        assert r["cuda_visible_devices"] == results[0]["cuda_visible_devices"]
        assert len({int(i) for i in r["cuda_visible_devices"].split(",")} & set(range(8))) == 2
        assert r["cuda_available"] is False
        assert r["rank_sum"] == 1.0
    # done(force_check=True) makes submitit refresh from sacct now instead of on its own back-off schedule.
    slurm_env.wait_for(
        "job.state == COMPLETED", lambda: job.done(force_check=True) and job.state == "COMPLETED", timeout=60
    )


def test_scontrol_requeue_brings_a_running_job_back(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """``scontrol requeue`` (what submitit runs on timeout/preemption) sends a running job back to PENDING with a
    delayed BeginTime; moving StartTime to now starts it again with SLURM_RESTART_COUNT=1."""
    out = tmp_path / "out.txt"
    script = (
        'echo "start restart=${SLURM_RESTART_COUNT:-0}"; '
        'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo done; exit 0; fi; sleep 120'
    )
    job = _sbatch(slurm_cluster, "--requeue", "--open-mode=append", f"--output={out}", "--wrap", script)
    slurm_cluster.wait_for("first run", lambda: out.exists() and "restart=0" in out.read_text(), timeout=60)

    slurm_cluster.run("scontrol", "requeue", job)
    slurm_cluster.wait_for("PENDING after requeue", lambda: slurm_cluster.squeue_state(job) == "PENDING")
    shown = slurm_cluster.run("scontrol", "show", "job", job).stdout
    assert "Restarts=1" in shown, shown
    assert "Reason=BeginTime" in shown, shown  # SLURM holds a requeued job back (~120 s)

    slurm_cluster.start_requeued_now(job)
    assert _final_sacct_state(slurm_cluster, job) == "COMPLETED"
    # only the script's own lines: slurmstepd's "CANCELLED ... DUE TO JOB REQUEUE", and bash's "Terminated" when
    # the requeue's SIGTERM ends its `sleep` before bash itself (a race), go to the same file
    ours = [x for x in out.read_text().splitlines() if x.startswith("start ") or x == "done"]
    assert ours == ["start restart=0", "start restart=1", "done"]
    assert slurm_cluster.sacct_states(job, duplicates=True) == ["REQUEUED", "COMPLETED"]


class _Counter(submitit.helpers.Checkpointable):
    """Counts to ``n`` writing its progress to ``state``; resumes from it. submitit's ``checkpoint()`` (from
    Checkpointable) resubmits the same call on timeout/preemption."""

    def __call__(self, state: str, n: int) -> dict:
        path = Path(state)
        start = int(path.read_text()) if path.exists() else 0
        with open(f"{state}.starts", "a") as f:
            f.write(f"{start}\n")
        for i in range(start, n):
            time.sleep(0.25)
            tmp = Path(f"{state}.tmp")
            tmp.write_text(str(i + 1))
            os.replace(tmp, path)
        return {"count": int(path.read_text()), "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


def test_submitit_interrupt_checkpoints_requeues_and_resumes(slurm_env: SlurmCluster, tmp_path: Path) -> None:
    """The requeue path the launcher uses: submitit's preemption signal → ``checkpoint()`` → ``scontrol requeue``
    → the requeued job resumes from the saved progress and finishes with the same result."""
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    # submitit calls every signal a timeout when timeout_min <= 10 (its "guaranteed walltime" is negative).
    executor.update_parameters(
        timeout_min=15, tasks_per_node=1, cpus_per_task=1, mem_gb=1, slurm_partition=slurm_env.partition
    )
    state = tmp_path / "progress"
    n = 24
    job = executor.submit(_Counter(), str(state), n)
    slurm_env.wait_for("progress", lambda: state.exists() and int(state.read_text()) >= 4, timeout=60)
    job._interrupt()  # preemption: SIGTERM (ignored by submitit), then USR2 → checkpoint + requeue

    slurm_env.start_requeued_now(job.job_id)
    result = job.result()
    assert result == {"count": n, "restarts": 1}
    starts = [int(x) for x in Path(f"{state}.starts").read_text().split()]
    assert starts[0] == 0 and len(starts) == 2
    assert 4 <= starts[1] < n  # resumed from the saved progress, not from scratch
    assert "this job is preempted" in job.stderr()  # not counted as a timeout (slurm_max_num_timeout)
    assert _final_sacct_state(slurm_env, job.job_id) == "COMPLETED"


def test_down_leaves_nothing_behind_and_up_again(slurm_cluster: SlurmCluster) -> None:
    """``down`` cancels jobs and stops every daemon (and step daemon) of ours, leaving no listener on 6817-6819
    or MariaDB's port; ``up`` then brings the same cluster back (later tests keep using it)."""
    with slurm_cluster.alone():
        job = _sbatch(slurm_cluster, "--output=/dev/null", "--wrap", "srun sleep 300")
        slurm_cluster.wait_for("RUNNING", lambda: slurm_cluster.squeue_state(job) == "RUNNING", timeout=60)

        t0 = time.monotonic()
        down = slurm_cluster.script("down")
        t_down = time.monotonic() - t0
        assert down.returncode == 0, down.stdout + down.stderr
        assert f"cancelling job(s) {job}" in down.stdout
        assert leftovers() == []

        t0 = time.monotonic()
        up = slurm_cluster.script("up")
        t_up = time.monotonic() - t0
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"down with a running job: {t_down:.1f} s, up again: {t_up:.1f} s")
        assert slurm_cluster.run("sinfo", "-h", "-o", "%G").stdout.strip() == "gpu:8"
        assert slurm_cluster.sacct_states(job) == ["CANCELLED"]  # accounting survived the restart
