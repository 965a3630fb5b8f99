"""Launch distributed VGG training through submitit: one task per GPU, on SLURM, on this machine, or in-process.

    python slurm/launch.py --arch vgg16_bn --gpus 8 --data /datasets/imagenet --partition gpu --dry-run
    python slurm/launch.py --arch vgg16_bn --gpus 8 --data /datasets/imagenet --partition gpu --time 24:00:00
    python slurm/launch.py --arch vgg16 --recipe paper --gpus 16 --data /datasets/imagenet --run-dir /shared/runs/p16
    python slurm/launch.py --config demo --cluster local                 # the demo: 2 CPU processes, no SLURM
    python slurm/launch.py --config demo --cluster slurm --wait          # the same job through sbatch, followed
    python slurm/launch.py --arch all --gpus 8 --data /datasets/imagenet --run-dir /shared/table   # a sweep:
    python slurm/launch.py --arch vgg11_bn,vgg13_bn --recipe demo --cluster local --run-dir runs/demo-table
    python slurm/launch.py --arch vgg16_bn --gpus 16 --data /datasets/imagenet --partition gpu --preflight

A sweep (``--arch all`` or a comma list; ``slurm/sweep.py``) is one job per arch, each in
``<run-dir>/<recipe>-<arch>``, requeued and resumed on its own; ``--init-from-a`` (``--recipe paper``) starts B–E
from net A's ``best.pth`` once A's job has completed (``afterok``). ``python evaluate --report <run-dir>/*`` then
evaluates and tabulates them.

``--gpus`` is the total; nodes = ceil(gpus / gpus-per-node) unless ``--nodes`` is given, the same number of
tasks on every node (``--gpus 12 --gpus-per-node 8 data.batch_size=384`` runs 2 nodes × 6, and says so),
per-GPU batch = global
``data.batch_size`` / gpus (refused if it does not divide; the lr is the recipe's, scaled only with
``optim.lr_scaling=linear``). On SLURM it prints the job id, run folder, log paths and W&B run and returns; the job
checkpoints and requeues itself ``launch.signal_delay_s`` before its time limit (at most
``launch.max_num_timeout`` times), and resumes where it stopped (same epoch, step and W&B run); on SIGTERM
alone (``scancel``, a preemption without SIGUSR2) every rank saves ``last.pth`` and exits, and SLURM's preemption
mode (REQUEUE) or the same command again resumes it. ``--cluster local`` runs the same job on this machine (submitit's local executor, one process per GPU;
CPU processes with gloo when there is no GPU) and follows its log; ``--cluster debug`` runs it in this process
(submitit's DebugExecutor: one task, and an exception opens pdb).
Running the same command again resumes from ``<run_dir>/last.pth`` (and submits nothing once it is at the last
epoch). Exit status: 0 submitted (or trained to the end, when following; or nothing to do), 1 the job failed or
stopped early, 2 bad input (including sbatch refusing the job).

One training per run folder: while a SLURM job launched into the same ``--run-dir`` is still queued or running
(``squeue``), or a training holds ``<run_dir>/.lock``, the launch is refused in one line (``error: run_dir X
already has SLURM job 1234 (RUNNING); scancel 1234 first or use another run_dir``). ``--force`` submits anyway; the
training itself still refuses to start while another one holds the folder.

Nothing submitted that must fail: before submitting, the data root (``train/``/``val/`` class folders, or a pack's
``manifest.json``), its class count against ``model.num_classes`` and ``<run_dir>/last.pth`` (the training's own
resume check) are checked on this host; each is one ``error:`` line, exit status 2 (``--dry-run``: a warning).
``--force`` skips them (a login node that cannot see the data). A SLURM job's run folder or interpreter on
node-local storage (``/tmp``) is refused whatever ``--force`` says. CPUs and memory per task not given
(``--cpus-per-gpu``, ``--mem-per-gpu``) are each GPU's share of the partition's nodes, read with ``sinfo``
(``slurm/resources.py``); a request no node can hold (CPUs, memory, GPUs per node, an unknown partition) is one
``error:`` line naming the flag and the value that fits, exit status 2 (``--force`` submits a request that sinfo
says does not fit, with a warning). ``--setup``, ``--sbatch``, ``--srun``, ``--container-image`` and ``--python``
(``launch.*`` keys) add what a site needs around the job. Familiar flags from other trainers (``--epochs``,
``--lr``, ``--output-dir``, ...) are answered with the key or flag to use instead.

``--preflight`` (``slurm/preflight.py``): the same flags submit a short job on the same resources instead of the
training, which checks the stack (builds, CPUs and GPUs per task, all-reduce bandwidth, the run folder across nodes,
the data, a few timed training steps) and projects the run's epoch time, GPU-hours and ``--time``; it waits for it
and prints one verdict line and ``<run_dir>/preflight/preflight.md`` (exit 0 OK, 1 problems, 2 bad input).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if not __package__:
    # `python slurm/launch.py`: Python put slurm/ first on sys.path; drop it so nothing there shadows a
    # top-level module (submitit, ...).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

from train.config import Config, ConfigError, load_config
from train.flags import foreign_option, unknown_arch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python slurm/launch.py",
        description="Train a VGG recipe with DDP through submitit: one task per GPU on SLURM (--cluster slurm), "
        "on this machine (local) or in this process (debug). Requeues itself at the time limit and resumes.",
        epilog="Options not given here come from the recipe's launch.* keys (train/config.py).",
    )
    p.add_argument("--arch", help="model.arch [vgg16_bn]; a comma list or 'all': a sweep, one job per arch")
    p.add_argument(
        "--recipe",
        choices=["torchvision", "paper", "demo"],
        help="recipe family [torchvision]; demo: configs/demo.yaml with model.arch=--arch",
    )
    p.add_argument(
        "--init-from-a",
        action="store_true",
        help="sweep, --recipe paper: B-E start from net A's best.pth (model.init_from), after A's job (afterok)",
    )
    p.add_argument("--config", help="a recipe name or YAML path instead of --arch/--recipe (e.g. demo)")
    p.add_argument("--gpus", type=int, help="total GPUs = tasks [recipe's launch.gpus]")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node [8]")
    p.add_argument("--nodes", type=int, help="nodes [ceil(gpus / gpus-per-node)]")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--constraint", help="SLURM node features, e.g. a100")
    p.add_argument("--time", help="time limit per job, [D-]HH:MM:SS [72:00:00]; requeued jobs continue")
    p.add_argument(
        "--mem-per-gpu",
        help="memory per GPU, e.g. 64G (sbatch --mem = this × GPUs per node) [each GPU's share of the partition's "
        "nodes less 10%%, from sinfo; 64G without sinfo]",
    )
    p.add_argument(
        "--cpus-per-gpu",
        type=int,
        help="CPU cores per task [node CPUs / node GPUs of the partition, from sinfo; 10 without sinfo]",
    )
    p.add_argument(
        "--setup",
        action="append",
        metavar="LINE",
        help="launch.setup: a shell line the sbatch script runs before srun, e.g. 'module load cuda/12.4' or "
        "'source /shared/env/bin/activate' (repeatable)",
    )
    p.add_argument(
        "--sbatch",
        action="append",
        metavar="OPT[=VALUE]",
        help="launch.sbatch_args: another #SBATCH option, e.g. exclusive, reservation=r1, gres=gpu:a100:8 (repeatable)",
    )
    p.add_argument(
        "--srun",
        action="append",
        metavar="=--OPT[=VALUE]",
        help="launch.srun_args: another srun option, e.g. --srun=--cpu-bind=cores (repeatable)",
    )
    p.add_argument(
        "--container-image",
        help="launch.container_image: run the tasks in this image (pyxis/enroot: srun --container-image); "
        "name its interpreter with --python, and mount shared paths with --srun=--container-mounts=...",
    )
    p.add_argument(
        "--python",
        help="launch.python: the interpreter the tasks run [this one]; it must exist on every node",
    )
    p.add_argument("--data", help="data.root: ImageNet root with train/ and val/")
    p.add_argument("--run-dir", help="run_dir: config, checkpoints, logs (on storage shared by all nodes)")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], help="where to run [recipe's; slurm]")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config only")
    p.add_argument("--wait", action="store_true", help="SLURM: follow rank 0's log until the job ends")
    p.add_argument(
        "--force",
        action="store_true",
        help="submit without the checks on this host: a job of this run_dir queued/running or a training holding "
        "its lock; the data root (train/, val/ or a pack's manifest), its class count against model.num_classes and "
        "the run folder's last.pth (arch, recipe); CPUs, memory or GPUs per node that sinfo says no node has. "
        "For a login node that cannot see the data (the training's lock "
        "still refuses to run two at once, and the job still checks the rest when it starts; a node-local run "
        "folder or interpreter is refused even so)",
    )
    p.add_argument(
        "--preflight",
        action="store_true",
        help="submit a short preflight job on the same resources instead: checks builds, CPUs/GPUs per task, "
        "all-reduce bandwidth, the run folder on every node, the data and N timed steps; projects epoch time, "
        "GPU-hours and --time; waits and prints a verdict and <run_dir>/preflight/preflight.md (slurm/preflight.py)",
    )
    p.add_argument(
        "--preflight-steps", type=int, default=20, metavar="N", help="--preflight: timed steps [20]"
    )
    p.add_argument(
        "--preflight-images",
        type=int,
        default=500,
        metavar="K",
        help="--preflight: val images for torchvision's released weights of the arch, when cached [500]",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    """Command-line options as config overrides; strings JSON-quoted so YAML keeps them strings (72:00:00)."""
    out = []
    for flag, key in [("gpus", "launch.gpus"), ("gpus_per_node", "launch.gpus_per_node"),
                      ("nodes", "launch.nodes"), ("cpus_per_gpu", "launch.cpus_per_gpu")]:  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                why = " (one task per GPU)" if flag == "gpus" else ""
                raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1{why}, got {value}")
            out.append(f"{key}={value}")
    for flag, key in [("partition", "launch.partition"), ("account", "launch.account"), ("qos", "launch.qos"),
                      ("constraint", "launch.constraint"), ("time", "launch.time"),
                      ("mem_per_gpu", "launch.mem_per_gpu"), ("cluster", "launch.cluster"),
                      ("data", "data.root"), ("run_dir", "run_dir"), ("container_image", "launch.container_image"),
                      ("python", "launch.python"), ("setup", "launch.setup"), ("srun", "launch.srun_args")]:  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    if args.sbatch:
        options = {}
        for item in args.sbatch:  # exclusive | reservation=r1 | --gres=gpu:a100:8
            name, sep, value = item.lstrip("-").partition("=")
            options[name.replace("-", "_")] = value if sep else True
        out.append(f"launch.sbatch_args={json.dumps(options)}")
    return out


def _typed(args: argparse.Namespace, flag: str | None, key: str, value: object) -> str:
    """How the user gave ``key``: ``--flag V``, ``key=V``, or ``key=V (the recipe's)``."""
    if flag and getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None:
        return f"{flag} {value}"
    if any(o.partition("=")[0].strip() == key for o in args.overrides):
        return f"{key}={value}"
    return f"{key}={value} (the recipe's)"


def _check_batch_split(cfg: Config, args: argparse.Namespace) -> None:
    """ConfigError naming what the user typed when the global batch does not split over the GPUs, with the
    nearest GPU counts that divide it and the nearest batches that split over these GPUs."""
    batch, gpus = cfg.data.batch_size, cfg.launch.gpus
    if batch % gpus == 0:
        return
    divisors = [g for g in range(1, batch + 1) if batch % g == 0]
    fewer, more = max(g for g in divisors if g < gpus), min((g for g in divisors if g > gpus), default=None)
    use_gpus = " or ".join(f"--gpus {g}" for g in (fewer, more) if g is not None)
    batches = " or ".join(str(b) for b in (batch // gpus * gpus, batch // gpus * gpus + gpus) if b > 0)
    raise ConfigError(
        f"{_typed(args, '--gpus', 'launch.gpus', gpus)} does not divide the global batch, "
        f"{_typed(args, None, 'data.batch_size', batch)}: "
        f"use {use_gpus}, or data.batch_size={batches} (a multiple of {gpus}; the lr stays the recipe's unless "
        "optim.lr_scaling=linear)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    foreign = foreign_option(
        argv, parser, "launch"
    )  # --epochs, --output-dir, ...: name what to write instead
    if foreign:
        print(f"error: {foreign}", file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv)
    from slurm.submit import LaunchError, absolute_paths, dry_run, launch, make_plan
    from slurm.sweep import recipe_name

    try:
        for arch in [] if args.arch is None or args.arch.strip() == "all" else args.arch.split(","):
            wrong = arch.strip() and unknown_arch(arch.strip(), also="all, ")
            if wrong:
                raise ConfigError(wrong)
        if args.config and (args.arch or args.recipe):
            raise ConfigError(
                f"--config {args.config} names the recipe file; --arch/--recipe choose one instead (give one of "
                "them; to change the arch of a recipe file, add model.arch=...)"
            )
        sweep = args.arch is not None and ("," in args.arch or args.arch.strip() == "all")
        if args.preflight and (sweep or args.dry_run):
            raise ConfigError(
                "--preflight checks one launch: give one --arch"
                if sweep
                else "--preflight submits a short job; --dry-run submits nothing: choose one"
            )
        if args.preflight and (args.preflight_steps < 1 or args.preflight_images < 0):
            raise ConfigError("--preflight-steps must be >= 1 and --preflight-images >= 0")
        if sweep:
            return _sweep(args)
        if args.init_from_a:
            raise ConfigError("--init-from-a is for a sweep (--arch all or a comma list with vgg11 and B-E)")
        flags = _overrides(args)
        name, extra = recipe_name(args.recipe or "torchvision", args.arch or "vgg16_bn")
        overrides = [*flags, *([] if args.config else extra), *args.overrides]
        cfg = absolute_paths(load_config(args.config or name, overrides, batch_split=False))
        _check_batch_split(cfg, args)
        plan = make_plan(cfg, given={o.partition("=")[0].strip() for o in overrides}, force=args.force)
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(plan, force=args.force)
    try:
        if args.preflight:
            from slurm.preflight import Options, run_preflight

            options = Options(steps=args.preflight_steps, images=args.preflight_images)
            return run_preflight(plan, options, force=args.force)
        return launch(plan, wait=args.wait, force=args.force)
    except LaunchError as e:  # no sbatch; sbatch refused it (bad partition, ...); run_dir unwritable or busy
        print(f"error: {e}", file=sys.stderr)
        return 2


def _sweep(args: argparse.Namespace) -> int:
    """``--arch all`` / ``--arch a,b,...``: one job per arch (slurm/sweep.py). ConfigError for bad input."""
    from slurm.submit import LaunchError
    from slurm.sweep import dry_run_sweep, launch_sweep, parse_archs, plan_sweep

    recipe = args.recipe or "torchvision"
    archs = parse_archs(args.arch, recipe)
    run_dir = args.run_dir or "runs"
    flags = [f for f in _overrides(args) if not f.startswith("run_dir=")]
    jobs = plan_sweep(
        archs, recipe, run_dir, flags, list(args.overrides), init_from_a=args.init_from_a, force=args.force
    )
    if args.dry_run:
        return dry_run_sweep(jobs, force=args.force)
    try:
        return launch_sweep(jobs, wait=args.wait, force=args.force)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
