"""Width attributes beyond the module's own ints: counts read from a shared config (Phi-3),
head counts times the head size, key/value head counts (Falcon) and multi-query groups
(GPT-BigCode); the graph rules those models needed (list indexing, broadcast_to, a view that
drops a size-1 axis, Bloom's attention output arriving on another axis)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph import build_dependency_graph
from secateur.graph._shapes import drop_ones, index_axes
from secateur.pruning import StructuredConfig, prune_
from secateur.pruning._structured import apply_removals_
from secateur.pruning._width_attributes import ConfigView, shared_config
from structured_helpers import silence_

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=32,
)


def _build(family: str, **kwargs: object) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = transformers.AutoConfig.for_model(family, vocab_size=100, **kwargs)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def _logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


# -- ConfigView ------------------------------------------------------------------------------
def test_config_view_reads_its_own_counts_and_everything_else_from_the_shared_config() -> None:
    shared = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, window=None)
    view = ConfigView(shared, {"num_attention_heads": 4})
    assert (view.num_attention_heads, view.num_key_value_heads) == (4, 2)
    shared.window = 128  # a later change to the shared config reaches the view
    assert view.window == 128
    view.window = 64  # and a write through the view goes to the shared config
    assert shared.window == 64
    view.num_attention_heads = 2  # except for its own counts
    assert (view.num_attention_heads, shared.num_attention_heads) == (2, 8)
    with pytest.raises(AttributeError):
        _ = view.no_such_field


def test_a_view_of_a_view_reads_through_to_the_shared_config() -> None:
    shared = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2)
    inner = ConfigView(shared, {"num_attention_heads": 4})
    outer = ConfigView(inner, {"num_key_value_heads": 1})
    assert shared_config(outer) is shared
    assert (outer.num_attention_heads, outer.num_key_value_heads) == (4, 1)
    assert "num_attention_heads=4" in repr(outer)


def test_a_copied_view_owns_its_counts_and_to_dict_shows_them() -> None:
    shared = transformers.AutoConfig.for_model("phi3", **SMALL)
    view = ConfigView(shared, {"num_attention_heads": 2})
    twin = copy.copy(view)
    twin.num_attention_heads = 1
    assert (view.num_attention_heads, twin.num_attention_heads) == (2, 1)
    assert view.to_dict()["num_attention_heads"] == 2
    assert view.to_dict()["hidden_size"] == shared.hidden_size == 64
    half_built = ConfigView.__new__(ConfigView)  # as copy and pickle create it
    assert not hasattr(half_built, "num_attention_heads")


def test_views_survive_deepcopy_and_keep_sharing_the_copied_config() -> None:
    model, x = _build("phi3", **SMALL, num_key_value_heads=2)
    prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    twin = copy.deepcopy(model)
    views = [layer.self_attn.config for layer in twin.model.layers]
    assert all(isinstance(v, ConfigView) for v in views)
    assert all(shared_config(v) is twin.config for v in views)  # the copy's, not the original's
    assert torch.equal(_logits(twin, x), _logits(model, x))


# -- Phi-3: slice bounds from the shared config -----------------------------------------------
def test_phi3_heads_go_and_each_layer_gets_its_own_count() -> None:
    model, x = _build("phi3", **SMALL, num_key_value_heads=2)
    result = prune_(
        model,
        StructuredConfig(ratio=0.5, kinds=("head",), per_layer={"model.layers.1.*": 0.0}),
        example_inputs=x,
    )
    assert result.refused == ()
    first, second = (layer.self_attn for layer in model.model.layers)
    assert model.config.num_attention_heads == 4  # the shared config is left alone
    assert (first.config.num_attention_heads, first.num_key_value_heads) == (2, 1)
    assert not isinstance(second.config, ConfigView)  # untouched layer: nothing of its own
    assert first.qkv_proj.out_features == (2 + 1 + 1) * first.head_dim
    edits = model.secateur_attributes["model.layers.0.self_attn"]
    assert edits["config.num_attention_heads"] == 2
    assert edits["num_key_value_heads"] == 1


def test_phi3_pruned_under_sdpa_runs_under_eager_attention() -> None:
    """Switching the attention implementation writes the shared config; the layers' views read
    it through, so the pruned model follows."""
    model, x = _build("phi3", **SMALL, num_key_value_heads=2)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    sdpa = _logits(model, x)
    model.set_attn_implementation("eager")
    assert model.model.layers[0].self_attn.config._attn_implementation == "eager"
    torch.testing.assert_close(_logits(model, x), sdpa, atol=1e-5, rtol=1e-4)


class _Attention(nn.Module):
    """Hand-written attention with a config that is a plain dict."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"dropout": 0.0}
        self.num_heads, self.head_dim = 4, 4
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            self.qkv(x).view(b, t, 3 * self.num_heads, self.head_dim).transpose(1, 2).chunk(3, 1)
        )
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.config["dropout"])
        return self.out(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def test_a_config_that_is_a_dict_is_left_alone() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(_Attention()).eval(), torch.randn(2, 5, 16)
    result = prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    assert result.refused == ()
    assert (model[0].num_heads, model[0].config) == (2, {"dropout": 0.0})
    assert model(x).shape == (2, 5, 16)


class _TokenMixer(nn.Module):
    """MLP-Mixer's token mixing: a Linear across tokens, with the channels on another axis."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.token_mix = nn.Linear(6, 12, bias=False)
        self.token_back = nn.Linear(12, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (batch, 6 tokens, 8 channels)
        mixed = self.token_back(F.gelu(self.token_mix(h.transpose(1, 2)))).transpose(1, 2)
        return self.head((h + mixed).mean(1))


def test_a_linear_across_tokens_leaves_the_channels_to_pass_through() -> None:
    """Each channel's tokens are mixed on their own, so the channels (8) go on through the
    token Linears to the head; the token count and the token MLP's width stay. (Without
    biases: a bias would give a silenced channel values again, see the next test.)"""
    torch.manual_seed(0)
    model, x = _TokenMixer().eval(), torch.randn(2, 6, 4)
    graph = build_dependency_graph(model, x)
    (group,) = graph.groups
    assert group.size == 8 and group.module_names() == ["embed", "head"]
    units = torch.tensor([0, 5, 7])
    silence_(model, group, units)
    with torch.no_grad():
        expected = model(x)
    apply_removals_(model, graph, [(group, units)])
    assert model.embed.out_features == 5 and model.token_mix.out_features == 12
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_a_biased_linear_across_tokens_makes_the_channels_inexact_to_remove() -> None:
    model = _TokenMixer().eval()
    model.token_mix = nn.Linear(6, 12)
    (group,) = build_dependency_graph(model, torch.randn(2, 6, 4)).groups
    assert group.kind == "hidden"  # like channels under a norm: removal is not exact


# -- Falcon, GPT-BigCode, Bloom --------------------------------------------------------------
def test_falcon_kv_groups_go_with_their_query_heads() -> None:
    model, x = _build("falcon", **SMALL, new_decoder_architecture=True, num_kv_heads=2)
    graph = build_dependency_graph(model, x)
    heads = [g for g in graph.groups if g.kind == "head"]
    assert [(g.size, g.shared_kv) for g in heads] == [(2, False), (2, False)]
    prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    attn = model.transformer.h[0].self_attention
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert attn.query_key_value.out_features == (2 + 2 * 1) * attn.head_dim
    assert _logits(model, x).shape == (3, 8, 100)


class _GroupedByMinusOne(nn.Module):
    """transformers 5.25's Falcon: each key/value group's query heads, key and value packed
    together, viewed by ``num_kv_heads`` and ``-1``; ``num_heads`` is set but never read."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = 4, 2, 4
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.qkv = nn.Linear(8, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)
        self.o = nn.Linear(self.num_heads * self.head_dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        grouped = self.qkv(x).view(b, t, self.num_kv_heads, -1, self.head_dim)
        q, k, v = grouped[..., :-2, :], grouped[..., -2:-1, :], grouped[..., -1:, :]
        out = (q * k).softmax(-1) * v  # every query head of a group meets its key and value
        return self.o(out.flatten(2))


def test_an_unread_query_head_count_follows_the_kept_key_value_groups() -> None:
    model, x = _GroupedByMinusOne(), torch.randn(2, 3, 8)
    prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    assert (model.num_kv_heads, model.num_heads, model.num_key_value_groups) == (1, 2, 2)
    assert model.secateur_attributes[""] == {"num_kv_heads": 1, "num_heads": 2}
    assert model.o.in_features == 2 * 4 and model(x).shape == (2, 3, 8)


class _SizedByDHead(nn.Module):
    """Funnel's and XLNet's naming: ``n_head`` heads of ``d_head`` each, viewed by ``-1``."""

    def __init__(self) -> None:
        super().__init__()
        self.n_head, self.d_head = 4, 8
        self.q, self.k, self.v = (nn.Linear(8, 32) for _ in range(3))
        self.o = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2) * self.d_head**-0.5).softmax(-1)
        return self.o((scores @ v).transpose(1, 2).reshape(b, t, -1))


def test_a_size_inside_a_head_named_like_a_count_stays() -> None:
    model, x = _SizedByDHead(), torch.randn(2, 3, 8)
    prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    assert (model.n_head, model.d_head, model.o.in_features) == (2, 8, 16)


class _RepeatedKV(nn.Module):
    """``num_kv_heads`` read in a view, ``num_heads`` only in the query-per-kv ratio."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = 8, 4, 4
        self.q, self.k = nn.Linear(16, 32), nn.Linear(16, 16)
        self.o = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        k = self.k(x).view(b, t, self.num_kv_heads, self.head_dim)
        q = self.q(x).view(b, t, -1, self.head_dim)
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)
        return self.o((q * k).softmax(-1).flatten(2))


def test_head_counts_follow_each_round_of_pruning() -> None:
    model, x = _RepeatedKV(), torch.randn(2, 3, 16)
    for heads, kv in ((4, 2), (2, 1)):
        result = prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
        assert not result.refused
        assert (model.num_heads, model.num_kv_heads, model.q.out_features) == (heads, kv, 4 * heads)
        assert model.secateur_attributes[""] == {"num_kv_heads": kv, "num_heads": heads}


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_gpt_bigcode_multi_query_heads_go_alone(implementation: str) -> None:
    """One key/value head serves every query head: the query heads are the units, the shared
    head stays whole, and ``num_key_value_groups`` (read by HF's attention functions) follows,
    so the model also runs under the other implementation."""
    model, x = _build("gpt_bigcode", n_embd=64, n_layer=2, n_head=4, n_positions=32)
    model.set_attn_implementation(implementation)
    graph = build_dependency_graph(model, x)
    heads = [g for g in graph.groups if g.kind == "head"]
    assert [(g.size, g.shared_kv) for g in heads] == [(4, True), (4, True)]
    assert any("shared by every query head" in reason for _, reason in graph.blocked)
    prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    attn = model.transformer.h[0].attn
    assert (attn.num_heads, attn.embed_dim, attn.num_key_value_groups) == (2, 32, 2)
    assert attn.c_attn.out_features == 32 + 2 * attn.head_dim  # queries, one k and one v head
    reference = _logits(model, x)
    model.set_attn_implementation("eager" if implementation == "sdpa" else "sdpa")
    torch.testing.assert_close(_logits(model, x), reference, atol=1e-5, rtol=1e-4)


def test_bloom_hidden_size_goes_while_alibi_keeps_its_heads() -> None:
    """Bloom's ALiBi biases are built per head for the whole model, so its heads stay; its
    attention output reaches ``dense`` with the heads merged into the batch axis, which must
    not block the hidden size."""
    model, x = _build("bloom", hidden_size=64, n_layer=2, n_head=4)
    graph = build_dependency_graph(model, x)
    assert [g.kind for g in graph.groups].count("hidden") == 1
    assert "head" not in [g.kind for g in graph.groups]
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert model.transformer.word_embeddings.embedding_dim == 32
    assert model.transformer.h[0].self_attention.query_key_value.out_features == 192
    with torch.no_grad():
        ids = model.generate(x["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 11)


# -- shape rules ------------------------------------------------------------------------------
def test_one_list_index_keeps_its_axis_in_place() -> None:
    shape = (2, 3, 4, 5)
    assert index_axes(shape, (slice(None), slice(None), [-2])) == [
        (0, slice(None)),
        (1, slice(None)),
        (2, [-2]),
        (3, slice(None)),
    ]
    x = torch.zeros(shape)
    assert x[:, :, [-2]].shape == (2, 3, 1, 5)  # what the rule claims, checked against torch
    assert index_axes(shape, ([0], [1])) is None  # several lists: torch moves the axes
    assert index_axes(shape, (0, slice(None), [1])) is None  # an int beside a list, likewise
    assert index_axes(shape, ([True, False],)) is None


def test_drop_ones_gives_the_squeezed_shape_and_the_axis() -> None:
    assert drop_ones((2, 1, 12, 64), 3) == ((2, 12, 64), 2)
    assert drop_ones((2, 1, 12), 1) is None  # the tracked axis itself stays
    assert drop_ones((2, 12, 64), 2) is None


class _PackedHeads(nn.Module):
    """q, k and v packed as ``(3, heads, head_dim)`` and picked by ``unbind`` or an index."""

    def __init__(self, pick: str) -> None:
        super().__init__()
        self.pick, self.heads, self.head_dim = pick, 4, 4
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.pick == "spelled":  # the head count written in the view, the length as -1
            packed = self.qkv(x).view(b, -1, 3, self.heads, self.head_dim)
        else:
            packed = self.qkv(x).view(b, t, 3, -1, self.head_dim)
        if self.pick in ("unbind", "spelled"):
            q, k, v = packed.unbind(dim=2)
        else:
            q, k, v = packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("pick", ["unbind", "index", "spelled"])
def test_packed_q_k_v_heads_are_whole_units(pick: str) -> None:
    """The view's outer axis selects q, k or v: a unit is one head of each (rows h, 16 + h
    and 32 + h of the packed projection, head_dim wide), so removal is exact."""
    torch.manual_seed(0)
    model, x = _PackedHeads(pick).eval(), torch.randn(2, 5, 16)
    graph = build_dependency_graph(model, x)
    (heads,) = [g for g in graph.groups if g.kind == "head"]
    assert heads.size == 4
    offsets = sorted(m.offset for m in heads.members if m.module_name == "qkv")
    assert offsets == [0, 16, 32]
    units = torch.tensor([1, 3])
    silence_(model, heads, units)
    with torch.no_grad():
        expected = model(x)
    apply_removals_(model, graph, [(heads, units)])
    assert model.qkv.out_features == 24 and model.out.in_features == 8
    assert model.heads == 2  # the view reads it (spelled), or the head count follows anyway
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_a_three_axis_view_read_otherwise_keeps_its_outer_axis_as_the_unit() -> None:
    """Falcon's reading: (groups, members, head_dim) with each group a unit; a sum over the
    members settles the view that way."""

    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.out = nn.Linear(8, 24), nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            g = self.proj(x).view(b, t, -1, 3, 4).sum(dim=3)  # (b, t, groups, 4)
            return self.out(g.mean(dim=2))

    model, x = Grouped().eval(), torch.randn(2, 3, 8)
    graph = build_dependency_graph(model, x)
    (group,) = [g for g in graph.groups if "proj" in g.producers()]
    # whole groups are the units; the mean over them pools them, so the kind is "hidden"
    assert group.size == 2 and group.kind == "hidden"
    assert [m.factor for m in group.members if m.module_name == "proj"] == [12]
