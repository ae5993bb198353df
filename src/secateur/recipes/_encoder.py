"""The ``encoder`` job: a local transformers encoder (e.g. a sentence-transformers model folder)
and a text file → one-shot pruning on calibration sentences → optional embedding distillation
from the original → embedding fidelity on held-out sentences → save → measure → report.

Nothing is downloaded: the model and its tokenizer are read from the given folder only.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .._atomic import atomic_write_text, current_umask, ensure_writable_dir
from ..data import read_sentences, tokenize_batches
from ..errors import ArtifactError, ConfigError, DatasetError, OutputError, first_line
from ..export import CompressionConfig, load_compressed, save_compressed, save_model
from ..measure import Metrics, embed_batches, embedding_fidelity, measure
from ..pruning import (
    MaskSet,
    SparseGPTConfig,
    StructuredConfig,
    StructuredResult,
    prune_,
    prune_sparsegpt_,
)
from ..recovery import distill_embeddings
from ..report import comparison_table, conditions, markdown_report
from ..training import resolve_device
from ..zoo import from_transformers
from ._compress import time_pair
from ._encoder_config import COMPRESSED_FILE, ONNX_FILE, WEIGHTS_FILE, EncoderConfig
from ._encoder_onnx import export_encoder_onnx


@dataclass(frozen=True)
class EncoderResult:
    original: Metrics
    pruned: Metrics
    fidelity_one_shot: float
    fidelity: float
    fidelity_of_file: float
    distill_steps: int
    model_path: Path
    compressed_path: Path
    report_path: Path
    onnx_path: Path | None = None
    fidelity_onnx: float | None = None


def _load(folder: str, device: torch.device) -> tuple[nn.Module, Any]:
    """The model and tokenizer of ``folder``, from local files only, in eval mode on ``device``."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "the encoder job needs transformers: pip install 'secateur[hf]'"
        ) from None
    if not (Path(folder) / "config.json").is_file():
        raise ArtifactError(
            f"{folder} holds no config.json: pass the folder of a transformers model "
            "(config.json, weights and tokenizer files)"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ArtifactError(
            f"cannot load a transformers model from {folder} ({first_line(exc)}): pass a "
            "folder with config.json, weights and tokenizer files"
        ) from None
    # The zoo twin carries secateur_spec, so the compressed file can rebuild it.
    return from_transformers(model.to(device).eval()), tokenizer


def _split(sentences: list[str], config: EncoderConfig) -> tuple[list[str], list[str], list[str]]:
    """(held-out, calibration, distillation) sentences."""
    if len(sentences) <= config.eval_sentences:
        raise DatasetError(
            f"{config.text} has {len(sentences)} distinct sentences, but eval_sentences="
            f"{config.eval_sentences} are held out and some must remain: add text or lower "
            "--eval-sentences"
        )
    shuffled = list(sentences)
    random.Random(config.seed).shuffle(shuffled)
    held_out, rest = shuffled[: config.eval_sentences], shuffled[config.eval_sentences :]
    return held_out, rest[: config.calibration], rest


def _save_folder(savers: list[Any], target: Path) -> None:
    """Write with each of ``savers`` (objects with ``save_pretrained``, e.g. a model and its
    tokenizer) into a temp folder beside ``target``, then move it into place: ``target`` is
    never left half-written."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    old = target.parent / f".{target.name}.old"
    try:
        for saver in savers:
            if isinstance(saver, nn.Module):
                saver.save_pretrained(tmp, safe_serialization=True)
            else:
                saver.save_pretrained(tmp)
        mask = current_umask()
        tmp.chmod(0o777 & ~mask)  # mkdtemp and some writers make owner-only entries
        for path in tmp.iterdir():
            path.chmod(0o666 & ~mask)
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():  # put the previous folder back
                os.replace(old, target)
            raise
    except OSError as exc:
        raise OutputError(
            f"cannot write {target}: {exc.strerror or type(exc).__name__}: choose a writable "
            "--out folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _pruned_what(masks: MaskSet | None, structure: StructuredResult | None) -> str:
    """One line on what pruning removed."""
    if masks is not None:
        return f"pruned to {masks.sparsity():.1%} of the pruned layers' weights"
    assert structure is not None
    before = sum(b for b, _ in structure.widths)
    return f"removed {structure.removed_units} of {before} head and neuron units"


def _pruning_figures(masks: MaskSet | None, structure: StructuredResult | None) -> dict[str, Any]:
    if masks is not None:
        return {"sparsity_of_pruned_layers": masks.sparsity()}
    assert structure is not None
    return {
        "removed_units": structure.removed_units,
        "widths": [list(w) for w in structure.widths],
        "refused": [list(r) for r in structure.refused],
    }


def _method_label(config: EncoderConfig) -> str:
    pruning = config.pruning()
    if isinstance(pruning, StructuredConfig):
        return f"structured {pruning.ratio:.0%} of {'+'.join(pruning.kinds)}"
    return f"{config.method} {config.nm or f'{pruning.sparsity:.0%}'}"


def _measure_both(
    original: nn.Module,
    pruned: nn.Module,
    example: torch.Tensor,
    files: tuple[Path | None, Path],
    config: EncoderConfig,
) -> tuple[Metrics, Metrics]:
    """Count both models, then time them interleaved in one loop (fair ratios when noisy).

    On CPU both are also exported to ONNX (in a temporary folder) and their ONNX Runtime
    sessions timed in the same loop, as ``compress`` does, so ONNX Runtime latency sits beside
    PyTorch's."""
    before = measure(original, (example,), saved_file=files[0], latency_runs=None)
    after = measure(pruned, (example,), saved_file=files[1], latency_runs=None)
    return time_pair(
        (original, before), (pruned, after), example, config.latency_runs, config.progress
    )


def _example(
    tokenizer: Any, held_out: list[str], config: EncoderConfig, device: torch.device
) -> torch.Tensor:
    """``(1, T)`` token ids of the held-out sentence of median token length."""
    ids = tokenizer(held_out, truncation=True, max_length=config.max_length)["input_ids"]
    median = sorted(ids, key=len)[len(ids) // 2]
    return torch.tensor([median], device=device)


def run_encoder(config: EncoderConfig, *, console: Console | None = None) -> EncoderResult:
    """Run the encoder job described by ``config``; return the measurements and paths.

    Writes ``model/`` (the pruned model and its tokenizer, ``save_pretrained`` format, loadable
    by transformers and sentence-transformers' ``Transformer`` module), ``model.secz`` (the
    compressed file, for :func:`secateur.export.load_compressed`), with ``onnx`` ``model.onnx``,
    and ``report.md`` and ``report.json`` to ``config.out``.

    Raises:
        SecateurError: subclasses, one line each, for a bad model folder, text file or output
            folder; nothing half-written is left in ``config.out``.
    """
    console = console or Console()
    assert config.model is not None and config.text is not None  # checked by the config
    if config.onnx and importlib.util.find_spec("onnxruntime") is None:  # before the work
        raise ConfigError("onnx=true needs onnxruntime: pip install 'secateur[onnx]'")
    out = ensure_writable_dir(config.out)
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    held_out, calibration_text, train_text = _split(read_sentences(config.text), config)
    original, tokenizer = _load(config.model, device)
    console.print(
        f"{config.model}: {type(original).__name__}; {config.text}: {len(held_out)} held out, "
        f"{len(calibration_text)} calibration, {len(train_text)} distillation sentences; "
        f"device {device}, {torch.get_num_threads()} threads"
    )
    evaluation = tokenize_batches(tokenizer, held_out, 64, max_length=config.max_length)
    reference = embed_batches(original, evaluation)
    pruned = copy.deepcopy(original)

    start = time.perf_counter()
    calibration = tokenize_batches(tokenizer, calibration_text, 1, max_length=config.max_length)
    pruning = config.pruning()
    masks: MaskSet | None = None
    structure: StructuredResult | None = None
    if isinstance(pruning, SparseGPTConfig):  # minutes on a real model: show its progress bar
        masks = prune_sparsegpt_(pruned, pruning, calibration, progress=config.progress)
    elif isinstance(pruning, StructuredConfig):
        result = prune_(
            pruned, pruning, example_inputs=dict(calibration[0]), calibration=calibration
        )
        assert isinstance(result, StructuredResult)
        structure = result
    else:
        result = prune_(pruned, pruning, calibration=calibration)
        assert isinstance(result, MaskSet)
        masks = result
    prune_seconds = time.perf_counter() - start
    one_shot = embedding_fidelity(pruned, reference, evaluation)
    console.print(
        f"{_pruned_what(masks, structure)} in {prune_seconds:.1f} s: mean cosine {one_shot:.4f}"
    )
    fidelity, steps, distill_seconds = one_shot, 0, 0.0
    if config.distills:
        training = tokenize_batches(
            tokenizer,
            train_text,
            config.batch_size,
            max_length=config.max_length,
            by_length=True,
            seed=config.seed,
        )
        start = time.perf_counter()
        losses = distill_embeddings(
            pruned,
            original,
            training,
            steps=config.distill_steps,
            max_seconds=config.distill_seconds,
            lr=config.lr,
            lr_schedule=config.lr_schedule,
            masks=masks,
            progress=config.progress,
        )
        distill_seconds = time.perf_counter() - start
        steps = len(losses)
        fidelity = embedding_fidelity(pruned, reference, evaluation)
        console.print(
            f"distilled {steps} steps in {distill_seconds:.0f} s: mean cosine {fidelity:.4f}"
        )

    if structure is None:
        model_path = out / "model"
        _save_folder([pruned, tokenizer], model_path)
        folder_bytes = (model_path / WEIGHTS_FILE).stat().st_size
    else:  # per-layer widths: secateur's own checkpoint, the tokenizer beside it
        _save_folder([tokenizer], out / "tokenizer")
        model_path = save_model(pruned, out / WEIGHTS_FILE, metadata={"encoder": config.to_dict()})
        folder_bytes = model_path.stat().st_size
    compressed_path = save_compressed(
        pruned,
        out / COMPRESSED_FILE,
        CompressionConfig(values=config.file_values),
        metadata={"encoder": config.to_dict()},
    )
    from_file = load_compressed(compressed_path, device=str(device)).model
    fidelity_of_file = embedding_fidelity(from_file, reference, evaluation)
    del from_file
    source_file = Path(config.model) / WEIGHTS_FILE
    example = _example(tokenizer, held_out, config, device)
    before, after = _measure_both(
        original,
        pruned,
        example,
        (source_file if source_file.is_file() else None, compressed_path),
        config,
    )
    onnx_figures: dict[str, Any] = {}
    onnx_export = fidelity_onnx = None
    if config.onnx:
        onnx_export, fidelity_onnx = export_encoder_onnx(
            pruned, evaluation, reference, out / ONNX_FILE
        )
        onnx_figures = {
            "onnx_file_bytes": onnx_export.path.stat().st_size,
            "onnx_max_abs_diff": onnx_export.max_abs_diff,
            "fidelity_onnx": fidelity_onnx,
        }
        console.print(
            f"{onnx_export.path}: mean cosine {fidelity_onnx:.4f} in ONNX Runtime "
            f"(outputs within {onnx_export.max_abs_diff:.1e} of PyTorch's)"
        )
    figures = {
        **_pruning_figures(masks, structure),
        "prune_seconds": prune_seconds,
        "fidelity_one_shot": one_shot,
        "distill_steps": steps,
        "distill_seconds": distill_seconds,
        "fidelity": fidelity,
        "fidelity_of_file": fidelity_of_file,
        ("pretrained_folder_bytes" if structure is None else "weights_file_bytes"): folder_bytes,
        "held_out_sentences": len(held_out),
        **onnx_figures,
        "original": before.to_dict(),
        "pruned": after.to_dict(),
    }
    notes = [
        f"Fidelity (mean cosine between the original's and the pruned model's mean-pooled "
        f"embeddings of {len(held_out)} held-out sentences): {one_shot:.4f} one-shot"
        + (
            f", {fidelity:.4f} after {steps} distillation steps in {distill_seconds:.0f} s."
            if steps
            else "."
        ),
        f"The file row compares the original's {WEIGHTS_FILE} with the pruned model's "
        f"{COMPRESSED_FILE} ({config.file_values} values); reloaded from that file, the pruned "
        f"model's fidelity is {fidelity_of_file:.4f}.",
    ]
    if structure is None:
        notes += [
            f"Its save_pretrained folder keeps every zero: {folder_bytes:,} B.",
            "Unstructured zeros do not speed up dense kernels: the latency rows show it.",
        ]
    else:
        notes += [
            f"Its {WEIGHTS_FILE} (fp32, for secateur.load_model) is {folder_bytes:,} B.",
            "Heads and FFN neurons were physically removed: every row is measured on the "
            "smaller model.",
        ]
    if onnx_export is not None:
        notes.append(
            f"{ONNX_FILE} ({onnx_export.path.stat().st_size:,} B; inputs input_ids and "
            "attention_mask, any batch and length; ONNX Runtime's outputs within "
            f"{onnx_export.max_abs_diff:.1e} of PyTorch's): fidelity {fidelity_onnx:.4f} in "
            "ONNX Runtime."
        )
    title = f"secateur encoder: {Path(config.model).name}, {_method_label(config)}"
    setup = [
        ("model", str(config.model)),
        ("text", f"{config.text}: {len(held_out)} held out, {len(calibration_text)} calibration"),
        ("pruning", f"{config.pruning()!r}"),
        (
            "distillation",
            f"{steps} steps, lr {config.lr} {config.lr_schedule.value}, batch {config.batch_size}"
            if steps
            else "none",
        ),
        ("device", f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"),
    ]
    console.print(comparison_table(before, after, title=f"{title} (before = original)"))
    for line in [*conditions(after), *notes]:
        console.print(f"  {line}")
    report_path = out / "report.md"
    atomic_write_text(
        out / "report.json",
        json.dumps({"config": config.to_dict(), **figures}, indent=2) + "\n",
    )
    atomic_write_text(
        report_path, markdown_report(before, after, title=title, setup=setup, notes=notes)
    )
    console.print(
        f"saved {model_path}{'/' if model_path.is_dir() else ''}, {compressed_path}, "
        f"{out / 'report.json'} and {report_path}"
    )
    return EncoderResult(
        before,
        after,
        one_shot,
        fidelity,
        fidelity_of_file,
        steps,
        model_path,
        compressed_path,
        report_path,
        None if onnx_export is None else onnx_export.path,
        fidelity_onnx,
    )
