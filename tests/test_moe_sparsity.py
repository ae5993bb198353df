"""Unstructured pruning, SparseGPT, codebooks and the compressed file on stacked MoE expert
weights."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from torch import nn

from hf_small_configs import MIXTRAL
from secateur import ExpertConfig, create_model, load_model, save_model
from secateur._experts import ExpertInputs, expert_stacks
from secateur.errors import ConfigError
from secateur.export import CompressionConfig, load_compressed, save_compressed
from secateur.importance._statistics import collect_statistics
from secateur.measure import count_macs, count_params, layer_sparsity
from secateur.pruning import (
    SparseGPTConfig,
    UnstructuredConfig,
    prunable_weights,
    prune_,
    prune_sparsegpt_,
)
from secateur.pruning._sparsegpt import _prunable, _record_steps, _stacks
from secateur.pruning._sparsegpt_solver import LayerTarget, sparsegpt_matrix
from secateur.quantization import CodebookConfig, cluster_weights_
from secateur.runtime import nm_pattern

transformers = pytest.importorskip("transformers")

STACKS = [
    f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
]


def _mixtral(implementation: str = "grouped_mm") -> nn.Module:
    config = transformers.MixtralConfig(**MIXTRAL)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM._from_config(
        config, experts_implementation=implementation
    ).eval()


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(0))}


def _batches() -> list:
    x = _ids()
    return [(x, x["input_ids"])]


def test_expert_stacks_are_found_and_routers_are_not() -> None:
    model = _mixtral()
    assert sorted(expert_stacks(model)) == sorted(STACKS)
    weights = prunable_weights(model)
    assert set(STACKS) <= set(weights)
    assert "model.layers.0.mlp.gate.weight" not in weights  # the router is not a stack
    assert not set(prunable_weights(model, exclude=("*.experts",))) & set(STACKS)
    assert not set(prunable_weights(model, exclude=("*down_proj",))) & set(STACKS[1::2])


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "fallback"])
def test_expert_inputs_agree_across_kernels(implementation: str, monkeypatch) -> None:
    """The rows each expert multiplied are seen through F.linear on a slice (eager), grouped_mm,
    its fallback op (old torch, unaligned weights) and bmm on gathered weights (batched_mm)
    alike; every token meets top-k=2 experts."""
    reference = collect_statistics(_mixtral("grouped_mm"), _batches(), ["activations"]).experts
    if implementation == "fallback":
        from transformers.integrations import moe

        monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args: False)
        implementation = "grouped_mm"
    other = collect_statistics(_mixtral(implementation), _batches(), ["activations"]).experts
    assert sorted(reference) == sorted(STACKS)
    for name in STACKS:
        assert int(reference[name].count.sum()) == 3 * 8 * 2
        torch.testing.assert_close(other[name].count, reference[name].count)
        torch.testing.assert_close(other[name].sq_sum, reference[name].sq_sum)
        torch.testing.assert_close(other[name].abs_sum, reference[name].abs_sum)


def test_expert_inputs_match_the_rows_routed_to_each_expert() -> None:
    """Hand check on one expert: its gate_up rows are the hidden states routed to it."""
    model = _mixtral("eager")
    experts = model.model.layers[0].mlp.experts
    seen = {}

    def hook(module, args) -> None:  # noqa: ANN001
        seen["x"], seen["index"] = args[0].detach(), args[1].detach()

    handle = experts.register_forward_pre_hook(hook)
    with ExpertInputs(model) as watch, torch.no_grad():
        model(**_ids())
    handle.remove()
    feature = watch.features[STACKS[0]]
    for expert in range(4):
        rows = seen["x"][(seen["index"] == expert).any(dim=-1)]
        assert int(feature.count[expert]) == rows.shape[0]
        torch.testing.assert_close(feature.sq_sum[expert], rows.pow(2).sum(0))


def test_wanda_two_four_runs_along_each_experts_inputs() -> None:
    model = _mixtral()
    stats = collect_statistics(model, _batches(), ["activations"]).experts
    before = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    masks = prune_(model, UnstructuredConfig(nm="2:4", criterion="wanda"), calibration=_batches())
    assert set(STACKS) <= set(masks.masks)
    down = model.model.layers[0].mlp.experts.down_proj  # (experts, hidden, intermediate)
    assert all(nm_pattern(down[e]) for e in range(4))
    # in each run of 4 inputs the two largest |w| * ||x|| stay
    score = before.abs() * stats[STACKS[1]].norm()[:, None, :]
    runs = score.reshape(4, 64, -1, 4)
    kept = (down != 0).reshape(4, 64, -1, 4)
    best = torch.zeros_like(kept).scatter_(-1, runs.topk(2, dim=-1).indices, True)
    assert torch.equal(kept, best)
    with torch.no_grad():
        assert torch.isfinite(model(**_ids()).logits).all()


def test_magnitude_sparsity_reaches_the_experts_and_the_counts() -> None:
    model = _mixtral()
    total, _ = count_params(model)
    prune_(model, UnstructuredConfig(sparsity=0.5, scope="layer"))
    for name in STACKS:
        stack = model.get_parameter(name)
        assert float((stack == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    expert_weights = sum(model.get_parameter(n).numel() for n in STACKS)
    assert total - count_params(model)[1] >= expert_weights // 2
    rows = {row.name: row for row in layer_sparsity(model)}
    assert rows[STACKS[0]].params == 4 * 256 * 64
    assert rows[STACKS[0]].nonzero == pytest.approx(4 * 256 * 64 / 2, abs=2)


class _TransposedExperts(nn.Module):
    """Experts stored (experts, in, out), the grouped_mm layout, as GPT-OSS keeps them; the
    first ``split`` rows go to expert 0, the rest to expert 1."""

    def __init__(self, split: float = 0.5) -> None:
        super().__init__()
        self.num_experts = 2
        self.is_transposed = True
        self.split = split
        self.up = nn.Parameter(torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offs = torch.tensor([int(x.shape[0] * self.split), x.shape[0]], dtype=torch.int32)
        return torch._grouped_mm(x, self.up, offs=offs)


def test_transposed_stacks_prune_along_their_input_axis() -> None:
    model = nn.Sequential(_TransposedExperts())
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    loud = torch.arange(16) % 4 < 2
    x[:3, loud] *= 1000.0  # expert 0 sees huge inputs 0, 1 of every run of 4: Wanda keeps them
    stats = collect_statistics(model, [(x, None)], ["activations"]).experts["0.up"]
    assert stats.count.tolist() == [3.0, 3.0]
    prune_(model, UnstructuredConfig(nm="2:4", criterion="wanda"), calibration=[(x, None)])
    up = model[0].up.detach()
    assert all(nm_pattern(up[e].t()) for e in range(2))  # 2:4 along the 16 inputs
    assert bool((up[0, loud] != 0).all()) and bool((up[0, ~loud] == 0).all())


def test_compressed_file_codes_expert_stacks_sparsely(tmp_path) -> None:
    model = create_model("hf.mixtral", task="causal-lm", **MIXTRAL)
    dense = save_compressed(model, tmp_path / "dense.secz", CompressionConfig(values="exact"))
    prune_(model, UnstructuredConfig(sparsity=0.75, scope="layer"))
    x = _ids()
    with torch.no_grad():
        reference = model(**x).logits
    exact = save_compressed(model, tmp_path / "exact.secz", CompressionConfig(values="exact"))
    loaded = load_compressed(exact).model
    for name in STACKS:
        assert torch.equal(loaded.get_parameter(name), model.get_parameter(name))
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, reference)

    int8 = save_compressed(model, tmp_path / "int8.secz", CompressionConfig(values="int8"))
    header_length = struct.unpack("<4sIQ32s", int8.read_bytes()[:48])[2]
    header = json.loads(int8.read_bytes()[48 : 48 + header_length])
    entries = {e["name"]: e for e in header["tensors"]}
    assert entries[STACKS[0]]["layout"] == "sparse"
    assert entries[STACKS[0]]["values"]["rows"] == 4 * 2 * 128  # a scale per expert row
    restored = load_compressed(int8).model
    for name in STACKS:
        original, back = model.get_parameter(name), restored.get_parameter(name)
        assert torch.equal(original == 0, back == 0)
        step = original.abs().amax(dim=-1, keepdim=True) / 127
        assert bool(((back - original).abs() <= step / 2 + 1e-7).all())
    assert exact.stat().st_size < 0.5 * dense.stat().st_size  # the experts shrank on disk


def test_codebooks_share_expert_values() -> None:
    model = _mixtral()
    prune_(model, UnstructuredConfig(sparsity=0.5))
    books = cluster_weights_(model, CodebookConfig(bits=3))
    assert set(STACKS) <= set(books.bits)
    for name in STACKS:
        stack = model.get_parameter(name)
        assert stack.unique().numel() <= 8 + 1  # 8 shared values and the pruned zeros


def _calibration() -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(i))}
        for i in range(4)
    ]


def test_sparsegpt_places_each_stack_where_it_first_runs() -> None:
    model = _mixtral()
    steps, calls = _record_steps(model, _prunable(model, ()), _ids(), _stacks(model, ()))
    flat = [name for step in steps for name in step]
    assert flat.index(STACKS[0]) == flat.index("model.layers.0.self_attn.o_proj") + 1
    assert flat.index(STACKS[1]) == flat.index(STACKS[0]) + 1  # down after gate_up
    assert [calls[name] for name in STACKS] == [1, 1, 1, 1]
    assert all(len(step) == 1 for step in steps if step[0] in STACKS)


def test_sparsegpt_prunes_experts_alike_under_every_kernel() -> None:
    """Same masks and weights whichever kernel runs the experts; 2:4 along each expert's
    inputs; the output moves less than under magnitude 2:4."""
    x = _ids()
    results = {}
    for implementation in ("grouped_mm", "eager", "batched_mm"):
        model = _mixtral(implementation)
        masks = prune_sparsegpt_(model, SparseGPTConfig(nm="2:4"), _calibration())
        results[implementation] = (model, masks)
    model, masks = results["grouped_mm"]
    assert set(STACKS) <= set(masks.masks)
    for other, other_masks in (results["eager"], results["batched_mm"]):
        for name in STACKS:
            assert torch.equal(other_masks.masks[name], masks.masks[name])
            torch.testing.assert_close(other.get_parameter(name), model.get_parameter(name))
    down = model.model.layers[1].mlp.experts.down_proj
    assert all(nm_pattern(down[e]) for e in range(4))

    with torch.no_grad():
        dense = _mixtral()(**x).logits
        magnitude = _mixtral()
        prune_(magnitude, UnstructuredConfig(nm="2:4"))

        def error(net: nn.Module) -> float:
            return float((net(**x).logits - dense).norm() / dense.norm())

        assert error(model) < 0.85 * error(magnitude)


def test_sparsegpt_solves_each_expert_on_its_own_rows() -> None:
    """Hand check on a transposed stack: expert e is SparseGPT on H = 2/n·XₑᵀXₑ of its rows."""
    model = nn.Sequential(_TransposedExperts(split=0.25))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    before = model[0].up.detach().clone()
    masks = prune_sparsegpt_(model, SparseGPTConfig(sparsity=0.5, blocksize=4), [x])
    for expert, rows in ((0, x[:8]), (1, x[8:])):
        w = before[expert].t().clone()
        pruned = sparsegpt_matrix(
            w, 2.0 / rows.shape[0] * rows.t() @ rows, LayerTarget(0.5), 4, 0.01, "e"
        )
        torch.testing.assert_close(model[0].up[expert].t(), w)
        assert torch.equal(masks.masks["0.up"][expert].t(), ~pruned)


def test_sparsegpt_prunes_an_unrouted_expert_by_magnitude_and_says_so() -> None:
    model = nn.Sequential(_TransposedExperts(split=1.0))  # expert 1 gets no row
    before = model[0].up.detach().clone()
    with pytest.warns(UserWarning, match=r"0.up: experts \[1\]"):
        prune_sparsegpt_(model, SparseGPTConfig(nm="2:4"), [torch.randn(8, 16)])
    up = model[0].up.detach()
    kept = before[1].abs().t().reshape(8, 4, 4).topk(2, dim=-1).indices
    expected = torch.zeros(8, 4, 4, dtype=torch.bool).scatter_(-1, kept, True).reshape(8, 16)
    assert torch.equal(up[1].t() != 0, expected)
    torch.testing.assert_close(up[1][up[1] != 0], before[1][up[1] != 0])  # no update, no rows


# --- whole-expert removal --------------------------------------------------------------------


def _routing_without(model: nn.Module, removed: dict[str, tuple[int, ...]]) -> None:
    """Mixtral's routing with the ``removed`` experts' logits at -inf: what removing them
    should compute (softmax, top-2 among the rest, renormalised)."""
    for i, layer in enumerate(model.model.layers):
        router, gone = layer.mlp.gate, list(removed[f"model.layers.{i}.mlp.experts"])

        def forward(h: torch.Tensor, router: nn.Module = router, gone: list = gone) -> tuple:
            logits = torch.nn.functional.linear(h.reshape(-1, router.hidden_dim), router.weight)
            logits[:, gone] = -torch.inf
            top, index = torch.topk(logits.float().softmax(-1), router.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), index

        router.forward = forward


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
def test_removing_experts_routes_tokens_among_the_rest_exactly(implementation: str) -> None:
    model = _mixtral(implementation)
    reference = copy.deepcopy(model)
    result = prune_(model, ExpertConfig(ratio=0.5), calibration=_calibration())
    assert set(result.removed) == {f"model.layers.{i}.mlp.experts" for i in (0, 1)}
    for name, gone in result.removed.items():
        scores = torch.tensor(result.scores[name])
        assert len(gone) == 2 and set(gone) == set(scores.argsort()[:2].tolist())
    moe = model.model.layers[0].mlp
    assert moe.experts.gate_up_proj.shape == (2, 256, 64)
    assert moe.experts.down_proj.shape == (2, 64, 128)
    assert moe.gate.weight.shape == (2, 64)
    assert moe.experts.num_experts == moe.gate.num_experts == 2
    assert result.params_after == result.params_before - 2 * 2 * (256 * 64 + 64 * 128 + 64)
    _routing_without(reference, result.removed)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, reference(**x).logits)


def test_expert_scores_count_tokens_and_routing_weight() -> None:
    """Every token meets top-2 experts (frequency sums to 2 per token) whose normalised
    weights sum to 1 (mass sums to 1 per token); the top-k experts always stay."""
    tokens = 4 * 4 * 16
    by_count = prune_(
        _mixtral(), ExpertConfig(ratio=0.9, criterion="frequency"), calibration=_calibration()
    )
    by_mass = prune_(_mixtral(), ExpertConfig(ratio=0.9), calibration=_calibration())
    for name in by_count.scores:
        assert sum(by_count.scores[name]) == 2 * tokens
        assert sum(by_mass.scores[name]) == pytest.approx(tokens)
        assert len(by_count.removed[name]) == 2  # 4 experts, top-2 routing: 2 must stay


def test_removed_experts_reload_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("hf.mixtral", task="causal-lm", **MIXTRAL)
    prune_(model, ExpertConfig(ratio=0.5), calibration=_calibration())
    x = _ids()
    with torch.no_grad():
        reference = model(**x).logits
    loaded = load_model(save_model(model, tmp_path / "m.safetensors")).model
    assert loaded.model.layers[1].mlp.gate.num_experts == 2
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, reference)


def test_qwen2_moe_experts_go_beside_a_shared_expert() -> None:
    config = transformers.Qwen2MoeConfig(
        **{k: v for k, v in MIXTRAL.items() if k != "num_local_experts"},
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    result = prune_(model, ExpertConfig(ratio=0.5), calibration=_calibration())
    moe = model.model.layers[0].mlp
    assert len(result.removed["model.layers.0.mlp.experts"]) == 4
    assert moe.experts.gate_up_proj.shape[0] == moe.gate.weight.shape[0] == 4
    assert moe.shared_expert_gate.weight.shape == (1, 64)  # not a router: untouched
    with torch.no_grad():
        assert torch.isfinite(model(**_ids()).logits).all()


class _FixedCountBlock(nn.Module):
    """A toy MoE layer; with ``strict`` its code hard-codes its four experts."""

    def __init__(self, strict: bool = True) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.gate.num_experts, self.gate.top_k = 4, 1
        self.experts = _ToyExperts()
        self.strict = strict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.gate(x).softmax(-1).topk(1, dim=-1)
        assert not self.strict or self.gate.weight.shape[0] == 4, "four experts expected"
        return self.experts(x, index, weights)


class _ToyExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 4
        self.up = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        picked = self.up[index[:, 0]]
        return torch.bmm(picked, x[:, :, None])[:, :, 0] * weights


def test_expert_removal_errors_and_undo() -> None:
    """A layer whose code breaks with fewer experts undoes the whole removal, the layers
    already done included; the model is left as it was."""
    model = nn.Sequential(_FixedCountBlock(strict=False), _FixedCountBlock()).train()
    assert "0.experts.up" not in prunable_weights(model)  # no is_transposed: layout unknown
    x = torch.randn(16, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=r"1\.experts fails with fewer experts.*nothing was"):
        prune_(model, ExpertConfig(ratio=0.5), calibration=[x])
    assert {n: p.shape for n, p in model.named_parameters()} == {
        n: p.shape for n, p in before.items()
    }
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for block in model:
        assert block.experts.num_experts == block.gate.num_experts == block.gate.out_features == 4
    assert model.training and not hasattr(model, "secateur_attributes")
    result = prune_(model, ExpertConfig(ratio=0.5, exclude=("1.experts",)), calibration=[x])
    assert list(result.removed) == ["0.experts"] and model[0].gate.out_features == 2
    with pytest.raises(ConfigError, match="re-iterable"):
        prune_(model, ExpertConfig(), calibration=iter([x]))
    with pytest.raises(ConfigError, match="sequence of fnmatch patterns"):
        ExpertConfig(exclude="1.experts")
    block = _FixedCountBlock()
    with pytest.raises(ConfigError, match="no mixture-of-experts layer"):
        prune_(nn.Linear(4, 4), ExpertConfig(), calibration=[torch.randn(2, 4)])
    with pytest.raises(ConfigError, match="pass calibration"):
        prune_(block, ExpertConfig())
    with pytest.raises(ConfigError, match="criterion='nope'"):
        ExpertConfig(criterion="nope")
    first = prune_(_mixtral(), ExpertConfig(ratio=0.5, criterion="random"), calibration=[_ids()])
    again = prune_(_mixtral(), ExpertConfig(ratio=0.5, criterion="random"), calibration=[_ids()])
    by_mass = prune_(_mixtral(), ExpertConfig(ratio=0.5), calibration=[_ids()])
    assert first.removed == again.removed  # seeded
    assert first.scores != by_mass.scores and all(len(g) == 2 for g in first.removed.values())


MOE_FAMILIES = {
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=4),
    "deepseek_v3": dict(
        n_routed_experts=4,
        moe_intermediate_size=32,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),  # fmt: skip
    "gpt_oss": dict(num_local_experts=4, head_dim=16),  # (in, out) stacks with biases
    "hunyuan_v1_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=16),  # gate.wg
    "ernie4_5_moe": dict(moe_num_experts=4, moe_intermediate_size=32, moe_k=2),  # (1, E) bias
    "phimoe": dict(num_local_experts=4),
}


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_families_prune_by_weight_and_by_expert(family: str) -> None:
    """Across MoE families: Wanda and SparseGPT 2:4 reach every expert stack along its inputs,
    and half the experts go whole, the model still running."""
    options = {k: v for k, v in MIXTRAL.items() if k != "num_local_experts"}
    config = transformers.AutoConfig.for_model(
        family, **options, num_experts_per_tok=2, **MOE_FAMILIES[family]
    )
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    stacks = expert_stacks(base)
    assert stacks
    seen = collect_statistics(base, _calibration(), ["activations"]).experts
    assert set(seen) == set(stacks)  # Wanda reads every stack's routed rows
    if family == "gpt_oss":  # its eager experts multiply by x @ stack[e]
        eager = copy.deepcopy(base)
        eager.set_experts_implementation("eager")
        again = collect_statistics(eager, _calibration(), ["activations"]).experts
        for name in stacks:
            torch.testing.assert_close(again[name].sq_sum, seen[name].sq_sum)
        assert count_macs(eager, _ids()) == count_macs(base, _ids())
    for pruning in (UnstructuredConfig(nm="2:4", criterion="wanda"), SparseGPTConfig(nm="2:4")):
        model = copy.deepcopy(base)
        prune_(model, pruning, calibration=_calibration())
        for name, (_, module) in stacks.items():
            stack = model.get_parameter(name)
            rows = stack.transpose(1, 2) if module.is_transposed else stack
            assert all(nm_pattern(rows[e]) for e in range(stack.shape[0])), (pruning, name)
    model = copy.deepcopy(base)
    result = prune_(model, ExpertConfig(ratio=0.5), calibration=_calibration())
    assert result.removed and all(len(gone) == 2 for gone in result.removed.values())
    assert all(model.get_parameter(name).shape[0] == 2 for name in stacks)
    with torch.no_grad():
        assert torch.isfinite(model(**_ids()).logits).all()


def test_the_fallback_grouped_kernel_is_traced_and_counted(monkeypatch) -> None:
    """transformers falls back to its own grouped_mm op on old torch or unaligned weights:
    MACs and the structural trace see it as they see grouped_mm."""
    from transformers.integrations import moe

    from secateur.pruning import StructuredConfig

    reference = count_macs(_mixtral(), _ids())
    monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args: False)
    model = _mixtral()
    assert count_macs(model, _ids()) == reference
    prune_(model, StructuredConfig(ratio=0.5, kinds=("channel",)), example_inputs=_ids())
    assert model.model.layers[0].mlp.experts.down_proj.shape == (4, 64, 64)
