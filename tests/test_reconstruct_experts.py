"""Structured reconstruction of stacked mixture-of-experts weights, expert by expert."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_small_configs import MIXTRAL
from secateur import StructuredConfig, prune_
from secateur.pruning import _reconstruct, _structured
from secateur.pruning._least_squares import refit_kept_columns

transformers = pytest.importorskip("transformers")


class _Experts(nn.Module):
    """Two experts stored ``(in, out)`` as GPT-OSS keeps them, run by ``grouped_mm``: the first
    ``split`` of the rows go to expert 0, the rest to expert 1; 8 inputs, 16 ReLU neurons, 4
    outputs and a per-expert output bias (``down_bias``, found by its name)."""

    def __init__(self, split: float = 0.5) -> None:
        super().__init__()
        self.num_experts = 2
        self.is_transposed = True
        self.split = split
        g = torch.Generator().manual_seed(1)
        self.up = nn.Parameter(torch.randn(2, 8, 16, generator=g))
        self.down = nn.Parameter(torch.randn(2, 16, 4, generator=g))
        self.down_bias = nn.Parameter(torch.randn(2, 4, generator=g))

    def cut(self, rows: int) -> int:
        return int(rows * self.split)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        offs = torch.tensor([self.cut(x.shape[0]), x.shape[0]], dtype=torch.int32)
        return torch.relu(torch._grouped_mm(x, self.up, offs=offs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offs = torch.tensor([self.cut(x.shape[0]), x.shape[0]], dtype=torch.int32)
        out = torch._grouped_mm(self.hidden(x), self.down, offs=offs)
        return out + self.down_bias[(torch.arange(x.shape[0]) >= self.cut(x.shape[0])).long()]


def _experts(split: float = 0.5, redundant: bool = False) -> nn.Sequential:
    """With ``redundant``, neurons 8..15 of each expert are half of neurons 0..7 (ReLU is
    positively homogeneous), so the l2 criterion removes exactly those copies."""
    model = nn.Sequential(_Experts(split)).eval()
    if redundant:
        with torch.no_grad():
            model[0].up[:, :, 8:] = 0.5 * model[0].up[:, :, :8]
    return model


def _pruned(model: nn.Module, x: torch.Tensor, reconstruct: bool, **config: object) -> nn.Module:
    model = copy.deepcopy(model)
    settings = dict(ratio=0.5, criterion="l2", reconstruct=reconstruct) | config
    prune_(model, StructuredConfig(**settings), example_inputs=x[:4], calibration=[x])
    return model


def _error(model: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference).norm() / reference.norm())


X = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))


def test_redundant_expert_neurons_are_folded_into_the_kept_ones() -> None:
    model = _experts(redundant=True)
    with torch.no_grad():
        reference = model(X)
    plain, refit = (_pruned(model, X, reconstruct) for reconstruct in (False, True))
    assert refit[0].up.shape == (2, 8, 8) and refit[0].down.shape == (2, 8, 4)
    assert _error(plain, reference, X) > 0.1
    assert _error(refit, reference, X) < 0.02  # only the dampening stands in the way


def test_each_expert_is_refitted_on_the_rows_routed_to_it() -> None:
    """Hand check: expert e's kept down columns and bias solve the least squares over the
    hidden rows of the rows ``grouped_mm`` sent to it, with a 1 appended for the bias."""
    model = _experts()
    with torch.no_grad():
        hidden = model[0].hidden(X).double()
        scores = model[0].up.detach().square().sum(dim=(0, 1))  # l2 over both experts' inputs
    removed = torch.sort(scores, stable=True).indices[:8]
    drop = torch.zeros(17, dtype=torch.bool)
    drop[removed] = True
    refit = _pruned(model, X, reconstruct=True)
    cut = model[0].cut(X.shape[0])
    for expert, rows in enumerate((hidden[:cut], hidden[cut:])):
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        full = torch.cat([model[0].down[expert].t(), model[0].down_bias[expert, :, None]], 1)
        want = refit_kept_columns(full.detach().double(), rows.t() @ rows / len(rows), drop, "")
        torch.testing.assert_close(refit[0].down[expert].t().double(), want[:, ~drop][:, :-1])
        torch.testing.assert_close(refit[0].down_bias[expert].double(), want[:, -1])


def test_an_expert_no_row_reached_keeps_plain_removal() -> None:
    model = _experts(split=1.0)  # every row goes to expert 0
    plain = _pruned(model, X, False)
    with pytest.warns(UserWarning, match="plain removal for 1 of 2 expert matrices") as caught:
        refit = _pruned(model, X, True)
    assert caught[0].filename == __file__  # points at the prune_ call
    assert torch.equal(refit[0].down[1], plain[0].down[1])
    assert torch.equal(refit[0].down_bias[1], plain[0].down_bias[1])
    assert not torch.equal(refit[0].down[0], plain[0].down[0])


def test_an_expert_with_fewer_rows_than_twice_its_kept_inputs_keeps_plain_removal() -> None:
    """With fewer rows the fit follows the calibration rows rather than the layer: expert 1
    gets 12 rows for its 8 kept inputs and a bias, so it keeps plain removal; expert 0 gets
    52 and is refitted."""
    model = _experts(split=52 / 64, redundant=True)
    plain = _pruned(model, X, False)
    with pytest.warns(
        UserWarning, match="plain removal for 1 of 2 expert matrices, which saw fewer"
    ):
        refit = _pruned(model, X, True)
    assert torch.equal(refit[0].down[1], plain[0].down[1])
    assert not torch.equal(refit[0].down[0], plain[0].down[0])


def test_a_stack_whose_products_go_unseen_keeps_plain_removal_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from secateur.pruning import _reconstruct_stacks

    monkeypatch.setattr(_reconstruct_stacks.ExpertGrams, "take", lambda *args: None)
    model = _experts(redundant=True)
    plain = _pruned(model, X, False)
    with pytest.warns(UserWarning, match=r"no calibration rows reach 0\.down \(a kernel"):
        refit = _pruned(model, X, True)
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), refit.parameters(), strict=True)
    )


def test_a_rolled_back_surgery_also_rolls_back_the_stack_refit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _experts(redundant=True)
    weights = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(_structured, "_check_forward", lambda *a: "RuntimeError: boom")
    config = StructuredConfig(ratio=0.5, criterion="l2", reconstruct=True)
    result = prune_(model, config, example_inputs=X[:4], calibration=[X])
    assert result.removed_units == 0 and len(result.refused) == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def _moe(family: str, implementation: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "mixtral":
        config = transformers.MixtralConfig(**MIXTRAL)
        model_class = transformers.MixtralForCausalLM
    else:  # experts stored (in, out) with biases, run one by one under "eager"
        config = transformers.GptOssConfig(
            **MIXTRAL, head_dim=16, layer_types=["full_attention"] * 2
        )
        model_class = transformers.GptOssForCausalLM
    return model_class._from_config(config, experts_implementation=implementation).eval()


def _batches(count: int, seed: int) -> list[tuple[dict[str, torch.Tensor], None]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ({"input_ids": torch.randint(1, 100, (4, 16), generator=g)}, None) for _ in range(count)
    ]


def _prune_moe(model: nn.Module, reconstruct: bool, kinds: tuple[str, ...]) -> float:
    """Prune half of ``kinds`` on 12 calibration batches (384 rows per expert, 3 per kept
    input of a down projection); the relative logit error on 4 held-out batches."""
    calibration, held_out = _batches(12, 0), _batches(4, 1)
    with torch.no_grad():
        reference = [model(**x).logits for x, _ in held_out]
    config = StructuredConfig(ratio=0.5, kinds=kinds, criterion="l2", reconstruct=reconstruct)
    prune_(model, config, example_inputs=calibration[0][0], calibration=calibration)
    with torch.no_grad():
        got = torch.cat([model(**x).logits for x, _ in held_out])
    return float((got - torch.cat(reference)).norm() / torch.cat(reference).norm())


@pytest.mark.parametrize(
    ("family", "implementation"), [("mixtral", "grouped_mm"), ("gpt_oss", "eager")]
)
@pytest.mark.parametrize("kinds", [("channel",), ("hidden",)], ids=["ffn", "hidden"])
def test_moe_refit_lowers_the_error_of_structured_pruning(
    family: str, implementation: str, kinds: tuple[str, ...]
) -> None:
    """On held-out inputs. FFN neurons: the down projections' experts are refitted; hidden
    size: the gate/up projections' experts (beside the attention projections, Linear
    layers)."""
    plain = _prune_moe(_moe(family, implementation), False, kinds)
    refit = _prune_moe(_moe(family, implementation), True, kinds)
    assert refit < 0.95 * plain


def test_the_refit_is_the_same_under_every_expert_kernel() -> None:
    results = {}
    for implementation in ("grouped_mm", "eager", "batched_mm"):
        model = _moe("mixtral", implementation)
        _prune_moe(model, True, ("channel",))
        results[implementation] = model
    for other in ("eager", "batched_mm"):
        for a, b in zip(
            results["grouped_mm"].parameters(), results[other].parameters(), strict=True
        ):
            torch.testing.assert_close(a, b)


def test_stack_statistics_too_large_for_one_pass_are_gathered_over_several(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from secateur.pruning import _reconstruct_stacks

    real = _reconstruct_stacks._gather
    runs: list[list[str]] = []

    def pruned(pass_bytes: int) -> nn.Module:
        monkeypatch.setattr(_reconstruct, "PASS_BYTES", pass_bytes)
        monkeypatch.setattr(
            _reconstruct_stacks, "_gather", lambda m, run, *a: runs.append(run) or real(m, run, *a)
        )
        model = _moe("mixtral", "grouped_mm")
        _prune_moe(model, True, ("channel",))
        return model

    together = pruned(2 * 1024**3)
    apart = pruned(8 * 4 * 128 * 128)  # one down projection's 4 expert matrices per pass
    down = [f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 1)]
    assert runs == [down, [down[0]], [down[1]]]
    for a, b in zip(together.parameters(), apart.parameters(), strict=True):
        assert torch.equal(a, b)
