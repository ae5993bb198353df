"""Encoder-decoder transformers (T5, BART, Marian, ...) from small random configs (no download):
heads of self- and cross-attention, FFN neurons and the hidden size prune, exactly."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from secateur import create_model, load_model, save_model
from secateur.pruning import StructuredConfig, prune_
from structured_helpers import assert_silenced_removal_exact

transformers = pytest.importorskip("transformers")

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
T5_LIKE = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4)
FAMILIES = {
    # relative position bias shared by a stack's layers; cross-attention's bias is zeros
    # built from n_heads in the first decoder layer and handed to the next
    "t5": T5_LIKE,
    # T5's eager attention adds that zeros bias to the scores; routed experts in the FFN
    "switch_transformers": dict(
        T5_LIKE,
        num_experts=4,
        expert_capacity=16,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
    ),
    # local attention in blocks; ``unshape``, defined inside forward, reads self.inner_dim
    "longt5": dict(T5_LIKE, encoder_attention_type="local", local_radius=4),
    # encoder and decoder embeddings share one weight (and the LM head);
    # ``inputs_embeds[:, :, -1]`` is taken for its shape only
    "bart": BART_LIKE,
    "marian": BART_LIKE,  # sinusoidal positions held in a frozen Embedding weight
    # sinusoidal positions in a buffer the module rebuilds from its width for longer inputs:
    # the table loses the hidden size's channels, the width it is rebuilt from stays
    "m2m_100": BART_LIKE,
}
VOCAB = 100


def _build(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family])
    config.pad_token_id = config.bos_token_id = config.decoder_start_token_id = 0
    config.eos_token_id = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    return model, {
        "input_ids": torch.randint(2, VOCAB, (3, 10), generator=gen),
        "decoder_input_ids": torch.randint(2, VOCAB, (3, 7), generator=gen),
    }


def _logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def _attention_widths(model: torch.nn.Module) -> dict[str, int]:
    """Input width of every attention output projection, by the attention's role."""
    widths: dict[str, set[int]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf in ("o", "out_proj"):
            role = "cross" if "EncDec" in name or "encoder_attn" in name else "self"
            stack = "decoder" if "decoder" in name else "encoder"
            widths.setdefault(f"{stack} {role}", set()).add(module.in_features)
    return {k: max(v) for k, v in widths.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heads_of_every_attention_ffn_and_hidden_prune(family: str) -> None:
    model, x = _build(family)
    before = sum(p.numel() for p in model.parameters())
    result = prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert result.refused == ()
    assert _logits(model, x).shape == (3, 7, VOCAB)
    # self-attention of both stacks and the decoder's cross-attention: 2 of 4 heads left
    assert _attention_widths(model) == dict.fromkeys(
        ("encoder self", "decoder self", "decoder cross"), 32
    )
    kinds = [g.kind for g in result.graph.groups]
    assert kinds.count("channel") >= 4  # one FFN width per layer of each stack (or expert)
    hidden = model.get_input_embeddings().embedding_dim
    kept = sum(p.numel() for p in model.parameters()) / before
    assert hidden == 32 and kinds.count("hidden") == 1  # encoder and decoder: one space
    assert kept < 0.35


@pytest.mark.parametrize("family", list(FAMILIES))
def test_removing_silenced_heads_and_neurons_keeps_outputs(family: str) -> None:
    """Zero some units of each head and FFN group (cross-attention included), remove exactly
    those, and the logits do not move."""
    model, x = _build(family)
    removals = assert_silenced_removal_exact(model, x, seed=3)
    # per layer: encoder self, decoder self and cross; T5's stacks share a bias over layers
    heads = 3 if family in ("t5", "longt5", "switch_transformers") else 6
    assert sum(g.kind == "head" for g, _ in removals) == heads


@pytest.mark.parametrize("family", ["t5", "bart", "m2m_100"])
def test_pruned_model_decodes_through_its_cache(family: str) -> None:
    """Decoding reads the head counts again through the self- and cross-attention caches
    (not in the traced pass): a step through the cache gives the full pass's logits."""
    model, x = _build(family)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    ids, dec = x["input_ids"][:1], x["decoder_input_ids"][:1]
    with torch.no_grad():
        first = model(input_ids=ids, decoder_input_ids=dec[:, :4], use_cache=True)
        cache = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        step = model(
            decoder_input_ids=dec[:, 4:5],
            encoder_outputs=(first.encoder_last_hidden_state,),
            **{cache: first.past_key_values},
        )
        full = model(input_ids=ids, decoder_input_ids=dec[:, :5]).logits
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch.testing.assert_close(step.logits[0, -1], full[0, -1], atol=1e-5, rtol=1e-4)
    assert out.shape == (1, 5)


@pytest.mark.parametrize("family", ["t5", "bart", "m2m_100"])
def test_pruned_model_saves_and_reloads_exactly(family: str, tmp_path: Path) -> None:
    options = dict(task="seq2seq-lm", vocab_size=VOCAB, **FAMILIES[family])
    torch.manual_seed(0)
    model = create_model(f"hf.{family}", **options)
    _, x = _build(family)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    path = save_model(model, tmp_path / "pruned.safetensors")
    loaded = load_model(path).model
    assert loaded.secateur_spec["kwargs"]["task"] == "seq2seq-lm"
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    embeddings = loaded.get_input_embeddings()
    assert embeddings.weight is loaded.get_output_embeddings().weight  # still one tensor
    assert embeddings.embedding_dim == embeddings.weight.shape[1] == 32


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_pruned_model_exports_to_onnx_with_independent_lengths(family: str, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx

    from secateur.export import export_onnx

    model, x = _build(family)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    out = export_onnx(model, x, tmp_path / "m.onnx", dynamic_sequence=True)
    assert out.max_abs_diff < 1e-4
    graph = onnx.load(str(out.path)).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    # the encoder's and the decoder's lengths are separate axes; logits follow the decoder's
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "input_ids_sequence"]
    assert dims["decoder_input_ids"] == ["batch", "decoder_input_ids_sequence"]
    assert dims["output_0"] == ["batch", "decoder_input_ids_sequence", VOCAB]

    gen = torch.Generator().manual_seed(1)
    other = {
        "input_ids": torch.randint(2, VOCAB, (2, 13), generator=gen),
        "attention_mask": torch.ones(2, 13, dtype=torch.long),
        "decoder_input_ids": torch.randint(2, VOCAB, (2, 4), generator=gen),
    }
    other["attention_mask"][1, 9:] = 0  # a padded encoder input
    session = onnxruntime.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    got = session.run(["output_0"], {k: v.numpy() for k, v in other.items()})[0]
    expected = _logits(model, other)
    assert got.shape == tuple(expected.shape)
    assert float((torch.from_numpy(got) - expected).abs().max()) < 1e-4


def test_equal_encoder_and_decoder_lengths_are_refused_with_dynamic_sequence(
    tmp_path: Path,
) -> None:
    from secateur.errors import ConfigError
    from secateur.export import export_onnx

    model, x = _build("bart")
    x["decoder_input_ids"] = x["input_ids"].clone()
    with pytest.raises(ConfigError, match="give decoder_input_ids another length"):
        export_onnx(model, x, tmp_path / "m.onnx", dynamic_sequence=True)
    assert list(tmp_path.iterdir()) == []


def test_pruned_m2m100_reads_its_own_positions_at_any_length(tmp_path: Path) -> None:
    """M2M100's sinusoidal table loses the hidden size's channels. It is rebuilt for inputs
    longer than it, keeping the same columns of the table the module builds; it stays out of
    the saved weights, and the columns it keeps are replayed on load."""
    options = dict(task="seq2seq-lm", vocab_size=VOCAB, **FAMILIES["m2m_100"])
    torch.manual_seed(0)
    model = create_model("hf.m2m_100", **options)
    _, x = _build("m2m_100")
    table = model.model.encoder.embed_positions
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=x)
    assert table.weights.shape[1] == 32 and table.embedding_dim == 64
    (kept,) = model.secateur_buffer_slices["model.encoder.embed_positions.weights"].values()
    path = save_model(model, tmp_path / "pruned.safetensors")
    assert not [k for k in model.state_dict() if "embed_positions" in k]
    loaded = load_model(path).model

    longer = FAMILIES["m2m_100"]["max_position_embeddings"] + 20
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, VOCAB, (1, longer), generator=gen)
    x_long = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    logits = _logits(model, x_long)
    rows = table.weights.shape[0]
    assert rows > longer  # rebuilt, with the original table's kept columns
    original = type(table).get_embedding(rows, 64, table.padding_idx)
    torch.testing.assert_close(table.weights, original[:, kept])
    assert torch.equal(_logits(loaded, x_long), logits)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
