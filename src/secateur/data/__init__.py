"""Datasets held in memory as tensors: Fashion-MNIST and any folder of IDX files like it."""

from __future__ import annotations

from ._fashion_mnist import DEFAULT_FASHION_MNIST_DIR as DEFAULT_FASHION_MNIST_DIR
from ._fashion_mnist import FASHION_MNIST_CLASSES as FASHION_MNIST_CLASSES
from ._fashion_mnist import DataSplits as DataSplits
from ._fashion_mnist import Split as Split
from ._fashion_mnist import load_fashion_mnist as load_fashion_mnist
from ._idx import read_idx as read_idx
from ._idx import write_idx as write_idx
from ._text import read_sentences as read_sentences
from ._text import tokenize_batches as tokenize_batches
