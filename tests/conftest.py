"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits
from torch import nn

import secateur.recipes._compress as compress_module
from secateur.data import write_idx


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private SECATEUR_CACHE, so the user's cache is never read or written."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SECATEUR_CACHE", str(folder))
    return folder


@pytest.fixture
def digits_idx_dir(tmp_path: Path) -> Path:
    """A folder of Fashion-MNIST-style IDX files made from scikit-learn's 1797 8x8 digits.

    Each digit is scaled from 0..16 to 0..255, upscaled 3x to 24x24 and zero-padded to 28x28
    (grayscale). The first 1500 are the training set, the other 297 the test set. Half the
    files are gzipped (with a ``.gz`` suffix) so that both storage forms are exercised.
    """
    return make_digits_idx(tmp_path)


@pytest.fixture(scope="session")
def digits_idx_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`digits_idx_dir`, written once per session, for module-scoped fixtures; read only."""
    return make_digits_idx(tmp_path_factory.mktemp("digits"))


def make_digits_idx(parent: Path) -> Path:
    """Write the folder :func:`digits_idx_dir` describes under ``parent``; return it."""
    digits = load_digits()
    small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.kron(small, np.ones((1, 3, 3), dtype=np.uint8))
    images = np.pad(big, ((0, 0), (2, 2), (2, 2)))
    labels = digits.target.astype(np.uint8)
    folder = parent / "digits-idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", images[:1500], compress=True)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:1500])
    write_idx(folder / "t10k-images-idx3-ubyte", images[1500:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[1500:], compress=True)
    return folder


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, nn.Module]]:
    """The very module objects the job saves, by file name, to compare them with the reload."""
    models: dict[str, nn.Module] = {}
    real_save = compress_module.save_model

    def spy(model: nn.Module, path: Any, **kwargs: Any) -> Path:
        models[Path(path).name] = model
        return real_save(model, path, **kwargs)

    monkeypatch.setattr(compress_module, "save_model", spy)
    yield models
