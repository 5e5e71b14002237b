"""Data: DataModules, transforms, tokenizers and collation."""

from align_lightning.data.collate import ImageTextCollator, clean_caption
from align_lightning.data.demo_datamodule import DemoDataModule
from align_lightning.data.evaluation import ContiguousShardSampler, RetrievalDataModule, ZeroShotDataModule, shard_range
from align_lightning.data.karpathy import KarpathyPairsDataModule
from align_lightning.data.tokenizer import load_tokenizer, train_wordpiece
from align_lightning.data.transforms import image_transform
from align_lightning.data.webdata import WebDataModule

__all__ = [
    "ContiguousShardSampler",
    "DemoDataModule",
    "KarpathyPairsDataModule",
    "RetrievalDataModule",
    "ZeroShotDataModule",
    "ImageTextCollator",
    "clean_caption",
    "image_transform",
    "load_tokenizer",
    "shard_range",
    "train_wordpiece",
    "WebDataModule",
]
