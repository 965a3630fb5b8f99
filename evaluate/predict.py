"""Top-5 predictions for image files, printed as torchvision's hub page example prints them (name, probability).

    python evaluate --checkpoint vgg16_bn-6c64b313.pth --predict dog.jpg cat.jpg
    python evaluate --checkpoint runs/demo/best.pth --data data/demo --predict data/demo/val/n99000003/*.JPEG

Images go through the 1-crop val view (resize, centre crop, normalise) of the evaluation. Class names: for a
1000-class model, ImageNet's (torchvision's category names, ``evaluate/imagenet_classes.py``); otherwise the data root's
``class_index.json`` (the demo tree's, in ``imagenet_class_index.json``'s format) or, lacking one, its val
folder names (wnids); else "class <i>".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data_pipeline.base import decode_error_reason
from data_pipeline.layout import DataError, index_split
from data_pipeline.shard_reader import is_pack, load_manifest
from data_pipeline.transforms import TransformSpec
from evaluate.imagenet_classes import NUM_CLASSES, imagenet_names

__all__ = ["Prediction", "class_names", "format_predictions", "predict_images"]


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[int, str, float]]  # (class index, name, probability), most probable first


def class_names(num_classes: int, data_root: str | Path | None) -> tuple[list[str], str]:
    """(names by class index, where they came from) for a model with ``num_classes`` outputs."""
    if data_root is not None:
        root = Path(data_root)
        index_file = root / "class_index.json"
        if index_file.is_file():
            try:
                raw = json.loads(index_file.read_text())
                names = [str(raw[str(i)][1]) for i in range(len(raw))]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise DataError(f"{index_file} is not in imagenet_class_index.json's format ({e})") from None
            source = str(index_file)
        elif is_pack(root):
            names, source = load_manifest(root)["classes"], f"{root}/manifest.json classes"
        else:
            names, source = index_split(root, "val").classes, f"{root}/val folder names"
        if len(names) != num_classes:
            raise DataError(f"{source} names {len(names)} classes but the model has {num_classes} outputs")
        return names, source
    if num_classes == NUM_CLASSES:
        return imagenet_names(), "ImageNet-1k (torchvision's category names)"
    return [f"class {i}" for i in range(num_classes)], "class indices (no --data given)"


@torch.inference_mode()
def predict_images(
    model: nn.Module,
    paths: Sequence[str],
    spec: TransformSpec,
    names: Sequence[str],
    device: torch.device,
    k: int = 5,
) -> list[Prediction]:
    """Top-k classes and soft-max probabilities of each image, through the torchvision backend's 1-crop val path
    (PIL decode, ``spec.val_transform()``, ``spec.normalize``). Raises DataError for an unreadable file."""
    from data_pipeline.torchvision_backend import decode

    model.eval()
    transform = spec.val_transform()
    out = []
    for path in paths:
        try:
            image = decode(str(path))
        except Exception as e:  # PIL: OSError / UnidentifiedImageError; FileNotFoundError
            raise DataError(f"cannot read image {path} ({decode_error_reason(e)})") from None
        x = spec.normalize(transform(image).unsqueeze(0)).to(device)
        probs = model(x).float().softmax(dim=1)[0]
        p, idx = probs.topk(min(k, probs.numel()))
        out.append(
            Prediction(str(path), [(int(i), names[int(i)], float(q)) for q, i in zip(p, idx, strict=True)])
        )
    return out


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """One block per image: its path, then ``name probability`` lines like torchvision's hub example."""
    lines = []
    for pred in predictions:
        lines.append(f"{pred.path}:")
        lines += [f"  {name} {prob:.6f}" for _, name, prob in pred.top]
    return "\n".join(lines)
