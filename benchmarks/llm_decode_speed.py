"""Does structured pruning make an LLM faster on this CPU? Prefill and decode, measured.

A Llama model with the widths of Llama 3.2 1B (hidden 2048, FFN 8192, 32 query heads over 8
key/value heads of 64; ``--layers`` of its 16 layers, random weights, no download), or with
``--family qwen2_moe`` a mixture-of-experts model with Qwen1.5-MoE-A2.7B's widths (16 of its 60
experts of 1408 neurons, top-4 routing, a shared expert of 5632), or with ``--family mamba2``
a state-space model with Mamba2-370m's widths (hidden 1024, 32 heads of 64, state 128), is
pruned by
secateur at each ``--ratios`` two ways: heads and FFN neurons only (the hidden size stays), and
the hidden size too; the MoE model also loses that share of its experts whole (``ExpertConfig``,
the least routed on the prompt first). ``--family t5`` is an encoder-decoder with T5-base's
widths (hidden 768, FFN 3072, 12 heads of 64; ``--layers`` in each stack), where the heads of
self- and cross-attention go; Torch-Pruning prunes it too, with the recipe of
``hf_seq2seq_coverage.py`` at each ratio. Every model is then timed in one interleaved loop,
round after round, so that the machine's drift falls on all of them alike:

- prefill: one forward pass over a ``--prompt``-token prompt, batch 1, keeping the last
  token's logits only where the model allows it, as ``generate`` does (T5: the encoder over
  the prompt and the decoder's first step);
- decode: greedy generation of ``--new-tokens`` tokens after that prompt through the KV cache
  (T5: also the cross-attention cache), reported as tokens per second.

Medians over ``--rounds`` rounds. Torch-Pruning is not in the Llama and MoE tables: its LLM
recipe fails on these widths (see ``hf_llm_coverage.py --real-widths``), so there is no peer
model to time.

With ``--onnx``, the dense model and each pruned one are also written by
``export_decoder_onnx`` (key/value cache as inputs and outputs, ``last_token_logits``) and run by
``OnnxGenerator`` in ONNX Runtime with the same threads, timed in the same interleaved loop:
prefill is the prompt through an empty cache and its first token, decode as above. T5 goes
through ``export_seq2seq_onnx`` and ``OnnxSeq2SeqGenerator`` instead (an encoder file that also
gives the cross-attention cache, a decoder file with its own cache). A column says whether ONNX
Runtime generated PyTorch's tokens. Mamba2's file takes one token per call, its states in and
out, so its prefill there is the prompt a token at a time. An ONNX file holds at most 2 GiB (protobuf's limit): with
Qwen1.5-MoE's widths that is 2 layers (``--layers 2``).

    .venv/bin/python -W ignore benchmarks/llm_decode_speed.py --threads 2 [--onnx]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import inspect
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from hf_seq2seq_coverage import torch_pruning as seq2seq_peer

from secateur import ExpertConfig, StructuredConfig, prune_
from secateur.export import export_decoder_onnx, export_seq2seq_onnx
from secateur.export._onnx_states_export import PREFILL_BLOCK
from secateur.measure import OnnxGenerator, OnnxSeq2SeqGenerator, count_macs

PRESETS = {
    "llama": (
        "Llama 3.2 1B widths",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=32000,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen1.5-MoE-A2.7B's widths with 16 of its 60 experts (top-4 routing, a shared expert)
    "qwen2_moe": (
        "Qwen1.5-MoE-A2.7B widths, 16 of 60 experts",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632,
            num_experts=16,
            num_experts_per_tok=4,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
            max_position_embeddings=512,
        ),
    ),
    # a state-space model: each layer's cache is a convolution state and a recurrent state of
    # fixed size; its ONNX file takes one token per call, and the prompt in blocks
    "mamba2": (
        "Mamba2-370m widths",
        dict(
            hidden_size=1024,
            num_heads=32,
            head_dim=64,
            expand=2,
            state_size=128,
            n_groups=1,
            chunk_size=256,
            conv_kernel=4,
            vocab_size=50288,
        ),
    ),
    # Qwen3.5's layer pattern (three Gated DeltaNet layers, then one of full attention) at a
    # hidden size of 1024 (not a released size: Qwen3.5's config defaults are its 27B's)
    "qwen3_5_text": (
        "Qwen3.5 layer pattern at hidden 1024",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_num_key_heads=8,
            linear_num_value_heads=16,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            vocab_size=32000,
            max_position_embeddings=512,
        ),
    ),
    "t5": (
        "T5-base widths",
        dict(d_model=768, d_kv=64, d_ff=3072, num_heads=12, vocab_size=32128),
    ),
}
SEQ2SEQ = {"t5"}


def build(family: str, layers: int) -> torch.nn.Module:
    widths = PRESETS[family][1]
    if family in SEQ2SEQ:
        config = transformers.AutoConfig.for_model(
            family, num_layers=layers, num_decoder_layers=layers, **widths
        )
        config.decoder_start_token_id = 0
    else:
        if "layer_types" in widths:  # the preset's pattern repeated over the layers
            pattern = widths["layer_types"]
            widths = {**widths, "layer_types": [pattern[i % len(pattern)] for i in range(layers)]}
        config = transformers.AutoConfig.for_model(family, num_hidden_layers=layers, **widths)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if family in SEQ2SEQ
        else transformers.AutoModelForCausalLM
    )
    return auto.from_config(config).eval()


def prefill_inputs(model: torch.nn.Module, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prompt, and for an encoder-decoder the decoder's start token."""
    if not model.config.is_encoder_decoder:
        return {"input_ids": prompt}
    start = torch.full_like(prompt[:, :1], model.config.decoder_start_token_id)
    return {"input_ids": prompt, "decoder_input_ids": start}


def _last_logits(model: torch.nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: generate computes no other logits."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def prefill_seconds(model: torch.nn.Module, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**prefill_inputs(model, prompt), use_cache=False, **_last_logits(model))
    return time.perf_counter() - start


def decode_tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        # the same prefill as generate's, to subtract
        model(**prefill_inputs(model, prompt), **_last_logits(model))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        total = time.perf_counter() - start
    return (new - 1) / max(total - prefill, 1e-9)  # the first new token comes from prefill


class OrtModel:
    """The model exported with its caches and run in ONNX Runtime, timed like the PyTorch
    models: ``export_decoder_onnx`` for a decoder, ``export_seq2seq_onnx`` for T5."""

    def __init__(
        self,
        model: torch.nn.Module,
        folder: str,
        name: str,
        threads: int,
        prefill_block: int | None = PREFILL_BLOCK,
    ) -> None:
        example = {"input_ids": torch.randint(1, model.config.vocab_size, (1, 16))}
        stem = Path(folder) / name.replace(" ", "_").replace("+", "_")
        self.generator: OnnxGenerator | OnnxSeq2SeqGenerator
        self.prefill_block: int | None = None  # prompt tokens per call of a state file
        if model.config.is_encoder_decoder:  # a folder of two files
            export_seq2seq_onnx(model, example, stem)
            self.generator = OnnxSeq2SeqGenerator(stem, threads=threads)
        else:
            path = stem.parent / f"{stem.name}.onnx"
            written = export_decoder_onnx(
                model, example, path, last_token_logits=True, prefill_block=prefill_block
            )
            self.prefill_block = written.prefill_block
            self.generator = OnnxGenerator(path, threads=threads)

    def prefill_seconds(self, prompt: torch.Tensor) -> float:
        start = time.perf_counter()
        self.generator.generate(prompt, max_new_tokens=1)
        return time.perf_counter() - start

    def decode_tokens_per_second(self, prompt: torch.Tensor, new: int) -> float:
        prefill = self.prefill_seconds(prompt)
        start = time.perf_counter()
        self.generator.generate(prompt, max_new_tokens=new)
        total = time.perf_counter() - start
        return (new - 1) / max(total - prefill, 1e-9)


def _prefill(model: torch.nn.Module | OrtModel, prompt: torch.Tensor) -> float:
    if isinstance(model, OrtModel):
        return model.prefill_seconds(prompt)
    return prefill_seconds(model, prompt)


def _decode(model: torch.nn.Module | OrtModel, prompt: torch.Tensor, new: int) -> float:
    if isinstance(model, OrtModel):
        return model.decode_tokens_per_second(prompt, new)
    return decode_tokens_per_second(model, prompt, new)


def _same_tokens(model: torch.nn.Module, ort: OrtModel, prompt: torch.Tensor, new: int) -> bool:
    """Whether both generate the same greedy tokens, each stopping at the model's end token."""
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=eos)
    got = ort.generator.generate(prompt, max_new_tokens=new, eos_token_id=eos, pad_token_id=eos)
    return torch.equal(got, expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", choices=sorted(PRESETS), default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--onnx", action="store_true", help="also time each model in ONNX Runtime")
    parser.add_argument(
        "--prefill-block",
        type=int,
        default=PREFILL_BLOCK,
        help="prompt tokens per call of a file of recurrent states (where the model allows); "
        "0: a token per call",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()

    dense = build(args.family, args.layers)
    title, widths = PRESETS[args.family]
    prompt = torch.randint(1, widths["vocab_size"], (1, args.prompt))
    example = prefill_inputs(dense, prompt[:, :16])
    if args.family in SEQ2SEQ:
        example["decoder_input_ids"] = prompt[:, :8]
    models = {"dense": dense}
    for ratio in args.ratios:
        for label, kinds in (
            ("heads+FFN", ("head", "channel")),
            ("heads+FFN+hidden", ("head", "channel", "hidden")),
        ):
            model = copy.deepcopy(dense)
            prune_(model, StructuredConfig(ratio=ratio, kinds=kinds), example_inputs=example)
            models[f"{label} {ratio}"] = model
        if "num_experts" in widths:  # whole experts, the least routed on the prompt, go
            model = copy.deepcopy(dense)
            prune_(model, ExpertConfig(ratio=ratio), calibration=[{"input_ids": prompt}])
            models[f"experts {ratio}"] = model
        if args.family in SEQ2SEQ:  # the peer: its LLM recipe carried over (heads, FFN, hidden)
            model = copy.deepcopy(dense)
            seq2seq_peer(model, example, ratio)
            models[f"Torch-Pruning {ratio}"] = model

    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    macs = {
        k: count_macs(m, {**prefill_inputs(m, prompt), **_last_logits(m)}).dense
        for k, m in models.items()
    }
    timed: dict[str, torch.nn.Module | OrtModel] = dict(models)
    same: dict[str, bool] = {}
    blocks: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.onnx:
            for name, model in models.items():
                ort = OrtModel(model, folder, name, args.threads, args.prefill_block or None)
                blocks[name] = ort.prefill_block
                same[name] = _same_tokens(model, ort, prompt, args.new_tokens)
                timed[f"{name} (ORT)"] = ort
                params[f"{name} (ORT)"], macs[f"{name} (ORT)"] = params[name], macs[name]
        prefill: dict[str, list[float]] = {k: [] for k in timed}
        decode: dict[str, list[float]] = {k: [] for k in timed}
        for model in timed.values():  # warm-up
            _prefill(model, prompt)
            _decode(model, prompt, 4)
        for _ in range(args.rounds):
            for name, model in timed.items():
                prefill[name].append(_prefill(model, prompt))
                decode[name].append(_decode(model, prompt, args.new_tokens))

    versions = ", ".join(
        f"{n} {importlib.metadata.version(n)}" for n in ("torch", "transformers", "secateur")
    )
    if args.onnx:
        versions += f", onnxruntime {importlib.metadata.version('onnxruntime')}"
    print(f"machine: {platform.machine()}, {args.threads} threads; {versions}")
    print(
        f"{title}, {args.layers} layers, fp32; prompt {args.prompt} tokens, "
        f"{args.new_tokens} new tokens, batch 1; medians of {args.rounds} interleaved rounds"
    )
    for name, block in blocks.items():
        if block is not None:
            print(f"{name} (ORT): the file takes prompt blocks of {block} tokens")
    print()
    print(
        "| model | params | prefill MACs | prefill ms | prefill speedup | decode tokens/s "
        "| decode speedup |" + (" ORT tokens = PyTorch's |" if args.onnx else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if args.onnx else ""))
    base_p = statistics.median(prefill["dense"])
    base_d = statistics.median(decode["dense"])
    for name in timed:  # speedups against dense PyTorch
        p, d = statistics.median(prefill[name]), statistics.median(decode[name])
        row = (
            f"| {name} | {params[name] / 1e6:.1f} M | {macs[name] / 1e9:.2f} G | {p * 1e3:.1f} "
            f"| {base_p / p:.2f}× | {d:.1f} | {d / base_d:.2f}× |"
        )
        if args.onnx:
            source = name.removesuffix(" (ORT)")
            row += f" {'yes' if same[source] else 'no'} |" if name != source else " |"
        print(row)


if __name__ == "__main__":
    main()
