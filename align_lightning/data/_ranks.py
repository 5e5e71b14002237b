"""Where a DataModule runs: its rank and the world size."""

from __future__ import annotations

from typing import Any

from align_lightning.losses._distributed import distributed_world


def rank_and_world(datamodule: Any) -> tuple[int, int]:
    """``(rank, world_size)`` from the DataModule's Trainer, else torch.distributed, else ``(0, 1)``."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return distributed_world()
