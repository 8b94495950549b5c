"""The merge family's operators: schemas, fakes and backends, each declared once (merging has no gradient).

``merge_chunk`` merges one flat chunk of a tensor from its base and K deltas in one pass (see
:func:`regops.merge.reference.merge_chunk`); ``merge_uniform`` gives the uniforms of DELLA's magnitude-dependent
draws. References: :mod:`regops.merge.reference`; Triton launchers: :mod:`regops.merge.triton`; C++ kernels:
csrc/merge/.
"""

from __future__ import annotations

import torch

from regops._core.ops import declare
from regops.merge import reference as ref

TRITON = "regops.merge.triton:"


def _chunk_fake(base, deltas, weights, seeds, thresholds, cuts, density, first, keep, combine, finetuned, rescale):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


merge_chunk = declare(
    "merge_chunk(Tensor base, Tensor[] deltas, Tensor weights, Tensor seeds, Tensor thresholds, Tensor cuts, "
    "Tensor density, int first, str keep, str combine, bool finetuned, bool rescale) -> Tensor",
    reference=ref.merge_chunk,
    triton=TRITON + "merge_chunk",
    fake=_chunk_fake,
)


def _uniform_fake(seed, first, n):
    return seed.new_empty((n,), dtype=torch.float64)


merge_uniform = declare(
    "merge_uniform(Tensor seed, int first, int n) -> Tensor",
    reference=ref.merge_uniform,
    triton=TRITON + "merge_uniform",
    fake=_uniform_fake,
)

__all__ = ["merge_chunk", "merge_uniform"]
