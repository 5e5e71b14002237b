"""Exact mid-epoch resume: kill -9 a training run, restart from its last checkpoint, compare the keys trained on."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.data.shard_utils import write_shards

ROOT = Path(__file__).resolve().parents[2]


def _train(tmp: Path, name: str, *extra: str, ckpt: str | None = None, expect_kill: bool = False) -> None:
    command = [
        sys.executable,
        "-m",
        "tests.data.resume_job",
        "--shards",
        str(tmp / "shards" / "{00..02}.tar"),
        "--log",
        str(tmp / f"{name}.jsonl"),
        "--ckpt-dir",
        str(tmp / (ckpt or name)),
        *extra,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]


def _log(path: Path) -> list[tuple[int, list[str]]]:
    return [(e["epoch"], e["keys"]) for e in map(json.loads, path.read_text().splitlines())]


def _per_epoch(batches: list[tuple[int, list[str]]]) -> dict[int, Counter[str]]:
    epochs: dict[int, Counter[str]] = {}
    for epoch, keys in batches:
        epochs.setdefault(epoch, Counter()).update(keys)
    return epochs


@pytest.mark.parametrize("resampled", [False, True], ids=["exactly-once", "resampled"])
def test_resume_after_kill_sees_exactly_the_unseen_samples(tmp_path: Path, resampled: bool) -> None:
    write_shards(str(tmp_path / "shards" / "{:02d}.tar"), 60, per_shard=20)
    mode = ["--resampled"] if resampled else []
    _train(tmp_path, "full", *mode)
    _train(tmp_path, "killed", *mode, "--kill-at", "5", expect_kill=True)
    killed = _log(tmp_path / "killed.jsonl")
    assert len(killed) == 5  # steps 0-4 trained and checkpointed; killed inside step 5
    shutil.copytree(tmp_path / "killed", tmp_path / "killed-1worker")
    shutil.copy(tmp_path / "killed.jsonl", tmp_path / "killed-1worker.jsonl")

    # Same workers: the resumed run continues the uninterrupted run's exact sequence of batches.
    _train(tmp_path, "killed", *mode, "--resume")
    full = _log(tmp_path / "full.jsonl")
    assert _log(tmp_path / "killed.jsonl") == full
    if not resampled:
        everything = Counter(f"{i:09d}" for i in range(60))
        assert all(keys == everything for keys in _per_epoch(full).values())

    # One worker instead of two: the interrupted epoch still gets exactly its unseen samples.
    _train(tmp_path, "killed-1worker", *mode, "--resume", "--num-workers", "1", ckpt="killed-1worker")
    other = _per_epoch(_log(tmp_path / "killed-1worker.jsonl"))
    if resampled:  # fresh draws, but the epoch keeps its length
        assert sum(other[0].values()) == sum(_per_epoch(full)[0].values())
    else:
        assert other == _per_epoch(full)
