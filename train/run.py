"""Setting up a run: run folder, resolved config, model and dataset index.

The training loop (the training issue) builds on ``prepare``; until it lands, ``python -m train`` stops here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.layout import DataError, SplitIndex, index_root
from train.config import Config, save_yaml


class RunError(RuntimeError):
    """A problem that stops a run before it starts, described in one line."""


@dataclass
class Prepared:
    run_dir: Path
    model: torch.nn.Module
    train: SplitIndex
    val: SplitIndex


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


def prepare(cfg: Config, log=print) -> Prepared:
    """Run folder + config, the model, and the train/val index, with a line about each."""
    from train.models import build_model_from_config

    try:
        train, val = index_root(cfg.data.root)
    except DataError as e:
        raise RunError(str(e)) from None
    if len(train.classes) != cfg.model.num_classes:
        raise RunError(
            f"{cfg.data.root} has {len(train.classes)} classes but model.num_classes={cfg.model.num_classes}"
        )
    run_dir = prepare_run_dir(cfg)
    log(f"run folder {run_dir}  (resolved config: {run_dir / 'config.yaml'})")
    model = build_model_from_config(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {cfg.model.arch}: {n_params:,} parameters, {cfg.model.num_classes} classes")
    log(
        f"data {cfg.data.root}: {len(train):,} train / {len(val):,} val images in {len(train.classes)} classes"
    )
    return Prepared(run_dir, model, train, val)
