"""``secateur sensitivity``: how much each layer of a trained model minds being pruned, and which
per-layer ratios meet a global target."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..errors import ConfigError
from ..explore import SensitivityMethod
from ..importance import list_criteria
from ..recipes import SensitivityConfig, run_sensitivity
from ..zoo import list_models
from ._recipe import add_baseline_flags, given_settings

SECTION = "sensitivity"


def add(sub: argparse._SubParsersAction) -> None:
    """Declare the ``sensitivity`` parser; only the flags given reach the config."""
    p = sub.add_parser(
        "sensitivity",
        help="scan how much each layer's pruning costs in accuracy; allocate per-layer ratios",
        description="Train (or reuse the cached) baseline exactly as 'compress' does, then prune "
        "each layer alone at each ratio and measure the validation accuracy. Writes "
        "sensitivity.json, sensitivity.png and sensitivity.md to --out. With --target-sparsity "
        "(unstructured) or --target-macs (structured) it also allocates per-layer ratios that "
        "reach the target at the least predicted accuracy loss, and measures them.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--recipe",
        metavar="YAML",
        help=f"read settings from a YAML file (or its '{SECTION}:' section); flags override it",
    )
    p.add_argument("--model", help=f"zoo model: {', '.join(list_models())} (default lenet5)")
    p.add_argument(
        "--baseline", metavar="CKPT", help="scan this saved .safetensors model instead of training"
    )
    p.add_argument(
        "--method",
        choices=[m.value for m in SensitivityMethod],
        help="zero single weights of a layer, or remove channels of a group (default unstructured)",
    )
    p.add_argument(
        "--ratios",
        metavar="R,R,...",
        help="comma-separated ratios in [0, 1), increasing (default 0.1,0.2,...,0.9)",
    )
    p.add_argument("--criterion", help=f"importance criterion: {', '.join(list_criteria())}")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--target-sparsity",
        type=float,
        dest="target_sparsity",
        metavar="S",
        help="unstructured: allocate ratios removing this fraction of all weights, e.g. 0.8",
    )
    target.add_argument(
        "--target-macs",
        type=float,
        dest="target_macs",
        metavar="X",
        help="structured: allocate ratios dividing MACs by this factor, e.g. 2.0",
    )
    p.add_argument(
        "--max-ratio",
        type=float,
        dest="max_ratio",
        help="no layer's allocated ratio beyond this (default 0.95)",
    )
    add_baseline_flags(p, out_default="secateur-sensitivity")


def parse_ratios(text: str) -> list[float]:
    """``"0.1,0.5"`` → ``[0.1, 0.5]``. Raises ConfigError naming the bad item."""
    out = []
    for item in str(text).split(","):
        try:
            out.append(float(item.strip()))
        except ValueError:
            raise ConfigError(
                f"--ratios item {item.strip()!r} is not a number: write e.g. --ratios 0.1,0.5,0.9"
            ) from None
    return out


def run(args: argparse.Namespace, console: Console) -> int:
    """Build the config from the recipe and the flags (flags win) and run the job."""
    settings, recipe, _ = given_settings(args, SECTION)
    if "ratios" in settings:
        settings["ratios"] = parse_ratios(settings["ratios"])
    merged = {**recipe, **settings}
    # a target flag replaces the recipe's target of the other kind instead of clashing with it
    if "target_sparsity" in settings:
        merged.pop("target_macs", None)
    if "target_macs" in settings:
        merged.pop("target_sparsity", None)
    run_sensitivity(SensitivityConfig.from_dict(merged), console=console)
    return 0
