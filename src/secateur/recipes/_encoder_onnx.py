"""The encoder job's deployment file: the pruned text encoder as ONNX, and its fidelity there.

The file takes ``input_ids`` and ``attention_mask`` (``token_type_ids`` are left out: a single
sentence's are all zero, which is what the model assumes without them) of any batch size and
sequence length, and returns the token states first, as the model does. Its fidelity is
measured as in PyTorch: ONNX Runtime's token states, mean-pooled over the attention mask and
L2-normalised, against the original model's embeddings of the same held-out sentences.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._embed import default_embed
from ..errors import ConfigError
from ..export import OnnxExport, export_onnx
from ..measure import OnnxRunner, embedding_fidelity

#: The inputs the file takes, in order.
ONNX_INPUTS = ("input_ids", "attention_mask")


def _example(batches: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Two rows of the first batch (a padded batch of two shows the exporter the mask)."""
    first = batches[0]
    missing = [name for name in ONNX_INPUTS if name not in first]
    if missing:
        raise ConfigError(
            f"the tokenizer gives no {missing[0]}: an ONNX encoder file needs input_ids and "
            "attention_mask; drop --onnx"
        )
    return {name: first[name][:2] for name in ONNX_INPUTS}


def _runner_embed(runner: Any, inputs: Any) -> torch.Tensor:
    return default_embed(runner, {name: inputs[name] for name in runner.input_names})


def export_encoder_onnx(
    model: nn.Module,
    batches: list[Mapping[str, torch.Tensor]],
    reference: torch.Tensor,
    path: str | os.PathLike[str],
) -> tuple[OnnxExport, float]:
    """Write ``model`` to ``path`` as ONNX (any batch and length, checked against PyTorch in
    ONNX Runtime before it is kept) and return the export with the mean cosine between ONNX
    Runtime's embeddings of ``batches`` and ``reference``.

    Raises:
        ConfigError: the batches hold no ``input_ids`` or ``attention_mask``.
        ArtifactError: the model does not export, or ONNX Runtime disagrees with PyTorch.
    """
    with warnings.catch_warnings():
        # HF encoders index position and token-type buffers with non-negative slices only; the
        # exporter warns about negative indices regardless. The check against PyTorch and the
        # fidelity over every held-out sentence below test the file on real inputs.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        export = export_onnx(model, _example(batches), path, dynamic_sequence=True)
    runner = OnnxRunner(export.path)
    return export, embedding_fidelity(runner, reference, batches, embed=_runner_embed)
