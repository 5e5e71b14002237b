"""Every recipe parses and trains (tiny towers swapped in); the quickstart runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from align_lightning.cli import recipes_dir, run
from align_lightning.data.tokenizer import train_wordpiece
from tests.conftest import TINY_BERT
from tests.data.karpathy_utils import write_karpathy
from tests.data.shard_utils import write_shards
from tests.model.hf_align_utils import save_tiny_align

RECIPES = sorted(recipes_dir().glob("*.yaml"))
#: Recipes that train (the others, eval_*.yaml, evaluate a checkpoint).
TRAINING = [p for p in RECIPES if not p.stem.startswith("eval_")]
EVALUATION = [p for p in RECIPES if p.stem.startswith("eval_")]


def _tiny_imported(recipe: dict, tmp_path: Path) -> dict:
    """A recipe that fine-tunes an imported Hugging Face ALIGN checkpoint: a tiny random one saved locally
    replaces the hub name (nothing is downloaded), a generated Karpathy-format set the data paths."""
    annotations, image_root = write_karpathy(tmp_path / "karpathy", {"train": 8, "test": 3})
    captions = [s["raw"] for e in json.loads(annotations.read_text())["images"] for s in e["sentences"]]
    align = save_tiny_align(tmp_path / "align", train_wordpiece(captions, vocab_size=200, min_frequency=1))
    hub_name = recipe["model"]["model"]["init_args"]["init_from"]
    recipe = yaml.safe_load(yaml.safe_dump(recipe).replace(hub_name, str(align)))
    recipe["data"]["init_args"].update(
        annotations=str(annotations), image_root=str(image_root), batch_size=8, image_size=32, num_workers=0,
        pin_memory=False,
    )  # fmt: skip
    trainer = recipe["trainer"]
    trainer.update(accelerator="cpu", devices=1, strategy="auto", default_root_dir=str(tmp_path))
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path)
    return recipe


def _tiny(recipe: dict, tmp_path: Path) -> dict:
    """The same recipe with CPU-sized towers and data: only sizes change, never the wiring."""
    encoder = recipe["model"]["model"]["init_args"]
    if "init_from" in encoder:
        return _tiny_imported(recipe, tmp_path)
    encoder["image_tower"]["init_args"].update(model_name="test_efficientnet", pretrained=False)
    text = encoder["text_tower"]["init_args"]
    text.update(config={k: v for k, v in TINY_BERT.items() if k != "vocab_size"}, pretrained=False)
    text.pop("model_name_or_path", None)
    encoder["embed_dim"] = None
    if recipe["model"].get("micro_batch_size"):
        recipe["model"]["micro_batch_size"] = 4  # gradient caching still on: 2 micro-batches per batch of 8
    data = recipe["data"]["init_args"]
    data.update(batch_size=8, image_size=32, num_workers=0, tokenizer=None, vocab_size=200)
    if recipe["data"]["class_path"].endswith("WebDataModule"):
        shards = write_shards(str(tmp_path / "shards" / "{:02d}.tar"), 48, per_shard=16)
        val = write_shards(str(tmp_path / "val" / "{:02d}.tar"), 16, per_shard=16)
        data.update(train_urls=shards, val_urls=val, pin_memory=False)
        if data.get("resampled"):
            data["samples_per_epoch"] = 32
    else:
        data.update(num_train=32, num_val=16)
    trainer = recipe["trainer"]
    trainer.update(accelerator="cpu", devices=1, strategy="auto", default_root_dir=str(tmp_path))
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path)
    return recipe


def test_every_recipe_has_a_header() -> None:
    assert {p.stem for p in RECIPES} >= {"quickstart", "align_base", "align_l2"}
    assert {p.stem for p in EVALUATION} == {"eval_flickr30k", "eval_coco", "eval_imagenet"}
    for path in RECIPES:
        header = path.read_text().split("\n", 1)[0]
        assert header.startswith("# "), f"{path.name} must start with a comment header"
        assert "python -m align_lightning" in path.read_text(), f"{path.name}: header must give the command"


@pytest.mark.parametrize("recipe_path", TRAINING, ids=[p.stem for p in TRAINING])
def test_recipe_trains_with_tiny_towers(recipe_path: Path, tmp_path: Path) -> None:
    recipe = _tiny(yaml.safe_load(recipe_path.read_text()), tmp_path)
    config = tmp_path / recipe_path.name
    config.write_text(yaml.safe_dump(recipe))
    cli = run(["fit", "--config", str(config), "--trainer.fast_dev_run=2"])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 2
    # The recipe's wiring survived: its loss, optimizer and precision are the ones used.
    assert cli.model.loss.label_smoothing == recipe["model"]["loss"]["init_args"]["label_smoothing"]
    assert type(cli.trainer.optimizers[0]).__name__ == recipe["model"]["optimizer"]["class_path"].rsplit(".", 1)[1]


def test_quickstart_end_to_end_short(tmp_path: Path) -> None:
    """The README's main command, shortened: fit, then metrics.json with the contract keys."""
    cli = run(
        [
            "fit",
            "--config",
            "recipes/quickstart.yaml",
            "--trainer.max_epochs=2",
            "--data.init_args.num_train=256",
            "--data.init_args.num_val=64",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    kept = cli.datamodule.filter_report["totals"]["kept"]  # ALIGN's filter ran on the demo shards
    assert 200 < kept < 256
    assert cli.trainer.global_step == 2 * (kept // 64)  # two epochs of full batches
    for key in ("train/loss", "train/temperature", "train/lr", "val/loss", "val/demo/i2t_R@1", "val/demo/t2i_R@1"):
        assert key in metrics, key
    # The held-out evaluation sets in the real formats, through the evaluation callbacks, and their pictures.
    for k in (1, 5, 10):
        assert 0.0 <= metrics[f"val/demo_retrieval/i2t_R@{k}"] <= 1.0
        assert 0.0 <= metrics[f"val/demo_retrieval/t2i_R@{k}"] <= 1.0
    assert 0.0 <= metrics["val/demo_zeroshot/top1"] <= metrics["val/demo_zeroshot/top5"] <= 1.0
    figures = {p.name for p in (Path(cli.trainer.log_dir) / "figures").iterdir()}
    step = cli.trainer.global_step
    assert f"val_demo_retrieval_retrieval_examples_step{step:07d}.png" in figures
    assert f"val_demo_zeroshot_confusion_matrix_step{step:07d}.png" in figures
    assert (Path(cli.trainer.log_dir) / "metrics.csv").is_file()
    # The demo corpus holds a truncated JPEG that ALIGN's filter (headers only) lets through:
    # decoding finds it each epoch, skips it and counts it, in metrics.json and in the logger.
    assert metrics["data/skipped/corrupt_image"] == 2
    assert metrics["data/samples"] == cli.trainer.global_step * 64  # full batches (drop_last)
    assert "data/skipped/corrupt_image" in (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_quickstart_full_learns_above_chance(tmp_path: Path) -> None:
    """The full quickstart (about 4 minutes on 2 cores): held-out retrieval far above chance."""
    cli = run(["fit", "--config", "recipes/quickstart.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    chance_at_10 = 10 / 512
    assert metrics["val/demo/i2t_R@10"] > 5 * chance_at_10
    assert metrics["val/demo/t2i_R@10"] > 5 * chance_at_10
    assert metrics["val/demo/i2t_R@1"] > 5 / 512
    # The held-out sets in the evaluation formats: retrieval with 5 captions per image, zero-shot over 48 classes.
    assert metrics["val/demo_retrieval/i2t_R@10"] > 5 * chance_at_10
    assert metrics["val/demo_retrieval/t2i_R@10"] > 5 * chance_at_10
    assert metrics["val/demo_zeroshot/top1"] > 3 / 48
    assert metrics["train/temperature"] != pytest.approx(0.1, abs=1e-3)  # learned, not frozen at its init


def test_quickstart_with_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    """Lightning DDP (gloo): the all-gathered loss, no unused parameters, validation and metrics.json."""
    cli = run(
        [
            "fit",
            "--config",
            "recipes/quickstart.yaml",
            "--trainer.strategy=ddp_spawn",
            "--trainer.devices=2",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--data.init_args.num_train=256",
            "--data.init_args.num_val=32",
            "--data.init_args.batch_size=16",
            "--data.init_args.num_workers=0",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    metrics = json.loads(next(tmp_path.glob("quickstart/version_*/metrics.json")).read_text())
    assert cli.trainer.world_size == 2
    assert {"train/loss", "val/loss", "val/demo/i2t_R@1"} <= set(metrics)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "fsdp2", "fsdp_align"])
@pytest.mark.parametrize("recipe_path", TRAINING, ids=[p.stem for p in TRAINING])
def test_recipe_accepts_every_strategy(recipe_path: Path, strategy: str, tmp_path: Path) -> None:
    """Each training recipe builds with each supported strategy value (2 devices; nothing is launched)."""
    import torch
    from lightning.pytorch.core.datamodule import LightningDataModule
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from align_lightning import ALIGNModule
    from align_lightning.cli import ALIGNCLI
    from align_lightning.strategies import FSDP2Strategy

    if strategy == "fsdp_align" and not torch.cuda.is_available():
        pytest.skip("fsdp_align is FSDP1 (Lightning's FSDPStrategy), which Lightning runs on GPUs only; no CUDA here")
    config = tmp_path / recipe_path.name
    config.write_text(yaml.safe_dump(_tiny(yaml.safe_load(recipe_path.read_text()), tmp_path)))
    cli = ALIGNCLI(
        ALIGNModule,
        LightningDataModule,
        subclass_mode_data=True,
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=["--config", str(config), f"--trainer.strategy={strategy}", "--trainer.devices=2"],
    )
    expected = {"ddp": DDPStrategy, "ddp_spawn": DDPStrategy, "fsdp2": FSDP2Strategy, "fsdp_align": FSDPStrategy}
    assert isinstance(cli.trainer.strategy, expected[strategy])
    assert cli.trainer.num_devices == 2
