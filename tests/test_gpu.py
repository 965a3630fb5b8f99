"""The CUDA paths end to end: training on the GPU (DALI's nvJPEG pipeline, bf16/fp16 autocast, channels_last,
torch.compile, torchrun) and the evaluator on the GPU. (One GPU cannot host an NCCL group of two ranks: NCCL
refuses two ranks on one device, so the multi-GPU path is left to a real node.) Skipped without CUDA; run on the lent GPU:

    python -m pytest -q -m gpu tests/

Each test trains a narrow vgg11_bn for a couple of epochs on a small real JPEG tree (seconds on an H100).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torchvision

from data_pipeline import build_loader
from evaluate.evaluator import EvalOptions, run_evaluation
from tests.conftest import run_cli
from train import distributed
from train.config import load_config
from train.engine import Trainer, train_step
from train.models import build_model_from_config
from train.optim import build_optimizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

CLASSES = 4


def overrides(tree: Path, run_dir: Path, *extra: str) -> list[str]:
    """vgg11_bn with a 64-wide classifier on 48-pixel crops: the conv trunk and every GPU path, in seconds."""
    return [
        f"data.root={tree}",
        f"run_dir={run_dir}",
        "data.batch_size=8",
        "data.workers=2",
        "data.train_crop=48",
        "data.val_resize=55",
        "data.val_crop=48",
        f"model.num_classes={CLASSES}",
        "model.classifier_width=64",
        "sched.epochs=2",
        "sched.name=step",
        "sched.step_size=1",
        "sched.warmup_epochs=0",
        "optim.lr=0.01",
        "train.print_every=2",
        "log.wandb_mode=disabled",
        "launch.gpus=1",
        *extra,
    ]


def epoch_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_trained(run_dir: Path, epochs: int) -> dict:
    """Every epoch logged with finite numbers and every val image counted once; last.pth loads weights-only
    and strictly into torchvision's vgg11_bn once the classifier width matches. Returns the checkpoint."""
    records = epoch_records(run_dir)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for r in records:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]), r
        assert r["val_images"] == CLASSES * 5
        assert 0.0 <= r["val_top5_err"] <= r["val_top1_err"] <= 100.0
    # saved from the device it trained on (no map_location): the weights were on the GPU
    on_disk = torch.load(run_dir / "last.pth", weights_only=True)
    assert {t.device.type for t in on_disk["model"].values()} == {"cuda"}
    state = torch.load(
        run_dir / "last.pth", weights_only=True, map_location="cpu"
    )  # as a CPU machine reads it
    tv = torchvision.models.vgg11_bn(num_classes=CLASSES)
    tv.classifier[0] = torch.nn.Linear(512 * 7 * 7, 64)
    tv.classifier[3] = torch.nn.Linear(64, 64)
    tv.classifier[6] = torch.nn.Linear(64, CLASSES)
    tv.load_state_dict(state["model"], strict=True)
    return state


def test_dali_gpu_bf16_channels_last_training(small_tree, tmp_path):
    run_dir = tmp_path / "dali_bf16"
    cfg = load_config(
        "demo",
        overrides(small_tree, run_dir, "data.backend=dali", "data.dali_device=gpu", "train.precision=bf16",
                  "train.channels_last=true"),
    )  # fmt: skip
    trainer = Trainer(cfg, distributed.setup())
    assert trainer.device.type == "cuda"
    assert trainer.train_loader.backend == "dali-gpu" and trainer.val_loader.backend == "dali-gpu"
    images, labels = next(iter(trainer.train_loader))
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert trainer.run()["status"] == "done"
    assert_trained(run_dir, 2)
    log = (run_dir / "train.log").read_text()
    assert "(cuda, single)" in log and "(dali-gpu: " in log


def test_dali_gpu_train_order_equals_dali_cpu(small_tree, tmp_path):
    """nvJPEG and the CPU decoders differ in pixels, never in which images a batch holds."""
    cfg_gpu = load_config(
        "demo", overrides(small_tree, tmp_path, "data.backend=dali", "data.dali_device=gpu")
    )
    cfg_cpu = load_config(
        "demo", overrides(small_tree, tmp_path, "data.backend=dali", "data.dali_device=cpu")
    )
    gpu = build_loader(cfg_gpu, "train", device="cuda")
    cpu = build_loader(cfg_cpu, "train", device="cpu")
    for epoch in (0, 1):
        gpu.set_epoch(epoch)
        cpu.set_epoch(epoch)
        got = [(x.shape, y.cpu()) for x, y in gpu]
        want = [(x.shape, y) for x, y in cpu]
        assert len(got) == len(want) == len(gpu)
        for (gs, gl), (cs, cl) in zip(got, want, strict=True):
            assert gs == cs and torch.equal(gl, cl)


def test_fp16_gradscaler_and_compile_training(small_tree, tmp_path):
    run_dir = tmp_path / "fp16_compile"
    cfg = load_config(
        "demo",
        overrides(
            small_tree, run_dir, "data.backend=torchvision", "train.precision=fp16", "train.compile=true"
        ),
    )
    trainer = Trainer(cfg, distributed.setup())
    assert trainer.device.type == "cuda" and trainer.scaler.is_enabled()
    assert {p.device.type for p in trainer.model.parameters()} == {"cuda"}
    result = trainer.run()
    assert result["status"] == "done"
    state = assert_trained(run_dir, 2)
    # the scaler ran every step and its state is saved. GradScaler's rule from its default scale 2**16 (x2 after
    # growth_interval = 2000 clean steps: not within 14; /2 and the tracker back to 0 on an overflow; +1 on a clean
    # step): with no overflow the tracker counts all 14 steps, with k overflows at most 14 - k since the last.
    scaler = state["scaler"]
    steps = 2 * (CLASSES * 14 // 8)  # 2 epochs of 7 full batches (small_tree: 56 train images, batch 8)
    assert scaler["growth_interval"] == 2000, scaler
    overflows = math.log2(2.0**16 / scaler["scale"])
    assert overflows == int(overflows) and 0 <= overflows < steps, scaler
    tracker = scaler["_growth_tracker"]
    assert tracker == steps if overflows == 0 else tracker <= steps - overflows, scaler


def test_fp16_train_step_on_the_gpu_scales_and_learns(small_tree, tmp_path):
    """train.engine.train_step on one real batch, 12 times: fp16 logits on the device, GradScaler stepping by its
    rule (x2 every 4 clean steps here), and the loss falling (fp32 on a CPU, same batch and recipe: 1.383-1.388
    at step 1, 0.99-1.30 at step 12 over seeds 0-2)."""
    cfg = load_config(
        "demo", overrides(small_tree, tmp_path, "data.backend=torchvision", "train.precision=fp16")
    )
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model).to(device)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=4)
    loader = build_loader(cfg, "train", device=device)
    images, labels = next(iter(loader))
    loader.close()
    losses, scales = [], []
    for _ in range(12):
        logits, loss = train_step(cfg, model, model, optimizer, scaler, images, labels)
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    # no overflow at 2**10 on a narrow net's first steps: x2 after every 4th clean step, exactly
    assert scales == [2.0 ** (10 + (i + 1) // 4) for i in range(12)], (scales, losses)
    assert logits.device == device and logits.dtype == torch.float16 and loss.dtype == torch.float32
    assert losses[-1] < losses[0] - 0.02, losses


def test_torchrun_cuda_training_then_evaluator_agrees(small_tree, tmp_path):
    run_dir = tmp_path / "torchrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = run_cli(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train", "--config", "demo",
        *overrides(small_tree, run_dir, "data.backend=torchvision", "train.deterministic=true"),
        timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 process(es) (cuda, torchrun)" in out.stdout + out.stderr
    assert_trained(run_dir, 2)
    best = min(epoch_records(run_dir), key=lambda r: r["val_top1_err"])
    result = run_evaluation(
        EvalOptions(checkpoint=str(run_dir / "best.pth"), data=str(small_tree), workers=2)
    )
    # same weights, same images, same device: the count may differ only by a cuDNN tie (one image of 20)
    assert abs(result.counts.top1_err - best["val_top1_err"]) <= 100.0 / (CLASSES * 5) + 1e-9
    assert result.counts.n == CLASSES * 5
