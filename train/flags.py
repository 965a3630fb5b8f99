"""Command-line mistakes answered with the fix, for ``python -m train`` and ``python slurm/launch.py``.

    python slurm/launch.py --arch vgg16bn     # error: --arch 'vgg16bn' is not an architecture (did you mean vgg16_bn?)
    python -m train --epochs 10               # error: --epochs is not an option here: write sched.epochs=10 ...
    python slurm/launch.py --output-dir /x    # error: --output-dir is not an option here: write --run-dir /x

Flags people bring from torchvision's ``references/classification/train.py``, timm's ``train.py`` and FAIR's
submitit scripts name the config key (``key=value``) or the flag of this command that does the same, in one
``error:`` line (exit status 2), instead of argparse's usage block. An option close to one of ours
(``--partiton``, ``--run_dir``) gets "did you mean".
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence

__all__ = ["did_you_mean", "foreign_option", "unknown_arch"]

# Flags of the torchvision/timm/FAIR scripts → the config key that does the same here (written key=VALUE).
_KEYS: dict[str, str] = {
    "--epochs": "sched.epochs",
    "--lr": "optim.lr",
    "--learning-rate": "optim.lr",
    "--batch-size": "data.batch_size",
    "-b": "data.batch_size",
    "--bs": "data.batch_size",
    "--resume": "ckpt.resume",
    "--wd": "optim.weight_decay",
    "--weight-decay": "optim.weight_decay",
    "--momentum": "optim.momentum",
    "--workers": "data.workers",
    "-j": "data.workers",
    "--num-workers": "data.workers",
    "--opt": "optim.name",
    "--optimizer": "optim.name",
    "--lr-scheduler": "sched.name",
    "--sched": "sched.name",
    "--lr-step-size": "sched.step_size",
    "--lr-gamma": "sched.gamma",
    "--decay-rate": "sched.gamma",
    "--lr-warmup-epochs": "sched.warmup_epochs",
    "--warmup-epochs": "sched.warmup_epochs",
    "--label-smoothing": "optim.label_smoothing",
    "--smoothing": "optim.label_smoothing",
    "--clip-grad-norm": "optim.clip_grad_norm",
    "--clip-grad": "optim.clip_grad_norm",
    "--seed": "seed",
    "--print-freq": "train.print_every",
    "--log-interval": "train.print_every",
    "--num-classes": "model.num_classes",
    "--dropout": "model.dropout",
    "--drop": "model.dropout",
    "--dist-backend": "dist.backend",
    "--train-crop-size": "data.train_crop",
    "--val-crop-size": "data.val_crop",
    "--val-resize-size": "data.val_resize",
    "--interpolation": "data.interpolation",
}
# Switches (no value) → the key=value that does the same.
_SWITCHES: dict[str, str] = {
    "--amp": "train.precision=fp16 (or bf16)",
    "--channels-last": "train.channels_last=true",
    "--use-deterministic-algorithms": "train.deterministic=true",
    "--nesterov": "optim.nesterov=true",
    "--compile": "train.compile=true",
}
# Flags of those scripts → the flag of both commands here that does the same.
_FLAGS: dict[str, str] = {
    "--model": "--arch",
    "--output-dir": "--run-dir",
    "--output": "--run-dir",
    "--out-dir": "--run-dir",
    "--save-dir": "--run-dir",
    "--checkpoint-dir": "--run-dir",
    "--job-dir": "--run-dir",
    "--data-path": "--data",
    "--data-dir": "--data",
    "--data-root": "--data",
    "--root": "--data",
}
# Launcher-only flags (FAIR's submitit scripts: --ngpus is GPUs per node).
_LAUNCH_FLAGS: dict[str, str] = {
    "--ngpus": "--gpus-per-node",
    "--gpu": "--gpus",
    "--num-gpus": "--gpus",
    "--world-size": "--gpus",
    "--nproc-per-node": "--gpus",
    "--num-nodes": "--nodes",
    "--timeout": "--time",
    "--cpus-per-task": "--cpus-per-gpu",
}
# Notes added to a suggestion where the meaning differs.
_NOTES: dict[str, str] = {
    "data.batch_size": "the global batch, summed over all GPUs; torchvision's --batch-size is per GPU",
    "data.workers": "per process",
    "--gpus": "the total over all nodes",
    "--gpus-per-node": "and --gpus for the total",
    "--cpus-per-gpu": "CPU cores per task, one task per GPU",
}
_ON_SLURM_ONLY = ("--gpus", "--gpus-per-node", "--nodes", "--time", "--partition", "--account", "--qos",
                  "--cpus-per-gpu", "--mem-per-gpu", "--cluster", "--dry-run", "--wait")  # fmt: skip
_NUMBER = re.compile(r"-?\d+(\.\d*)?([eE]-?\d+)?")


def did_you_mean(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The choice ``word`` most likely meant: the same letters and digits (``VGG16-BN`` → ``vgg16_bn``), else the
    closest spelling (difflib); None when nothing is close."""

    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    same = [c for c in choices if norm(c) == norm(word)]
    if same:
        return same[0]
    close = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def unknown_arch(name: str, flag: str = "--arch", also: str = "") -> str | None:
    """One line for an architecture name that is not one (``did you mean vgg16_bn?``), None for a known one.
    ``also``: other valid words, listed first (the launcher's ``all``)."""
    from train.models import ARCHS, TORCHVISION_ARCHS  # torch: imported only when an arch is checked

    if name in ARCHS and name != "custom":
        return None
    hint = did_you_mean(name, [a for a in ARCHS if a != "custom"])
    if hint:
        return f"{flag} {name!r} is not an architecture (did you mean {hint}?)"
    return f"{flag} {name!r} is not an architecture; valid: {also}{', '.join(TORCHVISION_ARCHS)}, vgg11_lrn, vgg16_c"


def _canonical(option: str) -> str:
    return option if not option.startswith("--") else "--" + option[2:].replace("_", "-")


def _known(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def foreign_option(argv: Sequence[str], parser: argparse.ArgumentParser, command: str) -> str | None:
    """The first option in ``argv`` that is not one of ``parser``'s but names something this project has, as one
    line naming what to write instead; None when there is none (argparse then reports what is left).

    ``command``: ``"launch"`` (``python slurm/launch.py``) or ``"train"`` (``python -m train``)."""
    known = _known(parser)
    for i, token in enumerate(argv):
        if token == "--":
            break
        if not token.startswith("-") or _NUMBER.fullmatch(token):
            continue
        option, eq, inline = token.partition("=")
        if option in known or (len(option) > 2 and sum(k.startswith(option) for k in known) == 1):
            continue  # ours, or an abbreviation argparse accepts
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        value = inline if eq else (nxt if nxt is not None and (not nxt.startswith("-") or _NUMBER.fullmatch(nxt))
                                   and "=" not in nxt else None)  # fmt: skip
        message = _instead(option, value, command, known)
        if message:
            return message
        hint = did_you_mean(_canonical(option), [k for k in known if k.startswith("--")], cutoff=0.75)
        if hint:
            return f"unknown option {option} (did you mean {hint}?)"
    return None


def _instead(typed: str, value: str | None, command: str, known: list[str]) -> str | None:
    """What to write instead of the option ``typed`` (one line), or None when it names nothing of ours."""
    option = _canonical(typed)
    here = f"{typed} is not an option here"

    def note(target: str) -> str:
        return f" ({_NOTES[target]})" if target in _NOTES else ""

    if option in _KEYS:
        key = _KEYS[option]
        if key == "ckpt.resume":
            return (
                f"{here}: a run resumes from <run_dir>/last.pth by itself; to start from another checkpoint write "
                f"ckpt.resume={value or 'PATH'} (config keys are key=value arguments)"
            )
        why = f"; {_NOTES[key]}" if key in _NOTES else ""
        return f"{here}: write {key}={value or 'VALUE'} (config keys are key=value arguments{why})"
    if option in _SWITCHES:
        return f"{here}: write {_SWITCHES[option]} (config keys are key=value arguments)"
    target = _FLAGS.get(option) or _LAUNCH_FLAGS.get(option)
    if command == "train" and (target in _ON_SLURM_ONLY or option in _ON_SLURM_ONLY):
        return (
            f"{typed} is an option of python slurm/launch.py{f' ({target})' if target else ''}; python -m train "
            "runs in this process, or one process per GPU under torchrun: torchrun --nproc_per_node=N -m train ..."
        )
    if target and target in known:
        return f"{here}: write {target}{' ' + value if value else ''}{note(target)}"
    return None
