"""COCO-scale retrieval metrics: ``align_lightning.eval.retrieval_metrics`` versus CLIP_benchmark, on CPU.

What it measures: wall time and peak memory of computing image->text and text->image R@{1,5,10} for
5,000 images x 25,000 captions (COCO Karpathy 5K test size, 5 captions per image) of 640-d float32
L2-normalised embeddings (ALIGN B7's size), all on CPU.

Peer: CLIP_benchmark's computation exactly as ``clip_benchmark.metrics.zeroshot_retrieval.evaluate``
does it after encoding: the full ``texts @ images.T`` score matrix, the dense positive-pair matrix and
``batchify(recall_at_k, ...)`` in both directions for each K, with its default batch size (64).
The values of both are printed side by side and asserted equal.

Each implementation runs in its own subprocess that loads the same saved embeddings, so their memory
does not mix: peak memory = the process's peak RSS during the computation (``VmHWM``, reset through
``/proc/self/clear_refs`` right after loading the embeddings) minus its RSS at that moment (imports and
embeddings excluded; without that reset, ``resource.getrusage`` ``ru_maxrss``).
Ours is timed ``--repeats`` times (median; the first run also gives the peak); CLIP_benchmark once.

Run from the repository root::

    python benchmarks/retrieval_metrics.py            # records in benchmarks/RESULTS.md
    python benchmarks/retrieval_metrics.py --images 500 --no-record   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _results import RESULTS, append_entry, cpu_name, git_commit, memory_gib
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

from align_lightning.eval import retrieval_metrics

KS = (1, 5, 10)
DIM = 640
CAPTIONS_PER_IMAGE = 5
CLIP_BENCHMARK_BATCH = 64
TARGET_SPEEDUP, TARGET_MEMORY = 20.0, 0.1
OURS, PEER = "align_lightning retrieval_metrics", "CLIP_benchmark recall_at_k"


def make_embeddings(num_images: int, path: Path) -> None:
    """Save noisy-caption embeddings (R@1 well below 1) with a fixed seed to ``path``."""
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(num_images, DIM, generator=generator), dim=-1)
    text_to_image = torch.arange(num_images).repeat_interleave(CAPTIONS_PER_IMAGE)
    noise = torch.randn(len(text_to_image), DIM, generator=generator) / DIM**0.5
    texts = F.normalize(images[text_to_image] + 5.5 * noise, dim=-1)
    torch.save({"images": images, "texts": texts, "text_to_image": text_to_image}, path)


def _status_mib(field: str) -> float:
    """A memory field (``VmRSS``, ``VmHWM``) of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0) and return the current RSS in MiB.

    Falls back to ``ru_maxrss`` (which cannot be reset, so it includes the transient peak of loading).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS")
    except (OSError, KeyError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak RSS of this process since the last reset, in MiB (``VmHWM``; else ``ru_maxrss``, KiB on Linux)."""
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(data: dict, repeats: int) -> tuple[dict[str, float], list[float]]:
    """Our chunked single pass (default chunk size)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = retrieval_metrics(data["images"], data["texts"], data["text_to_image"], ks=KS)
        seconds.append(time.perf_counter() - start)
    return metrics, seconds


def run_peer(data: dict, repeats: int) -> tuple[dict[str, float], list[float]]:
    """CLIP_benchmark's recall computation, as in its ``evaluate`` after encoding."""
    images, texts, text_to_image = data["images"], data["texts"], data["text_to_image"]
    start = time.perf_counter()
    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    metrics = {}
    for k in KS:
        t2i = batchify(recall_at_k, scores, positive_pairs, CLIP_BENCHMARK_BATCH, "cpu", k=k) > 0
        i2t = batchify(recall_at_k, scores.T, positive_pairs.T, CLIP_BENCHMARK_BATCH, "cpu", k=k) > 0
        metrics[f"i2t_R@{k}"], metrics[f"t2i_R@{k}"] = i2t.float().mean().item(), t2i.float().mean().item()
    return metrics, [time.perf_counter() - start]


def child(mode: str, path: str, repeats: int) -> None:
    """Subprocess body: import and load first (not measured), then measure, print one JSON line."""
    # Both packages are imported at module level, before the baseline, so neither side is charged for them.
    data = torch.load(path)
    baseline = reset_peak_rss()
    metrics, seconds = (run_ours if mode == "ours" else run_peer)(data, repeats)
    peak = peak_rss_mib() - baseline
    print(json.dumps({"metrics": metrics, "seconds": seconds, "peak_mib": peak}))


def measure(mode: str, path: Path, repeats: int) -> dict:
    """Run one implementation in a fresh interpreter and parse its result."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--data", str(path), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=5000, help="images (x5 captions); default 5000 (COCO 5K)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median); CLIP_benchmark runs once")
    parser.add_argument("--no-record", action="store_true", help="do not append the result to benchmarks/RESULTS.md")
    parser.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    """Measure both in subprocesses, compare values, print and record the table."""
    args = parse_args()
    if args.child:
        child(args.child, args.data, args.repeats)
        return
    import clip_benchmark

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embeds.pt"
        make_embeddings(args.images, path)
        results = {OURS: measure("ours", path, args.repeats), PEER: measure("peer", path, 1)}
    ours, peer = results[OURS], results[PEER]
    print("| metric | ours | CLIP_benchmark |\n|---|---|---|")
    for key in ours["metrics"]:
        print(f"| {key} | {ours['metrics'][key]:.4f} | {peer['metrics'][key]:.4f} |")
    assert ours["metrics"] == peer["metrics"], "values differ"

    seconds = {mode: statistics.median(r["seconds"]) for mode, r in results.items()}
    speedup = seconds[PEER] / seconds[OURS]
    memory = ours["peak_mib"] / peer["peak_mib"]
    rows = [
        "| implementation | wall s (median) | runs (s) | peak RSS increase (MiB) | i2t R@1/5/10 | t2i R@1/5/10 |",
        "|---|---|---|---|---|---|",
        *(
            f"| {mode} | {seconds[mode]:.2f} | {', '.join(f'{s:.2f}' for s in r['seconds'])} | {r['peak_mib']:.0f} | "
            + " | ".join("/".join(f"{r['metrics'][f'{d}_R@{k}']:.4f}" for k in KS) for d in ("i2t", "t2i"))
            + " |"
            for mode, r in results.items()
        ),
        f"| **ratio (CLIP_benchmark / ours)** | **{speedup:.1f}x faster** (target >= {TARGET_SPEEDUP:.0f}x: "
        f"{'PASS' if speedup >= TARGET_SPEEDUP else 'FAIL'}) | | **{memory:.3f} of its peak** (target <= "
        f"{TARGET_MEMORY}: {'PASS' if memory <= TARGET_MEMORY else 'FAIL'}) | values equal | |",
    ]
    load = (
        f"- Machine load (1-min load average): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
        f"on {os.cpu_count()} cores (other processes may share the CPU)"
    )
    print("\n" + "\n".join([*rows, "", load]))
    if not args.no_record:
        lines = [
            f"- Hardware: {cpu_name()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB RAM; CPU only, "
            f"torch threads {torch.get_num_threads()}",
            f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, clip_benchmark "
            f"{getattr(clip_benchmark, '__version__', '1.6.2')}, align_lightning commit {git_commit()}",
            f"- Setup: {args.images:,} images x {CAPTIONS_PER_IMAGE * args.images:,} captions, {DIM}-d float32, "
            f"K = {KS}; ours: default chunk_size, ties='topk'; CLIP_benchmark: full score matrix + batchify("
            f"recall_at_k, batch {CLIP_BENCHMARK_BATCH}) as in its evaluate(); each in its own subprocess; peak = "
            "VmHWM (reset after loading the embeddings) minus VmRSS then",
            load,
        ]
        append_entry("retrieval_metrics.py: chunked R@K vs CLIP_benchmark (COCO 5K scale)", lines, rows)
        print(f"\nAppended to {RESULTS}")


if __name__ == "__main__":
    main()
