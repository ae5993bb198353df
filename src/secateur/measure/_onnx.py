"""An ONNX file opened in ONNX Runtime, callable like a module on torch tensors.

:class:`OnnxRunner` exists so that an exported (or int8-quantized) file can be timed and evaluated
by the same code as the PyTorch model it came from: ``measure_latencies([model, runner], x)``
times both interleaved, and ``secateur.training.evaluate(runner, split)`` measures its accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError, ConfigError, first_line

_FIX = "export it again with secateur.export.export_onnx"


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "running ONNX files needs onnxruntime: pip install 'secateur[onnx]'"
        ) from None
    return onnxruntime


class OnnxRunner:
    """An ``onnxruntime.InferenceSession`` on ``path`` that takes and returns torch tensors.

    Args:
        path: an ``.onnx`` file.
        threads: ONNX Runtime intra-op threads; ``None`` uses ``torch.get_num_threads()``, so
            that a runner and a PyTorch model timed side by side get the same number of cores.
            Inter-op parallelism is off (one graph node at a time), as in PyTorch eager, and
            idle threads sleep instead of spinning, so that timing a runner interleaved with a
            PyTorch model does not slow the model down.
        providers: ONNX Runtime execution providers, best first; ``None`` means
            ``["CPUExecutionProvider"]``.

    Attributes:
        path, threads: as given (``threads`` resolved to a number).
        runtime: e.g. ``"onnxruntime 1.31.1 CPUExecutionProvider"`` (the provider in use).
        device: ``"cpu"`` for the CPU provider, ``"cuda"`` for CUDA/TensorRT, else the provider.
        input_names, output_names: the graph's, in order.
        training: always ``False``; ``eval()`` and ``train(mode)`` do nothing and return the
            runner, so it can go wherever code toggles a module's mode.

    Calling ``runner(*tensors, **named)`` feeds positional tensors to the graph inputs in order
    and keyword tensors by input name. Tensors are converted to numpy (a copy for CUDA ones); the
    result is a tensor on the first input's device, or a tuple when the graph has several outputs.

    Raises:
        ArtifactError: ``path`` is missing, truncated or not a valid ONNX model (one line).
        ConfigError: ``threads`` < 1, an unknown provider, or onnxruntime is not installed.

    Example:
        >>> runner = OnnxRunner("lenet5.onnx", threads=1)
        >>> runner(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 10])
    """

    training = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        ort = _import_onnxruntime()
        self.path = Path(path)
        resolved = torch.get_num_threads() if threads is None else threads
        if isinstance(resolved, bool) or not isinstance(resolved, int) or resolved < 1:
            raise ConfigError(f"ONNX Runtime threads={threads!r} must be an integer >= 1")
        self.threads = resolved
        wanted = list(providers) if providers is not None else ["CPUExecutionProvider"]
        unknown = [p for p in wanted if p not in ort.get_available_providers()]
        if unknown:
            raise ConfigError(
                f"ONNX Runtime provider {unknown[0]!r} is not available here: use one of "
                f"{', '.join(ort.get_available_providers())}"
            )
        if not self.path.is_file():
            raise ArtifactError(f"no ONNX file at {self.path}: check the path or {_FIX}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: no provider notices on stderr
        # Idle ORT threads otherwise spin for a while after each run, taking the cores from the
        # PyTorch model timed next (measured here: a 1.2 ms MLP took 52 ms interleaved with them).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own types for every kind of bad file
            raise ArtifactError(
                f"cannot load ONNX file {self.path} (truncated or corrupt?): {first_line(exc)}: {_FIX}"
            ) from None
        provider = self._session.get_providers()[0]
        self.runtime = f"onnxruntime {ort.__version__} {provider}"
        if provider == "CPUExecutionProvider":
            self.device = "cpu"
        elif provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            self.device = "cuda"
        else:
            self.device = provider
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def __repr__(self) -> str:
        return f"OnnxRunner({str(self.path)!r}, threads={self.threads}, runtime={self.runtime!r})"

    def eval(self) -> OnnxRunner:
        return self

    def train(self, mode: bool = True) -> OnnxRunner:
        return self

    def _feed(self, tensors: tuple[torch.Tensor, ...], named: dict[str, torch.Tensor]) -> dict:
        if len(tensors) > len(self.input_names):
            raise ConfigError(
                f"{self.path.name} takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(tensors)} tensors"
            )
        feed = dict(zip(self.input_names, tensors, strict=False))  # checked above
        for name, tensor in named.items():
            if name not in self.input_names or name in feed:
                raise ConfigError(
                    f"{self.path.name} has no free input {name!r}: its inputs are "
                    f"{', '.join(self.input_names)}"
                )
            feed[name] = tensor
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ConfigError(f"{self.path.name} needs input {missing[0]!r}: pass it")
        return {n: _numpy(t) for n, t in feed.items()}

    def __call__(
        self, *tensors: torch.Tensor, **named: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feed = self._feed(tensors, named)
        try:
            outputs = self._session.run(None, feed)
        except Exception as exc:  # wrong shape or dtype for the graph
            raise ConfigError(f"{self.path.name} rejects these inputs: {first_line(exc)}") from None
        first = next(iter(tensors), None)
        if first is None:
            first = next(iter(named.values()))
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        out = tuple(torch.from_numpy(np.asarray(o)).to(device) for o in outputs)
        return out[0] if len(out) == 1 else out


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
