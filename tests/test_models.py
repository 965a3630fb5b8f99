"""train.models: the architectures of the paper's Table 1, built with torchvision's VGG class.

Each full-size model is built once per module (module-scoped fixtures): ~1 s per 133-144M-parameter VGG on CPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs as tv_cfgs
from torchvision.models.vgg import make_layers as tv_make_layers

from train.models import (
    ARCHS,
    TORCHVISION_ARCHS,
    build_model,
    build_model_from_config,
    format_summary,
    summarize,
    validate_layers,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMED_ARCHS = [name for name in ARCHS if name != "custom"]

# Configurations torchvision lacks, counted by hand (the paper's Table 2 gives millions: A-LRN 133, C 134).
# A-LRN: LRN has no parameters and no MACs counted, so it equals A (torchvision's vgg11 metadata).
A_PARAMS, A_MACS = 132_863_336, 7_609_090_048
# C: D with the last conv of blocks 3, 4 and 5 made 1x1 drops 8 of the 9 kernel taps, 8 * Cin * Cout weights
# (biases stay): 8 * (256*256 + 512*512 + 512*512) = 4,718,592, so 138,357,544 - 4,718,592 = 133,638,952.
# MACs drop by 8 * Cin * Cout per output pixel: 8 * (256*256*56*56 + 512*512*28*28 + 512*512*14*14)
# = 3,699,376,128, so D's 15,470,264,320 (torchvision: 15.47 GMACs) becomes 11,770,888,192.
D_PARAMS, D_MACS = 138_357_544, 15_470_264_320
C_PARAMS = D_PARAMS - 8 * (256 * 256 + 512 * 512 + 512 * 512)
C_MACS = D_MACS - 8 * (256 * 256 * 56 * 56 + 512 * 512 * 28 * 28 + 512 * 512 * 14 * 14)
assert (C_PARAMS, C_MACS) == (133_638_952, 11_770_888_192)

SMALL = dict(num_classes=10, classifier_width=16)  # a classifier of ~0.4M parameters, for cheap models


def _tv_meta(arch: str) -> dict:
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1.meta


@pytest.fixture(scope="module")
def model(request) -> nn.Module:
    """A full-size model of the arch given by indirect parametrization, built once per module."""
    torch.manual_seed(0)
    return build_model(request.param)


@pytest.fixture(scope="module")
def summary(model):
    return summarize(model)


def _perturb_bn_stats(model: nn.Module) -> None:
    """Non-trivial BatchNorm running statistics, so an eval-mode comparison exercises them."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


# ------------------------------------------------------------------------------------------ registry


def test_registry_names_and_paper_letters():
    tv_vgg = sorted(
        n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("vgg")
    )
    assert sorted(TORCHVISION_ARCHS) == tv_vgg
    assert {name: spec.display for name, spec in ARCHS.items()} == {
        "vgg11": "A",
        "vgg11_bn": "A + BN",
        "vgg11_lrn": "A-LRN",
        "vgg13": "B",
        "vgg13_bn": "B + BN",
        "vgg16_c": "C",
        "vgg16": "D",
        "vgg16_bn": "D + BN",
        "vgg19": "E",
        "vgg19_bn": "E + BN",
        "custom": "custom",
    }
    for name in TORCHVISION_ARCHS:
        assert list(ARCHS[name].layers) == tv_cfgs[ARCHS[name].paper]
        assert ARCHS[name].batch_norm == name.endswith("_bn")


# ------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("model", NAMED_ARCHS, indirect=True)
def test_params_and_gmacs(model, summary, request):
    arch = request.node.callspec.params["model"]
    assert isinstance(model, torchvision.models.VGG)
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    if arch in TORCHVISION_ARCHS:
        meta = _tv_meta(arch)
        assert summary.total_params == meta["num_params"]
        assert round(summary.gmacs, 3) == meta["_ops"]  # torchvision rounds to 3 decimals
    else:
        expected = {"vgg11_lrn": (A_PARAMS, A_MACS), "vgg16_c": (C_PARAMS, C_MACS)}[arch]
        assert (summary.total_params, summary.total_macs) == expected
    assert summary.layers[-1].output_shape == (1, 1000)
    assert sum(layer.params for layer in summary.layers) == summary.total_params


@pytest.mark.parametrize("model", TORCHVISION_ARCHS, indirect=True)
def test_state_dict_interchangeable_with_torchvision(model, request):
    arch = request.node.callspec.params["model"]
    _perturb_bn_stats(model)
    torch.manual_seed(1)
    theirs = torchvision.models.get_model(arch)
    ours_sd, their_sd = model.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in their_sd.items()}
    assert list(ours_sd) == list(their_sd)  # same module indices, same order

    theirs.load_state_dict(ours_sd, strict=True)
    model.eval()
    theirs.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), rtol=0, atol=0)

    # And the reverse: torchvision's model, with other weights (negated), into ours.
    with torch.no_grad():
        for p in theirs.parameters():
            p.neg_()
        expected = theirs(x)
        assert not torch.equal(expected, model(x))
        model.load_state_dict(theirs.state_dict(), strict=True)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ A-LRN and C


@pytest.mark.parametrize("model", ["vgg11_lrn"], indirect=True)
def test_a_lrn_structure(model):
    features = model.features
    lrns = [i for i, m in enumerate(features) if isinstance(m, nn.LocalResponseNorm)]
    assert lrns == [2]  # after the first conv (0) and its ReLU (1), before the first max pool
    assert isinstance(features[0], nn.Conv2d) and isinstance(features[1], nn.ReLU)
    assert isinstance(features[3], nn.MaxPool2d)
    lrn = features[2]
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)
    # Everything else is vgg11 (configuration A) in order.
    a = tv_make_layers(tv_cfgs["A"])
    rest = [m for i, m in enumerate(features) if i != 2]
    assert [repr(m) for m in rest] == [repr(m) for m in a]
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_lrn_alpha_is_divided_by_size_as_in_cuda_convnet_and_caffe():
    # b_c = a_c / (k + alpha / n * sum_{|c'-c| <= 2} a_c'^2)^beta, the convention documented in train/models.py.
    assert ARCHS["vgg11_lrn"].layers[1] == "LRN"
    features = build_model("vgg11_lrn", **SMALL).features
    layer = features[2]
    a = torch.randn(1, 7, 3, 3) * 30  # large activations, so alpha's scale matters
    sq = torch.nn.functional.pad(a.pow(2), (0, 0, 0, 0, 2, 2))
    window = sum(sq[:, i : i + 7] for i in range(5))
    expected = a / (2.0 + 1e-4 / 5 * window).pow(0.75)
    torch.testing.assert_close(layer(a), expected)


@pytest.mark.parametrize("model", ["vgg16_c"], indirect=True)
def test_c_structure(model):
    convs = [(i, m) for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    one_by_one = [(i, m.in_channels, m.out_channels, m.padding) for i, m in convs if m.kernel_size == (1, 1)]
    # Conv number 7, 10 and 13 (the last of blocks 3, 4, 5); each conv is followed by a ReLU and each block by a
    # max pool, as in torchvision's vgg16 indices (features.14, 21, 28).
    assert one_by_one == [(14, 256, 256, (0, 0)), (21, 512, 512, (0, 0)), (28, 512, 512, (0, 0))]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for i, m in convs if i not in (14, 21, 28))
    d = tv_make_layers(tv_cfgs["D"])
    assert [type(m) for m in model.features] == [type(m) for m in d]
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ custom layers


def test_custom_layers_with_extensions():
    layers = [32, "LRN", "M", 64, "1x1:48", "M", 512, "M"]
    m = build_model("custom", layers=layers, batch_norm=True, **SMALL)
    kinds = [type(x).__name__ for x in m.features]
    assert kinds == [
        "Conv2d", "BatchNorm2d", "ReLU", "LocalResponseNorm", "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
    ]  # fmt: skip
    one = m.features[8]
    assert (one.in_channels, one.out_channels, one.kernel_size, one.padding) == (64, 48, (1, 1), (0, 0))
    assert m.features[12].in_channels == 48
    with torch.no_grad():
        assert m.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_custom_plain_list_is_torchvision_make_layers():
    layers = [64, "M", 128, "M", 512, 512, "M"]
    m = build_model("custom", layers=layers, **SMALL)
    assert repr(m.features) == repr(tv_make_layers(layers, batch_norm=False))
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # batch_norm defaults to False


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([64, "M", "X", 512], r"model\.layers\[2\] = 'X': expected a positive int"),
        ([64, -128, 512], r"model\.layers\[1\] = -128: a conv's channel count must be positive"),
        ([0, 512], r"model\.layers\[0\] = 0"),
        ([64, "1x1:abc", 512], r"model\.layers\[1\] = '1x1:abc': a 1x1 conv is written '1x1:N'"),
        ([64, "1x1:0", 512], r"model\.layers\[1\] = '1x1:0'"),
        ([64, 2.5, 512], r"model\.layers\[1\] = 2\.5"),
        ([64, True, 512], r"model\.layers\[1\] = True"),
        ([], r"model\.layers is empty"),
        ("64,M,512", r"must be a list"),
        ([64, "M", 256, "M"], r"model\.layers\[2\] = 256 is the last conv: .*512\*7\*7 inputs.*512 channels"),
        ([64, "M", 512, "1x1:256", "M"], r"model\.layers\[3\] = '1x1:256' is the last conv"),
        (["M", "LRN"], r"model\.layers has no conv"),
    ],
)
def test_bad_layers_raise_one_clear_line(layers, message):
    with pytest.raises(ValueError, match=message) as info:
        build_model("custom", layers=layers)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=message):
        validate_layers(layers)


def test_build_model_errors():
    with pytest.raises(ValueError) as info:
        build_model("vgg17")
    assert "\n" not in str(info.value)
    assert "'vgg17'" in str(info.value) and all(name in str(info.value) for name in ARCHS)
    with pytest.raises(ValueError, match=re.escape("arch 'custom' needs model.layers")):
        build_model("custom")
    with pytest.raises(
        ValueError, match=re.escape("model.layers is only for arch 'custom'; vgg16 has its own layers")
    ):
        build_model("vgg16", layers=[64, "M", 512])
    with pytest.raises(ValueError, match=re.escape("model.batch_norm=True contradicts arch vgg16")):
        build_model("vgg16", batch_norm=True)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model("custom", layers=[512], num_classes=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        build_model("custom", layers=[512], dropout=1.5)


def test_classifier_width_keeps_structure_and_init():
    torch.manual_seed(0)
    m = build_model("custom", layers=[512, "M"], num_classes=7, classifier_width=256, dropout=0.2)
    c = m.classifier
    assert [type(x) for x in c] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [(x.in_features, x.out_features) for x in c if isinstance(x, nn.Linear)] == [
        (512 * 7 * 7, 256),
        (256, 256),
        (256, 7),
    ]
    assert c[2].p == c[5].p == 0.2
    for linear in (c[0], c[3], c[6]):
        assert torch.count_nonzero(linear.bias) == 0
        assert abs(linear.weight.std().item() - 0.01) < 0.001  # normal(0, 0.01), as torchvision's VGG
    # The features got torchvision's init too (conv: kaiming normal, fan_out; zero bias), and nothing is left on
    # the meta device the default classifier is built on.
    assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {"cpu"}
    conv = m.features[0]
    assert torch.count_nonzero(conv.bias) == 0
    assert abs(conv.weight.std().item() - (2 / (512 * 9)) ** 0.5) < 0.001
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_build_model_from_config():
    from train.config import ModelConfig

    cfg = ModelConfig(arch="custom", num_classes=5, dropout=0.1, classifier_width=32)
    cfg.layers, cfg.batch_norm = [16, "M", "1x1:512", "M"], True
    m = build_model_from_config(cfg)
    assert m.classifier[-1].out_features == 5 and m.classifier[2].p == 0.1
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.features) == 2
    ns = SimpleNamespace(
        arch="vgg11", num_classes=3, dropout=0.5, classifier_width=16, layers=None, batch_norm=None
    )
    m = build_model_from_config(ns)
    assert [type(x) for x in m.features] == [type(x) for x in tv_make_layers(tv_cfgs["A"])]


# ------------------------------------------------------------------------------------------ summary


def test_summary_table_and_totals():
    m = build_model("custom", layers=[8, "LRN", "M", "1x1:512", "M"], batch_norm=True, **SMALL)
    bn = m.features[1]
    m.train()
    summary = summarize(m, input_size=64)
    assert m.training and bn.num_batches_tracked.item() == 0  # eval for the pass, mode restored
    names = [layer.name for layer in summary.layers]
    assert names[:4] == ["features.0", "features.1", "features.2", "features.3"]
    assert names[-1] == "classifier.6" and "avgpool" in names
    conv0, conv1 = summary.layers[0], summary.layers[5]
    assert conv0.output_shape == (1, 8, 64, 64) and conv0.macs == 64 * 64 * 8 * 3 * 9
    assert (
        conv1.type == "Conv2d" and conv1.output_shape == (1, 512, 32, 32) and conv1.macs == 32 * 32 * 512 * 8
    )
    assert summary.layers[-1].macs == 16 * 10 and summary.layers[-1].params == 16 * 10 + 10
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0].split() == ["Layer", "Type", "Output", "shape", "Params", "MACs"]
    assert any(line.split()[:3] == ["features.5", "Conv2d", "1x512x32x32"] for line in lines)
    total = sum(p.numel() for p in m.parameters())
    assert total > 1000  # so the separator shows
    assert f"Total params: {total:,}" in lines
    assert re.fullmatch(r"Total params: \d{1,3}(,\d{3})+", lines[-3])
    assert lines[-1] == f"GMACs at 64x64: {summary.total_macs / 1e9:.2f}"
    with pytest.raises(ValueError, match="input_size 2 is too small for 2 2x2 max pools"):
        summarize(m, input_size=2)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.models", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_prints_vgg16_summary():
    result = _run_cli("vgg16")
    assert result.returncode == 0, result.stderr
    assert "Total params: 138,357,544" in result.stdout.splitlines()
    assert "GMACs at 224x224: 15.47" in result.stdout.splitlines()
    assert "paper configuration D" in result.stdout


def test_cli_unknown_arch_exits_2_with_one_line():
    result = _run_cli("vgg17")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown arch 'vgg17'")
    assert "vgg16_bn" in lines[0] and "vgg11_lrn" in lines[0]


# ------------------------------------------------------------------------------------------ initialisation (model.init)

SMALL_INIT_ARCHS = ["vgg11", "vgg11_bn"]


def _model_cfg(arch: str, init: str, **kwargs):
    from train.config import ModelConfig

    return ModelConfig(arch=arch, init=init, **{**SMALL, **kwargs})


def _weighted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _fans(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    receptive = w[0, 0].numel() if w.ndim == 4 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def _assert_biases_and_bn(model: nn.Module) -> None:
    for name, m in _weighted(model):
        assert torch.count_nonzero(m.bias) == 0, name
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.count_nonzero(bn.bias) == 0
        assert torch.count_nonzero(bn.running_mean) == 0 and torch.equal(
            bn.running_var, torch.ones(bn.num_features)
        )
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}  # nothing left on meta


def test_init_schemes_are_the_config_choices():
    from train.config import CHOICES
    from train.models import INITS, PAPER_INIT_STD

    assert CHOICES["model.init"] == INITS == ("torchvision", "paper", "glorot")
    assert PAPER_INIT_STD == 0.01  # the σ = 0.01 reading of "10^-2 variance" (see train/models.py)


@pytest.mark.parametrize("arch", SMALL_INIT_ARCHS)
def test_paper_init_is_normal_0_01_with_zero_bias(arch):
    torch.manual_seed(0)
    model = build_model_from_config(_model_cfg(arch, "paper"))
    layers = _weighted(model)
    assert len(layers) == 8 + 3  # A's 8 convs and 3 FC layers, the replaced (16-wide) classifier included
    for name, m in layers:
        w, n = m.weight.detach(), m.weight.numel()
        # the sample std of n normal draws has a standard error of σ / sqrt(2n): allow 6 of them
        tol = 6 * 0.01 / (2 * n) ** 0.5
        assert abs(w.std().item() - 0.01) < tol, (name, w.std().item(), tol)
        assert abs(w.mean().item()) < 6 * 0.01 / n**0.5, name
        if n > 100_000:  # big layers: ≈ 0.01 within 1 %
            assert abs(w.std().item() - 0.01) < 1e-4, name
    _assert_biases_and_bn(model)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", SMALL_INIT_ARCHS)
def test_glorot_init_is_xavier_uniform_with_zero_bias(arch):
    torch.manual_seed(0)
    model = build_model_from_config(_model_cfg(arch, "glorot"))
    layers = _weighted(model)
    assert len(layers) == 11
    for name, m in layers:
        w, n = m.weight.detach(), m.weight.numel()
        fan_in, fan_out = _fans(m)
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert w.abs().max().item() <= bound, name
        # U(-b, b): std b / sqrt(3); the sample std's standard error is ≈ 0.45 σ / sqrt(n) (kurtosis 1.8)
        std = bound / 3**0.5
        assert abs(w.std().item() - std) < 6 * 0.45 * std / n**0.5, (name, w.std().item(), std)
        if n > 100_000:  # big layers fill the interval
            assert w.abs().max().item() > 0.999 * bound, name
    # the formula by hand for one conv and one FC layer (fan = channels × kernel area)
    conv, fc = model.features[0], model.classifier[0]
    assert _fans(conv) == (3 * 9, 64 * 9) and _fans(fc) == (512 * 7 * 7, 16)
    _assert_biases_and_bn(model)


@pytest.mark.parametrize("arch", SMALL_INIT_ARCHS)
def test_torchvision_init_is_unchanged_and_equals_torchvision(arch):
    # Full classifier width: the default path builds torchvision's VGG itself, so under the same seed every
    # tensor equals torchvision.models.<arch>()'s (with a narrower classifier torchvision has no counterpart).
    torch.manual_seed(0)
    ours = build_model_from_config(_model_cfg(arch, "torchvision", classifier_width=4096))
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(arch, num_classes=10)
    ours_sd, their_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(their_sd)
    for key in ours_sd:
        assert torch.equal(ours_sd[key], their_sd[key]), key
    # The key's default is torchvision's, on both entry points.
    torch.manual_seed(0)
    default = build_model(arch, **SMALL)
    torch.manual_seed(0)
    explicit = build_model_from_config(_model_cfg(arch, "torchvision"))
    for key, value in default.state_dict().items():
        assert torch.equal(value, explicit.state_dict()[key]), key
    conv = explicit.features[0]
    assert abs(conv.weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.01  # kaiming normal, fan_out
    _assert_biases_and_bn(explicit)


@pytest.mark.parametrize("init", ["paper", "glorot"])
def test_init_is_deterministic_under_manual_seed(init):
    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return list(build_model("vgg11_bn", init=init, **SMALL).state_dict().values())

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(0)
    tv = build_model("vgg11_bn", **SMALL).state_dict()
    assert not torch.equal(first[0], tv["features.0.weight"])  # the scheme did change the weights


def test_bad_init_is_one_line():
    with pytest.raises(ValueError, match=r"^unknown init 'he'; valid: torchvision, paper, glorot$"):
        build_model("vgg11", init="he", **SMALL)
    from train.models import init_weights

    with pytest.raises(ValueError, match=r"^unknown init 'xavier'; valid: torchvision, paper, glorot$"):
        init_weights(nn.Linear(2, 2), "xavier")


def test_paper_init_comes_before_init_from(small_tree, tmp_path):
    # §3.1: B starts from a trained A; with model.init=paper the layers not copied keep N(0, 0.01²) and the copied
    # ones are A's exactly, as the engine builds (and initialises) the model before copying A over it.
    from tests.test_train import overrides
    from train import distributed
    from train.config import load_config
    from train.engine import Trainer

    torch.manual_seed(5)
    a = build_model("vgg11", num_classes=4, classifier_width=32)
    torch.save({"model": a.state_dict()}, tmp_path / "a.pth")
    cfg = load_config(
        "demo",
        overrides(small_tree, tmp_path / "run", "model.arch=vgg13", "model.init=paper",
                  f"model.init_from={tmp_path / 'a.pth'}", "launch.gpus=1"),
    )  # fmt: skip
    trainer = Trainer(cfg, distributed.setup())
    try:
        b = trainer.model.state_dict()
    finally:
        trainer.close()
    a_sd = a.state_dict()
    # A's convs 1-4 are at (block, position) (1,1), (2,1), (3,1), (3,2): A's features 0, 3, 6, 8; B's 0, 5, 10, 12
    for a_idx, b_idx in [(0, 0), (3, 5), (6, 10), (8, 12)]:
        for suffix in ("weight", "bias"):
            assert torch.equal(b[f"features.{b_idx}.{suffix}"], a_sd[f"features.{a_idx}.{suffix}"])
    for i in (0, 3, 6):
        assert torch.equal(b[f"classifier.{i}.weight"], a_sd[f"classifier.{i}.weight"])
    # B's extra convs (block 1 and 2 position 2, blocks 4-5) are the paper's draws, not torchvision's kaiming
    for idx in (2, 7, 15, 17, 20, 22):
        w = b[f"features.{idx}.weight"]
        assert abs(w.std().item() - 0.01) < 6 * 0.01 / (2 * w.numel()) ** 0.5, idx
        assert torch.count_nonzero(b[f"features.{idx}.bias"]) == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("init", ["paper", "glorot"])
def test_demo_like_run_trains_with_init(small_tree, tmp_path, init):
    import json

    from tests.test_train import overrides
    from train.checkpoint import load_checkpoint_file
    from train.config import load_config
    from train.engine import train

    cfg = load_config(
        "demo",
        overrides(small_tree, tmp_path / "run", f"model.init={init}", "sched.epochs=1", "launch.gpus=1",
                  "train.deterministic=false"),
    )  # fmt: skip
    result = train(cfg)
    assert result["status"] == "done" and result["epoch"] == 1
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert torch.isfinite(torch.tensor([record["train_loss"], record["val_loss"]])).all(), record
    state = load_checkpoint_file(tmp_path / "run" / "last.pth")
    assert state["config"]["model"]["init"] == init
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
