"""ONNX export of decoder LMs with their key/value cache, and greedy generation in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_small_configs import DEEPSEEK_V3_MLA, MAMBA2_ONE_GROUP, QWEN3_5_DELTANET
from secateur.errors import ArtifactError, ConfigError
from secateur.export import export_decoder_onnx, export_onnx
from secateur.measure import OnnxGenerator
from secateur.pruning import StructuredConfig, prune_

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

VOCAB = 100
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    head_dim=16,
    max_position_embeddings=64,
)
GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
MOE = dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES = {
    "llama": SMALL,
    "gpt2": GPT2,
    "qwen2_moe": MOE,
    "mistral": SMALL,
    "gemma2": SMALL,
    "qwen2": SMALL,
    "cohere": SMALL,
    "apertus": SMALL,  # xIELU calls expm1, which the exporter converts as exp minus one
    # complex rotary products, and a chunked mask that takes a cumsum of booleans
    "llama4_text": dict(SMALL, num_local_experts=4, attention_chunk_size=4),
    # multi-head latent attention: a latent cache, keys copied into a fresh tensor
    "deepseek_v3": dict(  # its rotary width is its own: no head_dim
        {k: v for k, v in SMALL.items() if k != "head_dim"}, **DEEPSEEK_V3_MLA
    ),
}


def _model(family: str, **options) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(family, **{**FAMILIES[family], **options})
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 6 tokens, the second padded on the left by 2."""
    ids = _ids(3, 6, 3)
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    return ids, mask


def _generates_as_pytorch(model, path, prompts, mask=None, new: int = 10) -> None:  # noqa: ANN001
    """The file at ``path`` generates transformers' greedy tokens (0 ends and pads)."""
    with torch.no_grad():
        expected = model.generate(
            prompts, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    got = OnnxGenerator(path, threads=1).generate(
        prompts, mask, max_new_tokens=new, eos_token_id=0, pad_token_id=0
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "family", ["llama", "gpt2", "qwen2_moe", "cohere", "apertus", "llama4_text", "deepseek_v3"]
)
def test_pruned_decoder_generates_in_onnx_runtime_as_in_pytorch(tmp_path, family: str) -> None:
    model = _model(family)
    ids = _ids(2, 8, 0)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=example)
    out = export_decoder_onnx(model, example, tmp_path / "llm.onnx")
    assert out.max_abs_diff < 1e-4
    assert out.input_names[:2] == ("input_ids", "attention_mask")
    layers = model.config.num_hidden_layers
    assert out.input_names[-2 * layers :] == tuple(
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    )
    assert out.output_names[0] == "logits" and out.output_names[-1] == f"present.{layers - 1}.value"

    _generates_as_pytorch(model, out.path, *_padded_prompts())


def test_the_file_keeps_each_layers_pruned_kv_widths(tmp_path) -> None:
    import onnx

    model = _model("llama")
    ids = _ids(2, 8, 0)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs={"input_ids": ids})
    out = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "llm.onnx")
    graph = onnx.load(str(out.path)).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    heads, dim = cache.layers[0].keys.shape[1], cache.layers[0].keys.shape[3]
    assert heads < 2 or dim < 16  # pruned below the dense 2 kv heads of 16
    assert dims["past_key_values.0.key"] == ["batch", heads, "past_sequence", dim]
    assert dims["present.0.key"] == ["batch", heads, "total_sequence", dim]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["logits"] == ["batch", "sequence", VOCAB]


def test_generation_stops_at_the_end_token(tmp_path) -> None:
    model = _model("llama")
    ids = _ids(1, 6, 1)
    out = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "llm.onnx")
    generator = OnnxGenerator(out.path, threads=1)
    first = int(generator.generate(ids, max_new_tokens=1)[0, -1])
    stopped = generator.generate(ids, max_new_tokens=10, eos_token_id=first)
    assert stopped.shape == (1, 7) and int(stopped[0, -1]) == first
    assert generator.generate(ids, max_new_tokens=10).shape == (1, 16)


WINDOWED = {
    "mistral": dict(sliding_window=5),
    "gemma2": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
}


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_sliding_window_decoders_generate_past_their_window_as_in_pytorch(
    tmp_path, family: str
) -> None:
    # traced on 4 tokens, shorter than the window of 5; generation runs to 16 tokens, so the
    # file must apply the window by position as transformers' windowed cache does
    model = _model(family, **WINDOWED[family])
    ids = _ids(1, 4, 2)
    out = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "llm.onnx")
    assert out.max_abs_diff < 1e-4
    prompts, mask = _padded_prompts()
    with torch.no_grad():
        natural = model(input_ids=prompts, attention_mask=mask, use_cache=True).past_key_values
        expected = model.generate(
            prompts, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
        )
    assert "DynamicSlidingWindowLayer" in {type(layer).__name__ for layer in natural.layers}
    got = OnnxGenerator(out.path, threads=1).generate(
        prompts, mask, max_new_tokens=10, eos_token_id=0, pad_token_id=0
    )
    assert torch.equal(got, expected)


RECURRENT = {
    # convolution states only, beside full attention
    "lfm2": dict(SMALL, layer_types=["conv", "full_attention"]),
    # Mamba's selective scan: a loop over the tokens in its prompt path
    "mamba": dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2),
    # Mamba2's chunked scan, chunks of 4: the prompt path freezes its chunk count
    "mamba2": dict(hidden_size=64, num_hidden_layers=2, head_dim=16, **MAMBA2_ONE_GROUP),
    # Gated DeltaNet beside full attention
    "qwen3_5_text": dict(SMALL, **QWEN3_5_DELTANET),
}
# the prompt tokens a call of each family's file takes beside one, asked for 16: Mamba's
# prompt path starts afresh whatever its cache holds, so its file stays a token at a time
BLOCKS = {"lfm2": 16, "mamba": None, "mamba2": 16, "qwen3_5_text": 16}


def _recurrent(family: str) -> torch.nn.Module:
    """A small random model of ``family`` (of RECURRENT), token 0 its start, end and pad."""
    config = transformers.AutoConfig.for_model(family, **{"vocab_size": VOCAB, **RECURRENT[family]})
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", sorted(RECURRENT))
def test_recurrent_state_decoders_generate_in_onnx_runtime_as_in_pytorch(
    tmp_path, family: str
) -> None:
    import onnx

    model = _recurrent(family)
    ids = _ids(2, 8, 0)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs={"input_ids": ids})
    out = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "llm.onnx", prefill_block=16)
    assert out.max_abs_diff < 1e-4
    states = [n for n in out.input_names if n.endswith((".conv.0", ".recurrent.0"))]
    assert states and all(
        f"present.{n[len('past_key_values.') :]}" in out.output_names for n in states
    )
    graph = onnx.load(str(out.path)).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in graph.input
    }
    assert out.prefill_block == BLOCKS[family]
    # one token per call, or as many as the block graph was traced at: no loop to freeze
    assert dims["input_ids"] == ["batch", 1 if out.prefill_block is None else "new_tokens"]
    assert all(
        d[0] == "batch" and all(type(x) is int for x in d[1:])
        for n, d in dims.items()
        if n in states
    )

    # 40 prompt tokens and 10 new ones: the padded first two a token at a time, then two
    # blocks of 16 (where the file has them), then the rest a token at a time
    prompts, mask = _ids(3, 40, 3), torch.ones(3, 40, dtype=torch.long)
    prompts[1, :2] = mask[1, :2] = 0  # left padding
    _generates_as_pytorch(model, out.path, prompts, mask)


def test_prompt_spans_put_blocks_where_no_row_pads() -> None:
    from secateur.export._onnx_states import prompt_spans

    attended = [False, False] + [True] * 20
    assert prompt_spans(attended, 8) == [(0, 1), (1, 2), (2, 10), (10, 18)] + [
        (t, t + 1) for t in range(18, 22)
    ]
    assert prompt_spans(attended, None) == [(t, t + 1) for t in range(22)]
    assert prompt_spans([True] * 3 + [False] + [True] * 4, 4) == [
        (0, 1), (1, 2), (2, 3), (3, 4), (4, 8)
    ]  # fmt: skip


def test_the_generator_feeds_the_prompt_in_blocks(tmp_path, monkeypatch) -> None:
    """A file with blocks of 8: a 30-token prompt goes in 3 blocks and 6 single calls, whose
    last gives the first new token, then one call per further token; the tokens are
    PyTorch's."""
    model = _recurrent("qwen3_5_text")
    example = {"input_ids": _ids(1, 8, 0)}
    out = export_decoder_onnx(model, example, tmp_path / "m.onnx", prefill_block=8)
    assert out.prefill_block == 8
    generator = OnnxGenerator(out.path, threads=1)
    widths = []
    call = generator._call

    def counted(new, mask, past):  # noqa: ANN001, ANN202
        widths.append(new.shape[1])
        return call(new, mask, past)

    monkeypatch.setattr(generator, "_call", counted)
    prompt = _ids(1, 30, 4)
    got = generator.generate(prompt, max_new_tokens=4)
    assert widths == [8, 8, 8] + [1] * 6 + [1] * 3
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_prefill_blocks_need_the_check_and_a_size_of_two_or_more(tmp_path) -> None:
    model = _recurrent("mamba2")
    ids = {"input_ids": _ids(1, 6, 1)}
    out = export_decoder_onnx(model, ids, tmp_path / "m.onnx", check=False)
    assert out.prefill_block is None  # unchecked: a token at a time
    for bad in (1, True, 2.0, "8"):
        with pytest.raises(ConfigError, match="prefill_block=.* must be an integer >= 2"):
            export_decoder_onnx(model, ids, tmp_path / "x.onnx", prefill_block=bad)
    assert not (tmp_path / "x.onnx").exists()


def _single_token_file(family: str, path, warning: str):  # noqa: ANN001, ANN202
    """Export ``family`` asking for blocks of 8: the export warns ``warning`` (a pattern) and
    the file takes one token per call."""
    model = _recurrent(family)
    with pytest.warns(UserWarning, match=warning):
        out = export_decoder_onnx(model, {"input_ids": _ids(1, 6, 1)}, path, prefill_block=8)
    assert out.prefill_block is None
    return model, out


def test_mamba_files_stay_a_token_at_a_time_and_say_why(tmp_path) -> None:
    """transformers' Mamba starts its prompt path afresh whatever its cache holds (and that
    path does not even trace with states): the file keeps one token per call, and a warning
    says why."""
    warning = "MambaForCausalLM takes one token per call, not blocks"
    model, out = _single_token_file("mamba", tmp_path / "m.onnx", warning)
    _generates_as_pytorch(model, out.path, _ids(1, 20, 2))


def test_a_prompt_path_that_forgets_its_states_gets_no_blocks(tmp_path, monkeypatch) -> None:
    """Mamba2 made to start its chunked scan afresh whatever the cache holds: its second block
    disagrees with the whole prompt, so the file keeps one token per call."""
    from transformers.models.mamba2 import modeling_mamba2

    scan = modeling_mamba2.mamba2_chunk_scan

    def afresh(*args, initial_states=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if initial_states is not None:
            initial_states = initial_states * 0
        return scan(*args, initial_states=initial_states, **kwargs)

    monkeypatch.setattr(modeling_mamba2, "mamba2_chunk_scan", afresh)
    warning = "not blocks of 8: its prompt path in blocks gives other"
    _single_token_file("mamba2", tmp_path / "m.onnx", warning)


def test_a_prompt_path_failing_in_the_block_check_falls_back(tmp_path, monkeypatch) -> None:
    """Mamba2's prompt path made to fail with states at batch 1 (the check's, not the
    trace's): the file keeps one token per call, with a warning, rather than failing."""
    from transformers.models.mamba2 import modeling_mamba2

    scan = modeling_mamba2.mamba2_scan_forward

    def fails_at_batch_one(module, hidden, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        cache = args[3]
        tokens, batch = hidden.shape[1], hidden.shape[0]
        given = cache is not None and cache.get_recurrent_state(module.layer_idx) is not None
        if given and tokens > 1 and batch == 1 and not torch.jit.is_tracing():
            raise RuntimeError("no blocks at batch 1")
        return scan(module, hidden, *args, **kwargs)

    monkeypatch.setattr(modeling_mamba2, "mamba2_scan_forward", fails_at_batch_one)
    warning = "fails in blocks .RuntimeError: no blocks at batch 1"
    _single_token_file("mamba2", tmp_path / "m.onnx", warning)


def test_merging_refuses_graphs_whose_outputs_differ() -> None:
    import onnx
    from onnx import helper

    from secateur.export._onnx_merge import merge_by_length

    def graph(output: str) -> bytes:
        node = helper.make_node("Identity", ["input_ids"], [output])
        value = helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", 1])
        out = helper.make_tensor_value_info(output, onnx.TensorProto.INT64, ["b", 1])
        g = helper.make_graph([node], "g", [value], [out])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    assert merge_by_length(graph("logits"), graph("other"), 4) is None
    merged = onnx.load_from_string(merge_by_length(graph("logits"), graph("logits"), 4))
    onnx.checker.check_model(merged)
    assert {p.key: p.value for p in merged.metadata_props} == {"secateur.prefill_block": "4"}


def test_an_unchecked_state_file_runs_too(tmp_path) -> None:
    model = _recurrent("mamba2")
    ids = _ids(1, 6, 1)
    out = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "m.onnx", check=False)
    assert out.max_abs_diff is None and "position_ids" not in out.input_names
    _generates_as_pytorch(model, out.path, ids, new=5)


def test_a_right_padded_example_exports_a_state_file(tmp_path) -> None:
    """Tokenizers often pad on the right: a row's last attended token is then checked, not a
    pad the file skips."""
    model = _recurrent("lfm2")
    ids, mask = _ids(2, 8, 0), torch.ones(2, 8, dtype=torch.long)
    mask[1, -3:] = 0
    out = export_decoder_onnx(
        model, {"input_ids": ids, "attention_mask": mask}, tmp_path / "m.onnx"
    )
    assert out.max_abs_diff < 1e-4
    mask[0, 3] = 0  # padding between tokens: the file and the prompt pass treat it apart
    with pytest.raises(ConfigError, match="pads between a row's tokens: pad on the left or"):
        export_decoder_onnx(model, {"input_ids": ids, "attention_mask": mask}, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_state_file_checks_its_single_token_path_against_the_whole_prompt(
    tmp_path, monkeypatch
) -> None:
    """A model whose single-token path (the file's) disagrees with its prompt path is refused
    rather than written: here Mamba's step forgets its convolution state."""
    from transformers.models.mamba import modeling_mamba

    model = _recurrent("mamba")
    update = modeling_mamba.causal_conv1d_update

    def forgetful(hidden_states, conv_state, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return update(hidden_states, torch.zeros_like(conv_state), *args, **kwargs)

    monkeypatch.setattr(modeling_mamba, "causal_conv1d_update", forgetful)
    with pytest.raises(ArtifactError, match="single-token path differs.*use export_onnx"):
        export_decoder_onnx(model, {"input_ids": _ids(1, 6, 1)}, tmp_path / "llm.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_model_whose_single_token_path_fails_is_refused_in_one_line(
    tmp_path, monkeypatch
) -> None:
    from transformers.models.mamba import modeling_mamba

    model = _recurrent("mamba")

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("shape mismatch\nin the step kernel")

    monkeypatch.setattr(modeling_mamba, "causal_conv1d_update", broken)
    with pytest.raises(
        ConfigError, match="a token at a time.*shape mismatch.*use export_onnx"
    ) as info:
        export_decoder_onnx(model, {"input_ids": _ids(1, 6, 1)}, tmp_path / "llm.onnx")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_caches_that_share_keys_between_layers_are_refused_with_the_way_out() -> None:
    from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer

    from secateur.export._onnx_states import state_plan

    shared = DynamicCache.__new__(DynamicCache)
    shared.layers = [LinearAttentionLayer(), DynamicLayer()]  # the second kept no keys
    with pytest.raises(ConfigError, match="layer 1 .* kept no keys.*use export_onnx"):
        state_plan(shared)


def test_bad_inputs_are_one_line_config_errors(tmp_path) -> None:
    model = _model("llama")
    ids = _ids(1, 6, 1)
    path = tmp_path / "llm.onnx"
    cases = [
        (ids, "takes example_inputs="),
        ({"input_ids": ids[:, :3]}, "at least 4 tokens"),
        ({"input_ids": ids, "token_type_ids": ids}, "not 'token_type_ids'"),
        ({"input_ids": ids, "attention_mask": ids[:, :2]}, "attention_mask must be"),
    ]
    for inputs, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            export_decoder_onnx(model, inputs, path)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="transformers model"):
        export_decoder_onnx(torch.nn.Linear(2, 2), {"input_ids": ids}, path)
    with pytest.raises(ConfigError, match="must end in .onnx"):
        export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "llm.bin")
    assert list(tmp_path.iterdir()) == []


def test_generator_rejects_files_without_a_cache_and_bad_arguments(tmp_path) -> None:
    model = _model("llama")
    ids = _ids(1, 6, 1)
    plain = export_onnx(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "plain.onnx"
    )
    with pytest.raises(ArtifactError, match="takes no key/value cache.*export_decoder_onnx"):
        OnnxGenerator(plain.path)
    with pytest.raises(ArtifactError, match="no ONNX file"):
        OnnxGenerator(tmp_path / "missing.onnx")
    out = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "llm.onnx")
    generator = OnnxGenerator(out.path, threads=1)
    with pytest.raises(ConfigError, match="max_new_tokens=0 must be >= 1"):
        generator.generate(ids, max_new_tokens=0)
    with pytest.raises(ConfigError, match="a \\(batch, sequence\\) tensor"):
        generator.generate(ids[0])
    with pytest.raises(ConfigError, match="attention_mask must have"):
        generator.generate(ids, torch.ones(1, 2, dtype=torch.long))


def test_a_batch_stops_row_by_row_on_any_of_several_end_tokens(tmp_path) -> None:
    model = _model("llama")
    prompts, mask = _padded_prompts()
    out = export_decoder_onnx(
        model, {"input_ids": prompts, "attention_mask": mask}, tmp_path / "m.onnx"
    )
    generator = OnnxGenerator(out.path, threads=1)
    free = generator.generate(prompts, mask, max_new_tokens=8)
    # the end tokens: row 0's third new token, and one no row produces first
    ends = [int(free[0, 8]), VOCAB + 5]
    got = generator.generate(prompts, mask, max_new_tokens=8, eos_token_id=ends, pad_token_id=7)
    with torch.no_grad():
        expected = model.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=ends,
            pad_token_id=7,
        )
    assert torch.equal(got, expected)
    assert got[0, 8] == ends[0] and (got[0, 9:] == 7).all()  # row 0 stopped, padded with 7
    with pytest.raises(ConfigError, match="a token id or a non-empty list"):
        generator.generate(prompts, mask, eos_token_id=[])


def test_int32_ids_bf16_and_bare_models(tmp_path) -> None:
    model = _model("llama")
    ids = _ids(1, 6, 1).int()
    out = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "m.onnx")
    assert OnnxGenerator(out.path, threads=1).generate(ids, max_new_tokens=2).shape == (1, 8)
    with pytest.raises(ConfigError, match="no bfloat16: cast the model"):
        export_decoder_onnx(model.to(torch.bfloat16), {"input_ids": ids}, tmp_path / "b.onnx")
    bare = transformers.AutoModel.from_config(model.config).eval()
    with pytest.raises(ConfigError, match="returns no logits: export its language-model class"):
        export_decoder_onnx(bare, {"input_ids": ids}, tmp_path / "c.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_float16_model_exports_at_its_tolerance_and_generates(tmp_path) -> None:
    model = _model("llama").half()
    ids = _ids(2, 8, 0)
    out = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "h.onnx", rtol=1e-2, atol=1e-2)
    prompts, mask = _padded_prompts()
    got = OnnxGenerator(out.path, threads=1).generate(prompts, mask, max_new_tokens=4)
    assert got.shape == (3, 10) and torch.equal(got[:, :6], prompts)


def test_a_window_applied_by_the_cache_alone_is_refused(tmp_path, monkeypatch) -> None:
    # a mask without the window leaves it to the cache's truncation, which the file does not do
    import transformers.masking_utils as masking

    monkeypatch.setattr(
        masking, "sliding_window_causal_mask_function", lambda window: masking.causal_mask_function
    )
    model = _model("mistral", sliding_window=3)
    with pytest.raises(ArtifactError, match="sliding-window cache.*use export_onnx"):
        export_decoder_onnx(model, {"input_ids": _ids(1, 8, 1)}, tmp_path / "llm.onnx")
    assert list(tmp_path.iterdir()) == []


def test_last_token_logits_keep_one_position_and_generate_the_same(tmp_path) -> None:
    import onnxruntime

    model = _model("llama")
    ids = _ids(2, 8, 0)
    out = export_decoder_onnx(
        model, {"input_ids": ids}, tmp_path / "last.onnx", last_token_logits=True
    )
    session = onnxruntime.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    feed = {
        "input_ids": ids.numpy(),
        "attention_mask": torch.ones_like(ids).numpy(),
        "position_ids": torch.arange(8).expand(2, 8).numpy(),
    }
    for name in out.input_names[3:]:
        feed[name] = torch.zeros(2, 2, 0, 16).numpy()
    logits = session.run(["logits"], feed)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1:]
    assert logits.shape == (2, 1, VOCAB)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-3, atol=1e-4)
    _generates_as_pytorch(model, out.path, *_padded_prompts())


def test_last_token_logits_need_a_forward_that_takes_logits_to_keep(tmp_path) -> None:
    model = _model("llama")
    forward = model.forward
    model.forward = lambda input_ids=None, attention_mask=None, **kw: forward(
        input_ids=input_ids, attention_mask=attention_mask, **kw
    )
    with pytest.raises(ConfigError, match="no logits_to_keep.*last_token_logits=False"):
        export_decoder_onnx(
            model, {"input_ids": _ids(1, 6, 0)}, tmp_path / "x.onnx", last_token_logits=True
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:Exporting aten")
@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_pruned_decoder_quantized_to_int8_still_generates(tmp_path, family: str) -> None:
    """prune → export with the cache → ONNX Runtime dynamic int8 → generate: every weight
    matrix is stored in 8 bits (each expert's too), the cache inputs are unchanged, and the
    first token's logits stay near PyTorch's."""
    import onnx

    from secateur.quantization import quantize_onnx

    model = _model(family)
    ids = _ids(2, 8, 0)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs={"input_ids": ids})
    fp32 = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "llm.onnx")
    int8 = quantize_onnx(fp32.path, tmp_path / "llm.int8.onnx", mode="dynamic")
    stored = onnx.load(str(int8)).graph.initializer
    assert not [i.name for i in stored if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) > 1]

    prompt = _ids(1, 6, 5)
    tokens = OnnxGenerator(int8, threads=1).generate(prompt, max_new_tokens=6)
    assert tokens.shape == (1, 12) and torch.equal(tokens[:, :6], prompt)

    import onnxruntime

    session = onnxruntime.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    assert tuple(i.name for i in session.get_inputs()) == fp32.input_names
    feed = {}
    for given in session.get_inputs():  # the prompt through an empty cache
        if given.name.startswith("past_key_values."):  # (batch, heads, past, head dim)
            feed[given.name] = np.zeros((1, given.shape[1], 0, given.shape[3]), np.float32)
        elif given.name == "position_ids":
            feed[given.name] = np.arange(6, dtype=np.int64)[None]
        else:
            feed[given.name] = (
                prompt.numpy() if given.name == "input_ids" else np.ones((1, 6), np.int64)
            )
    logits = torch.from_numpy(session.run(["logits"], feed)[0][:, -1])
    with torch.no_grad():
        reference = model(input_ids=prompt).logits[:, -1]
    assert float((logits - reference).norm() / reference.norm()) < 0.05


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("past_key_values.0.key", ["batch", "heads", "past_sequence", 16]),  # heads not fixed
        ("past_key_values.0.key", ["batch", 2, 16]),  # keys of three axes
        ("past_key_values.0.recurrent.0", ["batch", "width", "past_sequence"]),  # two grow
        ("past_key_values.0.conv.0", ["batch", 8, "kernel"]),  # a state's size not fixed
    ],
)
def test_generator_rejects_a_cache_input_of_unknown_sizes(tmp_path, name: str, shape) -> None:
    from onnx import TensorProto, helper, save

    float_in = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT),
            helper.make_node("Identity", ["attention_mask"], ["mask_out"]),
            helper.make_node("Identity", [name], ["present" + name[len("past_key_values") :]]),
        ],
        "cache",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch", "total_sequence"]
            ),
            float_in,
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("mask_out", TensorProto.INT64, None),
            helper.make_tensor_value_info(
                "present" + name[len("past_key_values") :], TensorProto.FLOAT, None
            ),
        ],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match=f"input {name} has shape"):
        OnnxGenerator(tmp_path / "m.onnx")


def test_a_state_file_quantizes_to_int8_and_still_generates(tmp_path) -> None:
    """prune → export with recurrent states (and prompt blocks) → dynamic int8, which reaches
    both graphs → the prompt a token at a time from zero states, as the file's contract says:
    the last token's logits stay near PyTorch's. Static int8 is refused: it would leave the
    graphs inside the If in float."""
    import onnx
    import onnxruntime

    from secateur.quantization import quantize_onnx

    model = _recurrent("mamba2")
    ids = _ids(2, 8, 0)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs={"input_ids": ids})
    fp32 = export_decoder_onnx(model, {"input_ids": ids}, tmp_path / "ssm.onnx")
    int8 = quantize_onnx(fp32.path, tmp_path / "ssm.int8.onnx", mode="dynamic")
    proto = onnx.load(str(int8))
    assert fp32.prefill_block == 64
    assert {p.key: p.value for p in proto.metadata_props}["secateur.prefill_block"] == "64"
    graph = proto.graph
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    branches = [a.g for n in graph.node for a in n.attribute if a.type == a.GRAPH]
    assert len(branches) == 2  # the single-token and the block graphs
    for branch in branches:  # every weight in 8 bits, in both
        products = [n for n in branch.node if n.op_type in ("MatMul", "Gemm")]
        assert not [x for n in products for x in n.input if x in floats]
        assert any(n.op_type == "MatMulInteger" for n in branch.node)

    prompt = _ids(1, 6, 5)
    tokens = OnnxGenerator(int8, threads=1).generate(prompt, max_new_tokens=6)
    assert tokens.shape == (1, 12) and torch.equal(tokens[:, :6], prompt)
    longer = OnnxGenerator(int8, threads=1).generate(_ids(2, 70, 6), max_new_tokens=2)
    assert longer.shape == (2, 72)  # a block of 64 through the quantized block graph
    with pytest.raises(ConfigError, match="static int8 .* use mode='dynamic', or export it"):
        quantize_onnx(
            fp32.path, tmp_path / "x.onnx", mode="static", calibration=[{"input_ids": ids}]
        )
    assert not (tmp_path / "x.onnx").exists()

    session = onnxruntime.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    states = {i.name: np.zeros((1, *i.shape[1:]), np.float32) for i in session.get_inputs()[2:]}
    for t in range(prompt.shape[1]):
        feed = {
            "input_ids": prompt[:, t : t + 1].numpy(),
            "attention_mask": np.ones((1, t + 1), np.int64),
        }
        logits, *after = session.run(None, {**feed, **states})
        states = dict(zip(states, after, strict=True))
    with torch.no_grad():
        reference = model(input_ids=prompt).logits[:, -1]
    logits = torch.from_numpy(logits[:, -1])
    assert float((logits - reference).norm() / reference.norm()) < 0.05
