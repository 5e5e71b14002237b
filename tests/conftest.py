"""Shared tiny, offline fixtures: nothing here downloads anything."""

from __future__ import annotations

import os

# Tests must never reach a model hub (set before transformers / huggingface_hub read it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from align_lightning.model import DualEncoder, ImageTower, TextTower  # noqa: E402

#: Quickstart data overrides for a CLI run of seconds: few tiny pairs, no worker processes.
TINY_DATA_ARGS = [
    "--data.init_args.num_train=32",
    "--data.init_args.num_val=16",
    "--data.init_args.batch_size=8",
    "--data.init_args.image_size=32",
    "--data.init_args.num_workers=0",
]

TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def image_tower() -> ImageTower:
    return ImageTower("test_efficientnet")


@pytest.fixture
def text_tower() -> TextTower:
    return TextTower(config=TINY_BERT)


@pytest.fixture
def dual_encoder(image_tower: ImageTower, text_tower: TextTower) -> DualEncoder:
    return DualEncoder(image_tower, text_tower)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(5, TINY_BERT["vocab_size"], (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    return {"pixel_values": torch.randn(4, 3, 64, 64), "input_ids": input_ids, "attention_mask": attention_mask}
