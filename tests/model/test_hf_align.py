"""Hugging Face ALIGN import/export: exact embeddings both ways, the full-size key map, and clear refusals.

Every checkpoint is a tiny random AlignModel saved to a temporary folder (nothing is downloaded);
the full-size align-base architecture is instantiated on the meta device (no weights).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from transformers import AlignConfig, AlignModel, BertConfig, PreTrainedTokenizerFast

from align_lightning._errors import ConfigError
from align_lightning.data.tokenizer import train_wordpiece
from align_lightning.model import (
    AlignVisionTower,
    DualEncoder,
    ImageTower,
    TextTower,
    from_hf_align,
    hf_align_state_dict,
    load_hf_align_tokenizer,
    to_hf_align,
)
from align_lightning.model import hf_align as hf_align_module
from tests.conftest import TINY_BERT
from tests.model.hf_align_utils import TINY_EMBED_DIM, TINY_TEXT, TINY_VISION, save_tiny_align

ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    captions = [f"a {c} photo of a {a}" for c in ("red", "green", "blue") for a in ("cat", "dog", "boat", "tree")]
    return train_wordpiece(captions, vocab_size=120, min_frequency=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    return save_tiny_align(tmp_path_factory.mktemp("align"), tokenizer)


def _inputs(tokenizer: PreTrainedTokenizerFast, image_size: int) -> dict[str, torch.Tensor]:
    text = tokenizer(["a red cat", "a blue photo of a boat and a tree", "dog"], padding=True, return_tensors="pt")
    assert not bool(text["attention_mask"].all())  # padding is exercised
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(3, 3, image_size, image_size, generator=generator) * 2 - 1  # ALIGN's [-1, 1]
    return {"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


@torch.no_grad()
def _hf_embeddings(model: AlignModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return F.normalize(image, dim=-1), F.normalize(text.pooler_output, dim=-1)


@torch.no_grad()
def _our_embeddings(model: DualEncoder, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(inputs["pixel_values"]), model.encode_text(inputs["input_ids"], inputs["attention_mask"])


# ------------------------------------------------------------------------------------------------ import


@pytest.mark.parametrize("image_size", [37, 32], ids=["odd", "even"])  # ALIGN's 289 is odd: HF's padding matters
def test_import_gives_hf_embeddings_and_logits(
    checkpoint: Path, tokenizer: PreTrainedTokenizerFast, image_size: int
) -> None:
    hf = AlignModel.from_pretrained(checkpoint).eval()
    ours = from_hf_align(str(checkpoint)).eval()
    inputs = _inputs(tokenizer, image_size)
    hf_image, hf_text = _hf_embeddings(hf, inputs)
    image, text = _our_embeddings(ours, inputs)
    assert image.shape == (3, TINY_EMBED_DIM)
    torch.testing.assert_close(image, hf_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(text, hf_text, atol=ATOL, rtol=0)
    assert float(ours.logit_scale().detach()) == pytest.approx(1.0 / float(hf.temperature.detach()), rel=1e-6)
    with torch.no_grad():
        logits = hf(**inputs).logits_per_image
    torch.testing.assert_close(ours.logit_scale() * image @ text.T, logits, atol=ATOL * 20, rtol=0)  # scale 20


def test_import_floor_never_changes_the_temperature(tmp_path: Path) -> None:
    cold = save_tiny_align(tmp_path / "cold", temperature=0.004)  # below our default floor 0.01
    model = from_hf_align(str(cold))
    assert model.min_temperature == pytest.approx(0.004)
    assert float(model.logit_scale().detach()) == pytest.approx(250.0, rel=1e-5)
    assert model.temperature.requires_grad  # learnable, as in ALIGN
    with pytest.raises(ConfigError, match="min_temperature to at most 0.004"):
        from_hf_align(str(cold), min_temperature=0.01)


def test_recipe_form_loads_the_same_weights(checkpoint: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """``DualEncoder(AlignVisionTower(c), TextTower(c), init_from=c)``, as recipes write it, is from_hf_align(c)."""
    path = str(checkpoint)
    recipe_form = DualEncoder(AlignVisionTower(path), TextTower(path), init_from=path, min_temperature=1e-3).eval()
    reference = from_hf_align(path).eval()
    inputs = _inputs(tokenizer, 33)
    for got, expected in zip(_our_embeddings(recipe_form, inputs), _our_embeddings(reference, inputs), strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert float(recipe_form.temperature.detach()) == pytest.approx(0.05)  # the checkpoint's, not temperature_init
    with pytest.raises(ConfigError, match="vocabulary differs"):  # the data's tokenizer is not the checkpoint's
        DualEncoder(AlignVisionTower(path), TextTower(path, vocab_size=len(tokenizer) + 7), init_from=path)
    with pytest.raises(ConfigError, match="init_from"):
        TextTower(path, pretrained=True)
    with pytest.raises(ConfigError, match="AlignVisionTower"):
        DualEncoder(ImageTower("test_efficientnet"), TextTower(path), init_from=path)


def test_tokenizer_from_the_checkpoint_or_bert_uncased(
    checkpoint: Path, tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_hf_align_tokenizer(str(checkpoint))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.model_max_length == 64
    bare = save_tiny_align(tmp_path / "bare")  # weights only, as some conversions save them
    asked: list[str] = []
    monkeypatch.setattr(hf_align_module, "load_tokenizer", lambda name, max_length: asked.append(name) or tokenizer)
    load_hf_align_tokenizer(str(bare))
    assert asked == ["bert-base-uncased"]


def test_missing_or_foreign_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such local folder"):
        from_hf_align(str(tmp_path / "nowhere"))
    BertConfig(**TINY_TEXT).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="'bert' checkpoint, not ALIGN"):
        from_hf_align(str(tmp_path / "bert"))
    with pytest.raises(ConfigError, match="not ALIGN"):
        AlignVisionTower(str(tmp_path / "bert"))


# ------------------------------------------------------------------------------------------------ tower


def test_vision_tower_trains_like_tf_efficientnet() -> None:
    def stochastic_depth(tower: AlignVisionTower) -> list[float]:
        return [b.projection.dropout.drop_prob for b in tower.model.encoder.blocks if b.projection.apply_dropout]

    tower = AlignVisionTower(config=TINY_VISION)
    momenta = {m.momentum for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {1.0 - 0.99}  # TF's decay 0.99 in PyTorch's terms (HF passes 0.99 or leaves 0.1)
    rates = stochastic_depth(tower)  # per-sample (DropPath), linear in depth up to drop_connect_rate
    assert rates == sorted(rates)
    assert 0 < rates[-1] < TINY_VISION["drop_connect_rate"]
    assert all(isinstance(b.projection.dropout, DropPath) for b in tower.model.encoder.blocks)
    assert set(stochastic_depth(AlignVisionTower(config=TINY_VISION, drop_path_rate=0.0))) == {0.0}
    # Activation checkpointing recomputes, it does not change the function or its gradients.
    tower = AlignVisionTower(config=TINY_VISION, drop_path_rate=0.0)
    pixels = torch.randn(2, 3, 33, 33)
    grads = []
    for enable in (False, True):
        tower.zero_grad()
        tower.set_grad_checkpointing(enable)
        tower.train()
        tower(pixels).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tower.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------ export


def test_export_round_trip_gives_the_same_embeddings(
    checkpoint: Path, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    ours = from_hf_align(str(checkpoint)).eval()
    out = to_hf_align(ours, tmp_path / "export", tokenizer=tokenizer)
    reloaded = AlignModel.from_pretrained(out).eval()
    inputs = _inputs(tokenizer, 37)
    for got, expected in zip(_hf_embeddings(reloaded, inputs), _our_embeddings(ours, inputs), strict=True):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert float(reloaded.temperature) == pytest.approx(float(ours.clamped_temperature().detach()))
    assert load_hf_align_tokenizer(str(out)).get_vocab() == tokenizer.get_vocab()
    # Every weight the embeddings use is the original checkpoint's.
    original = AlignModel.from_pretrained(checkpoint).state_dict()
    for key, value in reloaded.state_dict().items():
        if not key.startswith("text_model.pooler."):
            assert torch.equal(value, original[key]), key


def test_model_trained_from_scratch_exports(tmp_path: Path) -> None:
    """A model trained here with ALIGN's towers (not imported) exports exactly, BatchNorm statistics included."""
    model = DualEncoder(AlignVisionTower(config=TINY_VISION), TextTower(config=TINY_BERT), temperature_init=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pixels, ids = torch.randn(4, 3, 35, 35), torch.randint(5, TINY_BERT["vocab_size"], (4, 7))
    image, text, scale = model(pixels, ids)
    (scale * image @ text.T).logsumexp(1).mean().backward()
    optimizer.step()
    model.eval()
    reloaded = AlignModel.from_pretrained(to_hf_align(model, tmp_path / "scratch")).eval()
    with torch.no_grad():
        hf_image = F.normalize(reloaded.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        hf_text = F.normalize(reloaded.get_text_features(input_ids=ids).pooler_output, dim=-1)
        torch.testing.assert_close(hf_image, model.encode_image(pixels), atol=ATOL, rtol=0)
        torch.testing.assert_close(hf_text, model.encode_text(ids), atol=ATOL, rtol=0)


def test_export_refuses_what_align_model_cannot_express(tmp_path: Path) -> None:
    vision, bert = AlignVisionTower(config=TINY_VISION), TextTower(config=TINY_BERT)
    cases = [
        (DualEncoder(vision, bert, embed_dim=16, image_projection=True), "no image projection"),
        (DualEncoder(ImageTower("test_efficientnet"), bert), "only an AlignVisionTower exports"),
        (DualEncoder(vision, TextTower(config=TINY_BERT, pooling="mean")), "pooling: cls"),
        (DualEncoder(vision, TextTower(config={**TINY_BERT, "model_type": "roberta"})), "around a BertModel"),
    ]
    for model, message in cases:
        with pytest.raises(ConfigError, match=message):
            to_hf_align(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------------ full size


def test_align_base_architecture_maps_key_for_key(tmp_path: Path) -> None:
    """AlignConfig's defaults are align-base's architecture (its conversion script changes only image_size and
    the pooling kernel, neither a weight): B7 + BERT-base map onto ours key for key and shape for shape."""
    AlignConfig(vision_config={"image_size": 289, "hidden_dim": 640}).save_pretrained(tmp_path)  # config only
    with torch.device("meta"):
        hf = AlignModel(AlignConfig.from_pretrained(tmp_path))
        ours = DualEncoder(AlignVisionTower(str(tmp_path)), TextTower(str(tmp_path)))
    expected = {k: v.shape for k, v in hf.state_dict().items() if not k.startswith("text_model.pooler.")}
    got = {k: v.shape for k, v in hf_align_state_dict(ours).items()}
    assert got == expected
    assert len(hf.vision_model.encoder.blocks) == 55  # EfficientNet-B7
    assert (ours.image_tower.output_dim, ours.text_tower.output_dim, ours.embed_dim) == (640, 768, 640)
    assert ours.text_tower.vocab_size == 30522  # bert-base-uncased
    parameters = sum(p.numel() for p in ours.parameters())
    assert 170e6 < parameters < 175e6  # ALIGN-base: ~172M
