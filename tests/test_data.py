"""Tests of secateur.data, on generated IDX files only (never the installed Fashion-MNIST)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from secateur.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    DataSplits,
    Split,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from secateur.errors import ConfigError, DatasetError


def _assert_one_line_with_fix(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert "--data" in message
    return message


# --- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 6, 6, 3)])
def test_idx_round_trip(tmp_path: Path, compress: bool, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "a.idx"
    write_idx(path, array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") is compress
    loaded = read_idx(path)
    assert loaded.dtype == np.uint8
    assert loaded.shape == shape
    np.testing.assert_array_equal(loaded, array)
    assert loaded.flags.writeable


def test_idx_header_layout(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx(path, np.array([3, 1, 4], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "plain.gz", array)
    write_idx(tmp_path / "packed", array, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), array)


def test_write_idx_rejects_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int32))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "truncated"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]), "trailing"),
        (bytes([0, 0, 8, 3, 0, 0]), "header truncated"),
        (bytes([1, 2, 8, 1, 0, 0, 0, 1, 7]), "magic"),
        (b"\x00", "shorter"),
        (b"\x1f\x8bnot really gzip", "gzip"),
    ],
)
def test_read_idx_corrupt(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "broken"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=why) as exc:
        read_idx(path)
    message = _assert_one_line_with_fix(exc)
    assert str(path) in message and "corrupt" in message


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    write_idx(path, np.arange(200, dtype=np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError, match="gzip") as exc:
        read_idx(path)
    _assert_one_line_with_fix(exc)


def test_read_idx_other_element_type(tmp_path: Path) -> None:
    path = tmp_path / "floats"
    path.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + np.float32(1).tobytes())
    with pytest.raises(DatasetError, match="float32") as exc:
        read_idx(path)
    _assert_one_line_with_fix(exc)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read") as exc:
        read_idx(tmp_path / "nope")
    _assert_one_line_with_fix(exc)


# --- loading --------------------------------------------------------------------------------


def test_constants() -> None:
    assert str(DEFAULT_FASHION_MNIST_DIR) == "/usr/share/datasets/fashion-mnist"
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_load_digits_folder(digits_idx_dir: Path) -> None:
    splits = load_fashion_mnist(digits_idx_dir)
    assert isinstance(splits, DataSplits)
    n_val = round(1500 / 12)
    assert n_val == 125
    assert len(splits.train) == 1500 - n_val
    assert len(splits.val) == n_val
    assert len(splits.test) == 297
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.float32
        assert split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 28, 28)
        assert split.labels.shape == (len(split),)
    assert splits.num_classes == 10
    assert splits.in_channels == 1
    assert splits.image_size == 28
    assert splits.source == str(digits_idx_dir)
    assert splits.example_input.shape == (1, 1, 28, 28)
    assert torch.equal(splits.example_input, splits.test.images[:1])

    train = splits.train.images.double()
    assert abs(train.mean().item()) < 1e-5
    assert abs(train.std(unbiased=False).item() - 1.0) < 1e-5
    # The padding is zero in every image, so it maps to -mean/std in every split.
    border = -splits.mean / splits.std
    for split in (splits.train, splits.val, splits.test):
        assert torch.allclose(split.images[:, :, 0, :], torch.tensor(border, dtype=torch.float32))
    assert 0.0 < splits.mean < 1.0 and splits.std > 0.0


def test_val_split_is_a_seeded_partition(digits_idx_dir: Path) -> None:
    a = load_fashion_mnist(digits_idx_dir, seed=3)
    b = load_fashion_mnist(digits_idx_dir, seed=3)
    c = load_fashion_mnist(digits_idx_dir, seed=4)
    assert torch.equal(a.val.images, b.val.images)
    assert torch.equal(a.val.labels, b.val.labels)
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.images, c.val.images)
    # Train and val together are exactly the 1500 training digits: compare as raw-pixel rows.
    whole = load_fashion_mnist(digits_idx_dir, val_fraction=0.0)
    assert len(whole.val) == 0 and whole.val.images.shape == (0, 1, 28, 28)

    def rows(split: Split, splits: DataSplits) -> list[tuple[int, ...]]:
        pixels = torch.round(split.images * splits.std * 255 + splits.mean * 255).to(torch.int64)
        flat = torch.cat([pixels.flatten(1), split.labels[:, None]], dim=1)
        return sorted(map(tuple, flat.tolist()))

    assert sorted(rows(a.train, a) + rows(a.val, a)) == rows(whole.train, whole)


def test_val_fraction_rounding_and_limit(digits_idx_dir: Path) -> None:
    splits = load_fashion_mnist(digits_idx_dir, val_fraction=0.5, limit=101)
    assert len(splits.val) == round(101 * 0.5)
    assert len(splits.train) == 101 - round(101 * 0.5)
    assert len(splits.test) == 101


@pytest.mark.parametrize("bad", [-0.1, 0.6, float("nan"), "0.1", True])
def test_bad_val_fraction(digits_idx_dir: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        load_fashion_mnist(digits_idx_dir, val_fraction=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -5, 2.5])
def test_bad_limit(digits_idx_dir: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="limit"):
        load_fashion_mnist(digits_idx_dir, limit=bad)  # type: ignore[arg-type]


def test_rgb_images_become_channels_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", train)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(20, dtype=np.uint8) % 4)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(6, 6, dtype=np.uint8))
    splits = load_fashion_mnist(tmp_path, val_fraction=0.0)
    assert splits.train.images.shape == (20, 3, 32, 32)
    assert splits.in_channels == 3 and splits.image_size == 32
    assert splits.num_classes == 7
    expected = (torch.from_numpy(train).permute(0, 3, 1, 2) / 255 - splits.mean) / splits.std
    assert torch.allclose(splits.train.images, expected, atol=1e-5)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as exc:
        load_fashion_mnist(tmp_path / "absent")
    message = _assert_one_line_with_fix(exc)
    assert "dataset-fashion-mnist" in message and str(tmp_path / "absent") in message


def test_missing_file(digits_idx_dir: Path) -> None:
    (digits_idx_dir / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"missing t10k-images-idx3-ubyte\[\.gz\]") as exc:
        load_fashion_mnist(digits_idx_dir)
    assert "apt-get install dataset-fashion-mnist" in _assert_one_line_with_fix(exc)


def test_truncated_file(digits_idx_dir: Path) -> None:
    path = digits_idx_dir / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated") as exc:
        load_fashion_mnist(digits_idx_dir)
    assert str(path) in _assert_one_line_with_fix(exc)


def test_truncated_gzip_file(digits_idx_dir: Path) -> None:
    path = digits_idx_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match="corrupt") as exc:
        load_fashion_mnist(digits_idx_dir)
    assert str(path) in _assert_one_line_with_fix(exc)


def test_bad_magic(digits_idx_dir: Path) -> None:
    path = digits_idx_dir / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x08\x03" + path.read_bytes()[2:])
    with pytest.raises(DatasetError, match="magic") as exc:
        load_fashion_mnist(digits_idx_dir)
    assert str(path) in _assert_one_line_with_fix(exc)


def test_label_count_mismatch(digits_idx_dir: Path) -> None:
    (digits_idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(digits_idx_dir / "t10k-labels-idx1-ubyte", np.zeros(296, dtype=np.uint8))
    with pytest.raises(DatasetError, match="296 labels") as exc:
        load_fashion_mnist(digits_idx_dir)
    message = _assert_one_line_with_fix(exc)
    assert "t10k-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message


def test_plain_file_preferred_and_gz_equivalent(digits_idx_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "all-plain"
    other.mkdir()
    for path in digits_idx_dir.iterdir():
        if path.suffix == ".gz":
            with gzip.open(path) as src, open(other / path.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(path, other / path.name)
    a = load_fashion_mnist(digits_idx_dir)
    b = load_fashion_mnist(other)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)


# --- batches --------------------------------------------------------------------------------


def _indexed_split(n: int) -> Split:
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return Split(images=images, labels=torch.arange(n, dtype=torch.int64))


def test_batches_shuffle_covers_every_sample_once() -> None:
    split = _indexed_split(103)
    generator = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(2):
        seen = []
        for x, y in split.batches(10, shuffle=True, generator=generator):
            assert x.shape[1:] == (1, 2, 2) and len(x) == len(y) <= 10
            assert torch.equal(x[:, 0, 0, 0].long(), y)
            seen.append(y)
        order = torch.cat(seen)
        assert sorted(order.tolist()) == list(range(103))
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1])
    assert not torch.equal(epochs[0], torch.arange(103))


def test_batches_reproducible_with_seeded_generator() -> None:
    split = _indexed_split(50)
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(5)
        runs.append(torch.cat([y for _, y in split.batches(7, shuffle=True, generator=generator)]))
    assert torch.equal(runs[0], runs[1])


def test_batches_in_order_and_drop_last() -> None:
    split = _indexed_split(10)
    sizes = [len(y) for _, y in split.batches(4, shuffle=False)]
    assert sizes == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in split.batches(4, shuffle=False)]), split.labels)
    assert [len(y) for _, y in split.batches(4, shuffle=True, drop_last=True)] == [4, 4]
    assert list(_indexed_split(0).batches(4, shuffle=True)) == []


def test_batches_device() -> None:
    x, y = next(iter(_indexed_split(4).batches(2, shuffle=False, device="cpu")))
    assert x.device.type == "cpu" and y.device.type == "cpu"


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_batches_bad_batch_size(bad: object) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        _indexed_split(4).batches(bad, shuffle=False)  # type: ignore[arg-type]


def test_split_validates_shapes() -> None:
    with pytest.raises(DatasetError):
        Split(images=torch.zeros(3, 28, 28), labels=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(DatasetError):
        Split(images=torch.zeros(3, 1, 2, 2), labels=torch.zeros(2, dtype=torch.int64))
