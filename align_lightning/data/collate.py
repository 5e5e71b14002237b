"""Batch collation: stack images, clean and tokenise captions once per batch."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

__all__ = ["ImageTextCollator", "clean_caption"]

_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Strip and collapse whitespace (alt-texts carry newlines, tabs and runs of spaces)."""
    return _WHITESPACE.sub(" ", text).strip()


class ImageTextCollator:
    """Collate ``(image, caption)`` pairs into the model's batch dict.

    Tokenising a whole batch in one call of a fast tokenizer is much cheaper than per sample.

    Args:
        tokenizer: A Hugging Face tokenizer.
        max_length: Truncate captions to this many tokens (ALIGN: 64).
        pad_to_max_length: Pad every batch to ``max_length`` (static shapes, e.g. for
            ``torch.compile``) instead of to its longest caption.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int = 64, pad_to_max_length: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = "max_length" if pad_to_max_length else "longest"

    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise captions into ``input_ids`` and ``attention_mask`` ``(B, L)`` tensors.

        Raises:
            ValueError: For an empty list of captions.
        """
        if len(captions) == 0:
            raise ValueError(
                "Got an empty caption batch: nothing to tokenise. Every batch needs at least one (image, caption) "
                "pair; check the data source and any filtering that runs before collation."
            )
        encoded = self.tokenizer(
            [clean_caption(c) for c in captions],
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def __call__(self, samples: Sequence[tuple[Tensor, str]]) -> dict[str, Tensor]:
        """Collate a list of ``(pixels, caption)`` samples.

        Returns:
            ``{"pixel_values": (B, 3, H, W), "input_ids": (B, L), "attention_mask": (B, L)}``.
        """
        text = self.tokenize([caption for _, caption in samples])  # first: it explains an empty batch
        return {"pixel_values": torch.stack([image for image, _ in samples]), **text}
