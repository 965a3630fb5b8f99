"""What a run shows and leaves behind: console progress with ETA, JSON lines per epoch, the loss/error plot; the
learning curves of several runs on one plot (`python evaluate --report`)."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from train.files import atomic_write_text, atomically

LOGGER_NAME = "train"


def setup_logging(is_main: bool, log_file: Path | None = None) -> logging.Logger:
    """Rank 0 logs INFO to stdout (flushed per line: SLURM buffers output) and to run_dir/train.log; others warn."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if is_main and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def max_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's peak resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class ETA:
    """Remaining time: the mean training step time so far × the steps left, plus the last validation's time × the
    validations left (one per epoch, the current one included; none counted before the first has run)."""

    def __init__(self, total_steps: int, validations: int) -> None:
        self.total_steps, self.validations = total_steps, validations
        self.start = time.perf_counter()
        self.steps_done = 0
        self.val_seconds = 0.0  # all validations so far (not training time)
        self.last_val = float("nan")

    def validated(self, seconds: float) -> None:
        self.val_seconds += seconds
        self.last_val = seconds
        self.validations -= 1

    def remaining(self) -> float:
        """Seconds left (nan before the first step)."""
        if self.steps_done == 0:
            return float("nan")
        step = (time.perf_counter() - self.start - self.val_seconds) / self.steps_done
        val = 0.0 if math.isnan(self.last_val) else self.last_val * self.validations
        return step * (self.total_steps - self.steps_done) + val


class JsonLines:
    """Append-only JSON lines (rank 0). ``truncate(key, limit)`` drops records past a resumed checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        # one write() of the whole line on an O_APPEND file: a kill leaves the line whole or absent, not half
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """The records; a last line without its newline (a writer killed mid-line on a filesystem that tore the
        write) is not a record and is skipped."""
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        if lines and lines[-1].strip():  # no final newline: torn
            lines = lines[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def truncate(self, key: str, limit: int) -> None:
        """Keep the records with ``key <= limit`` (rows past a resumed checkpoint go); the file is replaced
        atomically, so a kill during it leaves the old rows or the new ones."""
        kept = [r for r in self.read() if r.get(key, 0) <= limit]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


TRAIN_COLOR, VAL_COLOR = "C0", "C1"  # one colour per series in both panels: train blue, val orange
BEST_STYLE = dict(
    marker="*", ms=14, color="C3", ls="none", zorder=5
)  # the best epoch (lowest val top-1 error)


def best_epoch(epochs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch record with the lowest val top-1 error (the earliest of equals, as best.pth is kept)."""
    return min(epochs, key=lambda e: (e["val_top1_err"], e["epoch"])) if epochs else None


def plot_curves(
    epochs: list[dict[str, Any]], steps: list[dict[str, Any]], path: Path, title: str
) -> Path | None:
    """Loss (per logged step interval and per epoch) and top-1/top-5 error per epoch, as a PNG."""
    if not epochs and not steps:
        return None
    try:
        import matplotlib
    except ImportError:  # the curves are a convenience: a machine without matplotlib trains without them
        return None

    matplotlib.use("Agg")
    fig, axes = curves_figure(epochs, steps)
    return _save_figure(fig, axes, title, path, legend_size=8)


def curves_figure(epochs: list[dict[str, Any]], steps: list[dict[str, Any]]) -> tuple[Any, tuple[Any, ...]]:
    """The figure of :func:`plot_curves`: train in one colour and val in another on both panels (top-1 solid, top-5
    dotted), every series with markers (a 1-epoch run shows its points), the best epoch starred and ruled."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([s["epoch_float"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.4,
                     color=TRAIN_COLOR, marker="." if len(steps) == 1 else None,
                     label="train (logged intervals)")  # fmt: skip
    if epochs:
        x = [e["epoch"] for e in epochs]
        ax_loss.plot(
            x, [e["train_loss"] for e in epochs], "o-", color=TRAIN_COLOR, label="train (epoch mean)"
        )
        ax_loss.plot(x, [e["val_loss"] for e in epochs], "s-", color=VAL_COLOR, label="val")
        for key, style, color in (("train_top1_err", "o-", TRAIN_COLOR), ("val_top1_err", "s-", VAL_COLOR),
                                  ("train_top5_err", "o:", TRAIN_COLOR), ("val_top5_err", "s:", VAL_COLOR)):  # fmt: skip
            ax_err.plot(x, [e[key] for e in epochs], style, color=color, ms=4, label=key.replace("_", " "))
        best = best_epoch(epochs)
        assert best is not None
        for ax in (ax_loss, ax_err):
            ax.axvline(best["epoch"], color=BEST_STYLE["color"], lw=0.8, ls="--", alpha=0.6)
        ax_err.plot([best["epoch"]], [best["val_top1_err"]], **BEST_STYLE,
                    label=f"best: epoch {best['epoch']}, val top-1 {best['val_top1_err']:.2f} %")  # fmt: skip
        if len(set(x)) == 1:  # one epoch: a readable x range around it, not matplotlib's ±0.05
            for ax in (ax_loss, ax_err):
                ax.set_xlim(x[0] - 1, x[0] + 1)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="top-1 (solid) / top-5 (dotted) error")
    return fig, (ax_loss, ax_err)


def _save_figure(fig: Any, axes: tuple[Any, ...], title: str, path: Path, legend_size: int) -> Path:
    """Grid and legend on ``axes``, ``title`` above; write ``fig`` to ``path`` atomically (a tmp file renamed)."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def plot_runs(runs: list[tuple[str, list[dict[str, Any]]]], path: Path, title: str) -> Path | None:
    """The learning curves of several runs on one plot: val top-1 error and train loss per epoch, one line per run
    (``runs``: (name, metrics.jsonl records); the name is the one the report's table uses). None when no run has a
    finished epoch."""
    runs = [(label, epochs) for label, epochs in runs if epochs]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    fig, axes = runs_figure(runs)
    return _save_figure(fig, axes, title, path, legend_size=7)


def runs_figure(runs: list[tuple[str, list[dict[str, Any]]]]) -> tuple[Any, tuple[Any, ...]]:
    """The figure of :func:`plot_runs`: one colour per run on both panels, named once in each legend; every series
    with markers (a 1-epoch run shows its points); each run's best epoch (lowest val top-1) starred."""
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, epochs) in enumerate(runs):
        color = f"C{i % 10}"
        x = [e["epoch"] for e in epochs]
        ax_err.plot(x, [e["val_top1_err"] for e in epochs], "o-", ms=3, color=color, label=name)
        ax_err.plot(x, [e["val_top5_err"] for e in epochs], "o:", ms=2, color=color, lw=1)
        best = best_epoch(epochs)
        assert best is not None
        ax_err.plot([best["epoch"]], [best["val_top1_err"]], **{**BEST_STYLE, "color": color, "ms": 11})
        ax_loss.plot(x, [e["train_loss"] for e in epochs], "o-", ms=3, color=color, label=name)
        ax_loss.plot(x, [e["val_loss"] for e in epochs], "s--", ms=2, color=color, lw=1)
    if len({e["epoch"] for _, epochs in runs for e in epochs}) == 1:  # 1-epoch runs: a readable x range
        only = runs[0][1][0]["epoch"]
        for ax in (ax_err, ax_loss):
            ax.set_xlim(only - 1, only + 1)
    ax_err.set(
        xlabel="epoch", ylabel="val error (%)", title="val top-1 (solid) / top-5 (dotted) error; * best"
    )
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss: train (solid), val (dashed)")
    return fig, (ax_err, ax_loss)
