"""Training throughput of ``ALIGNModule`` under the Lightning Trainer versus a plain PyTorch loop.

Peer: a hand-written PyTorch loop (forward, loss, zero_grad, backward, optimizer and scheduler step)
over the *same* model architecture, initial weights, in-memory batches, optimiser and schedule. The
ratio ``lightning / plain`` of samples/s is the cost of Lightning (logging, hooks, loops); the
target is >= 0.95. The two modes alternate ``--repeats`` times and the medians are compared, so
background noise affects both alike. Batches are built once in memory: data loading is not measured.

    python benchmarks/train_step.py                       # quickstart-sized model, 64 px, batch 64
    python benchmarks/train_step.py --steps 30 --no-record

Prints a table and appends it, with hardware, versions and the command, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import timm
import torch
import transformers
from timm.optim import Lamb
from torch.utils.data import DataLoader, Dataset

from align_lightning.data import DemoDataModule
from align_lightning.losses import ContrastiveLoss
from align_lightning.model import DualEncoder, ImageTower, TextTower
from align_lightning.module import ALIGNModule
from align_lightning.optim import WarmupLinearDecay, weight_decay_param_groups

RESULTS = Path(__file__).with_name("RESULTS.md")
TEXT_CONFIG = {
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}
TARGET = 0.95


class _Batches(Dataset):
    """Pre-collated batches served as they are (``batch_size=None`` loader)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


class _Timer(L.Callback):
    """Wall time from the start of the first measured step to the end of the last."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.end = time.perf_counter()


def _build(vocab_size: int) -> tuple[DualEncoder, ContrastiveLoss]:
    torch.manual_seed(0)
    model = DualEncoder(ImageTower("test_efficientnet"), TextTower(config=TEXT_CONFIG, vocab_size=vocab_size))
    return model, ContrastiveLoss(label_smoothing=0.1)


def run_plain(model: DualEncoder, loss_fn: ContrastiveLoss, batches: list[dict], warmup: int) -> float:
    """The peer: a plain PyTorch loop. Returns seconds for the batches after ``warmup``."""
    optimizer = Lamb(weight_decay_param_groups(model), lr=5e-3, weight_decay=1e-5)
    scheduler = WarmupLinearDecay(optimizer, warmup_steps=10, total_steps=len(batches))
    model.train()
    start = 0.0
    for step, batch in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        loss = loss_fn(*model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return time.perf_counter() - start


def run_lightning(model: DualEncoder, loss_fn: ContrastiveLoss, batches: list[dict], warmup: int) -> float:
    """``ALIGNModule`` under ``lightning.Trainer``. Returns seconds for the batches after ``warmup``."""
    module = ALIGNModule(
        model,
        loss_fn,
        optimizer=partial(Lamb, lr=5e-3, weight_decay=1e-5),
        lr_scheduler=partial(WarmupLinearDecay, warmup_steps=10, total_steps=len(batches)),
    )
    timer = _Timer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DataLoader(_Batches(batches), batch_size=None, num_workers=0))
    return timer.end - timer.start


def _environment() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return [
        f"- Hardware: {cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GiB RAM, "
        f"torch threads {torch.get_num_threads()}, no GPU",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}, "
        f"timm {timm.__version__}, transformers {transformers.__version__}, align_lightning commit {commit.strip()}",
        f"- Command: `python {' '.join(sys.argv)}`",
    ]


def main() -> None:
    """Parse flags, run both modes alternately, print and record the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (alternating); medians compared")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = DemoDataModule(num_train=args.batch_size * 8, image_size=args.image_size, batch_size=args.batch_size)
    distinct = list(data.train_dataloader())
    batches = [distinct[i % len(distinct)] for i in range(args.warmup + args.steps)]
    model, loss_fn = _build(len(data.tokenizer))

    runners = {"plain PyTorch loop": run_plain, "Lightning ALIGNModule": run_lightning}
    seconds: dict[str, list[float]] = {mode: [] for mode in runners}
    for _ in range(args.repeats):
        for mode, run in runners.items():
            seconds[mode].append(run(copy.deepcopy(model), copy.deepcopy(loss_fn), batches, args.warmup))

    samples = args.steps * args.batch_size
    throughput = {mode: samples / statistics.median(times) for mode, times in seconds.items()}
    ratio = throughput["Lightning ALIGNModule"] / throughput["plain PyTorch loop"]
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    rows = [
        "| mode | samples/s (median) | ms/step (median) | runs (samples/s) |",
        "|---|---|---|---|",
        *(
            f"| {mode} | {throughput[mode]:.1f} | {1000 * statistics.median(times) / args.steps:.1f} | "
            f"{', '.join(f'{samples / t:.1f}' for t in times)} |"
            for mode, times in seconds.items()
        ),
        f"| **ratio lightning / plain** | **{ratio:.3f}** | target >= {TARGET} | {verdict} |",
    ]
    setup = (
        f"- Setup: quickstart-sized towers (test_efficientnet + 2-layer BERT-64), {args.image_size} px, "
        f"batch {args.batch_size}, LAMB + warm-up/decay, {args.warmup} warm-up + {args.steps} measured steps, "
        f"{args.repeats} alternating runs per mode"
    )
    print("\n".join(rows))
    if not args.no_record:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n\nDated entries appended by the scripts in this folder.\n")
        entry = [f"\n## {stamp} - train_step.py: Lightning vs plain PyTorch loop\n", *_environment(), setup, "", *rows]
        with RESULTS.open("a") as f:
            f.write("\n".join(entry) + "\n")


if __name__ == "__main__":
    main()
