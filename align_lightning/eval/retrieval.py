"""Exact image<->text retrieval recall@K (and median rank) from embeddings, in one chunked pass.

Tie convention (``ties="topk"``, the default): a query's rank is the number of gallery items that
score *strictly higher* than its best positive; R@K is a hit when that rank is below K, except when
the positive's group of exactly tied scores straddles position K (some tied items fit in the top K,
some do not). Then the hit is decided as CLIP_benchmark decides it: ``torch.topk(scores, k)`` on the
query's score row and a check whether a positive is among the returned indices. ``torch.topk`` picks
among tied items in an unspecified, implementation-dependent order (``topk(5)`` and ``topk(10)`` of
one row may even pick different tied items), so in those rare rows this reproduces CLIP_benchmark's
value on the same device and torch build rather than a principled rule. ``ties="optimistic"``
instead counts every boundary tie as a hit (rank = number of strictly higher scores; monotone in K).
Median rank always uses the optimistic rank (1-based: ``1 + #strictly higher``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["retrieval_metrics"]


def _median_rank(rank0: Tensor) -> float:
    """VSE++/SCAN's median rank: ``floor(np.median(rank0)) + 1`` for 0-based ranks."""
    ranks = rank0.sort().values
    n = ranks.numel()
    if n == 0:
        return float("nan")
    return float((ranks[(n - 1) // 2] + ranks[n // 2]).item() // 2 + 1)


@torch.no_grad()
def retrieval_metrics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
    *,
    median_rank: bool = False,
    ties: Literal["topk", "optimistic"] = "topk",
) -> dict[str, float]:
    """Recall@K in both directions (and optionally median rank), with any number of captions per image.

    Image->text R@K: the fraction of images with at least one of their captions among the K most
    similar texts. Text->image R@K: the fraction of captions whose image is among the K most
    similar images (ALIGN's and CLIP_benchmark's definitions; values equal CLIP_benchmark's
    ``recall_at_k``, ties included, see the module docstring). One similarity block of
    ``chunk_size`` images x all texts is computed at a time and serves both directions, so the full
    similarity matrix never exists and every score is computed once. Everything runs on the device
    of the embeddings.

    Args:
        image_embeds: ``(N_images, D)`` L2-normalised image embeddings.
        text_embeds: ``(N_texts, D)`` L2-normalised text embeddings.
        text_to_image: ``(N_texts,)``; entry ``j`` is the index of the image caption ``j`` describes.
        ks: The K values (a K at least the gallery size always hits when a positive exists).
        chunk_size: Images per similarity block (extra memory ~ ``chunk_size x N_texts x 6`` bytes).
        median_rank: Also return ``i2t_median_rank`` and ``t2i_median_rank``: the median over
            queries of the 1-based rank of the best-ranked positive, VSE++'s convention
            (``floor(np.median(rank0)) + 1``; an image without captions has rank ``N_texts + 1``).
        ties: ``"topk"`` (CLIP_benchmark's values) or ``"optimistic"`` (boundary ties are hits).

    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ...}`` for each k, values in [0, 1], plus the median ranks
        when asked for.

    Raises:
        ValueError: On inconsistent shapes, out-of-range indices or bad arguments.
    """
    device = image_embeds.device
    text_to_image = torch.as_tensor(text_to_image, device=device, dtype=torch.long)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(
            f"text_to_image must have one entry per text ({num_texts}), got shape {tuple(text_to_image.shape)}."
        )
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image holds indices outside [0, {num_images}).")
    if chunk_size < 1 or any(k < 1 for k in ks):
        raise ValueError(f"chunk_size and ks must be positive, got {chunk_size} and {tuple(ks)}.")
    if ties not in ("topk", "optimistic"):
        raise ValueError(f"ties must be 'topk' or 'optimistic', got {ties!r}.")
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    ks = tuple(ks)

    # Texts grouped by image: texts of images [s, e) are order[bounds[s]:bounds[e]].
    order = torch.sort(text_to_image, stable=True).indices
    bounds = torch.searchsorted(text_to_image[order], torch.arange(num_images + 1, device=device)).tolist()

    # Positive score of each text, from GEMMs of the same orientation as the blocks below (so that
    # duplicates of the positive tie with it exactly).
    positive = torch.empty(num_texts, device=device)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        texts = order[bounds[start] : bounds[stop]]
        block = image_embeds[start:stop] @ text_embeds[texts].T
        positive[texts] = block[text_to_image[texts] - start, torch.arange(len(texts), device=device)]

    i2t_greater = torch.empty(num_images, dtype=torch.long, device=device)
    i2t_equal = torch.empty(num_images, dtype=torch.long, device=device)
    t2i_greater = torch.zeros(num_texts, dtype=torch.long, device=device)
    t2i_equal = torch.zeros(num_texts, dtype=torch.long, device=device)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        sims = image_embeds[start:stop] @ text_embeds.T  # (chunk, N_texts)
        texts = order[bounds[start] : bounds[stop]]
        rows = text_to_image[texts] - start
        sims[rows, texts] = positive[texts]  # both directions see the same positive scores
        # Image -> text: best positive of each image (-inf without captions), then count above/equal.
        best = torch.full((stop - start,), float("-inf"), device=device).scatter_reduce(
            0, rows, positive[texts], reduce="amax"
        )
        # Counts are summed as float32 (exact below 2**24, far faster than bool -> int64 on CPU). The tie
        # counts include the positive itself and are only needed to spot ties at the top-k boundary.
        i2t_greater[start:stop] = (sims > best[:, None]).sum(dim=1, dtype=torch.float32).long()
        t2i_greater += (sims > positive).sum(dim=0, dtype=torch.float32).long()
        if ties == "topk":
            i2t_equal[start:stop] = (sims == best[:, None]).sum(dim=1, dtype=torch.float32).long()
            t2i_equal += (sims == positive).sum(dim=0, dtype=torch.float32).long()

    metrics: dict[str, float] = {}
    has_caption = torch.zeros(num_images, dtype=torch.bool, device=device)
    has_caption[text_to_image] = True
    for k in ks:
        i2t_hit = (i2t_greater < k) & has_caption  # an image without captions is never retrieved correctly
        t2i_hit = t2i_greater < k
        if ties == "topk":
            # Rows whose tied group straddles position k: decide as CLIP_benchmark does, with torch.topk.
            for query in (i2t_hit & (i2t_greater + i2t_equal > k)).nonzero().flatten().tolist():
                scores = text_embeds @ image_embeds[query]
                scores[text_to_image == query] = positive[text_to_image == query]
                top = scores.topk(k).indices
                i2t_hit[query] = bool((text_to_image[top] == query).any())
            for query in (t2i_hit & (t2i_greater + t2i_equal > k)).nonzero().flatten().tolist():
                scores = image_embeds @ text_embeds[query]
                scores[text_to_image[query]] = positive[query]
                t2i_hit[query] = bool((scores.topk(k).indices == text_to_image[query]).any())
        metrics[f"i2t_R@{k}"] = i2t_hit.float().mean().item()
        metrics[f"t2i_R@{k}"] = t2i_hit.float().mean().item()
    if median_rank:
        metrics["i2t_median_rank"] = _median_rank(i2t_greater)
        metrics["t2i_median_rank"] = _median_rank(t2i_greater)
    return metrics
