"""ALIGN-base under DDP, FSDP2 and FSDP1 on one GPU: samples/s, peak memory, MFU, and that the loss goes down.

What it runs: EfficientNet-B7 + BERT-base (640-d, 289 px, 64 tokens; recipes/align_base.yaml's
towers, from scratch) trained with ALIGN's loss for ``--steps`` steps of ``--batch-size`` synthetic
pairs (a fixed set of random images and token sequences, cycled, so that the loss can fall), under
each strategy in its own subprocess (clean peak memory):

* ``ddp``: Lightning DDP, ``precision=bf16-mixed``;
* ``fsdp2``: :class:`~align_lightning.strategies.FSDP2Strategy` with ``param_dtype=bfloat16``
  (bf16 parameters and compute, float32 gradient reduction), ``precision=32-true``;
* ``fsdp_align``: :class:`~align_lightning.strategies.ALIGNFSDPStrategy` (FSDP1), ``bf16-mixed``.

samples/s is measured over the steps after the first ``--warmup``; MFU = model FLOPs per sample
(forward + backward, counted once with ``torch.utils.flop_counter`` on the plain model) x samples/s
/ the GPU's dense bf16 peak (``--peak-tflops``, 989 for an H100 SXM). A dry run on CPU with tiny
towers: ``--tiny --device cpu --strategies ddp fsdp2``.

With ``--micro-batch-size`` every step uses contrastive gradient caching
(``ALIGNModule(micro_batch_size=...)``): the peak memory is then that of one micro-batch (plus the
batch's pixels), the figure ``recipes/align_base_1gpu.yaml``'s arithmetic rests on.

    python benchmarks/strategies_gpu.py                     # H100: the three strategies
    python benchmarks/strategies_gpu.py --strategies ddp fsdp2 --batch-size 256 --micro-batch-size 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from align_lightning import ALIGNModule, ContrastiveLoss, DualEncoder, ImageTower, TextTower
from align_lightning.optim import WarmupLinearDecay
from align_lightning.strategies import ALIGNFSDPStrategy, FSDP2Strategy

BERT_BASE = {
    "model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "max_position_embeddings": 512, "vocab_size": 30522,
}  # fmt: skip
TINY_BERT = {
    "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 37, "max_position_embeddings": 64, "vocab_size": 1000,
}  # fmt: skip


class SyntheticPairs(Dataset):
    """``size`` fixed random (image, token sequence) pairs; item ``i`` is the same every time it is read."""

    def __init__(self, size: int, image_size: int, length: int, vocab_size: int) -> None:
        self.size, self.image_size, self.length, self.vocab_size = size, image_size, length, vocab_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        pixels = torch.rand(3, self.image_size, self.image_size, generator=generator) * 2 - 1
        ids = torch.randint(1000 if self.vocab_size > 2000 else 5, self.vocab_size, (self.length,), generator=generator)
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _StepTimes(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.losses.append(float(outputs["loss"]))


def _model(tiny: bool) -> DualEncoder:
    if tiny:
        return DualEncoder(ImageTower("test_efficientnet"), TextTower(config=TINY_BERT))
    return DualEncoder(ImageTower("efficientnet_b7"), TextTower(config=BERT_BASE), embed_dim=640)


def flops_per_sample(tiny: bool, image_size: int, length: int, device: str) -> float:
    """Forward + backward FLOPs of one pair (counted on a batch of 2 of the plain model)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(tiny).to(device)
    vocab = (TINY_BERT if tiny else BERT_BASE)["vocab_size"]
    batch = SyntheticPairs(2, image_size, length, vocab)
    items = [batch[i] for i in range(2)]
    inputs = {k: torch.stack([item[k] for item in items]).to(device) for k in items[0]}
    with FlopCounterMode(display=False) as counter, torch.autocast(device, dtype=torch.bfloat16):
        image, text, scale = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        ContrastiveLoss(gather=False)(image, text, scale)["loss"].backward()
    return counter.get_total_flops() / 2


def child(strategy: str, args: argparse.Namespace) -> dict:
    """Train under one strategy; return its measurements."""
    torch.manual_seed(0)
    precision = "32-true" if strategy == "fsdp2" else ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.precision and strategy != "fsdp2":
        precision = args.precision
    if strategy == "fsdp2":
        chosen = FSDP2Strategy(param_dtype="bfloat16" if args.device == "cuda" else None)
    elif strategy == "fsdp_align":
        chosen = ALIGNFSDPStrategy()
    else:
        chosen = "ddp"
    vocab = (TINY_BERT if args.tiny else BERT_BASE)["vocab_size"]
    data = SyntheticPairs(args.pairs, args.image_size, args.length, vocab)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)
    module = ALIGNModule(
        _model(args.tiny),
        ContrastiveLoss(label_smoothing=0.1),
        optimizer=partial(torch.optim.AdamW, lr=args.lr, weight_decay=1e-5),
        lr_scheduler=partial(WarmupLinearDecay, warmup_steps=0, total_steps=10 * args.steps),
        micro_batch_size=args.micro_batch_size,
    )
    times = _StepTimes()
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, strategy=chosen, precision=precision,
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[times],
    )  # fmt: skip
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    measured = times.times[args.warmup :]
    samples_per_s = args.batch_size * (len(measured) - 1) / (measured[-1] - measured[0])
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    first, last = times.losses[: args.warmup], times.losses[-args.warmup :]
    return {
        "strategy": strategy,
        "precision": precision
        + (" + param_dtype bf16" if strategy == "fsdp2" and args.device == "cuda" else "")
        + (f", micro-batches of {args.micro_batch_size}" if args.micro_batch_size else ""),
        "samples_per_s": samples_per_s,
        "peak_gib": peak,
        "loss_first": sum(first) / len(first),
        "loss_last": sum(last) / len(last),
    }


def main() -> None:
    """Run each strategy in its own subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2", "fsdp_align"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny towers (CPU dry run)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=289)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="gradient caching in micro-batches")
    parser.add_argument("--precision", default=None, help="Lightning precision for ddp / fsdp_align")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    flops = flops_per_sample(args.tiny, args.image_size, args.length, args.device)
    rows = []
    for strategy in args.strategies:
        command = [sys.executable, __file__, *sys.argv[1:], "--child", strategy]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            rows.append({"strategy": strategy, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    size = "tiny towers" if args.tiny else "EfficientNet-B7 + BERT-base, 640-d"
    print(
        f"\n{size}, {args.image_size} px, {args.length} tokens, batch {args.batch_size}, {args.steps} steps, {device}"
    )
    print(f"model FLOPs per pair (fwd + bwd): {flops / 1e9:.1f} GFLOP")
    print("| strategy | precision | samples/s | peak GPU memory | MFU | loss first -> last steps |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['strategy']} | failed: {row['error']} | | | | |")
            continue
        mfu = flops * row["samples_per_s"] / (args.peak_tflops * 1e12)
        falls = "falls" if row["loss_last"] < row["loss_first"] else "DOES NOT FALL"
        print(
            f"| {row['strategy']} | {row['precision']} | {row['samples_per_s']:.1f} | {row['peak_gib']:.1f} GiB | "
            f"{100 * mfu:.1f}% | {row['loss_first']:.3f} -> {row['loss_last']:.3f} ({falls}) |"
        )


if __name__ == "__main__":
    main()
