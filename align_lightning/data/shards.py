"""img2dataset's webdataset shards: brace-expanded URLs, fsspec I/O, fault-tolerant record reading, writing.

A shard is a tar holding, per sample, ``{key}.jpg`` (or ``.jpeg``/``.png``/``.webp``), ``{key}.txt``
(the alt-text, UTF-8) and optionally ``{key}.json`` (metadata). Members of one sample are consecutive
in the tar; a sample's key is its member path up to the first dot of the file name (webdataset's
convention), its extension the rest, lower-cased.

Everything here is careful about bad input: a shard that cannot be opened is retried with
exponential backoff; a tar that ends mid-record yields the complete records before the damage and
one :class:`ShardDamage`; a read that fails mid-stream (network drop) is resumed by reopening the
shard and skipping the records already delivered.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import fsspec
from braceexpand import braceexpand
from PIL import Image

__all__ = [
    "CAPTION_EXTENSION",
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "RawRecord",
    "ShardDamage",
    "ShardUnavailableError",
    "ShardWriter",
    "SkippedSample",
    "check_record",
    "decode_caption",
    "decode_image",
    "expand_urls",
    "iter_shard",
    "open_shard",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"

#: Why a sample can be skipped; each is logged as ``data/skipped/<reason>``.
SKIP_REASONS: tuple[str, ...] = (
    "corrupt_image",  # the image bytes do not decode (truncated, garbage, unsupported)
    "bad_caption",  # the alt-text is not valid UTF-8
    "missing_image",  # a record without an image member
    "missing_caption",  # a record without a .txt member
    "empty_file",  # a zero-byte image or caption
    "truncated_shard",  # a tar that ends (or breaks) mid-record: the record in progress is lost
    "unreadable_shard",  # a shard that could not be opened after all retries (counted once per shard)
)


@dataclass(frozen=True)
class RawRecord:
    """The undecoded members of one sample.

    Attributes:
        key: The sample's key (``"000001234"``, or with the member's folder: ``"part1/000001234"``).
        files: Member bytes by lower-case extension (``{"jpg": b"...", "txt": b"...", "json": b"..."}``).
        shard: URL of the shard it came from.
        index: Position of the record in its shard (0-based, counting every record).
    """

    key: str
    files: Mapping[str, bytes]
    shard: str
    index: int


@dataclass(frozen=True)
class ShardDamage:
    """Marks where a shard stopped yielding records: a damaged or truncated tar, or a failed open.

    Attributes:
        shard: The shard's URL.
        reason: ``"truncated_shard"`` or ``"unreadable_shard"``.
        message: The underlying error.
    """

    shard: str
    reason: str
    message: str


@dataclass(frozen=True)
class SkippedSample:
    """A record that was dropped, and why (one of :data:`SKIP_REASONS`)."""

    shard: str
    key: str
    reason: str


class ShardUnavailableError(OSError):
    """A shard could not be opened after all retries."""


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand shard URLs in brace notation.

    Args:
        urls: One pattern (``"s3://bucket/laion/{00000..41455}.tar"``; several may be joined with
            ``"::"``) or a list of patterns.

    Returns:
        The URLs, in order (zero padding of ranges is kept).

    Raises:
        ValueError: If the patterns expand to nothing.
    """
    patterns = urls.split("::") if isinstance(urls, str) else list(urls)
    expanded = [url for pattern in patterns if pattern.strip() for url in braceexpand(pattern.strip())]
    if not expanded:
        raise ValueError(f"No shard URLs in {urls!r}: give a path or URL such as '/data/cc3m/{{00000..00331}}.tar'.")
    return expanded


def open_shard(
    url: str, storage_options: Mapping[str, Any] | None = None, retries: int = 3, backoff: float = 1.0
) -> IO[bytes]:
    """Open a shard for streaming reads through fsspec, retrying failures with exponential backoff.

    Args:
        url: Any fsspec URL (``/local/path.tar``, ``file://``, ``s3://``, ``gs://``, ``https://``, ``memory://``).
        storage_options: Passed to the fsspec filesystem (credentials, endpoint, ...).
        retries: Attempts after the first one.
        backoff: Seconds before the first retry; doubled after each.

    Raises:
        ValueError: For a URL whose protocol fsspec does not know (a configuration error: not retried).
        ImportError: When the protocol needs a package that is not installed (e.g. ``s3fs``).
        ShardUnavailableError: When every attempt failed.
    """
    options = dict(storage_options or {})
    error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            return fsspec.open(url, "rb", **options).open()
        except (ValueError, ImportError):
            raise
        except Exception as err:  # network and storage errors vary by backend: retry them all
            error = err
            logger.debug("Opening shard %s failed (attempt %d/%d): %s", url, attempt + 1, retries + 1, err)
    raise ShardUnavailableError(f"Cannot open shard {url} after {retries + 1} attempts: {error}") from error


def _split_member_name(name: str) -> tuple[str, str] | None:
    folder, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, extension = base.split(".", 1)
    return posixpath.join(folder, stem) if folder else stem, extension.lower()


def _iter_tar(stream: IO[bytes], url: str, skip: int) -> Iterator[RawRecord]:
    """Records of one opened tar, from record ``skip`` on; tar errors propagate."""
    index = 0
    key: str | None = None
    files: dict[str, bytes] = {}
    # ignore_zeros: a damaged member header is skipped (its member is lost) and reading resyncs at the
    # next valid header, instead of tarfile silently ending the archive there.
    with tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True) as tar:
        for member in tar:
            if not member.isfile():
                continue
            split = _split_member_name(member.name)
            if split is None:
                continue
            member_key, extension = split
            if member_key != key:
                if key is not None:
                    if index >= skip:
                        yield RawRecord(key, files, url, index)
                    index += 1
                key, files = member_key, {}
            extracted = tar.extractfile(member)
            # Skipped records are still read (a tar stream has no index), but their bytes are not kept.
            data = extracted.read() if extracted is not None else b""
            files[extension] = data if index >= skip else b""
    if key is not None and index >= skip:
        yield RawRecord(key, files, url, index)


def iter_shard(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    skip: int = 0,
) -> Iterator[RawRecord | ShardDamage]:
    """Stream a shard's records; never raises for bad data or unavailable storage.

    Configuration errors still raise (from :func:`open_shard`): a ``ValueError`` for a protocol
    fsspec does not know and an ``ImportError`` when its package (e.g. ``s3fs``) is missing.

    Yields every complete record in order, then, if the shard is damaged or cannot be opened, one
    :class:`ShardDamage` (the record in progress when a tar breaks is lost with it). A read that
    fails mid-stream with an I/O error (a dropped connection) is retried by reopening the shard and
    skipping the records already yielded.

    Args:
        url: The shard's fsspec URL.
        storage_options: Passed to fsspec.
        retries: Retries for opening and for resuming after an I/O error.
        backoff: Seconds before the first retry; doubled after each.
        skip: Start at this record index (the records before are read but not yielded).
    """
    delivered = skip
    last_error: OSError | None = None
    for attempt in range(retries + 1):
        try:
            stream = open_shard(url, storage_options, retries=retries if attempt == 0 else 0, backoff=backoff)
        except ShardUnavailableError as err:
            yield ShardDamage(url, "unreadable_shard", str(err))
            return
        try:
            with stream:
                for record in _iter_tar(stream, url, delivered):
                    yield record
                    delivered = record.index + 1
            return
        except (tarfile.TarError, EOFError, UnicodeDecodeError) as err:
            yield ShardDamage(url, "truncated_shard", f"{type(err).__name__}: {err}")
            return
        except OSError as err:  # the connection broke: reopen and continue after the last record
            logger.warning("Reading shard %s failed after record %d (%s); reopening.", url, delivered - 1, err)
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
            last_error = err
    yield ShardDamage(url, "truncated_shard", f"I/O error after {retries + 1} attempts: {last_error}")


def check_record(record: RawRecord) -> tuple[str, bytes, bytes] | SkippedSample:
    """Find a record's image and caption members.

    Returns:
        ``(image_extension, image_bytes, caption_bytes)``, or the :class:`SkippedSample` saying what
        is missing or empty.
    """
    image_extension = next((ext for ext in IMAGE_EXTENSIONS if ext in record.files), None)
    if image_extension is None:
        return SkippedSample(record.shard, record.key, "missing_image")
    if CAPTION_EXTENSION not in record.files:
        return SkippedSample(record.shard, record.key, "missing_caption")
    image, caption = record.files[image_extension], record.files[CAPTION_EXTENSION]
    if not image or not caption:
        return SkippedSample(record.shard, record.key, "empty_file")
    return image_extension, image, caption


def decode_caption(data: bytes) -> str:
    """Decode an alt-text (strict UTF-8; a leading byte-order mark is dropped).

    Raises:
        UnicodeDecodeError: For bytes that are not UTF-8.
    """
    return data.decode("utf-8-sig")


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode an image to RGB, letting libjpeg downscale large JPEGs while decoding.

    JPEG decoding can produce 1/2, 1/4 or 1/8 of the full size directly from the DCT coefficients
    (PIL's ``draft``), several times faster than decoding everything and resizing. The reduction is
    chosen so that the shorter side stays at least ``min_side``, so the following resize still
    down-samples (no quality lost where it matters).

    Args:
        data: Encoded image bytes.
        min_side: The shorter side the caller will resize to; ``None`` decodes at full size.

    Raises:
        OSError, ValueError, SyntaxError, Image.DecompressionBombError: For bytes that do not
            decode into an image (PIL raises several types).
    """
    image = Image.open(io.BytesIO(data))
    if min_side is not None and image.format in ("JPEG", "MPO"):  # MPO: phones' multi-picture JPEGs
        width, height = image.size
        scale = min_side / min(width, height)
        if scale < 0.5:
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    return image.convert("RGB")  # forces the full decode, so damage surfaces here


class ShardWriter:
    """Write samples as img2dataset-format tar shards through fsspec.

    Each shard is written under a temporary name and moved into place when complete, so an
    interrupted writer never leaves a truncated shard behind under its final name (leaving the
    ``with`` block by an exception deletes the shard in progress).

    Args:
        pattern: Output URL pattern with one ``{}``-style field for the shard number
            (``"out/{:05d}.tar"``), or a single URL when ``max_samples`` is ``None``.
        max_samples: Samples per shard (img2dataset's default is 10,000); ``None`` for one shard.
        storage_options: Passed to fsspec.
        start: Number of the first shard.

    Example:
        >>> with ShardWriter("/tmp/out/{:05d}.tar", max_samples=1000) as writer:  # doctest: +SKIP
        ...     writer.write("000000000", {"jpg": jpeg_bytes, "txt": b"a dog"})
    """

    def __init__(
        self,
        pattern: str,
        max_samples: int | None = 10_000,
        storage_options: Mapping[str, Any] | None = None,
        start: int = 0,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be positive or None, got {max_samples}.")
        self.pattern = pattern
        self.max_samples = max_samples
        self.storage_options = dict(storage_options or {})
        self.shard_number = start
        self.urls: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._stream: IO[bytes] | None = None
        self._url = ""
        self._count = 0

    def _open(self) -> None:
        self._url = self.pattern.format(self.shard_number) if self.max_samples is not None else self.pattern
        self.shard_number += 1
        fs, path = fsspec.core.url_to_fs(self._url, **self.storage_options)
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        self._stream = fs.open(path + ".incomplete", "wb")
        self._tar = tarfile.open(fileobj=self._stream, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = 0

    def _finish(self) -> None:
        if self._tar is None or self._stream is None:
            return
        self._tar.close()
        self._stream.close()
        fs, path = fsspec.core.url_to_fs(self._url, **self.storage_options)
        fs.mv(path + ".incomplete", path)
        self.urls.append(self._url)
        self._tar = self._stream = None

    def write(self, key: str, files: Mapping[str, bytes]) -> None:
        """Append one sample: ``files`` maps an extension (``"jpg"``, ``"txt"``, ``"json"``) to its bytes."""
        if "." in posixpath.basename(key) or not key:
            raise ValueError(f"Sample keys must be non-empty and have no dot in the file name, got {key!r}.")
        if self._tar is None or (self.max_samples is not None and self._count >= self.max_samples):
            self._finish()
            self._open()
        assert self._tar is not None
        for extension, data in files.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def write_all(self, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
        """Write every ``(key, files)`` pair."""
        for key, files in samples:
            self.write(key, files)

    def close(self) -> list[str]:
        """Finish the last shard. Returns the URLs of all shards written."""
        self._finish()
        return self.urls

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Delete the shard in progress (its ``.incomplete`` file); finished shards stay."""
        if self._tar is None or self._stream is None:
            return
        self._stream.close()
        fs, path = fsspec.core.url_to_fs(self._url, **self.storage_options)
        fs.rm(path + ".incomplete")
        self._tar = self._stream = None
