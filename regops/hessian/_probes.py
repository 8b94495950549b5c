"""Parameters as one ``[K, N]`` probe buffer: the layout, the seed of a block of probes, the probe rows, any box of
the probe stream (a shard's part of it), and the fused accumulation over parameters of several dtypes (all through
:mod:`regops.hessian.ops`)."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from regops._core import rng
from regops._core.dtypes import acc_dtype
from regops.hessian import ops
from regops.hessian import reference as ref


@dataclass(frozen=True)
class ParamLayout:
    """Parameters flattened and concatenated: names, shapes and column ranges in a ``[K, N]`` buffer."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    device: torch.device

    @classmethod
    def of(cls, names: Sequence[str], params: Sequence[torch.Tensor]) -> ParamLayout:
        return cls(tuple(names), tuple(p.shape for p in params), tuple(p.dtype for p in params), params[0].device)

    @functools.cached_property
    def sizes(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @functools.cached_property
    def numel(self) -> int:
        return sum(self.sizes)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        return functools.reduce(torch.promote_types, self.dtypes)

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[K, N]`` -> per-parameter ``[K, *shape]`` views (cast to each parameter's dtype if it differs)."""
        k = flat.shape[0]
        chunks = flat[:, : self.numel].split(self.sizes, dim=1)
        return tuple(
            chunk.reshape(k, *shape).to(dtype)
            for chunk, shape, dtype in zip(chunks, self.shapes, self.dtypes, strict=True)
        )

    def cat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-parameter ``[K, *shape]`` -> ``[K, N]`` in the common dtype."""
        k = tensors[0].shape[0]
        return torch.cat([t.reshape(k, -1).to(self.dtype) for t in tensors], dim=1)


def draw_seed(
    layout: ParamLayout, num_probes: int, distribution: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Key and first counter (int64 ``[2]`` on the layout's device) for ``num_probes`` probe rows over ``layout``
    (advances the generator)."""
    words = ref.stream_words(num_probes, layout.numel, distribution)
    return rng.philox_seed(layout.device, words, generator)


def probe_rows(
    seed: torch.Tensor, first_probe: int, num_probes: int, layout: ParamLayout, distribution: str
) -> torch.Tensor:
    """Probe rows ``first_probe ..`` in the layout's common dtype: ``[num_probes, S >= N]``, the first ``N``
    columns are the probes (the rest is row padding; :meth:`ParamLayout.split` takes views)."""
    return ops.hessian_probes(seed, first_probe, num_probes, layout.numel, distribution, layout.dtype)


def stream_span(seed: torch.Tensor, start: int, count: int, distribution: str, dtype: torch.dtype) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of probe row 0 of ``seed`` (element ``i`` from counter ``seed[1] + i //
    per``, ``per`` elements per counter): the same values as ``probe_rows(seed, 0, 1, ...)[0, start : start + count]``
    without drawing the elements before ``start``. A view of a ``[1, S]`` buffer."""
    shifted, lead = ref.stream_start(seed, start, distribution)
    return ops.hessian_probes(shifted, 0, 1, lead + count, distribution, dtype)[0, lead : lead + count]


def _box_runs(
    base: int, shape: Sequence[int], local_shape: Sequence[int], offset: Sequence[int]
) -> tuple[list[int], int]:
    """The contiguous runs of the box ``[offset, offset + local_shape)`` of a row-major ``shape`` tensor whose element
    ``j`` is stream element ``base + j``: their first stream elements (in the box's row-major order) and their
    common length (one run for ``Shard(0)`` boxes)."""
    shape, local_shape, offset = list(shape), list(local_shape), list(offset)
    if local_shape == shape and not any(offset):  # the whole tensor: one run
        return [base], math.prod(shape)
    # dims after `lead` are whole: each index of dims[:lead] is one contiguous run of local_shape[lead] rows of them
    lead = max((d for d in range(len(shape)) if local_shape[d] != shape[d]), default=0)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    run = local_shape[lead] * strides[lead] if shape else 1
    start0 = base + sum(o * w for o, w in zip(offset, strides, strict=True))
    starts = [
        start0 + sum(i * w for i, w in zip(index, strides[:lead], strict=True))
        for index in itertools.product(*(range(n) for n in local_shape[:lead]))
    ]
    return starts, run


def stream_box(
    seed: torch.Tensor,
    base: int,
    shape: Sequence[int],
    local_shape: Sequence[int],
    offset: Sequence[int],
    distribution: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The box ``[offset, offset + local_shape)`` of a ``shape`` tensor whose row-major element ``j`` is element
    ``base + j`` of probe row 0 of ``seed``: a rank's shard of a tensor drawn whole in one process, bit for bit.

    One op call per contiguous run of the box in the global tensor (one for ``Shard(0)`` boxes)."""
    if math.prod(local_shape) == 0:
        return torch.empty(list(local_shape), dtype=dtype, device=seed.device)
    starts, run = _box_runs(base, shape, local_shape, offset)
    runs = [stream_span(seed, start, run, distribution, dtype) for start in starts]
    return (runs[0] if len(runs) == 1 else torch.cat(runs)).reshape(list(local_shape))


def stream_box_add_(
    out: torch.Tensor,
    seed: torch.Tensor,
    base: int,
    shape: Sequence[int],
    offset: Sequence[int],
    scale: float,
    distribution: str,
) -> torch.Tensor:
    """``out += scale * stream_box(seed, base, shape, out.shape, offset, distribution, float32)``, the box scaled in
    float32 and rounded to ``out``'s dtype, with no buffer where the C++ kernel runs (one op call per run)."""
    if out.numel() == 0:
        return out
    target = out if out.is_contiguous() else out.contiguous()
    flat = target.view(-1)
    starts, run = _box_runs(base, shape, out.shape, offset)
    for i, start in enumerate(starts):
        ops.hessian_stream_add_(flat[i * run : (i + 1) * run], seed, start, scale, distribution)
    return out if target is out else out.copy_(target)


def probe_dot(
    vs: Sequence[torch.Tensor], hvs: Sequence[torch.Tensor], with_diag: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dots [K, P], sum_k v*Hv [N], sum_k (v*Hv)^2 [N])`` for per-parameter ``[K, *shape]`` probes and
    products.

    The fused accumulation takes one dtype per call, so parameters are grouped by dtype (one call per group,
    each accumulated in its own precision: float32, float64 for float64) and the groups' results are put back in
    parameter order in the widest accumulation dtype. A float64 parameter keeps float64 accumulation whatever
    the order or dtypes of the other parameters."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, v in enumerate(vs):
        groups.setdefault(v.dtype, []).append(i)
    if len(groups) == 1:
        return ops.hessian_probe_dot(list(vs), [h.to(vs[0].dtype) for h in hvs], with_diag)
    acc = acc_dtype(*groups)
    k = vs[0].shape[0]
    dots = vs[0].new_zeros(k, len(vs), dtype=acc)
    diag_parts: list[torch.Tensor | None] = [None] * len(vs)
    sq_parts: list[torch.Tensor | None] = [None] * len(vs)
    for dtype, idx in groups.items():
        d, g, g2 = ops.hessian_probe_dot([vs[i] for i in idx], [hvs[i].to(dtype) for i in idx], with_diag)
        dots[:, idx] = d.to(acc)
        if with_diag:
            sizes = [vs[i].numel() // k if k else 0 for i in idx]
            for i, a, b in zip(idx, g.split(sizes), g2.split(sizes), strict=True):
                diag_parts[i], sq_parts[i] = a.to(acc), b.to(acc)
    if not with_diag:
        empty = vs[0].new_zeros(0, dtype=acc)
        return dots, empty, empty.clone()
    return dots, torch.cat(diag_parts), torch.cat(sq_parts)
