"""The demo recipe's spread over seeds: ``make demo``'s training (``configs/demo.yaml``, ``--cluster local``, 2
processes) once per seed, one after the other, on the demo dataset; final and best val top-1 error of each.

    python benchmarks/demo_seeds.py                        # seeds 0-4 (~4 min each on 2 cores)
    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 5 6 7
    python benchmarks/demo_seeds.py --seeds 0 1 -- sched.epochs=4   # extra config overrides (a trial recipe)

Each seed is exactly what ``make demo`` runs (``python slurm/launch.py --config demo --cluster local``) with
``seed=N``, its own run folder under ``--runs`` (removed first) and W&B disabled. The seed moves the weight
initialisation, the data order and the augmentation draws; the dataset (``python -m data_pipeline demo``) is the
same for every seed. The figures come from each run's ``metrics.jsonl``; the CPU model (``/proc/cpuinfo``) and
flags are recorded with them, as kernels (and so rounding) differ between machines of one kind.

Writes ``--out`` (JSON: machine, versions, command, one row per seed, the band) and appends a markdown table to
``--readme``. The band (lowest to highest best val top-1 error over the seeds: ``make demo`` evaluates
``best.pth``) is what the README and ``python evaluate`` on a demo checkpoint (``evaluate.reference.DEMO_BAND``)
state; a run with overrides is a trial and says so (and goes to ``demo_seeds_cpu_trial.json``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
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
    publish,
    shared_machine_note,
)


def cpu_details() -> dict:
    """Model name, family/model/stepping and the vector-instruction flags of the first CPU in /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = fields.get("flags", "").split()
    vector = sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4")))
    return {
        "model_name": fields.get("model name"),
        "vendor": fields.get("vendor_id"),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "stepping": fields.get("stepping"),
        "vector_flags": vector,
    }


# Keys that do not move a run's numbers: the device choice (the demo runs on CPUs either way), fault handling,
# periodic saves (a save changes no state: the bitwise resume tests), site options of the launcher, GPU decoding
# memory hints.
OPERATIONAL_KEYS = ("dist.device", "dist.hang_timeout_s", "ckpt.every_steps", "ckpt.every_minutes",
                    "launch.max_failures", "launch.setup", "launch.sbatch_args", "launch.srun_args",
                    "launch.container_image", "launch.python", "data.dali_nvjpeg_prealloc",
                    "data.dali_build_ahead")  # fmt: skip


def recipe_digest() -> str:
    """sha256 of the resolved demo recipe (configs/demo.yaml with its bases, as ``load_config`` gives it), without
    its ``log`` section and ``run_dir`` (where and what it logs does not move the result; a new logging key must
    not void the band) and without ``data.format`` while it is ``folder`` (reading a pack changes the order): the
    band belongs to exactly this recipe; ``tests/test_demo.py`` checks that it still is the one in ``configs/``."""
    import hashlib

    import yaml

    from train.config import Config, load_config, to_dict

    recipe = {k: v for k, v in to_dict(load_config("demo")).items() if k not in ("log", "run_dir")}
    # folder: the format the band was measured on, before the key existed
    if recipe["data"].get("format") == "folder":
        del recipe["data"]["format"]
    # keys added after the band was measured that say where and how a run is kept going, not what it computes,
    # left out at their defaults (a new such key must not void the band)
    defaults = to_dict(Config())
    for key in OPERATIONAL_KEYS:
        section, name = key.split(".")
        if recipe.get(section, {}).get(name, "absent") == defaults[section][name]:
            del recipe[section][name]
    text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=110)
    return hashlib.sha256(text.encode()).hexdigest()


def run_seed(seed: int, data: Path, run_dir: Path, overrides: list[str], timeout_s: float) -> dict:
    """Train the demo recipe with ``seed`` into ``run_dir`` (a fresh folder); its per-epoch figures."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "slurm" / "launch.py"), "--config", "demo", "--cluster", "local",
           f"data.root={data}", f"run_dir={run_dir}", f"seed={seed}", "log.wandb_mode=disabled", *overrides]  # fmt: skip
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise fail(
            f"seed {seed}: the demo did not finish within {timeout_s:.0f} s (run folder {run_dir})"
        ) from None
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        tail = (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()
        raise fail(f"seed {seed}: the demo exited {proc.returncode} (run folder {run_dir}):\n{tail}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    errs = [r["val_top1_err"] for r in rows]
    best = min(range(len(rows)), key=lambda i: errs[i])
    return {
        "seed": seed,
        "final_top1_err": errs[-1],
        "final_top5_err": rows[-1]["val_top5_err"],
        "best_top1_err": errs[best],
        "best_epoch": rows[best]["epoch"],
        "epochs": rows[-1]["epoch"],
        "final_train_loss": rows[-1]["train_loss"],
        "val_top1_err_per_epoch": errs,
        "mean_epoch_s": statistics.fmean(r["epoch_time_s"] for r in rows),
        "wall_s": seconds,
    }


def band(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {
        "min": min(values),
        "max": max(values),
        "spread": max(values) - min(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
    }


def table(result: dict) -> str:
    m, b = result["machine"], result["final_top1_err"]
    cpu = result["cpu"]
    head = (
        f"### Demo recipe over seeds, CPU ({result['date']})\n\n"
        f"{cpu.get('model_name')} (family {cpu.get('family')}, model {cpu.get('model')}, stepping "
        f"{cpu.get('stepping')}; {', '.join(cpu.get('vector_flags', [])) or 'no AVX flags'}), {m['usable_cpus']} "
        f"usable CPUs (load average {m['load_average_at_start'][0]} at start); torch {m['torch']}, torchvision "
        f"{m['torchvision']}; recipe sha256 {result['recipe_sha256'][:12]}. `{result['command']}`"
        + (
            f"; overrides: `{' '.join(result['overrides'])}` (a trial, not the recipe)"
            if result["overrides"]
            else ""
        )
        + "\n\n| seed | final top-1 err | best top-1 err (epoch) | final top-5 err | final train loss | s/epoch | wall |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r['seed']} | {r['final_top1_err']:.1f} % | {r['best_top1_err']:.1f} % ({r['best_epoch']}/{r['epochs']}) "
        f"| {r['final_top5_err']:.1f} % | {r['final_train_loss']:.3f} | {r['mean_epoch_s']:.1f} | {r['wall_s']:.0f} s |"
        for r in result["seeds"]
    ]
    best = result["best_top1_err"]
    summary = (
        f"\nOver {len(result['seeds'])} seeds: best val top-1 error (what best.pth scores, the band `python "
        f"evaluate` checks) {best['min']:.1f}–{best['max']:.1f} % (spread {best['spread']:.1f} points), final "
        f"{b['min']:.1f}–{b['max']:.1f} % (spread {b['spread']:.1f}); chance {result['chance_top1_err']:.0f} %."
    )
    notes = "".join(f" {n}" for n in result["notes"])
    return head + "\n".join(lines) + summary + notes + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        description=__doc__.split("\n\n")[0], formatter_class=__import__("argparse").RawTextHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds to run [0 1 2 3 4]")
    p.add_argument(
        "--data", type=Path, default=REPO / "data" / "demo", help="demo dataset (made when missing)"
    )
    p.add_argument(
        "--runs", type=Path, default=REPO / "runs" / "demo_seeds", help="run folders: RUNS/seed<N>"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per seed before giving up [1800]")
    p.add_argument("--note", action="append", default=[], help="a note for the result (what else ran, ...)")
    p.add_argument("--out", type=Path, help="result JSON [benchmarks/results/demo_seeds_cpu.json]")
    p.add_argument("--readme", type=Path, help="markdown table appended here [benchmarks/results/README.md]")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides after --: a trial recipe"
    )
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise fail(f"--seeds: each seed once, got {args.seeds}")

    from data_pipeline.demo import make_demo_dataset

    summary = make_demo_dataset(args.data)
    info = machine_info()
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, args.data, args.runs / f"seed{seed}", args.overrides, args.timeout)
        rows.append(row)
        print(
            f"seed {seed}: final val top-1 err {row['final_top1_err']:.1f} % (best {row['best_top1_err']:.1f} % at "
            f"epoch {row['best_epoch']}), top-5 {row['final_top5_err']:.1f} %, {row['wall_s']:.0f} s",
            flush=True,
        )
    notes = [n for n in [shared_machine_note(info), *args.note] if n]
    result = {
        "benchmark": "demo_seeds",
        "date": now_utc(),
        "command": command_line("benchmarks/demo_seeds.py", argv),
        "machine": info,
        "cpu": cpu_details(),
        "recipe_sha256": recipe_digest(),
        "overrides": args.overrides,
        "dataset": {"root": str(args.data), "classes": summary.classes, "images": summary.counts},
        "chance_top1_err": 100.0 * (1 - 1 / summary.classes),
        "seeds": rows,
        "final_top1_err": band(rows, "final_top1_err"),
        "best_top1_err": band(rows, "best_top1_err"),
        "notes": notes,
    }
    name = ["demo_seeds", "cpu"] if not args.overrides else ["demo_seeds", "cpu", "trial"]
    return publish(result, name, table(result), args, smoke=False)


if __name__ == "__main__":
    sys.exit(main())
