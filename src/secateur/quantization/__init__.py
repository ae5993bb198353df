"""quantization/: int8 post-training quantization (ONNX Runtime static/dynamic, PyTorch dynamic)
and k-means weight sharing with fine-tuned centroids."""

from ._codebook import CodebookConfig as CodebookConfig
from ._codebook import Codebooks as Codebooks
from ._codebook import cluster_weights_ as cluster_weights_
from ._codebook import kmeans_1d as kmeans_1d
from ._onnx_int8 import QuantMode as QuantMode
from ._onnx_int8 import quantize_onnx as quantize_onnx
from ._torch_int8 import quantize_dynamic_torch as quantize_dynamic_torch

__all__ = [
    "CodebookConfig",
    "Codebooks",
    "QuantMode",
    "cluster_weights_",
    "kmeans_1d",
    "quantize_dynamic_torch",
    "quantize_onnx",
]
