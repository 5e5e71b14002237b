"""DDP and FSDP2 on 2 CPU processes (gloo) against one process holding the whole global batch.

Each distributed job runs under ``torch.distributed.run`` (``parity_job.py``); the reference runs
here. BatchNorm statistics are per rank in the jobs (ALIGN's per-core batch statistics), so the
reference embeds each rank's rows in a separate forward pass and computes the loss over all rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align_lightning import ALIGNModule, ContrastiveLoss, DualEncoder
from tests.strategies.parity_job import CACHED_BATCH, MICRO_BATCH, WORLD, make_batch, make_model, rank_rows

JOB = Path(__file__).with_name("parity_job.py")
REPO = Path(__file__).resolve().parents[2]


def _launch(kind: str, mode: str, out: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={port}"]
    result = subprocess.run([*command, str(JOB), kind, mode, str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _reference_step(lr: float, size: int | None = None, micro: int | None = None, **model_kwargs: bool) -> dict:
    """One SGD step of one process on the global batch, BatchNorm statistics per rank's rows (per
    micro-batch of ``micro`` of a rank's rows, when given)."""
    model = make_model(**model_kwargs)
    batch = make_batch(*([size] if size else []))
    groups = [rank_rows(r, *([size] if size else [])) for r in range(WORLD)]
    if micro is not None:
        groups = [rows[start : start + micro] for rows in groups for start in range(0, len(rows), micro)]
    images = torch.cat([model.encode_image(batch["pixel_values"][rows]) for rows in groups])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    texts = torch.cat([model.encode_text(ids[rows], mask[rows]) for rows in groups])
    loss = ContrastiveLoss(label_smoothing=0.1)(images, texts, model.logit_scale())["loss"]
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= lr * parameter.grad
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Compare the parameter *updates* from the common initial values (i.e. the gradients), not the values."""
    assert set(actual) == set(expected)
    initial = {name: value.detach() for name, value in make_model().named_parameters()}
    largest = max(float((value - initial[name]).abs().max()) for name, value in expected.items())
    moved = 0
    for name, value in expected.items():
        update, expected_update = actual[name] - initial[name], value - initial[name]
        # Tensor-relative: 1e-4 of the tensor's largest update (float32 sums in another order), with a
        # floor of 1e-6 of the model's largest update for updates that are zero in exact arithmetic (a
        # bias before a norm, BERT's key biases) and only float noise here.
        tolerance = 1e-4 * float(expected_update.abs().max()) + 1e-6 * largest
        torch.testing.assert_close(update, expected_update, rtol=0.0, atol=tolerance, msg=name)
        moved += int(expected_update.abs().max() > 0)
    assert moved > len(expected) // 3  # the step changed many parameters: the comparison is not vacuous


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_one_step_equals_single_process_on_the_global_batch(kind: str, tmp_path: Path) -> None:
    _launch(kind, "step", tmp_path)
    _assert_close(torch.load(tmp_path / "params.pt"), _reference_step(lr=0.5))
    if kind == "fsdp2":
        # The full-state-dict checkpoint (save_distributed_checkpoint=False) loads into a plain DualEncoder.
        state = torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"]
        plain = make_model()
        plain.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        _assert_close(dict(plain.named_parameters()), _reference_step(lr=0.5))
        reloaded = ALIGNModule.load_from_checkpoint(tmp_path / "full.ckpt", model=make_model())
        assert isinstance(reloaded.model, DualEncoder)


def test_fsdp2_sharded_checkpoint_resumes_identically(tmp_path: Path) -> None:
    """AdamW: two steps straight == one step, sharded checkpoint, a fresh run resumed for the second step."""
    _launch("fsdp2", "resume", tmp_path)
    results = torch.load(tmp_path / "resume.pt")
    assert results["step"] == 2
    assert (tmp_path / "sharded.ckpt").is_dir()  # a distributed checkpoint: one folder of shards
    _assert_close(results["resumed"], results["straight"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_quickstart_runs_with_the_strategy_on_two_cpu_processes(strategy: str, tmp_path: Path) -> None:
    """The README's command with `--trainer.strategy ddp|fsdp2 --trainer.devices 2`, shortened, to completion
    (with gradient clipping by norm and gradient accumulation).

    Lightning launches the second process by re-running the command, so it runs as a subprocess.
    """
    command = [
        sys.executable, "-m", "align_lightning", "fit", "--config", "recipes/quickstart.yaml",
        f"--trainer.strategy={strategy}", "--trainer.devices=2", "--trainer.max_steps=4",
        "--trainer.gradient_clip_val=1.0", "--trainer.accumulate_grad_batches=2",
        "--trainer.val_check_interval=4", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--data.init_args.num_train=256", "--data.init_args.num_val=16", "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0", f"--data.init_args.root={tmp_path / 'demo'}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = json.loads(next(tmp_path.glob("quickstart/version_*/metrics.json")).read_text())
    assert {"train/loss", "val/loss", "val/demo_retrieval/i2t_R@1", "val/demo_zeroshot/top1"} <= set(metrics)
    assert next(tmp_path.glob("quickstart/version_*/checkpoints/*"))  # a checkpoint (a folder under FSDP2)


def test_fsdp2_bf16_mixed_precision_policy_trains(tmp_path: Path) -> None:
    """bf16 parameters and compute (BatchNorm kept in float32), float32 reduction: the step is the float32
    step up to bf16 rounding (updates point the same way)."""
    _launch("fsdp2", "bf16", tmp_path)
    result = torch.load(tmp_path / "bf16.pt")
    assert torch.isfinite(torch.tensor(result["loss"]))
    initial, expected = dict(make_model().named_parameters()), _reference_step(lr=0.5)
    update = torch.cat([(result["params"][n] - initial[n]).flatten() for n in expected])
    expected_update = torch.cat([(expected[n] - initial[n]).flatten() for n in expected])
    assert torch.nn.functional.cosine_similarity(update, expected_update, dim=0) > 0.95


def test_fsdp2_with_a_frozen_image_tower(tmp_path: Path) -> None:
    """LiT-style: the frozen tower shares no FSDP unit with trainable parameters, stays unchanged, and the
    rest takes the single-process step."""
    _launch("fsdp2", "frozen", tmp_path)
    params = torch.load(tmp_path / "params.pt")
    initial = dict(make_model().named_parameters())
    for name, value in params.items():
        if name.startswith("image_tower."):
            assert torch.equal(value, initial[name].detach()), name
    _assert_close(params, _reference_step(lr=0.5, freeze_image_tower=True))


def test_gradient_caching_under_ddp_and_fsdp2_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """A global batch of 64 (32 pairs per rank, each in 8 micro-batches of 4, gradient caching) takes the
    single-process step on all 64 pairs, with the gradients synchronised once."""
    _launch("both", "gradcache", tmp_path)
    results = torch.load(tmp_path / "gradcache.pt")
    expected = _reference_step(lr=0.5, size=CACHED_BATCH, micro=MICRO_BATCH)
    for strategy in ("ddp", "fsdp2"):
        _assert_close(results[strategy], expected)
    # DDP synchronises once per step: as many bucket all-reduces as a step without caching, not 8 times more.
    assert results[f"ddp_reductions_{MICRO_BATCH}"] == results["ddp_reductions_None"] > 0
