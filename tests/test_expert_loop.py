"""The expert-by-expert forward of transformers' stacked experts: ONNX export and PyTorch int8."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from secateur import StructuredConfig, prune_
from secateur._expert_loop import experts_as_linears_, loop_over_experts_, loops_over_experts
from secateur._experts import expert_stacks
from secateur.export import export_onnx
from secateur.measure import OnnxRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

SMALL = dict(
    vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, head_dim=16,
)  # fmt: skip
FAMILIES = {
    "mixtral": dict(num_local_experts=4),  # gate and up concatenated, (out, in)
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),  # fmt: skip
    # (in, out) stacks with biases and an interleaved gate
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
}


def _model(family: str) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(family, **SMALL, **FAMILIES[family])
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases drawn too, so that they count
        for name, tensor in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                tensor.normal_(std=0.1)
    return model


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_expert_in_turn_computes_what_eager_computes(family: str) -> None:
    model = _model(family)
    looped = copy.deepcopy(model)
    assert loop_over_experts_(looped) == 2  # one experts module per layer
    assert all(loops_over_experts(m) for _, m in expert_stacks(looped).values())
    ids = _ids(3, 11, 0)
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, looped(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert (
        type(model.model.layers[0].mlp.experts).forward
        is type(looped.model.layers[0].mlp.experts).forward
    )  # the class is untouched


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_moe_exports_expert_by_expert_and_routes_other_tokens(tmp_path, family) -> None:
    """Traced on one batch, the file routes a longer batch, and a single token, which
    reaches only top-k of the experts, as PyTorch does."""
    model = _model(family)
    ids = _ids(2, 8, 0)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs={"input_ids": ids})
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = export_onnx(model, inputs, tmp_path / "moe.onnx", dynamic_sequence=True)
    runner = OnnxRunner(out.path)
    for other in (_ids(3, 13, 1), _ids(1, 1, 2)):
        got = runner(input_ids=other, attention_mask=torch.ones_like(other))
        with torch.no_grad():
            expected = model(input_ids=other).logits
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=1e-3)


def test_a_module_without_the_decorators_flags_is_left_alone() -> None:
    class Experts(torch.nn.Module):  # stacks, but no layout flags: not ours to rewrite
        def __init__(self) -> None:
            super().__init__()
            self.num_experts = 2
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))

    module = Experts()
    assert not loops_over_experts(module)
    assert loop_over_experts_(module) == 0 and "forward" not in vars(module)


def _switch() -> torch.nn.Module:
    config = transformers.SwitchTransformersConfig(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, num_experts=4, expert_capacity=16, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights: tokens then follow the input
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(std=0.3)
    return model


def test_a_dict_of_experts_runs_every_expert_in_turn(tmp_path) -> None:
    """Switch Transformers' experts, a dict of modules that eager PyTorch loops over as the
    input reaches them, export expert by expert: the file routes other tokens correctly, and
    the cached pair generates transformers' tokens one token (one expert) at a time."""
    from secateur.export import export_seq2seq_onnx
    from secateur.measure import OnnxSeq2SeqGenerator

    model = _switch()
    looped = copy.deepcopy(model)
    assert loop_over_experts_(looped) == 2  # the encoder's and the decoder's sparse layer
    ids = _ids(2, 10, 0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(
            looped(**inputs, decoder_input_ids=ids[:, :3]).logits,
            model(**inputs, decoder_input_ids=ids[:, :3]).logits,
            atol=1e-6, rtol=1e-5,
        )  # fmt: skip
    out = export_onnx(model, {**inputs, "decoder_input_ids": ids[:, :2]}, tmp_path / "s.onnx")
    other = _ids(2, 10, 7)
    got = OnnxRunner(out.path)(
        input_ids=other, attention_mask=torch.ones_like(other), decoder_input_ids=other[:, :2]
    )[0]  # the logits first
    with torch.no_grad():
        expected = model(input_ids=other, decoder_input_ids=other[:, :2]).logits
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=1e-3)

    export_seq2seq_onnx(model, inputs, tmp_path / "pair")
    tokens = OnnxSeq2SeqGenerator(tmp_path / "pair").generate(
        other, max_new_tokens=6, eos_token_id=1, pad_token_id=0
    )
    with torch.no_grad():
        reference = model.generate(other, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_experts_as_linears_compute_the_same_and_drop_the_stacks(family: str) -> None:
    model = _model(family)
    split = copy.deepcopy(model)
    assert experts_as_linears_(split) == 2
    assert not expert_stacks(split, any_layout=True)  # no 3-D stack is left
    experts = split.model.layers[0].mlp.experts
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    linears = getattr(experts, f"{up}_linears")
    assert len(linears) == 4 and isinstance(linears[0], torch.nn.Linear)
    ids = _ids(2, 9, 3)
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, split(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pytorch_dynamic_int8_reaches_every_expert(family: str) -> None:
    """quantize_dynamic_torch leaves no expert in float: each expert's matrices become int8
    Linear layers, the weights take about a quarter of their float bytes and the logits stay
    close to the float model's."""
    from secateur.quantization import quantize_dynamic_torch

    model = _model(family)
    quantized = quantize_dynamic_torch(model)
    experts = quantized.model.layers[1].mlp.experts
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert all(isinstance(m, dynamic) for m in experts.down_proj_linears)
    assert not expert_stacks(quantized, any_layout=True)
    assert hasattr(model.model.layers[1].mlp.experts, "down_proj")  # the original is untouched
    ids = _ids(2, 9, 4)
    with torch.no_grad():
        reference, got = model(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert float((got - reference).norm() / reference.norm()) < 0.05


def _standalone_experts() -> dict[str, torch.nn.Module]:
    """Experts modules of three more layouts, built alone: no gate (NemotronH), a norm after
    each expert (MuseSpark), (in, out) stacks without biases (Aria)."""
    from types import SimpleNamespace

    nemotron = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    muse = pytest.importorskip("transformers.models.muse_spark.modeling_muse_spark")
    aria = pytest.importorskip("transformers.models.aria.modeling_aria")

    def config(**values):
        return SimpleNamespace(_experts_implementation="eager", **values)

    modules = {
        "no gate": nemotron.NemotronHExperts(
            config(n_routed_experts=4, hidden_size=16, moe_intermediate_size=8,
                   moe_latent_size=None, mlp_hidden_act="relu2")
        ),
        "post-expert norm": muse.MuseSparkExperts(
            config(num_local_experts=4, moe_hidden_size=16, moe_intermediate_size=8,
                   hidden_act="silu", post_norm_eps=1e-6)
        ),
        "transposed": aria.AriaExperts(config(moe_num_experts=4, hidden_size=16, intermediate_size=8)),
    }  # fmt: skip
    torch.manual_seed(0)
    for module in modules.values():
        for tensor in module.parameters():
            torch.nn.init.normal_(tensor, std=0.3)
    return modules


def _routing(tokens: int = 7, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, their top-k experts among the first 3 of 4 (the last gets none) and weights."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 16, generator=gen)
    index = torch.stack([torch.randperm(3, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), dim=-1)
    return x, index, weights


def test_every_layout_matches_eager_and_batched_mm_in_low_precision() -> None:
    """Exact against eager in float32 for each layout (an expert with no tokens included), and
    in bfloat16 as close to a float32 reference as transformers' batched_mm, since the routing
    weights and the sum stay float32."""
    from transformers.integrations.moe import batched_mm_experts_forward

    from secateur._expert_loop import every_expert_forward

    x, index, weights = _routing()
    for name, module in _standalone_experts().items():
        assert loops_over_experts(module), name
        reference = every_expert_forward(module, x, index, weights)
        torch.testing.assert_close(reference, module(x, index, weights), atol=1e-6, rtol=1e-5)
        split = copy.deepcopy(module)
        experts_as_linears_(split)
        torch.testing.assert_close(split(x, index, weights), reference, atol=1e-6, rtol=1e-5)

        low = copy.deepcopy(module).to(torch.bfloat16)
        ours = every_expert_forward(low, x.bfloat16(), index, weights)
        theirs = batched_mm_experts_forward(low, x.bfloat16(), index, weights)
        assert ours.dtype == torch.bfloat16
        ours_error, theirs_error = (
            float((out.float() - reference).norm() / reference.norm()) for out in (ours, theirs)
        )
        assert ours_error <= theirs_error * 1.05 + 1e-4, name


def test_after_whole_experts_go_the_loop_exports_and_quantizes(tmp_path) -> None:
    """ExpertConfig rewrites the expert count; the loop follows it in ONNX and in int8."""
    from secateur import ExpertConfig
    from secateur.quantization import quantize_dynamic_torch

    model = _model("mixtral")
    ids = _ids(2, 9, 0)
    prune_(model, ExpertConfig(ratio=0.5), calibration=[{"input_ids": ids}])
    assert model.model.layers[0].mlp.experts.num_experts == 2
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = export_onnx(model, inputs, tmp_path / "moe.onnx", dynamic_sequence=True)
    other = _ids(1, 5, 6)
    got = OnnxRunner(out.path)(input_ids=other, attention_mask=torch.ones_like(other))
    quantized = quantize_dynamic_torch(model)
    with torch.no_grad():
        expected = model(input_ids=other).logits
        int8 = quantized(input_ids=other).logits
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=1e-3)
    assert len(quantized.model.layers[0].mlp.experts.down_proj_linears) == 2
    assert float((int8 - expected).norm() / expected.norm()) < 0.05


def test_nllb_moes_frozen_expert_loop_is_refused(tmp_path) -> None:
    """NLLB-MoE's experts (transformers' eager loop over the expert indices it reached, kept
    as they are) trace to a graph fixed at the example's routing: the checks refuse the file."""
    from secateur.errors import ArtifactError

    config = transformers.NllbMoeConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_experts=4, expert_capacity=16, encoder_sparse_step=2,
        decoder_sparse_step=2, max_position_embeddings=64, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.NllbMoeForConditionalGeneration(config).eval()
    assert loop_over_experts_(copy.deepcopy(model)) == 0  # not a layout the loop reproduces
    ids = _ids(2, 10, 0)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": ids[:, :4],
    }
    with pytest.raises(ArtifactError):
        export_onnx(model, inputs, tmp_path / "nllb.onnx")
    assert not (tmp_path / "nllb.onnx").exists()
