"""Training throughput of ``ALIGNModule`` under the Lightning Trainer versus a plain PyTorch loop.

What it measures: samples/s of CPU training steps (forward, contrastive loss, backward, LAMB step,
per-step learning-rate schedule) of the quickstart-sized ALIGN model (timm ``test_efficientnet`` image
tower + 2-layer BERT-64 text tower), run by :class:`~align_lightning.module.ALIGNModule` under
``lightning.Trainer``, logging included, as a real run does.

Peer: a hand-written PyTorch loop (forward, loss, ``zero_grad``, backward, optimizer and scheduler
step) over the *same* architecture, initial weights, seed, in-memory batches, optimiser and schedule.
The ratio ``lightning / plain`` of samples/s is the cost of Lightning (hooks, loops, logging); the
target is >= 0.95, i.e. under 5% overhead. Both modes reach the same final loss, which shows that
they do the same work. The modes alternate (ABBA order) ``--repeats`` times and the medians are
compared, so background load hits both alike. Batches are collated once, before any timing, so data
loading is not measured; the first ``--warmup`` steps of each run are not timed either.

Run from the repository root::

    python benchmarks/train_step.py                      # 64 px, batch 64, 10 + 60 steps, 3 repeats
    python benchmarks/train_step.py --steps 10 --warmup 3 --repeats 1 --no-record   # smoke test

It prints a table and appends it, with the date, hardware, versions and command, to
``benchmarks/RESULTS.md`` (``--no-record`` skips that).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from functools import partial

import lightning as L
import timm
import torch
import transformers
from _results import RESULTS, append_entry, cpu_name, git_commit, memory_gib
from timm.optim import Lamb
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from align_lightning.data import DemoDataModule
from align_lightning.losses import ContrastiveLoss
from align_lightning.model import DualEncoder, ImageTower, TextTower
from align_lightning.module import ALIGNModule
from align_lightning.optim import WarmupLinearDecay, weight_decay_param_groups

Batch = dict[str, Tensor]

TEXT_CONFIG = {
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}
LR = 5e-3
WEIGHT_DECAY = 1e-5
LR_WARMUP_STEPS = 10
SEED = 0
DISTINCT_BATCHES = 8
TARGET = 0.95
PLAIN, LIGHTNING = "plain PyTorch loop", "Lightning ALIGNModule"


@dataclass(frozen=True)
class RunResult:
    """Outcome of one timed run.

    Attributes:
        seconds: Wall time of the measured steps.
        final_loss: Training loss of the last step.
    """

    seconds: float
    final_loss: float


class PrebuiltBatches(Dataset):
    """Serves already-collated batches as they are (for a ``batch_size=None`` DataLoader).

    Args:
        batches: The collated batches, in the order they are served.
    """

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


class StepTimer(L.Callback):
    """Times the Trainer from the start of the first measured batch to the end of the epoch.

    The epoch holds exactly the run's batches, so its end comes right after the last step has finished
    all of its work (scheduler step, ``ALIGNModule.on_train_batch_end`` logging, metric bookkeeping).

    Args:
        warmup: Index of the first measured batch.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch, batch_idx: int
    ) -> None:
        """Start the clock at the first measured batch."""
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock after the last batch."""
        self.end = time.perf_counter()


def build_model(vocab_size: int) -> tuple[DualEncoder, ContrastiveLoss]:
    """Build the quickstart-sized dual encoder and ALIGN's loss from a fixed seed.

    Args:
        vocab_size: Size of the tokenizer's vocabulary.

    Returns:
        The model and the loss.
    """
    torch.manual_seed(SEED)
    text_tower = TextTower(config=TEXT_CONFIG, vocab_size=vocab_size)
    return DualEncoder(ImageTower("test_efficientnet"), text_tower), ContrastiveLoss(label_smoothing=0.1)


def make_batches(batch_size: int, image_size: int, count: int) -> tuple[list[Batch], int]:
    """Collate demo batches once, in memory, and repeat them to ``count`` batches.

    Args:
        batch_size: Pairs per batch.
        image_size: Image side in pixels.
        count: Number of batches to return.

    Returns:
        The batches and the tokenizer's vocabulary size.
    """
    torch.manual_seed(SEED)
    data = DemoDataModule(num_train=batch_size * DISTINCT_BATCHES, image_size=image_size, batch_size=batch_size)
    distinct = list(data.train_dataloader())
    return [distinct[i % len(distinct)] for i in range(count)], len(data.tokenizer)


def run_plain(model: DualEncoder, loss_fn: ContrastiveLoss, batches: list[Batch], warmup: int) -> RunResult:
    """The peer: a plain PyTorch training loop.

    Args:
        model: A fresh copy of the model.
        loss_fn: A fresh copy of the loss.
        batches: All batches of the run, warm-up included.
        warmup: Number of leading batches not timed.

    Returns:
        Time of the batches after ``warmup`` and the last loss.
    """
    optimizer = Lamb(weight_decay_param_groups(model), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = WarmupLinearDecay(optimizer, warmup_steps=min(LR_WARMUP_STEPS, len(batches)), total_steps=len(batches))
    torch.manual_seed(SEED)
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        loss = loss_fn(*model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return RunResult(time.perf_counter() - start, loss.item())


def run_lightning(model: DualEncoder, loss_fn: ContrastiveLoss, batches: list[Batch], warmup: int) -> RunResult:
    """``ALIGNModule`` trained by ``lightning.Trainer`` on the same batches.

    Args:
        model: A fresh copy of the model.
        loss_fn: A fresh copy of the loss.
        batches: All batches of the run, warm-up included.
        warmup: Number of leading batches not timed.

    Returns:
        Time of the batches after ``warmup`` and the last loss.
    """
    module = ALIGNModule(
        model,
        loss_fn,
        optimizer=partial(Lamb, lr=LR, weight_decay=WEIGHT_DECAY),
        # total_steps is left to ALIGNModule, which sets it to max_steps = len(batches), as the plain loop.
        lr_scheduler=partial(WarmupLinearDecay, warmup_steps=min(LR_WARMUP_STEPS, len(batches))),
    )
    timer = StepTimer(warmup)
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
    # Its own generator, so creating the iterator draws no number from the global RNG: the dropout
    # masks then match the plain loop's, and so does the loss.
    loader = DataLoader(PrebuiltBatches(batches), batch_size=None, num_workers=0, generator=torch.Generator())
    torch.manual_seed(SEED)
    trainer.fit(module, loader)
    return RunResult(timer.end - timer.start, float(trainer.callback_metrics["train/loss"]))


def environment() -> list[str]:
    """Markdown bullet lines describing the hardware and the library versions."""
    return [
        f"- Hardware: {cpu_name()}, {os.cpu_count()} cores, "
        f"{memory_gib():.0f} GiB RAM; torch threads {torch.get_num_threads()}; run on CPU",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}, "
        f"timm {timm.__version__}, transformers {transformers.__version__}, align_lightning commit {git_commit()}",
    ]


def results_table(results: dict[str, list[RunResult]], steps: int, batch_size: int) -> list[str]:
    """Format the medians of both modes and their ratio as a markdown table.

    Args:
        results: The runs of each mode.
        steps: Measured steps per run.
        batch_size: Pairs per step.

    Returns:
        The table's lines; the last one holds the ratio lightning / plain of the median samples/s.
    """
    samples = steps * batch_size
    median_seconds = {mode: statistics.median(r.seconds for r in runs) for mode, runs in results.items()}
    ratio = median_seconds[PLAIN] / median_seconds[LIGHTNING]
    return [
        "| mode | samples/s (median) | ms/step (median) | runs (samples/s) | final loss |",
        "|---|---|---|---|---|",
        *(
            f"| {mode} | {samples / median_seconds[mode]:.1f} | {1000 * median_seconds[mode] / steps:.1f} | "
            f"{', '.join(f'{samples / r.seconds:.1f}' for r in runs)} | {runs[0].final_loss:.4f} |"
            for mode, runs in results.items()
        ),
        f"| **ratio lightning / plain** | **{ratio:.3f}** | target >= {TARGET} | "
        f"**{'PASS' if ratio >= TARGET else 'FAIL'}** | |",
    ]


def record(rows: list[str], notes: list[str]) -> None:
    append_entry("train_step.py: Lightning vs plain PyTorch loop", [*environment(), *notes], rows)


def parse_args() -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step (default: 64)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run (default: 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each run (default: 10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating; medians compared")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: unchanged); fewer than the cores avoids stalls when other jobs run",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()
    for name in ("batch_size", "image_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main() -> None:
    """Run both modes alternately, print the table and record it."""
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Keep the output to the results: Lightning's banners, and its advice on the loader's workers and the
    # validation loop (the in-memory loader needs no workers; validation is off on purpose).
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")

    load_before = os.getloadavg()[0]
    batches, vocab_size = make_batches(args.batch_size, args.image_size, args.warmup + args.steps)
    model, loss_fn = build_model(vocab_size)
    runners = {PLAIN: run_plain, LIGHTNING: run_lightning}
    results: dict[str, list[RunResult]] = {mode: [] for mode in runners}
    for repeat in range(args.repeats):
        # ABBA order: neither mode always runs first, so drifts in machine load even out.
        for mode in runners if repeat % 2 == 0 else reversed(runners):
            run = runners[mode](copy.deepcopy(model), copy.deepcopy(loss_fn), batches, args.warmup)
            results[mode].append(run)
            throughput = args.steps * args.batch_size / run.seconds
            print(f"{mode}, run {repeat + 1}/{args.repeats}: {throughput:.1f} samples/s")

    rows = results_table(results, args.steps, args.batch_size)
    # Other processes slow both modes, but unevenly across runs: a load well above 1 (this benchmark)
    # means the medians are noisy.
    load = (
        f"- Machine load (1-min load average): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
        f"on {os.cpu_count()} cores"
    )
    print("\n" + "\n".join([*rows, "", load]))
    if not args.no_record:
        setup = (
            f"- Setup: quickstart-sized towers (test_efficientnet + 2-layer BERT-64), {args.image_size} px, "
            f"batch {args.batch_size}, LAMB (lr {LR}) + warm-up/linear decay, {args.warmup} untimed + "
            f"{args.steps} timed steps per run, {args.repeats} runs per mode in ABBA order"
        )
        record(rows, [setup, load])
        print(f"\nAppended to {RESULTS}")


if __name__ == "__main__":
    main()
