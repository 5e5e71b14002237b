"""Training pairs from a Karpathy split JSON: fine-tuning on Flickr30K / COCO as ALIGN's paper does.

Each caption of the training split is paired with its image (Flickr30K's Karpathy train split:
29,000 images, 145,000 pairs); the file is read by :class:`~align_lightning.data.RetrievalDataModule`,
so both share the format, the checks and the error messages. The evaluation split of the same
file is provided to :class:`~align_lightning.eval.RetrievalEvalCallback` (:meth:`retrieval_datamodule`).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from align_lightning._errors import ConfigError
from align_lightning.data.collate import ImageTextCollator
from align_lightning.data.evaluation import Normalize, RetrievalDataModule, _check_loader_args, _ImageFiles
from align_lightning.data.tokenizer import load_tokenizer
from align_lightning.data.transforms import image_transform

__all__ = ["KarpathyPairsDataModule"]


class _CaptionPairs(Dataset):
    """Caption ``j`` with its image: ``(pixels, caption)`` items for :class:`ImageTextCollator`."""

    def __init__(self, images: _ImageFiles, captions: list[str], text_to_image: list[int]) -> None:
        self.images = images
        self.captions = captions
        self.text_to_image = text_to_image

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        return self.images[self.text_to_image[index]]["pixel_values"], self.captions[index]


class KarpathyPairsDataModule(pl.LightningDataModule):
    """Image-caption training pairs from a Karpathy split JSON (every caption of ``split`` with its image).

    Training batches are ``{"pixel_values", "input_ids", "attention_mask"}`` (ALIGN's train transform:
    resize, random crop, flip; captions tokenised per batch), shuffled, full batches only (a constant
    number of in-batch negatives). Under DDP, Lightning gives each rank its share. The evaluation
    split is served by :meth:`retrieval_datamodule`, which a
    :class:`~align_lightning.eval.RetrievalEvalCallback` without a ``datamodule`` evaluates (every
    ``every_n_steps`` training steps: this DataModule has no validation loader of its own).

    Args:
        annotations: Path of the Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``).
        image_root: Folder the images' ``filepath/filename`` are relative to.
        tokenizer: The text tower's tokenizer: a tokenizer, or a hub name / folder (e.g. the ALIGN
            checkpoint being fine-tuned, which holds its tokenizer files).
        split: The training split (``"train"``; COCO's Karpathy ``"restval"`` can be added by merging).
        eval_split: The split :meth:`retrieval_datamodule` evaluates (``"test"``: Flickr30K 1K, COCO 5K).
        name: Dataset name in metric keys (``val/<name>/i2t_R@1``).
        image_size: Training and evaluation resolution (ALIGN: 289).
        resize_size: Square resize before the crop; default ``round(image_size * 346 / 289)``.
        normalize: Pixel normalisation (``"align"``: [-1, 1], as ALIGN checkpoints expect).
        max_length: Maximum tokens per caption (ALIGN: 64).
        batch_size: Pairs per batch per device.
        eval_batch_size: Items per evaluation batch per device; default ``batch_size``.
        num_workers: DataLoader worker processes per device.
        pin_memory: Pin the training batches (faster host-to-GPU copies).

    Raises:
        ConfigError: For a non-positive batch size, negative ``num_workers`` or a tokenizer that
            cannot be loaded.
    """

    def __init__(
        self,
        annotations: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        tokenizer: str | PreTrainedTokenizerBase,
        split: str = "train",
        eval_split: str = "test",
        name: str = "flickr30k",
        image_size: int = 289,
        resize_size: int | None = None,
        normalize: Normalize = "align",
        max_length: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        _check_loader_args(batch_size, num_workers)
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError("eval_batch_size", eval_batch_size, "must be positive (or null: batch_size).")
        self.tokenizer: PreTrainedTokenizerBase = (
            load_tokenizer(str(tokenizer), max_length=max_length)
            if isinstance(tokenizer, (str, os.PathLike))
            else tokenizer
        )
        self.annotations = annotations
        self.image_root = image_root
        self.eval_split = eval_split
        self.name = name
        self.image_size = image_size
        self.resize_size = resize_size
        self.normalize = normalize
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # The training split, read (and its images checked) by the retrieval reader on first use.
        self.train_split = RetrievalDataModule(
            annotations, image_root, split=split, name=name, image_size=image_size, resize_size=resize_size,
            normalize=normalize, num_workers=num_workers,
        )  # fmt: skip
        self.transform = image_transform(image_size, train=True, resize_size=resize_size, normalize=normalize)
        self._eval: RetrievalDataModule | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the training split and check that its images exist (once).

        Raises:
            FileNotFoundError: If the annotations or some images are missing (named).
            ValueError: If the file is not a Karpathy split JSON or the split is empty.
        """
        self.train_split.setup(stage)

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches of training pairs."""
        pairs = _CaptionPairs(
            _ImageFiles(self.train_split.images, self.transform),
            self.train_split.captions,
            self.train_split.text_to_image.tolist(),
        )
        return DataLoader(
            pairs,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=ImageTextCollator(self.tokenizer, max_length=self.max_length),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def retrieval_datamodule(self) -> RetrievalDataModule:
        """The evaluation split as a :class:`RetrievalDataModule` (same file, transform and tokenizer; built once)."""
        if self._eval is None:
            self._eval = RetrievalDataModule(
                self.annotations, self.image_root, split=self.eval_split, name=self.name, image_size=self.image_size,
                resize_size=self.resize_size, normalize=self.normalize, tokenizer=self.tokenizer,
                max_length=self.max_length, batch_size=self.eval_batch_size, num_workers=self.num_workers,
            )  # fmt: skip
        return self._eval
