"""The table of a sweep: evaluate every finished run, compare each with its reference row, write report.md/json/png.

    python evaluate --report runs/demo-table/*             # run folders (a glob), or the sweep folder itself
    python evaluate --report /shared/table --data /datasets/imagenet --report-dir /shared/table

For each run folder (``<run-dir>/<recipe>-<arch>``, as ``slurm/launch.py --arch all`` makes them):

- its state: **done** (``last.pth`` at the config's last epoch), **training** (a training holds the folder's lock,
  its SLURM job is running, or its usage record's heartbeat is recent), **queued** (its SLURM job is pending, with
  squeue's reason), **failed** (its newest SLURM job ended FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ...:
  sacct's state, the error line of its traceback or log, and rank 0's log path), **stopped** (trained part of the
  way, nothing running) or **not started**; runs not done are listed with their progress, never skipped;
- for a done run, ``best.pth`` evaluated into ``<run>/eval.json`` unless that file is current: same checkpoint
  (its sha256 is stored in eval.json) and protocol. Protocol: 1-crop for the torchvision and demo recipes
  (torchvision's row), dense at one test scale for the paper recipe (the paper's Table 3 row). Exact counts, as
  ``python evaluate --checkpoint``;
- top-1/top-5 error, torchvision's row, the paper's figure where its protocol applies, the difference and the
  verdict (eval.json's: PASS within the tolerance, the demo band for the demo recipe), epochs done, best epoch,
  wall time and GPU-hours (processes × wall time, from the run's usage records, ``slurm/usage.py``; the source is
  named per run), the W&B run id.

Written to ``--report-dir`` (default: the run folders' common parent): ``report.md``, ``report.json`` (every number
as eval.json and the records hold it) and ``report.png`` (the learning curves of all runs on one plot). Exit status:
0 when no evaluated run FAILs, 1 when one does, 2 for bad input (no run folders, an evaluation that could not run).
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluate.reference import PAPER_CONFIG, TORCHVISION
from train.files import read_json_lines
from train.report import best_epoch, format_duration, plot_runs

log = logging.getLogger("evaluate")

EVAL_FILE = "eval.json"
MARKERS = ("config.yaml", "last.pth", "slurm", "metrics.jsonl", "usage")  # what makes a folder a run folder


class ReportError(ValueError):
    """Bad input for --report, in one line."""


@dataclass
class RunRow:
    """One run of the report (every field lands in report.json)."""

    run_dir: str
    arch: str
    recipe: str
    state: str  # done | training | queued | failed | stopped | not started
    progress: str  # "8/8 epochs", "3/8 epochs (training, job 1234)", "0/8 epochs (SLURM job 12 FAILED: ...)"
    epochs_done: int
    epochs: int | None
    best_epoch: int | None = None
    best_val_top1_err: float | None = None  # the training loop's own validation (metrics.jsonl)
    protocol: str | None = None
    top1_err: float | None = None  # eval.json's
    top5_err: float | None = None
    n_images: int | None = None
    torchvision_top1_err: float | None = None
    torchvision_top5_err: float | None = None
    paper: str | None = None  # the paper's row, where its protocol applies
    paper_top1_err: float | None = None
    paper_top5_err: float | None = None
    reference: str | None = None  # the row the verdict compares with
    diff_top1: float | None = None
    diff_top5: float | None = None
    verdict: str | None = None  # eval.json's: PASS | FAIL | no reference
    note: str = ""
    eval_json: str | None = None
    evaluated_now: bool = False
    wall_s: float | None = None
    process_hours: float | None = None
    device: str | None = None
    usage_source: str | None = None
    wandb_id: str | None = None
    wandb: str | None = None  # offline | online | none
    name: str = (
        ""  # the run's one name in the table and the plot: its folder's (parent/folder when two share it)
    )
    retries: str = (
        ""  # the run's automatic retries after faults (<run>/retries.jsonl, slurm/retry.py), in words
    )
    curve: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        return self.name or Path(self.run_dir).name


# ------------------------------------------------------------------------------------------------ runs


def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in MARKERS)


def find_runs(patterns: list[str]) -> list[Path]:
    """Run folders named by ``patterns`` (folders or globs); a folder that is not a run but holds runs (a sweep
    folder) stands for them. Files (report.md, ...) matched by a glob are ignored."""
    found: list[Path] = []
    for pattern in patterns:
        paths = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))] or [Path(pattern)]
        for path in paths:
            if _is_run(path):
                found.append(path.resolve())
            elif path.is_dir():
                found += [p.resolve() for p in sorted(path.iterdir()) if _is_run(p)]
            elif not path.exists() and not glob.has_magic(pattern):
                raise ReportError(f"{pattern}: no such run folder")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ReportError(
            f"no run folders in {' '.join(patterns)} (a run folder holds config.yaml, slurm/, ...)"
        )
    return unique


def _load_config(run: Path):
    from train.config import load_config

    path = run / "config.yaml"
    return load_config(str(path)) if path.is_file() else None


def _checkpoint_epoch(path: Path) -> int | None:
    if not path.is_file():
        return None
    import torch

    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:
        return None
    return epoch if isinstance(epoch, int) else None


def _slurm_jobs(run: Path) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of the run's SLURM jobs that squeue still lists as not ended; [] without squeue."""
    from slurm.submit import SLURM_ENDED_STATES, slurm_job_ids

    ids = slurm_job_ids(run)[-100:]
    if not ids or shutil.which("squeue") is None:
        return []
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(ids)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    jobs = []
    for line in proc.stdout.splitlines():
        job_id, state, reason = ([*line.split(None, 2), "", ""])[:3]
        if job_id in ids and state and state not in SLURM_ENDED_STATES:
            jobs.append((job_id, state, reason.strip()))
    return jobs


def _lock_holder(run: Path) -> str | None:
    """Who holds the run's training lock now (one line), or None."""
    from train.run import LOCK_NAME, RunError, check_run_dir_free

    if not (run / LOCK_NAME).is_file():
        return None
    try:
        check_run_dir_free(run)
    except RunError as e:
        return str(e)
    return None


def _wandb(run: Path) -> tuple[str | None, str]:
    """(run id, mode): wandb_id.txt, else the id in the newest offline/online run folder's name."""
    from train.tracking import read_run_id

    folder = run / "wandb"
    offline = sorted(folder.glob("offline-run-*")) if folder.is_dir() else []
    online = sorted(folder.glob("run-*")) if folder.is_dir() else []
    run_id = read_run_id(run)
    newest = (offline + online)[-1:] if offline or online else []
    if run_id is None and newest:
        run_id = newest[0].name.rsplit("-", 1)[-1]
    mode = "offline" if offline else ("online" if online else "none")
    return run_id, mode


def _state(run: Path, cfg, epochs_done: int, last_epoch: int | None) -> tuple[str, str]:
    """(state, progress) of a run folder."""
    from slurm.usage import read_usage

    epochs = cfg.sched.epochs if cfg is not None else None
    of = f"{epochs_done}/{epochs if epochs is not None else '?'} epochs"
    if epochs is not None and last_epoch is not None and last_epoch >= epochs:
        return "done", of
    holder = _lock_holder(run)
    jobs = _slurm_jobs(run)
    running = [j for j in jobs if j[1] != "PENDING"]
    if holder or running:
        job = f", SLURM job {running[-1][0]} {running[-1][1]}" if running else ""
        return "training", f"{of} (training{job})"
    if jobs:
        job_id, _, reason = jobs[-1]
        return "queued", f"{of} (SLURM job {job_id} PENDING" + (f", reason {reason})" if reason else ")")
    usage = read_usage(run)
    if usage is not None and usage.running:  # another node's training (its lock may not be visible here)
        return "training", f"{of} (training: usage heartbeat under 90 s old)"
    failed = failed_job(run)
    if failed:
        job_id, slurm_state, error, log_path = failed
        return "failed", f"{of} (SLURM job {job_id} {slurm_state}: {error}; log: {log_path})"
    if cfg is None and last_epoch is None and not epochs_done:
        return "not started", "0 epochs (no config.yaml yet)"
    return "stopped", f"{of} (stopped: nothing runs; the same launch command resumes it)"


# sacct states of a job that ended without finishing its work (COMPLETED, and the states of a live job, are not)
FAILED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                           "PREEMPTED", "REVOKED", "TIMEOUT"})  # fmt: skip


def _sacct_state(job_id: str) -> str | None:
    """sacct's state of a job (``CANCELLED by 0`` → ``CANCELLED``); None without sacct or an answer."""
    if shutil.which("sacct") is None:
        return None
    try:
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.split()[0] for ln in proc.stdout.splitlines() if ln.strip()]
    return lines[-1] if proc.returncode == 0 and lines else None


def _error_line(folder: Path, job_id: str) -> str:
    """The line that says why a job failed: the exception at the end of rank 0's traceback (submitit's result
    file), else the last line of rank 0's stderr that says error (SLURM's own ``slurmstepd: error: ...``), else
    its last line."""
    import pickle

    result = folder / f"{job_id}_0_result.pkl"
    try:
        with result.open("rb") as f:
            outcome, payload = pickle.load(f)  # submitit's ("error", traceback text) for a failed task
        if outcome == "error" and isinstance(payload, str) and payload.strip():
            return payload.strip().splitlines()[-1].strip()
    except Exception:  # no result file (killed, cancelled, out of memory), or one being written
        pass
    err = folder / f"{job_id}_0_log.err"
    try:
        lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines()[-200:] if ln.strip()]
    except OSError:
        return "no error line (no log)"
    said = [ln for ln in lines if "error" in ln.lower()]
    return (said or lines or ["no error line in the log"])[-1]


def failed_job(run: Path) -> tuple[str, str, str, str] | None:
    """(job id, SLURM state, error line, rank 0's stderr log) when the run's newest SLURM job ended without
    finishing the run (sacct: FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ...; or, without sacct, its
    result file holds an error), else None."""
    from slurm.submit import slurm_job_ids

    ids = slurm_job_ids(run)
    if not ids:
        return None
    job_id = ids[-1]
    folder = run / "slurm" / job_id
    state = _sacct_state(job_id)
    if state is None:  # no accounting here: the task's own result says whether it failed
        error = _error_line(folder, job_id)
        if not (folder / f"{job_id}_0_result.pkl").is_file() or "error" not in error.lower():
            return None
        state = "FAILED (sacct did not answer)"
    elif state not in FAILED_STATES:
        return None
    return job_id, state, _error_line(folder, job_id), str(folder / f"{job_id}_0_log.err")


def _arch_recipe(run: Path, cfg) -> tuple[str, str]:
    if cfg is not None:
        return cfg.model.arch, cfg.recipe
    recipe, _, arch = run.name.partition("-")  # <recipe>-<arch>, as a sweep names it
    return (arch, recipe) if arch else (run.name, "?")


# ------------------------------------------------------------------------------------------- evaluation


def protocol_for(recipe: str) -> str:
    """The protocol a run's reference row was measured with: the paper's dense evaluation for the paper recipe
    (its Table 3: one test scale), 1-crop (torchvision's table, the demo band) otherwise."""
    return "dense" if recipe == "paper" else "1-crop"


def current_eval(run: Path, protocol: str) -> dict[str, Any] | None:
    """``<run>/eval.json`` when it is the evaluation of the run's ``best.pth`` as it is now (sha256 stored in it)
    with this protocol; None when missing or stale."""
    from evaluate.loading import file_sha256

    path, best = run / EVAL_FILE, run / "best.pth"
    if not path.is_file() or not best.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        sha = record["checkpoint"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("protocol") != protocol or sha != file_sha256(best):
        return None
    return record


def evaluate_run(run: Path, protocol: str, data: str | None, batch_size: int | None) -> dict[str, Any]:
    """Evaluate ``<run>/best.pth`` into ``<run>/eval.json`` (python evaluate's library, in this process)."""
    from evaluate.evaluator import EvalOptions, format_result, run_evaluation

    opts = EvalOptions(checkpoint=str(run / "best.pth"), protocol=protocol, json_path=str(run / EVAL_FILE))
    if data is not None:
        opts.data = data
    if batch_size is not None:
        opts.batch_size = batch_size
    result = run_evaluation(opts)
    print(format_result(result), flush=True)
    return result.record


# ------------------------------------------------------------------------------------------------- rows


def run_names(runs: list[Path]) -> list[str]:
    """One name per run: its folder's name, or parent/folder where two runs' folders have the same name."""
    counts = {n: [r.name for r in runs].count(n) for n in {r.name for r in runs}}
    return [r.name if counts[r.name] == 1 else f"{r.parent.name}/{r.name}" for r in runs]


def build_row(
    run: Path, data: str | None = None, batch_size: int | None = None, name: str | None = None
) -> RunRow:
    """The report's row for one run folder (``name``: its name in the table and plot, default the folder's);
    evaluates best.pth when done and its eval.json is not current."""
    from slurm.usage import read_usage

    cfg = _load_config(run)
    arch, recipe = _arch_recipe(run, cfg)
    curve = read_json_lines(run / "metrics.jsonl")
    last_epoch = _checkpoint_epoch(run / "last.pth")
    epochs_done = last_epoch if last_epoch is not None else (curve[-1]["epoch"] if curve else 0)
    state, progress = _state(run, cfg, epochs_done, last_epoch)
    row = RunRow(str(run), arch, recipe, state, progress, epochs_done, cfg.sched.epochs if cfg else None)
    row.name = name or run.name
    row.curve = curve
    best = best_epoch(curve)  # the plot stars the same epoch
    if best is not None:
        row.best_epoch, row.best_val_top1_err = best["epoch"], best["val_top1_err"]
    tv = TORCHVISION.get(arch)
    if tv is not None:
        row.torchvision_top1_err, row.torchvision_top5_err = tv.top1_err, tv.top5_err
    usage = read_usage(run, processes=cfg.launch.gpus if cfg else None)
    if usage is not None:
        row.wall_s, row.process_hours = usage.wall_s, usage.process_hours
        row.device, row.usage_source = usage.device, usage.source
    row.wandb_id, row.wandb = _wandb(run)
    row.retries = retries_text(run)
    if state != "done":
        return row
    if not (run / "best.pth").is_file():
        row.note = "done, but no best.pth to evaluate"
        return row
    row.protocol = protocol_for(recipe)
    record = current_eval(run, row.protocol)
    if record is None:
        why = "stale: best.pth changed" if (run / EVAL_FILE).is_file() else "no eval.json"
        log.info(f"{run.name}: evaluating best.pth ({why}), {row.protocol}")
        record = evaluate_run(run, row.protocol, data, batch_size)
        row.evaluated_now = True
    row.eval_json = str(run / EVAL_FILE)
    row.top1_err, row.top5_err, row.n_images = record["top1_err"], record["top5_err"], record["n_images"]
    ref = record.get("reference") or {}
    row.reference, row.verdict, row.note = ref.get("source"), ref.get("verdict"), ref.get("note") or ""
    row.diff_top1, row.diff_top5 = ref.get("diff_top1"), ref.get("diff_top5")
    if (ref.get("source") or "").startswith("paper"):
        row.paper, row.paper_top1_err, row.paper_top5_err = ref["source"], ref["top1_err"], ref["top5_err"]
    elif recipe == "paper" and arch in PAPER_CONFIG:
        row.paper = f"no paper row: {row.note}" if row.note else None
    return row


def retries_text(run: Path) -> str:
    """The faults a run's jobs met and what was done, in words ('' when none): from ``<run>/retries.jsonl``."""
    from slurm.retry import read_retries

    rows = read_retries(run)
    if not rows:
        return ""
    requeued = sum(1 for r in rows if r.get("action") == "requeued")
    last = rows[-1]
    who = (
        f"rank {last['rank']} on {last.get('rank_host')}" if last.get("rank") is not None else "no rank named"
    )
    what = f"{last.get('cause')} of {who} at step {last.get('step')} (job {last.get('job_id')}, {last.get('time')})"
    stopped = f"; not retried: {last.get('why')}" if last.get("action") != "requeued" else ""
    return f"{len(rows)} fault(s), {requeued} automatic retr{'y' if requeued == 1 else 'ies'}; last: {what}{stopped}"


# ----------------------------------------------------------------------------------------------- output


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _verdict(row: RunRow) -> str:
    """eval.json's verdict; a demo run's names the band it was judged by (its torchvision column is the ImageNet
    row, for scale only)."""
    if row.verdict is None:
        return "–"
    if row.verdict in ("PASS", "FAIL") and (row.reference or "").startswith("demo band"):
        return f"{row.verdict} (demo band)"
    return row.verdict


def format_markdown(rows: list[RunRow], title: str) -> str:
    head = ("| run | arch | recipe | state | epochs | protocol | top-1 err | top-5 err | torchvision top-1 / top-5 | "
            "paper top-1 / top-5 | diff top-1 | result | best epoch | wall time | GPU-h | W&B run |")  # fmt: skip
    lines = [f"# {title}", "", head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in rows:
        tv = (
            f"{_num(r.torchvision_top1_err)} / {_num(r.torchvision_top5_err)}"
            if r.torchvision_top1_err
            else "–"
        )
        paper = (
            f"{_num(r.paper_top1_err, '.1f')} / {_num(r.paper_top5_err, '.1f')}" if r.paper_top1_err else "–"
        )
        hours = (
            "–"
            if r.process_hours is None
            else f"{r.process_hours:.3f}" + (" (CPU)" if r.device == "cpu" else "")
        )
        wall = "–" if r.wall_s is None else format_duration(r.wall_s)
        wandb = f"{r.wandb_id} ({r.wandb})" if r.wandb_id else "–"
        lines.append(
            f"| {r.label} | {r.arch} | {r.recipe} | {r.state} | {r.progress} | {r.protocol or '–'} | {_num(r.top1_err)} | "
            f"{_num(r.top5_err)} | {tv} | {paper} | {_num(r.diff_top1, '+.2f')} | {_verdict(r)} | "
            f"{r.best_epoch if r.best_epoch is not None else '–'} | {wall} | {hours} | {wandb} |"
        )
    lines += ["", "Notes:", ""]
    for r in rows:
        bits = []
        if r.reference:
            bits.append(f"reference: {r.reference}")
        if r.note:
            bits.append(r.note)
        if r.eval_json:
            bits.append(
                f"numbers from {r.eval_json}" + (" (evaluated now)" if r.evaluated_now else " (current)")
            )
        if r.usage_source:
            bits.append(f"time from {r.usage_source}")
        if r.retries:
            bits.append(f"faults: {r.retries}")
        lines.append(f"- **{r.label}** ({r.run_dir}): " + "; ".join(bits) if bits else f"- **{r.label}**: –")
    lines += [
        "",
        "Errors in %, over every val image exactly once; diff = ours − the reference the result compares with. "
        "GPU-h = Σ processes × wall time over the run's starts (queue time excluded); '(CPU)': the processes ran "
        "on CPUs (no GPU), so these are CPU process-hours. Curves: report.png.",
    ]
    return "\n".join(lines) + "\n"


def format_console(rows: list[RunRow]) -> str:
    w = max([len(r.label) for r in rows] + [3])
    header = (f"{'run':<{w}} {'arch':<10} {'state':<11} {'epochs':>7} {'top-1':>7} {'top-5':>7} {'tv top-1':>8} {'paper':>6} "
              f"{'diff':>7} {'result':<17} {'best ep':>7} {'wall':>8} {'GPU-h':>8}  W&B")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in rows:
        epochs = f"{r.epochs_done}/{r.epochs if r.epochs is not None else '?'}"
        lines.append(
            f"{r.label:<{w}} {r.arch:<10} {r.state:<11} {epochs:>7} {_num(r.top1_err):>7} {_num(r.top5_err):>7} "
            f"{_num(r.torchvision_top1_err):>8} {_num(r.paper_top1_err, '.1f'):>6} {_num(r.diff_top1, '+.2f'):>7} "
            f"{_verdict(r):<17} {r.best_epoch if r.best_epoch is not None else '–':>7} "
            f"{format_duration(r.wall_s) if r.wall_s is not None else '–':>8} "
            f"{_num(r.process_hours, '.3f'):>8}  {r.wandb_id or '–'}"
        )
    for r in rows:
        if r.state != "done":
            lines.append(f"{r.label}: {r.state}, {r.progress}")
    for r in rows:
        if r.retries:
            lines.append(f"{r.label}: faults: {r.retries}")
    return "\n".join(lines)


def write_report(rows: list[RunRow], out_dir: Path, title: str) -> dict[str, Path]:
    """report.md, report.json and report.png in ``out_dir``."""
    from train.files import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(out_dir / "report.md", format_markdown(rows, title))
    record = {
        "title": title,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "runs": [{k: v for k, v in asdict(r).items() if k != "curve"} for r in rows],
    }
    js = atomic_write_text(out_dir / "report.json", json.dumps(record, indent=2) + "\n")
    paths = {"md": md, "json": js}
    png = plot_runs([(r.label, r.curve) for r in rows], out_dir / "report.png", title)
    if png is not None:
        paths["png"] = png
    return paths


def run_report(patterns: list[str], out_dir: str | None = None, data: str | None = None,
               batch_size: int | None = None) -> int:  # fmt: skip
    """``python evaluate --report``: rows for every run, the files written, the exit status."""
    runs = find_runs(patterns)
    rows = [build_row(run, data, batch_size, name) for run, name in zip(runs, run_names(runs), strict=True)]
    target = Path(out_dir) if out_dir else Path(os.path.commonpath([str(r.parent) for r in runs]))
    title = f"VGG sweep report: {target.name or target}"
    paths = write_report(rows, target, title)
    print(format_console(rows), flush=True)
    print(f"wrote {', '.join(str(p) for p in paths.values())}", flush=True)
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


__all__ = ["ReportError", "RunRow", "build_row", "current_eval", "find_runs", "protocol_for", "run_report"]
