"""The paper's initialisation of deeper nets from a trained net A (arXiv 1409.1556 §3.1).

"we initialised the first four convolutional layers and the last three fully-connected layers with the layers of
net A (the intermediate layers were initialised randomly)". A's first four convs are conv1 (block 1), conv2
(block 2) and the two convs of block 3; we copy each to the conv at the same (block, position) of the deeper net,
which is where the shapes agree (3→64, 64→128, 128→256, 256→256), and the three FC layers as they are.
Anything whose shape differs is refused with a clear error.
"""

from __future__ import annotations

import logging

from torch import nn
from torchvision.models.vgg import cfgs as tv_cfgs

from train.checkpoint import CheckpointError, load_state_dict_file

N_CONV_FROM_A = 4


def conv_positions(model: nn.Module) -> list[tuple[int, int, str]]:
    """(block, position in block, state-dict prefix) of every conv in ``model.features``; blocks end at max-pools."""
    out, block, pos = [], 0, 0
    for name, module in model.features.named_children():
        if isinstance(module, nn.Conv2d):
            out.append((block, pos, f"features.{name}"))
            pos += 1
        elif isinstance(module, nn.MaxPool2d):
            block, pos = block + 1, 0
    return out


def layout_positions(layers: list) -> list[tuple[int, int]]:
    """(block, position in block) of each conv of a torchvision layer list ('M' ends a block)."""
    out, block, pos = [], 0, 0
    for token in layers:
        if token == "M":
            block, pos = block + 1, 0
        else:
            out.append((block, pos))
            pos += 1
    return out


def init_from_checkpoint(model: nn.Module, path: str, log: logging.Logger | None = None) -> list[str]:
    """Copy A's first four convs (by block and position) and the three FC layers into ``model``; return keys."""
    source = load_state_dict_file(path)
    # A's conv layout, read from its state dict: convs are the 4-D weights, in order.
    a_convs = sorted(
        (int(k.split(".")[1]), k.rsplit(".", 1)[0])
        for k, v in source.items()
        if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4
    )
    if len(a_convs) < N_CONV_FROM_A:
        raise CheckpointError(
            f"model.init_from={path}: expected a trained net A (vgg11), found {len(a_convs)} convs"
        )
    a_layout = layout_positions(tv_cfgs["A"])[
        :N_CONV_FROM_A
    ]  # (block, position): A is 64 | 128 | 256 256 | ...
    targets = {(b, p): prefix for b, p, prefix in conv_positions(model)}
    pairs = []
    for (b, p), (_, a_prefix) in zip(a_layout, a_convs[:N_CONV_FROM_A], strict=True):
        if (b, p) not in targets:
            raise CheckpointError(
                f"model.init_from: this model has no conv at block {b + 1}, position {p + 1}"
            )
        pairs.append((a_prefix, targets[(b, p)]))
    pairs += [(f"classifier.{i}", f"classifier.{i}") for i in (0, 3, 6)]
    own = model.state_dict()
    copied = []
    for src, dst in pairs:
        for suffix in ("weight", "bias"):
            s_key, d_key = f"{src}.{suffix}", f"{dst}.{suffix}"
            if s_key not in source or d_key not in own:
                raise CheckpointError(
                    f"model.init_from: {s_key} missing in {path} or {d_key} missing in the model"
                )
            if source[s_key].shape != own[d_key].shape:
                raise CheckpointError(
                    f"model.init_from: {s_key} {tuple(source[s_key].shape)} in {path} does not fit "
                    f"{d_key} {tuple(own[d_key].shape)}"
                )
            own[d_key] = source[s_key].clone()
            copied.append(d_key)
    model.load_state_dict(own)
    if log:
        log.info("initialised %d tensors from %s (A's first 4 convs + 3 FC layers, §3.1)", len(copied), path)
    return copied
