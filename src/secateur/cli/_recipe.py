"""Reading a YAML recipe for any subcommand: its own section, or the whole mapping."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def read_recipe(path: str, section: str) -> dict[str, Any]:
    """The settings under ``section:`` in the YAML file at ``path`` (or the whole mapping).

    Raises:
        ConfigError: one line, for a missing file, invalid YAML or a non-mapping.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read recipe {path}: {exc.strerror}: pass an existing YAML file"
        ) from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"recipe {path} is not valid YAML ({first}): fix the file") from None
    settings = data.get(section, data) if isinstance(data, dict) else data
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ConfigError(f"recipe {path} must be a mapping of settings, e.g. 'seed: 1'")
    return settings


def given_settings(
    args: argparse.Namespace, section: str
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Split a subcommand's parsed flags into (flags given, recipe settings, recipe path).

    Parsers use ``argument_default=argparse.SUPPRESS``, so only flags the user gave are present.
    """
    settings = vars(args).copy()
    settings.pop("command")
    recipe_path = settings.pop("recipe", None)
    recipe = read_recipe(recipe_path, section) if recipe_path else {}
    return settings, recipe, recipe_path
