"""runtime/: run pruned models faster: sparse CPU kernels chosen per layer by measurement, 2:4
semi-structured tensors on CUDA.

Zeros left by unstructured pruning cost dense kernels as much as any weight. ``sparsify_`` times
each Linear and Conv2d dense and as CSR/BSR sparse on its real input and swaps in the sparse
layer only where it is measurably faster; ``densify_`` undoes it. ``to_semi_structured_`` hands
2:4-pruned fp16/bf16 Linears to sparse tensor cores on Ampere-or-newer GPUs.
"""

from ._choose import LayerChoice as LayerChoice
from ._choose import SparsifyReport as SparsifyReport
from ._choose import densify_ as densify_
from ._choose import sparsify_ as sparsify_
from ._semi_structured import nm_pattern as nm_pattern
from ._semi_structured import semi_structured_plan as semi_structured_plan
from ._semi_structured import to_semi_structured_ as to_semi_structured_
from ._sparse_linear import SparseConv1x1 as SparseConv1x1
from ._sparse_linear import SparseConv2d as SparseConv2d
from ._sparse_linear import SparseLinear as SparseLinear

__all__ = [
    "LayerChoice",
    "SparseConv1x1",
    "SparseConv2d",
    "SparseLinear",
    "SparsifyReport",
    "densify_",
    "nm_pattern",
    "semi_structured_plan",
    "sparsify_",
    "to_semi_structured_",
]
