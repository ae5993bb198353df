"""``secateur encoder``: prune a local transformers encoder one-shot, distill its embeddings back."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..recipes import EncoderConfig, run_encoder
from ..recipes._encoder_config import FILE_VALUES, METHODS
from ._recipe import given_settings

SECTION = "encoder"


def add(sub: argparse._SubParsersAction) -> None:
    """Declare the ``encoder`` parser; only the flags given reach the config."""
    p = sub.add_parser(
        "encoder",
        help="prune a local transformers encoder (e.g. a sentence-transformers model) one-shot, "
        "distill its embeddings back, measure fidelity and report",
        description="Read a transformers model and its tokenizer from a local folder (nothing is "
        "downloaded) and sentences from a text file (one per line). Prune every Linear layer "
        "one-shot on calibration sentences (or, with --method structured, remove attention heads "
        "and FFN neurons), optionally distill the pruned model towards the "
        "original's embeddings, then measure the mean cosine between both models' embeddings "
        "of held-out sentences, save the pruned model (save_pretrained format, and as a "
        "compressed model.secz file) and report.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="folder of a transformers model")
    p.add_argument(
        "--recipe",
        metavar="YAML",
        help=f"read settings from a YAML file (or its '{SECTION}:' section); flags override it",
    )
    p.add_argument("--text", metavar="FILE", help="UTF-8 text file, one sentence per line")
    p.add_argument("--method", choices=METHODS, help="pruning method (default sparsegpt)")
    p.add_argument(
        "--sparsity", type=float, help="not structured: fraction of weights removed (default 0.5)"
    )
    p.add_argument("--nm", metavar="N:M", help="not structured: N:M pattern instead, e.g. 2:4")
    p.add_argument(
        "--ratio",
        type=float,
        help="structured: fraction of each layer's heads and FFN neurons removed (default 0.5)",
    )
    p.add_argument(
        "--kinds",
        metavar="KIND[,KIND]",
        help="structured: head, channel (FFN neurons) or both (default head,channel)",
    )
    p.add_argument(
        "--criterion",
        help="structured: how units are ranked on the calibration sentences (default activation; "
        "any of importance.list_criteria() that needs no labels)",
    )
    p.add_argument(
        "--no-reconstruct",
        dest="reconstruct",
        action="store_false",
        help="structured: do not refit the layers reading removed units by least squares",
    )
    p.add_argument(
        "--dense-targets",
        dest="dense_targets",
        action="store_true",
        help="sparsegpt: reconstruct the original's layer outputs, not each layer's own",
    )
    p.add_argument(
        "--exclude",
        nargs="*",
        metavar="PATTERN",
        help="module name patterns left dense (default pooler*)",
    )
    p.add_argument(
        "--eval-sentences",
        type=int,
        dest="eval_sentences",
        help="sentences held out to measure fidelity (default 256)",
    )
    p.add_argument(
        "--calibration", type=int, help="calibration sentences for the criterion (default 128)"
    )
    p.add_argument(
        "--distill-seconds",
        type=float,
        dest="distill_seconds",
        help="distill the embeddings for this wall-clock budget (default: no distillation)",
    )
    p.add_argument("--distill-steps", type=int, dest="distill_steps", help="or for this many steps")
    p.add_argument("--lr", type=float, help="distillation learning rate (default 1e-4)")
    p.add_argument(
        "--lr-schedule",
        dest="lr_schedule",
        choices=["cosine", "onecycle", "constant"],
        help="over the distillation budget (default cosine)",
    )
    p.add_argument(
        "--file-values",
        dest="file_values",
        choices=FILE_VALUES,
        help="values in the compressed model.secz (default exact: lossless)",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx (input_ids, attention_mask; any batch and length) and "
        "measure its fidelity in ONNX Runtime",
    )
    p.add_argument("--batch-size", type=int, dest="batch_size", help="(default 32)")
    p.add_argument(
        "--max-length", type=int, dest="max_length", help="tokens per sentence (default 128)"
    )
    p.add_argument("--seed", type=int, help="sentence shuffle seed (default 0)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--out", metavar="DIR", help="output folder (default secateur-encoder)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--latency-runs", type=int, dest="latency_runs", help="timed runs, >= 20 (default 50)"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def run(args: argparse.Namespace, console: Console) -> int:
    """Build the config from the recipe and the flags (flags win) and run the job."""
    settings, recipe, _ = given_settings(args, SECTION)
    run_encoder(EncoderConfig.from_dict({**recipe, **settings}), console=console)
    return 0
