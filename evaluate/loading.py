"""Loading a model to evaluate: our training checkpoints and torchvision's released bare state_dict files.

    from evaluate.loading import load_model
    loaded = load_model("vgg16_bn-6c64b313.pth")            # arch, classes and width read off the weights
    loaded = load_model("runs/demo/best.pth", arch="vgg11_bn")  # our checkpoint: arch from its stored config

Everything is read with ``torch.load(weights_only=True)`` (``train.checkpoint``), ``module.`` / ``_orig_mod.``
prefixes are stripped, and the architecture comes from the checkpoint's stored config or, for a bare state
dict, from the state dict's keys and shapes: the 10 named archs differ in which ``features.N`` entries hold
weights (pool and LRN positions, BatchNorm) and in their kernel shapes (configuration C's 1×1 convs); the
classifier's shapes give the hidden width and the class count. An ``--arch`` that contradicts what the
checkpoint holds is refused with one line.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_weights
from train.config import Config, ConfigError, from_dict
from train.models import ARCHS, build_features, build_model, build_model_from_config

__all__ = ["LoadedModel", "ModelSpec", "file_sha256", "infer_spec", "load_model"]

_BN_COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class ModelSpec:
    """What a state dict holds: a named arch, its class count and hidden classifier width."""

    arch: str
    num_classes: int
    classifier_width: int


@dataclass
class LoadedModel:
    """A model with its weights loaded (eval mode, on the CPU) and where they came from."""

    model: nn.Module
    spec: ModelSpec
    path: Path
    kind: str  # "checkpoint" (ours: weights + stored config) | "state_dict" (bare, e.g. torchvision's)
    config: Config | None  # the stored training config, for our checkpoints
    arch_source: str  # how the arch was known: "stored config" | "state dict shapes"
    wandb_id: str | None = None
    epoch: int | None = None
    classes: list[str] | None = None  # the class folders it was trained on (our checkpoints; index = label)

    @functools.cached_property
    def sha256(self) -> str:
        """The file's sha256, read when first asked for: only the process writing the record reads the file
        again (a VGG checkpoint is ~0.5-1.6 GB)."""
        return file_sha256(self.path)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file (torchvision's weight file names carry its first 8 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.cache
def _feature_signature(arch: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Sorted (key, shape) of an arch's ``features`` state dict, built on the meta device (no memory, no init)."""
    spec = ARCHS[arch]
    assert spec.layers is not None
    with torch.device("meta"):
        features = build_features(spec.layers, batch_norm=spec.batch_norm)
    return tuple(
        sorted(
            (f"features.{k}", tuple(v.shape))
            for k, v in features.state_dict().items()
            if _BN_COUNTER not in k
        )
    )


def _describe_features(state_dict: Mapping[str, torch.Tensor]) -> str:
    convs = [(k, tuple(v.shape)) for k, v in state_dict.items() if k.startswith("features.") and v.dim() == 4]
    bn = any(k.startswith("features.") and k.endswith("running_mean") for k in state_dict)
    kinds = "x".join(sorted({f"{s[2]}x{s[3]}" for _, s in convs}))
    return f"{len(convs)} conv layers ({kinds} kernels){', BatchNorm' if bn else ''}"


def infer_spec(state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
    """The named arch, class count and classifier width of a VGG state dict (prefixes already stripped).

    Raises CheckpointError (one line) when it is not a VGG state dict or its trunk matches none of the named
    archs (e.g. a ``custom`` layer list, which only our checkpoints' stored config can describe).
    """
    head = [f"classifier.{i}.weight" for i in (0, 3, 6)]
    if not any(k.startswith("features.") for k in state_dict) or not all(k in state_dict for k in head):
        first = ", ".join(list(state_dict)[:4])
        raise CheckpointError(
            f"not a VGG state dict: expected features.* and classifier.0/3/6.weight keys, found {first}, ..."
        )
    fc6, fc7, fc8 = (state_dict[k] for k in head)
    if fc6.dim() != 2 or fc7.dim() != 2 or fc8.dim() != 2:
        raise CheckpointError("not a VGG state dict: classifier.0/3/6.weight are not 2-d Linear weights")
    width, num_classes = int(fc6.shape[0]), int(fc8.shape[0])
    signature = tuple(
        sorted(
            (k, tuple(v.shape))
            for k, v in state_dict.items()
            if k.startswith("features.") and _BN_COUNTER not in k
        )
    )
    matches = [a for a, s in ARCHS.items() if s.layers is not None and _feature_signature(a) == signature]
    if not matches:
        raise CheckpointError(
            f"the weights' conv trunk ({_describe_features(state_dict)}) matches none of the named archs "
            f"({', '.join(a for a in ARCHS if a != 'custom')}); a custom layer list needs our checkpoint with "
            "its stored config"
        )
    return ModelSpec(matches[0], num_classes, width)


def _fill_bn_counters(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add BatchNorm's ``num_batches_tracked`` where the file predates it (PyTorch < 0.4.1 state dicts).

    nn.BatchNorm's own loader fills the counter in for such files; it is unused in eval mode.
    """
    for key, value in model.state_dict().items():
        if key.endswith(_BN_COUNTER) and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)
    return state_dict


def load_model(path: str | os.PathLike[str], arch: str | None = None) -> LoadedModel:
    """Read a checkpoint (ours or a bare state dict), build the matching model and load the weights strictly.

    ``arch``, when given, must agree with what the checkpoint holds. Raises CheckpointError (one line) for a
    missing, truncated or non-checkpoint file, weights that are not a VGG, or an arch mismatch.
    """
    path = Path(path)
    if arch is not None and arch not in ARCHS:
        raise CheckpointError(f"--arch {arch!r} is not one of: {', '.join(ARCHS)}")
    obj = load_checkpoint_file(path)
    try:
        state_dict = extract_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    stored = obj.get("config") if isinstance(obj, Mapping) and "model" in obj else None

    config: Config | None = None
    if isinstance(stored, Mapping):
        try:
            config = from_dict(dict(stored))
        except ConfigError as e:
            raise CheckpointError(f"{path}: the stored training config does not load: {e}") from None
        spec = ModelSpec(config.model.arch, config.model.num_classes, config.model.classifier_width)
        arch_source = "stored config"
        if arch is not None and arch != spec.arch:
            raise CheckpointError(f"--arch {arch} but {path} holds a {spec.arch} (its stored config)")
        model = build_model_from_config(config.model)
    else:
        try:
            spec = infer_spec(state_dict)
        except CheckpointError as e:
            if arch is None:
                raise CheckpointError(f"{path}: {e}; pass --arch if it is one of ours") from None
            # An arch was named: let the strict load below say which keys/shapes do not fit it.
            fc8 = state_dict.get("classifier.6.weight")
            fc6 = state_dict.get("classifier.0.weight")
            nc = int(fc8.shape[0]) if fc8 is not None and fc8.dim() == 2 else 1000
            width = int(fc6.shape[0]) if fc6 is not None and fc6.dim() == 2 else 4096
            spec = ModelSpec(arch, nc, width)
        else:
            if arch is not None and arch != spec.arch:
                raise CheckpointError(
                    f"--arch {arch} but the weights in {path} are a {spec.arch} "
                    f"({_describe_features(state_dict)})"
                )
        arch_source = "state dict shapes"
        if spec.arch == "custom":
            raise CheckpointError(f"{path}: a custom-layer model needs our checkpoint with its stored config")
        model = build_model(spec.arch, num_classes=spec.num_classes, classifier_width=spec.classifier_width)
    try:
        load_weights(model, _fill_bn_counters(model, state_dict), strict=True, arch=spec.arch)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.eval()
    wandb_id = obj.get("wandb_id") if isinstance(obj, Mapping) else None
    epoch = obj.get("epoch") if isinstance(obj, Mapping) else None
    classes = obj.get("classes") if isinstance(obj, Mapping) else None
    return LoadedModel(
        model=model,
        spec=spec,
        path=path,
        kind="checkpoint" if config is not None else "state_dict",
        config=config,
        arch_source=arch_source,
        wandb_id=wandb_id if isinstance(wandb_id, str) and wandb_id else None,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        classes=[str(c) for c in classes] if isinstance(classes, list | tuple) else None,
    )


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """JSON-ready facts about the loaded checkpoint."""
    return {
        "path": str(loaded.path),
        "sha256": loaded.sha256,
        "kind": loaded.kind,
        "arch_source": loaded.arch_source,
        "epoch": loaded.epoch,
        "wandb_id": loaded.wandb_id,
        "num_classes": loaded.spec.num_classes,
        "classifier_width": loaded.spec.classifier_width,
    }
