"""One distributed job of the strategy tests, launched by ``torch.distributed.run`` (2 CPU processes, gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/strategies/parity_job.py {ddp|fsdp2} step OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/strategies/parity_job.py fsdp2 resume OUT

``step``: one SGD step on the global batch of :func:`make_batch`; rank 0 writes the updated full
parameters (``params.pt``); with FSDP2 also a full-state-dict checkpoint (``full.ckpt``).
``frozen``: as ``step`` with the image tower frozen (LiT), writing ``params.pt``.
``bf16``: one SGD step with ``FSDP2Strategy(param_dtype="bfloat16")``; rank 0 writes ``bf16.pt``.
``resume``: AdamW, two steps straight versus one step, a sharded (distributed) checkpoint, and a
fresh run resumed from it for the second step; rank 0 writes both parameter sets (``resume.pt``).
``gradcache`` (kind ``both``): one SGD step on a global batch of :data:`CACHED_BATCH` with gradient
caching in micro-batches of :data:`MICRO_BATCH`, under DDP then FSDP2; rank 0 writes ``gradcache.pt``.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, Dataset, Subset

from align_lightning import ALIGNModule, ContrastiveLoss, DualEncoder, ImageTower, TextTower
from align_lightning.optim import WarmupLinearDecay
from align_lightning.strategies import FSDP2Strategy

#: Tiny BERT without dropout: the ranks' forward passes must be deterministic.
BERT = {
    "model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 37, "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}  # fmt: skip
GLOBAL_BATCH, WORLD = 8, 2
#: Gradient caching: a global batch of 64, each rank's 32 pairs in 8 micro-batches of 4.
CACHED_BATCH, MICRO_BATCH = 64, 4


def make_model(**kwargs: bool) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(ImageTower("test_efficientnet"), TextTower(config=BERT), temperature_init=0.2, **kwargs)


def make_batch(size: int = GLOBAL_BATCH) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, BERT["vocab_size"], (size, 12), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[::3, 9:] = 0
    pixels = torch.randn(size, 3, 32, 32, generator=generator)
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": mask}


def rank_rows(rank: int, size: int = GLOBAL_BATCH) -> list[int]:
    """The rows rank ``rank`` trains on."""
    return list(range(rank, size, WORLD))


class _Rows(Dataset):
    def __init__(self, size: int = GLOBAL_BATCH) -> None:
        self.batch = make_batch(size)

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


def _trainer(strategy: object, max_steps: int, root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, use_distributed_sampler=False,
    )  # fmt: skip


def _module(optimizer: object, micro_batch_size: int | None = None, **model_kwargs: bool) -> ALIGNModule:
    schedule = partial(WarmupLinearDecay, warmup_steps=0, total_steps=100)
    model = make_model(**model_kwargs)
    loss = ContrastiveLoss(label_smoothing=0.1)
    return ALIGNModule(model, loss, optimizer=optimizer, lr_scheduler=schedule, micro_batch_size=micro_batch_size)


def _full_params(module: ALIGNModule) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module.model, options=options)  # full on rank 0 only (cpu_offload)
    if not state:
        return {}
    return {name: state[name].clone() for name, _ in make_model().named_parameters()}


class _CountReductions(L.Callback):
    """Counts DDP's bucket all-reduces (a communication hook; Lightning's own option is CUDA-only)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(None, self._hook)

    # No annotations: DDP checks them, and under `from __future__ import annotations` they are strings.
    def _hook(self, state, bucket):  # noqa: ANN001, ANN202
        self.calls.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)


def _strategy(kind: str, **kwargs: object) -> object:
    return "ddp" if kind == "ddp" else FSDP2Strategy(**kwargs)


def main(kind: str, mode: str, out: Path) -> None:
    # Each rank its own rows, in a known order (Lightning's sampler would shuffle them).
    rank = int(os.environ["RANK"])
    if mode == "gradcache":
        rows = Subset(_Rows(CACHED_BATCH), rank_rows(rank, CACHED_BATCH))
        loader = DataLoader(rows, batch_size=CACHED_BATCH // WORLD)
        results: dict[str, object] = {}
        for strategy in ("ddp", "fsdp2"):
            trainer = _trainer(_strategy(strategy), 1, out / strategy)
            module = _module(partial(torch.optim.SGD, lr=0.5), micro_batch_size=MICRO_BATCH)
            trainer.fit(module, train_dataloaders=loader)
            results[strategy] = _full_params(module)
        # DDP's gradient reductions (bucket all-reduces) in one step, with and without caching: the same.
        for micro in (MICRO_BATCH, None):
            counter = _CountReductions()
            trainer = _trainer("ddp", 1, out / f"hook{micro}")
            trainer.callbacks.append(counter)
            trainer.fit(_module(partial(torch.optim.SGD, lr=0.5), micro), train_dataloaders=loader)
            results[f"ddp_reductions_{micro}"] = len(counter.calls)
        if rank == 0:
            torch.save(results, out / "gradcache.pt")
        return
    loader = DataLoader(Subset(_Rows(), rank_rows(rank)), batch_size=GLOBAL_BATCH // WORLD)
    if mode in ("step", "frozen"):
        trainer = _trainer(_strategy(kind, save_distributed_checkpoint=False), 1, out)
        module = _module(partial(torch.optim.SGD, lr=0.5), freeze_image_tower=mode == "frozen")
        trainer.fit(module, train_dataloaders=loader)
        params = _full_params(module)
        if kind == "fsdp2" and mode == "step":
            trainer.save_checkpoint(out / "full.ckpt")
        if trainer.is_global_zero:
            torch.save(params, out / "params.pt")
        return
    if mode == "bf16":
        # FSDP2's own mixed precision: bf16 parameters and compute, float32 reduction (BatchNorm in float32).
        trainer = _trainer(FSDP2Strategy(param_dtype="bfloat16"), 1, out)
        module = _module(partial(torch.optim.SGD, lr=0.5))
        trainer.fit(module, train_dataloaders=loader)
        params = _full_params(module)
        if trainer.is_global_zero:
            torch.save({"params": params, "loss": float(trainer.callback_metrics["train/loss"])}, out / "bf16.pt")
        return
    adamw = partial(torch.optim.AdamW, lr=1e-2)
    straight = _module(adamw)
    _trainer(_strategy(kind), 2, out / "straight").fit(straight, train_dataloaders=loader)
    first = _module(adamw)
    trainer = _trainer(_strategy(kind), 1, out / "first")
    trainer.fit(first, train_dataloaders=loader)
    trainer.save_checkpoint(out / "sharded.ckpt")
    resumed = _module(adamw)
    second = _trainer(_strategy(kind), 2, out / "second")
    second.fit(resumed, train_dataloaders=loader, ckpt_path=out / "sharded.ckpt")
    results = {"straight": _full_params(straight), "resumed": _full_params(resumed), "step": second.global_step}
    if second.is_global_zero:
        torch.save(results, out / "resume.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
