"""Fashion-MNIST (and any dataset stored the same way) as in-memory tensors.

The whole dataset is decoded once into normalised float32 tensors; batches are tensor slices,
which for 28x28 images is far faster than a DataLoader with worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DatasetError
from ._idx import read_idx

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_TRAIN_IMAGES = "train-images-idx3-ubyte"
_TRAIN_LABELS = "train-labels-idx1-ubyte"
_TEST_IMAGES = "t10k-images-idx3-ubyte"
_TEST_LABELS = "t10k-labels-idx1-ubyte"
_FILES = (_TRAIN_IMAGES, _TRAIN_LABELS, _TEST_IMAGES, _TEST_LABELS)
_INSTALL_FIX = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or pass --data DIR"
)
_DATA_FIX = "pass --data DIR holding matching IDX files"


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset, held in memory.

    Attributes:
        images: float32 tensor of shape ``(N, C, H, W)``, already normalised.
        labels: int64 tensor of shape ``(N,)``.

    Equality is identity (``eq=False``): comparing tensors element-wise is not a boolean.

    Raises:
        DatasetError: on construction, if the shapes or dtypes above do not hold.

    Example:
        >>> split = Split(torch.zeros(5, 1, 28, 28), torch.zeros(5, dtype=torch.int64))
        >>> [tuple(x.shape) for x, _ in split.batches(2, shuffle=False)]
        [(2, 1, 28, 28), (2, 1, 28, 28), (1, 1, 28, 28)]
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.float32:
            raise DatasetError(
                f"Split images must be a float32 tensor of shape (N, C, H, W), got "
                f"{self.images.dtype} of shape {tuple(self.images.shape)}: convert them first"
            )
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise DatasetError(
                f"Split labels must be an int64 tensor of shape (N,), got {self.labels.dtype} "
                f"of shape {tuple(self.labels.shape)}: convert them with labels.long().flatten()"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DatasetError(
                f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels: "
                "pass one label per image"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate once over the split in batches of ``(images, labels)``.

        Args:
            batch_size: samples per batch (a positive integer); the last batch may be smaller
                unless ``drop_last`` is true.
            shuffle: visit the samples in a random order (a fresh permutation per call), each
                exactly once; otherwise in stored order, as views without copying.
            generator: the CPU random generator for the permutation, for reproducible epochs.
            device: move each batch there (e.g. ``"cuda"``); ``None`` leaves it where it is.
            drop_last: skip a final batch smaller than ``batch_size`` (a batch of one sample
                breaks BatchNorm in training mode).

        Returns:
            An iterator of ``(x, y)`` with ``x`` of shape ``(B, C, H, W)`` and ``y`` of shape
            ``(B,)``.

        Raises:
            ConfigError: ``batch_size`` is not a positive integer (raised at the call, not at
                the first ``next``).

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> for x, y in splits.train.batches(128, shuffle=True, generator=g):
            ...     loss = loss_fn(model(x), y)
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise ConfigError(
                f"batch_size must be a positive integer, got {batch_size!r}: pass e.g. 128"
            )
        return self._iterate(int(batch_size), shuffle, generator, device, drop_last)

    def _iterate(
        self,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None,
        device: torch.device | str | None,
        drop_last: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        order = None
        if shuffle:
            order = torch.randperm(n, generator=generator)
            if self.images.device.type != "cpu":
                order = order.to(self.images.device)
        for start in range(0, stop, batch_size):
            if order is None:
                x = self.images[start : start + batch_size]
                y = self.labels[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                x = self.images.index_select(0, index)
                y = self.labels.index_select(0, index)
            if device is not None:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
            yield x, y


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A dataset split into train, validation and test, with what a model needs to know.

    Attributes:
        train, val, test: the splits; ``val`` is carved out of the original training set.
        mean, std: the normalisation applied to all splits, ``(pixel / 255 - mean) / std``,
            computed over the ``train`` split only.
        num_classes: ``max(label) + 1`` over train and test.
        in_channels: ``C`` of the images (1 grayscale, 3 RGB).
        image_size: ``H == W`` of the images.
        source: the folder the files were read from.
    """

    train: Split
    val: Split
    test: Split
    mean: float
    std: float
    num_classes: int
    in_channels: int
    image_size: int
    source: str

    @property
    def example_input(self) -> torch.Tensor:
        """The first test image as a batch of one, shape ``(1, C, H, W)`` (for tracing)."""
        return self.test.images[:1]


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"no Fashion-MNIST files in {root} (missing {name}[.gz]): {_INSTALL_FIX}")


def _channels_first(images: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, C) with C in {1, 3} -> (N, C, H, W)."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DatasetError(
            f"{path} holds an array of shape {images.shape}, not images of shape (N, H, W) or "
            f"(N, H, W, 3): {_DATA_FIX}"
        )
    if images.shape[2] != images.shape[3]:
        raise DatasetError(
            f"{path} holds {images.shape[2]}x{images.shape[3]} images but square ones are "
            f"needed: resize them to a square size or {_DATA_FIX}"
        )
    return images


def _check_labels(
    labels: np.ndarray, images: np.ndarray, labels_path: Path, images_path: Path
) -> None:
    if labels.ndim != 1:
        raise DatasetError(
            f"{labels_path} holds an array of shape {labels.shape}, not labels of shape (N,): "
            f"{_DATA_FIX}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"{labels_path} has {labels.shape[0]} labels but {images_path} has "
            f"{images.shape[0]} images: {_DATA_FIX}"
        )


def _pixel_mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of ``images / 255`` without materialising a float copy of the data."""
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    var = float((counts * (values - mean) ** 2).sum() / total)
    return mean, math.sqrt(var)


def _to_split(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    # (p/255 - mean)/std as one fused scale and shift, in place to avoid a second copy.
    x.mul_(1.0 / (255.0 * std)).sub_(mean / std)
    y = torch.from_numpy(labels.astype(np.int64))
    return Split(images=x, labels=y)


def load_fashion_mnist(
    root: str | Path | None = None,
    *,
    val_fraction: float = 1 / 12,
    seed: int = 0,
    limit: int | None = None,
) -> DataSplits:
    """Load Fashion-MNIST, or any folder holding the same four IDX files, into memory.

    The folder must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or with a ``.gz``
    suffix. Images are uint8 of shape ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB) with
    ``H == W``; labels are uint8 of shape ``(N,)``.

    Args:
        root: the folder; ``None`` means :data:`DEFAULT_FASHION_MNIST_DIR`.
        val_fraction: share of the training set moved to the validation split, in [0, 0.5];
            ``round(len(train) * val_fraction)`` images chosen by a permutation seeded with
            ``seed`` (the same seed always gives the same split).
        seed: seed of that permutation.
        limit: keep only the first ``limit`` training and first ``limit`` test images (before
            the validation split), for quick runs.

    Returns:
        :class:`DataSplits` whose images are float32 ``(N, C, H, W)`` normalised with the mean
        and std of the train split's pixels scaled to [0, 1], and labels int64 ``(N,)``.

    Raises:
        DatasetError: the folder or a file is missing, a file is corrupt, or images and labels
            do not match.
        ConfigError: ``val_fraction``, ``seed`` or ``limit`` is out of range.

    Example:
        >>> splits = load_fashion_mnist(val_fraction=0.1, limit=1000)
        >>> splits.train.images.shape, len(splits.val), splits.num_classes
        (torch.Size([900, 1, 28, 28]), 100, 10)
    """
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, Real)
        or not 0.0 <= float(val_fraction) <= 0.5
    ):
        raise ConfigError(
            f"val_fraction must be a number in [0, 0.5], got {val_fraction!r}: pass e.g. 0.1"
        )
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}: pass e.g. 0")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, Integral) or limit < 1
    ):
        raise ConfigError(
            f"limit must be a positive integer or None, got {limit!r}: pass e.g. 1000, "
            "or None for all images"
        )

    folder = DEFAULT_FASHION_MNIST_DIR if root is None else Path(root).expanduser()
    if not folder.is_dir():
        why = "not a folder" if folder.exists() else "folder does not exist"
        raise DatasetError(f"no Fashion-MNIST files in {folder} ({why}): {_INSTALL_FIX}")
    paths = {name: _find(folder, name) for name in _FILES}

    arrays = {name: read_idx(path) for name, path in paths.items()}
    train_x = _channels_first(arrays[_TRAIN_IMAGES], paths[_TRAIN_IMAGES])
    test_x = _channels_first(arrays[_TEST_IMAGES], paths[_TEST_IMAGES])
    train_y, test_y = arrays[_TRAIN_LABELS], arrays[_TEST_LABELS]
    _check_labels(train_y, train_x, paths[_TRAIN_LABELS], paths[_TRAIN_IMAGES])
    _check_labels(test_y, test_x, paths[_TEST_LABELS], paths[_TEST_IMAGES])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetError(
            f"{paths[_TRAIN_IMAGES]} holds images of shape {train_x.shape[1:]} but "
            f"{paths[_TEST_IMAGES]} holds {test_x.shape[1:]}: {_DATA_FIX}"
        )
    for name, images in ((_TRAIN_IMAGES, train_x), (_TEST_IMAGES, test_x)):
        if images.shape[0] == 0:
            raise DatasetError(f"{paths[name]} holds no images: {_DATA_FIX}")

    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
        test_x, test_y = test_x[:limit], test_y[:limit]

    n_train = train_x.shape[0]
    n_val = round(n_train * float(val_fraction))
    order = np.random.default_rng(int(seed)).permutation(n_train)
    # Sorted indices keep the stored order within each split and make the gathers sequential.
    val_idx = np.sort(order[:n_val])
    fit_idx = np.sort(order[n_val:])
    val_x, val_y = train_x[val_idx], train_y[val_idx]
    fit_x, fit_y = train_x[fit_idx], train_y[fit_idx]

    mean, std = _pixel_mean_std(fit_x)
    if std == 0.0:
        raise DatasetError(
            f"every training pixel in {paths[_TRAIN_IMAGES]} has the same value, so the images "
            f"cannot be normalised: {_DATA_FIX}"
        )

    num_classes = int(max(int(fit_y.max(initial=0)), int(val_y.max(initial=0)), int(test_y.max())))
    return DataSplits(
        train=_to_split(fit_x, fit_y, mean, std),
        val=_to_split(val_x, val_y, mean, std),
        test=_to_split(test_x, test_y, mean, std),
        mean=mean,
        std=std,
        num_classes=num_classes + 1,
        in_channels=int(train_x.shape[1]),
        image_size=int(train_x.shape[2]),
        source=str(folder),
    )
