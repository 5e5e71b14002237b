"""Contrastive gradient caching is exact: a batch in micro-batches gets the gradients of the whole batch.

Distributed (DDP and FSDP2 on 2 gloo ranks): tests/strategies/test_parity.py.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from align_lightning import ALIGNModule, ContrastiveLoss, DualEncoder, ImageTower, TextTower
from align_lightning._errors import ConfigError
from align_lightning.grad_cache import GradCache, split_batch
from align_lightning.optim import WarmupLinearDecay
from align_lightning.strategies import ALIGNFSDPStrategy

BATCH, MICRO = 64, 8


def _bert(dropout: float) -> dict:
    return {
        "model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 37, "max_position_embeddings": 16, "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
    }  # fmt: skip


class _FixedNorm(DualEncoder):
    """BatchNorm with its running statistics in training too: nothing couples the rows of a batch, so a
    true batch and its micro-batches must give the same gradients."""

    def train(self, mode: bool = True) -> _FixedNorm:
        super().train(mode)
        for layer in self.modules():
            if isinstance(layer, _BatchNorm):
                layer.eval()
        return self


def _model(dropout: float = 0.0, fixed_norm: bool = True, **kwargs: bool) -> DualEncoder:
    torch.manual_seed(0)
    cls = _FixedNorm if fixed_norm else DualEncoder
    model = cls(ImageTower("test_efficientnet"), TextTower(config=_bert(dropout)), temperature_init=0.2, **kwargs)
    return model.train()


def _batch(size: int = BATCH) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 64, (size, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 8:] = 0
    return {"pixel_values": torch.randn(size, 3, 32, 32, generator=generator), "input_ids": ids, "attention_mask": mask}


def _encode(model: DualEncoder):  # noqa: ANN202 - the GradCache encoder of a bare DualEncoder
    return lambda batch: model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])


def _cached_grads(model: DualEncoder, loss: nn.Module, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], float]:
    terms, last, _ = GradCache(_encode(model), loss, MICRO, modules=model).step(batch, Tensor.backward)
    last.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, float(terms["loss"])


def _assert_grads_equal(actual: dict[str, Tensor], expected: dict[str, Tensor], floor: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    largest = max(float(g.abs().max()) for g in expected.values())
    for name, grad in expected.items():
        # Tensor-relative (float32 sums in another order), floor for gradients that are zero in exact arithmetic.
        tolerance = 1e-5 * float(grad.abs().max()) + 1e-6 * largest + floor
        torch.testing.assert_close(actual[name], grad, rtol=0.0, atol=tolerance, msg=name)
    assert sum(int(g.abs().max() > 0) for g in expected.values()) > len(expected) // 2


@pytest.mark.parametrize(
    ("block_size", "checkpointing"), [(None, False), (16, False), (None, True)], ids=["dense", "blockwise", "ckpt"]
)
def test_micro_batches_give_the_gradients_of_the_true_batch(block_size: int | None, checkpointing: bool) -> None:
    """Batch 64 as 8 micro-batches == a true batch of 64 (with the blockwise loss, with activation checkpointing)."""
    loss = ContrastiveLoss(label_smoothing=0.1, block_size=block_size)
    reference = _model(grad_checkpointing=checkpointing)
    batch = _batch()
    true_loss = loss(*_encode(reference)(batch))["loss"]
    true_loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    grads, cached_loss = _cached_grads(_model(grad_checkpointing=checkpointing), loss, batch)
    assert cached_loss == pytest.approx(float(true_loss), rel=1e-6)
    assert "temperature" in grads
    _assert_grads_equal(grads, expected)


def test_dropout_and_batchnorm_are_replayed_exactly() -> None:
    """Dropout masks and BatchNorm batch statistics are those of pass 1 in the re-embedding: the gradients
    equal those of embedding the micro-batches with a graph (same seed), running statistics are updated
    once per micro-batch, and the random stream ends where it would have."""
    loss = ContrastiveLoss(label_smoothing=0.1)
    batch = _batch()
    reference = _model(dropout=0.1, fixed_norm=False)
    cached = copy.deepcopy(reference)
    torch.manual_seed(5)
    parts = [_encode(reference)(chunk) for chunk in split_batch(batch, MICRO)]
    loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[-1][2])["loss"].backward()
    expected_next = torch.rand(3)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    torch.manual_seed(5)
    grads, _ = _cached_grads(cached, loss, batch)
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)
    _assert_grads_equal(grads, expected)
    buffers = dict(reference.named_buffers())
    assert any("running_mean" in name for name in buffers)
    for name, value in cached.named_buffers():
        torch.testing.assert_close(value, buffers[name], rtol=1e-6, atol=1e-7, msg=name)
    # Without the replay the second embedding draws other dropout masks: the check above is not vacuous.
    torch.manual_seed(5)
    first = _encode(reference)(batch)[1]
    assert not torch.allclose(_encode(reference)(batch)[1], first)


def test_bf16_autocast() -> None:
    """Under bfloat16 autocast the cached step is the micro-batch graph's step up to bf16 rounding."""
    loss = ContrastiveLoss(label_smoothing=0.1)
    batch = _batch()
    reference, cached = _model(), _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = [_encode(reference)(chunk) for chunk in split_batch(batch, MICRO)]
        loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[-1][2])["loss"].backward()
        grads, cached_loss = _cached_grads(cached, loss, batch)
    assert torch.isfinite(torch.tensor(cached_loss))
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    flat = torch.cat([grads[n].flatten() for n in expected])
    flat_expected = torch.cat([g.flatten() for g in expected.values()])
    assert torch.nn.functional.cosine_similarity(flat, flat_expected, dim=0) > 0.999


def test_split_batch() -> None:
    batch = {**_batch(10), "keys": [str(i) for i in range(10)], "epoch": 3}
    chunks = split_batch(batch, 4)
    assert [len(c["input_ids"]) for c in chunks] == [4, 4, 2]
    assert chunks[2]["keys"] == ["8", "9"]
    assert chunks[1]["epoch"] == 3
    torch.testing.assert_close(torch.cat([c["pixel_values"] for c in chunks]), batch["pixel_values"])
    with pytest.raises(ValueError, match="positive"):
        split_batch(batch, 0)


class _Pairs(Dataset):
    def __init__(self) -> None:
        self.batch = _batch(BATCH)

    def __len__(self) -> int:
        return BATCH

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


def _fit(
    tmp_path: Path, micro_batch_size: int | None, accumulate: int, plugins: list | None = None
) -> tuple[dict[str, Tensor], list[float]]:
    schedule = partial(WarmupLinearDecay, warmup_steps=0, total_steps=100)
    module = ALIGNModule(
        _model(), ContrastiveLoss(label_smoothing=0.1), optimizer=partial(torch.optim.SGD, lr=0.5),
        lr_scheduler=schedule, micro_batch_size=micro_batch_size,
    )  # fmt: skip
    losses: list[float] = []

    class _Losses(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.05,
        accumulate_grad_batches=accumulate, default_root_dir=tmp_path, callbacks=[_Losses()], plugins=plugins,
    )  # fmt: skip
    trainer.fit(module, DataLoader(_Pairs(), batch_size=BATCH // accumulate // 2))
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}, losses


def test_module_trains_with_gradient_caching_as_with_the_true_batch(tmp_path: Path) -> None:
    """Through the Trainer: two optimizer steps with gradient clipping and accumulation, each step's batches in
    micro-batches of 8, equal the same run without caching (Lightning's zero_grad and backward still work)."""
    cached, cached_losses = _fit(tmp_path / "cached", MICRO, accumulate=2)
    plain, plain_losses = _fit(tmp_path / "plain", None, accumulate=2)
    assert cached_losses == pytest.approx(plain_losses, rel=1e-5)
    initial = {name: value.detach() for name, value in _model().named_parameters()}
    updates = {n: v - initial[n] for n, v in cached.items()}
    # Updates are differences of parameter values: allow their float32 rounding (1e-7).
    _assert_grads_equal(updates, {n: v - initial[n] for n, v in plain.items()}, floor=1e-7)


def test_float16_gradient_scaling(tmp_path: Path) -> None:
    """16-mixed: the earlier micro-batches' backward passes are scaled like Lightning's (else, once unscaled,
    they would count 1/65,536 as much as the last one). Lightning only offers 16-mixed on CUDA; its plugin
    with a CPU GradScaler runs the same code path here."""
    from lightning.pytorch.plugins import MixedPrecision

    cached, _ = _fit(tmp_path / "cached", MICRO, accumulate=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    plain, _ = _fit(tmp_path / "plain", None, accumulate=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    initial = {name: value.detach() for name, value in _model().named_parameters()}
    update = torch.cat([(cached[n] - initial[n]).flatten() for n in plain])
    expected = torch.cat([(plain[n] - initial[n]).flatten() for n in plain])
    assert expected.norm() > 0  # the scaler did not skip the steps
    assert (update - expected).norm() < 0.05 * expected.norm()  # float16 rounding only


def test_micro_batch_size_is_validated_and_fsdp1_refused() -> None:
    with pytest.raises(ConfigError, match="micro_batch_size"):
        ALIGNModule(_model(), micro_batch_size=0)
    module = ALIGNModule(_model(), micro_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    trainer.strategy.__class__ = ALIGNFSDPStrategy  # the check only looks at the strategy's type
    module.trainer = trainer
    with pytest.raises(ValueError, match="fsdp2"):
        module.on_fit_start()


def test_the_returned_scalar_is_the_loss() -> None:
    """What Lightning back-propagates (and hands to callbacks as the step's loss) has the full-batch loss's value."""
    model = _model()
    cache = GradCache(_encode(model), ContrastiveLoss(), MICRO, modules=model)
    terms, last, scale = cache.step(_batch(), Tensor.backward)
    assert float(last) == pytest.approx(float(terms["loss"]), rel=1e-6)
    assert last.requires_grad
    assert float(scale) == pytest.approx(5.0)  # 1 / temperature 0.2
