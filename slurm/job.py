"""The training job that submitit runs on every task (one per GPU): distributed setup, signals, requeue.

    from slurm.job import TrainJob
    job = submitit.SlurmExecutor(folder="runs/x/slurm/%j").submit(TrainJob(to_dict(cfg)))   # what launch.py does

Inside each task (SLURM, submitit's local executor, or in-process for ``--cluster debug``):

1. submitit's ``TorchDistributedEnvironment`` exports torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR: the first host of the job's node list, as submitit's ``JobEnvironment().hostnames`` expands it)
   from the job environment; every task logs its host, address and rendezvous (:func:`rank_place`); ``MASTER_PORT`` is ours (:func:`master_port`), then
   ``train.distributed.setup`` makes one process group across all nodes. CPU threads per task: :func:`cpu_threads`.
2. SLURM's warning signal (``USR2``, ``launch.signal_delay_s`` before the time limit, or on preemption) and
   ``SIGTERM`` only set ``trainer.stop_requested``: a signal handler must not run collectives or ``torch.save``
   while the main thread is mid-step. All ranks agree on the step (``train.engine.StopVote``: within 3
   steps of the signal), save ``run_dir/last.pth``
   mid-epoch and return "interrupted".
3. After ``USR2``, rank 0 then calls submitit's own handler (saved when ours was installed): it calls
   :meth:`TrainJob.checkpoint`, counts timeouts against ``launch.max_num_timeout``, runs ``scontrol requeue`` and
   exits. The requeued job resumes from ``last.pth``: same epoch, step, batch and W&B run. After ``SIGTERM``
   alone (``scancel``, or a preemption that sends no ``USR2``) the checkpoint is saved and the task exits; SLURM
   requeues or ends the job. A node failure sends nothing: the requeued job (``--requeue``) resumes from the last
   checkpoint on disk.
4. Rank 0 records this start's processes, host and wall time (``slurm.usage.UsageRecorder``: a heartbeat every
   30 s, the end when the job returns or exits), the GPU-hours ``python evaluate --report`` shows.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from train.distributed import master_port, restart_count
from train.engine import StopOnSignals

# After a stop on SIGTERM alone, how long rank 0 waits for submitit's preemption signal (USR2) before deciding
# that nobody asked for a requeue (submitit's _interrupt sends TERM and USR2 from two scancel calls).
USR_SIGNAL_GRACE_S = 5.0
# How a task's result says it stopped on the user's Ctrl-C; the launcher (slurm.submit.report) looks for it.
CTRL_C_STOP = "stopped on Ctrl-C (SIGINT)"


def export_distributed_env() -> submitit.helpers.TorchDistributedEnvironment:
    """Export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for ``train.distributed.setup``.

    ``set_cuda_visible_devices=False``: every task keeps the node's GPUs and picks ``cuda:LOCAL_RANK``; whether
    there is a GPU at all is decided by ``torch.cuda.is_available()``, never by CUDA_VISIBLE_DEVICES (SLURM sets it
    on GPU-less nodes too). A single-node job rendezvouses on 127.0.0.1 (no name resolution needed).
    """
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    job_env = submitit.JobEnvironment()
    dist_env.master_port = master_port(job_env.job_id, restart_count())
    if job_env.num_nodes == 1:
        dist_env.master_addr = "127.0.0.1"
    return dist_env.export(set_cuda_visible_devices=False, overwrite=True)


def rank_place(master_addr: str) -> str:
    """Where this task runs and whom it rendezvouses with, for its log: ``host node2 (10.0.0.12), node 1, local
    rank 0; MASTER_ADDR node1 = 10.0.0.11`` (each name as this node resolves it)."""

    def resolve(name: str) -> str:
        try:
            return socket.gethostbyname(name)
        except OSError as e:
            return f"unresolved: {e}"

    host = socket.gethostname()
    job_env = submitit.JobEnvironment()
    return (
        f"host {host} ({resolve(host)}), node {job_env.node}, local rank {job_env.local_rank}; "
        f"MASTER_ADDR {master_addr} = {resolve(master_addr)}"
    )


def cpu_threads(local_world_size: int) -> int | None:
    """Intra-op CPU threads for one task: SLURM's ``--cpus-per-task``, else this machine's CPUs shared by its tasks;
    None when ``OMP_NUM_THREADS`` is set (the user's choice). torch's default (every core, in every task)
    oversubscribes the CPUs when several tasks share a node; torchrun avoids it the same way (1 thread each)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return int(per_task)
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))


def cpu_affinity() -> str:
    """The CPUs this task may run on, for its log: ``CPUs 0-9 (10)``. One CPU where SLURM was asked for more is
    srun without ``--cpus-per-task`` (SLURM 22.05-23.02 did not pass sbatch's on to srun)."""
    cpus = sorted(os.sched_getaffinity(0))
    ranges: list[str] = []
    for c in cpus:
        if ranges and int(ranges[-1].split("-")[-1]) == c - 1:
            ranges[-1] = f"{ranges[-1].split('-')[0]}-{c}"
        else:
            ranges.append(str(c))
    text = f"CPUs {','.join(ranges)} ({len(cpus)})"
    asked = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if asked.isdigit() and len(cpus) < int(asked):
        text += f": fewer than SLURM_CPUS_PER_TASK={asked} (srun got no --cpus-per-task?)"
    return text


def start_task(job_env: Any) -> tuple[Any, int | None]:
    """A task's start: the distributed environment exported from SLURM's (``export_distributed_env``), torch's
    intra-op threads set to the task's CPUs (not under ``--cluster debug``), and the rank line printed (host,
    node, rendezvous, CPUs, threads). Returns (the environment, the threads set or None)."""
    import torch

    dist_env = export_distributed_env()
    threads = cpu_threads(dist_env.local_world_size) if job_env.cluster != "debug" else None
    if threads:
        torch.set_num_threads(threads)
    print(
        f"rank {dist_env.rank}/{dist_env.world_size}: {rank_place(dist_env.master_addr)}; "
        f"{cpu_affinity()}, {torch.get_num_threads()} intra-op thread(s)",
        flush=True,
    )
    return dist_env, threads


class StopOnSignal(StopOnSignals):
    """:class:`train.engine.StopOnSignals` inside a submitit job, with submitit's requeue signal too.

    Installed after submitit installed its own handlers: submitit's ``USR2`` handler (checkpoint and requeue) is
    kept in :attr:`previous` and called by :class:`TrainJob` once the checkpoint is on disk.
    """

    def __init__(self) -> None:
        self.usr_signal = submitit.JobEnvironment._usr_sig()  # USR2, or $SUBMITIT_PREEMPT_SIGNAL
        super().__init__((self.usr_signal, signal.SIGTERM, signal.SIGINT))

    @property
    def requeue_requested(self) -> bool:  # USR2: time limit near, or preemption (submitit's signal)
        return self.usr_signal in self.received

    @property
    def interrupted(self) -> bool:  # SIGINT: Ctrl-C on `launch.py --cluster local` (or `--cluster debug`)
        return signal.SIGINT in self.received

    def submitit_handler(self) -> Any:
        """submitit's checkpoint-and-requeue handler, or None outside a submitit job (``--cluster debug``)."""
        handler = self.previous.get(self.usr_signal)
        return handler if callable(handler) else None


def _flush_wandb() -> None:
    """Shut wandb's service down so the run's records are on disk before the job ends.

    ``Tracker.finish()`` returns before wandb's service process has written the last records (it writes them when
    it shuts down). A requeue or cancellation kills every process of the job at once, the service included, which
    left the interrupted start's offline run file empty. Never fatal.
    """
    if "wandb" not in sys.modules:
        return
    try:
        sys.modules["wandb"].teardown()
    except Exception as e:  # W&B problems never stop a job
        print(f"W&B: teardown failed ({type(e).__name__}: {e})", flush=True)


class TrainJob(submitit.helpers.Checkpointable):
    """A checkpointable training job: ``TrainJob(to_dict(cfg))()`` trains ``cfg`` on this task.

    The config travels as a plain dict (pickled by submitit); resume is automatic from ``run_dir/last.pth``, so a
    requeued job is the same call with ``ckpt.resume=auto``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before it requeues the job. The checkpoint itself is already on disk
        (all ranks saved it before submitit's handler ran): resubmit the same job resuming from it."""
        config = copy.deepcopy(self.config)
        config["ckpt"]["resume"] = "auto"
        return submitit.helpers.DelayedSubmission(TrainJob(config))

    def __call__(self) -> dict[str, Any]:
        try:
            return self._call()
        except Exception as e:
            self._record_fault(e)  # for slurm.retry, the batch script's decision; then submitit's own report
            raise

    def _record_fault(self, e: BaseException) -> None:
        """This task's fault record: whether retrying may help (not for a configuration error) and where."""
        from slurm.retry import write_fault

        try:
            job_env = submitit.JobEnvironment()
            rank, job_id = job_env.global_rank, str(job_env.job_id)
        except Exception:
            return
        text = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {text[0] if text else ''}"
        step = getattr(getattr(self, "_trainer", None), "step", None)
        with contextlib.suppress(Exception):
            write_fault(self.config["run_dir"], job_id, restart_count(), rank,
                        {"cause": "error", "retry": retriable(e), "step": step, "error": error,
                         "last_line": error})  # fmt: skip

    def _call(self) -> dict[str, Any]:
        from train.config import from_dict

        cfg = from_dict(self.config)
        job_env = submitit.JobEnvironment()
        restarts = restart_count()
        if restarts and cfg.ckpt.resume != "auto" and (Path(cfg.run_dir) / "last.pth").is_file():
            # SLURM restarted the original submission (node failure, or a preemption requeued by SLURM):
            # continue this run instead of starting again from scratch / from the initial checkpoint.
            cfg.ckpt.resume = "auto"
        dist_env, threads = start_task(job_env)
        if job_env.global_rank == 0:
            print(
                f"job {job_env.job_id} ({job_env.cluster}): {dist_env.world_size} task(s) on {job_env.num_nodes} "
                f"node(s), restart {restarts}, rendezvous {dist_env.master_addr}:{dist_env.master_port}, "
                f"{threads or 'OMP_NUM_THREADS or default'} CPU thread(s) per task, run folder {cfg.run_dir}",
                flush=True,
            )
        stop = StopOnSignal().install()
        usage = contextlib.nullcontext()
        if job_env.global_rank == 0:  # this start's processes × wall time, for `python evaluate --report`
            import torch

            from slurm.usage import UsageRecorder

            device = "cuda" if torch.cuda.is_available() and cfg.dist.device != "cpu" else "cpu"
            processes = 1 if job_env.cluster == "debug" else dist_env.world_size
            usage = UsageRecorder(cfg.run_dir, processes, job_env.num_nodes, str(job_env.job_id),
                                  job_env.cluster, restarts, device)  # fmt: skip
        with usage:
            return self._train(cfg, stop, job_env.global_rank)

    def _train(self, cfg: Any, stop: StopOnSignal, rank: int) -> dict[str, Any]:
        from train import distributed
        from train.engine import Trainer

        try:
            info = distributed.setup(cfg.dist.backend, cfg.dist.timeout_min, device=cfg.dist.device)
            try:
                trainer = Trainer(cfg, info)
                self._trainer = trainer
                stop.attach(trainer)
                self._watch(trainer, cfg)
                result = trainer.run()
            finally:
                distributed.cleanup()
            if result["status"] == "interrupted":
                self._after_interrupt(stop, rank, cfg.run_dir)
            return result
        finally:
            stop.restore()

    def _watch(self, trainer: Any, cfg: Any) -> None:
        """The hang watchdog names this task's log and writes the job's fault record before ending the task."""
        hb = trainer.heartbeat
        if hb is None:
            return
        job_env = submitit.JobEnvironment()
        with contextlib.suppress(Exception):
            hb.log = str(job_env.paths.stdout)
        job_id, rank, restart = str(job_env.job_id), job_env.global_rank, restart_count()

        def on_hang(record: dict[str, Any]) -> None:
            from slurm.retry import write_fault

            write_fault(cfg.run_dir, job_id, restart, rank, {**record, "retry": True})

        hb.on_hang = on_hang

    def _after_interrupt(self, stop: StopOnSignal, rank: int, run_dir: str) -> None:
        """All ranks saved last.pth and left the process group: requeue (rank 0) or end this task."""
        if rank != 0:
            # Rank 0 requeues; this task is done. No result file: the job is not finished. Exit status 0, so a
            # cluster with KillOnBadExit does not kill rank 0 before it has requeued.
            sys.stdout.flush()
            raise SystemExit(0)
        handler = stop.submitit_handler()
        if handler is None:  # --cluster debug (in-process): nothing to requeue; the caller gets the status
            return
        if not stop.requeue_requested and not stop.interrupted:  # said now: KillWait's SIGKILL may come first
            print(f"SIGTERM: checkpoint saved in {run_dir}/last.pth", flush=True)
        _flush_wandb()
        if stop.interrupted and not stop.requeue_requested:  # Ctrl-C: the user's stop, not the cluster's
            raise SystemExit(
                f"{CTRL_C_STOP}: checkpoint saved in {run_dir}/last.pth; the same command resumes from it"
            )
        deadline = time.monotonic() + USR_SIGNAL_GRACE_S
        while not stop.requeue_requested and time.monotonic() < deadline:
            time.sleep(0.1)
        if stop.requeue_requested:
            print(f"checkpoint saved in {run_dir}/last.pth; submitit requeues the job", flush=True)
            # submitit's handler: checkpoint() → dump the new submission → scontrol requeue → sys.exit; or raise
            # UncompletedJobError ("timed-out too many times", launch.max_num_timeout) which fails the job.
            handler(stop.usr_signal, None)
            return
        raise SystemExit(
            f"stopped on SIGTERM on {socket.gethostname()} (scancel, or a preemption without submitit's signal): "
            f"checkpoint saved in {run_dir}/last.pth; a requeued or resubmitted job resumes from it"
        )


def retriable(e: BaseException) -> bool:
    """False for errors that fail the same way again (configuration, data, checkpoint, a non-finite loss, the
    time-out count): retrying only spends GPU-hours. A crashed or unreachable peer, an I/O error: True."""
    from submitit.core.utils import UncompletedJobError

    from data_pipeline.layout import DataError
    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.distributed import DistError
    from train.engine import NonFiniteLoss
    from train.run import RunError

    fatal = (ConfigError, DataError, CheckpointError, RunError, DistError, NonFiniteLoss, UncompletedJobError)
    return not isinstance(e, fatal)


__all__ = [
    "CTRL_C_STOP",
    "StopOnSignal",
    "TrainJob",
    "cpu_affinity",
    "cpu_threads",
    "export_distributed_env",
    "rank_place",
    "retriable",
]
