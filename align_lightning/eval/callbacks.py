"""Evaluation callbacks: zero-shot retrieval (Flickr30K, COCO, ...) and zero-shot classification (ImageNet, ...).

Each rank encodes its own disjoint share of the evaluation set on its device; the embeddings are
gathered once (with their global indices, so no sample is dropped or duplicated whatever the world
size), and the metrics are computed on the device in chunks. Every rank computes the same values,
so they are logged without a further reduction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from align_lightning.eval.retrieval import retrieval_metrics
from align_lightning.eval.zeroshot import topk_accuracy, zeroshot_classifier

__all__ = ["RetrievalEvalCallback", "ZeroShotEvalCallback"]

logger = logging.getLogger(__name__)


def _encoder(pl_module: L.LightningModule) -> Any:
    """The object with ``encode_image`` / ``encode_text``: the module's ``model`` or the module itself."""
    for candidate in (getattr(pl_module, "model", None), pl_module):
        if candidate is not None and hasattr(candidate, "encode_image") and hasattr(candidate, "encode_text"):
            return candidate
    raise TypeError(
        f"{type(pl_module).__name__} has no encode_image/encode_text (nor a .model with them): evaluation "
        "callbacks need a dual encoder such as align_lightning.model.DualEncoder."
    )


def gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """Gather every rank's ``rows`` (different counts allowed) and return them ordered by their global ``index``.

    Args:
        rows: ``(n_local, ...)`` values computed on this rank.
        index: ``(n_local,)`` global positions of those rows.

    Returns:
        ``(n_total, ...)`` rows, ``result[i]`` being the row whose index is ``i``.

    Raises:
        RuntimeError: If the gathered indices are not exactly ``0 .. n_total - 1`` once each.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        # A rank with nothing to evaluate (fewer items than ranks) does not know the row shape: ask.
        shapes: list[Any] = [None] * world
        dist.all_gather_object(shapes, tuple(rows.shape[1:]) if rows.shape[0] else None)
        known = next((shape for shape in shapes if shape is not None), None)
        if known is not None and rows.shape[0] == 0:
            rows = rows.new_zeros((0, *known))
        count = torch.tensor([rows.shape[0]], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        padded_index = index.new_full((longest,), -1)
        padded_index[: index.shape[0]] = index
        all_rows = [torch.empty_like(padded) for _ in range(world)]
        all_index = [torch.empty_like(padded_index) for _ in range(world)]
        dist.all_gather(all_rows, padded)
        dist.all_gather(all_index, padded_index)
        rows = torch.cat([r[:n] for r, n in zip(all_rows, sizes, strict=True)])
        index = torch.cat([i[:n] for i, n in zip(all_index, sizes, strict=True)])
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(index.shape[0], device=index.device)):
        raise RuntimeError(
            "Evaluation shards overlap or leave gaps: the gathered indices are not 0..N-1 once each. Each rank must "
            "encode a disjoint share of the evaluation set (the evaluation DataModules do this)."
        )
    return rows[order]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


class _EvalCallback(L.Callback):
    """Shared scheduling: after each validation / test epoch, and every ``every_n_steps`` training steps."""

    def __init__(self, datamodule: Any, every_n_steps: int | None = None, progress: bool = True) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive number of steps or None, got {every_n_steps}.")
        self.datamodule = datamodule
        self.every_n_steps = every_n_steps
        self.progress = progress
        self._prepared = False

    @property
    def name(self) -> str:
        """The data set's name in metric keys."""
        return str(self.datamodule.name)

    def _prepare(self, trainer: L.Trainer) -> None:
        if self._prepared:
            return
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        if tokenizer is None and hasattr(self.datamodule, "set_tokenizer"):
            source = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
            if source is None:
                raise ValueError(
                    f"The evaluation set {self.name!r} has no tokenizer and the training DataModule provides none: "
                    "set its `tokenizer` (the text tower's tokenizer)."
                )
            self.datamodule.set_tokenizer(source)
        self.datamodule.trainer = trainer
        self.datamodule.setup("validate")
        self._prepared = True

    def _batches(self, loader: Iterable[dict[str, Any]], trainer: L.Trainer, what: str) -> Iterable[dict[str, Any]]:
        if not (self.progress and trainer.is_global_zero):
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"{self.name}: {what}", leave=False)

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        """Evaluate now and log ``{stage}/{name}/<metric>``; returns the metrics."""
        self._prepare(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            metrics = self.evaluate(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        logged = {f"{stage}/{self.name}/{key}": value for key, value in metrics.items()}
        for key, value in logged.items():
            pl_module.log(key, value, rank_zero_only=True, batch_size=1)
        return logged

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:  # pragma: no cover
        """Compute the metrics (every rank calls it; every rank gets the same values)."""
        raise NotImplementedError

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After each validation (in ``fit`` and ``validate``); not during the sanity check."""
        if not trainer.sanity_checking:
            self.run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After ``test``."""
        self.run(trainer, pl_module, "test")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Every ``every_n_steps`` optimizer steps, logged under ``val/``."""
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.run(trainer, pl_module, "val")


class RetrievalEvalCallback(_EvalCallback):
    """Zero-shot image-text retrieval recall@K (and median rank) on a Karpathy-split evaluation set.

    Logs ``{stage}/{name}/i2t_R@{k}`` and ``t2i_R@{k}`` (the DESIGN.md contract keys), plus
    ``i2t_median_rank`` / ``t2i_median_rank``.

    Args:
        datamodule: A :class:`~align_lightning.data.RetrievalDataModule` (its ``name`` is used in the keys).
        ks: The K of recall@K.
        every_n_steps: Also evaluate every this many training steps (``None``: only with validation).
        chunk_size: Images scored against all captions at once (bounds the memory of the metric computation).
        progress: Show a progress bar on rank 0.
    """

    def __init__(
        self,
        datamodule: Any,
        ks: Sequence[int] = (1, 5, 10),
        every_n_steps: int | None = None,
        chunk_size: int = 1024,
        progress: bool = True,
    ) -> None:
        super().__init__(datamodule, every_n_steps, progress)
        self.ks = tuple(ks)
        self.chunk_size = chunk_size

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Encode this rank's images and captions, gather them in order, compute recall@K."""
        encoder, device = _encoder(pl_module), pl_module.device
        image_rows, image_index, text_rows, text_index = [], [], [], []
        for batch in self._batches(self.datamodule.image_dataloader(), trainer, "images"):
            batch = _to_device(batch, device)
            image_rows.append(encoder.encode_image(batch["pixel_values"]).float())
            image_index.append(batch["index"])
        for batch in self._batches(self.datamodule.text_dataloader(), trainer, "captions"):
            batch = _to_device(batch, device)
            text_rows.append(encoder.encode_text(batch["input_ids"], batch.get("attention_mask")).float())
            text_index.append(batch["index"])
        images = gather_rows(_cat(image_rows, device), _cat(image_index, device, long=True))
        texts = gather_rows(_cat(text_rows, device), _cat(text_index, device, long=True))
        text_to_image = torch.as_tensor(self.datamodule.text_to_image, device=device)
        return retrieval_metrics(images, texts, text_to_image, ks=self.ks, chunk_size=self.chunk_size, median_rank=True)


class ZeroShotEvalCallback(_EvalCallback):
    """Zero-shot classification top-1 / top-5 accuracy on an ImageFolder evaluation set (ImageNet, ...).

    The class embeddings (mean over the prompt templates of the normalised text embeddings,
    re-normalised) are computed once per evaluation run, not per batch. Logs
    ``{stage}/{name}/top1`` and ``top5``.

    Args:
        datamodule: A :class:`~align_lightning.data.ZeroShotDataModule`.
        ks: The k of top-k accuracy.
        every_n_steps: Also evaluate every this many training steps.
        tokenizer: The text tower's tokenizer; default: the training DataModule's.
        text_batch_size: Prompts encoded at once.
        progress: Show a progress bar on rank 0.
    """

    def __init__(
        self,
        datamodule: Any,
        ks: Sequence[int] = (1, 5),
        every_n_steps: int | None = None,
        tokenizer: Any = None,
        text_batch_size: int = 256,
        progress: bool = True,
    ) -> None:
        super().__init__(datamodule, every_n_steps, progress)
        self.ks = tuple(ks)
        self.tokenizer = tokenizer
        self.text_batch_size = text_batch_size

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Build the classifier, score this rank's images, gather, compute top-k accuracy."""
        tokenizer = self.tokenizer or getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"ZeroShotEvalCallback({self.name!r}) needs the text tower's tokenizer: pass `tokenizer`, or train "
                "with a DataModule that has one."
            )
        encoder, device = _encoder(pl_module), pl_module.device
        classifier = zeroshot_classifier(
            encoder,
            list(self.datamodule.classnames),
            list(self.datamodule.templates),
            tokenizer,
            batch_size=self.text_batch_size,
            device=device,
        )
        scores, targets, index = [], [], []
        for batch in self._batches(self.datamodule.image_dataloader(), trainer, "images"):
            batch = _to_device(batch, device)
            scores.append(encoder.encode_image(batch["pixel_values"]).float() @ classifier.float())
            targets.append(batch["target"])
            index.append(batch["index"])
        local_index = _cat(index, device, long=True)
        all_scores = gather_rows(_cat(scores, device), local_index)
        all_targets = gather_rows(_cat(targets, device, long=True), local_index)
        return topk_accuracy(all_scores, all_targets, ks=self.ks)


def _cat(parts: list[Tensor], device: torch.device, long: bool = False) -> Tensor:
    """Concatenate (an empty share gives an empty tensor of the right kind)."""
    if parts:
        return torch.cat(parts)
    return torch.empty(0, dtype=torch.long if long else torch.float32, device=device)
