"""Tests for align_lightning/module.py and align_lightning/optim.py."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from align_lightning.data import DemoDataModule
from align_lightning.losses import ContrastiveLoss
from align_lightning.model import DualEncoder, ImageTower, TextTower
from align_lightning.module import ALIGNModule
from align_lightning.optim import WarmupLinearDecay, weight_decay_param_groups
from tests.conftest import TINY_BERT


def _module(vocab_size: int, **kwargs) -> ALIGNModule:  # noqa: ANN003
    model = DualEncoder(ImageTower("test_efficientnet"), TextTower(config=TINY_BERT, vocab_size=vocab_size))
    return ALIGNModule(model, ContrastiveLoss(label_smoothing=0.1), **kwargs)


@pytest.fixture
def datamodule() -> DemoDataModule:
    return DemoDataModule(num_train=64, num_val=24, image_size=32, batch_size=8)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:  # noqa: ANN003
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 4,
        "limit_val_batches": 3,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": L.pytorch.loggers.CSVLogger(tmp_path),
    }
    return L.Trainer(**{**defaults, **kwargs})


def test_weight_decay_groups_exclude_biases_norms_and_temperature(dual_encoder: DualEncoder) -> None:
    decay, no_decay = weight_decay_param_groups(dual_encoder)
    assert "weight_decay" not in decay
    assert no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(dual_encoder.temperature) in no_decay_ids
    assert id(dual_encoder.text_projection.bias) in no_decay_ids
    assert id(dual_encoder.text_projection.weight) not in no_decay_ids
    assert all(p.ndim < 2 for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    total = sum(1 for p in dual_encoder.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == total


def test_warmup_linear_decay_schedule() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupLinearDecay(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(13):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    # Resumable: the state holds the step and the schedule.
    restored = WarmupLinearDecay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 4, 12)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_last_lr() == scheduler.get_last_lr()
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupLinearDecay(optimizer, warmup_steps=10, total_steps=5)


def test_fit_logs_the_contract_metrics(tmp_path: Path, datamodule: DemoDataModule) -> None:
    module = _module(len(datamodule.tokenizer), optimizer=partial(torch.optim.AdamW, lr=1e-3))
    trainer = _trainer(tmp_path, val_check_interval=4)
    trainer.fit(module, datamodule)
    metrics = trainer.callback_metrics
    for key in (
        "train/loss",
        "train/loss_i2t",
        "train/loss_t2i",
        "train/temperature",
        "train/lr",
        "train/samples_per_sec",
    ):
        assert key in metrics, key
    for key in ("val/loss", "val/demo/i2t_R@1", "val/demo/t2i_R@5", "val/demo/i2t_R@10"):
        assert key in metrics, key
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["val/demo/i2t_R@1"] <= metrics["val/demo/i2t_R@5"] <= metrics["val/demo/i2t_R@10"] <= 1.0
    # The default scheduler decays linearly to 0 over the run's optimizer steps.
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, WarmupLinearDecay)
    assert scheduler.total_steps == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)


def test_training_moves_the_temperature_and_lowers_the_loss(tmp_path: Path, datamodule: DemoDataModule) -> None:
    module = _module(
        len(datamodule.tokenizer),
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        lr_scheduler=partial(WarmupLinearDecay, warmup_steps=0, total_steps=10_000),
    )
    batch = next(iter(datamodule.train_dataloader()))
    module.eval()
    with torch.no_grad():
        before = module.loss(*module(batch))["loss"].item()
    module.train()
    _trainer(tmp_path, max_steps=30, limit_val_batches=0).fit(module, datamodule)
    module.eval()
    with torch.no_grad():
        after = module.loss(*module(batch))["loss"].item()
    assert after < before
    assert module.model.temperature.item() != pytest.approx(1.0)


def test_lamb_is_the_default_optimizer(datamodule: DemoDataModule) -> None:
    from timm.optim import Lamb

    module = _module(len(datamodule.tokenizer))
    module.trainer = L.Trainer(max_steps=7, logger=False, enable_progress_bar=False)  # for estimated steps
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, Lamb)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-5
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert config["lr_scheduler"]["interval"] == "step"


def test_bf16_mixed_with_gradient_accumulation(tmp_path: Path, datamodule: DemoDataModule) -> None:
    module = _module(len(datamodule.tokenizer), optimizer=partial(torch.optim.AdamW, lr=1e-3))
    seen_dtypes = []
    original = module.loss.forward

    def spy(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> dict:
        out = original(image_embeds, text_embeds, logit_scale)
        seen_dtypes.append((image_embeds.dtype, out["loss"].dtype))
        return out

    module.loss.forward = spy
    trainer = _trainer(tmp_path, precision="bf16-mixed", accumulate_grad_batches=2, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule)
    assert trainer.global_step == 2
    assert len(seen_dtypes) == 4
    # The towers ran in bf16 under autocast; the loss was computed in float32.
    assert all(loss_dtype == torch.float32 for _, loss_dtype in seen_dtypes)
    assert any(embed_dtype == torch.bfloat16 for embed_dtype, _ in seen_dtypes)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_predict_step_embeds(dual_encoder: DualEncoder, batch: dict) -> None:
    module = ALIGNModule(dual_encoder).eval()
    out = module.predict_step(batch, 0)
    assert out["image_embeds"].shape == out["text_embeds"].shape == (4, dual_encoder.embed_dim)
    assert set(module.predict_step({"pixel_values": batch["pixel_values"]}, 0)) == {"image_embeds"}


def test_schedule_spans_the_run_over_a_stream_without_length(tmp_path: Path, datamodule: DemoDataModule) -> None:
    """Shard streams have no length; the schedule's length comes from the DataModule's epoch estimate."""
    module = _module(len(datamodule.tokenizer), lr_scheduler=partial(WarmupLinearDecay, warmup_steps=1))
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=3, limit_val_batches=0)
    trainer.fit(module, datamodule)
    per_epoch = datamodule.estimated_batches_per_epoch()
    assert per_epoch is not None
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 3 * per_epoch
    assert trainer.global_step == 3 * (datamodule.samples_per_epoch // 8)  # full batches only

    datamodule.samples_per_epoch = None  # nothing tells the stream's length: a clear error
    with pytest.raises(ValueError, match="max_steps"):
        _trainer(tmp_path, max_steps=-1, max_epochs=1).fit(_module(len(datamodule.tokenizer)), datamodule)


def test_compile_towers_option(tmp_path: Path, datamodule: DemoDataModule) -> None:
    """Off by default; a backend compiles both towers in place (names unchanged, training runs); an unusable
    backend warns and trains eagerly."""
    module = _module(len(datamodule.tokenizer), compile_towers="eager")
    _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=datamodule)
    assert module.model.image_tower._compiled_call_impl is not None
    assert module.model.text_tower._compiled_call_impl is not None
    assert all(not name.startswith("_orig_mod") for name in module.model.state_dict())
    module = _module(len(datamodule.tokenizer), compile_towers="no_such_backend")
    with pytest.warns(UserWarning, match="towers run eagerly"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=datamodule)
    assert module.model.image_tower._compiled_call_impl is None
    assert _module(len(datamodule.tokenizer)).compile_towers is False


def test_frozen_tower_stays_in_eval_mode_without_gradients() -> None:
    model = DualEncoder(ImageTower("test_efficientnet"), TextTower(config=TINY_BERT), freeze_image_tower=True)
    model.train()
    assert not model.image_tower.training
    assert model.text_tower.training
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    groups = weight_decay_param_groups(model)
    trainable = {id(p) for group in groups for p in group["params"]}
    assert not trainable & {id(p) for p in model.image_tower.parameters()}
