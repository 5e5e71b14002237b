"""The evaluation recipes: `validate` / `test --config recipes/eval_<x>.yaml --ckpt_path ...` on a trained checkpoint.

A tiny quickstart run gives the checkpoint; the recipes' placeholder paths are pointed at the demo
corpus, which is in the real formats (Karpathy JSON, ImageFolder). The model's configuration and
tokenizer come from the checkpoint alone, and the logged values equal a direct computation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from align_lightning import ALIGNModule
from align_lightning.cli import recipe_path, run
from align_lightning.data import RetrievalDataModule, ZeroShotDataModule
from align_lightning.eval import retrieval_metrics, topk_accuracy, zeroshot_classifier

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    """(checkpoint, demo corpus, training tokenizer) of a 4-step quickstart run."""
    tmp = tmp_path_factory.mktemp("quick")
    cli = run(
        [
            "fit", "--config", "quickstart", *QUIET, "--trainer.max_steps=4", "--trainer.num_sanity_val_steps=0",
            "--data.init_args.num_train=64", "--data.init_args.num_val=21", "--data.init_args.batch_size=8",
            "--data.init_args.image_size=32", "--data.init_args.num_workers=0", f"--data.init_args.root={tmp / 'demo'}",
            f"--trainer.logger.init_args.save_dir={tmp}",
        ]
    )  # fmt: skip
    checkpoint = next((Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    return checkpoint, cli.datamodule.corpus, cli.datamodule.tokenizer


def _data_args(name: str, corpus) -> list[str]:  # noqa: ANN001
    common = ["--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--data.init_args.batch_size=8"]
    if name == "eval_imagenet":
        return [
            f"--data.init_args.root={corpus.zeroshot_root}",
            f"--data.init_args.classnames={corpus.classnames_file}",
            f"--data.init_args.templates={corpus.templates_file}",
            *common,
        ]
    return [
        f"--data.init_args.annotations={corpus.karpathy_json}",
        f"--data.init_args.image_root={corpus.image_root}",
    ] + common


def _expected(name: str, checkpoint: Path, corpus) -> dict[str, float]:  # noqa: ANN001
    """The metrics computed directly from the checkpoint's model and tokenizer, on the whole set at once."""
    module = ALIGNModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    model, tokenizer = module.model, module.tokenizer
    with torch.no_grad():
        if name == "eval_imagenet":
            data = ZeroShotDataModule(
                corpus.zeroshot_root, classnames=str(corpus.classnames_file), templates=corpus.templates_file,
                image_size=32, num_workers=0,
            )  # fmt: skip
            images = torch.cat([model.encode_image(b["pixel_values"]) for b in data.image_dataloader()])
            classifier = zeroshot_classifier(model, data.classnames, data.templates, tokenizer)
            return topk_accuracy(images @ classifier, data.targets, ks=(1, 5))
        data = RetrievalDataModule(
            corpus.karpathy_json, corpus.image_root, image_size=32, tokenizer=tokenizer, num_workers=0
        )
        images = torch.cat([model.encode_image(b["pixel_values"]) for b in data.image_dataloader()])
        texts = torch.cat([model.encode_text(b["input_ids"], b["attention_mask"]) for b in data.text_dataloader()])
        return retrieval_metrics(images, texts, data.text_to_image, median_rank=True)


@pytest.mark.parametrize(
    ("recipe", "stage"),
    [("eval_flickr30k", "validate"), ("eval_coco", "test"), ("eval_imagenet", "validate"), ("eval_imagenet", "test")],
)
def test_eval_recipe_from_a_checkpoint(recipe: str, stage: str, trained, tmp_path: Path) -> None:  # noqa: ANN001
    checkpoint, corpus, training_tokenizer = trained
    cli = run(
        [
            stage, "--config", f"recipes/{recipe}.yaml", f"--ckpt_path={checkpoint}", *QUIET,
            *_data_args(recipe, corpus), f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )  # fmt: skip
    # The checkpoint's architecture (not the recipe's ALIGN-base section) and its own tokenizer.
    assert cli.model.model.image_tower.model_name == "test_efficientnet"
    assert cli.model.tokenizer.get_vocab() == training_tokenizer.get_vocab()
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    prefix = f"{'val' if stage == 'validate' else 'test'}/{cli.datamodule.name}/"
    expected = _expected(recipe, checkpoint, corpus)
    assert set(metrics) == {prefix + key for key in expected}
    for key, value in expected.items():
        assert metrics[prefix + key] == pytest.approx(value, abs=1e-6), key
    picture = "confusion_matrix" if recipe == "eval_imagenet" else "retrieval_examples"
    assert list((Path(cli.trainer.log_dir) / "figures").glob(f"*_{picture}_*.png"))


def test_eval_recipes_name_their_sets_and_point_at_user_paths() -> None:
    for recipe, name in (("eval_flickr30k", "flickr30k"), ("eval_coco", "coco"), ("eval_imagenet", "imagenet")):
        text = recipe_path(recipe).read_text()
        assert f"name: {name}" in text
        assert "--ckpt_path" in text.split("seed_everything")[0]  # the header gives the command
        assert "Paper" in text.split("seed_everything")[0]  # and the paper's numbers


def test_checkpoint_carries_its_tokenizer(trained) -> None:  # noqa: ANN001
    checkpoint, _, training_tokenizer = trained
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["tokenizer"]
    assert "tokenizer.json" in saved
    module = ALIGNModule.load_from_checkpoint(checkpoint, map_location="cpu")
    caption = "a small red circle at the top of a light picture"
    assert module.tokenizer(caption)["input_ids"] == training_tokenizer(caption)["input_ids"]
    assert module.model.text_tower.model.get_input_embeddings().num_embeddings == len(module.tokenizer)


def test_several_sets_in_one_recipe(trained, tmp_path: Path) -> None:  # noqa: ANN001
    """Flickr30K-, COCO- and ImageNet-style sets in one `validate`: the recipe's data plus callbacks with their own."""
    checkpoint, corpus, _ = trained
    recipe = yaml.safe_load(recipe_path("eval_flickr30k").read_text())
    small = {"image_size": 32, "num_workers": 0, "batch_size": 8}
    recipe["trainer"]["callbacks"] += [
        {
            "class_path": "align_lightning.eval.RetrievalEvalCallback",
            "init_args": {
                "datamodule": {
                    "class_path": "align_lightning.data.RetrievalDataModule",
                    "init_args": {
                        "annotations": str(corpus.karpathy_json),
                        "image_root": str(corpus.image_root),
                        "split": "val",
                        "name": "coco",
                        **small,
                    },  # fmt: skip
                },
                "progress": False,
            },
        },
        {
            "class_path": "align_lightning.eval.ZeroShotEvalCallback",
            "init_args": {
                "datamodule": {
                    "class_path": "align_lightning.data.ZeroShotDataModule",
                    "init_args": {
                        "root": str(corpus.zeroshot_root),
                        "classnames": str(corpus.classnames_file),
                        "templates": str(corpus.templates_file),
                        "name": "imagenet",
                        **small,
                    },  # fmt: skip
                },
                "progress": False,
            },
        },
    ]
    config = tmp_path / "three_sets.yaml"
    config.write_text(yaml.safe_dump(recipe))
    cli = run(
        [
            "validate", "--config", str(config), f"--ckpt_path={checkpoint}", *QUIET,
            *_data_args("eval_flickr30k", corpus), f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )  # fmt: skip
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert {"val/flickr30k/i2t_R@1", "val/coco/t2i_R@10", "val/imagenet/top1", "val/imagenet/top5"} <= set(metrics)
    assert metrics["val/imagenet/top1"] == pytest.approx(_expected("eval_imagenet", checkpoint, corpus)["top1"])
