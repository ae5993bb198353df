"""runtime/: sparse Linear/Conv2d equal their dense originals, sparsify_ decides (BSR block size
too) and reverts cleanly, 2:4 semi-structured checks (CPU error path, pattern, skip logic;
conversion on a GPU)."""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from secateur import UnstructuredConfig, prune_
from secateur.errors import ConfigError, PruningError
from secateur.runtime import (
    LayerChoice,
    SparseConv1x1,
    SparseConv2d,
    SparseLinear,
    SparsifyReport,
    _choose,
    _sparse_linear,
    densify_,
    nm_pattern,
    semi_structured_plan,
    sparsify_,
    to_semi_structured_,
)
from secateur.runtime._semi_structured import NOT_2_4, min_shape

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_linear(inp: int, out: int, sparsity: float, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        layer.weight.masked_fill_(torch.rand(out, inp) < sparsity, 0.0)
    return layer


def mlp(sparsity: float = 0.9) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU())
    net.append(nn.Linear(32, 10))
    prune_(net, UnstructuredConfig(sparsity=sparsity, scope="layer"))
    return net


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3), (2, 1, 4)])
def test_sparse_linear_equals_dense(layout: str, bias: bool, lead: tuple[int, ...]) -> None:
    dense = sparse_linear(64, 32, 0.8, bias=bias)
    sparse = SparseLinear.from_dense(dense, layout=layout, blocksize=8)
    x = torch.randn(*lead, 64)
    with torch.no_grad():
        got, want = sparse(x), dense(x)
    assert got.shape == want.shape == (*lead, 32)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, **TOL)
    assert sparse.weight.layout == {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}[layout]
    assert sparse.blocksize == ((8, 8) if layout == "bsr" else None)
    assert sparse.sparsity == pytest.approx(float((dense.weight == 0).float().mean()))


def test_sparse_linear_inference_mode_and_noncontiguous_input() -> None:
    dense = sparse_linear(48, 16, 0.9)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(48, 5).T  # non-contiguous (5, 48)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), dense(x), **TOL)


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_to_dense_round_trip(layout: str) -> None:
    dense = sparse_linear(32, 16, 0.7)
    back = SparseLinear.from_dense(dense, layout=layout, blocksize=(4, 8)).to_dense()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, dense.weight)
    assert torch.equal(back.bias, dense.bias)
    assert back.weight.requires_grad


def test_from_dense_errors() -> None:
    dense = sparse_linear(30, 20, 0.5)
    with pytest.raises(ConfigError, match="not divisible into 16x16 blocks.*layout='csr'"):
        SparseLinear.from_dense(dense, layout="bsr", blocksize=16)
    with pytest.raises(ConfigError, match="layout='coo' is not known"):
        SparseLinear.from_dense(dense, layout="coo")
    with pytest.raises(ConfigError, match=r"float32/float64.*\.float\(\)"):
        SparseLinear.from_dense(dense.half())
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(3, 4, 1))


def sparse_conv(cin: int, cout: int, kernel, sparsity: float = 0.8, **kw) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, **kw)
    with torch.no_grad():
        conv.weight.masked_fill_(torch.rand_like(conv.weight) < sparsity, 0.0)
    return conv


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (1, 3), (2, 2), (5, 5)])
def test_sparse_conv2d_equals_dense(
    kernel: tuple[int, int], layout: str, per_image: bool, monkeypatch
) -> None:
    # both batch paths: one product over the whole batch, or image by image
    monkeypatch.setattr(_sparse_linear, "PER_IMAGE_MIN", 1 if per_image else 2**62)
    torch.manual_seed(0)
    grid = itertools.product([1, 2], [0, 1, (2, 1), "same", "valid"], [1, (2, 1)], [True, False])
    shapes = [(1, 4, 9, 11), (3, 4, 9, 11), (4, 9, 11)]
    checked = 0
    for stride, padding, dilation, bias in grid:
        if padding == "same" and stride != 1:
            continue  # nn.Conv2d refuses it
        conv = sparse_conv(4, 8, kernel, stride=stride, padding=padding, dilation=dilation)
        if not bias:
            conv.bias = None
        sparse = SparseConv2d.from_dense(conv, layout=layout, blocksize=4)
        for shape in shapes:
            x = torch.randn(*shape)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # 'same' + even kernel: a copy
                got, want = sparse(x), conv(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **TOL)
            checked += 1
        back = sparse.to_dense()
        assert type(back) is nn.Conv2d
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            assert getattr(back, attr) == getattr(conv, attr), attr
        assert torch.equal(back.weight, conv.weight)
        assert (back.bias is None) == (conv.bias is None)
        if bias:
            assert torch.equal(back.bias, conv.bias)
    assert checked == 3 * 2 * 2 * (2 * 5 - 1)
    assert sparse.in_channels == 4 and sparse.out_channels == 8
    assert sparse.blocksize == ((4, 4) if layout == "bsr" else None)


def test_sparse_conv2d_input_gradient_and_inference_mode() -> None:
    torch.manual_seed(0)
    conv = sparse_conv(3, 4, 3, padding=1, stride=2)
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    (grad,) = torch.autograd.grad(sparse(x).sum(), x)
    (want,) = torch.autograd.grad(conv(x).sum(), x)
    torch.testing.assert_close(grad, want, **TOL)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x.detach()), conv(x.detach()), **TOL)


def test_sparse_conv2d_refusals_and_old_name() -> None:
    with pytest.raises(ConfigError, match="groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="padding_mode='reflect'.*only zero padding"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ConfigError, match="not a plain nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="not divisible into 16x16 blocks"):
        SparseConv2d.from_dense(nn.Conv2d(4, 8, 3), layout="bsr", blocksize=16)
    # without padding the mode changes nothing: still a candidate, and rebuilt with its mode
    conv = sparse_conv(4, 4, 3, padding_mode="circular")
    back = SparseConv2d.from_dense(conv).to_dense()
    assert back.padding_mode == "circular" and torch.equal(back.weight, conv.weight)
    assert SparseConv1x1 is SparseConv2d  # the former name keeps working


def test_bsr_blocks_rule() -> None:
    torch.manual_seed(0)
    blocks = (32, 16, 8, 4)
    # 99% unstructured 300x784 (LeNet fc1): only 4 divides both; most 4x4 blocks are empty
    w = (torch.rand(300, 784) > 0.99).float()
    assert _choose.bsr_blocks(w, blocks) == ([4], "")
    assert _choose.bsr_blocks(w, (16,)) == ([], "bsr: 300x784 not divisible by 16")
    # 90% unstructured: too few empty blocks at any size
    kept, note = _choose.bsr_blocks((torch.rand(64, 64) > 0.9).float(), blocks)
    assert (
        kept == [] and note.startswith("bsr: ") and note.endswith("of 4x4 blocks all-zero (< 60%)")
    )
    # whole 16x16 blocks, 90% of them zero: 32 is too coarse (~66% zero), 16 halves its area,
    # 8 and 4 store exactly what 16 does, so they are not timed
    keep = (torch.rand(8, 8) > 0.9).repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert keep.any()
    w = torch.randn(128, 128) * keep
    zero32 = _choose.zero_block_fraction(w, 32)
    assert _choose.zero_block_fraction(w, 8) == _choose.zero_block_fraction(w, 16)
    assert _choose.bsr_blocks(w, blocks) == (([32, 16] if zero32 >= 0.6 else [16]), "")
    assert _choose.bsr_blocks(w, (8, 4)) == ([8], "")


def test_sparsify_huge_min_speedup_replaces_nothing_and_reports() -> None:
    net = mlp(0.9)
    x = torch.randn(16, 64)
    before = net(x).detach()
    report = sparsify_(net, x, min_speedup=1e9, runs=20)
    assert isinstance(report, SparsifyReport)
    assert report.replaced == ()
    assert all(type(m) is nn.Linear for m in net if not isinstance(m, nn.ReLU))
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    assert report.threads == torch.get_num_threads() == 1
    assert report.runs == 20 and report.device == "cpu" and report.min_speedup == 1e9
    assert [r.name for r in report.layers] == ["0", "2", "4"]
    for row in report.layers:
        assert isinstance(row, LayerChoice)
        assert row.kind == "Linear" and not row.replaced
        assert row.sparsity == pytest.approx(0.9, abs=0.01)
        assert row.dense_ms > 0 and row.sparse_ms > 0
        assert row.layout in ("csr", "bsr")
        assert row.speedup == pytest.approx(row.dense_ms / row.sparse_ms)
        assert "speedup below min_speedup=1e+09" in row.note
    assert report.layers[0].input_shape == (16, 64)
    assert report.layers[2].note.startswith("bsr: 10x32 not divisible by 32/16/8/4")
    assert report.layers[0].note.startswith("bsr: ")  # 90% unstructured: BSR not worth timing
    text = report.render()
    assert str(report) == text
    assert "1 threads, cpu" in text and text.count("\n| ") == 4  # header + 3 layers


def test_sparsify_then_densify_keeps_outputs() -> None:
    net = mlp(0.9)
    net.train()
    net[3].eval()  # mixed modes survive
    x = torch.randn(2, 5, 64)
    before = net(x).detach()
    report = sparsify_(net, x, min_speedup=1e-9, runs=20, blocksize=8)
    assert report.replaced == ("0", "2", "4")
    assert all(isinstance(net[i], SparseLinear) for i in (0, 2, 4))
    assert net.training and net[0].training and not net[3].training  # modes restored
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, **TOL)
    assert densify_(net) == ["0", "2", "4"]
    assert all(type(net[i]) is nn.Linear for i in (0, 2, 4))
    torch.testing.assert_close(net(x), before, **TOL)


def test_sparsify_skips_dense_layers_and_unused_ones() -> None:
    net = mlp(0.9)
    with torch.no_grad():
        net[2].weight.fill_(1.0)  # dense again
    net[1].unused = sparse_linear(10, 10, 0.9)  # held by a ReLU, which never calls it
    report = sparsify_(net, torch.randn(4, 64), min_speedup=1e-9, runs=20)
    rows = {r.name: r for r in report.layers}
    assert report.replaced == ("0", "4")
    assert rows["2"].note == "sparsity below min_sparsity=0.5" and rows["2"].dense_ms is None
    assert rows["1.unused"].note == "not called by example_inputs"
    assert rows["1.unused"].input_shape is None and not rows["1.unused"].replaced


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        sparse_conv(8, 16, 1, sparsity=0.9),
        sparse_conv(16, 16, 3, sparsity=0.9, padding=1),
        sparse_conv(16, 16, 3, sparsity=0.9, padding=1, groups=2),
        sparse_conv(16, 16, 3, sparsity=0.9, padding=1, padding_mode="reflect"),
        sparse_conv(16, 16, (3, 1), sparsity=0.9, stride=2, dilation=2),
    )


def test_sparsify_shared_layer_and_convs() -> None:
    shared = sparse_linear(16, 16, 0.9)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(2))  # (N, 16, 16)
    net = conv_net()
    net.extend([pool, nn.Sequential(shared), shared])
    x = torch.randn(2, 8, 9, 9)
    before = net(x).detach()
    report = sparsify_(net, x, min_speedup=1e-9, runs=20, layouts=("csr",))
    rows = {r.name: r for r in report.layers}
    assert {n: r.kind for n, r in rows.items()} == {
        "0": "Conv2d 1x1",
        "1": "Conv2d 3x3",
        "2": "Conv2d 3x3",
        "3": "Conv2d 3x3",
        "4": "Conv2d 3x1",
        "6.0": "Linear",
    }
    assert report.replaced == ("0", "1", "4", "6.0")
    assert rows["2"].note.startswith("groups=2") and rows["2"].dense_ms is None
    assert rows["3"].note.startswith("padding_mode='reflect'") and rows["3"].dense_ms is None
    assert rows["1"].input_shape == (2, 16, 9, 9) and rows["1"].layout == "csr"
    assert all(isinstance(net[i], SparseConv2d) for i in (0, 1, 4))
    assert type(net[2]) is nn.Conv2d and type(net[3]) is nn.Conv2d
    assert isinstance(net[6][0], SparseLinear) and net[7] is net[6][0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, **TOL)
    (line,) = [t for t in report.render().splitlines() if t.startswith("| 2 |")]
    assert line.startswith("| 2 | Conv2d 3x3 | - | 0.") and "| - | no | groups=2" in line
    assert densify_(net) == ["0", "1", "4", "6.0"]
    assert all(type(m) is nn.Conv2d for m in net[:5])
    assert net[7] is net[6][0] and type(net[7]) is nn.Linear
    torch.testing.assert_close(net(x), before, **TOL)


def fake_timer(ms: dict):
    """A stand-in for measure_latencies: each module's median is ``ms[its kind]``."""
    calls = []

    def measure(modules, x, runs, warmup):
        calls.append([type(m).__name__ for m in modules])

        def kind(m):
            if isinstance(m, (SparseLinear, SparseConv2d)):
                return m.layout if m.blocksize is None else f"bsr{m.blocksize[0]}"
            return "dense"

        return [SimpleNamespace(median_ms=ms[kind(m)]) for m in modules]

    return measure, calls


def test_sparsify_conv_follows_the_measurement(monkeypatch) -> None:
    net = nn.Sequential(conv_net()[1])  # a 3x3 conv, 90% sparse
    x = torch.randn(1, 16, 8, 8)
    before = net(x).detach()
    measure, calls = fake_timer({"dense": 1.0, "csr": 1.2})
    monkeypatch.setattr(_choose, "measure_latencies", measure)
    report = sparsify_(net, x, runs=20)  # default min_speedup 1.1: sparse measured slower
    (row,) = report.layers
    assert calls == [["Conv2d", "SparseConv2d"]]  # BSR not worth timing at 90% unstructured
    assert not row.replaced and row.speedup == pytest.approx(1 / 1.2)
    assert "speedup below min_speedup=1.1" in row.note and type(net[0]) is nn.Conv2d
    measure, calls = fake_timer({"dense": 1.0, "csr": 0.5})
    monkeypatch.setattr(_choose, "measure_latencies", measure)
    report = sparsify_(net, x, runs=20)
    assert report.replaced == ("0",) and report.layers[0].speedup == pytest.approx(2.0)
    assert isinstance(net[0], SparseConv2d) and net[0].kernel_size == (3, 3)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, **TOL)
    densify_(net)
    assert type(net[0]) is nn.Conv2d and net[0].padding == (1, 1)


def block_linear(inp: int, out: int, block: int, zero: float) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(inp, out)
    keep = torch.rand(out // block, inp // block) >= zero
    keep[0, 0] = True
    with torch.no_grad():
        layer.weight.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1))
    return layer


def test_sparsify_bsr_block_size_that_fits(monkeypatch) -> None:
    # 48x40: 16 does not divide 40; 8x8 blocks, ~90% of them zero: BSR 8x8 is timed, not 4x4
    net = nn.Sequential(block_linear(40, 48, 8, 0.9))
    x = torch.randn(4, 40)
    before = net(x).detach()
    report = sparsify_(net, x, layouts=("bsr",), min_speedup=1e-9, runs=20)
    (row,) = report.layers
    assert row.replaced and row.layout == "bsr" and row.blocksize == 8
    assert net[0].blocksize == (8, 8)
    assert "| bsr 8x8 |" in report.render()
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, **TOL)
    densify_(net)
    # with CSR and 4x4 (half the 8x8 block area gone), measurement picks: here the fake says 4x4
    net = nn.Sequential(block_linear(40, 48, 4, 0.85))
    measure, calls = fake_timer({"dense": 1.0, "csr": 0.8, "bsr8": 0.9, "bsr4": 0.6})
    monkeypatch.setattr(_choose, "measure_latencies", measure)
    kept, _ = _choose.bsr_blocks(net[0].weight.detach(), _choose.BSR_BLOCKS)
    report = sparsify_(net, x, runs=20)
    assert calls == [["Linear", "SparseLinear"] + ["SparseLinear"] * len(kept)]
    assert 4 in kept and len(kept) <= _choose.MAX_BSR_TRIES
    assert report.layers[0].blocksize == 4 and net[0].blocksize == (4, 4)


def test_sparsify_reverts_everything_when_the_model_output_changes(monkeypatch) -> None:
    net = mlp(0.9)
    x = torch.randn(4, 64)
    # layer checks pass (rtol 1e-4), the whole-model check (rtol 1e-3) is made to fail
    monkeypatch.setattr(_choose, "max_mismatch", lambda got, want, rtol: 2.0 * (rtol == 1e-3))
    with pytest.raises(PruningError, match="model left dense"):
        sparsify_(net, x, min_speedup=1e-9, runs=20)
    assert all(type(net[i]) is nn.Linear for i in (0, 2, 4))


def test_sparsify_config_errors() -> None:
    net = mlp()
    x = torch.randn(2, 64)
    with pytest.raises(ConfigError, match="layouts"):
        sparsify_(net, x, layouts=("coo",))
    with pytest.raises(ConfigError, match="runs=5"):
        sparsify_(net, x, runs=5)
    with pytest.raises(ConfigError, match="min_sparsity"):
        sparsify_(net, x, min_sparsity=1.5)
    with pytest.raises(ConfigError, match="min_speedup"):
        sparsify_(net, x, min_speedup=0)
    for bad in (0, (), (16, "8"), 2.0):
        with pytest.raises(ConfigError, match=r"blocksize=.*e\.g\. \(32, 16, 8, 4\)"):
            sparsify_(net, x, blocksize=bad)


def test_nm_pattern() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0], [0.0] * 7 + [1.0]])
    assert nm_pattern(w, 2, 4)
    assert nm_pattern(w, 1, 2) is True  # pairs (1, 0), (2, 0), (0, 0), (0, 3)
    assert nm_pattern(w, 1, 4) is False  # (1, 0, 2, 0) holds two
    assert not nm_pattern(torch.ones(2, 8), 2, 4)
    assert not nm_pattern(torch.zeros(2, 6), 2, 4)  # 6 inputs: no whole groups of 4
    assert nm_pattern(torch.zeros(4, 2, 2, 2), 2, 4)  # conv rows are in x k x k = 8
    net = nn.Linear(64, 16)
    prune_(net, UnstructuredConfig(nm="2:4"))
    assert nm_pattern(net.weight) and not nm_pattern(net.weight, 1, 4)
    with pytest.raises(ConfigError, match="0 < N < M"):
        nm_pattern(w, 4, 4)


def test_semi_structured_cpu_error() -> None:
    net = nn.Sequential(nn.Linear(64, 64)).half()
    prune_(net, UnstructuredConfig(nm="2:4"))
    with pytest.raises(ConfigError, match=r"CUDA GPU with compute capability >= 8\.0.*on cpu"):
        to_semi_structured_(net)
    assert type(net[0].weight) is nn.Parameter and net[0].weight.layout == torch.strided


def test_semi_structured_plan_skip_logic() -> None:
    rows, cols = min_shape(torch.float16)
    net = nn.Sequential(
        nn.Linear(2 * cols, 2 * rows),  # fits
        nn.Linear(2 * rows, 10),  # 10 outputs: a multiple of no backend's minimum
        nn.Linear(10, 2 * cols),  # 10 inputs: not even whole groups of 4
    )
    prune_(net, UnstructuredConfig(nm="2:4", exclude=("2",)))
    net.append(nn.Linear(2 * cols, 2 * rows))  # dense, not 2:4
    net.half()
    plan = semi_structured_plan(net)
    assert plan["0"] == ""
    assert plan["1"].startswith(f"weight 10x{2 * rows} is not a multiple of {rows}x{cols}")
    assert plan["2"] == NOT_2_4 and plan["3"] == NOT_2_4
    assert semi_structured_plan(net.float())["0"].startswith("dtype torch.float32")


def _capable_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _capable_gpu(), reason="needs a CUDA GPU of compute capability >= 8.0")
def test_semi_structured_gpu_mlp() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU())
    net.append(nn.Linear(128, 10))
    prune_(net, UnstructuredConfig(nm="2:4"))
    net = net.half().cuda().eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        before = net(x)
        with pytest.warns(UserWarning, match="4: weight 10x128"):
            converted = to_semi_structured_(net)
        after = net(x)
    assert converted == ["0", "2"]
    assert type(net[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)


def test_min_shape_falls_back_to_documented_shapes_without_the_private_table(monkeypatch) -> None:
    from secateur.runtime import _semi_structured as semi

    backend = semi._backend()
    expected = min_shape(torch.float16)
    monkeypatch.delattr(backend, "_DTYPE_SHAPE_CONSTRAINTS")
    assert semi.min_shape(torch.float16) == expected
    assert semi.min_shape(torch.float32) is None or backend.__name__.endswith("CUTLASS")


def test_semi_structured_bookkeeping_with_stand_in_kernels(monkeypatch) -> None:
    """The conversion loop on CPU, the CUDA kernel replaced by stand-ins and checked by the real
    probe: a layer whose kernel agrees is converted (and frozen), one whose kernel fails or
    disagrees stays dense and is named in the one warning, a dense layer is left alone."""
    from secateur.runtime import _semi_structured as semi

    rows, cols = min_shape(torch.float16)
    net = nn.Sequential(*(nn.Linear(2 * cols, 2 * cols) for _ in range(3)), nn.Linear(2 * cols, 4))
    prune_(net, UnstructuredConfig(nm="2:4", exclude=("3",)))
    net.half()

    def stand_in(weight: torch.Tensor) -> torch.Tensor:
        if torch.equal(weight, net[1].weight):
            raise RuntimeError("CUDA error: no kernel image\nsecond line")
        if torch.equal(weight, net[2].weight):
            return torch.zeros_like(weight)  # a kernel that computes something else
        return weight.detach().clone()

    monkeypatch.setattr(semi, "_check_devices", lambda linears: None)
    monkeypatch.setattr(semi, "_convert", stand_in)
    with pytest.warns(UserWarning) as caught:
        converted = semi.to_semi_structured_(net)
    assert converted == ["0"]
    assert not net[0].weight.requires_grad and net[1].weight.requires_grad
    (message,) = [str(w.message) for w in caught]
    assert "1: kernel failed: CUDA error: no kernel image" in message
    assert "second line" not in message
    assert "2: kernel output differs from the dense product" in message
    assert "3:" not in message  # not 2:4: silently dense
