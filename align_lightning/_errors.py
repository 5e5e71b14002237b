"""Configuration errors that name the offending argument."""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A bad value for a named constructor argument, with what to do about it.

    The CLI catches it while building the recipe's objects and prefixes the full dotted key of the
    offending value (e.g. ``model.model.init_args.image_tower.init_args.model_name``), so a user
    sees which line of which recipe to fix.

    Args:
        param: Name of the argument holding the bad value.
        value: The bad value.
        message: What is wrong and how to fix it.
    """

    def __init__(self, param: str, value: Any, message: str) -> None:
        self.param = param
        self.value = value
        self.message = message
        super().__init__(f"{param}={value!r}: {message}")
