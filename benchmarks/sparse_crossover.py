"""Sparse vs dense Linear on CPU: from which sparsity on do CSR and BSR kernels beat dense?

For each Linear shape (in -> out) and batch size, the weight is pruned to each sparsity of the
sweep with two masks: ``unstructured`` (random single weights, what magnitude pruning leaves) and
``block`` (whole b x b blocks zeroed, b = the largest power of two <= --blocksize dividing both
dimensions: what BSR is made for). The dense ``nn.Linear``, secateur's ``SparseLinear`` as CSR and
as BSR (b x b blocks) are then timed interleaved (run i of each before run i+1 of any) and their
medians compared. Crossover = lowest swept sparsity from which on the sparse kernel is faster than
dense at that and every higher swept sparsity ("-": never).

The ``conv`` part does the same for 3x3 convs (``--conv-shapes``, in->out channels on an H x W
input): dense ``nn.Conv2d`` against ``SparseConv2d`` as CSR (im2col + sparse matrix product), on
unstructured masks, at batch 1 and 32 (``--conv-batches``).

A last table times a 2:4-masked Linear (dense kernel, half its weights zero) against its dense
original, and as CSR: CPU kernels have no 2:4 path, so the mask alone gains nothing.

Run (about 3-4 minutes at 1 thread on a 2-core VM):

    .venv/bin/python benchmarks/sparse_crossover.py --threads 1 --runs 15 --out /tmp/runtime_results.md

The conv part alone (under a minute): ``--parts conv``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from secateur import UnstructuredConfig, create_model, prune_
from secateur._atomic import atomic_write_text
from secateur.measure import measure_latencies
from secateur.runtime import SparseConv2d, SparseLinear, sparsify_

SHAPES = ["784x300", "300x100", "1024x1024", "4096x1024"]  # in x out (LeNet-300-100 first)
BATCHES = [1, 64, 256]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
MASKS = ["unstructured", "block"]
CONV_SHAPES = ["64x64x16", "128x128x8"]  # in x out channels x H (= W) of the input, 3x3 kernel
CONV_BATCHES = [1, 32]
LAYOUTS = ["csr", "bsr"]


def time_interleaved(
    layers: Sequence[nn.Module], x: torch.Tensor, runs: int, warmup: int
) -> list[float]:
    """Median ms of ``layer(x)`` for each layer, run i of every one before run i+1 of any, in
    a fresh seeded random order each round (as ``measure_latencies`` does): with a fixed order
    a layer keeps its predecessor, which was seen to move times by up to 38%."""
    samples: list[list[float]] = [[] for _ in layers]
    shuffler = random.Random(0)
    for i in range(warmup + runs):
        order = list(range(len(layers)))
        shuffler.shuffle(order)
        for k in order:
            layer = layers[k]
            start = time.perf_counter()
            layer(x)
            if i >= warmup:
                samples[k].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]


def block_of(inp: int, out: int, wanted: int) -> int:
    b = 1
    while b * 2 <= wanted and inp % (b * 2) == 0 and out % (b * 2) == 0:
        b *= 2
    return b


def masked_linear(inp: int, out: int, sparsity: float, mask: str, block: int) -> nn.Linear:
    """A Linear with exactly round(sparsity * units) zeroed units (weights, or b x b blocks)."""
    layer = nn.Linear(inp, out)
    rows, cols = (out, inp) if mask == "unstructured" else (out // block, inp // block)
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols)[: round(sparsity * rows * cols)]] = False
    keep = keep.view(rows, cols)
    if mask == "block":
        keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    with torch.no_grad():
        layer.weight.mul_(keep)
    return layer


def crossover(dense: list[float], sparse: list[float | None]) -> str:
    """Lowest swept sparsity from which on sparse is faster at every higher one too."""
    found = "-"
    for s, d, t in reversed(list(zip(SPARSITIES, dense, sparse, strict=True))):
        if t is None or t >= d:
            break
        found = f"{s:g}"
    return found


def sweep(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    table = [
        "| shape in→out | batch | mask | block | dense ms | "
        + " | ".join(f"s={s:g} CSR× / BSR×" for s in SPARSITIES)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(SPARSITIES),
    ]
    cross = [
        "| shape in→out | batch | CSR, unstructured | BSR, unstructured | CSR, block | BSR, block |",
        "|---|---|---|---|---|---|",
    ]
    x_all = {b: torch.randn(b, 4096) for b in args.batches}
    for shape in args.shapes:
        inp, out = (int(v) for v in shape.split("x"))
        block = block_of(inp, out, args.blocksize)
        for batch in args.batches:
            x = x_all[batch][:, :inp].contiguous()
            found = {}
            for mask in MASKS:
                dense_ms, sparse_ms = [], {layout: [] for layout in LAYOUTS}
                for sparsity in SPARSITIES:
                    dense = masked_linear(inp, out, sparsity, mask, block)
                    layers: list[nn.Module] = [dense]
                    for layout in LAYOUTS:
                        s = SparseLinear.from_dense(dense, layout=layout, blocksize=block)
                        torch.testing.assert_close(s(x), dense(x), rtol=1e-4, atol=1e-4)
                        layers.append(s)
                    times = time_interleaved(layers, x, args.runs, args.warmup)
                    dense_ms.append(times[0])
                    for layout, t in zip(LAYOUTS, times[1:], strict=True):
                        sparse_ms[layout].append(t)
                cells = [
                    f"{d / c:.2f} / {d / b:.2f}"
                    for d, c, b in zip(dense_ms, sparse_ms["csr"], sparse_ms["bsr"], strict=True)
                ]
                table.append(
                    f"| {inp}→{out} | {batch} | {mask} | {block} | "
                    f"{statistics.median(dense_ms):.4f} | " + " | ".join(cells) + " |"
                )
                for layout in LAYOUTS:
                    found[(layout, mask)] = crossover(dense_ms, sparse_ms[layout])
                print(table[-1], file=sys.stderr, flush=True)
            cross.append(
                f"| {inp}→{out} | {batch} | {found[('csr', 'unstructured')]} | "
                f"{found[('bsr', 'unstructured')]} | {found[('csr', 'block')]} | "
                f"{found[('bsr', 'block')]} |"
            )
    return table, cross


def conv_sweep(args: argparse.Namespace) -> list[str]:
    """Dense 3x3 ``nn.Conv2d`` (padding 1) against ``SparseConv2d`` as CSR, unstructured masks."""
    lines = [
        "| conv in→out, 3x3, input | batch | dense ms | "
        + " | ".join(f"s={s:g} CSR×" for s in SPARSITIES)
        + " | crossover |",
        "|---|---|---|" + "---|" * len(SPARSITIES) + "---|",
    ]
    for shape in args.conv_shapes:
        cin, cout, hw = (int(v) for v in shape.split("x"))
        for batch in args.conv_batches:
            x = torch.randn(batch, cin, hw, hw)
            dense_ms, sparse_ms = [], []
            for sparsity in SPARSITIES:
                conv = nn.Conv2d(cin, cout, 3, padding=1)
                keep = torch.ones(conv.weight.numel(), dtype=torch.bool)
                keep[torch.randperm(keep.numel())[: round(sparsity * keep.numel())]] = False
                with torch.no_grad():
                    conv.weight.mul_(keep.view_as(conv.weight))
                sparse = SparseConv2d.from_dense(conv, layout="csr")
                torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-4)
                d, t = time_interleaved([conv, sparse], x, args.runs, args.warmup)
                dense_ms.append(d)
                sparse_ms.append(t)
            cells = [f"{d / t:.2f}" for d, t in zip(dense_ms, sparse_ms, strict=True)]
            lines.append(
                f"| {cin}→{cout}, {hw}x{hw} | {batch} | {statistics.median(dense_ms):.4f} | "
                + " | ".join(cells)
                + f" | {crossover(dense_ms, sparse_ms)} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def two_four(args: argparse.Namespace) -> list[str]:
    lines = [
        "| shape in→out | batch | dense ms | 2:4-masked dense ms | masked ÷ dense | CSR of 2:4 ms |",
        "|---|---|---|---|---|---|",
    ]
    for shape in args.shapes:
        inp, out = (int(v) for v in shape.split("x"))
        for batch in args.batches:
            dense = nn.Linear(inp, out)
            masked = nn.Linear(inp, out)
            masked.load_state_dict(dense.state_dict())
            prune_(masked, UnstructuredConfig(nm="2:4"))
            csr = SparseLinear.from_dense(masked, layout="csr")
            x = torch.randn(batch, inp)
            d, m, c = time_interleaved([dense, masked, csr], x, args.runs, args.warmup)
            lines.append(f"| {inp}→{out} | {batch} | {d:.4f} | {m:.4f} | {m / d:.2f} | {c:.4f} |")
    return lines


def end_to_end(args: argparse.Namespace) -> list[str]:
    """LeNet-300-100 pruned to --model-sparsity by global magnitude: ``sparsify_`` picks layers
    by measurement, then the whole dense and sparsified models are timed interleaved."""
    lines = []
    for batch in (64, 256):
        torch.manual_seed(0)
        dense = create_model("lenet_300_100").eval()
        prune_(dense, UnstructuredConfig(sparsity=args.model_sparsity))
        fast = copy.deepcopy(dense)
        x = torch.randn(batch, 1, 28, 28)
        report = sparsify_(fast, x, runs=args.runs)
        assert torch.allclose(fast(x), dense(x), rtol=1e-4, atol=1e-5)
        d, s = measure_latencies([dense, fast], x, runs=max(20, args.runs))
        lines += [
            f"Batch {batch}: whole model {d.median_ms:.3f} ms dense → {s.median_ms:.3f} ms "
            f"sparsified ({d.median_ms / s.median_ms:.2f}×), replaced: "
            f"{', '.join(report.replaced) or 'none'}.",
            "",
            report.render(),
            "",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--blocksize", type=int, default=16)
    parser.add_argument("--shapes", nargs="*", default=SHAPES, help="in x out, e.g. 784x300")
    parser.add_argument("--batches", nargs="*", type=int, default=BATCHES)
    parser.add_argument("--machine", default=f"{platform.machine()} CPU")
    parser.add_argument("--out", help="also write the Markdown section to this file")
    parser.add_argument("--model-sparsity", type=float, default=0.95)
    parser.add_argument("--conv-shapes", nargs="*", default=CONV_SHAPES, help="in x out x H")
    parser.add_argument("--conv-batches", nargs="*", type=int, default=CONV_BATCHES)
    parser.add_argument("--parts", nargs="*", default=["sweep", "conv", "2:4", "model"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    table, cross, conv, nm, model = [], [], [], [], []
    with torch.no_grad():
        if "sweep" in args.parts:
            table, cross = sweep(args)
        if "conv" in args.parts:
            conv = conv_sweep(args)
        if "2:4" in args.parts:
            nm = two_four(args)
        if "model" in args.parts:
            model = end_to_end(args)
    minutes = (time.perf_counter() - start) / 60
    command = shlex.join([".venv/bin/python", "benchmarks/sparse_crossover.py", *sys.argv[1:]])
    lines = [
        "## Sparse execution on CPU: CSR/BSR crossover (benchmarks/sparse_crossover.py)",
        "",
        f"`{command}` on {args.machine}, {args.threads} thread(s), torch {torch.__version__}, "
        f"python {platform.python_version()}, float32, median of {args.runs} interleaved runs "
        f"after {args.warmup} warm-up, sweep took {minutes:.1f} min.",
        "",
    ]
    if table:
        lines += [
            "Speedup = dense ms ÷ sparse ms (> 1: sparse is faster). `block` zeroes whole "
            "b x b blocks (b in the block column, also the BSR block size).",
            "",
            *table,
            "",
            "Crossover sparsity: lowest swept sparsity from which on the sparse kernel beats "
            "dense at every higher swept sparsity too (- = never in the sweep).",
            "",
            *cross,
            "",
        ]
    if conv:
        lines += [
            "3x3 convs (padding 1), unstructured masks: dense nn.Conv2d against SparseConv2d "
            "as CSR (im2col + sparse matrix product). Speedup = dense ms ÷ sparse ms; crossover = "
            "lowest swept sparsity from which on CSR beats dense at every higher one (- = never).",
            "",
            *conv,
            "",
        ]
    if nm:
        lines += [
            "2:4 on CPU: a dense Linear against the same Linear 2:4-masked (run by the same "
            "dense kernel), and the 2:4 weight as CSR (50% sparse).",
            "",
            *nm,
            "",
        ]
    if model:
        lines += [
            f"End to end: LeNet-300-100 (random init) pruned to {args.model_sparsity:.0%} by "
            "global magnitude; sparsify_ replaces a layer only where its sparse kernel measured "
            ">= 1.1x faster; then both whole models timed interleaved.",
            "",
            *model,
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
