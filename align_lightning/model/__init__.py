"""Dual-encoder model: timm image tower, Hugging Face text tower, projections and temperature."""

from align_lightning.model.dual_encoder import DualEncoder
from align_lightning.model.towers import ImageTower, TextTower

__all__ = ["DualEncoder", "ImageTower", "TextTower"]
