"""Tests for align_lightning/data/collate.py."""

from __future__ import annotations

import pytest
import torch

from align_lightning.data import ImageTextCollator, clean_caption, train_wordpiece


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    return train_wordpiece(["a red circle", "a blue square on the top", "green"] * 10, vocab_size=100)


def test_clean_caption() -> None:
    assert clean_caption("  A red\n\tcircle   on  top ") == "A red circle on top"


def test_collate_stacks_and_tokenises(tokenizer) -> None:  # noqa: ANN001
    collate = ImageTextCollator(tokenizer, max_length=5)
    batch = collate([(torch.zeros(3, 8, 8), "a red circle"), (torch.ones(3, 8, 8), "a  blue\nsquare on the top")])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 5)  # truncated to max_length
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1]
    assert batch["input_ids"][1, -1].item() == tokenizer.sep_token_id  # truncation keeps [SEP]
    short = collate([(torch.zeros(3, 8, 8), "green")])
    assert short["input_ids"].shape == (1, 3)  # padded to the longest caption only


def test_pad_to_max_length(tokenizer) -> None:  # noqa: ANN001
    batch = ImageTextCollator(tokenizer, max_length=16, pad_to_max_length=True)([(torch.zeros(3, 8, 8), "green")])
    assert batch["input_ids"].shape == (1, 16)
    assert batch["attention_mask"].sum().item() == 3


def test_empty_caption_batch_is_a_clear_error(tokenizer) -> None:  # noqa: ANN001
    collate = ImageTextCollator(tokenizer)
    with pytest.raises(ValueError, match="empty caption batch"):
        collate([])
    with pytest.raises(ValueError, match="empty caption batch"):
        collate.tokenize([])
