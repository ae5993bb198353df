"""The compressed model file: codecs, round trips, stage sizes and hostile input."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateur import (
    ArtifactError,
    ConfigError,
    StructuredConfig,
    UnstructuredConfig,
    create_model,
    prune_,
    save_model,
)
from secateur.export import (
    CompressionConfig,
    compressed_bytes,
    compression_stages,
    load_compressed,
    save_compressed,
)
from secateur.export._codec import (
    best_relative_bits,
    decode_bitmask,
    decode_relative,
    encode_bitmask,
    pack_bits,
    relative_codes,
    unpack_bits,
)
from secateur.quantization import CodebookConfig, cluster_weights_


def _pruned(name: str = "lenet_300_100", sparsity: float = 0.9) -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model(name)
    prune_(net, UnstructuredConfig(sparsity=sparsity))
    return net.eval()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=200))
def test_bit_packing_round_trips(bits: int, raw: list[int]) -> None:
    codes = np.array([c % (1 << bits) for c in raw], dtype=np.uint8)
    data = pack_bits(codes, bits)
    assert len(data) == (codes.size * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(data, bits, codes.size), codes)


@settings(max_examples=60)
@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.integers(0, 10**6), st.integers(2, 8))
def test_index_codes_round_trip(numel: int, density: float, seed: int, bits: int) -> None:
    mask = np.random.default_rng(seed).random(numel) < density
    positions = np.flatnonzero(mask)
    np.testing.assert_array_equal(
        decode_bitmask(encode_bitmask(mask), numel, positions.size), positions
    )
    codes = relative_codes(positions, bits)
    decoded = decode_relative(pack_bits(codes, bits), bits, codes.size, numel, positions.size)
    np.testing.assert_array_equal(decoded, positions)
    best_bits, count = best_relative_bits(positions)
    assert count == relative_codes(positions, best_bits).size


def test_relative_code_bridges_long_gaps_without_values() -> None:
    positions = np.array([0, 40])  # gap of 40 with 4-bit codes: 0,0 (2 x 15), then 10
    np.testing.assert_array_equal(relative_codes(positions, 4), [1, 0, 0, 10])


def test_index_decoders_reject_inconsistent_data() -> None:
    with pytest.raises(ValueError, match="header says"):
        decode_bitmask(encode_bitmask(np.array([1, 0, 1], bool)), 3, 1)
    with pytest.raises(ValueError, match="past the end"):
        decode_bitmask(b"\xff", 3, 3)
    with pytest.raises(ValueError, match="past the end"):
        decode_relative(pack_bits(np.array([9], np.uint8), 4), 4, 1, 5, 1)


@pytest.mark.parametrize(
    "config",
    [
        CompressionConfig(values="exact", entropy="none"),
        CompressionConfig(values="exact", index="bitmask"),
        CompressionConfig(values="exact", index="relative"),
    ],
    ids=["raw", "bitmask+zstd", "relative+zstd"],
)
def test_lossless_stages_are_bit_exact(tmp_path: Path, config: CompressionConfig) -> None:
    net = _pruned()
    loaded = load_compressed(save_compressed(net, tmp_path / "m.secz", config))
    assert _same_state(net, loaded.model)
    assert not loaded.model.training


def test_structured_pruned_cnn_with_buffers_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("resnet20")
    x = torch.randn(2, 1, 28, 28)
    prune_(net, StructuredConfig(ratio=0.5), example_inputs=x)
    prune_(net, UnstructuredConfig(sparsity=0.7))
    net.eval()
    loaded = load_compressed(
        save_compressed(net, tmp_path / "r.secz", CompressionConfig(values="exact"))
    )
    assert _same_state(net, loaded.model)
    assert torch.equal(net(x), loaded.model(x))


@pytest.mark.parametrize(
    ("values", "tolerance"), [("float16", 1e-3), ("int8", 1e-2), ("codebook", 5e-2)]
)
def test_lossy_values_stay_within_their_quantization_error(
    tmp_path: Path, values: str, tolerance: float
) -> None:
    net = _pruned()
    x = torch.randn(8, 1, 28, 28)
    loaded = load_compressed(
        save_compressed(net, tmp_path / "m.secz", CompressionConfig(values=values))
    ).model
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a == 0, b == 0), name  # the sparsity pattern is kept exactly
        scale = a.abs().max().clamp_min(1e-12)
        assert float((a - b).abs().max() / scale) < tolerance, name
    with torch.no_grad():
        rel = (net(x) - loaded(x)).norm() / net(x).norm()
    assert float(rel) < tolerance


def test_codebook_of_a_clustered_model_is_exact(tmp_path: Path) -> None:
    net = _pruned()
    cluster_weights_(net, CodebookConfig(bits=4))
    loaded = load_compressed(
        save_compressed(net, tmp_path / "m.secz", CompressionConfig(values="codebook", bits=4))
    )
    assert _same_state(net, loaded.model)


def test_stages_shrink_and_the_last_equals_the_file(tmp_path: Path) -> None:
    net = _pruned(sparsity=0.92)
    stages = compression_stages(net, CompressionConfig(values="codebook", bits=5))
    names = [s.name for s in stages]
    assert names[0].startswith("dense") and names[-1].endswith("zstd")
    sizes = [s.bytes for s in stages]
    assert sizes == sorted(sizes, reverse=True)
    dense = save_model(net, tmp_path / "d.safetensors").stat().st_size
    assert sizes[0] == dense
    path = save_compressed(net, tmp_path / "m.secz", CompressionConfig(values="codebook", bits=5))
    assert path.stat().st_size == sizes[-1]
    assert dense / sizes[-1] > 30  # 8% of weights at 5 bits plus index codes


def test_bad_config_and_path_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bits"):
        CompressionConfig(bits=9)
    with pytest.raises(ConfigError, match="values"):
        CompressionConfig(values="int4")
    with pytest.raises(ConfigError, match=r"\.secz"):
        save_compressed(_pruned(), tmp_path / "m.bin")
    assert not any(tmp_path.iterdir())


def _saved(tmp_path: Path) -> tuple[Path, bytes]:
    path = save_compressed(_pruned(), tmp_path / "m.secz", CompressionConfig(values="int8"))
    return path, path.read_bytes()


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated|SHA-256"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b"", "truncated"),
        (lambda b: b"PK\x03\x04" + b[4:], "magic"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "payload SHA-256"),
        (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "header SHA-256"),
        (lambda b: b + b"\x00", "padded"),
    ],
    ids=["half", "prefix", "empty", "zip", "payload-bit", "header-bit", "padded"],
)
def test_corrupt_files_raise_artifact_error(tmp_path: Path, mangle, message: str) -> None:
    path, blob = _saved(tmp_path)
    path.write_bytes(mangle(blob))
    with pytest.raises(ArtifactError, match=message):
        load_compressed(path)


def _with_header(blob: bytes, edit) -> bytes:
    """Rewrite the header (and its hash) so only semantic validation can catch the edit."""
    import hashlib

    _, version, length, _ = struct.unpack_from("<4sIQ32s", blob)
    header = json.loads(blob[48 : 48 + length])
    edit(header)
    text = json.dumps(header).encode()
    prefix = struct.pack("<4sIQ32s", b"SECZ", version, len(text), hashlib.sha256(text).digest())
    return prefix + text + blob[48 + length :]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["tensors"][0].update(shape=[10**6, 10**6]), "limit"),
        (lambda h: h["tensors"][0].update(shape=[3, "x"]), "shape"),
        (lambda h: h["tensors"][0].update(dtype="object"), "dtype"),
        (lambda h: h["tensors"][0]["values"]["segments"].update(data=[0, 10**9]), "outside"),
        (lambda h: h["tensors"][0].update(nnz=5), "non-zeros|header says"),
        (lambda h: h["payload"].update(raw_bytes=10), "size"),
        (lambda h: h["model"].update(name="os.system"), "cannot build"),
        (lambda h: h.update(format="other"), "not a secateur"),
    ],
    ids=["huge", "shape", "dtype", "segment", "nnz", "raw-size", "model", "format"],
)
def test_hostile_headers_are_rejected(tmp_path: Path, edit, message: str) -> None:
    path, blob = _saved(tmp_path)
    path.write_bytes(_with_header(blob, edit))
    with pytest.raises(ArtifactError, match=message):
        load_compressed(path)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_pickle_cannot_execute_code_on_load(tmp_path: Path) -> None:
    exploit = _Exploit()
    exploit.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.secz"
    path.write_bytes(pickle.dumps(exploit))
    with pytest.raises(ArtifactError, match="magic|truncated"):
        load_compressed(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_file_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read"):
        load_compressed(tmp_path / "nope.secz")


def test_compressed_bytes_is_deterministic() -> None:
    net = _pruned()
    assert compressed_bytes(net) == compressed_bytes(net)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["tensors"][1].update(shape=[1 << 30], dtype="float64"), "does not hold"),
        (lambda h: [t.update(shape=[1 << 30]) for t in h["tensors"][:3]], "limit"),
        (lambda h: h["model"]["kwargs"].update(num_classes=10**12), "cannot build"),
    ],
    ids=["dense-bias-huge", "total-huge", "huge-model"],
)
def test_hostile_sizes_fail_before_allocating(tmp_path: Path, edit, message: str) -> None:
    path, blob = _saved(tmp_path)
    path.write_bytes(_with_header(blob, edit))
    with pytest.raises(ArtifactError, match=message):
        load_compressed(path)


def test_zstd_frame_declaring_another_size_is_rejected(tmp_path: Path) -> None:
    def shrink(header: dict) -> None:
        frames = header["payload"]["frames"]
        frames[0][1] -= 1
        header["payload"]["raw_bytes"] -= 1

    path, blob = _saved(tmp_path)
    path.write_bytes(_with_header(blob, shrink))
    with pytest.raises(ArtifactError, match="declares the wrong size"):
        load_compressed(path)


def test_malformed_header_json_is_an_artifact_error(tmp_path: Path) -> None:
    import hashlib

    text = b"[" * 100_000
    prefix = struct.pack("<4sIQ32s", b"SECZ", 1, len(text), hashlib.sha256(text).digest())
    path = tmp_path / "deep.secz"
    path.write_bytes(prefix + text)
    with pytest.raises(ArtifactError, match="not JSON"):
        load_compressed(path)


def test_zero_row_weight_and_half_precision_round_trip(tmp_path: Path) -> None:
    net = _pruned().half()
    loaded = load_compressed(save_compressed(net, tmp_path / "h.secz", CompressionConfig("exact")))
    assert _same_state(net, loaded.model)
    assert loaded.model.fc1.weight.dtype == torch.float16
    from secateur.export._tensor_codec import decode_tensor, encode_values

    class _Store:
        def __init__(self) -> None:
            self.raw = b""

        def add(self, data: bytes, stream: str = "floats") -> list[int]:
            self.raw += data
            return [len(self.raw) - len(data), len(data)]

    store, empty = _Store(), torch.zeros(0, 5)
    fields = encode_values(empty, torch.zeros(0, dtype=torch.long), "int8", 5, store)
    entry = {"name": "w", "dtype": "float32", "shape": [0, 5], "layout": "dense", "values": fields}
    assert decode_tensor(entry, store.raw)[1].shape == (0, 5)


def test_non_finite_weights_refuse_lossy_codes(tmp_path: Path) -> None:
    net = _pruned()
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN or inf"):
        save_compressed(net, tmp_path / "m.secz", CompressionConfig(values="int8"))
    with pytest.raises(ConfigError, match="NaN or inf"):
        cluster_weights_(net)
    loaded = load_compressed(save_compressed(net, tmp_path / "m.secz", CompressionConfig("exact")))
    assert torch.isnan(loaded.model.fc1.weight[0, 0])
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
