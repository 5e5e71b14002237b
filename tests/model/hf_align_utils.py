"""Tiny random Hugging Face ``AlignModel`` checkpoints for offline tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AlignConfig, AlignModel, PreTrainedTokenizerBase

from tests.conftest import TINY_BERT

#: A small EfficientNet (10 blocks, 80-d pooled features) in AlignModel's layout.
TINY_VISION = {"width_coefficient": 0.25, "depth_coefficient": 0.4, "hidden_dim": 64, "drop_connect_rate": 0.2}
#: A 2-layer BERT.
TINY_TEXT = {key: value for key, value in TINY_BERT.items() if key != "model_type"}
#: Width of TINY_VISION's pooled feature: AlignModel's projection_dim must equal it.
TINY_EMBED_DIM = 80


def tiny_align(vocab_size: int = TINY_TEXT["vocab_size"], temperature: float = 0.05, seed: int = 0) -> AlignModel:
    """A random tiny AlignModel in eval mode, with non-trivial BatchNorm statistics and affine parameters
    (a fresh model's are the identity, which would hide a BatchNorm that is skipped or misconfigured)."""
    torch.manual_seed(seed)
    config = AlignConfig(
        text_config={**TINY_TEXT, "vocab_size": vocab_size},
        vision_config=TINY_VISION,
        projection_dim=TINY_EMBED_DIM,
        temperature_init_value=temperature,
    )
    model = AlignModel(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def save_tiny_align(
    folder: Path, tokenizer: PreTrainedTokenizerBase | None = None, temperature: float = 0.05, seed: int = 0
) -> Path:
    """``save_pretrained`` a :func:`tiny_align` (vocabulary = the tokenizer's, whose files go along) to ``folder``."""
    vocab_size = len(tokenizer) if tokenizer is not None else TINY_TEXT["vocab_size"]
    tiny_align(vocab_size, temperature, seed).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
