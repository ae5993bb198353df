"""``secateur sweep``: prune a trained model at several ratios with several methods, fine-tune
each copy, and plot the measured accuracy against bytes on disk and latency."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..importance import list_criteria
from ..recipes import CompressMethod, SweepConfig, run_sweep
from ..zoo import list_models
from ._recipe import add_baseline_flags, add_recalibrate_flag, given_settings
from ._sensitivity import parse_ratios

SECTION = "sweep"


def add(sub: argparse._SubParsersAction) -> None:
    """Declare the ``sweep`` parser; only the flags given reach the config."""
    p = sub.add_parser(
        "sweep",
        help="prune at several ratios and methods; plot accuracy against size and latency",
        description="Train (or reuse the cached) baseline exactly as 'compress' does, then for "
        "each --methods and --ratios prune a copy one-shot, fine-tune it --finetune-epochs, and "
        "measure every copy and the baseline alike: test accuracy, parameters, non-zeros, MACs, "
        "safetensors and .secz bytes, and latency timed in one interleaved loop. Writes "
        "sweep.json, sweep.png (accuracy against bytes and latency, Pareto front ringed) and "
        "sweep.md to --out.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--recipe",
        metavar="YAML",
        help=f"read settings from a YAML file (or its '{SECTION}:' section); flags override it",
    )
    p.add_argument("--model", help=f"zoo model: {', '.join(list_models())} (default lenet5)")
    p.add_argument(
        "--baseline", metavar="CKPT", help="sweep this saved .safetensors model instead of training"
    )
    p.add_argument(
        "--methods",
        metavar="M,M,...",
        help=f"comma-separated, from {', '.join(m.value for m in CompressMethod)} "
        "(default unstructured,structured)",
    )
    p.add_argument(
        "--ratios",
        metavar="R,R,...",
        help="comma-separated ratios in (0, 1): sparsity, channel or block ratio by method "
        "(default 0.5,0.7,0.9)",
    )
    p.add_argument(
        "--criterion",
        help=f"unstructured/structured: importance criterion: {', '.join(list_criteria())}",
    )
    p.add_argument(
        "--scope",
        choices=["global", "layer"],
        help="unstructured/structured: (default: the method's)",
    )
    p.add_argument("--round-to", type=int, dest="round_to", help="structured: width multiple")
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="structured: refit the layers reading removed units by least squares on the "
        "calibration batches",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        dest="calibration_batches",
        help="training batches for data criteria and SparseGPT (default 8)",
    )
    p.add_argument(
        "--finetune-epochs", type=int, dest="finetune_epochs", help="per setting (default 1)"
    )
    p.add_argument("--finetune-lr", type=float, dest="finetune_lr", help="(default 0.02)")
    p.add_argument("--recovery", choices=["finetune", "distill"], help="(default finetune)")
    add_recalibrate_flag(p)
    p.add_argument("--latency-runs", type=int, dest="latency_runs", help="(default 50)")
    add_baseline_flags(p, out_default="secateur-sweep")


def run(args: argparse.Namespace, console: Console) -> int:
    """Build the config from the recipe and the flags (flags win) and run the job."""
    settings, recipe, _ = given_settings(args, SECTION)
    if "ratios" in settings:
        settings["ratios"] = parse_ratios(settings["ratios"])
    run_sweep(SweepConfig.from_dict({**recipe, **settings}), console=console)
    return 0
