"""torch.hub entry points: one per architecture in train.models.ARCHS (all but `custom`).

    import torch
    model = torch.hub.load("/path/to/this/repo", "vgg16_bn", source="local")  # random init
    model = torch.hub.load("/path/to/this/repo", "vgg16_bn", source="local", weights="runs/x/best.pth")
    model = torch.hub.load("/path/to/this/repo", "vgg16_bn", source="local", weights="vgg16_bn-6c64b313.pth")
    model = torch.hub.load("/path/to/this/repo", "vgg16_c", source="local", num_classes=10)

torch.hub puts the repository folder first on sys.path, so this works without `pip install`. torch.hub.list and
torch.hub.help only take GitHub repos ("owner/name"); for a local clone, `python -c "import hubconf;
help(hubconf.vgg16_bn)"` shows an entry's docstring.
"""

from __future__ import annotations

import os as _os
from typing import Any as _Any

from train.checkpoint import CheckpointError as _CheckpointError
from train.checkpoint import load_checkpoint_file as _load_checkpoint_file
from train.checkpoint import load_weights as _load_weights
from train.models import ARCHS as _ARCHS
from train.models import build_model as _build_model

dependencies = ["torch", "torchvision"]


def _load(arch: str, weights: _Any, progress: bool, **kwargs: _Any):
    if isinstance(weights, str | _os.PathLike):
        checkpoint = _load_checkpoint_file(weights)
        stored = checkpoint.get("config") if isinstance(checkpoint, dict) and "model" in checkpoint else None
        if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
            # Ours: the stored config knows the class count and classifier width (explicit kwargs still win).
            model_cfg = stored["model"]
            if model_cfg.get("arch") not in (None, arch):
                raise _CheckpointError(
                    f"{weights} holds a {model_cfg['arch']} (its stored config), not a {arch}"
                )
            for key in ("num_classes", "classifier_width"):
                if key in model_cfg:
                    kwargs.setdefault(key, model_cfg[key])
        return _load_weights(_build_model(arch, **kwargs), checkpoint, strict=True, arch=arch)
    model = _build_model(arch, **kwargs)
    if weights is None:
        return model
    # A torchvision weights enum member, e.g. torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1 (downloads).
    get_state_dict = getattr(weights, "get_state_dict", None)
    if get_state_dict is None:
        kind = type(weights).__name__
        raise TypeError(f"weights must be None, a checkpoint path or a torchvision weights enum, got {kind}")
    return _load_weights(model, get_state_dict(progress=progress, check_hash=True), strict=True, arch=arch)


def _entry(arch: str):
    spec = _ARCHS[arch]

    def entry(weights=None, progress=True, **kwargs):
        return _load(arch, weights, progress, **kwargs)

    entry.__name__ = entry.__qualname__ = arch
    if spec.in_torchvision:
        origin = f"the same model as torchvision.models.{arch}()"
        released = f" or torchvision's released bare state_dict ({arch}-*.pth)"
        enum = ", or a torchvision weights enum member (downloaded)"
    else:
        origin, released, enum = "not in torchvision", "", ""
    entry.__doc__ = f"""VGG {arch}: configuration {spec.display} of Simonyan & Zisserman (arXiv 1409.1556); {origin}.

    {spec.description}.

    Args:
        weights: None for random initialisation (torchvision's), or a checkpoint file, loaded strictly with
            torch.load(weights_only=True): ours ({{'model': state_dict, ...}}; DDP / torch.compile prefixes are
            stripped){released}{enum}.
        progress: show a progress bar while downloading a torchvision weights enum.
        **kwargs: passed to train.models.build_model: num_classes (1000), dropout (0.5), classifier_width
            (4096). They must match the checkpoint; for our checkpoints num_classes and classifier_width default
            to the stored config's (a 10-class run loads without num_classes=10).
    """
    return entry


# One real module-level function per registry entry (torch.hub.list lists public callables of this module).
vgg11 = _entry("vgg11")
vgg11_bn = _entry("vgg11_bn")
vgg11_lrn = _entry("vgg11_lrn")
vgg13 = _entry("vgg13")
vgg13_bn = _entry("vgg13_bn")
vgg16_c = _entry("vgg16_c")
vgg16 = _entry("vgg16")
vgg16_bn = _entry("vgg16_bn")
vgg19 = _entry("vgg19")
vgg19_bn = _entry("vgg19_bn")

_missing = sorted(set(_ARCHS) - {"custom"} - set(globals()))
if _missing:  # a new arch in train.models.ARCHS needs its line above
    raise ImportError(f"hubconf.py lacks entry points for {', '.join(_missing)}")
