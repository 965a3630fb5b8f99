"""From a resolved config to a submitted job: job layout, submitit parameters, the sbatch script, submission.

    from slurm.submit import make_plan, sbatch_script, submit
    plan = make_plan(load_config("vgg16_bn", ["launch.gpus=16"]))  # 2 nodes × 8 tasks, one task per GPU
    print(sbatch_script(plan))                                       # what sbatch would get; submits nothing
    job = submit(plan)                                               # a submitit Job (SLURM, local or debug)

Layout: ``launch.gpus`` is the total, one task per GPU. Nodes = ceil(gpus / gpus_per_node) unless
``launch.nodes`` is given; every node runs the same number of tasks (SLURM's ``--ntasks-per-node``), so the
GPUs must split evenly over the nodes (12 GPUs on 8-GPU nodes run as 2 nodes × 6; 9 are refused). Per-GPU batch
= global ``data.batch_size`` / gpus, which must divide (the config refuses otherwise); the learning rate is the
recipe's for the global batch and is scaled only with ``optim.lr_scaling=linear``.

Executors: submitit's ``SlurmExecutor``, ``LocalExecutor`` (same job, one process per GPU on this machine) and
``DebugExecutor`` (in this process), built directly rather than through ``AutoExecutor``: AutoExecutor cannot
pass ``signal_delay_s`` to the local executor, and SLURM's own option names are what the sbatch script shows.
Job folder: ``<run_dir>/slurm/%j`` (submitit's pickles and the per-task logs ``%j_%t_log.out/.err``).

One training per run folder: before submitting to SLURM, :func:`active_slurm_jobs` asks ``squeue`` about the jobs
whose folders are in ``<run_dir>/slurm/`` and :func:`launch` refuses while one is still queued or running; on any
cluster it also refuses while a training holds ``<run_dir>/.lock`` (``train.run.lock_run_dir``, the lock every
training takes, which is what finally keeps two runs apart).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError
from submitit.slurm.slurm import SlurmExecutor

from slurm.job import CTRL_C_STOP
from train.config import Config, effective_lr, per_process_batch, to_dict, to_yaml

NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")  # storage no other node can see
NODE_LOCAL_FS = ("tmpfs", "ramfs")
# squeue states of a job that has ended: anything else (PENDING, RUNNING, REQUEUED, SUSPENDED, COMPLETING, a held
# or requeued state, ...) may still write into its run folder.
SLURM_ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                                "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"})  # fmt: skip
MAX_JOBS_CHECKED = 100  # the newest job folders asked about (one squeue call)
# squeue's reasons for a pending job that SLURM will not start while they hold: a cluster without EnforcePartLimits
# queues a job over its partition's limits (more nodes or time than it allows) instead of refusing it; the same
# reasons also come when the nodes it needs are down or drained.
NEVER_STARTS = frozenset({"PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig", "BadConstraints",
                          "InvalidAccount", "InvalidQOS"})  # fmt: skip


class LaunchError(RuntimeError):
    """A launch problem, described in one line (the CLI prints ``error: <message>``)."""


@dataclass(frozen=True)
class Plan:
    """Everything the launcher decided, before anything is submitted."""

    cfg: Config
    nodes: int
    tasks_per_node: int  # = GPUs per node used: one task per GPU
    timeout_min: int  # launch.time in minutes (submitit's unit)
    mem: str  # per node: launch.mem_per_gpu × tasks_per_node, in SLURM's units
    folder: Path  # submitit's job folder, <run_dir>/slurm/%j
    notes: tuple[str, ...] = ()  # decisions worth saying ("12 GPUs run as 2 nodes × 6")
    warnings: tuple[str, ...] = ()  # risky but allowed (run folder on /tmp)
    # sbatch --dependency (a sweep's B–E on net A: "afterok:<A's job id>"), with --kill-on-invalid-dep=yes so a
    # job whose dependency can never be met (A failed or was cancelled) leaves the queue instead of pending forever
    dependency: str | None = None
    # where CPUs and memory per task came from, one line each ("cpus per task: 8 (sinfo: partition gpu, ...)")
    resources: tuple[str, ...] = ()

    @property
    def cluster(self) -> str:
        return self.cfg.launch.cluster

    @property
    def gpus(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def per_gpu_batch(self) -> int:
        return per_process_batch(self.cfg, self.gpus)

    def summary(self) -> str:
        """One line: layout, batch split and learning rate."""
        c = self.cfg
        lr = effective_lr(c)
        rule = (
            f"optim.lr_scaling=linear: {c.optim.lr:g} × {c.data.batch_size}/{c.optim.lr_reference_batch}"
            if c.optim.lr_scaling == "linear"
            else "optim.lr_scaling=none: the recipe's lr for this global batch"
        )
        where = {"slurm": "SLURM", "local": "this machine (submitit local)", "debug": "this process (debug)"}
        if self.cluster == "debug":  # one task in this process, whatever --gpus says (make_plan's note)
            return f"1 task in {where['debug']}; global batch {c.data.batch_size} in one process; lr {lr:g} ({rule})"
        return (
            f"{self.nodes} node(s) × {self.tasks_per_node} GPU(s) = {self.gpus} task(s), one per GPU, on "
            f"{where[self.cluster]}; global batch {c.data.batch_size} = {self.gpus} × {self.per_gpu_batch} per GPU; "
            f"lr {lr:g} ({rule})"
        )


# ------------------------------------------------------------------------------------------------ plan


def parse_time_min(text: str) -> int:
    """SLURM's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) → minutes,
    rounded up (submitit's ``time``/``timeout_min`` unit)."""
    days, _, rest = text.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        raise LaunchError(f"launch.time={text!r} is not SLURM's [D-]HH:MM:SS") from None
    if days:
        h, m, s = [*parts, 0, 0][:3]
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = parts[:3]
    minutes = math.ceil(((d * 24 + h) * 60 + m) + s / 60)
    if minutes < 1:
        raise LaunchError(f"launch.time={text!r} is shorter than a minute")
    return minutes


def memory_per_node(per_gpu: str, tasks_per_node: int) -> str:
    """``launch.mem_per_gpu`` (``64G``, ``500M``) × tasks per node, as sbatch's ``--mem`` (per node)."""
    from slurm.resources import format_mb, size_mb_exact

    mb = size_mb_exact(per_gpu)
    if mb is None:
        raise LaunchError(f"launch.mem_per_gpu={per_gpu!r} is not a size like 64G or 500M")
    return format_mb(math.ceil(mb * tasks_per_node))


def node_local_storage(path: str | Path) -> str | None:
    """Why ``path`` is not shared with other nodes (a /tmp-like folder or a tmpfs mount), or None."""
    resolved = Path(path).resolve()
    for d in NODE_LOCAL_DIRS:
        if resolved == Path(d) or Path(d) in resolved.parents:
            return d
    best, fstype = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3:
                mount = fields[1]
                inside = str(resolved) == mount or str(resolved).startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, fstype = mount, fields[2]
    return f"{best} ({fstype})" if fstype in NODE_LOCAL_FS else None


def make_plan(cfg: Config, given: Collection[str] = (), force: bool = False) -> Plan:
    """Decide the job layout for a validated config (``load_config`` already checked the batch divides).
    ``given``: the config keys the user set (flags or key=value); what they chose is not reported as derived.
    CPUs and memory per task: :func:`slurm.resources.plan_resources` (``force``: what cannot fit is a warning)."""
    la = cfg.launch
    nodes, gpus = la.nodes, la.gpus
    notes: list[str] = []
    warnings: list[str] = []
    if gpus % nodes:
        fits = [n * nodes for n in range(1, la.gpus_per_node + 1)]
        lower = max([g for g in fits if g < gpus], default=None)
        upper = min([g for g in fits if g > gpus], default=None)
        choices = " or ".join(f"--gpus {g}" for g in (lower, upper) if g is not None)
        nodes_from = f"--nodes {nodes}" if "launch.nodes" in given else f"{nodes} node(s)"
        raise LaunchError(
            f"--gpus {gpus} does not split evenly over {nodes_from} of up to {la.gpus_per_node} GPUs "
            f"(SLURM starts the same number of tasks on every node): use {choices}, or "
            f"{'another' if 'launch.nodes' in given else 'choose'} --nodes"
        )
    tasks = gpus // nodes
    if tasks > la.gpus_per_node:  # validate() already refuses this; kept for direct callers
        raise LaunchError(f"{gpus} GPUs do not fit on {nodes} node(s) × {la.gpus_per_node} GPUs")
    if nodes > 1 and tasks < la.gpus_per_node and "launch.nodes" not in given:
        notes.append(
            f"{gpus} GPUs on {la.gpus_per_node}-GPU nodes: using {nodes} nodes × {tasks} GPUs each (one task per "
            f"GPU, the same count on every node); pass --nodes to choose another split"
        )
    if cfg.launch.cluster == "local" and nodes > 1:
        raise LaunchError(
            f"--cluster local runs on this machine (one node), but {gpus} GPUs at {la.gpus_per_node} per node "
            f"need {nodes} nodes: lower --gpus or raise --gpus-per-node"
        )
    if cfg.launch.cluster == "local":
        import torch  # already loaded by the config validation

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have and have < tasks:
            raise LaunchError(f"--cluster local: {tasks} GPUs requested, this machine has {have}")
        if not have:
            notes.append(f"no CUDA GPU here: {tasks} CPU process(es) with gloo")
    if cfg.launch.cluster == "debug" and gpus > 1:
        notes.append(
            f"--cluster debug runs one task in this process (world size 1), not {gpus}: the global batch "
            f"{cfg.data.batch_size} stays the same"
        )
    if cfg.launch.cluster == "slurm":
        python = cfg.launch.python or sys.executable
        # its folder, not the file: a venv's bin/python links to the system interpreter wherever the venv is; a
        # cluster whose every node is this machine (ONE_MACHINE_VAR) runs it from there
        where = (
            node_local_storage(os.path.dirname(python))
            if os.path.isabs(python) and os.environ.get(ONE_MACHINE_VAR) != "1"
            else None
        )
        if where:  # the tasks run this path on every node: it must be there
            raise LaunchError(
                f"the job's interpreter {python} is on node-local storage ({where}): the compute nodes cannot run "
                f"it; install the environment on storage every node sees, or name one with --python"
            )
    elif not Path(cfg.data.root).is_dir():
        raise LaunchError(
            f"data root {cfg.data.root!r} does not exist (expected train/<wnid>/*.JPEG and val/...; "
            f"`python -m data_pipeline demo {cfg.data.root}` makes the demo dataset)"
        )
    extra_sbatch_options(cfg)  # refused now, not while the script is rendered
    timeout_min = parse_time_min(la.time)
    if cfg.launch.cluster != "debug" and timeout_min * 60 <= la.signal_delay_s:
        raise LaunchError(
            f"launch.time={la.time} ({timeout_min} min) leaves no training before the stop signal, sent "
            f"launch.signal_delay_s={la.signal_delay_s} s before the limit: give a longer --time"
        )
    if cfg.launch.cluster == "slurm" and timeout_min <= 10:
        warnings.append(
            f"launch.time={la.time} is 10 minutes or less: submitit then counts every signal, a preemption too, "
            f"as a timeout (against launch.max_num_timeout={la.max_num_timeout})"
        )
    # CPUs and memory per task: the user's or the recipe's, checked against the partition's nodes (sinfo); the
    # rest derived from them (slurm/resources.py)
    from slurm.resources import ResourceError, plan_resources

    try:
        res = plan_resources(cfg, tasks, nodes, given, force=force)
    except ResourceError as e:
        raise LaunchError(str(e)) from None
    cfg = replace(cfg, launch=replace(la, cpus_per_gpu=res.cpus_per_gpu, mem_per_gpu=res.mem_per_gpu))
    notes.extend(res.notes)
    warnings.extend(res.warnings)
    mem = memory_per_node(res.mem_per_gpu, tasks)
    return Plan(
        cfg=cfg,
        nodes=nodes,
        tasks_per_node=tasks,
        timeout_min=timeout_min,
        mem=mem,
        folder=Path(cfg.run_dir) / "slurm" / "%j",
        notes=tuple(notes),
        warnings=tuple(warnings),
        resources=(
            f"cpus per task: {res.cpus_per_gpu} ({res.cpus_source})",
            f"memory: {res.mem_per_gpu} per GPU, {mem} per node ({res.mem_source})",
        ),
    )


# ------------------------------------------------------------------------------------------- executors


def slurm_parameters(plan: Plan) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` arguments (sbatch's option names, with ``_`` for ``-``)."""
    la = plan.cfg.launch
    params: dict[str, Any] = {
        "job_name": f"vgg-{Path(plan.cfg.run_dir).name}",
        "time": plan.timeout_min,
        "nodes": plan.nodes,
        "ntasks_per_node": plan.tasks_per_node,  # one task per GPU
        "gpus_per_node": plan.tasks_per_node,
        "cpus_per_task": la.cpus_per_gpu,
        # srun does not inherit sbatch's --cpus-per-task on SLURM 22.05-23.02 (23.11 restored it): each task could
        # be bound to one core while DALI's, the decoder's and torch's threads all run there. Say it to srun too.
        "srun_args": [f"--cpus-per-task={la.cpus_per_gpu}"],
        "mem": plan.mem,
        "signal_delay_s": la.signal_delay_s,  # → --signal=USR2@N: checkpoint and requeue before the limit
        # Requeueable: submitit's `scontrol requeue` needs it where JobRequeue=0, and SLURM requeues the job
        # after a node failure (it then resumes from the last checkpoint on disk).
        "additional_parameters": {"requeue": True},
    }
    if plan.dependency:
        params["additional_parameters"].update(dependency=plan.dependency, kill_on_invalid_dep="yes")
    # Faults (slurm/retry.py): one task's bad exit (crash, SIGKILL, a hang named by train.watchdog) ends the whole
    # step at once, instead of the others waiting in a collective (NCCL: up to dist.timeout_min); then the batch
    # script's last lines requeue a failed job (up to launch.max_failures), unless the failure will repeat.
    params["srun_args"] = [*params["srun_args"], "--kill-on-bad-exit=1"]
    params["teardown"] = retry_teardown(plan)
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(la, key)
        if value:
            params[key] = value
    return params


# sbatch options the launcher sets itself: launch.sbatch_args may not set them (the flag that does is named)
MANAGED_SBATCH = {"nodes": "--nodes", "ntasks_per_node": "--gpus", "gpus_per_node": "--gpus", "time": "--time",
                  "cpus_per_task": "--cpus-per-gpu", "mem": "--mem-per-gpu", "partition": "--partition",
                  "account": "--account", "qos": "--qos", "constraint": "--constraint", "signal": "launch.signal_delay_s",
                  "job_name": "--run-dir", "output": "--run-dir", "error": "--run-dir", "requeue": None,
                  "dependency": None, "open_mode": None}  # fmt: skip


def extra_sbatch_options(cfg: Config) -> dict[str, Any]:
    """``launch.sbatch_args`` as submitit's ``additional_parameters``; LaunchError (one line) for an option the
    launcher sets itself (naming the flag that does)."""
    extra = {str(k).replace("-", "_").lstrip("_"): v for k, v in cfg.launch.sbatch_args.items()}
    for key in extra:
        if key in MANAGED_SBATCH:
            flag = MANAGED_SBATCH[key]
            how = f"use {flag}" if flag else "the launcher sets it"
            raise LaunchError(
                f"launch.sbatch_args.{key}: the launcher sets #SBATCH --{key.replace('_', '-')}; {how}"
            )
    return extra


def site_parameters(plan: Plan, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (:func:`slurm_parameters`) with the site's options added: ``launch.setup`` (shell lines before
    srun: submitit's ``setup``), ``launch.sbatch_args`` (more ``#SBATCH`` lines), ``launch.srun_args`` and
    ``launch.container_image`` (pyxis: ``srun --container-image=IMAGE``), after any srun options of ``params``.
    LaunchError (one line) for an sbatch option the launcher sets itself."""
    la = plan.cfg.launch
    out = dict(params)
    extra_sbatch = extra_sbatch_options(plan.cfg)
    if extra_sbatch:
        out["additional_parameters"] = {**params.get("additional_parameters", {}), **extra_sbatch}
    if la.setup:
        out["setup"] = [*params.get("setup", []), *la.setup]
    srun = [*la.srun_args, *([f"--container-image={la.container_image}"] if la.container_image else [])]
    if srun:
        out["srun_args"] = [*params.get("srun_args", []), *srun]
    return out


def retry_teardown(plan: Plan) -> list[str]:
    """The sbatch script's lines after srun: ``slurm.retry`` decides whether a failed job requeues itself."""
    from slurm.retry import teardown_lines

    la = plan.cfg.launch
    return teardown_lines(plan.cfg.run_dir, la.max_failures, la.python, la.container_image)


class _PlanOnlySlurmExecutor(SlurmExecutor):
    """submitit's SlurmExecutor without its ``srun`` check, used only to render the sbatch script (dry run)."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def sbatch_script(plan: Plan) -> str:
    """The sbatch script submitit would submit for this plan (rendered by submitit itself; nothing runs)."""
    la = plan.cfg.launch
    executor = _PlanOnlySlurmExecutor(plan.folder, max_num_timeout=la.max_num_timeout, python=la.python)
    executor.update_parameters(**site_parameters(plan, slurm_parameters(plan)))
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def require_slurm_clients() -> None:
    """LaunchError (one line) when sbatch or srun is not on PATH: this is not a SLURM submit host."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        missing = "sbatch" if shutil.which("sbatch") is None else "srun"
        raise LaunchError(
            f"{missing} not found on PATH: this machine is not a SLURM submit host; run the same job here "
            f"with --cluster local, or see the sbatch script with --dry-run"
        )


def make_executor(plan: Plan) -> submitit.Executor:
    """The submitit executor for ``launch.cluster``, configured for this plan."""
    la = plan.cfg.launch
    if plan.cluster == "slurm":
        require_slurm_clients()
        executor: submitit.Executor = submitit.SlurmExecutor(
            plan.folder, max_num_timeout=la.max_num_timeout, python=la.python
        )
        executor.update_parameters(**site_parameters(plan, slurm_parameters(plan)))
    elif plan.cluster == "local":
        executor = submitit.LocalExecutor(plan.folder, max_num_timeout=la.max_num_timeout)
        executor.update_parameters(
            tasks_per_node=plan.tasks_per_node,
            gpus_per_node=plan.tasks_per_node,
            timeout_min=plan.timeout_min,
            signal_delay_s=la.signal_delay_s,
        )
    else:
        executor = submitit.DebugExecutor(plan.folder)
    return executor


# ---------------------------------------------------------------------------------------------- submit


_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def _submission_env():
    """Submit with a clean environment: sbatch exports it to the job, and variables from an enclosing job
    (SLURM_*, SBATCH_* options, torchrun's RANK/MASTER_PORT) would leak into the new one. SLURM_CONF stays: clients
    need it to find the cluster."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env(_DIST_VARS):
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)


@contextlib.contextmanager
def _sigint_ignored_by_children(active: bool):
    """``--cluster local``: submitit's controller process (and through it the tasks) starts with SIGINT ignored.
    Its own reaction to a Ctrl-C is to kill the tasks a second later, before they can save; this way a Ctrl-C
    reaches only the tasks, which install their own handler (``slurm.job.StopOnSignal``: save ``last.pth``, stop),
    and this process, which then waits for them (``launch``)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _sbatch_error(e: BaseException) -> str:
    """sbatch's own complaint (``sbatch: error: ...`` lines), verbatim, on one line."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln[len("sbatch: error:") :].strip() for ln in lines if ln.lower().startswith("sbatch: error:")]
    return "sbatch: " + "; ".join(errors) if errors else (lines[-1] if lines else type(e).__name__)


def submit(plan: Plan, executor: submitit.Executor | None = None) -> submitit.Job:
    """Submit the training job of ``plan`` (one task per GPU) and return submitit's job handle."""
    from slurm.job import TrainJob

    executor = executor or make_executor(plan)
    job_fn = TrainJob(to_dict(plan.cfg))
    captured = io.StringIO()
    try:
        # submitit prints sbatch's stderr itself before raising: keep it, and report it once, on one line.
        with (
            _submission_env(),
            contextlib.redirect_stderr(captured),
            _sigint_ignored_by_children(plan.cluster == "local"),
        ):
            return executor.submit(job_fn)
    except (FailedJobError, FailedSubmissionError) as e:
        raise LaunchError(_sbatch_error(e)) from None
    finally:
        leftover = captured.getvalue()
        if leftover and "sbatch: error" not in leftover:
            sys.stderr.write(leftover)


def slurm_job_ids(run_dir: str | Path) -> list[str]:
    """Ids of the SLURM jobs submitted into ``run_dir`` (job folders ``<run_dir>/slurm/<id>`` holding submitit's
    ``<id>_submission.sh``; ``--cluster local`` job folders, named by a pid, have none), oldest first."""
    root = Path(run_dir) / "slurm"
    if not root.is_dir():
        return []
    ids = [
        p.name
        for p in root.iterdir()
        if re.fullmatch(r"\d+(_\d+)?", p.name) and (p / f"{p.name}_submission.sh").is_file()
    ]
    return sorted(ids, key=lambda i: tuple(int(x) for x in i.split("_")))


def active_slurm_jobs(run_dir: str | Path) -> list[tuple[str, str]]:
    """``(job id, state)`` of this run folder's SLURM jobs that have not ended, from ``squeue -h -o %i,%T -j IDS``.

    LaunchError (one line) when squeue cannot answer: the caller decides whether that stops a submission."""
    ids = slurm_job_ids(run_dir)[-MAX_JOBS_CHECKED:]
    if not ids:
        return []
    if shutil.which("squeue") is None:
        raise LaunchError("squeue not found on PATH")
    cmd = ["squeue", "-h", "-o", "%i,%T", "-j", ",".join(ids)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise LaunchError("squeue did not answer within 60 s") from None
    if proc.returncode != 0:
        if "invalid job id" in proc.stderr.lower():  # every id has left slurmctld's memory (MinJobAge)
            return []
        lines = proc.stderr.strip().splitlines()
        raise LaunchError(f"squeue exited {proc.returncode}: {lines[-1] if lines else 'no message'}")
    active = []
    for line in proc.stdout.splitlines():
        job_id, _, state = line.strip().partition(",")
        state = state.split()[0] if state.split() else ""
        if job_id in ids and state and state not in SLURM_ENDED_STATES:
            active.append((job_id, state))
    return active


def never_starts(job_id: str) -> str | None:
    """squeue's reason when the just-submitted job will not start as submitted (see NEVER_STARTS), else None.
    Never fatal: a squeue that does not answer says nothing."""
    for _ in range(4):  # a pending job's reason is "None" until the scheduler's first look at it (< 1 s here)
        try:
            cmd = ["squeue", "-h", "-o", "%T %r", "-j", job_id]
            state, _, reason = subprocess.run(
                cmd, capture_output=True, text=True, timeout=30
            ).stdout.partition(" ")
        except (OSError, subprocess.TimeoutExpired):
            return None
        reason = reason.strip()
        if state != "PENDING" or reason != "None":
            return reason if state == "PENDING" and reason in NEVER_STARTS else None
        time.sleep(0.5)
    return None


def refuse_active_slurm_jobs(run_dir: str | Path) -> None:
    """LaunchError in one line if a SLURM job launched into ``run_dir`` is still queued or running; a warning
    (and nothing refused) when squeue cannot tell."""
    try:
        active = active_slurm_jobs(run_dir)
    except LaunchError as e:
        print(
            f"warning: could not ask SLURM about earlier jobs in {run_dir} ({e}); submitting anyway (the training "
            f"itself refuses to start while another one holds {run_dir}/.lock)",
            file=sys.stderr,
        )
        return
    if not active:
        return
    jobs = ", ".join(f"{job_id} ({state})" for job_id, state in active)
    noun = "job" if len(active) == 1 else "jobs"
    if all(state == "COMPLETING" for _, state in active):
        advice = "wait for it to end (a few seconds), or use another run_dir"
    else:
        advice = f"scancel {' '.join(job_id for job_id, _ in active)} first or use another run_dir"
    raise LaunchError(f"run_dir {run_dir} already has SLURM {noun} {jobs}; {advice}")


def finished_epoch(cfg: Config) -> int | None:
    """The epoch of ``<run_dir>/last.pth`` when the run it would resume has nothing left to train, else None (also
    when the file cannot be read: the job then says why). Memory-mapped: only the pickled structure is read."""
    last = Path(cfg.run_dir) / "last.pth"
    if cfg.ckpt.resume != "auto" or not last.is_file():
        return None
    import torch

    try:
        epoch = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # the job's own resume reports a bad checkpoint in one line
        return None
    return epoch if isinstance(epoch, int) and epoch >= cfg.sched.epochs else None


def log_paths(job: submitit.Job, task: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) of one task of a submitted job (submitit's ``%j_%t_log.out/.err``)."""
    paths = job.task(task).paths
    return paths.stdout, paths.stderr


def absolute_paths(cfg: Config) -> Config:
    """run_dir, data.root and checkpoint paths made absolute: the job may start in another directory."""

    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    cfg.run_dir = absolute(cfg.run_dir)
    cfg.data.root = absolute(cfg.data.root)
    if cfg.ckpt.resume not in ("auto", "never"):
        cfg.ckpt.resume = absolute(cfg.ckpt.resume)
    if cfg.model.init_from:
        cfg.model.init_from = absolute(cfg.model.init_from)
    return cfg


def wandb_run(cfg: Config) -> str:
    """Which W&B run the job will log to, in one line. Fixes a new run's id now (``<run_dir>/wandb_id.txt``, which
    the job's tracker reads), so it can be printed before the job starts; a resumed run keeps its id."""
    from train.tracking import new_run_id, read_run_id, resolve_mode, sync_pattern, write_run_id

    try:
        mode, why = resolve_mode(cfg.log.wandb_mode)
    except ValueError as e:
        return f"W&B: off ({e})"
    if mode == "disabled":
        return f"W&B: disabled ({why})"
    run_dir = Path(cfg.run_dir)
    if cfg.ckpt.resume == "never":
        return f"W&B: {mode} ({why}); ckpt.resume=never starts a new run, named in the job's log"
    run_id, state = read_run_id(run_dir), "continues run"
    if not run_id:
        run_id, state = new_run_id(), "new run"
        write_run_id(run_dir, run_id)
    if mode == "online":
        entity = f"{cfg.log.entity}/" if cfg.log.entity else ""
        return f"W&B: online ({why}): {state} {run_id} in {entity}{cfg.log.project}; the job's log prints its URL"
    return (
        f"W&B: offline ({why}): {state} {run_id}, files in {run_dir}/wandb; upload with: "
        f"wandb sync {sync_pattern(run_dir / 'wandb', run_id)}"
    )


# ------------------------------------------------------------------------------------------ console


def dry_run(plan: Plan, out: TextIO | None = None, force: bool = False) -> int:
    """Print the resolved config, the plan and the sbatch script submitit would submit; submit nothing. A reason
    the launch would refuse (:func:`presubmit_problem`; not with ``force``) is a warning here."""
    out = out or sys.stdout
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for problem in (node_local_problem(plan.cfg), None if force else presubmit_problem(plan.cfg)):
        if problem:
            print(f"warning: the launch would refuse this: {problem}", file=sys.stderr)
    print(
        f"# resolved config (written to {plan.cfg.run_dir}/config.yaml by the job once it starts training)",
        file=out,
    )
    print(to_yaml(plan.cfg), end="", file=out)
    print(f"# plan: {plan.summary()}", file=out)
    for n in plan.notes:
        print(f"# note: {n}", file=out)
    for r in plan.resources:
        print(f"# {r}", file=out)
    if plan.cluster == "slurm":
        print(
            f"# sbatch script submitit would submit (dry run: nothing submitted); job folder {plan.folder}",
            file=out,
        )
        print(sbatch_script(plan), end="", file=out)
    else:
        how = (
            "one process per GPU on this machine (submitit LocalExecutor)"
            if plan.cluster == "local"
            else ("in this process (submitit DebugExecutor)")
        )
        print(f"# --cluster {plan.cluster}: no sbatch script; the job runs {how}", file=out)
    return 0


class LogTail:
    """The part of a log file not yet copied: ``copy_new(out)`` writes what has grown since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos = path, 0

    def copy_new(self, out: TextIO) -> None:
        if not self.path.exists():
            return
        with self.path.open(errors="replace") as f:
            f.seek(self.pos)
            chunk = f.read()
            self.pos = f.tell()
        if chunk:
            out.write(chunk)
            out.flush()


def follow(
    job: submitit.Job,
    out: TextIO | None = None,
    poll_s: float = 0.5,
    sacct_every_s: float = 5.0,
    tail: LogTail | None = None,
) -> None:
    """Print rank 0's stdout as it grows until the job has ended (through requeues: the log is appended).
    ``tail``: go on from where an earlier ``follow`` of the same log stopped."""
    out = out or sys.stdout
    tail = tail or LogTail(log_paths(job)[0])
    last_sacct = time.monotonic()
    while True:
        finished = job.done()
        if (
            not finished
            and isinstance(job, submitit.SlurmJob)
            and time.monotonic() - last_sacct > sacct_every_s
        ):
            last_sacct = time.monotonic()  # a job that died without a result: ask SLURM now, not on backoff
            finished = job.watcher.is_done(job.job_id, mode="force")
        if finished and isinstance(job, submitit.SlurmJob) and still_queued(job):
            # requeued (node failure, slurm.retry): submitit's watcher took the ended run for the job's end
            finished = False
            time.sleep(sacct_every_s)
        tail.copy_new(out)
        if finished:
            return
        time.sleep(poll_s)


def still_queued(job: submitit.SlurmJob, wait_s: float = 120.0) -> bool:
    """Whether a job submitit takes for ended goes on: SLURM requeued it (a node failure: submitit's watcher keeps
    that run's NODE_FAIL), or the batch script's last step (``slurm.retry``) is requeueing it after a failed start.
    First waits (up to ``wait_s``) for the batch script to end: a rank's error result can be on disk before that
    step removes it and requeues."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            proc = subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T"], capture_output=True,
                                  text=True, timeout=60)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        state = proc.stdout.strip().split()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
        if state not in ("RUNNING", "COMPLETING") or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if job.paths.result_pickle.exists():
        return False
    if state and state not in SLURM_ENDED_STATES:
        job.watcher._finished.discard(str(job.job_id))  # ask sacct again (its cache holds the ended run)
        return True
    return False


def _failure(e: BaseException) -> str:
    """One line from a failed job: the exception line at the end of its traceback, else the first line."""
    text = str(e)
    if "----------------------" in text:  # FailedJobError: the task's traceback between dashed lines
        trace = text.split("----------------------")[1]
        lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def report(job: submitit.Job, out: TextIO | None = None, run_dir: str | None = None) -> int:
    """Wait for the job's result and say how it ended in one line; 0 when it trained to the end.

    With ``run_dir`` (``--cluster local``): a job whose tasks stopped on a Ctrl-C (SIGINT reached them, whether or
    not this process saw it too) ends like a Ctrl-C of the launcher: the resume line, exit status 130."""
    out = out or sys.stdout
    try:
        results = job.results()
    except UncompletedJobError as e:
        if run_dir is not None and CTRL_C_STOP in str(e):
            return _stopped_on_ctrl_c(run_dir)
        _, err = log_paths(job)
        print(f"error: job {job.job_id} failed: {_failure(e)} (log: {err})", file=sys.stderr)
        return 1
    r = results[0]
    best = r.get("best_top1_err", float("nan"))
    print(
        f"job {job.job_id} {r['status']}: epoch {r['epoch']}, step {r['step']}, best val top-1 err {best:.2f}%",
        file=out,
    )
    return 0 if r["status"] == "done" else 1


@contextlib.contextmanager
def _ctrl_c_raises():
    """Following a ``--cluster local`` job: Ctrl-C raises KeyboardInterrupt here even when this process started
    with SIGINT ignored, as it does when a non-interactive shell starts it (or its parent: ``make test &``, ``nohup
    ... &`` in a script, some CI runners) in the background. The tasks install their own SIGINT handler and stop
    on it either way; this process must then know it, wait for them and say so, not report a failed job."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


ONE_MACHINE_VAR = (
    "VGG_ONE_MACHINE_CLUSTER"  # =1: every node is this machine, its /tmp is theirs (test clusters)
)


def node_local_problem(cfg: Config) -> str | None:
    """Why a SLURM job cannot use its run folder: on node-local storage (/tmp, a tmpfs), where the nodes it runs on
    cannot write checkpoints and logs for each other and submitit cannot read results back; None otherwise, for
    other clusters, or where every node is this machine (``VGG_ONE_MACHINE_CLUSTER=1``: the test clusters)."""
    if cfg.launch.cluster != "slurm" or os.environ.get(ONE_MACHINE_VAR) == "1":
        return None
    where = node_local_storage(cfg.run_dir)
    if not where:
        return None
    return (
        f"run folder {cfg.run_dir} is on node-local storage ({where}): the job's nodes cannot write checkpoints and "
        f"logs there for each other, and submitit cannot read results back; use shared storage (--run-dir) (a "
        f"cluster whose every node is this machine: {ONE_MACHINE_VAR}=1)"
    )


def data_problem(cfg: Config) -> str | None:
    """What makes ``data.root`` unusable for this config, in one line naming the fix, or None. Cheap at ImageNet
    scale: the class folders of ``train/`` and ``val/`` are listed (one directory each) and one class folder of
    each is looked into, never the 1.28 M files; a pack (``data.format=shards``) is judged by its manifest."""
    from torchvision.datasets.folder import find_classes

    from data_pipeline.layout import DataError, class_folders_differ
    from data_pipeline.shard_reader import MANIFEST, is_pack, load_manifest

    root, want = Path(cfg.data.root), cfg.model.num_classes
    if not root.is_dir():
        return (
            f"data root {root} does not exist on this host: check --data (on a login node that cannot see the "
            "data, --force submits without the checks)"
        )
    if cfg.data.format == "shards":
        try:
            manifest = load_manifest(root)
        except DataError as e:
            return str(e)
        for split in ("train", "val"):
            entry = manifest["splits"].get(split) or {}
            shards, planned = entry.get("shards") or [], entry.get("planned_shards")
            if not entry or not entry.get("complete") or (planned is not None and len(shards) != planned):
                what = "holds no" if not entry else "has an incomplete"
                return (
                    f"pack {root} {what} {split} split: `python -m data_pipeline pack SRC {root}` finishes it"
                )
        classes = len(manifest["classes"])
        where = f"pack {root} has {classes} classes ({MANIFEST})"
    else:
        if is_pack(root):
            return f"{root} is a pack (it holds {MANIFEST}): set data.format=shards to read it"
        found: dict[str, list[str]] = {}
        for split in ("train", "val"):
            folder = root / split
            if not folder.is_dir():
                hint = (
                    " (give the folder that holds train/ and val/)" if root.name in ("train", "val") else ""
                )
                return f"{folder} is missing: expected {root}/{split}/<class>/<image>{hint}"
            try:  # the loaders' own listing (ImageFolder's): a hidden folder is a class to them too
                found[split] = find_classes(str(folder))[0]
            except FileNotFoundError:  # raised for no class folders
                found[split] = []
            if not found[split]:
                return f"{folder} has no class folders: expected {folder}/<class>/<image>"
            first = folder / found[split][0]
            with os.scandir(first) as entries:
                if next((e for e in entries if not e.name.startswith(".")), None) is None:
                    return f"class folder {first} is empty"
        differ = class_folders_differ(root, found["train"], found["val"])
        if differ:
            return differ
        classes = len(found["train"])
        where = f"{root} has {classes} class folders in train/ and val/"
    if classes != want:
        return f"{where} but model.num_classes={want}: set model.num_classes={classes}, or check --data"
    return None


def checkpoint_problem(cfg: Config) -> str | None:
    """Why the job could not resume from its run folder's checkpoint (``last.pth``, or ``ckpt.resume``'s file),
    in one line, or None: the training's own check (``train.checkpoint.check_resumable``), run here first."""
    from train.checkpoint import CheckpointError, check_resumable, load_checkpoint_file

    if cfg.ckpt.resume == "never":
        return None
    path = Path(cfg.run_dir) / "last.pth" if cfg.ckpt.resume == "auto" else Path(cfg.ckpt.resume)
    if cfg.ckpt.resume == "auto" and not path.is_file():
        return None
    try:
        check_resumable(load_checkpoint_file(path, mmap=True), cfg, path)
    except CheckpointError as e:
        return str(e)
    return None


def presubmit_problem(cfg: Config) -> str | None:
    """The first reason the job would fail as soon as it starts (data root, class count, checkpoint), or None."""
    return data_problem(cfg) or checkpoint_problem(cfg)


def check_run_dir(plan: Plan, out: TextIO | None = None, force: bool = False) -> bool:
    """The checks before anything is written into the run folder. False (and one line on ``out``) when the run has
    nothing left to train: ``last.pth`` is at the last epoch. LaunchError (one line) while the folder is busy: a
    SLURM job of it still queued or running (``--cluster slurm``), a training holding its lock, or a reason the job
    would fail as soon as it starts (:func:`presubmit_problem`: data root, class count, checkpoint); ``force``
    skips those (the training's own lock still refuses to run while another training holds the folder)."""
    from train.run import RunError, check_run_dir_free

    out = out or sys.stdout
    cfg = plan.cfg
    if plan.cluster == "slurm":
        require_slurm_clients()  # first: nothing else matters on a host that cannot submit
    try:
        if not force and plan.cluster == "slurm":
            # first: once that job runs it also holds the lock below, and this says which job and how to end it
            refuse_active_slurm_jobs(cfg.run_dir)
        if not force:
            check_run_dir_free(cfg.run_dir)  # a training holds it now (this node, or any node on NFS)
    except RunError as e:
        raise LaunchError(str(e)) from None
    problem = node_local_problem(cfg) or (None if force else presubmit_problem(cfg))
    if problem:  # the job would fail as soon as it starts, after its queue wait: submit nothing
        raise LaunchError(problem)
    done = finished_epoch(cfg)
    if done is not None:  # a job would only start, load last.pth and say so: not worth a queue slot
        print(
            f"nothing to do: {cfg.run_dir}/last.pth is at epoch {done} of {cfg.sched.epochs}; nothing submitted "
            f"(evaluate it: python evaluate --checkpoint {cfg.run_dir}/best.pth; train on: sched.epochs=N)",
            file=out,
        )
        return False
    return True


def start(plan: Plan, out: TextIO | None = None) -> submitit.Job:
    """Submit the plan's job (after :func:`check_run_dir`) and print where everything is: job id, run folder, logs,
    W&B run, and a warning when SLURM will never start it. LaunchError when it cannot be submitted."""
    from train.run import RunError, make_run_dir

    out = out or sys.stdout
    cfg = plan.cfg
    try:
        executor = make_executor(plan)  # (creates <run_dir>/slurm)
        make_run_dir(cfg.run_dir)  # writable? (the job writes config.yaml once it knows the run goes ahead)
    except RunError as e:
        raise LaunchError(str(e)) from None
    id_file = Path(cfg.run_dir) / "wandb_id.txt"
    had_id = id_file.is_file()
    wandb_line = wandb_run(cfg)
    try:
        job = submit(plan, executor)
    except BaseException:  # sbatch refused it: no run was started under the id just fixed
        if not had_id:
            id_file.unlink(missing_ok=True)
        raise
    stdout, stderr = log_paths(job)
    where = {"slurm": "SLURM", "local": "this machine", "debug": "this process"}[plan.cluster]
    partition = f" (partition {cfg.launch.partition})" if cfg.launch.partition else ""
    print(f"submitted job {job.job_id} to {where}{partition}: {plan.summary()}", file=out)
    print(f"run folder: {cfg.run_dir}", file=out)
    if plan.cluster != "debug":
        others = f"; rank N: {job.job_id}_N_log.out/.err" if plan.gpus > 1 else ""
        print(f"logs: {stdout} (rank 0; stderr: {stderr.name}{others})", file=out)
    if plan.dependency:
        print(f"dependency: {plan.dependency} (kill_on_invalid_dep=yes)", file=out)
    print(wandb_line, file=out)
    out.flush()
    reason = never_starts(job.job_id) if plan.cluster == "slurm" else None
    if reason:
        where = f"partition {cfg.launch.partition}" if cfg.launch.partition else "the default partition"
        print(
            f"warning: job {job.job_id} is pending for {reason}: SLURM will not start it while that holds (over "
            f"the limits of {where}, or the nodes it needs are down or drained: scontrol show partition); if it "
            f"asks too much, scancel {job.job_id} and launch fewer --gpus/--nodes, CPUs or --time",
            file=sys.stderr,
        )
    return job


def follow_to_end(plan: Plan, job: submitit.Job, wait: bool = False, out: TextIO | None = None) -> int:
    """After :func:`start`: on SLURM without ``wait``, say how to follow and cancel and return 0; otherwise follow
    rank 0's log to the job's end and report it (Ctrl-C on ``--cluster local``: the tasks save and stop).
    Returns the exit status."""
    out = out or sys.stdout
    cfg = plan.cfg
    if plan.cluster == "debug":
        return report(job, out)
    stdout, _ = log_paths(job)
    if plan.cluster == "slurm" and not wait:
        print(
            f"follow: tail -f {stdout}; cancel: scancel {job.job_id}. The job checkpoints and requeues itself at its "
            f"time limit; running the same command again resumes from {cfg.run_dir}/last.pth",
            file=out,
        )
        return 0
    if plan.cluster != "local":
        try:
            follow(job, out)
        except KeyboardInterrupt:
            print(
                f"\nstopped following; job {job.job_id} keeps running (scancel {job.job_id})", file=sys.stderr
            )
            return 130
        return report(job, out)
    tail = LogTail(stdout)
    with _ctrl_c_raises():
        try:
            follow(job, out, tail=tail)
            return report(job, out, run_dir=cfg.run_dir)
        except KeyboardInterrupt:
            return _stop_local_job(job, cfg, out, tail)


def launch(plan: Plan, wait: bool = False, out: TextIO | None = None, force: bool = False) -> int:
    """What ``python slurm/launch.py`` does after parsing: check the run folder (:func:`check_run_dir`), submit
    and print where everything is (:func:`start`), and (local, debug, or ``wait``) follow the job to its end
    (:func:`follow_to_end`). Returns the exit status; LaunchError (one line) while the run folder is busy."""
    out = out or sys.stdout
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for n in plan.notes:
        print(f"note: {n}", file=out)
    if not check_run_dir(plan, out, force=force):
        return 0
    for r in plan.resources if plan.cluster == "slurm" else ():
        print(f"resources: {r}", file=out)
    job = start(plan, out)
    return follow_to_end(plan, job, wait=wait, out=out)


def _stop_local_job(job: submitit.Job, cfg: Config, out: TextIO, tail: LogTail) -> int:
    """Ctrl-C while following a ``--cluster local`` job: the tasks save ``last.pth`` and stop; wait for that."""
    print(
        f"\nCtrl-C: the tasks save {cfg.run_dir}/last.pth within a few steps and stop; waiting for them "
        "(Ctrl-C again quits them without saving)",
        file=sys.stderr,
        flush=True,
    )
    if not job.done():  # (an ended controller's pid may be another process's by now)
        with contextlib.suppress(ProcessLookupError, ValueError):
            # The controller forwards SIGTERM to the tasks: the same stop when only this process got the Ctrl-C.
            os.kill(int(job.job_id), signal.SIGTERM)
    try:
        follow(job, out, tail=tail)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job.job_id} is ending without saving", file=sys.stderr)
        return 130
    return _stopped_on_ctrl_c(cfg.run_dir)


def _stopped_on_ctrl_c(run_dir: str) -> int:
    last = Path(run_dir) / "last.pth"
    if last.is_file():
        print(f"stopped; the same command resumes from {last}", file=sys.stderr)
    else:
        print(f"stopped before a checkpoint was saved in {run_dir}", file=sys.stderr)
    return 130


__all__ = [
    "LaunchError",
    "LogTail",
    "Plan",
    "absolute_paths",
    "active_slurm_jobs",
    "check_run_dir",
    "checkpoint_problem",
    "data_problem",
    "dry_run",
    "follow",
    "follow_to_end",
    "launch",
    "log_paths",
    "make_executor",
    "make_plan",
    "memory_per_node",
    "node_local_problem",
    "node_local_storage",
    "parse_time_min",
    "presubmit_problem",
    "refuse_active_slurm_jobs",
    "report",
    "require_slurm_clients",
    "sbatch_script",
    "site_parameters",
    "slurm_job_ids",
    "slurm_parameters",
    "start",
    "submit",
    "wandb_run",
]
