"""The one definition of the image transforms, read by every loader backend and by ``evaluate``.

    from data_pipeline.transforms import TransformSpec
    spec = TransformSpec.from_config(cfg.data)   # frozen: mean/std, crops, resize, interpolation, augmentation
    spec.val_transform()(pil_image)              # uint8 (3, val_crop, val_crop): resize shorter side, centre crop
    spec.normalize(batch_uint8)                  # float32, (x/255 - mean) / std

Validation (1-crop): resize the shorter side to ``val_resize`` (256) with antialiased bilinear (or bicubic)
interpolation, centre-crop ``val_crop`` (224), scale to [0, 1], subtract ``mean``, divide by ``std``: exactly
torchvision's ``ImageClassification`` preset (``VGG16_Weights.IMAGENET1K_V1.transforms()``).

Training, ``augment``:

* ``rrc`` (torchvision's recipe): RandomResizedCrop to ``train_crop`` (area fraction ``rrc_scale``, aspect
  ratio ``rrc_ratio``, log-uniform), then a horizontal flip with p = 0.5 when ``hflip``.
* ``scale`` (the paper, arXiv 1409.1556 §3.1): shorter side rescaled to S, an integer drawn uniformly from
  [``scale_min``, ``scale_max``] per image (``scale_min == scale_max``: single-scale training), then a random
  ``train_crop`` square crop and the flip.

Either way, the AlexNet "PCA lighting" colour shift (Krizhevsky et al. 2012, §4.1; the paper's "random RGB colour
shift") when ``color_pca_std > 0``: every image gets ``PCA_MATRIX @ alpha`` added to its RGB values, with
``alpha ~ N(0, color_pca_std)`` per image and per component. The shift is constant over the image, so it commutes
with every resize, crop and flip: the backends fold it into the normalisation (``mean - shift``).

Backends: torchvision applies ``train_transform()`` / ``val_transform()`` per image and ``normalize`` per batch on
the device; DALI builds the same operations from the same fields (``data_pipeline.dali_backend``). The DALI
resize is DALI's linear filter with antialiasing (a triangle filter widened by the scale factor when shrinking,
which DALI's docs call the replacement for INTERP_TRIANGULAR), PIL's bilinear resize is the same kind of filter:
the parity tests measure the difference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "PCA_EIGVAL",
    "PCA_EIGVEC",
    "TransformSpec",
    "load_rgb",
    "normalize",
    "open_rgb",
    "resize_shorter",
]

# AlexNet's PCA of ImageNet RGB pixel values in [0, 1] (as published with fb.resnet.torch's Lighting transform and
# used by most reimplementations): eigenvalues, and eigenvectors as columns (rows: R, G, B).
PCA_EIGVAL: tuple[float, float, float] = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class TransformSpec:
    """Every number the train and val transforms use (built from ``cfg.data``; see the module docstring)."""

    augment: str = "rrc"  # rrc | scale
    train_crop: int = 224
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    scale_min: int = 256
    scale_max: int = 512
    hflip: bool = True
    color_pca_std: float = 0.0
    val_resize: int = 256
    val_crop: int = 224
    interpolation: str = "bilinear"  # bilinear | bicubic
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # of RGB values in [0, 1]
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_config(cls, data: Any) -> TransformSpec:
        """From ``cfg.data`` (a ``train.config.DataConfig``) or a whole ``Config``."""
        data = getattr(data, "data", data)
        return cls(
            augment=data.augment,
            train_crop=int(data.train_crop),
            rrc_scale=(float(data.rrc_scale[0]), float(data.rrc_scale[1])),
            rrc_ratio=(float(data.rrc_ratio[0]), float(data.rrc_ratio[1])),
            scale_min=int(data.scale_min),
            scale_max=int(data.scale_max),
            hflip=bool(data.hflip),
            color_pca_std=float(data.color_pca_std),
            val_resize=int(data.val_resize),
            val_crop=int(data.val_crop),
            interpolation=data.interpolation,
            mean=tuple(float(x) for x in data.mean),  # type: ignore[arg-type]
            std=tuple(float(x) for x in data.std),  # type: ignore[arg-type]
        )

    def __post_init__(self) -> None:
        if self.augment not in ("rrc", "scale"):
            raise ValueError(f"augment must be rrc or scale, got {self.augment!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )

    # ------------------------------------------------------------------------------------- derived numbers

    @property
    def mean255(self) -> tuple[float, float, float]:
        """``mean`` on the 0..255 scale of decoded uint8 pixels."""
        return tuple(255.0 * m for m in self.mean)  # type: ignore[return-value]

    @property
    def std255(self) -> tuple[float, float, float]:
        """``std`` on the 0..255 scale of decoded uint8 pixels."""
        return tuple(255.0 * s for s in self.std)  # type: ignore[return-value]

    @property
    def interpolation_mode(self) -> InterpolationMode:
        return INTERPOLATIONS[self.interpolation]

    @staticmethod
    def pca_matrix255(device: torch.device | str = "cpu") -> torch.Tensor:
        """(3, 3) M with shift = M @ alpha on the 0..255 scale: eigenvectors scaled by their eigenvalues × 255.
        (Cached per device: do not modify it in place.)"""
        return _pca_matrix255(torch.device(device))

    def pca_shift(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, 3) RGB shifts on the 0..255 scale, one per image: M @ alpha with alpha ~ N(0, color_pca_std).

        Drawn on the generator's device (a CUDA generator keeps the draw on the GPU, no host sync)."""
        device = generator.device if generator is not None else torch.device("cpu")
        alpha = torch.randn(n, 3, generator=generator, device=device) * self.color_pca_std
        return alpha @ self.pca_matrix255(device).T

    # ------------------------------------------------------------------------------ torchvision transforms

    def train_resize(self) -> v2.Transform:
        """The size-changing step of training: RandomResizedCrop (rrc) or the rescale to a random S (scale)."""
        if self.augment == "rrc":
            return v2.RandomResizedCrop(
                self.train_crop,
                scale=self.rrc_scale,
                ratio=self.rrc_ratio,
                interpolation=self.interpolation_mode,
                antialias=True,
            )
        # RandomResize draws an integer in [min_size, max_size) and resizes the shorter side to it.
        return v2.RandomResize(
            self.scale_min, self.scale_max + 1, interpolation=self.interpolation_mode, antialias=True
        )

    def train_transform(self) -> v2.Compose:
        """Per image, PIL image or uint8 (3, H, W) tensor in, uint8 (3, train_crop, train_crop) tensor out.

        Normalisation and the PCA colour shift come later, per batch (``normalize``, ``pca_shift``).
        """
        steps: list[v2.Transform] = [self.train_resize()]
        if self.augment == "scale":
            steps.append(v2.RandomCrop(self.train_crop))
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        steps.append(v2.PILToTensor())  # passes tensors through
        return v2.Compose(steps)

    def val_transform(self) -> v2.Compose:
        """Per image, PIL image or uint8 tensor in, uint8 (3, val_crop, val_crop) out: shorter side to
        ``val_resize``, centre crop ``val_crop`` (torchvision's ``ImageClassification`` before its dtype step)."""
        return v2.Compose(
            [
                v2.Resize(self.val_resize, interpolation=self.interpolation_mode, antialias=True),
                v2.CenterCrop(self.val_crop),
                v2.PILToTensor(),
            ]
        )

    def normalize(self, images: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 or float (..., 3, H, W) on the 0..255 scale → float32 ``(x - 255·mean + shift) / (255·std)``.

        ``shift``: optional (N, 3) PCA colour shifts (``pca_shift``) for a (N, 3, H, W) batch. Keeps the memory
        format (channels_last in, channels_last out).
        """
        return normalize(images, self.mean, self.std, shift)


# ------------------------------------------------------------------------------ helpers (evaluate, backends)


def open_rgb(path: str | Path | bytes) -> PILImage:
    """Decode an image file (or an encoded image in memory: a pack's member) to an RGB PIL image, as the
    torchvision backend does (PIL, libjpeg-turbo): greyscale and CMYK JPEGs are converted to RGB, a PNG under a
    .JPEG name is read as PNG."""
    import io

    from PIL import Image

    with io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb") as f, Image.open(f) as img:
        return img.convert("RGB")  # a loaded copy: valid after the file is closed


def load_rgb(path: str | Path) -> torch.Tensor:
    """``open_rgb`` as a uint8 (3, H, W) tensor."""
    return TF.pil_to_tensor(open_rgb(path))


def resize_shorter(
    image: torch.Tensor | PILImage, size: int, interpolation: str = "bilinear"
) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (the longer side: int(size × long / short), as torchvision does),
    antialiased. A PIL image or a CPU uint8 (3, H, W) tensor is resized with PIL, exactly as the torchvision
    backend and torchvision's presets resize PIL images, and comes back as a uint8 tensor; anything else with
    torch's antialiased kernel."""
    mode = INTERPOLATIONS[interpolation]
    if isinstance(image, torch.Tensor):
        if not (
            image.device.type == "cpu"
            and image.dtype == torch.uint8
            and image.ndim == 3
            and image.shape[0] == 3
        ):
            return TF.resize(image, [size], interpolation=mode, antialias=True)
        image = TF.to_pil_image(image)
    return TF.pil_to_tensor(TF.resize(image, [size], interpolation=mode, antialias=True))


@functools.lru_cache(maxsize=16)
def _pca_matrix255(device: torch.device) -> torch.Tensor:
    return (torch.tensor(PCA_EIGVEC, dtype=torch.float32) * torch.tensor(PCA_EIGVAL) * 255.0).to(device)


@functools.lru_cache(maxsize=16)
def _mean_inv_std(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) 255·mean and 1/(255·std) on ``device``, made once (a host→GPU copy per batch would sync)."""
    mean_t = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=device).view(3, 1, 1)
    inv_std = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device).view(3, 1, 1)
    return mean_t, inv_std


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 or float (..., 3, H, W) on the 0..255 scale → float32 ``(x - 255·mean [+ shift]) / (255·std)``,
    ``mean``/``std`` given for values in [0, 1] (``cfg.data.mean``/``std``). Keeps the memory format."""
    dev = images.device
    mean_t, inv_std = _mean_inv_std(tuple(float(m) for m in mean), tuple(float(s) for s in std), dev)
    out = images.to(torch.float32)  # a new tensor for uint8 input; in-place ops below are then safe
    if out is images:
        out = images.clone()
    if shift is not None:
        out = out.sub_(mean_t - shift.to(device=dev, dtype=torch.float32).view(-1, 3, 1, 1))
    else:
        out = out.sub_(mean_t)
    return out.mul_(inv_std)
