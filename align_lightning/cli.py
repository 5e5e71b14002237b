"""Command line: ``python -m align_lightning fit|validate|test|predict --config recipes/<x>.yaml``.

This is Lightning's ``LightningCLI`` (``parser_mode="omegaconf"``, so recipes may interpolate
``${...}``; interpolations are resolved when the recipe file is loaded, so a command-line override
of a key does not change values interpolated from it) with three additions:

* the data's tokenizer sets the text tower's vocabulary size (one source of truth); with
  ``--ckpt_path`` and data without a tokenizer (an evaluation set), the checkpoint's model
  configuration keeps its own (the tokenizer itself is restored from the checkpoint);
* a recipe given by name or as ``recipes/<name>.yaml`` resolves to the copy shipped in the package
  when no such file exists (so recipes work from an installed wheel);
* a bad value found while building the recipe's objects is reported with its full dotted key.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.core.datamodule import LightningDataModule

from align_lightning._errors import ConfigError
from align_lightning.callbacks import MetricsJSON
from align_lightning.module import ALIGNModule

__all__ = ["ALIGNCLI", "TOOLS", "main", "recipe_names", "recipe_path", "recipes_dir", "run"]

_TEXT_TOWER_VOCAB = "model.model.init_args.text_tower.init_args.vocab_size"


def recipes_dir() -> Path:
    """The folder of the shipped recipes: ``align_lightning/recipes`` in an installed wheel, else the
    top-level ``recipes/`` of the source checkout (plain or editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package (``quickstart``, ``align_base``, ...)."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """Resolve a recipe: an existing file as is, else a shipped recipe by name (``quickstart``,
    ``quickstart.yaml`` or ``recipes/quickstart.yaml``).

    Raises:
        FileNotFoundError: If it is neither, listing the shipped recipes.
    """
    path = Path(name)
    if path.is_file():
        return path
    candidate = recipes_dir() / (path.name if path.suffix else f"{path.name}.yaml")
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"No recipe file {name!r}, and no shipped recipe of that name. Shipped: {', '.join(recipe_names())}."
    )


def _resolve_config_args(args: Sequence[str]) -> list[str]:
    """Replace the value of every ``--config X`` / ``--config=X`` by :func:`recipe_path` (X)."""
    resolved: list[str] = []
    expect_value = False
    for arg in args:
        if expect_value:
            arg, expect_value = str(recipe_path(arg)), False
        elif arg == "--config":
            expect_value = True
        elif arg.startswith("--config="):
            arg = "--config=" + str(recipe_path(arg.split("=", 1)[1]))
        resolved.append(arg)
    return resolved


def _find_key(config: Any, param: str, value: Any, prefix: str = "") -> Iterator[str]:
    """Yield the dotted keys in ``config`` whose last part is ``param`` and whose value is ``value``."""
    items = config.items() if hasattr(config, "items") else []
    for key, child in items:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key == param and child == value:
            yield dotted
        yield from _find_key(child, param, value, dotted)


def _get_dotted(config: Any, key: str) -> Any:
    """``config[a][b]...`` for ``key = "a.b..."`` in nested namespaces / dicts; ``None`` where absent."""
    for part in key.split("."):
        if config is None:
            return None
        config = config.get(part) if hasattr(config, "get") else getattr(config, part, None)
    return config


class ALIGNCLI(LightningCLI):
    """``LightningCLI`` for :class:`~align_lightning.module.ALIGNModule` and any DataModule."""

    _checkpoint_vocab_size: int | None = None

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Add the metrics.json writer (always on) and link the data's tokenizer to the text tower's vocabulary."""
        parser.add_lightning_class_args(MetricsJSON, "metrics_json")
        parser.link_arguments("data", _TEXT_TOWER_VOCAB, compute_fn=self._vocab_size, apply_on="instantiate")

    def _vocab_size(self, data: LightningDataModule) -> int | None:
        """The text tower's vocabulary: the data's tokenizer's size, else the checkpoint's model's."""
        tokenizer = getattr(data, "tokenizer", None)
        return self._checkpoint_vocab_size if tokenizer is None else len(tokenizer)

    def _parse_ckpt_path(self) -> None:
        """Take the model's configuration from ``--ckpt_path`` (Lightning), remembering its vocabulary size."""
        super()._parse_ckpt_path()
        if self.config.get("subcommand"):
            model = self.config[self.config.subcommand].get("model")
            vocab = _get_dotted(model, _TEXT_TOWER_VOCAB.split(".", 1)[1])
            self._checkpoint_vocab_size = vocab if isinstance(vocab, int) else None

    def instantiate_classes(self) -> None:
        """Build the recipe's objects; a :class:`ConfigError` is re-raised naming its full key."""
        try:
            super().instantiate_classes()
        except Exception as err:
            # jsonargparse may wrap the error (e.g. when a type is a Union): look down the chain.
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            config = self.config[self.subcommand] if self.subcommand else self.config
            keys = list(_find_key(config.as_dict(), cause.param, cause.value)) or [cause.param]
            raise ConfigError(" / ".join(keys), cause.value, cause.message) from err


def run(args: Sequence[str] | None = None) -> ALIGNCLI:
    """Parse ``args``, build the recipe's objects and run the subcommand.

    Args:
        args: Arguments without the program name (``["fit", "--config", "quickstart"]``);
            ``sys.argv[1:]`` when ``None``.

    Returns:
        The finished CLI, with its ``trainer``, ``model`` and ``datamodule``.
    """
    if args is None:
        # LightningCLI reads sys.argv itself (and warns when given both), so resolve in place.
        sys.argv[1:] = _resolve_config_args(sys.argv[1:])
    else:
        args = _resolve_config_args(args)
    return ALIGNCLI(
        ALIGNModule,
        LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        },
        save_config_kwargs={"overwrite": True},
        args=args,
    )


#: Subcommands beside LightningCLI's, as ``name: (module, function)``; each function takes the
#: arguments after the subcommand's name.
TOOLS: dict[str, tuple[str, str]] = {
    "filter": ("align_lightning.data.filtering", "main"),
    "tokenizer": ("align_lightning.data.tokenizer", "main"),
    "embed": ("align_lightning.commands", "embed_main"),
    "classify": ("align_lightning.commands", "classify_main"),
    "search": ("align_lightning.commands", "search_main"),
    "clip_benchmark": ("align_lightning.clip_benchmark_plugin", "main"),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m align_lightning`` and the ``align-lightning`` console script.

    ``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI; the tools in :data:`TOOLS`
    (``filter``, ``tokenizer``, ``embed``, ``classify``, ``search``, ``clip_benchmark``) to their own parsers.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        module, function = TOOLS[args[0]]
        getattr(importlib.import_module(module), function)(args[1:])
        return
    run(None if argv is None else args)
