"""Tables outside the saved state that pruning slices, kept as the indices they keep.

A buffer registered with ``persistent=False`` is not in the state dict: a module builds it from
its width (transformers' sinusoidal positions in M2M100, NLLB and XGLM). When its channels are
pruned, the buffer stays out of the saved state; ``model.secateur_buffer_slices`` records, for
``"module.buffer"``, the indices kept along each dim in the original table's numbering, so a
freshly built model is sliced again on load (the manifest's ``"buffers"`` edit). A module that
rebuilds its table for longer inputs through ``get_embedding`` (transformers' convention) gets
one that keeps the same channels of the table it builds, so any length still reads the
original values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Keeps = dict[int, list[int]]  # dim -> kept indices, original numbering


class KeptChannels:
    """``build``'s table with only the kept indices along each dim (``keeps`` is shared with
    the model's record, so pruning again updates it)."""

    def __init__(self, build: Any, keeps: Keeps) -> None:
        self.build, self.keeps = build, keeps

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        table = self.build(*args, **kwargs)
        for dim, keep in sorted(self.keeps.items()):
            table = table.index_select(dim, torch.tensor(keep, device=table.device))
        return table


def is_unsaved_buffer(module: nn.Module, name: str) -> bool:
    return name in module._buffers and name in module._non_persistent_buffers_set


def record_buffer_slice_(
    model: nn.Module, key: str, module: nn.Module, keeps: list[tuple[int, torch.Tensor]]
) -> None:
    """Note that buffer ``key`` of ``module`` now keeps ``keeps`` (dim, indices into its
    current entries), composed with any earlier slice."""
    record: dict[str, Keeps] = getattr(model, "secateur_buffer_slices", None) or {}
    entry = record.setdefault(key, {})
    for dim, keep in keeps:
        earlier = entry.get(dim)
        kept = keep.tolist()
        entry[dim] = [earlier[i] for i in kept] if earlier is not None else kept
    model.secateur_buffer_slices = record
    _rebuild_keeping_(module, entry)


def _rebuild_keeping_(module: nn.Module, keeps: Keeps) -> None:
    build = getattr(type(module), "get_embedding", None)
    if callable(build):
        module.get_embedding = KeptChannels(build, keeps)


def buffer_slices(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """The manifest's ``"buffers"`` edit: JSON-able, dims as strings."""
    record = getattr(model, "secateur_buffer_slices", None) or {}
    present = dict(model.named_modules(remove_duplicate=False))  # depth pruning may remove some
    edits = {}
    for key, entry in record.items():
        module_name, _, name = key.rpartition(".")
        if module_name in present and is_unsaved_buffer(present[module_name], name):
            edits[key] = {str(d): [int(i) for i in keep] for d, keep in entry.items()}
    return edits


def apply_buffer_slices_(model: nn.Module, edits: Any) -> None:
    """Slice a freshly built model's unsaved buffers as the manifest says, in place.

    Raises:
        ValueError: the edit is malformed or does not fit the model's buffers.
    """
    if not isinstance(edits, dict):
        raise ValueError("'buffers' must map buffer names to {dim: kept indices}")
    for key, entry in edits.items():
        module_name, _, name = str(key).rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"buffer edit names {key!r}, which does not exist") from None
        if not is_unsaved_buffer(module, name):
            raise ValueError(f"buffer edit names {key!r}, which is not an unsaved buffer")
        table = module._buffers[name]
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"buffer edit {key!r} must map dims to kept indices")
        keeps = []
        for dim_text, keep in entry.items():
            dim = int(dim_text) if str(dim_text).isdigit() else -1
            if not 0 <= dim < table.dim():
                raise ValueError(f"buffer edit {key!r}: {dim_text!r} is not a dim of {key}")
            size = table.shape[dim]
            if (
                not isinstance(keep, list)
                or not keep
                or not all(type(i) is int and 0 <= i < size for i in keep)
                or keep != sorted(set(keep))
            ):
                raise ValueError(
                    f"buffer edit {key!r}: dim {dim} needs increasing indices below {size}"
                )
            keeps.append((dim, torch.tensor(keep)))
        for dim, keep in keeps:
            table = table.index_select(dim, keep.to(table.device))
        module.register_buffer(name, table, persistent=False)
        record_buffer_slice_(model, str(key), module, keeps)
