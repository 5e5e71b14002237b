"""Large-gallery retrieval metrics on one GPU: ``retrieval_metrics`` versus CLIP_benchmark up to 100K x 500K.

What it measures: wall time and peak extra GPU memory of image->text and text->image R@{1,5,10} for
N images x 5N captions of 640-d float32 L2-normalised embeddings (already on the device, as after
encoding), for each N in ``--images`` (default 10,000 and 100,000: a 100K-image, 500K-caption
gallery, 5e10 similarities). Same peer and values check as ``retrieval_metrics.py``: CLIP_benchmark's
recall computation (the full ``texts @ images.T`` matrix, the dense positive-pair matrix,
``batchify(recall_at_k)`` per K and direction), run on the same device; where it runs out of device
memory that is reported instead of a time (at 100K x 500K its score matrix alone is 200 GB).

Run on a GPU machine (``benchmarks/gpu_check.sh`` calls it)::

    python benchmarks/retrieval_gallery.py                       # cuda, 10K and 100K images
    python benchmarks/retrieval_gallery.py --device cpu --images 1000 --no-record   # smoke test
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _results import append_entry, cpu_name
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

from align_lightning.eval import retrieval_metrics

KS = (1, 5, 10)
DIM = 640
CAPTIONS_PER_IMAGE = 5
OURS, PEER = "align_lightning retrieval_metrics", "CLIP_benchmark recall_at_k"


def make_embeddings(num_images: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy-caption embeddings (R@1 well below 1) with a fixed seed, generated on ``device``."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = F.normalize(torch.randn(num_images, DIM, generator=generator, device=device), dim=-1)
    text_to_image = torch.arange(num_images, device=device).repeat_interleave(CAPTIONS_PER_IMAGE)
    noise = torch.randn(len(text_to_image), DIM, generator=generator, device=device) / DIM**0.5
    texts = F.normalize(images[text_to_image] + 5.5 * noise, dim=-1)
    return images, texts, text_to_image


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(
    fn: Callable[..., dict[str, float]], *fn_args: Any, device: torch.device
) -> tuple[dict[str, float] | None, float | None, float | None, str]:
    """(metrics, seconds, peak extra MiB, note) of ``fn(*fn_args)``; out of memory gives ``None`` values."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    try:
        metrics = fn(*fn_args)
        _sync(device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, None, "out of memory"
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if device.type == "cuda" else None
    return metrics, seconds, peak, ""


def peer(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's recall computation, as in its ``evaluate`` after encoding."""
    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores), device=scores.device), text_to_image] = True
    metrics = {}
    for k in KS:
        t2i = batchify(recall_at_k, scores, positive_pairs, 64, scores.device, k=k) > 0
        i2t = batchify(recall_at_k, scores.T, positive_pairs.T, 64, scores.device, k=k) > 0
        metrics[f"i2t_R@{k}"], metrics[f"t2i_R@{k}"] = i2t.float().mean().item(), t2i.float().mean().item()
    return metrics


def measure_size(num_images: int, args: argparse.Namespace, device: torch.device) -> tuple:
    """One gallery size: ours, then the peer (where allowed), values checked equal."""
    images, texts, text_to_image = make_embeddings(num_images, device)
    ours, seconds, peak, _ = _measure(
        retrieval_metrics, images, texts, text_to_image, KS, args.chunk_size, device=device
    )
    theirs, peer_seconds, peer_peak, note = (None, None, None, "skipped (--peer-max-images)")
    if num_images <= args.peer_max_images:
        theirs, peer_seconds, peer_peak, note = _measure(peer, images, texts, text_to_image, device=device)
    if ours is None:
        raise SystemExit(f"{OURS} ran out of memory at {num_images} images: lower --chunk-size.")
    for key, value in (theirs or {}).items():
        if abs(value - ours[key]) > 1e-6:
            raise SystemExit(f"values differ at {num_images} images: {key} {ours[key]} vs {value}")
    return num_images, ours, seconds, peak, peer_seconds, peer_peak, note


def main() -> None:
    """Measure each size, print the table, append it to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000], help="gallery sizes (x5 captions)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="our images per block")
    parser.add_argument("--peer-max-images", type=int, default=100_000, help="skip the peer above this size")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [measure_size(num_images, args, device) for num_images in args.images]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.0f} MiB"

    table = [
        f"| gallery (images x captions) | {OURS} | peak extra | {PEER} | peak extra | speed-up | i2t / t2i R@1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for num_images, ours, seconds, peak, peer_seconds, peer_peak, note in rows:
        theirs = f"{peer_seconds:.2f} s" if peer_seconds is not None else note
        ratio = f"{peer_seconds / seconds:.1f}x" if peer_seconds is not None else "n/a"
        table.append(
            f"| {num_images:,} x {num_images * CAPTIONS_PER_IMAGE:,} | {seconds:.2f} s | {mib(peak)} | {theirs} | "
            f"{mib(peer_peak)} | {ratio} | {ours['i2t_R@1']:.4f} / {ours['t2i_R@1']:.4f} |"
        )
    lines = [
        f"- Device: {device_name}; torch {torch.__version__}",
        f"- 640-d float32 embeddings already on the device; our chunk size {args.chunk_size}; "
        "values equal to the peer's wherever both ran (checked, else the script exits)",
    ]
    print("\n".join(lines + [""] + table))
    if not args.no_record:
        append_entry("Retrieval metrics at gallery scale (retrieval_gallery.py)", lines, table)


if __name__ == "__main__":
    main()
