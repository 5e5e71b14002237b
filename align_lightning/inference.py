"""Inference with a trained checkpoint: load it with its own tokenizer and preprocessing, embed images and texts,
classify images zero-shot, search embeddings by text.

The Python API behind ``python -m align_lightning embed | classify | search`` (the commands themselves are in
:mod:`align_lightning.commands`)::

    from align_lightning.inference import load_checkpoint, embed, classify, search

    model = load_checkpoint("runs/quickstart/version_0/checkpoints/last.ckpt")
    embeddings = embed(model, images="photos/", texts="captions.txt")
    embeddings.save("photos.safetensors")
    search(embeddings, ["a dog on a beach"], model, k=5)

Images come from a folder (searched recursively) or from img2dataset webdataset shards (brace-expanded
fsspec URLs, as :mod:`align_lightning.data.shards` reads them). An image that cannot be decoded is skipped,
counted and logged; it never stops a run.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from align_lightning.data.collate import ImageTextCollator
from align_lightning.data.evaluation import IMAGE_EXTENSIONS
from align_lightning.data.shards import IMAGE_EXTENSIONS as SHARD_IMAGE_EXTENSIONS
from align_lightning.data.shards import ShardDamage, decode_image, expand_urls, iter_shard
from align_lightning.data.transforms import AlignImageTransform, image_transform
from align_lightning.embeddings import Embeddings, top_k
from align_lightning.model.dual_encoder import DualEncoder

__all__ = [
    "ImageSource",
    "InferenceModel",
    "Match",
    "Predictions",
    "SkipCounter",
    "classify",
    "embed",
    "embed_images",
    "embed_texts",
    "image_batches",
    "load_checkpoint",
    "progress_bar",
    "read_texts",
    "resolve_device",
    "search",
]

logger = logging.getLogger(__name__)

#: ALIGN's evaluation resolution, used when a checkpoint does not record its data's image size.
DEFAULT_IMAGE_SIZE = 289
#: Skipped images named one by one in the log (the rest are only counted).
_MAX_SKIPS_LOGGED = 10

# PIL raises several types on bytes that are not an image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as ``torch.device`` reads it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class InferenceModel:
    """A trained dual encoder with the tokenizer and the evaluation transform it was trained with.

    Attributes:
        encoder: The dual encoder, in eval mode, on :attr:`device`.
        tokenizer: The text tower's tokenizer (the one saved in the checkpoint).
        transform: Evaluation preprocessing: square resize, center crop, normalisation.
        max_length: Maximum tokens per text.
        device: Where the encoder runs.
        checkpoint: Absolute path of the checkpoint it was loaded from (``None`` when built from a module).
        normalize: The pixel normalisation's name (or ``(mean, std)``), as recorded.
    """

    encoder: DualEncoder
    tokenizer: Any
    transform: AlignImageTransform
    max_length: int
    device: torch.device
    checkpoint: str | None = None
    normalize: Any = "align"

    def __post_init__(self) -> None:
        self._collator = ImageTextCollator(self.tokenizer, max_length=self.max_length)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised float32 ``(B, D)`` embeddings of preprocessed ``(B, 3, S, S)`` images."""
        return self.encoder.encode_image(pixel_values.to(self.device)).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised float32 ``(B, D)`` embeddings of texts (cleaned and tokenised as in training)."""
        tokens = self._collator.tokenize(list(texts))
        return self.encoder.encode_text(
            tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        ).float()

    @torch.no_grad()
    def logit_scale(self) -> float:
        """The learned ``1 / temperature`` that multiplies cosine similarities into logits."""
        return float(self.encoder.logit_scale())

    def provenance(self) -> dict[str, Any]:
        """What produced an embedding: checkpoint and preprocessing (stored in embedding files)."""
        return {
            "checkpoint": self.checkpoint,
            "image_size": self.transform.image_size,
            "resize_size": self.transform.resize_size,
            "normalize": self.normalize,
            "max_length": self.max_length,
        }


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "auto", image_size: int | None = None
) -> InferenceModel:
    """Load an :class:`~align_lightning.ALIGNModule` checkpoint for inference.

    The model is rebuilt from the configuration the checkpoint records (as ``fit`` saves it), the tokenizer
    is the one saved in the checkpoint, and the image preprocessing is the evaluation transform of the
    training data's recorded settings (``image_size``, ``resize_size``, ``normalize``).

    Args:
        path: The ``.ckpt`` file.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:1"``, ...
        image_size: Evaluation resolution; default: the training data's, else ALIGN's 289 (logged). The
            resize before the center crop follows ALIGN's ratio (346 / 289) unless the data recorded one
            and the size is not overridden.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the checkpoint does not record its model's configuration, or carries no tokenizer.
    """
    from align_lightning.module import ALIGNModule  # imports Lightning and the towers: only when loading

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {str(path)!r} not found: give the .ckpt file written by `python -m align_lightning fit` "
            "(runs/<name>/version_<n>/checkpoints/*.ckpt)."
        )
    # The data's settings are not part of the module: read them from the raw checkpoint (tensors memory-mapped).
    raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    data = raw.get("datamodule_hyper_parameters") or {}
    if not isinstance(raw.get("hyper_parameters", {}).get("model"), dict):
        raise ValueError(
            f"{path} does not record its model's configuration (it was saved from an ALIGNModule built in Python, "
            "without LightningCLI). Train with `python -m align_lightning fit`, or build the InferenceModel "
            "yourself from ALIGNModule.load_from_checkpoint(path, model=...)."
        )
    del raw
    module = ALIGNModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    if module.tokenizer is None:
        raise ValueError(
            f"{path} carries no tokenizer (it was trained by a DataModule without one): texts cannot be encoded."
        )
    size = image_size if image_size is not None else data.get("image_size")
    if size is None:
        logger.warning(
            "%s does not record the training data's image size: using ALIGN's %d (set --image-size otherwise).",
            path,
            DEFAULT_IMAGE_SIZE,
        )
        size = DEFAULT_IMAGE_SIZE
    resize = data.get("resize_size") if image_size is None else None
    normalize = data.get("normalize") or "align"
    if isinstance(normalize, list):  # a (mean, std) pair comes back from YAML as a list
        normalize = tuple(normalize)
    max_length = int(data.get("max_length") or min(module.tokenizer.model_max_length, 512))
    target = resolve_device(device)
    encoder = module.model.to(target).eval()
    return InferenceModel(
        encoder=encoder,
        tokenizer=module.tokenizer,
        transform=image_transform(int(size), train=False, resize_size=resize, normalize=normalize),
        max_length=max_length,
        device=target,
        checkpoint=str(path.resolve()),
        normalize=normalize,
    )


# --------------------------------------------------------------------------------------------------
# Images: a folder, or webdataset shards
# --------------------------------------------------------------------------------------------------


@dataclass
class SkipCounter:
    """Images that could not be used, counted by reason (the first few named in the log)."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, key: str, reason: str, message: str) -> None:
        """Count one skipped image (or damaged shard) and log it while few have been."""
        self.counts[reason] += 1
        total = sum(self.counts.values())
        if total <= _MAX_SKIPS_LOGGED:
            logger.warning("Skipped %s (%s): %s", key, reason, message)
        elif total == _MAX_SKIPS_LOGGED + 1:
            logger.warning("More images skipped; only counting from here on.")

    @property
    def total(self) -> int:
        """Number of skips."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """``"corrupt_image 2, truncated_shard 1"`` (``"none"`` when nothing was skipped)."""
        return ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items())) or "none"


#: One item of an image loader: ``(key, pixels, None)`` or ``(key, None, (reason, message))``.
_Item = tuple[str, Tensor | None, tuple[str, str] | None]


def _load(key: str, data: bytes, transform: AlignImageTransform) -> _Item:
    try:
        return key, transform(decode_image(data, min_side=transform.resize_size)), None
    except Image.UnidentifiedImageError:
        return key, None, ("corrupt_image", "not in an image format PIL can read")
    except _DECODE_ERRORS as err:
        return key, None, ("corrupt_image", f"{type(err).__name__}: {err}")


class _FolderImages(Dataset):
    """Image files of a folder; keys are the paths relative to it (POSIX separators)."""

    def __init__(self, root: Path, paths: Sequence[Path], transform: AlignImageTransform) -> None:
        self.root = root
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Item:
        path = self.paths[index]
        key = path.relative_to(self.root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as err:
            return key, None, ("unreadable_file", str(err))
        return _load(key, data, self.transform)


class _ShardImages(IterableDataset):
    """The images of webdataset shards; each loader worker reads every ``num_workers``-th shard."""

    def __init__(self, urls: Sequence[str], transform: AlignImageTransform) -> None:
        super().__init__()
        self.urls = list(urls)
        self.transform = transform

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            for record in iter_shard(url):
                if isinstance(record, ShardDamage):
                    yield url, None, (record.reason, record.message)
                    continue
                extension = next((ext for ext in SHARD_IMAGE_EXTENSIONS if record.files.get(ext)), None)
                if extension is None:
                    yield record.key, None, ("missing_image", f"no image member in {url}")
                    continue
                yield _load(record.key, record.files[extension], self.transform)


def _collate(items: Sequence[_Item]) -> tuple[list[str], Tensor | None, list[tuple[str, str, str]]]:
    good = [(key, pixels) for key, pixels, _ in items if pixels is not None]
    skipped = [(key, *error) for key, _, error in items if error is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [key for key, _ in good], pixels, skipped


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")
    )


@dataclass(frozen=True)
class ImageSource:
    """Where images come from: a folder (searched recursively), one image file, or webdataset shards.

    Attributes:
        kind: ``"folder"``, ``"file"`` or ``"shards"``.
        root: The folder (or the file); for shards, the pattern as given.
        items: Image paths (folder, file) or shard URLs.
    """

    kind: Literal["folder", "file", "shards"]
    root: str
    items: tuple[str, ...]

    @classmethod
    def resolve(cls, images: str | os.PathLike[str]) -> ImageSource:
        """Find the images of a folder (sorted paths), an image file, or expand shard URLs.

        Raises:
            FileNotFoundError: If a folder holds no images, or ``images`` is neither a folder, an image file
                nor ``.tar`` shards (local shards must exist).
        """
        path = Path(images)
        if path.is_dir():
            paths = _list_images(path)
            if not paths:
                raise FileNotFoundError(
                    f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {str(path)!r}: give a folder that holds image "
                    "files (searched recursively) or webdataset shards."
                )
            return cls("folder", str(path), tuple(str(p) for p in paths))
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            return cls("file", str(path), (str(path),))
        urls = expand_urls(str(images))
        local = [url for url in urls if "://" not in url]
        if any(not url.endswith(".tar") for url in urls) or (local and not any(map(os.path.exists, local))):
            raise FileNotFoundError(
                f"{str(images)!r} is neither a folder of images, an image file, nor existing webdataset shards "
                "(.tar files; brace notation such as '/data/{00000..00099}.tar' and fsspec URLs work)."
            )
        return cls("shards", str(images), tuple(urls))

    @property
    def count(self) -> int | None:
        """Number of images of a folder or file; ``None`` for shards (known only once read)."""
        return None if self.kind == "shards" else len(self.items)


def image_batches(
    images: str | os.PathLike[str] | ImageSource,
    transform: AlignImageTransform,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    skips: SkipCounter | None = None,
) -> Iterator[tuple[list[str], Tensor]]:
    """Batches of preprocessed images from a folder, an image file, or webdataset shards.

    Args:
        images: A folder (its images, found recursively, in sorted path order, keyed by their path relative
            to it), one image file (keyed by its name), or shard URLs (``"/data/{00000..00099}.tar"``,
            ``"s3://..."``; keyed by sample key); see :meth:`ImageSource.resolve`.
        transform: The model's evaluation transform.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes decoding images.
        skips: Counts the images that cannot be decoded (and damaged shards); they are left out of the batches.

    Yields:
        ``(keys, pixel_values)`` batches.

    Raises:
        FileNotFoundError: As :meth:`ImageSource.resolve`.
    """
    source = images if isinstance(images, ImageSource) else ImageSource.resolve(images)
    skips = skips if skips is not None else SkipCounter()
    dataset: Dataset | IterableDataset
    if source.kind == "shards":
        dataset = _ShardImages(source.items, transform)
    else:
        root = Path(source.root) if source.kind == "folder" else Path(source.root).parent
        dataset = _FolderImages(root, [Path(p) for p in source.items], transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    for keys, pixels, skipped in loader:
        for key, reason, message in skipped:
            skips.add(key, reason, message)
        if pixels is not None:
            yield keys, pixels


def read_texts(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """The non-blank lines of a UTF-8 text file and their keys (1-based line numbers, as editors show them).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it holds no text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Texts file {str(path)!r} not found: give a UTF-8 file with one text per line.")
    keys, texts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            keys.append(str(number))
            texts.append(line.strip())
    if not texts:
        raise ValueError(f"Texts file {path} holds no text (one text per line expected).")
    return keys, texts


# --------------------------------------------------------------------------------------------------
# Embedding, classification, search
# --------------------------------------------------------------------------------------------------


def progress_bar(console: Console | None = None, enabled: bool = True) -> Progress:
    """A rich progress bar (description, bar, done / total, elapsed, remaining)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def embed_images(
    model: InferenceModel,
    images: str | os.PathLike[str] | ImageSource,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    skips: SkipCounter | None = None,
    progress: Progress | None = None,
) -> tuple[list[str], Tensor]:
    """Embed every decodable image of a folder, image file or shards (see :func:`image_batches`).

    Returns:
        ``(keys, embeddings)``: ``(N, D)`` float32 on the CPU, in reading order.
    """
    source = images if isinstance(images, ImageSource) else ImageSource.resolve(images)
    skips = skips if skips is not None else SkipCounter()
    total = source.count
    batches = image_batches(source, model.transform, batch_size=batch_size, num_workers=num_workers, skips=skips)
    task = progress.add_task("images", total=total) if progress is not None else None
    keys: list[str] = []
    chunks: list[Tensor] = []
    for batch_keys, pixels in batches:
        keys += batch_keys
        chunks.append(model.encode_images(pixels).cpu())
        if progress is not None and task is not None:
            # Skipped images advance the bar too: it counts the images looked at.
            progress.update(task, completed=len(keys) + skips.total)
    if progress is not None and task is not None:
        progress.update(task, completed=len(keys) + skips.total, total=total or len(keys) + skips.total)
    if not chunks:
        raise ValueError(f"None of the images of {source.root!r} could be used ({skips.summary()}): nothing to embed.")
    return keys, torch.cat(chunks)


def embed_texts(
    model: InferenceModel, texts: Sequence[str], *, batch_size: int = 256, progress: Progress | None = None
) -> Tensor:
    """Embed texts in batches: ``(N, D)`` float32 on the CPU."""
    task = progress.add_task("texts", total=len(texts)) if progress is not None else None
    chunks = []
    for start in range(0, len(texts), batch_size):
        chunks.append(model.encode_texts(texts[start : start + batch_size]).cpu())
        if progress is not None and task is not None:
            progress.advance(task, len(chunks[-1]))
    return torch.cat(chunks)


def embed(
    model: InferenceModel,
    images: str | os.PathLike[str] | ImageSource | None = None,
    texts: str | os.PathLike[str] | None = None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: Progress | None = None,
) -> Embeddings:
    """Embed the images of a folder or shards and the lines of a texts file, with keys and provenance.

    Args:
        model: From :func:`load_checkpoint`.
        images: Folder, image file or shard URLs (see :func:`image_batches`), or ``None``.
        texts: A UTF-8 file with one text per line (blank lines skipped), or ``None``.
        batch_size: Images or texts per forward pass.
        num_workers: DataLoader workers decoding images.
        progress: A rich progress bar to report to (``None``: silent).

    Returns:
        The embeddings; ``metadata`` records the checkpoint, the preprocessing, the sources and the skip counts.

    Raises:
        ValueError: If neither images nor texts are given, or nothing could be embedded.
        FileNotFoundError: For missing inputs.
    """
    if images is None and texts is None:
        raise ValueError("Nothing to embed: give images (a folder or shards), texts (a file), or both.")
    text_keys, lines = read_texts(texts) if texts is not None else ([], [])  # fail early on a missing file
    skips = SkipCounter()
    image_keys: list[str] = []
    image_embeds = None
    if images is not None:
        image_keys, image_embeds = embed_images(
            model, images, batch_size=batch_size, num_workers=num_workers, skips=skips, progress=progress
        )
    text_embeds = embed_texts(model, lines, batch_size=batch_size, progress=progress) if lines else None
    metadata = {
        **model.provenance(),
        "images": None if images is None else (images.root if isinstance(images, ImageSource) else str(images)),
        "texts": None if texts is None else str(Path(texts).resolve()),
        "skipped": dict(skips.counts),
    }
    return Embeddings.from_rows(image_embeds, image_keys, text_embeds, text_keys, metadata)


@dataclass
class Predictions:
    """Zero-shot predictions: class probabilities per image.

    Attributes:
        keys: Image keys (paths relative to the folder, or sample keys).
        classnames: Class names, in column order.
        probs: ``(N, C)`` softmax over ``logit_scale x cosine`` (rows sum to 1).
        skipped: Images that could not be decoded, by reason.
    """

    keys: list[str]
    classnames: list[str]
    probs: Tensor
    skipped: Counter[str] = field(default_factory=Counter)

    def top(self, k: int) -> tuple[Tensor, Tensor]:
        """``(probabilities, class indices)``, both ``(N, min(k, C))``, most probable first."""
        return self.probs.topk(min(k, self.probs.shape[1]), dim=1)


def classify(
    model: InferenceModel,
    images: str | os.PathLike[str] | ImageSource,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: Progress | None = None,
) -> Predictions:
    """Zero-shot classification: each image against prompt-ensembled class embeddings (ALIGN / CLIP protocol).

    Class embeddings come from :func:`~align_lightning.eval.zeroshot_classifier` (mean over the templates of
    the normalised prompt embeddings); probabilities are ``softmax(logit_scale * image @ classes)`` with the
    model's learned temperature.

    Args:
        model: From :func:`load_checkpoint`.
        images: Folder, image file or shards (see :func:`image_batches`).
        classnames: Class names (unique).
        templates: Prompt templates, each with ``{}`` where the class name goes.
        batch_size: Images per forward pass.
        num_workers: DataLoader workers decoding images.
        progress: A rich progress bar to report to.

    Raises:
        ValueError: For no or duplicate class names, or templates without ``{}``.
    """
    from align_lightning.eval.zeroshot import zeroshot_classifier

    if not classnames:
        raise ValueError("No class names given.")
    duplicates = sorted(name for name, n in Counter(classnames).items() if n > 1)
    if duplicates:
        raise ValueError(f"Class names must be unique; repeated: {duplicates}.")
    weights = zeroshot_classifier(
        model.encoder, list(classnames), list(templates), model.tokenizer, device=model.device
    )
    skips = SkipCounter()
    keys, image_embeds = embed_images(
        model, images, batch_size=batch_size, num_workers=num_workers, skips=skips, progress=progress
    )
    logits = model.logit_scale() * image_embeds @ weights.cpu()
    return Predictions(keys, list(classnames), logits.softmax(dim=1), skips.counts)


@dataclass(frozen=True)
class Match:
    """One search result: an indexed image's key and its cosine similarity to the query."""

    key: str
    score: float


def search(
    index: Embeddings,
    queries: Sequence[str],
    model: InferenceModel,
    k: int = 5,
    *,
    backend: Literal["exact", "faiss"] = "exact",
    chunk_size: int = 65_536,
) -> list[list[Match]]:
    """Text -> image search: the ``k`` indexed images most similar to each query text.

    Args:
        index: Embeddings holding image rows (from :func:`embed` or ``embed --out``).
        queries: Query texts, encoded by ``model``'s text tower (use the checkpoint that made the index).
        model: From :func:`load_checkpoint`.
        k: Results per query.
        backend: ``"exact"`` (chunked, the default) or ``"faiss"`` (needs faiss); see
            :func:`~align_lightning.embeddings.top_k`.
        chunk_size: Index rows scored at once.

    Returns:
        One list of :class:`Match` per query, best first.

    Raises:
        ValueError: If the index holds no image embeddings, or its width differs from the model's.
    """
    if not index.image_keys:
        raise ValueError("The index holds no image embeddings: embed images with `embed --images ...`.")
    query_embeds = model.encode_texts(queries)
    if query_embeds.shape[1] != index.dim:
        raise ValueError(
            f"The index's embeddings are {index.dim}-d but the model's are {query_embeds.shape[1]}-d: search with "
            "the checkpoint that made the index."
        )
    scores, rows = top_k(
        F.normalize(query_embeds, dim=-1), index.image_embeds, k, chunk_size=chunk_size, backend=backend
    )
    return [
        [Match(index.image_keys[row], score) for row, score in zip(r.tolist(), s.tolist(), strict=True)]
        for r, s in zip(rows.cpu(), scores.cpu(), strict=True)
    ]
