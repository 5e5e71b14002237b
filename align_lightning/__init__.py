"""align_lightning: ALIGN-style contrastive image-text pre-training with PyTorch Lightning.

The top-level names are imported lazily, so ``from align_lightning.losses import contrastive_loss``
does not pay for importing Lightning, timm and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "ALIGNModule": "align_lightning.module",
    "ContrastiveLoss": "align_lightning.losses",
    "DualEncoder": "align_lightning.model",
    "GradCache": "align_lightning.grad_cache",
    "ImageTower": "align_lightning.model",
    "TextTower": "align_lightning.model",
    "contrastive_loss": "align_lightning.losses",
}

__all__ = [
    "ALIGNModule",
    "ContrastiveLoss",
    "DualEncoder",
    "GradCache",
    "ImageTower",
    "TextTower",
    "__version__",
    "contrastive_loss",
]

if TYPE_CHECKING:
    from align_lightning.grad_cache import GradCache
    from align_lightning.losses import ContrastiveLoss, contrastive_loss
    from align_lightning.model import DualEncoder, ImageTower, TextTower
    from align_lightning.module import ALIGNModule


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'align_lightning' has no attribute {name!r}")
