"""The forward check after surgery: groups whose removal breaks the model are refused, the model
is never left broken, and nn.MultiheadAttention prunes its hidden size and its heads apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur import PruningError, StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from secateur.measure import count_macs


class WidthFromSize(nn.Module):
    """Computes a reshape from another tensor's width: invisible to any tracer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        width = h.shape[-1]
        g = self.b(x).view(x.shape[0], 2, 8).reshape(x.shape[0], 2, width // 2)
        return self.out(self.mlp(h) + g.flatten(1))


def test_a_group_that_breaks_the_forward_is_refused_and_the_rest_applied() -> None:
    torch.manual_seed(0)
    model, x = WidthFromSize().eval(), torch.randn(3, 8)
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused and "broke the model" in result.refused[0][1]
    assert model.mlp[0].out_features == 16  # the independent MLP group was still pruned
    assert model.a.out_features == 16  # the residual width read by .shape stays whole
    assert model(x).shape == (3, 2)


def test_nothing_applied_when_every_try_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from secateur.pruning import _structured

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    weights = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monkeypatch.setattr(_structured, "_check_forward", lambda *a: "RuntimeError: boom")
    result = prune_(
        model, StructuredConfig(ratio=0.5), example_inputs=torch.randn(2, 4), optimizer=opt
    )
    assert result.removed_units == 0 and len(result.refused) == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert model[0].out_features == 8
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())


def test_a_failing_final_apply_restores_and_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from secateur.pruning import _structured

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    calls = iter([None if i == 1 else "RuntimeError: boom" for i in range(10)])
    monkeypatch.setattr(_structured, "_check_forward", lambda *a: next(calls))
    with pytest.raises(PruningError, match="restored"):
        prune_(model, StructuredConfig(ratio=0.5), example_inputs=torch.randn(2, 4))
    assert model[0].weight.shape == (8, 4) and model[0].out_features == 8


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.pos = nn.Parameter(torch.randn(1, 5, 32))
        self.ln1 = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        y = self.ln1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h[:, 0])


def test_multihead_attention_prunes_hidden_size_and_heads_apart() -> None:
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 5, 12)
    graph = build_dependency_graph(model, x)
    hidden = next(g for g in graph.groups if g.kind == "hidden")
    assert hidden.multiple == 1 and any(m.tensor == "pos" for m in hidden.members)
    heads = next(g for g in graph.groups if g.kind == "head")
    assert heads.size == 4 and heads.module_names() == ["attn", "attn.out_proj"]
    macs = count_macs(model, x).dense
    prune_(model, StructuredConfig(ratio=0.3), example_inputs=x)
    attn = model.attn
    assert attn.num_heads == 3 and attn.head_dim == 8  # whole heads went
    assert attn.embed_dim < 32  # the hidden size shrank on its own, not by num_heads steps
    assert attn.in_proj_weight.shape == (3 * 3 * 8, attn.embed_dim)
    assert attn.out_proj.weight.shape == (attn.embed_dim, 3 * 8)
    assert model.pos.shape == (1, 5, attn.embed_dim)
    assert model(x).shape == (2, 3)
    assert count_macs(model, x).dense < macs
