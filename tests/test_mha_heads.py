"""Whole heads of ``nn.MultiheadAttention``: the decoupled subclass matches torch's module, head
groups in the graph, exact removal of silenced heads, hidden pruning that leaves heads alone,
optimizer state, TransformerEncoderLayer, torchvision's ViT and reloading from the manifest."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

from secateur import ArtifactError, ConfigError, StructuredConfig, load_model, prune_, save_model
from secateur.export._safetensors import apply_edits_, model_edits
from secateur.graph import build_dependency_graph
from secateur.measure import count_params
from secateur.pruning import PrunedMultiheadAttention
from secateur.pruning._attention import decouple_heads_
from secateur.pruning._surgery import remove_units_, resize_to_state_

DIM, HEADS, HEAD_DIM = 32, 4, 8


class Block(nn.Module):
    def __init__(self, batch_first: bool, **mha: object) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first, **mha)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = self.ln(h)
        h = h + self.attn(y, y, y, key_padding_mask=mask, need_weights=False)[0]
        return h + self.mlp(h)


class Net(nn.Module):
    """Two attention blocks over ``(N, L, 12)`` (``batch_first``) or ``(L, N, 12)`` tokens."""

    def __init__(self, batch_first: bool = True, **mha: object) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(12, DIM)
        self.blocks = nn.ModuleList([Block(batch_first, **mha) for _ in range(2)])
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(h[:, 0] if self.batch_first else h[0])


def _inputs(batch_first: bool, mask: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 5, 12) if batch_first else (5, 2, 12), generator=g)
    if not mask:
        return (x,)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True  # the second sequence is two tokens shorter
    return x, padding


def _net(batch_first: bool = True, **mha: object) -> Net:
    torch.manual_seed(0)
    net = Net(batch_first, **mha).eval()
    with torch.no_grad():  # torch initialises these biases to zero; make them matter
        for block in net.blocks:
            for p in (block.attn.in_proj_bias, block.attn.out_proj.bias):
                if p is not None:
                    p.normal_(0, 0.5)
    return net


def _heads(graph) -> list:  # noqa: ANN001
    return [g for g in graph.groups if g.kind == "head"]


# -- the subclass ---------------------------------------------------------------------------
def _masks(batched: bool, n: int, length: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    padding = torch.zeros(n, length, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    per_head = torch.randn(n * HEADS if batched else HEADS, length, length, generator=g)
    return [
        {},
        {"key_padding_mask": padding if batched else padding[0]},
        {"key_padding_mask": (padding if batched else padding[0]).float() * -1e4},
        {"attn_mask": torch.randn(length, length, generator=g)},
        {"attn_mask": per_head},
        {"attn_mask": causal, "is_causal": True},
        {"attn_mask": causal, "key_padding_mask": padding if batched else padding[0]},
    ]


@pytest.mark.parametrize(
    ("batch_first", "bias", "add_bias_kv", "add_zero_attn"),
    list(itertools.product([True, False], repeat=4)),
)
def test_unpruned_subclass_matches_torch(
    batch_first: bool, bias: bool, add_bias_kv: bool, add_zero_attn: bool
) -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(
        DIM,
        HEADS,
        bias=bias,
        add_bias_kv=add_bias_kv,
        add_zero_attn=add_zero_attn,
        batch_first=batch_first,
    ).eval()
    if bias:
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = decouple_heads_(copy.deepcopy(ref))
    assert type(ours) is PrunedMultiheadAttention and ours.inner_dim == DIM
    n, length = 2, 6
    g = torch.Generator().manual_seed(2)
    for batched, cross in itertools.product([True, False], [False, True]):
        shape = (
            ((n, length, DIM) if batch_first else (length, n, DIM)) if batched else (length, DIM)
        )
        q = torch.randn(shape, generator=g)
        k = torch.randn(shape, generator=g) if cross else q
        for mask, need_weights, average in itertools.product(
            _masks(batched, n, length), [True, False], [True, False]
        ):
            kwargs = {"need_weights": need_weights, "average_attn_weights": average, **mask}
            with torch.no_grad():
                want, want_w = ref(q, k, k, **kwargs)
                got, got_w = ours(q, k, k, **kwargs)
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-6, rtol=0)
            if need_weights:
                assert got_w.shape == want_w.shape
                assert torch.allclose(got_w, want_w, atol=1e-6, rtol=0)
            else:
                assert got_w is None and want_w is None


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_mode_matches_torch(need_weights: bool) -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(DIM, HEADS, dropout=0.5, batch_first=True).train()
    ours = decouple_heads_(copy.deepcopy(ref))
    x = torch.randn(2, 6, DIM)
    torch.manual_seed(7)
    want = ref(x, x, x, need_weights=need_weights)
    torch.manual_seed(7)
    got = ours(x, x, x, need_weights=need_weights)
    assert torch.allclose(got[0], want[0], atol=1e-6, rtol=0)
    ours.eval()
    assert not torch.allclose(ours(x, x, x)[0], got[0])  # dropout did act in training mode


def test_unsupported_modules_and_inputs_are_refused_in_one_line() -> None:
    separate = nn.MultiheadAttention(DIM, HEADS, kdim=16, vdim=16)
    with pytest.raises(ConfigError, match="kdim/vdim") as info:
        decouple_heads_(separate)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="kdim/vdim"):
        PrunedMultiheadAttention(DIM, HEADS, kdim=16)
    attn = decouple_heads_(nn.MultiheadAttention(DIM, HEADS, batch_first=True))
    x = torch.randn(2, 5, DIM)
    with pytest.raises(ConfigError, match="attn_mask has shape"):
        attn(x, x, x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(ConfigError, match="is_causal"):
        attn(x, x, x, is_causal=True)
    with pytest.raises(ConfigError, match="features"):
        attn(x[..., :16], x[..., :16], x[..., :16])

    class Cross(nn.Module):  # separate q/k/v weights: the graph leaves the heads alone
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, DIM)
            self.kv = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(DIM, HEADS, kdim=16, vdim=16, batch_first=True)
            self.out = nn.Linear(DIM, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kv = self.kv(x)
            return self.out(self.attn(self.q(x), kv, kv)[0])

    graph = build_dependency_graph(Cross(), torch.randn(2, 5, 8))
    assert not _heads(graph)
    assert {names for names, why in graph.blocked if why == "attention attn unsupported"} == {
        "q",
        "kv",
    }


# -- the graph ------------------------------------------------------------------------------
def test_head_group_holds_qkv_rows_out_columns_and_kv_biases() -> None:
    net, (x,) = _net(add_bias_kv=True), _inputs(True)
    graph = build_dependency_graph(net, x)
    heads = _heads(graph)
    assert len(heads) == 2 and all(g.size == HEADS and g.multiple == 1 for g in heads)
    slices = {
        (m.module_name, m.tensor or m.role, m.dim, m.offset, m.factor) for m in heads[0].members
    }
    name = "blocks.0.attn"
    assert slices == {
        *((name, "in_proj_weight", 0, k * DIM, HEAD_DIM) for k in range(3)),
        *((name, "in_proj_bias", 0, k * DIM, HEAD_DIM) for k in range(3)),
        (name, "bias_k", 2, 0, HEAD_DIM),
        (name, "bias_v", 2, 0, HEAD_DIM),
        (f"{name}.out_proj", "linear_in", 0, 0, HEAD_DIM),
    }
    hidden = next(g for g in graph.groups if g.kind == "hidden")
    assert hidden.multiple == 1  # the hidden size no longer moves in steps of num_heads
    assert any(m.tensor == "in_proj_weight" and m.dim == 1 for m in hidden.members)


# -- surgery --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("batch_first", "mha"),
    [
        (True, {}),
        (False, {}),
        (True, {"add_bias_kv": True, "add_zero_attn": True}),
        (False, {"bias": False}),
    ],
    ids=["batch-first", "seq-first", "bias-kv-zero-attn", "no-bias"],
)
def test_removing_silenced_heads_keeps_outputs(batch_first: bool, mha: dict) -> None:
    net = _net(batch_first, **mha)
    inputs = _inputs(batch_first, mask=True)
    graph = build_dependency_graph(net, inputs)
    gen = torch.Generator().manual_seed(0)
    removals = []
    for group in _heads(graph):
        units = torch.randperm(HEADS, generator=gen)[
            : int(torch.randint(1, HEADS, (1,), generator=gen))
        ]
        attn = net.get_submodule(group.members[0].module_name)
        with torch.no_grad():  # a head whose out_proj columns are zero has no influence
            for h in units.tolist():
                attn.out_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
        removals.append((group, units))
    expected = net(*inputs)
    remove_units_(net, removals)
    for block, (_, units) in zip(net.blocks, removals, strict=True):
        attn = block.attn
        assert type(attn) is PrunedMultiheadAttention
        assert attn.num_heads == HEADS - len(units) and attn.head_dim == HEAD_DIM
        assert attn.in_proj_weight.shape == (3 * attn.num_heads * HEAD_DIM, DIM)
        assert attn.out_proj.weight.shape == (DIM, attn.num_heads * HEAD_DIM)
        if attn.bias_k is not None:
            assert attn.bias_k.shape == attn.bias_v.shape == (1, 1, attn.num_heads * HEAD_DIM)
    assert torch.allclose(net(*inputs), expected, atol=1e-5, rtol=1e-5)


def test_ratio_zero_leaves_outputs_identical() -> None:
    net, inputs = _net(), _inputs(True, mask=True)
    before = net(*inputs)
    result = prune_(net, StructuredConfig(ratio=0.0), example_inputs=inputs)
    assert result.removed_units == 0
    assert torch.equal(net(*inputs), before)


def _projection_macs(model: nn.Module) -> int:
    """Per-token MACs of the q/k/v and out projections (count_macs sees only Linear modules)."""
    return sum(
        m.in_proj_weight.numel() + m.out_proj.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
    )


def test_head_pruning_keeps_head_dim_and_lowers_heads_and_cost() -> None:
    net, inputs = _net(), _inputs(True, mask=True)
    params, macs = count_params(net)[0], _projection_macs(net)
    result = prune_(net, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=inputs)
    assert sorted(result.widths) == [(HEADS, 2), (HEADS, 2)]
    for block in net.blocks:
        attn = block.attn
        assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, HEAD_DIM, DIM)
        assert attn.in_proj_weight.shape == (3 * 2 * HEAD_DIM, DIM)
        assert attn.out_proj.in_features == 2 * HEAD_DIM and attn.out_proj.out_features == DIM
    assert count_params(net)[0] < params and _projection_macs(net) < macs
    assert net(*inputs).shape == (2, 3)


def test_hidden_pruning_leaves_the_heads_whole() -> None:
    net, inputs = _net(), _inputs(True)
    result = prune_(net, StructuredConfig(ratio=0.3, kinds=("hidden",)), example_inputs=inputs)
    assert result.removed_units > 0
    for block in net.blocks:
        attn = block.attn
        width = net.embed.out_features
        assert width < DIM and attn.embed_dim == width  # any width: no multiple of num_heads
        assert (attn.num_heads, attn.head_dim) == (HEADS, HEAD_DIM)
        assert attn.in_proj_weight.shape == (3 * DIM, width)
        assert attn.out_proj.weight.shape == (width, DIM)
    assert net(*inputs).shape == (2, 3)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_at_least_one_head_is_kept(scope: str) -> None:
    net, inputs = _net(), _inputs(True)
    config = StructuredConfig(ratio=0.99, kinds=("head",), scope=scope, max_ratio=0.99)
    prune_(net, config, example_inputs=inputs)
    assert all(block.attn.num_heads >= 1 for block in net.blocks)
    assert net(*inputs).isfinite().all()


def test_a_pruned_module_prunes_again() -> None:
    net, inputs = _net(), _inputs(True)
    prune_(net, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=inputs)
    graph = build_dependency_graph(net, inputs)  # the subclass is traced whole too
    assert sorted(g.size for g in _heads(graph)) == [2, 2]
    prune_(net, StructuredConfig(ratio=0.5), example_inputs=inputs)
    assert all(block.attn.num_heads == 1 for block in net.blocks)
    assert net(*inputs).shape == (2, 3)


@pytest.mark.parametrize("criterion", ["taylor", "activation", "wanda"])
def test_data_criteria_rank_heads(criterion: str) -> None:
    net, (x, mask) = _net(), _inputs(True, mask=True)
    batches = [((x, mask), torch.tensor([0, 2]))]
    prune_(
        net,
        StructuredConfig(ratio=0.5, criterion=criterion),
        example_inputs=(x, mask),
        calibration=batches,
    )
    assert all(block.attn.num_heads == 2 for block in net.blocks)
    assert net(x, mask).isfinite().all()


def test_optimizer_state_is_sliced_with_the_heads() -> None:
    net, inputs = _net(), _inputs(True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    nn.functional.cross_entropy(net(*inputs), torch.tensor([0, 1])).backward()
    opt.step()
    attn = net.blocks[0].attn
    before = opt.state[attn.in_proj_weight]["exp_avg"].clone()
    result = prune_(
        net, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=inputs, optimizer=opt
    )
    assert result.removed_units == 4
    state = opt.state[attn.in_proj_weight]
    assert state["exp_avg"].shape == attn.in_proj_weight.shape == (3 * 2 * HEAD_DIM, DIM)
    rows = [r for r in before]
    assert all(any(torch.equal(row, r) for r in rows) for row in state["exp_avg"])
    assert opt.state[attn.out_proj.weight]["exp_avg"].shape == (DIM, 2 * HEAD_DIM)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in params for p in net.parameters())
    net.zero_grad()
    nn.functional.cross_entropy(net(*inputs), torch.tensor([0, 1])).backward()
    opt.step()  # the optimizer runs on the pruned model


def test_transformer_encoder_layer_prunes_heads_without_its_fused_kernel() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(12, DIM), layer, nn.Linear(DIM, 3)).eval()
    x = torch.randn(2, 5, 12)
    result = prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    assert not result.refused and layer.self_attn.num_heads == 2
    with torch.no_grad():  # eval + no_grad is when torch would pick the fused kernel
        fast = model(x)
    assert torch.allclose(fast, model(x), atol=1e-6)


# -- torchvision ViT and reloading ----------------------------------------------------------
torchvision = pytest.importorskip("torchvision")


def _tiny_vit(*_: object, **__: object) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )
    model.secateur_spec = {"name": "torchvision.vit_tiny", "kwargs": {}}
    return model.eval()


def test_tiny_vit_prunes_heads_and_reloads(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from secateur.export import _safetensors

    # the zoo's vit_b_16 fixes its depth and width; a tiny ViT keeps this test fast
    monkeypatch.setattr(_safetensors, "create_model", _tiny_vit)
    model, x = _tiny_vit(), torch.randn(2, 3, 32, 32)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    attns = [layer.self_attention for layer in model.encoder.layers]
    assert all(type(a) is PrunedMultiheadAttention and a.num_heads == 2 for a in attns)
    assert all(a.head_dim == 16 and a.embed_dim == 32 for a in attns)
    expected = model(x)
    assert expected.shape == (2, 10)
    path = save_model(model, tmp_path / "vit.safetensors")
    manifest = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert manifest["edits"]["attention"] == {
        f"encoder.layers.encoder_layer_{i}.self_attention": {"num_heads": 2} for i in range(2)
    }
    loaded = load_model(path).model
    layer = loaded.encoder.layers[0].self_attention
    assert type(layer) is PrunedMultiheadAttention and layer.num_heads == 2
    assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"blocks.0.attn": {"num_heads": 0}}, "between 1 and 4"),
        ({"blocks.0.attn": {"num_heads": 5}}, "between 1 and 4"),
        ({"blocks.0.attn": {"num_heads": "2"}}, "integer"),
        ({"blocks.0.attn": {"num_heads": True}}, "integer"),
        ({"blocks.0.attn": {"num_heads": 2, "head_dim": 4}}, "exactly 'num_heads'"),
        ({"blocks.9.attn": {"num_heads": 2}}, "does not exist"),
        ({"blocks.0.mlp": {"num_heads": 2}}, "not an nn.MultiheadAttention"),
        ({"blocks.0.attn": 2}, "must map"),
        ([], "must map"),
    ],
)
def test_attention_edits_are_validated(entry: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_edits_(_net(), {"attention": entry})


def test_attention_edit_rebuilds_the_module_and_a_wrong_one_fails_to_load(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, inputs = _net(), _inputs(True)
    prune_(net, StructuredConfig(ratio=0.5), example_inputs=inputs)
    edits = json.loads(json.dumps(model_edits(net)))
    fresh = _net()
    apply_edits_(fresh, edits)
    state = net.state_dict()
    resize_to_state_(fresh, state)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(*inputs), net(*inputs))

    from secateur.export import _safetensors

    monkeypatch.setattr(_safetensors, "create_model", _tiny_vit)
    model = _tiny_vit()
    prune_(
        model,
        StructuredConfig(ratio=0.5, kinds=("head",)),
        example_inputs=torch.randn(1, 3, 32, 32),
    )
    path = save_model(model, tmp_path / "vit.safetensors")
    manifest_path = path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["edits"]["attention"]["encoder.layers.encoder_layer_0.self_attention"]["num_heads"] = 3
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="does not fit its model"):
        load_model(path)


@pytest.mark.slow
def test_zoo_vit_b_16_pruned_saves_and_reloads(tmp_path) -> None:
    from secateur import create_model

    torch.manual_seed(0)
    model = create_model("torchvision.vit_b_16", image_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert all(layer.self_attention.num_heads == 6 for layer in model.encoder.layers)
    loaded = load_model(save_model(model, tmp_path / "vit.safetensors")).model
    assert torch.equal(loaded(x), model(x))


class FirstLayer(nn.Module):
    """Attention reading the model input itself: a 3-D input is tracked on axis 1 (as images
    are), so its features are fixed, and the heads inside may still go."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_heads_go_when_attention_reads_the_model_input() -> None:
    torch.manual_seed(0)
    model, x = FirstLayer().eval(), torch.randn(2, 5, DIM)
    graph = build_dependency_graph(model, x)
    assert [g.kind for g in graph.groups if "attn" in g.producers()] == ["head"]
    result = prune_(model, StructuredConfig(ratio=0.5, kinds=("head",)), example_inputs=x)
    assert result.widths == ((HEADS, HEADS // 2),) and model.attn.num_heads == HEADS // 2
    assert model(torch.randn(3, 7, DIM)).shape == (3, 3)
