"""Training throughput on one GPU: images/s from three input sources in one run, data-loading headroom, peak
memory and MFU.

    python benchmarks/train_throughput.py                                 # vgg16_bn, bf16, channels_last, eager
    python benchmarks/train_throughput.py --arch all --precision bf16     # the 8 torchvision archs
    python benchmarks/train_throughput.py --precision tf32 --no-channels-last --compile --batch-per-gpu 64
    python benchmarks/train_throughput.py --sources synthetic --profile   # + a torch.profiler table per source
    python benchmarks/train_throughput.py --smoke --out /tmp/tt.json --readme /tmp/tt.md   # CPU, ~1 min (tests)

Sources, each driving the training loop's own step (``train.engine.train_step``: autocast forward, cross-entropy,
GradScaler for fp16, clipping when configured, the optimizer from ``train.optim.build_optimizer``, on
``train.models.build_model_from_config``; cudnn/TF32 flags from ``train.engine.set_backend_flags``;
``torch.compile`` of the model with ``--compile``) but not its on-device loss and top-k sums:

    synthetic    one random batch already on the device, reused: the compute ceiling (a)
    dali         data_pipeline.build_loader, data.backend=dali, data.dali_device=gpu (nvJPEG decode) (b)
    torchvision  data_pipeline.build_loader, data.backend=torchvision: DataLoader workers decoding with PIL, as
                 torchvision's references/classification does (c)
    dali-cpu     data.backend=dali, data.dali_device=cpu: DALI's CPU operators, batches copied to the GPU

on a JPEG tree of ImageNet-like files (``benchmarks.common.GPU_TREE``: 13,000 JPEGs of ~111 KB at ~449×416,
generated into ``--data`` on the machine itself when absent, with all its cores). Without CUDA, (b) is recorded
as skipped and DALI's CPU pipeline (``dali-cpu``) stands in for it, labelled so.

Timing: per source, ``--warmup`` steps (the first source also absorbs cudnn autotuning and compilation), then
``--steps`` timed steps inside one epoch of the loader (capped by the epoch's length: a DALI train loader is
rebuilt every epoch, a cost that a 1.28M-image epoch does not see), timed with CUDA events on the GPU
(``time.perf_counter`` on a CPU). Peak GPU memory is per source (``torch.cuda.max_memory_allocated``), with the device memory in use at its end
(``device_used_gib``: total − free, DALI's pools included).
MFU = achieved FLOP/s ÷ the bf16 GEMM rate measured in the same run (``--gemm-size``³ products, three rounds
before and three after the archs, the best round), achieved FLOP/s = images/s × 3 × forward FLOPs, forward FLOPs = 2 × the model's MACs
(``train.models.summarize`` at the training crop).

Writes ``--out`` (JSON: machine, GPU, driver, versions, command, every figure, ratios b/a and b/c, targets,
the scaling predictions of benchmarks/README.md from the measured throughput) and appends a markdown table to
``--readme``. Issue 7's targets: DALI ≥ 0.95 × synthetic, DALI ≥ 1.5 × the PIL DataLoader, vgg16_bn bf16
channels_last MFU ≥ 45% (of the synthetic source). The SGD learning rate is the arch's torchvision recipe's,
scaled to the batch (``optim.lr_scaling=linear``) so that the benchmark trains rather than diverges.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Iterator
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
    StepTimer,
    command_line,
    device_label,
    device_used_gib,
    fail,
    gemm_tflops,
    machine_info,
    now_utc,
    prepare_tree,
    publish,
    resolve_archs,
    scaling_report,
    shared_machine_note,
    slug,
    usable_cpus,
)

SOURCES = ("synthetic", "dali", "dali-cpu", "torchvision")
LABELS = {
    "synthetic": "synthetic (on device)",
    "dali-gpu": "DALI-GPU",
    "dali-cpu": "DALI-CPU",
    "torchvision": "PIL DataLoader",
}
PRECISIONS = ("fp32", "tf32", "bf16")
TARGETS = {
    "dali_over_synthetic": 0.95,
    "dali_over_pil_dataloader": 1.5,
    "mfu_vgg16_bn_bf16_channels_last": 0.45,
}


# --smoke: a model and images small enough for about a minute on a 2-core CPU (the code path is the same).
def parse_args(argv: list[str] | None) -> Any:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch", default="vgg16_bn", help="an arch, a comma list, or 'all' (the 8 torchvision VGGs)"
    )
    p.add_argument("--batch-per-gpu", type=int, default=None, help="default 128 (smoke: 4)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="bf16: autocast; tf32/fp32: fp32")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format"
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model"
    )
    p.add_argument(
        "--sources",
        default="synthetic,dali,torchvision",
        help=f"comma list of {', '.join(SOURCES)} (dali = DALI's GPU pipeline)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="JPEG tree (default data/bench_gpu; --smoke: runs/bench_smoke/data_gpu; made if absent)",
    )
    p.add_argument("--workers", type=int, default=None, help="DALI threads = DataLoader workers (default 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per source (default 10; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per source (default 50; smoke 2)")
    p.add_argument(
        "--gemm-size", type=int, default=None, help="n of the n³ bf16 GEMM (default 8192; CPU 512)"
    )
    p.add_argument(
        "--profile", action="store_true", help="torch.profiler table of a few more steps per source"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON (default benchmarks/results/train_throughput_*; --smoke: runs/bench_smoke/)",
    )
    p.add_argument("--readme", type=Path, default=None, help="markdown file the table is appended to")
    p.add_argument(
        "--max-batch",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also find the largest per-GPU batch whose training step fits in GPU memory (synthetic data), "
        "spending at most SECONDS per arch (GPU only; 0: not searched)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, images and counts: the script in about a minute on 2 CPU cores",
    )
    return p.parse_args(argv)


def resolve_sources(text: str, cuda: bool) -> list[str]:
    """Requested sources -> the subjects to run: "dali" becomes "dali-gpu", or without CUDA "dali-gpu"
    (recorded as skipped) plus a "dali-cpu" stand-in."""
    asked = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in asked if s not in SOURCES]
    if not asked or bad:
        raise fail(f"--sources {text!r}: {', '.join(bad) or 'empty'} is not one of: {', '.join(SOURCES)}")
    subjects: list[str] = []
    for s in asked:
        if s == "dali":
            subjects.append("dali-gpu")
            if not cuda and "dali-cpu" not in asked:
                subjects.append("dali-cpu")
        elif s not in subjects:
            subjects.append(s)
    return list(dict.fromkeys(subjects))


# ------------------------------------------------------------------------------------------------ the step


class Bench:
    """One arch under one setting: the model, its optimizer and the training step, plus per-source timing."""

    def __init__(self, cfg: Any, device: Any, compile_model: bool) -> None:
        import torch

        from train.engine import set_backend_flags, train_step
        from train.models import build_model_from_config, summarize
        from train.optim import build_optimizer

        self.cfg, self.device = cfg, device
        set_backend_flags(cfg)  # as train.engine.Trainer
        torch.manual_seed(cfg.seed)
        model = build_model_from_config(cfg.model).to(device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.summary = summarize(model, input_size=cfg.data.train_crop)
        self.conv_mac_share = sum(r.macs for r in self.summary.layers if r.type == "Conv2d") / max(
            1, self.summary.total_macs
        )
        self.model = model
        self.optimizer = build_optimizer(cfg, model)
        forward = torch.compile(model) if compile_model else model
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self.last_loss = torch.zeros((), device=device)

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            _, loss = train_step(
                cfg, forward, model, self.optimizer, scaler, images, labels
            )  # the engine's step
            self.last_loss = loss.detach()  # no .item(): a host sync per step would distort the timing

        self.step: Callable[[Any, Any], None] = step

    def synthetic(self, batch: int) -> Iterator[tuple[Any, Any]]:
        """The same random batch forever, already on the device in the model's memory format."""
        import torch

        g = torch.Generator(device=self.device).manual_seed(0)
        crop = self.cfg.data.train_crop
        images = torch.randn(batch, 3, crop, crop, device=self.device, generator=g)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, self.cfg.model.num_classes, (batch,), device=self.device, generator=g)
        while True:
            yield images, labels

    def run(self, batches: Iterator[tuple[Any, Any]], warmup: int, steps: int, profile_steps: int) -> dict:
        """``warmup`` untimed steps, ``steps`` timed ones (and ``profile_steps`` profiled ones) from ``batches``."""
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(warmup):
            self.step(*next(batches))
        timer = StepTimer(self.device)
        timer.start()
        warmup_s = time.perf_counter() - t0
        waited = 0.0
        for _ in range(steps):
            t = time.perf_counter()
            images, labels = next(batches)
            waited += time.perf_counter() - t
            self.step(images, labels)
        seconds = timer.stop()
        batch = len(labels)
        result: dict[str, Any] = {
            "images_per_s": round(steps * batch / seconds, 2),
            "seconds": round(seconds, 4),
            "warmup_steps": warmup,
            "warmup_seconds": round(warmup_s, 2),
            "timed_steps": steps,
            "batch": batch,
            "clock": timer.clock,
            # Host time blocked in next(): on a GPU the host runs ahead, so this counts only the data wait the
            # GPU's queue could not hide plus the loader's own hand-off cost.
            "loader_wait_fraction": round(waited / seconds, 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            # the whole device as the driver sees it, DALI's own pools (nvJPEG, its outputs) included
            "device_used_gib": device_used_gib() if cuda else None,
            "loss_finite": bool(torch.isfinite(self.last_loss).item()),
        }
        if profile_steps:
            result["profile"] = self.profile(batches, profile_steps)
        return result

    def profile(self, batches: Iterator[tuple[Any, Any]], steps: int) -> str:
        """torch.profiler over ``steps`` more steps: the top operators by self time, as a text table."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                self.step(*next(batches))
            if cuda:
                import torch

                torch.cuda.synchronize()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=15)


def find_max_batch(bench: Bench, start: int, limit_s: float, step: int = 8) -> dict:
    """The largest per-GPU batch (a multiple of ``step``) whose training step fits in GPU memory: one synthetic
    step per size, doubling from ``start`` to the first out-of-memory, then bisecting, until ``limit_s`` seconds
    are spent. cuDNN autotuning is off during the search (each new size would otherwise autotune for seconds;
    its workspaces can move the limit a little). ``fits`` is the largest size that ran (0: none), ``fails`` the
    smallest that did not (None: none failed, the search stopped at the time limit first)."""
    import torch

    def runs(batch: int) -> tuple[bool, float]:
        torch.cuda.reset_peak_memory_stats()
        try:
            bench.step(*next(bench.synthetic(batch)))
            torch.cuda.synchronize()
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False  # the exception's frames (and their tensors) are gone once we leave the except block
        peak = torch.cuda.max_memory_allocated() / 2**30
        bench.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return ok, peak

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    t0 = time.perf_counter()
    fits, fails, tries = 0, None, []
    batch = max(step, start // step * step)
    try:
        while time.perf_counter() - t0 < limit_s:
            ok, peak = runs(batch)
            tries.append({"batch": batch, "fits": ok, "peak_memory_gib": round(peak, 2)})
            print(
                f"  max batch: {batch} {'fits' if ok else 'out of memory'} (peak {peak:.1f} GiB)", flush=True
            )
            if ok:
                fits = batch
            else:
                fails = batch
            if fails is None:
                batch *= 2
            else:
                batch = (fits + fails) // 2 // step * step
                if batch <= fits:
                    break
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return {
        "fits": fits,
        "fails": fails,
        "exact": fails is not None and fails - fits <= step,
        "step": step,
        "seconds": round(time.perf_counter() - t0, 1),
        "tries": tries,
        "method": "one synthetic training step per size (the engine's train_step), cudnn.benchmark off",
    }


def loader_batches(loader: Any, limit: int) -> Iterator[tuple[Any, Any]]:
    """At most ``limit`` batches of epoch 0 of a ``data_pipeline`` loader."""
    loader.set_epoch(0)
    for i, batch in enumerate(loader):
        if i >= limit:
            return
        yield batch


# ---------------------------------------------------------------------------------------------------- main


def markdown(result: dict) -> str:
    m, s = result["machine"], result["setting"]
    dali_key = result["dali_subject"]
    dali_label = LABELS.get(dali_key, "DALI")
    if dali_key == "dali-cpu" and "dali-gpu" in s["sources"]:
        dali_label += " (stand-in: no CUDA)"
    gemm = result["gemm_bf16"]
    data = result["data"]
    tree = (
        f"{data['files']} JPEGs of {data['mean_kb']} KB, ~{data['mean_width']}×{data['mean_height']}"
        if data["files"]
        else "no JPEG tree (synthetic only)"
    )
    lines = [
        f"### Training throughput, {device_label(m)} ({result['date']}{', smoke run' if result['smoke'] else ''})",
        "",
        f"{s['precision']}, {'channels_last' if s['channels_last'] else 'NCHW'}, "
        f"{'torch.compile' if s['compile'] else 'eager'}, batch {s['batch_per_gpu']} per GPU, {s['workers']} "
        f"DALI threads / DataLoader workers of {m['usable_cpus']} CPUs ({m['cpu_model']}); {tree}; "
        f"torch {m['torch']}, torchvision {m['torchvision']}, DALI {m['nvidia_dali']}. bf16 GEMM "
        f"({gemm['n']}³): {gemm['tflops']:.4g} TFLOP/s. `{result['command']}`",
        "",
        f"| arch | synthetic (a) | {dali_label} (b) | PIL DataLoader (c) | b / a | b / c | peak mem GiB "
        "| MFU (a) | MFU (b) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def ips(r: dict | None) -> str:
        if r is None:
            return "—"
        if "skipped" in r:
            return "skipped"
        return f"{r['images_per_s']:,.0f}" if r["images_per_s"] >= 100 else f"{r['images_per_s']:.1f}"

    def pct(r: dict | None) -> str:
        return f"{100 * r['mfu']:.1f}%" if r and "mfu" in r else "—"

    for row in result["results"]:
        src = row["sources"]
        a, b, c = src.get("synthetic"), src.get(dali_key), src.get("torchvision")
        ratios = row["ratios"]
        ba = f"{ratios['dali_over_synthetic']:.2f}×" if "dali_over_synthetic" in ratios else "—"
        bc = f"{ratios['dali_over_pil_dataloader']:.2f}×" if "dali_over_pil_dataloader" in ratios else "—"
        mems = [r["peak_memory_gib"] for r in src.values() if r.get("peak_memory_gib") is not None]
        mem = f"{max(mems):.1f}" if mems else "n/a (CPU)"
        lines.append(
            f"| {row['arch']} | {ips(a)} | {ips(b)} | {ips(c)} | {ba} | {bc} | {mem} | {pct(a)} | {pct(b)} |"
        )
    lines += ["", "images/s over the timed steps. " + " ".join(result["notes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archs = resolve_archs(args.arch)
    smoke = args.smoke

    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    batch = given(args.batch_per_gpu, 4 if smoke else 128)
    warmup = given(args.warmup, 1 if smoke else 10)
    steps = given(args.steps, 2 if smoke else 50)
    workers = given(args.workers, min(usable_cpus(), 1 if smoke else 8))
    profile_steps = (1 if smoke else 5) if args.profile else 0
    if (
        batch < 1
        or steps < 1
        or warmup < 0
        or workers < 1
        or (args.gemm_size is not None and args.gemm_size < 1)
    ):
        raise fail("--batch-per-gpu, --steps, --workers and --gemm-size must be positive, --warmup >= 0")

    import torch

    from data_pipeline import DataError, build_loader
    from data_pipeline.layout import index_split
    from data_pipeline.loader import train_steps
    from train.config import ConfigError, load_config

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    subjects = resolve_sources(args.sources, cuda)
    gemm_n = args.gemm_size or (8192 if cuda else 512)  # 8192³: 1.1 TFLOP per product
    data = args.data or (REPO / ("runs/bench_smoke/data_gpu" if smoke else "data/bench_gpu"))
    needs_data = any(s != "synthetic" for s in subjects)
    stats: dict[str, Any] = {}
    if needs_data:
        stats = prepare_tree(data, GPU_SMOKE if smoke else GPU_TREE, usable_cpus())
        per_epoch = train_steps(len(index_split(data, "train")), 1, batch)
        if per_epoch - warmup - profile_steps < 1:  # the timed steps fit in one epoch (see the docstring)
            raise fail(
                f"one epoch of {data} has {per_epoch} batches of {batch}: not enough for {warmup} warm-up "
                f"{'+ profiled ' if profile_steps else ''}+ timed steps; lower --warmup or --batch-per-gpu, or "
                "use a bigger tree"
            )

    info = machine_info()
    print(f"device: {device_label(info)}", flush=True)

    def config(arch: str, backend: str, dali_device: str) -> Any:
        overrides = [
            f"data.root={data}",
            f"data.batch_size={batch}",
            f"data.workers={workers}",
            f"data.backend={backend}",
            f"data.dali_device={dali_device}",
            "launch.gpus=1",
            "optim.lr_scaling=linear",  # the recipe's lr is per 256 images: scale it to this batch
            f"train.precision={args.precision}",
            f"train.channels_last={str(args.channels_last).lower()}",
            f"train.compile={str(args.compile).lower()}",
            *(GPU_SMOKE_OVERRIDES if smoke else []),
        ]
        try:
            return load_config(arch, overrides)  # the arch's torchvision recipe (optimizer, crops)
        except ConfigError as e:
            raise fail(str(e)) from None

    gemm_before = gemm_tflops(device, gemm_n, reps=10 if cuda else 2)
    print(f"bf16 GEMM {gemm_n}^3: {gemm_before['tflops']:.4g} TFLOP/s", flush=True)
    rows = []
    max_batches: dict[str, dict] = {}
    for arch in archs:
        cfg = config(arch, "dali", "gpu" if cuda else "cpu")
        bench = Bench(cfg, device, args.compile)
        flops_per_image = 3 * 2 * bench.summary.total_macs  # training ≈ 3 × forward; forward = 2 × MACs
        print(
            f"{arch}: {bench.summary.total_params:,} params, {bench.summary.gmacs:.2f} GMACs/image at "
            f"{cfg.data.train_crop}px",
            flush=True,
        )
        sources: dict[str, dict] = {}
        batches: Any = None
        for subject in subjects:
            if subject == "dali-gpu" and not cuda:
                sources[subject] = {"skipped": "no CUDA: DALI's GPU pipeline needs a CUDA device"}
                print(f"  {subject:12s} skipped (no CUDA)", flush=True)
                continue
            loader = None
            if subject == "synthetic":
                batches, timed = bench.synthetic(batch), steps
                backend = "synthetic"
            else:
                backend_name, dali_device = {
                    "dali-gpu": ("dali", "gpu"),
                    "dali-cpu": ("dali", "cpu"),
                    "torchvision": ("torchvision", "cpu"),
                }[subject]
                try:
                    loader = build_loader(config(arch, backend_name, dali_device), "train", 0, 1, device)
                except DataError as e:
                    raise fail(str(e)) from None
                timed = min(steps, len(loader) - warmup - profile_steps)  # inside one epoch (checked above)
                batches = loader_batches(loader, warmup + timed + profile_steps)
                backend = loader.backend
            try:
                r = bench.run(batches, warmup, timed, profile_steps)
            except DataError as e:
                raise fail(str(e)) from None
            finally:
                if loader is not None:
                    batches.close()  # type: ignore[union-attr]
                    loader.close()
            r["backend"] = backend
            r["achieved_tflops"] = round(r["images_per_s"] * flops_per_image / 1e12, 4)
            sources[subject] = r
            print(
                f"  {subject:12s} {r['images_per_s']:9.1f} img/s  ({timed} steps, "
                f"{r['seconds']:.3f} s, wait {r['loader_wait_fraction']:.0%})",
                flush=True,
            )
        summary = bench.summary, bench.conv_mac_share
        if args.max_batch > 0:
            if cuda:
                max_batches[arch] = find_max_batch(bench, batch, args.max_batch)
            else:
                max_batches[arch] = {"skipped": "no CUDA: the search is for GPU memory"}
                print("  max batch    skipped (no CUDA)", flush=True)
        rows.append((arch, summary, flops_per_image, sources, cfg))
        del bench, batches  # the next arch's peak memory must not include this model and its optimizer state
        gc.collect()  # Bench.step's closure refers back to the Bench: a cycle
        if cuda:
            torch.cuda.empty_cache()
    gemm_after = gemm_tflops(device, gemm_n, reps=10 if cuda else 2)
    peak = max(gemm_before["tflops"], gemm_after["tflops"])

    # (b): DALI's GPU pipeline; without CUDA (or when only dali-cpu was asked for) its CPU stand-in
    dali_subject = "dali-gpu" if cuda and "dali-gpu" in subjects else "dali-cpu"
    results = []
    notes: list[str] = []
    for arch, (summary, conv_mac_share), flops_per_image, sources, cfg in rows:
        for r in sources.values():
            if "achieved_tflops" in r:
                r["mfu"] = round(r["achieved_tflops"] / peak, 4)
        ratios: dict[str, Any] = {"dali_subject": dali_subject}
        a, b, c = sources.get("synthetic"), sources.get(dali_subject), sources.get("torchvision")
        if b and "images_per_s" in b:
            if a:
                ratios["dali_over_synthetic"] = round(b["images_per_s"] / a["images_per_s"], 3)
            if c:
                ratios["dali_over_pil_dataloader"] = round(b["images_per_s"] / c["images_per_s"], 3)
        row: dict[str, Any] = {
            "arch": arch,
            "params": summary.total_params,
            "macs_per_image": summary.total_macs,
            "train_flops_per_image": flops_per_image,
            "conv_mac_share": round(conv_mac_share, 4),
            "input_size": cfg.data.train_crop,
            "sources": sources,
            "ratios": ratios,
        }
        if arch in max_batches:
            row["max_batch_per_gpu"] = max_batches[arch]
        targets: dict[str, Any] = {}
        if cuda and not smoke:
            if "dali_over_synthetic" in ratios:
                ok = ratios["dali_over_synthetic"] >= TARGETS["dali_over_synthetic"]
                targets["dali_over_synthetic"] = "met" if ok else "missed"
            if "dali_over_pil_dataloader" in ratios:
                ok = ratios["dali_over_pil_dataloader"] >= TARGETS["dali_over_pil_dataloader"]
                targets["dali_over_pil_dataloader"] = "met" if ok else "missed"
            if arch == "vgg16_bn" and args.precision == "bf16" and args.channels_last and a:
                ok = a["mfu"] >= TARGETS["mfu_vgg16_bn_bf16_channels_last"]
                targets["mfu_vgg16_bn_bf16_channels_last"] = "met" if ok else "missed"
            measured = b if b and "images_per_s" in b else a
            if measured:
                row["scaling"] = scaling_report(
                    summary.total_params, conv_mac_share, measured["images_per_s"], batch
                )
                row["scaling"]["throughput_source"] = measured["backend"]
            missed = [k for k, v in targets.items() if v == "missed"]
            if missed:
                where = "the profile tables are in the JSON" if profile_steps else "rerun with --profile"
                notes.append(f"{arch}: missed {', '.join(missed)}; for what bounds it, {where}.")
        row["targets"] = targets or "not evaluated: " + ("smoke run" if smoke else "no GPU")
        results.append(row)
        not_finite = [k for k, r in sources.items() if r.get("loss_finite") is False]
        if not_finite:
            notes.append(f"{arch}: the loss was not finite at the end of {', '.join(not_finite)}.")
    if not cuda:
        notes.insert(
            0,
            "CPU run: checks the script end to end; its figures say nothing about GPU throughput "
            "(the GPU numbers are still to be taken on a lent GPU). DALI-CPU stands in for DALI-GPU; MFU is "
            "against this CPU's bf16 GEMM rate.",
        )
    if note := shared_machine_note(info):
        notes.append(note)
    result = {
        "benchmark": "train_throughput",
        "date": now_utc(),
        "command": command_line("benchmarks/train_throughput.py", argv),
        "smoke": smoke,
        "machine": info,
        "device": str(device),
        "setting": {
            "archs": archs,
            "batch_per_gpu": batch,
            "precision": args.precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "workers": workers,
            "warmup_steps": warmup,
            "steps": steps,
            "profile_steps": profile_steps,
            "sources": subjects,
        },
        "data": stats or {"files": 0, "mean_kb": 0, "mean_width": 0, "mean_height": 0},
        # MFU's denominator: the better of the two measurements (before and after the archs)
        "gemm_bf16": {"n": gemm_n, "tflops": peak, "before": gemm_before, "after": gemm_after},
        "dali_subject": dali_subject,
        "results": results,
        "targets": TARGETS,
        "notes": notes,
    }
    name_parts = [
        "train_throughput",
        slug(info["gpu"]["name"]) if info["gpu"] else "cpu",
        "all" if args.arch == "all" else "-".join(archs),
        args.precision,
        "cl" if args.channels_last else "nchw",
        "compile" if args.compile else "eager",
        f"b{batch}",
    ]
    return publish(result, name_parts, markdown(result), args, smoke)


if __name__ == "__main__":
    sys.exit(main())
