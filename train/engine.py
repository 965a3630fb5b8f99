"""The training loop: DDP, the recipe's schedule, per-epoch exact validation, checkpoints, exact resume.

    torchrun --nproc_per_node=2 -m train --config demo                  # 2 CPU processes (gloo)
    torchrun --nproc_per_node=8 -m train --config vgg16_bn data.root=/datasets/imagenet

Resume is automatic from ``run_dir/last.pth`` (``ckpt.resume=auto``). A run stopped after epoch k and resumed
ends with the same weights as one that was never stopped (tests/test_train.py checks it bitwise on CPU). A run
stopped mid-epoch (SLURM time limit or preemption: ``last.pth`` holds ``batch_in_epoch = k``) resumes at batch k:
``train_loader.set_epoch(epoch, start_batch=k)`` starts the epoch's order there without reading or decoding the
first k batches. Batches k.. are bitwise those of the uninterrupted run, and so are the final weights (checked on
CPU for the torchvision backend and DALI-CPU): the torchvision backend needs only (epoch, k); DALI restores each
rank's pipeline checkpoint, which ``last.pth`` keeps (``loader_state``, one per rank). Where it cannot (another
process count, a checkpoint without it) the batches are the same images in order with new random augmentation,
and rank 0 warns once (``data_pipeline.loader``).

Gradient compression (``dist.grad_compression=fp16|bf16``, default none = the recipes' fp32 all-reduce) registers
PyTorch's ``fp16_compress_hook`` / ``bf16_compress_hook`` on DDP: half the all-reduce bytes, rounded gradients.
"""

from __future__ import annotations

import collections
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data_pipeline.layout import DataError
from evaluate.core import count_loader, reduce_counts, topk_hits
from train import distributed
from train.checkpoint import CheckpointManager, check_resumable, load_checkpoint_file, unwrap
from train.config import Config, to_dict, validate
from train.optim import Schedule, build_optimizer
from train.report import ETA, JsonLines, format_duration, max_memory_gb, plot_curves, setup_logging
from train.run import RunError, agreed, claim_run_dir, write_run_config
from train.watchdog import Heartbeat


class NonFiniteLoss(RuntimeError):
    pass


def autocast(cfg: Config, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def set_backend_flags(cfg: Config) -> None:
    """cuDNN autotuning (off, with deterministic algorithms, under train.deterministic) and TF32 (train.precision
    =tf32 only), as training runs them; benchmarks/train_throughput.py sets them the same way."""
    if cfg.train.deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls (read when its first handle is made). On CUDA
        # some ops every VGG runs have no deterministic backward (adaptive_avg_pool2d's): warn there, not fail.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    tf32 = cfg.train.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def train_step(
    cfg: Config,
    forward: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step: autocast forward (``forward``: the DDP / compiled wrapper of ``model``), cross-entropy in
    fp32, scaled backward, gradient clipping when configured, optimizer and scaler steps. Returns (logits, loss),
    not synced to the host. The training loop's step, and the one benchmarks/train_throughput.py times."""
    with autocast(cfg, images.device):
        logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.optim.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.optim.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


def rng_state() -> dict[str, Any]:
    """This process's RNG states as bytes, ints and lists: picklable across ranks (all_gather_object) and
    loadable with weights_only=True."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": bytes(torch.get_rng_state().numpy()),
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = bytes(torch.cuda.get_rng_state().numpy())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(state["cuda"]), dtype=torch.uint8))


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# dist.grad_compression → the dtype PyTorch's DDP compression hook all-reduces gradient buckets in
GRAD_COMPRESSION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_all_reduce_dtype(dtype: torch.dtype, device: torch.device, what: str) -> None:
    """RunError (one line, the same on every rank) if the default process group cannot all-reduce ``dtype``.

    torch 2.14.1's gloo all-reduces float16 and bfloat16 (CPU tensors), NCCL both; older gloo builds rejected
    bfloat16 with "Invalid scalar type" (pytorch/pytorch#111131), which inside DDP's comm hook would only show at
    the first backward. One element, once, at startup.
    """
    try:
        torch.distributed.all_reduce(torch.zeros(1, dtype=dtype, device=device))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(
            f"{what}: the {torch.distributed.get_backend()} backend of torch {torch.__version__} cannot all-reduce "
            f"{dtype} tensors ({reason}); use dist.grad_compression=none or another dtype"
        ) from None


def register_grad_compression(ddp: DistributedDataParallel, mode: str, device: torch.device) -> str:
    """Register PyTorch's fp16/bf16 compression comm hook on ``ddp`` (state None: the default process group), after
    checking the backend can all-reduce that dtype; returns the line to log."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dtype = GRAD_COMPRESSION_DTYPES[mode]
    check_all_reduce_dtype(dtype, device, f"dist.grad_compression={mode}")
    hook = default_hooks.fp16_compress_hook if mode == "fp16" else default_hooks.bf16_compress_hook
    ddp.register_comm_hook(None, hook)
    return (
        f"dist.grad_compression={mode}: DDP all-reduces gradients as {dtype} over "
        f"{torch.distributed.get_backend()} (torch {hook.__name__}: cast, ÷ world size, sum, cast back to fp32)"
    )


class _Ticking:
    """An iterable over ``loader``'s batches (and its length) that calls ``tick`` before each batch."""

    def __init__(self, loader: Any, tick: Callable[[], None]) -> None:
        self.loader, self.tick = loader, tick

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.tick()
            yield batch


def wrap_for_training(
    cfg: Config, model: nn.Module, device: torch.device, distributed: bool, log: Any
) -> tuple:
    """(ddp, forward) of ``model`` for a training step: DDP when ``distributed``, with ``dist.grad_compression``'s
    hook, and ``torch.compile`` when ``train.compile``; what the trainer and the preflight's timed steps run."""
    ddp = (
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if distributed
        else model
    )
    compression = cfg.dist.grad_compression
    if compression != "none" and distributed:
        log.info("%s", register_grad_compression(ddp, compression, device))
    elif compression != "none":
        log.info("dist.grad_compression=%s has no effect: one process, no DDP all-reduce", compression)
    return ddp, torch.compile(ddp) if cfg.train.compile else ddp


class Trainer:
    """One training run on this process (one of world_size)."""

    def __init__(self, cfg: Config, dist_info: distributed.DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        validate(cfg, world_size=dist_info.world_size)
        # One training per run folder: rank 0 locks run_dir before anything is written there, then writes
        # config.yaml; if either fails, every rank raises the same RunError (none waits for the dist timeout).
        # The lock is released by close(): at the end of run(), or right here if the rest of the setup fails.
        self.run_lock = claim_run_dir(cfg, dist_info.is_main)
        try:
            self._setup(cfg, dist_info)
        except DataError as e:  # building the loaders: the same tree and the same error on every rank
            self.close()
            e.every_rank = True  # type: ignore[attr-defined]  (train/__main__.py prints it once)
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder's lock (rank 0 holds it); idempotent."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _setup(self, cfg: Config, dist_info: distributed.DistInfo) -> None:
        from data_pipeline import build_loader
        from train.models import build_model_from_config
        from train.tracking import Tracker

        run_dir = Path(cfg.run_dir)
        self.run_dir = run_dir
        self.log = setup_logging(dist_info.is_main, run_dir / "train.log")
        if self.run_lock is not None and self.run_lock.warning:
            self.log.warning("warning: %s", self.run_lock.warning)
        set_backend_flags(cfg)
        # Same init on every rank (DDP also broadcasts rank 0's weights); dropout streams differ per rank.
        torch.manual_seed(cfg.seed)
        model = build_model_from_config(cfg.model)
        if cfg.model.init_from:
            from train.init import init_from_checkpoint

            init_from_checkpoint(model, cfg.model.init_from, self.log)
        # one move: device and memory format together (a fake CUDA device, tests/test_fake_cuda.py, runs one .to)
        model.to(
            self.device,
            memory_format=torch.channels_last if cfg.train.channels_last else torch.preserve_format,
        )
        self.model = model
        torch.manual_seed(cfg.seed + 1000 * dist_info.rank)
        random.seed(cfg.seed + dist_info.rank)
        np.random.seed((cfg.seed + dist_info.rank) % 2**32)
        self.optimizer = build_optimizer(cfg, model)
        self.schedule = Schedule(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.ddp, self.forward = wrap_for_training(cfg, model, self.device, dist_info.distributed, self.log)
        rank, world = dist_info.rank, dist_info.world_size
        self.train_loader = build_loader(cfg, "train", rank=rank, world_size=world, device=self.device)
        self.val_loader = build_loader(cfg, "val", rank=rank, world_size=world, device=self.device)
        if len(self.train_loader.classes) != cfg.model.num_classes:
            raise RunError(
                f"{cfg.data.root} has {len(self.train_loader.classes)} classes but "
                f"model.num_classes={cfg.model.num_classes}"
            )
        self.ckpts = CheckpointManager(run_dir, cfg.ckpt.keep_recent)
        self.epochs_log = JsonLines(run_dir / "metrics.jsonl")
        self.steps_log = JsonLines(run_dir / "steps.jsonl")
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.partial_counts: tuple[float, int, int, int] | None = None
        self.loader_state: dict[str, Any] | None = None  # this rank's train loader state at batch_in_epoch
        self.best_top1_err = float("inf")
        self.resumed_wandb_id = self._resume()
        if self.epoch < cfg.sched.epochs:  # the run goes ahead: its config is the folder's config
            agreed(dist_info.is_main, lambda: write_run_config(cfg))
            self.tracker = Tracker.create(cfg, run_dir, dist_info.is_main, resume_id=self.resumed_wandb_id)
        else:  # nothing left to train: no W&B start (it would add an empty start to the run's history)
            self.tracker = Tracker()
        if cfg.train.precision == "fp16" and self.device.type == "cpu":
            self.log.warning(
                "warning: train.precision=fp16 on the CPU is many times slower than fp32 or bf16"
            )
        self.stop_requested = False
        self.stop_vote = StopVote(self.device, self.dist.world_size)
        # a hung rank ends the job in bounded time, named (train.watchdog); slurm.job sets its log and fault record
        self.heartbeat: Heartbeat | None = None
        if dist_info.distributed and cfg.dist.hang_timeout_s > 0:
            self.heartbeat = Heartbeat(run_dir, dist_info.rank, dist_info.world_size, cfg.dist.hang_timeout_s)
        self.last_save = time.monotonic()  # ckpt.every_minutes counts from here and from each save

    # ------------------------------------------------------------------------------------------ resume

    def _resume_path(self) -> Path | None:
        resume = self.cfg.ckpt.resume
        if resume == "never":
            return None
        if resume == "auto":
            return self.ckpts.latest()
        return Path(resume)

    def _resume(self) -> str | None:
        path = self._resume_path()
        if path is None:
            previous = self.ckpts.existing() if self.cfg.ckpt.resume == "never" else []
            if previous:  # starting over here would mix two runs' checkpoints, metrics and W&B history
                names = ", ".join(str(p.relative_to(self.run_dir)) for p in previous[:3])
                raise RunError(
                    f"ckpt.resume=never, but {self.run_dir} holds a previous run's checkpoints ({names}"
                    f"{', ...' if len(previous) > 3 else ''}): start the new run in another run_dir"
                )
            self.log.info("starting from scratch (no checkpoint in %s)", self.run_dir)
            if self.dist.is_main:  # rows of an earlier attempt that saved no checkpoint belong to no run
                self.epochs_log.truncate("epoch", 0)
                self.steps_log.truncate("step", 0)
            return None
        state = load_checkpoint_file(path)
        differ = check_resumable(state, self.cfg, path)  # the launcher's check before submitting, too
        if differ:
            self.log.warning("resuming with changed config keys: %s", ", ".join(differ))
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and not state.get("scaler"):
            # saved without a loss scale (bf16/fp32/tf32): GradScaler.load_state_dict refuses an empty state
            self.log.warning(
                "%s has no GradScaler state (trained with train.precision=%s): fp16 starts with a fresh loss scale",
                path,
                state["config"].get("train", {}).get("precision", "fp32"),
            )
        else:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch = state.get("batch_in_epoch", 0)
        # a mid-epoch checkpoint carries each rank's running train counts of the interrupted epoch
        partial = state.get("partial_counts")
        self.partial_counts = (
            partial[self.dist.rank] if partial and len(partial) == self.dist.world_size else None
        )
        self.best_top1_err = state["best_top1_err"]
        # each rank's loader state at batch_in_epoch (DALI: its pipeline checkpoint), for the resumed epoch
        loader_states = state.get("loader_state") or []
        self.loader_state = loader_states[self.dist.rank] if self.dist.rank < len(loader_states) else None
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            self.log.warning("checkpoint has RNG states of %d processes, this run has %d: not restored",
                             len(rngs), self.dist.world_size)  # fmt: skip
        if self.dist.is_main:
            self.epochs_log.truncate("epoch", self.epoch)
            self.steps_log.truncate("step", self.step)
        # the save line's numbering: epoch N (1-based) batch k mid-epoch, else the epochs completed
        where = (
            f"epoch {self.epoch + 1}, batch {self.batch_in_epoch}"
            if self.batch_in_epoch
            else f"the end of epoch {self.epoch}"
        )
        self.log.info("resumed from %s at %s (step %d)", path, where, self.step)
        return state.get("wandb_id")

    def _state(self) -> dict[str, Any]:
        rngs = distributed.all_gather_object(rng_state())
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "partial_counts": distributed.all_gather_object(self.partial_counts)
            if self.batch_in_epoch
            else None,
            "loader_state": distributed.all_gather_object(self.train_loader.state_dict())
            if self.batch_in_epoch
            else None,
            "best_top1_err": self.best_top1_err,
            "config": to_dict(self.cfg),
            # label i = classes[i]: the evaluator checks a val tree's folders against it
            "classes": list(self.train_loader.classes),
            "rng": rngs,
            # keep the link to the W&B run even when this job runs with W&B off
            "wandb_id": self.tracker.run_id or self.resumed_wandb_id,
            "versions": {"torch": str(torch.__version__)},
        }

    # -------------------------------------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        """Train to cfg.sched.epochs, or to an agreed stop ("interrupted"); releases the run folder's lock at the
        end, also when it raises."""
        if self.heartbeat is not None:
            self.heartbeat.start()
        try:
            return self._run()
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self.close()

    def _tick(self, phase: str, arm: bool = False) -> None:
        if self.heartbeat is not None:
            self.heartbeat.tick(self.step, phase, arm)

    def _run(self) -> dict[str, Any]:
        cfg, log = self.cfg, self.log
        epochs = cfg.sched.epochs
        steps_per_epoch = len(self.train_loader)
        log.info(
            "%s: %s on %d process(es) (%s, %s), global batch %d, %d steps/epoch, data %s (%s: %d train / %d val)",
            cfg.recipe, cfg.model.arch, self.dist.world_size, self.device.type, self.dist.source,
            cfg.data.batch_size, steps_per_epoch, cfg.data.root, self.train_loader.backend,
            self.train_loader.dataset_size, self.val_loader.dataset_size,
        )  # fmt: skip
        if self.epoch >= epochs:
            log.info("nothing to do: checkpoint is at epoch %d of %d", self.epoch, epochs)
            return self._finish("done")
        eta = ETA(
            (epochs - self.epoch) * steps_per_epoch - self.batch_in_epoch, validations=epochs - self.epoch
        )
        while self.epoch < epochs:
            status = self._train_epoch(eta, steps_per_epoch)
            if status == "interrupted":
                return self._finish("interrupted")
            started = time.perf_counter()
            self._end_epoch()
            eta.validated(time.perf_counter() - started)  # with the epoch's save: both come once per epoch
            # a signal during validation (after the epoch's last step vote): stop before the next epoch
            if self.epoch < epochs and self._stop_agreed():
                if self.epoch % cfg.ckpt.every_epochs:  # this epoch's end was not saved (ckpt.every_epochs)
                    self._save_interrupt()
                elif self.dist.is_main:
                    log.info("stop requested: epoch %d is saved in %s", self.epoch, self.ckpts.last)
                return self._finish("interrupted")
        return self._finish("done")

    def _train_epoch(self, eta: ETA, steps_per_epoch: int) -> str:
        cfg, device, epoch = self.cfg, self.device, self.epoch
        lr = self.schedule.start_epoch(epoch)
        # Resumed mid-epoch (a checkpoint after batch `skip`): the loader starts at batch `skip` of the epoch's
        # order without reading the batches before it, and `i` below stays the batch index within the epoch.
        skip, self.batch_in_epoch = self.batch_in_epoch, 0
        if skip > steps_per_epoch:  # the checkpoint's epoch had more batches (another world size or dataset)
            self.log.warning("checkpoint is at batch %d, but an epoch has %d batches here: resuming at its end",
                             skip, steps_per_epoch)  # fmt: skip
            skip = steps_per_epoch
        inexact = self.train_loader.set_epoch(epoch, start_batch=skip, state=self.loader_state)
        self.loader_state = None
        if inexact and self.dist.is_main:
            self.log.warning("resuming mid-epoch with new random augmentation: %s", inexact)
        self.stop_vote.reset()
        self.forward.train()
        zero = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        c1, c5, n = zero.clone(), zero.clone(), zero.clone()
        if skip and self.partial_counts:  # resumed mid-epoch: continue the epoch's counts
            loss_sum += self.partial_counts[0]
            for counter, value in zip((c1, c5, n), self.partial_counts[1:], strict=True):
                counter += value
        interval_loss = torch.zeros((), dtype=torch.float64, device=device)
        interval_n, data_time, t0 = 0, 0.0, time.perf_counter()
        per_rank_batch = cfg.data.batch_size // self.dist.world_size
        end = time.perf_counter()
        self._tick("data")
        for i, (images, labels) in enumerate(self.train_loader, start=skip):
            data_time += time.perf_counter() - end
            self._tick("step")
            logits, loss = train_step(
                cfg, self.forward, self.model, self.optimizer, self.scaler, images, labels
            )
            self.step += 1
            self.batch_in_epoch = i + 1
            with torch.no_grad():
                detached = loss.detach().double()
                loss_sum += detached * labels.numel()
                interval_loss += detached
                a, b = topk_hits(logits.detach(), labels)
                c1 += a
                c5 += b
                n += labels.numel()
            interval_n += 1
            self._tick("data", arm=True)
            stop_now = self.stop_vote(self.stop_requested)  # the same answer on every rank at this step
            save_due = False  # rank 0's ckpt.every_minutes clock, agreed at print intervals
            if interval_n == cfg.train.print_every or i + 1 == steps_per_epoch or stop_now:
                # The only host sync of the loop, once per print interval (no .item() per step): the interval's
                # loss averaged over all ranks and the live stop flag, in one all-reduce, so every rank sees the
                # same values and stops (or raises on a non-finite loss) at the same step. The live flag matters
                # at the epoch's last step, which StopVote's lag cannot reach: a stop there skips validation.
                mean_loss, stop, save_due = self._interval_agreed(interval_loss, interval_n)
                stop = stop or stop_now
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(
                        f"loss is {mean_loss} at epoch {epoch + 1}, step {self.step} (lr {lr:g}): stopping; "
                        f"lower optim.lr, enable optim.clip_grad_norm or use train.precision=fp32/bf16"
                    )
                elapsed = time.perf_counter() - t0
                steps_done = i + 1 - skip
                eta.steps_done += interval_n
                metrics = {
                    "train/loss": mean_loss,
                    "train/lr": lr,
                    "train/img_per_s": steps_done * per_rank_batch * self.dist.world_size / elapsed,
                    "train/data_time_s": data_time / steps_done,
                    "train/max_mem_gb": max_memory_gb(device),
                }
                self.log.info(
                    "epoch %d/%d  step %d/%d  loss %.4f  lr %.4g  %.1f img/s  data %.3fs  mem %.2fG  eta %s",
                    epoch + 1, cfg.sched.epochs, i + 1, steps_per_epoch, mean_loss, lr,
                    metrics["train/img_per_s"], metrics["train/data_time_s"], metrics["train/max_mem_gb"],
                    format_duration(eta.remaining()),
                )  # fmt: skip
                self.tracker.log(metrics, step=self.step)
                if self.dist.is_main:
                    self.steps_log.append({"step": self.step, "epoch_float": epoch + (i + 1) / steps_per_epoch,
                                           "loss": mean_loss, "lr": lr})  # fmt: skip
                interval_loss.zero_()
                interval_n = 0
                if stop:
                    self.partial_counts = (loss_sum.item(), int(c1), int(c5), int(n))
                    self._save_interrupt()
                    return "interrupted"
            every = cfg.ckpt.every_steps
            if i + 1 < steps_per_epoch and (save_due or (every and self.step % every == 0)):
                # mid-epoch last.pth (ckpt.every_steps / every_minutes): a crash loses at most the interval
                self.partial_counts = (loss_sum.item(), int(c1), int(c5), int(n))
                self._save_interrupt("periodic save")
            end = time.perf_counter()
        self.train_counts = reduce_counts(c1, c5, n, loss_sum)
        self.epoch_time = time.perf_counter() - t0  # a resumed epoch: the part run since the resume
        self.epoch_images = (steps_per_epoch - skip) * per_rank_batch * self.dist.world_size  # trained in it
        self.epoch_lr = lr
        return "ok"

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (one all-reduce; between epochs, where a host sync costs nothing)."""
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        return distributed.all_reduce_sum(flag).item() > 0

    def _interval_agreed(self, interval_loss: torch.Tensor, steps: int) -> tuple[float, bool, bool]:
        """(the interval's mean loss over all ranks, whether any rank was asked to stop, whether rank 0's clock
        says a ``ckpt.every_minutes`` save is due), the same on every rank: one all-reduce of [loss sum, stop flag,
        save flag]."""
        minutes = self.cfg.ckpt.every_minutes
        due = self.dist.is_main and minutes > 0 and time.monotonic() - self.last_save >= minutes * 60
        packed = torch.stack([interval_loss.double(), interval_loss.new_tensor(float(self.stop_requested)),
                              interval_loss.new_tensor(float(due))])  # fmt: skip
        distributed.all_reduce_sum(packed)
        loss_sum, flag, save = packed.tolist()
        return loss_sum / (steps * self.dist.world_size), flag > 0, save > 0

    def _end_epoch(self) -> None:
        cfg, log = self.cfg, self.log
        # DDP broadcasts BatchNorm buffers from rank 0 before each forward, but each rank's last forward then
        # updated its own copy: make every rank validate (and rank 0 save) the same model.
        distributed.broadcast_buffers(self.model)
        # The evaluator's own count (python evaluate runs the same function), plus the loss; on the bare model,
        # not DDP: val shards may differ by a batch between ranks.
        val = count_loader(self.model, self._ticking(self.val_loader, "val"), self.device, cfg.train.precision,
                           cfg.train.channels_last, with_loss=True)  # fmt: skip
        train = self.train_counts
        bad = [(what, x) for what, x in (("train", train.loss), ("val", val.loss)) if not math.isfinite(x)]
        if bad:  # both all-reduced: every rank stops here, before anything of this epoch is saved
            what, x = bad[0]
            raise NonFiniteLoss(
                f"epoch {self.epoch + 1}: mean {what} loss is {x}: stopping before this epoch is saved; "
                f"lower optim.lr, enable optim.clip_grad_norm or use train.precision=fp32/bf16"
            )
        self.schedule.end_epoch(self.epoch, 100.0 - val.top1_err)
        self.epoch += 1
        self.batch_in_epoch = 0
        is_best = val.top1_err < self.best_top1_err
        self.best_top1_err = min(self.best_top1_err, val.top1_err)
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.epoch_lr,
            "train_loss": train.loss,
            "train_top1_err": train.top1_err,
            "train_top5_err": train.top5_err,
            "val_loss": val.loss,
            "val_top1_err": val.top1_err,
            "val_top5_err": val.top5_err,
            "val_images": val.n,
            "epoch_time_s": self.epoch_time,
            # images trained in epoch_time (train.n also counts those before a mid-epoch resume); null when a
            # resume found nothing left of the epoch
            "img_per_s": self.epoch_images / self.epoch_time if self.epoch_images else None,
        }
        log.info(
            "epoch %d/%d done in %s: train loss %.4f top-1 err %.2f%% | val loss %.4f top-1 err %.2f%% "
            "top-5 err %.2f%% (%d images)%s",
            self.epoch, cfg.sched.epochs, format_duration(self.epoch_time), train.loss, train.top1_err,
            val.loss, val.top1_err, val.top5_err, val.n, "  [best]" if is_best else "",
        )  # fmt: skip
        self.tracker.log({f"epoch/{k}": v for k, v in record.items()}, step=self.step)
        self.tracker.summary(best_val_top1_err=self.best_top1_err)
        state = (
            self._state()
            if (self.epoch % cfg.ckpt.every_epochs == 0 or self.epoch == cfg.sched.epochs)
            else None
        )
        if state is not None:
            self.last_save = time.monotonic()
        self._tick("save")
        if self.dist.is_main:
            self.epochs_log.append(record)
            if state is not None:
                path = self.ckpts.save(state, self.epoch, is_best)
                log.info("checkpoint %s (last.pth%s)", path, ", best.pth" if is_best else "")
                if is_best:
                    self.tracker.log_checkpoint(self.ckpts.best)
            plot_curves(self.epochs_log.read(), self.steps_log.read(), self.run_dir / "curves.png",
                        f"{cfg.model.arch} ({cfg.recipe} recipe)")  # fmt: skip
        distributed.barrier()
        self._tick("save")

    def _ticking(self, loader: Any, phase: str) -> _Ticking:
        """``loader`` (its length too), with a heartbeat tick at each batch."""
        return _Ticking(loader, lambda: self._tick(phase))

    def _save_interrupt(self, why: str = "stop requested") -> None:
        self._tick("save")
        started = time.perf_counter()
        state = self._state()
        if self.dist.is_main:
            self.ckpts.save_interrupt(state)
            self.log.info("%s: saved %s at epoch %d, batch %d (%.1f s)", why, self.ckpts.last, self.epoch + 1,
                          self.batch_in_epoch, time.perf_counter() - started)  # fmt: skip
        distributed.barrier()
        self.last_save = time.monotonic()
        self._tick("save")

    def _finish(self, status: str) -> dict[str, Any]:
        records = self.epochs_log.read() if self.dist.is_main else []
        last = records[-1] if records else {}
        if self.dist.is_main and status == "done":
            self.log.info(
                "finished: best val top-1 err %.2f%%; run folder %s (last.pth, best.pth, metrics.jsonl, curves.png)",
                self.best_top1_err, self.run_dir,
            )  # fmt: skip
        self.tracker.finish(exit_code=0)
        return {"status": status, "epoch": self.epoch, "step": self.step, "best_top1_err": self.best_top1_err,
                **{k: v for k, v in last.items() if k.startswith("val_")}}  # fmt: skip


class StopVote:
    """Whether any rank was asked to stop, known to every rank at the same step, without a host sync per step.

    Each step all-reduces a 0/1 flag on the device and copies the sum to host memory without waiting; step k's
    sum is read at step k + LAG, long after it was computed (on CUDA an event wait that rarely waits). So a stop
    signal ends training within LAG + 1 steps on every rank, not at the next print interval: a SIGTERM (scancel,
    requeue, preemption) is followed by SIGKILL after SLURM's KillWait (30 s by default), which must cover those
    steps and the save. One process: no collective, no lag.
    """

    LAG = 2

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.device, self.world_size = device, world_size
        self.pending: collections.deque[tuple[torch.Tensor, torch.cuda.Event | None]] = collections.deque()

    def reset(self) -> None:
        """At an epoch's start (every rank): flags of the last epoch's final steps are not carried over."""
        self.pending.clear()

    def __call__(self, requested: bool) -> bool:
        if self.world_size == 1:
            return requested
        flag = torch.full((1,), float(requested), device=self.device)  # a fill kernel: no host-to-device copy
        distributed.all_reduce_sum(flag)
        event = None
        if self.device.type == "cuda":
            flag = torch.empty(1, pin_memory=True).copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending.append((flag, event))
        if len(self.pending) <= self.LAG:
            return False
        flag, event = self.pending.popleft()
        if event is not None:
            event.synchronize()
        return flag.item() > 0


class StopOnSignals:
    """Turns stop signals into ``trainer.stop_requested`` (a flag and one log line; nothing else happens in the
    handler), so every rank stops at the same step (within 3 steps: :class:`StopVote`), saves ``last.pth`` and the run
    returns "interrupted"; the same command resumes it. A second Ctrl-C (SIGINT) quits at once, without saving.

    Used as is around ``python -m train`` and torchrun (SIGINT: Ctrl-C; SIGTERM: torchrun's and SLURM's stop
    signal); ``slurm.job.StopOnSignal`` adds submitit's requeue signal. ``received``: the signals that came, in
    order. A signal that comes before :meth:`attach` stops the trainer as soon as it is attached.
    """

    def __init__(
        self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM), trainer: Trainer | None = None
    ):
        self.signals = tuple(signals)
        self.trainer = trainer
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}

    def install(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def __enter__(self) -> StopOnSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def attach(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if self.received:
            trainer.stop_requested = True

    @property
    def first(self) -> str | None:
        """The first signal's name (SIGINT, SIGTERM, ...), or None."""
        return signal.Signals(self.received[0]).name if self.received else None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        first = not self.received
        self.received.append(signum)
        if self.trainer is not None:
            self.trainer.stop_requested = True
            if first:
                self.trainer.log.warning(
                    "%s: stopping within %d steps to save last.pth%s",
                    signal.Signals(signum).name,
                    StopVote.LAG + 1,
                    " (Ctrl-C again quits without saving)" if signum == signal.SIGINT else "",
                )


def train(cfg: Config) -> dict[str, Any]:
    """Set up distributed, train to cfg.sched.epochs (or a stop request: SIGINT/SIGTERM, see StopOnSignals),
    tear down. The result's ``signal`` names the signal that stopped the run (None otherwise)."""
    info = distributed.setup(cfg.dist.backend, cfg.dist.timeout_min, device=cfg.dist.device)
    try:
        trainer = Trainer(cfg, info)
        with StopOnSignals(trainer=trainer) as stop:
            result = trainer.run()
        result["signal"] = stop.first
        return result
    finally:
        distributed.cleanup()
