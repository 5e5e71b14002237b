"""The quickstart's DataModule: the demo corpus, through the same path as real web data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from align_lightning.data.demo_corpus import DemoCorpus, write_demo_corpus
from align_lightning.data.evaluation import RetrievalDataModule, ZeroShotDataModule
from align_lightning.data.filtering import FilterConfig, filter_shards
from align_lightning.data.shards import ShardWriter
from align_lightning.data.webdata import WebDataModule, _SyncedBatches

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the corpus writer is still atomic and race-safe
    fcntl = None  # type: ignore[assignment]

__all__ = ["DemoDataModule"]


def _karpathy_split_to_shards(corpus: DemoCorpus, split: str, url: str) -> str:
    """Write one Karpathy split as a shard of (image, first caption) pairs; returns its URL."""
    if Path(url).is_file():
        return url
    images = [entry for entry in json.loads(corpus.karpathy_json.read_text())["images"] if entry["split"] == split]
    with ShardWriter(url, max_samples=None) as writer:
        for index, entry in enumerate(images):
            image = (corpus.image_root / entry["filepath"] / entry["filename"]).read_bytes()
            writer.write(f"{index:09d}", {"jpg": image, "txt": entry["sentences"][0]["raw"].encode()})
    return url


class DemoDataModule(WebDataModule):
    """The quickstart's data, through the same path as real web data (nothing downloaded).

    On first use it writes the demo corpus (:func:`~align_lightning.data.demo_corpus.write_demo_corpus`:
    img2dataset-format training shards with web noise and a few corrupt records, plus held-out
    evaluation images in a Karpathy split JSON), runs ALIGN's filter over the training shards
    (:func:`~align_lightning.data.filtering.filter_shards`, the paper's thresholds and vocabulary
    ratio), and then
    trains from the filtered shards as a :class:`WebDataModule`. Everything is cached under
    ``root`` by its arguments, and written atomically, so reruns start at once and concurrent ranks
    are safe. The tokenizer is a WordPiece vocabulary learned from the filtered alt-texts, as ALIGN
    learned its own, unless ``tokenizer`` names another one.

    Args:
        num_train: Training pairs drawn (before ALIGN's filter removes junk).
        num_val: Held-out pairs in each of the validation and test splits (clean captions).
        image_size: Training/eval resolution (ALIGN uses 289; the quickstart uses 64 on CPU).
        render_size: Side of the stored JPEGs (above ALIGN's 200 px minimum, so the size rule
            removes only the deliberately small ones).
        batch_size: Pairs per batch per device.
        filter: Run ALIGN's filter on the training shards (``False`` trains on them unfiltered).
        tokenizer: A Hugging Face tokenizer name or folder; ``None`` learns WordPiece.
        vocab_size: Vocabulary size for the learned WordPiece tokenizer.
        max_length: Maximum tokens per caption (ALIGN: 64).
        normalize: Pixel normalisation: ``"align"`` ([-1, 1]), ``"imagenet"`` or ``"clip"``.
        num_workers: DataLoader worker processes per device.
        shuffle_buffer: Records per shuffle window.
        root: Cache folder; default ``$XDG_CACHE_HOME/align_lightning/demo`` (``~/.cache/...``).
        seed: Seed of the whole data set (and of the training order).
        name: Dataset name used in metric keys (``val/<name>/i2t_R@1``).
    """

    def __init__(
        self,
        num_train: int = 8192,
        num_val: int = 512,
        image_size: int = 64,
        render_size: int = 256,
        batch_size: int = 64,
        filter: bool = True,
        tokenizer: str | None = None,
        vocab_size: int = 1000,
        max_length: int = 64,
        normalize: Literal["align", "imagenet", "clip"] = "align",
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        root: str | None = None,
        seed: int = 0,
        name: str = "demo",
    ) -> None:
        cache = Path(root) if root is not None else _default_cache()
        folder = cache / f"train{num_train}-eval{num_val}-px{render_size}-seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        # One writer at a time across processes (e.g. DDP ranks started by torchrun); the others
        # then find everything written and return at once.
        with open(folder / ".lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            self.corpus = write_demo_corpus(
                folder / "corpus", num_train=num_train, num_eval=num_val, image_size=render_size, seed=seed
            )
            train_urls: str | list[str] = self.corpus.train_urls
            self.filter_report: dict | None = None
            if filter:
                # The paper's thresholds; V at the paper's ratio (100M per 1.8B pairs: ~460 here),
                # floored at 300 (the demo's clean alt-texts use ~250 words and word pairs) instead of
                # the 100k that protects small real corpora: the demo's junk alt-texts
                # ("IMG_0412.JPG", prices, page numbers) carry the rare tokens this rule targets.
                config = FilterConfig(min_vocab_size=300)
                self.filter_report = filter_shards(train_urls, str(folder / "filtered"), config, progress=False)
                train_urls = sorted(str(p) for p in (folder / "filtered").glob("*.tar"))
            val_url = _karpathy_split_to_shards(self.corpus, "val", str(folder / "val.tar"))
            self.test_url = _karpathy_split_to_shards(self.corpus, "test", str(folder / "test.tar"))
        kept = self.filter_report["totals"]["kept"] if self.filter_report is not None else None
        super().__init__(
            train_urls=train_urls,
            val_urls=val_url,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            max_length=max_length,
            image_size=image_size,
            normalize=normalize,
            batch_size=batch_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            samples_per_epoch=kept,
            # Full batches only, as the paper trains: a constant number of in-batch negatives, and no
            # one-sample batch (BatchNorm cannot train on it).
            drop_last=True,
            seed=seed,
            name=name,
        )
        self.save_hyperparameters()

    def retrieval_datamodule(self) -> RetrievalDataModule:
        """The held-out retrieval set in Karpathy format: the test split (``num_val`` images, 5 captions each).

        Named ``demo_retrieval`` in metric keys; a :class:`~align_lightning.eval.RetrievalEvalCallback`
        without a ``datamodule`` evaluates it (as the quickstart recipe does).
        """
        return RetrievalDataModule(
            self.corpus.karpathy_json,
            self.corpus.image_root,
            split="test",
            name="demo_retrieval",
            image_size=self.hparams.image_size,
            normalize=self.hparams.normalize,
            tokenizer=self.tokenizer,
            max_length=self.hparams.max_length,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
        )

    def zeroshot_datamodule(self) -> ZeroShotDataModule:
        """The held-out zero-shot set (ImageFolder, one class per colour and shape, the corpus's templates).

        Named ``demo_zeroshot`` in metric keys; a :class:`~align_lightning.eval.ZeroShotEvalCallback`
        without a ``datamodule`` evaluates it.
        """
        return ZeroShotDataModule(
            self.corpus.zeroshot_root,
            classnames=str(self.corpus.classnames_file),
            templates=str(self.corpus.templates_file),
            name="demo_zeroshot",
            image_size=self.hparams.image_size,
            normalize=self.hparams.normalize,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
        )

    def test_dataloader(self) -> Any:
        """The held-out test split (a second clean split, in order)."""
        return _SyncedBatches(self, [self.test_url], training=False)


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "align_lightning" / "demo"
