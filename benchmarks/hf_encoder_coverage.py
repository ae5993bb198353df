"""Which Hugging Face encoder families each tool prunes structurally into a working classifier.

Every family is built as a sequence classifier from a small random config (2 layers, hidden 64,
4 heads, FFN 128; no download), then pruned at ratio 0.5 by each tool in the same run:

- Torch-Pruning, following its BERT example (``examples/hf_transformers/prune_bert.py``) through
  its public API: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, uniform ratio, the
  q/k/v projections of every self-attention given their head count (``num_heads``; a fused
  q|k|v projection gets three times the heads), whole heads removed
  (``prune_num_heads=True, prune_head_dims=False``), the classifier head ignored, the logits
  summed as the output; then the example's attribute updates: each attention module's head
  count and ``all_head_size`` from its query projection's new width.
- secateur: ``prune_(model, StructuredConfig(ratio=0.5), example_inputs=...)`` with nothing set
  per family.

A family counts as pruned when pruning raised nothing, the pruned model runs on another batch
size and sequence length with a padded row, gives finite logits of the right shape, and its
parameters fell. A tool gets ``--limit`` seconds per model; past that it is stopped.

    .venv/bin/pip install -c constraints.txt torch-pruning==1.6.1
    .venv/bin/python -W ignore benchmarks/hf_encoder_coverage.py --threads 2
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import torch
import transformers
from hf_llm_coverage import _short, print_header, print_runs, prune_and_check

from secateur import StructuredConfig, prune_

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)
FAMILIES: dict[str, dict[str, Any]] = {
    "bert": SMALL,
    "roberta": SMALL,
    "xlm-roberta": SMALL,
    "electra": dict(SMALL, embedding_size=32),
    "distilbert": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64),
    "albert": dict(SMALL, embedding_size=32),
    "mpnet": SMALL,
    "deberta": dict(SMALL, relative_attention=True, pos_att_type=["c2p", "p2c"]),
    "deberta-v2": dict(  # DeBERTa-v3's architecture
        SMALL,
        relative_attention=True,
        pos_att_type=["c2p", "p2c"],
        position_buckets=16,
        max_relative_positions=32,
        position_biased_input=False,
        norm_rel_ebd="layer_norm",
    ),
    "modernbert": dict(
        SMALL, global_attn_every_n_layers=2, local_attention=8, cls_token_id=0, sep_token_id=0
    ),
}
RATIO = 0.5
VOCAB = 100
LABELS = 3
Q_NAMES = ("query", "q_proj", "q_lin", "query_proj", "q")
KV_NAMES = (
    "key",
    "value",
    "k_proj",
    "v_proj",
    "k_lin",
    "v_lin",
    "key_proj",
    "value_proj",
    "k",
    "v",
)
FUSED_NAMES = ("Wqkv", "in_proj", "qkv")
HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads")
HEAD_SIZES = ("attention_head_size", "head_dim", "dim_per_head", "head_size")


def build(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = transformers.AutoConfig.for_model(
        family, vocab_size=VOCAB, num_labels=LABELS, **FAMILIES[family]
    )
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _attention_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Module, dict]]:
    """Each self-attention module and its q/k/v (or fused) Linear children by role."""
    found = []
    for module in model.modules():
        children = dict(module.named_children())
        linears = {n: c for n, c in children.items() if isinstance(c, torch.nn.Linear)}
        q = [linears[n] for n in Q_NAMES if n in linears]
        fused = [linears[n] for n in FUSED_NAMES if n in linears]
        if q or fused:
            kv = [linears[n] for n in KV_NAMES if n in linears]
            found.append((module, {"q": q[:1], "kv": kv, "fused": fused[:1]}))
    return found


def _classifier_head(model: torch.nn.Module) -> list[torch.nn.Module]:
    for name in ("classifier", "score", "head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return [head]
    return []


def torch_pruning(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> str | None:
    """Torch-Pruning's BERT recipe, as its example sets it up (see the module docstring)."""
    import torch_pruning as tp

    heads = model.config.num_attention_heads if hasattr(model.config, "num_attention_heads") else 4
    num_heads = {}
    for _, roles in _attention_projections(model):
        for layer in roles["q"] + roles["kv"]:
            num_heads[layer] = heads
        for layer in roles["fused"]:
            num_heads[layer] = 3 * heads
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=x,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        pruning_ratio=RATIO,
        ignored_layers=_classifier_head(model),
        output_transform=lambda out: out.logits.sum(),
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=RATIO,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    # the example's hand-written attribute updates: head counts follow the query width
    for module, roles in _attention_projections(model):
        width = roles["q"][0].out_features if roles["q"] else roles["fused"][0].out_features // 3
        size = next((getattr(module, n) for n in HEAD_SIZES if hasattr(module, n)), None)
        if isinstance(size, int) and size > 0:
            for name in HEAD_COUNTS:
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, width // size)
        if hasattr(module, "all_head_size"):
            module.all_head_size = width
    return None


def secateur(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> str | None:
    result = prune_(model, StructuredConfig(ratio=RATIO), example_inputs=x)
    if result.refused:
        return f"{len(result.refused)} group(s) left whole by the forward check"
    return None


TOOLS: dict[str, Callable[[torch.nn.Module, dict[str, torch.Tensor]], str | None]] = {
    "Torch-Pruning": torch_pruning,
    "secateur": secateur,
}


FFN_OUT = ("output.dense", "ffn.lin2", "mlp.Wo", "ffn_output")


def _widths(model: torch.nn.Module) -> str:
    """hidden size / attention width / FFN width of layer 0: the input width of the first
    query (or fused q|k|v) projection, and of the first attention and FFN output layers."""
    hidden = attn = ffn = "?"
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        in_attention = "attention" in name or ".attn" in name
        if hidden == "?" and leaf in Q_NAMES + FUSED_NAMES:
            hidden = module.in_features
        if attn == "?" and in_attention and leaf in ("dense", "out_lin", "o", "Wo", "out_proj"):
            attn = module.in_features
        if ffn == "?" and not in_attention and name.endswith(FFN_OUT):
            ffn = module.in_features
    return f"{hidden} / {attn} / {ffn}"


def check(model: torch.nn.Module) -> str | None:
    """None when the pruned model classifies another batch and length, one row padded."""
    ids = torch.randint(1, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    except Exception as exc:  # noqa: BLE001 - a failure is a result to report
        return f"forward fails ({_short(exc)})"
    if logits.shape != (3, LABELS) or not logits.isfinite().all():
        return f"bad logits {tuple(logits.shape)}"
    return None


def run(family: str, tool: str, limit: int) -> dict[str, Any]:
    model, x = build(family)
    return prune_and_check(
        model, lambda: TOOLS[tool](model, x), limit, lambda: check(model), _widths
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument(
        "--limit", type=int, default=30, help="seconds a tool may take to prune one model"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    print_header(
        args.threads,
        [f"limit {args.limit} s per pruning; ratio {RATIO}; widths: hidden / attention / FFN"],
    )
    print_runs(args.families, list(TOOLS), lambda family, tool: run(family, tool, args.limit))


if __name__ == "__main__":
    main()
