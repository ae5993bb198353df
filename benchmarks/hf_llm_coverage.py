"""Which Hugging Face causal-LM families each tool prunes structurally into a working model.

Every family is built from a small random config (2 layers, hidden 64, 4 query heads, 2
key/value heads where the family has grouped-query attention; no download), then pruned at
ratio 0.5 by each tool in the same run (``--real-widths``: five 2-layer bfloat16 models with the
widths of Llama 3.2 3B, Qwen2.5 7B, Gemma 2B, Gemma 3 1B and Mixtral 8x7B instead):

- Torch-Pruning, following its LLM example (``examples/LLMs/prune_llm.py``) through its public
  API: ``num_heads`` for the ``q_proj/k_proj/v_proj`` (or fused ``qkv_proj``) layers of every
  ``self_attn``, two output groups for a fused ``gate_up_proj``, ``MetaPruner`` with
  ``GroupNormImportance(p=2)``, whole heads (``prune_num_heads=True, prune_head_dims=False``),
  the hidden size, heads and FFN all at the ratio, ``lm_head`` ignored, ``round_to=4``; then the
  attribute updates the example makes by hand (``num_heads``, ``num_key_value_groups``,
  ``hidden_size``, the config's sizes). ``config.use_cache`` is off while it traces, the
  workaround its users give for tracing HF models (Torch-Pruning issue #461).
- secateur: ``prune_(model, StructuredConfig(ratio=0.5), example_inputs=ids)``: hidden size,
  heads and FFN neurons, found from one traced forward pass, with no per-family setting.

A family counts as pruned when (a) pruning raised nothing, (b) the pruned model runs forward,
(c) greedy generation through the KV cache gives the tokens its own full forward pass predicts,
and (d) parameters fell. A tool gets ``--limit`` seconds per model (each
prunes these 2-layer models in well under a second when it works); past that it is stopped. The table also shows what was removed, so that a tool that left the
attention whole (or refused a group) is visible.

    .venv/bin/pip install -c constraints.txt torch-pruning==1.6.1
    .venv/bin/python -W ignore benchmarks/hf_llm_coverage.py --threads 2 [--onnx]

With ``--onnx``, each model that counts as pruned is also written by secateur's
``export_decoder_onnx`` (its cache as inputs and outputs: keys and values, and the recurrent
states of Mamba and linear-attention layers, whose file takes one token per call) and
``OnnxGenerator`` decodes 10 tokens greedily in ONNX Runtime for three prompts, one padded on
the left; the row says whether they are the tokens ``model.generate`` gives. A model whose
cache ``export_decoder_onnx`` refuses is written as one file without a cache by
``export_onnx``, at the prompt's length and then for any length; the row says whether each
passed its check against PyTorch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import platform
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from secateur import StructuredConfig, prune_
from secateur.errors import ConfigError
from secateur.export import export_decoder_onnx, export_onnx
from secateur.measure import OnnxGenerator, count_macs

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
GQA = dict(SMALL, num_key_value_heads=2, max_position_embeddings=64)
MHA = dict(SMALL, max_position_embeddings=64)
MLA = dict(
    SMALL,
    max_position_embeddings=64,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=24,
)
MAMBA2 = dict(  # a Mamba2 mixer of 8 heads of 16 over one group of state
    mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4,
    mamba_expand=2,
)  # fmt: skip
DELTANET = dict(  # 2 key heads of 8, each shared by 2 value heads of 8; layer 0 linear
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"],
)  # fmt: skip
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": GQA,
    "mistral": GQA,
    "qwen2": GQA,
    "qwen3": dict(GQA, head_dim=16),
    "gemma": dict(GQA, head_dim=16),
    "gemma2": dict(GQA, head_dim=16),
    "gemma3_text": dict(GQA, head_dim=16),
    "phi3": GQA,
    "phi": MHA,
    "olmo": MHA,
    "olmo2": MHA,
    "granite": GQA,
    "stablelm": GQA,
    "starcoder2": GQA,
    "cohere": GQA,
    "glm": GQA,
    "smollm3": GQA,
    "helium": dict(GQA, head_dim=16),
    "gpt_neox": MHA,
    "opt": dict(MHA, ffn_dim=128, word_embed_proj_dim=64),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
    "codegen": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "falcon": dict(MHA, new_decoder_architecture=True, num_kv_heads=2),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    # sinusoidal positions in a table outside the saved state
    "xglm": dict(
        d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, max_position_embeddings=64
    ),
    "mixtral": dict(GQA, num_local_experts=4, num_experts_per_tok=2),
    # gate and up interleaved in one stacked expert weight, picked by [..., ::2] and [..., 1::2]
    "gpt_oss": dict(GQA, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    # its router, a Linear subclass, returns the experts it picks with its logits
    "phimoe": dict(GQA, num_local_experts=4, num_experts_per_tok=2),
    "apertus": GQA,  # xIELU: torch.where(x > 0, ...)
    # multi-head latent attention: keys and values from a low-rank latent, each head's key
    # copied into a fresh tensor beside a rotary part shared by all heads; q, k wider than v
    "deepseek_v3": dict(MLA, q_lora_rank=16),
    "deepseek_v2": dict(MLA, q_lora_rank=None),  # its rotary embedding as complex products
    # complex rotary too, chunked attention, one routed expert beside a shared one
    "llama4_text": dict(
        GQA, head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128
    ),
    # per-layer embeddings: one block per layer of a (layers * width) projection and table
    "gemma4_text": dict(
        GQA, head_dim=16, hidden_size_per_layer_input=16, vocab_size_per_layer_input=100
    ),
    "persimmon": MHA,  # nn.LayerNorm over each head's dims (q_layernorm, k_layernorm)
    # state-space mixers: a depthwise conv through F.conv1d, dt_proj's weight times a
    # tensor, a selective scan (Jamba: Mamba layers beside attention and experts)
    "mamba": dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2),
    "jamba": dict(
        GQA,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_expand=2,
    ),
    # Mamba2 mixers: heads beside one group's state (B, C) repeated over every head, mixed
    # by a chunked scan's einsums; alone, or beside attention (Bamba, Granite 4.0-H, Falcon-H1,
    # Nemotron-H) and a shared transformer block (Zamba2)
    "mamba2": dict(
        hidden_size=64,
        num_hidden_layers=2,
        state_size=8,
        num_heads=8,
        head_dim=16,
        n_groups=1,
        expand=2,
        chunk_size=4,
    ),
    "bamba": dict(GQA, attn_layer_indices=[1], **MAMBA2),
    "granitemoehybrid": dict(
        GQA,
        layer_types=["mamba", "attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=128,
        **MAMBA2,
    ),
    "falcon_h1": dict(GQA, head_dim=16, mamba_d_ssm=128, **MAMBA2),
    "zamba2": dict(
        MHA,
        mamba_d_state=8,
        mamba_headdim=16,
        n_mamba_heads=8,
        mamba_ngroups=1,
        chunk_size=4,
        mamba_expand=2,
        layers_block_type=["mamba", "hybrid"],
        hybrid_layer_ids=[1],
    ),
    "nemotron_h": dict(
        GQA,
        num_hidden_layers=3,
        head_dim=16,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=1,
        ssm_state_size=8,
        chunk_size=4,
        expand=2,
        layers_block_type=["mamba", "attention", "mlp"],
    ),
    # Gated-DeltaNet linear attention beside full attention: a triangular solve per head and
    # chunk, a recurrent state from zeros, a per-head norm over (batch * tokens * heads) rows
    "qwen3_5_text": dict(GQA, head_dim=16, **DELTANET),
    "qwen3_next": dict(
        GQA,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        **DELTANET,
    ),
    "olmo_hybrid": dict(GQA, **DELTANET),
    # Kimi Delta Attention (per-channel gates through low-rank projections) beside MLA and
    # experts
    "kimi_linear": dict(
        MHA,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        moe_intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        linear_head_dim=8,
        linear_num_heads=4,
        layer_types=["linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse"],
    ),
    "qwen2_moe": dict(
        GQA,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
}
RATIO = 0.5
FFN_OUT = ("down_proj", "fc2", "dense_4h_to_h", "c_proj", "fc_out", "w2")
VOCAB = 100


# The widths of released models (their head arithmetic: 24 query heads over 8 key/value heads
# for Llama 3.2 3B, the shape of Torch-Pruning's issue #516), 2 layers each, in bfloat16
REAL_WIDTHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama, Llama-3.2-3B widths": (
        "llama",
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2, Qwen2.5-7B widths": (
        "qwen2",
        dict(
            hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4
        ),
    ),
    # one key/value head shared by every query head, under a rotary embedding
    "gemma, Gemma-2B widths": (
        "gemma",
        dict(
            hidden_size=2048,
            intermediate_size=16384,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
        ),
    ),
    "gemma3_text, Gemma-3-1B widths": (
        "gemma3_text",
        dict(
            hidden_size=1152,
            intermediate_size=6912,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
        ),
    ),
    "mixtral, Mixtral-8x7B widths, 4 experts": (
        "mixtral",
        dict(
            hidden_size=4096,
            intermediate_size=4096,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=4,
        ),
    ),
}


def build(family: str) -> tuple[torch.nn.Module, torch.Tensor]:
    dtype = torch.float32
    if family in REAL_WIDTHS:
        model_type, kwargs = REAL_WIDTHS[family]
        kwargs = dict(kwargs, num_hidden_layers=2, max_position_embeddings=64)
        dtype = torch.bfloat16
    else:
        model_type, kwargs = family, FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **kwargs)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, ids


def torch_pruning(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    """Torch-Pruning's LLM recipe, as its example sets it up (see the module docstring)."""
    import torch_pruning as tp

    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    num_heads, groups = {}, {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            if hasattr(module, "q_proj"):
                num_heads[module.q_proj] = config.num_attention_heads
                num_heads[module.k_proj] = kv_heads
                num_heads[module.v_proj] = kv_heads
            elif hasattr(module, "qkv_proj"):
                num_heads[module.qkv_proj] = config.num_attention_heads
        if name.endswith("mlp") and hasattr(module, "gate_up_proj"):
            groups[module.gate_up_proj] = 2
    gqa = config.num_attention_heads != kv_heads
    config.use_cache = False  # the workaround its users give (issue #461): traces fail otherwise
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=ids,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        pruning_ratio=RATIO,
        ignored_layers=[model.lm_head],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=RATIO,
        out_channel_groups=groups,
        round_to=4,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    # the example's hand-written attribute updates, in the same order
    config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            if hasattr(module, "q_proj"):
                module.hidden_size = module.q_proj.out_features
            else:
                module.hidden_size = module.qkv_proj.out_features // 3
            module.num_heads = module.hidden_size // module.head_dim
            config.num_attention_heads = module.num_heads
            if not gqa:
                module.num_key_value_heads = module.num_heads
            module.num_key_value_groups = module.num_heads // module.num_key_value_heads
        elif name.endswith("mlp"):
            if hasattr(module, "gate_proj"):
                module.hidden_size = module.gate_proj.in_features
                config.intermediate_size = module.gate_proj.out_features
            elif hasattr(module, "gate_up_proj"):
                module.hidden_size = module.gate_up_proj.in_features
                config.intermediate_size = module.gate_up_proj.out_features // 2
    if not gqa:
        config.num_key_value_heads = config.num_attention_heads
    config.use_cache = True
    return None


def secateur(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    result = prune_(model, StructuredConfig(ratio=RATIO), example_inputs={"input_ids": ids})
    if result.refused:
        return f"{len(result.refused)} group(s) left whole by the forward check"
    return None


TOOLS: dict[str, Callable[[torch.nn.Module, torch.Tensor], str | None]] = {
    "Torch-Pruning": torch_pruning,
    "secateur": secateur,
}


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:70]}"


def _widths(model: torch.nn.Module) -> str:
    """hidden size / attention width (heads × head_dim) / FFN width, read from the first
    layer's output projections (the layers that read the heads and the FFN neurons), and a
    state-space or linear-attention layer's inner width."""
    hidden = model.get_output_embeddings().in_features
    attn = ffn = mixer = linear = "?"
    linear_scopes = [
        f"{name}."
        for name, module in model.named_modules()
        if any(kind in type(module).__name__ for kind in ("GatedDeltaNet", "DeltaAttention"))
    ]
    for name, module in model.named_modules():
        stacked = getattr(module, "down_proj", None)
        if isinstance(stacked, torch.nn.Parameter) and stacked.dim() == 3 and ffn == "?":
            ffn = f"{stacked.shape[-1]} ×{stacked.shape[0]} experts"  # (experts, hidden, I)
            continue
        if isinstance(module, torch.nn.Linear):
            inputs = module.in_features
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
            inputs = module.weight.shape[0]
        else:
            continue
        leaf = name.rsplit(".", 1)[-1]
        in_attention = "attn" in name or "attention" in name
        if any(name.startswith(scope) for scope in linear_scopes):
            # Gated DeltaNet's (or Kimi's delta attention's) heads, beside full attention's
            linear = inputs if linear == "?" and leaf in ("out_proj", "o_proj") else linear
        elif attn == "?" and in_attention and leaf in ("o_proj", "dense", "out_proj", "c_proj"):
            attn = inputs
        elif ffn == "?" and not in_attention and leaf in FFN_OUT:
            ffn = inputs
        elif mixer == "?" and leaf == "out_proj" and (".mixer." in name or ".mamba." in name):
            mixer = inputs  # a state-space layer's inner width
    widths = f"{hidden} / {attn} / {ffn}"
    if linear != "?":
        widths = f"{widths}; linear attention {linear}"
    return widths if mixer == "?" else f"{widths}; Mamba inner {mixer}"


def check(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    """None when the pruned model runs and its cached greedy decoding agrees with itself."""
    prompt = ids[:1, :6]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except Exception as exc:  # noqa: BLE001 - a failure is a result to report
        return f"forward fails ({_short(exc)})"
    try:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            full = model(input_ids=out).logits
    except Exception as exc:  # noqa: BLE001
        return f"generate fails ({_short(exc)})"
    full[..., model.generation_config.eos_token_id] = -torch.inf  # min_new_tokens bars it
    predicted = full[0, prompt.shape[1] - 1 : -1].argmax(-1)
    if not torch.equal(predicted, out[0, prompt.shape[1] :]):
        return "generate disagrees with the forward pass"
    return None


class _OutOfTime(Exception):
    pass


def _out_of_time(signum: int, frame: Any) -> None:
    raise _OutOfTime


def prune_and_check(
    model: torch.nn.Module,
    prune: Callable[[], str | None],
    limit: int,
    check: Callable[[], str | None],
    widths: Callable[[torch.nn.Module], str],
) -> dict[str, Any]:
    """Run ``prune`` on ``model`` within ``limit`` seconds, then ``check`` the result: the
    status, the parameters kept, the widths before and after, and the seconds taken."""
    params = sum(p.numel() for p in model.parameters())
    before = widths(model)
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(limit)
    try:
        note = prune()
    except _OutOfTime:
        return {"status": f"no result after {limit} s (stopped)", "before": before}
    except Exception as exc:  # noqa: BLE001
        return {"status": f"pruning fails ({_short(exc)})", "before": before}
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - start
    kept = sum(p.numel() for p in model.parameters()) / params
    problem = check()
    if problem is None and kept >= 1.0:
        problem = "nothing removed"
    return {
        "status": problem or ("ok" + (f"; {note}" if note else "")),
        "kept": kept,
        "before": before,
        "after": widths(model),
        "seconds": seconds,
    }


def prune_counting_macs(
    model: torch.nn.Module,
    x: Any,
    prune: Callable[[], str | None],
    limit: int,
    check: Callable[[], str | None],
    digits: int = 3,
) -> dict[str, Any]:
    """``prune_and_check`` with the model's MACs on ``x`` as its widths, before and after,
    and the share of them kept (the vision benchmarks' tables)."""
    macs = count_macs(model, x).dense

    def widths(m: torch.nn.Module) -> str:
        try:
            return f"{count_macs(m, x).dense / 1e9:.{digits}f} G MACs"
        except Exception:  # noqa: BLE001 - a broken model has no count
            return "–"

    result = prune_and_check(model, prune, limit, check, widths)
    if "kept" in result and result["status"].startswith("ok"):
        result["after"] += f" ({count_macs(model, x).dense / macs:.1%})"
    return result


def onnx_note(model: torch.nn.Module) -> str:
    """Export the pruned model with its cache and compare greedy tokens in ONNX Runtime."""
    prompt = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    prompt[1, :2] = mask[1, :2] = 0  # left padding
    eos = model.generation_config.eos_token_id  # a token or a list of them
    pad = eos[0] if isinstance(eos, list) else eos
    with tempfile.TemporaryDirectory() as folder:
        try:
            example = {"input_ids": prompt[[0]], "attention_mask": mask[[0]]}
            out = export_decoder_onnx(model, example, Path(folder) / "m.onnx")
            generator = OnnxGenerator(out.path, threads=torch.get_num_threads())
            got = generator.generate(
                prompt, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad
            )
        except ConfigError as exc:  # a cache it does not write: the one file, no cache
            if "use export_onnx" not in str(exc):
                return f"ONNX fails ({_short(exc)})"
            note = one_file_note(model, example)
            return f"ONNX with cache refused ({_short(exc)}); {note}"
        except Exception as exc:  # noqa: BLE001 - a failure is a result to report
            return f"ONNX fails ({_short(exc)})"
    with torch.no_grad():
        expected = model.generate(
            prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad
        )
    same = "PyTorch's tokens" if torch.equal(got, expected) else "other tokens than PyTorch"
    return f"ONNX with cache ok, {same}"


def one_file_note(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> str:
    """Export without a cache, as one file, at the example's length and then for any length
    (``export_onnx`` checks both against PyTorch)."""
    notes = []
    for dynamic in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            try:
                out = export_onnx(model, example, Path(folder) / "m.onnx", dynamic_sequence=dynamic)
                notes.append(f"ok (max diff {out.max_abs_diff:.1e})")
            except Exception as exc:  # noqa: BLE001 - a failure is a result to report
                notes.append(f"refused ({_short(exc)})")
    return f"one file at its length {notes[0]}, at any length {notes[1]}"


def run(family: str, tool: str, limit: int, onnx: bool = False) -> dict[str, Any]:
    model, ids = build(family)
    result = prune_and_check(
        model, lambda: TOOLS[tool](model, ids), limit, lambda: check(model, ids), _widths
    )
    if onnx and result["status"].startswith("ok"):
        result["status"] += "; " + onnx_note(model)
    return result


def print_header(
    threads: int,
    lines: list[str],
    packages: tuple[str, ...] = ("torch", "transformers", "torch-pruning", "secateur"),
) -> None:
    """The machine, the versions and the run settings, then the table's head."""
    versions = {name: importlib.metadata.version(name) for name in packages}
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, {threads} threads")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("\n".join(lines) + "\n")
    print("| family | widths before | tool | result | widths after | params kept | seconds |")
    print("|---|---|---|---|---|---|---|")


def print_runs(
    families: list[str], tools: list[str], run: Callable[[str, str], dict[str, Any]]
) -> None:
    """One table row per family and tool, as each finishes, then each tool's score."""
    score = dict.fromkeys(tools, 0)
    for family in families:
        for tool in tools:
            r = run(family, tool)
            if r["status"].startswith("ok"):
                score[tool] += 1
            kept = f"{r['kept']:.1%}" if "kept" in r else "–"
            secs = f"{r['seconds']:.2f}" if "seconds" in r else "–"
            after = r.get("after", "–")
            print(
                f"| {family} | {r['before']} | {tool} | {r['status']} | {after} | {kept} | {secs} |",
                flush=True,
            )
    total = len(families)
    print(
        "\n"
        + ", ".join(f"{tool}: {n}/{total} families pruned and working" for tool, n in score.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument(
        "--real-widths",
        action="store_true",
        help="instead, 2-layer models with the widths of Llama 3.2 3B, Qwen2.5 7B, Gemma 2B, "
        "Gemma 3 1B and Mixtral",
    )
    parser.add_argument(
        "--limit", type=int, default=60, help="seconds a tool may take to prune one model"
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export each pruned model with its cache and generate in ONNX Runtime",
    )
    args = parser.parse_args()
    if args.real_widths:
        args.families = list(REAL_WIDTHS)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    print_header(
        args.threads,
        [
            f"limit {args.limit} s per pruning",
            f"ratio {RATIO}; widths are hidden / attention (q heads x head_dim) / FFN (per expert for MoE) of layer 0",
        ],
    )
    print_runs(
        args.families, list(TOOLS), lambda family, tool: run(family, tool, args.limit, args.onnx)
    )


if __name__ == "__main__":
    main()
