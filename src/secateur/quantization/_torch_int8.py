"""int8 dynamic quantization of a PyTorch model's Linear layers (``torch.ao.quantization``).

Each ``nn.Linear`` becomes a dynamically quantized Linear: weights stored int8 per tensor,
activations quantized per batch at run time, int8 GEMM via fbgemm/oneDNN/qnnpack. Everything
else (convolutions, norms, embeddings) stays fp32. The stacked experts of transformers'
mixture-of-experts layers are first split into one Linear per expert (run expert by expert,
:mod:`secateur._expert_loop`), so they are quantized too. The kernels exist only on CPU, so
this pays off for Linear-heavy models (MLPs, transformers) served on CPU; convolutional models
gain little.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .._expert_loop import experts_as_linears_
from ..errors import ConfigError
from ..pruning._layer_matrix import is_hf_conv1d


def _conv1d_as_linear_(model: nn.Module) -> None:
    """Swap every HF ``Conv1D`` (GPT-2's projections: ``x @ W + b`` with ``W`` stored in × out)
    for the ``nn.Linear`` that computes the same, so the int8 kernels reach it too."""
    for name, module in list(model.named_modules()):
        if not is_hf_conv1d(module):
            continue
        weight = module.weight.detach()
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias.detach())
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, linear)


def quantize_dynamic_torch(model: nn.Module) -> nn.Module:
    """Return a CPU copy of ``model`` in eval mode whose every ``nn.Linear`` runs int8 dynamic
    (HF ``Conv1D`` layers, GPT-2's projections, are turned into the equivalent Linear first,
    and the stacked experts of transformers' MoE layers into one Linear per expert).

    ``model`` itself (weights, device, mode) is untouched. The copy runs on CPU only (PyTorch has
    no CUDA kernels for it) and holds packed int8 weights, so it cannot be saved with
    ``secateur.export.save_model``: save the fp32 model and quantize again after loading it.

    Raises:
        ConfigError: ``model`` has no ``nn.Linear`` (nothing would be quantized).

    Example:
        >>> from secateur.zoo import create_model
        >>> q = quantize_dynamic_torch(create_model("lenet_300_100"))
        >>> q(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if not any(isinstance(m, nn.Linear) or is_hf_conv1d(m) for m in model.modules()):
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear to quantize: dynamic int8 covers Linear "
            "layers only; use quantize_onnx for convolutional models"
        )
    clone = copy.deepcopy(model).cpu().eval()
    _conv1d_as_linear_(clone)
    experts_as_linears_(clone)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated.*")
        return torch.ao.quantization.quantize_dynamic(clone, {nn.Linear}, dtype=torch.qint8)
