"""Exact image<->text retrieval recall@K (and median rank) from embeddings, in one chunked pass.

Tie convention (``ties="topk"``, the default): R@K is a hit when a positive is among the K items
``torch.topk`` returns for the query, as CLIP_benchmark computes it. A query is decided from counts
in the chunked pass when the answer cannot depend on rounding: fewer than K items score within
:data:`TIE_TOLERANCE` of (or above) its best positive means a hit, K items scoring more than
``TIE_TOLERANCE`` above it a miss. The rare queries in between (exact ties such as one caption
shared by several images, or scores equal up to float32 rounding, which differs between matrix
products of different shapes) are decided as CLIP_benchmark decides them: ``torch.topk(scores, k)``
on the query's scores, all computed in one product, and a check whether a positive is among the
returned indices. ``torch.topk`` picks among exactly tied items in an implementation-dependent
order, so those rows reproduce CLIP_benchmark's value on the same device and torch build rather
than a principled rule. ``ties="optimistic"`` instead counts every boundary tie as a hit (rank =
number of strictly higher scores; monotone in K). Median rank always uses the optimistic rank
(1-based: ``1 + #strictly higher``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["TIE_TOLERANCE", "retrieval_metrics"]

#: Scores this close (cosines of unit vectors) may be ordered differently by two float32 matrix products
#: of different shapes; queries whose top-K membership hinges on such a margin are decided by ``topk``.
TIE_TOLERANCE = 1e-5


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

    # Positive score of each text (a product of another shape than the blocks below may round it
    # differently: the tolerance band of the counts covers that, boundary queries are re-scored).
    positive = torch.empty(num_texts, device=device)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        texts = order[bounds[start] : bounds[stop]]
        block = image_embeds[start:stop] @ text_embeds[texts].T
        positive[texts] = block[text_to_image[texts] - start, torch.arange(len(texts), device=device)]

    exact = median_rank or ties == "optimistic"  # the number of strictly higher scores is needed
    topk_ties = ties == "topk"
    zeros_i, zeros_t = (torch.zeros(n, dtype=torch.long, device=device) for n in (num_images, num_texts))
    i2t_greater, t2i_greater = zeros_i.clone(), zeros_t.clone()  # scores > the best positive
    i2t_above, t2i_above = zeros_i.clone(), zeros_t.clone()  # scores > best positive + tolerance
    i2t_within, t2i_within = zeros_i.clone(), zeros_t.clone()  # scores >= best positive - tolerance

    def count(condition: Tensor, dim: int) -> Tensor:
        # Summed as float32 (exact below 2**24, far faster than bool -> int64 on CPU).
        return condition.sum(dim=dim, dtype=torch.float32).long()

    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        sims = image_embeds[start:stop] @ text_embeds.T  # (chunk, N_texts)
        texts = order[bounds[start] : bounds[stop]]
        rows = text_to_image[texts] - start
        sims[rows, texts] = positive[texts]  # both directions see the same positive scores
        # Image -> text: best positive of each image (-inf without captions), then count above it.
        best = torch.full((stop - start,), float("-inf"), device=device).scatter_reduce(
            0, rows, positive[texts], reduce="amax"
        )[:, None]
        if exact:
            i2t_greater[start:stop] = count(sims > best, 1)
            t2i_greater += count(sims > positive, 0)
        if topk_ties:
            i2t_above[start:stop] = count(sims > best + TIE_TOLERANCE, 1)
            i2t_within[start:stop] = count(sims >= best - TIE_TOLERANCE, 1)
            t2i_above += count(sims > positive + TIE_TOLERANCE, 0)
            t2i_within += count(sims >= positive - TIE_TOLERANCE, 0)

    metrics: dict[str, float] = {}
    has_caption = torch.zeros(num_images, dtype=torch.bool, device=device)
    has_caption[text_to_image] = True
    for k in ks:
        if not topk_ties:
            i2t_hit = (i2t_greater < k) & has_caption  # an image without captions is never retrieved correctly
            t2i_hit = t2i_greater < k
        else:
            # Certain hits: all items within the tolerance of the positive (itself included) fit in the top k.
            i2t_hit = (i2t_within <= k) & has_caption
            t2i_hit = t2i_within <= k
            # Undecided: fewer than k items are clearly above, but the band around the positive straddles k.
            # Decide as CLIP_benchmark does, with torch.topk on the query's scores from one product.
            for query in ((i2t_above < k) & ~i2t_hit & has_caption).nonzero().flatten().tolist():
                top = (text_embeds @ image_embeds[query]).topk(k).indices
                i2t_hit[query] = bool((text_to_image[top] == query).any())
            for query in ((t2i_above < k) & ~t2i_hit).nonzero().flatten().tolist():
                top = (image_embeds @ text_embeds[query]).topk(k).indices
                t2i_hit[query] = bool((top == text_to_image[query]).any())
        metrics[f"i2t_R@{k}"] = i2t_hit.float().mean().item()
        metrics[f"t2i_R@{k}"] = t2i_hit.float().mean().item()
    if median_rank:
        metrics["i2t_median_rank"] = _median_rank(i2t_greater)
        metrics["t2i_median_rank"] = _median_rank(t2i_greater)
    return metrics
