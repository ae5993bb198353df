"""Which torchvision detection and segmentation models each tool prunes into a working, cheaper one.

Every model is built by torchvision's own builder with random weights (no download), then
pruned at ratio 0.5 by each tool in the same run:

- Torch-Pruning, following its torchvision example (``examples/torchvision_models``) through
  its public API: ``MagnitudePruner`` with ``MagnitudeImportance(p=1)`` at a uniform ratio and
  the example's per-model ignored layers (SSD's whole head; for Faster R-CNN the RPN's output
  convs, the FPN and the RoI heads; for FCOS, RetinaNet, Mask R-CNN and Keypoint R-CNN their
  output convs, and for Keypoint R-CNN also the FPN's layer blocks and the RoI heads). The
  example ignores nothing in the segmentation models, which would remove classes; here the
  convs that output the classes are ignored.
- secateur: ``prune_(model, StructuredConfig(ratio=0.5), example_inputs=(images,))`` with
  nothing set per model: the outputs (class scores, box deltas, masks) stay whole because they
  are the model's outputs.

Two builds of each R-CNN, RetinaNet and FCOS detector: ``--norms trainable`` is how the peer's
example builds them (``trainable_backbone_layers=5``: plain BatchNorms), ``--norms frozen`` how
torchvision builds them with pretrained weights (the backbone's BatchNorms become
``FrozenBatchNorm2d``, whose statistics are buffers), which is what users prune. The
segmentation models and SSD do not change between the two.

A model counts as pruned when pruning raised nothing, the pruned model runs on two images of
different sizes (detectors) or a batch of 2 (segmentation), gives finite outputs of the right
form, and its parameters fell. Multiply-accumulates are counted by
``secateur.measure.count_macs`` for both tools, on the detectors' own transform at
``--size`` (min and max size of the R-CNN, RetinaNet and FCOS transforms; SSD resizes to its
own 300 or 320). How much work an R-CNN does depends on how many proposals and boxes
survive its score thresholds and non-maximum suppression, which with random weights follows
the weights: a pruned model that keeps more proposals would count more MACs than the dense
one. So that both tools are counted on the same work, the R-CNNs here keep a fixed number:
NMS thresholds at 1.0 (nothing suppressed), score threshold 0, and 10 boxes per image (each
box runs the mask or keypoint head), hence 1000 proposals per image through the box head.
A tool gets ``--limit`` seconds per model; past that it is stopped.

    .venv/bin/pip install -c constraints.txt torch-pruning==1.6.1
    .venv/bin/python -W ignore benchmarks/torchvision_dense_coverage.py --threads 2
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import torch
import torchvision
from hf_llm_coverage import _short, print_header, print_runs, prune_counting_macs
from torchvision.ops import FrozenBatchNorm2d

from secateur import StructuredConfig, prune_

RATIO = 0.5
CLASSES = 5
BOXES = 10
DETECTORS = [
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "keypointrcnn_resnet50_fpn",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
]
SEGMENTERS = [
    "fcn_resnet50",
    "deeplabv3_resnet50",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
]
FREEZABLE = ("fasterrcnn", "retinanet", "fcos", "maskrcnn", "keypointrcnn")


def _freeze_norms(model: torch.nn.Module) -> None:
    """Swap the backbone's BatchNorms for FrozenBatchNorm2d with the same statistics, as
    torchvision's builders do when they load pretrained weights."""
    body = model.backbone.body if hasattr(model.backbone, "body") else model.backbone
    for name, module in list(body.named_modules()):
        if isinstance(module, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(module, key).detach())
            parent, _, leaf = name.rpartition(".")
            setattr(body.get_submodule(parent) if parent else body, leaf, frozen)


def build(name: str, norms: str, size: int) -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    kwargs: dict = {"weights": None, "weights_backbone": None}
    if name in SEGMENTERS:
        model = torchvision.models.get_model(name, num_classes=CLASSES, aux_loss=False, **kwargs)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        return model.eval(), x
    if name.startswith(FREEZABLE):
        kwargs.update(trainable_backbone_layers=5, min_size=size, max_size=size)
    classes = 2 if name.startswith("keypointrcnn") else CLASSES
    model = torchvision.models.get_model(name, num_classes=classes, **kwargs).eval()
    if norms == "frozen" and name.startswith(FREEZABLE):
        _freeze_norms(model)
    if hasattr(model, "rpn"):  # a fixed number of proposals and boxes: see the docstring
        model.rpn.nms_thresh = model.roi_heads.nms_thresh = 1.0
        model.roi_heads.score_thresh = 0.0
        model.roi_heads.detections_per_img = BOXES
    gen = torch.Generator().manual_seed(0)
    return model, ([torch.rand(3, size, size, generator=gen)],)


def _ignored(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The peer example's per-model ignored layers (see the module docstring)."""
    if name.startswith("ssd"):
        return [model.head]
    rpn = [model.rpn.head.cls_logits, model.rpn.head.bbox_pred] if hasattr(model, "rpn") else []
    if name.startswith("fasterrcnn"):
        return [*rpn, model.backbone.fpn, model.roi_heads]
    if name.startswith("keypointrcnn"):
        heads = model.roi_heads
        return [*rpn, model.backbone.fpn.layer_blocks, heads.box_head, heads.box_predictor,
                heads.keypoint_predictor]  # fmt: skip
    if name.startswith("maskrcnn"):
        return [*rpn, model.roi_heads.box_predictor, model.roi_heads.mask_predictor]
    if name.startswith("fcos"):
        head = model.head
        return [head.classification_head.cls_logits, head.regression_head.bbox_reg,
                head.regression_head.bbox_ctrness]  # fmt: skip
    if name.startswith("retinanet"):
        return [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]
    classes = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return [m for m in classes if m.out_channels == CLASSES]


def torch_pruning(model: torch.nn.Module, x: tuple, name: str) -> str | None:
    import torch_pruning as tp

    for p in model.parameters():
        p.requires_grad_(True)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example_inputs=x[0] if isinstance(x, tuple) else x,
        importance=tp.importance.MagnitudeImportance(p=1),
        iterative_steps=1,
        pruning_ratio=RATIO,
        global_pruning=False,
        ignored_layers=_ignored(model, name),
    )
    pruner.step()
    return None


def secateur(model: torch.nn.Module, x: tuple, name: str) -> str | None:
    result = prune_(model, StructuredConfig(ratio=RATIO), example_inputs=x)
    if result.refused:
        return f"{len(result.refused)} group(s) left whole by the forward check"
    return None


TOOLS: dict[str, Callable[[torch.nn.Module, tuple, str], str | None]] = {
    "Torch-Pruning": torch_pruning,
    "secateur": secateur,
}


def check(model: torch.nn.Module, name: str, size: int) -> str | None:
    """None when the pruned model still detects (or segments) with finite outputs."""
    gen = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            if name in SEGMENTERS:
                out = model(torch.randn(2, 3, size, size, generator=gen))["out"]
                if out.shape != (2, CLASSES, size, size):
                    return f"output {tuple(out.shape)}"
                return None if torch.isfinite(out).all() else "non-finite output"
            images = [torch.rand(3, size, size, generator=gen), torch.rand(3, size, size + 32)]
            outs = model(images)
    except Exception as exc:  # noqa: BLE001 - a failure is a result to report
        return f"forward fails ({_short(exc)})"
    if len(outs) != 2 or any(o["boxes"].dim() != 2 or o["boxes"].shape[-1] != 4 for o in outs):
        return "no boxes"
    if not all(torch.isfinite(o["scores"]).all() for o in outs):
        return "non-finite scores"
    return None


def run(name: str, tool: str, norms: str, size: int, limit: int) -> dict:
    model, x = build(name, norms, size)
    return prune_counting_macs(
        model, x, lambda: TOOLS[tool](model, x, name), limit, lambda: check(model, name, size), 2
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=DETECTORS + SEGMENTERS)
    parser.add_argument("--norms", choices=("frozen", "trainable"), default="frozen")
    parser.add_argument("--size", type=int, default=320, help="input side, in pixels")
    parser.add_argument(
        "--limit", type=int, default=120, help="seconds a tool may take to prune one model"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    print_header(
        args.threads,
        [
            f"limit {args.limit} s per pruning; ratio {RATIO}; backbone norms {args.norms}; "
            f"input {args.size} px"
        ],
        ("torch", "torchvision", "torch-pruning", "secateur"),
    )
    print_runs(
        args.models,
        list(TOOLS),
        lambda name, tool: run(name, tool, args.norms, args.size, args.limit),
    )


if __name__ == "__main__":
    main()
