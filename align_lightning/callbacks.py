"""Lightning callbacks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["MetricsJSON"]


class MetricsJSON(L.Callback):
    """Write the final metrics of ``fit``, ``validate`` and ``test`` to ``metrics.json`` in the run's log folder.

    The file maps each logged metric key (``train/loss``, ``val/demo/i2t_R@1``, ...) to its last
    value, plus the DataModule's ``data_metrics()`` when it has them (``data/skipped/<reason>``
    of :class:`~align_lightning.data.WebDataModule`); it is updated (not replaced) by each stage
    run against the same folder.

    Args:
        filename: File name inside ``trainer.log_dir``.
    """

    def __init__(self, filename: str = "metrics.json") -> None:
        self.filename = filename

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask, not only rank 0
        if not trainer.is_global_zero or log_dir is None:
            return
        path = Path(log_dir) / self.filename
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        data_metrics = getattr(trainer.datamodule, "data_metrics", None)
        extra = data_metrics() if callable(data_metrics) else {}
        for key, value in {**trainer.callback_metrics, **extra}.items():
            value = float(value)
            metrics[key] = value if math.isfinite(value) else str(value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
        rank_zero_info(f"Final metrics written to {path}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After ``fit``: the last training and validation metrics."""
        self._write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a ``validate`` run (validation inside ``fit`` is covered by ``on_fit_end``)."""
        if trainer.state.fn == "validate":
            self._write(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After ``test``."""
        self._write(trainer)
