"""Tests for align_lightning/losses/contrastive.py.

The distributed tests spawn gloo processes and compare with one process holding the global batch.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from align_lightning.losses import ContrastiveLoss, contrastive_loss

DIM = 16


def _embeds(n: int, dim: int = DIM, requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    image = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_(requires_grad)
    text = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_(requires_grad)
    return image, text


def test_matches_hf_align_loss() -> None:
    """transformers' AlignModel loss: mean of the two directions, label smoothing 0.1."""
    from transformers.models.align.modeling_align import align_loss

    image, text = _embeds(24)
    temperature = torch.tensor(0.07, requires_grad=True)
    ours = contrastive_loss(image, text, 1.0 / temperature, label_smoothing=0.1)
    ours_grads = torch.autograd.grad(ours, (image, text, temperature))

    # AlignModel.forward: logits_per_text = text @ image.T / temperature; loss = align_loss(logits_per_text)
    theirs = align_loss(text @ image.T / temperature)
    theirs_grads = torch.autograd.grad(theirs, (image, text, temperature))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_matches_open_clip_loss() -> None:
    """open_clip's ClipLoss (no label smoothing), single process."""
    from open_clip.loss import ClipLoss

    image, text = _embeds(24)
    logit_scale = torch.tensor(14.3, requires_grad=True)
    ours = contrastive_loss(image, text, logit_scale)
    theirs = ClipLoss()(image, text, logit_scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(
        torch.autograd.grad(ours, (image, text, logit_scale)),
        torch.autograd.grad(theirs, (image, text, logit_scale)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_perfect_alignment_has_low_loss_and_random_has_log_n() -> None:
    image, _ = _embeds(32, requires_grad=False)
    assert contrastive_loss(image, image, 100.0).item() < 1e-3
    # All-equal logits: each cross-entropy is log(B).
    same = F.normalize(torch.ones(32, DIM), dim=-1)
    torch.testing.assert_close(contrastive_loss(same, same, 10.0), torch.tensor(32.0).log())


def test_sum_reduction_is_twice_the_mean() -> None:
    image, text = _embeds(8, requires_grad=False)
    mean = contrastive_loss(image, text, 5.0, label_smoothing=0.1)
    total = contrastive_loss(image, text, 5.0, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(total, 2 * mean)


def test_module_returns_terms() -> None:
    image, text = _embeds(8, requires_grad=False)
    out = ContrastiveLoss(label_smoothing=0.1)(image, text, torch.tensor(5.0))
    assert set(out) == {"loss", "loss_i2t", "loss_t2i"}
    torch.testing.assert_close(out["loss"], (out["loss_i2t"] + out["loss_t2i"]) / 2)
    torch.testing.assert_close(out["loss"], contrastive_loss(image, text, 5.0, label_smoothing=0.1))
    # Asymmetric inputs give different directional terms.
    assert not torch.allclose(out["loss_i2t"], out["loss_t2i"])


def test_half_precision_inputs_large_scale_stay_finite() -> None:
    """bf16/fp16 embeddings at logit scale 100: the loss is computed in float32, no overflow."""
    image, text = _embeds(64, requires_grad=False)
    reference = contrastive_loss(image, text, 100.0)
    for dtype in (torch.float16, torch.bfloat16):
        loss = contrastive_loss(image.to(dtype), text.to(dtype), torch.tensor(100.0, dtype=dtype))
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert contrastive_loss(image, text, 100.0).dtype == torch.float32


@pytest.mark.parametrize(
    ("image_shape", "text_shape", "match"),
    [
        ((4, 8), (5, 8), "pair up"),
        ((4, 8), (4, 6), "pair up"),
        ((8,), (8,), r"\(B, D\)"),
        ((0, 8), (0, 8), "empty batch"),
    ],
)
def test_bad_inputs_raise_clear_errors(image_shape: tuple, text_shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        contrastive_loss(torch.zeros(image_shape), torch.zeros(text_shape), 1.0)


def test_bad_options_raise() -> None:
    image, text = _embeds(4, requires_grad=False)
    with pytest.raises(ValueError, match="reduction"):
        contrastive_loss(image, text, 1.0, reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        ContrastiveLoss(reduction="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_smoothing"):
        ContrastiveLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="scalar"):
        contrastive_loss(image, text, torch.ones(2))


# --- distributed parity -------------------------------------------------------------------------


class _TwoTowers(nn.Module):
    """Stand-in dual encoder with a learnable temperature (no BatchNorm, so a split batch is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, DIM))
        self.text = nn.Sequential(nn.Linear(10, 20), nn.GELU(), nn.Linear(20, DIM))
        self.temperature = nn.Parameter(torch.tensor(0.5))

    def forward(self, x_image: torch.Tensor, x_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(x_image), dim=-1), F.normalize(self.text(x_text), dim=-1), 1 / self.temperature


def _global_problem(sizes: list[int]) -> tuple[_TwoTowers, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1234)
    return _TwoTowers(), torch.randn(sum(sizes), 12), torch.randn(sum(sizes), 10)


def _reference(sizes: list[int], label_smoothing: float, reduction: str) -> tuple[float, dict[str, torch.Tensor]]:
    model, x_image, x_text = _global_problem(sizes)
    loss = contrastive_loss(*model(x_image, x_text), label_smoothing=label_smoothing, reduction=reduction)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


_CASES = {  # (local batch sizes, label smoothing, reduction, block_size)
    "ws2": ([4, 4], 0.0, "mean", None),
    "ws2-smooth": ([4, 4], 0.1, "mean", None),
    "ws3-smooth": ([3, 3, 3], 0.1, "mean", None),
    "ws3-sum": ([3, 3, 3], 0.0, "sum", None),
    "ws3-uneven-smooth": ([5, 2, 4], 0.1, "mean", None),  # unequal local batches (e.g. a short last batch)
    # The blockwise loss over the gathered columns (tiles straddle ranks' rows).
    "ws2-smooth-blockwise": ([4, 4], 0.1, "mean", 3),
    "ws3-uneven-smooth-blockwise": ([5, 2, 4], 0.1, "mean", 2),
}


def _worker(rank: int, world_size: int, init_file: str, cases: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for case_id, (sizes, smoothing, reduction, block_size) in cases.items():
            model, x_image, x_text = _global_problem(sizes)
            local = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            loss = contrastive_loss(
                *model(x_image[local], x_text[local]),
                label_smoothing=smoothing,
                reduction=reduction,
                block_size=block_size,
            )
            loss.backward()
            # What DDP does with gradients, and Lightning's sync_dist with the logged loss: average.
            for p in model.parameters():
                dist.all_reduce(p.grad)  # gloo has no AVG: sum, then divide
                p.grad /= world_size
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[case_id] = {
                "loss": mean_loss.item() / world_size,
                "grads": {n: p.grad for n, p in model.named_parameters()},
            }
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results() -> dict[str, dict]:
    """Run every case in one spawned job per world size (spawning dominates the cost)."""
    results: dict[str, dict] = {}
    for world_size in sorted({len(sizes) for sizes, *_ in _CASES.values()}):
        cases = {k: v for k, v in _CASES.items() if len(v[0]) == world_size}
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.pt")
            mp.spawn(_worker, args=(world_size, os.path.join(tmp, "init"), cases, out), nprocs=world_size, join=True)
            results.update(torch.load(out))
    return results


@pytest.mark.parametrize("case_id", list(_CASES))
def test_distributed_equals_single_process_full_batch(case_id: str, distributed_results: dict[str, dict]) -> None:
    """N gloo ranks with the all-gathered local loss == one process holding the global batch."""
    sizes, smoothing, reduction, _ = _CASES[case_id]
    ref_loss, ref_grads = _reference(sizes, smoothing, reduction)  # always the dense loss, one process
    result = distributed_results[case_id]
    assert result["loss"] == pytest.approx(ref_loss, abs=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-5, msg=f"gradient of {name}")


def test_without_process_group_gather_is_a_no_op() -> None:
    image, text = _embeds(6, requires_grad=False)
    torch.testing.assert_close(contrastive_loss(image, text, 3.0), contrastive_loss(image, text, 3.0, gather=False))


def test_half_precision_embeddings_with_the_largest_logit_scale_stay_finite() -> None:
    """fp16 embeddings at logit scale 100 (temperature at its floor): fp16 logits would overflow
    (65504); the loss works in float32, so value and gradients are finite and equal the float32 ones."""
    torch.manual_seed(0)
    image = F.normalize(torch.randn(64, 32), dim=-1)
    text = F.normalize(image + 0.01 * torch.randn(64, 32), dim=-1)
    reference = contrastive_loss(image, text, torch.tensor(100.0), label_smoothing=0.1)
    half_image = image.half().requires_grad_()
    half_text = text.half().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = contrastive_loss(half_image, half_text, torch.tensor(100.0), label_smoothing=0.1)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(half_image.grad).all()
    assert torch.isfinite(half_text.grad).all()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-2)


# --- blockwise (tiled) loss -----------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "block_size"), [(37, 5), (37, 1), (37, 37), (37, 100), (8, 3)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_blockwise_equals_dense_value_and_gradients(batch: int, block_size: int, smoothing: float) -> None:
    torch.manual_seed(batch + block_size)
    image, text = _embeds(batch)
    scale = torch.tensor(14.0, requires_grad=True)
    dense = ContrastiveLoss(label_smoothing=smoothing, block_size=None)(image, text, scale)
    dense_grads = torch.autograd.grad(dense["loss"], (image, text, scale))
    tiled = ContrastiveLoss(label_smoothing=smoothing, block_size=block_size)(image, text, scale)
    tiled_grads = torch.autograd.grad(tiled["loss"], (image, text, scale))
    for key in ("loss", "loss_i2t", "loss_t2i"):
        assert tiled[key].item() == pytest.approx(dense[key].item(), abs=1e-5), key
    for ours, reference in zip(tiled_grads, dense_grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_blockwise_with_a_float_scale_and_large_logits() -> None:
    """A Python float logit scale (no gradient) and logits near 100: the streaming log-sum-exp stays finite."""
    image, text = _embeds(20)
    dense = contrastive_loss(image, text, 100.0, label_smoothing=0.1)
    tiled = contrastive_loss(image, text, 100.0, label_smoothing=0.1, block_size=6)
    assert torch.isfinite(tiled)
    assert tiled.item() == pytest.approx(dense.item(), rel=1e-5)


def test_block_size_auto_switches_above_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    import align_lightning.losses.contrastive as contrastive

    calls: list[int] = []
    original = contrastive.symmetric_blockwise_cross_entropy

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(contrastive, "symmetric_blockwise_cross_entropy", counted)
    monkeypatch.setattr(contrastive, "AUTO_BLOCKWISE_ABOVE", 16)
    monkeypatch.setattr(contrastive, "AUTO_BLOCK_SIZE", 4)
    image, text = _embeds(16)
    ContrastiveLoss()(image, text, 10.0)  # 16 pairs: not above the threshold, dense
    assert calls == []
    image, text = _embeds(17)
    ContrastiveLoss()(image, text, 10.0)
    assert calls == [4]  # one process: both directions in one tiled pass, tiles of AUTO_BLOCK_SIZE
    assert ContrastiveLoss().block_size == "auto"


@pytest.mark.parametrize("block_size", [0, -3, "big", 2.5])
def test_bad_block_size_raises(block_size: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        ContrastiveLoss(block_size=block_size)  # type: ignore[arg-type]
    image, text = _embeds(4)
    with pytest.raises(ValueError, match="block_size"):
        contrastive_loss(image, text, 1.0, block_size=block_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_symmetric_tiles_equal_two_one_directional_passes(smoothing: float) -> None:
    """One process's fused pass (each square tile once for both directions) == the row-tiled pass per direction
    (the one used against gathered columns), values and gradients."""
    from align_lightning.losses.blockwise import blockwise_cross_entropy, symmetric_blockwise_cross_entropy

    image, text = _embeds(23)
    scale = torch.tensor(9.0, requires_grad=True)
    fused = symmetric_blockwise_cross_entropy(image, text, scale, smoothing, 4)
    fused_grads = torch.autograd.grad(fused[0] + 2 * fused[1], (image, text, scale))
    i2t = blockwise_cross_entropy(image, text, scale, 0, smoothing, 6)
    t2i = blockwise_cross_entropy(text, image, scale, 0, smoothing, 6)
    grads = torch.autograd.grad(i2t + 2 * t2i, (image, text, scale))
    assert fused[0].item() == pytest.approx(i2t.item(), abs=1e-5)
    assert fused[1].item() == pytest.approx(t2i.item(), abs=1e-5)
    for ours, reference in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
