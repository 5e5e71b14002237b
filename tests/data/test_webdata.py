"""WebDataModule: exactly-once epochs, fsspec, skip-and-count of every corrupt-input kind, draft decoding."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from align_lightning.data import WebDataModule
from align_lightning.data.shards import SKIP_REASONS, ShardWriter, decode_image
from align_lightning.data.webdata import StreamJob, StreamPosition, _deal_units, _split_jobs
from tests.data.shard_utils import jpeg_bytes, sample_files, write_shards

COMMON = {"image_size": 16, "vocab_size": 200, "shuffle_buffer": 16, "batch_size": 8}


def _keys(dm: WebDataModule) -> Counter[str]:
    return Counter(key for batch in dm.train_dataloader() for key in batch["keys"])


@pytest.mark.parametrize(("shards", "ranks", "workers"), [(7, 2, 4), (3, 2, 4), (1, 2, 4), (2, 3, 6), (8, 4, 8)])
def test_deal_units_gives_every_record_one_owner(shards: int, ranks: int, workers: int) -> None:
    urls = [f"s{i}" for i in range(shards)]
    dealt = _deal_units(urls, ranks, workers)
    assert len(dealt) == workers
    assert all(dealt), "every worker gets a share"
    owners = Counter((url, r) for units in dealt for url, stride, phase in units for r in range(phase, 50, stride))
    assert set(owners) == {(u, r) for u in urls for r in range(50)}
    assert set(owners.values()) == {1}
    per_rank = [sum(len(d) for d in dealt[r * (workers // ranks) : (r + 1) * (workers // ranks)]) for r in range(ranks)]
    assert max(per_rank) - min(per_rank) <= 1, "ranks' shares differ by at most one unit"


def test_split_jobs_partitions_remaining_samples() -> None:
    jobs = [StreamJob(0, 2, 0, position=StreamPosition(1, 3, 0, 0), stride=3, phase=2), StreamJob(0, 2, 1)]

    def kept(job: StreamJob, n: int = 60) -> set[tuple[int, int]]:
        return {(job.worker, i) for i in range(n) if i % job.stride == job.phase}

    for workers in (1, 2, 3, 5):
        split = _split_jobs(jobs, workers)
        assert len(split) == workers
        pieces = [kept(job) for js in split for job in js]
        assert sum(len(p) for p in pieces) == len(set().union(*pieces))  # disjoint
        assert set().union(*pieces) == kept(jobs[0]) | kept(jobs[1])  # complete


@pytest.mark.parametrize(("num_workers", "num_shards"), [(0, 5), (2, 5), (2, 1)])
def test_one_epoch_sees_every_sample_exactly_once(tmp_path: Path, num_workers: int, num_shards: int) -> None:
    total = 50
    write_shards(str(tmp_path / "{:03d}.tar"), total, per_shard=-(-total // num_shards))
    dm = WebDataModule(str(tmp_path / f"{{000..{num_shards - 1:03d}}}.tar"), num_workers=num_workers, **COMMON)
    first, second = _keys(dm), _keys(dm)
    expected = Counter(f"{i:09d}" for i in range(total))
    assert first == expected
    assert second == expected
    assert dm.data_metrics()["data/samples"] == 2 * total


def test_epochs_reshuffle_and_are_reproducible(tmp_path: Path) -> None:
    write_shards(str(tmp_path / "{:03d}.tar"), 64, per_shard=16)

    def order(epoch: int) -> list[str]:
        dm = WebDataModule(str(tmp_path / "{000..003}.tar"), num_workers=0, **COMMON)
        dm.set_epoch(epoch)
        return [k for batch in dm.train_dataloader() for k in batch["keys"]]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != sorted(order(0))


def test_reads_memory_fsspec_shards_and_val_in_order() -> None:
    write_shards("memory://wds-test/train/{:02d}.tar", 40, per_shard=10)
    write_shards("memory://wds-test/val/{:02d}.tar", 12, per_shard=12)
    dm = WebDataModule(
        "memory://wds-test/train/{00..03}.tar", val_urls="memory://wds-test/val/00.tar", num_workers=0, **COMMON
    )
    assert sum(_keys(dm).values()) == 40
    val = [k for batch in dm.val_dataloader() for k in batch["keys"]]
    assert val == [f"{i:09d}" for i in range(12)]
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 16, 16)
    assert batch["input_ids"].dtype == torch.long
    assert set(batch) >= {"pixel_values", "input_ids", "attention_mask", "keys"}


def _write_corrupt_shard(url: str) -> dict[str, int]:
    """One shard with each corrupt-input kind once (plus valid samples); returns the expected skip counts."""
    with ShardWriter(url, max_samples=None) as writer:
        writer.write("000000000", sample_files(0))
        writer.write("000000001", {"jpg": b"\xff\xd8 this is not a jpeg", "txt": b"garbage image"})
        writer.write("000000002", {"jpg": jpeg_bytes(2)[:200], "txt": b"a truncated jpeg"})
        writer.write("000000003", {"jpg": jpeg_bytes(3), "txt": b"bad \xff\xfe utf-8"})
        writer.write("000000004", {"txt": b"caption without an image"})
        writer.write("000000005", {"jpg": jpeg_bytes(5)})
        writer.write("000000006", {"jpg": b"", "txt": b"zero-byte image"})
        writer.write("000000007", {"jpg": jpeg_bytes(7), "txt": b""})
        writer.write("000000008", sample_files(8))
        writer.write("000000009", sample_files(9))
    return {"corrupt_image": 2, "bad_caption": 1, "missing_image": 1, "missing_caption": 1, "empty_file": 2}


def test_every_corrupt_input_kind_is_skipped_and_counted(tmp_path: Path) -> None:
    expected = _write_corrupt_shard(str(tmp_path / "bad.tar"))
    good = write_shards(str(tmp_path / "good-{:02d}.tar"), 10, per_shard=10)
    # A tar that ends mid-record: the first two records survive, the third is lost and counted.
    with tarfile.open(good[0]) as tar:
        third_image = next(m for m in tar.getmembers() if m.name == "000000002.jpg")
    (tmp_path / "cut.tar").write_bytes(Path(good[0]).read_bytes()[: third_image.offset_data + 100])
    missing = str(tmp_path / "missing.tar")
    dm = WebDataModule(
        [str(tmp_path / "bad.tar"), str(tmp_path / "cut.tar"), missing],
        num_workers=0,
        shard_retries=1,
        retry_backoff=0.01,
        max_skip_fraction=1.0,
        tokenizer=None,
        **COMMON,
    )
    keys = _keys(dm)
    metrics = dm.data_metrics()
    assert set(keys) >= {"000000000", "000000008", "000000009"}
    for reason, count in expected.items():
        assert metrics[f"data/skipped/{reason}"] == count, reason
    assert metrics["data/skipped/truncated_shard"] == 1
    assert metrics["data/skipped/unreadable_shard"] == 1
    assert metrics["data/samples"] == 5  # 3 from bad.tar, 2 from cut.tar
    assert set(metrics) == {f"data/skipped/{r}" for r in SKIP_REASONS} | {"data/samples"}


def test_byte_by_byte_corruption_never_crashes_and_loses_nothing_uncounted(tmp_path: Path) -> None:
    """Flip every byte of a 2-sample shard in turn: each sample is delivered or counted as skipped."""
    url = str(tmp_path / "s.tar")
    with ShardWriter(url, max_samples=None) as writer:
        for i in range(2):
            writer.write(f"{i:09d}", {"jpg": jpeg_bytes(i, (8, 8)), "txt": b"a small square"})
    data = Path(url).read_bytes()
    dm = WebDataModule(url, num_workers=0, max_skip_fraction=1.0, shard_retries=0, **COMMON)
    loader = dm.train_dataloader()
    damaged = tmp_path / "damaged.tar"
    dm.train_urls[:] = loader.urls[:] = [str(damaged)]
    reasons: Counter[str] = Counter()
    for position in range(0, len(data) - 1024):  # the last 1 KiB is the end-of-archive padding
        corrupted = bytearray(data)
        corrupted[position] ^= 0xFF
        damaged.write_bytes(bytes(corrupted))
        before = dm.data_metrics()
        delivered = sum(len(batch["keys"]) for batch in loader)
        after = dm.data_metrics()
        skipped = {r: after[f"data/skipped/{r}"] - before[f"data/skipped/{r}"] for r in SKIP_REASONS}
        assert delivered + sum(skipped.values()) == 2, (position, skipped)
        reasons.update({r: n for r, n in skipped.items() if n})
    assert {"corrupt_image", "missing_image", "missing_caption"} <= set(reasons)


def test_unreadable_shard_is_fatal_when_strict(tmp_path: Path) -> None:
    write_shards(str(tmp_path / "{:02d}.tar"), 8, per_shard=8)
    dm = WebDataModule(
        str(tmp_path / "{00..01}.tar"), num_workers=0, strict_shards=True, shard_retries=1, retry_backoff=0.01, **COMMON
    )
    with pytest.raises(RuntimeError, match=r"01\.tar.*strict_shards=True"):
        _keys(dm)


def test_too_many_skipped_samples_abort_naming_the_worst_shard(tmp_path: Path) -> None:
    _write_corrupt_shard(str(tmp_path / "bad.tar"))
    write_shards(str(tmp_path / "good-{:02d}.tar"), 20, per_shard=20)
    dm = WebDataModule(
        [str(tmp_path / "good-00.tar"), str(tmp_path / "bad.tar")],
        num_workers=0,
        max_skip_fraction=0.1,
        skip_check_after=10,
        shuffle_shards=False,
        **COMMON,
    )
    with pytest.raises(RuntimeError, match=r"max_skip_fraction=0\.1.*bad\.tar \(7\)"):
        _keys(dm)


def test_resampled_epochs_have_exactly_the_requested_batches(tmp_path: Path) -> None:
    write_shards(str(tmp_path / "{:02d}.tar"), 30, per_shard=10)
    dm = WebDataModule(str(tmp_path / "{00..02}.tar"), num_workers=2, resampled=True, samples_per_epoch=100, **COMMON)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == 100 // 8 == len(batches)
    assert all(len(b["keys"]) == 8 for b in batches)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        WebDataModule(str(tmp_path / "00.tar"), resampled=True, **COMMON)


def test_draft_decoding_keeps_at_least_the_requested_side() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (1024, 768), (10, 200, 30)).save(buffer, "JPEG")
    full = decode_image(buffer.getvalue())
    drafted = decode_image(buffer.getvalue(), min_side=173)
    assert full.size == (1024, 768)
    assert drafted.size == (256, 192)  # 1/4 scale: the largest reduction keeping the short side >= 173
    assert decode_image(buffer.getvalue(), min_side=500).size == (1024, 768)  # 1/2 would be < 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_keys(rank: int, world: int, port: int, pattern: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for equal_steps in (False, True):
            # Workers forked, not spawned (the default inside a spawned process) to keep the test fast.
            dm = WebDataModule(
                pattern, num_workers=2, equal_steps=equal_steps, multiprocessing_context="fork", **COMMON
            )
            batches = [batch["keys"] for batch in dm.train_dataloader()]
            Path(out, f"rank{rank}-{equal_steps}.txt").write_text("\n".join(",".join(keys) for keys in batches))
        # Prediction (no per-step collective): every rank reads its whole share, even with equal_steps.
        dm = WebDataModule(val_urls=pattern, num_workers=2, multiprocessing_context="fork", **COMMON)
        batches = [batch["keys"] for batch in dm.predict_dataloader()]
        Path(out, f"rank{rank}-predict.txt").write_text("\n".join(",".join(keys) for keys in batches))
    finally:
        dist.destroy_process_group()


def test_two_ranks_two_workers_see_every_sample_exactly_once(tmp_path: Path) -> None:
    total = 90  # 7 shards of up to 13 samples: unequal shares across 4 global workers
    write_shards(str(tmp_path / "{:02d}.tar"), total, per_shard=13)
    pattern = str(tmp_path / "{00..06}.tar")
    mp.spawn(_rank_keys, args=(2, _free_port(), pattern, str(tmp_path)), nprocs=2)
    batches = [
        line.split(",") for r in range(2) for line in (tmp_path / f"rank{r}-False.txt").read_text().splitlines() if line
    ]
    seen = Counter(key for keys in batches for key in keys)
    assert seen == Counter(f"{i:09d}" for i in range(total))

    predicted = [
        key
        for r in range(2)
        for line in (tmp_path / f"rank{r}-predict.txt").read_text().split()
        for key in line.split(",")
    ]
    assert Counter(predicted) == Counter(f"{i:09d}" for i in range(total))

    # With equal_steps (training), both ranks take the same number of steps and no key repeats.
    per_rank = [(tmp_path / f"rank{r}-True.txt").read_text().splitlines() for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen = Counter(key for lines in per_rank for line in lines for key in line.split(","))
    assert max(seen.values()) == 1


class _FlakyFile(io.BytesIO):
    """A file whose reads fail once with a connection error after ``fail_after`` bytes."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)


def test_failed_opens_and_broken_reads_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from align_lightning.data import shards

    url = write_shards(str(tmp_path / "{:02d}.tar"), 12, per_shard=12)[0]
    data = Path(url).read_bytes()
    attempts: list[str] = []

    class _Opener:
        def __init__(self, path: str, mode: str, **options: object) -> None:
            self.path = path

        def open(self) -> io.BytesIO:
            attempts.append(self.path)
            if len(attempts) == 1:
                raise TimeoutError("network timeout")  # the first open fails
            if len(attempts) == 2:
                return _FlakyFile(data, fail_after=len(data) // 2)  # the second breaks mid-shard
            return io.BytesIO(data)

    monkeypatch.setattr(shards.fsspec, "open", _Opener)
    keys = [record.key for record in shards.iter_shard(url, retries=2, backoff=0.01)]
    assert keys == [f"{i:09d}" for i in range(12)]  # every record once, in order
    assert len(attempts) == 3


def test_prefetch_factor_reaches_the_dataloader(tmp_path: Path) -> None:
    """Huge batches (align_base_1gpu.yaml) bound host memory with one batch in flight per worker."""
    write_shards(str(tmp_path / "{:02d}.tar"), 20, per_shard=10)
    dm = WebDataModule(str(tmp_path / "{00..01}.tar"), num_workers=1, prefetch_factor=1, **COMMON)
    assert dm._make_loader(dm.train_urls, True).prefetch_factor == 1
    assert sum(len(b["keys"]) for b in dm.train_dataloader()) == 20
    without_workers = WebDataModule(str(tmp_path / "{00..01}.tar"), num_workers=0, prefetch_factor=1, **COMMON)
    assert without_workers._make_loader(without_workers.train_urls, True).prefetch_factor is None
    with pytest.raises(ValueError, match="prefetch_factor"):
        WebDataModule(str(tmp_path / "00.tar"), prefetch_factor=0, **COMMON)
