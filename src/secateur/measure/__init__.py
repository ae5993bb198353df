"""measure/: params, non-zero params, MACs, latency, bytes on disk and accuracy → one ``Metrics``;
and the embedding fidelity of a compressed encoder to its original.

Imports none of the techniques (pruning, recovery, export); only the foundation packages
``data`` and ``training`` (for the evaluation loop).
"""

from ._fidelity import embed_batches as embed_batches
from ._fidelity import embedding_fidelity as embedding_fidelity
from ._latency import measure_latencies as measure_latencies
from ._latency import measure_latency as measure_latency
from ._macs import MacCount as MacCount
from ._macs import count_macs as count_macs
from ._measure import measure as measure
from ._metrics import Accuracy as Accuracy
from ._metrics import Latency as Latency
from ._metrics import LayerSparsity as LayerSparsity
from ._metrics import Metrics as Metrics
from ._onnx import OnnxRunner as OnnxRunner
from ._onnx_generate import OnnxGenerator as OnnxGenerator
from ._onnx_generate import OnnxSeq2SeqGenerator as OnnxSeq2SeqGenerator
from ._params import count_params as count_params
from ._params import layer_sparsity as layer_sparsity

__all__ = [
    "Accuracy",
    "LayerSparsity",
    "Latency",
    "MacCount",
    "Metrics",
    "OnnxGenerator",
    "OnnxSeq2SeqGenerator",
    "OnnxRunner",
    "count_macs",
    "count_params",
    "embed_batches",
    "embedding_fidelity",
    "layer_sparsity",
    "measure",
    "measure_latencies",
    "measure_latency",
]
