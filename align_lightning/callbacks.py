"""Lightning callbacks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from align_lightning.embeddings import Embeddings, check_embeddings_path, gather_rows_on_rank_zero

__all__ = ["EmbeddingWriter", "MetricsJSON"]


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


class EmbeddingWriter(BasePredictionWriter):
    """Write what ``predict`` embeds to one file, in the format of ``python -m align_lightning embed``.

    :meth:`~align_lightning.ALIGNModule.predict_step` returns ``image_embeds`` / ``text_embeds`` for the
    batch's images / texts; this callback keeps them (on the CPU) with a key per row and, at the end of the
    predict epoch, writes them with :meth:`~align_lightning.embeddings.Embeddings.save` (``.npy``,
    ``.safetensors`` or ``.parquet`` by the file's suffix). Keys: the batch's sample ``keys``
    (:class:`~align_lightning.data.WebDataModule`); else, for batches with a global ``index`` (the evaluation
    DataModules), the image's path relative to the DataModule's image folder (texts: the caption's index);
    else the row's position. Rows with an index are written in index order, whatever the number of ranks.

    Under DDP every rank embeds its share; the shares are gathered on rank 0 (in chunks of ``gather_rows``
    rows) and rank 0 writes the file. The metadata records the checkpoint (``--ckpt_path``), so ``search``
    encodes its queries with the same model.

    Args:
        output: The embeddings file (its suffix picks the format).
        gather_rows: Rows sent to rank 0 per round under DDP.

    Raises:
        ValueError, ImportError: For an unsupported suffix, or a format whose library is missing.
    """

    def __init__(self, output: str | os.PathLike[str], gather_rows: int = 65_536) -> None:
        super().__init__(write_interval="batch")
        if gather_rows < 1:
            raise ValueError(f"gather_rows must be positive, got {gather_rows}.")
        self.output = check_embeddings_path(output)
        self.gather_rows = gather_rows
        self._rows: dict[str, list[Tensor]] = {}
        self._keys: dict[str, list[str]] = {}
        self._order: dict[str, list[Tensor]] = {}
        self._positions = 0

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start collecting."""
        self._rows = {"image": [], "text": []}
        self._keys = {"image": [], "text": []}
        self._order = {"image": [], "text": []}
        self._positions = 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Keep the batch's embeddings, keys and order on the CPU."""
        if not isinstance(prediction, dict) or not ({"image_embeds", "text_embeds"} & set(prediction)):
            raise TypeError(
                "EmbeddingWriter needs predict_step to return a dict with image_embeds and/or text_embeds "
                "(as ALIGNModule.predict_step does, via align_lightning.eval.embed_batch)."
            )
        for modality in ("image", "text"):
            rows = prediction.get(f"{modality}_embeds")
            if rows is None:
                continue
            count = rows.shape[0]
            index = prediction.get("index")
            keys = self._row_keys(trainer, modality, batch, index, count)
            position = torch.arange(self._positions, self._positions + count)
            self._positions += count
            # Sort key: (loader, global index or -1, rank, position): index order when there is one, else rank-major.
            order = torch.stack(
                [
                    torch.full((count,), dataloader_idx),
                    index.cpu().long() if index is not None else torch.full((count,), -1),
                    torch.full((count,), trainer.global_rank),
                    position,
                ],
                dim=1,
            )
            self._rows[modality].append(rows.detach().float().cpu())
            self._keys[modality] += keys
            self._order[modality].append(order)

    def _row_keys(self, trainer: L.Trainer, modality: str, batch: Any, index: Tensor | None, count: int) -> list[str]:
        sample_keys = batch.get("keys") if isinstance(batch, dict) else None
        if sample_keys is not None:
            return [str(key) for key in sample_keys]
        if index is None:
            prefix = f"{trainer.global_rank}/" if trainer.world_size > 1 else ""
            return [f"{prefix}{self._positions + i}" for i in range(count)]
        datamodule = trainer.datamodule
        paths = getattr(datamodule, "images", None) if modality == "image" else None
        root = getattr(datamodule, "image_root", None) or getattr(datamodule, "root", None)
        if paths is None:
            return [str(i) for i in index.tolist()]
        return [_relative(paths[i], root) for i in index.tolist()]

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Gather every rank's rows on rank 0 and write the file there."""
        merged: dict[str, tuple[np.ndarray, list[str]] | None] = {}
        for modality in ("image", "text"):
            rows = self._rows[modality]
            merged[modality] = gather_rows_on_rank_zero(
                torch.cat(rows).numpy() if rows else np.zeros((0, 0), dtype=np.float32),
                self._keys[modality],
                torch.cat(self._order[modality]).numpy() if rows else np.zeros((0, 4), dtype=np.int64),
                chunk_rows=self.gather_rows,
            )
        image, text = merged["image"], merged["text"]
        if image is not None and text is not None and not (image[1] or text[1]):
            rank_zero_warn(f"predict produced no embeddings (the predict data is empty): {self.output} not written.")
        elif image is not None and text is not None:  # rank 0, holding every rank's rows
            embeddings = Embeddings.from_rows(
                image[0] if image[1] else None, image[1], text[0] if text[1] else None, text[1], _metadata(trainer)
            )
            embeddings.save(self.output)
            rank_zero_info(
                f"Wrote {len(embeddings.image_keys)} image and {len(embeddings.text_keys)} text embeddings "
                f"to {self.output}"
            )
        self._rows, self._keys, self._order = {}, {}, {}
        trainer.strategy.barrier("EmbeddingWriter")


def _relative(path: str, root: Any) -> str:
    if root is None:
        return str(path)
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _metadata(trainer: L.Trainer) -> dict[str, Any]:
    """Provenance of predicted embeddings: the checkpoint and the data's preprocessing."""
    datamodule = trainer.datamodule
    transform = getattr(datamodule, "transform", None)
    ckpt_path = trainer.ckpt_path
    metadata = {
        "checkpoint": str(Path(ckpt_path).resolve()) if ckpt_path and Path(ckpt_path).is_file() else ckpt_path,
        "data": None if datamodule is None else f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "image_size": getattr(transform, "image_size", getattr(datamodule, "image_size", None)),
        "resize_size": getattr(transform, "resize_size", getattr(datamodule, "resize_size", None)),
        "normalize": getattr(datamodule, "normalize", None),
        "source": "predict",
    }
    return {key: value for key, value in metadata.items() if value is not None}
