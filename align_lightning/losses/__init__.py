"""Contrastive losses."""

from align_lightning.losses.contrastive import ContrastiveLoss, contrastive_loss

__all__ = ["ContrastiveLoss", "contrastive_loss"]
