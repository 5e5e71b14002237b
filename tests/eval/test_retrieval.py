"""Tests for align_lightning/eval/retrieval.py, against a direct top-k implementation."""

from __future__ import annotations

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
