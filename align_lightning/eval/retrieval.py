"""Exact image<->text retrieval recall@K from embeddings, computed in chunks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["retrieval_metrics"]


@torch.no_grad()
def retrieval_metrics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K in both directions, with any number of captions per image.

    Image->text R@K: the fraction of images with at least one of their captions among the K most
    similar texts. Text->image R@K: the fraction of captions whose image is among the K most
    similar images (ALIGN's and CLIP_benchmark's definitions). Similarities are computed
    ``chunk_size`` queries at a time, so the full similarity matrix never exists at once.

    Args:
        image_embeds: ``(N_images, D)`` L2-normalised image embeddings.
        text_embeds: ``(N_texts, D)`` L2-normalised text embeddings.
        text_to_image: ``(N_texts,)``; entry ``j`` is the index of the image caption ``j`` describes.
        ks: The K values.
        chunk_size: Queries per similarity block (memory ~ ``chunk_size x gallery`` floats).

    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ...}`` for each k, values in [0, 1].
    """
    text_to_image = torch.as_tensor(text_to_image, device=image_embeds.device, dtype=torch.long)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(
            f"text_to_image must have one entry per text ({num_texts}), got shape {tuple(text_to_image.shape)}."
        )
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image holds indices outside [0, {num_images}).")
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()

    # Rank of the best positive = number of gallery items scoring strictly higher.
    i2t_rank = torch.empty(num_images, dtype=torch.long, device=image_embeds.device)
    for start in range(0, num_images, chunk_size):
        sims = image_embeds[start : start + chunk_size] @ text_embeds.T
        rows = torch.arange(start, start + sims.shape[0], device=sims.device)
        positive = text_to_image.unsqueeze(0) == rows.unsqueeze(1)
        best_positive = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        i2t_rank[start : start + sims.shape[0]] = (sims > best_positive).sum(dim=1)
        # An image without captions can never be retrieved correctly.
        i2t_rank[start : start + sims.shape[0]][~positive.any(dim=1)] = num_texts

    t2i_rank = torch.empty(num_texts, dtype=torch.long, device=image_embeds.device)
    for start in range(0, num_texts, chunk_size):
        sims = text_embeds[start : start + chunk_size] @ image_embeds.T
        target = text_to_image[start : start + sims.shape[0]]
        positive_sim = sims.gather(1, target.unsqueeze(1))
        t2i_rank[start : start + sims.shape[0]] = (sims > positive_sim).sum(dim=1)

    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = (i2t_rank < k).float().mean().item()
        metrics[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
    return metrics
