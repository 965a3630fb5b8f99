"""data_pipeline: the ImageNet layout, the demo dataset, the transforms and the train/val loaders.

    from data_pipeline import build_loader
    loader = build_loader(cfg, "train", rank=0, world_size=1, device=torch.device("cpu"))

``build_loader`` and ``Loader`` are imported on first use, so ``python -m data_pipeline demo`` and the
preparation tools do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from data_pipeline.layout import DataError

if TYPE_CHECKING:
    from data_pipeline.loader import Loader, build_loader

__all__ = ["DataError", "Loader", "build_loader"]


def __getattr__(name: str) -> Any:
    if name in ("Loader", "build_loader"):
        from data_pipeline import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
