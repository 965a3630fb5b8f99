"""Launch distributed VGG training on SLURM through submitit (one task per GPU).

    python slurm/launch.py --arch vgg16_bn --gpus 8 --dry-run               # show the plan, submit nothing
    python slurm/launch.py --arch vgg16 --recipe paper --gpus 16 --data /datasets/imagenet --dry-run

Status: only ``--dry-run`` works so far: it resolves the recipe and prints the config and the job layout
(nodes, tasks, per-GPU batch). Submission is not implemented yet and exits with status 2 saying so.
"""

from __future__ import annotations

import argparse
import os
import sys

if not __package__:
    # `python slurm/launch.py`: Python put slurm/ first on sys.path; drop it so nothing there shadows a
    # top-level module (submitit, ...).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

from train.config import ConfigError, load_config, to_yaml


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python slurm/launch.py",
        description="Submit DDP training of a VGG recipe to SLURM (one task per GPU). Only --dry-run is "
        "implemented so far.",
    )
    p.add_argument("--arch", default="vgg16_bn", help="model.arch [vgg16_bn]")
    p.add_argument("--recipe", default="torchvision", choices=["torchvision", "paper"], help="recipe family")
    p.add_argument("--config", help="a recipe name or YAML path instead of --arch/--recipe (e.g. demo)")
    p.add_argument("--gpus", type=int, default=8, help="total GPUs = tasks [8]")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=0, help="default: ceil(gpus / gpus-per-node)")
    p.add_argument("--data", help="data.root: ImageNet root with train/ and val/")
    p.add_argument("--run-dir", help="run_dir (must be on storage shared by all nodes)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and job layout; submit nothing"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = [
        f"launch.gpus={args.gpus}",
        f"launch.gpus_per_node={args.gpus_per_node}",
        f"launch.nodes={args.nodes}",
    ]
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    config = args.config or f"{args.recipe}/{args.arch}"
    try:
        cfg = load_config(config, [*overrides, *args.overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(
            "error: SLURM submission is not implemented yet; use --dry-run to see the plan", file=sys.stderr
        )
        return 2
    per_gpu = cfg.data.batch_size // cfg.launch.gpus
    print(to_yaml(cfg), end="")
    print(
        f"# plan: {cfg.launch.nodes} node(s) × {min(cfg.launch.gpus, cfg.launch.gpus_per_node)} task(s), "
        f"{cfg.launch.gpus} GPU(s); global batch {cfg.data.batch_size} = {cfg.launch.gpus} × {per_gpu} per GPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
