"""quantization/: int8 post-training quantization (ONNX Runtime static/dynamic, PyTorch dynamic)
and k-means weight sharing with fine-tuned centroids."""

from ._codebook import CodebookConfig as CodebookConfig
from ._codebook import Codebooks as Codebooks
from ._codebook import cluster_weights_ as cluster_weights_
from ._codebook import kmeans_1d as kmeans_1d

__all__ = [
    "CodebookConfig",
    "Codebooks",
    "cluster_weights_",
    "kmeans_1d",
]
