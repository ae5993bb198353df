"""ONNX export of encoder-decoders as an encoder file and a decoder file with its caches, and
greedy generation with the pair in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secateur.errors import ArtifactError, ConfigError
from secateur.export import export_seq2seq_onnx
from secateur.measure import OnnxGenerator, OnnxSeq2SeqGenerator
from secateur.pruning import StructuredConfig, prune_

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

VOCAB = 100
BART_LIKE = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=64,
)
FAMILIES = {
    "t5": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
    "bart": BART_LIKE,
    "marian": BART_LIKE,
    # its decoder reads router_logits from encoder_outputs (both layers are dense here: a
    # sparse layer comes every 4th)
    "nllb-moe": dict(BART_LIKE, num_experts=4, expert_capacity=16),
}


def _model(family: str) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family])
    config.pad_token_id = config.bos_token_id = config.decoder_start_token_id = 0
    config.eos_token_id = 1
    # a forced last token is a logits processor, which the generator does not apply
    config.forced_eos_token_id = None
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the initialiser's: tokens then follow the input
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(std=0.3)
    return model


def _inputs(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _padded() -> dict[str, torch.Tensor]:
    """Three inputs of 9 tokens, the second padded on the right by 3."""
    inputs = _inputs(3, 9, 5)
    inputs["input_ids"][1, -3:] = 0
    inputs["attention_mask"][1, -3:] = 0
    return inputs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_seq2seq_generates_in_onnx_runtime_as_in_pytorch(tmp_path, family: str) -> None:
    model = _model(family)
    example = _inputs(2, 7, 0)
    decoder_ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    prune_(
        model,
        StructuredConfig(ratio=0.5),
        example_inputs={**example, "decoder_input_ids": decoder_ids},
    )
    out = export_seq2seq_onnx(model, example, tmp_path / "onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["decoder.onnx", "encoder.onnx"]
    assert out.encoder.max_abs_diff < 1e-4 and out.decoder.max_abs_diff < 1e-4
    assert out.decoder_start_token_id == 0
    assert out.encoder.output_names[:2] == ("encoder_hidden_states", "present.0.encoder.key")
    assert "past_key_values.1.decoder.value" in out.decoder.input_names
    assert out.decoder.output_names[-1] == "present.1.decoder.value"

    generator = OnnxSeq2SeqGenerator(tmp_path / "onnx", threads=1)
    inputs = _padded()
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    got = generator.generate(inputs, max_new_tokens=8, eos_token_id=1, pad_token_id=0)
    assert torch.equal(got, expected)


def test_the_encoder_file_holds_none_of_the_decoders_other_weights(tmp_path) -> None:
    """The encoder file runs one decoder step only for its cross-attention keys and values:
    the exporter drops the rest, so the decoder's own layers and the LM head are not stored
    twice."""
    import onnx

    model = _model("t5")
    out = export_seq2seq_onnx(model, _inputs(1, 6, 0), tmp_path / "onnx")
    needed = sum(p.numel() for p in model.get_encoder().parameters()) + sum(
        p.numel()
        for n, p in model.get_decoder().named_parameters()
        if "EncDecAttention.k." in n or "EncDecAttention.v." in n
    )
    everything = sum(p.numel() for p in model.parameters())
    graph = onnx.load(str(out.encoder.path)).graph
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert needed * 0.95 < stored < needed * 1.05
    assert stored < 0.7 * everything


def test_generation_stops_at_the_end_token_and_takes_bare_ids(tmp_path) -> None:
    model = _model("bart")
    out = export_seq2seq_onnx(model, _inputs(1, 6, 0), tmp_path / "onnx")
    generator = OnnxSeq2SeqGenerator(out.decoder.path.parent)
    ids = _inputs(1, 6, 3)["input_ids"]
    first = int(generator.generate(ids, max_new_tokens=1)[0, -1])
    stopped = generator.generate(ids, max_new_tokens=10, eos_token_id=first)
    assert stopped.shape == (1, 2) and int(stopped[0, -1]) == first
    assert generator.generate(ids, max_new_tokens=10).shape == (1, 11)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generator.generate(ids, max_new_tokens=0)


def test_bad_inputs_and_models_are_one_line_config_errors(tmp_path) -> None:
    model = _model("t5")
    ids = _inputs(1, 6, 0)["input_ids"]
    folder = tmp_path / "onnx"
    cases = [
        ({"decoder_input_ids": ids}, "takes example_inputs"),
        ({"input_ids": ids, "decoder_input_ids": ids}, "not 'decoder_input_ids'"),
        ({"input_ids": ids[:, :1]}, "at least 2 tokens"),
        ({"input_ids": ids, "attention_mask": ids[:, :3]}, "input_ids' shape"),
    ]
    for inputs, message in cases:
        with pytest.raises(ConfigError, match=message):
            export_seq2seq_onnx(model, inputs, folder)
    decoder_only = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(
            "llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(ConfigError, match="use export_decoder_onnx"):
        export_seq2seq_onnx(decoder_only, {"input_ids": ids}, folder)
    with pytest.raises(ConfigError, match="bfloat16"):
        export_seq2seq_onnx(_model("t5").to(torch.bfloat16), {"input_ids": ids}, folder)
    model.generation_config.decoder_start_token_id = None
    model.config.decoder_start_token_id = None
    with pytest.raises(ConfigError, match="decoder_start_token_id"):
        export_seq2seq_onnx(model, {"input_ids": ids}, folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_seq2seq_onnx(_model("t5"), {"input_ids": ids}, tmp_path / "file")
    assert not folder.exists()


def test_generators_refuse_each_others_files(tmp_path) -> None:
    out = export_seq2seq_onnx(_model("t5"), _inputs(1, 6, 0), tmp_path / "onnx")
    with pytest.raises(ArtifactError, match="export_decoder_onnx"):
        OnnxGenerator(out.decoder.path)
    (tmp_path / "swapped").mkdir()
    (tmp_path / "swapped" / "encoder.onnx").write_bytes(out.decoder.path.read_bytes())
    (tmp_path / "swapped" / "decoder.onnx").write_bytes(out.encoder.path.read_bytes())
    with pytest.raises(ArtifactError, match="export_seq2seq_onnx"):
        OnnxSeq2SeqGenerator(tmp_path / "swapped")
    with pytest.raises(ArtifactError):
        OnnxSeq2SeqGenerator(tmp_path / "missing")
    generator = OnnxSeq2SeqGenerator(out.decoder.path.parent)
    with pytest.raises(ConfigError, match="needs input 'input_ids'"):
        generator.generate({"input_features": torch.zeros(1, 2, 3)})


def test_pruned_whisper_generates_from_input_features(tmp_path) -> None:
    """Whisper's encoder takes fixed frames and no mask; its decoder reads the encoder only
    through the cached cross-attention keys and values, so its file has no
    encoder_hidden_states input."""
    from transformers import GenerationMixin

    config = transformers.AutoConfig.for_model(
        "whisper",
        **{k: v for k, v in BART_LIKE.items() if k != "max_position_embeddings"},
        vocab_size=VOCAB,
        num_mel_bins=16,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=3,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(std=0.3)
    features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    decoder_ids = torch.tensor([[3, 5, 6]] * 2)
    prune_(
        model,
        StructuredConfig(ratio=0.5),
        example_inputs={"input_features": features, "decoder_input_ids": decoder_ids},
    )
    out = export_seq2seq_onnx(model, {"input_features": features}, tmp_path / "onnx")
    assert out.encoder.input_names == ("input_features",)
    assert "encoder_hidden_states" not in out.decoder.input_names
    assert out.decoder_start_token_id == 3

    other = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    got = OnnxSeq2SeqGenerator(tmp_path / "onnx").generate(
        {"input_features": other}, max_new_tokens=8, eos_token_id=1, pad_token_id=0
    )
    with torch.no_grad():  # transformers' plain greedy search, not Whisper's own generate
        expected = GenerationMixin.generate(
            model, input_features=other, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert torch.equal(got, expected)


def test_a_failed_check_leaves_nothing_on_disk(tmp_path) -> None:
    folder = tmp_path / "onnx"
    with pytest.raises(ArtifactError, match="differs from PyTorch"):
        export_seq2seq_onnx(_model("bart"), _inputs(2, 6, 0), folder, rtol=0.0, atol=0.0)
    assert not folder.exists()


def test_the_far_check_retries_shorter_where_the_encoder_refuses_the_declared_length() -> None:
    """RoBERTa-like position tables end before the config's limit: the check far past the
    example then runs as much longer as the encoder takes, rather than not at all."""
    from secateur.export._onnx_seq2seq import _variants

    class Refusing:
        model = _model("bart")  # declares 64 positions

        def __call__(self, ids, mask):
            if ids.shape[1] > 30:
                raise IndexError("index out of range in self")
            return (ids.float(),)

    variants = _variants(Refusing(), _inputs(1, 6, 0))
    far = [name for name in variants if name.endswith("tokens longer")]
    assert far == ["an input 14 tokens longer"]  # 58, then 29, then 14: 20 tokens run
    inputs, encoded = variants[far[0]]
    assert inputs["input_ids"].shape == (1, 20) and encoded[0].shape == (1, 20)
    assert variants["the example"][1] is None  # the others are run by the caller
