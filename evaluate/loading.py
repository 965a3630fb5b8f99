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

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "ReleasedWeights",
    "fetch_weights",
    "file_sha256",
    "infer_spec",
    "load_model",
    "looks_like_weights",
    "released_weights",
]

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
    """Hex sha256 of a file (torchvision's weight file names carry its first 8 hex digits). Remembered per
    (path, size, mtime): a released weight file's hash is checked before loading and recorded after."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------- torchvision's released weights


@dataclass(frozen=True)
class ReleasedWeights:
    """One of torchvision's released VGG weight files, and where torch.hub caches it."""

    name: str  # "VGG16_BN_Weights.IMAGENET1K_V1", or the URL it was given as
    url: str
    path: Path  # <torch.hub.get_dir()>/checkpoints/<file name>, as torchvision's own loading puts it
    arch: str | None  # None for a URL (read off the weights' shapes once loaded)
    hash_prefix: str | None  # the sha256 prefix in the file name (torch.hub's HASH_REGEX)


def looks_like_weights(text: str) -> bool:
    """Whether ``text`` names released weights rather than a file: a URL, ``DEFAULT``, or ``<X>_Weights.<NAME>``."""
    return (
        "://" in text
        or text in ("DEFAULT", "default")
        or "_Weights." in text
        or text.startswith("IMAGENET1K_")
    )


def _vgg_weight_names() -> list[str]:
    from torchvision.models import get_model_weights

    return [f"{get_model_weights(a).__name__}.{m}" for a in ARCHS if ARCHS[a].in_torchvision
            for m in get_model_weights(a).__members__]  # fmt: skip


def released_weights(name: str, arch: str | None = None) -> ReleasedWeights:
    """torchvision's weights named as its enums name them (``VGG16_BN_Weights.IMAGENET1K_V1``,
    ``VGG16_BN_Weights.DEFAULT``; ``DEFAULT`` or ``IMAGENET1K_V1`` with ``arch``), or their URL. CheckpointError
    (one line, with "did you mean" for a misspelt name) otherwise."""
    from urllib.parse import urlparse

    from torchvision.models import get_model_weights, get_weight

    from train.flags import did_you_mean

    if "://" in name:
        url, enum_arch = name, None
    else:
        if "." not in name:  # DEFAULT / IMAGENET1K_V1: the arch's enum
            if arch is None:
                raise CheckpointError(f"--weights {name} needs --arch (vgg11, vgg11_bn, ..., vgg19_bn)")
            if arch not in ARCHS or not ARCHS[arch].in_torchvision:
                raise CheckpointError(f"--arch {arch}: torchvision released no weights for it")
            name = f"{get_model_weights(arch).__name__}.{name.upper()}"
        try:
            weights = get_weight(name)
        except (ValueError, KeyError, AttributeError):
            hint = did_you_mean(name, _vgg_weight_names())
            also = f" (did you mean {hint}?)" if hint else "; e.g. VGG16_BN_Weights.IMAGENET1K_V1"
            raise CheckpointError(f"--weights {name}: not one of torchvision's weights{also}") from None
        enum_arch = type(weights).__name__.removesuffix("_Weights").lower()
        if enum_arch not in ARCHS:
            raise CheckpointError(f"--weights {name}: not a VGG (this project evaluates vgg11 ... vgg19_bn)")
        if not weights.meta.get("categories"):
            raise CheckpointError(
                f"--weights {weights}: only the conv trunk (its classifier is not trained; a detection backbone): "
                f"use {type(weights).__name__}.IMAGENET1K_V1"
            )
        if arch is not None and arch != enum_arch:
            raise CheckpointError(f"--arch {arch} but --weights {weights} is a {enum_arch}")
        url, name = weights.url, str(weights)
    file_name = os.path.basename(urlparse(url).path)
    if not file_name:
        raise CheckpointError(f"--weights {url}: the URL names no file")
    match = torch.hub.HASH_REGEX.search(file_name)
    path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    return ReleasedWeights(name, url, path, enum_arch, match.group(1) if match and match.group(1) else None)


def fetch_weights(weights: ReleasedWeights, timeout_s: float = 60.0) -> Path:
    """The weight file in torch.hub's cache, downloaded there first when missing (sha256 prefix checked as
    torchvision's loading checks it). Offline: CheckpointError, one line naming the URL and the path to put the
    file at. torch.hub checks the hash only when it downloads; a cached file whose sha256 does not start with the
    name's prefix is not torchvision's: said in a warning on stderr (its numbers are not the release's)."""
    import socket
    import sys
    import urllib.error

    path = weights.path
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)  # urllib's connect and reads: no wait of minutes on a firewall
        try:
            torch.hub.download_url_to_file(
                weights.url, str(path), weights.hash_prefix, progress=sys.stderr.isatty()
            )
        except (OSError, urllib.error.URLError, RuntimeError) as e:  # RuntimeError: torch.hub's hash mismatch
            text = str(getattr(e, "reason", None) or e).strip()
            reason = text.splitlines()[0] if text else type(e).__name__
            raise CheckpointError(
                f"cannot download {weights.url} ({reason}); offline, put that file at {path} (torch.hub's cache: "
                "$TORCH_HOME/hub/checkpoints) and run this again"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    elif weights.hash_prefix and not file_sha256(path).startswith(weights.hash_prefix):
        print(
            f"warning: {path}: sha256 {file_sha256(path)[:12]}... does not start with {weights.hash_prefix} as "
            "torchvision's file name says: not the released file (torch.hub checks the hash only when it "
            "downloads), so its numbers are not the release's; delete it to download the released one",
            file=sys.stderr,
            flush=True,
        )
    return path


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
