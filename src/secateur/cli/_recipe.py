"""Reading a YAML recipe for any subcommand: its own section, or the whole mapping."""

from __future__ import annotations

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
