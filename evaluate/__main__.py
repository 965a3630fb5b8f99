"""Evaluate a VGG checkpoint on ImageNet val: 1-crop top-1 / top-5 error against the reference table.

    python evaluate --reference                       # print the reference table (torchvision + paper rows)
    python evaluate --checkpoint runs/torchvision-vgg16_bn/best.pth --data /datasets/imagenet

Status: the reference table is here; the evaluation itself (``--checkpoint``) is not implemented yet and
exits with status 2 saying so.
"""

from __future__ import annotations

import argparse
import os
import sys

if not __package__:
    # `python evaluate`: Python put this folder first on sys.path, where our module names could shadow
    # top-level packages; drop it and import the installed package instead.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

from evaluate.reference import format_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python evaluate",
        description="1-crop top-1/top-5 error of a VGG checkpoint vs torchvision's reference table "
        "(the vgg11_bn row corrected to 29.63/10.19). Only --reference works so far; "
        "--checkpoint evaluation is not implemented yet.",
    )
    p.add_argument("--reference", action="store_true", help="print the reference table and exit")
    p.add_argument("--checkpoint", help="checkpoint to evaluate (not implemented yet: exits 2)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reference:
        print(format_table())
        return 0
    if args.checkpoint:
        print(
            "error: checkpoint evaluation is not implemented yet; `--reference` prints the table",
            file=sys.stderr,
        )
        return 2
    build_parser().print_usage(sys.stderr)
    print("error: give --reference (or --checkpoint once evaluation lands)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
