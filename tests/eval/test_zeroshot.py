"""Tests for align_lightning/eval/zeroshot.py: brute-force class embeddings and top-k accuracy parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from align_lightning.data.tokenizer import train_wordpiece
from align_lightning.eval import IMAGENET_TEMPLATES, topk_accuracy, zeroshot_classifier

CLASSNAMES = ["cat", "dog", "red car", "tabby cat", "airplane"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}.", "{}"]


class BagOfWordsEncoder:
    """A stub text tower: normalised sum of fixed random token vectors (padding ignored)."""

    def __init__(self, vocab_size: int, dim: int = 12) -> None:
        self.table = torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self.calls += 1
        return F.normalize((self.table[input_ids] * attention_mask.unsqueeze(-1)).sum(dim=1), dim=-1)


@pytest.fixture(scope="module")
def tokenizer():
    captions = [t.format(c) for c in CLASSNAMES for t in TEMPLATES] + ["a photo of a dog on grass."] * 3
    return train_wordpiece(captions, vocab_size=200, min_frequency=1)


def _brute_force(model: BagOfWordsEncoder, tokenizer, classnames, templates) -> Tensor:
    columns = []
    for name in classnames:
        embeds = []
        for template in templates:
            tokens = tokenizer([template.format(name)], return_tensors="pt")
            embeds.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0])
        columns.append(F.normalize(torch.stack(embeds).mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_classifier_matches_brute_force(tokenizer, batch_size: int) -> None:
    model = BagOfWordsEncoder(len(tokenizer))
    weights = zeroshot_classifier(model, CLASSNAMES, TEMPLATES, tokenizer, batch_size=batch_size)
    assert weights.shape == (12, len(CLASSNAMES))
    torch.testing.assert_close(weights, _brute_force(model, tokenizer, CLASSNAMES, TEMPLATES))
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(len(CLASSNAMES)))


def test_cache_is_reused_and_invalidated(tokenizer, tmp_path: Path) -> None:
    model, cache = BagOfWordsEncoder(len(tokenizer)), tmp_path / "zs" / "classes.pt"
    first = zeroshot_classifier(model, CLASSNAMES, TEMPLATES, tokenizer, cache_path=cache)
    calls = model.calls
    torch.testing.assert_close(zeroshot_classifier(model, CLASSNAMES, TEMPLATES, tokenizer, cache_path=cache), first)
    assert model.calls == calls  # loaded, not recomputed
    other = zeroshot_classifier(model, CLASSNAMES[:3], TEMPLATES, tokenizer, cache_path=cache)
    assert model.calls > calls
    assert other.shape == (12, 3)
    torch.testing.assert_close(other, first[:, :3])


def test_bad_templates(tokenizer) -> None:
    with pytest.raises(ValueError, match="contain"):
        zeroshot_classifier(BagOfWordsEncoder(len(tokenizer)), CLASSNAMES, ["no slot"], tokenizer)


def test_imagenet_templates() -> None:
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


def test_topk_accuracy_brute_force_and_clamp() -> None:
    scores = torch.randn(200, 7, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 7, (200,), generator=torch.Generator().manual_seed(4))
    ranks = (scores > scores.gather(1, targets[:, None])).sum(dim=1)
    metrics = topk_accuracy(scores, targets, ks=(1, 5, 10))
    assert metrics["top1"] == pytest.approx((ranks < 1).float().mean().item())
    assert metrics["top5"] == pytest.approx((ranks < 5).float().mean().item())
    assert metrics["top10"] == 1.0
    assert topk_accuracy(scores[:, :3], targets.clamp(max=2))["top5"] == 1.0


def _clip_benchmark_accuracy(output: Tensor, target: Tensor, topk: tuple[int, ...]) -> list[float]:
    """``clip_benchmark.metrics.zeroshot_classification.accuracy`` (1.6.2), line for line.

    The packaged function ends in ``float(<1-element ndarray>)``, which NumPy >= 2.5 rejects, so it
    cannot be called here; the body is copied with ``.item()`` instead.
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / n for k in topk]


@pytest.mark.parametrize("tied", [False, True])
def test_topk_accuracy_equals_clip_benchmark(tied: bool) -> None:
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(300, 20, generator=generator)
    if tied:
        scores = scores.round()
    targets = torch.randint(0, 20, (300,), generator=generator)
    top1, top5 = _clip_benchmark_accuracy(scores, targets, topk=(1, 5))
    assert topk_accuracy(scores, targets) == {"top1": top1, "top5": top5}
