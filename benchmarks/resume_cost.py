"""The cost of a mid-epoch resume: seconds from ``python -m train`` starting to its first training step, when it
resumes at batch k of a 4,000-image epoch, for the DALI-CPU and torchvision backends, against a fresh start.

    python benchmarks/resume_cost.py                 # 4,000 training JPEGs, k = half the epoch, 3 rounds
    python benchmarks/resume_cost.py --at 0.9 --rounds 5
    python benchmarks/resume_cost.py --smoke         # a tiny tree, one round (a minute; what the tests run)

For each backend a first run trains from scratch and is stopped (SIGTERM, as scancel does) once it has passed
batch k; its run folder (``last.pth``: weights, optimiser, RNG and, for DALI, every rank's pipeline checkpoint)
is kept as the snapshot. Then, in round-robin rounds, each variant starts the same command as a new process and
is timed from ``Popen`` to the first line of ``steps.jsonl`` past its start step (``train.print_every=1``: the
line is written right after the first step), then stopped:

- ``fresh``: an empty run folder (k = 0): imports, model, loaders, the first batch.
- ``resume``: the snapshot copied back: the same plus reading ``last.pth`` and positioning the loader at batch k
  (torchvision: the epoch's index list from k on; DALI: restoring the pipeline's own checkpoint).
- ``resume-no-state`` (DALI only): the snapshot without its DALI pipeline state (as written by another process
  count): DALI's fallback, a reader over the epoch's files from k on, with fresh augmentation.

The figures are the median over rounds; the ratios (resume / fresh per backend, DALI / torchvision per variant)
come from the same rounds. One process, CPU; ``data.workers`` loader workers (torchvision) or DALI threads.
Writes ``--out`` (JSON: machine, versions, command, every timing) and appends a table to ``--readme``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402  (after the sys.path line above)
    Parser,
    command_line,
    fail,
    machine_info,
    now_utc,
    prepare_tree,
    publish,
    shared_machine_note,
)

# 4 classes × 1,000 training JPEGs (~130 px: the resume path does not decode the skipped images, so their size
# only moves the first batch's decode, the same in every variant); a few validation images (not timed).
TREE = dict(
    classes=4, train_per_class=1000, val_per_class=4, min_size=96, max_size=160, noise=8.0, quality=90
)
SMOKE_TREE = dict(
    classes=2, train_per_class=24, val_per_class=4, min_size=48, max_size=72, noise=8.0, quality=90
)
BACKENDS = {
    "dali-cpu": ["data.backend=dali", "data.dali_device=cpu"],
    "torchvision": ["data.backend=torchvision"],
}


def overrides(data: Path, run_dir: Path, backend: str, batch: int, workers: int, classes: int) -> list[str]:
    """A one-epoch vgg11_bn small enough that the step itself is a small part of the time to it."""
    return [f"data.root={data}", f"run_dir={run_dir}", *BACKENDS[backend], f"data.batch_size={batch}",
            f"data.workers={workers}", "data.train_crop=32", "data.val_resize=36", "data.val_crop=32",
            "model.arch=vgg11_bn", f"model.num_classes={classes}", "model.classifier_width=32", "sched.epochs=1",
            "sched.warmup_epochs=0", "train.print_every=1", "log.wandb_mode=disabled"]  # fmt: skip


def steps_past(run_dir: Path, step: int) -> list[int]:
    path = run_dir / "steps.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            s = json.loads(line)["step"]
        except (ValueError, KeyError):
            continue  # a line being written
        if s > step:
            out.append(s)
    return out


def start_and_stop(cmd: list[str], run_dir: Path, past: int, timeout_s: float) -> float:
    """Start ``cmd``; seconds until ``steps.jsonl`` has a step above ``past``; then SIGTERM it (as scancel does) and
    wait for it to save and exit with 143. ``SystemExit`` with its stderr's tail otherwise."""
    seconds = None
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: nobody reads it while the run goes on
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            while proc.poll() is None and time.perf_counter() - t0 < timeout_s:
                if steps_past(run_dir, past):
                    seconds = time.perf_counter() - t0
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=300)
        if seconds is None or proc.returncode != 128 + signal.SIGTERM:
            err.seek(0)
            tail = err.read().strip()[-1500:]
            what = "no training step" if seconds is None else "did not stop on SIGTERM after a step"
            raise fail(f"{run_dir}: {what} past {past} (exit {proc.returncode}):\n{tail}", 1)
    return seconds


def snapshot(cmd: list[str], run_dir: Path, at: int, keep: Path, timeout_s: float) -> dict:
    """Train from scratch, stop once past batch ``at``, keep the run folder at ``keep``; its position."""
    from train.checkpoint import load_checkpoint_file

    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    start_and_stop(cmd, run_dir, at - 1, timeout_s)
    state = load_checkpoint_file(run_dir / "last.pth")
    if state["epoch"] != 0 or state["batch_in_epoch"] <= 0:
        raise fail(
            f"the snapshot stopped at epoch {state['epoch']}, batch {state['batch_in_epoch']}: not mid-epoch",
            1,
        )
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(run_dir, keep)
    loader = state.get("loader_state") or [None]
    return {
        "batch": state["batch_in_epoch"],
        "step": state["step"],
        "loader_state_bytes": len(loader[0]["pipeline"]) if loader[0] else 0,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def without_pipeline_state(folder: Path) -> None:
    import torch

    from train.checkpoint import load_checkpoint_file

    state = load_checkpoint_file(folder / "last.pth")
    state["loader_state"] = None
    torch.save(state, folder / "last.pth")


def table(result: dict) -> str:
    m, s = result["machine"], result["setting"]
    head = (
        f"### Resume cost, CPU ({result['date']})\n\n"
        f"{m['cpu_model']}, {m['usable_cpus']} usable CPUs (load average {m['load_average_at_start'][0]} at start); "
        f"torch {m['torch']}, torchvision {m['torchvision']}, DALI {m['nvidia_dali']}. {s['train_images']} training "
        f"JPEGs, batch {s['batch']} ({s['steps_per_epoch']} steps an epoch), data.workers={s['workers']}, "
        f"1 process. `{result['command']}`\n\n"
        "Seconds from start to the first training step, median of "
        f"{s['rounds']} round(s):\n\n"
        "| backend | fresh start | resume at batch k | k | resume / fresh | resume without pipeline state |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    for name, r in result["backends"].items():
        no_state = r["median_s"].get("resume-no-state")
        rows.append(
            f"| {name} | {r['median_s']['fresh']:.2f} | {r['median_s']['resume']:.2f} | {r['snapshot']['batch']} | "
            f"{r['ratios']['resume_over_fresh']:.2f}× | {f'{no_state:.2f}' if no_state else '—'} |"
        )
    x, b = result["ratios"], result["backends"]
    summary = (
        f"\nDALI-CPU / torchvision: fresh {x['dali_over_torchvision_fresh']:.2f}×, resume "
        f"{x['dali_over_torchvision_resume']:.2f}×."
        if x
        else ""
    ) + (
        f" The DALI pipeline state in last.pth: {b['dali-cpu']['snapshot']['loader_state_bytes']} bytes a rank."
        if "dali-cpu" in b
        else ""
    )
    notes = "".join(f" {n}" for n in result["notes"])
    return head + "\n".join(rows) + summary + notes + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny tree and one round (seconds per start)")
    p.add_argument(
        "--data", type=Path, help="the JPEG tree (made when missing) [runs/bench_data/resume_cost]"
    )
    p.add_argument("--runs", type=Path, help="run folders [runs/resume_cost]")
    p.add_argument("--at", type=float, default=0.5, help="resume point as a fraction of the epoch [0.5]")
    p.add_argument("--batch", type=int, help="batch size [16; smoke 4]")
    p.add_argument("--workers", type=int, default=2, help="data.workers [2]")
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS),
                   help=f"backends to time [{' '.join(BACKENDS)}]; the DALI / torchvision ratios need both")  # fmt: skip
    p.add_argument("--rounds", type=int, help="round-robin rounds [3; smoke 1]")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per start before giving up [600]")
    p.add_argument("--out", type=Path, help="result JSON [benchmarks/results/resume_cost_cpu.json]")
    p.add_argument("--readme", type=Path, help="markdown table appended here [benchmarks/results/README.md]")
    args = p.parse_args(argv)
    if not 0 < args.at < 1:
        raise fail(f"--at: a fraction of the epoch strictly between 0 and 1, got {args.at}")
    params = SMOKE_TREE if args.smoke else TREE
    batch = args.batch or (4 if args.smoke else 16)
    rounds = args.rounds or (1 if args.smoke else 3)
    smoke_dir = REPO / "runs" / "bench_smoke"
    data = args.data or (
        smoke_dir / "resume_cost_data" if args.smoke else REPO / "runs/bench_data/resume_cost"
    )
    runs = args.runs or (smoke_dir / "resume_cost" if args.smoke else REPO / "runs" / "resume_cost")
    train_images = params["classes"] * params["train_per_class"]
    steps = train_images // batch
    at = max(1, min(steps - 2, round(args.at * steps)))

    info = machine_info()
    tree = prepare_tree(data, params, workers=max(1, info["usable_cpus"]))
    base = [sys.executable, "-m", "train", "--config", "demo"]
    backends: dict[str, dict] = {}
    for name in dict.fromkeys(args.backends):
        run_dir = runs / name
        cmd = [*base, *overrides(data, run_dir, name, batch, args.workers, params["classes"])]
        snap = snapshot(cmd, run_dir, at, runs / f"{name}-snapshot", args.timeout)
        print(f"{name}: snapshot at batch {snap['batch']} of {steps} ({snap['seconds']} s)", flush=True)
        variants = ["fresh", "resume"] + (["resume-no-state"] if name == "dali-cpu" else [])
        if name == "dali-cpu":
            shutil.rmtree(runs / f"{name}-snapshot-no-state", ignore_errors=True)
            shutil.copytree(runs / f"{name}-snapshot", runs / f"{name}-snapshot-no-state")
            without_pipeline_state(runs / f"{name}-snapshot-no-state")
        backends[name] = {"cmd": cmd, "run_dir": run_dir, "snapshot": snap, "variants": variants,
                          "seconds": {v: [] for v in variants}}  # fmt: skip
    for i in range(rounds):
        for name, b in backends.items():
            for variant in b["variants"]:
                shutil.rmtree(b["run_dir"], ignore_errors=True)
                source = {"resume": "snapshot", "resume-no-state": "snapshot-no-state"}.get(variant)
                if source:
                    shutil.copytree(runs / f"{name}-{source}", b["run_dir"])
                past = b["snapshot"]["step"] if source else 0
                seconds = start_and_stop(b["cmd"], b["run_dir"], past, args.timeout)
                b["seconds"][variant].append(round(seconds, 3))
                print(
                    f"round {i + 1}/{rounds} {name} {variant}: first step after {seconds:.2f} s", flush=True
                )

    out_backends = {}
    for name, b in backends.items():
        med = {v: statistics.median(xs) for v, xs in b["seconds"].items()}
        out_backends[name] = {
            "snapshot": b["snapshot"],
            "seconds": b["seconds"],
            "median_s": med,
            "ratios": {"resume_over_fresh": med["resume"] / med["fresh"]}
            | (
                {"no_state_over_resume": med["resume-no-state"] / med["resume"]}
                if "resume-no-state" in med
                else {}
            ),
        }
    both = {"dali-cpu", "torchvision"} <= out_backends.keys()
    d, t = (out_backends[k]["median_s"] if k in out_backends else {} for k in ("dali-cpu", "torchvision"))
    result = {
        "benchmark": "resume_cost",
        "date": now_utc(),
        "smoke": args.smoke,
        "command": command_line("benchmarks/resume_cost.py", argv),
        "machine": info,
        "data": tree,
        "setting": {
            "train_images": train_images,
            "batch": batch,
            "steps_per_epoch": steps,
            "at_batch": at,
            "workers": args.workers,
            "rounds": rounds,
            "processes": 1,
        },
        "backends": out_backends,
        "ratios": {
            "dali_over_torchvision_fresh": d["fresh"] / t["fresh"],
            "dali_over_torchvision_resume": d["resume"] / t["resume"],
        }
        if both
        else {},
        "notes": [n for n in [shared_machine_note(info)] if n]
        + (["Smoke run: tiny tree, one round; not a measurement."] if args.smoke else []),
    }
    return publish(result, ["resume_cost", "cpu", *(["smoke"] if args.smoke else [])], table(result), args,
                   args.smoke)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
