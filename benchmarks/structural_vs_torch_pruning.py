"""Structural pruning, secateur against Torch-Pruning, side by side in one run.

For each model: build the dependency graph and prune 50% of every group's channels with each
tool (group L2 magnitude for both), then measure MACs, params and batch-1 CPU latency of the
dense model and both pruned ones, timed interleaved in one loop. Efficiency = measured speedup ÷
MAC reduction (1.0 means latency fell exactly as much as the MAC count).

Torch-Pruning (pip torch-pruning) is a benchmark-only dependency: it is imported here and nowhere
in secateur. Run:

    .venv/bin/pip install torch-pruning
    .venv/bin/python benchmarks/structural_vs_torch_pruning.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torchvision

from secateur import StructuredConfig, prune_
from secateur.graph import KINDS, build_dependency_graph
from secateur.measure import count_macs, count_params, measure_latencies

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vit_b_16"]
GRAPH_REPEATS = 5


def median_seconds(fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(GRAPH_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(
    model: torch.nn.Module, x: torch.Tensor, ratio: float, kinds: tuple[str, ...] = KINDS
) -> tuple[float, float, str]:
    graph_s = median_seconds(lambda: build_dependency_graph(model, x))
    start = time.perf_counter()
    result = prune_(model, StructuredConfig(ratio=ratio, kinds=kinds), example_inputs=x)
    total_s = time.perf_counter() - start
    note = "" if result.removed_units else "no prunable group"
    if result.refused:
        note = f"{len(result.refused)} group(s) refused by the forward check"
    return graph_s, total_s, note


def ours_channels(
    model: torch.nn.Module, x: torch.Tensor, ratio: float
) -> tuple[float, float, str]:
    """Neurons/filters/FFN width only: the hidden size stays, as Torch-Pruning's ViT run keeps it."""
    return ours(model, x, ratio, kinds=("channel",))


def ours_channels_heads(
    model: torch.nn.Module, x: torch.Tensor, ratio: float
) -> tuple[float, float, str]:
    """MLP width and whole attention heads; the hidden size stays (what Torch-Pruning's
    ``prune_num_heads=True`` asks for)."""
    return ours(model, x, ratio, kinds=("channel", "head"))


def theirs(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> tuple[float, float, str]:
    import torch_pruning as tp

    heads = getattr(model, "heads", None)
    ignored = (
        [model.fc]
        if hasattr(model, "fc")
        else [model.classifier[-1]]
        if hasattr(model, "classifier")
        else [heads.head]
    )
    graph_s = median_seconds(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x))
    start = time.perf_counter()
    kwargs = {}
    if heads is not None:  # torchvision ViT: let Torch-Pruning prune whole heads
        mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
        kwargs = {"num_heads": {m: m.num_heads for m in mha}, "prune_num_heads": True}
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        **kwargs,
    )
    pruner.step()
    total_s = time.perf_counter() - start
    return graph_s, total_s, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torch_pruning as tp

    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch-pruning {tp.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {args.threads} threads, "
        f"batch 1, 224x224, ratio {args.ratio}, median of {args.runs} interleaved runs\n"
    )
    print(
        "| model | tool | graph build s | graph+prune s | params M | MACs G | latency ms | speedup | MAC reduction | efficiency | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        dense = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        models, rows = {"dense": dense}, {}
        tools = [("secateur", ours), ("torch-pruning", theirs)]
        if name.startswith("vit"):
            tools.insert(1, ("secateur kinds=channel", ours_channels))
            tools.insert(2, ("secateur kinds=channel,head", ours_channels_heads))
        for tool, fn in tools:
            model = copy.deepcopy(dense)
            try:
                with torch.no_grad() if tool.startswith("secateur") else torch.enable_grad():
                    rows[tool] = fn(model, x, args.ratio)
                model.eval()(x)
                models[tool] = model
            except Exception as exc:  # record the peer's failure instead of stopping the run
                rows[tool] = (
                    float("nan"),
                    float("nan"),
                    f"failed: {type(exc).__name__}: {str(exc)[:80]}",
                )
        lats = dict(
            zip(
                models,
                measure_latencies(list(models.values()), x, runs=args.runs, warmup=5),
                strict=True,
            )
        )
        base_macs = count_macs(dense, x).dense
        for tool in ["dense", *(t for t, _ in tools)]:
            if tool not in models:
                g, t, note = rows[tool]
                print(f"| {name} | {tool} | {g:.2f} | {t:.2f} | – | – | – | – | – | – | {note} |")
                continue
            m = models[tool]
            macs = count_macs(m, x).dense
            params = count_params(m)[0]
            speedup = lats["dense"].median_ms / lats[tool].median_ms
            reduction = base_macs / macs
            g, t, note = rows.get(tool, (float("nan"), float("nan"), ""))
            timing = "–" if tool == "dense" else f"{g:.2f} | {t:.2f}"
            timing = timing if tool != "dense" else "– | –"
            print(
                f"| {name} | {tool} | {timing} | {params / 1e6:.2f} | {macs / 1e9:.3f} | "
                f"{lats[tool].median_ms:.1f} | {speedup:.2f}× | {reduction:.2f}× | {speedup / reduction:.2f} | {note} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
