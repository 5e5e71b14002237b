"""Training on img2dataset webdataset shards: exactly-once epochs, exact mid-epoch resume, skip-and-count.

How samples flow, and why it is built this way (rather than on the ``webdataset`` library, whose
generator pipelines cannot save or restore their position):

* **Streams.** For each epoch the shard list is shuffled (seeded by ``(seed, epoch)``) and dealt
  round-robin to the ``W = world_size x num_workers`` global dataloader workers. With fewer shards
  than workers, each shard is split into interleaved record subsets (every k-th record), so every
  sample still belongs to exactly one worker. Worker ``g``'s shards, read in order, are its
  *stream*; the stream is shuffled in consecutive windows of ``shuffle_buffer`` records, each
  permuted with an RNG seeded by ``(seed, epoch, W, g, window)``. A stream is therefore a pure
  function of the data and these numbers.
* **Positions.** A position in a stream is ``(window, offset in window, shard, record)``: four
  integers that are enough to re-read the window and continue after the last sample used. Each
  batch carries its worker's position after the batch; the DataModule records it when Lightning
  is about to train on that batch (so batches prefetched but never trained on are not counted),
  and saves every worker's position in the checkpoint.
* **Resume.** Restarted with the same ranks and workers, each worker continues its own stream
  from its position: the rest of the epoch is exactly the uninterrupted run's, in the same order.
  With a different number of workers or ranks, the unfinished streams are dealt to the new
  workers (split into interleaved subsets when there are fewer streams than workers): exactly the
  unseen samples, in a different order.
* **Skip and count.** Damaged shards, corrupt images, bad captions and incomplete records are
  dropped where they are found and counted per reason and per shard; the counts travel with the
  batches, are summed over ranks, logged as ``data/skipped/<reason>`` and checked against
  ``max_skip_fraction``.
* **Equal steps.** Under DDP every rank must take the same number of steps. In resampled mode each
  rank yields exactly ``samples_per_epoch // (world_size x batch_size)`` full batches. In
  exactly-once mode the ranks' shares differ by a few samples, so the ranks agree at each step
  (one small all-reduce, which also sums the skip counts) and end the epoch together when the
  first runs out; the others' last few samples are left for this epoch (logged).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from align_lightning.data._ranks import rank_and_world
from align_lightning.data.collate import ImageTextCollator
from align_lightning.data.shards import (
    SKIP_REASONS,
    RawRecord,
    ShardDamage,
    SkippedSample,
    check_record,
    decode_caption,
    decode_image,
    expand_urls,
    iter_shard,
)
from align_lightning.data.tokenizer import iter_captions, load_tokenizer, train_wordpiece
from align_lightning.data.transforms import ALIGN_RESIZE_RATIO, image_transform

__all__ = ["StreamJob", "StreamPosition", "WebDataModule", "WebStreamDataset"]

logger = logging.getLogger(__name__)

#: Batch key of the data-position metadata; removed before the batch reaches the model.
STATE_KEY = "_data_state"
_STATE_VERSION = 1


@dataclass(frozen=True)
class StreamPosition:
    """A position in a worker's sample stream.

    Attributes:
        window: Index of the current shuffle window.
        offset: Samples of that window already emitted.
        unit: Index (in the stream's shard list) of the window's first record's shard.
        record: Index of the window's first record within that shard's share.
    """

    window: int = 0
    offset: int = 0
    unit: int = 0
    record: int = 0


@dataclass(frozen=True)
class StreamJob:
    """A share of one deterministic sample stream: the samples a dataloader worker has to deliver.

    Attributes:
        epoch: The epoch whose shard permutation defines the stream.
        plan_workers: Number of global workers ``W`` of the plan that defined the stream.
        worker: The stream's index ``g`` in that plan.
        restart: Incremented when a resampled epoch is resumed with another layout (fresh streams).
        plan_ranks: Number of ranks of that plan (shards are dealt to ranks first, then to workers).
        position: Where to continue.
        stride: Keep every ``stride``-th sample from ``position`` on ...
        phase: ... starting with the ``phase``-th.
    """

    epoch: int
    plan_workers: int
    worker: int
    restart: int = 0
    plan_ranks: int = 1
    position: StreamPosition = StreamPosition()
    stride: int = 1
    phase: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StreamJob:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "position": StreamPosition(**data["position"])})


def _split_jobs(jobs: Sequence[StreamJob], workers: int) -> list[list[StreamJob]]:
    """Deal jobs to ``workers`` workers so that every sample has exactly one owner."""
    if not jobs:
        return [[] for _ in range(workers)]
    if len(jobs) < workers:
        k = math.ceil(workers / len(jobs))
        jobs = [replace(job, stride=job.stride * k, phase=job.phase + j * job.stride) for j in range(k) for job in jobs]
    return [list(jobs[g::workers]) for g in range(workers)]


def _deal_units(urls: Sequence[str], ranks: int, workers: int) -> list[list[tuple[str, int, int]]]:
    """Deal one epoch's shards, as ``(url, stride, phase)`` units, to ``workers`` global workers.

    Shards go round-robin to ranks first, then to the workers of each rank, so that ranks' shares
    differ by at most one shard. With fewer shards than workers each shard is split into ``k``
    interleaved record subsets (every k-th record), so that every worker has data.
    """
    units = [(url, 1, 0) for url in urls]
    if 0 < len(urls) < workers:
        k = math.ceil(workers / len(urls))
        units = [(url, k, j) for j in range(k) for url in urls]
    per_rank = workers // ranks
    dealt: list[list[tuple[str, int, int]]] = [[] for _ in range(workers)]
    for i, unit in enumerate(units):
        dealt[(i % ranks) * per_rank + (i // ranks) % per_rank].append(unit)
    return dealt


@dataclass(frozen=True)
class _StreamConfig:
    urls: tuple[str, ...]
    seed: int
    shuffle: bool
    window: int
    resampled: bool
    storage_options: Mapping[str, Any]
    retries: int
    backoff: float


class _StreamReader:
    """Reads the records of stream jobs (runs inside a dataloader worker)."""

    def __init__(self, config: _StreamConfig) -> None:
        self.config = config
        self.damage: list[ShardDamage] = []
        self._units_cache: dict[tuple[int, int, int], list[tuple[str, int, int]]] = {}

    def _unit(self, job: StreamJob, index: int) -> tuple[str, int, int] | None:
        config = self.config
        if config.resampled:
            # Shard draws with replacement; draw `index` is a pure function of the stream and index.
            rng = np.random.default_rng([config.seed, job.epoch, job.plan_workers, job.worker, job.restart, index])
            return config.urls[int(rng.integers(len(config.urls)))], 1, 0
        key = (job.epoch, job.plan_workers, job.worker)
        if key not in self._units_cache:
            urls = list(config.urls)
            if config.shuffle:
                order = np.random.default_rng([config.seed, job.epoch]).permutation(len(urls))
                urls = [urls[i] for i in order]
            self._units_cache[key] = _deal_units(urls, job.plan_ranks, job.plan_workers)[job.worker]
        units = self._units_cache[key]
        return units[index] if index < len(units) else None

    def _records(self, job: StreamJob, unit: int, record: int) -> Iterator[tuple[RawRecord, tuple[int, int]]]:
        """The stream's records from ``(unit, record)`` on, each with the cursor just after it."""
        for u in itertools.count(unit):
            spec = self._unit(job, u)
            if spec is None:
                return
            url, stride, phase = spec
            start = record if u == unit else 0
            for item in iter_shard(
                url,
                self.config.storage_options,
                retries=self.config.retries,
                backoff=self.config.backoff,
                skip=phase + start * stride,
            ):
                if isinstance(item, ShardDamage):
                    self.damage.append(item)
                elif (item.index - phase) % stride == 0:
                    yield item, (u, (item.index - phase) // stride + 1)

    def _emit(self, job: StreamJob) -> Iterator[tuple[RawRecord, StreamPosition]]:
        """The stream's samples in shuffled order from ``job.position``, each with the position after it."""
        size = self.config.window if self.config.shuffle else 1
        window, offset, unit, record = (
            job.position.window,
            job.position.offset,
            job.position.unit,
            job.position.record,
        )
        records = self._records(job, unit, record)
        while True:
            chunk = list(itertools.islice(records, size))
            if not chunk:
                return
            order = np.arange(len(chunk))
            if self.config.shuffle:
                seed = [self.config.seed, job.epoch, job.plan_workers, job.worker, job.restart, window]
                order = np.random.default_rng(seed).permutation(len(chunk))
            end_unit, end_record = chunk[-1][1]
            for j in range(offset, len(chunk)):
                after = (
                    StreamPosition(window, j + 1, unit, record)
                    if j + 1 < len(chunk)
                    else StreamPosition(window + 1, 0, end_unit, end_record)
                )
                yield chunk[order[j]][0], after
            window, offset, unit, record = window + 1, 0, end_unit, end_record

    def samples(self, job: StreamJob) -> Iterator[tuple[RawRecord, StreamJob]]:
        """The job's samples, each with the job that remains after it."""
        for relative, (sample, after) in enumerate(self._emit(job)):
            if relative % job.stride == job.phase:
                # The next kept sample is `stride` further: `stride - 1` after the one just taken.
                yield sample, replace(job, position=after, phase=job.stride - 1)


class WebStreamDataset(IterableDataset):
    """Batches of ``pixel_values``, ``input_ids``, ``attention_mask`` and ``keys`` from shards.

    Usually built by :class:`WebDataModule`; each dataloader worker delivers the stream jobs of
    its global worker index (``rank x num_workers + worker id``). Batches are assembled in the
    workers (tokenisation included); each carries ``STATE_KEY`` metadata: the worker's remaining
    jobs, skip counts since its previous batch, and a fatal error when ``strict_shards`` fails.

    Args:
        config: Stream settings shared by all workers.
        jobs: Jobs per global worker.
        quotas: Batches per global worker (resampled mode), or ``None`` to run jobs to their end.
        rank: This process's global rank.
        num_workers: Dataloader workers per rank (0 counts as 1).
        batch_size: Samples per batch.
        transform: PIL image -> float tensor.
        collator: Tokenising collator.
        draft_side: Shorter side JPEG draft decoding may reduce to (``None``: full decode).
        drop_last: Drop each worker's final partial batch.
        strict_shards: An unreadable shard is fatal instead of skipped.
        slot_offset: Dataloader worker ``i`` serves the jobs of local slot ``(i + slot_offset) % num_workers``.
    """

    def __init__(
        self,
        config: _StreamConfig,
        jobs: Sequence[Sequence[StreamJob]],
        quotas: Sequence[int] | None,
        rank: int,
        num_workers: int,
        batch_size: int,
        transform: Any,
        collator: ImageTextCollator,
        draft_side: int | None,
        drop_last: bool = False,
        strict_shards: bool = False,
        slot_offset: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        self.jobs = [list(j) for j in jobs]
        self.quotas = None if quotas is None else list(quotas)
        self.rank = rank
        self.num_workers = max(num_workers, 1)
        self.batch_size = batch_size
        self.transform = transform
        self.collator = collator
        self.draft_side = draft_side
        self.drop_last = drop_last
        self.strict_shards = strict_shards
        self.slot_offset = slot_offset

    def _decode(self, record: RawRecord) -> tuple[Tensor, str] | str:
        checked = check_record(record)
        if isinstance(checked, SkippedSample):
            return checked.reason
        _, image_bytes, caption_bytes = checked
        try:
            caption = decode_caption(caption_bytes)
        except UnicodeDecodeError:
            return "bad_caption"
        if not caption.strip():
            return "bad_caption"
        try:
            pixels = self.transform(decode_image(image_bytes, self.draft_side))
        except Exception:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... on bad bytes
            return "corrupt_image"
        return pixels, caption

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # Rotating the slots makes the dataloader's round-robin over workers continue with the slot
        # whose turn was next when the position was saved (same batch order after a resume).
        local = ((info.id if info is not None else 0) + self.slot_offset) % self.num_workers
        worker = self.rank * self.num_workers + local
        jobs = list(self.jobs[worker])
        quota = None if self.quotas is None else self.quotas[worker]
        reader = _StreamReader(self.config)
        samples: list[tuple[Tensor, str]] = []
        keys: list[str] = []
        skipped: Counter[str] = Counter()
        shard_skips: Counter[str] = Counter()

        def batch(remaining: list[StreamJob], fatal: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if samples:
                out = self.collator(samples)
                out["keys"] = list(keys)
            out[STATE_KEY] = {
                "worker": worker,
                "jobs": [job.to_dict() for job in remaining],
                "quota": quota,
                "samples": len(samples),
                "skipped": dict(skipped),
                "shard_skips": dict(shard_skips),
                "fatal": fatal,
            }
            samples.clear()
            keys.clear()
            skipped.clear()
            shard_skips.clear()
            return out

        def take_damage() -> str | None:
            for damage in reader.damage:
                skipped[damage.reason] += 1
                shard_skips[damage.shard] += 1
                if damage.reason == "unreadable_shard":
                    if self.strict_shards:
                        return (
                            f"{damage.message} (strict_shards=True). Fix the URL or the storage, "
                            "or set strict_shards=False to skip unreadable shards."
                        )
                    logger.warning("Skipping shard: %s", damage.message)
            reader.damage.clear()
            return None

        while jobs and (quota is None or quota > 0):
            job = jobs[0]
            for record, remaining_job in reader.samples(job):
                fatal = take_damage()
                if fatal is not None:
                    yield batch(jobs, fatal)
                    return
                decoded = self._decode(record)
                if isinstance(decoded, str):
                    skipped[decoded] += 1
                    shard_skips[record.shard] += 1
                else:
                    samples.append(decoded)
                    keys.append(record.key)
                jobs[0] = remaining_job
                if len(samples) == self.batch_size:
                    if quota is not None:
                        quota -= 1
                    yield batch(jobs)
                    if quota is not None and quota <= 0:
                        return
            fatal = take_damage()
            if fatal is not None:
                yield batch(jobs, fatal)
                return
            jobs.pop(0)
            if not jobs and self.config.resampled:
                raise RuntimeError("A resampled stream ended: the shard list is empty or every shard is unreadable.")
        if samples and not self.drop_last:
            yield batch(jobs)


class _SyncedBatches:
    """The train/val dataloader seen by Lightning: counts, checks and keeps ranks in step."""

    def __init__(self, datamodule: WebDataModule, urls: Sequence[str], training: bool, synced: bool = True) -> None:
        self.datamodule = datamodule
        self.urls = list(urls)
        self.training = training
        self.synced = synced  # keep ranks in step (equal_steps); predict does not need it
        self.length = datamodule._length(training)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("This stream has no known length (exactly-once mode without samples_per_epoch).")
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.datamodule
        world = dm._world_size() if dm.equal_steps and self.synced else 1
        device = dm._sync_device()
        iterator = iter(dm._make_loader(self.urls, self.training))
        while True:
            batch = next(iterator, None)
            state = batch[STATE_KEY] if batch is not None else None
            counts = [0.0] * (3 + len(SKIP_REASONS))
            if state is not None:
                counts[0] = 1.0
                counts[1] = 1.0 if state["fatal"] else 0.0
                counts[2] = float(state["samples"])
                for i, reason in enumerate(SKIP_REASONS):
                    counts[3 + i] = float(state["skipped"].get(reason, 0))
                if self.training:
                    dm._shard_skips.update(state["shard_skips"])
            if world > 1:
                vector = torch.tensor(counts, dtype=torch.float64, device=device)
                dist.all_reduce(vector)
                counts = vector.tolist()
            if counts[1]:
                message = state["fatal"] if state is not None and state["fatal"] else "a shard on another rank failed"
                raise RuntimeError(f"Stopping: {message}")
            if self.training:  # the counters describe the training stream
                dm._samples_seen += int(counts[2])
                for i, reason in enumerate(SKIP_REASONS):
                    dm._skipped[reason] += int(counts[3 + i])
                dm._check_skip_fraction()
            if counts[0] < world:  # some rank (maybe this one) has run out: all end the epoch here
                if self.training:
                    dm._log_data_metrics(epoch_end=True)
                if batch is not None and "keys" in batch:
                    logger.info(
                        "Rank %d ends the epoch with data left (another rank ran out first); "
                        "its remaining samples of this epoch are not used.",
                        dm._rank(),
                    )
                return
            if "keys" not in batch:  # metadata only (a worker's last skip counts): nothing to train on
                dm._commit(batch.pop(STATE_KEY), training=self.training)
                continue
            if not self.training or dm.trainer is None:
                dm._commit(batch.pop(STATE_KEY), training=self.training)
            yield batch
            if self.training:
                dm._log_data_metrics()


class WebDataModule(L.LightningDataModule):
    """Image/alt-text pairs from img2dataset webdataset shards on any fsspec storage.

    Reads img2dataset's output unchanged (``{key}.jpg|png|webp``, ``{key}.txt``, optional
    ``{key}.json`` per sample) from brace-expanded URLs on local disk, ``s3://``, ``gs://``,
    ``https://`` or any other fsspec protocol (``storage_options`` are passed through). See the
    module docstring for how epochs, shuffling, resuming and skipping work.

    Args:
        train_urls: Training shards (``"/data/cc3m/{00000..00331}.tar"``, a ``::``-joined string,
            or a list).
        val_urls: Optional held-out shards for validation (and test/predict), read in order.
        tokenizer: A Hugging Face tokenizer name or folder (e.g. written by
            ``python -m align_lightning tokenizer``); ``None`` learns a WordPiece vocabulary of
            ``vocab_size`` from the first ``tokenizer_samples`` training captions.
        vocab_size: Size of the learned vocabulary when ``tokenizer`` is ``None``.
        tokenizer_samples: Captions read to learn the vocabulary.
        max_length: Maximum tokens per caption (ALIGN: 64).
        pad_to_max_length: Pad every batch to ``max_length`` (static shapes).
        image_size: Crop side (ALIGN: 289).
        resize_size: Resize side before cropping; default ``round(image_size * 346 / 289)``.
        normalize: ``"align"`` (pixels in [-1, 1]), ``"imagenet"``, ``"clip"`` or ``(mean, std)``.
        hflip: Random horizontal flip in training.
        draft_decode: Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 size when the result is
            still at least ``resize_size`` (several times faster on web-sized images).
        batch_size: Samples per batch per rank.
        num_workers: Dataloader worker processes per rank.
        shuffle_buffer: Records per shuffle window (memory: this many encoded samples per worker).
        shuffle_shards: Shuffle the shard order each epoch.
        resampled: Draw shards with replacement as an endless stream; ``samples_per_epoch``
            defines the epoch and every rank takes exactly the same number of full batches.
        samples_per_epoch: Resampled mode: samples per epoch over all ranks (required). Exactly-once
            mode: optional, the corpus size, used only to estimate the run's length for
            learning-rate schedules (:meth:`estimated_batches_per_epoch`).
        drop_last: Drop each worker's final partial batch (exactly-once mode).
        equal_steps: Under DDP, keep ranks in step (one small all-reduce per batch; it also sums the
            skip counts over ranks). Required for training; turn it off only for consumers that
            need no collective per batch (e.g. writing embeddings), where every rank then reads
            its whole share.
        storage_options: fsspec options (credentials, endpoints).
        strict_shards: Fail the run when a shard cannot be opened, instead of skipping it.
        shard_retries: Retries (exponential backoff) for opening or re-reading a shard.
        retry_backoff: Seconds before the first retry.
        max_skip_fraction: Abort when more than this fraction of the samples read was skipped ...
        skip_check_after: ... once at least this many samples have been read.
        pin_memory: Pin batches in page-locked memory (for GPU training).
        prefetch_factor: Batches each worker prepares ahead (PyTorch's default, 2, when ``None``);
            1 bounds host memory for huge batches (a batch of 16,384 pairs at 289 px is 16 GiB of
            float32 pixels: ``recipes/align_base_1gpu.yaml``). Ignored without workers.
        multiprocessing_context: Start method of the dataloader workers (``"fork"``, ``"spawn"``,
            ``"forkserver"``); ``None`` uses the process's default (``"spawn"`` inside processes
            started with ``spawn``, e.g. ``ddp_spawn``, where each worker then re-imports torch).
        seed: Seed of shard order, shuffling and resampling.
        name: Dataset name in metric keys (``val/<name>/i2t_R@1``).
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 30522,
        tokenizer_samples: int = 100_000,
        max_length: int = 64,
        pad_to_max_length: bool = False,
        image_size: int = 289,
        resize_size: int | None = None,
        normalize: Literal["align", "imagenet", "clip"] | tuple[list[float], list[float]] = "align",
        hflip: bool = True,
        draft_decode: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        drop_last: bool = False,
        equal_steps: bool = True,
        storage_options: dict[str, Any] | None = None,
        strict_shards: bool = False,
        shard_retries: int = 3,
        retry_backoff: float = 1.0,
        max_skip_fraction: float = 0.05,
        skip_check_after: int = 1000,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
        seed: int = 0,
        name: str = "web",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if train_urls is None and val_urls is None:
            raise ValueError("WebDataModule needs train_urls, val_urls or both.")
        if resampled and not samples_per_epoch:
            raise ValueError(
                "resampled=True draws an endless stream: set samples_per_epoch (samples per epoch over all ranks)."
            )
        if batch_size < 1 or shuffle_buffer < 1 or num_workers < 0:
            raise ValueError(
                f"Need batch_size >= 1, shuffle_buffer >= 1 and num_workers >= 0; got {batch_size}, "
                f"{shuffle_buffer}, {num_workers}."
            )
        if prefetch_factor is not None and prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1 (batches per worker), got {prefetch_factor}.")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}.")
        self.train_urls = expand_urls(train_urls) if train_urls is not None else []
        self.val_urls = expand_urls(val_urls) if val_urls is not None else []
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.name = name
        self.image_size = image_size
        self.resize_size = resize_size if resize_size is not None else round(image_size * ALIGN_RESIZE_RATIO)
        self.normalize = normalize
        self.hflip = hflip
        self.draft_decode = draft_decode
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.drop_last = drop_last
        self.equal_steps = equal_steps
        self.storage_options = dict(storage_options or {})
        self.strict_shards = strict_shards
        self.shard_retries = shard_retries
        self.retry_backoff = retry_backoff
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_after = skip_check_after
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.seed = seed
        if tokenizer is None:
            source = self.train_urls or self.val_urls
            captions = iter_captions(
                source,
                storage_options=self.storage_options,
                max_samples=tokenizer_samples,
                retries=shard_retries,
                backoff=retry_backoff,
            )
            self.tokenizer = train_wordpiece(
                captions,
                vocab_size=vocab_size,
                max_length=max_length,
            )
        else:
            self.tokenizer = load_tokenizer(tokenizer, max_length=max_length)
        self.collator = ImageTextCollator(self.tokenizer, max_length=max_length, pad_to_max_length=pad_to_max_length)
        # Training position (see the module docstring) and data-quality counters.
        self._epoch: int | None = None
        self._jobs: dict[int, list[StreamJob]] = {}
        self._quotas: dict[int, int | None] = {}
        self._batches = 0
        self._restored: dict[str, Any] | None = None
        self._samples_seen = 0
        self._skipped: Counter[str] = Counter()
        self._shard_skips: Counter[str] = Counter()
        self._last_logged_step = -1
        self._next_epoch = 0
        self._last_slot: int | None = None

    # ----------------------------------------------------------------------------- helpers
    def _rank(self) -> int:
        return rank_and_world(self)[0]

    def _world_size(self) -> int:
        return rank_and_world(self)[1]

    def _sync_device(self) -> torch.device:
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _stream_config(self, urls: Sequence[str], train: bool) -> _StreamConfig:
        return _StreamConfig(
            urls=tuple(urls),
            seed=self.seed,
            shuffle=train,
            window=self.shuffle_buffer,
            resampled=self.resampled and train,
            storage_options=self.storage_options,
            retries=self.shard_retries,
            backoff=self.retry_backoff,
        )

    def _batches_per_rank(self) -> int:
        assert self.samples_per_epoch is not None
        batches = self.samples_per_epoch // (self._world_size() * self.batch_size)
        if batches < 1:
            raise ValueError(
                f"samples_per_epoch={self.samples_per_epoch} is less than one batch per rank "
                f"({self._world_size()} ranks x batch_size {self.batch_size})."
            )
        return batches

    def _plan(self, epoch: int) -> tuple[list[list[StreamJob]], list[int] | None]:
        """Jobs (and resampled quotas) per global worker for ``epoch``, continuing a restored position."""
        world, workers = self._world_size(), max(self.num_workers, 1)
        total = world * workers
        restored, self._restored = self._restored, None
        if restored is not None and restored["epoch"] != epoch:
            restored = None
        if self.resampled:
            remaining = self._batches_per_rank() - (restored["batches"] if restored else 0)
            if restored is not None and restored["layout"] == [world, workers]:
                jobs = [[StreamJob.from_dict(j) for j in js] for js in restored["jobs"]]
                return jobs, list(restored["quotas"])
            restart = restored["restart"] + 1 if restored is not None else 0
            jobs = [[StreamJob(epoch, total, g, restart, plan_ranks=world)] for g in range(total)]
            quotas = [remaining // workers + (g % workers < remaining % workers) for g in range(total)]
            return jobs, quotas
        if restored is None:
            return [[StreamJob(epoch, total, g, plan_ranks=world)] for g in range(total)], None
        saved = [[StreamJob.from_dict(j) for j in js] for js in restored["jobs"]]
        if restored["layout"] == [world, workers]:
            return saved, None
        logger.info(
            "Resuming epoch %d with %d ranks x %d workers instead of %s: the unseen samples are redistributed.",
            epoch,
            world,
            workers,
            " x ".join(map(str, restored["layout"])),
        )
        return _split_jobs([job for js in saved for job in js], total), None

    def _length(self, train: bool) -> int | None:
        """Batches per rank per epoch, told to Lightning only when exact (resampled mode).

        An exactly-once epoch's batch count depends on how many samples turn out corrupt, and
        Lightning runs the end-of-epoch validation at the reported length: an estimate that is too
        high would skip it, one too low would cut the epoch. See :meth:`estimated_batches_per_epoch`.
        """
        return self._batches_per_rank() if train and self.resampled else None

    def estimated_batches_per_epoch(self) -> int | None:
        """Training batches per rank per epoch: exact when resampled, else from ``samples_per_epoch``
        (each worker may add one partial batch), else ``None`` (unknown).

        :class:`~align_lightning.module.ALIGNModule` uses it to length its learning-rate schedule.
        """
        if self.resampled:
            return self._batches_per_rank()
        if not self.samples_per_epoch:
            return None
        batches = self.samples_per_epoch / (self._world_size() * self.batch_size)
        return math.floor(batches) if self.drop_last else math.ceil(batches)

    def _make_loader(self, urls: Sequence[str], train: bool) -> DataLoader:
        """A fresh DataLoader for one pass: its workers receive this epoch's plan (and a restored position)."""
        world, workers = self._world_size(), max(self.num_workers, 1)
        rank = self._rank()
        if train:
            if self.trainer is not None:
                epoch = self.trainer.current_epoch
            else:  # used without Lightning: one epoch per pass, unless set_epoch says otherwise
                epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
            restored = self._restored
            slot_offset = 0
            if restored is None or restored["epoch"] != epoch:
                self._batches, self._last_slot = 0, None
            elif restored["layout"] == [world, workers]:
                self._last_slot = restored["last_slots"][rank]
                slot_offset = 0 if self._last_slot is None else (self._last_slot + 1) % workers
            else:
                self._last_slot = None
            jobs, quotas = self._plan(epoch)
            self._epoch = epoch
            own = range(rank * workers, (rank + 1) * workers)
            self._jobs = {g: jobs[g] for g in own}
            self._quotas = {g: (quotas[g] if quotas is not None else None) for g in own}
        else:
            total, slot_offset = world * workers, 0
            jobs, quotas = [[StreamJob(0, total, g, plan_ranks=world)] for g in range(total)], None
        transform = image_transform(
            self.image_size, train=train, resize_size=self.resize_size, normalize=self.normalize, hflip=self.hflip
        )
        dataset = WebStreamDataset(
            self._stream_config(urls, train),
            jobs,
            quotas,
            rank=rank,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            transform=transform,
            collator=self.collator,
            draft_side=self.resize_size if self.draft_decode else None,
            drop_last=self.drop_last and train,
            strict_shards=self.strict_shards,
            slot_offset=slot_offset,
        )
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            multiprocessing_context=self.multiprocessing_context if self.num_workers > 0 else None,
            # Workers start per pass, so each epoch's plan travels with them (no shared state to update).
            persistent_workers=False,
        )

    def _commit(self, state: Mapping[str, Any], training: bool) -> None:
        """Record a worker's position once Lightning is about to train on its batch."""
        if not training:
            return
        self._jobs[state["worker"]] = [StreamJob.from_dict(j) for j in state["jobs"]]
        self._quotas[state["worker"]] = state["quota"]
        self._last_slot = state["worker"] % max(self.num_workers, 1)
        if state["samples"]:
            self._batches += 1

    def _check_skip_fraction(self) -> None:
        skipped = sum(n for reason, n in self._skipped.items() if reason != "unreadable_shard")
        read = skipped + self._samples_seen
        if read < max(self.skip_check_after, 1) or skipped <= self.max_skip_fraction * read:
            return
        worst = ", ".join(f"{url} ({n})" for url, n in self._shard_skips.most_common(5)) or "none on this rank"
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self._skipped.most_common() if n)
        raise RuntimeError(
            f"{skipped} of {read} samples read were skipped ({skipped / read:.1%} > max_skip_fraction="
            f"{self.max_skip_fraction}): {reasons}. Worst shards on rank {self._rank()}: {worst}. Check or re-create "
            "these shards (e.g. rerun img2dataset for them), or raise max_skip_fraction to accept the loss."
        )

    def set_epoch(self, epoch: int) -> None:
        """Outside a Lightning Trainer: the epoch of the next pass over ``train_dataloader()``."""
        self._next_epoch = epoch

    def data_metrics(self) -> dict[str, float]:
        """Training-stream counters of this run, summed over ranks: ``data/skipped/<reason>`` and
        ``data/samples`` (samples delivered in batches)."""
        metrics = {f"data/skipped/{reason}": float(self._skipped[reason]) for reason in SKIP_REASONS}
        metrics["data/samples"] = float(self._samples_seen)
        return metrics

    def _log_data_metrics(self, epoch_end: bool = False) -> None:
        """Log the skip counters every ``log_every_n_steps`` steps and at each epoch's end (rank 0 writes)."""
        trainer = self.trainer
        if trainer is None or not trainer.loggers or trainer.global_step == self._last_logged_step:
            return
        if trainer.global_step % max(trainer.log_every_n_steps, 1) and not epoch_end:
            return
        self._last_logged_step = trainer.global_step
        for lightning_logger in trainer.loggers:
            lightning_logger.log_metrics(self.data_metrics(), step=trainer.global_step)

    # ----------------------------------------------------------------------------- Lightning API
    def train_dataloader(self) -> _SyncedBatches:
        """The training stream of this rank (an iterable of batch dicts; see the class docstring)."""
        if not self.train_urls:
            raise ValueError("No train_urls given to WebDataModule.")
        return _SyncedBatches(self, self.train_urls, training=True)

    def val_dataloader(self) -> _SyncedBatches | list:
        """The held-out shards in order, center-cropped (none when ``val_urls`` is not set)."""
        return _SyncedBatches(self, self.val_urls, training=False) if self.val_urls else []

    def test_dataloader(self) -> _SyncedBatches | list:
        """Same as :meth:`val_dataloader`."""
        return self.val_dataloader()

    def predict_dataloader(self) -> _SyncedBatches | list:
        """The held-out shards as :meth:`val_dataloader` (batches carry their sample ``keys``), but every rank
        reads its whole share: prediction has no per-step collective, so ranks need not stay in step (with
        ``equal_steps`` the ranks would stop when the first runs out, leaving the others' last samples out)."""
        return _SyncedBatches(self, self.val_urls, training=False, synced=False) if self.val_urls else []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Commit the data position of the batch Lightning is about to use, and strip the metadata."""
        if isinstance(batch, dict) and STATE_KEY in batch:
            self._commit(batch.pop(STATE_KEY), training=self.trainer is not None and self.trainer.training)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training position of every worker of every rank (a collective under DDP) and the skip counts."""
        world, workers = self._world_size(), max(self.num_workers, 1)
        local = {g: [job.to_dict() for job in jobs] for g, jobs in self._jobs.items()}
        quotas = dict(self._quotas)
        last_slots = [self._last_slot]
        if world > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (local, quotas, self._last_slot))
            for other_jobs, other_quotas, _ in gathered:
                local.update(other_jobs)
                quotas.update(other_quotas)
            last_slots = [slot for _, _, slot in gathered]
        if self._epoch is None:
            return {"version": _STATE_VERSION, "epoch": None}
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "layout": [world, workers],
            "batches": self._batches,
            "restart": max((j.restart for js in self._jobs.values() for j in js), default=0),
            "jobs": [local.get(g, []) for g in range(world * workers)],
            "quotas": [quotas.get(g) for g in range(world * workers)],
            "last_slots": last_slots,
            "samples": self._samples_seen,
            "skipped": dict(self._skipped),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position at the next ``train_dataloader`` call of the same epoch."""
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"Unknown WebDataModule state version {state_dict.get('version')!r}.")
        if state_dict["epoch"] is None:
            return
        self._restored = dict(state_dict)
        self._batches = state_dict["batches"]
        self._epoch = self._next_epoch = state_dict["epoch"]
        self._samples_seen = state_dict["samples"]
        self._skipped = Counter(state_dict["skipped"])
