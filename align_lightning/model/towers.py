"""Image and text towers: thin wrappers that turn a timm or Hugging Face model into a pooled encoder.

Both towers expose ``output_dim`` (the width of the pooled feature) and ``set_grad_checkpointing``,
which is all :class:`~align_lightning.model.DualEncoder` needs, so any module with those two members
can be used as a tower.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn
from transformers import AlignConfig, AlignTextConfig, AutoConfig, AutoModel, BertConfig, PretrainedConfig

from align_lightning._errors import ConfigError

__all__ = ["ALIGN_TEXT_FIELDS", "ImageTower", "TextTower", "load_hf_config"]

log = logging.getLogger(__name__)

#: The fields of Hugging Face's ``AlignTextConfig``: its text model is BERT, and these are ``BertConfig``'s.
ALIGN_TEXT_FIELDS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)


def _close_matches(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" Close matches: {', '.join(matches)}." if matches else ""


class ImageTower(nn.Module):
    """A timm image model with global average pooling, returning one feature vector per image.

    ALIGN pools the output of EfficientNet's last block directly: it has no 1x1 "top" convolution,
    so the feature width is the channel count of the last block (640 for B7, 1376 for L2) rather
    than timm's 4x wider head (2560 for B7). For EfficientNet models the head convolution and its
    norm are therefore removed unless ``keep_head_conv=True``; other timm models are used unchanged.

    Args:
        model_name: Any name from ``timm.list_models()``, e.g. ``"efficientnet_b7"``.
        pretrained: Load timm's pretrained weights (needs the Hugging Face hub or its cache).
        checkpoint_path: A local timm state dict (``.pth``/``.safetensors``) to load instead.
        keep_head_conv: Keep EfficientNet's 1x1 head convolution (not ALIGN's architecture).
        drop_path_rate: Stochastic depth rate passed to timm.
        model_kwargs: Extra keyword arguments for ``timm.create_model``.

    Raises:
        ConfigError: For an unknown model name or a missing checkpoint file.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        keep_head_conv: bool = False,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(model_name):
            raise ConfigError(
                "model_name",
                model_name,
                "not a timm model name." + _close_matches(model_name, timm.list_models()) + " See timm.list_models().",
            )
        if checkpoint_path is not None and not Path(checkpoint_path).is_file():
            raise ConfigError("checkpoint_path", checkpoint_path, "no such file. Point it at a saved timm state dict.")
        kwargs = dict(model_kwargs or {})
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        self.model = timm.create_model(
            model_name,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path or "",
            num_classes=0,
            global_pool="avg",
            **kwargs,
        )
        if isinstance(self.model, EfficientNet) and not keep_head_conv:
            # Weights are created (and loaded) first, then the head is dropped, so pretrained
            # checkpoints that contain a head still load.
            self.model.conv_head = nn.Identity()
            self.model.bn2 = nn.Identity()
            self.model.num_features = self.model.head_hidden_size = self.model.blocks[-1][-1].conv_pwl.out_channels
        self.model_name = model_name
        self.output_dim: int = self.model.num_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of storing them (timm's switch)."""
        self.model.set_grad_checkpointing(enable)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Encode images.

        Args:
            pixel_values: ``(B, 3, H, W)`` images, normalised as the recipe's transform does.

        Returns:
            ``(B, output_dim)`` pooled features (not normalised).
        """
        return self.model(pixel_values)


def load_hf_config(name_or_path: str, param: str, fix: str) -> PretrainedConfig:
    """``AutoConfig.from_pretrained(name_or_path)``, or a :class:`ConfigError` on ``param`` saying whether the
    local folder is missing or the hub does not know the name, followed by ``fix``."""
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
        where = (
            "no such local folder"
            if looks_local
            else "not a local folder, and the Hugging Face hub (or its cache) does not know it"
        )
        raise ConfigError(param, name_or_path, f"{where}. {fix}") from err


def _load_config(model_name_or_path: str | None, config: dict[str, Any] | None) -> PretrainedConfig:
    if config is not None:
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ConfigError("config", config, "needs a 'model_type' key (e.g. 'bert') to build a model from it.")
        if model_name_or_path is not None:
            # A name plus overrides: start from the named config and change the given fields.
            base = _load_config(model_name_or_path, None)
            return base.__class__(**{**base.to_dict(), **config})
        try:
            return AutoConfig.for_model(model_type, **config)
        except ValueError as err:
            raise ConfigError("config", {"model_type": model_type}, str(err)) from err
    if model_name_or_path is None:
        raise ConfigError("model_name_or_path", None, "give a Hugging Face model name/path or an inline `config`.")
    loaded = load_hf_config(
        model_name_or_path,
        "model_name_or_path",
        "Use a hub name such as 'bert-base-uncased' (needs a network or a warm cache), a folder written by "
        "save_pretrained, or an inline `config: {model_type: bert, ...}`.",
    )
    if isinstance(loaded, AlignConfig):
        loaded = loaded.text_config
    if isinstance(loaded, AlignTextConfig):
        # A Hugging Face ALIGN checkpoint: its text model is BERT, key for key (see model/hf_align.py).
        return BertConfig(**{name: getattr(loaded, name) for name in ALIGN_TEXT_FIELDS})
    return loaded


class TextTower(nn.Module):
    """A Hugging Face encoder with [CLS] (ALIGN) or masked-mean pooling.

    Args:
        model_name_or_path: Hub name or local folder (``save_pretrained`` layout). With
            ``pretrained=False`` only its config is used and the weights are initialised at random.
            A Hugging Face ALIGN checkpoint (``kakaobrain/align-base``) gives its BERT text model's
            architecture; its weights load with the whole model (``DualEncoder(init_from=...)``).
        config: Inline config fields (must include ``model_type``, e.g. ``bert``) to build a model
            from scratch without any file; with ``model_name_or_path`` they override its config.
        pretrained: Load the weights of ``model_name_or_path``.
        pooling: ``"cls"`` (first token, as ALIGN) or ``"mean"`` (mean over non-padding tokens).
        vocab_size: Override the vocabulary size (set from the tokenizer by the CLI for models
            trained from scratch; must not be smaller than the tokenizer's vocabulary).

    Raises:
        ConfigError: For an unknown name/path, a config without ``model_type``, a vocabulary
            size change on pretrained weights, or ``pretrained`` with an ALIGN checkpoint.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = False,
        pooling: Literal["cls", "mean"] = "cls",
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError("pooling", pooling, "must be 'cls' (ALIGN) or 'mean'.")
        hf_config = _load_config(model_name_or_path, config)
        if pretrained:
            if model_name_or_path is None:
                raise ConfigError("pretrained", True, "needs `model_name_or_path` to load weights from.")
            if isinstance(AutoConfig.from_pretrained(model_name_or_path), (AlignConfig, AlignTextConfig)):
                raise ConfigError(
                    "pretrained",
                    True,
                    f"{model_name_or_path!r} is an ALIGN checkpoint, whose weights load with the whole model: set "
                    f"pretrained: false and the DualEncoder's init_from: {model_name_or_path} (or use from_hf_align).",
                )
            if vocab_size is not None and vocab_size != hf_config.vocab_size:
                raise ConfigError(
                    "vocab_size",
                    vocab_size,
                    f"differs from the pretrained model's vocabulary ({hf_config.vocab_size}); use the model's own "
                    "tokenizer with pretrained weights.",
                )
            self.model = AutoModel.from_pretrained(model_name_or_path, config=hf_config)
        else:
            if vocab_size is not None:
                hf_config.vocab_size = vocab_size
            self.model = AutoModel.from_config(hf_config)
        # ALIGN uses the last hidden state, not BERT's tanh pooler: drop it so that it holds no
        # parameters that never receive gradients (which DDP would reject).
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        self.pooling = pooling
        self.output_dim: int = hf_config.hidden_size
        self.vocab_size: int = hf_config.vocab_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of storing them (HF's switch)."""
        # transformers >= 5 renamed the switch; keep working with both.
        if hasattr(self.model, "activation_checkpointing_enable"):
            if enable:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encode token sequences.

        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: ``(B, L)``, 1 for real tokens and 0 for padding.

        Returns:
            ``(B, output_dim)`` pooled features (not normalised).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
