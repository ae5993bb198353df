"""Deep Compression on LeNet-300-100 / Fashion-MNIST: bytes on disk, stage by stage, in one run.

Pipeline (Han et al. 2016): train → prune gradually (cubic AGP) while fine-tuning → cluster the
surviving weights into k-means codebooks and fine-tune the centroids → write secateur's
compressed file (sparse index + codebook codes + zstd). The target is >= 40x smaller than the
fp32 baseline file at <= 0.5 points top-1 drop.

Beside it, in the same run and on the same pruned weights, the formats a user would otherwise
reach for: the dense safetensors file, the same file zstd-compressed, PyTorch's own sparse CSR
tensors (int64 indices + fp32 values) in safetensors, and ONNX Runtime's int8 file.

Run (the baseline is cached in benchmarks/.cache; 2 threads, about 3 minutes):

    .venv/bin/python benchmarks/deep_compression_lenet.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import tempfile
from pathlib import Path

import onnxruntime
import torch
import zstandard
from criteria_fashion_mnist import baseline, calibration  # noqa: E402  (same folder)
from safetensors.torch import save as safetensors_bytes

from secateur import UnstructuredConfig
from secateur.data import load_fashion_mnist
from secateur.export import (
    CompressionConfig,
    compression_stages,
    export_onnx,
    load_compressed,
    save_compressed,
)
from secateur.measure import OnnxRunner
from secateur.pruning import GradualPruner
from secateur.quantization import CodebookConfig, cluster_weights_, quantize_onnx
from secateur.training import TrainConfig, evaluate, fit


def csr_bytes(model: torch.nn.Module) -> int:
    """Bytes of a safetensors file holding each 2-D weight as PyTorch CSR parts."""
    tensors = {}
    for name, t in model.state_dict().items():
        if t.dim() == 2:
            csr = t.to_sparse_csr()
            tensors[f"{name}.crow"] = csr.crow_indices()
            tensors[f"{name}.col"] = csr.col_indices()
            tensors[f"{name}.values"] = csr.values()
        else:
            tensors[name] = t
    return len(safetensors_bytes(tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--prune-epochs", type=int, default=10)
    parser.add_argument("--prune-lr", type=float, default=0.01)
    parser.add_argument("--bits", type=int, default=5)
    parser.add_argument("--layer-bits", default="", help="e.g. fc3=6")
    parser.add_argument("--centroid-epochs", type=int, default=3)
    parser.add_argument("--centroid-lr", type=float, default=0.001)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist(seed=0)
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, zstandard "
        f"{zstandard.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{args.threads} threads; Fashion-MNIST {len(data.train):,} train / "
        f"{len(data.test):,} test"
    )
    dense = baseline("lenet_300_100", data, args.baseline_epochs).eval()
    base_acc = evaluate(dense, data.test)

    pruned = copy.deepcopy(dense)
    budget = TrainConfig(epochs=args.prune_epochs, lr=args.prune_lr, seed=1)
    steps = budget.epochs * math.floor(len(data.train) / budget.batch_size)
    gradual = GradualPruner(
        pruned,
        UnstructuredConfig(sparsity=args.sparsity),
        start_step=0,
        end_step=int(0.6 * steps),
        frequency=50,
    )
    fit(pruned, data, budget, constraint=gradual, progress=False)
    gradual.masks_.make_permanent()
    pruned_acc = evaluate(pruned, data.test)

    per_layer = dict(item.split("=") for item in args.layer_bits.split(",") if item)
    per_layer = {k: int(v) for k, v in per_layer.items()}
    shared = copy.deepcopy(pruned)
    books = cluster_weights_(shared, CodebookConfig(bits=args.bits, per_layer=per_layer))
    kmeans_acc = evaluate(shared, data.test)
    centroid_cfg = TrainConfig(epochs=args.centroid_epochs, lr=args.centroid_lr, seed=2)
    fit(shared, data, centroid_cfg, constraint=books, progress=False)
    shared_acc = evaluate(shared, data.test)

    config = CompressionConfig(values="codebook", bits=args.bits, per_layer=per_layer)
    stages = compression_stages(shared, config)
    folder = Path(tempfile.mkdtemp())
    path = save_compressed(shared, folder / "lenet.secz", config)
    restored = load_compressed(path).model
    restored_acc = evaluate(restored, data.test)
    exact = all(
        torch.equal(a, b)
        for a, b in zip(shared.state_dict().values(), restored.state_dict().values(), strict=True)
    )

    dense_bytes = stages[0].bytes
    dense_blob = safetensors_bytes({k: v.contiguous() for k, v in pruned.state_dict().items()})
    onnx_path = folder / "lenet.onnx"
    export_onnx(pruned, data.example_input, onnx_path)
    int8_path = quantize_onnx(
        onnx_path, folder / "lenet.int8.onnx", mode="static", calibration=calibration(data, 8)
    )
    int8_acc = evaluate(OnnxRunner(int8_path), data.test)

    print(f"\nLeNet-300-100, dense fp32 baseline top-1 {base_acc:.2%}, file {dense_bytes:,} B\n")
    print("| stage | top-1 | change | bytes | vs dense file |")
    print("|---|---|---|---|---|")

    def row(name: str, acc: float | None, size: int) -> None:
        top = f"{acc:.2%} | {100 * (acc - base_acc):+.2f} pt" if acc is not None else "– | –"
        print(f"| {name} | {top} | {size:,} | {dense_bytes / size:.1f}x |")

    row("dense fp32 (safetensors)", base_acc, dense_bytes)
    row(
        f"AGP to {args.sparsity:.0%}, {args.prune_epochs} epochs: dense file",
        pruned_acc,
        len(dense_blob),
    )
    row(
        "  same file, zstd -19",
        pruned_acc,
        len(zstandard.ZstdCompressor(level=19).compress(dense_blob)),
    )
    row("  PyTorch CSR tensors (int64 index, fp32) in safetensors", pruned_acc, csr_bytes(pruned))
    row("  ONNX Runtime int8 static (QDQ)", int8_acc, int8_path.stat().st_size)
    print(
        f"| k-means codebooks, before centroid fine-tuning | {kmeans_acc:.2%} | "
        f"{100 * (kmeans_acc - base_acc):+.2f} pt | – | – |"
    )
    for stage in stages[1:]:
        acc = pruned_acc if stage.name.startswith("sparse") else shared_acc
        row(f"secateur: {stage.name}", acc, stage.bytes)
    row("secateur .secz file on disk, reloaded", restored_acc, path.stat().st_size)
    nonzero = sum(int((p != 0).sum()) for p in shared.parameters() if p.dim() == 2)
    total = sum(p.numel() for p in shared.parameters() if p.dim() == 2)
    print(
        f"\nweights kept {nonzero:,} of {total:,} ({nonzero / total:.2%}); codebooks "
        f"{books.bits}; centroids fine-tuned {args.centroid_epochs} epochs at lr "
        f"{args.centroid_lr}; reload bit-exact: {exact}"
    )


if __name__ == "__main__":
    main()
