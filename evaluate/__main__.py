"""Evaluate a VGG checkpoint on ImageNet val: 1-crop top-1 / top-5 error against the reference table, the
paper's dense / multi-crop / multi-scale protocols, and top-5 predictions for image files.

    python evaluate --weights VGG16_BN_Weights.IMAGENET1K_V1 --data /datasets/imagenet   # torchvision's release:
                                                      # expect the reference row (--reference), PASS
    python evaluate --arch vgg11 --weights DEFAULT --data /datasets/imagenet    # the arch's default weights
    python evaluate --reference                       # the reference table (torchvision + paper rows)
    python evaluate --checkpoint runs/torchvision-vgg16_bn/best.pth --data /datasets/imagenet --json eval.json
    python evaluate --checkpoint vgg16_bn-6c64b313.pth --data /datasets/imagenet    # torchvision's weight file
    torchrun --nproc_per_node=8 -m evaluate --checkpoint best.pth --data /datasets/imagenet --batch-size 128
    srun --ntasks-per-node=8 --gpus-per-node=8 python evaluate --checkpoint best.pth --data /datasets/imagenet
    python evaluate --checkpoint runs/paper-vgg16/best.pth --protocol dense --multi-scale
    python evaluate --checkpoint runs/paper-vgg16/best.pth --protocol dense+multi-crop --scales 256,384,512
    python evaluate --checkpoint runs/demo/best.pth data.val_resize=73 data.val_crop=64   # key=value overrides
    python evaluate --checkpoint vgg16-397923af.pth --predict dog.jpg cat.jpg
    python evaluate --report runs/demo-table/*        # a sweep's runs: evaluate, compare, report.md/json/png

Exit status: 0 when the result is PASS or has no reference, 1 when it is FAIL, 2 for bad input (one
``error:`` line: missing/truncated checkpoint, not a checkpoint, wrong-arch weights, class count mismatch, a
--json destination that cannot be written, options that do not apply to --predict), checked before the
evaluation runs where it can be.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

if not __package__:
    # `python evaluate`: Python put this folder first on sys.path, where our module names could shadow
    # top-level packages; drop it and import the installed package instead.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

from evaluate.reference import format_table


def _scales(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 256,384,512, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive test scales, got {text!r}")
    return values


def _checked(parse, ok, expected: str):
    """An argparse ``type``: ``parse(text)`` when it parses and ``ok`` holds, else one "expected ..." error."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_tolerance = _checked(
    float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (percentage points)"
)


# Options of the evaluation that --predict (top-5 classes of image files) does not use: (flag, args attribute).
NOT_FOR_PREDICT = (
    ("--json", "json_path"),
    ("--protocol", "protocol"),
    ("--scales", "scales"),
    ("--multi-scale", "multi_scale"),
    ("--tolerance", "tolerance"),
    ("--backend", "backend"),
    ("--batch-size", "batch_size"),
    ("--workers", "workers"),
    ("--precision", "precision"),
    ("--channels-last", "channels_last"),
    ("--wandb", "wandb"),
    ("--wandb-run", "wandb_run"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python evaluate",
        description="Top-1/top-5 error of a VGG checkpoint (ours, or torchvision's released weight file) on "
        "ImageNet val, against torchvision's reference table (vgg11_bn row corrected to 29.63/10.19) or the "
        "paper's Tables 3-5.",
        epilog="Exit status: 0 PASS or no reference, 1 FAIL, 2 bad input.",
    )
    p.add_argument("--reference", action="store_true", help="print the reference table and exit")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (or globs, or a sweep folder): evaluate each finished run's best.pth that has no current "
        "eval.json, then write report.md, report.json and report.png (evaluate/report.py)",
    )
    p.add_argument("--report-dir", help="where --report writes its files (default: the run folders' parent)")
    p.add_argument("--checkpoint", help="our checkpoint ({'model', 'config', ...}) or a bare state_dict file")
    p.add_argument(
        "--weights",
        help="torchvision's released weights: VGG16_BN_Weights.IMAGENET1K_V1, DEFAULT (with --arch) or their URL, "
        "read from torch.hub's cache ($TORCH_HOME/hub/checkpoints) and downloaded there when missing; offline, "
        "the error names the URL and the path to put the file at",
    )
    p.add_argument(
        "--arch", help="expected arch; refused if the checkpoint holds another (default: inferred)"
    )
    p.add_argument("--data", help="data root holding val/<wnid>/*.JPEG (default: the checkpoint's data.root)")
    p.add_argument("--backend", choices=("dali", "torchvision"), help="1-crop loader (default: checkpoint's)")
    p.add_argument("--batch-size", type=_positive_int, help="images per process and step (default 64)")
    p.add_argument("--workers", type=int, help="loader threads/processes per process (default: data.workers)")
    # --protocol, --precision, --tolerance: None when not given (so that --predict can refuse them); the
    # defaults named in their help are EvalOptions'.
    p.add_argument(
        "--protocol",
        choices=("1-crop", "dense", "multi-crop", "dense+multi-crop"),
        help="1-crop (the default): resize + centre crop (the reference table's); the others: arXiv 1409.1556 "
        "§3.2",
    )
    p.add_argument(
        "--scales", type=_scales, help="test scales Q for dense/multi-crop, e.g. 256,384,512 (at most 2048)"
    )
    p.add_argument(
        "--multi-scale",
        action="store_true",
        help="the paper's three test scales: {S-32, S, S+32} for fixed-S models, {Smin, mid, Smax} for "
        "jittered S, {1, 1.5, 2} x data.val_resize otherwise",
    )
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16", "fp16"), help="default fp32")
    p.add_argument(
        "--channels-last", action="store_true", help="channels_last memory format (faster on GPUs)"
    )
    p.add_argument(
        "--tolerance", type=_tolerance, help="PASS if |top-1 err - reference| <= this (pp; default 0.3)"
    )
    p.add_argument("--json", dest="json_path", help="write the result (and checkpoint hash, versions) here")
    p.add_argument("--predict", nargs="+", metavar="IMAGE", help="print top-5 classes of these images")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log to W&B: the checkpoint's training run if it stores an id, else a new run",
    )
    p.add_argument("--wandb-run", metavar="ID", help="log to this W&B run id (e.g. the training run)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides (data.*, dist.*, log.*), e.g. data.val_resize=73 data.val_crop=64",
    )
    return p


def _setup_logging() -> None:
    from train.distributed import detect

    rank = detect()[0]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    for name in ("evaluate", "train"):  # "train": train.tracking's W&B lines (e.g. the `wandb sync` command)
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = False
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        logger.addHandler(handler)


def _predict(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline.transforms import TransformSpec
    from evaluate.evaluator import EvalOptions, eval_config
    from evaluate.loading import load_model
    from evaluate.predict import class_names, format_predictions, predict_images

    loaded = load_model(args.checkpoint, arch=args.arch)
    cfg = eval_config(loaded, EvalOptions(checkpoint=args.checkpoint, overrides=args.overrides), world_size=1)
    data_root = args.data
    if data_root is None and loaded.config is not None and os.path.isdir(cfg.data.root):
        data_root = cfg.data.root  # the training data's class names
    names, _ = class_names(loaded.spec.num_classes, data_root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = TransformSpec.from_config(cfg.data)
    predictions = predict_images(loaded.model.to(device), args.predict, spec, names, device)
    print(format_predictions(predictions), flush=True)
    return 0


def _report(args: argparse.Namespace) -> int:
    from data_pipeline.layout import DataError
    from evaluate.evaluator import EvalError
    from evaluate.report import ReportError, run_report
    from train.checkpoint import CheckpointError
    from train.config import ConfigError

    if args.checkpoint or args.predict or args.weights:
        print(
            "error: --report evaluates the runs' own best.pth; --checkpoint/--weights/--predict do not apply",
            file=sys.stderr,
        )
        return 2
    _setup_logging()
    try:
        return run_report(args.report, args.report_dir, data=args.data, batch_size=args.batch_size)
    except (ReportError, EvalError, CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from train.distributed import cleanup

        cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.reference:
        print(format_table())
        return 0
    if args.report:
        return _report(args)
    if args.weights and args.checkpoint:
        print(
            "error: give --weights (torchvision's release) or --checkpoint (a file), not both",
            file=sys.stderr,
        )
        return 2
    from evaluate.loading import fetch_weights, looks_like_weights, released_weights

    named = args.weights or (
        args.checkpoint if args.checkpoint and not os.path.exists(args.checkpoint) else None
    )
    if named is not None and (args.weights or looks_like_weights(named)):  # --checkpoint URL: the same
        from train.checkpoint import CheckpointError

        try:
            args.checkpoint = str(fetch_weights(released_weights(named, args.arch)))
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    if not args.checkpoint:
        parser.print_usage(sys.stderr)
        print(
            "error: give --checkpoint PATH or --weights NAME (or --reference, or --report RUN_DIR...)",
            file=sys.stderr,
        )
        return 2
    if args.predict:
        given = [flag for flag, name in NOT_FOR_PREDICT if getattr(args, name) not in (None, False)]
        if given:
            parser.print_usage(sys.stderr)
            verb = "does" if len(given) == 1 else "do"
            print(
                f"error: --predict prints the top-5 classes of images; {', '.join(given)} {verb} not apply",
                file=sys.stderr,
            )
            return 2
    elif args.json_path is not None:
        from train.run import output_file_problem

        problem = output_file_problem(args.json_path, example="eval.json")
        if problem:  # refused now, not after the whole evaluation
            print(f"error: --json {args.json_path}: {problem}", file=sys.stderr)
            return 2
    from data_pipeline.layout import DataError
    from evaluate.evaluator import EvalError, EvalOptions, format_result, run_evaluation
    from evaluate.imagenet_classes import ClassListError
    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.distributed import DistError, cleanup, detect

    _setup_logging()
    try:
        if args.predict:
            return _predict(args)
        options = dict(
            checkpoint=args.checkpoint,
            arch=args.arch,
            data=args.data,
            backend=args.backend,
            batch_size=args.batch_size,
            workers=args.workers,
            protocol=args.protocol,
            scales=args.scales,
            multi_scale=args.multi_scale,
            precision=args.precision,
            channels_last=args.channels_last,
            tolerance=args.tolerance,
            overrides=args.overrides,
            json_path=args.json_path,
            wandb=args.wandb,
            wandb_run=args.wandb_run,
        )
        # options not given (None) take EvalOptions' defaults
        result = run_evaluation(EvalOptions(**{k: v for k, v in options.items() if v is not None}))
    except DataError as e:  # may be one rank's own (an image in its block): every rank that hit one says so
        rank = detect()[0]
        if rank == 0 or not getattr(e, "every_rank", False):
            print(f"error: {e}" if rank == 0 else f"error: [rank {rank}] {e}", file=sys.stderr, flush=True)
        return 2
    except (CheckpointError, ClassListError, ConfigError, DistError, EvalError) as e:
        if detect()[0] == 0:  # the same on every rank (same files, same options): said once under torchrun
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted (Ctrl-C): no result (--json is written only at the end)",
            file=sys.stderr,
            flush=True,
        )
        return 130
    finally:
        cleanup()
    if detect()[0] == 0:
        print(format_result(result), flush=True)
    return 1 if result.comparison.verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
