"""Shared by the inference and CLIP_benchmark tests: a tiny trained checkpoint and generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_DATA_ARGS

#: Colour and shape words the quickstart's learned tokenizer knows (its demo captions use them).
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
PLACES = ("at the top", "at the bottom", "in the middle")


def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written by ``fit`` (so it records its model configuration and tokenizer): the quickstart
    recipe, 32 px images, one training step. Built once per test session, whichever test file asks first."""
    from align_lightning.cli import run

    folder = tmp_path_factory.getbasetemp() / "tiny_checkpoint"
    found = sorted(folder.glob("**/checkpoints/*.ckpt"))
    if found:
        return found[0]
    run(
        [
            "fit",
            "--config",
            "quickstart",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *TINY_DATA_ARGS,
            f"--trainer.logger.init_args.save_dir={folder}",
        ]
    )
    return sorted(folder.glob("**/checkpoints/*.ckpt"))[0]


def noise_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A random RGB image (distinct images give distinct embeddings, even from an untrained model)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def caption(seed: int) -> str:
    """A caption in the demo's words, different for each seed below 108 (distinct words, not only numbers: the
    near-identical embeddings of a barely trained model must not tie)."""
    colour, rest = COLOURS[seed % len(COLOURS)], seed // len(COLOURS)
    return f"a {colour} {SHAPES[rest % len(SHAPES)]} {PLACES[rest // len(SHAPES) % len(PLACES)]}"


def write_retrieval_set(folder: Path, num_images: int, captions_per_image: int) -> tuple[Path, Path]:
    """Images ``images/img_<i>.jpg`` with their captions as a Karpathy split JSON (split ``test``) and as
    CLIP_benchmark's Flickr annotation file (``image,caption`` lines).

    Returns:
        ``(karpathy_json, flickr_annotations)``; the image root is ``folder``.
    """
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries, lines = [], ["image,caption"]
    for i in range(num_images):
        name = f"img_{i:03d}.jpg"
        noise_image(i).save(folder / "images" / name, quality=95)
        raws = [caption(i * captions_per_image + j) for j in range(captions_per_image)]
        entries.append(
            {"filepath": "images", "filename": name, "split": "test", "sentences": [{"raw": r} for r in raws]}
        )
        lines += [f"images/{name},{raw}" for raw in raws]
    karpathy = folder / "karpathy.json"
    karpathy.write_text(json.dumps({"images": entries}))
    flickr = folder / "flickr_test.txt"
    flickr.write_text("\n".join(lines) + "\n")
    return karpathy, flickr


def gather_on_two_ranks(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group gathering uneven shares of embedding rows on rank 0 (kept in this light
    module, so that spawned processes import neither the test modules nor Lightning)."""
    import os

    import torch.distributed as dist

    from align_lightning.embeddings import gather_rows_on_rank_zero

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Rows 0..6 dealt unevenly (rank 0: 0, 2, 4, 6; rank 1: 1, 3, 5), sorted by (index, rank); then rows that
        # only rank 1 has. Two rows per round: several rounds, and a rank that runs out first.
        indices = [0, 2, 4, 6] if rank == 0 else [1, 3, 5]
        rows = np.repeat(np.asarray(indices, np.float32)[:, None], 3, axis=1)
        order = np.stack([indices, [rank] * len(indices)], axis=1)
        interleaved = gather_rows_on_rank_zero(rows, [f"k{i}" for i in indices], order, chunk_rows=2)
        only_one = gather_rows_on_rank_zero(
            np.ones((2, 3), np.float32) if rank else np.zeros((0, 0), np.float32),
            ["a", "b"] if rank else [],
            np.array([[1], [0]]) if rank else np.zeros((0, 1), np.int64),
            chunk_rows=2,
        )
        if rank == 0:
            assert interleaved is not None
            assert only_one is not None
            np.savez(
                f"{out}/gathered.npz",
                rows=interleaved[0],
                keys=np.array(interleaved[1]),
                one_rows=only_one[0],
                one_keys=np.array(only_one[1]),
            )
        else:
            assert interleaved is None
    finally:
        dist.destroy_process_group()
