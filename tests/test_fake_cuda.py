"""Device placement on a fake CUDA device, on a machine without a GPU (CI): PyTorch's ``FakeTensorMode``
(``torch._subclasses.fake_tensor``) runs modules on tensors that carry a device, shape and dtype but no data, and
raises ``FakeTensorDeviceMismatchError`` ("Expected all tensors to be on the same device") where an operation mixes
the GPU with the CPU, as CUDA would.

What runs here on ``cuda:0``: ``python evaluate`` (its ``main``, in this process) for every protocol — 1-crop,
dense, multi-crop, dense+multi-crop, one and several test scales, bf16 autocast and channels_last — from the
checkpoint's load through the real loaders (real JPEGs decoded on the host, moved to the device by the project's
own code) and every image's forward pass and top-k count, up to the first host read of a device value (the
counts' ``.tolist()`` in ``evaluate.core.reduce_counts``: a fake tensor has no value, so the run stops there
with ``DataDependentOutputException``); every recipe's model moved to the device (its parameters and buffers); and
the training step's forward and loss as ``train.engine.train_step`` runs them, in bf16 with channels_last.

What a fake device cannot show: numbers (tests/test_gpu.py on a real GPU) and the backward pass (autograd's
engine asks the CUDA driver for a context). What the harness tells torch: that bf16 autocast is available on
CUDA (``torch.autocast("cuda")`` would otherwise turn itself off; with it, convs and matmuls run in bf16 on the
fake tensors as on a GPU); that ``train.distributed.setup``'s device is ``cuda:0`` (on this machine it picks the
CPU; its choice for 0, 1 and 8 visible GPUs is tested in tests/test_optim_dist.py). Host-side pieces run on real tensors, as they do on a GPU machine:
torch's DataLoader iteration (batches are made on the host: a fake tensor has no pixels), the checkpoint's
``torch.load``, and the torchvision loader's colour-shift generator (train batches only) is made on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter

import evaluate.evaluator as evaluator
from evaluate.__main__ import main as evaluate_main
from evaluate.protocols import DenseVGG
from train import distributed
from train.config import load_config, to_dict
from train.engine import autocast
from train.models import build_model, build_model_from_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # autocast off without CUDA; no pinned memory

CUDA = torch.device("cuda", 0)
REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(
    str(p.relative_to(REPO / "configs").with_suffix(""))
    for p in (REPO / "configs").rglob("*.yaml")
    if "_base" not in p.parts
)
TINY = [8, "M", 16, "M", 16, "M", 32, "M", 512, "M"]  # a custom trunk: 64 px -> 2x2x512, ~6 M MACs


def _on_host(fn):
    def wrapped(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return wrapped


class _FakeMode(FakeTensorMode):
    """FakeTensorMode, with real tensors moved by ``.to`` made fake first: under ``torch.inference_mode`` (the
    evaluator's) ``aten.to`` reaches the mode as itself, not as ``_to_copy``, and FakeTensorMode (torch 2.14)
    then runs it for real on a real input, which asks the CUDA driver."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.to:
            args = tuple(self.from_tensor(a) if type(a) is torch.Tensor else a for a in args)
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTensorMode]:
    """FakeTensorMode with ``cuda:0`` as the process's device; real tensors that meet it (a decoded batch) become
    fake when the code moves them to the device."""
    monkeypatch.setattr(DataLoader, "__iter__", _on_host(DataLoader.__iter__))
    monkeypatch.setattr(_BaseDataLoaderIter, "__next__", _on_host(_BaseDataLoaderIter.__next__))
    monkeypatch.setattr(evaluator, "load_model", _on_host(evaluator.load_model))
    real_setup = distributed.setup
    monkeypatch.setattr(
        distributed, "setup", lambda *a, **k: dataclasses.replace(real_setup(*a, **k), device=CUDA)
    )
    # The torchvision loader's PCA colour-shift generator (train batches only) is made on the device; a CUDA
    # generator needs the driver, which a fake device has not.
    generator = torch.Generator
    monkeypatch.setattr(
        torch,
        "Generator",
        lambda device="cpu": generator("cpu" if torch.device(device).type == "cuda" else device),
    )
    # torch.autocast("cuda") turns itself off where CUDA is unavailable; told it is there, it casts the fake
    # tensors as it would on a GPU (bf16 convs and matmuls, fp32 where the code asks)
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with _FakeMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _on(device: torch.device, *tensors: torch.Tensor) -> bool:
    return all(isinstance(t, FakeTensor) and t.device == device for t in tensors)


@pytest.fixture(scope="module")
def checkpoint(small_tree, tmp_path_factory) -> Path:
    """A tiny custom VGG trained on nothing, saved in our checkpoint format with its config (64 px crops)."""
    cfg = load_config(
        "demo",
        [
            "model.arch=custom",
            f"model.layers={json.dumps(TINY)}",
            "model.num_classes=4",
            "model.classifier_width=16",
            f"data.root={small_tree}",
            "data.workers=0",
            "data.backend=torchvision",
            "data.train_crop=64",
            "data.val_resize=73",
            "data.val_crop=64",
        ],
    )
    path = tmp_path_factory.mktemp("fake_cuda") / "best.pth"
    torch.save({"model": build_model_from_config(cfg.model).state_dict(), "config": to_dict(cfg)}, path)
    return path


@pytest.mark.parametrize("crop", [224, 64])
def test_dense_vgg_is_built_on_the_weights_device(crop, monkeypatch):
    """Issue 26 item 1: DenseVGG made its pooling basis (and its fc convs) on the CPU while the weights were on
    the GPU: the einsum raised "Expected all tensors to be on the same device"."""
    model = build_model("vgg11_bn", num_classes=4, classifier_width=16)
    with fake_cuda(monkeypatch):
        model = model.to(CUDA)
        dense = DenseVGG(model, train_crop=crop)
        assert _on(CUDA, *dense.parameters(), *dense.buffers())
        scores = dense(torch.zeros(2, 3, crop + 32, crop + 64, device=CUDA))
        assert _on(CUDA, scores) and scores.shape == (2, 4, 2, 3)


PROTOCOL_ARGS = {
    "1-crop": [],
    "dense": [],
    "multi-crop": ["--scales", "72"],
    "dense, multi-scale": ["--multi-scale"],
    "dense+multi-crop": ["--scales", "64,80"],
}


@pytest.mark.parametrize("case", list(PROTOCOL_ARGS))
def test_python_evaluate_runs_every_image_on_fake_cuda(case, checkpoint, monkeypatch, capsys):
    """``python evaluate --checkpoint C --protocol P --precision bf16 --channels-last`` on cuda:0: every image
    decoded, moved, scored and counted on the device; the run stops only at the counts' first host read."""
    protocol = case.split(",")[0]
    argv = ["--checkpoint", str(checkpoint), "--protocol", protocol, "--workers", "0"]
    argv += ["--precision", "bf16", "--channels-last", *PROTOCOL_ARGS[case]]
    with fake_cuda(monkeypatch), pytest.raises(DataDependentOutputException) as stop:
        evaluate_main(argv)
    where = [(Path(str(f.path)).name, f.name) for f in stop.traceback]
    # stopped at the host read of the summed counts, after every image
    assert ("core.py", "reduce_counts") in where, where
    log = capsys.readouterr().err  # evaluate's log lines
    assert f"{protocol}, 1 process(es) on cuda" in log
    assert "~20 of 20 images" in log  # the progress line at the last image (small_tree: 20 val images)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_model_and_forward_on_fake_cuda(recipe, monkeypatch):
    """Each recipe's model on the device (train/engine.py's ``model.to(device)``, then channels_last when the
    recipe asks: here one ``.to`` call, since FakeTensorMode cannot swap parameters that are already fake), and
    the training step's forward and loss (``train_step``'s autocast block) at the training crop."""
    cfg = load_config(recipe, ["train.precision=bf16", "train.channels_last=true"])  # the GPU settings
    with torch.device("meta"):  # the recipe's own builder, without spending seconds on 138 M random weights
        model = build_model_from_config(cfg.model)
    with fake_cuda(monkeypatch):
        model.to(
            CUDA, memory_format=torch.channels_last if cfg.train.channels_last else torch.preserve_format
        )
        assert _on(CUDA, *model.parameters(), *model.buffers())
        if cfg.train.channels_last:
            convs = [p for p in model.parameters() if p.dim() == 4]
            assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        model.train()
        crop = cfg.data.train_crop
        images = torch.zeros(2, 3, crop, crop, device=CUDA)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.zeros(2, dtype=torch.int64, device=CUDA)
        with autocast(cfg, CUDA):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.optim.label_smoothing)
        assert _on(CUDA, logits, loss) and logits.shape == (2, cfg.model.num_classes)
        assert (
            logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        )  # autocast ran; the loss in fp32
