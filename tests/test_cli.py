"""Tests for align_lightning/cli.py: parsing, linking, recipe resolution and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from align_lightning._errors import ConfigError
from align_lightning.cli import recipe_names, recipe_path, run
from tests.conftest import TINY_DATA_ARGS

QUICK = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.val_check_interval=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    *TINY_DATA_ARGS,
]


def _fit(tmp_path: Path, *extra: str) -> object:
    return run(
        [
            "fit",
            "--config",
            "recipes/quickstart.yaml",
            *QUICK,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *extra,
        ]
    )


def test_recipes_resolve_by_name_and_path() -> None:
    assert {"quickstart", "align_base", "align_l2"} <= set(recipe_names())
    by_name = recipe_path("quickstart")
    assert by_name.name == "quickstart.yaml"
    assert by_name.is_file()
    assert recipe_path("recipes/quickstart.yaml").resolve() == Path("recipes/quickstart.yaml").resolve()
    with pytest.raises(FileNotFoundError, match="Shipped: .*quickstart"):
        recipe_path("no_such_recipe")


def test_tokenizer_sets_text_tower_vocabulary(tmp_path: Path) -> None:
    cli = _fit(tmp_path)
    assert cli.model.model.text_tower.vocab_size == len(cli.datamodule.tokenizer)
    embeddings = cli.model.model.text_tower.model.get_input_embeddings()
    assert embeddings.num_embeddings == len(cli.datamodule.tokenizer)


def test_metrics_json_written_after_fit_validate_and_test(tmp_path: Path) -> None:
    cli = _fit(tmp_path)
    log_dir = Path(cli.trainer.log_dir)
    fit_metrics = json.loads((log_dir / "metrics.json").read_text())
    assert {"train/loss", "train/temperature", "val/loss", "val/demo/i2t_R@1", "val/demo/t2i_R@10"} <= set(fit_metrics)
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    for stage, key in (("validate", "val/demo/i2t_R@1"), ("test", "test/demo/t2i_R@1")):
        cli = run(
            [
                stage,
                "--config",
                "quickstart",
                *QUICK[1:2],
                *QUICK[3:],
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--ckpt_path={ckpt}",
            ]
        )
        metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
        assert key in metrics
        assert 0.0 <= metrics[key] <= 1.0


def test_checkpoint_reloads_without_the_cli(tmp_path: Path) -> None:
    from align_lightning.module import ALIGNModule

    cli = _fit(tmp_path)
    ckpt = next((Path(cli.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    module = ALIGNModule.load_from_checkpoint(ckpt)
    assert module.model.text_tower.vocab_size == cli.model.model.text_tower.vocab_size
    for name, tensor in cli.model.state_dict().items():
        assert (module.state_dict()[name] == tensor).all(), name


def test_invalid_recipe_key_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = yaml.safe_load(Path("recipes/quickstart.yaml").read_text())
    recipe["trainer"]["max_stepz"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(bad)])
    assert "max_stepz" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        (
            "--model.model.init_args.image_tower.init_args.model_name=efficientnet_b77",
            "model.model.init_args.image_tower.init_args.model_name",
            "not a timm model",
        ),
        (
            "--model.model.init_args.text_tower.init_args.model_name_or_path=./no/such/bert",
            "model.model.init_args.text_tower.init_args.model_name_or_path",
            "no such local folder",
        ),
        ("--model.model.init_args.embed_dim=7", "model.model.init_args.embed_dim", "image_projection"),
        ("--data.init_args.tokenizer=/no/such/tokenizer", "data.init_args.tokenizer", "save_pretrained"),
    ],
    ids=["unknown-timm-model", "unknown-hf-model", "embed-dim-mismatch", "missing-tokenizer-path"],
)
def test_bad_values_name_their_recipe_key(tmp_path: Path, override: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _fit(tmp_path, override)
    assert str(info.value).startswith(key)


def test_recipes_interpolate(tmp_path: Path) -> None:
    """parser_mode="omegaconf": `${data.init_args.max_length}` in the recipe follows the recipe's value."""
    recipe = Path("recipes/quickstart.yaml").read_text()
    assert "${data.init_args.max_length}" in recipe
    cli = _fit(tmp_path, "--trainer.limit_val_batches=0")
    assert cli.model.model.text_tower.model.config.max_position_embeddings == 64
    changed = tmp_path / "quickstart_48.yaml"
    changed.write_text(recipe.replace("max_length: 64", "max_length: 48"))
    cli = run(["fit", "--config", str(changed), *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.model.model.text_tower.model.config.max_position_embeddings == 48
    assert cli.datamodule.collator.max_length == 48
    assert cli.model.model.text_tower.vocab_size == len(cli.datamodule.tokenizer)  # the link still applies
