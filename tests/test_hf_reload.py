"""HF transformers from the zoo (random weights, no download): prune, save, reload exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_small_configs import DEEPSEEK_V3_MLA, MAMBA2_ONE_GROUP, QWEN3_5_DELTANET
from secateur import ArtifactError, ConfigError, create_model, load_model, save_model
from secateur.pruning import StructuredConfig, prune_

pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=100,
    max_position_embeddings=32,
)
CASES: dict[str, dict[str, Any]] = {
    "hf.gpt2": dict(
        task="causal-lm", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32
    ),
    "hf.llama": dict(SMALL, task="causal-lm", num_key_value_heads=2),
    "hf.qwen2": dict(SMALL, task="causal-lm", num_key_value_heads=2),
    "hf.bert": dict(SMALL, task="sequence-classification", num_labels=3),
    "hf.mixtral": dict(SMALL, task="causal-lm", num_key_value_heads=2, num_local_experts=4),
    "hf.stablelm": dict(SMALL, task="causal-lm", num_key_value_heads=2),
    "hf.olmo": dict(SMALL, task="causal-lm"),  # normalized_shape = (hidden,) follows
    # head counts read from the shared config: each attention gets its own ConfigView
    "hf.phi3": dict(SMALL, task="causal-lm", num_key_value_heads=2, pad_token_id=0),
    "hf.falcon": dict(SMALL, task="causal-lm", new_decoder_architecture=True, num_kv_heads=2),
    "hf.modernbert": dict(
        SMALL,
        task="sequence-classification",
        num_labels=3,
        pad_token_id=0,
        cls_token_id=0,
        sep_token_id=0,
    ),
    # one key/value head for all: num_key_value_groups follows the query heads
    "hf.gemma": dict(SMALL, task="causal-lm", num_key_value_heads=1, head_dim=16),
    # sinusoidal positions outside the saved state: the columns the table keeps are in the manifest
    "hf.xglm": dict(
        task="causal-lm",
        d_model=64,
        num_layers=2,
        attention_heads=4,
        ffn_dim=128,
        vocab_size=100,
        max_position_embeddings=32,
    ),
    # Mamba: its mixer's depthwise conv (run through F.conv1d) keeps its group count true,
    # and time_step_rank, read by a split, is an attribute edit
    "hf.mamba": dict(
        task="causal-lm",
        hidden_size=64,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        vocab_size=100,
    ),
    # Mamba2: heads beside one group's state repeated over them; the gated norm's group
    # size and the head count are attribute edits
    "hf.mamba2": dict(
        task="causal-lm",
        hidden_size=32,
        num_hidden_layers=2,
        head_dim=8,
        vocab_size=100,
        **MAMBA2_ONE_GROUP,
    ),
    # Qwen3.5's linear attention: its key and value head counts and widths are attribute edits
    "hf.qwen3_5_text": dict(
        SMALL, task="causal-lm", num_key_value_heads=2, head_dim=16, **QWEN3_5_DELTANET
    ),
    # MLA: keys copied into a fresh tensor, q and kv latents
    "hf.deepseek_v3": dict(SMALL, task="causal-lm", **DEEPSEEK_V3_MLA),
    "hf.gpt_bigcode": dict(
        task="causal-lm", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32
    ),
}


def _ids() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 100, (3, 8), generator=gen)}  # batch 3: no head count


def _logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared tensors counted once


def _pruned_and_saved(name: str, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model(name, **CASES[name])
    before = _params(model)
    prune_(model, StructuredConfig(ratio=0.5), example_inputs=_ids())
    assert _params(model) < before
    return model, save_model(model, tmp_path / "pruned.safetensors")


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_model_reloads_exactly(name: str, tmp_path: Path) -> None:
    model, path = _pruned_and_saved(name, tmp_path)
    x = _ids()
    reference = _logits(model, x)
    loaded = load_model(path).model
    assert not loaded.training
    assert loaded.secateur_spec == model.secateur_spec
    assert loaded.secateur_spec["kwargs"]["task"] == CASES[name]["task"]
    assert _params(loaded) == _params(model)
    assert torch.equal(_logits(loaded, x), reference)
    assert getattr(loaded, "secateur_attributes", {}) == getattr(model, "secateur_attributes", {})
    # saving the reloaded model again gives the same artifact
    again = save_model(loaded, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()
    assert json.loads(again.with_suffix(".json").read_text()) == json.loads(
        path.with_suffix(".json").read_text()
    )


def test_gpt2_split_size_and_tied_embeddings_survive_reload(tmp_path: Path) -> None:
    model, path = _pruned_and_saved("hf.gpt2", tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert manifest["edits"]["attributes"]["transformer.h.0.attn"]["split_size"] == 32
    loaded = load_model(path).model
    for layer in (0, 1):
        attn = loaded.transformer.h[layer].attn
        assert attn.split_size == model.transformer.h[layer].attn.split_size == 32
    assert loaded.secateur_attributes == model.secateur_attributes
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.transformer.wte.weight.shape == (100, 32)
    assert loaded.lm_head.in_features == 32


def test_spec_keeps_task_and_given_options_only() -> None:
    model = create_model("hf.bert", task="sequence-classification", num_labels=3, **SMALL)
    assert model.secateur_spec == {
        "name": "hf.bert",
        "kwargs": {"task": "sequence-classification", "num_labels": 3, **SMALL},
    }
    assert not model.training
    assert type(create_model("hf.bert", **SMALL)).__name__ == "BertModel"  # task "base"


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("hf.nosuchmodel", {}, "unknown transformers model type 'nosuchmodel'"),
        ("hf.gtp2", {}, "did you mean gpt2"),
        ("hf.gpt2", {"task": "translation"}, "use one of base, causal-lm, masked-lm"),
        ("hf.clip", {"task": "causal-lm"}, "no causal-lm model"),
        ("hf.gpt2", {"n_embd": 65, "n_head": 4}, "bad option for hf.gpt2"),
        ("hf.gpt2", {"n_embd": object()}, "JSON-serialisable"),
    ],
    ids=["unknown-type", "typo", "unknown-task", "task-without-head", "bad-config", "not-json"],
)
def test_bad_hf_model_is_config_error(name: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        create_model(name, **kwargs)
    assert "\n" not in str(exc.value)


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'secateur\[hf\]'"):
        create_model("hf.gpt2")


@pytest.mark.parametrize(
    ("attributes", "match"),
    [
        ({"transformer.h.9.attn": {"split_size": 32}}, "does not exist"),
        ({"transformer.h.0.attn": {"no_such_size": 32}}, "no integer attribute"),
        ({"transformer.h.0.attn": {"split_size": 0}}, "positive integer"),
        ({"transformer.h.0.attn": {"split_size": "32"}}, "positive integer"),
        ({"transformer.h.0.attn": 32}, "must map module names"),
        ({"transformer.h.0.attn": {"config.no_such_count": 2}}, "no integer attribute"),
        ({"transformer.h.0.attn": {"c_attn.out_features": 2}}, "its config's are edited"),
        ({"": {"config.n_head": 2}}, "own config is never edited"),
    ],
    ids=[
        "no-module",
        "no-attribute",
        "zero",
        "string",
        "not-a-mapping",
        "config",
        "nested",
        "root",
    ],
)
def test_bad_attribute_edit_is_artifact_error(
    tmp_path: Path, attributes: dict[str, Any], match: str
) -> None:
    _, path = _pruned_and_saved("hf.gpt2", tmp_path)
    manifest_file = path.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    manifest["edits"]["attributes"] = attributes
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match) as exc:
        load_model(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "tied",
    [{"lm_head.weight": "transformer.nowhere.weight"}, {"transformer.wte.weight": "x"}, ["x"]],
    ids=["unknown-source", "alias-in-file", "not-a-mapping"],
)
def test_bad_tied_entry_is_artifact_error(tmp_path: Path, tied: Any) -> None:
    _, path = _pruned_and_saved("hf.gpt2", tmp_path)
    manifest_file = path.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    manifest["tied"] = tied
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="bad manifest") as exc:
        load_model(path)
    assert "\n" not in str(exc.value)


def test_attributes_of_a_module_no_longer_there_are_not_saved(tmp_path: Path) -> None:
    model, _ = _pruned_and_saved("hf.gpt2", tmp_path)
    modules = set(model.secateur_attributes)
    model.secateur_attributes["transformer.h.7.attn"] = {"split_size": 32}  # e.g. depth-pruned
    path = save_model(model, tmp_path / "again.safetensors")
    saved = json.loads(path.with_suffix(".json").read_text())["edits"]["attributes"]
    assert set(saved) == modules
    assert load_model(path).model.transformer.h[1].attn.split_size == 32


_TABLE = "model.embed_positions.weights"


@pytest.mark.parametrize(
    ("buffers", "match"),
    [
        ({"model.nowhere.weights": {"1": [0]}}, "does not exist"),
        ({"model.embed_tokens.weight": {"1": [0]}}, "not an unsaved buffer"),
        ({_TABLE: {"1": [0, 64]}}, "increasing indices below 64"),
        ({_TABLE: {"1": [3, 1]}}, "increasing indices"),
        ({_TABLE: {"7": [0]}}, "is not a dim"),
        ({_TABLE: [0, 1]}, "must map dims"),
        ([_TABLE], "must map buffer names"),
    ],
    ids=["no-buffer", "saved-tensor", "out-of-range", "unsorted", "bad-dim", "flat", "list"],
)
def test_bad_buffer_edit_is_artifact_error(tmp_path: Path, buffers: Any, match: str) -> None:
    _, path = _pruned_and_saved("hf.xglm", tmp_path)
    manifest_file = path.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    assert set(manifest["edits"]["buffers"]) == {_TABLE}
    manifest["edits"]["buffers"] = buffers
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match) as exc:
        load_model(path)
    assert "\n" not in str(exc.value)


def test_a_table_of_a_block_removed_by_depth_pruning_leaves_the_manifest(tmp_path: Path) -> None:
    from secateur.pruning._depth import replace_with_skip_

    model, _ = _pruned_and_saved("hf.xglm", tmp_path)
    model.model.layers[1].register_buffer("table", torch.zeros(3, 32), persistent=False)
    model.secateur_buffer_slices["model.layers.1.table"] = {1: list(range(32))}
    replace_with_skip_(model, "model.layers.1")
    path = save_model(model, tmp_path / "shallower.safetensors")
    saved = json.loads(path.with_suffix(".json").read_text())["edits"]["buffers"]
    assert set(saved) == {_TABLE}
    assert torch.equal(_logits(load_model(path).model, _ids()), _logits(model, _ids()))
