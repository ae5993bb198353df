"""``secateur export``: a checkpoint to ONNX, int8 ONNX or the compressed file, measured."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..errors import ConfigError
from ..quantization import QuantMode
from ..recipes import FORMAT_SETTINGS, ExportConfig, ExportFormat, run_export
from ..recipes._export import check_format_settings
from ._recipe import given_settings

SECTION = "export"


def add(sub: argparse._SubParsersAction) -> None:
    """Declare the ``export`` parser; only the flags given reach the config."""
    p = sub.add_parser(
        "export",
        help="write a checkpoint as ONNX, int8 ONNX or a compressed file; measure each variant",
        description="Load a .safetensors checkpoint written by 'secateur compress', write it as "
        "--format onnx (fp32), onnx-int8 (ONNX Runtime quantization; the fp32 .onnx is kept "
        "beside it) or compressed (.secz: sparse index + codebook/int8 values + zstd), and "
        "report file size, test accuracy and latency of every variant side by side, each on "
        "its own runtime. Each flag's help says which formats read it.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("checkpoint", nargs="?", help="the .safetensors model to export")
    p.add_argument(
        "--recipe",
        metavar="YAML",
        help=f"read settings from a YAML file (or its '{SECTION}:' section); flags override it",
    )
    p.add_argument(
        "--format",
        choices=[f.value for f in ExportFormat],
        help="artifact format (default compressed)",
    )
    p.add_argument("--out", metavar="FILE", help="artifact path (default: beside the checkpoint)")
    p.add_argument(
        "--quantize",
        choices=[m.value for m in QuantMode],
        help="onnx-int8: calibrated activation ranges, or per-batch (default static)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        dest="calibration_batches",
        metavar="N",
        help="onnx-int8 static: training batches for calibration (default 8)",
    )
    p.add_argument(
        "--per-tensor",
        dest="per_channel",
        action="store_false",
        help="onnx-int8: one weight scale per tensor instead of per channel",
    )
    p.add_argument("--opset", type=int, help="onnx, onnx-int8: ONNX opset (default 17)")
    p.add_argument(
        "--values",
        choices=["codebook", "int8", "float16", "exact"],
        help="compressed: how weight values are stored (default codebook)",
    )
    p.add_argument("--bits", type=int, help="compressed: codebook code width, 1..8 (default 5)")
    p.add_argument(
        "--layer-bits",
        dest="per_layer_bits",
        metavar="PATTERN=BITS,...",
        help="compressed: codebook bits for layers matching fnmatch patterns, e.g. 'conv*=8'",
    )
    p.add_argument(
        "--index",
        choices=["auto", "bitmask", "relative"],
        help="compressed: sparse index code (default auto: the smaller per tensor)",
    )
    p.add_argument(
        "--entropy", choices=["zstd", "none"], help="compressed: final coder (default zstd)"
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        dest="finetune_epochs",
        help="compressed, codebook: cluster, then fine-tune centroids this many epochs (default 0)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        dest="finetune_lr",
        help="compressed: centroid fine-tuning learning rate (default 0.001)",
    )
    p.add_argument("--data", metavar="DIR", help="folder holding the four Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, help="use only the first N train and test images")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="(default 128)")
    p.add_argument("--seed", type=int, help="(default 0)")
    p.add_argument("--device", help="centroid fine-tuning device: auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads")
    p.add_argument(
        "--latency-runs", type=int, dest="latency_runs", help="timed runs, >= 20 (default 50)"
    )
    p.add_argument(
        "--latency-batch",
        type=int,
        dest="latency_batch",
        help="batch size the latency is timed at (default 1)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def parse_layer_bits(text: str) -> dict[str, int]:
    """``"conv*=8,fc3=6"`` → ``{"conv*": 8, "fc3": 6}``; ConfigError names a bad item."""
    out = {}
    for item in str(text).split(","):
        pattern, sep, bits = item.partition("=")
        try:
            if not sep or not pattern.strip():
                raise ValueError
            out[pattern.strip()] = int(bits)
        except ValueError:
            raise ConfigError(
                f"--layer-bits item {item.strip()!r} is not PATTERN=BITS: write e.g. "
                "--layer-bits 'conv*=8,fc3=6'"
            ) from None
    return out


def run(args: argparse.Namespace, console: Console) -> int:
    """Build the config from the recipe and the flags (flags win) and run the job."""
    settings, recipe, _ = given_settings(args, SECTION)
    if "per_layer_bits" in settings:
        settings["per_layer_bits"] = parse_layer_bits(settings["per_layer_bits"])
    merged = {**recipe, **settings}
    config = ExportConfig.from_dict(merged)
    check_format_settings(config.format, merged, FORMAT_SETTINGS)
    run_export(config, console=console)
    return 0
