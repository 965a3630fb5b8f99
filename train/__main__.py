"""Train a VGG on ImageNet (or the demo dataset) from a recipe in configs/ plus dotted overrides.

    python -m train --list                                       # the recipes
    python -m train --config vgg16_bn --print-config             # resolved config as YAML
    python -m train --config demo data.root=data/demo            # the demo in one process (`make demo` runs
                                                                 # slurm/launch.py --config demo --cluster local:
                                                                 # 2 processes)
    python -m train --config paper/vgg16 data.root=/datasets/imagenet optim.lr=0.02
    python -m train --arch vgg16 --recipe paper --data /datasets/imagenet --run-dir runs/p16   # the launcher's flags

    torchrun --nproc_per_node=8 -m train --config vgg16_bn data.root=/datasets/imagenet   # one node, 8 GPUs

Without torchrun (or SLURM's srun) it trains in one process. It resumes from <run_dir>/last.pth when there is one.
Ctrl-C (SIGINT) or SIGTERM: every rank stops within 3 steps and saves last.pth; exit status 130 / 143,
and the same command resumes (a second Ctrl-C quits without saving). Exit status 0 done, 1 a run error (one
`error:` line), 2 a config error.
One training per run folder: while one runs, another into the same run_dir stops at once with
`error: run_dir ... is in use by pid N on HOST (SLURM job J) since ...` (rank 0 holds <run_dir>/.lock).
Run folder: config.yaml, train.log, metrics.jsonl (one line per epoch), steps.jsonl, curves.png, last.pth /
best.pth, checkpoints/epoch_NNN.pth, .lock, wandb_id.txt, wandb/ (offline runs: `wandb sync
<run_dir>/wandb/offline-run-*`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from train.config import ConfigError, available_recipes, load_config, to_yaml
from train.flags import foreign_option, unknown_arch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a VGG from a recipe (configs/) with dotted key=value overrides; "
        "resumes from <run_dir>/last.pth.",
        epilog="Keys: see README.md (model.arch, data.root, data.backend, data.batch_size (global), optim.lr, "
        "optim.weight_decay, sched.epochs, run_dir, seed, log.wandb_mode, ...).",
    )
    p.add_argument("--config", help="recipe name (see --list) or YAML path [vgg16_bn]")
    p.add_argument(
        "--arch", help="model.arch: the recipe configs/<recipe>/<arch>.yaml, as slurm/launch.py's --arch"
    )
    p.add_argument(
        "--recipe",
        choices=["torchvision", "paper", "demo"],
        help="recipe family with --arch [torchvision]; demo: configs/demo.yaml with model.arch=--arch",
    )
    p.add_argument("--data", help="data.root: ImageNet root with train/ and val/")
    p.add_argument("--run-dir", help="run_dir: config, checkpoints, logs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.02")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    return p


def _recipe_and_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The recipe file and overrides the flags stand for (as slurm/launch.py reads --arch/--recipe/--data/--run-dir:
    flags first, so a key=value given too wins)."""
    if args.config and (args.arch or args.recipe):
        raise ConfigError(
            f"--config {args.config} names the recipe file; --arch/--recipe choose one instead (give one of them; "
            "to change the arch of a recipe file, add model.arch=...)"
        )
    flags = [f"{key}={json.dumps(value)}" for key, value in (("data.root", args.data), ("run_dir", args.run_dir))
             if value is not None]  # fmt: skip
    if args.config:
        return args.config, [*flags, *args.overrides]
    arch, recipe = args.arch or "vgg16_bn", args.recipe or "torchvision"
    wrong = unknown_arch(arch)
    if wrong:
        raise ConfigError(wrong)
    if recipe == "demo":
        return "demo", [f"model.arch={arch}", *flags, *args.overrides]
    return f"{recipe}/{arch}", [*flags, *args.overrides]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    foreign = foreign_option(argv, parser, "train")  # --epochs, --output-dir, ...: name what to write instead
    if foreign:
        print(f"error: {foreign}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available_recipes()))
        return 0
    from train.distributed import detect

    try:
        config, overrides = _recipe_and_overrides(args)
        # the world size is known before any process group exists: check the global batch divides now
        cfg = load_config(config, overrides, world_size=None if args.print_config else detect()[2])
    except ConfigError as e:
        if detect()[0] == 0:  # under torchrun every rank gets here: say it once
            print(f"error: {e}", file=sys.stderr)
        else:
            _leave_the_word_to_rank_0()
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from data_pipeline.layout import DataError
    from train.checkpoint import CheckpointError
    from train.distributed import DistError
    from train.engine import NonFiniteLoss, train
    from train.run import RunError

    rank, _, world_size, _ = detect()
    try:
        result = train(cfg)
    except DataError as e:  # during training, an image only this rank reads: every rank that hit one says so
        if rank == 0 or not getattr(e, "every_rank", False):
            print(f"error: {e}" if rank == 0 else f"error: [rank {rank}] {e}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, RunError, DistError, NonFiniteLoss) as e:
        if rank == 0:  # the same on every rank (agreed, or read from the same files): one line, from rank 0
            print(f"error: {e}", file=sys.stderr)
        else:
            _leave_the_word_to_rank_0()
        return 1
    except RuntimeError as e:
        if world_size > 1 and _lost_a_peer(e):  # another process failed first: its own error line is above
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(
                f"error: [rank {rank}] stopped: another process of the job failed or stopped answering (its own "
                f"error line, if it printed one, is above; {first[:160]})",
                file=sys.stderr,
            )
            return 1
        raise
    except KeyboardInterrupt:  # a Ctrl-C before training started, or a second one (engine.StopOnSignals)
        if rank == 0:
            print("\ninterrupted (Ctrl-C): quit without saving", file=sys.stderr)
        return 130
    if result["status"] == "interrupted" and result.get("signal"):
        if rank == 0:
            print(
                f"interrupted ({result['signal']}): saved {cfg.run_dir}/last.pth at epoch {result['epoch'] + 1}, step "
                f"{result['step']}; the same command resumes from it",
                file=sys.stderr,
            )
        return 128 + int(getattr(signal, result["signal"]))
    return 0 if result["status"] in ("done", "interrupted") else 1


# Under torchrun, the first process to exit with an error makes the agent SIGTERM the others. An error every rank
# hits alike is printed by rank 0 only, so a rank ≠ 0 that got there first (rank 0 still importing on a loaded
# machine) would have rank 0 killed before it printed anything: the user would see torchrun's summary and no reason.
# A rank ≠ 0 therefore waits for rank 0 to exit (the agent then stops it) before exiting itself. Under srun the
# tasks end independently (no kill on a bad exit by default), so there is nothing to wait for.
RANK_0_GRACE_S = 60.0


def _leave_the_word_to_rank_0() -> None:
    import os
    import time

    if os.environ.get("TORCHELASTIC_RUN_ID"):
        time.sleep(RANK_0_GRACE_S)


def _lost_a_peer(e: RuntimeError) -> bool:
    """A collective failed because another process died or hung (gloo's and NCCL's messages for it)."""
    import torch.distributed as dist

    text = str(e)
    markers = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting")
    return isinstance(e, dist.DistError) or any(m in text for m in markers)


if __name__ == "__main__":
    sys.exit(main())
