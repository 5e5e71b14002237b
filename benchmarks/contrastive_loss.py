"""Contrastive loss at large batch on CPU: our dense and blockwise losses versus open_clip's ``ClipLoss``.

What it measures: forward + backward wall time and peak extra memory of the symmetric InfoNCE loss on
``B`` random L2-normalised 640-d float32 embedding pairs (ALIGN-B7's width) with a learnable logit
scale, for each ``B`` in ``--batches`` (default 4,096 and 16,384; add 65,536 for the large case), on
CPU. Implementations, each in a fresh subprocess (clean peak RSS: ``VmHWM`` reset after the inputs
are made, minus the RSS then):

* ``align_lightning dense``: ``contrastive_loss(..., block_size=None)``;
* ``align_lightning blockwise``: ``contrastive_loss(..., block_size=--block-size)``;
* ``open_clip ClipLoss`` (the peer): ``ClipLoss()(image, text, logit_scale)``, single process.

Label smoothing 0 for all three (ClipLoss has none), so the values are printed side by side and must
agree. Targets (issue 6): at B = 16,384 the blockwise loss uses <= 1/10 of ClipLoss's extra memory at
<= 1.2x its time; at B = 65,536 it completes within 2 GiB of extra memory.

    python benchmarks/contrastive_loss.py                               # 4,096 and 16,384
    python benchmarks/contrastive_loss.py --batches 4096 16384 65536 --skip-dense-above 16384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _results import append_entry, cpu_name, git_commit, memory_gib
from retrieval_metrics import peak_rss_mib, reset_peak_rss

DIM = 640
IMPLEMENTATIONS = ("align_lightning dense", "align_lightning blockwise", "open_clip ClipLoss")


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, DIM, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, DIM, generator=generator), dim=-1).requires_grad_()
    return image, text, torch.tensor(20.0, requires_grad=True)


def child(name: str, batch: int, block_size: int) -> dict:
    """Subprocess body: build the inputs (not measured), then one forward + backward, measured."""
    from open_clip.loss import ClipLoss

    from align_lightning.losses import contrastive_loss

    image, text, scale = _inputs(batch)
    baseline = reset_peak_rss()
    start = time.perf_counter()
    if name == "open_clip ClipLoss":
        loss = ClipLoss()(image, text, scale)
    else:
        loss = contrastive_loss(image, text, scale, block_size=block_size if "blockwise" in name else None)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"loss": loss.item(), "seconds": seconds, "peak_mib": peak_rss_mib() - baseline}


def main() -> None:
    """Run every implementation at every batch size in its own process; print and record the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--skip-dense-above", type=int, default=16384, help="no dense / ClipLoss run above this B")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.block_size)))
        return
    table = [
        "| B | implementation | fwd + bwd | peak extra memory | loss | vs ClipLoss (time / memory) |",
        "|---|---|---|---|---|---|",
    ]
    for batch in args.batches:
        results = {}
        for name in IMPLEMENTATIONS:
            if batch > args.skip_dense_above and "blockwise" not in name:
                results[name] = None
                continue
            command = [sys.executable, __file__, "--child", name, "--batch", str(batch)]
            command += ["--block-size", str(args.block_size)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else "failed"
        peer = results["open_clip ClipLoss"]
        for name, result in results.items():
            if not isinstance(result, dict):
                reason = "not run (above --skip-dense-above)" if result is None else "failed (out of memory?)"
                table.append(f"| {batch:,} | {name} | {reason} | | | |")
                continue
            ratio = ""
            if isinstance(peer, dict) and name != "open_clip ClipLoss":
                ratio = f"{result['seconds'] / peer['seconds']:.2f}x / {result['peak_mib'] / peer['peak_mib']:.3f}"
            table.append(
                f"| {batch:,} | {name} | {result['seconds']:.2f} s | {result['peak_mib']:,.0f} MiB | "
                f"{result['loss']:.5f} | {ratio} |"
            )
    print("\n".join(table))
    if not args.no_record:
        lines = [
            f"- Machine: {cpu_name()}, {torch.get_num_threads()} threads, {memory_gib():.0f} GiB; "
            f"torch {torch.__version__}",
            f"- Commit {git_commit()}; 640-d float32 pairs, learnable scale, no label smoothing; blockwise tiles "
            f"{args.block_size}; each case in its own process (peak RSS above the inputs)",
        ]
        append_entry("Contrastive loss at large batch (contrastive_loss.py)", lines, table)


if __name__ == "__main__":
    main()
