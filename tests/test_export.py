"""Tests of secateur.export: safetensors weights + JSON manifest, and every way loading can fail."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from secateur import (
    ArtifactError,
    ConfigError,
    OutputError,
    UnstructuredConfig,
    create_model,
    list_models,
    load_model,
    prune_,
    save_model,
)
from secateur.export import update_metadata
from secateur.pruning._unstructured import PRUNABLE_TYPES

_ST_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def _input_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    kwargs = model.secateur_spec["kwargs"]
    gen = torch.Generator().manual_seed(1234)
    size = kwargs["image_size"]
    return torch.randn(batch, kwargs["in_channels"], size, size, generator=gen)


def _build(name: str) -> nn.Module:
    """A zoo model with non-default BatchNorm statistics, so that buffers are really compared."""
    torch.manual_seed(0)
    model = create_model(name)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model.train()
        with torch.no_grad():
            model(_input_for(model, batch=4) * 3 + 1)
    return model.eval()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


def _prunable_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]


def _zeros(model: nn.Module) -> int:
    return sum(int((w == 0).sum()) for w in _prunable_weights(model))


def _saved(tmp_path: Path, name: str = "lenet5", **metadata: Any) -> tuple[nn.Module, Path]:
    model = _build(name)
    path = save_model(model, tmp_path / "model.safetensors", metadata=metadata or None)
    return model, path


def _read_manifest(path: Path) -> dict[str, Any]:
    return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.with_suffix(".json").write_text(json.dumps(manifest), encoding="utf-8")


def _forge_sha(path: Path) -> None:
    """Make the manifest's SHA-256 match whatever the weights file now holds."""
    manifest = _read_manifest(path)
    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    _write_manifest(path, manifest)


def _load_error(path: Path) -> str:
    with pytest.raises(ArtifactError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.strip()
    return message


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("name", list_models())
def test_round_trip_every_zoo_model(tmp_path: Path, name: str, pruned: bool) -> None:
    model = _build(name)
    if pruned:
        prune_(model, UnstructuredConfig(sparsity=0.8))
        total = sum(w.numel() for w in _prunable_weights(model))
        assert _zeros(model) == round(0.8 * total)
    x = _input_for(model)
    with torch.no_grad():
        expected = model(x)

    path = save_model(model, tmp_path / f"{name}.safetensors")
    assert path == tmp_path / f"{name}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json", f"{name}.safetensors"]

    loaded = load_model(path)
    assert loaded.weights_path == path
    assert loaded.manifest_path == tmp_path / f"{name}.json"
    assert loaded.metadata == {}
    assert type(loaded.model) is type(model)
    assert loaded.model.secateur_spec == model.secateur_spec
    assert not loaded.model.training
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    _assert_same_state(model, loaded.model)
    assert _zeros(loaded.model) == _zeros(model)
    with torch.no_grad():
        got = loaded.model(x)
    assert torch.equal(got, expected)


def test_pruned_zero_positions_survive_exactly(tmp_path: Path) -> None:
    model = _build("lenet_300_100")
    prune_(model, UnstructuredConfig(sparsity=0.8))
    path = save_model(model, tmp_path / "p.safetensors")
    loaded = load_model(path).model
    for before, after in zip(_prunable_weights(model), _prunable_weights(loaded), strict=True):
        assert torch.equal(before == 0, after == 0)
    assert _zeros(loaded) == round(0.8 * 266_200)


def test_round_trip_keeps_non_default_kwargs(tmp_path: Path) -> None:
    model = create_model("vgg11_bn", in_channels=3, num_classes=7, image_size=32, width_mult=0.25)
    path = save_model(model, tmp_path / "v.safetensors")
    loaded = load_model(path).model
    assert loaded.secateur_spec == {
        "name": "vgg11_bn",
        "kwargs": {"in_channels": 3, "num_classes": 7, "image_size": 32, "width_mult": 0.25},
    }
    _assert_same_state(model, loaded)
    assert loaded(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_saving_twice_gives_identical_bytes(tmp_path: Path) -> None:
    model = _build("lenet5")
    a = save_model(model, tmp_path / "a.safetensors", metadata={"k": 1})
    b = save_model(model, tmp_path / "b.safetensors", metadata={"k": 1})
    assert a.read_bytes() == b.read_bytes()
    assert _read_manifest(a) == _read_manifest(b)


# --- metadata ---------------------------------------------------------------------------------


def test_metadata_round_trip(tmp_path: Path) -> None:
    metadata = {
        "recipe": {"sparsity": 0.8, "model": "lenet5", "limit": None, "exclude": ["fc3"]},
        "note": "héllo",
        "count": 3,
        "flag": True,
    }
    _, path = _saved(tmp_path, **metadata)
    assert load_model(path).metadata == metadata
    manifest = _read_manifest(path)
    assert manifest["metadata"] == metadata
    assert manifest["format"] == "secateur.model/1"
    assert manifest["model"] == {
        "name": "lenet5",
        "kwargs": {"in_channels": 1, "num_classes": 10, "image_size": 28},
    }
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_update_metadata_merges_and_leaves_weights_alone(tmp_path: Path) -> None:
    model, path = _saved(tmp_path, a=1, b={"x": 1})
    weights_before = path.read_bytes()
    stat_before = path.stat()

    update_metadata(path, {"b": {"y": 2}, "c": [1, 2]})
    update_metadata(path, {"d": "last"})

    assert path.read_bytes() == weights_before
    assert path.stat().st_ino == stat_before.st_ino
    loaded = load_model(path)
    assert loaded.metadata == {"a": 1, "b": {"y": 2}, "c": [1, 2], "d": "last"}
    _assert_same_state(model, loaded.model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_update_metadata_without_manifest_is_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        update_metadata(tmp_path / "none.safetensors", {"a": 1})
    assert "\n" not in str(info.value)
    assert "manifest missing" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --- file format ------------------------------------------------------------------------------


def test_weights_file_is_plain_safetensors_not_pickle(tmp_path: Path) -> None:
    model, path = _saved(tmp_path, name="resnet20")
    raw = path.read_bytes()
    assert raw[:1] != b"\x80"  # pickle PROTO opcode
    assert raw[:2] != b"PK"  # torch.save zip container
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert 0 < header_len < len(raw) - 8
    header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    header.pop("__metadata__", None)
    state = model.state_dict()
    assert set(header) == set(state)
    end = 0
    for key, tensor in state.items():
        assert header[key]["dtype"] == _ST_DTYPES[tensor.dtype]
        assert header[key]["shape"] == list(tensor.shape)
        end = max(end, header[key]["data_offsets"][1])
    assert 8 + header_len + end == len(raw)

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(state)
        for key, tensor in state.items():
            assert torch.equal(f.get_tensor(key), tensor)

    manifest = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert set(manifest) == {"format", "model", "sha256", "metadata"}


# --- broken artifacts -------------------------------------------------------------------------


def test_missing_weights_file(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    path.unlink()
    assert "cannot read checkpoint" in _load_error(path)


def test_weights_path_is_a_folder(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    path.unlink()
    path.mkdir()
    assert "cannot read checkpoint" in _load_error(path)


def test_missing_manifest(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    path.with_suffix(".json").unlink()
    assert "manifest missing" in _load_error(path)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe\x00garbage"],
    ids=["broken-json", "empty", "not-utf8"],
)
def test_manifest_not_json(tmp_path: Path, content: bytes) -> None:
    _, path = _saved(tmp_path)
    path.with_suffix(".json").write_bytes(content)
    assert "not a valid JSON manifest" in _load_error(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {**m, "format": "secateur.model/999"},
        lambda m: {k: v for k, v in m.items() if k != "format"},
        lambda m: [m],
        lambda m: "secateur.model/1",
    ],
    ids=["wrong-format", "no-format", "list", "string"],
)
def test_manifest_of_wrong_format(tmp_path: Path, edit: Any) -> None:
    _, path = _saved(tmp_path)
    _write_manifest(path, edit(_read_manifest(path)))
    assert "not a secateur.model/1 manifest" in _load_error(path)


@pytest.mark.parametrize(
    "model_spec", [None, "lenet5", {"name": "lenet5"}, {"name": "lenet5", "kwargs": [1]}]
)
def test_manifest_without_model_spec(tmp_path: Path, model_spec: Any) -> None:
    _, path = _saved(tmp_path)
    manifest = _read_manifest(path)
    manifest["model"] = model_spec
    _write_manifest(path, manifest)
    assert "lacks a model spec" in _load_error(path)


def test_truncated_weights_file(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert "corrupt or truncated" in _load_error(path)


def test_truncated_weights_file_with_forged_sha(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _forge_sha(path)
    assert "not valid safetensors" in _load_error(path)


def test_flipped_bytes_in_weights(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    for i in range(middle, middle + 4):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert "corrupt or truncated" in _load_error(path)


def test_swapped_weights_of_another_model(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    other = save_model(create_model("lenet5"), tmp_path / "other.safetensors")
    path.write_bytes(other.read_bytes())
    assert "corrupt or truncated" in _load_error(path)


def test_forged_sha_with_wrong_shapes_does_not_fit(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    wrong = {k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in model.state_dict().items()}
    path.write_bytes(save_safetensors_bytes(wrong))
    _forge_sha(path)
    message = _load_error(path)
    assert "does not fit" in message


def test_forged_sha_with_missing_tensor_does_not_fit(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "fc3.bias"}
    path.write_bytes(save_safetensors_bytes(state))
    _forge_sha(path)
    assert "does not fit" in _load_error(path)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "nosuchnet", "kwargs": {}},
        {"name": "lenet5", "kwargs": {"depth": 3}},
        {"name": "lenet5", "kwargs": {"in_channels": 0}},
    ],
    ids=["unknown-name", "unknown-option", "bad-option"],
)
def test_manifest_naming_a_model_that_cannot_be_built(tmp_path: Path, spec: Any) -> None:
    _, path = _saved(tmp_path)
    manifest = _read_manifest(path)
    manifest["model"] = spec
    _write_manifest(path, manifest)
    message = _load_error(path)
    assert "cannot build" in message
    if spec["name"] == "nosuchnet":
        assert "nosuchnet" in message


class _TouchOnUnpickle:
    """Unpickling this object creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def test_hostile_pickle_is_never_unpickled(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    hostile = {**model.state_dict(), "payload": _TouchOnUnpickle(marker)}
    torch.save(hostile, path)
    assert path.read_bytes()[:2] == b"PK"  # torch's zip container around a pickle
    _forge_sha(path)
    assert not marker.exists()

    message = _load_error(path)
    assert "not valid safetensors" in message
    assert not marker.exists()

    # Control: the payload is live, so the assertion above really proves nothing was unpickled.
    # (A file object, since torch.load routes a *.safetensors path to safetensors.)
    with path.open("rb") as handle:
        torch.load(handle, weights_only=False)
    assert marker.exists()


# --- save errors ------------------------------------------------------------------------------


def test_save_model_without_spec_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        save_model(nn.Linear(3, 2), tmp_path / "m.safetensors")
    assert "secateur_spec" in str(info.value)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def _no_temp_files(root: Path) -> None:
    assert [p for p in root.rglob("*") if p.name.endswith(".tmp")] == []
    assert [p for p in root.rglob(".*")] == []


def test_save_under_a_regular_file_is_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(OutputError) as info:
        save_model(create_model("lenet5"), blocker / "m.safetensors")
    assert "\n" not in str(info.value)
    assert "cannot write" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    _no_temp_files(tmp_path)


def test_failed_replace_leaves_no_temp_file(tmp_path: Path) -> None:
    # The temp file is created and written, then os.replace onto a folder fails.
    (tmp_path / "m.safetensors").mkdir()
    with pytest.raises(OutputError):
        save_model(create_model("lenet5"), tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert list((tmp_path / "m.safetensors").iterdir()) == []
    _no_temp_files(tmp_path)


def test_failed_manifest_write_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "m.json").mkdir()
    with pytest.raises(OutputError):
        save_model(create_model("lenet5"), tmp_path / "m.safetensors")
    _no_temp_files(tmp_path)
    # The weights were written, but without a manifest they must not load.
    assert "not a valid JSON manifest" in _load_error(tmp_path / "m.safetensors")


# --- regressions -----------------------------------------------------------------------------


def test_save_to_a_non_safetensors_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must end in \.safetensors"):
        save_model(_build("lenet5"), tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_existing_artifact_loadable(tmp_path: Path) -> None:
    model, path = _saved(tmp_path, name="lenet_300_100")
    other = _build("lenet_300_100")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    with pytest.raises(ConfigError, match="not JSON-serialisable"):
        save_model(other, path, metadata={"bad": object()})
    _assert_same_state(model, load_model(path).model)


def test_saved_files_honour_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _, path = _saved(tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.with_suffix(".json").stat().st_mode & 0o777 == 0o644
