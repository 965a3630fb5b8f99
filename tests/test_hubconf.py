"""Loading weights: train.checkpoint's helpers and the torch.hub entry points in hubconf.py.

Real files in tmp_path: our checkpoint format, torchvision's bare state_dict, truncated and foreign files.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn

from train.checkpoint import CheckpointError, extract_state_dict, load_state_dict_file, load_weights
from train.models import ARCHS, build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_classes=10, classifier_width=16)  # ~0.4M-parameter classifier
TINY_LAYERS = [8, "M", 512, "M"]


def _tiny(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("custom", layers=TINY_LAYERS, **{**SMALL, **kwargs})


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


class NotATensor:
    """A class the weights-only unpickler refuses."""


# ------------------------------------------------------------------------------------------ extract_state_dict


def test_extract_state_dict_forms():
    sd = _tiny().state_dict()
    for obj in (sd, {"model": sd, "epoch": 3, "config": {"lr": 0.1}}, {"state_dict": sd, "optimizer": {}}):
        _assert_same_weights(extract_state_dict(obj), sd)


def test_extract_state_dict_strips_compile_and_ddp_prefixes(tmp_path):
    model = _tiny()
    sd = model.state_dict()
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until a forward pass
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    _assert_same_weights(extract_state_dict({"model": compiled.state_dict()}), sd)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        _assert_same_weights(extract_state_dict(ddp.state_dict()), sd)
        both = torch.compile(ddp).state_dict()  # "_orig_mod.module.features.0.weight"
        assert next(iter(both)).startswith("_orig_mod.module.")
        _assert_same_weights(extract_state_dict({"state_dict": both}), sd)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([torch.zeros(1)], "expected a dict of tensors, got list"),
        ({}, "holds no tensors"),
        ({"epoch": 3, "lr": 0.1}, "entries that are not tensors ('epoch', 'lr')"),
        (
            {"model": {"w": torch.zeros(1), "step": 5}},
            "the checkpoint's 'model' entry has entries that are not",
        ),
        ({"module.w": torch.zeros(1), "w": torch.zeros(1)}, "key 'w' appears twice"),
    ],
)
def test_extract_state_dict_rejects_non_checkpoints(obj, message):
    with pytest.raises(CheckpointError) as info:
        extract_state_dict(obj)
    assert message in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ files


def test_checkpoint_file_round_trip_into_fresh_model(tmp_path):
    trained = _tiny(seed=1)
    path = tmp_path / "last.pt"
    torch.save({"model": trained.state_dict(), "epoch": 7, "config": {"model": {"arch": "custom"}}}, path)
    _assert_same_weights(load_state_dict_file(path), trained.state_dict())
    fresh = _tiny(seed=2)
    assert load_weights(fresh, path) is fresh
    _assert_same_weights(fresh.state_dict(), trained.state_dict())


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        torch.save(_tiny().state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    elif kind == "object":
        torch.save({"model": NotATensor()}, path)
    elif kind == "plain_pickle":
        with open(path, "wb") as f:
            pickle.dump({"a": 1}, f)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "best_acc1": 71.5}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("directory", "is a directory, not a file"),
        ("truncated", "is truncated, corrupt or not a PyTorch checkpoint (RuntimeError: PytorchStreamReader"),
        ("empty", "(0 bytes) is truncated, corrupt or not a PyTorch checkpoint"),
        ("garbage", "is truncated, corrupt or not a PyTorch checkpoint"),
        (
            "object",
            "is not a weights-only checkpoint (torch.load(weights_only=True) refused it: Unsupported global",
        ),
        ("plain_pickle", "is not a weights-only checkpoint"),
        (
            "no_tensors",
            "not a checkpoint: the checkpoint has entries that are not tensors ('epoch', 'best_acc1')",
        ),
    ],
)
def test_load_state_dict_file_errors_are_one_line(tmp_path, kind, message):
    if kind == "missing":
        path = tmp_path / "nowhere.pt"
    elif kind == "directory":
        path = tmp_path
    else:
        path = _bad_file(tmp_path, kind)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    text = str(info.value)
    assert message in text, text
    assert str(path) in text and "\n" not in text
    assert isinstance(info.value, ValueError)
    with pytest.raises(CheckpointError):
        load_weights(_tiny(), path)


def test_load_weights_names_missing_and_unexpected_keys():
    with_bn = _tiny(batch_norm=True).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_weights(_tiny(), with_bn, arch="custom")
    text = str(info.value)
    assert text.startswith("checkpoint is not a custom: ") and "\n" not in text
    # Convs at features.0 and .3 without BN, at .0 and .4 with it (BN at .1 and .5).
    assert "2 missing keys (features.3.weight, features.3.bias); 12 unexpected keys (" in text
    assert "unexpected keys (features.1.weight, features.1.bias, features.1.running_mean," in text
    assert "... (" in text  # long lists are cut


def test_load_weights_names_first_shape_mismatch():
    five_classes = _tiny(num_classes=5)
    with pytest.raises(CheckpointError) as info:
        load_weights(five_classes, _tiny().state_dict())
    assert str(info.value) == (
        "checkpoint does not fit the model: classifier.6.weight has shape (5, 16) here, (10, 16) in the checkpoint"
    )
    # strict=False tolerates missing keys, never a shape mismatch.
    partial = {k: v for k, v in _tiny(seed=3).state_dict().items() if k.startswith("features.")}
    target = _tiny(seed=4)
    before = target.classifier[0].weight.clone()
    load_weights(target, partial, strict=False)
    assert torch.equal(target.features[0].weight, partial["features.0.weight"])
    assert torch.equal(target.classifier[0].weight, before)
    with pytest.raises(CheckpointError, match=r"classifier\.6\.weight has shape"):
        load_weights(five_classes, _tiny().state_dict(), strict=False)


# ------------------------------------------------------------------------------------------ torch.hub


def _import_hubconf():
    """hubconf.py imported from its path, as torch.hub does (torch.hub.list only takes GitHub repos)."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_entries_match_registry():
    hub = _import_hubconf()
    # torch.hub.list's rule: public callables of hubconf.
    entries = sorted(name for name in dir(hub) if callable(getattr(hub, name)) and not name.startswith("_"))
    assert entries == sorted(name for name in ARCHS if name != "custom")
    assert hub.dependencies == ["torch", "torchvision"]
    for name in entries:
        entry = getattr(hub, name)
        assert entry.__name__ == name
        assert f"configuration {ARCHS[name].display} " in entry.__doc__
        assert "weights:" in entry.__doc__


@pytest.fixture(scope="module")
def torchvision_vgg16_bn_file(tmp_path_factory):
    """torchvision's vgg16_bn with non-trivial BN statistics, saved as its released files are: a bare state_dict."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16_bn().eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    path = tmp_path_factory.mktemp("hub") / "vgg16_bn-0123abcd.pth"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        expected = model(x)
    return path, x, expected


def test_hub_load_torchvision_weight_file(torchvision_vgg16_bn_file):
    path, x, expected = torchvision_vgg16_bn_file
    model = torch.hub.load(str(REPO_ROOT), "vgg16_bn", source="local", weights=str(path))
    assert type(model) is torchvision.models.VGG
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)


def test_hub_load_wrong_arch_is_one_clear_line(torchvision_vgg16_bn_file):
    path, _, _ = torchvision_vgg16_bn_file
    with pytest.raises(CheckpointError) as info:
        torch.hub.load(str(REPO_ROOT), "vgg16", source="local", weights=path)
    text = str(info.value)
    assert text.startswith("checkpoint is not a vgg16: ") and "\n" not in text
    assert "unexpected keys (features.1.weight, features.1.bias, features.1.running_mean," in text


def test_hub_load_our_checkpoint_with_ddp_prefix(tmp_path):
    torch.manual_seed(5)
    trained = build_model("vgg11_lrn", **SMALL).eval()
    path = tmp_path / "best.pt"
    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 74}, path)
    model = torch.hub.load(str(REPO_ROOT), "vgg11_lrn", source="local", weights=path, **SMALL)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trained(x), rtol=0, atol=0)
    random = torch.hub.load(str(REPO_ROOT), "vgg11_lrn", source="local", **SMALL)  # weights=None
    assert not torch.equal(random.features[0].weight, trained.features[0].weight)
    assert isinstance(random.features[2], nn.LocalResponseNorm)


def test_hub_load_our_checkpoint_takes_class_count_and_width_from_its_config(tmp_path):
    from train.config import load_config, to_dict

    cfg = load_config("demo", ["model.arch=vgg11_lrn", "model.num_classes=10", "model.classifier_width=16"])
    torch.manual_seed(6)
    trained = build_model("vgg11_lrn", **SMALL).eval()
    path = tmp_path / "best.pth"
    torch.save({"model": trained.state_dict(), "config": to_dict(cfg), "epoch": 1}, path)
    model = torch.hub.load(str(REPO_ROOT), "vgg11_lrn", source="local", weights=path)  # no kwargs needed
    assert model.classifier[6].out_features == 10 and model.classifier[0].out_features == 16
    with pytest.raises(CheckpointError, match=r"holds a vgg11_lrn \(its stored config\), not a vgg11$"):
        torch.hub.load(str(REPO_ROOT), "vgg11", source="local", weights=path)


def test_hub_load_works_without_the_package_installed(tmp_path):
    # A copy of the repo's hub files, imported by a Python whose editable install of this project is removed.
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "train", repo / "train", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "hubconf.py", repo / "hubconf.py")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        sys.path[:] = [p for p in sys.path if p not in ("", {str(REPO_ROOT)!r})]
        assert importlib.util.find_spec("train") is None, "the package is still importable"
        import torch
        model = torch.hub.load({str(repo)!r}, "vgg16_c", source="local", num_classes=10, classifier_width=16)
        print(sys.modules["train.models"].__file__)
        print(sum(p.numel() for p in model.parameters()))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    models_file, n_params = result.stdout.split()
    assert Path(models_file) == repo / "train" / "models.py"
    # vgg16_c's convolutions (133,638,952 minus torchvision's 4096-wide classifier) + a 16-wide classifier.
    convs = 133_638_952 - (25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000)
    assert int(n_params) == convs + (25088 * 16 + 16) + (16 * 16 + 16) + (16 * 10 + 10)
