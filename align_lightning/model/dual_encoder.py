"""The ALIGN dual encoder: two towers, projections to a shared space, and a learnable temperature."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align_lightning._errors import ConfigError

__all__ = ["DualEncoder"]


class DualEncoder(nn.Module):
    """Image tower + text tower mapped into one L2-normalised embedding space.

    As in ALIGN, the text feature goes through a linear projection ("fully connected layer with
    linear activation") to the image feature width, the image feature is used as is (an image
    projection is optional), both are L2-normalised, and ``logits = cosine / temperature`` with a
    learnable temperature initialised at 1.0 (it converges to about 1/64 in the paper).

    The temperature is stored raw (the ``temperature`` parameter, as Hugging Face ``AlignModel``
    stores it, but with shape ``(1,)`` so that FSDP2 can shard it) and clamped from below at
    ``min_temperature`` when used, so it can neither reach 0 nor go negative; the default floor
    0.01 caps the logit scale at 100, CLIP's cap.

    Args:
        image_tower: Module mapping ``(B, 3, H, W)`` pixels to ``(B, image_tower.output_dim)``.
        text_tower: Module mapping ``(B, L)`` token ids (+ mask) to ``(B, text_tower.output_dim)``.
        embed_dim: Width of the shared space; ``None`` uses the image feature width (ALIGN).
        image_projection: Add a linear image projection; required when ``embed_dim`` differs from
            the image feature width.
        temperature_init: Initial temperature (ALIGN: 1.0).
        min_temperature: Lower clamp of the temperature.
        learnable_temperature: Learn the temperature (ALIGN) or keep it fixed at its initial value.
        grad_checkpointing: Recompute tower activations in the backward pass to save memory.
        freeze_image_tower: Train without updating the image tower (LiT's "locked image tuning"):
            its parameters get no gradients and it stays in eval mode (BatchNorm statistics frozen).
        freeze_text_tower: The same for the text tower.
        init_from: A Hugging Face ``AlignModel`` checkpoint (hub name such as
            ``kakaobrain/align-base``, or a ``save_pretrained`` folder) whose weights (both towers,
            text projection, temperature) replace the initial ones; the towers must have its
            architecture (``AlignVisionTower(<checkpoint>)`` and ``TextTower(<checkpoint>)``), and its
            temperature replaces ``temperature_init``. See
            :func:`~align_lightning.model.from_hf_align`.

    Raises:
        ConfigError: If ``embed_dim`` differs from the image feature width without an image
            projection, the temperature settings are not positive, or ``init_from`` does not fit
            the model (see :func:`~align_lightning.model.load_hf_align_weights`).
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        embed_dim: int | None = None,
        image_projection: bool = False,
        temperature_init: float = 1.0,
        min_temperature: float = 0.01,
        learnable_temperature: bool = True,
        grad_checkpointing: bool = False,
        freeze_image_tower: bool = False,
        freeze_text_tower: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        image_dim, text_dim = int(image_tower.output_dim), int(text_tower.output_dim)
        if embed_dim is None:
            embed_dim = image_dim
        if embed_dim != image_dim and not image_projection:
            raise ConfigError(
                "embed_dim",
                embed_dim,
                f"differs from the image tower's feature width ({image_dim}). Set embed_dim to {image_dim} "
                "(ALIGN: no image projection) or image_projection: true.",
            )
        if not 0.0 < min_temperature <= temperature_init:
            raise ConfigError(
                "min_temperature",
                min_temperature,
                f"must satisfy 0 < min_temperature <= temperature_init ({temperature_init}).",
            )
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = nn.Linear(image_dim, embed_dim) if image_projection else None
        self.text_projection = nn.Linear(text_dim, embed_dim)
        # Shape (1,), not a scalar: FSDP2 (fully_shard) cannot shard 0-dim parameters. 0-dim checkpoint
        # entries (Hugging Face AlignModel's layout) still load (_load_from_state_dict).
        self.temperature = nn.Parameter(torch.tensor([float(temperature_init)]), requires_grad=learnable_temperature)
        self.min_temperature = min_temperature
        self.embed_dim = embed_dim
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        self.frozen_towers = [t for t, f in ((image_tower, freeze_image_tower), (text_tower, freeze_text_tower)) if f]
        for tower in self.frozen_towers:
            tower.requires_grad_(False)
            tower.eval()
        if init_from is not None:
            # Imported here: hf_align builds DualEncoders, so it imports this module.
            from align_lightning.model.hf_align import load_hf_align_weights

            load_hf_align_weights(self, init_from)

    def train(self, mode: bool = True) -> DualEncoder:
        """Set training mode; frozen towers stay in eval mode."""
        super().train(mode)
        for tower in self.frozen_towers:
            tower.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch activation (gradient) checkpointing on or off in both towers."""
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)

    def clamped_temperature(self) -> Tensor:
        """The temperature actually used: ``max(temperature, min_temperature)`` (a 0-dim tensor)."""
        return self.temperature.clamp(min=self.min_temperature).squeeze(0)

    def logit_scale(self) -> Tensor:
        """``1 / temperature``, the multiplier of the cosine similarities (a 0-dim tensor)."""
        return 1.0 / self.clamped_temperature()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "temperature"
        if key in state_dict and state_dict[key].dim() == 0:  # a scalar temperature (AlignModel's layout)
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Embed images.

        Args:
            pixel_values: ``(B, 3, H, W)`` preprocessed images.

        Returns:
            ``(B, embed_dim)`` L2-normalised embeddings.
        """
        return self._encode_image(pixel_values)

    def _encode_image(self, pixel_values: Tensor) -> Tensor:
        features = self.image_tower(pixel_values)
        if self.image_projection is not None:
            features = self.image_projection(features)
        return F.normalize(features, dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Embed token sequences.

        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: ``(B, L)`` mask, 1 for tokens and 0 for padding.

        Returns:
            ``(B, embed_dim)`` L2-normalised embeddings.
        """
        return self._encode_text(input_ids, attention_mask)

    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return F.normalize(self.text_projection(self.text_tower(input_ids, attention_mask)), dim=-1)

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Embed a batch of image-text pairs.

        Returns:
            ``(image_embeds, text_embeds, logit_scale)``: two ``(B, embed_dim)`` L2-normalised
            embeddings and the 0-dim logit scale ``1 / temperature``.
        """
        # The private encoders: under FSDP2, encode_image / encode_text are registered forward methods
        # that reshard the root's parameters when they return, before the temperature is read here.
        return self._encode_image(pixel_values), self._encode_text(input_ids, attention_mask), self.logit_scale()
