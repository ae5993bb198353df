"""``secateur`` command line: wires argparse to the recipes. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from ..errors import ConfigError, SecateurError
from ..importance import NORMALIZATIONS, list_criteria
from ..pruning import PruneSchedule
from ..recipes import METHOD_SETTINGS, CompressConfig, CompressMethod, Recovery, run_compress
from ..zoo import list_models
from ._commands import COMMANDS
from ._recipe import add_recalibrate_flag, given_settings


def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="train or load a baseline, prune, fine-tune, measure, save and report",
        description="With no options: train LeNet-5 on Fashion-MNIST (or reuse a cached one), "
        "prune 85%% of its weights by global magnitude, fine-tune, and report before/after. "
        "--method structured removes whole channels instead (--ratio, --round-to), so the model "
        "itself gets smaller; --method depth removes whole residual blocks (--depth-ratio), "
        "which --method structured can do first too; --method sparsegpt zeros weights with "
        "layer-wise reconstruction. "
        "Each flag's help says which methods read it.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--recipe", metavar="YAML", help="read settings from a YAML file; flags override it"
    )
    p.add_argument("--model", help=f"zoo model: {', '.join(list_models())} (default lenet5)")
    p.add_argument("--data", metavar="DIR", help="folder holding the four Fashion-MNIST IDX files")
    p.add_argument(
        "--method",
        choices=[m.value for m in CompressMethod],
        help="zero single weights by a criterion, zero them with SparseGPT reconstruction, "
        "remove whole channels/neurons, or remove whole residual blocks (default unstructured)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        help="unstructured/sparsegpt: fraction of weights to zero, in [0, 1) (default 0.85)",
    )
    p.add_argument(
        "--nm", metavar="N:M", help="unstructured/sparsegpt: keep N of every M weights, e.g. 2:4"
    )
    p.add_argument(
        "--criterion",
        help=f"unstructured/structured: importance criterion: {', '.join(list_criteria())} "
        "(default magnitude for weights, l2 for channels)",
    )
    p.add_argument(
        "--scope",
        choices=["global", "layer"],
        help="unstructured/structured: rank all layers together or each alone "
        "(default global for weights, layer for channels)",
    )
    p.add_argument(
        "--normalize",
        choices=list(NORMALIZATIONS),
        help="unstructured/structured: per-layer score normalisation for global ranking",
    )
    p.add_argument(
        "--ratio",
        type=float,
        help="structured: fraction of the channel units to remove, in [0, 1) (default 0.5)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        dest="round_to",
        metavar="N",
        help="structured: keep each group's width a multiple of N (default 1)",
    )
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="structured: refit the layers reading removed units by least squares on the "
        "calibration batches before fine-tuning",
    )
    p.add_argument(
        "--depth-ratio",
        type=float,
        dest="depth_ratio",
        help="depth/structured: fraction of the residual blocks (ResNet blocks, transformer "
        "layers) to replace by a skip, in [0, 1); structured removes them before the channels "
        "(default 0; depth needs it > 0)",
    )
    p.add_argument(
        "--dense-targets",
        dest="dense_targets",
        action="store_true",
        help="sparsegpt: reconstruct the dense model's layer outputs, so later layers also "
        "correct earlier layers' error (keeps a dense copy of the model)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        dest="calibration_batches",
        metavar="N",
        help="training batches read by data criteria and SparseGPT (default 8)",
    )
    p.add_argument(
        "--prune-schedule",
        dest="prune_schedule",
        choices=[k.value for k in PruneSchedule],
        help="prune at once, in prune/recover rounds, or gradually (AGP) while fine-tuning",
    )
    p.add_argument(
        "--prune-steps", type=int, dest="prune_steps", help="iterative rounds (default 3)"
    )
    p.add_argument(
        "--recovery",
        choices=[r.value for r in Recovery],
        help="fine-tune, or distil from the unpruned baseline (default finetune)",
    )
    add_recalibrate_flag(p)
    p.add_argument("--temperature", type=float, help="distillation temperature (default 4)")
    p.add_argument(
        "--alpha", type=float, help="distillation: weight of the soft loss, in [0, 1] (default 0.9)"
    )
    p.add_argument("--epochs", type=int, help="baseline training epochs (default 8)")
    p.add_argument("--finetune-epochs", type=int, dest="finetune_epochs", help="(default 5)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="(default 128)")
    p.add_argument("--lr", type=float, help="baseline learning rate (default 0.05)")
    p.add_argument("--finetune-lr", type=float, dest="finetune_lr", help="(default 0.02)")
    p.add_argument(
        "--schedule", choices=["cosine", "onecycle", "constant"], help="(default cosine)"
    )
    p.add_argument("--seed", type=int, help="(default 0)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--out", metavar="DIR", help="output folder (default secateur-out)")
    p.add_argument(
        "--baseline", metavar="CKPT", help="prune this saved .safetensors model instead of training"
    )
    p.add_argument(
        "--no-cache", dest="cache", action="store_false", help="always train the baseline anew"
    )
    p.add_argument("--limit", type=int, help="use only the first N train and test images")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--latency-runs", type=int, dest="latency_runs", help="timed runs, >= 20 (default 50)"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateur", description="Make trained PyTorch networks smaller and faster, measured."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_compress(sub)
    for command in COMMANDS.values():
        command.add(sub)
    return parser


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_method_settings(
    method: CompressMethod, flags: dict[str, Any], recipe: dict[str, Any], recipe_path: str | None
) -> None:
    """Reject a setting given for a method that does not read it, rather than ignore it."""
    for key, methods in METHOD_SETTINGS.items():
        if method in methods:
            continue
        users = " or ".join(m.value for m in methods)
        if key in flags:
            raise ConfigError(
                f"{_flag(key)} applies to --method {users} only: drop it, or pass --method "
                f"{methods[0].value}"
            )
        if key in recipe:
            if "method" in flags:
                fix = f"remove '{key}' from the recipe or drop --method {method.value}"
            else:
                fix = f"remove '{key}' or set method: {methods[0].value}"
            raise ConfigError(
                f"recipe {recipe_path} sets '{key}', which applies to method {users} only, but "
                f"the method is {method.value}: {fix}"
            )


def _compress(args: argparse.Namespace, console: Console) -> int:
    settings, recipe, recipe_path = given_settings(args, "compress")
    config = CompressConfig.from_dict({**recipe, **settings})
    _check_method_settings(config.method, settings, recipe, recipe_path)
    run_compress(config, console=console)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``secateur`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in COMMANDS:
            return COMMANDS[args.command].run(args, console)
        return _compress(args, console)
    except SecateurError as exc:
        print(f"secateur: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateur: interrupted", file=sys.stderr)
        return 130
