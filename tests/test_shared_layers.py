"""Layers whose weights serve several calls, and parameters fed to layers as inputs: the spaces
of every call are one (ALBERT's single layer run at every depth, DeBERTa's ``query_proj`` on
the hidden states and on the relative position embeddings), so pruning them stays exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur import create_model, load_model, save_model
from secateur.graph import build_dependency_graph
from secateur.measure import count_macs
from secateur.pruning import StructuredConfig, prune_
from secateur.pruning._structured import apply_removals_
from structured_helpers import silence_

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=100,
    max_position_embeddings=32,
    num_labels=3,
)
DEBERTA = dict(
    SMALL,
    relative_attention=True,
    pos_att_type=["c2p", "p2c"],
    position_buckets=8,
    max_relative_positions=16,
    position_biased_input=False,
)


def _classifier(family: str, **kwargs: object) -> nn.Module:
    config = transformers.AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))}


def _logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def _silence_and_remove(model: nn.Module, x: dict[str, torch.Tensor]) -> list:
    """Silence half of every non-hidden group, remove exactly those; the logits must not move."""
    graph = build_dependency_graph(model, x)
    gen = torch.Generator().manual_seed(1)
    removals = []
    for group in graph.groups:
        if group.kind == "hidden":
            continue  # norms pool the hidden channels: removing them is not exact by nature
        units = torch.randperm(group.size, generator=gen)[: group.size // 2]
        silence_(model, group, units)
        removals.append((group, units))
    reference = _logits(model, x)
    apply_removals_(model, graph, removals)
    torch.testing.assert_close(_logits(model, x), reference, atol=1e-6, rtol=1e-5)
    return list(graph.groups)


class _Siamese(nn.Module):
    """One encoder applied to two inputs, its outputs compared."""

    def __init__(self) -> None:
        super().__init__()
        self.encode, self.norm, self.head = nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encode(a)) * self.norm(self.encode(b)))


def test_a_layer_called_twice_has_one_space_for_both_calls() -> None:
    torch.manual_seed(0)
    model = _Siamese().eval()
    a, b = torch.randn(3, 6), torch.randn(3, 6)
    graph = build_dependency_graph(model, (a, b))
    assert dict(graph.blocked) == {"encode": "model input", "head": "model output"}
    (group,) = graph.groups
    assert group.size == 10 and group.module_names() == ["encode", "head", "norm"]
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=(a, b))
    assert model.encode.out_features == model.head.in_features == 5
    assert model(a, b).shape == (3, 2)


def test_albert_prunes_its_one_shared_layer_at_every_depth() -> None:
    model = _classifier("albert", **{**SMALL, "num_hidden_layers": 3}, embedding_size=32)
    groups = _silence_and_remove(model, _ids())
    assert sorted((g.kind, g.size) for g in groups) == [
        ("channel", 64),  # the pooler
        ("channel", 128),  # the FFN, one for all three depths
        ("head", 4),
        ("hidden", 32),  # the factorised embedding
        ("hidden", 64),
    ]


def test_pruned_albert_and_deberta_reload_exactly(tmp_path) -> None:  # noqa: ANN001
    for name, options in (
        ("hf.albert", dict(SMALL, embedding_size=32)),
        ("hf.deberta-v2", dict(DEBERTA, share_att_key=False)),
    ):
        model = create_model(name, task="sequence-classification", **options)
        before = count_macs(model, _ids()).dense
        prune_(model, StructuredConfig(ratio=0.5), example_inputs=_ids())
        assert count_macs(model, _ids()).dense < 0.6 * before
        path = save_model(model, tmp_path / f"{name}.safetensors")
        loaded = load_model(path).model
        assert torch.equal(_logits(loaded, _ids()), _logits(model, _ids()))


@pytest.mark.parametrize("share_att_key", [True, False])
def test_deberta_loses_heads_hidden_size_and_ffn_exactly(share_att_key: bool) -> None:
    """With ``share_att_key`` the relative position embeddings pass through each layer's own
    ``query_proj``/``key_proj``, so their columns are the hidden size; without it they feed
    ``pos_key_proj``/``pos_query_proj`` of every layer and are a width of their own."""
    model = _classifier("deberta-v2", **DEBERTA, share_att_key=share_att_key)
    groups = _silence_and_remove(model, _ids())
    kinds = sorted((g.kind, g.size) for g in groups)
    assert kinds.count(("head", 4)) == 2 and kinds.count(("hidden", 64)) == 1
    positions = [g for g in groups if "deberta.encoder.rel_embeddings" in g.module_names()]
    assert len(positions) == 1
    assert positions[0].kind == ("hidden" if share_att_key else "channel")

    model = _classifier("deberta-v2", **DEBERTA, share_att_key=share_att_key)
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_ids())
    assert result.refused == ()
    assert model.deberta.encoder.rel_embeddings.weight.shape[1] == 32
    assert model.deberta.encoder.layer[0].attention.self.num_attention_heads == 2
    longer = {"input_ids": torch.randint(1, 100, (3, 11))}  # another batch and length
    assert _logits(model, longer).shape == (3, 3)


def test_deberta_v1_biases_viewed_as_heads_lose_the_same_heads() -> None:
    """DeBERTa (v1) adds ``q_bias``/``v_bias`` after viewing them as ``(heads, head_dim)`` and
    permuting: each head index covers ``head_dim`` entries of the bias, which go with it."""
    model = _classifier("deberta", **SMALL, relative_attention=True, pos_att_type=["c2p", "p2c"])
    with torch.no_grad():  # non-zero biases: a wrongly sliced bias would move the logits
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_()
    groups = _silence_and_remove(model, _ids())
    assert [g.size for g in groups if g.kind == "head"] == [4, 4]
    attention = model.deberta.encoder.layer[0].attention.self
    assert attention.q_bias.shape == attention.v_bias.shape == (32,)
    assert attention.in_proj.out_features == 3 * 32


# -- found in review: cases the rules above must leave alone ---------------------------------
class _LearnedQueries(nn.Module):
    """An integer buffer of positions fed to an Embedding: not a source of channels."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("query_ids", torch.arange(6)[None])
        self.query, self.fc, self.head = nn.Embedding(6, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)) * self.query(self.query_ids).mean(1))


def test_an_integer_buffer_fed_to_an_embedding_is_never_pruned() -> None:
    model, x = _LearnedQueries().eval(), torch.randn(2, 4)
    graph = build_dependency_graph(model, x)
    assert not any(m.tensor == "query_ids" for g in graph.groups for m in g.members)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert torch.equal(model.query_ids, torch.arange(6)[None])


class _ShiftPerChannel(nn.Module):
    """``gather`` along time with a different shift for every channel."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b, t, c = h.shape
        shift = (torch.arange(t)[:, None] + torch.arange(c)[None, :]) % t
        return self.b(torch.relu(torch.gather(h, 1, shift.expand(b, t, c))))


def test_a_gather_whose_places_differ_per_channel_blocks_them() -> None:
    graph = build_dependency_graph(_ShiftPerChannel().eval(), torch.randn(2, 5, 4))
    assert not any("a" in g.producers() for g in graph.groups)
    assert any("gather" in reason for _, reason in graph.blocked)


class _NormTwice(nn.Module):
    """One LayerNorm on a pooled (B, C) tensor and on the (B, T, C) sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.ln, self.head = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.ln(self.fc(x).mean(1))
        return self.head(self.ln(self.fc(x))) + pooled[:, None, :3]


def test_a_norm_called_again_keeps_its_channels_on_the_axis_it_normalises() -> None:
    torch.manual_seed(0)
    model, x = _NormTwice().eval(), torch.randn(2, 5, 4)
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert model(x).shape == (2, 5, 3)
    if model.fc.out_features < 6:  # pruned: then every reader followed
        assert model.ln.normalized_shape == (model.fc.out_features,)
    assert result.refused == ()
