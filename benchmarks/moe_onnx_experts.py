"""How a mixture-of-experts model's experts should run in an ONNX file: A/B in ONNX Runtime.

The same model, Qwen1.5-MoE-A2.7B's widths (``llm_decode_speed.py --family qwen2_moe``: hidden
2048, 16 experts of 1408 neurons, top-4 routing, a shared expert; ``--layers`` layers, random
weights, fp32), is written twice by ``export_decoder_onnx`` with ``last_token_logits``:

- ``batched_mm``: transformers' traceable experts implementation, which gathers one weight
  matrix per (token, expert) pair (secateur's export before commit 6300f21, forced here by
  turning the expert-by-expert rewrite off for that export);
- ``expert by expert``: secateur's export now, each expert on the tokens routed to it;
- ``expert by expert, int8``: that file through ``quantize_onnx(mode="dynamic")`` (its
  "export s" is the quantization's time).

Both files run in ``OnnxGenerator`` with the same threads, timed in one interleaved loop
(prefill of each ``--prompts`` length: the prompt through an empty cache and its first token;
decode: ``--new-tokens`` greedy tokens after a 16-token prompt), medians over ``--rounds``
rounds after one warm-up round. Each file must generate PyTorch's tokens. The peak memory of
one prefill of each length is read from ``VmHWM`` in a fresh process per file and length.
Files over protobuf's 2 GiB limit cannot be written: 2 layers is the most at these widths.

A second table does the same in PyTorch for dynamic int8 (``quantize_dynamic_torch``): the
float model, int8 as it was before (only ``nn.Linear`` quantized, the expert stacks left
float: ``quantize_dynamic`` on a copy), and int8 now (every expert split into Linear layers
and quantized), timed interleaved likewise; weight bytes count int8 weights at a byte each.

    .venv/bin/python -W ignore benchmarks/moe_onnx_experts.py --threads 2   # 8 min
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from llm_decode_speed import build

import secateur.export._onnx as onnx_export
from secateur.export import export_decoder_onnx
from secateur.measure import OnnxGenerator
from secateur.quantization import quantize_dynamic_torch, quantize_onnx

VOCAB = 32000


def export(model: torch.nn.Module, path: Path, expert_by_expert: bool) -> None:
    example = {"input_ids": torch.randint(1, VOCAB, (1, 16))}
    saved = onnx_export.loop_over_experts_, onnx_export.loops_over_experts
    if not expert_by_expert:  # the export as it was: every experts module to batched_mm
        onnx_export.loop_over_experts_ = lambda model: 0
        onnx_export.loops_over_experts = lambda module: False
    try:
        export_decoder_onnx(model, example, path, last_token_logits=True)
    finally:
        onnx_export.loop_over_experts_, onnx_export.loops_over_experts = saved


def peak_gb(path: Path, length: int, threads: int) -> float:
    """VmHWM of a fresh process that loads ``path`` and prefills ``length`` tokens."""
    code = (
        "import sys, torch; from secateur.measure import OnnxGenerator\n"
        f"g = OnnxGenerator({str(path)!r}, threads={threads})\n"
        f"g.generate(torch.randint(1, {VOCAB}, (1, {length})), max_new_tokens=1)\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024**2


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state: float tensors at their size, int8 ones at a byte each."""

    def size(value: object) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * (1 if value.is_quantized else value.element_size())
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        return 0

    return sum(size(v) for v in model.state_dict().values())


def int8_linears_only(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch dynamic int8 as secateur gave it before: nn.Linear only, experts left float."""
    clone = copy.deepcopy(model).eval()
    return torch.ao.quantization.quantize_dynamic(clone, {torch.nn.Linear}, dtype=torch.qint8)


def torch_table(model: torch.nn.Module, prompts: dict, short: torch.Tensor, args) -> None:
    models = {
        "float32": model,
        "int8, experts left float (before)": int8_linears_only(model),
        "int8, every expert (now)": quantize_dynamic_torch(model),
    }
    with torch.no_grad():
        tokens = {
            k: m.generate(short, max_new_tokens=args.new_tokens, do_sample=False)
            for k, m in models.items()
        }
    prefill = {(k, n): [] for k in models for n in prompts}
    decode = {k: [] for k in models}
    with torch.no_grad():
        for round_ in range(args.rounds + 1):  # the first is a warm-up
            for name, m in models.items():
                for n, prompt in prompts.items():
                    start = time.perf_counter()
                    m(input_ids=prompt, logits_to_keep=1)
                    if round_:
                        prefill[(name, n)].append(time.perf_counter() - start)
                start = time.perf_counter()
                m(input_ids=short, logits_to_keep=1)
                first = time.perf_counter() - start
                start = time.perf_counter()
                m.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
                if round_:
                    total = time.perf_counter() - start
                    decode[name].append((args.new_tokens - 1) / max(total - first, 1e-9))
    lengths = " | ".join(f"prefill {n} ms" for n in prompts)
    print(f"\n| PyTorch | weight MB | {lengths} | decode tokens/s | tokens = float32's |")
    print("|---|---|" + "---|" * len(prompts) + "---|---|")
    for name, m in models.items():
        cells = " | ".join(f"{statistics.median(prefill[(name, n)]) * 1e3:.1f}" for n in prompts)
        same = "yes" if torch.equal(tokens[name], tokens["float32"]) else "no"
        print(
            f"| {name} | {weight_bytes(m) / 1e6:.1f} | {cells} | "
            f"{statistics.median(decode[name]):.1f} | {same} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()

    model = build("qwen2_moe", args.layers)
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(1, VOCAB, (1, n), generator=gen) for n in args.prompts}
    short = torch.randint(1, VOCAB, (1, 16), generator=gen)
    with torch.no_grad():
        reference = model.generate(short, max_new_tokens=args.new_tokens, do_sample=False)
    with tempfile.TemporaryDirectory() as folder:
        paths = {
            "batched_mm": Path(folder) / "batched_mm.onnx",
            "expert by expert": Path(folder) / "by_expert.onnx",
        }
        seconds_to_export = {}
        for name, path in paths.items():
            start = time.perf_counter()
            export(model, path, name == "expert by expert")
            seconds_to_export[name] = time.perf_counter() - start
        # the expert-by-expert file through ONNX Runtime's dynamic int8 (each expert its scales)
        start = time.perf_counter()
        paths["expert by expert, int8"] = quantize_onnx(
            paths["expert by expert"], Path(folder) / "by_expert.int8.onnx", mode="dynamic"
        )
        seconds_to_export["expert by expert, int8"] = time.perf_counter() - start
        runners = {name: OnnxGenerator(path, threads=args.threads) for name, path in paths.items()}
        same = {
            name: torch.equal(runner.generate(short, max_new_tokens=args.new_tokens), reference)
            for name, runner in runners.items()
        }
        prefill = {(name, n): [] for name in runners for n in prompts}
        decode = {name: [] for name in runners}
        for round_ in range(args.rounds + 1):  # the first is a warm-up
            for name, runner in runners.items():
                for n, prompt in prompts.items():
                    start = time.perf_counter()
                    runner.generate(prompt, max_new_tokens=1)
                    if round_:
                        prefill[(name, n)].append(time.perf_counter() - start)
                start = time.perf_counter()
                runner.generate(short, max_new_tokens=1)
                first = time.perf_counter() - start
                start = time.perf_counter()
                runner.generate(short, max_new_tokens=args.new_tokens)
                if round_:
                    total = time.perf_counter() - start
                    decode[name].append((args.new_tokens - 1) / max(total - first, 1e-9))
        del runners
        peaks = {
            (name, n): peak_gb(paths[name], n, args.threads) for name in paths for n in prompts
        }
        sizes = {name: os.path.getsize(path) / 1e6 for name, path in paths.items()}

    versions = ", ".join(
        f"{n} {importlib.metadata.version(n)}"
        for n in ("torch", "transformers", "onnxruntime", "secateur")
    )
    print(f"machine: {platform.machine()}, {args.threads} threads; {versions}")
    print(
        f"Qwen1.5-MoE-A2.7B widths, 16 experts, {args.layers} layers, fp32; medians of "
        f"{args.rounds} interleaved rounds; decode: {args.new_tokens} tokens after 16\n"
    )
    lengths = " | ".join(f"prefill {n} ms | peak GB at {n}" for n in prompts)
    print(
        f"| experts in the file | file MB | export s | {lengths} | decode tokens/s | tokens = PyTorch's |"
    )
    print("|---|---|---|" + "---|---|" * len(prompts) + "---|---|")
    for name in paths:
        cells = " | ".join(
            f"{statistics.median(prefill[(name, n)]) * 1e3:.1f} | {peaks[(name, n)]:.2f}"
            for n in prompts
        )
        print(
            f"| {name} | {sizes[name]:.1f} | {seconds_to_export[name]:.0f} | {cells} | "
            f"{statistics.median(decode[name]):.1f} | {'yes' if same[name] else 'no'} |"
        )
    torch_table(model, prompts, short, args)


if __name__ == "__main__":
    main()
