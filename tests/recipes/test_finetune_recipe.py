"""recipes/finetune_flickr30k.yaml: fine-tuning imported Hugging Face ALIGN weights on Karpathy-format pairs.

The recipe's hub name is replaced by a tiny random AlignModel saved locally (with its tokenizer), and
its Flickr30K paths by a generated dataset in the Karpathy JSON format; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from align_lightning.cli import recipe_path, run
from align_lightning.data import KarpathyPairsDataModule
from align_lightning.data.tokenizer import train_wordpiece
from align_lightning.model import AlignVisionTower, from_hf_align
from tests.data.karpathy_utils import write_karpathy
from tests.model.hf_align_utils import save_tiny_align

RECIPE = "finetune_flickr30k"
HUB_NAME = "kakaobrain/align-base"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(annotations, image_root, tiny AlignModel folder with the tokenizer of the captions)."""
    root = tmp_path_factory.mktemp("flickr")
    annotations, image_root = write_karpathy(root, {"train": 6, "val": 2, "test": 3}, captions_per_image=2)
    captions = [s["raw"] for e in json.loads(annotations.read_text())["images"] for s in e["sentences"]]
    tokenizer = train_wordpiece(captions, vocab_size=200, min_frequency=1)
    return annotations, image_root, save_tiny_align(root / "align", tokenizer)


def _overrides(tmp_path: Path, dataset: tuple[Path, Path, Path]) -> list[str]:
    annotations, image_root, align = dataset
    encoder = "--model.model.init_args"
    return [
        f"{encoder}.image_tower.init_args.model_name_or_path={align}",
        f"{encoder}.text_tower.init_args.model_name_or_path={align}",
        f"{encoder}.init_from={align}",
        "--model.model.init_args.grad_checkpointing=false",
        f"--data.init_args.annotations={annotations}",
        f"--data.init_args.image_root={image_root}",
        f"--data.init_args.tokenizer={align}",
        "--data.init_args.image_size=33",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.pin_memory=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        # The recipe's callbacks, evaluating at step 2 instead of 500 (a list given whole replaces the recipe's).
        "--trainer.callbacks="
        + json.dumps(
            [
                {"class_path": "align_lightning.eval.RetrievalEvalCallback", "init_args": {"every_n_steps": 2}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
            ]
        ),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]


def test_recipe_is_the_papers_protocol() -> None:
    recipe = yaml.safe_load(recipe_path(RECIPE).read_text())
    encoder = recipe["model"]["model"]["init_args"]
    assert encoder["init_from"] == HUB_NAME
    assert encoder["image_tower"]["init_args"]["model_name_or_path"] == HUB_NAME
    assert encoder["text_tower"]["init_args"]["model_name_or_path"] == HUB_NAME
    assert recipe["data"]["init_args"]["tokenizer"] == HUB_NAME
    assert recipe["model"]["optimizer"]["init_args"]["lr"] == 1e-5
    assert recipe["trainer"]["max_steps"] == 3000
    assert recipe["model"]["loss"]["init_args"]["label_smoothing"] == 0.1
    gpus_for_2048 = 2048 // recipe["data"]["init_args"]["batch_size"]
    assert f"{recipe['data']['init_args']['batch_size']} x {gpus_for_2048} = 2,048" in recipe_path(RECIPE).read_text()


def test_finetunes_imported_weights_two_steps(tmp_path: Path, dataset: tuple[Path, Path, Path]) -> None:
    align = dataset[2]
    cli = run(["fit", "--config", RECIPE, *_overrides(tmp_path, dataset)])
    assert cli.trainer.global_step == 2
    assert isinstance(cli.datamodule, KarpathyPairsDataModule)
    assert isinstance(cli.model.model.image_tower, AlignVisionTower)
    # Training started from the imported weights and moved them a little (lr 1e-5): a random start would be far.
    imported = dict(from_hf_align(str(align)).named_parameters())
    tuned = dict(cli.model.model.named_parameters())
    assert tuned.keys() == imported.keys()
    distance = max((tuned[k].detach() - imported[k].detach()).abs().max().item() for k in tuned)
    assert 0 < distance < 1e-3
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    for key in ("train/loss", "train/temperature", "val/flickr30k/i2t_R@1", "val/flickr30k/t2i_R@10"):
        assert key in metrics, key
    # 6 train images x 2 captions = 12 pairs; the test split's 3 images x 2 captions were evaluated.
    assert len(cli.datamodule.train_split.captions) == 12
    assert cli.datamodule.retrieval_datamodule().text_to_image.tolist() == [0, 0, 1, 1, 2, 2]
