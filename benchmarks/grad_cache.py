"""Gradient caching on CPU: one training step at an effective batch of 1,024 in micro-batches of 64
versus the true batch of 1,024 in one pass.

What it measures: wall time and peak extra memory (RSS) of one optimizer step (forward, backward,
SGD update) of a dual encoder with tiny towers (timm ``test_efficientnet`` at ``--image-size`` px,
a 2-layer BERT of width 64 without dropout), train mode with BatchNorm on its running statistics
(so that the rows of a batch are independent and the three gradients are comparable), on
``--batch`` random pairs. Cases, each in a fresh subprocess: peak extra memory over the first step
(peak RSS above the RSS after building model and data), time as the median of ``--steps`` further
steps:

* ``true batch`` (the reference): the whole batch in one forward and backward;
* ``gradient caching``: :class:`align_lightning.grad_cache.GradCache` with ``--micro`` pairs per
  micro-batch: the same loss (all ``--batch`` pairs as negatives) and gradients;
* ``gradient accumulation``: ``batch / micro`` micro-batches, each with its own loss (only
  ``--micro`` negatives): what plain accumulation gives, for its time and memory.

The loss column is the full-batch loss for the first two (they must agree), the mean of the
micro-batch losses for accumulation. "grad cos" is the cosine between the case's parameter gradient
and the true batch's, "grad max rel diff" the largest difference relative to the true gradient's
largest entry (gradient caching: float32 round-off; accumulation: the cost of fewer negatives).

    python benchmarks/grad_cache.py                       # batch 1,024, micro 64
    python benchmarks/grad_cache.py --batch 2048 --micro 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _results import append_entry, cpu_name, git_commit, memory_gib
from retrieval_metrics import peak_rss_mib, reset_peak_rss

CASES = ("true batch", "gradient caching", "gradient accumulation")
BERT = {
    "model_type": "bert", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}  # fmt: skip


def child(case: str, batch_size: int, micro: int, image_size: int, steps: int) -> dict:
    """Subprocess body: build model and data (not measured), a warm-up step, then ``steps`` measured steps."""
    from align_lightning import ContrastiveLoss, DualEncoder, ImageTower, TextTower
    from align_lightning.grad_cache import GradCache, split_batch

    torch.manual_seed(0)
    model = DualEncoder(ImageTower("test_efficientnet"), TextTower(config=BERT)).train()
    for layer in model.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = ContrastiveLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": torch.randint(5, BERT["vocab_size"], (batch_size, 32), generator=generator),
        "attention_mask": torch.ones(batch_size, 32, dtype=torch.long),
    }

    def encode(b: dict) -> tuple:
        return model(b["pixel_values"], b["input_ids"], b["attention_mask"])

    cache = GradCache(encode, loss_fn, micro, modules=model)

    def step() -> float:
        optimizer.zero_grad()
        if case == "true batch":
            loss = loss_fn(*encode(batch))["loss"]
            loss.backward()
        elif case == "gradient caching":
            terms, last, _ = cache.step(batch, torch.Tensor.backward)
            last.backward()
            loss = terms["loss"]
        else:
            chunks = split_batch(batch, micro)
            losses = []
            for chunk in chunks:
                part = loss_fn(*encode(chunk))["loss"] / len(chunks)
                part.backward()
                losses.append(float(part) * len(chunks))
            loss = torch.tensor(statistics.fmean(losses))
        return float(loss)

    torch.manual_seed(2)
    baseline = reset_peak_rss()
    first_loss = step()  # its memory peak and gradient are reported
    peak = peak_rss_mib() - baseline
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    optimizer.step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    torch.save(gradient, Path(f"/tmp/grad_cache_bench_{case.replace(' ', '_')}.pt"))
    return {"loss": first_loss, "seconds": statistics.median(seconds), "peak_mib": peak}


def main() -> None:
    """Run the three cases in their own processes; print and record the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.micro, args.image_size, args.steps)))
        return
    results = {}
    for case in CASES:
        command = [sys.executable, __file__, "--child", case, "--batch", str(args.batch), "--micro", str(args.micro)]
        command += ["--image-size", str(args.image_size), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
        if done.returncode != 0:
            sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = results["true batch"]
    gradients = {case: torch.load(f"/tmp/grad_cache_bench_{case.replace(' ', '_')}.pt") for case in CASES}
    table = [
        "| case | negatives per pair | step time | peak extra memory | vs true batch (time / memory) | loss | grad cos "
        "| grad max rel diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, result in results.items():
        negatives = args.micro - 1 if case == "gradient accumulation" else args.batch - 1
        truth = gradients["true batch"]
        cos = torch.nn.functional.cosine_similarity(gradients[case].double(), truth.double(), dim=0)
        diff = float((gradients[case] - truth).abs().max() / truth.abs().max())
        ratio = f"{result['seconds'] / reference['seconds']:.2f}x / {result['peak_mib'] / reference['peak_mib']:.3f}"
        table.append(
            f"| {case} | {negatives:,} | {result['seconds']:.2f} s | {result['peak_mib']:,.0f} MiB | {ratio} | "
            f"{result['loss']:.4f} | {float(cos):.6f} | {diff:.1e} |"
        )
    print("\n".join(table))
    if not args.no_record:
        lines = [
            f"- Machine: {cpu_name()}, {torch.get_num_threads()} threads, {memory_gib():.0f} GiB; "
            f"torch {torch.__version__}",
            f"- Commit {git_commit()}; tiny towers (test_efficientnet {args.image_size} px + BERT 2x64), float32, "
            f"train mode; batch {args.batch:,}, micro-batches of {args.micro}; median of {args.steps} steps after a "
            "warm-up, each case in its own process (peak RSS above the model and data)",
        ]
        append_entry("Gradient caching: one training step (grad_cache.py)", lines, table)


if __name__ == "__main__":
    main()
