"""Evaluator throughput: images/s of 1-crop evaluation (``evaluate.core.count_loader``, what ``python evaluate``
runs) per loader backend, against the compute ceiling, in one run.

    python benchmarks/eval_throughput.py                                  # vgg16_bn, the evaluator's defaults
    python benchmarks/eval_throughput.py --arch all --precision bf16 --channels-last --batch 256
    python benchmarks/eval_throughput.py --smoke --out /tmp/et.json --readme /tmp/et.md   # CPU, ~1 min (tests)

Sources, each counted by ``count_loader`` (inference mode, ``precision_context``, top-1/top-5 counts on the
device, one host sync at the end):

    synthetic    random batches already on the device: the compute ceiling
    dali         data_pipeline.build_loader(split="val"), data.backend=dali: DALI's GPU pipeline on a GPU
                 (``dali-gpu``); without CUDA its CPU pipeline (``dali-cpu``), labelled so
    torchvision  data.backend=torchvision: DataLoader workers decoding with PIL

on the val split of the benchmark JPEG tree (``benchmarks.common.GPU_TREE``, 3,000 val JPEGs of ~111 KB; made
in ``--data`` when absent; the same tree as train_throughput.py). The model is randomly initialised (speed does
not depend on the weights; nothing is downloaded). Defaults are the evaluator's: fp32 (TF32 off), NCHW, 64
images per process, ``data.workers`` loader workers. Per source: one untimed pass (pipeline build, worker start,
cudnn autotuning), then ``--reps`` timed passes over the whole split, wall-clock (``count_loader`` ends with a
host sync, so the clock covers the GPU's work); images/s is the best pass, the median is kept too. Every loader
pass must count each val image exactly once (checked).

Writes ``--out`` (JSON: machine, GPU, driver, versions, command, every figure) and appends a markdown table to
``--readme``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402  (after the sys.path line above)
    GPU_SMOKE,
    GPU_SMOKE_OVERRIDES,
    GPU_TREE,
    Parser,
    best_of,
    command_line,
    device_label,
    device_used_gib,
    fail,
    machine_info,
    now_utc,
    prepare_tree,
    publish,
    resolve_archs,
    shared_machine_note,
    slug,
    usable_cpus,
)

SOURCES = ("synthetic", "dali", "torchvision")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from evaluate.core import PRECISIONS

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch", default="vgg16_bn", help="an arch, a comma list, or 'all' (the 8 torchvision VGGs)"
    )
    p.add_argument("--batch", type=int, default=None, help="images per process (default 64, the evaluator's)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="as python evaluate --precision")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {', '.join(SOURCES)}")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="JPEG tree (default data/bench_gpu; --smoke: runs/bench_smoke/data_gpu; made if absent)",
    )
    p.add_argument("--workers", type=int, default=None, help="DALI threads = DataLoader workers (default 8)")
    p.add_argument(
        "--reps", type=int, default=None, help="timed passes over the val split (default 5; smoke 1)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON (default benchmarks/results/eval_throughput_*; --smoke: runs/bench_smoke/)",
    )
    p.add_argument("--readme", type=Path, default=None, help="markdown file the table is appended to")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, images and counts: the script in about a minute on 2 CPU cores",
    )
    return p.parse_args(argv)


def timed_passes(
    model: Any, batches: Any, args: argparse.Namespace, reps: int, expected: int, device: Any
) -> dict:
    """``count_loader`` over ``batches``: one untimed pass, then ``reps`` timed ones; each must count ``expected``
    images."""
    import torch

    from evaluate.core import count_loader

    cuda = device.type == "cuda"

    def run() -> Any:
        return count_loader(model, batches, device, args.precision, args.channels_last)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    counts = run()
    warm = time.perf_counter() - t0
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        counts = run()  # ends with .tolist() of the counts: a host sync, so the clock covers the GPU's work
        seconds = time.perf_counter() - t0
        if counts.n != expected:
            raise fail(
                f"counted {counts.n} images in a pass, expected {expected}: each val image exactly once"
            )
        rates.append(counts.n / seconds)
    return {
        **best_of(rates),
        "images_per_pass": expected,
        "warmup_pass_seconds": round(warm, 2),
        "clock": "time.perf_counter around count_loader (ends with a host sync)",
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "device_used_gib": device_used_gib() if cuda else None,  # DALI's pools included
    }


def markdown(result: dict) -> str:
    m, s, data = result["machine"], result["setting"], result["data"]
    lines = [
        f"### Evaluation throughput, {device_label(m)} ({result['date']}{', smoke run' if result['smoke'] else ''})",
        "",
        f"1-crop (`evaluate.core.count_loader`), {s['precision']}, "
        f"{'channels_last' if s['channels_last'] else 'NCHW'}, batch {s['batch']}, {s['workers']} DALI threads / "
        f"DataLoader workers of {m['usable_cpus']} CPUs ({m['cpu_model']}); {data['val_files']} val JPEGs of the "
        f"tree ({data['mean_kb']} KB, ~{data['mean_width']}×{data['mean_height']}); torch {m['torch']}, "
        f"torchvision {m['torchvision']}, DALI {m['nvidia_dali']}. `{result['command']}`",
        "",
        "| arch | synthetic | DALI | torchvision (PIL) | DALI backend | DALI / synthetic | DALI / PIL | peak mem GiB |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]

    def ratio(x: float | None) -> str:
        return "—" if x is None else f"{x:.2f}×"

    for row in result["results"]:
        src = row["sources"]

        def ips(name: str, src: dict = src) -> str:
            if name not in src:
                return "—"
            x = src[name]["images_per_s"]
            return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"

        r = row["ratios"]
        mems = [v["peak_memory_gib"] for v in src.values() if v.get("peak_memory_gib") is not None]
        dali = src.get("dali", {}).get("backend", "—")
        lines.append(
            f"| {row['arch']} | {ips('synthetic')} | {ips('dali')} | {ips('torchvision')} | {dali} | "
            f"{ratio(r.get('dali_over_synthetic'))} | {ratio(r.get('dali_over_pil'))} | "
            f"{f'{max(mems):.1f}' if mems else 'n/a (CPU)'} |"
        )
    lines += ["", f"images/s, best of {s['reps']} passes. " + " ".join(result["notes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archs = resolve_archs(args.arch)
    smoke = args.smoke
    batch = (4 if smoke else 64) if args.batch is None else args.batch
    reps = (1 if smoke else 5) if args.reps is None else args.reps
    workers = min(usable_cpus(), 1 if smoke else 8) if args.workers is None else args.workers
    asked = [s.strip() for s in args.sources.split(",") if s.strip()]
    bad = [s for s in asked if s not in SOURCES]
    if not asked or bad:
        raise fail(
            f"--sources {args.sources!r}: {', '.join(bad) or 'empty'} is not one of: {', '.join(SOURCES)}"
        )
    if batch < 1 or reps < 1 or workers < 1:
        raise fail("--batch, --reps and --workers must be positive")

    import torch

    from data_pipeline import DataError, build_loader
    from train.config import ConfigError, load_config
    from train.models import build_model_from_config

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    data = args.data or (REPO / ("runs/bench_smoke/data_gpu" if smoke else "data/bench_gpu"))
    info = machine_info()
    print(f"device: {device_label(info)}", flush=True)
    stats = prepare_tree(data, GPU_SMOKE if smoke else GPU_TREE, usable_cpus())
    made = stats["generation"]

    def config(arch: str, backend: str) -> Any:
        overrides = [
            f"data.root={data}",
            f"data.batch_size={batch}",
            f"data.workers={workers}",
            f"data.backend={backend}",
            f"data.dali_device={'gpu' if cuda else 'cpu'}",
            f"train.channels_last={str(args.channels_last).lower()}",  # the loader's layout, as python evaluate
            "launch.gpus=1",
            *(GPU_SMOKE_OVERRIDES if smoke else []),
        ]
        try:
            return load_config(arch, overrides)  # the arch's torchvision recipe: val resize 256, crop 224
        except ConfigError as e:
            raise fail(str(e)) from None

    results, notes = [], []
    val_files = None
    for arch in archs:
        cfg = config(arch, "dali")
        torch.manual_seed(0)
        model = build_model_from_config(cfg.model).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        sources: dict[str, dict] = {}
        for source in asked:
            loader = None
            if source == "synthetic":
                g = torch.Generator(device=device).manual_seed(0)
                crop = cfg.data.val_crop
                n = made["params"]["classes"] * made["params"]["val_per_class"]  # the val split's size
                images = torch.randn(batch, 3, crop, crop, device=device, generator=g)
                labels = torch.randint(0, cfg.model.num_classes, (batch,), device=device, generator=g)
                full, rest = divmod(n, batch)
                batches: Any = [(images, labels)] * full + ([(images[:rest], labels[:rest])] if rest else [])
                expected, backend = n, "synthetic (on device)"
            else:
                try:
                    loader = build_loader(config(arch, source), "val", 0, 1, device)
                except DataError as e:
                    raise fail(str(e)) from None
                batches, expected, backend = loader, loader.dataset_size, loader.backend
            try:
                r = timed_passes(model, batches, args, reps, expected, device)
            except DataError as e:
                raise fail(str(e)) from None
            finally:
                if loader is not None:
                    loader.close()
            r["backend"] = backend
            sources[source] = r
            val_files = expected
            print(f"{arch:10s} {source:12s} {r['images_per_s']:9.1f} img/s  ({backend})", flush=True)
        ratios: dict[str, float] = {}
        if "dali" in sources:
            d = sources["dali"]["images_per_s"]
            if "synthetic" in sources:
                ratios["dali_over_synthetic"] = round(d / sources["synthetic"]["images_per_s"], 3)
            if "torchvision" in sources:
                ratios["dali_over_pil"] = round(d / sources["torchvision"]["images_per_s"], 3)
        results.append({"arch": arch, "sources": sources, "ratios": ratios})
        del model
        if cuda:
            torch.cuda.empty_cache()
    if not cuda:
        notes.append(
            "CPU run: checks the script end to end on real JPEGs; its figures say nothing about GPU throughput "
            "(the GPU numbers are still to be taken on a lent GPU); DALI runs its CPU pipeline here."
        )
    if note := shared_machine_note(info):
        notes.append(note)
    result = {
        "benchmark": "eval_throughput",
        "date": now_utc(),
        "command": command_line("benchmarks/eval_throughput.py", argv),
        "smoke": smoke,
        "machine": info,
        "device": str(device),
        "setting": {
            "archs": archs,
            "batch": batch,
            "precision": args.precision,
            "channels_last": args.channels_last,
            "workers": workers,
            "reps": reps,
            "sources": asked,
        },
        "data": {**stats, "val_files": val_files},
        "results": results,
        "notes": notes,
    }
    name_parts = [
        "eval_throughput",
        slug(info["gpu"]["name"]) if info["gpu"] else "cpu",
        "all" if args.arch == "all" else "-".join(archs),
        args.precision,
        "cl" if args.channels_last else "nchw",
        f"b{batch}",
    ]
    return publish(result, name_parts, markdown(result), args, smoke)


if __name__ == "__main__":
    sys.exit(main())
