"""Detection and segmentation models: their backbones, necks (FPN) and RoI heads shrink.

torchvision's detectors run list inputs, data-dependent box code and RoI pooling; their anchor
generators cache tensors on the input's device. Models are built with random weights; nothing
is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur import StructuredConfig, prune_
from secateur.graph import build_dependency_graph
from secateur.measure import count_macs
from secateur.pruning._structured import apply_removals_
from structured_helpers import random_units, randomise_norms, silence_

torchvision = pytest.importorskip("torchvision")
ops = pytest.importorskip("torchvision.ops")


class CachingHead(nn.Module):
    """Caches tensors in plain attributes on the input's device, as anchor generators do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)
        self.cache = [torch.ones(2)]
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = [c.to(x.device) for c in self.cache]
        self.seen.append(x.new_zeros(1))
        self.last = x.new_ones(1)
        return self.fc(self.conv(x).mean((2, 3))) + self.cache[0]


def test_tracing_leaves_no_tensor_of_its_own_in_module_attributes() -> None:
    model = CachingHead().eval()
    cache = model.cache
    build_dependency_graph(model, torch.randn(1, 3, 8, 8))
    assert model.cache is cache and model.seen == [] and not hasattr(model, "last")
    assert all(not t.is_meta for t in model.cache)
    model(torch.randn(1, 3, 8, 8))  # and it still runs


class RoiNet(nn.Module):
    """Two pyramid levels pooled per box into one tensor, as MultiScaleRoIAlign does."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.lateral = nn.ModuleList(nn.Conv2d(12, 16, 1) for _ in range(levels))
        self.head = nn.Linear(16 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = torch.tensor([[0, 0.0, 0.0, 6.0, 6.0], [0, 2.0, 1.0, 7.0, 7.0], [0, 1, 1, 3, 5]])
        feats = [
            lat(nn.functional.avg_pool2d(self.stem(x), 2**i)) for i, lat in enumerate(self.lateral)
        ]
        if len(feats) == 1:
            pooled = ops.roi_align(feats[0], boxes, (2, 2), 1.0)
        else:
            pooled = torch.zeros(3, feats[0].shape[1], 2, 2)
            for i, f in enumerate(feats):
                rows = torch.arange(3)[i::2]
                pooled[rows] = ops.roi_align(f, boxes[rows], (2, 2), 0.5**i)
        return self.head(pooled.flatten(1))


@pytest.mark.parametrize("levels", [1, 2])
def test_roi_pooling_passes_channels_and_their_removal_is_exact(levels: int) -> None:
    torch.manual_seed(0)
    model, x = RoiNet(levels).eval(), torch.randn(1, 3, 8, 8)
    randomise_norms(model)
    graph = build_dependency_graph(model, x)
    lateral = [g for g in graph.groups if any(m.module_name == "head" for m in g.members)]
    assert len(lateral) == 1 and lateral[0].size == 16
    names = {m.module_name for m in lateral[0].members}
    assert {f"lateral.{i}" for i in range(levels)} <= names
    gen = torch.Generator().manual_seed(0)
    removals = [(g, random_units(g, gen)) for g in graph.groups]
    for group, units in removals:
        silence_(model, group, units)
    with torch.no_grad():
        expected = model(x)
    apply_removals_(model, graph, removals)
    assert model.head.in_features < 64
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class Masked(nn.Module):
    """Writes a constant into rows of a tracked tensor, and a slice of it (not whole)."""

    def __init__(self, part: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.part = nn.Conv2d(3, 8, 1), nn.Linear(8, 2), part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.part:
            y[:, :3] = 0.0
        else:
            y[:, :, 0] = 0.0
        return self.fc(y.mean((2, 3)))


def test_a_constant_written_across_channels_keeps_them_prunable() -> None:
    whole = build_dependency_graph(Masked(part=False).eval(), torch.randn(1, 3, 4, 4))
    assert [g.size for g in whole.groups] == [8]
    part = build_dependency_graph(Masked(part=True).eval(), torch.randn(1, 3, 4, 4))
    assert not part.groups and "overwritten in part of their axis" in str(part.blocked)


def test_frozen_batchnorm_buffers_shrink_with_their_channels() -> None:
    """Pretrained torchvision detectors freeze their backbone's BatchNorms: the statistics are
    buffers, mixed in the forward (``weight * (running_var + eps).rsqrt()``) before they scale
    the channels, and are sliced with them."""
    from structured_helpers import assert_silenced_removal_exact

    frozen = ops.FrozenBatchNorm2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3), frozen(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(model[1], name).copy_(torch.rand(8) + 0.5)
    x = torch.randn(2, 3, 8, 8)
    graph = build_dependency_graph(model, x)
    assert [g.size for g in graph.groups] == [8]
    assert not [why for _, why in graph.blocked if "constant" in why]
    assert_silenced_removal_exact(model, x)
    assert model[1].running_var.shape == model[1].weight.shape == (model[0].out_channels,)


def _detector(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 5}
    if name.endswith("resnet18"):  # the resnet50 builders' heads on a small backbone
        from torchvision.models.detection import backbone_utils

        arch = name.split("_")[0]
        returned = [2, 3, 4] if arch in ("retinanet", "fcos") else [1, 2, 3, 4]
        extra = (
            torchvision.ops.feature_pyramid_network.LastLevelP6P7(256, 256)
            if arch in ("retinanet", "fcos")
            else None
        )
        backbone = backbone_utils.resnet_fpn_backbone(
            backbone_name="resnet18",
            weights=None,
            trainable_layers=5,
            returned_layers=returned,
            extra_blocks=extra,
        )
        cls = {
            "fasterrcnn": torchvision.models.detection.FasterRCNN,
            "maskrcnn": torchvision.models.detection.MaskRCNN,
            "retinanet": torchvision.models.detection.RetinaNet,
            "fcos": torchvision.models.detection.FCOS,
            "keypointrcnn": torchvision.models.detection.KeypointRCNN,
        }[arch]
        extra_kw = {"num_keypoints": 5} if arch == "keypointrcnn" else {}
        model = cls(
            backbone,
            num_classes=2 if arch == "keypointrcnn" else 5,
            min_size=160,
            max_size=160,
            **extra_kw,
        )
        if hasattr(model, "roi_heads"):  # each box costs a run of the mask or keypoint head
            model.roi_heads.detections_per_img = 8
    else:
        model = torchvision.models.get_model(name, **kwargs)
    return model.eval()


DETECTORS = [
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large",
    "retinanet_resnet18",
    "fcos_resnet18",
    "maskrcnn_resnet18",
    "keypointrcnn_resnet18",  # two classes: how many boxes pass follows the weights
]


@pytest.mark.parametrize("name", DETECTORS)
def test_detectors_prune_and_still_detect(name: str) -> None:
    model = _detector(name)
    images = [torch.rand(3, 160, 160)]
    before = count_macs(model, (images,)).dense
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=(images,))
    assert not result.refused
    with torch.no_grad():
        (out,) = model(images)
    assert {"boxes", "scores", "labels"} <= set(out) and out["boxes"].shape[-1] == 4
    assert count_macs(model, (images,)).dense < 0.4 * before


def _heads(model: nn.Module, images: list[torch.Tensor], boxes: torch.Tensor) -> list:
    """The RPN's objectness and box deltas, and the box head's class logits and deltas for
    fixed proposals: every value the detections are drawn from, before top-k and NMS (whose
    picks among near-equal random scores could flip on rounding alone)."""
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    levels = list(features.values())
    objectness, deltas = model.rpn.head(levels)
    pooled = model.roi_heads.box_roi_pool(features, [boxes], batch.image_sizes)
    logits, box_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    return [objectness, deltas, logits, box_deltas]


def test_a_pruned_detector_removes_exactly_what_was_silenced() -> None:
    """Backbone, FPN and RoI box head: units silenced in the original, then removed, leave
    every score and box delta where it was."""
    model = _detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    randomise_norms(model)
    images = [torch.rand(3, 160, 160)]
    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [0.0, 0.0, 320.0, 320.0], [50, 60, 70, 90]])
    graph = build_dependency_graph(model, (images,))
    fpn = [g for g in graph.groups if any("roi_heads.box_head" in m.module_name for m in g.members)]
    assert fpn, "the FPN channels reach the RoI box head"
    gen = torch.Generator().manual_seed(0)
    removals = [(g, random_units(g, gen)) for g in graph.groups if g.kind != "hidden"]
    for group, units in removals:
        silence_(model, group, units)
    with torch.no_grad():
        expected = _heads(model, images, boxes)
    apply_removals_(model, graph, removals)
    assert model.roi_heads.box_head.fc6.in_features < 256 * 7 * 7
    with torch.no_grad():
        torch.testing.assert_close(_heads(model, images, boxes), expected, atol=1e-5, rtol=1e-4)
        (out,) = model(images)
    assert out["boxes"].shape[-1] == 4


@pytest.mark.parametrize(
    "name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
)
def test_segmentation_models_prune_and_keep_their_output_map(name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 5}
    model = torchvision.models.get_model(name, **kwargs).eval()
    x = torch.randn(1, 3, 96, 96)
    before = count_macs(model, x).dense
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    with torch.no_grad():
        assert model(x)["out"].shape == (1, 5, 96, 96)
    assert count_macs(model, x).dense < 0.4 * before


class Selecting(nn.Module):
    """Returns the rows whose score passes a threshold, as a detector returns its boxes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        return y[y[:, 0] > 0]


def test_an_output_sized_by_the_data_is_not_taken_for_a_broken_model() -> None:
    """Pruning changes how many rows pass; the forward check compares the other axes only."""
    torch.manual_seed(0)
    model, x = Selecting().eval(), torch.randn(64, 4)
    assert build_dependency_graph(model, x).output_shapes == ((None, 3),)
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert not result.refused and model.a.out_features == 4


class InPlaceScale(nn.Module):
    """A scale built in place from two buffers (``s = a.clone(); s.mul_(b)``), and a buffer
    registered empty that the forward fills on the input's device."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("a", torch.rand(8) + 0.5)
        self.register_buffer("b", torch.rand(8) + 0.5)
        self.register_buffer("cache", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = torch.ones(1, device=x.device)
        s = self.a.clone()
        s.mul_(self.b)
        return self.out(self.fc(x) * s) * self.cache


def test_a_scale_mixed_in_place_slices_both_buffers_and_the_trace_leaves_no_buffer() -> None:
    from structured_helpers import assert_silenced_removal_exact

    model, x = InPlaceScale().eval(), torch.randn(3, 4)
    graph = build_dependency_graph(model, x)
    assert model.cache is None
    (group,) = graph.groups
    assert {m.tensor for m in group.members if m.role == "param"} == {"a", "b"}
    assert_silenced_removal_exact(model, x)
    assert model.a.shape == model.b.shape == (model.fc.out_features,)


class ListWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y[:, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # one value per channel
        return self.fc(y.mean((2, 3)))


def test_a_value_per_channel_written_into_rows_blocks_the_channels() -> None:
    graph = build_dependency_graph(ListWrite().eval(), torch.randn(1, 3, 4, 4))
    assert not graph.groups


class Detectron2FrozenNorm(nn.Module):
    """Detectron2's frozen BatchNorm mixes its statistics first and reshapes the result."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def test_a_mix_reshaped_after_mixing_shrinks_with_its_channels() -> None:
    from structured_helpers import assert_silenced_removal_exact

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Detectron2FrozenNorm(8), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    (group,) = build_dependency_graph(model, x).groups
    assert {m.tensor for m in group.members if m.module_name == "1"} == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
    }
    assert_silenced_removal_exact(model, x)
    assert model[1].running_var.shape == (model[0].out_channels,)
