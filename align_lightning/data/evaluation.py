"""Evaluation DataModules: image-text retrieval (Karpathy split JSON) and zero-shot classification (ImageFolder).

Both are plain ``LightningDataModule`` s, usable on their own (``dm.setup(); dm.image_dataloader()``)
or under a ``Trainer`` (``trainer.validate(model, datamodule=dm)``), in this project or another.
The data contracts are those of ``shared/DESIGN.md``:

* :class:`RetrievalDataModule` reads a Karpathy split JSON (Flickr30K's ``dataset_flickr30k.json``,
  COCO's ``dataset_coco.json``, or any file in that format) plus an image root, and serves the
  images of one split and all their captions as two loaders. ``text_to_image[j]`` is the index of
  the image caption ``j`` describes, as ``align_lightning.eval.retrieval_metrics`` expects.
* :class:`ZeroShotDataModule` reads an ImageFolder (``root/<class_dir>/<image>``, classes in
  sorted folder order as torchvision's ``ImageFolder``), the class names and prompt templates.

**Under DDP** every loader gives each rank a disjoint, contiguous share of the items, without
the padding or duplication of ``DistributedSampler`` (ranks may get one item fewer than others),
and every batch carries the global ``index`` of its items, so an evaluation callback can
all-gather the embeddings and put them back in order. The sampler subclasses
``DistributedSampler``, so Lightning keeps it as it is (it does not wrap it in its own).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from transformers import PreTrainedTokenizerBase

from align_lightning._errors import ConfigError
from align_lightning.data._ranks import rank_and_world
from align_lightning.data.collate import ImageTextCollator
from align_lightning.data.shards import decode_image
from align_lightning.data.tokenizer import load_tokenizer
from align_lightning.data.transforms import image_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "ContiguousShardSampler",
    "RetrievalDataModule",
    "ZeroShotDataModule",
    "shard_range",
]

logger = logging.getLogger(__name__)

#: File extensions of images in an ImageFolder (torchvision's ``IMG_EXTENSIONS``, lower-cased match).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Missing image paths named in an error message.
_MAX_MISSING_SHOWN = 5

Normalize = Literal["align", "imagenet", "clip"] | tuple[Sequence[float], Sequence[float]]


# --------------------------------------------------------------------------------------------------
# Rank sharding
# --------------------------------------------------------------------------------------------------


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``range(num_items)`` that ``rank`` of ``world_size`` evaluates.

    Shares are disjoint, cover every item exactly once and differ in size by at most one item
    (``range(rank * n // world, (rank + 1) * n // world)``); nothing is padded or repeated.

    Args:
        num_items: Number of items to share.
        rank: This process's rank, in ``[0, world_size)``.
        world_size: Number of ranks.

    Raises:
        ValueError: For a negative ``num_items``, a non-positive ``world_size`` or a rank out of range.
    """
    if num_items < 0:
        raise ValueError(f"num_items must be non-negative, got {num_items}.")
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
    return range(rank * num_items // world_size, (rank + 1) * num_items // world_size)


class ContiguousShardSampler(DistributedSampler):
    """Sequential sampler over this rank's :func:`shard_range` of a dataset.

    A ``DistributedSampler`` subclass so that Lightning (``use_distributed_sampler=True``) keeps it
    instead of wrapping it in a padding ``DistributedSampler``; it needs no process group.

    Args:
        dataset: The dataset (only its length is used).
        num_replicas: World size.
        rank: This process's rank.
    """

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = shard_range(len(dataset), rank, num_replicas)
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        """This rank's indices, in order."""
        return iter(self.indices)

    def __len__(self) -> int:
        """Number of items of this rank."""
        return len(self.indices)


# --------------------------------------------------------------------------------------------------
# Datasets and collation
# --------------------------------------------------------------------------------------------------


class _ImageFiles(Dataset):
    """Images read from files: ``{"pixel_values", "index"}`` (and ``"target"`` when targets are given)."""

    def __init__(self, paths: Sequence[str], transform: Any, targets: Sequence[int] | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.targets = None if targets is None else list(targets)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        with open(path, "rb") as file:
            data = file.read()
        try:
            image = decode_image(data, min_side=self.transform.resize_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise OSError(f"Cannot decode the evaluation image {path}: {err}") from err
        item: dict[str, Any] = {"pixel_values": self.transform(image), "index": index}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


class _Indices(Dataset):
    """``range(n)`` as a dataset: the text loader maps caption indices to tokens in its collate function."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class _CaptionCollator:
    """Tokenise the captions of a batch of indices: ``{"input_ids", "attention_mask", "index"}``."""

    def __init__(self, captions: Sequence[str], collator: ImageTextCollator) -> None:
        self.captions = captions
        self.collator = collator

    def __call__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        text = self.collator.tokenize([self.captions[i] for i in indices])
        return {**text, "index": torch.tensor(list(indices), dtype=torch.long)}


class _RetrievalBatches(Dataset):
    """One rank's image batches, then its caption batches, one dataset item per batch.

    Serves a whole retrieval set through a single loader (``batch_size=None``), so a Trainer's
    evaluation loop sees one dataloader (one metrics table) and no batch mixes images and captions.
    """

    def __init__(
        self, images: _ImageFiles, captions: _CaptionCollator, batch_size: int, rank: int, world_size: int
    ) -> None:
        self.images = images
        self.captions = captions
        image_share = shard_range(len(images), rank, world_size)
        caption_share = shard_range(len(captions.captions), rank, world_size)
        self.batches: list[tuple[str, range]] = [
            ("image", image_share[start : start + batch_size]) for start in range(0, len(image_share), batch_size)
        ] + [("text", caption_share[start : start + batch_size]) for start in range(0, len(caption_share), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        kind, items = self.batches[index]
        if kind == "image":
            return default_collate([self.images[i] for i in items])
        return self.captions(list(items))


def _check_images_exist(paths: Sequence[str], image_root: str | os.PathLike[str], what: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing image files and the image root."""
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        shown = "\n  ".join(missing[:_MAX_MISSING_SHOWN])
        more = f"\n  ... and {len(missing) - _MAX_MISSING_SHOWN} more" if len(missing) > _MAX_MISSING_SHOWN else ""
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} images of {what} are missing under image_root={str(image_root)!r}:"
            f"\n  {shown}{more}\nCheck image_root (image path = image_root/filepath/filename)."
        )


def _loader(dataset: Dataset, datamodule: pl.LightningDataModule, collate_fn: Any = None) -> DataLoader:
    """A sequential loader over this rank's contiguous share of ``dataset``."""
    rank, world = rank_and_world(datamodule)
    num_workers: int = datamodule.num_workers  # type: ignore[attr-defined]
    return DataLoader(
        dataset,
        batch_size=datamodule.batch_size,  # type: ignore[attr-defined]
        sampler=ContiguousShardSampler(dataset, num_replicas=world, rank=rank),
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=False,
        drop_last=False,
    )


# --------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------


def _check_loader_args(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be positive.")
    if num_workers < 0:
        raise ConfigError("num_workers", num_workers, "must be non-negative.")


class _EvaluationDataModule(pl.LightningDataModule):
    """The Trainer's validation, test and predict loaders of an evaluation set: :meth:`evaluation_dataloader`."""

    def evaluation_dataloader(self) -> DataLoader:  # pragma: no cover - every subclass defines it
        """Every item of this rank's share, in one loader."""
        raise NotImplementedError

    def val_dataloader(self) -> DataLoader:
        """:meth:`evaluation_dataloader`."""
        return self.evaluation_dataloader()

    def test_dataloader(self) -> DataLoader:
        """:meth:`evaluation_dataloader`."""
        return self.evaluation_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """:meth:`evaluation_dataloader`."""
        return self.evaluation_dataloader()


class RetrievalDataModule(_EvaluationDataModule):
    """Image-text retrieval evaluation data from a Karpathy split JSON (Flickr30K, COCO, or any in that format).

    The file holds ``{"images": [{"filepath": optional, "filename", "split", "sentences": [{"raw"}, ...]}]}``;
    an image's path is ``image_root/filepath/filename`` (``filepath`` may be absent or empty).
    After :meth:`setup` (or on first access of the attributes below), the images of ``split`` are
    in :attr:`images`, all their captions flattened in image order in :attr:`captions`, and
    :attr:`text_to_image` maps each caption to its image.

    Loaders: :meth:`image_dataloader` (each image once, ``{"pixel_values", "index"}``) and
    :meth:`text_dataloader` (captions tokenised per batch, ``{"input_ids", "attention_mask", "index"}``);
    ``val_dataloader`` / ``test_dataloader`` / ``predict_dataloader`` give one loader of the image
    batches followed by the caption batches (for a Trainer's loop with
    :class:`~align_lightning.eval.RetrievalEvalCallback`). Under DDP each rank gets a contiguous
    share without padding; ``index`` is global.

    Args:
        annotations: Path of the Karpathy split JSON.
        image_root: Folder the images' ``filepath/filename`` are relative to.
        split: Split to evaluate (``"test"``, ``"val"``, ...).
        name: Dataset name for metric keys (``val/<name>/i2t_R@1``).
        image_size: Evaluation resolution (ALIGN: 289).
        resize_size: Square resize before the center crop; default ``round(image_size * 346 / 289)``.
        normalize: Pixel normalisation (``"align"``, ``"imagenet"``, ``"clip"`` or ``(mean, std)``);
            use the training DataModule's.
        tokenizer: A tokenizer, a hub name or folder (loaded with ``load_tokenizer``), or ``None``:
            under a Trainer, the model's (``ALIGNModule.tokenizer``, restored from its checkpoint), or
            one set with :meth:`set_tokenizer` (e.g. the training DataModule's, passed by an
            evaluation callback) before the text loader is built.
        max_length: Maximum tokens per caption (ALIGN: 64).
        batch_size: Items per batch per rank.
        num_workers: DataLoader worker processes per rank.
    """

    def __init__(
        self,
        annotations: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        split: str = "test",
        name: str = "flickr30k",
        image_size: int = 289,
        resize_size: int | None = None,
        normalize: Normalize = "align",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        max_length: int = 64,
        batch_size: int = 64,
        num_workers: int = 4,
    ) -> None:
        super().__init__()
        _check_loader_args(batch_size, num_workers)
        self.annotations = Path(annotations)
        self.image_root = Path(image_root)
        self.split = split
        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = image_transform(image_size, train=False, resize_size=resize_size, normalize=normalize)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        self._images: list[str] | None = None
        self._captions: list[str] = []
        self._text_to_image = torch.empty(0, dtype=torch.long)

    def set_tokenizer(self, tokenizer: str | PreTrainedTokenizerBase) -> None:
        """Set the tokenizer of the text loader (a tokenizer, or a hub name / folder to load)."""
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(str(tokenizer), max_length=self.max_length)
        self.tokenizer = tokenizer

    # -- data -------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read the split from the annotations and check that its images exist (once).

        Raises:
            FileNotFoundError: If the annotations file or some image files are missing (named).
            ValueError: If the file is not a Karpathy split JSON, or the split is empty (the
                splits present are listed with their image counts).
        """
        if self._images is not None:
            return
        if not self.annotations.is_file():
            raise FileNotFoundError(
                f"Retrieval annotations {str(self.annotations)!r} not found: give the path of a Karpathy split JSON "
                "(e.g. dataset_flickr30k.json or dataset_coco.json)."
            )
        try:
            data = json.loads(self.annotations.read_text())
            entries = data["images"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{self.annotations} is not a Karpathy split JSON ({{'images': [{{'filename', 'split', "
                f"'sentences'}}, ...]}}): {err!r}"
            ) from err
        images: list[str] = []
        captions: list[str] = []
        text_to_image: list[int] = []
        counts: dict[str, int] = {}
        for position, entry in enumerate(entries):
            try:
                entry_split = entry["split"]
                counts[entry_split] = counts.get(entry_split, 0) + 1
                if entry_split != self.split:
                    continue
                path = self.image_root / (entry.get("filepath") or "") / entry["filename"]
                raws = [sentence["raw"] for sentence in entry["sentences"]]
            except (KeyError, TypeError) as err:
                raise ValueError(
                    f"{self.annotations}: images[{position}] lacks {err} (each image needs 'filename', 'split' and "
                    "'sentences': [{'raw': ...}])."
                ) from err
            captions += raws
            text_to_image += [len(images)] * len(raws)
            images.append(str(path))
        if not images:
            present = ", ".join(f"{split!r} ({count} images)" for split, count in sorted(counts.items())) or "none"
            raise ValueError(
                f"Split {self.split!r} of {self.annotations} holds no images; splits present: {present}. "
                "Set split to one of them."
            )
        if not captions:
            raise ValueError(f"Split {self.split!r} of {self.annotations} holds images but no captions.")
        _check_images_exist(images, self.image_root, f"split {self.split!r} of {self.annotations}")
        self._captions = captions
        self._text_to_image = torch.tensor(text_to_image, dtype=torch.long)
        self._images = images
        logger.info(
            "Retrieval %s/%s: %d images, %d captions from %s.",
            self.name,
            self.split,
            len(images),
            len(captions),
            self.annotations,
        )

    @property
    def images(self) -> list[str]:
        """Image paths of the split, in file order (reads the annotations on first access)."""
        self.setup()
        assert self._images is not None
        return self._images

    @property
    def captions(self) -> list[str]:
        """All captions of the split's images, flattened in image order."""
        self.setup()
        return self._captions

    @property
    def text_to_image(self) -> Tensor:
        """``LongTensor`` of shape ``(num_captions,)``: caption ``j`` -> the index of its image."""
        self.setup()
        return self._text_to_image

    # -- loaders ----------------------------------------------------------------------------------

    def image_dataloader(self) -> DataLoader:
        """Each image once (this rank's share), batches ``{"pixel_values": (B, 3, S, S), "index": (B,)}``."""
        return _loader(_ImageFiles(self.images, self.transform), self)

    def text_dataloader(self) -> DataLoader:
        """Each caption once (this rank's share), batches ``{"input_ids", "attention_mask", "index"}``.

        Raises:
            RuntimeError: If no tokenizer was given or set.
        """
        if self.tokenizer is None:
            # Under a Trainer: the model's own tokenizer (ALIGNModule restores it from its checkpoint).
            trainer = getattr(self, "trainer", None)
            model_tokenizer = getattr(trainer.lightning_module, "tokenizer", None) if trainer is not None else None
            if model_tokenizer is not None:
                self.set_tokenizer(model_tokenizer)
        if self.tokenizer is None:
            raise RuntimeError(
                f"RetrievalDataModule({self.name!r}) has no tokenizer: pass tokenizer=... (a tokenizer, hub name or "
                "folder) or call set_tokenizer(...) with the training DataModule's tokenizer before building the "
                "text loader."
            )
        collator = ImageTextCollator(self.tokenizer, max_length=self.max_length)
        return _loader(_Indices(len(self.captions)), self, collate_fn=_CaptionCollator(self.captions, collator))

    def evaluation_dataloader(self) -> DataLoader:
        """One loader: this rank's image batches, then its caption batches (same items as the two loaders).

        Raises:
            RuntimeError: If no tokenizer was given or set.
        """
        captions = self.text_dataloader().collate_fn
        rank, world = rank_and_world(self)
        batches = _RetrievalBatches(_ImageFiles(self.images, self.transform), captions, self.batch_size, rank, world)
        return DataLoader(
            batches,
            batch_size=None,
            # Already this rank's share: a one-replica ContiguousShardSampler keeps Lightning from re-sharding it.
            sampler=ContiguousShardSampler(batches, num_replicas=1, rank=0),
            num_workers=self.num_workers,
        )


# --------------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, stripped of surrounding whitespace."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _resolve_templates(templates: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """``"imagenet"`` (CLIP's 80 templates), a file with one template per line, or a list; each checked for ``{}``."""
    if isinstance(templates, (str, os.PathLike)):
        if str(templates) == "imagenet":
            from align_lightning.eval.zeroshot import IMAGENET_TEMPLATES  # lazy: eval imports the data package

            resolved = list(IMAGENET_TEMPLATES)
        elif Path(templates).is_file():
            resolved = _read_lines(Path(templates))
        else:
            raise ConfigError(
                "templates",
                str(templates),
                "not 'imagenet' and not an existing file: give 'imagenet', a list of templates with {}, or a file "
                "with one template per line.",
            )
    else:
        resolved = list(templates)
    if not resolved:
        raise ConfigError("templates", templates, "no templates given.")
    bad = [t for t in resolved if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ConfigError(
            "templates", templates, f"every template needs {{}} where the class name goes; these lack it: {bad[:5]}"
        )
    return resolved


class ZeroShotDataModule(_EvaluationDataModule):
    """Zero-shot classification evaluation data from an ImageFolder (``root/<class_dir>/<image>``).

    Classes are the sorted subfolders of ``root`` (as torchvision's ``ImageFolder``; images found
    recursively, sorted, by extension). After :meth:`setup` (or on first access), :attr:`images`,
    :attr:`targets` and :attr:`classnames` describe the data and :attr:`templates` the prompts.
    :meth:`image_dataloader` (also ``val_dataloader`` / ``test_dataloader`` / ``predict_dataloader``)
    yields ``{"pixel_values", "target", "index"}``, each rank a contiguous share without padding.

    Args:
        root: The ImageFolder root (e.g. ``imagenet/val``).
        classnames: Class names in sorted class-folder order: a file (one per line) or a list.
            Default: ``<root>/../classnames.txt`` if it exists, else the folder names with
            underscores as spaces.
        templates: Prompt templates with ``{}`` for the class name: ``"imagenet"`` (CLIP's 80),
            a list, or a file with one per line.
        name: Dataset name for metric keys (``val/<name>/top1``).
        image_size: Evaluation resolution (ALIGN: 289).
        resize_size: Square resize before the center crop; default ``round(image_size * 346 / 289)``.
        normalize: Pixel normalisation; use the training DataModule's.
        batch_size: Images per batch per rank.
        num_workers: DataLoader worker processes per rank.

    Raises:
        ConfigError: For templates without ``{}`` (or none), or an unknown templates string.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        classnames: str | os.PathLike[str] | Sequence[str] | None = None,
        templates: str | os.PathLike[str] | Sequence[str] = "imagenet",
        name: str = "imagenet",
        image_size: int = 289,
        resize_size: int | None = None,
        normalize: Normalize = "align",
        batch_size: int = 64,
        num_workers: int = 4,
    ) -> None:
        super().__init__()
        _check_loader_args(batch_size, num_workers)
        self.root = Path(root)
        self.classnames_arg = classnames
        self.templates = _resolve_templates(templates)
        self.name = name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = image_transform(image_size, train=False, resize_size=resize_size, normalize=normalize)
        self._images: list[str] | None = None
        self._targets = torch.empty(0, dtype=torch.long)
        self._classnames: list[str] = []
        self._class_dirs: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        """Scan the class folders and read the class names (once).

        Raises:
            FileNotFoundError: If ``root`` or a given classnames file is missing, or ``root`` has no
                class folders.
            ValueError: If class folders hold no images (named), or the number of class names
                differs from the number of class folders.
        """
        if self._images is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Zero-shot root {str(self.root)!r} not found: give an ImageFolder root (root/<class_dir>/<image>)."
            )
        class_dirs = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not class_dirs:
            raise FileNotFoundError(
                f"Zero-shot root {str(self.root)!r} has no class folders (root/<class_dir>/<image>)."
            )
        images: list[str] = []
        targets: list[int] = []
        empty: list[str] = []
        for target, class_dir in enumerate(class_dirs):
            found = 0
            # Same order as torchvision's ImageFolder (datasets.folder.make_dataset).
            for folder, _, filenames in sorted(os.walk(self.root / class_dir, followlinks=True)):
                for filename in sorted(filenames):
                    if filename.lower().endswith(IMAGE_EXTENSIONS):
                        images.append(os.path.join(folder, filename))
                        targets.append(target)
                        found += 1
            if not found:
                empty.append(class_dir)
        if empty:
            raise ValueError(
                f"{len(empty)} class folder(s) of {self.root} hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
                f"{empty[:10]}{' ...' if len(empty) > 10 else ''}"
            )
        classnames = self._read_classnames(class_dirs)
        self._class_dirs = class_dirs
        self._classnames = classnames
        self._targets = torch.tensor(targets, dtype=torch.long)
        self._images = images
        logger.info(
            "Zero-shot %s: %d images in %d classes from %s.", self.name, len(images), len(class_dirs), self.root
        )

    def _read_classnames(self, class_dirs: list[str]) -> list[str]:
        source: str
        given = self.classnames_arg
        if given is None:
            default = self.root.parent / "classnames.txt"
            if default.is_file():
                names, source = _read_lines(default), str(default)
            else:
                names, source = [d.replace("_", " ") for d in class_dirs], "the folder names"
        elif isinstance(given, (str, os.PathLike)):
            path = Path(given)
            if not path.is_file():
                raise FileNotFoundError(f"Class names file {str(path)!r} not found (one class name per line).")
            names, source = _read_lines(path), str(path)
        else:
            names, source = [str(n) for n in given], "the classnames list"
        if len(names) != len(class_dirs):
            raise ValueError(
                f"{len(names)} class names (from {source}) for {len(class_dirs)} class folders in {self.root}: "
                "give one name per class folder, in sorted folder order."
            )
        return names

    @property
    def images(self) -> list[str]:
        """Image paths, in ImageFolder order."""
        self.setup()
        assert self._images is not None
        return self._images

    @property
    def targets(self) -> Tensor:
        """``LongTensor`` ``(num_images,)``: the class index of each image."""
        self.setup()
        return self._targets

    @property
    def classnames(self) -> list[str]:
        """Class names, in sorted class-folder order."""
        self.setup()
        return self._classnames

    @property
    def class_dirs(self) -> list[str]:
        """Class folder names, sorted (the class indices)."""
        self.setup()
        return self._class_dirs

    def image_dataloader(self) -> DataLoader:
        """Each image once (this rank's share): ``{"pixel_values": (B, 3, S, S), "target": (B,), "index": (B,)}``."""
        return _loader(_ImageFiles(self.images, self.transform, targets=self.targets.tolist()), self)

    def evaluation_dataloader(self) -> DataLoader:
        """The image loader (the Trainer's validation, test and predict loader)."""
        return self.image_dataloader()
