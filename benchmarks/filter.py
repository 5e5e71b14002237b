"""Throughput of ``python -m align_lightning filter`` (ALIGN's filtering) on local webdataset shards.

What it measures: pairs/s of :func:`align_lightning.data.filtering.filter_shards` (both passes: corpus
statistics, then filtering and writing the kept samples) over generated img2dataset-format shards of
realistic JPEGs (smooth gradients plus sensor-like noise, quality 90: 500x375 about 70 KiB, 1024x768
about 280 KiB; a few small and banner-shaped ones) with web-like alt-texts (natural captions drawn from a
Zipf vocabulary, boilerplate shared by many images, camera file names, SEO keyword lists, typos), once
without and once with ``--exclude`` (a folder of evaluation images, some of them resized PNG copies of
training images: pixels are decoded for every surviving sample).

Peer: there is no other ALIGN filter tool to compare with, so the reference is the raw cost of
reading the same shards with the same number of processes (``iter_shard`` over every record, nothing
else). The tool reads everything twice (two passes), so ``filter / read`` near 0.5 would mean the rules
themselves cost nothing. The shards are in the page cache (just written), so this is CPU cost, not
disk or network I/O.

Run from the repository root::

    python benchmarks/filter.py                                  # 2,400 pairs in 8 shards, all cores
    python benchmarks/filter.py --samples 400 --shards 2 --no-record   # smoke test

Generated shards are cached in ``--cache-dir`` (keyed by the generation settings), so a rerun only
measures. It prints a table and appends it, with the date, hardware, versions and command, to
``benchmarks/RESULTS.md`` (``--no-record`` skips that).
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import PIL
from _results import RESULTS, append_entry, cpu_name, git_commit, memory_gib
from _synthetic import WORDS
from PIL import Image, ImageDraw

from align_lightning.data.filtering import RULES, FilterConfig, filter_shards
from align_lightning.data.shards import RawRecord, ShardWriter, iter_shard

SEED = 0
NOISE_SHAPE = (800, 1100, 3)
BOILERPLATE = (
    "click to enlarge",
    "image may contain: person, outdoor",
    "Product Image",
    "thumbnail",
    "no image available",
    "Loading...",
)


# --------------------------------------------------------------------------------------------------
# Data generation


def _image(width: int, height: int, rng: np.random.Generator, noise: np.ndarray) -> bytes:
    """A JPEG (quality 90): a colour gradient, a few random shapes (so that perceptual hashes of different
    images differ as photos' do), plus a window of a fixed noise field."""
    x = np.arange(width, dtype=np.float32)[None, :, None]
    y = np.arange(height, dtype=np.float32)[:, None, None]
    base = (x * rng.uniform(0.05, 0.4) + y * rng.uniform(0.05, 0.4) + rng.uniform(0, 255, 3).astype(np.float32)) % 256
    oy, ox = rng.integers(0, noise.shape[0] - height + 1), rng.integers(0, noise.shape[1] - width + 1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [
            x0,
            y0,
            x0 + int(rng.integers(width // 10, width // 2)),
            y0 + int(rng.integers(height // 10, height // 2)),
        ]
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    window = noise[oy : oy + height, ox : ox + width]
    pixels = np.clip(np.asarray(image, dtype=np.int16) + window, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _caption(rng: np.random.Generator) -> str:
    """A web-like alt-text; the mix decides which rules see work."""
    zipf = np.minimum(rng.zipf(1.3, 40), len(WORDS)) - 1
    natural = " ".join(WORDS[i] for i in zipf[: rng.integers(3, 14)])
    kind = rng.random()
    if kind < 0.62:
        return natural.capitalize()
    if kind < 0.72:
        return str(rng.choice(BOILERPLATE))
    if kind < 0.79:
        return f"DSC_{rng.integers(0, 10**4):04d}.JPG"
    if kind < 0.86:
        return ", ".join(WORDS[i] for i in zipf[: rng.integers(22, 40)])  # SEO keyword list
    typo = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(6, 11))))
    return f"{natural} {typo}"  # a rare token


def _size(rng: np.random.Generator) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.72:
        return (500, 375) if rng.random() < 0.8 else (375, 500)
    if kind < 0.92:
        return 1024, 768
    if kind < 0.96:
        return 180, 150  # too small
    return 1000, 250  # banner: aspect ratio 4


def _write_shard(task: tuple[str, int, int]) -> list[tuple[str, bytes]]:
    """Write shard ``number`` with ``count`` samples; returns (key, jpeg) of a few for evaluation copies."""
    url, number, count = task
    rng = np.random.default_rng([SEED, number])
    noise = np.random.default_rng([SEED, 10**6 + number]).normal(0, 12, NOISE_SHAPE).astype(np.int16)
    picked: list[tuple[str, bytes]] = []
    with ShardWriter(url, max_samples=None) as writer:
        for i in range(count):
            key = f"{number:05d}{i:04d}"
            width, height = _size(rng)
            image = _image(width, height, rng, noise)
            caption = _caption(rng)
            meta = f'{{"key": "{key}", "width": {width}, "height": {height}, "caption": null}}'.encode()
            writer.write(key, {"jpg": image, "txt": caption.encode(), "json": meta})
            if i % 50 == 7 and (width, height) == (500, 375):
                picked.append((key, image))
    return picked


def generate(folder: Path, samples: int, shards: int, eval_copies: int, workers: int) -> tuple[list[str], Path]:
    """Write the shards and an evaluation folder (unless cached); returns the shard URLs and that folder."""
    done = folder / "done"
    urls = [str(folder / "shards" / f"{n:05d}.tar") for n in range(shards)]
    eval_dir = folder / "eval"
    if done.exists():
        return urls, eval_dir
    shutil.rmtree(folder, ignore_errors=True)
    counts = [samples // shards + (n < samples % shards) for n in range(shards)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        picked = [p for part in pool.map(_write_shard, zip(urls, range(shards), counts, strict=True)) for p in part]
    # Evaluation images: half-size PNG copies of a few training images (near-duplicates to remove) and
    # as many unrelated images.
    (eval_dir / "copies").mkdir(parents=True)
    (eval_dir / "unrelated" / "class_a").mkdir(parents=True)
    for key, jpeg in picked[:eval_copies]:
        image = Image.open(io.BytesIO(jpeg))
        image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC).save(
            eval_dir / "copies" / f"{key}.png"
        )
    rng = np.random.default_rng([SEED, 99])
    noise = rng.normal(0, 12, NOISE_SHAPE).astype(np.int16)
    for i in range(eval_copies):
        (eval_dir / "unrelated" / "class_a" / f"{i}.jpg").write_bytes(_image(500, 375, rng, noise))
    done.write_text("ok")
    return urls, eval_dir


# --------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Run:
    mode: str
    seconds: float
    pairs: int
    report: dict[str, Any] | None = None


def _read_shard(url: str) -> tuple[int, int]:
    records = size = 0
    for item in iter_shard(url):
        if isinstance(item, RawRecord):
            records += 1
            size += sum(len(data) for data in item.files.values())
    return records, size


def run_read(urls: list[str], workers: int) -> Run:
    """The reference: read every record of every shard (``iter_shard``), ``workers`` processes."""
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(_read_shard, urls, chunksize=1)
    return Run("read only (iter_shard)", time.perf_counter() - start, sum(r for r, _ in results))


def run_filter(urls: list[str], workers: int, config: FilterConfig, exclude: list[str]) -> Run:
    with tempfile.TemporaryDirectory(prefix="align-filter-bench-") as out:
        start = time.perf_counter()
        report = filter_shards(urls, out, config=config, workers=workers, exclude=exclude, progress=False)
        seconds = time.perf_counter() - start
    mode = f"filter --exclude ({report['exclude']['images']} eval images)" if exclude else "filter"
    return Run(mode, seconds, report["totals"]["input"], report)


def environment(workers: int) -> list[str]:
    """Markdown bullet lines: hardware and versions."""
    return [
        f"- Hardware: {cpu_name()}, {os.cpu_count()} cores (nproc), "
        f"{memory_gib():.0f} GiB RAM; {workers} worker processes; CPU only",
        f"- Versions: Python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
        f"fsspec {fsspec.__version__}, align_lightning commit {git_commit()}",
    ]


def results_table(runs: list[Run]) -> list[str]:
    read = [r for r in runs if r.report is None]
    reference = min(r.seconds for r in read) if read else None
    rows = ["| mode | pairs | wall s | pairs/s | vs read only | kept |", "|---|---|---|---|---|---|"]
    for run in runs:
        ratio = f"{reference / run.seconds:.3f}" if reference else "-"
        kept = f"{run.report['totals']['kept']:,}" if run.report else "-"
        rows.append(
            f"| {run.mode} | {run.pairs:,} | {run.seconds:.2f} | {run.pairs / run.seconds:,.1f} | {ratio} | {kept} |"
        )
    return rows


def drops_line(report: dict[str, Any]) -> str:
    totals = report["totals"]
    dropped = ", ".join(f"{rule} {totals['dropped'][rule]}" for rule in RULES)
    skipped = sum(totals["skipped"].values())
    stats = report["statistics"]
    return (
        f"- Filter result (with --exclude): input {totals['input']}, kept {totals['kept']}; dropped: {dropped}; "
        f"skipped {skipped}; V = {stats['vocab_size']} of {stats['distinct_ngrams']} distinct n-grams"
    )


def near_duplicates_line(report: dict[str, Any], copies: int) -> str:
    """How many removals hit a planted copy (the evaluation file is named after the training key)."""
    removed = report["removed_near_duplicates"]
    planted = sum(Path(entry["eval_file"]).stem == entry["key"] for entry in removed)
    return (
        f"near-duplicates removed {len(removed)}: {planted} of the {copies} planted copies (the others' samples are "
        f"dropped by an earlier rule), {len(removed) - planted} other matches"
    )


def record(rows: list[str], notes: list[str], workers: int) -> None:
    append_entry("filter.py: ALIGN filtering tool vs reading the shards", [*environment(workers), *notes], rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=2400, help="pairs to generate (default: 2400)")
    parser.add_argument("--shards", type=int, default=8, help="shards to generate (default: 8)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three modes (ABBA order; best kept)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=1000,
        help="V for the rare-token rule (default: 1000, so the vocabulary lookup runs; the paper's scaling "
        "would give the 100,000 floor, more than the corpus's distinct n-grams)",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(tempfile.gettempdir(), "align_filter_bench"),
        help="where generated shards are kept between runs",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()
    for name in ("samples", "shards", "workers", "repeats", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = Path(args.cache_dir, f"s{args.samples}-n{args.shards}-seed{SEED}")
    start = time.perf_counter()
    urls, eval_dir = generate(folder, args.samples, args.shards, eval_copies=20, workers=args.workers)
    print(f"Data: {args.samples} pairs in {args.shards} shards under {folder} ({time.perf_counter() - start:.1f} s)")
    size = sum(Path(url).stat().st_size for url in urls)
    config = FilterConfig(vocab_size=args.vocab_size)
    copies = len(list((eval_dir / "copies").glob("*.png")))

    load_before = os.getloadavg()[0]
    modes = [
        lambda: run_read(urls, args.workers),
        lambda: run_filter(urls, args.workers, config, []),
        lambda: run_filter(urls, args.workers, config, [str(eval_dir)]),
    ]
    best: dict[str, Run] = {}
    for repeat in range(args.repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            run = mode()
            print(f"{run.mode}, round {repeat + 1}/{args.repeats}: {run.pairs / run.seconds:,.1f} pairs/s")
            if run.mode not in best or run.seconds < best[run.mode].seconds:
                best[run.mode] = run
    runs = list(best.values())
    rows = results_table(runs)
    load = (
        f"- Machine load (1-min load average): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
        f"on {os.cpu_count()} cores"
    )
    with_exclude = runs[-1].report
    assert with_exclude is not None
    notes = [
        f"- Setup: {args.samples} generated pairs in {args.shards} local shards ({size / 2**20:.0f} MiB; JPEG q90, "
        "72% 500x375 or 375x500, 20% 1024x768, 4% 180x150, 4% 1000x250; web-like captions), in the page cache; "
        f"FilterConfig(vocab_size={args.vocab_size}), other thresholds the paper's; "
        f"{args.repeats} round(s), best of each mode",
        "- Reference (no peer filter tool exists): reading the same shards with `iter_shard`, same processes; "
        "the filter reads everything twice (two passes)",
        drops_line(with_exclude) + "; " + near_duplicates_line(with_exclude, copies),
        load,
    ]
    print("\n" + "\n".join([*rows, "", *notes]))
    if not args.no_record:
        record(rows, notes, args.workers)
        print(f"\nAppended to {RESULTS}")


if __name__ == "__main__":
    main()
