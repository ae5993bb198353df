"""Weight sharing by k-means codebooks, with fine-tuned centroids (Deep Compression, stage 2).

Each selected layer's non-zero weights are clustered into ``2**bits`` shared values; a weight is
then stored as a ``bits``-bit code into its layer's codebook. Zeros stay exactly zero and are not
clustered (the sparse index of the compressed format records them).

:func:`cluster_weights_` writes the shared values into the weights and returns a
:class:`Codebooks`, an ``OptimizerConstraint``: pass it to ``training.fit(constraint=...)`` to
fine-tune the centroids. Every member of a cluster then receives the cluster's mean gradient
(the shared weight's true gradient divided by its member count, so the usual fine-tuning learning
rates apply), moves identically, and is snapped back to the cluster's single value after each
step; pruned weights stay zero. Afterwards each layer holds at most ``2**bits`` distinct non-zero
values, so the compressed format stores it exactly with a ``bits``-bit codebook.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._config import check_int, config_from_dict, config_to_dict
from ..errors import ConfigError
from ..pruning._unstructured import prunable_weights

MAX_BITS = 8


def kmeans_1d(
    values: torch.Tensor, k: int, *, iterations: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster 1-D ``values`` into at most ``k`` centroids; return ``(centroids, codes)``.

    ``centroids`` is float32, sorted ascending; ``codes`` (int64, one per value) index into it.
    When ``values`` has at most ``k`` distinct entries the centroids are exactly those values,
    so the codebook is lossless. Otherwise centroids start evenly spaced between min and max
    (the initialisation Deep Compression found best, since it keeps the rare large weights) and
    Lloyd iterations run until no assignment changes; in 1-D the nearest centroid is found by
    binary search over the midpoints.
    """
    flat = values.detach().reshape(-1).to(torch.float32)
    if flat.numel() == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    if unique.numel() <= k:
        return unique, inverse
    x = flat.to(torch.float64)
    centroids = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    codes = torch.full_like(flat, -1, dtype=torch.int64)
    for _ in range(iterations):
        new = torch.bucketize(x, (centroids[1:] + centroids[:-1]) / 2)
        if torch.equal(new, codes):
            break
        codes = new
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled]
        centroids, order = torch.sort(centroids)
        codes = torch.argsort(order)[codes]
    used = torch.unique(codes)  # drop empty clusters so codes stay dense
    remap = torch.full((k,), -1, dtype=torch.int64)
    remap[used] = torch.arange(used.numel())
    return centroids[used].to(torch.float32), remap[codes]


@dataclass(frozen=True)
class CodebookConfig:
    """Which weights share a codebook, and how many bits a code takes.

    Attributes:
        bits: code width in [1, 8]; ``2**bits`` shared values per layer. Deep Compression used
            5 bits for fully connected and 8 for convolutional layers.
        per_layer: fnmatch pattern → bits for the layers it matches (first match wins).
        exclude: fnmatch patterns of module names whose weights stay unshared.
    """

    bits: int = 5
    per_layer: dict[str, int] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        if not isinstance(self.per_layer, dict):
            raise ConfigError("per_layer must map layer-name patterns to bits, e.g. {'fc3': 8}")
        for pattern, bits in self.per_layer.items():
            _check_bits(f"per_layer[{pattern!r}]", bits)
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def bits_for(self, name: str) -> int:
        for pattern, bits in self.per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return bits
        return self.bits

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodebookConfig:
        return config_from_dict(cls, data)


def _check_bits(name: str, bits: Any) -> None:
    check_int(name, bits, 1)
    if bits > MAX_BITS:
        raise ConfigError(f"{name}={bits} is out of range: codes take 1 to {MAX_BITS} bits")


def _cluster_means(values: torch.Tensor, codes: torch.Tensor, clusters: int) -> torch.Tensor:
    """Each value replaced by its cluster's mean, summed in float64 so that neither half
    precision (a count of 500k is inf in fp16) nor repeated rounding drifts the centroids."""
    sums = torch.zeros(clusters, dtype=torch.float64, device=values.device)
    sums.index_add_(0, codes, values.double())
    counts = torch.bincount(codes, minlength=clusters).clamp_min(1).double()
    return (sums / counts)[codes].to(values.dtype)


@dataclass
class _Shared:
    param: nn.Parameter
    codes: torch.Tensor  # int64, -1 where the weight is pruned
    clusters: int


class Codebooks:
    """The cluster assignment of every shared weight; keeps it through optimizer steps.

    ``bits`` maps parameter names to their code width. Use :meth:`hold` (via
    ``training.fit(constraint=codebooks)``) to fine-tune centroids; :meth:`centroids` reads the
    current shared values of one parameter.
    """

    def __init__(self, shared: dict[str, _Shared], bits: dict[str, int]) -> None:
        self._shared = shared
        self.bits = bits

    def names(self) -> list[str]:
        return list(self._shared)

    def centroids(self, name: str) -> torch.Tensor:
        """The distinct shared values of parameter ``name``, in code order."""
        s = self._shared[name]
        flat = s.param.detach().reshape(-1)
        kept = s.codes >= 0
        out = torch.zeros(s.clusters, dtype=flat.dtype, device=flat.device)
        return out.index_put_((s.codes[kept],), flat[kept])

    @torch.no_grad()
    def snap(self) -> None:
        """Set every member of a cluster to the cluster's mean, and pruned weights to 0."""
        for s in self._shared.values():
            flat = s.param.detach().reshape(-1)
            kept = s.codes >= 0
            snapped = torch.zeros_like(flat)
            snapped[kept] = _cluster_means(flat[kept], s.codes[kept], s.clusters)
            s.param.copy_(snapped.view_as(s.param))

    @staticmethod
    def _share_gradient(grad: torch.Tensor, s: _Shared) -> torch.Tensor:
        flat = grad.reshape(-1)
        kept = s.codes >= 0
        out = torch.zeros_like(flat)
        out[kept] = _cluster_means(flat[kept], s.codes[kept], s.clusters)
        return out.view_as(grad)

    @contextlib.contextmanager
    def hold(self, optimizer: torch.optim.Optimizer) -> Iterator[Codebooks]:
        """Share gradients within clusters and re-snap after every ``optimizer.step()``."""
        handles = [
            s.param.register_hook(lambda grad, s=s: self._share_gradient(grad, s))
            for s in self._shared.values()
        ]
        handles.append(optimizer.register_step_post_hook(lambda *_: self.snap()))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@torch.no_grad()
def cluster_weights_(model: nn.Module, config: CodebookConfig | None = None) -> Codebooks:
    """Replace the non-zero weights of every Linear/Conv/Conv1D layer and stacked expert weight
    by k-means shared values (one codebook per tensor), in place.

    Returns the :class:`Codebooks` to fine-tune centroids with. Weights that are already zero
    stay zero. Raises ``ConfigError`` when no layer is selected.

    Example:
        >>> from secateur import create_model
        >>> net = create_model("lenet_300_100")
        >>> books = cluster_weights_(net, CodebookConfig(bits=4))
        >>> int(net.fc1.weight.unique().numel()) <= 16
        True
    """
    config = config or CodebookConfig()
    shared: dict[str, _Shared] = {}
    bits: dict[str, int] = {}
    for name in prunable_weights(model, tuple(config.exclude)):
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        param = model.get_parameter(name)
        flat = param.detach().reshape(-1)
        if not bool(torch.isfinite(flat).all()):
            raise ConfigError(
                f"{name} holds NaN or inf weights, which k-means cannot share: fix the model "
                "(or exclude the layer) before clustering"
            )
        kept = flat != 0
        b = config.bits_for(module_name)
        centroids, codes = kmeans_1d(flat[kept].cpu(), 1 << b)
        all_codes = torch.full((flat.numel(),), -1, dtype=torch.int64)
        all_codes[kept.cpu()] = codes
        all_codes = all_codes.to(flat.device)
        values = torch.zeros_like(flat)
        values[kept] = centroids.to(flat.device, flat.dtype)[codes.to(flat.device)]
        param.copy_(values.view_as(param))
        shared[name] = _Shared(param, all_codes, max(1, int(centroids.numel())))
        bits[name] = b
    if not shared:
        raise ConfigError(
            "no Linear, Conv or expert weights to cluster: check exclude patterns "
            f"{list(config.exclude)} against the model's module names"
        )
    return Codebooks(shared, bits)
