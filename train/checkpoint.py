"""Reading model weights from checkpoints: ours (`{'model': state_dict, ...}`), other trainers'
(`{'state_dict': ...}`) and torchvision's released files (a bare state_dict), all loaded with
`torch.load(weights_only=True)`.

    from train.checkpoint import load_weights
    load_weights(model, "runs/torchvision-vgg16_bn/last.pth", arch="vgg16_bn")
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from train.files import atomically

if TYPE_CHECKING:
    from train.config import Config

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "atomic_save",
    "check_resumable",
    "extract_state_dict",
    "load_checkpoint_file",
    "load_state_dict_file",
    "load_weights",
    "unwrap",
]

# Added by DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`), possibly both, either order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Config keys a resumed run must share with its checkpoint: another recipe, model, global batch or optimizer is
# another run, whose optimizer state and schedule would not fit.
RESUME_MUST_MATCH = ("recipe", "model", "data.batch_size", "optim.name")
# Keys listed in an error message before "...".
_MAX_KEYS_SHOWN = 5


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be used; the message is one line."""


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The model state dict inside `obj`, with DDP / torch.compile prefixes stripped.

    Accepts `{'model': sd, ...}` (our checkpoints), `{'state_dict': sd, ...}` or a bare state dict
    (torchvision's released weights). Raises CheckpointError when there is none.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"not a checkpoint: expected a dict of tensors, got {type(obj).__name__}")
    source = "the checkpoint"
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj, source = obj[key], f"the checkpoint's {key!r} entry"
            break
    if not obj:
        raise CheckpointError(f"not a checkpoint: {source} holds no tensors")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        shown = ", ".join(repr(k) for k in not_tensors[:_MAX_KEYS_SHOWN])
        raise CheckpointError(
            f"not a checkpoint: {source} has entries that are not tensors ({shown}); expected a state dict, "
            "or a dict with a 'model' or 'state_dict' entry"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = _strip_prefixes(str(key))
        if name in state_dict:
            raise CheckpointError(f"not a checkpoint: key {name!r} appears twice once prefixes are stripped")
        state_dict[name] = value
    return state_dict


def _weights_only_reason(message: str) -> str:
    match = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\. Please use|\n|$)", message)
    return match.group(1).strip() if match else "it holds Python objects other than tensors and containers"


def load_checkpoint_file(path: str | os.PathLike[str], mmap: bool = False) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with one-line CheckpointErrors for a missing,
    truncated or corrupt file, or a pickle that holds more than tensors and containers. ``mmap``: tensors are
    mapped, not read (what a look at the config and epoch costs: the pickled structure only)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        with warnings.catch_warnings():
            # Plain pickles (protocol 4) warn before being refused; the refusal below says it in one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    except Exception as e:  # a damaged file can fail anywhere in the unpickler: IndexError, KeyError, ...
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path} is not a weights-only checkpoint (torch.load(weights_only=True) refused it: "
                f"{_weights_only_reason(str(e))})"
            ) from e
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} ({size:,} bytes) is truncated, corrupt or not a PyTorch checkpoint ({_first_line(e)})"
        ) from e


def check_resumable(state: Any, cfg: Config, path: str | os.PathLike[str]) -> list[str]:
    """CheckpointError (one line) when a run of ``cfg`` cannot resume from ``state`` (the checkpoint loaded from
    ``path``): not a training checkpoint of this project, or trained with another recipe, model section (arch,
    widths, init), global batch or optimizer (RESUME_MUST_MATCH). Returns the other config keys that differ: the
    run goes on with their new values. The training's resume and the launcher's check before submitting."""
    from train.config import all_keys, from_dict, get

    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no 'model'/'config')")
    saved = from_dict(state["config"])  # an older checkpoint's missing keys take their defaults
    differ = [k for k in all_keys(cfg) if get(saved, k) != get(cfg, k)]
    bad = [k for k in differ if any(k == m or k.startswith(m + ".") for m in RESUME_MUST_MATCH)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with {k}={get(saved, k)!r}, this run has "
            f"{get(cfg, k)!r} (start this run in another run_dir)"
        )
    return differ


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint file on the CPU with `weights_only=True` and return its model state dict.

    Raises CheckpointError (one line) for a missing, truncated or corrupt file, or a non-checkpoint.
    """
    obj = load_checkpoint_file(path)
    try:
        return extract_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _first_line(e: BaseException) -> str:
    """The exception's type and first sentence (torch's messages run on for several lines)."""
    text = str(e).strip().split("\n")[0].split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _keys_text(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else "")


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    strict: bool = True,
    arch: str | None = None,
) -> nn.Module:
    """Load a checkpoint file or an in-memory checkpoint / state dict into `model`; return `model`.

    `arch` only names the model in error messages ("checkpoint is not a vgg16_bn: ..."). With strict=False,
    missing and unexpected keys are allowed; shape mismatches never are.
    """
    state_dict = extract_state_dict(source) if isinstance(source, Mapping) else load_state_dict_file(source)
    what = f"checkpoint is not a {arch}" if arch else "checkpoint does not fit the model"
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_keys_text(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_keys_text(unexpected)})")
        raise CheckpointError(f"{what}: {'; '.join(parts)}")
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            here, there = tuple(own[key].shape), tuple(value.shape)
            raise CheckpointError(f"{what}: {key} has shape {here} here, {there} in the checkpoint")
    model.load_state_dict(state_dict, strict=strict)
    return model


# ------------------------------------------------------------------------------------------------ saving


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """torch.save, atomically (``train.files.atomically``)."""
    return atomically(path, lambda tmp: torch.save(obj, tmp))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make dst the same content as src atomically: a hard link where the filesystem allows, else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class CheckpointManager:
    """``run_dir/checkpoints/epoch_NNN.pth`` (the newest ``keep_recent`` kept), ``last.pth`` and ``best.pth``.

    last.pth and best.pth are hard links to the epoch file (no second 500 MB write), replaced atomically.
    """

    def __init__(self, run_dir: str | os.PathLike[str], keep_recent: int) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.keep_recent = keep_recent

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pth"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pth"

    def save(self, state: dict[str, Any], epoch: int, is_best: bool) -> Path:
        """Write the checkpoint taken after ``epoch`` epochs; update last/best; prune old epoch files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = atomic_save(state, self.folder / f"epoch_{epoch:03d}.pth")
        _link_or_copy(path, self.last)
        if is_best:
            _link_or_copy(path, self.best)
        epochs = sorted(self.folder.glob("epoch_*.pth"))
        for old in epochs[: max(0, len(epochs) - max(self.keep_recent, 1))]:
            old.unlink(missing_ok=True)
        return path

    def save_interrupt(self, state: dict[str, Any]) -> Path:
        """A mid-epoch checkpoint (preemption / time limit): becomes last.pth only."""
        return atomic_save(state, self.last)

    def latest(self) -> Path | None:
        return self.last if self.last.is_file() else None

    def existing(self) -> list[Path]:
        """The checkpoint files a previous run left here (last, best, epoch files)."""
        return [p for p in (self.last, self.best) if p.is_file()] + sorted(self.folder.glob("epoch_*.pth"))
