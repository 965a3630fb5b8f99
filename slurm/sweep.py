"""A sweep: one training job per architecture, each in its own run folder, launched by one command.

    python slurm/launch.py --arch all --gpus 8 --data /datasets/imagenet --partition gpu --run-dir /shared/table \\
        --dry-run                                              # every job: arch, run folder, sbatch lines
    python slurm/launch.py --arch vgg11,vgg13_bn --gpus 8 --data /datasets/imagenet --run-dir /shared/table
    python slurm/launch.py --arch all --recipe paper --init-from-a --gpus 8 --data /datasets/imagenet \\
        --run-dir /shared/paper model.init=paper               # B–E start from net A's best.pth, after A
    python slurm/launch.py --arch vgg11_bn,vgg13_bn --recipe demo --cluster local --run-dir runs/demo-table

Each architecture is its own submitit job (one ``sbatch`` each), not one SLURM job array: every run must requeue
and resume on its own (submitit requeues a job from its own ``checkpoint()``, and an array's tasks share one job
id and its limits), the sweep's runs differ in their recipe (lr, batch split, time), and the paper's B–E need a
dependency on A's job alone (``afterok:<A's job id>``), which an array can only give all its tasks at once.

Run folders: ``<run-dir>/<recipe>-<arch>``; the same per-run checks as a single launch (``slurm.submit``: a busy
folder is refused, a finished one is "nothing to do"), run for every folder before anything is submitted. Every
run logs to one W&B group, ``log.group`` (default: the sweep folder's name). ``--cluster local`` runs the jobs here
one after another; on SLURM they queue together.

The paper's dependency (arXiv 1409.1556 §3.1: B–E initialised from a trained net A): with ``--init-from-a``, or
with ``model.init_from`` naming net A's run folder of this sweep (``<run-dir>/paper-vgg11/best.pth``), B, C, D
and E (vgg13, vgg16_c, vgg16, vgg19) get ``model.init_from`` = A's ``best.pth`` and, on SLURM,
``--dependency=afterok:<A's job id> --kill-on-invalid-dep=yes``: they wait in the queue (reason Dependency) until
A has completed, and leave it if A fails or is cancelled. A, A-LRN and the ``_bn`` twins start from scratch. A
``model.init_from`` elsewhere is used as it is, without a dependency (it must exist when the jobs start).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from slurm.submit import (
    Plan,
    absolute_paths,
    check_run_dir,
    follow_to_end,
    make_plan,
    node_local_problem,
    presubmit_problem,
    sbatch_script,
    start,
)
from train.config import ConfigError, load_config
from train.models import ARCHS, TORCHVISION_ARCHS

RECIPES = ("torchvision", "paper", "demo")
PAPER_ARCHS = ("vgg11", "vgg11_lrn", "vgg13", "vgg16_c", "vgg16", "vgg19")  # A, A-LRN, B, C, D, E
NET_A = "vgg11"
FROM_A = ("vgg13", "vgg16_c", "vgg16", "vgg19")  # B, C, D, E: §3.1 initialises them from net A


@dataclass(frozen=True)
class SweepJob:
    arch: str
    plan: Plan
    after: str | None = None  # the arch whose job this one waits for (afterok)


def parse_archs(text: str, recipe: str) -> list[str]:
    """``all`` (torchvision's eight for the torchvision and demo recipes, the paper's A, A-LRN, B–E for paper) or
    a comma list; unknown names and repeats are refused."""
    if text.strip() == "all":
        return list(PAPER_ARCHS if recipe == "paper" else TORCHVISION_ARCHS)
    archs = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS or a == "custom"]
    if unknown:
        raise ConfigError(f"--arch {unknown[0]!r} is not an architecture; valid: all, {', '.join(TORCHVISION_ARCHS)}, "
                          f"vgg11_lrn, vgg16_c")  # fmt: skip
    repeated = sorted({a for a in archs if archs.count(a) > 1})
    if repeated:
        raise ConfigError(f"--arch names {repeated[0]} twice: each arch is one run")
    if not archs:
        raise ConfigError("--arch: no architecture given")
    return archs


def recipe_name(recipe: str, arch: str) -> tuple[str, list[str]]:
    """(recipe file, extra overrides) for ``--recipe R --arch A``: ``configs/<R>/<A>.yaml``, or the demo recipe
    (one file, ``configs/demo.yaml``) with ``model.arch=A``."""
    if recipe == "demo":
        return "demo", [f"model.arch={arch}"]
    return f"{recipe}/{arch}", []


def _key(overrides: list[str], key: str) -> str | None:
    value = None
    for item in overrides:
        k, sep, v = item.partition("=")
        if sep and k.strip() == key:
            value = v
    return value


def plan_sweep(
    archs: list[str],
    recipe: str,
    run_dir: str,
    flags: list[str],
    overrides: list[str],
    init_from_a: bool = False,
    force: bool = False,
) -> list[SweepJob]:
    """One plan per arch (each validated as a single launch would be), the W&B group set, the paper's
    dependency resolved. ConfigError / LaunchError (one line) for bad input. ``force``: resources that sinfo says
    cannot fit are a warning, as for a single launch."""
    if _key(overrides, "run_dir") is not None:
        raise ConfigError(
            "run_dir=... names one run folder; a sweep puts each run in <--run-dir>/<recipe>-<arch>"
        )
    if _key(overrides, "model.arch") is not None:
        raise ConfigError("model.arch=... names one arch; a sweep's archs are --arch's")
    root = Path(run_dir).expanduser().absolute()
    group = _key(overrides, "log.group")
    extra = [] if group is not None else [f"log.group={json.dumps(root.name)}"]
    a_best = root / f"{recipe}-{NET_A}" / "best.pth"
    init_from = _key(overrides, "model.init_from")
    if init_from and Path(init_from).expanduser().absolute() == a_best:
        init_from_a = True  # model.init_from names this sweep's net A: the same as --init-from-a
    if init_from_a:
        if recipe != "paper":
            raise ConfigError(
                f"--init-from-a is the paper's §3.1 (B–E from net A): use --recipe paper, not {recipe}"
            )
        if NET_A not in archs and not a_best.is_file():
            raise ConfigError(
                f"--init-from-a: net A ({NET_A}) is not in this sweep and {a_best} does not exist: add {NET_A} to "
                f"--arch (B–E then wait for its job), or train it first"
            )
    jobs = []
    for arch in archs:
        name, arch_overrides = recipe_name(recipe, arch)
        own = [*arch_overrides, f"run_dir={json.dumps(str(root / f'{recipe}-{arch}'))}", *extra]
        user = list(overrides)
        after = None
        if init_from_a:
            user = [o for o in user if o.partition("=")[0].strip() != "model.init_from"]
            if arch in FROM_A:
                own.append(f"model.init_from={json.dumps(str(a_best))}")
                after = NET_A if NET_A in archs else None
        try:
            cfg = absolute_paths(load_config(name, [*flags, *own, *user]))
        except ConfigError as e:
            raise ConfigError(f"{arch}: {e}") from None
        jobs.append(
            SweepJob(
                arch,
                make_plan(cfg, given={o.partition("=")[0].strip() for o in [*flags, *user]}, force=force),
                after,
            )
        )
    if init_from_a and NET_A in archs:  # A first: the others' dependency needs its job id
        jobs.sort(key=lambda j: j.arch != NET_A)
    return jobs


def _sbatch_lines(plan: Plan) -> list[str]:
    return [line for line in sbatch_script(plan).splitlines() if line.startswith("#SBATCH")]


def dry_run_sweep(jobs: list[SweepJob], out: TextIO | None = None, force: bool = False) -> int:
    """Every job of the sweep: arch, run folder, plan, dependency, sbatch lines; submits nothing. A reason the
    launch would refuse a job (``presubmit_problem``; not with ``force``) is a warning here."""
    out = out or sys.stdout
    first = jobs[0].plan
    print(f"# sweep: {len(jobs)} job(s), one per arch, recipe {first.cfg.recipe}, cluster {first.cluster}, "
          f"W&B group {first.cfg.log.group!r} (dry run: nothing submitted)", file=out)  # fmt: skip
    for w in dict.fromkeys(w for j in jobs for w in j.plan.warnings):
        print(f"warning: {w}", file=sys.stderr)
    problems = {j.arch: node_local_problem(j.plan.cfg) or (None if force else presubmit_problem(j.plan.cfg))
                for j in jobs}  # fmt: skip
    for problem in dict.fromkeys(p for p in problems.values() if p):  # the same data root: said once
        print(f"warning: the launch would refuse this: {problem}", file=sys.stderr)
    for j in jobs:
        c = j.plan.cfg
        print(f"\n## {j.arch}: run folder {c.run_dir}", file=out)
        print(f"# plan: {j.plan.summary()}", file=out)
        print(f"# schedule: {c.sched.epochs} epochs, lr {c.optim.lr:g}, init {c.model.init}"
              + (f", init_from {c.model.init_from}" if c.model.init_from else ""), file=out)  # fmt: skip
        for n in j.plan.notes:
            print(f"# note: {n}", file=out)
        if j.after:
            print(f"# dependency: afterok:<job id of {j.after}> (--kill-on-invalid-dep=yes: leaves the queue if "
                  f"{j.after} fails)", file=out)  # fmt: skip
        if j.plan.cluster == "slurm":
            plan = replace(j.plan, dependency=f"afterok:<{j.after}>") if j.after else j.plan
            print("\n".join(_sbatch_lines(plan)), file=out)
        else:
            after = f", after {j.after} has trained to its end" if j.after else ""
            print(f"# --cluster {j.plan.cluster}: runs here, one job after another{after}", file=out)
    print(f"\n# the full config and sbatch script of one job: python slurm/launch.py --arch {jobs[0].arch} "
          f"--recipe {first.cfg.recipe} ... --dry-run", file=out)  # fmt: skip
    return 0


def launch_sweep(
    jobs: list[SweepJob], wait: bool = False, force: bool = False, out: TextIO | None = None
) -> int:
    """Check every run folder, then submit (SLURM: all at once, B–E after A) or run (local: one after another).
    Exit status: 0 all submitted (or trained to the end, when following; or nothing to do), 1 a job failed,
    130 Ctrl-C; LaunchError (one line, nothing submitted) when a run folder is busy."""
    out = out or sys.stdout
    first = jobs[0].plan
    for w in dict.fromkeys(w for j in jobs for w in j.plan.warnings):
        print(f"warning: {w}", file=sys.stderr)
    print(f"sweep: {len(jobs)} job(s) ({', '.join(j.arch for j in jobs)}), recipe {first.cfg.recipe}, W&B group "
          f"{first.cfg.log.group!r}", file=out)  # fmt: skip
    todo = []
    for j in jobs:  # every folder checked before anything is submitted: a busy one stops the whole sweep
        print(f"[{j.arch}] ", end="", file=out)
        if check_run_dir(j.plan, out, force=force):
            print(f"{j.plan.cfg.run_dir}: to train", file=out)
            todo.append(j)
    out.flush()
    if first.cluster == "slurm":
        return _submit_all(todo, wait, out)
    return _run_in_turn(todo, out)


def _submit_all(todo: list[SweepJob], wait: bool, out: TextIO) -> int:
    job_ids: dict[str, str] = {}
    submitted = []
    for j in todo:
        plan = j.plan
        if j.after:
            if j.after not in job_ids:  # A had nothing left to do: its best.pth is there, nothing to wait for
                print(f"[{j.arch}] {j.after} has finished: no dependency", file=out)
            else:
                plan = replace(plan, dependency=f"afterok:{job_ids[j.after]}")
        print(f"[{j.arch}] ", end="", file=out)
        job = start(plan, out)
        job_ids[j.arch] = job.job_id
        submitted.append((j, plan, job))
    ids = " ".join(job.job_id for _, _, job in submitted)
    if submitted:
        print(f"sweep submitted: {', '.join(f'{j.arch} {job.job_id}' for j, _, job in submitted)}; "
              f"squeue -j {ids.replace(' ', ',')}; cancel all: scancel {ids}", file=out)  # fmt: skip
    if not wait:
        return 0
    status = 0
    for j, plan, job in submitted:
        print(f"[{j.arch}] following job {job.job_id}", file=out)
        code = follow_to_end(plan, job, wait=True, out=out)
        if code == 130:
            return 130
        status = max(status, code)
    return status


def _run_in_turn(todo: list[SweepJob], out: TextIO) -> int:
    failed: set[str] = set()
    status = 0
    for j in todo:
        if j.after in failed:
            print(
                f"[{j.arch}] not started: {j.after} did not train to its end (as SLURM's afterok)", file=out
            )
            failed.add(j.arch)
            status = 1
            continue
        print(f"[{j.arch}] ", end="", file=out)
        job = start(j.plan, out)
        code = follow_to_end(j.plan, job, out=out)
        if code == 130:
            return 130
        if code:
            failed.add(j.arch)
            status = 1
    return status


__all__ = [
    "FROM_A",
    "NET_A",
    "PAPER_ARCHS",
    "RECIPES",
    "SweepJob",
    "dry_run_sweep",
    "launch_sweep",
    "parse_archs",
    "plan_sweep",
    "recipe_name",
]
