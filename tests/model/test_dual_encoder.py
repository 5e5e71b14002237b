"""Tests for align_lightning/model/dual_encoder.py."""

from __future__ import annotations

import pytest
import torch

from align_lightning._errors import ConfigError
from align_lightning.model import DualEncoder, ImageTower, TextTower


def test_forward_returns_normalised_embeddings_and_scale(dual_encoder: DualEncoder, batch: dict) -> None:
    image, text, scale = dual_encoder(**batch)
    width = dual_encoder.image_tower.output_dim
    assert image.shape == text.shape == (4, width)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    assert scale.ndim == 0
    assert scale.item() == pytest.approx(1.0)
    dual_encoder.eval()
    torch.testing.assert_close(dual_encoder.encode_image(batch["pixel_values"]), dual_encoder(**batch)[0])
    torch.testing.assert_close(
        dual_encoder.encode_text(batch["input_ids"], batch["attention_mask"]), dual_encoder(**batch)[1]
    )


def test_align_architecture(dual_encoder: DualEncoder) -> None:
    """No image projection; the text projection maps the text width to the image width."""
    assert dual_encoder.image_projection is None
    proj = dual_encoder.text_projection
    assert (proj.in_features, proj.out_features) == (dual_encoder.text_tower.output_dim, dual_encoder.embed_dim)
    assert dual_encoder.embed_dim == dual_encoder.image_tower.output_dim


def test_image_projection_to_other_width(image_tower: ImageTower, text_tower: TextTower, batch: dict) -> None:
    model = DualEncoder(image_tower, text_tower, embed_dim=24, image_projection=True)
    image, text, _ = model(**batch)
    assert image.shape == text.shape == (4, 24)


def test_embedding_size_mismatch_is_a_clear_error(image_tower: ImageTower, text_tower: TextTower) -> None:
    with pytest.raises(ConfigError, match=r"embed_dim=24.*image tower's feature width \(64\).*image_projection"):
        DualEncoder(image_tower, text_tower, embed_dim=24)


def test_temperature_is_clamped_and_learnable(dual_encoder: DualEncoder) -> None:
    with torch.no_grad():
        dual_encoder.temperature.fill_(-3.0)  # e.g. after a bad optimizer step
    assert dual_encoder.clamped_temperature().item() == pytest.approx(dual_encoder.min_temperature)
    assert dual_encoder.logit_scale().item() == pytest.approx(1 / dual_encoder.min_temperature)
    with torch.no_grad():
        dual_encoder.temperature.fill_(0.5)
    dual_encoder.logit_scale().backward()
    assert dual_encoder.temperature.grad.item() == pytest.approx(-1 / 0.25)


def test_fixed_temperature_and_bad_settings(image_tower: ImageTower, text_tower: TextTower) -> None:
    fixed = DualEncoder(image_tower, text_tower, temperature_init=1 / 64, learnable_temperature=False)
    assert not fixed.temperature.requires_grad
    assert fixed.logit_scale().item() == pytest.approx(64.0)
    with pytest.raises(ConfigError, match="min_temperature"):
        DualEncoder(image_tower, text_tower, min_temperature=0.0)


def test_grad_checkpointing_switch(image_tower: ImageTower, text_tower: TextTower, batch: dict) -> None:
    model = DualEncoder(image_tower, text_tower, grad_checkpointing=True)
    assert model.image_tower.model.grad_checkpointing
    image, text, scale = model(**batch)
    (image * text).sum().mul(scale).backward()
    model.set_grad_checkpointing(False)
    assert not model.image_tower.model.grad_checkpointing


def test_temperature_is_fsdp2_shardable_and_loads_a_scalar(dual_encoder: DualEncoder) -> None:
    """Shape (1,) (fully_shard refuses 0-dim parameters); a 0-dim entry (AlignModel's layout) still loads."""
    assert dual_encoder.temperature.shape == (1,)
    assert dual_encoder.clamped_temperature().dim() == 0
    assert dual_encoder.logit_scale().dim() == 0
    state = dual_encoder.state_dict()
    state["temperature"] = torch.tensor(0.25)
    dual_encoder.load_state_dict(state)
    assert dual_encoder.temperature.tolist() == [0.25]
