"""The per-example engine's operators, each declared once: per-example squared gradient norms of a layer from its
activations ``A`` ``[B, T, d]`` and output gradients ``G`` ``[B, T, p]`` (the ghost and instantiate forms, and the
id-equality Gram of an Embedding), and the two primitives of data valuation (cross-batch gradient inner products and
summed squared gradients). References: :mod:`regops.per_example.reference`; Triton launchers:
:mod:`regops.per_example.triton` (float32, float16, bfloat16; float64 runs the reference).

The ops are statistics of a backward pass, not part of a graph: their derivative is an error.
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype
from regops._core.ops import declare
from regops.per_example import reference as ref

TRITON = "regops.per_example.triton:"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _per_example_fake(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], dtype=acc_dtype(a, g))


grad_norms_gram = declare(
    "grad_norms_gram(Tensor a, Tensor g) -> Tensor",
    reference=ref.gram_sq_norms,
    triton=TRITON + "grad_norms_gram",
    triton_dtypes=_DTYPES,
    fake=_per_example_fake,
    contiguous=False,
)
grad_norms_instantiate = declare(
    "grad_norms_instantiate(Tensor a, Tensor g) -> Tensor",
    reference=ref.instantiate_sq_norms,
    triton=TRITON + "grad_norms_instantiate",
    triton_dtypes=_DTYPES,
    fake=_per_example_fake,
    contiguous=False,
)
grad_norms_embedding_gram = declare(
    "grad_norms_embedding_gram(Tensor ids, Tensor g, int padding_idx) -> Tensor",
    reference=ref.embedding_gram_sq_norms,
    triton=TRITON + "grad_norms_embedding_gram",
    triton_dtypes=_DTYPES,
    fake=lambda ids, g, padding_idx: g.new_empty(g.shape[0], dtype=acc_dtype(g)),
    contiguous=False,
)
valuation_cross_gram = declare(
    "valuation_cross_gram(Tensor a, Tensor g, Tensor a2, Tensor g2) -> Tensor",
    reference=ref.cross_gram_dots,
    triton=TRITON + "valuation_cross_gram",
    triton_dtypes=_DTYPES,
    fake=lambda a, g, a2, g2: a.new_empty(a.shape[0], a2.shape[0], dtype=acc_dtype(a, g, a2, g2)),
    contiguous=False,
)
valuation_sq_grad_sum = declare(
    "valuation_sq_grad_sum(Tensor a, Tensor g) -> Tensor",
    reference=ref.sq_grad_sum,
    triton=TRITON + "valuation_sq_grad_sum",
    triton_dtypes=_DTYPES,
    fake=lambda a, g: a.new_empty(g.shape[2], a.shape[2], dtype=acc_dtype(a, g)),
    contiguous=False,
)


def _not_differentiable(ctx, *grads):
    raise RuntimeError("regops: per-example gradient statistics are not differentiable")


for _op in (
    grad_norms_gram,
    grad_norms_instantiate,
    grad_norms_embedding_gram,
    valuation_cross_gram,
    valuation_sq_grad_sum,
):
    _op.register_autograd(_not_differentiable)

__all__ = [
    "grad_norms_embedding_gram",
    "grad_norms_gram",
    "grad_norms_instantiate",
    "valuation_cross_gram",
    "valuation_sq_grad_sum",
]
