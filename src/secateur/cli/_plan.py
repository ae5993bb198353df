"""``secateur plan``: the least pruning that meets a target device's budget, found and checked
by measurement."""

from __future__ import annotations

import argparse
import math
import sys

from rich.console import Console

from ..errors import ConfigError
from ..importance import list_criteria
from ..recipes import PlanConfig, run_plan
from ..recipes._plan import CODINGS
from ..zoo import list_models
from ._recipe import add_baseline_flags, add_recalibrate_flag, given_settings

SECTION = "plan"
_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}
#: Budget flags and whether their value is a whole count.
QUANTITIES = {"max_file_bytes": True, "max_params": True, "max_macs": True, "max_latency_ms": False}


def parse_quantity(name: str, text: object, whole: bool) -> int | float:
    """``"30k"`` → 30000, ``"1.5M"`` → 1500000 (k, M, G are powers of 1000); a number given in
    a recipe passes through. Raises ConfigError naming the flag."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return text
    raw = str(text).strip()
    scale = _SUFFIXES.get(raw[-1:].lower(), 1.0) if whole else 1.0
    digits = raw[:-1] if scale != 1.0 else raw
    flag = "--" + name.replace("_", "-")
    try:
        value = float(digits) * scale
    except ValueError:
        example = "30k or 1.5M" if whole else "0.5"
        raise ConfigError(f"{flag} {raw!r} is not a number: write e.g. {flag} {example}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{flag} {raw!r} is not finite: give a positive number")
    return round(value) if whole else value


def add(sub: argparse._SubParsersAction) -> None:
    """Declare the ``plan`` parser; only the flags given reach the config."""
    p = sub.add_parser(
        "plan",
        help="find and carry out the least pruning that meets a device's budget",
        description="Train (or reuse the cached) baseline as 'compress' does; find by "
        "measurement the least pruning that meets every limit given: --max-params, --max-macs "
        "and --max-latency-ms by structured pruning (bisection on pruned copies), "
        "--max-file-bytes by weight sparsity under the best value coding of the .secz file "
        "(chosen on the validation split). Then prune for real, fine-tune after each stage, "
        "write model.secz, reload it and check every limit. Writes plan.json and plan.md.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--recipe",
        metavar="YAML",
        help=f"read settings from a YAML file (or its '{SECTION}:' section); flags override it",
    )
    p.add_argument(
        "--max-file-bytes",
        dest="max_file_bytes",
        metavar="N",
        help="storage: the .secz file at most N bytes (30k = 30,000)",
    )
    p.add_argument(
        "--max-params",
        dest="max_params",
        metavar="N",
        help="runtime memory: at most N parameters in the loaded model",
    )
    p.add_argument(
        "--max-macs", dest="max_macs", metavar="N", help="compute: at most N MACs per sample"
    )
    p.add_argument(
        "--max-latency-ms",
        dest="max_latency_ms",
        metavar="MS",
        help="compute: median latency at batch 1 on this machine",
    )
    p.add_argument(
        "--min-speedup",
        dest="min_speedup",
        type=float,
        metavar="X",
        help="compute: at least X times faster than the baseline at batch 1, both timed in one "
        "loop (robust to a machine that speeds up or slows down)",
    )
    p.add_argument("--model", help=f"zoo model: {', '.join(list_models())} (default lenet_300_100)")
    p.add_argument(
        "--baseline", metavar="CKPT", help="plan for this saved .safetensors model instead"
    )
    p.add_argument(
        "--criterion", help=f"structured criterion: {', '.join(list_criteria())} (default l2)"
    )
    p.add_argument("--round-to", type=int, dest="round_to", help="structured: width multiple")
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="channels: refit the layers reading removed channels by least squares on the "
        "calibration batches, in every probe and in the final model",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        dest="calibration_batches",
        help="training batches for data criteria and --reconstruct (default 8)",
    )
    p.add_argument(
        "--max-ratio", type=float, dest="max_ratio", help="structured: at most (default 0.9)"
    )
    add_recalibrate_flag(p)
    p.add_argument(
        "--shape-methods",
        dest="shape_methods",
        metavar="M,M",
        help="how parameter, MAC and latency limits may narrow the model: channels, blocks "
        "(whole residual blocks, where the model has them); default channels,blocks",
    )
    p.add_argument(
        "--codings",
        metavar="C,C,...",
        help=f"file value codings to try (default {','.join(CODINGS)})",
    )
    p.add_argument(
        "--finetune-epochs", type=int, dest="finetune_epochs", help="per stage (default 2)"
    )
    p.add_argument("--finetune-lr", type=float, dest="finetune_lr", help="(default 0.02)")
    p.add_argument("--latency-runs", type=int, dest="latency_runs", help="(default 50)")
    add_baseline_flags(p, out_default="secateur-plan")


def run(args: argparse.Namespace, console: Console) -> int:
    """Build the config from the recipe and the flags (flags win) and run the job."""
    settings, recipe, _ = given_settings(args, SECTION)
    merged = {**recipe, **settings}
    for name, whole in QUANTITIES.items():
        if merged.get(name) is not None:
            merged[name] = parse_quantity(name, merged[name], whole)
    result = run_plan(PlanConfig.from_dict(merged), console=console)
    missed = [limit for limit, met in result.outcome.met.items() if not met]
    if missed:
        sys.stderr.write(
            f"secateur: {', '.join(missed)} not met on the final measurement: see "
            f"{result.report_path}, or loosen the limit and run again\n"
        )
        return 1
    return 0
