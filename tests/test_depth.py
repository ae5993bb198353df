"""Depth pruning: discovery of residual blocks, influence order, Skip, and save/load of skips."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from secateur import ArtifactError, ConfigError, create_model, load_model, prune_, save_model
from secateur.measure import count_macs
from secateur.pruning import DepthConfig, DepthResult, Skip


class ResMLP(nn.Module):
    """``x + fc2(relu(fc1(x)))``: a pre-activation residual block."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResConv(nn.Module):
    """``x + conv2(relu(bn(conv1(x))))``, channels kept."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


def _mlp() -> tuple[nn.Module, torch.Tensor, nn.Linear]:
    # plain Linear(16, 16) and ReLU keep shapes and could be skipped, but are not residual
    net = nn.Sequential(
        nn.Linear(16, 16), nn.ReLU(), ResMLP(), ResMLP(), ResMLP(), ResMLP(), nn.Linear(16, 3)
    )
    return net, torch.randn(4, 16), net[4].fc2


def _cnn() -> tuple[nn.Module, torch.Tensor, nn.Conv2d]:
    blocks = nn.Sequential(ResConv(), ResConv(), ResConv(), ResConv())
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), blocks, nn.Flatten(), nn.Linear(4 * 64, 3))
    return net, torch.randn(2, 3, 8, 8), blocks[2].conv2


BLOCKS = {
    "mlp": (_mlp, ("2", "3", "4", "5"), "4"),
    "cnn": (_cnn, ("1.0", "1.1", "1.2", "1.3"), "1.2"),
}


def _built(kind: str) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    net, x, last = BLOCKS[kind][0]()
    return net.eval(), x, last


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_config_validates_and_round_trips() -> None:
    config = DepthConfig(ratio=0.5, ignore=["layer1.*"])
    assert config.ignore == ("layer1.*",)
    assert DepthConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (-0.1, 1.0, float("nan"), "0.5"):
        with pytest.raises(ConfigError, match="ratio"):
            DepthConfig(ratio=bad)
    with pytest.raises(ConfigError, match="ignore"):
        DepthConfig(ignore="layer1.*")
    with pytest.raises(ConfigError, match="unknown DepthConfig"):
        DepthConfig.from_dict({"ratio": 0.5, "sparsity": 0.1})
    with pytest.raises(ConfigError, match="example_inputs"):
        prune_(nn.Sequential(ResMLP(), ResMLP()), DepthConfig())


def test_skip_returns_input_in_the_callers_structure() -> None:
    x = torch.randn(2, 3)
    assert Skip()(x, None, mask=1) is x
    assert Skip()(hidden_states=x, mask=1) is x
    out = Skip(tuple_len=3)(x)
    assert out[0] is x and out[1:] == (None, None)
    assert list(Skip().state_dict()) == []


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_ratio_zero_removes_nothing(kind: str) -> None:
    net, x, _ = _built(kind)
    before = net(x)
    result = prune_(net, DepthConfig(ratio=0.0), example_inputs=x)
    assert isinstance(result, DepthResult)
    assert result.candidates == BLOCKS[kind][1]
    assert set(result.scores) == set(result.candidates)
    assert result.removed == ()
    assert not any(isinstance(m, Skip) for m in net.modules())
    assert torch.equal(net(x), before)


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_block_without_influence_goes_first_and_output_holds(kind: str) -> None:
    net, x, last = _built(kind)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    before, params = net(x), _params(net)
    result = prune_(net, DepthConfig(ratio=0.25), example_inputs=x)
    dead = BLOCKS[kind][2]
    assert result.removed == (dead,)
    assert result.scores[dead] == pytest.approx(0.0, abs=1e-6)
    assert min(result.scores, key=result.scores.__getitem__) == dead
    assert isinstance(net.get_submodule(dead), Skip)
    assert _params(net) < params
    torch.testing.assert_close(net(x), before, atol=1e-6, rtol=0)


def test_a_container_keeps_one_block_and_ignore_protects() -> None:
    torch.manual_seed(0)
    net, x = nn.Sequential(ResMLP(), ResMLP()).eval(), torch.randn(4, 16)
    result = prune_(net, DepthConfig(ratio=0.9), example_inputs=x)  # asks for both
    assert len(result.candidates) == 2 and len(result.removed) == 1
    assert net(x).shape == (4, 16)
    again = prune_(net, DepthConfig(ratio=0.9), example_inputs=x)
    assert len(again.candidates) == 1 and again.removed == ()

    net, x, _ = _built("mlp")
    result = prune_(net, DepthConfig(ratio=0.75, ignore=("3", "4.fc*")), example_inputs=x)
    assert result.candidates == ("2", "5")
    assert result.removed == ("2", "5")


def test_blocks_called_twice_or_changing_shape_are_not_candidates() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([ResMLP(), ResMLP(), ResMLP()])
            self.widen = nn.ModuleList([nn.Linear(16, 32)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.blocks[1](self.blocks[0](self.blocks[0](x)))
            return self.widen[0](self.blocks[2](x))

    torch.manual_seed(0)
    result = prune_(Shared().eval(), DepthConfig(ratio=0.5), example_inputs=torch.randn(2, 16))
    assert result.candidates == ("blocks.1", "blocks.2")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet(arch: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    macs, params = count_macs(model, x).dense, _params(model)
    result = prune_(model, DepthConfig(ratio=0.25), example_inputs=x)
    # the first block of layers 2-4 downsamples (and resnet50's layer1.0 widens): not candidates
    per_stage = {"resnet18": (2, 1, 1, 1), "resnet50": (2, 3, 5, 2)}[arch]
    first = {"resnet18": (0, 1, 1, 1), "resnet50": (1, 1, 1, 1)}[arch]
    expected = tuple(f"layer{s + 1}.{first[s] + i}" for s in range(4) for i in range(per_stage[s]))
    assert result.candidates == expected
    assert len(result.removed) == round(0.25 * len(expected)) >= 1
    assert model(x).shape == (2, 1000)
    assert count_macs(model, x).dense < macs
    assert _params(model) < params


def _hf_models() -> list:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    ids = {"vocab_size": 100, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 4}
    return [
        ("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(**small, **heads, **ids)),
        ("qwen2", transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**small, **heads, **ids)),
        (
            "gpt2",
            transformers.GPT2LMHeadModel,
            transformers.AutoConfig.for_model(
                "gpt2", n_embd=32, n_layer=4, n_head=4, n_positions=16, **ids
            ),
        ),
        (
            "bert",
            transformers.BertModel,
            transformers.BertConfig(**small, num_attention_heads=4, **ids),
        ),
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_hugging_face_layers(family: str) -> None:
    name, cls, config = next(case for case in _hf_models() if case[0] == family)
    torch.manual_seed(0)
    model = cls._from_config(config).eval()
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
    ids = torch.randint(3, 100, (2, 8))
    params = _params(model)
    result = prune_(model, DepthConfig(ratio=0.5), example_inputs=ids)
    assert len(result.removed) == 2
    assert len(layers) == 4  # replaced in place: indices and config stay valid
    assert sum(isinstance(layer, Skip) for layer in layers) == 2
    assert _params(model) < params
    out = model(ids)
    width = config.vocab_size if name != "bert" else config.hidden_size
    first = out.logits if name != "bert" else out.last_hidden_state
    assert first.shape == (2, 8, width) and torch.isfinite(first).all()
    if name == "bert":
        return
    # decoders keep their first layer: the KV cache counts tokens in its slot
    assert not isinstance(layers[0], Skip)
    with torch.no_grad():
        cached = model(ids, use_cache=True).past_key_values
        step = model(ids[:, :1], past_key_values=cached, use_cache=True).logits
        full = model(torch.cat([ids, ids[:, :1]], 1)).logits[:, -1:]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip_keeps_skips(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=3, image_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    unpruned = save_model(model, tmp_path / "dense.safetensors")
    assert "edits" not in json.loads(unpruned.with_suffix(".json").read_text())
    result = prune_(model, DepthConfig(ratio=0.3), example_inputs=x)
    assert len(result.removed) == 2
    path = save_model(model, tmp_path / "depth.safetensors")
    manifest_file = path.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    assert manifest["edits"] == {"skipped": list(result.removed)}
    loaded = load_model(path).model
    assert [n for n, m in loaded.named_modules() if isinstance(m, Skip)] == list(result.removed)
    assert torch.equal(loaded(x), model(x))

    for edits, match in [
        ({"skipped": ["layer9.0"]}, "'layer9.0' does not exist"),
        ({"skipped": ["layer1.0", ""]}, "'' does not exist"),
        ({"skipped": "layer1.0"}, "must be a list"),
        ({"renamed": {}}, "unknown edit"),
        ([], "must be a mapping"),
    ]:
        manifest_file.write_text(json.dumps({**manifest, "edits": edits}))
        with pytest.raises(ArtifactError, match=match) as info:
            load_model(path)
        assert "\n" not in str(info.value)
