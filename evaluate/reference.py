"""Reference ImageNet-1k validation errors that our numbers are checked against.

TORCHVISION: 1-crop (resize 256, centre crop 224) top-1 / top-5 error of torchvision's released VGG weights, as
100 − the accuracies in torchvision's weight metadata (``VGG16_BN_Weights.IMAGENET1K_V1.meta['_metrics']``).

The vgg11_bn row is 29.63 / 10.19. The table copied around widely (old torchvision docs, many READMEs) gives
26.70 / 8.58 for vgg11_bn: those are ResNet-34's numbers (top-1 26.70, top-5 8.58), pasted into the wrong row.
We carry the corrected row; ``tests/test_reference.py`` checks every row against the installed torchvision.

PAPER: Simonyan & Zisserman, arXiv 1409.1556, Table 3 (dense evaluation at one test scale Q, no multi-crop):
configurations A–E, training scale S (fixed, or jittered in [256; 512]).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    arch: str
    top1_err: float  # percent
    top5_err: float  # percent
    source: str


TORCHVISION_SOURCE = "torchvision weight metadata (IMAGENET1K_V1), 1-crop 224 from 256"
WRONG_VGG11_BN_ROW = (26.70, 8.58)  # ResNet-34's numbers, often mis-copied into the vgg11_bn row

TORCHVISION: dict[str, Reference] = {
    arch: Reference(arch, top1, top5, TORCHVISION_SOURCE)
    for arch, top1, top5 in [
        ("vgg11", 30.980, 11.372),
        ("vgg11_bn", 29.630, 10.190),  # corrected row: see module docstring
        ("vgg13", 30.072, 10.754),
        ("vgg13_bn", 28.414, 9.626),
        ("vgg16", 28.408, 9.618),
        ("vgg16_bn", 26.640, 8.484),
        ("vgg19", 27.624, 9.124),
        ("vgg19_bn", 25.782, 8.158),
    ]
}

# Paper configuration letter of each of our arch names (BN variants are torchvision's, not the paper's).
PAPER_CONFIG = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_c": "C", "vgg16": "D", "vgg19": "E"}


@dataclass(frozen=True)
class PaperRow:
    config: str  # A, A-LRN, B, C, D, E
    train_scale: str  # "256", "384" or "[256;512]"
    test_scale: int  # Q
    top1_err: float
    top5_err: float


PAPER_TABLE3: list[PaperRow] = [
    PaperRow("A", "256", 256, 29.6, 10.4),
    PaperRow("A-LRN", "256", 256, 29.7, 10.5),
    PaperRow("B", "256", 256, 28.7, 9.9),
    PaperRow("C", "256", 256, 28.1, 9.4),
    PaperRow("C", "384", 384, 28.1, 9.3),
    PaperRow("C", "[256;512]", 384, 27.3, 8.8),
    PaperRow("D", "256", 256, 27.0, 8.8),
    PaperRow("D", "384", 384, 26.8, 8.7),
    PaperRow("D", "[256;512]", 384, 25.6, 8.1),
    PaperRow("E", "256", 256, 27.3, 9.0),
    PaperRow("E", "384", 384, 26.9, 8.7),
    PaperRow("E", "[256;512]", 384, 25.5, 8.0),
]


def reference_for(arch: str) -> Reference | None:
    """torchvision's 1-crop reference for an arch, or None where torchvision publishes no weights."""
    return TORCHVISION.get(arch)


def format_table() -> str:
    """The 1-crop reference table as printed by ``python evaluate --reference``."""
    lines = [f"{'arch':<10} {'top-1 err':>9} {'top-5 err':>9}  source", "-" * 78]
    for ref in TORCHVISION.values():
        note = "  (corrected; 26.70/8.58 is ResNet-34's)" if ref.arch == "vgg11_bn" else ""
        lines.append(f"{ref.arch:<10} {ref.top1_err:>9.3f} {ref.top5_err:>9.3f}  {ref.source}{note}")
    lines += ["", "Paper (arXiv 1409.1556, Table 3; dense evaluation at one scale Q):"]
    lines.append(f"{'config':<7} {'train S':>10} {'test Q':>6} {'top-1 err':>9} {'top-5 err':>9}")
    for row in PAPER_TABLE3:
        lines.append(
            f"{row.config:<7} {row.train_scale:>10} {row.test_scale:>6} {row.top1_err:>9.1f} {row.top5_err:>9.1f}"
        )
    return "\n".join(lines)
