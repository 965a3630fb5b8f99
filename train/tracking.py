"""Weights & Biases tracking for training and evaluation: rank 0 only, offline without an API key, and never
fatal to the job.

    from train.tracking import Tracker
    tracker = Tracker.create(cfg, run_dir, is_main=dist.is_main, resume_id=ckpt.get("wandb_id"))
    tracker.log({"train/loss": 2.31, "train/lr": 0.1, "train/img_per_s": 2950.0}, step=global_step)
    tracker.summary(best_top1_err=29.6)
    tracker.finish()

    wandb sync runs/demo/wandb/offline-run-*-<id>*   # upload an offline run later (the log line names the id)

Mode (``log.wandb_mode``): an explicit ``WANDB_MODE`` environment variable (online | offline | disabled) wins
over the config, and the line logged at start says which applied. ``auto`` means online when wandb finds an
API key (``WANDB_API_KEY``, a ``~/.netrc`` entry from ``wandb login``, ...; checked with ``wandb.login(
prompt=False, verify=False)``, no network), otherwise offline. W&B files go under ``<run_dir>/wandb/``.

Run id: ``resume_id`` (the id stored in the checkpoint being resumed) wins; else, unless ``ckpt.resume=never``,
the id in ``<run_dir>/wandb_id.txt`` (written at every start, so a requeued job that had not checkpointed yet
continues the same W&B run); else a new id. W&B keeps one history per run: rows logged at a step below the
run's last step are dropped by W&B (e.g. steps repeated after resuming from an earlier checkpoint).

Checkpoints (``log.log_checkpoint=true``): ``log_checkpoint(path)`` marks a file; ``finish()`` uploads it as the
``model`` artifact ``model-<run id>`` (one staged copy per job, however often the best changed).

Failures: every wandb call is guarded. The first failure logs one warning on the ``train`` logger and turns
tracking off for the rest of the job; an online start that fails (no network, bad key, timeout after
``WANDB_INIT_TIMEOUT`` or 30 s) falls back to offline with the same run id. Non-main ranks and ``disabled``
never import wandb.

Preemption: SLURM's SIGTERM reaches wandb's service process too, which exits at once; the service writes the run
file every ``TRANSACTION_FLUSH_S`` (2 s; wandb's default is 15 s), so only rows of the last seconds are lost
from W&B (``metrics.jsonl`` / ``steps.jsonl`` in run_dir keep everything). ``USR2`` (time limit) does not stop it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from train.config import Config, to_dict
from train.files import atomic_write_text

__all__ = [
    "ID_FILE",
    "INIT_TIMEOUT_S",
    "MODES",
    "Tracker",
    "has_api_key",
    "new_run_id",
    "read_run_id",
    "resolve_mode",
    "sync_pattern",
    "write_run_id",
]

log = logging.getLogger("train")

MODES = ("online", "offline", "disabled")
ID_FILE = "wandb_id.txt"  # in run_dir: the W&B run id of the last start
INIT_TIMEOUT_S = 30.0  # wandb's default is 90 s; WANDB_INIT_TIMEOUT (wandb's own variable) overrides this
TRANSACTION_FLUSH_S = 2.0  # how often wandb's service writes the run file (its default: 15 s); see _init
_ENV_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline"}
_REPO = Path(__file__).resolve().parent.parent


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def has_api_key() -> bool:
    """Whether wandb finds credentials for its configured host (env, netrc, settings); no prompt, no network."""
    import wandb

    wandb.setup(settings=wandb.Settings(silent=True))  # keeps wandb.login from printing where it found a key
    return bool(wandb.login(prompt=False, verify=False))


def resolve_mode(config_mode: str, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(mode, why)``: the W&B mode from ``WANDB_MODE`` (wins when set) or ``log.wandb_mode``.

    ``auto`` asks wandb for an API key (imports wandb); the other values never import it.
    """
    env = os.environ if env is None else env
    raw = env.get("WANDB_MODE", "").strip().lower()
    if raw:
        mode = "disabled" if raw == "disabled" else _ENV_ALIASES.get(raw)
        if mode is None:
            raise ValueError(f"WANDB_MODE={raw!r} is not one of online, offline, disabled")
        return mode, f"WANDB_MODE={raw} overrides log.wandb_mode={config_mode}"
    if config_mode in MODES:
        return config_mode, f"log.wandb_mode={config_mode}"
    if config_mode != "auto":
        raise ValueError(f"log.wandb_mode={config_mode!r} is not one of auto, online, offline, disabled")
    if has_api_key():
        return "online", "log.wandb_mode=auto, API key found"
    return "offline", "log.wandb_mode=auto, no API key found"


def read_run_id(run_dir: Path) -> str | None:
    """The W&B run id stored in ``run_dir/wandb_id.txt`` (None when there is none)."""
    try:
        text = (run_dir / ID_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def write_run_id(run_dir: Path, run_id: str) -> None:
    """Store ``run_id`` in ``run_dir/wandb_id.txt`` (atomically: a job may read it while the launcher writes)."""
    atomic_write_text(run_dir / ID_FILE, run_id + "\n")


def new_run_id() -> str:
    """A fresh W&B run id: 8 characters of [a-z0-9], as wandb makes them (wandb.init(id=...) takes any such id)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def sync_pattern(wandb_dir: Path, run_id: str) -> str:
    """The ``wandb sync`` argument covering every offline start of ``run_id`` (wandb appends -1, -2... to a
    folder when two starts fall in the same second)."""
    return f"{wandb_dir}/offline-run-*-{run_id}*"


class Tracker:
    """One W&B run on the main process; every method is a no-op elsewhere, when disabled or after a failure."""

    def __init__(self, run: Any = None, mode: str = "disabled", log_checkpoints: bool = False) -> None:
        self._run = run
        self.mode = mode if run is not None else "disabled"
        self.run_id: str | None = run.id if run is not None else None
        self._log_checkpoints = log_checkpoints
        self._pending_checkpoint: tuple[Path, tuple[str, ...]] | None = None

    # ------------------------------------------------------------------------------------------ start

    @classmethod
    def create(cls, cfg: Config, run_dir: Path, is_main: bool, resume_id: str | None = None) -> Tracker:
        """Start (or continue, with ``resume_id``) the W&B run of ``run_dir``; never raises for W&B problems."""
        if not is_main:
            return cls()
        try:
            mode, why = resolve_mode(cfg.log.wandb_mode)
        except Exception as e:
            log.warning(f"W&B off for this job: {_one_line(e)}")
            return cls()
        if mode == "disabled":
            log.info(f"W&B disabled ({why})")
            return cls()

        run_dir = Path(run_dir)
        run_id, id_source = resume_id, "checkpoint"
        if run_id is None and cfg.ckpt.resume != "never":
            run_id, id_source = read_run_id(run_dir), ID_FILE
        try:
            run = _init(cfg, run_dir, mode, run_id)
        except Exception as e:
            if mode != "online":
                log.warning(f"W&B off for this job: wandb.init failed ({_one_line(e)})")
                return cls()
            log.warning(f"W&B online start failed ({_one_line(e)}); falling back to offline")
            mode, why = "offline", f"{why}, online start failed"
            try:
                run = _init(cfg, run_dir, mode, run_id)
            except Exception as e2:
                log.warning(f"W&B off for this job: offline wandb.init failed too ({_one_line(e2)})")
                return cls()

        try:
            write_run_id(run_dir, run.id)
        except OSError as e:
            log.warning(f"W&B: could not write {run_dir / ID_FILE} ({_one_line(e)}); tracking continues")
        resumed = f", continuing id from {id_source}" if run_id else ""
        if mode == "online":
            where = f"run {run.url}"
        else:
            pattern = sync_pattern(Path(run.settings.sync_dir).parent, run.id)
            where = f"offline run {run.id} in {run.settings.sync_dir}; upload with: wandb sync {pattern}"
        log.info(f"W&B {mode} ({why}{resumed}): {where}")
        return cls(run, mode, cfg.log.log_checkpoint)

    # ---------------------------------------------------------------------------------------- logging

    def _failed(self, what: str, e: BaseException) -> None:
        log.warning(f"W&B off for the rest of this job: {what} failed ({_one_line(e)}); training continues")
        run, self._run, self.mode, self._pending_checkpoint = self._run, None, "disabled", None
        with contextlib.suppress(Exception):  # already reported; what was written so far stays usable
            run.finish(exit_code=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log one history row at ``step`` (the global optimizer step; must not decrease)."""
        if self._run is None:
            return
        try:
            self._run.log(dict(metrics), step=int(step))
        except Exception as e:
            self._failed("wandb.log", e)

    def summary(self, **values: Any) -> None:
        """Set run summary values (e.g. ``best_top1_err=29.6``), replacing W&B's last-value defaults."""
        if self._run is None:
            return
        try:
            self._run.summary.update(values)
        except Exception as e:
            self._failed("wandb summary update", e)

    def log_checkpoint(self, path: str | os.PathLike[str], aliases: Iterable[str] = ("best",)) -> None:
        """Log the file at ``path`` as a ``model`` artifact ``model-<run id>`` (only with
        ``log.log_checkpoint=true``).

        The upload happens in ``finish()``, with the file as it is then: wandb stages a full copy of every
        logged file (VGG: ~0.5 GB), so calling this at each new best costs nothing and only the job's final
        best is copied and uploaded (one artifact version per job; the last call's path and aliases win).
        """
        if self._run is not None and self._log_checkpoints:
            self._pending_checkpoint = (Path(path), tuple(aliases))

    def _upload_checkpoint(self) -> None:
        path, aliases = self._pending_checkpoint
        self._pending_checkpoint = None
        try:
            import wandb

            artifact = wandb.Artifact(f"model-{self._run.id}", type="model", metadata={"file": path.name})
            artifact.add_file(str(path))
            self._run.log_artifact(artifact, aliases=list(aliases))
        except Exception as e:
            self._failed(f"logging {path} as an artifact", e)

    def finish(self, exit_code: int = 0) -> None:
        """Upload the pending checkpoint, if any, and close the run (exit_code != 0 marks it failed in W&B).

        Later calls do nothing. wandb's service may write the last records to the offline file a moment
        after this returns; they are on disk for certain when the process exits.
        """
        if self._run is not None and self._pending_checkpoint is not None:
            self._upload_checkpoint()
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:
            log.warning(f"W&B: finishing the run failed ({_one_line(e)})")


def _init(cfg: Config, run_dir: Path, mode: str, run_id: str | None) -> Any:
    import wandb

    settings: dict[str, Any] = {"silent": True, "console": "off"}
    if not os.environ.get("WANDB_INIT_TIMEOUT"):
        settings["init_timeout"] = INIT_TIMEOUT_S
    if (_REPO / ".git").exists():
        settings["git_root"] = str(_REPO)  # the code's commit, wherever run_dir is
    if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
        # SLURM's SIGTERM (preemption, scancel) reaches every process of the job, and wandb's service exits on it
        # at once: whatever it had not yet written to the run file (offline mode's only copy) is lost. wandb
        # flushes every 15 s by default; every TRANSACTION_FLUSH_S bounds the loss to the last few seconds.
        settings["x_transaction_log_flush_interval"] = TRANSACTION_FLUSH_S
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        dir=run_dir,
        mode=mode,
        project=cfg.log.project,
        entity=cfg.log.entity,
        group=cfg.log.group,
        name=cfg.log.name or run_dir.resolve().name,
        tags=list(cfg.log.tags) or None,
        config=to_dict(cfg),
        id=run_id,
        resume="allow" if run_id else None,
        settings=wandb.Settings(**settings),
    )
