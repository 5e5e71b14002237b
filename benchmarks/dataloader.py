"""Samples/s per dataloader worker of ``WebDataModule``'s training data path versus open_clip's webdataset loader.

What it measures: how many training samples one dataloader worker delivers per second through the whole
data path, from local img2dataset-format webdataset shards to a training batch: read the tar -> shuffle
-> decode the JPEG -> ALIGN's train augmentation (resize 346x346 -> random crop 289 -> random flip ->
pixels in [-1, 1]) -> tokenise the captions -> batch of 64, delivered by a ``torch`` DataLoader.

* Ours: :class:`~align_lightning.data.WebDataModule` (``image_size=289``, ``batch_size=64``, the default
  shuffle buffer of 1,000 records), iterating ``dm.train_dataloader()`` outside a Trainer (each pass is
  one epoch). It lets libjpeg decode large JPEGs at a reduced size (PIL draft mode) when the result
  still covers the 346 px resize, and tokenises once per batch.
* Ablation: the same without draft decoding (``draft_decode=False``), which shows how much of the
  difference comes from decoding fewer pixels.
* Peer: open_clip's training loader, ``open_clip_train.data.get_wds_dataset`` (webdataset pipeline:
  shard shuffle -> split by node/worker -> tar to samples -> 5,000-sample shuffle buffer, 1,000 initial
  -> ``decode("pilrgb")`` -> ``map_dict(image=preprocess, text=tokenizer)`` -> ``batched(64)`` ->
  ``WebLoader``), with open_clip's own train transform at 289 px and ALIGN's normalisation,
  ``open_clip.image_transform(289, is_train=True, mean=(0.5,) * 3, std=(0.5,) * 3)``
  (RandomResizedCrop(289, scale=(0.9, 1), bicubic) -> to tensor -> normalise; open_clip has no
  resize-then-crop train transform and flips nothing), and open_clip's tokenizer wrapper
  ``open_clip.tokenizer.HFTokenizer`` around the same Hugging Face tokenizer (called per sample, as
  open_clip does: ftfy + HTML unescape + whitespace clean, padded to 64 tokens).
* Peer with ALIGN's transform: the same open_clip loader with our exact train transform
  (``align_lightning.data.transforms.image_transform(289)``, full-size decode), so the difference
  between the two open_clip rows is the transform and the rest (ours without draft vs this) is the
  loader itself.

Two shims make open_clip's loader run here, neither changing its work per sample: webdataset >= 0.2.96 ends
each shard with an ``{}`` marker that open_clip_train's ``group_by_keys_nothrow`` crashes on (``KeyError:
'fname'``, webdataset issue #384 / open_clip issue #935), so ``open_clip_train.data.tar_file_expander`` gets
``eof_value=None`` (the fix given there); and ``open_clip_train.data`` imports pandas for its CSV datasets
only, so when pandas is missing an empty placeholder module stands in for it.

Both sides share the shards and a WordPiece tokenizer learned from their captions (vocabulary bound
30,522), saved in the data folder; nothing is downloaded. The shards are generated once into
``--data-dir`` and reused: realistic JPEGs (quality 90; smooth colour fields, shapes and sensor-like
noise, not flat colour, which decodes unrealistically fast) of two sizes, 500x375 (COCO-like; too small
for draft decoding to apply) and 1024x768 (web-like), with web-like alt-texts and img2dataset ``.json``
metadata, in 4 shards of 320 samples per size. They sit in the page cache, so reading is CPU cost.

Method: every run builds a fresh loader with ``--workers`` worker processes, skips the first 2 batches
per worker (worker start-up and filling the shuffle buffer: each side reads about 1,000 records before
its first sample), then times ``--samples`` samples (whole batches). The per-worker figure is samples/s
divided by the number of workers. The pipelines alternate (forward, backward, forward, ... order, so
drifting machine load hits all alike) ``--repeats`` times per image size and the medians are compared.
Worker processes use one torch thread each (the DataLoader's default) and tokenizers run single-threaded
(``TOKENIZERS_PARALLELISM=false``), so each worker is one core of work.

Run from the repository root::

    python benchmarks/dataloader.py                       # 1 worker, 640 timed samples, 3 repeats
    python benchmarks/dataloader.py --workers 1 2         # also with 2 workers
    python benchmarks/dataloader.py --samples 128 --repeats 1 --no-record   # smoke test

It prints a table and appends it, with the date, hardware, load, versions and command, to
``benchmarks/RESULTS.md`` (``--no-record`` skips that).
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import io
import json
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import PIL
import tokenizers
import torch
import torchvision
import transformers
import webdataset
from _results import RESULTS, append_entry, cpu_name, git_commit, memory_gib
from _synthetic import WORDS
from open_clip.tokenizer import HFTokenizer
from PIL import Image, ImageDraw, features

from align_lightning.data import WebDataModule
from align_lightning.data.shards import ShardWriter
from align_lightning.data.tokenizer import iter_captions, train_wordpiece
from align_lightning.data.transforms import image_transform

try:
    import open_clip_train.data as open_clip_data
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    # open_clip_train.data imports pandas at the top, for its CSV datasets only (open_clip_torch's "training"
    # extra); the webdataset loader measured here never touches it. Without pandas, an empty placeholder
    # module lets the import succeed; anything that did use it would fail loudly.
    if err.name != "pandas":
        raise
    sys.modules["pandas"] = types.ModuleType("pandas")
    import open_clip_train.data as open_clip_data

# open_clip_train's tarfile_to_samples_nothrow predates webdataset 0.2.96, whose tar_file_expander ends each
# shard with an ``{}`` marker that open_clip's group_by_keys_nothrow fails on (KeyError: 'fname'; webdataset
# issue #384, open_clip issue #935). The fix given there: no marker (``eof_value=None``), the old behaviour.
# tarfile_to_samples_nothrow looks the name up in its module at each call, so this patches open_clip's use only.
if "eof_value" in inspect.signature(webdataset.tariterators.tar_file_expander).parameters:
    open_clip_data.tar_file_expander = functools.partial(webdataset.tariterators.tar_file_expander, eof_value=None)

SEED = 0
IMAGE_SIZE = 289
BATCH_SIZE = 64
MAX_LENGTH = 64
VOCAB_SIZE = 30522
WARMUP_BATCHES_PER_WORKER = 2
TARGET = 1.5
#: Generated data: image sizes (width, height), shards per size, samples per shard. Changing any of it
#: (or GENERATOR_VERSION) regenerates the cached shards.
SIZES: tuple[tuple[int, int], ...] = ((500, 375), (1024, 768))
SHARDS_PER_SIZE = 4
SAMPLES_PER_SHARD = 320
GENERATOR_VERSION = 1
NOISE_SIGMA = 9.0

OURS, OURS_NO_DRAFT = "ours (WebDataModule)", "ours, draft_decode=False"
OPEN_CLIP, OPEN_CLIP_ALIGN = "open_clip get_wds_dataset", "open_clip + ALIGN transform"

ZIPF = 1.0 / np.arange(1, len(WORDS) + 1)
ZIPF /= ZIPF.sum()
BRANDS = ("Nike", "IKEA", "Samsung", "Canon", "Zara", "Lego", "Bosch", "Sony", "Adidas", "Philips")
PLACES = ("Paris", "New York", "Tokyo", "São Paulo", "Zürich", "Kraków", "東京", "Москва", "Reykjavík", "Cape Town")


# --------------------------------------------------------------------------------------------------
# Data generation


def _photo(width: int, height: int, rng: np.random.Generator, noise: np.ndarray) -> bytes:
    """A photo-like JPEG (quality 90): a smooth colour field, a few shapes, plus sensor-like noise.

    A bicubically enlarged grid of random colours gives smooth gradients (sky, walls, skin), shapes give
    edges, and a window of a noise field gives the fine texture that makes real photos' entropy-coded
    data (and so their decoding time) large; flat or purely synthetic images decode much faster.
    """
    grid = rng.integers(0, 256, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [
            x0,
            y0,
            x0 + int(rng.integers(width // 12, width // 2)),
            y0 + int(rng.integers(height // 12, height // 2)),
        ]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    oy = int(rng.integers(0, noise.shape[0] - height + 1))
    ox = int(rng.integers(0, noise.shape[1] - width + 1))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise[oy : oy + height, ox : ox + width], 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _caption(rng: np.random.Generator) -> str:
    """A web-like alt-text: natural captions, product titles, file names, keyword lists, entities, non-ASCII."""
    zipf = rng.choice(len(WORDS), 40, p=ZIPF)
    natural = " ".join(WORDS[i] for i in zipf[: rng.integers(3, 16)])
    kind = rng.random()
    if kind < 0.55:
        return natural.capitalize()
    if kind < 0.68:
        return f"{rng.choice(BRANDS)} {natural.title()} - Size {rng.integers(4, 14)} | Free Shipping"
    if kind < 0.76:
        return f"{natural.capitalize()} in {rng.choice(PLACES)} &amp; around — {rng.integers(1990, 2025)}"
    if kind < 0.83:
        return f"IMG_{rng.integers(0, 10**4):04d}.JPG"
    if kind < 0.91:
        return ", ".join(WORDS[i] for i in zipf[: rng.integers(15, 40)])  # SEO keyword list
    return f"  {natural}\n{natural.upper()}  "  # stray whitespace and capitals


def _write_shard(task: tuple[str, int, int, int, int]) -> int:
    """Write one shard of ``count`` samples of one image size; returns the bytes of images written."""
    url, number, count, width, height = task
    rng = np.random.default_rng([SEED, width, number])
    noise = rng.normal(0, NOISE_SIGMA, (height + 200, width + 200, 3)).astype(np.int16)
    image_bytes = 0
    with ShardWriter(url, max_samples=None) as writer:
        for i in range(count):
            key = f"{number:05d}{i:04d}"
            # Landscape or portrait, as on the web.
            w, h = (width, height) if rng.random() < 0.8 else (height, width)
            image = _photo(w, h, rng, noise.transpose(1, 0, 2) if w < h else noise)
            caption = _caption(rng)
            meta = {
                "url": f"https://example.com/images/{key}.jpg",
                "caption": caption,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": w,
                "height": h,
                "original_width": w,
                "original_height": h,
                "exif": "{}",
                "sha256": f"{int(rng.integers(0, 2**63)):064x}",
            }
            writer.write(key, {"jpg": image, "txt": caption.encode(), "json": json.dumps(meta).encode()})
            image_bytes += len(image)
    return image_bytes


@dataclass(frozen=True)
class Dataset:
    """The generated shards of one image size.

    Attributes:
        label: ``"WxH"``.
        urls: Shard paths.
        samples: Samples in all shards.
        mean_kib: Mean JPEG size.
    """

    label: str
    urls: list[str]
    samples: int
    mean_kib: float


def generate(folder: Path) -> tuple[list[Dataset], Path]:
    """Write the shards and the tokenizer into ``folder``, unless a previous run did with the same settings.

    Returns:
        The datasets (one per image size) and the tokenizer folder.
    """
    settings = {
        "version": GENERATOR_VERSION,
        "seed": SEED,
        "sizes": SIZES,
        "shards_per_size": SHARDS_PER_SIZE,
        "samples_per_shard": SAMPLES_PER_SHARD,
        "noise_sigma": NOISE_SIGMA,
        "vocab_size": VOCAB_SIZE,
    }
    done = folder / "done.json"
    tasks = [
        (str(folder / f"{w}x{h}" / f"{n:05d}.tar"), n, SAMPLES_PER_SHARD, w, h)
        for w, h in SIZES
        for n in range(SHARDS_PER_SIZE)
    ]
    cached = json.loads(done.read_text()) if done.exists() else None
    if cached is None or cached["settings"] != json.loads(json.dumps(settings)):
        print(f"Generating {len(tasks) * SAMPLES_PER_SHARD} samples in {len(tasks)} shards under {folder} ...")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with multiprocessing.get_context("fork").Pool(min(len(tasks), os.cpu_count() or 1)) as pool:
            image_bytes = pool.map(_write_shard, tasks)
        urls = [task[0] for task in tasks]
        train_wordpiece(iter_captions(urls, num_workers=1), vocab_size=VOCAB_SIZE, save_dir=folder / "tokenizer")
        cached = {"settings": settings, "image_bytes": image_bytes}
        done.write_text(json.dumps(cached))
    datasets = []
    for i, (w, h) in enumerate(SIZES):
        part = slice(i * SHARDS_PER_SIZE, (i + 1) * SHARDS_PER_SIZE)
        samples = SHARDS_PER_SIZE * SAMPLES_PER_SHARD
        mean_kib = sum(cached["image_bytes"][part]) / samples / 1024
        datasets.append(Dataset(f"{w}x{h}", [t[0] for t in tasks[part]], samples, mean_kib))
    return datasets, folder / "tokenizer"


# --------------------------------------------------------------------------------------------------
# Pipelines: each builds one fresh pass (an iterable of batches) over the given shards


def ours(draft_decode: bool) -> Callable[[Dataset, int, Path], Iterable[Any]]:
    """Our loader: a fresh ``WebDataModule``'s training stream (one epoch per pass)."""

    def make(data: Dataset, workers: int, tokenizer: Path) -> Iterable[Any]:
        dm = WebDataModule(
            train_urls=data.urls,
            image_size=IMAGE_SIZE,
            batch_size=BATCH_SIZE,
            num_workers=workers,
            tokenizer=str(tokenizer),
            max_length=MAX_LENGTH,
            draft_decode=draft_decode,
            seed=SEED,
        )
        return dm.train_dataloader()

    return make


def open_clip_loader(align_transform: bool) -> Callable[[Dataset, int, Path], Iterable[Any]]:
    """open_clip's training loader (``get_wds_dataset``), with open_clip's or ALIGN's train transform."""

    def make(data: Dataset, workers: int, tokenizer: Path) -> Iterable[Any]:
        if align_transform:
            preprocess = image_transform(IMAGE_SIZE, train=True)
        else:
            preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=True, mean=(0.5,) * 3, std=(0.5,) * 3)
        # The arguments get_wds_dataset reads (open_clip_train's command line), for one process.
        args = argparse.Namespace(
            train_data="::".join(data.urls),
            train_num_samples=data.samples,
            dataset_resampled=False,
            train_data_upsampling_factors=None,
            seed=SEED,
            batch_size=BATCH_SIZE,
            workers=workers,
            world_size=1,
        )
        text = HFTokenizer(str(tokenizer), context_length=MAX_LENGTH)
        return open_clip_data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=text).dataloader

    return make


PIPELINES: dict[str, Callable[[Dataset, int, Path], Iterable[Any]]] = {
    OURS: ours(draft_decode=True),
    OURS_NO_DRAFT: ours(draft_decode=False),
    OPEN_CLIP: open_clip_loader(align_transform=False),
    OPEN_CLIP_ALIGN: open_clip_loader(align_transform=True),
}


def _pixels(batch: Any) -> torch.Tensor:
    """The image tensor of a batch of either loader (ours: a dict; open_clip: ``(images, texts)``)."""
    return batch["pixel_values"] if isinstance(batch, dict) else batch[0]


def measure(batches: Iterable[Any], warmup: int, samples: int) -> float:
    """Iterate one pass: skip ``warmup`` batches, then time batches until ``samples`` samples arrived.

    Returns:
        Samples per second over the timed batches.

    Raises:
        RuntimeError: If the pass ends before that many samples.
    """
    iterator = iter(batches)
    try:
        for _ in range(warmup):
            pixels = _pixels(next(iterator))
            if pixels.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE) or pixels.abs().max() > 1.0 + 1e-5:
                raise RuntimeError(f"Unexpected pixel batch: shape {tuple(pixels.shape)}, max |x| {pixels.abs().max()}")
        start, seen = time.perf_counter(), 0
        while seen < samples:
            seen += len(_pixels(next(iterator)))
        return seen / (time.perf_counter() - start)
    except StopIteration as err:
        raise RuntimeError("The pass ended before the timed samples: lower --samples or make more data.") from err
    finally:
        # Stop the worker processes now (open_clip's loader keeps persistent workers), before the next run.
        if hasattr(iterator, "close"):
            iterator.close()
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        del iterator
        gc.collect()


# --------------------------------------------------------------------------------------------------
# Report


@dataclass
class Cell:
    """The runs of one pipeline on one dataset with one worker count (samples/s per worker)."""

    pipeline: str
    data: Dataset
    workers: int
    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def results_table(cells: list[Cell]) -> list[str]:
    """Markdown table: per-worker medians and their ratio to open_clip's loader on the same data and workers."""
    peer = {(c.data.label, c.workers): c.median for c in cells if c.pipeline == OPEN_CLIP}
    rows = [
        "| pipeline | image size | workers | samples/s/worker (median) | runs | ratio vs open_clip |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        ratio = c.median / peer[(c.data.label, c.workers)]
        name, ratio_text = c.pipeline, f"{ratio:.2f}"
        if c.pipeline == OURS:
            verdict = "PASS" if ratio >= TARGET else "FAIL"
            name, ratio_text = f"**{c.pipeline}**", f"**{ratio:.2f}** ({verdict}, target >= {TARGET})"
        rows.append(
            f"| {name} | {c.data.label} | {c.workers} | {c.median:.1f} | "
            f"{', '.join(f'{r:.1f}' for r in c.runs)} | {ratio_text} |"
        )
    return rows


def interpretation(cells: list[Cell]) -> str:
    """One sentence reading the table (first worker count), splitting each ratio into its three factors.

    ``ours / open_clip = (ours / ours without draft) x (ours without draft / open_clip with ALIGN's transform)
    x (open_clip with ALIGN's transform / open_clip)``: draft decoding, the loader itself (reading, shuffling,
    batching, tokenising, same decode and transform) and the transform.
    """
    workers = cells[0].workers
    median = {(c.pipeline, c.data.label): c.median for c in cells if c.workers == workers}

    def factors(label: str) -> str:
        def ratio(a: str, b: str) -> str:
            return f"{median[(a, label)] / median[(b, label)]:.2f}x"

        return (
            f"{ratio(OURS, OPEN_CLIP)} on {label} = draft decoding {ratio(OURS, OURS_NO_DRAFT)} x loader "
            f"{ratio(OURS_NO_DRAFT, OPEN_CLIP_ALIGN)} x transform {ratio(OPEN_CLIP_ALIGN, OPEN_CLIP)}"
        )

    small, large = (f"{w}x{h}" for w, h in SIZES)
    return (
        f"- Interpretation ({workers} worker{'s' * (workers > 1)}): per worker, ours delivers {factors(large)}, "
        f"and {factors(small)} (too small for draft decoding, so that factor is noise there), where 'loader' is "
        "ours without draft vs open_clip's loader with our transform (same decode and augmentation) and "
        "'transform' is ALIGN's resize-crop-flip vs open_clip's bicubic RandomResizedCrop inside open_clip's loader."
    )


def environment(workers: list[int]) -> list[str]:
    """Markdown bullet lines describing the hardware and the library versions."""
    jpeg = "libjpeg-turbo " if features.check_feature("libjpeg_turbo") else "libjpeg "
    return [
        f"- Hardware: {cpu_name()}, {len(os.sched_getaffinity(0))} cores "
        f"(nproc), {memory_gib():.0f} GiB RAM; {' and '.join(map(str, workers))} dataloader worker(s); CPU only",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, Pillow {PIL.__version__} ({jpeg}{features.version('jpg')}), open_clip_torch "
        f"{open_clip.__version__}, webdataset {webdataset.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, align_lightning commit {git_commit()}",
    ]


def record(rows: list[str], notes: list[str], workers: list[int]) -> None:
    """Append a dated entry to ``benchmarks/RESULTS.md`` (created if missing; never rewritten)."""
    append_entry(
        "dataloader.py: WebDataModule vs open_clip webdataset loader, samples/s per worker",
        [*environment(workers), *notes],
        rows,
    )


# --------------------------------------------------------------------------------------------------
# Main


def parse_args() -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "align_lightning_bench_dataloader",
        help="where the generated shards and tokenizer are cached (default: %(default)s)",
    )
    parser.add_argument("--samples", type=int, default=640, help="timed samples per run (default: 640)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each pipeline, alternating; medians compared")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="dataloader worker counts to measure (default: 1)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.samples < 1 or args.repeats < 1 or min(args.workers) < 1:
        parser.error("--samples, --repeats and --workers must be at least 1")
    per_worker = SHARDS_PER_SIZE * SAMPLES_PER_SHARD // max(args.workers) // BATCH_SIZE  # full batches per worker
    needed = WARMUP_BATCHES_PER_WORKER * max(args.workers) + -(-args.samples // BATCH_SIZE)
    if needed > per_worker * max(args.workers):
        parser.error(
            f"--samples {args.samples} with {max(args.workers)} workers needs {needed} full batches of an epoch "
            f"that has {per_worker * max(args.workers)}: lower --samples"
        )
    return args


def main() -> None:
    """Generate (or reuse) the shards, run every pipeline alternately, print the table and record it."""
    args = parse_args()
    # Single-threaded tokenisation (read by the tokenizers library at each call; workers inherit it), so
    # that a worker is one core of work on both sides.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.getLogger("align_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    datasets, tokenizer = generate(args.data_dir)
    load_before = os.getloadavg()
    cells: list[Cell] = []
    for workers in args.workers:
        warmup = WARMUP_BATCHES_PER_WORKER * workers
        for data in datasets:
            row = {name: Cell(name, data, workers, []) for name in PIPELINES}
            for repeat in range(args.repeats):
                order = list(PIPELINES) if repeat % 2 == 0 else list(reversed(PIPELINES))
                for name in order:
                    rate = measure(PIPELINES[name](data, workers, tokenizer), warmup, args.samples) / workers
                    row[name].runs.append(rate)
                    print(
                        f"{data.label}, {workers} worker(s), {name}, run {repeat + 1}/{args.repeats}: "
                        f"{rate:.1f} samples/s/worker",
                        flush=True,
                    )
            cells.extend(row.values())
    load_after = os.getloadavg()

    rows = results_table(cells)
    load = (
        f"- Machine load (1-min load average): {load_before[0]:.2f} before, {load_after[0]:.2f} after, on "
        f"{len(os.sched_getaffinity(0))} cores (other processes may share the CPU)"
    )
    sizes = ", ".join(f"{d.label} ({d.samples} in {len(d.urls)} shards, mean {d.mean_kib:.0f} KiB)" for d in datasets)
    setup = (
        f"- Setup: generated img2dataset shards (.jpg q90 photo-like, .txt web-like alt-text, .json), page cache: "
        f"{sizes}; 20% portrait; batch {BATCH_SIZE}, {IMAGE_SIZE} px (resize 346, random crop, flip, [-1, 1]); "
        f"{WARMUP_BATCHES_PER_WORKER} untimed batches per worker + {args.samples} timed samples per run, "
        f"{args.repeats} runs per pipeline alternating (ABBA); WordPiece tokenizer learned from the captions "
        f"(max {MAX_LENGTH} tokens), shared by both; TOKENIZERS_PARALLELISM=false"
    )
    peer = (
        "- Peer: `open_clip_train.data.get_wds_dataset` (is_train, not resampled; 5000/1000 sample shuffle) with "
        "`open_clip.image_transform(289, is_train=True, mean=(0.5,)*3, std=(0.5,)*3)` = RandomResizedCrop(289, "
        "scale=(0.9, 1), bicubic) -> ToTensor -> Normalize (no flip), and `HFTokenizer(<same tokenizer>, "
        "context_length=64)` per sample; 'open_clip + ALIGN transform' is the same loader with our "
        "`image_transform(289)` (full-size decode)"
    )
    notes = [setup, peer, load, interpretation(cells)]
    print("\n" + "\n".join([*rows, "", load, notes[-1]]))
    if not args.no_record:
        record(rows, notes, args.workers)
        print(f"\nAppended to {RESULTS}")


if __name__ == "__main__":
    main()
