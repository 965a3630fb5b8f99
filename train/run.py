"""The run folder: created (or refused, in one line, when not writable) with the resolved config in it."""

from __future__ import annotations

import os
from pathlib import Path

from train.config import Config, save_yaml


class RunError(RuntimeError):
    """A problem that stops a run before it starts, described in one line."""


def prepare_run_dir(cfg: Config) -> Path:
    """Create run_dir (it must be writable) and write the resolved config to run_dir/config.yaml."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(f"no write permission on {run_dir}")
        save_yaml(cfg, run_dir / "config.yaml")
    except OSError as e:
        raise RunError(f"run_dir {str(run_dir)!r} is not writable: {e.strerror or e}") from None
    return run_dir
