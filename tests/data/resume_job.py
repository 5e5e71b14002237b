"""Training job for the kill -9 resume test: run as ``python -m tests.data.resume_job ...``.

Trains a trivial model on a :class:`WebDataModule`, saving a checkpoint after every step and
appending each trained batch's sample keys to a log; ``--kill-at N`` kills the process with
SIGKILL inside training step N (no clean-up runs, as for a lost node).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from align_lightning.data import WebDataModule


class KeyRecorder(L.LightningModule):
    """Logs the keys of every batch it trains on."""

    def __init__(self, log_path: str, kill_at: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.log_path = log_path
        self.kill_at = kill_at

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.layer(batch["pixel_values"].mean((2, 3))).pow(2).mean()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        with open(self.log_path, "a") as log:
            log.write(json.dumps({"epoch": self.current_epoch, "keys": batch["keys"]}) + "\n")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--resampled", action="store_true")
    args = parser.parse_args()
    datamodule = WebDataModule(
        args.shards,
        num_workers=args.num_workers,
        batch_size=8,
        image_size=16,
        vocab_size=200,
        shuffle_buffer=8,
        resampled=args.resampled,
        samples_per_epoch=64 if args.resampled else None,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=1)],
    )
    ckpt = os.path.join(args.ckpt_dir, "last.ckpt") if args.resume else None
    trainer.fit(KeyRecorder(args.log, args.kill_at), datamodule, ckpt_path=ckpt)


if __name__ == "__main__":
    main()
