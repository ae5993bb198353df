"""Unstructured and 2:4 pruning of a mixture-of-experts LLM: how much of it is reached, how far
its outputs move, and how small its file gets.

A Qwen2-MoE model with Qwen1.5-MoE-A2.7B's widths (hidden 2048, 16 of its 60 experts of 1408
neurons, top-4 routing, a shared expert of 5632; ``--layers`` layers, vocabulary ``--vocab``,
random weights, no download) stores its routed experts as stacked 3-D tensors. Each method
prunes a fresh copy of the same model, every Linear weight and expert stack except the output
head, at 50% (and 2:4):

- ``torch.nn.utils.prune`` (the peer): ``global_unstructured`` L1 over the same tensors, which
  it can reach by name; then ``prune.remove``;
- secateur ``magnitude`` (global, as the peer), ``wanda`` and ``sparsegpt`` (per layer), each
  given ``--calibration`` batches of random token ids.

Measured for each: the fraction of the model's weights that are zero, the time to prune, and on
held-out random token ids the logits' relative error against the dense model and how often its
top-1 token agrees with the dense model's. Random weights make these reconstruction figures,
not accuracy. Bytes on disk: the dense safetensors file (what the peer leaves; its zeros are
stored) against secateur's compressed file (int8 values, zstd ``--level``).

    .venv/bin/python -W ignore benchmarks/moe_unstructured.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from llm_decode_speed import PRESETS  # Qwen1.5-MoE-A2.7B's widths, as the speed benchmark
from torch.nn.utils import prune as torch_prune

from secateur import SparseGPTConfig, UnstructuredConfig, create_model, prune_, save_model
from secateur._experts import expert_stacks
from secateur.export import CompressionConfig, save_compressed
from secateur.pruning import prunable_weights

WIDTHS = {k: v for k, v in PRESETS["qwen2_moe"][1].items() if k != "vocab_size"}
HEAD = ("lm_head",)


def build(layers: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(
        "hf.qwen2_moe", task="causal-lm", num_hidden_layers=layers, vocab_size=vocab, **WIDTHS
    )
    return model.eval()


def peer(model: torch.nn.Module, sparsity: float) -> None:
    """torch.nn.utils.prune: one global L1 threshold over the same weights secateur prunes."""
    targets = []
    for name in prunable_weights(model, HEAD):
        module_name, attr = name.rsplit(".", 1)
        targets.append((model.get_submodule(module_name), attr))
    torch_prune.global_unstructured(
        targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity
    )
    for module, attr in targets:
        torch_prune.remove(module, attr)


def fidelity(
    model: torch.nn.Module, dense_logits: list[torch.Tensor], held_out: list[torch.Tensor]
) -> tuple[float, float]:
    errors, agree, total = [], 0, 0
    with torch.no_grad():
        for ids, reference in zip(held_out, dense_logits, strict=True):
            logits = model(input_ids=ids).logits
            errors.append(float((logits - reference).norm() / reference.norm()))
            agree += int((logits.argmax(-1) == reference.argmax(-1)).sum())
            total += ids.numel()
    return sum(errors) / len(errors), agree / total


def zero_fraction(model: torch.nn.Module) -> tuple[float, float]:
    """Zeros among the pruned-able weights, and the expert stacks' share of those weights."""
    weights = [model.get_parameter(n) for n in prunable_weights(model, HEAD)]
    stacks = sum(model.get_parameter(n).numel() for n in expert_stacks(model))
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total, stacks / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--calibration", type=int, default=64, help="batches of 2 x 128 tokens")
    parser.add_argument("--level", type=int, default=3, help="zstd level of the .secz files")
    parser.add_argument("--only", nargs="*", default=[], help="methods whose label has these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()

    gen = torch.Generator().manual_seed(0)
    calibration = [
        {"input_ids": torch.randint(1, args.vocab, (2, 128), generator=gen)}
        for _ in range(args.calibration)
    ]
    held_out = [torch.randint(1, args.vocab, (2, 128), generator=gen) for _ in range(4)]
    dense = build(args.layers, args.vocab)
    with torch.no_grad():
        dense_logits = [dense(input_ids=ids).logits for ids in held_out]
    _, stack_share = zero_fraction(dense)

    methods = {
        "torch.nn.utils.prune L1 global 50%": lambda m: peer(m, 0.5),
        "secateur magnitude global 50%": lambda m: prune_(
            m, UnstructuredConfig(sparsity=0.5, exclude=HEAD)
        ),
        "secateur wanda 50%": lambda m: prune_(
            m,
            UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer", exclude=HEAD),
            calibration=calibration,
        ),
        "secateur sparsegpt 50%": lambda m: prune_(
            m, SparseGPTConfig(sparsity=0.5, exclude=HEAD), calibration=calibration
        ),
        "secateur magnitude 2:4": lambda m: prune_(m, UnstructuredConfig(nm="2:4", exclude=HEAD)),
        "secateur wanda 2:4": lambda m: prune_(
            m,
            UnstructuredConfig(nm="2:4", criterion="wanda", exclude=HEAD),
            calibration=calibration,
        ),
        "secateur sparsegpt 2:4": lambda m: prune_(
            m, SparseGPTConfig(nm="2:4", exclude=HEAD), calibration=calibration
        ),
    }
    if args.only:
        methods = {k: v for k, v in methods.items() if any(word in k for word in args.only)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_file = save_model(dense, Path(tmp) / "dense.safetensors").stat().st_size
        coding = CompressionConfig(values="int8", level=args.level)
        for label, method in methods.items():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            method(model)
            seconds = time.perf_counter() - start
            zeros, _ = zero_fraction(model)
            error, agree = fidelity(model, dense_logits, held_out)
            if label.startswith("torch"):
                size = save_model(model, Path(tmp) / "peer.safetensors").stat().st_size
                stored = "safetensors"
            else:
                size = save_compressed(model, Path(tmp) / "model.secz", coding).stat().st_size
                stored = ".secz int8"
            rows.append((label, zeros, seconds, error, agree, size, stored))
            del model

    versions = ", ".join(
        f"{n} {importlib.metadata.version(n)}" for n in ("torch", "transformers", "secateur")
    )
    print(f"machine: {platform.machine()}, {args.threads} threads; {versions}")
    print(
        f"Qwen1.5-MoE-A2.7B widths, 16 experts, {args.layers} layers, vocab {args.vocab}, fp32; "
        f"expert stacks hold {stack_share:.1%} of the prunable weights; calibration "
        f"{args.calibration} x 2 x 128 tokens; dense safetensors {dense_file / 1e6:.0f} MB\n"
    )
    print("| method | weights zero | prune s | logits rel. error | top-1 agrees | file | bytes |")
    print("|---|---|---|---|---|---|---|")
    for label, zeros, seconds, error, agree, size, stored in rows:
        print(
            f"| {label} | {zeros:.1%} | {seconds:.1f} | {error:.3f} | {agree:.1%} | {stored} "
            f"| {size / 1e6:.0f} MB ({dense_file / size:.1f}× smaller) |"
        )


if __name__ == "__main__":
    main()
