"""The paper's test protocols (Simonyan & Zisserman, arXiv 1409.1556, §3.2 and §4.2–4.3, Tables 3–5).

    python evaluate --checkpoint vgg16-397923af.pth --data /datasets/imagenet --protocol dense
    python evaluate --checkpoint runs/paper-vgg16/best.pth --protocol dense --multi-scale
    python evaluate --checkpoint runs/paper-vgg16/best.pth --protocol dense+multi-crop --multi-scale

Every image is isotropically rescaled so its shorter side is Q (each Q of the test scales), with the same
decoding, interpolation (antialiased), mean and std as the 1-crop val transform (``data_pipeline``), then:

* dense: the network is applied to the whole rescaled image, with the fully connected layers turned into
  convolutions (fc6 a conv whose kernel covers the training crop's feature map — 7×7 at 224 —, fc7 and fc8 1×1
  convs); the class score map is spatially averaged (sum-pooled), soft-maxed, and the posteriors of the image
  and its horizontal flip are averaged (§3.2).
* multi-crop: a 5×5 regular grid of training-size crops (224) × 2 flips = 50 crops per scale, posteriors averaged
  (§3.2, §4.3; 150 crops over 3 scales, as Table 5).
* dense+multi-crop: the average of the two posteriors (Table 5's "multi-crop & dense").

Posteriors are averaged over the test scales Q. One image at a time (sizes vary), so these protocols are far
slower than 1-crop: dense costs about (Q/224)² × 2 forward passes' worth per scale (× the image's aspect ratio),
multi-crop 50 crops per scale. Measured per image on a shared 2-core CPU (vgg16, fp32, 4 images): 1-crop (batch
of 4) 0.46 s, dense Q=256 2.2 s (4.8×), dense Q={256,384,512} 9.8 s (21×), multi-crop Q=256 19 s (41×).

torchvision's VGG puts an ``AdaptiveAvgPool2d((7, 7))`` before the classifier; a model trained on crops whose
feature map is f×f (f = crop / 32) therefore saw fc6 applied to pool(f×f → 7×7). That pooling is linear, so the
equivalent convolution has an f×f kernel: fc6's 7×7 weights folded through the pooling matrix. At 224 (f = 7)
the pooling is the identity and this is exactly the paper's conversion; at a 64 px crop (f = 2) it is what
makes dense evaluation of a small-crop model correct. ``DenseVGG`` on an image of exactly the training crop
gives the same scores as the original network (tests check it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data_pipeline.base import decode_error_reason, val_shard, worker_error_line
from data_pipeline.layout import DataError
from data_pipeline.transforms import TransformSpec, open_rgb, resize_shorter
from evaluate.core import Counts, precision_context, reduce_counts, topk_hits

__all__ = [
    "PROTOCOLS",
    "DenseVGG",
    "ScaledImages",
    "crop_grid",
    "default_scales",
    "evaluate_protocol",
    "feature_size",
]

PROTOCOLS = ("1-crop", "dense", "multi-crop", "dense+multi-crop")
GRID = 5  # multi-crop: GRID x GRID crops per scale (the paper's 5x5), each also flipped


def feature_size(features: nn.Module, size: int) -> int:
    """Side of the feature map ``features`` produce from a ``size`` × ``size`` input (each max pool halves it)."""
    for m in features.modules():
        if isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            size = (size - k) // s + 1
    return size


class DenseVGG(nn.Module):
    """A torchvision VGG made fully convolutional (paper §3.2): input any size ≥ the training crop, output a
    class score map (N, classes, h, w)."""

    def __init__(self, model: nn.Module, train_crop: int) -> None:
        super().__init__()
        fc6, fc7, fc8 = model.classifier[0], model.classifier[3], model.classifier[6]
        self.features = model.features
        f = feature_size(model.features, train_crop)
        if f < 1:
            raise ValueError(f"training crop {train_crop} px leaves no feature map")
        self.train_crop = train_crop
        self.map_size = f
        pool = model.avgpool
        channels = fc6.in_features // 49
        # The pooling matrix P: (f*f inputs) -> (7*7 outputs), applied to each channel, read off a basis. Made on
        # the weights' device: the evaluator moves the model to the GPU before building this, and the einsum
        # below mixes P with fc6's weights (a CPU basis there raised "Expected all tensors to be on the same
        # device"; tests/test_fake_cuda.py runs this on a fake CUDA device).
        device = fc6.weight.device
        basis = torch.eye(f * f, dtype=torch.float64, device=device).view(f * f, 1, f, f)
        p = pool(basis).reshape(f * f, -1)  # (f*f, 49)
        if p.shape[1] != 49:
            raise ValueError("expected VGG's 7x7 adaptive average pool before the classifier")
        w6 = fc6.weight.detach().double().view(fc6.out_features, channels, 49)
        k6 = torch.einsum("ocq,sq->ocs", w6, p).reshape(fc6.out_features, channels, f, f)
        # Made on the weights' device and in their dtype (not built on the CPU and moved afterwards).
        like = {"device": device, "dtype": fc6.weight.dtype}
        self.fc6 = nn.Conv2d(channels, fc6.out_features, f, **like)
        self.fc7 = nn.Conv2d(fc7.in_features, fc7.out_features, 1, **like)
        self.fc8 = nn.Conv2d(fc8.in_features, fc8.out_features, 1, **like)
        with torch.no_grad():
            self.fc6.weight.copy_(k6.to(fc6.weight.dtype))
            self.fc6.bias.copy_(fc6.bias)
            self.fc7.weight.copy_(fc7.weight.view(*fc7.weight.shape, 1, 1))
            self.fc7.bias.copy_(fc7.bias)
            self.fc8.weight.copy_(fc8.weight.view(*fc8.weight.shape, 1, 1))
            self.fc8.bias.copy_(fc8.bias)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if min(x.shape[-2:]) < self.map_size:
            raise ValueError(
                f"image {tuple(x.shape[-2:])} feature map is smaller than the fc6 kernel {self.map_size}: "
                f"test scales must be >= the training crop ({self.train_crop} px)"
            )
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        return self.fc8(x)


def crop_grid(length: int, crop: int, n: int = GRID) -> list[int]:
    """n evenly spaced crop offsets along an axis, first at 0 and last at length - crop."""
    if length < crop:
        raise ValueError(f"cannot take {crop} px crops from {length} px")
    return [round(i * (length - crop) / (n - 1)) for i in range(n)] if n > 1 else [(length - crop) // 2]


def default_scales(augment: str, scale_min: int, scale_max: int, val_resize: int, multi: bool) -> list[int]:
    """The paper's test scales Q for a model's training scale (§3.2, §4.1–4.2).

    Fixed S (``augment=scale``, scale_min == scale_max): Q = S, multi-scale {S−32, S, S+32}. Jittered S in
    [Smin, Smax]: Q = (Smin+Smax)/2, multi-scale {Smin, (Smin+Smax)/2, Smax}. torchvision's RandomResizedCrop
    training (``augment=rrc``) has no S: Q = val_resize (256), multi-scale {1, 1.5, 2} × val_resize
    ({256, 384, 512}, the paper's Table 5 scales).
    """
    if augment == "scale":
        if scale_min == scale_max:
            s = scale_min
            return [s - 32, s, s + 32] if multi else [s]
        mid = (scale_min + scale_max) // 2
        return [scale_min, mid, scale_max] if multi else [mid]
    return [val_resize, round(1.5 * val_resize), 2 * val_resize] if multi else [val_resize]


class ScaledImages(Dataset):
    """(list of uint8 (3, H, W) tensors, one per test scale Q; label) for (path, label) samples.

    Decoding and resizing are ``data_pipeline.transforms``' (``open_rgb``, ``resize_shorter``): the same PIL decode
    and antialiased resize as the torchvision backend's val transform, each scale resized from the decoded image.
    Normalisation (``spec.normalize``) is left to the consumer, on its device: workers hand over 1 byte a value
    instead of 4 (measured on a 500×375 JPEG at Q = 256, 384, 512: 8.6 ms and 1.9 MB a sample against 12.7 ms and
    7.6 MB when workers normalised, identical values).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], scales: Sequence[int], spec: TransformSpec):
        self.samples = list(samples)
        self.scales = list(scales)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        path, label = self.samples[i]
        try:
            image = open_rgb(path)
        except Exception as e:  # PIL: OSError / UnidentifiedImageError
            raise DataError(f"cannot decode {path} ({decode_error_reason(e)})") from None
        return [resize_shorter(image, q, self.spec.interpolation) for q in self.scales], label


def _posterior_dense(dense: DenseVGG, x: torch.Tensor) -> torch.Tensor:
    """Soft-max of the spatially averaged score map, averaged over the image and its flip: (classes,)."""
    views = torch.stack([x, x.flip(-1)])  # same size: one batch of two
    scores = dense(views).float().mean(dim=(2, 3))
    return scores.softmax(dim=1).mean(dim=0)


def _posterior_multicrop(model: nn.Module, x: torch.Tensor, crop: int) -> torch.Tensor:
    """Average soft-max over a GRID×GRID grid of crop×crop crops and their flips: (classes,)."""
    _, h, w = x.shape
    crops = [
        x[:, top : top + crop, left : left + crop]
        for top in crop_grid(h, crop)
        for left in crop_grid(w, crop)
    ]
    batch = torch.stack(crops)
    batch = torch.cat([batch, batch.flip(-1)])
    return model(batch).float().softmax(dim=1).mean(dim=0)


@torch.inference_mode()
def evaluate_protocol(
    model: nn.Module,
    samples: Sequence[tuple[str, int]],
    protocol: str,
    scales: Sequence[int],
    train_crop: int,
    spec: TransformSpec,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    precision: str = "fp32",
    progress=None,
) -> dict[str, Counts]:
    """Counts for ``protocol`` (dense, multi-crop or dense+multi-crop) over all ``samples``, each once.

    This process takes the contiguous block ``val_shard(len(samples), rank, world_size)`` (the 1-crop loaders'
    split: every image once over all processes); counts are all-reduced. dense+multi-crop also returns the
    dense and multi-crop counts of the same pass (keys: the protocol names).
    """
    if protocol not in PROTOCOLS[1:]:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS[1:])}, got {protocol!r}")
    if not scales or min(scales) < train_crop:
        raise ValueError(f"test scales {list(scales)} must all be >= the training crop {train_crop} px")
    model.eval()
    want_dense = protocol in ("dense", "dense+multi-crop")
    want_crops = protocol in ("multi-crop", "dense+multi-crop")
    dense = DenseVGG(model, train_crop) if want_dense else None
    names = ["dense", "multi-crop", "dense+multi-crop"] if protocol == "dense+multi-crop" else [protocol]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    counts = {name: [zero.clone(), zero.clone()] for name in names}
    n = zero.clone()

    shard = [samples[i] for i in val_shard(len(samples), rank, world_size)]  # the 1-crop loaders' split
    loader = DataLoader(
        ScaledImages(shard, scales, spec),
        batch_size=None,  # one image at a time: sizes differ
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    every = max(1, math.ceil(len(shard) / 10))
    with precision_context(precision, device):
        batches = iter(loader)
        for i in range(1, len(shard) + 1):
            try:
                views, label = next(batches)
            except DataError as e:  # re-raised from a worker with its traceback: keep the last line
                raise DataError(worker_error_line(str(e))) from None
            label_t = torch.full((1,), label, dtype=torch.int64, device=device)  # made there: no host copy
            post: dict[str, torch.Tensor] = {}
            views = [spec.normalize(v.to(device, non_blocking=True)) for v in views]
            if dense is not None:
                post["dense"] = torch.stack([_posterior_dense(dense, v) for v in views]).mean(dim=0)
            if want_crops:
                crops = [_posterior_multicrop(model, v, train_crop) for v in views]
                post["multi-crop"] = torch.stack(crops).mean(dim=0)
            if protocol == "dense+multi-crop":
                post["dense+multi-crop"] = (post["dense"] + post["multi-crop"]) / 2
            for name in names:
                a, b = topk_hits(post[name].view(1, -1), label_t)
                counts[name][0] += a
                counts[name][1] += b
            n += 1
            if progress is not None and i % every == 0:
                progress(i, i)
    return {name: reduce_counts(c1, c5, n) for name, (c1, c5) in counts.items()}
