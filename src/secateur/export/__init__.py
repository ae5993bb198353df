"""export/: artifacts on disk: safetensors + JSON manifest (dense), and the compressed file
(sparse index + int8 or codebook values + zstd) that really shrinks."""

from ._compressed import CompressionConfig as CompressionConfig
from ._compressed import compressed_bytes as compressed_bytes
from ._compressed import load_compressed as load_compressed
from ._compressed import read_compressed_header as read_compressed_header
from ._compressed import save_compressed as save_compressed
from ._onnx import OnnxExport as OnnxExport
from ._onnx import export_onnx as export_onnx
from ._onnx_decoder import export_decoder_onnx as export_decoder_onnx
from ._onnx_seq2seq import Seq2SeqOnnxExport as Seq2SeqOnnxExport
from ._onnx_seq2seq import export_seq2seq_onnx as export_seq2seq_onnx
from ._safetensors import MANIFEST_FORMAT as MANIFEST_FORMAT
from ._safetensors import LoadedModel as LoadedModel
from ._safetensors import load_model as load_model
from ._safetensors import manifest_path_for as manifest_path_for
from ._safetensors import save_model as save_model
from ._safetensors import tensors_to_save as tensors_to_save
from ._safetensors import update_metadata as update_metadata
from ._stages import StageSize as StageSize
from ._stages import compression_stages as compression_stages

__all__ = [
    "CompressionConfig",
    "StageSize",
    "compressed_bytes",
    "compression_stages",
    "load_compressed",
    "read_compressed_header",
    "save_compressed",
    "MANIFEST_FORMAT",
    "LoadedModel",
    "OnnxExport",
    "Seq2SeqOnnxExport",
    "export_decoder_onnx",
    "export_onnx",
    "export_seq2seq_onnx",
    "load_model",
    "manifest_path_for",
    "save_model",
    "tensors_to_save",
    "update_metadata",
]
