"""Module attributes that hold widths, rewritten after surgery so the pruned code runs.

A module's forward often rebuilds shapes from attributes (``view(b, t, self.num_heads, -1)``,
GPT-2's ``split(self.split_size)``, Phi-3's ``qkv[..., :self.config.num_attention_heads *
self.head_dim]``). The graph notes every int a reshape, split or slice used that equals a
prunable width (:class:`~secateur.graph.WidthAttribute`); here the attributes holding it are
found and set to the new width:

- an int attribute of the module equal to the width, or a head count (a name with ``head`` in
  it) that times the module's head size (``head_dim``) equals it;
- the same on the module's ``config`` when its code reads the attribute by name there. A
  config is shared by every layer, so the module gets its own :class:`ConfigView`: the pruned
  counts are its own, every other read and write goes to the shared config (so switching the
  model's attention implementation still reaches it);
- a head count of the module around a head group that no reshape reads (``num_heads`` beside
  a ``num_kv_heads`` that is read, or one never read at all), when it is a whole multiple of
  the group's units: it keeps that multiple of the kept units (:func:`_head_counts_`).

Every rewrite is recorded in ``model.secateur_attributes`` (``{module: {"num_heads": 2,
"config.num_attention_heads": 4}}``) so that a saved model reloads; :func:`set_width_attribute`
replays one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from ..graph import DependencyGraph, WidthAttribute

_VIEW_FIELDS = ("_secateur_base", "_secateur_own")


class ConfigView:
    """One module's view of a config shared by many: the attributes in ``own`` read (and
    write) their own values; every other attribute is the shared config's.

    Example:
        >>> from types import SimpleNamespace
        >>> shared = SimpleNamespace(num_attention_heads=8, sliding_window=None)
        >>> view = ConfigView(shared, {"num_attention_heads": 4})
        >>> view.num_attention_heads, shared.num_attention_heads
        (4, 8)
        >>> shared.sliding_window = 128
        >>> view.sliding_window
        128
    """

    def __init__(self, base: Any, own: dict[str, Any]) -> None:
        if isinstance(base, ConfigView):  # a view of a view reads through to the shared one
            own = {**base._secateur_own, **own}
            base = base._secateur_base
        object.__setattr__(self, "_secateur_base", base)
        object.__setattr__(self, "_secateur_own", dict(own))

    def __getattr__(self, name: str) -> Any:
        # only called for names not found on the view itself; dunders and the view's own fields
        # stay local so that copy/deepcopy of a half-built view never recurse
        if name.startswith("__") or name in _VIEW_FIELDS:
            raise AttributeError(name)
        fields = self.__dict__
        if name in fields.get("_secateur_own", {}):
            return fields["_secateur_own"][name]
        if "_secateur_base" not in fields:
            raise AttributeError(name)
        return getattr(fields["_secateur_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._secateur_own:
            self._secateur_own[name] = value
        else:
            setattr(self._secateur_base, name, value)

    def __copy__(self) -> ConfigView:
        return ConfigView(self._secateur_base, self._secateur_own)

    def to_dict(self) -> dict[str, Any]:
        """The shared config's ``to_dict()`` with this view's own values."""
        return {**self._secateur_base.to_dict(), **self._secateur_own}

    def __repr__(self) -> str:
        own = ", ".join(f"{k}={v!r}" for k, v in self._secateur_own.items())
        return f"ConfigView({type(self._secateur_base).__name__}, {own})"


def shared_config(config: Any) -> Any:
    """The config behind ``config`` (itself unless it is a :class:`ConfigView`)."""
    return config._secateur_base if isinstance(config, ConfigView) else config


def _shape_entry(value: Any) -> int | None:
    """Where the width sits in a shape whose other entries are all 1: OLMo's
    ``normalized_shape = (hidden,)``, timm's layer scale ``shape = (dim, 1, 1)``."""
    if not isinstance(value, (tuple, list)) or not value:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    wide = [i for i, v in enumerate(value) if v != 1]
    return wide[0] if len(wide) == 1 else 0 if len(value) == 1 else None


def one_int(value: Any) -> int | None:
    """The int in a one-int shape such as OLMo's ``normalized_shape = (hidden,)``, else None."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return _int(value[0]) if not isinstance(value[0], (tuple, list)) else None
    return None


def _shape_width(value: Any) -> int | None:
    """The width in a shape whose other entries are 1 (timm's layer scale ``(dim, 1, 1)``).
    Taken only for an attribute the reshape names as its shape: kernel sizes and strides
    such as ``(3, 1)`` look the same."""
    at = _shape_entry(value)
    return value[at] if at is not None else None


def with_width(current: Any, width: int) -> Any:
    """``width`` in the form of ``current``: an int, or such a shape of the same type."""
    at = _shape_entry(current)
    if at is None:
        return width
    return type(current)(width if i == at else v for i, v in enumerate(current))


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    return value if isinstance(value, int) else one_int(value)


def _named_shapes(module: nn.Module, attr: WidthAttribute) -> dict[str, int]:
    """The module's shape attributes (``(dim, 1, 1)``) that the reshape spells as its shape."""
    if not attr.spelled_at:
        return {}
    return {
        n: w
        for n, v in vars(module).items()
        if n in attr.spelled_at and (w := _shape_width(v)) is not None
    }


def _within_head(name: str) -> bool:
    """Whether an attribute names a size inside one head (``head_dim``, BERT's
    ``attention_head_size``), which never changes since whole heads go; ``all_head_size``
    (every head's width together) is not one."""
    return not name.startswith("all_") and ("head_dim" in name or name.endswith("head_size"))


def _head_size(values: dict[str, Any]) -> int | None:
    sizes = {_int(v) for n, v in values.items() if _within_head(n)} - {None, 0}
    return sizes.pop() if len(sizes) == 1 else None


def _counts_heads(name: str) -> bool:
    """A count of heads (``num_heads``, ``num_kv_heads``), not a size inside one head, every
    head's width together (``all_head_size``) or a ratio (``heads_per_group``)."""
    return (
        # num_heads, n_head, num_kv_heads, heads; not d_head, head_width or head_ratio
        ("heads" in name or re.fullmatch(r"(num|n|total)_\w*head", name) is not None)
        and not name.startswith("all_")
        and "per_" not in name
        and "group" not in name
        and "dim" not in name  # Gated DeltaNet's head_k_dim: a size inside a head
        and "size" not in name
        and not _within_head(name)
    )


def _by_width(name: str, value: int, attr: WidthAttribute, new: int, head_size: int | None):  # noqa: ANN202
    """What attribute ``name`` holding ``value`` becomes when ``attr``'s width becomes ``new``:
    ``new`` when it holds the width, the new head count when it counts heads of ``head_size``
    (``value * head_size`` is the width), else None."""
    if _within_head(name):
        return None
    if value == attr.value:
        return new
    if _counts_heads(name) and head_size and value * head_size == attr.value:
        return new // head_size if new % head_size == 0 else None
    return None


def _by_units(name: str, value: int, units: tuple[int, int] | None):  # noqa: ANN202
    """The new count of a head-count attribute holding the number of units of the head group
    behind the width (``(units, kept)``): the key/value heads, Falcon's ``num_kv_heads``."""
    if units is None or not _counts_heads(name) or value != units[0]:
        return None
    return units[1]


def _head_units(
    graph: DependencyGraph, attr: WidthAttribute, kept: dict[int, int]
) -> tuple[int, int] | None:
    """``(units, kept units)`` when ``attr``'s width is made of one head group, else None."""
    groups = {g for g, _, _ in attr.terms}
    if len(groups) != 1 or None in groups:
        return None
    (index,) = groups
    group = graph.groups[index]
    return (group.size, kept.get(index, group.size)) if group.kind == "head" else None


def _query_groups_(model: nn.Module, graph: DependencyGraph, kept: dict[int, int]) -> dict:
    """Multi-query attention: whole query heads go while the one key/value head stays, so the
    attention module's ``num_key_value_groups`` (query heads per key/value head, read by HF's
    attention functions from the module, not seen in any reshape) becomes the kept count."""
    edits: dict[str, dict[str, int]] = {}
    for index, group in enumerate(graph.groups):
        now = kept.get(index, group.size)
        if not group.shared_kv or now == group.size:
            continue
        for name, module in _holders(model, group, _has_query_groups).items():
            if _int(vars(module).get("num_key_value_groups")) == group.size:
                module.num_key_value_groups = now
                edits.setdefault(name, {})["num_key_value_groups"] = now
    return edits


def _head_counts_(  # noqa: ANN202
    model: nn.Module, graph: DependencyGraph, kept: dict[int, int], edits: dict, done: dict
):
    """Head counts no reshape reads: whole units of a head group go (a key/value head with
    the query heads it serves; Gated DeltaNet's key head with its value heads), so a head
    count of the module around the group that is a whole multiple of the units (``num_heads``
    beside ``num_kv_heads``; ``num_v_heads`` beside ``num_k_heads``) keeps that multiple of
    the kept units. Only where that module holds one head group, and never a count already
    rewritten by this pruning (``done``: names per module; transformers 5.25's Falcon and
    Qwen3.5 view by ``-1``)."""
    groups_in: dict[str, set[int]] = {}
    holders: dict[str, nn.Module] = {}
    for index, group in enumerate(graph.groups):
        if group.kind == "head" and not group.shared_kv:
            for name, module in _holders(model, group, _has_head_count).items():
                groups_in.setdefault(name, set()).add(index)
                holders[name] = module
    for name, indices in groups_in.items():
        if len(indices) != 1:  # counts of several head groups: which is which is unknown
            continue
        (index,) = indices
        units, now = graph.groups[index].size, kept.get(index, graph.groups[index].size)
        if now == units:
            continue
        for attr, value in list(vars(holders[name]).items()):
            count = _int(value)
            if attr in done.get(name, ()) or not _head_count(attr) or not count or count % units:
                continue
            set_width_attribute(holders[name], attr, count // units * now)
            edits.setdefault(name, {})[attr] = count // units * now


def _head_count(name: str) -> bool:
    return not name.startswith("_") and _counts_heads(name)


def _has_head_count(module: nn.Module) -> bool:
    return any(_head_count(n) and _int(v) for n, v in vars(module).items())


def _holders(
    model: nn.Module, group: Any, holds: Callable[[nn.Module], bool]
) -> dict[str, nn.Module]:
    """For each member of ``group``, the nearest module around it that ``holds``."""
    found: dict[str, nn.Module] = {}
    for member in {m.module_name for m in group.members}:
        parts = member.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            name = ".".join(parts[:depth])
            module = model.get_submodule(name)
            if holds(module):
                found[name] = module
                break
    return found


def _has_query_groups(module: nn.Module) -> bool:
    return _int(vars(module).get("num_key_value_groups")) is not None


def _int_attributes(obj: Any) -> dict[str, Any]:
    """The int attributes of a config object (none for a dict or a slotted object)."""
    values = obj._secateur_own if isinstance(obj, ConfigView) else {}
    fields = getattr(shared_config(obj), "__dict__", None)
    merged = {**(fields if isinstance(fields, dict) else {}), **values}
    return {n: v for n, v in merged.items() if not n.startswith("_") and _int(v) is not None}


def _candidates(module: nn.Module) -> dict[str, int]:
    """The module's int attributes, and its config's as ``config.<name>``."""
    own = {n: _int(v) for n, v in vars(module).items() if not n.startswith("_")}
    config = vars(module).get("config")
    shared = _int_attributes(config) if config is not None else {}
    return {
        **{n: v for n, v in own.items() if v is not None},
        **{f"config.{n}": _int(v) for n, v in shared.items()},
    }


def _spelled_ones(same: dict[str, int], attr: WidthAttribute) -> dict[str, int]:
    """Of the attributes holding the width: none when the reshape's entry was read from a
    tensor's shape; when the reshape ran in a function called from
    the module's code, those that call names; else those the reshape names at the width's own
    entry; else, without those it names at another entry (they are other axes' sizes); else,
    when where is unknown, those it names at all; else all of them."""
    bare = {n: n.removeprefix("config.") for n in same}
    if attr.from_shape:  # read from a tensor's shape: it follows by itself
        return {}
    if attr.passed:  # only what the call passed on can have reached the reshape
        return {n: w for n, w in same.items() if bare[n] in attr.spelled}
    if attr.spelled_at is not None:
        if at_axis := {n: w for n, w in same.items() if bare[n] in attr.spelled_at}:
            return at_axis
        return {n: w for n, w in same.items() if bare[n] not in attr.spelled}
    if spelled := {n: w for n, w in same.items() if bare[n] in attr.spelled}:
        return spelled  # named in the reshape itself: the others only share the value
    return same


def _int_sizes(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple when it is a tuple or list of two or more ints, else None."""
    if not isinstance(value, (tuple, list)) or len(value) < 2:
        return None
    return tuple(value) if all(type(v) is int for v in value) else None


def _split_sizes_(model: nn.Module, graph: DependencyGraph, kept: dict[int, int], edits: dict):
    """Rewrite the attributes holding a split's sizes whole (InceptionNeXt's ``split_indexes =
    (in_chs - 3 * gc, gc, gc, gc)``, FocalNet's ``input_split``), each entry the new width of
    its piece; return the width notes so handled, whose entries no int attribute then takes.
    A shape given whole to a reshape (timm's ``view(self.bias_shape)``, ``(window_area,
    window_area, num_heads)``) has only its width's entry noted: the others stay. Only an
    attribute the call names is taken (when the source is not at hand, a split's sizes
    held by one attribute alone); sizes spelled otherwise (``split(x, [self.a, self.b])``)
    leave their notes to the int attributes."""
    splits: dict[tuple, dict[int, WidthAttribute]] = {}
    for attr in graph.attributes:
        if attr.sizes:
            key = (attr.module_name, attr.sizes, attr.names, attr.spelled)
            splits.setdefault(key, {})[attr.entry] = attr
    handled: set[WidthAttribute] = set()
    for (module_name, sizes, names, spelled), entries in splits.items():
        split = set(entries) == set(range(len(sizes)))
        new = tuple(
            entries[i].new_value(kept) if i in entries else size for i, size in enumerate(sizes)
        )
        module = model.get_submodule(module_name)
        held = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and _int_sizes(v) == sizes and (not names or n in names)
        ]
        if named := [n for n in held if n in spelled]:
            held = named  # the call names it: others only hold the same sizes
        elif spelled or not split:
            held = []  # the call spells its sizes otherwise (``[self.a, self.b]``)
        if not held:
            continue
        handled.update(entries.values())
        if new == sizes:
            continue
        for name in held:
            setattr(module, name, type(getattr(module, name))(new))
            edits.setdefault(module_name, {})[name] = list(new)
    return handled


def _scaled_one(values: dict[str, int], attr: WidthAttribute, new: int) -> dict[str, int]:
    """When no attribute holds the width a split was given as its one size (noted with
    ``sizes == (width,)``): the one int attribute the call spells that holds a multiple of
    it (CSPDarknet's ``split(self.expand_chs // 2)``), scaled to the new width; else none.
    Not for slices or reshapes, whose bounds may be any sum of widths."""
    if len(attr.sizes) != 1 or attr.value <= 0:
        return {}
    scaled = {
        name: new * (value // attr.value)
        for name, value in values.items()
        if "." not in name
        and name in attr.spelled
        and value > attr.value
        and value % attr.value == 0
        and (not attr.names or name in attr.names)
    }
    return scaled if len(scaled) == 1 else {}


def update_width_attributes(model: nn.Module, graph: DependencyGraph, kept: dict[int, int]) -> None:
    """Set the attributes behind ``graph.attributes`` to the widths left by ``kept`` (units
    kept per group index) and record them in ``model.secateur_attributes``."""
    # a copy: a module's rewrites undone with its attributes leave the record as it was
    edits = {k: dict(v) for k, v in getattr(model, "secateur_attributes", {}).items()}
    earlier = {k: dict(v) for k, v in edits.items()}
    handled = _split_sizes_(model, graph, kept, edits)
    # Match against the values before any rewrite: with grouped-query attention num_heads may
    # fall to the old num_kv_heads, and must not then be rewritten again as if it were that.
    before: dict[str, dict[str, int]] = {}
    for attr in graph.attributes:
        new = attr.new_value(kept)
        if new == attr.value or attr in handled:
            continue
        module = model.get_submodule(attr.module_name)
        values = before.setdefault(attr.module_name, _candidates(module))
        values = {**_named_shapes(module, attr), **values}
        head_size = _head_size({n: v for n, v in values.items() if "." not in n})
        units = _head_units(graph, attr, kept)
        same: dict[str, int] = {}  # attributes holding the width itself
        counts: dict[str, int] = {}  # head counts
        for name, value in values.items():
            bare = name.removeprefix("config.")
            # holding the same value is not enough: the code at the reshape must have read it
            # (a ``self.config.<name>`` read is among its names as ``config.<name>``)
            if bare != name and name not in attr.names:
                continue  # a config's count only when the code reads ``self.config.<name>``
            if bare == name and attr.names and bare not in attr.names:
                continue
            width = _by_width(bare, value, attr, new, head_size)
            if width is None:
                width = _by_units(bare, value, units)
            if width is not None:
                (same if value == attr.value else counts)[name] = width
        same = _spelled_ones(same, attr)
        if not same and not counts:
            same = _scaled_one(values, attr, new)
        for name, width in {**counts, **same}.items():
            set_width_attribute(module, name, width)
            edits.setdefault(attr.module_name, {})[name] = width
    for module_name, attrs in _query_groups_(model, graph, kept).items():
        edits.setdefault(module_name, {}).update(attrs)
    this_call = {
        k: {n for n, v in attrs.items() if earlier.get(k, {}).get(n, ...) != v}
        for k, attrs in edits.items()
    }
    _head_counts_(model, graph, kept, edits, this_call)
    if edits:
        model.secateur_attributes = edits


def width_attribute(module: nn.Module, name: str) -> Any:
    """The current value of ``name`` (``"num_heads"`` or ``"config.num_attention_heads"``)."""
    owner_name, _, attr = name.rpartition(".")
    if owner_name not in ("", "config"):
        raise ValueError(f"attribute {name!r}: only a module's own or its config's are edited")
    owner = vars(module).get("config") if owner_name else module
    return getattr(owner, attr, None) if owner is not None else None


def set_width_attribute(module: nn.Module, name: str, width: int) -> None:
    """Set ``name`` on ``module`` (in the form of its current value); a ``config.`` name goes to
    a new :class:`ConfigView` of the module's own, never to the shared config. A new view, not
    an edit of the current one, so that restoring the module's attribute dict undoes it."""
    current = width_attribute(module, name)
    owner_name, _, attr = name.rpartition(".")
    if owner_name:
        module.config = ConfigView(vars(module)["config"], {attr: with_width(current, width)})
    else:
        setattr(module, attr, with_width(current, width))
