"""Which timm vision models each tool prunes structurally into a working, smaller model.

Every model is built by ``timm.create_model(name, num_classes=10)`` with random weights (no
download) at its default input size, then pruned at ratio 0.5 by each tool in the same run:

- Torch-Pruning, following its timm example (``examples/timm_models``) through its public
  API: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` at a uniform ratio, the Linear
  classifier ignored, the head count of every module holding ``qkv`` (or ``qkv_proj``) and
  ``num_heads`` given as ``num_heads``; then the example's updates by hand: each such
  module's ``num_heads`` from the pruner's counts and ``head_dim`` from the new ``qkv`` width.
  As that example does, timm's fused attention is turned off (``TIMM_FUSED_ATTN=0``, set
  before timm is imported, for both tools).
- secateur: ``prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)`` with nothing set
  per model.

A model counts as pruned when pruning raised nothing, the pruned model runs on a batch of 2,
gives finite logits of the right shape, and its parameters fell. Multiply-accumulates are
counted by ``secateur.measure.count_macs`` for both. A tool gets ``--limit`` seconds per
model; past that it is stopped.

    .venv/bin/pip install -c constraints.txt torch-pruning==1.6.1
    .venv/bin/python -W ignore benchmarks/timm_coverage.py --threads 2
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

os.environ["TIMM_FUSED_ATTN"] = "0"  # the peer's example sets it before importing timm

import timm  # noqa: E402
import torch  # noqa: E402
from hf_llm_coverage import _short, print_header, print_runs, prune_counting_macs  # noqa: E402

from secateur import StructuredConfig, prune_  # noqa: E402

RATIO = 0.5
CLASSES = 10
MODELS = [
    # plain and hierarchical vision transformers
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "deit3_small_patch16_224",
    "vit_base_patch16_clip_224",
    "beit_base_patch16_224",
    "eva02_small_patch14_224",
    "cait_xxs24_224",
    "xcit_nano_12_p16_224",
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
    "maxvit_nano_rw_256",
    "coatnet_nano_rw_224",
    "pvt_v2_b0",
    "twins_svt_small",
    "levit_128s",
    "tiny_vit_5m_224",
    "davit_tiny",
    "efficientformer_l1",
    "mobilevit_xxs",
    "coat_lite_tiny",  # position encoders shared by every block
    "halonet26t",  # halo (blocked local) attention
    # convolutional
    "resnet50d",
    "resnext26ts",
    "seresnext26d_32x4d",
    "res2net50_14w_8s",
    "resnest14d",
    "regnety_002",
    "regnetz_b16",
    "densenet121",
    "dla34",
    "dpn48b",
    "hrnet_w18_small",
    "efficientnet_b0",
    "efficientnetv2_rw_t",
    "mobilenetv3_small_100",
    "mobilenetv4_conv_small",
    "ghostnet_100",
    "rexnet_100",
    "repvit_m0_9",
    "fastvit_t8",
    "hgnetv2_b0",
    "cspdarknet53",
    "vovnet39a",
    "nfnet_l0",
    "resnetv2_50x1_bit",  # BiT: weight-standardised convs
    "ecaresnet26t",  # efficient channel attention: a Conv1d along the channels
    "convnext_atto",
    "convnextv2_atto",
    "inception_next_tiny",
    "focalnet_tiny_srf",
    # MLP and pooling mixers
    "mixer_s16_224",
    "resmlp_12_224",
    "poolformer_s12",
    "convmixer_768_32",
]


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=CLASSES).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, torch.randn(1, *size, generator=torch.Generator().manual_seed(0))


def _attention(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Each module holding a head count and a fused q|k|v Linear, with that Linear."""
    found = []
    for module in model.modules():
        qkv = getattr(module, "qkv", None) or getattr(module, "qkv_proj", None)
        if isinstance(getattr(module, "num_heads", None), int) and isinstance(qkv, torch.nn.Linear):
            found.append((module, qkv))
    return found


def torch_pruning(model: torch.nn.Module, x: torch.Tensor) -> str | None:
    """Torch-Pruning's timm recipe, as its example sets it up (see the module docstring)."""
    import torch_pruning as tp

    attention = _attention(model)
    ignored = [
        m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == CLASSES
    ]
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False,
        pruning_ratio=RATIO,
        ignored_layers=ignored,
        num_heads={qkv: module.num_heads for module, qkv in attention},
    )
    for group in pruner.step(interactive=True):
        group.prune()
    for module, qkv in attention:  # the example's hand-written updates
        module.num_heads = pruner.num_heads[qkv]
        if hasattr(module, "head_dim"):
            module.head_dim = qkv.out_features // (3 * module.num_heads)
    return None


def secateur(model: torch.nn.Module, x: torch.Tensor) -> str | None:
    result = prune_(model, StructuredConfig(ratio=RATIO), example_inputs=x)
    if result.refused:
        return f"{len(result.refused)} group(s) left whole by the forward check"
    return None


TOOLS: dict[str, Callable[[torch.nn.Module, torch.Tensor], str | None]] = {
    "Torch-Pruning": torch_pruning,
    "secateur": secateur,
}


def check(model: torch.nn.Module, x: torch.Tensor) -> str | None:
    """None when the pruned model classifies a batch of 2 into finite logits."""
    try:
        with torch.no_grad():
            out = model(torch.cat([x, x]))
    except Exception as exc:  # noqa: BLE001 - a failure is a result to report
        return f"forward fails ({_short(exc)})"
    if not isinstance(out, torch.Tensor) or out.shape != (2, CLASSES):
        return f"output {getattr(out, 'shape', type(out).__name__)}"
    if not torch.isfinite(out).all():
        return "non-finite logits"
    return None


def run(name: str, tool: str, limit: int) -> dict:
    model, x = build(name)
    return prune_counting_macs(
        model, x, lambda: TOOLS[tool](model, x), limit, lambda: check(model, x)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument(
        "--limit", type=int, default=60, help="seconds a tool may take to prune one model"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    print_header(
        args.threads,
        [f"limit {args.limit} s per pruning; ratio {RATIO}; MACs at the default input size"],
        ("torch", "timm", "torch-pruning", "secateur"),
    )
    print_runs(args.models, list(TOOLS), lambda name, tool: run(name, tool, args.limit))


if __name__ == "__main__":
    main()
