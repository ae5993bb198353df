"""ONNX export checked against PyTorch, the ONNX Runtime runner, and ONNX latency in Metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_small_configs import QWEN3_5_DELTANET
from secateur import create_model
from secateur.errors import ArtifactError, ConfigError, OutputError
from secateur.export import OnnxExport, export_onnx
from secateur.export._onnx import longest_run
from secateur.measure import Metrics, OnnxRunner, measure, measure_latencies
from secateur.pruning import StructuredConfig, prune_
from secateur.report._rows import cells
from secateur.training import evaluate

pytest.importorskip("onnxruntime")

ATOL = 1e-4  # fp32 ONNX Runtime vs PyTorch: same maths, different summation order


def _inputs(name: str, batch: int) -> torch.Tensor:
    shape = (1, 28, 28) if name.startswith("lenet") else (3, 32, 32)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("lenet"):
        return create_model(name).eval()
    base = name.removeprefix("pruned_")
    model = create_model(base, in_channels=3, image_size=32).eval()
    if name.startswith("pruned_"):
        prune_(model, StructuredConfig(ratio=0.5), example_inputs=_inputs(base, 2))
    return model


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "pruned_resnet20"])
def test_round_trip_equals_pytorch_at_another_batch(tmp_path, name: str) -> None:
    model = _model(name)
    out = export_onnx(model, _inputs(name, 1), tmp_path / "m.onnx")
    assert out == OnnxExport(tmp_path / "m.onnx", 17, ("input",), ("output",), out.max_abs_diff)
    assert out.max_abs_diff is not None and 0 <= out.max_abs_diff < ATOL
    x = _inputs(name, 3)  # exported at batch 1, run at batch 3
    with torch.no_grad():
        expected = model(x)
    got = OnnxRunner(out.path, threads=1)(x)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=ATOL)


def test_pruned_export_is_smaller_than_dense(tmp_path) -> None:
    dense = export_onnx(_model("resnet20"), _inputs("resnet20", 1), tmp_path / "d.onnx")
    pruned = export_onnx(_model("pruned_resnet20"), _inputs("resnet20", 1), tmp_path / "p.onnx")
    ratio = pruned.path.stat().st_size / dense.path.stat().st_size
    assert 0.2 < ratio < 0.35  # half the channels of both convs in a block: about a quarter


@pytest.mark.filterwarnings("ignore:Exporting aten")  # aten::index on positions, never < 0
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_tiny_hf_models_export_with_keyword_inputs(tmp_path, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    if family == "bert":
        options = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
        config = transformers.AutoConfig.for_model(
            "bert", vocab_size=100, intermediate_size=64, num_labels=3, **options
        )
        auto = transformers.AutoModelForSequenceClassification
    else:
        config = transformers.AutoConfig.for_model(
            "gpt2", vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16
        )
        auto = transformers.AutoModelForCausalLM
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = export_onnx(model, x, tmp_path / f"{family}.onnx")
    assert out.input_names == ("input_ids", "attention_mask")
    assert out.output_names == ("output",)  # the logits; no KV cache
    assert out.max_abs_diff is not None and out.max_abs_diff < ATOL
    assert getattr(model.config, "use_cache", True)  # only the exported copy lost its cache
    more = torch.randint(1, 100, (5, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=more, attention_mask=torch.ones_like(more)).logits
    got = OnnxRunner(out.path)(input_ids=more, attention_mask=torch.ones_like(more))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=ATOL)


@pytest.mark.filterwarnings("ignore:Exporting aten")
def test_dynamic_sequence_runs_any_length_and_padding(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "bert", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = export_onnx(model, x, tmp_path / "encoder.onnx", dynamic_sequence=True)
    assert out.output_names == ("output_0", "output_1")  # last_hidden_state, pooler_output
    runner = OnnxRunner(out.path)
    longer = torch.randint(1, 100, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(longer)
    mask[0, 9:] = 0  # a padded row
    with torch.no_grad():
        expected = model(input_ids=longer, attention_mask=mask)
    hidden, pooled = runner(input_ids=longer, attention_mask=mask)
    assert hidden.shape == (3, 13, 32) and pooled.shape == (3, 32)
    torch.testing.assert_close(hidden, expected.last_hidden_state, rtol=1e-3, atol=ATOL)
    torch.testing.assert_close(pooled, expected.pooler_output, rtol=1e-3, atol=ATOL)
    # without it, the sequence length is fixed at the example's
    fixed = export_onnx(model, x, tmp_path / "fixed.onnx")
    with pytest.raises(ConfigError, match="rejects these inputs"):
        OnnxRunner(fixed.path)(input_ids=longer, attention_mask=mask)
    with pytest.raises(ConfigError, match="dynamic_sequence needs an input of shape"):
        export_onnx(nn.Linear(3, 2), torch.zeros(3), tmp_path / "x.onnx", dynamic_sequence=True)


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": self.fc(a + b), "diff": self.fc(a - b)}


def test_tuple_inputs_and_several_outputs(tmp_path) -> None:
    model = TwoInTwoOut().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    out = export_onnx(model, (a, b), tmp_path / "two.onnx")
    assert (out.input_names, out.output_names) == (("input_0", "input_1"), ("output_0", "output_1"))
    assert model.training  # the user's model keeps its mode and weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    runner = OnnxRunner(out.path)
    a3, b3 = torch.randn(3, 4), torch.randn(3, 4)
    got_sum, got_diff = runner(a3, b3)
    expected = model(a3, b3)
    torch.testing.assert_close(got_sum, expected["sum"], rtol=1e-3, atol=ATOL)
    torch.testing.assert_close(got_diff, expected["diff"], rtol=1e-3, atol=ATOL)
    with pytest.raises(ConfigError, match="needs input 'input_1'"):
        runner(a3)


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)  # a fresh draw in each runtime: outputs cannot agree


class FixedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(int(x.shape[0]), dtype=x.dtype)[:, None]  # int(): a constant


def test_failed_check_leaves_nothing_on_disk(tmp_path, capfd) -> None:
    with pytest.raises(ArtifactError, match="differs from PyTorch") as info:
        export_onnx(Noisy(), torch.zeros(2, 3), tmp_path / "noisy.onnx")
    assert "\n" not in str(info.value)
    capfd.readouterr()
    with pytest.raises(ArtifactError, match="batch of 4"):
        export_onnx(FixedBatch(), torch.zeros(2, 3), tmp_path / "fixed.onnx")
    assert "onnxruntime" not in capfd.readouterr().err  # the one-line error, no runtime log
    assert list(tmp_path.iterdir()) == []
    # the same graph is correct at its own batch size
    out = export_onnx(FixedBatch(), torch.zeros(2, 3), tmp_path / "fixed.onnx", dynamic_batch=False)
    assert out.max_abs_diff == 0.0
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.onnx"]


def test_bad_paths_and_options(tmp_path) -> None:
    model, x = nn.Linear(3, 2), torch.zeros(1, 3)
    with pytest.raises(ConfigError, match=r"must end in \.onnx"):
        export_onnx(model, x, tmp_path / "model.pt")
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write"):
        export_onnx(model, x, blocker / "m.onnx")
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(model, x, tmp_path / "m.onnx", opset=99)
    with pytest.raises(ConfigError, match="example_inputs"):
        export_onnx(model, "text", tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.fixture
def lenet_onnx(tmp_path):
    model = create_model("lenet5").eval()
    return model, export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "lenet5.onnx").path


def test_runner_rejects_missing_truncated_and_corrupt_files(tmp_path, lenet_onnx) -> None:
    _, path = lenet_onnx
    data = path.read_bytes()
    truncated, corrupt = tmp_path / "truncated.onnx", tmp_path / "corrupt.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt.write_bytes(b"\x07not an onnx model" * 64)
    for bad, message in [
        (tmp_path / "missing.onnx", "no ONNX file"),
        (truncated, "truncated or corrupt"),
        (corrupt, "truncated or corrupt"),
    ]:
        with pytest.raises(ArtifactError, match=message) as info:
            OnnxRunner(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="threads"):
        OnnxRunner(path, threads=0)
    with pytest.raises(ConfigError, match="rejects these inputs"):
        OnnxRunner(path)(torch.zeros(1, 3, 28, 28))


def test_runner_describes_itself_and_works_with_evaluate(lenet_onnx) -> None:
    from secateur.data import Split

    model, path = lenet_onnx
    runner = OnnxRunner(path, threads=1)
    assert runner.runtime.startswith("onnxruntime ")
    assert runner.runtime.endswith(" CPUExecutionProvider")
    assert (runner.threads, runner.device, runner.path) == (1, "cpu", path)
    assert runner.eval() is runner and runner.train(True) is runner and not runner.training
    assert OnnxRunner(path).threads == torch.get_num_threads()
    images = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(images).argmax(dim=1)  # PyTorch's answers as the labels
    split = Split(images, labels)
    assert evaluate(runner, split, batch_size=16) == pytest.approx(evaluate(model, split), abs=0.05)
    assert evaluate(runner, split, batch_size=16) >= 0.95


def test_interleaved_latencies_mix_modules_and_runners(lenet_onnx) -> None:
    model, path = lenet_onnx
    runner = OnnxRunner(path, threads=1)
    torch_lat, ort_lat = measure_latencies([model, runner], torch.zeros(4, 1, 28, 28), runs=20)
    assert torch_lat.runtime.startswith("pytorch ")
    assert torch_lat.threads == torch.get_num_threads()
    assert (ort_lat.runtime, ort_lat.threads, ort_lat.device) == (runner.runtime, 1, "cpu")
    assert ort_lat.batch_size == torch_lat.batch_size == 4
    assert 0 < ort_lat.median_ms <= ort_lat.p90_ms


def test_measure_fills_onnx_latency_and_round_trips(lenet_onnx) -> None:
    model, path = lenet_onnx
    metrics = measure(model, torch.zeros(2, 1, 28, 28), latency_runs=20, onnx_path=path)
    assert metrics.latency is not None and metrics.onnx_latency is not None
    assert metrics.onnx_latency.runtime == OnnxRunner(path).runtime
    assert metrics.onnx_latency.batch_size == 2 and metrics.onnx_latency.runs == 20
    again = Metrics.from_dict(json.loads(json.dumps(metrics.to_dict())))
    assert again == metrics
    assert measure(model, torch.zeros(2, 1, 28, 28), latency_runs=20).onnx_latency is None
    rows = {label: (b, a) for label, b, a, _ in cells(metrics, metrics.replace(onnx_latency=None))}
    labels = list(rows)
    assert labels.index("latency, ONNX Runtime median") == labels.index("latency, p90") + 1
    assert rows["latency, ONNX Runtime median"][0].endswith(" ms")
    assert rows["latency, ONNX Runtime median"][1] == "–"


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mixtral", "cohere"])
def test_pruned_hf_decoder_exports_and_matches_any_length(tmp_path, family: str) -> None:
    """A structurally pruned transformers decoder exports with its attention mask (without
    one, transformers builds its mask with torch.diff, which the exporter lacks: the error
    says what to pass) and runs in ONNX Runtime at another batch and length. An MoE model's
    experts export expert by expert, so other tokens are routed to other experts correctly."""
    transformers = pytest.importorskip("transformers")
    import onnxruntime

    config = transformers.AutoConfig.for_model(
        family,
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
        **({"num_local_experts": 4} if family == "mixtral" else {}),
    )
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    implementation = getattr(model.config, "_experts_implementation", None)
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    prune_(model, StructuredConfig(ratio=0.5), example_inputs={"input_ids": ids})
    with pytest.raises(ArtifactError, match="pass attention_mask beside the token ids"):
        export_onnx(model, {"input_ids": ids}, tmp_path / "bare.onnx")
    assert not (tmp_path / "bare.onnx").exists()

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = export_onnx(model, inputs, tmp_path / "m.onnx", dynamic_sequence=True)
    assert out.input_names == ("input_ids", "attention_mask") and out.max_abs_diff < ATOL
    longer = torch.randint(1, 100, (3, 13), generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": longer.numpy(), "attention_mask": torch.ones_like(longer).numpy()}
    (got,) = session.run(None, feed)
    with torch.no_grad():
        expected = model(input_ids=longer).logits
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL, rtol=1e-3)
    assert getattr(model.config, "_experts_implementation", None) == implementation  # untouched


@pytest.mark.filterwarnings("ignore:Exporting aten")
def test_moe_int8_onnx_quantizes_every_expert(tmp_path, monkeypatch, capfd) -> None:
    """The exported experts run one by one, so each expert's matrices are initializers of
    their own and ONNX Runtime's dynamic int8 stores each as 8-bit with scales of its own: no
    float matrix is left, the file shrinks by more than half and the logits stay within a few
    percent. Its shape inference, which gives up on this graph and then saves a temp file in
    the working directory, leaves nothing there, and its warnings about the tensors it leaves
    float (token positions) are not printed."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    transformers = pytest.importorskip("transformers")
    import onnx

    from secateur.quantization import quantize_onnx

    config = transformers.MixtralConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, num_local_experts=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fp32 = export_onnx(model, x, tmp_path / "moe.onnx").path
    capfd.readouterr()
    int8 = quantize_onnx(fp32, tmp_path / "moe.int8.onnx", mode="dynamic")
    assert "Inference failed" not in capfd.readouterr().err  # the quantizer's noise is off
    stored = {i.name: (i.data_type, tuple(i.dims)) for i in onnx.load(str(int8)).graph.initializer}
    # 2 layers of 4 experts, each a gate_up (64, 2 x 128) and a down (128, 64) matrix
    experts = [n for n, (_, dims) in stored.items() if dims in ((64, 256), (128, 64))]
    eight_bit = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
    assert len(experts) == 16 and all(stored[n][0] in eight_bit for n in experts)
    assert not [
        n for n, (kind, dims) in stored.items() if kind == onnx.TensorProto.FLOAT and len(dims) > 1
    ]
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert not list(here.iterdir())
    with torch.no_grad():
        reference = model(**x).logits
    got = OnnxRunner(int8)(**x)
    assert float((got - reference).norm() / reference.norm()) < 0.05


def test_dynamic_sequence_on_an_axis_that_is_not_one_is_a_config_error(tmp_path) -> None:
    model = nn.Conv1d(4, 4, 3).eval()  # axis 1 holds channels
    with pytest.raises(ConfigError, match="does not run with axis 1 of input twice as long"):
        export_onnx(model, torch.zeros(2, 4, 10), tmp_path / "c.onnx", dynamic_sequence=True)
    assert not (tmp_path / "c.onnx").exists()


class PaddedToChunks(nn.Module):
    """Pads the sequence to a multiple of 4, choosing the padding by a Python branch on its
    length: the trace freezes the branch the example's length took."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.lin(x)
        if t % 4:
            h = nn.functional.pad(h, (0, 0, 0, 4 - t % 4))
        h = h.reshape(b, -1, 4, 4).cumsum(2).reshape(b, -1, 4)
        return h[:, :t]


def test_dynamic_sequence_is_checked_at_a_length_that_is_no_multiple(tmp_path) -> None:
    """Twice the example's length is still a multiple of the chunk; one more is not."""
    model = PaddedToChunks().eval()
    with pytest.raises(ArtifactError, match="a sequence of 9: .*without dynamic_sequence"):
        export_onnx(model, torch.randn(2, 8, 4), tmp_path / "p.onnx", dynamic_sequence=True)
    assert not (tmp_path / "p.onnx").exists()
    export_onnx(model, torch.randn(2, 8, 4), tmp_path / "p.onnx")  # at the example's length
    assert OnnxRunner(tmp_path / "p.onnx")(torch.ones(3, 8, 4)).shape == (3, 8, 4)


def test_negative_permute_dims_export(tmp_path) -> None:
    """The exporter writes ``permute``'s negative dimensions into Transpose as they are, which
    ONNX Runtime rejects; they are counted from the front while exporting."""

    class Permuted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, -2, -1, 1) * torch.permute(x, (0, -2, -1, 1))

    x = torch.randn(2, 3, 4, 5)
    export_onnx(Permuted().eval(), x, tmp_path / "p.onnx")
    torch.testing.assert_close(OnnxRunner(tmp_path / "p.onnx")(x), Permuted()(x))


def test_pruned_mamba2_exports_at_its_length_and_refuses_any_length(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.Mamba2Config(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4, num_heads=4,
        head_dim=8, n_groups=1, expand=2, chunk_size=4, conv_kernel=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=ids)
    assert model.backbone.layers[0].mixer.num_heads < 4
    export_onnx(model, {"input_ids": ids}, tmp_path / "m.onnx")  # checked against PyTorch
    with pytest.raises(ArtifactError, match="a sequence of 9"):
        export_onnx(model, {"input_ids": ids}, tmp_path / "any.onnx", dynamic_sequence=True)


class ChunksOf64(nn.Module):
    """A running sum in chunks of 64 tokens, looped over in Python (Gated DeltaNet's scan)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        chunks = F.pad(x, (0, 0, 0, (-t) % 64)).unflatten(1, (-1, 64))
        out = torch.zeros_like(chunks)
        carry = torch.zeros_like(chunks[:, 0, :1])
        for i in range(chunks.shape[1]):
            out[:, i] = chunks[:, i].cumsum(1) + carry
            carry = out[:, i, -1:]
        return out.flatten(1, 2)[:, :t]


def test_a_loop_over_chunks_longer_than_the_example_is_refused_for_any_length(tmp_path) -> None:
    """Twice the example and one more still fit in one chunk; a sequence 257 longer does not,
    and there the frozen loop's file gives other values: refused, nothing written."""
    x = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(0))
    export_onnx(ChunksOf64(), x, tmp_path / "at_12.onnx", dynamic_batch=False)
    with pytest.raises(ArtifactError, match="a sequence of 269.*froze a length"):
        export_onnx(
            ChunksOf64(), x, tmp_path / "any.onnx", dynamic_batch=False, dynamic_sequence=True
        )
    assert not (tmp_path / "any.onnx").exists()


def test_a_longer_check_the_model_refuses_runs_shorter() -> None:
    """RoBERTa's positions start past its padding index: 2 fewer than its config declares.
    Where the model refuses the longer input, the check halves how much longer, never skips."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor]:
        if x.shape[1] > 20:
            raise IndexError("index out of range in self")
        return (x * 2,)

    longer, out = longest_run(run, (torch.arange(8.0).view(1, 8),), 24)
    assert longer[0].shape[1] == 20 and out is not None  # 24 more refused, 12 more ran
    assert torch.equal(longer[0][0, 8:16], torch.arange(8.0))  # the example's own entries
    assert longest_run(run, (torch.zeros(1, 30),), 4)[1] is None  # none ran: no check


class Triangular(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = a + 3 * torch.eye(a.shape[-1])
        return tuple(
            torch.linalg.solve_triangular(a, b if left else b.transpose(-2, -1), upper=upper, left=left, unitriangular=unit)
            for upper in (False, True)
            for left in (True, False)
            for unit in (False, True)
        )  # fmt: skip


def test_triangular_solves_export_as_products_and_torch_is_restored(tmp_path) -> None:
    """ONNX has no triangular solve; the export traces products (the inverse by halves)."""
    solve = torch.linalg.solve_triangular
    model, gen = Triangular(), torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 9, 9, generator=gen), torch.randn(2, 3, 9, 4, generator=gen)
    out = export_onnx(model, (a, b), tmp_path / "tri.onnx", atol=1e-5)
    assert torch.linalg.solve_triangular is solve
    a, b = torch.randn(1, 3, 9, 9, generator=gen), torch.randn(1, 3, 9, 4, generator=gen)
    for got, expected in zip(OnnxRunner(out.path)(a, b), model(a, b), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class UTSystem(nn.Module):
    """Gated DeltaNet's chunk system, ``(I + tril(beta k k^T, -1))^-1``, over 64 tokens."""

    def forward(self, k: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        k = F.normalize(k, dim=-1)
        a = torch.eye(64) + torch.tril(beta[..., None] * (k @ k.transpose(-1, -2)), -1)
        eye = torch.eye(64).expand_as(a)
        return torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)


def test_a_chunk_of_similar_keys_solves_in_onnx_as_in_pytorch(tmp_path) -> None:
    """Repeated tokens give keys alike, where a sum of powers of the triangle grows and cancels
    (off by 1e9 in float32); the inverse by halves stays within float32's error."""
    gen = torch.Generator().manual_seed(0)
    k, beta = torch.randn(2, 64, 16, generator=gen), torch.rand(2, 64, generator=gen)
    out = export_onnx(UTSystem(), (k, beta), tmp_path / "ut.onnx")
    alike = torch.randn(2, 1, 16, generator=gen) + 0.05 * torch.randn(2, 64, 16, generator=gen)
    beta = torch.full((2, 64), 0.9)
    got = OnnxRunner(out.path)(alike, beta)
    torch.testing.assert_close(got, UTSystem()(alike, beta), rtol=1e-4, atol=1e-5)


def test_pruned_qwen3_5_exports_at_its_length_and_refuses_any_length(tmp_path) -> None:
    """Gated DeltaNet's linear attention: solved per chunk of 64 in a Python loop."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "qwen3_5_text", vocab_size=100, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, **QWEN3_5_DELTANET,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=ids)
    attn = model.model.layers[0].linear_attn
    assert (attn.num_k_heads, attn.num_v_heads, attn.head_k_dim, attn.out_proj.in_features) == (
        1,
        2,
        8,
        16,
    )  # the counts follow, the size inside a head stays
    export_onnx(model, x, tmp_path / "q.onnx")  # checked against PyTorch
    with pytest.raises(ArtifactError, match="a sequence of 269"):
        export_onnx(model, x, tmp_path / "any.onnx", dynamic_sequence=True)


def test_a_failed_conversion_prints_no_exporter_graph_dump(tmp_path, capfd) -> None:
    class Diff(nn.Module):  # torch.diff has no ONNX form in the TorchScript exporter
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.diff(x, dim=1)

    with pytest.raises(ArtifactError, match="cannot export Diff to ONNX"):
        export_onnx(Diff(), torch.zeros(2, 5), tmp_path / "d.onnx", check=False)
    captured = capfd.readouterr()
    assert "graph(" not in captured.out + captured.err
    assert not (tmp_path / "d.onnx").exists()


class InterleaveThenView(nn.Module):
    """Cohere's pattern: a table interleaved by repeat_interleave, then a view with -1."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        table = torch.repeat_interleave(x, 2, dim=-1)
        return table, x.repeat_interleave(3, dim=0), y.view(y.shape[0], y.shape[1], -1, 4)


def test_repeat_interleave_exports_beside_a_view_of_minus_one(tmp_path) -> None:
    """The TorchScript exporter's own repeat_interleave rewrote the view's -1 (ONNX Runtime
    then failed to reshape); the export traces it as stacked copies, and torch is restored."""
    functional, method = torch.repeat_interleave, torch.Tensor.repeat_interleave
    model = InterleaveThenView()
    out = export_onnx(model, (torch.randn(3, 4), torch.randn(2, 5, 16)), tmp_path / "ri.onnx")
    assert torch.repeat_interleave is functional and torch.Tensor.repeat_interleave is method
    x, y = torch.randn(5, 4), torch.randn(3, 5, 16)
    for got, expected in zip(OnnxRunner(out.path)(x, y), model(x, y), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class SplitAtALength(nn.Module):
    """transformers 5.25's Mamba2: a sequence split at an index read off its shape."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        head, tail = torch.tensor_split(x, [x.shape[1] - 2], dim=1)
        parts = x.tensor_split([1, 3], dim=-1)
        return head.sum(1), tail * 2, *parts


def test_tensor_split_at_a_traced_length_exports_as_slices(tmp_path) -> None:
    """The exporter's conversion split into equal sections with a Tile ONNX Runtime rejects;
    the export traces slices, which also follow another sequence length; torch is restored."""
    functional, method = torch.tensor_split, torch.Tensor.tensor_split
    model = SplitAtALength()
    out = export_onnx(model, torch.randn(2, 6, 5), tmp_path / "ts.onnx", dynamic_sequence=True)
    assert torch.tensor_split is functional and torch.Tensor.tensor_split is method
    x = torch.randn(3, 9, 5)
    for got, expected in zip(OnnxRunner(out.path)(x), model(x), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_branch_the_examples_values_took_is_caught(tmp_path) -> None:
    """A trace keeps the branch the example's values chose; the check on other values (here
    the features flipped) finds it and nothing is written."""

    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if bool(x[0, 0] > x[0, -1]) else x - 1

    x = torch.tensor([[3.0, 2.0, 1.0]])
    with pytest.raises(ArtifactError, match="on inputs with other values"):
        export_onnx(Branchy().eval(), x, tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


def test_other_values_vary_ids_and_features_only() -> None:
    from secateur.export._onnx import _other_values

    ids = torch.tensor([[5, 6, 7]])
    mask, types = torch.tensor([[1, 1, 0]]), torch.tensor([[0, 1, 1]])
    features = torch.tensor([[[1.0, 2.0]]])
    names = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
    varied = _other_values((ids, mask, types, features), names)
    assert varied is not None
    assert varied[0].tolist() == [[7, 5, 6]] and varied[3].tolist() == [[[2.0, 1.0]]]
    assert varied[1] is mask and varied[2] is types
    # nothing can be varied: constant ids, a symmetric feature row
    assert _other_values((torch.zeros(1, 4, dtype=torch.long),), ("input_ids",)) is None
    assert _other_values((torch.ones(1, 3),), ("input",)) is None


def test_a_model_that_refuses_other_values_still_exports(tmp_path) -> None:
    """The check on other values compares runtimes; a model that rejects such inputs itself
    is exported without that check, not refused."""

    class Ordered(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x[0, 0] < x[0, -1]):
                raise ValueError("features must come in descending order")
            return x * 2

    out = export_onnx(Ordered().eval(), torch.tensor([[3.0, 2.0, 1.0]]), tmp_path / "o.onnx")
    assert out.path.exists()


def test_expm1_exports_at_any_opset_and_is_put_back(tmp_path) -> None:
    """The TorchScript exporter cannot convert ``expm1`` (Apertus's xIELU calls it): it is
    traced as ``exp(x) - 1``, at an opset below 15 too, and restored afterwards."""
    from secateur.export import export_onnx

    class Activation(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return torch.expm1(torch.min(h, torch.tensor(-1e-6))) + h.expm1()

    functional, method = torch.expm1, torch.Tensor.expm1
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    out = export_onnx(Activation().eval(), x, tmp_path / "m.onnx", opset=13)
    assert out.max_abs_diff < 1e-5
    assert torch.expm1 is functional and torch.Tensor.expm1 is method


class _ComplexRotary(torch.nn.Module):
    """Llama 4's rotary embedding: a ``torch.polar`` table, pairs of dims viewed as complex,
    a complex product (and one by a real scale), back through ``view_as_real``."""

    def __init__(self, extra: str = "") -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (batch, tokens, 8)
        angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * torch.ones(4) * 0.3
        table = torch.polar(torch.ones_like(angles), angles) * 0.5
        pairs = torch.view_as_complex(h.float().reshape(*h.shape[:-1], -1, 2))
        turned = (1j * pairs) * table[None, :, :].to(pairs.device)
        if self.extra == "abs":
            return turned.abs()
        if self.extra == "cast":  # PyTorch keeps the real part: not traced as pairs
            return turned.to(torch.float32)
        return torch.view_as_real(turned).flatten(2) + turned.real.sum(-1, keepdim=True)


def test_complex_rotary_products_export_as_real_pairs(tmp_path) -> None:
    """ONNX has no complex numbers: products of complex values are traced on (real, imaginary)
    pairs, so the export's outputs match PyTorch's."""
    from secateur.export import export_onnx

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    out = export_onnx(_ComplexRotary().eval(), x, tmp_path / "m.onnx")
    assert out.max_abs_diff < 1e-5


@pytest.mark.parametrize(
    ("extra", "match"),
    [("abs", "cannot export 'abs' on complex numbers"), ("cast", "to a real dtype")],
)
def test_other_complex_operations_are_refused_in_one_line(tmp_path, extra, match) -> None:
    from secateur.errors import ArtifactError
    from secateur.export import export_onnx

    x = torch.randn(2, 5, 8)
    with pytest.raises(ArtifactError, match=match) as err:
        export_onnx(_ComplexRotary(extra).eval(), x, tmp_path / "m.onnx")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


def test_a_cumsum_of_booleans_runs_in_onnx_runtime_and_is_put_back(tmp_path) -> None:
    """transformers' chunked attention mask counts left padding with a cumsum of booleans,
    which ONNX Runtime's CumSum does not take: it is traced on integers."""
    from secateur.export import export_onnx

    class Padding(torch.nn.Module):
        def forward(self, mask: torch.Tensor) -> torch.Tensor:
            return (mask.bool().cumsum(-1) == 0).sum(-1) + torch.cumsum(mask > 0, dim=-1)[:, -1]

    functional, method = torch.cumsum, torch.Tensor.cumsum
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = export_onnx(Padding().eval(), mask, tmp_path / "m.onnx")
    assert out.max_abs_diff == 0
    assert torch.cumsum is functional and torch.Tensor.cumsum is method
