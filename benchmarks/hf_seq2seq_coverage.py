"""Which Hugging Face encoder-decoder (seq2seq) families each tool prunes structurally into a working model.

Every family is built from a small random config (2 encoder and 2 decoder layers, hidden 64,
4 heads, FFN 128; no download), then pruned at ratio 0.5 by each tool in the same run:

- Torch-Pruning, which has no seq2seq example (its users ask for one: Torch-Pruning issue
  #447), with the recipe of its LLM example (``examples/LLMs/prune_llm.py``) carried over
  through its public API: ``num_heads`` for the q/k/v projections of every attention, the
  decoder's cross-attention included; ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``,
  whole heads (``prune_num_heads=True, prune_head_dims=False``), the hidden size, heads and FFN
  all at the ratio, ``lm_head`` ignored, ``round_to=4``, ``use_cache`` off while it traces;
  then the attribute updates such an example makes by hand (each attention's head count and
  inner width).
- secateur: ``prune_(model, StructuredConfig(ratio=0.5), example_inputs=inputs)`` with the
  encoder's and the decoder's token ids (Whisper: the log-mel features and the decoder's ids),
  with no per-family setting.

A family counts as pruned when (a) pruning raised nothing, (b) the pruned model runs forward
with logits of the right shape, (c) a decoding step through the self- and cross-attention
caches gives the logits of the full forward pass (checked where the dense model passes it
under this call; the others are marked "forward only"), and (d)
parameters fell. A tool gets ``--limit`` seconds per model; past that it is stopped.

    .venv/bin/pip install -c constraints.txt torch-pruning==1.6.1
    .venv/bin/python -W ignore benchmarks/hf_seq2seq_coverage.py --threads 2 [--onnx]

With ``--onnx``, each model that counts as pruned is also exported with secateur's
``export_onnx`` (its attention masks added; any batch and, for token inputs, any encoder and
decoder length) and checked in ONNX Runtime; the result is appended to its row. Where the
model decodes through its caches, it is also written as the cached pair of
``export_seq2seq_onnx`` (encoder and decoder files, the caches as inputs and outputs), and
``OnnxSeq2SeqGenerator`` must generate transformers' greedy tokens (8 new tokens, batch 2,
the second source padded; weights redrawn larger, see ``cached_pair_note``) for the row to
say "cached pair ok".
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from hf_llm_coverage import _short, print_header, print_runs, prune_and_check

from secateur import StructuredConfig, prune_
from secateur.export import export_onnx, export_seq2seq_onnx
from secateur.measure import OnnxSeq2SeqGenerator

RATIO = 0.5
VOCAB = 128
T5_LIKE = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4)
BART_LIKE = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=64,
)
FAMILIES: dict[str, dict[str, Any]] = {
    "t5": T5_LIKE,
    "mt5": T5_LIKE,
    "umt5": T5_LIKE,
    "longt5": dict(T5_LIKE, encoder_attention_type="local", local_radius=4),
    "switch_transformers": dict(
        T5_LIKE,
        num_experts=4,
        expert_capacity=16,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
    ),
    "bart": BART_LIKE,
    "mbart": BART_LIKE,
    "plbart": BART_LIKE,
    "mvp": BART_LIKE,
    "marian": BART_LIKE,
    "pegasus": BART_LIKE,
    "blenderbot": BART_LIKE,
    "blenderbot-small": BART_LIKE,
    "m2m_100": BART_LIKE,
    # a sparse (experts) layer every 2nd, so that one of the 2 is: the default is every 4th
    "nllb-moe": dict(
        BART_LIKE, num_experts=4, expert_capacity=16, encoder_sparse_step=2, decoder_sparse_step=2
    ),
    "bigbird_pegasus": dict(BART_LIKE, attention_type="original_full"),
    "whisper": dict(BART_LIKE, num_mel_bins=16, max_source_positions=16, max_target_positions=32),
}
ATTENTION_FC = ("out_proj", "o")  # an attention's output projection: it reads the heads
FFN_OUT = ("fc2", "wo")


def build(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family])
    config.pad_token_id = config.bos_token_id = config.decoder_start_token_id = 0
    config.eos_token_id = 1
    torch.manual_seed(0)
    auto = transformers.AutoModelForSpeechSeq2Seq if family == "whisper" else None
    model = (auto or transformers.AutoModelForSeq2SeqLM).from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    decoder = torch.randint(2, VOCAB, (2, 7), generator=gen)
    if family == "whisper":  # log-mel frames: twice the encoder's positions (a stride-2 conv)
        features = torch.randn(
            2, config.num_mel_bins, 2 * config.max_source_positions, generator=gen
        )
        return model, {"input_features": features, "decoder_input_ids": decoder}
    return model, {
        "input_ids": torch.randint(2, VOCAB, (2, 10), generator=gen),
        "decoder_input_ids": decoder,
    }


def _attention_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """Torch-Pruning's ``num_heads``: each attention's q/k/v projections and its head count."""
    heads = {}
    for module in model.modules():
        count = getattr(module, "num_heads", None) or getattr(module, "n_heads", None)
        if not isinstance(count, int):
            continue
        for names in (("q_proj", "k_proj", "v_proj"), ("q", "k", "v")):
            layers = [getattr(module, n, None) for n in names]
            if all(isinstance(p, torch.nn.Linear) for p in layers):
                heads.update(dict.fromkeys(layers, count))
    return heads


def torch_pruning(
    model: torch.nn.Module, x: dict[str, torch.Tensor], ratio: float = RATIO
) -> str | None:
    """Torch-Pruning's LLM recipe carried over to seq2seq (see the module docstring)."""
    import torch_pruning as tp

    # its users' workaround for tracing HF models (issue #461), passed with the inputs too:
    # T5's stacks hold configs of their own
    model.config.use_cache = False
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=dict(x, use_cache=False),
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        pruning_ratio=ratio,
        ignored_layers=[model.get_output_embeddings()],
        num_heads=_attention_heads(model),
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        round_to=4,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    for module in model.modules():  # the hand-written updates: head counts and inner widths
        q = getattr(module, "q_proj", None) or getattr(module, "q", None)
        if not isinstance(q, torch.nn.Linear):
            continue
        head_dim = getattr(module, "head_dim", None) or getattr(module, "key_value_proj_dim", None)
        if isinstance(head_dim, int):
            for name in ("num_heads", "n_heads"):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, q.out_features // head_dim)
            if isinstance(getattr(module, "inner_dim", None), int):
                module.inner_dim = q.out_features
            if isinstance(getattr(module, "embed_dim", None), int):
                module.embed_dim = q.in_features
    model.config.use_cache = True
    return None


def secateur(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> str | None:
    result = prune_(model, StructuredConfig(ratio=RATIO), example_inputs=x)
    if result.refused:
        return f"{len(result.refused)} group(s) left whole by the forward check"
    return None


TOOLS = {"Torch-Pruning": torch_pruning, "secateur": secateur}


def _widths(model: torch.nn.Module) -> str:
    """hidden / encoder self-attention / decoder cross-attention / FFN widths of the first
    layer of each (the inputs of the layers that read them)."""
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        cross = any(k in name for k in ("encoder_attn", "EncDec", "cross_attention"))
        if leaf in ATTENTION_FC:
            found.setdefault("cross" if cross else "self", module.in_features)
        elif leaf in FFN_OUT:
            found.setdefault("ffn", module.in_features)
    hidden = model.get_output_embeddings().in_features
    return f"{hidden} / " + " / ".join(str(found.get(k, "?")) for k in ("self", "cross", "ffn"))


def _decodes_through_cache(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> bool:
    """Whether one decoding step through the caches gives the full forward pass's logits."""
    source = {k: v[:1] for k, v in x.items() if k != "decoder_input_ids"}
    dec = x["decoder_input_ids"][:1]
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():  # the encoder alone, then the decoder through the caches, as generate
        encoded = model.get_encoder()(**source)
        first = model(encoder_outputs=encoded, decoder_input_ids=dec[:, :4], use_cache=True)
        step = model(
            decoder_input_ids=dec[:, 4:5],
            encoder_outputs=encoded,
            **{cache: first.past_key_values},
        )
        full = model(**source, decoder_input_ids=dec[:, :5]).logits
    return torch.allclose(step.logits[0, -1], full[0, -1], atol=1e-4, rtol=1e-3)


def check(model: torch.nn.Module, x: dict[str, torch.Tensor], dense_decodes: bool) -> str | None:
    """None when the pruned model runs and (where the dense one does) decodes through its
    caches as its full forward pass does."""
    try:
        with torch.no_grad():
            logits = model(**x).logits
    except Exception as exc:  # noqa: BLE001 - a failure is a result to report
        return f"forward fails ({_short(exc)})"
    if logits.shape != (*x["decoder_input_ids"].shape, VOCAB):
        return f"logits of shape {tuple(logits.shape)}"
    if not dense_decodes:
        return None
    try:
        agrees = _decodes_through_cache(model, x)
    except Exception as exc:  # noqa: BLE001
        return f"cached decoding fails ({_short(exc)})"
    return None if agrees else "cached decoding disagrees with the forward pass"


def onnx_note(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> str:
    """Export the pruned model with secateur's ``export_onnx`` (the masks added, any batch and,
    for token inputs, any encoder and decoder length) and say whether ONNX Runtime matched."""
    inputs = dict(x)
    if "input_ids" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["decoder_attention_mask"] = torch.ones_like(inputs["decoder_input_ids"])
    with tempfile.TemporaryDirectory() as folder:
        try:
            out = export_onnx(
                model, inputs, Path(folder) / "m.onnx", dynamic_sequence="input_ids" in inputs
            )
        except Exception as exc:  # noqa: BLE001 - a failure is a result to report
            return f"ONNX fails ({_short(exc)})"
    return f"ONNX ok (max diff {out.max_abs_diff:.1e})"


def cached_pair_note(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> str:
    """Export the cached encoder/decoder pair and say whether ONNX Runtime's greedy tokens
    are transformers' own, on a batch of two whose second token source is padded.

    A copy of the pruned model is checked, its matrices redrawn larger (std 0.3) so that the
    tokens follow the input rather than repeat one token, and its generation config without
    forced tokens (logits processors, which the generator does not apply)."""
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(std=0.3)
    model.generation_config.forced_bos_token_id = None
    model.generation_config.forced_eos_token_id = None
    source = {k: v for k, v in x.items() if k != "decoder_input_ids"}
    if "input_ids" in source:
        mask = torch.ones_like(source["input_ids"])
        mask[1, -3:] = 0
        source["attention_mask"] = mask
    eos = model.config.eos_token_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            export_seq2seq_onnx(model, source, folder)
            got = OnnxSeq2SeqGenerator(folder).generate(
                source, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos
            )
        except Exception as exc:  # noqa: BLE001 - a failure is a result to report
            return f"cached pair fails ({_short(exc)})"
    plain = transformers.GenerationConfig(  # no logits processors: the generator has none
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        decoder_start_token_id=model.config.decoder_start_token_id,
    )
    with torch.no_grad():  # the plain loop, also for Whisper, whose own generate adds steps
        expected = transformers.GenerationMixin.generate(model, **source, generation_config=plain)
    if got.shape == expected.shape and torch.equal(got, expected):
        return "cached pair ok"
    return "cached pair: other tokens than generate's"


def run(family: str, tool: str, limit: int, onnx: bool = False) -> dict[str, Any]:
    model, x = build(family)
    try:
        dense_decodes = _decodes_through_cache(model, x)
    except Exception:  # noqa: BLE001 - the call does not suit this family: forward only
        dense_decodes = False
    result = prune_and_check(
        model,
        lambda: TOOLS[tool](model, x),
        limit,
        lambda: check(model, x, dense_decodes),
        _widths,
    )
    if not dense_decodes and result["status"].startswith("ok"):
        result["status"] += " (forward only)"
    if onnx and result["status"].startswith("ok"):
        result["status"] += "; " + onnx_note(model, x)
        if dense_decodes:
            result["status"] += "; " + cached_pair_note(model, x)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument(
        "--limit", type=int, default=60, help="seconds a tool may take to prune one model"
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export each pruned model with secateur's export_onnx and check it in ONNX Runtime",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    print_header(
        args.threads,
        [
            f"limit {args.limit} s per pruning",
            f"ratio {RATIO}; widths are hidden / self-attention (heads x head_dim) / "
            "cross-attention / FFN, each of the first layer that has it",
        ],
    )
    print_runs(
        args.families, args.tools, lambda family, tool: run(family, tool, args.limit, args.onnx)
    )


if __name__ == "__main__":
    main()
