"""ALIGN's symmetric InfoNCE loss with negatives gathered from every rank ("local loss").

Each rank scores its ``B_local`` images against the ``B_global`` texts of all ranks (and its texts
against all images), so the logits are ``B_local x B_global`` rather than ``B_global^2``, and the
gradients flow back through the gather to the rank that produced each embedding. Each rank's loss
is scaled so that the average over ranks (what DDP and FSDP do with gradients) is exactly the
loss, and the gradient, of one process holding the whole global batch, even when ranks hold
different numbers of pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from align_lightning.losses._distributed import all_gather_with_grad, distributed_world
from align_lightning.losses.blockwise import blockwise_cross_entropy, symmetric_blockwise_cross_entropy

__all__ = ["AUTO_BLOCK_SIZE", "AUTO_BLOCKWISE_ABOVE", "ContrastiveLoss", "contrastive_loss"]

Reduction = Literal["mean", "sum"]
#: ``block_size="auto"``: the blockwise loss, in tiles of this many columns, when the global batch
#: exceeds :data:`AUTO_BLOCKWISE_ABOVE` (dense logits of 8,192 x 8,192 float32 are 256 MiB per matrix).
AUTO_BLOCK_SIZE = 4096
AUTO_BLOCKWISE_ABOVE = 8192
BlockSize = int | Literal["auto"] | None


def _check_inputs(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> None:
    if image_embeds.ndim != 2 or text_embeds.ndim != 2:
        raise ValueError(
            f"contrastive_loss expects (B, D) embeddings, got image {tuple(image_embeds.shape)} and text "
            f"{tuple(text_embeds.shape)}."
        )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings must pair up row by row with the same width, got image "
            f"{tuple(image_embeds.shape)} and text {tuple(text_embeds.shape)}."
        )
    if image_embeds.shape[0] == 0:
        raise ValueError("contrastive_loss got an empty batch (0 pairs); check the data loader and its filtering.")
    if isinstance(logit_scale, Tensor) and logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}.")


def _contrastive_terms(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    label_smoothing: float,
    gather: bool,
    group: dist.ProcessGroup | None,
    block_size: BlockSize = None,
) -> tuple[Tensor, Tensor]:
    """Return this rank's (image->text, text->image) cross-entropies, scaled as described above."""
    _check_inputs(image_embeds, text_embeds, logit_scale)
    _check_block_size(block_size)
    # Similarities, softmax and loss in float32 whatever the autocast / parameter dtype: bf16 logits
    # at a logit scale near 100 lose the resolution that separates the positive from the negatives.
    with torch.autocast(device_type=image_embeds.device.type, enabled=False):
        image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
        scale = logit_scale.float() if isinstance(logit_scale, Tensor) else logit_scale
        local_size = image_embeds.shape[0]
        _, world_size = distributed_world(group) if gather else (0, 1)
        if world_size > 1:
            all_images, offset = all_gather_with_grad(image_embeds, group)
            all_texts, _ = all_gather_with_grad(text_embeds, group)
        else:
            all_images, all_texts, offset = image_embeds, text_embeds, 0
        global_size = all_images.shape[0]
        norm = world_size / global_size
        if block_size == "auto":
            block_size = AUTO_BLOCK_SIZE if global_size > AUTO_BLOCKWISE_ABOVE else None
        if block_size is not None and world_size == 1:
            # One process: both directions share every tile of the square similarity matrix.
            loss_i2t, loss_t2i = symmetric_blockwise_cross_entropy(
                image_embeds, text_embeds, scale, label_smoothing, block_size
            )
            return loss_i2t * norm, loss_t2i * norm
        if block_size is not None:
            # Tiled: each direction's rows against the gathered columns, never materialised at once.
            loss_i2t = blockwise_cross_entropy(image_embeds, all_texts, scale, offset, label_smoothing, block_size)
            loss_t2i = blockwise_cross_entropy(text_embeds, all_images, scale, offset, label_smoothing, block_size)
            return loss_i2t * norm, loss_t2i * norm
        if world_size > 1:
            logits_i2t = scale * image_embeds @ all_texts.T
            logits_t2i = scale * text_embeds @ all_images.T
        else:
            logits_i2t = scale * image_embeds @ text_embeds.T
            logits_t2i = logits_i2t.T
        labels = torch.arange(offset, offset + local_size, device=image_embeds.device)
        # Sum over local rows, divided by the global batch and multiplied by the world size (norm): the
        # mean over ranks is then the mean over all B_global rows, also for unequal local batch sizes.
        loss_i2t = F.cross_entropy(logits_i2t, labels, label_smoothing=label_smoothing, reduction="sum") * norm
        loss_t2i = F.cross_entropy(logits_t2i, labels, label_smoothing=label_smoothing, reduction="sum") * norm
    return loss_i2t, loss_t2i


def _check_block_size(block_size: BlockSize) -> None:
    if block_size is not None and block_size != "auto" and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be None (dense), 'auto' or a positive column count, got {block_size!r}.")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' (half the sum, ALIGN's seed formula) or 'sum' (the paper's), got {reduction!r}."
        )


def _reduce(loss_i2t: Tensor, loss_t2i: Tensor, reduction: Reduction) -> Tensor:
    _check_reduction(reduction)
    return (loss_i2t + loss_t2i) / 2 if reduction == "mean" else loss_i2t + loss_t2i


def contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    *,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    gather: bool = True,
    group: dist.ProcessGroup | None = None,
    block_size: BlockSize = None,
) -> Tensor:
    """Symmetric InfoNCE over image-text pairs, with negatives from all ranks.

    ``logits = logit_scale * image_embeds @ text_embeds.T``; the loss is the cross-entropy of each
    image against all texts (image->text) and of each text against all images (text->image), the
    matching pair being the positive.

    Args:
        image_embeds: ``(B_local, D)`` L2-normalised image embeddings of this rank.
        text_embeds: ``(B_local, D)`` L2-normalised text embeddings; row ``i`` describes image ``i``.
        logit_scale: Multiplier of the cosine similarities (``1 / temperature``), a scalar.
        label_smoothing: Cross-entropy label smoothing (ALIGN: 0.1).
        reduction: ``"mean"`` = ½(L_i2t + L_t2i) (default) or ``"sum"`` = L_i2t + L_t2i (the paper);
            each direction is averaged over the global batch.
        gather: Use the embeddings of all ranks of ``group`` as negatives when running distributed.
        group: Process group to gather over (default: the whole job).
        block_size: ``None``: dense logits; a positive number: the blockwise (tiled) loss in tiles of
            that many columns, with the same value and gradients and ``O(B_local x block_size)``
            memory; ``"auto"``: blockwise (tiles of :data:`AUTO_BLOCK_SIZE`) above
            :data:`AUTO_BLOCKWISE_ABOVE` pairs of global batch.

    Returns:
        The scalar loss of this rank. Averaged over ranks (as DDP/FSDP average gradients), loss and
        gradients equal those of a single process holding the whole global batch.
    """
    terms = _contrastive_terms(image_embeds, text_embeds, logit_scale, label_smoothing, gather, group, block_size)
    return _reduce(*terms, reduction)


class ContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss`, returning the named terms for logging.

    Args:
        label_smoothing: Cross-entropy label smoothing (ALIGN: 0.1).
        reduction: ``"mean"`` (½ of the sum) or ``"sum"`` (the paper's formula).
        gather: Gather negatives from all ranks when running distributed (ALIGN: yes).
        block_size: ``"auto"`` (default: blockwise above :data:`AUTO_BLOCKWISE_ABOVE` pairs), ``None``
            (always dense) or a tile width (always blockwise); see :func:`contrastive_loss`.
    """

    def __init__(
        self,
        label_smoothing: float = 0.1,
        reduction: Reduction = "mean",
        gather: bool = True,
        block_size: BlockSize = "auto",
    ) -> None:
        super().__init__()
        _check_block_size(block_size)
        self.block_size = block_size
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        _check_reduction(reduction)
        self.label_smoothing = label_smoothing
        self.reduction: Reduction = reduction
        self.gather = gather

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> dict[str, Tensor]:
        """Compute the loss; see :func:`contrastive_loss` for shapes.

        Returns:
            ``{"loss": ..., "loss_i2t": ..., "loss_t2i": ...}`` for this rank.
        """
        loss_i2t, loss_t2i = _contrastive_terms(
            image_embeds, text_embeds, logit_scale, self.label_smoothing, self.gather, None, self.block_size
        )
        return {"loss": _reduce(loss_i2t, loss_t2i, self.reduction), "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, gather={self.gather}, "
            f"block_size={self.block_size!r}"
        )
