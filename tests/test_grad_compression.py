"""dist.grad_compression: PyTorch's fp16/bf16 DDP compression hooks, on real gloo process groups.

    .venv/bin/python -m pytest -q tests/test_grad_compression.py

The hook's effect is checked exactly on a one-process group (the all-reduced gradient is the plain gradient
rounded to fp16/bf16), and end to end in one torchrun launch of 2 gloo processes that trains the same tiny
vgg11_bn for one epoch with none, fp16, bf16 and none again, saving each rank's final weights.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import run_cli
from tests.test_train import overrides
from train import distributed
from train.checkpoint import load_checkpoint_file
from train.config import Config, available_recipes, from_dict, load_config, save_yaml, to_dict
from train.engine import GRAD_COMPRESSION_DTYPES, Trainer, check_all_reduce_dtype, register_grad_compression
from train.run import RunError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)"),
]


# ------------------------------------------------------------------------------------------------ config


def test_default_is_fp32_all_reduce_in_every_recipe():
    assert Config().dist.grad_compression == "none"
    for name in available_recipes():
        assert load_config(name).dist.grad_compression == "none", name


@pytest.mark.parametrize("mode", ["none", "fp16", "bf16"])
def test_accepted_values_round_trip(mode, tmp_path):
    cfg = load_config("vgg16_bn", [f"dist.grad_compression={mode}"])
    assert cfg.dist.grad_compression == mode
    assert load_config(save_yaml(cfg, tmp_path / "config.yaml")) == cfg
    assert from_dict(to_dict(cfg)) == cfg


# ------------------------------------------------------------------------------- one-process groups


@pytest.fixture(params=["gloo", pytest.param("nccl", marks=GPU)])
def group(request, tmp_path):
    """A real one-process group of the given backend; yields the device its tensors live on."""
    backend = request.param
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)  # fmt: skip
    try:
        yield device
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_hook_all_reduces_gradients_rounded_to_the_dtype(group, mode, compiled):
    device, dtype = group, GRAD_COMPRESSION_DTYPES[mode]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5)).to(device)
    plain = copy.deepcopy(model)
    x = torch.randn(16, 48, device=device)
    plain(x).square().sum().backward()
    ddp = DistributedDataParallel(model)
    line = register_grad_compression(ddp, mode, device)
    assert line.startswith(f"dist.grad_compression={mode}: DDP all-reduces gradients as {dtype} over ")
    assert f"{mode}_compress_hook" in line and dist.get_backend() in line
    forward = torch.compile(ddp) if compiled else ddp  # as the engine does with train.compile=true
    forward(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, name
        # one process: ÷ 1 and a sum of one are exact, so the hook's only effect is the rounding. A compiled
        # backward (Inductor's kernels on CUDA) may differ from eager by a last bit before the rounding: 1 ulp.
        rounded = q.grad.to(dtype).float()
        if compiled and device.type == "cuda":
            torch.testing.assert_close(p.grad, rounded, rtol=torch.finfo(dtype).eps, atol=0, msg=name)
        else:
            assert torch.equal(p.grad, rounded), name
        assert not torch.equal(p.grad, q.grad), name  # and the rounding did happen


@pytest.mark.parametrize("group", ["gloo"], indirect=True)
def test_gloo_refuses_a_dtype_it_cannot_all_reduce_in_one_line(group):
    for dtype in GRAD_COMPRESSION_DTYPES.values():  # this torch build's gloo all-reduces both
        check_all_reduce_dtype(dtype, group, "dist.grad_compression=x")
    # float8 is one gloo rejects ("Invalid scalar type", as older builds did bfloat16): the same refusal path
    with pytest.raises(RunError) as info:
        check_all_reduce_dtype(torch.float8_e4m3fn, group, "dist.grad_compression=x")
    message = str(info.value)
    assert message.startswith("dist.grad_compression=x: the gloo backend of torch ") and "\n" not in message
    assert "cannot all-reduce torch.float8_e4m3fn tensors (Invalid scalar type)" in message


def test_one_process_logs_that_the_key_has_no_effect(small_tree, tmp_path):
    run_dir = tmp_path / "single"
    cfg = load_config("demo", overrides(small_tree, run_dir, "dist.grad_compression=bf16",
                                        "train.deterministic=false"))  # fmt: skip
    trainer = Trainer(cfg, distributed.setup())
    try:
        assert trainer.ddp is trainer.model  # no DDP: nothing to register a hook on
    finally:
        trainer.close()
    log = (run_dir / "train.log").read_text()
    assert log.count("dist.grad_compression=bf16 has no effect: one process, no DDP all-reduce") == 1


# ------------------------------------------------------------------------------ 2 processes, gloo

# Runs the engine's Trainer for each mode in one process group (torchrun starts 2 processes once, ~15 s on 2
# cores; each 1-epoch run then takes seconds) and saves every rank's final weights, which train() does not expose.
DRIVER = """
import sys
from pathlib import Path

import torch

from train import distributed
from train.checkpoint import unwrap
from train.config import load_config
from train.engine import Trainer

root, *common = sys.argv[1:]
info = distributed.setup("gloo")
try:
    for name, mode in (("none", "none"), ("fp16", "fp16"), ("bf16", "bf16"), ("none_again", "none")):
        run_dir = Path(root) / name
        cfg = load_config("demo", [*common, f"run_dir={run_dir}", f"dist.grad_compression={mode}"])
        trainer = Trainer(cfg, info)
        if info.is_main:
            torch.save(trainer.model.state_dict(), run_dir / "init.pt")
        assert trainer.run()["status"] == "done"
        torch.save(unwrap(trainer.model).state_dict(), run_dir / f"rank{info.rank}.pt")
finally:
    distributed.cleanup()
"""


def _param_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance over the trained parameters (BatchNorm running statistics left out: no gradient moves them)."""
    keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_runs_with_fp16_and_bf16_compression(small_tree, tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    common = overrides(small_tree, tmp_path / "unused", "sched.epochs=1")  # train.deterministic=true
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # 2 CPU processes on gloo, also on a 1-GPU machine
    out = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "driver.py"),
                  str(tmp_path), *common, timeout=600, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    final = {}
    for name in ("none", "fp16", "bf16", "none_again"):
        run_dir = tmp_path / name
        ranks = [torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        # DDP kept the replicas identical (BatchNorm statistics are synchronised before validation), and rank 0
        # saved exactly that model
        assert _equal(ranks[0], ranks[1]), name
        assert _equal(ranks[0], load_checkpoint_file(run_dir / "last.pth")["model"]), name
        final[name] = ranks[0]
        (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert record["epoch"] == 1, name
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"]), name
        log = (run_dir / "train.log").read_text()
        if name in GRAD_COMPRESSION_DTYPES:
            dtype = GRAD_COMPRESSION_DTYPES[name]
            line = (
                f"dist.grad_compression={name}: DDP all-reduces gradients as {dtype} over gloo (torch {name}_"
            )
            assert log.count(line) == 1, name
        else:
            assert "grad_compression" not in log, name
    # the fp32 run is reproducible bitwise, so what differs below is the compression's rounding alone
    assert _equal(final["none"], final["none_again"])
    moved = _param_distance(final["none"], torch.load(tmp_path / "none" / "init.pt", weights_only=True))
    d16, dbf16 = _param_distance(final["none"], final["fp16"]), _param_distance(final["none"], final["bf16"])
    # measured after 7 steps: training moved the parameters 0.030 (L2); fp16 compression moved the result 3.5e-5
    # (0.1 %), bf16 1.4e-4 (0.5 %): bf16's 8 mantissa bits round coarser than fp16's 11
    assert 0 < d16 < dbf16 < 0.05 * moved, (d16, dbf16, moved)
    print(f"parameters: |none - init| {moved:.3g}, |fp16 - none| {d16:.3g}, |bf16 - none| {dbf16:.3g}")
