"""Channel rules that encoder-decoder transformers need, each on a minimal model: one weight
tied between two modules, one channel taken out for its shape only, and an attention mask that
is the same for every head (built from the head count, reused by the next layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from structured_helpers import assert_silenced_removal_exact


class _TiedEmbeddings(nn.Module):
    """An encoder and a decoder embedding, two modules holding one weight, in two branches
    that never meet: tied by the tensor alone."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Embedding(20, 8), nn.Embedding(20, 8)
        self.dec.weight = self.enc.weight
        self.enc_ffn, self.dec_ffn = nn.Linear(8, 8), nn.Linear(8, 8)
        self.enc_head, self.dec_head = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, d = self.enc(a), self.dec(b)
        return self.enc_head(e + self.enc_ffn(e)), self.dec_head(d + self.dec_ffn(d))


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 20, (2, 5), generator=gen), torch.randint(0, 20, (2, 4), generator=gen)


def test_modules_holding_one_weight_lose_the_same_channels() -> None:
    model = _TiedEmbeddings().eval()
    graph = build_dependency_graph(model, _ids())
    (group,) = [g for g in graph.groups if "enc" in g.module_names()]
    assert {"enc", "dec", "enc_head", "dec_head"} <= set(group.module_names())
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=_ids())
    assert result.refused == ()
    assert model.dec.weight is model.enc.weight and model.enc.weight.shape == (20, 4)
    assert [t.shape for t in model(*_ids())] == [(2, 5, 3), (2, 4, 3)]


class _Positions(nn.Embedding):
    """BART's learned positions: called on ``inputs_embeds[:, :, -1]``, reads only its shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.arange(x.shape[1], device=x.device))


class _OneChannel(nn.Module):
    def __init__(self, reads_values: bool) -> None:
        super().__init__()
        self.reads_values = reads_values
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.pos = _Positions(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        last = h[:, :, -1]
        h = h + self.pos(last)
        if self.reads_values:  # the last channel's values scale every channel
            h = h * last.mT.mT.unsqueeze(-1)
        return self.fc2(torch.relu(h))


def _tokens() -> torch.Tensor:
    return torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))


def test_a_channel_taken_for_its_shape_leaves_the_channels_prunable() -> None:
    model = _OneChannel(reads_values=False).eval()
    graph = build_dependency_graph(model, _tokens())
    assert [sorted(g.module_names()) for g in graph.groups] == [["fc1", "fc2", "pos"]]
    assert_silenced_removal_exact(model, _tokens(), skip=())
    model = _OneChannel(reads_values=False).eval()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=_tokens())
    assert model.pos.weight.shape == (6, 4) and model(_tokens()).shape == (2, 5, 2)


def test_a_channel_picked_inside_blocks_the_channels() -> None:
    """``h[:, :, 2]`` may not exist at a smaller width: only the first or last is taken."""

    class Third(_OneChannel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            return self.fc2(torch.relu(h + self.pos(h[:, :, 2])))

    graph = build_dependency_graph(Third(reads_values=False).eval(), _tokens())
    assert graph.groups == ()


def test_a_channel_whose_values_are_read_blocks_the_channels() -> None:
    graph = build_dependency_graph(_OneChannel(reads_values=True).eval(), _tokens())
    assert graph.groups == ()
    assert any("one channel's values are read by 'unsqueeze'" in why for _, why in graph.blocked)


class _Attention(nn.Module):
    def __init__(self, eager: bool, written: str = "", width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.eager, self.written, self.n_heads, self.head_dim = (
            eager,
            written,
            heads,
            width // heads,
        )
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None, per_head: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        if bias is None:
            if per_head:  # a value of its own for each head (ALiBi-like slopes)
                slopes = torch.arange(1.0, self.n_heads + 1).view(1, self.n_heads, 1, 1)
                bias = slopes * torch.ones(1, 1, n, n)
            else:  # T5's cross-attention: zeros shaped by the head count
                bias = torch.zeros((1, self.n_heads, n, n))
                if self.written == "setitem":  # the first head's bias made to differ
                    bias[:, 0] = 1.0
                elif self.written == "view":  # ... through a view
                    bias.select(1, 0).diagonal(dim1=-2, dim2=-1).fill_(5.0)
                elif self.written == "alias":  # ... through the tensor, its alias used
                    alias = bias.detach()
                    bias[:, 0, :, 0] = 5.0
                    bias = alias
            causal = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
            bias = torch.where(causal, bias, -1e4)
        # its head count read by another op, before or after the scores meet it
        counted = None
        if self.written == "summed":
            counted = bias.exp().sum(1).mean(-1)[..., None]
        elif self.written == "summed_transposed":  # through a property: bias.mT
            counted = bias.mT.exp().sum(1).mean(-1)[..., None]
        if self.eager:  # T5's eager attention: the bias is added to the scores
            scores = q @ k.transpose(-1, -2) / self.head_dim**0.5 + bias
            out = scores.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if self.written == "summed_after":
            counted = bias.exp().sum(1).mean(-1)[..., None]
        out = self.o(out.transpose(1, 2).reshape(b, n, -1))
        return (out if counted is None else out + counted), bias


class _TwoLayers(nn.Module):
    """The first layer builds the mask and hands it to the second, as T5's decoder does."""

    def __init__(self, per_head: bool, eager: bool = False, written: str = "") -> None:
        super().__init__()
        self.per_head = per_head
        self.layers = nn.ModuleList(_Attention(eager, written) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        for layer in self.layers:
            out, bias = layer(x, bias, self.per_head)
            x = x + out
        return self.head(x)


def _hidden() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_a_mask_the_same_for_every_head_follows_the_heads_of_each_layer_it_reaches(
    eager: bool,
) -> None:
    model = _TwoLayers(per_head=False, eager=eager).eval()
    graph = build_dependency_graph(model, _hidden())
    (heads,) = [g for g in graph.groups if g.kind == "head"]  # one mask: one head count
    assert {"layers.0.o", "layers.1.o"} <= set(heads.module_names())
    assert_silenced_removal_exact(model, _hidden())
    model = _TwoLayers(per_head=False, eager=eager).eval()
    prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=_hidden())
    assert model.layers[0].n_heads == 2  # read where the zeros are made (in layer 0 only)
    assert [layer.o.in_features for layer in model.layers] == [8, 8]
    assert model(_hidden()).shape == (2, 5, 3)


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_a_mask_with_a_value_per_head_keeps_the_heads(eager: bool) -> None:
    graph = build_dependency_graph(_TwoLayers(per_head=True, eager=eager).eval(), _hidden())
    assert not [g for g in graph.groups if g.kind == "head"]


@pytest.mark.parametrize("how", ["setitem", "view", "alias"])
def test_a_mask_written_into_after_it_was_made_keeps_the_heads(how: str) -> None:
    graph = build_dependency_graph(_TwoLayers(per_head=False, written=how).eval(), _hidden())
    assert not [g for g in graph.groups if g.kind == "head"]


@pytest.mark.parametrize(
    "when", ["summed", "summed_after", "summed_transposed"], ids=["before", "after", "mT"]
)
def test_a_mask_whose_head_count_another_op_reads_keeps_the_heads(when: str) -> None:
    """Its sum over the heads depends on how many there are: removing heads from the mask
    would change that sum, so the heads stay, whichever op meets the mask first."""
    graph = build_dependency_graph(_TwoLayers(per_head=False, written=when).eval(), _hidden())
    assert not [g for g in graph.groups if g.kind == "head"]
    assert any("a tensor made with their count is also read by" in why for _, why in graph.blocked)


class _Closure(nn.Module):
    """A function defined in forward reshapes with locals it reads from forward's shape
    unpacking; ``self.dim`` holds the same value but only scales."""

    def __init__(self) -> None:
        super().__init__()
        self.dim = 32
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        b, n, c = h.shape

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b * n, c)

        h = flat(h).view(b, n, -1)
        return self.fc2(torch.relu(h) * self.dim**-0.5)


def test_a_nested_function_rewrites_only_what_its_expression_names() -> None:
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    assert_silenced_removal_exact(_Closure().eval(), x, skip=())
    model = _Closure().eval()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert model.dim == 32 and model.fc1.out_features == 16


class _SinusoidalTable(nn.Module):
    """M2M100's positions: a buffer outside the saved state, rows picked by position ids
    computed from the tokens, viewed back with the width read off the table itself; the width
    it was built from stays as an attribute (the module would rebuild a longer table from it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embedding_dim = width
        angles = torch.arange(12.0)[:, None] / 10.0 ** (torch.arange(width) / width)
        self.register_buffer("weights", torch.sin(angles), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        positions = (ids.ne(0).long().cumsum(1) + 1) * ids.ne(0).long()
        picked = self.weights.index_select(0, positions.view(-1))
        return picked.view(b, t, self.weights.shape[-1]).detach()


class _WithTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(20, 8), _SinusoidalTable(8)
        self.ffn, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(ids)
        return self.head(h + torch.relu(self.ffn(h)))


def test_a_table_picked_by_computed_positions_loses_the_channels_and_keeps_its_width_attribute() -> (
    None
):
    ids, _ = _ids()
    model = _WithTable().eval()
    (group,) = [g for g in build_dependency_graph(model, ids).groups if "tok" in g.module_names()]
    assert "pos" in group.module_names()
    assert_silenced_removal_exact(_WithTable().eval(), ids)
    full = model.pos.weights.clone()
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=ids)
    assert model.tok.weight.shape == (20, 4) and model(ids).shape == (2, 5, 3)
    # the kept channels of the very table the model was built with; the width it would be
    # rebuilt from is not rewritten (a narrower sinusoid would hold other values)
    columns = model.pos.weights.T.tolist()
    assert len(columns) == 4 and all(c in full.T.tolist() for c in columns)
    assert model.pos.embedding_dim == 8
    # the table stays out of the saved state; the indices it keeps are recorded instead
    assert "pos.weights" not in model.state_dict()
    (kept,) = model.secateur_buffer_slices["pos.weights"].values()
    assert torch.equal(model.pos.weights, full[:, kept])


class _TableAlsoIndexedByColumn(_WithTable):
    """The same table read again at two fixed columns: after pruning they would be others."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        columns = self.pos.weights.index_select(1, torch.tensor([0, 3]))
        return super().forward(ids) + columns.sum()


def test_a_table_also_indexed_along_its_channels_keeps_them() -> None:
    ids, _ = _ids()
    graph = build_dependency_graph(_TableAlsoIndexedByColumn().eval(), ids)
    assert not [g for g in graph.groups if "tok" in g.module_names()]
    assert any("fixed indices" in reason for _, reason in graph.blocked)


class _RowsPickedByChannels(nn.Module):
    """Index values computed from a layer's channels pick rows of a table (``index_select`` or
    ``table[ids]``): those channels' values matter one by one, so they stay."""

    def __init__(self, by_getitem: bool) -> None:
        super().__init__()
        self.by_getitem = by_getitem
        self.conv, self.table = nn.Conv1d(4, 8, 1), nn.Parameter(torch.randn(2, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picks = torch.relu(self.conv(x)).clamp(0, 1).to(torch.long).view(-1)
        rows = self.table[picks] if self.by_getitem else self.table.index_select(0, picks)
        return self.head(rows).mean(0)


@pytest.mark.parametrize("by_getitem", [False, True])
def test_index_values_computed_from_channels_keep_those_channels(by_getitem: bool) -> None:
    x = 3 * torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(_RowsPickedByChannels(by_getitem).eval(), x)
    assert not [g for g in graph.groups if "conv" in g.module_names()]
