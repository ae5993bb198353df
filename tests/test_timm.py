"""timm models, built small with random weights (no download): every width goes, nothing is
refused, and removing silenced units leaves the outputs as they were."""

from __future__ import annotations

import pytest
import torch

from secateur import StructuredConfig, prune_
from structured_helpers import assert_silenced_removal_exact

timm = pytest.importorskip("timm")
mlp_mixer = pytest.importorskip("timm.models.mlp_mixer")
focalnet = pytest.importorskip("timm.models.focalnet")
twins = pytest.importorskip("timm.models.twins")
tiny_vit = pytest.importorskip("timm.models.tiny_vit")
levit = pytest.importorskip("timm.models.levit")

# name: (timm model, options, input size); each small enough to build and prune in ~0.1 s
CASES = {
    # fused q|k|v viewed (b, n, 3, heads, head_dim), permuted and unbound
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2), 32),
    # windows reshaped with the width read from the input's shape; window area == width here
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(
            img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4)
        ),
        32,
    ),
    # q/k/v biases concatenated from two parameters and a buffer; position bias as sdpa mask
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, embed_dim=48, depth=2), 28),
    # global response norm: a 2-norm over space and addcmul
    "convnextv2": ("convnextv2_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 64),
    "efficientnet": ("efficientnet_b0", dict(), 64),
    # concatenated primary and cheap halves added to the shortcut, read by depthwise convs
    "ghostnet": ("ghostnet_050", dict(), 64),
    # a channel split whose sizes a tuple attribute holds (FocalNet's list: below)
    "inception_next": (
        "inception_next_tiny",
        dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
        64,
    ),
    # halo attention's views: dropping size-1 axes and regrouping the leading ones in turn
    "halonet": ("halonet26t", dict(), 256),
    # the shortcut added in place to the first channels only (``x[:, :in_chs] += shortcut``)
    "rexnet": ("rexnet_100", dict(width_mult=0.5), 64),
    # grouped 3x3 convs: every group keeps as many channels as the others
    "resnext": ("resnext26ts", dict(), 64),
    "regnetz": ("regnetz_b16", dict(), 64),
    # dual paths: a slice at an attribute, the rest (its open end) as wide by chance
    "dpn": ("dpn48b", dict(), 64),
}
HEADS = {"vit": 3, "beit": 12, "eva02": 4}  # default head counts where not given


def _build(case: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if case in ("mixer", "resmlp"):  # token mixing by Linears over the transposed tokens
        extra = (
            dict(block_layer=mlp_mixer.ResBlock, norm_layer=mlp_mixer.Affine, mlp_ratio=4)
            if case == "resmlp"
            else {}
        )
        model = mlp_mixer.MlpMixer(
            num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=32, **extra
        )
        return model.eval(), torch.randn(1, 3, 32, 32)
    if case == "focalnet":  # its registered names fix the depths
        model = focalnet.FocalNet(num_classes=5, embed_dim=16, depths=(1, 1, 1, 1))
        return model.eval(), torch.randn(1, 3, 64, 64)
    if case == "tiny_vit":  # attention biases gathered by a (N, N) index: heads go
        model = tiny_vit.TinyVit(
            num_classes=5,
            embed_dims=(16, 32, 48, 64),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 3, 4),
            window_sizes=(2, 2, 2, 2),
        )
        return model.eval(), torch.randn(1, 3, 64, 64)
    if case == "levit":
        model = levit.Levit(
            img_size=64,
            num_classes=5,
            embed_dim=(32, 48, 64),
            key_dim=8,
            num_heads=(2, 3, 4),
            depth=(1, 1, 1),
        )
        return model.eval(), torch.randn(1, 3, 64, 64)
    if case == "twins":  # windows regrouped while q|k|v splits, in one reshape
        model = twins.Twins(
            img_size=32,
            num_classes=5,
            embed_dims=(16, 32),
            num_heads=(2, 4),
            mlp_ratios=(2, 2),
            depths=(2, 2),
            sr_ratios=(2, 1),
            wss=(2, 2),
            block_cls=twins.Block,
        )
        return model.eval(), torch.randn(1, 3, 32, 32)
    name, options, size = CASES[case]
    if case in HEADS:
        options = dict(options, num_heads=4)
    model = timm.create_model(name, num_classes=5, **options).eval()
    return model, torch.randn(1, 3, size, size)


ALL = [*CASES, "mixer", "resmlp", "focalnet", "twins", "tiny_vit", "levit"]
# BEiT and EVA reshape the attention's output to the width of its input (``reshape(B, N,
# C)``, C read from the input's shape): heads go only with as many hidden channels, which a
# norm pools, in one group of the "hidden" kind; ConvNeXt-V2's response norm pools all its
# channels. Both prune (above); removing silenced units is exact for the other groups.
TIED_TO_HIDDEN = {"beit", "eva02"}


@pytest.mark.parametrize("case", ALL)
def test_every_width_goes_and_nothing_is_refused(case: str) -> None:
    model, x = _build(case)
    before = sum(p.numel() for p in model.parameters())
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    kinds = {g.kind for g in result.graph.groups}
    if case in ("vit", "swin", "tiny_vit"):
        assert kinds == {"channel", "head", "hidden"}
    elif case == "levit":  # its attention's output is its own width (BatchNorm, no norm pools)
        assert kinds == {"channel", "head"}
    elif case in TIED_TO_HIDDEN:  # one group: whole heads with as many hidden channels
        assert kinds == {"channel", "hidden"}
    assert sum(p.numel() for p in model.parameters()) < 0.4 * before
    y = model(torch.cat([x, x]))  # another batch size
    assert y.shape == (2, 5) and torch.isfinite(y).all()


@pytest.mark.parametrize("case", [c for c in ALL if c != "convnextv2"])
def test_removing_silenced_units_keeps_the_outputs(case: str) -> None:
    model, x = _build(case)
    assert_silenced_removal_exact(model, x, tol=1e-4)
