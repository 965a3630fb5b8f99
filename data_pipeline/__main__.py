r"""Data tools: the demo dataset, ImageNet val preparation, a dataset check, and packing into shards.

Generate the demo dataset (a small JPEG tree in ImageNet's layout, see data_pipeline/demo.py):

    python -m data_pipeline demo data/demo                      # 10 classes, 100 train + 20 val images each
    python -m data_pipeline demo data/demo100 --classes 100 --train-per-class 50 --val-per-class 10
    python -m data_pipeline demo data/demo_big --min-size 256 --max-size 500   # ImageNet-like image sizes

Sort the official flat ILSVRC2012 val folder into val/<wnid>/ (data_pipeline/prepare.py), from the devkit's
ground truth + meta.mat or from Kaggle's LOC_val_solution.csv; moves by default, --link keeps the flat files:

    python -m data_pipeline prepare-val /datasets/imagenet/val \
        --labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \
        --meta ILSVRC2012_devkit_t12/data/meta.mat
    python -m data_pipeline prepare-val /datasets/imagenet/val --labels LOC_val_solution.csv --dry-run
    python -m data_pipeline prepare-val /datasets/imagenet/val --labels LOC_val_solution.csv --link

Check a dataset root: class folders, counts against ILSVRC2012's, every image decoded (data_pipeline/check.py);
on a pack (a folder holding manifest.json): every shard's sha256, tar members against its index, every label
and every image decoded:

    python -m data_pipeline check /datasets/imagenet --workers 16
    python -m data_pipeline check data/demo
    python -m data_pipeline check /datasets/imagenet-shards --full

Pack a tree into WebDataset tar shards + DALI index files + manifest.json, for shared filesystems
(data_pipeline/shards.py; train shuffled at pack time with --seed, val in folder order; rerun to resume):

    python -m data_pipeline pack /datasets/imagenet /datasets/imagenet-shards --shard-size 1GB
    python -m data_pipeline pack data/demo data/demo-shards --shard-size 500KB --split train --seed 0
    python -m data_pipeline pack /datasets/imagenet /datasets/imagenet-shards --workers 16   # default: all cores

Running demo or prepare-val again on a finished tree does nothing and says so. Exit status: demo: 0 done (or
nothing to do), 1 the output directory holds something else (another demo tree, other files); prepare-val: 0
done, 1 labels and folder disagree (one error line per problem); check: 0 the tree or pack is sound, 1
problems (one a line; a missing ROOT is one); pack: 0 done (or nothing to do), 1 a bad tree or an OUT packed
from other inputs or options; all: 2 bad arguments (prepare-val: including a VAL_DIR or label file that does
not exist).
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
    prep = sub.add_parser(
        "prepare-val",
        help="sort the flat ILSVRC2012 val images into val/<wnid>/ class folders",
        description="Sort VAL_DIR/ILSVRC2012_val_*.JPEG into VAL_DIR/<wnid>/ by the ground truth: the devkit's "
        "ILSVRC2012_validation_ground_truth.txt with --meta meta.mat, or LOC_val_solution.csv. Idempotent: "
        "rerun after an interruption to finish; rerun when finished does nothing.",
    )
    prep.add_argument("val_dir", metavar="VAL_DIR", help="folder holding the extracted val images")
    prep.add_argument(
        "--labels",
        required=True,
        metavar="FILE",
        help="ILSVRC2012_validation_ground_truth.txt (needs --meta) or LOC_val_solution.csv",
    )
    prep.add_argument(
        "--meta",
        metavar="META_MAT",
        help="the devkit's data/meta.mat (maps ILSVRC2012_IDs to wnids; with the CSV, checks its wnids)",
    )
    prep.add_argument(
        "--link",
        action="store_true",
        help="hard-link into the class folders and keep the flat files (symbolic links where hard links fail)",
    )
    prep.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    check = sub.add_parser(
        "check",
        help="verify a dataset root or a pack: class folders, counts, every image decoded",
        description="Verify ROOT/{train,val}/<wnid>/: same class folders in both, no empty ones, every image "
        "decoded with the DALI pipeline's decoder (CPU). On a pack (ROOT holds manifest.json, made by pack): "
        "what the shard reader refuses, every shard's sha256 against the manifest, its tar members against its "
        "index, every sample's .jpg and .cls, every label in range, every image decoded. Exit 0 when sound, "
        "else 1 with one problem a line.",
    )
    check.add_argument(
        "root", metavar="ROOT", help="dataset root holding train/ and val/, or a pack holding manifest.json"
    )
    check.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=None,
        help="processes reading and decoding (threads below 4,096 images or shards; default: the CPU cores "
        "this process may use)",
    )
    check.add_argument(
        "--quick",
        action="store_true",
        help="headers only: every image's magic bytes, JPEG frame header and end marker (a pack: shard sizes "
        "instead of sha256), one image per class decoded; 1.28 M files in minutes. Default: every image decoded",
    )
    check.add_argument(
        "--full",
        action="store_true",
        help="also require the full ILSVRC2012 sizes (1000 classes, 1,281,167 / 50,000 images, 50 val per class)",
    )
    check.add_argument("--all-notes", action="store_true", help="list every note (default: 10 per kind)")
    pack = sub.add_parser(
        "pack",
        help="pack ROOT/{train,val} into WebDataset tar shards with DALI index files and a manifest",
        description="Write OUT/{train,val}/shard-NNNNNN.{tar,idx} and OUT/manifest.json (see "
        "data_pipeline/shards.py). Resumable: rerun skips shards that match the manifest.",
    )
    pack.add_argument("root", metavar="ROOT", help="dataset root holding train/ and val/")
    pack.add_argument(
        "out", metavar="OUT", help="output folder (created; empty, new, or an earlier pack of ROOT)"
    )
    # strings, checked in _pack: a bad value is one error line (argparse would add its usage text)
    pack.add_argument(
        "--shard-size",
        metavar="SIZE",
        default="1GB",
        help="bytes per shard at most: 1GB, 500MB, 10KB (default 1GB)",
    )
    pack.add_argument("--split", metavar="SPLIT", default="both", help="train, val or both (default both)")
    pack.add_argument("--seed", metavar="N", default="0", help="train shuffle seed (default 0)")
    pack.add_argument(
        "--workers",
        metavar="N",
        default=None,
        help="processes writing shards (default: the CPU cores this process may use; the shards are the same)",
    )
    return parser


def _error(lines: list[str], status: int) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return status


def _prepare_val(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import PrepareError, UsageError, prepare_val

    try:
        plan, summary = prepare_val(
            args.val_dir, args.labels, args.meta, link=args.link, dry_run=args.dry_run
        )
    except UsageError as e:
        return _error(e.problems, 2)
    except PrepareError as e:
        return _error(e.problems, 1)
    root, verb = summary.val_dir, "link" if args.link else "move"
    if summary.ignored:
        print(
            f"left alone {len(summary.ignored):,} non-image file(s) in {root}: {', '.join(summary.ignored[:3])}"
        )
    pending = len(plan.todo) + len(plan.finish)
    if pending == 0:
        print(
            f"{root} is already prepared: {summary.images:,} images in {summary.classes:,} class folders; "
            "nothing to do",
            flush=True,
        )
        return 0
    if summary.dry_run:
        for name, wnid in plan.todo:
            print(f"would {verb} {name} -> {wnid}/{name}")
        for name, wnid in plan.finish:
            print(f"would remove {name} (already linked as {wnid}/{name})")
        print(
            f"dry run: would {verb} {len(plan.todo):,} images into {summary.classes:,} class folders of {root} "
            f"({summary.already:,} already in place); nothing was changed",
            flush=True,
        )
        return 0
    if args.link:
        what = f"hard-linked {summary.linked:,}"
        if summary.symlinked:
            what += f" and symbolically linked {summary.symlinked:,} (hard links refused: {summary.symlink_reason})"
        print(f"{what} images into {summary.classes:,} class folders of {root}; the flat files are kept")
    else:
        print(f"moved {summary.moved:,} images into {summary.classes:,} class folders of {root}")
    print(
        f"{summary.images:,} images ({summary.already:,} were already in place), {summary.form} labels, "
        f"{summary.seconds:.1f} s",
        flush=True,
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from collections import Counter, defaultdict
    from pathlib import Path

    from data_pipeline.check import FULL_CLASSES, FULL_COUNTS, MANIFEST, check_pack, check_root

    if args.workers is not None and args.workers < 1:
        return _error([f"--workers must be at least 1, got {args.workers}"], 2)
    check = check_pack if (Path(args.root) / MANIFEST).is_file() else check_root
    report = check(args.root, workers=args.workers, full=args.full, quick=args.quick)
    print(f"root: {report.root.resolve()}{f' (a pack: {MANIFEST})' if report.pack else ''}")
    for split in ("train", "val"):
        if split in report.counts and report.pack:
            print(
                f"{split}: {report.counts[split]:,} images in {len(report.classes[split]):,} classes, "
                f"{report.shards[split]:,} shards"
            )
        elif split in report.counts:
            print(f"{split}: {report.counts[split]:,} images in {len(report.classes[split]):,} class folders")
    how = f"{report.workers} {'processes' if report.processes else 'threads'}"
    if report.read_bytes or report.read_seconds:
        rate = report.read_bytes / 1e6 / report.read_seconds if report.read_seconds else 0.0
        what = "tar headers (sizes" if report.quick else "tar (sha256"
        print(
            f"read {report.read_bytes / 1e6:,.1f} MB of {what} against the manifest, members against the "
            f"index) in {report.read_seconds:.1f} s ({rate:,.0f} MB/s, "
            f"{report.workers} {'processes' if report.read_processes else 'threads'})"
        )
    if report.counts:
        full = f"{FULL_CLASSES:,} classes, {FULL_COUNTS['train']:,} train / {FULL_COUNTS['val']:,} val images"
        print(f"size: {'the full ILSVRC2012 set' if report.full else 'not the full ILSVRC2012 set'} ({full})")
    if report.looked:
        rate = report.looked / report.look_seconds if report.look_seconds else 0.0
        print(
            f"--quick: looked at {report.looked:,} image headers (magic bytes, JPEG frame header and end marker) "
            f"in {report.look_seconds:.1f} s ({rate:,.0f} images/s, {how}); not decoded"
        )
    if report.decoded or report.decode_seconds:
        rate = report.decoded / report.decode_seconds if report.decode_seconds else 0.0
        print(
            f"decoded {report.decoded:,} images{' (one per class)' if report.quick else ''} with DALI's CPU "
            f"decoder in {report.decode_seconds:.1f} s ({rate:,.0f} images/s, "
            f"{f'{report.workers} threads' if report.quick else how})"
        )
    by_kind: dict[str, list] = defaultdict(list)
    for note in report.notes:
        by_kind[note.kind].append(note)
    if report.notes:
        print(
            "notes: "
            + ", ".join(f"{n:,} {kind}" for kind, n in sorted(Counter(n.kind for n in report.notes).items()))
        )
    for kind, notes in sorted(by_kind.items()):
        shown = notes if args.all_notes else notes[:10]
        for note in shown:
            print(f"note: {note.path}: {note.detail}")
        if len(shown) < len(notes):
            print(f"note: ... and {len(notes) - len(shown):,} more {kind} (--all-notes lists them)")
    for problem in report.problems:
        print(f"problem: {problem}")
    if report.sound:
        print(f"OK: {report.root} is sound", flush=True)
        return 0
    print(f"FAILED: {len(report.problems):,} problem(s) in {report.root}", flush=True)
    return 1


def _pack(args: argparse.Namespace) -> int:
    from data_pipeline.layout import DataError
    from data_pipeline.shards import PackError, pack, parse_size

    try:
        shard_size = parse_size(args.shard_size)
    except PackError as e:
        return _error([str(e)], 2)
    if args.split not in ("train", "val", "both"):
        return _error([f"--split must be train, val or both, got {args.split!r}"], 2)
    try:
        seed = int(args.seed)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**63:
        return _error([f"--seed must be a whole number >= 0, got {args.seed!r}"], 2)
    workers = None
    if args.workers is not None:
        try:
            workers = int(args.workers)
        except ValueError:
            workers = 0
        if workers < 1:
            return _error([f"--workers must be a whole number >= 1, got {args.workers!r}"], 2)
    splits = ("train", "val") if args.split == "both" else (args.split,)
    try:
        s = pack(args.root, args.out, shard_size=shard_size, splits=splits, seed=seed, workers=workers)
    except DataError as e:
        return _error([str(e)], 1)

    def shards(n: int) -> str:
        return f"{n:,} shard{'' if n == 1 else 's'}"

    for split in splits:
        done = f"{shards(s.written[split])} written" + (
            f" ({s.redone[split]:,} redone)" if s.redone[split] else ""
        )
        print(
            f"{split}: {s.images[split]:,} images, {s.bytes[split] / 1e6:,.1f} MB in "
            f"{shards(s.written[split] + s.skipped[split])}: {done}, {s.skipped[split]:,} already complete"
            + (f" ({s.trusted[split]:,} trusted by size, mtime and ends)" if s.trusted[split] else "")
        )
    nothing = not any(s.written.values())
    print(
        f"manifest: {s.manifest}{'; nothing to do' if nothing else ''} ({s.seconds:.1f} s, {s.workers} workers)",
        flush=True,
    )
    return 0


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
    listed = ", ".join(f"{n} {kind} in {split}" for (split, kind), n in sorted(kinds.items()))
    print(f"oddities: {listed or 'none (one per 10 images of a split, up to 6)'}")
    for o in summary.oddities:
        print(f"  {o.kind:9s} {o.path.relative_to(summary.root)}")
    print(f"class index: {summary.class_index}\nmanifest:    {summary.manifest}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "prepare-val":
        return _prepare_val(args)
    if args.command == "check":
        return _check(args)
    if args.command == "pack":
        return _pack(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse only accepts the commands above


if __name__ == "__main__":
    sys.exit(main())
