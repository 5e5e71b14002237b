"""Tests for align_lightning/model/towers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from align_lightning._errors import ConfigError
from align_lightning.model import ImageTower, TextTower
from tests.conftest import TINY_BERT


def test_image_tower_drops_efficientnet_head_conv() -> None:
    """ALIGN pools the last block: width = last block's channels, no 1x1 head conv."""
    tower = ImageTower("test_efficientnet")
    reference = timm.create_model("test_efficientnet", num_classes=0)
    last_block_channels = reference.blocks[-1][-1].conv_pwl.out_channels
    assert tower.output_dim == last_block_channels != reference.num_features
    assert isinstance(tower.model.conv_head, torch.nn.Identity)
    out = tower(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, last_block_channels)
    # Equal to average-pooling the last block's output of the unchanged network.
    tower.eval()
    reference.load_state_dict(tower.model.state_dict(), strict=False)
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = reference.blocks(reference.bn1(reference.conv_stem(x)))
        torch.testing.assert_close(tower(x), features.mean(dim=(2, 3)))


def test_image_tower_keep_head_conv_option() -> None:
    tower = ImageTower("test_efficientnet", keep_head_conv=True)
    assert tower.output_dim == timm.create_model("test_efficientnet", num_classes=0).num_features
    assert tower(torch.randn(1, 3, 64, 64)).shape == (1, tower.output_dim)


def test_image_tower_any_timm_model() -> None:
    tower = ImageTower("test_resnet")
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, tower.output_dim)


def test_image_tower_b7_width_without_weights() -> None:
    """EfficientNet-B7 as ALIGN: 640-d pooled feature (built on the meta device: no memory, no download)."""
    with torch.device("meta"):
        tower = ImageTower("efficientnet_b7")
    assert tower.output_dim == 640


def test_image_tower_loads_local_checkpoint(tmp_path: Path) -> None:
    """The pretrained-weights path, offline: a locally saved timm state dict."""
    source = timm.create_model("test_efficientnet", num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    tower = ImageTower("test_efficientnet", checkpoint_path=str(path))
    for name, tensor in tower.model.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[name])


def test_image_tower_errors() -> None:
    with pytest.raises(ConfigError, match=r"model_name='efficientnet_b77'.*not a timm model.*efficientnet_b7"):
        ImageTower("efficientnet_b77")
    with pytest.raises(ConfigError, match="checkpoint_path.*no such file"):
        ImageTower("test_efficientnet", checkpoint_path="/nonexistent/weights.pth")


def test_grad_checkpointing_gives_same_gradients() -> None:
    # Train mode (HF only checkpoints while training) without dropout, so recomputation is exact.
    tower = TextTower(config={**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    ids = torch.randint(5, 99, (2, 10))

    def grads() -> list[torch.Tensor]:
        tower.zero_grad()
        tower(ids).sum().backward()
        return [p.grad.clone() for p in tower.parameters() if p.grad is not None]

    plain = grads()
    tower.set_grad_checkpointing(True)
    assert getattr(tower.model, "is_activation_checkpointing", None) or tower.model.is_gradient_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)
    image = ImageTower("test_efficientnet")
    image.set_grad_checkpointing(True)
    assert image.model.grad_checkpointing


def test_text_tower_cls_and_mean_pooling() -> None:
    tower = TextTower(config=TINY_BERT, pooling="mean").eval()
    ids = torch.randint(5, 99, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    hidden = tower.model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.stack([hidden[0, :4].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(tower(ids, mask), expected)
    tower.pooling = "cls"
    torch.testing.assert_close(tower(ids, mask), hidden[:, 0])
    assert tower.output_dim == TINY_BERT["hidden_size"]


def test_text_tower_has_no_unused_pooler() -> None:
    """BERT's tanh pooler is not part of ALIGN; leaving it would give DDP unused parameters."""
    tower = TextTower(config=TINY_BERT)
    tower(torch.randint(5, 99, (2, 5))).sum().backward()
    assert all(p.grad is not None for p in tower.parameters())


def test_text_tower_vocab_size_override() -> None:
    tower = TextTower(config=TINY_BERT, vocab_size=321)
    assert tower.vocab_size == 321
    assert tower.model.get_input_embeddings().num_embeddings == 321


def test_text_tower_from_local_folder(tmp_path: Path) -> None:
    """The pretrained path, offline: a save_pretrained folder loads with its weights."""
    config = BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"})
    source = BertModel(config).eval()
    source.save_pretrained(tmp_path)
    tower = TextTower(str(tmp_path), pretrained=True).eval()
    ids = torch.randint(5, 99, (2, 7))
    torch.testing.assert_close(tower(ids), source(input_ids=ids).last_hidden_state[:, 0])
    # Config only (from scratch): same architecture, new weights; overrides apply.
    scratch = TextTower(str(tmp_path), config={"model_type": "bert", "num_hidden_layers": 1})
    assert scratch.model.config.num_hidden_layers == 1
    assert scratch.model.config.hidden_size == TINY_BERT["hidden_size"]


def test_text_tower_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_name_or_path='./no/such/folder'.*no such local folder"):
        TextTower("./no/such/folder")
    with pytest.raises(ConfigError, match="model_name_or_path='not-a-real-org/bert-nope'.*hub"):
        TextTower("not-a-real-org/bert-nope")
    with pytest.raises(ConfigError, match="model_type"):
        TextTower(config={"hidden_size": 32})
    with pytest.raises(ConfigError, match="pooling"):
        TextTower(config=TINY_BERT, pooling="max")  # type: ignore[arg-type]
    BertModel(BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"})).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="vocab_size=500.*pretrained"):
        TextTower(str(tmp_path), pretrained=True, vocab_size=500)
