"""Optimizer and learning-rate schedule from the config.

The LR is a function of the epoch that tests call directly (``Schedule.lr_at``). torchvision's recipe steps the
LR per epoch (StepLR, ÷10 every 30 epochs); the paper's divides it by 10 when val top-1 stops improving, at most
3 times. Warmup (optional) is linear over whole epochs from ``lr × sched.warmup_factor``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from torch import nn

from train.config import Config, effective_lr

# Parameters of these layers are exempt from weight decay when optim.decay_norm_and_bias=false: chosen by
# module type, not by name (VGG's BatchNorm layers are called features.1, ...).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """One group with weight decay, and (unless decay_norm_and_bias) one without for norm params and biases."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if isinstance(module, NORM_TYPES) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.decay_norm_and_bias)
    lr = effective_lr(cfg)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(o.betas))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas))


class Schedule:
    """Per-epoch LR: ``start_epoch(e)`` sets the LR for epoch e, ``end_epoch(e, val_top1_acc)`` feeds the plateau.

    step/cosine use timm's schedulers (pure functions of the epoch); plateau uses torch's ReduceLROnPlateau, whose
    state (best, patience counter) is saved and restored, with ``min_lr = lr × gamma^max_drops`` capping the number
    of drops.
    """

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer) -> None:
        s = cfg.sched
        self.name = s.name
        self.optimizer = optimizer
        self.base_lr = effective_lr(cfg)
        self.warmup_epochs = s.warmup_epochs
        self.warmup_lr = self.base_lr * s.warmup_factor
        self.drops = 0
        self._timm = None
        self._plateau = None
        if s.name == "step":
            self._timm = StepLRScheduler(
                optimizer,
                decay_t=s.step_size,
                decay_rate=s.gamma,
                warmup_t=s.warmup_epochs,
                warmup_lr_init=self.warmup_lr,
                warmup_prefix=False,  # epochs count from 0 as in torchvision's StepLR: drops at 30, 60
            )
        elif s.name == "cosine":
            self._timm = CosineLRScheduler(
                optimizer,
                t_initial=s.epochs,
                warmup_t=s.warmup_epochs,
                warmup_lr_init=self.warmup_lr,
            )
        else:
            self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="max",
                factor=s.gamma,
                patience=s.plateau_patience,
                threshold=s.plateau_threshold,
                threshold_mode="abs",
                min_lr=self.base_lr * s.gamma**s.plateau_max_drops * (1 - 1e-6),
            )
            self.plateau_lr = self.base_lr

    def lr_at(self, epoch: int) -> float:
        """The LR used during ``epoch`` (0-based); for plateau, given the drops so far."""
        if self._timm is not None:
            return float(self._timm._get_lr(epoch)[0])  # timm's warmup, then its schedule
        if epoch < self.warmup_epochs:  # the same linear warmup as timm's, for plateau
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * epoch / self.warmup_epochs
        return self.plateau_lr

    def start_epoch(self, epoch: int) -> float:
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_epoch(self, epoch: int, val_top1_acc: float) -> None:
        """Plateau: update on the val top-1 accuracy (percent) after the warmup epochs."""
        if self._plateau is None or epoch < self.warmup_epochs:
            return
        before = self.plateau_lr
        for group in self.optimizer.param_groups:
            group["lr"] = self.plateau_lr
        self._plateau.step(val_top1_acc)
        self.plateau_lr = self.optimizer.param_groups[0]["lr"]
        if self.plateau_lr < before:
            self.drops += 1

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name, "drops": self.drops}
        if self._plateau is not None:
            state["plateau"] = self._plateau.state_dict()
            state["plateau_lr"] = self.plateau_lr
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"scheduler state is for sched.name={state.get('name')!r}, not {self.name!r}")
        self.drops = state["drops"]
        if self._plateau is not None:
            self._plateau.load_state_dict(state["plateau"])
            self.plateau_lr = state["plateau_lr"]
