"""VGG models: the paper's configurations A to E, built with torchvision's own `VGG` class.

Print a layer-by-layer summary (output shapes, parameters, MACs) of an architecture:

    python -m train.models vgg16
    python -m train.models vgg16_c --input-size 224
    python -m train.models vgg11_bn --num-classes 10 --classifier-width 256
    python -m train.models custom --layers 64,M,128,M,256,1x1:256,M,512,M,512,M --batch-norm

Architectures (Simonyan & Zisserman, arXiv 1409.1556, Table 1 and Table 2):

    arch        paper  notes
    vgg11       A      torchvision
    vgg11_lrn   A-LRN  A with LocalResponseNorm after the first conv + ReLU; not in torchvision
    vgg13       B      torchvision
    vgg16_c     C      D whose last conv of blocks 3, 4 and 5 is 1x1; not in torchvision
    vgg16       D      torchvision
    vgg19       E      torchvision
    vgg*_bn     A/B/D/E with BatchNorm after every conv (torchvision; not in the paper)
    custom      -      a user layer list (`model.layers`), see `build_features`

For the eight torchvision architectures the model is exactly torchvision's (same class, layer configs and
`make_layers`), so its state dict loads strictly into `torchvision.models.vgg16_bn()` and torchvision's
released weight files load strictly into it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs as tv_cfgs
from torchvision.models.vgg import make_layers as tv_make_layers

__all__ = [
    "ARCHS",
    "INITS",
    "PAPER_INIT_STD",
    "TORCHVISION_ARCHS",
    "ArchSpec",
    "LayerInfo",
    "Summary",
    "build_features",
    "build_model",
    "build_model_from_config",
    "format_summary",
    "init_weights",
    "lrn",
    "summarize",
    "validate_layers",
]

LayerToken = int | str

# Local response normalisation of A-LRN: the paper (Sect. 2.3, Table 1) uses the LRN of Krizhevsky et al.
# 2012 (AlexNet, Sect. 3.3): n=5, alpha=1e-4, beta=0.75, k=2. AlexNet's printed formula multiplies the sum of
# squares by alpha, whereas nn.LocalResponseNorm multiplies it by alpha / n. The code both papers ran divides
# by n too: cuda-convnet's layer.py does `scale /= size` for cross-map response norm, and Caffe's LRN layer
# (VGG's code base) computes (k + alpha/n * sum)^beta. So alpha=1e-4 in PyTorch's convention reproduces what
# was trained; AlexNet's formula as printed would be alpha=5e-4 here. (The paper found LRN does not help,
# Sect. 4.1.)
LRN_SIZE = 5
LRN_ALPHA = 1e-4
LRN_BETA = 0.75
LRN_K = 2.0

# VGG's classifier starts with Linear(512 * 7 * 7, 4096) after AdaptiveAvgPool2d((7, 7)).
FEATURE_CHANNELS = 512
CLASSIFIER_WIDTH = 4096

# Weight initialisation schemes (model.init):
#   torchvision: torchvision's VGG (conv: kaiming_normal_ fan_out, Linear: N(0, 0.01²), BatchNorm 1/0; biases 0).
#   paper: arXiv 1409.1556 §3.1, "we sampled the weights from a normal distribution with the zero mean and 10^-2
#          variance. The biases were initialised with zero": every conv and Linear weight ~ N(0, PAPER_INIT_STD²).
#   glorot: the paper's no-pre-training alternative (§3.1, Glorot & Bengio 2010's normalized init):
#          xavier_uniform_, U(-b, b) with b = sqrt(6 / (fan_in + fan_out)); biases 0.
INITS: tuple[str, ...] = ("torchvision", "paper", "glorot")
# "10^-2 variance" read literally is σ = 0.1; we use σ = 0.01, as Caffe VGG training prototxts (gaussian
# weight_filler, std 0.01) and reimplementations do. A 512-channel 3x3 conv (fan_in 4608) multiplies its input's
# variance by fan_in · σ² = 46 at σ = 0.1 (23 after the ReLU) and by 0.46 at σ = 0.01. As every layer scales
# its input by σ (no BatchNorm), σ = 0.1 gives 10^depth times σ = 0.01's logits; measured on N(0, 1) 224x224
# inputs: logit std 2e6 (vgg11) and 5e8 (vgg16) at σ = 0.1, 2e-5 and 5e-8 at σ = 0.01. That vanishing signal
# is the "instability of gradient in deep nets" the paper (§3.1) avoids by starting B-E from A (model.init_from).
PAPER_INIT_STD = 0.01


def lrn() -> nn.LocalResponseNorm:
    """The A-LRN normalisation layer (AlexNet's parameters; see the comment on LRN_ALPHA)."""
    return nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)


@dataclass(frozen=True)
class ArchSpec:
    """One registry entry: the paper's configuration letter, its layer list and whether it has BatchNorm."""

    paper: str  # the column of the paper's Table 1 ("A", "A-LRN", "B", "C", "D", "E"), "custom" otherwise
    layers: tuple[LayerToken, ...] | None  # None for `custom`: the user gives the list
    batch_norm: bool
    in_torchvision: bool
    description: str

    @property
    def display(self) -> str:
        """E.g. "D" or "D + BN", for logs and tables."""
        return f"{self.paper} + BN" if self.batch_norm else self.paper


# Configuration C (Table 1): D with the last conv of blocks 3, 4 and 5 replaced by a 1x1 conv.
_CFG_C: tuple[LayerToken, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, "1x1:256", "M",
    512, 512, "1x1:512", "M",
    512, 512, "1x1:512", "M",
)  # fmt: skip
# Configuration A-LRN (Table 1): A with LRN after the first conv (and its ReLU).
_CFG_A_LRN: tuple[LayerToken, ...] = (64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _tv(letter: str, batch_norm: bool, depth: int) -> ArchSpec:
    bn = ", BatchNorm after every conv" if batch_norm else ""
    description = f"{depth} weight layers ({depth - 3} conv 3x3 + 3 fully connected){bn}"
    return ArchSpec(letter, tuple(tv_cfgs[letter]), batch_norm, True, description)


ARCHS: dict[str, ArchSpec] = {
    "vgg11": _tv("A", False, 11),
    "vgg11_bn": _tv("A", True, 11),
    "vgg11_lrn": ArchSpec(
        "A-LRN", _CFG_A_LRN, False, False, "vgg11 with LocalResponseNorm after the first conv (AlexNet's LRN)"
    ),
    "vgg13": _tv("B", False, 13),
    "vgg13_bn": _tv("B", True, 13),
    "vgg16_c": ArchSpec("C", _CFG_C, False, False, "vgg16 whose last conv in blocks 3, 4 and 5 is 1x1"),
    "vgg16": _tv("D", False, 16),
    "vgg16_bn": _tv("D", True, 16),
    "vgg19": _tv("E", False, 19),
    "vgg19_bn": _tv("E", True, 19),
    "custom": ArchSpec("custom", None, False, False, "a user layer list (model.layers)"),
}
TORCHVISION_ARCHS: tuple[str, ...] = tuple(name for name, spec in ARCHS.items() if spec.in_torchvision)


def _parse_1x1(token: str) -> int | None:
    """The channel count of a '1x1:N' token, or None when the token is not of that form."""
    prefix, _, count = token.partition(":")
    if prefix != "1x1" or not count.isdigit():
        return None
    return int(count)


def validate_layers(layers: Sequence[Any]) -> list[LayerToken]:
    """Check a layer list (torchvision's format plus 'LRN' and '1x1:N'); return it as a list.

    Raises ValueError naming the first bad element and its index.
    """
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
        raise ValueError(f"model.layers must be a list like [64, 'M', 128, 'M', ...], got {layers!r}")
    if len(layers) == 0:
        raise ValueError("model.layers is empty: give a list like [64, 'M', 128, 'M', ...]")
    channels, last_conv = 3, None
    for i, token in enumerate(layers):
        if isinstance(token, int) and not isinstance(token, bool):
            if token <= 0:
                raise ValueError(f"model.layers[{i}] = {token!r}: a conv's channel count must be positive")
            channels, last_conv = token, i
        elif isinstance(token, str) and token in ("M", "LRN"):
            pass
        elif isinstance(token, str) and token.startswith("1x1"):
            count = _parse_1x1(token)
            if count is None or count <= 0:
                raise ValueError(
                    f"model.layers[{i}] = {token!r}: a 1x1 conv is written '1x1:N' with N a positive integer"
                )
            channels, last_conv = count, i
        else:
            raise ValueError(
                f"model.layers[{i}] = {token!r}: expected a positive int (3x3 conv), 'M' (max pool), "
                "'LRN' or '1x1:N' (1x1 conv)"
            )
    expected = (
        f"VGG's classifier expects {FEATURE_CHANNELS}*7*7 inputs, "
        f"so the last conv must have {FEATURE_CHANNELS} channels"
    )
    if last_conv is None:
        raise ValueError(f"model.layers has no conv: {expected}")
    if channels != FEATURE_CHANNELS:
        raise ValueError(f"model.layers[{last_conv}] = {layers[last_conv]!r} is the last conv: {expected}")
    return list(layers)


def build_features(layers: Sequence[Any], batch_norm: bool = False) -> nn.Sequential:
    """The convolutional trunk for a layer list.

    torchvision's format, `[64, 'M', 128, 'M', ...]` (int: 3x3 conv with padding 1, + BatchNorm if batch_norm,
    + ReLU; 'M': 2x2 max pool with stride 2), extended by 'LRN' (`lrn()`) and '1x1:N' (1x1 conv with N output
    channels and no padding, + BatchNorm if batch_norm, + ReLU). A list without extension tokens goes through
    torchvision's own `make_layers`, so module indices (`features.0`, ...) are torchvision's.
    """
    layers = validate_layers(layers)
    if all(isinstance(token, int) or token == "M" for token in layers):
        return tv_make_layers(layers, batch_norm=batch_norm)
    modules: list[nn.Module] = []
    in_channels = 3
    for token in layers:
        if token == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif token == "LRN":
            modules.append(lrn())
        else:
            if isinstance(token, int):
                out_channels, kernel_size, padding = token, 3, 1
            else:
                out_channels, kernel_size, padding = int(token.partition(":")[2]), 1, 0
            modules.append(nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=padding))
            if batch_norm:
                modules.append(nn.BatchNorm2d(out_channels))
            modules.append(nn.ReLU(inplace=True))
            in_channels = out_channels
    return nn.Sequential(*modules)


def _classifier(width: int, num_classes: int, dropout: float) -> nn.Sequential:
    """torchvision's VGG classifier with another hidden width; Linear init as in torchvision's VGG."""
    classifier = nn.Sequential(
        nn.Linear(FEATURE_CHANNELS * 7 * 7, width),
        nn.ReLU(True),
        nn.Dropout(p=dropout),
        nn.Linear(width, width),
        nn.ReLU(True),
        nn.Dropout(p=dropout),
        nn.Linear(width, num_classes),
    )
    for m in classifier.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return classifier


def init_weights(model: nn.Module, init: str) -> nn.Module:
    """Initialise every Conv2d, Linear and BatchNorm of ``model`` in place by scheme ``init`` (one of INITS).

    torchvision: conv weights kaiming_normal_ (fan_out, ReLU), Linear weights N(0, 0.01²); paper: conv and Linear
    weights N(0, PAPER_INIT_STD²); glorot: conv and Linear weights xavier_uniform_. All biases 0, BatchNorm
    weight 1 and bias 0. Draws from torch's global RNG, so it is deterministic under ``torch.manual_seed``.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            if init == "paper":
                nn.init.normal_(m.weight, 0.0, PAPER_INIT_STD)
            elif init == "glorot":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _check_arch(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    return ARCHS[arch]


def build_model(
    arch: str,
    num_classes: int = 1000,
    dropout: float = 0.5,
    classifier_width: int = CLASSIFIER_WIDTH,
    layers: Sequence[Any] | None = None,
    batch_norm: bool | None = None,
    init: str = "torchvision",
) -> torchvision.models.VGG:
    """Build a randomly initialised VGG (torchvision's class; initialisation `init`, one of INITS).

    `layers` is required for arch 'custom' (its `batch_norm` defaults to False) and must be None otherwise.
    A named arch fixes BatchNorm, so `batch_norm` must then be None or agree with it (vgg16 vs vgg16_bn).
    `classifier_width` other than 4096 shrinks the two hidden Linear layers (for the CPU demo).
    init='torchvision' is torchvision's VGG initialisation: with the 4096-wide classifier the model equals
    `torchvision.models.vgg16_bn(num_classes=...)` built under the same `torch.manual_seed`.
    """
    spec = _check_arch(arch)
    if spec.layers is None:
        if layers is None:
            raise ValueError("arch 'custom' needs model.layers, e.g. [64, 'M', 128, 'M', 256, 'M', 512, 'M']")
        layers_to_build, bn = layers, bool(batch_norm)
    else:
        if layers is not None:
            raise ValueError(
                f"model.layers is only for arch 'custom'; {arch} has its own layers (set it to null)"
            )
        if batch_norm is not None and batch_norm != spec.batch_norm:
            hint = (
                " (use a *_bn arch, or 'custom' with layers)" if batch_norm else " (use the arch without _bn)"
            )
            raise ValueError(f"model.batch_norm={batch_norm} contradicts arch {arch}{hint}")
        layers_to_build, bn = spec.layers, spec.batch_norm
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(classifier_width, bool) or not isinstance(classifier_width, int) or classifier_width < 1:
        raise ValueError(f"classifier_width must be a positive int, got {classifier_width!r}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")

    features = build_features(layers_to_build, batch_norm=bn)
    if classifier_width == CLASSIFIER_WIDTH and init == "torchvision":
        return torchvision.models.VGG(features, num_classes, dropout=dropout)
    # torchvision's VGG always creates the 4096-wide classifier (120M parameters, ~1 s to initialise on a CPU):
    # create it on the meta device (no memory, no init work) and replace it. `features` already exist on the
    # CPU, so VGG's init loop still initialises them for real.
    with torch.device("meta"):
        model = torchvision.models.VGG(features, num_classes, dropout=dropout)
    if init == "torchvision":
        model.classifier = _classifier(classifier_width, num_classes, dropout)
        return model
    # Another scheme re-initialises every layer, the classifier included: allocate the classifier without
    # initialising it (to_empty) and let init_weights draw all weights once.
    if classifier_width != CLASSIFIER_WIDTH:
        with torch.device("meta"):
            model.classifier = _classifier(classifier_width, num_classes, dropout)
    model.classifier.to_empty(device="cpu")
    return init_weights(model, init)


def build_model_from_config(model_cfg: Any) -> torchvision.models.VGG:
    """`build_model` from a config node (arch, num_classes, dropout, classifier_width, layers, batch_norm, init).

    The weights are initialised here by ``model.init``; ``model.init_from`` (train/init.py) copies net A's layers
    over them afterwards (train/engine.py builds, then copies). A node without ``init`` (an older saved config
    read as a namespace) gets torchvision's.
    """
    layers = model_cfg.layers
    return build_model(
        model_cfg.arch,
        num_classes=model_cfg.num_classes,
        dropout=model_cfg.dropout,
        classifier_width=model_cfg.classifier_width,
        layers=None if layers is None else list(layers),
        batch_norm=model_cfg.batch_norm,
        init=getattr(model_cfg, "init", "torchvision"),
    )


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module path, e.g. "features.0"
    type: str  # class name, e.g. "Conv2d"
    output_shape: tuple[int, ...]
    params: int
    macs: int  # multiply-accumulates for one image


@dataclass(frozen=True)
class Summary:
    layers: tuple[LayerInfo, ...]
    total_params: int
    total_macs: int
    input_size: int

    @property
    def gmacs(self) -> float:
        return self.total_macs / 1e9


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of a conv or linear layer for one image (what torchvision's `_ops` counts)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def summarize(model: nn.Module, input_size: int = 224) -> Summary:
    """Run one (1, 3, input_size, input_size) image through `model` and record each leaf module.

    The model is put in eval mode for the pass (so BatchNorm running statistics are not updated) and restored.
    """
    n_pools = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())
    if input_size < 2**n_pools:
        raise ValueError(
            f"input_size {input_size} is too small for {n_pools} 2x2 max pools (min {2**n_pools})"
        )
    records: list[LayerInfo] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            records.append(
                LayerInfo(name, type(module).__name__, tuple(output.shape), params, _macs(module, output))
            )

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if next(module.children(), None) is None
    ]
    was_training = model.training
    try:
        param = next(model.parameters())
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    total_params = sum(p.numel() for p in model.parameters())
    return Summary(tuple(records), total_params, sum(r.macs for r in records), input_size)


def format_summary(summary: Summary) -> str:
    """A table of the layers, then total parameters (with thousands separators) and GMACs."""
    header = ("Layer", "Type", "Output shape", "Params", "MACs")
    rows = [
        (r.name, r.type, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}")
        for r in summary.layers
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    size = summary.input_size
    return "\n".join(
        [
            line(header),
            rule,
            *map(line, rows),
            rule,
            f"Total params: {summary.total_params:,}",
            f"Total MACs at {size}x{size}: {summary.total_macs:,}",
            f"GMACs at {size}x{size}: {summary.gmacs:.2f}",
        ]
    )


def _parse_layers_arg(text: str) -> list[LayerToken]:
    return [int(token) if token.lstrip("-").isdigit() else token for token in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.models", description="Print a VGG's layers, parameter count and MACs."
    )
    parser.add_argument("arch", help=f"one of: {', '.join(ARCHS)}")
    parser.add_argument("--input-size", type=int, default=224, help="square input side in pixels")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--classifier-width", type=int, default=CLASSIFIER_WIDTH, help="hidden Linear width")
    parser.add_argument(
        "--layers", type=_parse_layers_arg, help="for arch custom: comma list, e.g. 64,M,1x1:512"
    )
    parser.add_argument(
        "--batch-norm", action="store_true", help="for arch custom: BatchNorm after each conv"
    )
    args = parser.parse_args(argv)
    try:
        model = build_model(
            args.arch,
            num_classes=args.num_classes,
            classifier_width=args.classifier_width,
            layers=args.layers,
            batch_norm=True if args.batch_norm else None,
        )
        summary = summarize(model, args.input_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = ARCHS[args.arch]
    config = spec.display if spec.layers is not None else ("custom + BN" if args.batch_norm else "custom")
    print(f"{args.arch}: {spec.description}")
    print(f"paper configuration {config}, input 3x{args.input_size}x{args.input_size}")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
