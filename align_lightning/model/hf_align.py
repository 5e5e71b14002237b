"""Hugging Face ALIGN weights in and out: ``AlignModel`` checkpoints (e.g. ``kakaobrain/align-base``) <-> DualEncoder.

The image tower is :class:`AlignVisionTower`, which wraps transformers' own ``AlignVisionModel``: the
EfficientNet is Hugging Face's, module for module, so its embeddings are exactly those of
``AlignModel.get_image_features``. A timm EfficientNet cannot give them: HF's port pads every stride-2
convolution by a fixed ``(k//2 - 1, k//2)`` (its stem by ``(0, 1)``), which equals TF "same" padding
(timm's ``tf_efficientnet_*``) on even feature maps only, and ALIGN's 289 px input is odd (HF's stem
gives 144 x 144 where TF "same" gives 145 x 145). The text tower is a
:class:`~align_lightning.model.TextTower` around a ``BertModel``: ``AlignTextModel`` is BERT, key for key.

Key mapping (Hugging Face -> ours):

* ``vision_model.*`` -> ``image_tower.model.*``
* ``text_model.*`` -> ``text_tower.model.*``, except ``text_model.pooler.*`` (BERT's tanh pooler,
  which ALIGN's embeddings do not use; the text tower has none)
* ``text_projection.*`` -> ``text_projection.*``
* ``temperature`` (0-dim) -> ``temperature`` (shape ``(1,)``)

Hugging Face computes ``logits = cosine / temperature`` without a floor; ours clamps the temperature
at ``min_temperature``, so an import keeps ``min_temperature`` at or below the checkpoint's temperature
(the logits are HF's) and refuses a model whose floor would change them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AlignConfig,
    AlignModel,
    AlignTextConfig,
    AlignVisionConfig,
    AlignVisionModel,
    BertConfig,
    BertModel,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from align_lightning._errors import ConfigError
from align_lightning.data.tokenizer import load_tokenizer
from align_lightning.model.dual_encoder import DualEncoder
from align_lightning.model.towers import ALIGN_TEXT_FIELDS, TextTower, load_hf_config

__all__ = [
    "AlignVisionTower",
    "from_hf_align",
    "hf_align_state_dict",
    "load_hf_align_tokenizer",
    "load_hf_align_weights",
    "to_hf_align",
]

log = logging.getLogger(__name__)

#: The default temperature floor of an import (DualEncoder's default), lowered to the checkpoint's value if needed.
_DEFAULT_MIN_TEMPERATURE = 0.01
#: The vocabulary ALIGN-base's tokenizer uses, for checkpoints saved without tokenizer files.
_FALLBACK_TOKENIZER = "bert-base-uncased"
_FIX_SOURCE = (
    "Give a Hugging Face hub name of an ALIGN checkpoint (e.g. 'kakaobrain/align-base'; needs a network or a warm "
    "cache) or a folder written by AlignModel.save_pretrained / to_hf_align."
)


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------


def _load_align_config(name_or_path: str) -> PretrainedConfig:
    """The ``AlignConfig`` (or ``AlignVisionConfig`` / ``AlignTextConfig``) of a checkpoint, with clear errors."""
    config = load_hf_config(name_or_path, "name_or_path", _FIX_SOURCE)
    if not isinstance(config, (AlignConfig, AlignVisionConfig, AlignTextConfig)):
        raise ConfigError(
            "name_or_path",
            name_or_path,
            f"is a {config.model_type!r} checkpoint, not ALIGN (model_type 'align'). {_FIX_SOURCE}",
        )
    return config


def _vision_config(name_or_path: str | None, overrides: dict[str, Any] | None) -> AlignVisionConfig:
    if name_or_path is None:
        base = AlignVisionConfig()
    else:
        loaded = _load_align_config(name_or_path)
        if isinstance(loaded, AlignTextConfig):
            raise ConfigError("model_name_or_path", name_or_path, "holds an ALIGN text model only, no vision model.")
        base = loaded.vision_config if isinstance(loaded, AlignConfig) else loaded
    if not overrides:
        return base
    fields = {k: v for k, v in base.to_dict().items() if k != "model_type"}
    try:
        return AlignVisionConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as err:
        raise ConfigError("config", overrides, f"not valid AlignVisionConfig fields: {err}") from err


# --------------------------------------------------------------------------------------------------
# The faithful EfficientNet tower
# --------------------------------------------------------------------------------------------------


class AlignVisionTower(nn.Module):
    """Hugging Face ALIGN's EfficientNet (transformers' ``AlignVisionModel``) as an image tower.

    The module and its state dict are ``AlignVisionModel``'s, so ``AlignModel`` weights load key for
    key and its image features come out exactly (ALIGN: pooled after the last block, no head
    convolution, 640-d for B7). Use it to import ``kakaobrain/align-base`` (:func:`from_hf_align`),
    or to train from scratch a model that :func:`to_hf_align` can export.

    Two training-time details follow the original TF EfficientNet rather than the port (neither
    changes the function in eval mode): BatchNorm running statistics use PyTorch momentum
    ``1 - batch_norm_momentum`` (HF passes TF's decay 0.99 to PyTorch, where it would replace the
    statistics by each batch's), and the port's elementwise dropout on residual branches becomes
    per-sample stochastic depth (TF's drop-connect), with the same linear-in-depth rates.

    Args:
        model_name_or_path: An ALIGN checkpoint (hub name or ``save_pretrained`` folder) whose vision
            architecture to build; its weights are loaded by :func:`from_hf_align` or
            ``DualEncoder(init_from=...)``, not here. ``None``: ``AlignVisionConfig()``, align-base's
            EfficientNet-B7.
        config: ``AlignVisionConfig`` fields (e.g. ``width_coefficient``, ``depth_coefficient``),
            overriding those of ``model_name_or_path`` or of the default.
        drop_path_rate: Stochastic depth rate of the last block (earlier blocks get linearly less);
            ``None`` keeps the configuration's ``drop_connect_rate``.

    Raises:
        ConfigError: For a checkpoint that is not ALIGN or cannot be found, or invalid config fields.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        drop_path_rate: float | None = None,
    ) -> None:
        super().__init__()
        vision_config = _vision_config(model_name_or_path, config)
        if drop_path_rate is not None:
            if not 0.0 <= drop_path_rate < 1.0:
                raise ConfigError("drop_path_rate", drop_path_rate, "must be in [0, 1).")
            vision_config.drop_connect_rate = drop_path_rate
        self.model = AlignVisionModel(vision_config)
        # PyTorch's momentum weighs the new batch; TF's (and the config's) decay weighs the old statistics.
        for module in self.model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 1.0 - vision_config.batch_norm_momentum
        blocks = self.model.encoder.blocks
        for index, block in enumerate(blocks):
            rate = vision_config.drop_connect_rate * index / len(blocks)
            block.projection.dropout = DropPath(rate)
        self.output_dim: int = blocks[-1].projection.project_conv.out_channels
        self.grad_checkpointing = False

    @property
    def config(self) -> AlignVisionConfig:
        """The ``AlignVisionConfig`` of the wrapped model."""
        return self.model.config

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each EfficientNet block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Encode images as ``AlignVisionModel`` does: stem, blocks, pooling (average over the whole map).

        Args:
            pixel_values: ``(B, 3, H, W)`` images, pixels in [-1, 1] for ALIGN checkpoints.

        Returns:
            ``(B, output_dim)`` pooled features (not normalised): ``get_image_features``' output.
        """
        hidden = self.model.embeddings(pixel_values)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.encoder.blocks:
            hidden = checkpoint(block, hidden, use_reentrant=False) if recompute else block(hidden)
        pooled = self.model.pooler(hidden)
        return pooled.reshape(pooled.shape[:2])


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def _load_align_model(name_or_path: str) -> AlignModel:
    config = _load_align_config(name_or_path)
    if not isinstance(config, AlignConfig):
        raise ConfigError(
            "name_or_path",
            name_or_path,
            f"holds a {config.model_type!r} model, not a whole AlignModel (vision + text + projection).",
        )
    return AlignModel.from_pretrained(name_or_path)


def _hf_to_ours(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    mapped: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if key.startswith("vision_model."):
            mapped["image_tower.model." + key.removeprefix("vision_model.")] = value
        elif key.startswith("text_model.pooler."):
            continue
        elif key.startswith("text_model."):
            mapped["text_tower.model." + key.removeprefix("text_model.")] = value
        else:
            mapped[key] = value
    return mapped


def _check_temperature(temperature: float, min_temperature: float, source: str) -> None:
    if temperature <= 0.0:
        raise ConfigError(
            "init_from", source, f"its temperature is {temperature:g}; a contrastive model needs a positive one."
        )
    if temperature < min_temperature:
        raise ConfigError(
            "min_temperature",
            min_temperature,
            f"exceeds the temperature of {source!r} ({temperature:g}): the clamp would change its logits. Set "
            f"min_temperature to at most {temperature:g}.",
        )


def _load_into(model: DualEncoder, hf_model: AlignModel, source: str) -> None:
    if not isinstance(model.image_tower, AlignVisionTower) or not isinstance(model.text_tower, TextTower):
        raise ConfigError(
            "init_from",
            source,
            f"loads into an AlignVisionTower and a TextTower, not {type(model.image_tower).__name__} / "
            f"{type(model.text_tower).__name__}. Build the towers from the same checkpoint: "
            f"AlignVisionTower({source!r}) and TextTower({source!r}) (or use from_hf_align).",
        )
    if model.image_projection is not None:
        raise ConfigError("image_projection", True, "AlignModel has no image projection: set image_projection: false.")
    temperature = float(hf_model.temperature.detach())
    _check_temperature(temperature, model.min_temperature, source)
    state = _hf_to_ours(hf_model.state_dict())
    ours = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}"
        for k, v in state.items()
        if k in ours and k != "temperature" and v.shape != ours[k].shape
    ]
    if wrong:
        hint = (
            " The vocabulary differs: use the checkpoint's own tokenizer (data tokenizer = the checkpoint)."
            if any("word_embeddings" in w for w in wrong)
            else " Build the towers from the same checkpoint."
        )
        raise ConfigError("init_from", source, f"shapes differ from the model's: {wrong[:5]}.{hint}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            "init_from",
            source,
            f"does not match the model key for key (missing: {result.missing_keys[:5]}, unexpected: "
            f"{result.unexpected_keys[:5]}). Build the towers from the same checkpoint.",
        )


def load_hf_align_weights(model: DualEncoder, name_or_path: str) -> None:
    """Load an ``AlignModel`` checkpoint's weights into a dual encoder of its architecture, in place.

    Both towers, the text projection and the temperature are replaced (the temperature as stored:
    the model's ``temperature_init`` does not apply). What ``DualEncoder(init_from=...)`` calls.

    Args:
        model: A :class:`DualEncoder` with an :class:`AlignVisionTower` and a :class:`TextTower` built
            from the same checkpoint (``AlignVisionTower(name_or_path)``, ``TextTower(name_or_path)``),
            and no image projection.
        name_or_path: Hub name (``"kakaobrain/align-base"``) or ``save_pretrained`` folder.

    Raises:
        ConfigError: If the checkpoint is missing or not ALIGN, the model's layout or shapes differ
            from it (e.g. another vocabulary), or ``model.min_temperature`` exceeds its temperature.
    """
    _load_into(model, _load_align_model(name_or_path), name_or_path)
    log.info("Loaded the AlignModel weights of %s.", name_or_path)


def from_hf_align(
    name_or_path: str,
    *,
    min_temperature: float | None = None,
    drop_path_rate: float | None = None,
    **dual_encoder_kwargs: Any,
) -> DualEncoder:
    """Build a :class:`DualEncoder` from a Hugging Face ``AlignModel`` checkpoint, weights included.

    ``encode_image`` / ``encode_text`` then equal ``AlignModel.get_image_features`` /
    ``get_text_features`` L2-normalised, and ``logit_scale()`` is ``1 / temperature``. Preprocess as
    ALIGN does: ``image_transform(289, train=False, normalize="align")`` (resize 346, center crop 289,
    pixels in [-1, 1]) and :func:`load_hf_align_tokenizer` (BERT uncased, 64 tokens).

    Args:
        name_or_path: Hub name (``"kakaobrain/align-base"``, needs a network or a warm cache) or a
            folder written by ``AlignModel.save_pretrained`` / :func:`to_hf_align`.
        min_temperature: Floor of the temperature; ``None``: 0.01, or the checkpoint's temperature if
            lower, so that the logits are Hugging Face's (which has no floor).
        drop_path_rate: Stochastic depth of the image tower for fine-tuning; ``None``: the
            checkpoint's ``drop_connect_rate``.
        **dual_encoder_kwargs: Further :class:`DualEncoder` arguments (``grad_checkpointing``,
            ``freeze_image_tower``, ``learnable_temperature``, ...).

    Returns:
        The dual encoder, in training mode as any new module (call ``.eval()`` to embed).

    Raises:
        ConfigError: If the checkpoint cannot be found or is not an ``AlignModel``, its temperature
            is not positive, or ``min_temperature`` exceeds it.
    """
    for reserved in ("image_tower", "text_tower", "embed_dim", "image_projection", "init_from", "temperature_init"):
        if reserved in dual_encoder_kwargs:
            raise TypeError(f"from_hf_align() takes {reserved!r} from the checkpoint; do not pass it.")
    hf_model = _load_align_model(name_or_path)
    temperature = float(hf_model.temperature.detach())
    if min_temperature is None:
        min_temperature = min(_DEFAULT_MIN_TEMPERATURE, temperature) if temperature > 0 else _DEFAULT_MIN_TEMPERATURE
    _check_temperature(temperature, min_temperature, name_or_path)
    model = DualEncoder(
        AlignVisionTower(name_or_path, drop_path_rate=drop_path_rate),
        TextTower(name_or_path),
        temperature_init=temperature,
        min_temperature=min_temperature,
        **dual_encoder_kwargs,
    )
    _load_into(model, hf_model, name_or_path)
    log.info("Imported %s: temperature %.4g, min_temperature %.4g.", name_or_path, temperature, min_temperature)
    return model


def load_hf_align_tokenizer(name_or_path: str, max_length: int = 64) -> PreTrainedTokenizerBase:
    """The tokenizer of an ALIGN checkpoint: its own files when it has them, else ``bert-base-uncased``'s.

    Args:
        name_or_path: Hub name or folder of the checkpoint.
        max_length: Maximum tokens per caption (ALIGN: 64).

    Raises:
        ConfigError: If neither the checkpoint's tokenizer nor ``bert-base-uncased`` can be loaded.
    """
    folder = Path(name_or_path)
    has_files = not folder.is_dir() or any(
        (folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    )
    if has_files:
        return load_tokenizer(name_or_path, max_length=max_length)
    log.info("%s holds no tokenizer files: using %s (align-base's vocabulary).", name_or_path, _FALLBACK_TOKENIZER)
    return load_tokenizer(_FALLBACK_TOKENIZER, max_length=max_length)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _exportable_bert_config(model: DualEncoder) -> BertConfig:
    """The text tower's ``BertConfig`` once the model is known to fit AlignModel; else a ConfigError naming the part."""
    if model.image_projection is not None:
        raise ConfigError(
            "image_projection",
            True,
            "AlignModel has no image projection (the image embedding is the pooled EfficientNet feature), so this "
            "model cannot be exported. Train with image_projection: false and embed_dim = the image feature width.",
        )
    if not isinstance(model.image_tower, AlignVisionTower):
        raise ConfigError(
            "image_tower",
            type(model.image_tower).__name__,
            "AlignModel's image tower is Hugging Face's EfficientNet port, whose stride-2 padding no timm model "
            "reproduces, so only an AlignVisionTower exports exactly. Train with image_tower: "
            "align_lightning.model.AlignVisionTower (AlignVisionTower() is align-base's B7).",
        )
    tower = model.text_tower
    bert = getattr(tower, "model", None)
    if not isinstance(bert, BertModel) or getattr(tower, "pooling", None) != "cls":
        raise ConfigError(
            "text_tower",
            type(bert if bert is not None else tower).__name__,
            "AlignModel's text tower is BERT with [CLS] pooling: export needs a TextTower around a BertModel "
            "(config model_type: bert) with pooling: cls.",
        )
    if bert.config.is_decoder or bert.config.add_cross_attention:
        raise ConfigError("text_tower", "bert", "a decoder / cross-attention BERT is not ALIGN's text encoder.")
    return bert.config


def _export_config(model: DualEncoder) -> AlignConfig:
    """The ``AlignConfig`` of a dual encoder that fits AlignModel."""
    bert_config = _exportable_bert_config(model)
    return AlignConfig(
        text_config=AlignTextConfig(**{name: getattr(bert_config, name) for name in ALIGN_TEXT_FIELDS}).to_dict(),
        vision_config=model.image_tower.config.to_dict(),
        projection_dim=model.embed_dim,
        temperature_init_value=float(model.clamped_temperature().detach()),
    )


def hf_align_state_dict(model: DualEncoder) -> dict[str, Tensor]:
    """A dual encoder's weights under ``AlignModel``'s keys (all but the text pooler, which ALIGN does not use).

    The temperature is the one the model uses (clamped at ``min_temperature``), as a 0-dim tensor.

    Args:
        model: A dual encoder of :func:`to_hf_align`'s form (AlignVisionTower, BERT TextTower).

    Raises:
        ConfigError: If the model cannot be expressed as an ``AlignModel``.
    """
    _exportable_bert_config(model)
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("image_tower.model."):
            state["vision_model." + key.removeprefix("image_tower.model.")] = value
        elif key.startswith("text_tower.model."):
            state["text_model." + key.removeprefix("text_tower.model.")] = value
        elif key == "temperature":
            state[key] = model.clamped_temperature().detach().reshape(())
        else:
            state[key] = value
    return state


def to_hf_align(
    model: DualEncoder, out_dir: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save a dual encoder as a Hugging Face ``AlignModel`` folder (``save_pretrained`` layout).

    ``AlignModel.from_pretrained(out_dir)`` then gives the same embeddings (``get_image_features`` /
    ``get_text_features``, L2-normalised) and logits (``cosine / temperature``, with the temperature
    the model uses). The text model's tanh pooler, which ALIGN's embeddings do not use, gets
    ``AlignModel``'s fresh initialisation. With ``tokenizer``, its files are saved alongside, so
    ``AlignProcessor`` / ``AutoTokenizer`` load from the folder too.

    Args:
        model: A :class:`DualEncoder` with an :class:`AlignVisionTower`, a :class:`TextTower` around
            BERT with ``[CLS]`` pooling, and no image projection (the form of :func:`from_hf_align`'s
            models and of models trained with those towers).
        out_dir: Folder to write (created).
        tokenizer: The text tower's tokenizer (e.g. ``ALIGNModule.tokenizer``).

    Returns:
        The folder.

    Raises:
        ConfigError: If the model cannot be expressed as an ``AlignModel`` (naming the part and the fix).
    """
    config = _export_config(model)
    state = hf_align_state_dict(model)
    hf_model = AlignModel(config)
    result = hf_model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.startswith("text_model.pooler.")]
    if missing or unexpected:  # the checks above make this a bug, not a user error
        raise RuntimeError(f"Export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    log.info("Saved an AlignModel to %s.", out)
    return out
