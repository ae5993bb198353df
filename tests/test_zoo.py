"""Tests of secateur.zoo: shapes, exact parameter counts, the registry and its specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.zoo import (
    VGG,
    BasicBlock,
    LeNet5,
    LeNet300100,
    ResNet,
    create_model,
    lenet5,
    list_models,
    register_model,
)

INPUTS = [(1, 28), (3, 32)]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models() -> None:
    names = list_models()
    assert names == sorted(names)
    expected = {
        "lenet_300_100",
        "lenet5",
        "vgg11_bn",
        "vgg16_bn",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
    }
    assert expected <= set(names)


@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_lenet_300_100_param_count() -> None:
    model = create_model("lenet_300_100")
    assert isinstance(model, LeNet300100)
    assert _n_params(model) == (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10) == 266610


def test_lenet5_param_count_and_maps() -> None:
    model = create_model("lenet5")
    assert isinstance(model, LeNet5)
    expected = (
        (6 * 1 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    )
    assert _n_params(model) == expected == 61706


@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
def test_lenet5_feature_maps(in_channels: int, image_size: int) -> None:
    model = lenet5(in_channels=in_channels, image_size=image_size)
    shapes = {}
    for name in ("conv1", "conv2"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[2:]))
        )
    model(torch.zeros(1, in_channels, image_size, image_size))
    # conv1 28x28 then pool -> 14x14 into conv2 -> 10x10, matching the MAC counts
    # 6*28*28*25*C and 16*10*10*150.
    assert shapes == {"conv1": (28, 28), "conv2": (10, 10)}
    assert model.fc1.in_features == 16 * 5 * 5


def test_resnet20_param_count() -> None:
    model = create_model("resnet20", in_channels=3, image_size=32)
    assert isinstance(model, ResNet)

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k

    def bn(c: int) -> int:
        return 2 * c

    def block(cin: int, cout: int) -> int:
        shortcut = conv(cin, cout, 1) + bn(cout) if cin != cout else 0
        return conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout) + shortcut

    expected = (
        conv(3, 16, 3) + bn(16)
        + 3 * block(16, 16)
        + block(16, 32) + 2 * block(32, 32)
        + block(32, 64) + 2 * block(64, 64)
        + 64 * 10 + 10
    )  # fmt: skip
    assert _n_params(model) == expected == 272474
    # Grayscale only changes the stem: 3x3x1x16 instead of 3x3x3x16 weights.
    assert _n_params(create_model("resnet20")) == expected - 2 * 16 * 9


def test_resnet_structure() -> None:
    model = create_model("resnet56")
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [9, 9, 9]
    first, second = model.layer2[0], model.layer2[1]
    assert isinstance(first, BasicBlock)
    assert isinstance(first.shortcut[0], nn.Conv2d) and first.shortcut[0].stride == (2, 2)
    assert isinstance(first.shortcut[1], nn.BatchNorm2d)
    assert len(second.shortcut) == 0 and len(model.layer1[0].shortcut) == 0
    assert model.fc.in_features == 64


def test_vgg_structure_and_width_mult() -> None:
    model = create_model("vgg11_bn")
    assert isinstance(model, VGG) and isinstance(model.features, nn.Sequential)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.bias is None for c in convs)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 512
    assert len([m for m in create_model("vgg16_bn").modules() if isinstance(m, nn.Conv2d)]) == 13

    small = create_model("vgg11_bn", width_mult=0.25)
    widths = [m.out_channels for m in small.features if isinstance(m, nn.Conv2d)]
    assert widths == [16, 32, 64, 64, 128, 128, 128, 128]
    assert small.classifier.in_features == 128
    tiny = create_model("vgg16_bn", width_mult=0.001)
    assert all(m.out_channels == 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", list_models())
def test_spec_round_trip(name: str) -> None:
    model = create_model(name, in_channels=3, num_classes=7, image_size=32)
    spec = json.loads(json.dumps(model.secateur_spec))
    assert spec["name"] == name
    assert spec["kwargs"]["in_channels"] == 3 and spec["kwargs"]["num_classes"] == 7
    rebuilt = create_model(spec["name"], **spec["kwargs"])
    assert rebuilt.secateur_spec == model.secateur_spec
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())


def test_spec_includes_defaults_and_plain_numbers() -> None:
    model = create_model("vgg11_bn", num_classes=np.int64(5), width_mult=np.float32(0.5))
    assert model.secateur_spec == {
        "name": "vgg11_bn",
        "kwargs": {"in_channels": 1, "num_classes": 5, "image_size": 28, "width_mult": 0.5},
    }
    assert type(model.secateur_spec["kwargs"]["num_classes"]) is int
    json.dumps(model.secateur_spec)
    # Calling a factory directly records the spec too.
    assert lenet5().secateur_spec == {
        "name": "lenet5",
        "kwargs": {"in_channels": 1, "num_classes": 10, "image_size": 28},
    }


def test_unknown_model() -> None:
    with pytest.raises(ConfigError) as exc:
        create_model("foo")
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("unknown model 'foo': choose one of ")
    assert "lenet5, lenet_300_100" in message and "resnet20" in message


def test_unknown_kwarg() -> None:
    with pytest.raises(ConfigError, match="'depth'") as exc:
        create_model("resnet20", depth=18)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="'width_mult'"):
        create_model("lenet5", width_mult=0.5)


@pytest.mark.parametrize(
    ("name", "kwargs", "option"),
    [
        ("lenet5", {"in_channels": 0}, "in_channels"),
        ("lenet_300_100", {"num_classes": -1}, "num_classes"),
        ("resnet20", {"image_size": 2.5}, "image_size"),
        ("resnet20", {"in_channels": True}, "in_channels"),
        ("vgg11_bn", {"image_size": 8}, "image_size"),
        ("vgg16_bn", {"width_mult": 0}, "width_mult"),
        ("vgg16_bn", {"width_mult": float("inf")}, "width_mult"),
        ("lenet5", {"num_classes": "10"}, "num_classes"),
    ],
)
def test_bad_option_values(name: str, kwargs: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=option) as exc:
        create_model(name, **kwargs)
    assert "\n" not in str(exc.value)


def test_register_model_rejects_duplicates_and_positional_params() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="keyword-only"):

        @register_model("bad_factory_for_test")
        def bad(in_channels: int = 1) -> nn.Module:
            return nn.Identity()

    assert "bad_factory_for_test" not in list_models()
