"""slurm/launch.py: the sbatch script and job layout it plans, bad input, and real runs of the demo recipe on two
CPU tasks (gloo): ``--cluster local`` end to end, and on the local SLURM cluster submit → interrupt → requeue →
resume to the same weights as an uninterrupted run (also on DALI-CPU, stopped mid-epoch), the timeout limit, a
killed job resumed on resubmit, sbatch's own error for an unknown partition, and a second launch into a run folder
that is still busy.

    .venv/bin/python -m pytest tests/test_launch.py -rA      # SLURM tests need root (slurm/local_cluster.sh)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

from slurm import launch
from slurm.submit import parse_time_min
from tests.conftest import REPO, run_cli
from tests.slurm_cluster import SlurmCluster
from tests.wandb_files import RunFile
from train.run import lock_run_dir

LAUNCH = "slurm/launch.py"
STEPS_PER_EPOCH = 7  # 56 images / global batch 8
STEPS = 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def tree(small_tree: Path) -> Path:
    return small_tree


def small(tree: Path, run_dir: Path, *extra: str) -> list[str]:
    """The demo recipe on 2 CPU tasks, small enough for seconds per epoch on 2 cores, deterministic. 15 minutes:
    submitit counts every signal as a timeout when the time limit is 10 minutes or less."""
    return ["--config", "demo", "--gpus", "2", "--run-dir", str(run_dir), "--data", str(tree), "--time", "00:15:00",
            "data.backend=torchvision", "data.batch_size=8", "data.workers=0", "data.train_crop=32",
            "data.val_resize=36", "data.val_crop=32", "model.num_classes=4", "model.classifier_width=32",
            "sched.epochs=2", "sched.name=step", "sched.step_size=1", "sched.warmup_epochs=0", "optim.lr=0.01", "train.print_every=2",
            "train.deterministic=true", "log.wandb_mode=disabled", "dist.device=cpu", *extra]  # fmt: skip


def clean_env() -> dict[str, str]:
    """This environment without W&B settings (jobs inherit it through sbatch)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}


def submitted(stdout: str, where: str = "SLURM") -> str:
    m = re.search(rf"^submitted job (\S+) to {where}", stdout, re.M)
    assert m, stdout
    return m[1]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pth", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def val_metrics(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k.startswith("val_") or k in ("epoch", "step")}
        for r in metrics(run_dir)
    ]


def main_output(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the launcher's main() in this process (fast; no cluster needed for dry runs and bad input)."""
    code = launch.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def sbatch_lines(text: str) -> dict[str, str]:
    lines = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            lines[key] = value
    return lines


# --------------------------------------------------------------------------------------- plan and dry run


def test_dry_run_shows_the_sbatch_script_and_submits_nothing(capsys, imagenet_layout, monkeypatch):
    # no SLURM client on PATH: a dry run still renders submitit's script (and never calls sbatch)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    run_dir = Path("/shared/runs/v16")  # not node-local (no warning); a dry run creates nothing
    code, out, err = main_output(capsys, "--arch", "vgg16_bn", "--gpus", "8", "--partition", "gpu", "--account",
                                 "vision", "--qos", "high", "--constraint", "a100", "--time", "24:00:00",
                                 "--run-dir", str(run_dir), "--data", str(imagenet_layout), "--dry-run")  # fmt: skip
    assert code == 0, err
    script = out.split("# sbatch script submitit would submit")[1].split("\n", 1)[1]
    assert script.startswith("#!/bin/bash")
    assert sbatch_lines(script) == {
        "nodes": "1",
        "ntasks-per-node": "8",  # one task per GPU
        "gpus-per-node": "8",
        "cpus-per-task": "10",
        "mem": "512G",  # 64G per GPU × 8
        "time": "1440",  # minutes
        "signal": "USR2@120",  # checkpoint + requeue 120 s before the limit
        "requeue": "",
        "open-mode": "append",  # a requeued run appends to the same logs
        "partition": "gpu",
        "account": "vision",
        "qos": "high",
        "constraint": "a100",
        "job-name": "vgg-v16",
        "wckey": "submitit",
        "output": f"{run_dir}/slurm/%j/%j_0_log.out",
        "error": f"{run_dir}/slurm/%j/%j_0_log.err",
    }
    assert f"srun --unbuffered --output {run_dir}/slurm/%j/%j_%t_log.out" in script
    assert f"-m submitit.core._submit {run_dir}/slurm/%j" in script
    # srun gets the CPUs too: SLURM 22.05-23.02 did not pass sbatch's --cpus-per-task on to srun
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert " --cpus-per-task=10 " in srun
    assert (
        "# plan: 1 node(s) × 8 GPU(s) = 8 task(s), one per GPU, on SLURM; global batch 256 = 8 × 32 per GPU"
        in out
    )
    # the resolved config is printed (and loads back: it is the YAML the job gets)
    config = out.split("\n", 1)[1].split("# plan:")[0]
    assert "arch: vgg16_bn" in config and "gpus: 8" in config and "time: '24:00:00'" in config
    assert not run_dir.exists()  # nothing written, nothing submitted
    assert "warning" not in err


def test_layout_one_task_per_gpu_and_even_split(capsys, tmp_path, monkeypatch):
    # no SLURM client on PATH: the default 64G per GPU (a cluster's sinfo sizes it: tests/test_resources.py)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    common = ("--arch", "vgg16_bn", "--run-dir", str(tmp_path / "r"), "--data", str(tmp_path), "--dry-run")
    code, out, _ = main_output(capsys, *common, "--gpus", "16")
    assert code == 0
    assert {k: sbatch_lines(out)[k] for k in ("nodes", "ntasks-per-node", "gpus-per-node", "mem")} == {
        "nodes": "2", "ntasks-per-node": "8", "gpus-per-node": "8", "mem": "512G"}  # fmt: skip
    assert "global batch 256 = 16 × 16 per GPU" in out
    # 12 GPUs on 8-GPU nodes without --nodes: 2 nodes × 6, and it says so
    code, out, _ = main_output(capsys, *common, "--gpus", "12", "--gpus-per-node", "8", "data.batch_size=384")
    assert code == 0
    assert "# note: 12 GPUs on 8-GPU nodes: using 2 nodes × 6 GPUs each" in out
    assert (sbatch_lines(out)["nodes"], sbatch_lines(out)["ntasks-per-node"], sbatch_lines(out)["mem"]) == (
        "2", "6", "384G")  # fmt: skip
    code, out, _ = main_output(capsys, *common, "--gpus", "12", "--nodes", "3", "data.batch_size=384")
    assert code == 0 and (sbatch_lines(out)["nodes"], sbatch_lines(out)["ntasks-per-node"]) == ("3", "4")
    # the lr rule is stated: linear scaling when asked for
    code, out, _ = main_output(
        capsys, *common, "--gpus", "16", "data.batch_size=512", "optim.lr_scaling=linear"
    )
    assert code == 0 and "lr 0.2 (optim.lr_scaling=linear: 0.1 × 512/256)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--gpus", "0"), "error: --gpus must be >= 1 (one task per GPU), got 0"),
        (("--gpus", "12", "--gpus-per-node", "8"), "error: --gpus 12 does not divide the global batch, "
                                                   "data.batch_size=256 (the recipe's): use --gpus 8 or --gpus 16, or "
                                                   "data.batch_size=252 or 264 (a multiple of 12;"),
        (("--gpus", "9", "data.batch_size=288"), "error: --gpus 9 does not split evenly over 2 node(s) of up to 8 "
                                                 "GPUs (SLURM starts the same number of tasks on every node): use "
                                                 "--gpus 8 or --gpus 10, or choose --nodes"),
        (("--gpus", "8", "--time", "1:2:3:4"), "error: launch.time must be SLURM's [D-]HH:MM:SS"),
        (("--gpus", "8", "--mem-per-gpu", "lots"), "error: launch.mem_per_gpu='lots' is not a size like 64G"),
        (("--gpus", "16", "--cluster", "local"), "error: --cluster local runs on this machine (one node), but 16 GPUs"),
        (("--gpus", "8", "optim.lrr=0.1"), "error: command line: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (("--gpus", "8", "--time", "0:01:30"), "error: launch.time=0:01:30 (2 min) leaves no training before the "
                                               "stop signal, sent launch.signal_delay_s=120 s before the limit"),
        (("--config", "demo"), "error: --config demo names the recipe file; --arch/--recipe choose one instead"),
    ],
    ids=["gpus-0", "batch-12", "uneven-9", "time", "mem", "local-2-nodes", "typo", "time-short", "config-and-arch"],
)  # fmt: skip
def test_bad_input_is_one_error_line(capsys, tmp_path, args, message):
    code, out, err = main_output(capsys, "--arch", "vgg16_bn", "--run-dir", str(tmp_path / "r"), "--data",
                                 str(tmp_path), "--dry-run", *args)  # fmt: skip
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_short_time_limit_is_a_warning(capsys, tmp_path):
    code, out, err = main_output(capsys, "--gpus", "8", "--time", "0:10:00", "--run-dir", str(tmp_path / "r"),
                                 "--data", str(tmp_path), "--dry-run")  # fmt: skip
    assert code == 0 and "#SBATCH --time=10" in out
    assert "warning: launch.time=0:10:00 is 10 minutes or less: submitit then counts every signal" in err


def test_no_sbatch_suggests_cluster_local(tmp_path, tree):
    env = clean_env() | {"PATH": str(Path(sys.executable).parent)}  # python, no SLURM clients
    out = run_cli(LAUNCH, *small(tree, tmp_path / "r", "--cluster", "slurm"), env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: sbatch not found on PATH: this machine is not a SLURM submit host; run the same job here with "
        "--cluster local, or see the sbatch script with --dry-run"
    )
    assert not (tmp_path / "r").exists()


def test_run_folder_on_tmp_is_refused_for_slurm(capsys, imagenet_layout, monkeypatch):
    monkeypatch.delenv("VGG_ONE_MACHINE_CLUSTER", raising=False)
    message = (
        "run folder /tmp/vgg-run is on node-local storage (/tmp): the job's nodes cannot write checkpoints and logs "
        "there for each other, and submitit cannot read results back; use shared storage (--run-dir) (a cluster "
        "whose every node is this machine: VGG_ONE_MACHINE_CLUSTER=1)"
    )
    # --python: a relative interpreter name (a clone under /tmp would be refused first for its interpreter)
    code, out, err = main_output(capsys, "--arch", "vgg16", "--gpus", "8", "--run-dir", "/tmp/vgg-run",
                                 "--data", str(imagenet_layout), "--python", "python3", "--dry-run")  # fmt: skip
    assert code == 0 and "#SBATCH --nodes=1" in out
    assert err == f"warning: the launch would refuse this: {message}\n"
    # the launch itself: one line, nothing written (where sbatch is on PATH: the check comes after that one)
    if shutil.which("sbatch") and shutil.which("srun"):
        code, out, err = main_output(capsys, "--arch", "vgg16", "--gpus", "8", "--run-dir", "/tmp/vgg-run",
                                     "--data", str(imagenet_layout), "--python", "python3")  # fmt: skip
        assert code == 2 and out == "" and err == f"error: {message}\n"
        assert not Path("/tmp/vgg-run").exists()
    # local and debug runs stay on this machine: /tmp is fine there
    code, out, err = main_output(capsys, "--arch", "vgg16", "--gpus", "8", "--run-dir", "/tmp/vgg-run",
                                 "--data", str(imagenet_layout), "--cluster", "local", "--dry-run")  # fmt: skip
    assert code == 0 and err == "" and "# --cluster local: no sbatch script" in out


def test_launch_into_a_run_dir_a_training_holds_is_refused(capsys, tree, tmp_path):
    run_dir = tmp_path / "r"
    # held as a running training holds it (the lock belongs to the open file: this same process is refused too)
    with lock_run_dir(run_dir):
        code, out, err = main_output(capsys, *small(tree, run_dir, "--cluster", "local"))
    assert code == 2 and "submitted" not in out
    assert re.fullmatch(
        rf"error: run_dir {re.escape(str(run_dir))} is in use by pid {os.getpid()} on \S+ since \S+Z; wait for it, "
        r"stop it, or use another run_dir\n",
        err,
    ), err
    assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing written: no config.yaml, no job folder


def test_time_limit_formats():
    assert [parse_time_min(t) for t in ("90", "30:30", "72:00:00", "2-00", "1-12:30", "1-00:00:30")] == [
        90, 31, 4320, 2880, 2190, 1441]  # fmt: skip


# ----------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run through ``--cluster local``: the same job and code path as on SLURM."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.monotonic()
    out = run_cli(LAUNCH, *small(tree, run_dir), "--cluster", "local", env=clean_env(), timeout=600)
    print(f"--cluster local run: {time.monotonic() - t0:.1f} s")
    return run_dir, out


def test_a_finished_run_is_not_submitted_again(reference, tree):
    run_dir, _ = reference
    jobs = sorted((run_dir / "slurm").iterdir())
    again = run_cli(LAUNCH, *small(tree, run_dir), "--cluster", "local", env=clean_env())
    assert again.returncode == 0, again.stderr
    assert f"nothing to do: {run_dir}/last.pth is at epoch 2 of 2; nothing submitted" in again.stdout
    assert sorted((run_dir / "slurm").iterdir()) == jobs and "submitted job" not in again.stdout


def test_cluster_local_runs_the_job_end_to_end(reference):
    run_dir, out = reference
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    job_id = submitted(out.stdout, "this machine")
    log = run_dir / "slurm" / job_id / f"{job_id}_0_log.out"
    assert f"run folder: {run_dir}\n" in out.stdout
    assert f"logs: {log} (rank 0; stderr: {job_id}_0_log.err; rank N: {job_id}_N_log.out/.err)" in out.stdout
    assert "W&B: disabled (log.wandb_mode=disabled)" in out.stdout
    # rank 0's log is followed to the end, then the result
    assert "2 task(s) on 1 node(s)" in out.stdout and "on 2 process(es) (cpu" in out.stdout
    assert "epoch 2/2 done" in out.stdout and log.read_text() in out.stdout
    assert out.stdout.rstrip().endswith(f"job {job_id} done: epoch 2, step {STEPS}, best val top-1 err "
                                        f"{min(r['val_top1_err'] for r in metrics(run_dir)):.2f}%")  # fmt: skip
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert (state["epoch"], state["step"], len(state["rng"])) == (2, STEPS, 2)
    assert "warning" not in out.stderr


def test_ctrl_c_on_cluster_local_saves_and_the_same_command_resumes(tree, tmp_path, reference):
    """A terminal's Ctrl-C reaches the whole foreground process group: launcher, submitit's controller, the tasks
    and their DataLoader workers (data.workers=2 here). The tasks save last.pth and stop; the launcher waits for
    them; the same command then finishes the run with the uninterrupted run's weights.

    The launcher starts with SIGINT ignored, as it does whenever a non-interactive shell started it or a parent in
    the background (``make test &``): the tasks stop on the Ctrl-C either way, so the launcher must too (it exited
    1, "job failed", when it inherited the ignore; a terminal's default handler is the easy case of the same)."""
    run_dir = tmp_path / "run"
    args = small(tree, run_dir, "--cluster", "local", "data.workers=2")
    env = {**clean_env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, LAUNCH, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    steps = run_dir / "steps.jsonl"
    deadline = time.monotonic() + 300
    while not (steps.is_file() and steps.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no step logged in 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert f"Ctrl-C: the tasks save {run_dir}/last.pth" in err
    assert f"stopped; the same command resumes from {run_dir}/last.pth" in err
    assert "stop requested: saved" in out and "exited unexpectedly" not in out + err
    assert out.count("stop requested: saved") == 1  # rank 0's log copied once, not again after the Ctrl-C
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert 0 < state["step"] < STEPS, state["step"]
    again = run_cli(LAUNCH, *args, env=clean_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"resumed from {run_dir}/last.pth" in again.stdout
    assert_same_weights(run_dir, reference[0])


@pytest.mark.slurm
def test_slurm_interrupt_requeues_and_resumes_to_the_same_weights(
    slurm_env: SlurmCluster, tree, tmp_path, reference, capsys
):
    run_dir = tmp_path / "run"
    # data.workers=1: SLURM signals every process of the job step, the loader's workers and forkserver too,
    # which must live on until the training process has saved (and the weights equal the reference's anyway).
    args = small(tree, run_dir, "--cluster", "slurm", "--partition", slurm_env.partition, "log.wandb_mode=offline",
                 "data.workers=1")  # fmt: skip
    t0 = time.monotonic()
    out = run_cli(LAUNCH, *args, env=clean_env())
    assert out.returncode == 0, out.stderr
    job_id = submitted(out.stdout)
    log = run_dir / "slurm" / job_id / f"{job_id}_0_log.out"
    assert f"run folder: {run_dir}\n" in out.stdout and f"logs: {log} (rank 0" in out.stdout
    wandb_id = re.search(
        r"^W&B: offline \(log.wandb_mode=offline\): new run (\w+), files in ", out.stdout, re.M
    )[1]
    assert f"cancel: scancel {job_id}" in out.stdout
    assert "run folder" not in out.stderr  # tmp_path is under /tmp: this cluster's one node is this machine
    # the dry run shows exactly the script that was submitted
    assert launch.main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out.split("# sbatch script submitit would submit")[1].split("\n", 1)[1]
    assert (run_dir / "slurm" / job_id / f"{job_id}_submission.sh").read_text() == dry

    # Interrupt it twice mid-run with submitit's test hook, letting SLURM start it again each time:
    # 1. timeout=True: USR2 alone, what SLURM sends launch.signal_delay_s before the time limit;
    # 2. preemption: SIGTERM, then USR2.
    job = submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id, tasks=[0, 1])
    steps = run_dir / "steps.jsonl"

    def logged_step_above(step: int):
        lines = steps.read_text().splitlines() if steps.is_file() else []
        return any(json.loads(line)["step"] > step for line in lines)

    stops = []
    for timeout in (True, False):
        after = stops[-1] if stops else 0
        slurm_env.wait_for(f"training past step {after}", lambda a=after: logged_step_above(a), timeout=300)
        job._interrupt(timeout=timeout)
        slurm_env.start_requeued_now(job_id, timeout=120)  # PENDING again: the checkpoint was saved before
        stops = _stops(log)
    results = job.results()
    print(f"submit → 2 × (interrupt → requeue) → done: {time.monotonic() - t0:.1f} s")
    assert [(r["status"], r["epoch"], r["step"]) for r in results] == [("done", 2, STEPS)] * 2
    slurm_env.wait_for("sacct COMPLETED", lambda: slurm_env.sacct_states(job_id)[-1:] == ["COMPLETED"])
    assert slurm_env.sacct_states(job_id, duplicates=True) == ["REQUEUED", "REQUEUED", "COMPLETED"]

    text = log.read_text()
    assert text.count("this job is preempted") == 2  # timeout_min 15: neither counts as a timeout
    # each start's rank line names the CPUs the task may run on and its threads (launch.cpus_per_gpu=1)
    assert (
        len(re.findall(r"^rank 0/2: host .*; CPUs [\d,-]+ \(\d+\), 1 intra-op thread\(s\)$", text, re.M)) == 3
    )
    # not submitit's "Requeued job" line: it is logged after `scontrol requeue` returns, when SLURM may already have
    # ended the step (sacct's two REQUEUED states above are the proof of both requeues)
    assert "restart 1" in text and "restart 2" in text
    # each start resumed exactly where the previous one saved: same epoch, batch and step
    resumed = [
        int(m[1])
        for m in re.finditer(
            r"resumed from .*last\.pth at (?:epoch \d+, batch \d+|the end of epoch \d+) \(step (\d+)\)", text
        )
    ]
    assert resumed == stops and 0 < stops[0] < stops[1] <= STEPS, text

    # same final state as the uninterrupted run: bitwise equal weights, same validation numbers every epoch
    assert_same_weights(reference[0], run_dir)
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]
    assert val_metrics(run_dir) == val_metrics(reference[0])
    # one W&B run across the requeues: the id printed at submission, one offline run folder per start
    assert torch.load(run_dir / "last.pth", weights_only=True)["wandb_id"] == wandb_id
    files = sorted(run_dir.glob(f"wandb/offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(files) == 3
    # USR2 leaves wandb's service alive: the first start's rows are all on disk. (SIGTERM kills the service, a Go
    # program, at once, so the second start's file is not checked.) The last start continues after its resume.
    first, last = RunFile(files[0]), RunFile(files[2])
    assert max(row["_step"] for row in first.history) == stops[0]
    assert min(row["_step"] for row in last.history) >= stops[1]  # = after a stop at an epoch end
    assert max(row["_step"] for row in last.history) == STEPS


def dali_small(tree: Path, run_dir: Path, *extra: str) -> list[str]:
    """``small`` on the DALI-CPU backend, global batch 4 (2 a task): 14 steps an epoch, room for a mid-epoch stop."""
    return small(tree, run_dir, "data.backend=dali", "data.dali_device=cpu", "data.workers=1", "data.batch_size=4",
                 *extra)  # fmt: skip


@pytest.fixture(scope="module")
def dali_reference(tree, tmp_path_factory) -> Path:
    """An uninterrupted DALI-CPU run of 2 tasks through ``--cluster local``."""
    run_dir = tmp_path_factory.mktemp("dali_reference") / "run"
    out = run_cli(LAUNCH, *dali_small(tree, run_dir, "--cluster", "local"), env=clean_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return run_dir


@pytest.mark.slurm
def test_slurm_time_limit_on_dali_resumes_mid_epoch_to_the_same_weights(
    slurm_env: SlurmCluster, tree, tmp_path, dali_reference
):
    """The time limit's USR2 mid-epoch on a 2-task DALI-CPU job: both tasks save their own pipeline checkpoint in
    last.pth, the requeued job restores them (same images, crops, flips and colour shifts as if never stopped) and
    ends with the uninterrupted run's weights, without the fresh-augmentation warning."""
    run_dir = tmp_path / "run"
    args = dali_small(tree, run_dir, "--cluster", "slurm", "--partition", slurm_env.partition)
    out = run_cli(LAUNCH, *args, env=clean_env())
    assert out.returncode == 0, out.stderr
    job_id = submitted(out.stdout)
    log = run_dir / "slurm" / job_id / f"{job_id}_0_log.out"
    job = submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id, tasks=[0, 1])
    steps = run_dir / "steps.jsonl"
    slurm_env.wait_for("a training step", lambda: steps.is_file() and steps.read_text().strip(), timeout=300)
    job._interrupt(timeout=True)  # USR2 alone, as before the time limit
    slurm_env.start_requeued_now(job_id, timeout=120)
    results = job.results()
    assert [(r["status"], r["epoch"], r["step"]) for r in results] == [("done", 2, 28)] * 2
    text = log.read_text()
    saved = re.search(r"stop requested: saved .* at epoch 1, batch (\d+)", text)
    assert saved and 0 < int(saved[1]) < 14, text  # mid-epoch: the pipeline state is what makes it exact
    assert f"resumed from {run_dir}/last.pth at epoch 1, batch {saved[1]} (step {saved[1]})" in text, text
    assert "augmentation" not in text
    assert_same_weights(dali_reference, run_dir)
    assert val_metrics(run_dir) == val_metrics(dali_reference)


def _stops(log: Path) -> list[int]:
    """Global steps at which the job stopped on a stop request, from rank 0's log: a mid-epoch checkpoint, or (a
    signal during validation) the epoch's own."""
    text = log.read_text() if log.is_file() else ""
    pattern = r"stop requested: (?:saved .* at epoch (\d+), batch (\d+)|epoch (\d+) is saved)"
    return [
        (int(m[1]) - 1) * STEPS_PER_EPOCH + int(m[2]) if m[1] else int(m[3]) * STEPS_PER_EPOCH
        for m in re.finditer(pattern, text)
    ]


@pytest.mark.slurm
def test_slurm_timeout_limit_stops_the_job_and_the_same_command_resumes(
    slurm_env: SlurmCluster, tree, tmp_path, reference
):
    """A time limit of 10 min or less makes submitit count every signal as a timeout; launch.max_num_timeout=0
    allows none. On the limit's USR2 the job saves its checkpoint, then fails saying why, and --wait follows the log
    and reports it. Submitting the same command again resumes from that checkpoint (as after a node failure, where
    the last checkpoint on disk is all there is) and ends with the same weights."""
    run_dir = tmp_path / "run"
    args = [
        *small(tree, run_dir, "--cluster", "slurm", "--wait", "launch.max_num_timeout=0"),
        "--time",
        "00:05:00",
    ]
    proc = subprocess.Popen([sys.executable, LAUNCH, *args], cwd=REPO, env=clean_env() | {"PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        steps = run_dir / "steps.jsonl"
        slurm_env.wait_for(
            "training progress", lambda: steps.is_file() and steps.read_text().strip(), timeout=300
        )
        (job_id,) = [p.name for p in (run_dir / "slurm").iterdir() if p.name.isdigit()]
        submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id)._interrupt(
            timeout=True
        )  # USR2 only
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            f"error: job {job_id} failed: submitit.core.utils.UncompletedJobError: Job not requeued because: "
            f"timed-out too many times. (log: {run_dir}/slurm/{job_id}/{job_id}_0_log.err)"
        )
    )
    assert "stop requested: saved" in out and "this job is timed-out" in out  # streamed from rank 0's log
    state = torch.load(run_dir / "last.pth", weights_only=True)
    (stop,) = _stops(run_dir / "slurm" / job_id / f"{job_id}_0_log.out")
    assert state["step"] == stop and 0 < stop <= STEPS
    slurm_env.wait_for("sacct FAILED", lambda: slurm_env.sacct_states(job_id)[-1:] == ["FAILED"])

    again = run_cli(LAUNCH, *args, env=clean_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    new_id = submitted(again.stdout)
    assert new_id != job_id
    assert re.search(
        rf"resumed from .*last\.pth at (the end of )?epoch \d+(, batch \d+)? \(step {stop}\)", again.stdout
    )
    assert again.stdout.rstrip().splitlines()[-1].startswith(f"job {new_id} done: epoch 2, step {STEPS}")
    assert_same_weights(reference[0], run_dir)


@pytest.mark.slurm
def test_slurm_unknown_partition_and_sbatch_errors_in_one_line(
    capsys, slurm_env: SlurmCluster, tree, tmp_path, monkeypatch
):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    # a partition sinfo does not list: refused before anything is written (slurm/resources.py)
    args = small(tree, tmp_path / "r", "--cluster", "slurm", "log.wandb_mode=offline")
    assert main_output(capsys, *args, "--partition", "nope") == (2, "", (
        "error: partition 'nope' does not exist (sinfo lists: debug*; * is the default): use --partition debug "
        "(launch.partition=debug)\n"))  # fmt: skip
    assert not (tmp_path / "r").exists()
    # what only sbatch knows (a reservation): its own words, on one line
    code, _, err = main_output(capsys, *args, "--sbatch", "reservation=nope")
    assert (code, err) == (
        2,
        "error: sbatch: Batch job submission failed: Requested reservation is invalid\n",
    )
    assert not (tmp_path / "r" / "wandb_id.txt").exists()  # no run was started under the id it had fixed


@pytest.mark.slurm
def test_slurm_job_over_the_partitions_limits_is_warned_about(
    capsys, slurm_env: SlurmCluster, tree, tmp_path
):
    """The test cluster has one node: a 2-node job is refused before submission (sinfo); with --force it is
    queued (no EnforcePartLimits) but never starts, and the launch says so."""
    args = small(tree, tmp_path / "r", "--cluster", "slurm", "--partition", slurm_env.partition)
    assert main_output(capsys, *args, "--gpus", "16", "data.batch_size=16") == (2, "", (
        "error: the job needs 2 nodes with 8+ GPUs, but partition debug has 1: use --gpus 8 or fewer\n"))  # fmt: skip
    out = run_cli(LAUNCH, *args, "--gpus", "16", "data.batch_size=16", "--force", env=clean_env())
    job_id = submitted(out.stdout)
    subprocess.run(["scancel", job_id], check=True)
    assert out.returncode == 0, out.stderr
    # PartitionNodeLimit or PartitionConfig, depending on which check slurmctld's scheduler made first
    assert re.search(
        rf"warning: job {job_id} is pending for Partition\w+: SLURM will not start it", out.stderr
    )
    assert f"scancel {job_id} and launch fewer --gpus/--nodes" in out.stderr


@pytest.mark.slurm
def test_slurm_second_launch_into_a_busy_run_dir_is_refused(slurm_env: SlurmCluster, tree, tmp_path):
    """A second launch into the run folder of a queued or running job is refused before it writes anything there;
    ``--force`` submits anyway, and the new job's training then stops in one line naming the first job."""
    run_dir = tmp_path / "run"
    args = small(tree, run_dir, "--cluster", "slurm", "--partition", slurm_env.partition, "sched.epochs=50")
    first = run_cli(LAUNCH, *args, env=clean_env())
    assert first.returncode == 0, first.stderr
    job_id = submitted(first.stdout)
    second_id = None
    try:
        t0 = time.monotonic()
        again = run_cli(LAUNCH, *args, env=clean_env())
        print(f"refused in {time.monotonic() - t0:.1f} s")
        assert again.returncode == 2 and "submitted" not in again.stdout
        assert re.fullmatch(
            rf"error: run_dir {re.escape(str(run_dir))} already has SLURM job {job_id} "
            rf"\((PENDING|CONFIGURING|RUNNING)\); scancel {job_id} first or use another run_dir",
            again.stderr.strip().splitlines()[-1],
        ), again.stderr
        assert sorted(p.name for p in (run_dir / "slurm").iterdir() if p.name.isdigit()) == [job_id]

        # --force skips the launcher's checks; the first job's training holds the folder's lock, so the second
        # job stops at once, on every rank, saying who holds it
        lock = run_dir / ".lock"
        slurm_env.wait_for(
            "the first job's lock",
            lambda: lock.is_file() and f'"slurm_job_id": "{job_id}"' in lock.read_text(),
            300,
        )
        holder = json.loads(lock.read_text())
        forced = run_cli(LAUNCH, *args, "--force", "--wait", env=clean_env(), timeout=600)
        second_id = submitted(forced.stdout)
        assert forced.returncode == 1, forced.stdout[-2000:] + forced.stderr[-2000:]
        refusal = (
            f"run_dir {run_dir} is in use by pid {holder['pid']} on {holder['host']} (SLURM job {job_id}) since "
            f"{holder['since']}; wait for it to end, scancel {job_id} if it still runs, or use another run_dir"
        )
        last = forced.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: job {second_id} failed: train.run.RunError: {refusal} (log: "), last
        rank1 = (run_dir / "slurm" / second_id / f"{second_id}_1_log.err").read_text()
        assert f"train.run.RunError: {refusal}" in rank1  # rank 1 stopped with the same line
        assert slurm_env.squeue_state(job_id) == "RUNNING"  # the first job was not disturbed
    finally:
        for j in (job_id, second_id):
            if j:
                slurm_env.run("scancel", j, check=False)
        slurm_env.wait_for("the jobs to leave the queue", lambda: not slurm_env.squeue_state(job_id), 120)
