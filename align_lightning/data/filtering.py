"""ALIGN's noisy-data filtering as a tool: ``python -m align_lightning filter SHARDS --output OUT``.

Reads img2dataset webdataset shards (brace-expanded URLs, any fsspec protocol) and writes the kept
samples, every member byte-identical (``.jpg``/``.txt``/``.json``/...), into one output shard per input
shard with the same basename, plus ``filter_report.json`` with the counts per rule. This is the only
curation ALIGN does (shared/ALIGN.md, "Noisy-data filtering"); the paper's pornography filter needs a
classifier and is not part of this tool.

**Rules**, applied in this order; a dropped sample is counted under the *first* rule that drops it:

1. ``image_size``: keep only if the image's shorter side is **strictly greater** than
   ``min_image_side`` (paper: "shorter side > 200 pixels", so a 200 px side is dropped). Width and
   height come from the image header (PIL's lazy ``Image.open``; no pixel decoding), never from the
   ``.json`` metadata.
2. ``aspect_ratio``: keep only if ``max(w, h) / min(w, h)`` is **strictly less** than ``max_aspect_ratio``
   (paper: "< 3").
3. ``image_alt_texts``: drop every sample of an image that comes with more than ``max_texts_per_image``
   (1,000) distinct normalised alt-texts in the corpus. "The same image" means the same encoded bytes
   (a 64-bit hash of them); re-encoded copies are different images for this rule.
4. ``text_shared``: drop every sample of a normalised alt-text that comes with more than
   ``max_images_per_text`` (10) distinct images in the corpus.
5. ``unigram_count``: drop a text with fewer than ``min_unigrams`` (3) or more than ``max_unigrams`` (20)
   unigrams.
6. ``rare_token``: drop a text that has a unigram outside the vocabulary, the ``V`` most frequent
   unigrams and bigrams of the corpus (only unigrams are looked up; bigrams compete for the ``V``
   places, as in the paper's "100M most frequent unigrams+bigrams").
7. ``eval_near_duplicate`` (only with ``exclude``): drop a sample whose image is within Hamming
   distance ``exclude_max_distance`` (6 of 64 bits) of the perceptual hash of an evaluation image (any
   image file under the ``exclude`` folders, recursively: a Karpathy image root, an ImageFolder). The
   hash is a DCT pHash (:func:`perceptual_hash`) of the JPEG draft-decoded at >= 64 px: re-encoded and
   resized copies land within 0-4 bits, unrelated photos about 32 bits apart. The paper used embedding
   similarity (> 0.975), which also catches crops; pHash does not. The report lists every removed
   sample (shard, key, matched evaluation file, distance). This rule runs last because it is the only
   one that decodes pixels, so only the survivors of rules 1-6 pay for it.

Records that cannot be used (each of :data:`~align_lightning.data.shards.SKIP_REASONS`: no image or
caption member, a zero-byte member, a caption that is not UTF-8, an image whose header does not parse;
with ``exclude`` also an image that fails to decode: without it, pixels are never decoded, so an image
whose header parses but whose data is truncated is kept) are dropped and counted per reason, never an
error.
A truncated shard counts one ``truncated_shard`` (the record in progress is lost) and its complete
records are filtered as usual. The report's totals satisfy ``input = kept + sum(dropped) + sum(skipped)``.

**Definitions.**

* *Normalised text*: the caption decoded as UTF-8 (a leading BOM dropped), lower-cased (``str.lower``),
  runs of whitespace collapsed to one space, stripped. Two alt-texts are "the same" when their
  normalised texts are equal (rule 4; rule 3 counts distinct normalised texts).
* *Unigrams*: ``re.findall(r"\\w+", normalised_text)``: maximal runs of Unicode word characters
  (letters, digits, underscore); punctuation separates and is dropped (``"Don't stop!"`` ->
  ``don``, ``t``, ``stop``). *Bigrams*: pairs of consecutive unigrams of one text.
* *Corpus*: every well-formed sample of the input (not skipped as above), before any rule, so the
  statistics do not depend on the rule order. *Frequency* of an n-gram: its number of occurrences
  summed over the corpus (a caption repeated on k samples counts k times).
* *V*: ``vocab_size`` when set, else ``max(min_vocab_size, round(pairs * vocab_per_pair))`` where
  ``pairs`` is the corpus size and ``vocab_per_pair = 100M / 1.8B`` (the paper's ratio).
* *The V most frequent*: n-grams ranked by frequency, descending; ties broken by hash value, ascending
  (deterministic, arbitrary). If the corpus has at most V distinct n-grams the rule drops nothing.

**Two passes, bounded memory.** Pass 1 streams every shard (in parallel) and writes, per shard, one
spill file to a local work folder holding three sorted arrays of 64-bit hashes: the shard's distinct
n-grams with their counts, and its distinct (text, image) hash pairs sorted both ways, after a header of
bucket offsets (so the reduce reads a bucket of a shard with one seek). The reduce step splits the hash space into
``num_buckets`` ranges (by the top bits, so bucket order is hash order) and aggregates each bucket over
all shards with numpy: exact n-gram counts, distinct images per text and distinct texts per image.
Memory is about one bucket per worker. The top-V cut is a count threshold found from the merged
histogram of counts over all buckets (plus the tie quota at the threshold, taken in hash order); the
vocabulary's unigram hashes are kept as a sorted ``uint64`` array, looked up with ``np.searchsorted``
(memory-mapped, so workers share one copy). Pass 2 streams the shards again and applies the rules.

**Exactness.** Every count is exact over 64-bit BLAKE2b hashes (n-grams: 63 bits plus one bit that
tells unigrams from bigrams). Two different items with equal hashes would be counted as one: the
expected number of such pairs among n distinct items is about n^2 / 2^65 (n-grams: n^2 / 2^64), e.g.
0.05 for 10^9 distinct n-grams: negligible.

**Resuming.** Pass 2 writes each output shard atomically (under a temporary name, moved into place)
and then its report part ``_filter/parts/<basename>.json``; a shard whose output and part exist, with
the part's fingerprint (config, statistics, evaluation hashes) matching, is skipped on a rerun. Pass 1's
result is saved in ``_filter/stats/`` and reused by a rerun with the same input URLs and statistics
settings, so a run killed in pass 2 does not redo pass 1 (the shards' contents are not checked: after
changing them, use a new output folder). A run killed in pass 1 redoes it, unless ``work_dir`` was given:
per-shard pass-1 results found there are reused. A shard that cannot be opened is counted
(``unreadable_shard``), listed in ``incomplete_shards`` and retried by a rerun; while any is missing, the
statistics are not saved for reuse.

**Processes.** ``workers`` processes (forked where the platform allows it, so they do not re-import
the package) share the work per shard in both passes and per bucket in the reduce. ``memory://`` data
lives in one process, so it needs ``workers=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from align_lightning.data.shards import (
    SKIP_REASONS,
    RawRecord,
    ShardDamage,
    ShardWriter,
    check_record,
    decode_caption,
    decode_image,
    expand_urls,
    iter_shard,
)

__all__ = [
    "EVAL_IMAGE_EXTENSIONS",
    "RULES",
    "FilterConfig",
    "filter_shards",
    "hamming_distances",
    "main",
    "normalize_text",
    "perceptual_hash",
    "scaled_vocab_size",
    "unigrams",
]

logger = logging.getLogger(__name__)

#: The rules, in the order they are applied (a sample is counted under the first that drops it).
RULES: tuple[str, ...] = (
    "image_size",
    "aspect_ratio",
    "image_alt_texts",
    "text_shared",
    "unigram_count",
    "rare_token",
    "eval_near_duplicate",
)

#: File extensions (lower-cased) taken as evaluation images under an ``exclude`` folder.
EVAL_IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

REPORT_NAME = "filter_report.json"
_META_DIR = "_filter"
#: Bump when the definitions change (text normalisation, hashing): invalidates saved statistics and parts.
_FORMAT_VERSION = 1
_READ_RETRIES = 3
_READ_BACKOFF = 1.0
_WORD = re.compile(r"\w+")
_PHASH_SIZE = 32  # pHash: DCT of a 32x32 grayscale thumbnail, the 8x8 lowest frequencies
_PHASH_DECODE_SIDE = 64  # JPEGs are draft-decoded to a shorter side >= 64 px before the thumbnail
_SECTIONS = 3  # in a spill file: n-grams (hash, count), pairs (text, image), pairs (image, text)
_SPILL_BITS = 12  # spill files index 4096 fine buckets; a reduce bucket is a run of 2**(12 - bits) of them
_MAX_BUCKETS = 1 << _SPILL_BITS
_TARGET_BUCKET_BYTES = 256 * 2**20  # automatic num_buckets: spill bytes per reduce bucket, at most this
_SPILL_PREFIX = _SECTIONS * 8 + _SECTIONS * (_MAX_BUCKETS + 1) * 8  # section sizes, then bucket offsets


def _rule_help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of ALIGN's filtering rules; the defaults are the paper's (see the module docstring).

    Attributes:
        min_image_side: Keep an image only if its shorter side is strictly greater than this (px).
        max_aspect_ratio: Keep an image only if ``long side / short side`` is strictly less than this.
        max_texts_per_image: Drop an image (same encoded bytes) that has more than this many distinct
            normalised alt-texts in the corpus.
        max_images_per_text: Drop a normalised alt-text shared by more than this many distinct images.
        min_unigrams: Drop a text with fewer unigrams than this.
        max_unigrams: Drop a text with more unigrams than this.
        vocab_size: V, the number of most frequent unigrams+bigrams that make the vocabulary; ``None``
            scales it with the corpus (:func:`scaled_vocab_size`).
        vocab_per_pair: Vocabulary entries per corpus pair when ``vocab_size`` is ``None``
            (paper: 100M n-grams for 1.8B pairs).
        min_vocab_size: Floor of the scaled V (small corpora have no meaningful "rare" tokens at the
            paper's ratio: 100,000 is the paper's ratio at 1.8M pairs).
        exclude_max_distance: Drop a training image within this Hamming distance (of 64 bits) of an
            evaluation image's perceptual hash. Unrelated images differ in about 32 bits (sd ~4), a
            re-encoded or resized copy in 0-4.
        num_buckets: Hash-space partitions of the pass-1 reduce (a power of two, at most 4096); each
            worker holds about ``spill bytes / num_buckets`` (times ~3 while sorting). ``None`` picks the
            smallest with at most 256 MiB per bucket. Does not change any result.
    """

    min_image_side: int = field(default=200, metadata=_rule_help("keep images whose shorter side is > this (px)"))
    max_aspect_ratio: float = field(
        default=3.0, metadata=_rule_help("keep images whose long/short side ratio is < this")
    )
    max_texts_per_image: int = field(
        default=1000, metadata=_rule_help("drop images (same bytes) with more than this many distinct alt-texts")
    )
    max_images_per_text: int = field(
        default=10, metadata=_rule_help("drop alt-texts shared by more than this many distinct images")
    )
    min_unigrams: int = field(default=3, metadata=_rule_help("drop texts with fewer unigrams than this"))
    max_unigrams: int = field(default=20, metadata=_rule_help("drop texts with more unigrams than this"))
    vocab_size: int | None = field(
        default=None,
        metadata=_rule_help(
            "V: drop texts with a unigram outside the V most frequent unigrams+bigrams; "
            "default: scaled to the corpus, max(min_vocab_size, round(pairs * vocab_per_pair))"
        ),
    )
    vocab_per_pair: float = field(
        default=100e6 / 1.8e9, metadata=_rule_help("scaled V per corpus pair (paper: 100M per 1.8B pairs)")
    )
    min_vocab_size: int = field(default=100_000, metadata=_rule_help("floor of the scaled V"))
    exclude_max_distance: int = field(
        default=6,
        metadata=_rule_help(
            "drop training images within this Hamming distance (of 64 bits) of an --exclude image's pHash "
            "(the paper uses embedding similarity > 0.975; this is a cheaper stand-in)"
        ),
    )
    num_buckets: int | None = field(
        default=None,
        metadata=_rule_help(
            "hash partitions of the pass-1 reduce (power of two <= 4096; memory per worker ~ spill size / this); "
            "default: automatic, <= 256 MiB per partition"
        ),
    )

    def __post_init__(self) -> None:
        positive = ("max_texts_per_image", "max_images_per_text", "min_vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"FilterConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.min_image_side < 0:
            raise ValueError(f"FilterConfig.min_image_side must be >= 0, got {self.min_image_side}.")
        if not self.max_aspect_ratio > 1.0:
            raise ValueError(
                f"FilterConfig.max_aspect_ratio must be > 1 (every aspect ratio is >= 1), got {self.max_aspect_ratio}."
            )
        if not 0 <= self.min_unigrams <= self.max_unigrams:
            raise ValueError(
                f"Need 0 <= min_unigrams <= max_unigrams, got {self.min_unigrams} and {self.max_unigrams}."
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"FilterConfig.vocab_size must be >= 1 or None, got {self.vocab_size}.")
        if not self.vocab_per_pair > 0:
            raise ValueError(f"FilterConfig.vocab_per_pair must be > 0, got {self.vocab_per_pair}.")
        if not 0 <= self.exclude_max_distance <= 64:
            raise ValueError(f"FilterConfig.exclude_max_distance must be in [0, 64], got {self.exclude_max_distance}.")
        if self.num_buckets is not None and (
            self.num_buckets < 1 or self.num_buckets & (self.num_buckets - 1) or self.num_buckets > _MAX_BUCKETS
        ):
            raise ValueError(f"FilterConfig.num_buckets must be a power of two <= 4096, got {self.num_buckets}.")


def scaled_vocab_size(pairs: int, config: FilterConfig) -> int:
    """V for a corpus of ``pairs`` well-formed samples: ``config.vocab_size`` if set, else
    ``max(config.min_vocab_size, round(pairs * config.vocab_per_pair))`` (100M at 1.8B pairs)."""
    if config.vocab_size is not None:
        return config.vocab_size
    return max(config.min_vocab_size, round(pairs * config.vocab_per_pair))


def normalize_text(caption: str) -> str:
    """Lower-case, collapse whitespace runs to one space, strip: the identity of an alt-text."""
    return " ".join(caption.lower().split())


def unigrams(normalized: str) -> list[str]:
    """The unigrams of a normalised text: runs of Unicode word characters (``\\w+``)."""
    return _WORD.findall(normalized)


# --------------------------------------------------------------------------------------------------
# Hashing


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _hash64(data: bytes) -> int:
    return int.from_bytes(_digest(data), "little")


def _hash_array(items: Iterable[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(map(_digest, items)), dtype="<u8").astype(np.uint64)


def _unigram_hashes(tokens: Sequence[str]) -> np.ndarray:
    """Tagged hashes of unigrams: the low bit is 0."""
    return _hash_array(t.encode() for t in tokens) & np.uint64(0xFFFFFFFFFFFFFFFE)


def _ngram_hashes(tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tagged hashes of a text's unigrams (low bit 0) and bigrams (low bit 1)."""
    bigrams = _hash_array(f"{a} {b}".encode() for a, b in itertools.pairwise(tokens)) | np.uint64(1)
    return _unigram_hashes(tokens), bigrams


def _contains(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Membership of ``queries`` in a sorted array (boolean array)."""
    if len(sorted_values) == 0:
        return np.zeros(len(queries), dtype=bool)
    index = np.searchsorted(sorted_values, queries).clip(max=len(sorted_values) - 1)
    return sorted_values[index] == queries


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash): grayscale, 32x32 Lanczos thumbnail, 2-D DCT-II, the 8x8
    lowest frequencies compared with their median (bit 63 is the DC term).

    Robust to re-encoding, resizing and mild colour changes; not to crops, rotations or flips.
    """
    thumb = image.convert("L").resize((_PHASH_SIZE, _PHASH_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(thumb, dtype=np.float64)
    dct = _dct_matrix(_PHASH_SIZE)
    low = (dct @ pixels @ dct.T)[:8, :8].ravel()
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of size ``n`` (rows: frequencies)."""
    k = np.arange(n)[:, None]
    matrix = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


def _image_phash(data: bytes) -> int:
    return perceptual_hash(decode_image(data, min_side=_PHASH_DECODE_SIDE))


def hamming_distances(hashes: np.ndarray, query: int) -> np.ndarray:
    """Hamming distances between a 64-bit ``query`` and each entry of a ``uint64`` array."""
    xor = np.asarray(hashes, dtype=np.uint64) ^ np.uint64(query)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(xor).astype(np.int64)
    return np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class _Sample:
    record: RawRecord
    image: bytes
    width: int
    height: int
    text: str  # normalised
    tokens: list[str]


def _parse(record: RawRecord) -> _Sample | str:
    """A well-formed sample, or the skip reason."""
    checked = check_record(record)
    if not isinstance(checked, tuple):
        return checked.reason
    _, image, caption = checked
    try:
        text = normalize_text(decode_caption(caption))
    except UnicodeDecodeError:
        return "bad_caption"
    try:
        with Image.open(io.BytesIO(image)) as opened:  # header only: no pixels are decoded
            width, height = opened.size
    except Exception:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, bombs)
        return "corrupt_image"
    if width < 1 or height < 1:
        return "corrupt_image"
    return _Sample(record, image, width, height, text, unigrams(text))


# --------------------------------------------------------------------------------------------------
# Storage helpers


def _fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _write_atomic(url: str, data: bytes, storage_options: Mapping[str, Any] | None) -> None:
    """Write under a temporary name and move into place, so readers never see a partial file."""
    fs, path = _fs(url, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path + ".incomplete", "wb") as stream:
        stream.write(data)
    fs.mv(path + ".incomplete", path)


def _read_json(url: str, storage_options: Mapping[str, Any] | None) -> Any | None:
    fs, path = _fs(url, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def _save_npy(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".incomplete")
    with open(temporary, "wb") as stream:
        np.save(stream, array)
    os.replace(temporary, path)


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _empty_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT):
        pass
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Process pool


def _start_method() -> str:
    # fork: workers inherit the imported modules (spawning re-imports torch/lightning in each worker,
    # seconds apiece); the workers never use torch or threads, which is what makes fork unsafe.
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


_Map = Callable[[Callable[[Any], Any], Sequence[Any]], Iterator[Any]]


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[_Map]:
    """``imap_unordered`` over a process pool (one pool for the whole run), or in-process ``map``."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context(_start_method()).Pool(workers) as pool:
        yield lambda function, tasks: pool.imap_unordered(function, tasks, chunksize=1)


def _progress(total: int, desc: str, enabled: bool, unit: str = "shard") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Pass 1: per-shard statistics


def _spill_path(work_dir: str, url: str) -> str:
    return os.path.join(work_dir, "pass1", hashlib.sha1(url.encode()).hexdigest()[:20] + ".bin")


def _bucket_offsets(keys: np.ndarray) -> np.ndarray:
    """Row offsets of the fine buckets (top :data:`_SPILL_BITS` bits of the key) in sorted ``keys``."""
    starts = np.arange(_MAX_BUCKETS, dtype=np.uint64) << np.uint64(64 - _SPILL_BITS)
    return np.r_[np.searchsorted(keys, starts), len(keys)].astype(np.int64)


def _write_spill(path: str, sections: Sequence[np.ndarray]) -> int:
    """One file per shard: the section sizes (3 int64), each section's fine-bucket offsets
    (``3 x 4097`` int64), then each section's ``(n, 2)`` uint64 rows sorted by column 0, so that a
    bucket of a section is one contiguous read. Returns the file size."""
    sizes = np.array([len(section) for section in sections], np.int64)
    offsets = np.stack([_bucket_offsets(np.ascontiguousarray(section[:, 0])) for section in sections])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = path + ".incomplete"
    with open(temporary, "wb") as stream:
        stream.write(sizes.tobytes() + offsets.tobytes())
        for section in sections:
            stream.write(np.ascontiguousarray(section, dtype=np.uint64).tobytes())
    os.replace(temporary, path)
    return _SPILL_PREFIX + 16 * int(sizes.sum())


def _read_spill_bucket(path: str, bucket: int, bits: int) -> list[np.ndarray]:
    """The rows of reduce bucket ``bucket`` (of ``2**bits``) of each section of a spill file."""
    first, last = bucket << (_SPILL_BITS - bits), (bucket + 1) << (_SPILL_BITS - bits)
    parts = []
    with open(path, "rb") as stream:
        sizes = np.frombuffer(stream.read(_SECTIONS * 8), np.int64)
        data_start = _SPILL_PREFIX + 16 * np.r_[0, np.cumsum(sizes)[:-1]]
        for section in range(_SECTIONS):
            row = _SECTIONS * 8 + section * (_MAX_BUCKETS + 1) * 8
            stream.seek(row + first * 8)
            start = int(np.frombuffer(stream.read(8), np.int64)[0])
            stream.seek(row + last * 8)
            stop = int(np.frombuffer(stream.read(8), np.int64)[0])
            stream.seek(int(data_start[section]) + 16 * start)
            parts.append(np.frombuffer(stream.read(16 * (stop - start)), np.uint64).reshape(-1, 2))
    return parts


def _auto_buckets(spill_bytes: int) -> int:
    """The smallest power of two of buckets with at most :data:`_TARGET_BUCKET_BYTES` each (<= 4096)."""
    buckets = 1
    while buckets < _MAX_BUCKETS and spill_bytes / buckets > _TARGET_BUCKET_BYTES:
        buckets *= 2
    return buckets


def _pass1_shard(task: tuple[str, str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """Count one shard: distinct n-grams with counts, distinct (text, image) hash pairs; spill to disk."""
    url, path, storage_options = task
    marker = Path(path + ".json")
    if marker.exists():
        done = json.loads(marker.read_text())
        if (done.get("url"), done.get("version")) == (url, _FORMAT_VERSION):
            return done | {"reused": True}
    ngram_chunks: list[np.ndarray] = [np.zeros(0, np.uint64)]
    texts: list[bytes] = []
    images: list[bytes] = []
    unreadable = False
    for item in iter_shard(url, storage_options, retries=_READ_RETRIES, backoff=_READ_BACKOFF):
        if isinstance(item, ShardDamage):
            unreadable = item.reason == "unreadable_shard"
            continue
        sample = _parse(item)
        if isinstance(sample, str):
            continue
        ngram_chunks.extend(_ngram_hashes(sample.tokens))
        texts.append(sample.text.encode())
        images.append(sample.image)
    if unreadable:  # nothing written: a rerun retries it
        return {"url": url, "pairs": 0, "spill_bytes": 0, "unreadable": True, "reused": False}
    ngrams, counts = np.unique(np.concatenate(ngram_chunks), return_counts=True)
    pairs = np.stack([_hash_array(texts), _hash_array(images)], axis=1) if texts else np.zeros((0, 2), np.uint64)
    sections = [
        np.stack([ngrams, counts.astype(np.uint64)], axis=1),
        np.unique(pairs, axis=0),  # rows sorted by (text, image)
        np.unique(pairs[:, ::-1], axis=0),  # rows sorted by (image, text)
    ]
    spill_bytes = _write_spill(path, sections)
    done = {
        "url": url,
        "version": _FORMAT_VERSION,
        "pairs": len(texts),
        "spill_bytes": spill_bytes,
        "unreadable": False,
    }
    marker.write_text(json.dumps(done))  # written last: marks the spill file complete
    return done | {"reused": False}


def _over_limit(pairs: np.ndarray, limit: int) -> tuple[np.ndarray, int, int]:
    """Keys (column 0) with more than ``limit`` distinct partners (column 1):
    (those keys, number of distinct keys, number of distinct pairs)."""
    if len(pairs) == 0:
        return np.zeros(0, np.uint64), 0, 0
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    keys, partners = pairs[order, 0], pairs[order, 1]
    distinct = np.r_[True, (keys[1:] != keys[:-1]) | (partners[1:] != partners[:-1])]
    keys = keys[distinct]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    partners_per_key = np.diff(np.r_[starts, len(keys)])
    return keys[starts][partners_per_key > limit], len(starts), len(keys)


def _save_bucket(path: Path, array: np.ndarray) -> None:
    if array.size:  # most buckets of a small corpus are empty: no file
        _save_npy(path, array)


def _load_bucket(path: Path, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.load(path) if path.exists() else np.zeros(empty_shape, np.uint64)


def _reduce_bucket(task: tuple[int, int, list[str], str, int, int]) -> dict[str, Any]:
    """Aggregate one hash bucket over every shard's spill: exact n-gram counts, over-limit texts/images."""
    bucket, bits, paths, out_dir, max_images_per_text, max_texts_per_image = task
    sections: list[list[np.ndarray]] = [[np.zeros((0, 2), np.uint64)] for _ in range(_SECTIONS)]
    for path in paths:
        for section, rows in zip(sections, _read_spill_bucket(path, bucket, bits), strict=True):
            section.append(rows)
    ngrams, by_text, by_image = (np.concatenate(section) for section in sections)
    order = np.argsort(ngrams[:, 0], kind="stable")
    hashes, counts = ngrams[order, 0], ngrams[order, 1]
    if len(hashes):
        starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
        hashes, counts = hashes[starts], np.add.reduceat(counts, starts)
    _save_bucket(Path(out_dir, f"ngrams_{bucket:05d}.npy"), np.stack([hashes, counts]))
    values, frequency = np.unique(counts, return_counts=True)
    del ngrams, order
    bad_texts, texts, text_pairs = _over_limit(by_text, max_images_per_text)
    del by_text
    bad_images, images, _ = _over_limit(by_image, max_texts_per_image)
    _save_bucket(Path(out_dir, f"bad_texts_{bucket:05d}.npy"), bad_texts)
    _save_bucket(Path(out_dir, f"bad_images_{bucket:05d}.npy"), bad_images)
    return {
        "bucket": bucket,
        "histogram": dict(zip(values.tolist(), frequency.tolist(), strict=True)),
        "distinct_ngrams": len(hashes),
        "distinct_texts": texts,
        "distinct_images": images,
        "distinct_pairs": text_pairs,
    }


def _vocab_cut(histogram: Mapping[int, int], vocab_size: int) -> tuple[int, int]:
    """``(t, quota)``: the top ``vocab_size`` n-grams are those counted more than ``t`` times plus the
    first ``quota`` (in hash order) of those counted exactly ``t`` times. ``t = 0``: V covers every n-gram."""
    if vocab_size >= sum(histogram.values()):
        return 0, 0
    above = 0
    for value in sorted(histogram, reverse=True):
        if above + histogram[value] >= vocab_size:
            return value, vocab_size - above
        above += histogram[value]
    return 0, 0


def _compute_statistics(
    urls: Sequence[str],
    config: FilterConfig,
    work_dir: str,
    storage_options: Mapping[str, Any] | None,
    imap: _Map,
    progress: bool,
) -> dict[str, Any]:
    """Pass 1 and the reduce: writes vocab.npy, bad_texts.npy, bad_images.npy into ``work_dir/stats``."""
    tasks = [(url, _spill_path(work_dir, url), storage_options) for url in urls]
    results: dict[str, dict[str, Any]] = {}
    with _progress(len(tasks), "filter pass 1/2: statistics", progress) as bar:
        for result in imap(_pass1_shard, tasks):
            results[result["url"]] = result
            bar.update()
    unreadable = [url for url in urls if results[url]["unreadable"]]
    readable = [url for url in urls if not results[url]["unreadable"]]
    pairs = sum(results[url]["pairs"] for url in readable)
    paths = [_spill_path(work_dir, url) for url in readable]
    spill_bytes = sum(results[url]["spill_bytes"] for url in readable)
    num_buckets = config.num_buckets or _auto_buckets(spill_bytes)
    bits = num_buckets.bit_length() - 1
    logger.info(
        "Pass 1 spilled %.1f MiB; reducing in %d bucket(s) of about %.1f MiB.",
        spill_bytes / 2**20,
        num_buckets,
        spill_bytes / num_buckets / 2**20,
    )
    stats_dir = Path(work_dir, "stats")
    bucket_dir = stats_dir / "buckets"
    bucket_dir.mkdir(parents=True, exist_ok=True)
    reduce_tasks = [
        (bucket, bits, paths, str(bucket_dir), config.max_images_per_text, config.max_texts_per_image)
        for bucket in range(num_buckets)
    ]
    histogram: Counter[int] = Counter()
    totals: Counter[str] = Counter()
    with _progress(len(reduce_tasks), "filter pass 1/2: reduce", progress, "bucket") as bar:
        for result in imap(_reduce_bucket, reduce_tasks):
            histogram.update({int(k): v for k, v in result["histogram"].items()})
            totals.update({k: result[k] for k in ("distinct_ngrams", "distinct_texts", "distinct_images")})
            totals["distinct_pairs"] += result["distinct_pairs"]
            bar.update()
    vocab_size = scaled_vocab_size(pairs, config)
    threshold, quota = _vocab_cut(histogram, vocab_size)
    vocab_parts, bad_texts, bad_images = [], [], []
    for bucket in range(num_buckets):
        hashes, counts = _load_bucket(bucket_dir / f"ngrams_{bucket:05d}.npy", (2, 0))
        keep = counts > threshold
        ties = np.flatnonzero(counts == threshold)[:quota] if threshold else np.zeros(0, np.int64)
        keep[ties] = True
        quota -= len(ties)
        vocab_parts.append(hashes[keep & ((hashes & np.uint64(1)) == 0)])
        bad_texts.append(_load_bucket(bucket_dir / f"bad_texts_{bucket:05d}.npy", (0,)))
        bad_images.append(_load_bucket(bucket_dir / f"bad_images_{bucket:05d}.npy", (0,)))
    # Buckets are hash ranges in increasing order and each is sorted, so the concatenations are sorted.
    vocab = np.concatenate(vocab_parts)
    _save_npy(stats_dir / "vocab.npy", vocab)
    _save_npy(stats_dir / "bad_texts.npy", np.concatenate(bad_texts))
    _save_npy(stats_dir / "bad_images.npy", np.concatenate(bad_images))
    shutil.rmtree(bucket_dir, ignore_errors=True)
    stats = {
        "pairs": pairs,
        "vocab_size": vocab_size,
        "vocab_size_source": "config" if config.vocab_size is not None else "scaled",
        "distinct_ngrams": totals["distinct_ngrams"],
        "vocab_complete": threshold == 0,
        "vocab_count_threshold": threshold,
        "vocab_unigrams": len(vocab),
        "distinct_texts": totals["distinct_texts"],
        "distinct_images": totals["distinct_images"],
        "distinct_text_image_pairs": totals["distinct_pairs"],
        "texts_over_limit": int(sum(len(b) for b in bad_texts)),
        "images_over_limit": int(sum(len(b) for b in bad_images)),
        "unreadable_shards": unreadable,
        "spill_bytes": spill_bytes,
        "num_buckets": num_buckets,
        "pass1_shards_reused": sum(results[url]["reused"] for url in urls),
    }
    logger.info(
        "Pass 1: %d pairs in %d shards; V = %d (%s) of %d distinct n-grams, count threshold %d; "
        "%d texts shared by > %d images, %d images with > %d texts.",
        pairs,
        len(readable),
        vocab_size,
        stats["vocab_size_source"],
        stats["distinct_ngrams"],
        threshold,
        stats["texts_over_limit"],
        config.max_images_per_text,
        stats["images_over_limit"],
        config.max_texts_per_image,
    )
    return stats


_STATS_FILES = ("vocab.npy", "bad_texts.npy", "bad_images.npy")


def _load_or_compute_statistics(
    urls: Sequence[str],
    output: str,
    config: FilterConfig,
    work_dir: str,
    storage_options: Mapping[str, Any] | None,
    imap: _Map,
    progress: bool,
) -> tuple[dict[str, Any], str]:
    """Statistics saved under the output by an earlier run with the same inputs, or pass 1.

    Returns:
        The statistics (with their ``fingerprint``) and ``"reused"`` or ``"computed"``.
    """
    stats_config = {
        name: getattr(config, name)
        for name in ("max_texts_per_image", "max_images_per_text", "vocab_size", "vocab_per_pair", "min_vocab_size")
    }
    fingerprint = _fingerprint({"version": _FORMAT_VERSION, "urls": list(urls), "config": stats_config})
    saved_url = _join(output, _META_DIR, "stats")
    local = Path(work_dir, "stats")
    saved = _read_json(_join(saved_url, "stats.json"), storage_options)
    if saved is not None and saved.get("fingerprint") == fingerprint:
        fs, path = _fs(saved_url, storage_options)
        local.mkdir(parents=True, exist_ok=True)
        try:
            for name in _STATS_FILES:
                fs.get(_join(path, name), str(local / name))
        except FileNotFoundError:
            logger.warning("Saved statistics under %s are incomplete; recomputing them.", saved_url)
        else:
            logger.info("Pass 1 skipped: reusing the statistics saved under %s.", saved_url)
            return saved, "reused"
    stats = _compute_statistics(urls, config, work_dir, storage_options, imap, progress)
    stats["fingerprint"] = fingerprint
    if stats["unreadable_shards"]:
        logger.warning(
            "%d shard(s) could not be read in pass 1 (%s, ...): statistics are not saved for reuse and those "
            "shards are not filtered; rerun to retry them.",
            len(stats["unreadable_shards"]),
            stats["unreadable_shards"][0],
        )
    else:
        # stats.json last: it marks the arrays complete.
        for name in _STATS_FILES:
            _write_atomic(_join(saved_url, name), (local / name).read_bytes(), storage_options)
        _write_atomic(_join(saved_url, "stats.json"), json.dumps(stats, indent=1).encode(), storage_options)
    return stats, "computed"


# --------------------------------------------------------------------------------------------------
# Evaluation images


def _list_eval_images(folders: Sequence[str]) -> list[str]:
    files: list[str] = []
    for folder in folders:
        fs, root = fsspec.core.url_to_fs(folder)
        if not fs.isdir(root):
            raise ValueError(f"--exclude {folder!r} is not a folder: give a folder of evaluation images.")
        found = sorted(p for p in fs.find(root) if posixpath.splitext(p)[1].lower() in EVAL_IMAGE_EXTENSIONS)
        if not found:
            raise ValueError(f"No images ({', '.join(EVAL_IMAGE_EXTENSIONS)}) under --exclude folder {folder!r}.")
        is_local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        files.extend(found if is_local else [fs.unstrip_protocol(p) for p in found])
    return files


def _hash_eval_files(urls: Sequence[str]) -> list[tuple[str, int | None]]:
    results: list[tuple[str, int | None]] = []
    for url in urls:
        try:
            with fsspec.open(url, "rb") as stream:
                results.append((url, _image_phash(stream.read())))
        except Exception as err:  # an unreadable evaluation image is reported, not fatal
            logger.warning("Cannot hash evaluation image %s: %s", url, err)
            results.append((url, None))
    return results


def _hash_eval_images(
    folders: Sequence[str], work_dir: str, imap: _Map, progress: bool
) -> tuple[dict[str, Any], str | None]:
    """pHash every evaluation image; saves ``exclude.npy`` / ``exclude.json`` in ``work_dir``."""
    if not folders:
        return {"folders": [], "images": 0, "unreadable": []}, None
    files = _list_eval_images(folders)
    hashes: dict[str, int | None] = {}
    batches = [files[i : i + 64] for i in range(0, len(files), 64)]
    with _progress(len(files), "filter: hashing --exclude images", progress, "img") as bar:
        for batch in imap(_hash_eval_files, batches):
            hashes.update(batch)
            bar.update(len(batch))
    names = [url for url in files if hashes[url] is not None]
    array = np.array([hashes[url] for url in names], dtype=np.uint64)
    _save_npy(Path(work_dir, "exclude.npy"), array)
    Path(work_dir, "exclude.json").write_text(json.dumps(names))
    info = {
        "folders": list(folders),
        "images": len(names),
        "unreadable": [url for url in files if hashes[url] is None],
    }
    return info, _fingerprint({"names": names, "hashes": array.tolist()})


# --------------------------------------------------------------------------------------------------
# Pass 2: filtering


@dataclass(frozen=True)
class _Pass2Task:
    url: str
    output_url: str
    part_url: str
    fingerprint: str
    config: FilterConfig
    stats_dir: str
    vocab_complete: bool
    exclude_dir: str | None
    storage_options: Mapping[str, Any] | None


_ARRAYS: dict[str, Any] = {}


def _cached_load(path: str, loader: Callable[[str], Any]) -> Any:
    """Per-process cache (the arrays are memory-mapped: the workers share the page cache)."""
    if path not in _ARRAYS:
        _ARRAYS[path] = loader(path)
    return _ARRAYS[path]


def _load_npy(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _load_names(path: str) -> list[str]:
    return json.loads(Path(path).read_text())


def _first_failing_rule(
    sample: _Sample,
    config: FilterConfig,
    vocab: np.ndarray | None,
    bad_texts: np.ndarray,
    bad_images: np.ndarray,
) -> str | None:
    """The first of rules 1-6 (:data:`RULES`) that drops the sample, or ``None``."""
    short, long = min(sample.width, sample.height), max(sample.width, sample.height)
    if short <= config.min_image_side:
        return "image_size"
    if long / short >= config.max_aspect_ratio:
        return "aspect_ratio"
    if len(bad_images) and _contains(bad_images, np.array([_hash64(sample.image)], np.uint64))[0]:
        return "image_alt_texts"
    if len(bad_texts) and _contains(bad_texts, np.array([_hash64(sample.text.encode())], np.uint64))[0]:
        return "text_shared"
    if not config.min_unigrams <= len(sample.tokens) <= config.max_unigrams:
        return "unigram_count"
    if vocab is not None and sample.tokens and not _contains(vocab, _unigram_hashes(sample.tokens)).all():
        return "rare_token"
    return None


def _empty_counts() -> dict[str, Any]:
    return {
        "input": 0,
        "kept": 0,
        "dropped": dict.fromkeys(RULES, 0),
        "skipped": dict.fromkeys(SKIP_REASONS, 0),
    }


def _pass2_shard(task: _Pass2Task) -> dict[str, Any]:
    """Filter one shard into its output; write its report part (after the shard). Returns the part."""
    config = task.config
    stats_dir = Path(task.stats_dir)
    vocab = None if task.vocab_complete else _cached_load(str(stats_dir / "vocab.npy"), _load_npy)
    bad_texts = _cached_load(str(stats_dir / "bad_texts.npy"), _load_npy)
    bad_images = _cached_load(str(stats_dir / "bad_images.npy"), _load_npy)
    eval_hashes = eval_names = None
    if task.exclude_dir is not None:
        eval_hashes = _cached_load(os.path.join(task.exclude_dir, "exclude.npy"), _load_npy)
        eval_names = _cached_load(os.path.join(task.exclude_dir, "exclude.json"), _load_names)

    part_fs, part_path = _fs(task.part_url, task.storage_options)
    with contextlib.suppress(FileNotFoundError):
        part_fs.rm(part_path)  # a stale part must not mark the new shard done
    counts = _empty_counts()
    removed: list[dict[str, Any]] = []
    damage: list[str] = []
    unreadable = False
    writer = ShardWriter(task.output_url, max_samples=None, storage_options=task.storage_options)
    try:
        for item in iter_shard(task.url, task.storage_options, retries=_READ_RETRIES, backoff=_READ_BACKOFF):
            counts["input"] += 1
            if isinstance(item, ShardDamage):
                counts["skipped"][item.reason] += 1
                damage.append(f"{item.reason}: {item.message}")
                unreadable |= item.reason == "unreadable_shard"
                continue
            sample = _parse(item)
            if isinstance(sample, str):
                counts["skipped"][sample] += 1
                continue
            rule = _first_failing_rule(sample, config, vocab, bad_texts, bad_images)
            if rule is None and eval_hashes is not None and len(eval_hashes):
                try:
                    phash = _image_phash(sample.image)
                except Exception:  # the header parsed but the pixels do not decode
                    counts["skipped"]["corrupt_image"] += 1
                    continue
                distances = hamming_distances(eval_hashes, phash)
                nearest = int(np.argmin(distances))
                if distances[nearest] <= config.exclude_max_distance:
                    rule = "eval_near_duplicate"
                    removed.append(
                        {"key": item.key, "eval_file": eval_names[nearest], "distance": int(distances[nearest])}
                    )
            if rule is not None:
                counts["dropped"][rule] += 1
                continue
            writer.write(item.key, item.files)
            counts["kept"] += 1
    except BaseException:
        # ShardWriter.close() would move the partial shard into place: remove the temporary file instead.
        out_fs, out_path = _fs(task.output_url, task.storage_options)
        with contextlib.suppress(Exception):
            out_fs.rm(out_path + ".incomplete")
        raise
    part = {
        "shard": task.url,
        "output": task.output_url,
        "fingerprint": task.fingerprint,
        **counts,
        "removed_near_duplicates": removed,
        "damage": damage,
    }
    if unreadable:  # not marked done: a rerun retries it
        with contextlib.suppress(Exception):
            writer.close()
        return part | {"complete": False}
    if not writer.close():  # every sample dropped: still write the (empty) shard
        _write_atomic(task.output_url, _empty_tar(), task.storage_options)
    _write_atomic(task.part_url, json.dumps(part, indent=1).encode(), task.storage_options)
    return part | {"complete": True}


# --------------------------------------------------------------------------------------------------
# Orchestration


def _plan_outputs(urls: Sequence[str], output: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    names = [posixpath.basename(url.rstrip("/")) for url in urls]
    duplicates = [name for name, n in Counter(names).items() if n > 1]
    if duplicates:
        raise ValueError(
            f"Input shards must have distinct basenames (outputs are named after them); repeated: {duplicates[:5]}."
        )
    outputs = [_join(output, name) for name in names]
    out_fs, _ = _fs(output, storage_options)
    output_paths = {out_fs._strip_protocol(url) for url in outputs}
    for url in urls:
        fs, path = _fs(url, storage_options)
        if type(fs) is type(out_fs) and path in output_paths:
            raise ValueError(f"The output folder {output!r} holds the input shard {url!r}: choose another output.")
    return outputs


def _aggregate(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    totals = _empty_counts()
    for part in parts:
        totals["input"] += part["input"]
        totals["kept"] += part["kept"]
        for group in ("dropped", "skipped"):
            for name, value in part[group].items():
                totals[group][name] = totals[group].get(name, 0) + value
    return totals


def _rule_definitions(config: FilterConfig) -> dict[str, str]:
    return {
        "image_size": f"shorter image side <= {config.min_image_side} px (kept: > {config.min_image_side})",
        "aspect_ratio": f"max(w, h) / min(w, h) >= {config.max_aspect_ratio}",
        "image_alt_texts": f"image bytes with > {config.max_texts_per_image} distinct normalised alt-texts",
        "text_shared": f"normalised alt-text with > {config.max_images_per_text} distinct images",
        "unigram_count": f"< {config.min_unigrams} or > {config.max_unigrams} unigrams (\\w+ of the normalised text)",
        "rare_token": "a unigram outside the V most frequent unigrams+bigrams of the corpus",
        "eval_near_duplicate": f"pHash within Hamming distance {config.exclude_max_distance} of an --exclude image",
    }


@dataclass
class _Outcome:
    exclude_info: dict[str, Any]
    stats: dict[str, Any]
    pass1: str  # "computed" or "reused"
    parts: dict[str, dict[str, Any]]  # by input URL
    filtered: int
    resumed: int


def _run(
    urls: Sequence[str],
    outputs: Sequence[str],
    part_urls: Sequence[str],
    output: str,
    config: FilterConfig,
    exclude: Sequence[str],
    storage_options: Mapping[str, Any] | None,
    work: str,
    imap: _Map,
    progress: bool,
) -> _Outcome:
    """The stages of :func:`filter_shards`: evaluation hashes, statistics (pass 1), filtering (pass 2)."""
    exclude_info, exclude_fingerprint = _hash_eval_images(list(exclude), work, imap, progress)
    stats, pass1 = _load_or_compute_statistics(urls, output, config, work, storage_options, imap, progress)
    semantic_config = {k: v for k, v in dataclasses.asdict(config).items() if k != "num_buckets"}
    fingerprint = _fingerprint(
        {"stats": stats["fingerprint"], "config": semantic_config, "exclude": exclude_fingerprint}
    )
    unreadable = set(stats["unreadable_shards"])
    done = _done_parts(urls, outputs, part_urls, fingerprint, storage_options)
    parts: dict[str, dict[str, Any]] = dict(done)
    tasks = [
        _Pass2Task(
            url,
            out,
            part,
            fingerprint,
            config,
            str(Path(work, "stats")),
            bool(stats["vocab_complete"]),
            work if exclude_fingerprint else None,
            storage_options,
        )
        for url, out, part in zip(urls, outputs, part_urls, strict=True)
        if url not in done and url not in unreadable
    ]
    if done:
        logger.info("Resuming: %d of %d shard(s) already filtered.", len(done), len(urls))
    kept = sum(part["kept"] for part in done.values())
    with _progress(len(tasks), "filter pass 2/2: filtering", progress) as bar:
        for part in imap(_pass2_shard, tasks):
            parts[part["shard"]] = part
            kept += part["kept"]
            bar.update()
            bar.set_postfix(kept=kept, refresh=False)
    return _Outcome(exclude_info, stats, pass1, parts, filtered=len(tasks), resumed=len(done))


def filter_shards(
    input_urls: str | Sequence[str],
    output: str,
    config: FilterConfig = FilterConfig(),  # noqa: B008  (a frozen dataclass: an immutable default)
    workers: int = 1,
    exclude: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    work_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Apply ALIGN's filtering rules to webdataset shards (see the module docstring for the rules).

    Args:
        input_urls: Shard URLs, brace patterns allowed (``"s3://b/laion/{00000..00099}.tar"``; a list, or
            patterns joined with ``"::"``). Basenames must be distinct.
        output: Output folder or URL; receives ``<basename>`` per input shard, ``filter_report.json`` and
            ``_filter/`` (resume data: per-shard report parts, pass-1 statistics).
        config: Rule thresholds.
        workers: Processes working on shards in parallel (1: in this process).
        exclude: Folders (or fsspec URLs) of evaluation images, searched recursively (a Karpathy image
            root, an ImageFolder); near-duplicates of them are removed from the training data.
        storage_options: fsspec options for the input and output (not for ``exclude``: those use the
            environment's credentials).
        progress: Show tqdm progress bars.
        work_dir: Local scratch folder for pass 1 (about 16 bytes per n-gram occurrence and 32 per pair,
            less with repeated n-grams). ``None``: a temporary folder, deleted at the end. A given folder is
            kept, and a rerun with it reuses the per-shard pass-1 results found there.

    Returns:
        The report (also written to ``<output>/filter_report.json``): ``config``, ``rule_order``,
        ``rule_definitions``, ``statistics`` (corpus size, V, count threshold, ...), ``totals``
        (``input``, ``kept``, ``dropped`` per rule, ``skipped`` per reason), ``shards`` (the same per
        shard), ``removed_near_duplicates`` (shard, key, eval_file, distance), ``incomplete_shards``
        and ``run`` (timing and what was reused; the only part that differs between identical runs).

    Raises:
        ValueError: For bad arguments (no URLs, repeated basenames, output holding the inputs,
            ``memory://`` with several workers, an ``exclude`` folder without images).
    """
    started = time.perf_counter()
    _ARRAYS.clear()  # arrays cached by an earlier call may have been replaced on disk
    urls = expand_urls(input_urls)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    protocols = {_fs(u, storage_options)[0].protocol for u in [*urls, output]}
    if workers > 1 and any("memory" in (p if isinstance(p, tuple) else (p,)) for p in protocols):
        raise ValueError("memory:// lives in one process: use workers=1 with memory:// inputs or output.")
    outputs = _plan_outputs(urls, output, storage_options)
    part_urls = [_join(output, _META_DIR, "parts", posixpath.basename(out) + ".json") for out in outputs]
    logger.info("Filtering %d shard(s) into %s with %d worker(s).", len(urls), output, workers)

    own_work_dir = work_dir is None
    work = tempfile.mkdtemp(prefix="align-filter-") if own_work_dir else os.fspath(work_dir)
    os.makedirs(work, exist_ok=True)
    try:
        with _mapper(workers) as imap:
            outcome = _run(urls, outputs, part_urls, output, config, exclude, storage_options, work, imap, progress)
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)

    stats, parts = outcome.stats, outcome.parts
    for url in stats["unreadable_shards"]:
        counts = _empty_counts()
        counts["input"] = counts["skipped"]["unreadable_shard"] = 1
        parts[url] = {"shard": url, "output": None, **counts, "removed_near_duplicates": [], "complete": False}
    ordered = [parts[url] for url in urls]
    shard_rows = [
        {key: part[key] for key in ("shard", "output", "input", "kept", "dropped", "skipped")} for part in ordered
    ]
    report = {
        "tool": "align_lightning filter",
        "format_version": _FORMAT_VERSION,
        "output": output,
        "config": dataclasses.asdict(config),
        "rule_order": list(RULES),
        "rule_definitions": _rule_definitions(config),
        "statistics": {k: v for k, v in stats.items() if k not in ("fingerprint", "pass1_shards_reused")},
        "exclude": outcome.exclude_info,
        "totals": _aggregate(ordered),
        "shards": shard_rows,
        "removed_near_duplicates": [
            {"shard": part["shard"], **entry} for part in ordered for entry in part["removed_near_duplicates"]
        ],
        "incomplete_shards": [part["shard"] for part in ordered if part.get("complete") is False],
        "run": {
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.perf_counter() - started, 3),
            "workers": workers,
            "pass1": outcome.pass1,
            "pass1_shards_reused": stats.get("pass1_shards_reused", 0) if outcome.pass1 == "computed" else None,
            "shards_filtered": outcome.filtered,
            "shards_resumed": outcome.resumed,
        },
    }
    _write_atomic(_join(output, REPORT_NAME), json.dumps(report, indent=1).encode(), storage_options)
    totals = report["totals"]
    logger.info(
        "Kept %d of %d samples (%s); report: %s",
        totals["kept"],
        totals["input"],
        ", ".join(f"{rule} {n}" for rule, n in totals["dropped"].items() if n),
        _join(output, REPORT_NAME),
    )
    if report["incomplete_shards"]:
        logger.warning("%d shard(s) are incomplete (unreadable); rerun to retry.", len(report["incomplete_shards"]))
    return report


def _done_parts(
    urls: Sequence[str],
    outputs: Sequence[str],
    part_urls: Sequence[str],
    fingerprint: str,
    storage_options: Mapping[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """Parts of shards already filtered with this fingerprint whose output shard exists."""
    if not urls:
        return {}
    fs, _ = _fs(part_urls[0], storage_options)
    parts_dir = posixpath.dirname(_fs(part_urls[0], storage_options)[1])
    out_dir = posixpath.dirname(_fs(outputs[0], storage_options)[1])
    try:
        existing = set(fs.ls(parts_dir, detail=False)) | set(fs.ls(out_dir, detail=False))
    except FileNotFoundError:
        return {}
    existing = {fs._strip_protocol(p) for p in existing}
    candidates = [
        (url, _fs(part, storage_options)[1])
        for url, out, part in zip(urls, outputs, part_urls, strict=True)
        if _fs(part, storage_options)[1] in existing and _fs(out, storage_options)[1] in existing
    ]
    contents = fs.cat([path for _, path in candidates], on_error="return") if candidates else {}
    done = {}
    for url, path in candidates:
        data = contents.get(path)
        if isinstance(data, bytes):
            with contextlib.suppress(ValueError):
                part = json.loads(data)
                if part.get("fingerprint") == fingerprint and part.get("shard") == url:
                    done[url] = part
    return done


# --------------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` where there is a default worth showing (floats to 4 digits)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default is None
            or action.default is argparse.SUPPRESS
            or action.default is False
            or action.default == []
        ):
            return text
        default = f"{action.default:.4g}" if isinstance(action.default, float) else action.default
        return f"{text} (default: {default})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m align_lightning filter",
        description=(
            "ALIGN's noisy-data filtering (Jia et al. 2021) of img2dataset webdataset shards. Writes the kept "
            "samples, all members byte-identical, into one shard per input shard (same basename) under OUTPUT, "
            "and OUTPUT/filter_report.json with the counts per rule. Rules, in order (a sample is counted under "
            "the first that drops it): "
            + ", ".join(RULES)
            + ". Unusable records ("
            + ", ".join(SKIP_REASONS)
            + ") are dropped and counted. Two passes over the data: corpus statistics (alt-text sharing, "
            "n-gram frequencies), then filtering. Rerunning the same command resumes where it stopped."
        ),
        epilog=(
            "Example: python -m align_lightning filter '/data/cc3m/{00000..00331}.tar' --output /data/cc3m-filtered "
            "--workers 8 --exclude /data/flickr30k/images --exclude /data/coco/val2014"
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="SHARDS", help="input shard URLs, brace patterns allowed")
    parser.add_argument("-o", "--output", required=True, help="output folder or fsspec URL")
    parser.add_argument("-w", "--workers", type=int, default=1, help="parallel worker processes")
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="FOLDER",
        help="folder of evaluation images (recursive; repeatable): their near-duplicates are removed",
    )
    rules = parser.add_argument_group("rule thresholds (defaults: the ALIGN paper's)")
    for item in dataclasses.fields(FilterConfig):
        kind = {"int": int, "float": float, "int | None": int}[str(item.type)]
        rules.add_argument(
            "--" + item.name.replace("_", "-"), type=kind, default=item.default, help=item.metadata["help"]
        )
    parser.add_argument("--storage-options", default=None, help="JSON object of fsspec options for input and output")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="local scratch folder for pass 1, kept so that a rerun resumes pass 1 (default: a temporary folder)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level"
    )
    return parser


def _summary_table(report: Mapping[str, Any]) -> str:
    totals = report["totals"]
    total = max(totals["input"], 1)
    rows = [("input", totals["input"])]
    rows += [(f"dropped: {rule}", n) for rule, n in totals["dropped"].items()]
    rows += [(f"skipped: {reason}", n) for reason, n in totals["skipped"].items() if n]
    rows += [("kept", totals["kept"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':{width}}  {'samples':>12}  {'% input':>8}"]
    lines += [f"{name:{width}}  {n:>12,}  {100 * n / total:>7.2f}%" for name, n in rows]
    stats = report["statistics"]
    lines.append(f"V = {stats['vocab_size']:,} ({stats['vocab_size_source']}), corpus pairs = {stats['pairs']:,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m align_lightning filter``: parse ``argv`` (the arguments after ``filter``), filter, and
    print a summary table."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(args.log_level)
    try:
        config = FilterConfig(**{item.name: getattr(args, item.name) for item in dataclasses.fields(FilterConfig)})
        storage_options = json.loads(args.storage_options) if args.storage_options else None
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    try:
        report = filter_shards(
            args.inputs,
            args.output,
            config=config,
            workers=args.workers,
            exclude=args.exclude,
            storage_options=storage_options,
            progress=not args.no_progress,
            work_dir=args.work_dir,
        )
    except ValueError as err:
        parser.error(str(err))
    print(_summary_table(report))  # the CLI's result on stdout
