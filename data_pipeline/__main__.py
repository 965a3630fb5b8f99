"""Data tools. Generate the demo dataset (a small JPEG tree in ImageNet's layout, see data_pipeline/demo.py):

    python -m data_pipeline demo data/demo                      # 10 classes, 100 train + 20 val images each
    python -m data_pipeline demo data/demo100 --classes 100 --train-per-class 50 --val-per-class 10
    python -m data_pipeline demo data/demo_big --min-size 256 --max-size 500   # ImageNet-like image sizes

Running the same command again on a finished tree does nothing. Exit status: 0 done (or nothing to do),
1 the output directory holds something else (another demo tree, other files), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from data_pipeline.demo import MAX_CLASSES, DemoTreeError, check_params, make_demo_dataset


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="write the procedurally drawn demo dataset in ImageNet layout",
        description="Write the demo dataset: OUT_DIR/{train,val}/<wnid>/*.JPEG, class_index.json, "
        "demo_manifest.json. Same arguments give byte-identical files.",
    )
    demo.add_argument(
        "out_dir", metavar="OUT_DIR", help="output directory (created; must be empty or a demo tree)"
    )
    demo.add_argument(
        "--classes",
        type=int,
        metavar="N",
        default=10,
        help=f"number of classes, 2..{MAX_CLASSES} (default 10)",
    )
    demo.add_argument(
        "--train-per-class", type=int, metavar="N", default=100, help="train images per class (default 100)"
    )
    demo.add_argument(
        "--val-per-class", type=int, metavar="N", default=20, help="val images per class (default 20)"
    )
    demo.add_argument("--seed", type=int, metavar="N", default=0, help="random seed, 0..2**32-1 (default 0)")
    demo.add_argument(
        "--min-size", type=int, metavar="N", default=64, help="smallest shorter image side in px (default 64)"
    )
    demo.add_argument(
        "--max-size", type=int, metavar="N", default=160, help="largest longer image side in px (default 160)"
    )
    return parser


def _demo(args: argparse.Namespace) -> int:
    params = {
        "classes": args.classes,
        "train_per_class": args.train_per_class,
        "val_per_class": args.val_per_class,
        "seed": args.seed,
        "min_size": args.min_size,
        "max_size": args.max_size,
    }
    try:
        check_params(**params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        summary = make_demo_dataset(args.out_dir, **params)
    except DemoTreeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    counts = ", ".join(f"{n} {split}" for split, n in summary.counts.items())
    if not summary.created:
        print(f"{summary.root} already holds this demo dataset ({counts} images); nothing to do", flush=True)
        return 0
    print(
        f"wrote {counts} images of {summary.classes} classes to {summary.root} in {summary.seconds:.1f} s",
        flush=True,
    )
    kinds = Counter((o.split, o.kind) for o in summary.oddities)
    print("oddities: " + ", ".join(f"{n} {kind} in {split}" for (split, kind), n in sorted(kinds.items())))
    for o in summary.oddities:
        print(f"  {o.kind:9s} {o.path.relative_to(summary.root)}")
    print(f"class index: {summary.class_index}\nmanifest:    {summary.manifest}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse only accepts the commands above


if __name__ == "__main__":
    sys.exit(main())
