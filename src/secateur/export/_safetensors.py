"""Save and load models as safetensors weights plus a JSON manifest. Nothing is ever unpickled.

Layout for ``save_model(model, "out/pruned.safetensors")``:

* ``out/pruned.safetensors``: every state-dict tensor, dense (zeros included);
* ``out/pruned.json``: ``{"format", "model": {"name", "kwargs"}, "sha256", "metadata"}``, plus
  ``"edits"`` when the architecture was changed beyond widths, e.g.
  ``"edits": {"skipped": ["layer1.2"]}`` for blocks that depth pruning replaced by ``Skip``, or
  ``"edits": {"attributes": {"transformer.h.0.attn": {"split_size": 32}}}`` for module attributes
  that structural pruning tied to a pruned width (a list for split sizes or a shape held
  whole: ``{"split_indexes": [40, 8, 8, 8]}``), or
  ``"edits": {"attention": {"encoder.layers.0.self_attention": {"num_heads": 3}}}`` for
  ``nn.MultiheadAttention`` modules that structural pruning switched to
  ``PrunedMultiheadAttention`` (whole heads removed, or the hidden size pruned: the loader
  rebuilds them with that head count, their ``head_dim`` unchanged), and
  ``"edits": {"groups": {"layer1.0.conv2": 32}}`` for grouped convs with two or more inputs
  per group and GroupNorms (structural pruning shrinks each group of a ResNeXt conv alike, or
  removes whole groups: the loader gives each its saved count; a file without it was written
  before grouped convs shrank per group, when whole groups went), and
  ``"edits": {"buffers": {"model.encoder.embed_positions.weights": {"1": [0, 2, ...]}}}`` for
  tables outside the saved state that pruning sliced (the indices kept along each dim; the
  loader builds the table and slices it again); plus ``"tied"`` when
  parameters are shared, e.g. ``"tied": {"lm_head.weight": "transformer.wte.weight"}``: the
  weights file holds a shared tensor once, under its first state-dict name, and loading shares
  it again.

The model is rebuilt from the zoo by name and keyword arguments, its edits are replayed (each
kind of edit is one entry of ``_EDITS``), its Conv/Linear/norm/Embedding modules are resized to
the widths the saved tensors have (so structurally pruned models reload), its tied tensors are
shared again, then its state is loaded strictly, so the round trip is exact. The manifest's
SHA-256 of the weights file catches a truncated, corrupt or swapped file before anything is
parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .._atomic import atomic_write_bytes, atomic_write_text
from ..errors import ArtifactError, ConfigError
from ..pruning._attention import PrunedMultiheadAttention, set_num_heads_
from ..pruning._buffer_slices import apply_buffer_slices_, buffer_slices
from ..pruning._depth import replace_with_skip_, skipped_modules
from ..pruning._surgery import group_count, resize_to_state_
from ..pruning._width_attributes import one_int, set_width_attribute, width_attribute
from ..zoo import create_model

MANIFEST_FORMAT = "secateur.model/1"
_FIX = "pass a model saved by secateur (a .safetensors file with its .json manifest beside it)"


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    metadata: dict[str, Any]
    manifest_path: Path
    weights_path: Path


def _apply_skipped(model: nn.Module, names: Any) -> None:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("'skipped' must be a list of module names")
    for name in names:
        try:
            replace_with_skip_(model, name)
        except KeyError:
            raise ValueError(f"skipped module {name!r} does not exist in the model") from None


def _attributes(model: nn.Module) -> dict[str, dict[str, int | list[int]]]:
    held = getattr(model, "secateur_attributes", None) or {}
    present = dict(model.named_modules(remove_duplicate=False))  # depth pruning may remove some
    return {
        str(m): {
            str(a): [int(x) for x in v] if isinstance(v, (list, tuple)) else int(v)
            for a, v in attrs.items()
        }
        for m, attrs in held.items()
        if m in present
    }


def _apply_sizes(module: nn.Module, where: str, attr: str, value: list) -> None:
    """A split's sizes (a tuple or list attribute of the module itself), entry for entry."""
    current = getattr(module, attr, None) if "." not in attr else None
    if not isinstance(current, (tuple, list)) or len(current) != len(value):
        raise ValueError(
            f"attribute edit {where}: the module has no sizes attribute {attr!r} of"
            f" {len(value)} entries"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"attribute edit {where} = {value!r}: must be non-negative integers")
    setattr(module, attr, type(current)(value))


def _apply_attributes(model: nn.Module, edits: Any) -> None:
    if not isinstance(edits, dict) or not all(isinstance(a, dict) for a in edits.values()):
        raise ValueError("'attributes' must map module names to {attribute: value}")
    for module_name, attrs in edits.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"attribute edit names module {module_name!r}, which does not exist"
            ) from None
        for attr, value in attrs.items():
            where = f"{module_name}.{attr}" if module_name else str(attr)
            if not module_name and str(attr).startswith("config."):
                raise ValueError(f"attribute edit {where}: the model's own config is never edited")
            if isinstance(value, list):
                _apply_sizes(module, where, str(attr), value)
                continue
            current = width_attribute(module, str(attr))
            if (isinstance(current, bool) or not isinstance(current, int)) and one_int(
                current
            ) is None:
                raise ValueError(
                    f"attribute edit {where}: the module has no integer attribute {attr!r}"
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"attribute edit {where} = {value!r}: must be a positive integer")
            set_width_attribute(module, str(attr), value)
    # kept on the model, so that saving it again (or pruning it further) keeps the edits
    model.secateur_attributes = {m: dict(attrs) for m, attrs in edits.items()}


def _groups(model: nn.Module) -> dict[str, int]:
    """Group counts a reload cannot tell from the tensors: of grouped convs with two or more
    inputs per group (each group may have shrunk alike, or whole groups gone) and of
    GroupNorms (the same after such a conv)."""
    return {
        name: count
        for name, m in model.named_modules()
        if (count := group_count(m)) is not None
        and count > 1
        and (isinstance(m, nn.GroupNorm) or m.in_channels // count >= 2)
    }


def _apply_groups(model: nn.Module, edits: Any) -> None:
    """Check the saved group counts; ``rebuild_model`` hands them to the resize."""
    if not isinstance(edits, dict):
        raise ValueError("'groups' must map module names to their group count")
    built = {
        name: count for name, m in model.named_modules() if (count := group_count(m)) is not None
    }
    for name, count in edits.items():
        if name not in built:
            raise ValueError(
                f"groups edit names {name!r}, which is no grouped conv or GroupNorm of the model"
            )
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= built[name]:
            raise ValueError(
                f"groups edit {name!r} = {count!r}: must be an integer from 1 to {built[name]}"
            )


def _attention(model: nn.Module) -> dict[str, dict[str, int]]:
    return {
        name: {"num_heads": int(m.num_heads)}
        for name, m in model.named_modules()
        if isinstance(m, PrunedMultiheadAttention)
    }


def _apply_attention(model: nn.Module, edits: Any) -> None:
    """Rebuild each named ``nn.MultiheadAttention`` as ``PrunedMultiheadAttention`` with the
    saved head count (its head_dim is the built model's: whole heads go); the hidden width
    then follows the saved tensors like every other module's."""
    if not isinstance(edits, dict) or not all(isinstance(a, dict) for a in edits.values()):
        raise ValueError("'attention' must map module names to {\"num_heads\": count}")
    for module_name, entry in edits.items():
        if set(entry) != {"num_heads"}:
            raise ValueError(
                f"attention edit {module_name!r} must hold exactly 'num_heads', got {sorted(entry)}"
            )
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"attention edit names module {module_name!r}, which does not exist"
            ) from None
        if not isinstance(module, nn.MultiheadAttention):
            raise ValueError(
                f"attention edit names {module_name!r}, a {type(module).__name__}, not an "
                "nn.MultiheadAttention"
            )
        try:
            set_num_heads_(module, entry["num_heads"])
        except ValueError as exc:
            raise ValueError(f"attention edit {module_name!r}: {exc}") from None


# kind of edit -> (what a model holds of it, JSON-able and falsy when none; how to replay it)
_EDITS: dict[str, tuple[Callable[[nn.Module], Any], Callable[[nn.Module, Any], None]]] = {
    "skipped": (skipped_modules, _apply_skipped),
    "attributes": (_attributes, _apply_attributes),
    "attention": (_attention, _apply_attention),
    "groups": (_groups, _apply_groups),
    "buffers": (buffer_slices, apply_buffer_slices_),
}


def model_edits(model: nn.Module) -> dict[str, Any]:
    """The manifest's ``"edits"`` section for ``model``: only the kinds it holds."""
    edits = {}
    for kind, (collect, _) in _EDITS.items():
        value = collect(model)
        if value:
            edits[kind] = value
    return edits


def apply_edits_(model: nn.Module, edits: Any) -> None:
    """Replay a manifest's ``"edits"`` on a freshly built ``model``, in place.

    Raises:
        ValueError: ``edits`` is not a mapping, names an unknown kind, or a value does not fit.
    """
    if not isinstance(edits, dict):
        raise ValueError("'edits' must be a mapping")
    unknown = sorted(set(edits) - set(_EDITS))
    if unknown:
        raise ValueError(f"unknown edit(s) {', '.join(unknown)} (a newer secateur wrote it?)")
    for kind, (_, apply) in _EDITS.items():
        if kind in edits:
            apply(model, edits[kind])


def tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state as plain CPU tensors, each shared tensor once; and ``{alias: saved name}``.

    safetensors refuses tensors that share memory: a tensor held under several names (tied
    embeddings) is saved under its first name only, and one that merely overlaps another's
    memory is copied.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[int, str] = {}
    storages: set[int] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in first:
            tied[key] = first[id(value)]
            continue
        first[id(value)] = key
        tensor = value.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
        elif tensor.numel():
            storages.add(storage)
        tensors[key] = tensor.contiguous()
    return tensors, tied


def _check_tied(tied: Any, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        raise ValueError("'tied' must map tensor names to tensor names")
    for alias, source in tied.items():
        if source not in tensors or alias in tensors:
            raise ValueError(f"tied tensor {alias!r} -> {source!r} does not match the weights file")
    return tied


def _retie_(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each alias the very tensor its source is in ``model`` (after resizing), in place."""
    for alias, source in tied.items():
        module_name, _, attr = alias.rpartition(".")
        source_module_name, _, source_attr = source.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            shared = getattr(model.get_submodule(source_module_name), source_attr)
        except AttributeError:
            raise ValueError(f"tied tensor {alias!r} -> {source!r} is not in the model") from None
        if attr in module._parameters and isinstance(shared, nn.Parameter):
            setattr(module, attr, shared)
        elif attr in module._buffers and isinstance(shared, torch.Tensor):
            module.register_buffer(attr, shared)
        else:
            raise ValueError(f"tied tensor {alias!r} -> {source!r} is not in the model")


def manifest_path_for(weights_path: str | os.PathLike[str]) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_model(
    model: nn.Module, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights to ``path`` and its manifest beside it; return the weights path.

    ``model`` must carry ``secateur_spec`` (set by ``zoo.create_model``). ``metadata`` must be
    JSON-serialisable. Both files are written atomically, weights first, so a manifest only
    ever describes a complete weights file.

    Raises:
        ConfigError: if the model has no ``secateur_spec``, ``path`` does not end in
            ``.safetensors``, or ``metadata`` is not JSON-serialisable; nothing is written then.
        OutputError: if the folder cannot be written.
    """
    spec = getattr(model, "secateur_spec", None)
    if spec is None:
        raise ConfigError("model has no secateur_spec: build it with secateur.zoo.create_model")
    weights = Path(path)
    if weights.suffix != ".safetensors":
        raise ConfigError(f"cannot save to {weights}: the weights path must end in .safetensors")
    tensors, tied = tensors_to_save(model)
    blob = save_safetensors_bytes(tensors)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": spec,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "metadata": metadata or {},
    }
    edits = model_edits(model)
    if edits:
        manifest["edits"] = edits
    if tied:
        manifest["tied"] = tied
    # serialise before writing anything, so a bad metadata value cannot orphan new weights
    try:
        manifest_text = json.dumps(manifest, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata is not JSON-serialisable ({exc}): pass plain values") from None
    atomic_write_bytes(weights, blob)
    atomic_write_text(manifest_path_for(weights), manifest_text)
    return weights


def update_metadata(path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    """Merge ``metadata`` into the manifest of the model saved at ``path``; weights untouched.

    Raises:
        ArtifactError: if the manifest is missing or invalid.
        OutputError: if it cannot be rewritten.
    """
    manifest_file = manifest_path_for(path)
    manifest = _read_manifest(manifest_file)
    old = manifest.get("metadata")
    manifest["metadata"] = {**(old if isinstance(old, dict) else {}), **metadata}
    atomic_write_text(manifest_file, json.dumps(manifest, indent=2, sort_keys=True))


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"cannot read {path}: manifest missing: {_FIX}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"cannot read {path}: not a valid JSON manifest ({exc}): {_FIX}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"cannot read {path}: not a {MANIFEST_FORMAT} manifest: {_FIX}")
    spec = manifest.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        raise ArtifactError(f"cannot read {path}: manifest lacks a model spec: {_FIX}")
    return manifest


def _match_dtypes_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        saved = state.get(name)
        if saved is not None and saved.is_floating_point() and saved.dtype != tensor.dtype:
            tensor.data = tensor.data.to(saved.dtype)


def rebuild_model(
    manifest: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path
) -> nn.Module:
    """Build the zoo model a manifest names, replay its edits, resize it and load ``tensors``.

    ``manifest`` holds ``model`` (zoo name and kwargs) and optionally ``edits`` and ``tied``;
    ``tensors`` are the state-dict tensors (tied aliases omitted). Shared by every artifact
    format. Raises ``ArtifactError`` naming ``source`` when anything does not fit.
    """
    spec = manifest["model"]
    try:
        model = create_model(str(spec.get("name")), **spec["kwargs"])
    except (ConfigError, RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise ArtifactError(
            f"checkpoint {source} names a model secateur cannot build: {exc}"
        ) from None
    try:
        apply_edits_(model, manifest.get("edits", {}))
        tied = _check_tied(manifest.get("tied", {}), tensors)
    except ValueError as exc:
        raise ArtifactError(f"checkpoint {source} has a bad manifest ({exc}): {_FIX}") from None
    state = {**tensors, **{alias: tensors[source_name] for alias, source_name in tied.items()}}
    try:
        # structurally pruned widths come from the tensors
        resize_to_state_(model, state, manifest.get("edits", {}).get("groups"))
        _match_dtypes_(model, state)  # a half-precision model reloads in half precision
        _retie_(model, tied)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(
            f"checkpoint {source} does not fit its model ({first}): {_FIX}"
        ) from None
    return model


def load_model(path: str | os.PathLike[str], *, device: str = "cpu") -> LoadedModel:
    """Rebuild the model saved at ``path`` (the ``.safetensors`` file) on ``device``.

    Raises:
        ArtifactError: one line, for a missing, unreadable, corrupt or mismatched artifact.
    """
    weights = Path(path)
    manifest_file = manifest_path_for(weights)
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ArtifactError(f"cannot read checkpoint {weights}: {reason}: {_FIX}") from None
    manifest = _read_manifest(manifest_file)
    if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
        raise ArtifactError(
            f"checkpoint {weights} is corrupt or truncated (SHA-256 differs from its manifest): {_FIX}"
        )
    try:
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactError(
            f"checkpoint {weights} is not valid safetensors ({exc}): {_FIX}"
        ) from None
    model = rebuild_model(manifest, tensors, weights)
    model.to(device).eval()
    metadata = manifest.get("metadata")
    return LoadedModel(
        model, metadata if isinstance(metadata, dict) else {}, manifest_file, weights
    )
