"""Dual-encoder model: towers (timm, Hugging Face), projections, temperature; Hugging Face ALIGN import/export."""

from align_lightning.model.dual_encoder import DualEncoder
from align_lightning.model.hf_align import (
    AlignVisionTower,
    from_hf_align,
    hf_align_state_dict,
    load_hf_align_tokenizer,
    load_hf_align_weights,
    to_hf_align,
)
from align_lightning.model.towers import ImageTower, TextTower

__all__ = [
    "AlignVisionTower",
    "DualEncoder",
    "ImageTower",
    "TextTower",
    "from_hf_align",
    "hf_align_state_dict",
    "load_hf_align_tokenizer",
    "load_hf_align_weights",
    "to_hf_align",
]
