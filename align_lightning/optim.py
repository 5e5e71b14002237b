"""ALIGN's optimisation: LAMB without weight decay on biases, norms and the temperature; linear warm-up then decay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from timm.optim import Lamb
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupLinearDecay", "align_lamb", "weight_decay_param_groups"]


def weight_decay_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group.

    Biases, normalisation weights and scalars (the temperature) - every parameter with fewer than
    two dimensions - go to the group with ``weight_decay=0``. The other group carries no
    ``weight_decay`` key, so it gets the optimizer's configured value.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def align_lamb(params: Iterable[Any]) -> Optimizer:
    """The paper's optimizer: LAMB (timm's), lr 1e-3, weight decay 1e-5."""
    return Lamb(params, lr=1e-3, weight_decay=1e-5)


class WarmupLinearDecay(LRScheduler):
    """Linear warm-up from 0 to the base learning rate, then linear decay to 0, stepped per optimizer step.

    ALIGN: 10k warm-up steps to 1e-3, then to 0 at 1.2M steps.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Steps of linear warm-up from 0.
        total_steps: Step at which the learning rate reaches 0. ``None`` lets
            :class:`~align_lightning.module.ALIGNModule` set it to the trainer's total number of
            optimizer steps (``max_steps`` or ``max_epochs`` x steps per epoch).
        last_epoch: Index of the last step, for resuming (``-1`` to start).
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None, last_epoch: int = -1
    ) -> None:
        if warmup_steps < 0 or (total_steps is not None and total_steps < warmup_steps):
            raise ValueError(
                f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, total_steps={total_steps}."
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate after ``step`` optimizer steps."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        return max(0.0, (self.total_steps - step) / decay_steps)

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]
