"""runtime/: sparse Linear/1x1-conv equal their dense originals, sparsify_ decides and reverts
cleanly, 2:4 semi-structured checks (CPU error path, pattern, skip logic; conversion on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur import UnstructuredConfig, prune_
from secateur.errors import ConfigError, PruningError
from secateur.runtime import (
    LayerChoice,
    SparseConv1x1,
    SparseLinear,
    SparsifyReport,
    _choose,
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


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(1, 16, 5, 6), (3, 16, 5, 6), (16, 4, 4)])
@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_sparse_conv1x1_equals_dense(stride: int, shape: tuple[int, ...], layout: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1, stride=stride)
    with torch.no_grad():
        conv.weight.masked_fill_(torch.rand_like(conv.weight) < 0.8, 0.0)
    sparse = SparseConv1x1.from_dense(conv, layout=layout, blocksize=4)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), **TOL)
    back = sparse.to_dense()
    assert back.stride == conv.stride and back.kernel_size == (1, 1)
    assert torch.equal(back.weight, conv.weight)


def test_sparse_conv1x1_refuses_other_convs() -> None:
    with pytest.raises(ConfigError, match=r"kernel \(3, 3\) is not 1x1"):
        SparseConv1x1.from_dense(nn.Conv2d(4, 4, 3))
    with pytest.raises(ConfigError, match="groups=2"):
        SparseConv1x1.from_dense(nn.Conv2d(4, 4, 1, groups=2))


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
    assert report.layers[2].note.startswith("bsr: 10x32 not divisible by 16")
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


def test_sparsify_shared_layer_and_1x1_conv() -> None:
    torch.manual_seed(0)
    shared = sparse_linear(16, 16, 0.9)
    conv1, conv3 = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        conv1.weight.masked_fill_(torch.rand_like(conv1.weight) < 0.9, 0.0)
        conv3.weight.masked_fill_(torch.rand_like(conv3.weight) < 0.9, 0.0)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(2))  # (N, 16, 16)
    net = nn.Sequential(conv1, conv3, pool, nn.Sequential(shared), shared)
    x = torch.randn(2, 8, 6, 6)
    before = net(x).detach()
    report = sparsify_(net, x, min_speedup=1e-9, runs=20, layouts=("csr",))
    kinds = {r.name: r.kind for r in report.layers}
    assert kinds == {"0": "Conv2d 1x1", "3.0": "Linear"}  # 3x3 conv is no candidate
    assert isinstance(net[0], SparseConv1x1) and type(net[1]) is nn.Conv2d
    assert isinstance(net[3][0], SparseLinear) and net[4] is net[3][0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, **TOL)
    assert densify_(net) == ["0", "3.0"]
    assert type(net[0]) is nn.Conv2d and net[4] is net[3][0] and type(net[4]) is nn.Linear


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
