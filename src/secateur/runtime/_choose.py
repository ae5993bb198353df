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
from ._sparse_linear import LAYOUTS, SparseConv2d, SparseLinear, conv_refusal

SPARSE_TYPES = (SparseLinear, SparseConv2d)

BSR_BLOCKS = (32, 16, 8, 4)
"""Square BSR block sizes :func:`sparsify_` considers by default, largest first."""
MIN_ZERO_BLOCKS = 0.6
"""A BSR block size is timed only if at least this fraction of its blocks is all-zero: BSR
stores and multiplies every block holding a non-zero, and in ``benchmarks/sparse_crossover.py``
no BSR layer beat dense at 0.5 block sparsity (best 0.90x); the first wins came at 0.7."""
MAX_BSR_TRIES = 2
"""At most this many BSR block sizes are timed per layer (with dense and CSR: 4 modules, against
3 when only 16x16 was tried), so measuring costs at most ~1.3x what it did."""
SMALLER_BLOCK_GAIN = 0.75
"""A smaller block is timed only if it stores at most this fraction of the blocks' area that the
last block size timed stores; otherwise its only change is more per-block overhead."""


@dataclass(frozen=True)
class LayerChoice:
    """What :func:`sparsify_` measured and decided for one layer.

    ``dense_ms``/``sparse_ms`` are medians of interleaved runs on the layer's own input from the
    example forward pass; ``None`` where the layer was not timed (``note`` says why). ``layout``
    is the fastest sparse layout tried, ``blocksize`` its BSR block side (``None`` for CSR);
    ``speedup`` is ``dense_ms / sparse_ms``.
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
    blocksize: int | None = None


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
            layout = r.layout or "-"
            if r.blocksize is not None:
                layout = f"{layout} {r.blocksize}x{r.blocksize}"
            lines.append(
                f"| {r.name} | {r.kind} | {shape} | {r.sparsity:.3f} | {ms(r.dense_ms)} "
                f"| {layout} | {ms(r.sparse_ms)} | {speedup} "
                f"| {'yes' if r.replaced else 'no'} | {r.note} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _kind(module: nn.Module) -> tuple[str, str | None] | None:
    """``(kind, why it cannot run sparse or None)`` for a Linear or Conv2d, else ``None``."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "Linear", None
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"Conv2d {kh}x{kw}", conv_refusal(module)
    return None


def zero_block_fraction(weight: torch.Tensor, block: int) -> float:
    """Fraction of the ``block`` x ``block`` blocks of a 2-D ``weight`` that are all zero (its
    dimensions must be multiples of ``block``)."""
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows // block, block, cols // block, block)
    return 1.0 - float(nonzero.any(3).any(1).float().mean())


def bsr_blocks(weight: torch.Tensor, sizes: Sequence[int]) -> tuple[list[int], str]:
    """The BSR block sizes worth timing for a 2-D ``weight``, and a note when there are none.

    The rule: among ``sizes`` dividing both dimensions, from the largest down, keep a size when
    at least :data:`MIN_ZERO_BLOCKS` of its blocks are all-zero and, after the first kept, when
    its non-zero blocks cover at most :data:`SMALLER_BLOCK_GAIN` of the area the last kept size's
    do; stop at :data:`MAX_BSR_TRIES`. Measurement then picks among those kept.
    """
    rows, cols = weight.shape
    fitting = sorted((b for b in set(sizes) if rows % b == 0 and cols % b == 0), reverse=True)
    if not fitting:
        listed = "/".join(map(str, sorted(set(sizes), reverse=True)))
        return [], f"bsr: {rows}x{cols} not divisible by {listed}"
    kept: list[int] = []
    last_area = 1.0
    for b in fitting:
        area = 1.0 - zero_block_fraction(weight, b)
        if area > 1.0 - MIN_ZERO_BLOCKS or (kept and area > SMALLER_BLOCK_GAIN * last_area):
            continue
        kept.append(b)
        last_area = area
        if len(kept) == MAX_BSR_TRIES:
            break
    if kept:
        return kept, ""
    b = fitting[-1]  # the smallest block has the most all-zero blocks
    zero = zero_block_fraction(weight, b)
    return [], f"bsr: {zero:.0%} of {b}x{b} blocks all-zero (< {MIN_ZERO_BLOCKS:.0%})"


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


def _candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str, str | None]]:
    return {
        name: (module, *kind)
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


def _block_sizes(blocksize: int | Sequence[int]) -> tuple[int, ...]:
    sizes = (blocksize,) if not isinstance(blocksize, Sequence) else tuple(blocksize)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError(
            f"blocksize={blocksize!r} must be a positive int or a non-empty sequence of them, "
            f"e.g. {BSR_BLOCKS}"
        )
    return sizes


def _check(layouts: Sequence[str], min_speedup: float, runs: int) -> None:
    if not layouts or any(layout not in LAYOUTS for layout in layouts):
        raise ConfigError(f"layouts={tuple(layouts)!r} must be a non-empty subset of {LAYOUTS}")
    check_range("min_speedup", min_speedup, 0.0, low_open=True)
    check_int("runs", runs, MIN_RUNS)


def sparsify_(
    model: nn.Module,
    example_inputs: Any,
    *,
    layouts: Sequence[str] = ("csr", "bsr"),
    blocksize: int | Sequence[int] = BSR_BLOCKS,
    min_speedup: float = 1.1,
    min_sparsity: float = 0.5,
    runs: int = 30,
    progress: bool = False,
) -> SparsifyReport:
    """Replace layers by sparse ones where, and only where, that is measured to be faster.

    Candidates are plain ``nn.Linear`` layers and ``nn.Conv2d`` layers of any kernel, stride,
    padding and dilation (run as im2col and one sparse matrix product, see
    :class:`SparseConv2d`); convs with ``groups`` > 1 or non-zero padding of a ``padding_mode``
    other than ``'zeros'`` stay dense, with the reason in their report row. One forward pass on
    ``example_inputs`` (a tensor, a sequence of positional tensors or a mapping of keyword ones)
    captures each candidate's real input. Each candidate whose weight sparsity is >=
    ``min_sparsity`` is then timed dense and as every sparse layout in ``layouts``, interleaved,
    ``runs`` times each, on that input; it is replaced by the fastest sparse version when that
    one is at least ``min_speedup`` times faster, and its output matches the dense layer's.
    Timings hold for this machine, this thread count (``torch.set_num_threads``) and these input
    shapes only.

    BSR is tried with square blocks from ``blocksize`` (one size or several) that divide both
    dimensions of the (out, in) weight matrix (``in * kh * kw`` for a conv), largest first, and
    only those worth timing: at least 60% of the blocks all-zero, a smaller size only if its
    non-zero blocks cover at most 3/4 of the area of the last size kept, and at most 2 sizes
    (:func:`bsr_blocks`). The report's note says why BSR was not timed where it was not.

    The model is run in eval mode (its mode is restored); replaced layers are inference only (see
    :class:`SparseLinear`). :func:`densify_` reverses the replacement. Returns a
    :class:`SparsifyReport`.

    Raises:
        ConfigError: unknown layout, a ``blocksize`` that is not positive ints, ``runs`` < 20,
            ``min_speedup`` <= 0, ``min_sparsity`` outside [0, 1].
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
    _check(layouts, min_speedup, runs)
    sizes = _block_sizes(blocksize)
    check_range("min_sparsity", min_sparsity, 0.0, 1.0)
    candidates = _candidates(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    swapped: list[tuple[nn.Module, nn.Module]] = []
    try:
        timed = [n for n, (_, _, refusal) in candidates.items() if n and refusal is None]
        inputs, reference = _capture(model, timed, example_inputs)
        owners = _owners(model)
        rows = []
        with make_progress(enabled=progress) as bar:
            task = bar.add_task("time layers", total=len(candidates), status="")
            for name, (module, kind, refusal) in candidates.items():
                bar.update(task, advance=1, status=name)
                row, new = _choose_layer(
                    name,
                    module,
                    kind,
                    refusal,
                    inputs.get(name),
                    layouts,
                    sizes,
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
    refusal: str | None,
    x: torch.Tensor | None,
    layouts: Sequence[str],
    sizes: Sequence[int],
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
    if refusal is not None:
        return row(refusal), None
    if x is None:
        return row("not called by example_inputs"), None
    if sparsity < min_sparsity:
        return row(f"sparsity below min_sparsity={min_sparsity:g}"), None
    cls = SparseLinear if kind == "Linear" else SparseConv2d
    tries: list[tuple[str, int | None]] = []
    notes = []
    for layout in layouts:
        if layout == "csr":
            tries.append(("csr", None))
            continue
        blocks, note = bsr_blocks(weight.flatten(1), sizes)
        tries += [("bsr", b) for b in blocks]
        if note:
            notes.append(note)
    variants: dict[tuple[str, int | None], nn.Module] = {}
    with torch.no_grad():
        want = module(x)
        for layout, block in tries:
            label = layout if block is None else f"{layout} {block}x{block}"
            try:
                size = {} if block is None else {"blocksize": block}
                sparse = cls.from_dense(module, layout=layout, **size)
                got = sparse(x)
            except (ConfigError, RuntimeError) as err:
                notes.append(f"{label}: {str(err).splitlines()[0]}")
                continue
            if max_mismatch(got, want, rtol=1e-4) > 1.0:
                notes.append(f"{label}: output differs from dense")
                continue
            variants[(layout, block)] = sparse
    if not variants:
        return row("; ".join(notes) or "no sparse layout ran"), None
    times = measure_latencies([module, *variants.values()], x, runs=runs, warmup=max(3, runs // 10))
    dense_ms = times[0].median_ms
    best = min(range(len(variants)), key=lambda i: times[i + 1].median_ms)
    (layout, block), sparse_ms = list(variants)[best], times[best + 1].median_ms
    speedup = dense_ms / sparse_ms if sparse_ms > 0 else float("inf")
    replaced = speedup >= min_speedup
    if not replaced:
        notes.append(f"speedup below min_speedup={min_speedup:g}")
    timed = dict(
        dense_ms=dense_ms, layout=layout, blocksize=block, sparse_ms=sparse_ms, speedup=speedup
    )
    chosen = variants[(layout, block)] if replaced else None
    return row("; ".join(notes), replaced=replaced, **timed), chosen


def densify_(model: nn.Module) -> list[str]:
    """Turn every :class:`SparseLinear`/:class:`SparseConv2d` back into the dense layer it came
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
