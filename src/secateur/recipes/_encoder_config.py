"""What an ``encoder`` job is asked to do: :class:`EncoderConfig`, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._config import (
    check_int,
    check_range,
    coerce_enum,
    config_from_dict,
    config_to_dict,
    split_names,
)
from ..errors import ConfigError
from ..importance import create_criterion
from ..pruning import SparseGPTConfig, StructuredConfig, UnstructuredConfig
from ..training import LRSchedule

METHODS = ("sparsegpt", "wanda", "magnitude", "structured")
STRUCTURED_KINDS = ("head", "channel")  # the hidden size stays: it is the embedding's width
FILE_VALUES = ("exact", "float16", "int8")
WEIGHTS_FILE = "model.safetensors"
COMPRESSED_FILE = "model.secz"
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class EncoderConfig:
    """Prune a local transformers encoder one-shot and win its embeddings back by distillation.

    ``model`` is a folder holding a transformers model and its tokenizer (``config.json``,
    weights, tokenizer files), e.g. a sentence-transformers model; ``text`` a UTF-8 file with one
    sentence per line. The sentences are shuffled with ``seed``; the first ``eval_sentences``
    are held out to measure fidelity (mean cosine between the original's and the pruned model's
    mean-pooled embeddings), the next ``calibration`` feed the pruning criterion one sentence
    per batch, and all but the held-out ones are the distillation text.

    Every Linear layer except those matching ``exclude`` is pruned to ``sparsity`` (default
    0.5; or the ``nm`` pattern, e.g. ``"2:4"``) with ``method``: ``sparsegpt`` (OBS
    reconstruction; ``dense_targets`` reconstructs the original's layer outputs), ``wanda`` or
    ``magnitude`` (per layer). ``method="structured"`` instead removes ``ratio`` (default 0.5)
    of every layer's attention heads and FFN neurons (``kinds``, default both), ranked by
    ``criterion`` (default ``activation``) on the calibration sentences, and with
    ``reconstruct`` (default on) refits the layers reading them by least squares, so the model
    is physically smaller and faster; the hidden size, hence the embedding, keeps its width.
    Then, if ``distill_seconds`` or ``distill_steps`` is given, the pruned model is distilled
    towards the original's embeddings (masks held) with
    :func:`secateur.recovery.distill_embeddings`: ``lr``, ``lr_schedule``, batches of
    ``batch_size`` sentences of similar length.

    The pruned model is saved twice: in transformers' ``save_pretrained`` format (after
    structured pruning, whose per-layer widths a transformers config cannot describe, as
    secateur's ``model.safetensors`` and manifest for :func:`secateur.load_model`, beside a
    ``tokenizer/`` folder), and as a compressed ``.secz`` file (sparse index + ``file_values``
    values + zstd; ``exact`` is lossless, ``float16`` and ``int8`` (per-row scales) are lossy).
    The file is reloaded and its fidelity measured too. With ``onnx``, the pruned model is also
    written as ``model.onnx`` (``input_ids`` and ``attention_mask`` of any batch and length,
    checked against PyTorch) and its fidelity measured in ONNX Runtime. On CPU, both models are
    also timed in ONNX Runtime, in the same loop as in PyTorch.

    Raises:
        ConfigError: one line naming the field and what is allowed, for any bad value.

    Example:
        >>> EncoderConfig(model="minilm", text="s.txt", nm="2:4").pruning().nm
        (2, 4)
    """

    model: str | None = None
    text: str | None = None
    method: str = "sparsegpt"
    sparsity: float | None = None
    nm: str | None = None
    dense_targets: bool = False
    ratio: float | None = None
    kinds: tuple[str, ...] | None = None
    criterion: str | None = None
    reconstruct: bool | None = None
    exclude: tuple[str, ...] = ("pooler*",)
    eval_sentences: int = 256
    calibration: int = 128
    distill_seconds: float | None = None
    distill_steps: int | None = None
    lr: float = 1e-4
    lr_schedule: LRSchedule = LRSchedule.COSINE
    file_values: str = "exact"
    onnx: bool = False
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    device: str = "auto"
    out: str = "secateur-encoder"
    threads: int | None = None
    latency_runs: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError(
                "no model folder given: pass one holding a transformers model and its tokenizer, "
                "e.g. secateur encoder path/to/all-MiniLM-L6-v2 --text sentences.txt"
            )
        if not self.text:
            raise ConfigError(
                "no text given: pass --text FILE, a UTF-8 file with one sentence per line"
            )
        if self.method not in METHODS:
            raise ConfigError(
                f"method={self.method!r} is not allowed: choose one of {', '.join(METHODS)}"
            )
        if self.file_values not in FILE_VALUES:
            raise ConfigError(
                f"file_values={self.file_values!r} is not allowed: choose one of "
                f"{', '.join(FILE_VALUES)}"
            )
        if self.dense_targets and self.method != "sparsegpt":
            raise ConfigError("dense_targets applies to method=sparsegpt only: drop it")
        structured = {"ratio", "kinds", "criterion", "reconstruct"}
        fields = structured if self.method != "structured" else {"sparsity", "nm"}
        given = sorted(f for f in fields if getattr(self, f) is not None)
        if given:
            needs = "method=structured" if self.method != "structured" else "the other methods"
            raise ConfigError(
                f"{given[0]} applies to {needs} only, not method={self.method}: drop it"
            )
        if self.kinds is not None:
            object.__setattr__(self, "kinds", split_names(self.kinds))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(
            self, "lr_schedule", coerce_enum("lr_schedule", LRSchedule, self.lr_schedule)
        )
        if not isinstance(self.onnx, bool):
            raise ConfigError(f"onnx={self.onnx!r} must be true or false")
        check_int("eval_sentences", self.eval_sentences, 1)
        check_int("calibration", self.calibration, 1)
        if self.distill_seconds is not None:
            check_range("distill_seconds", self.distill_seconds, 0.0, low_open=True)
        if self.distill_steps is not None:
            check_int("distill_steps", self.distill_steps, 1)
        check_range("lr", self.lr, 0.0, low_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("max_length", self.max_length, 2)
        check_int("latency_runs", self.latency_runs, 20)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        self.pruning()  # validates sparsity, nm and the structured settings

    def pruning(self) -> UnstructuredConfig | SparseGPTConfig | StructuredConfig:
        sparsity = 0.5 if self.sparsity is None else self.sparsity
        if self.method == "structured":
            kinds = STRUCTURED_KINDS if self.kinds is None else self.kinds
            if "hidden" in kinds:
                raise ConfigError(
                    "kinds may not include hidden here: the hidden size is the embedding's "
                    "width, which must match the original's; use head and/or channel"
                )
            criterion = self.criterion or "activation"
            if set(create_criterion(criterion).needs) - {"activations"}:
                raise ConfigError(
                    f"criterion={criterion!r} needs a loss, which an encoder's embeddings do not "
                    "give: use activation, wanda, apoz, l1, l2 or magnitude"
                )
            return StructuredConfig(
                ratio=0.5 if self.ratio is None else self.ratio,
                kinds=kinds,
                criterion=criterion,
                ignore=self.exclude,
                reconstruct=True if self.reconstruct is None else self.reconstruct,
            )
        if self.method == "sparsegpt":
            return SparseGPTConfig(
                sparsity=sparsity,
                nm=self.nm,
                exclude=self.exclude,
                dense_targets=self.dense_targets,
            )
        return UnstructuredConfig(
            sparsity=sparsity,
            nm=self.nm,
            scope="layer",
            criterion=self.method,
            exclude=self.exclude,
        )

    @property
    def distills(self) -> bool:
        return self.distill_seconds is not None or self.distill_steps is not None

    def to_dict(self) -> dict[str, Any]:
        out = config_to_dict(self)
        out["exclude"] = list(self.exclude)
        if self.kinds is not None:
            out["kinds"] = list(self.kinds)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        return config_from_dict(cls, data)
