"""Tests for align_lightning/eval/retrieval.py, against a direct top-k implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from align_lightning.eval import retrieval_metrics


def _topk_reference(
    images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor, k: int
) -> tuple[float, float]:
    """CLIP_benchmark's definition on the full similarity matrix."""
    scores = images @ texts.T
    positive = text_to_image.unsqueeze(0) == torch.arange(len(images)).unsqueeze(1)  # (I, T)
    top_texts = scores.topk(min(k, scores.shape[1]), dim=1).indices
    i2t = positive.gather(1, top_texts).any(dim=1).float().mean().item()
    top_images = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
    t2i = (top_images == text_to_image.unsqueeze(1)).any(dim=1).float().mean().item()
    return i2t, t2i


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_topk_definition_with_five_captions_per_image(chunk_size: int) -> None:
    torch.manual_seed(0)
    images = F.normalize(torch.randn(40, 8), dim=-1)
    text_to_image = torch.arange(40).repeat_interleave(5)
    texts = F.normalize(images[text_to_image] + 0.9 * torch.randn(200, 8), dim=-1)
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk_size=chunk_size)
    for k in (1, 5, 10):
        i2t, t2i = _topk_reference(images, texts, text_to_image, k)
        assert metrics[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert metrics[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < metrics["i2t_R@1"] < metrics["i2t_R@10"] < 1


def test_perfect_and_bad_inputs() -> None:
    eye = torch.eye(6)
    assert retrieval_metrics(eye, eye, list(range(6)), ks=(1,)) == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}
    with pytest.raises(ValueError, match="one entry per text"):
        retrieval_metrics(eye, eye, [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(eye, eye, [0, 1, 2, 3, 4, 9])


# --- Parity with CLIP_benchmark, median rank, chunking, ties ------------------------------------------------


def _clip_benchmark(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor, ks, batch_size: int = 8):
    """CLIP_benchmark's computation, as in ``clip_benchmark.metrics.zeroshot_retrieval.evaluate``."""
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    scores = texts @ images.T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    out = {}
    for k in ks:
        t2i = zr.batchify(zr.recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0
        i2t = zr.batchify(zr.recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0
        out[f"i2t_R@{k}"], out[f"t2i_R@{k}"] = i2t.float().mean().item(), t2i.float().mean().item()
    return out


def _uneven_captions(num_images: int, generator: torch.Generator) -> torch.Tensor:
    """5 captions per image, some images with 4 or 6, in shuffled order."""
    counts = torch.full((num_images,), 5)
    counts[:5], counts[5:10] = 4, 6
    text_to_image = torch.arange(num_images).repeat_interleave(counts)
    return text_to_image[torch.randperm(len(text_to_image), generator=generator)]


def _brute_force_ranks(images, texts, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based optimistic ranks (number of strictly higher scores) from the full matrix, one query at a time."""
    scores = images @ texts.T
    i2t = []
    for i in range(len(images)):
        best = scores[i][text_to_image == i].max()
        i2t.append(int((scores[i] > best).sum()))
    t2i = [int((scores[:, j] > scores[text_to_image[j], j]).sum()) for j in range(len(texts))]
    return torch.tensor(i2t), torch.tensor(t2i)


KS = (1, 2, 5, 10)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_equals_clip_benchmark_with_uneven_captions(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(60, 16, generator=generator), dim=-1)
    text_to_image = _uneven_captions(60, generator)
    texts = F.normalize(images[text_to_image] + 1.2 * torch.randn(len(text_to_image), 16, generator=generator), dim=-1)
    ours = retrieval_metrics(images, texts, text_to_image, ks=KS, chunk_size=chunk_size)
    assert ours == _clip_benchmark(images, texts, text_to_image, KS)
    assert 0 < ours["i2t_R@1"] < ours["i2t_R@10"] < 1


def _tied_embeddings(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Small-integer embeddings (exact dot products): many exact ties, duplicate images and captions."""
    images = torch.randint(-1, 2, (30, 4), generator=generator).float()
    text_to_image = _uneven_captions(30, generator)
    texts = torch.randint(-1, 2, (len(text_to_image), 4), generator=generator).float()
    texts[:20] = images[text_to_image[:20]]  # some captions equal to their image
    return images, texts, text_to_image


@pytest.mark.parametrize("seed", range(5))
def test_equals_clip_benchmark_with_exact_ties(seed: int) -> None:
    images, texts, text_to_image = _tied_embeddings(torch.Generator().manual_seed(seed))
    reference = _clip_benchmark(images, texts, text_to_image, KS)
    for chunk_size in (1, 4, 1000):
        assert retrieval_metrics(images, texts, text_to_image, ks=KS, chunk_size=chunk_size) == reference
    # The optimistic convention counts every boundary tie as a hit: never below CLIP_benchmark's value.
    optimistic = retrieval_metrics(images, texts, text_to_image, ks=KS, ties="optimistic")
    assert all(optimistic[key] >= value for key, value in reference.items())
    i2t_rank, t2i_rank = _brute_force_ranks(images, texts, text_to_image)
    for k in KS:
        assert optimistic[f"i2t_R@{k}"] == pytest.approx((i2t_rank < k).float().mean().item())
        assert optimistic[f"t2i_R@{k}"] == pytest.approx((t2i_rank < k).float().mean().item())


@pytest.mark.parametrize("seed", range(3))
def test_equals_clip_benchmark_with_duplicate_captions(seed: int) -> None:
    """The same caption for several images (COCO and Flickr30K have some): float embeddings whose dot products
    round, tied exactly only between duplicates. Every score of a boundary row must come from one product."""
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(24, 16, generator=generator), dim=-1)
    distinct = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    texts = distinct[torch.randint(0, 6, (48,), generator=generator)]
    text_to_image = torch.arange(24).repeat_interleave(2)
    reference = _clip_benchmark(images, texts, text_to_image, KS)
    for chunk_size in (1, 5, 1000):
        assert retrieval_metrics(images, texts, text_to_image, ks=KS, chunk_size=chunk_size) == reference


@pytest.mark.parametrize("tied", [False, True])
def test_median_rank_matches_brute_force(tied: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    if tied:
        images, texts, text_to_image = _tied_embeddings(generator)
    else:
        images = F.normalize(torch.randn(50, 8, generator=generator), dim=-1)
        text_to_image = _uneven_captions(50, generator)
        texts = F.normalize(images[text_to_image] + torch.randn(len(text_to_image), 8, generator=generator), dim=-1)
    i2t_rank, t2i_rank = _brute_force_ranks(images, texts, text_to_image)
    metrics = [
        retrieval_metrics(images, texts, text_to_image, ks=(1,), chunk_size=c, median_rank=True) for c in (3, 1000)
    ]
    assert metrics[0] == metrics[1]
    # VSE++'s convention: floor(np.median(0-based ranks)) + 1.
    assert metrics[0]["i2t_median_rank"] == np.floor(np.median(i2t_rank.numpy())) + 1
    assert metrics[0]["t2i_median_rank"] == np.floor(np.median(t2i_rank.numpy())) + 1
    assert metrics[0]["t2i_median_rank"] > 1


def test_large_k_and_image_without_captions() -> None:
    images = F.normalize(torch.randn(4, 3), dim=-1)
    texts = images[[0, 0, 1, 2]]  # image 3 has no caption
    metrics = retrieval_metrics(images, texts, [0, 0, 1, 2], ks=(1, 100), median_rank=True)
    assert metrics["i2t_R@1"] == metrics["i2t_R@100"] == 0.75
    assert metrics["t2i_R@100"] == 1.0
    assert metrics["i2t_median_rank"] == 1.0
