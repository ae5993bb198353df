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


def add_recalibrate_flag(p: argparse.ArgumentParser) -> None:
    """``--no-recalibrate-bn``, for every job that recovers a pruned model as ``compress`` does."""
    p.add_argument(
        "--no-recalibrate-bn",
        dest="recalibrate_bn",
        action="store_false",
        help="skip re-estimating the BatchNorm statistics on the calibration batches after "
        "pruning (done by default, before any fine-tuning)",
    )


def add_baseline_flags(p: argparse.ArgumentParser, *, out_default: str) -> None:
    """The flags of every job that trains (or reuses, or loads) a Fashion-MNIST baseline the
    way ``compress`` does: data, size limit, baseline epochs, output, device, seed, threads,
    cache and progress bars."""
    p.add_argument("--data", metavar="DIR", help="folder holding the four Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, help="use only the first N train and test images")
    p.add_argument("--epochs", type=int, help="baseline training epochs (default 8)")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {out_default})")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--seed", type=int, help="(default 0)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--no-cache", dest="cache", action="store_false", help="always train the baseline anew"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
