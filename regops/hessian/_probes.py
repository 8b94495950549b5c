"""Probes from the Philox stream and the fused Hutchinson accumulation, as torch.library operators.

``regops::hessian_probes`` draws probe rows for all parameters at once (one kernel launch on a GPU) into a
``[K, N]`` buffer, ``N`` = the parameters' numels concatenated; :class:`ParamLayout` gives per-parameter views.
``regops::hessian_probe_dot`` reduces ``v`` and ``Hv`` in one pass to the per-parameter, per-probe ``v . Hv``
(traces) and the per-coordinate sums of ``v * Hv`` and its square (diagonal and its standard error).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from regops import _backend
from regops._core import rng as _rng
from regops.reference import hessian as _ref

_backend.register("hessian_probes", torch=_ref.probes, triton="regops.kernels.hessian:probes")
_backend.register("hessian_probe_dot", torch=_ref.probe_dot, triton="regops.kernels.hessian:probe_dot")


@torch.library.custom_op("regops::hessian_probes", mutates_args=())
def _probes_op(
    seed: torch.Tensor,
    first_probe: int,
    num_probes: int,
    numel: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    key, offset = _backend.seed_args(seed, "hessian_probes", torch.device(device))
    impl = _backend.implementation("hessian_probes", torch.device(device))
    return impl(key, offset, first_probe, num_probes, numel, distribution, dtype, device)


@_probes_op.register_fake
def _(seed, first_probe, num_probes, numel, distribution, dtype, device):
    return torch.empty(num_probes, _ref.row_stride(numel, distribution), dtype=dtype, device=device)


@torch.library.custom_op("regops::hessian_probe_dot", mutates_args=())
def _probe_dot_op(
    vs: list[torch.Tensor], hvs: list[torch.Tensor], with_diag: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _backend.implementation("hessian_probe_dot", vs[0].device)
    dots, diag, diag_sq = impl(list(vs), list(hvs), with_diag)
    return dots, diag, diag_sq


@_probe_dot_op.register_fake
def _(vs, hvs, with_diag):
    acc = _ref.accumulate_dtype(vs[0].dtype)
    k = vs[0].shape[0]
    n = sum(v.numel() // k for v in vs) if k else 0
    return (
        vs[0].new_empty(k, len(vs), dtype=acc),
        vs[0].new_empty(n if with_diag else 0, dtype=acc),
        vs[0].new_empty(n if with_diag else 0, dtype=acc),
    )


def _dot_setup(ctx, inputs, output) -> None:
    vs, hvs, with_diag = inputs
    ctx.with_diag = with_diag
    ctx.save_for_backward(*vs, *hvs)


def _dot_backward(ctx, g_dots, g_diag, g_sq):
    saved = ctx.saved_tensors
    p = len(saved) // 2
    vs, hvs = saved[:p], saved[p:]
    acc = _ref.accumulate_dtype(vs[0].dtype)
    k = vs[0].shape[0]
    grads_v, grads_hv = [], []
    offset = 0
    for i, (v, hv) in enumerate(zip(vs, hvs, strict=True)):
        vf, hf = v.reshape(k, -1).to(acc), hv.reshape(k, -1).to(acc)
        n = vf.shape[1]
        # d(outputs)/d(v_kj hv_kj) = g_dots[k, i] + g_diag[j] + 2 (v_kj hv_kj) g_sq[j]
        upstream = torch.zeros_like(vf)
        if g_dots is not None:
            upstream = upstream + g_dots[:, i : i + 1].to(acc)
        if ctx.with_diag and g_diag is not None:
            upstream = upstream + g_diag[offset : offset + n].to(acc)
        if ctx.with_diag and g_sq is not None:
            upstream = upstream + 2.0 * vf * hf * g_sq[offset : offset + n].to(acc)
        offset += n
        grads_v.append((upstream * hf).reshape(v.shape).to(v.dtype))
        grads_hv.append((upstream * vf).reshape(hv.shape).to(hv.dtype))
    return grads_v, grads_hv, None


_probe_dot_op.register_autograd(_dot_backward, setup_context=_dot_setup)


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


def draw_seed(layout: ParamLayout, num_probes: int, distribution: str, generator: torch.Generator | None):
    """Key and first counter for ``num_probes`` probe rows over ``layout`` (advances the generator)."""
    words = _ref.stream_words(num_probes, layout.numel, distribution)
    return _rng.philox_seed(layout.device, words, generator)


def probe_rows(
    seed: torch.Tensor, first_probe: int, num_probes: int, layout: ParamLayout, distribution: str
) -> torch.Tensor:
    """Probe rows ``first_probe ..`` in the layout's common dtype: ``[num_probes, S >= N]``, the first ``N``
    columns are the probes (the rest is row padding; :meth:`ParamLayout.split` takes views)."""
    return _probes_op(seed, first_probe, num_probes, layout.numel, distribution, layout.dtype, layout.device)


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
        return _probe_dot_op(list(vs), [h.to(vs[0].dtype) for h in hvs], with_diag)
    acc = functools.reduce(torch.promote_types, (_ref.accumulate_dtype(d) for d in groups))
    k = vs[0].shape[0]
    dots = vs[0].new_zeros(k, len(vs), dtype=acc)
    diag_parts: list[torch.Tensor | None] = [None] * len(vs)
    sq_parts: list[torch.Tensor | None] = [None] * len(vs)
    for dtype, idx in groups.items():
        d, g, g2 = _probe_dot_op([vs[i] for i in idx], [hvs[i].to(dtype) for i in idx], with_diag)
        dots[:, idx] = d.to(acc)
        if with_diag:
            sizes = [vs[i].numel() // k if k else 0 for i in idx]
            for i, a, b in zip(idx, g.split(sizes), g2.split(sizes), strict=True):
                diag_parts[i], sq_parts[i] = a.to(acc), b.to(acc)
    if not with_diag:
        empty = vs[0].new_zeros(0, dtype=acc)
        return dots, empty, empty.clone()
    return dots, torch.cat(diag_parts), torch.cat(sq_parts)
