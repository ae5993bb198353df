"""Per-layer choice between dense and sparse kernels, by timing each layer on its real input."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._config import check_int, check_range
from .._inputs import call_model
from .._progress import make_progress
from ..errors import ConfigError, PruningError
from ..measure import measure_latencies
from ..measure._latency import MIN_RUNS
from ._sparse_linear import LAYOUTS, SparseConv1x1, SparseLinear, conv1x1_refusal

SPARSE_TYPES = (SparseLinear, SparseConv1x1)


@dataclass(frozen=True)
class LayerChoice:
    """What :func:`sparsify_` measured and decided for one layer.

    ``dense_ms``/``sparse_ms`` are medians of interleaved runs on the layer's own input from the
    example forward pass; ``None`` where the layer was not timed (``note`` says why). ``layout``
    is the fastest sparse layout tried; ``speedup`` is ``dense_ms / sparse_ms``.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...] | None
    sparsity: float
    dense_ms: float | None
    layout: str | None
    sparse_ms: float | None
    speedup: float | None
    replaced: bool
    note: str = ""


@dataclass(frozen=True)
class SparsifyReport:
    """Result of :func:`sparsify_`: one :class:`LayerChoice` per candidate layer, in module order,
    with the conditions every time was measured under."""

    layers: tuple[LayerChoice, ...]
    threads: int
    device: str
    runtime: str
    runs: int
    min_speedup: float

    @property
    def replaced(self) -> tuple[str, ...]:
        """Names of the layers now running sparse."""
        return tuple(layer.name for layer in self.layers if layer.replaced)

    def render(self) -> str:
        """A Markdown table of every layer, with the measurement conditions above it."""

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        lines = [
            f"sparsify_: {self.threads} threads, {self.device}, {self.runtime}, median of "
            f"{self.runs} interleaved runs per layer, replace when speedup >= {self.min_speedup:g}",
            "",
            "| layer | kind | input | sparsity | dense ms | layout | sparse ms | speedup "
            "| replaced | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            shape = "-" if r.input_shape is None else "x".join(map(str, r.input_shape))
            speedup = "-" if r.speedup is None else f"{r.speedup:.2f}x"
            lines.append(
                f"| {r.name} | {r.kind} | {shape} | {r.sparsity:.3f} | {ms(r.dense_ms)} "
                f"| {r.layout or '-'} | {ms(r.sparse_ms)} | {speedup} "
                f"| {'yes' if r.replaced else 'no'} | {r.note} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "Linear"
    if isinstance(module, nn.Conv2d) and conv1x1_refusal(module) is None:
        return "Conv2d 1x1"
    return None


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(child) → [(parent, attribute), ...]``: every place a module is held (shared ones too)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                owners.setdefault(id(child), []).append((parent, attr))
    return owners


def _swap(owners: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    for parent, attr in owners.get(id(old), []):
        setattr(parent, attr, new)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def max_mismatch(got: Any, want: Any, rtol: float) -> float:
    """Largest ``|got - want| / (rtol * (|want| + max|want|))`` over all output tensors, or inf
    on a shape mismatch; <= 1 means equal within ``rtol`` of the output's own scale."""
    a, b = list(_tensors(got)), list(_tensors(want))
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if not y.is_floating_point() or y.numel() == 0:
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        x, y = x.double(), y.double()
        scale = rtol * (y.abs() + y.abs().max().clamp_min(1e-12))
        worst = max(worst, float(((x - y).abs() / scale).max()))
    return worst


def _candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    return {
        name: (module, kind)
        for name, module in model.named_modules()
        if (kind := _kind(module)) is not None
    }


def _capture(model: nn.Module, names: Sequence[str], example_inputs: Any) -> tuple[dict, Any]:
    """Each named layer's first input in one forward pass, and the model's output."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_: nn.Module, args: tuple, name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def _check(layouts: Sequence[str], blocksize: int, min_speedup: float, runs: int) -> None:
    if not layouts or any(layout not in LAYOUTS for layout in layouts):
        raise ConfigError(f"layouts={tuple(layouts)!r} must be a non-empty subset of {LAYOUTS}")
    check_int("blocksize", blocksize, 1)
    check_range("min_speedup", min_speedup, 0.0, low_open=True)
    check_int("runs", runs, MIN_RUNS)


def sparsify_(
    model: nn.Module,
    example_inputs: Any,
    *,
    layouts: Sequence[str] = ("csr", "bsr"),
    blocksize: int = 16,
    min_speedup: float = 1.1,
    min_sparsity: float = 0.5,
    runs: int = 30,
    progress: bool = False,
) -> SparsifyReport:
    """Replace layers by sparse ones where, and only where, that is measured to be faster.

    Candidates are plain ``nn.Linear`` layers and 1x1 ``nn.Conv2d`` layers with groups 1 and no
    padding (run as one matrix product); other convs stay dense. One forward pass on
    ``example_inputs`` (a tensor, a sequence of positional tensors or a mapping of keyword ones)
    captures each candidate's real input. Each candidate whose weight sparsity is >=
    ``min_sparsity`` is then timed dense and as every sparse layout in ``layouts`` (BSR with
    ``blocksize`` x ``blocksize`` blocks), interleaved, ``runs`` times each, on that input; it is
    replaced by the fastest sparse version when that one is at least ``min_speedup`` times
    faster, and its output matches the dense layer's. Timings hold for this machine, this thread
    count (``torch.set_num_threads``) and these input shapes only.

    The model is run in eval mode (its mode is restored); replaced layers are inference only (see
    :class:`SparseLinear`). :func:`densify_` reverses the replacement. Returns a
    :class:`SparsifyReport`.

    Raises:
        ConfigError: unknown layout, ``runs`` < 20, ``min_speedup`` <= 0, ``min_sparsity``
            outside [0, 1].
        PruningError: the sparse model's output differs from the dense one's beyond float
            tolerance; every replacement is undone first, so the model is left unchanged.

    Example:
        >>> import torch
        >>> from secateur import UnstructuredConfig, create_model, prune_
        >>> net = create_model("lenet_300_100")
        >>> _ = prune_(net, UnstructuredConfig(sparsity=0.95))
        >>> report = sparsify_(net, torch.randn(64, 1, 28, 28), runs=20)
        >>> len(report.layers)
        3
    """
    _check(layouts, blocksize, min_speedup, runs)
    check_range("min_sparsity", min_sparsity, 0.0, 1.0)
    candidates = _candidates(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    swapped: list[tuple[nn.Module, nn.Module]] = []
    try:
        inputs, reference = _capture(model, [n for n in candidates if n], example_inputs)
        owners = _owners(model)
        rows = []
        with make_progress(enabled=progress) as bar:
            task = bar.add_task("time layers", total=len(candidates), status="")
            for name, (module, kind) in candidates.items():
                bar.update(task, advance=1, status=name)
                row, new = _choose_layer(
                    name,
                    module,
                    kind,
                    inputs.get(name),
                    layouts,
                    blocksize,
                    min_speedup,
                    min_sparsity,
                    runs,
                )
                rows.append(row)
                if new is not None:
                    new.train(modes[module])
                    _swap(owners, module, new)
                    swapped.append((module, new))
        if swapped:
            with torch.no_grad():
                after = call_model(model, example_inputs)
            worst = max_mismatch(after, reference, rtol=1e-3)
            if worst > 1.0:
                raise PruningError(
                    f"sparse layers changed the model's output ({worst:.3g}x the 1e-3 relative "
                    f"tolerance): model left dense; keep it dense or report this model"
                )
    except BaseException:
        owners = _owners(model)
        for module, new in swapped:
            _swap(owners, new, module)
        raise
    finally:
        for module, mode in modes.items():
            module.training = mode
    device = next((t.device for t in inputs.values()), torch.device("cpu"))
    return SparsifyReport(
        layers=tuple(rows),
        threads=torch.get_num_threads(),
        device=str(device),
        runtime=f"pytorch {torch.__version__} eager",
        runs=runs,
        min_speedup=min_speedup,
    )


def _choose_layer(
    name: str,
    module: nn.Module,
    kind: str,
    x: torch.Tensor | None,
    layouts: Sequence[str],
    blocksize: int,
    min_speedup: float,
    min_sparsity: float,
    runs: int,
) -> tuple[LayerChoice, nn.Module | None]:
    """Time one layer and decide; returns the report row and the replacement (or None)."""
    weight = module.weight.detach()
    sparsity = float((weight == 0).sum()) / weight.numel()

    def row(note: str, **timed: Any) -> LayerChoice:
        fields = dict(dense_ms=None, layout=None, sparse_ms=None, speedup=None, replaced=False)
        fields.update(timed)
        shape = None if x is None else tuple(x.shape)
        return LayerChoice(name, kind, shape, sparsity, note=note, **fields)

    if not name:
        return row("the model itself is this layer: wrap it in nn.Sequential"), None
    if x is None:
        return row("not called by example_inputs"), None
    if sparsity < min_sparsity:
        return row(f"sparsity below min_sparsity={min_sparsity:g}"), None
    cls = SparseLinear if kind == "Linear" else SparseConv1x1
    variants, notes = {}, []
    with torch.no_grad():
        want = module(x)
        for layout in layouts:
            rows_cols = weight.flatten(1).shape
            if layout == "bsr" and (rows_cols[0] % blocksize or rows_cols[1] % blocksize):
                notes.append(f"bsr: {rows_cols[0]}x{rows_cols[1]} not divisible by {blocksize}")
                continue
            try:
                sparse = cls.from_dense(module, layout=layout, blocksize=blocksize)
                got = sparse(x)
            except (ConfigError, RuntimeError) as err:
                notes.append(f"{layout}: {str(err).splitlines()[0]}")
                continue
            if max_mismatch(got, want, rtol=1e-4) > 1.0:
                notes.append(f"{layout}: output differs from dense")
                continue
            variants[layout] = sparse
    if not variants:
        return row("; ".join(notes) or "no sparse layout ran"), None
    times = measure_latencies([module, *variants.values()], x, runs=runs, warmup=max(3, runs // 10))
    dense_ms = times[0].median_ms
    best = min(range(len(variants)), key=lambda i: times[i + 1].median_ms)
    layout, sparse_ms = list(variants)[best], times[best + 1].median_ms
    speedup = dense_ms / sparse_ms if sparse_ms > 0 else float("inf")
    replaced = speedup >= min_speedup
    if not replaced:
        notes.append(f"speedup below min_speedup={min_speedup:g}")
    timed = dict(dense_ms=dense_ms, layout=layout, sparse_ms=sparse_ms, speedup=speedup)
    chosen = variants[layout] if replaced else None
    return row("; ".join(notes), replaced=replaced, **timed), chosen


def densify_(model: nn.Module) -> list[str]:
    """Turn every :class:`SparseLinear`/:class:`SparseConv1x1` back into the dense layer it came
    from (equal weights, trainable again); returns the names of the layers restored.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(SparseLinear.from_dense(nn.Linear(8, 4)))
        >>> densify_(net), type(net[0]).__name__
        (['0'], 'Linear')
    """
    owners = _owners(model)
    found = [(n, m) for n, m in model.named_modules() if n and isinstance(m, SPARSE_TYPES)]
    for _, module in found:
        _swap(owners, module, module.to_dense().train(module.training))
    return [name for name, _ in found]
