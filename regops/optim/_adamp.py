"""AdamP's and SGDP's radial projection (``adamp=`` of regops' AdamW and SGD; Heo et al., ICLR 2021) in the fused
step.

The decision needs row sums of (gradient, weights) and the projection row sums of (update, weights): reductions the
elementwise step kernel cannot make, since the update exists only inside it. So, for the group's parameters of two
or more dims, the step runs as: the row sums of (gradient, weights) (the ``optim_dots`` kernel, shared with adaptive
clipping); the step kernel with its decay off, writing the update ``-step_size u`` into a kept buffer (states,
step counts, filters and noise as in one pass); the row sums of (update, weights) (``optim_dots``); then the
projection and the decoupled decay as a few multi-tensor torch operations per dtype. Every choice is a
``torch.where`` on device tensors: no host synchronisation, capturable. The group's vectors take the one-pass step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from regops._core.dtypes import acc_dtype
from regops._core.validate import is_dtensor
from regops.optim import ops
from regops.optim import reference as ref

KEYS = ("delta", "wd_ratio", "eps")
DEFAULTS = (0.1, 0.1, 1e-8)  # AdamP's and SGDP's defaults
# optim_step's arguments by position
A_PARAMS, A_RESTORE, A_ROW_SCALES, A_HYPER, A_IDS, A_OFFSETS, A_DECAY, A_FOUND_INF = 0, 9, 10, 11, 12, 13, 15, 20
LISTS = range(10)  # the Tensor[] arguments, one entry per parameter (or none)


def options(value: Any) -> tuple[float, float, float] | None:
    """``adamp=`` as ``(delta, wd_ratio, eps)`` (``None`` when off), validated."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULTS
    usage = "adamp must be True, (delta, wd_ratio), (delta, wd_ratio, eps) or a dict with those keys"
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(KEYS))
        if unknown:
            raise TypeError(f"regops: {usage}; got the keys {unknown}")
        values = [value.get(k, d) for k, d in zip(KEYS, DEFAULTS, strict=True)]
    else:
        try:
            values = list(value)
        except TypeError:
            raise TypeError(f"regops: {usage}, got {value!r}") from None
        if len(values) not in (2, 3):
            raise TypeError(f"regops: {usage}, got {value!r}")
        values += DEFAULTS[len(values) :]
    try:
        delta, ratio, eps = (float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"regops: {usage}, got {value!r}") from None
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"regops: adamp's delta must be positive and finite, got {delta}")
    if not (math.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"regops: adamp's wd_ratio must be >= 0 and finite, got {ratio}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"regops: adamp's eps must be positive and finite, got {eps}")
    return delta, ratio, eps


def check_decay(group: dict[str, Any]) -> None:
    """A decay added to the gradient points along the weights, and the projection would remove it: refused."""
    decay = group["decay"]
    if group["adamp"] is not None and (decay in ("l2sp", "ewc") or decay == "coupled" and group["weight_decay"]):
        raise ValueError(
            f"regops: adamp with decay={decay!r}: a decay added to the gradient points along the weights and the "
            "radial projection would remove it; use decay='decoupled' (AdamP's and SGDP's decay) or 'cautious'"
        )


# ------------------------------------------------------------------------------------------------ layout
class _Layout(NamedTuple):
    """Where the rows of the projected tensors sit: counts, the full call's row of each, tensor of each, slot in
    an ``[n, max_rows]`` padding (for per-tensor sums in a fixed order), and the square roots of the global row
    and tensor sizes (the thresholds' ``sqrt(d)``)."""

    rows: list[int]
    source: torch.Tensor
    tensor: torch.Tensor
    slot: torch.Tensor
    max_rows: int
    sqrt_row: torch.Tensor
    sqrt_numel: torch.Tensor


_LAYOUTS: OrderedDict[tuple, _Layout] = OrderedDict()
_LAYOUTS_MAX = 64


def _layout(params: list[torch.Tensor], local: list[torch.Tensor], picked: list[int]) -> _Layout:
    device = local[0].device
    key = (str(device), tuple((tuple(p.shape), tuple(t.shape)) for p, t in zip(params, local, strict=True)),
           tuple(picked))  # fmt: skip
    hit = _LAYOUTS.get(key)
    if hit is not None:
        _LAYOUTS.move_to_end(key)
        return hit
    bases, base = [], 0
    for t in local:
        bases.append(base)
        base += ref.rows_of(t)
    rows = [ref.rows_of(local[i]) for i in picked]
    max_rows = max(rows, default=0)
    source, tensor, slot, sqrt_row = [], [], [], []
    for k, i in enumerate(picked):
        size = math.prod(params[i].shape[1:])
        for r in range(rows[k]):
            source.append(bases[i] + r)
            tensor.append(k)
            slot.append(k * max_rows + r)
            sqrt_row.append(math.sqrt(size))
    ints = torch.tensor([source, tensor, slot], dtype=torch.int64).reshape(3, -1).to(device)
    floats = torch.tensor(sqrt_row + [math.sqrt(params[i].numel()) for i in picked], dtype=torch.float64)
    floats = floats.to(device)
    hit = _LAYOUTS[key] = _Layout(rows, ints[0], ints[1], ints[2], max_rows, floats[: len(source)],
                                  floats[len(source) :])  # fmt: skip
    if len(_LAYOUTS) > _LAYOUTS_MAX:
        _LAYOUTS.popitem(last=False)
    return hit


def _per_tensor(rows: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Row values ``[R, k]`` summed per tensor (``[n, k]``), in row order (a padding, not atomics)."""
    n, k = len(layout.rows), rows.shape[1]
    padded = rows.new_zeros(n * layout.max_rows, k).index_copy_(0, layout.slot, rows)
    return padded.view(n, layout.max_rows, k).sum(1)


def _cosine(sums: torch.Tensor, scale: torch.Tensor | None, eps: torch.Tensor) -> torch.Tensor:
    """``|g.w| / (max(|g|, eps) max(|w|, eps))`` from the sums ``[g.g, g.w, w.w]`` of the scaled gradient."""
    gnorm, gw = sums[:, 0].sqrt(), sums[:, 1]
    if scale is not None:
        gnorm, gw = gnorm / scale, gw / scale
    return gw.abs() / (gnorm.clamp(min=eps) * sums[:, 2].sqrt().clamp(min=eps))


# ------------------------------------------------------------------------------------------------ the step
def _subset(args: list[Any], picked: list[int], row_index: torch.Tensor | None) -> list[Any]:
    out = list(args)
    for a in LISTS:
        out[a] = [args[a][i] for i in picked] if args[a] else []
    for a in (A_IDS, A_OFFSETS):
        out[a] = [args[a][i] for i in picked]
    if args[A_ROW_SCALES] is not None:
        out[A_ROW_SCALES] = args[A_ROW_SCALES].index_select(0, row_index)
    return out


def step(
    args: list[Any],
    ws: list[torch.Tensor],
    sums: torch.Tensor,
    params: list[torch.Tensor],
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    scratch: dict[tuple, torch.Tensor],
) -> None:
    """``optim_step(*args)`` with the radial projection. ``ws``: the weights the step starts from (local shards);
    ``sums``: ``optim_dots(grads, ws, [], rows=True)``; ``params``: the parameters (DTensors when sharded);
    ``scratch``: the caller's buffers for the updates, kept between steps (fixed addresses: the Triton kernels'
    address tables stay valid, and a CUDA graph replays the same buffers)."""
    local = args[A_PARAMS]
    picked = [i for i, p in enumerate(params) if p.dim() > 1 and p.numel() > 0]  # global sizes: every rank agrees
    others = sorted(set(range(len(params))) - set(picked))
    if others:
        plain_rows = _layout(params, local, others).source if args[A_ROW_SCALES] is not None else None
        ops.step(*_subset(args, others, plain_rows))
    if not picked:
        return
    layout = _layout(params, local, picked)
    sub = _subset(args, picked, layout.source)
    ps, ws = sub[A_PARAMS], [ws[i] for i in picked]
    sharded = [params[i] for i in picked] if is_dtensor(*params) else None
    decay = sub[A_DECAY]
    deltas = _updates(ps, scratch)
    sub[A_PARAMS], sub[A_RESTORE], sub[A_DECAY] = deltas, [], "none"
    ops.step(*sub)  # deltas = -step_size u; states and step counts updated
    both = torch.cat([sums.index_select(0, layout.source), ops.dots(deltas, ws, [], True)], 1).to(torch.float64)
    coef, factor = _coefficients(both, layout, sub[A_HYPER], grad_scale, found_inf, sharded)
    _apply(ps, ws, deltas, coef, factor, layout, decay)


def _updates(ps: list[torch.Tensor], scratch: dict[tuple, torch.Tensor]) -> list[torch.Tensor]:
    """Zeroed tensors shaped as ``ps``: views of one buffer per dtype, the same buffer at every step."""
    out: list[torch.Tensor | None] = [None] * len(ps)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(ps):
        by_dtype.setdefault(p.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        key = (str(ps[idx[0]].device), dtype, tuple(tuple(ps[i].shape) for i in idx))
        flat = scratch.get(key)
        if flat is None:
            flat = scratch[key] = torch.empty(sum(ps[i].numel() for i in idx), dtype=dtype, device=ps[idx[0]].device)
        flat.zero_()
        for i, d in zip(idx, flat.split([ps[i].numel() for i in idx]), strict=True):
            out[i] = d.view(ps[i].shape)
    return out


def _apply(ps, ws, deltas, coef, factor, layout, decay) -> None:
    """``p = w f + (d - w c)``, ``c`` per row, ``f`` the tensor's decay factor (only where the cautious mask allows
    it), in the accumulation dtype, as a few multi-tensor operations per dtype: ``w (f - c) + d`` where the decay
    does not depend on the projected update's signs."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(ps):
        groups.setdefault(p.dtype, []).append(i)
    f_rows = factor[layout.tensor] if decay in ("decoupled", "cautious") else torch.ones_like(coef)
    for dtype, idx in groups.items():
        cd = acc_dtype(dtype)
        per_row = (coef if decay == "cautious" else f_rows - coef).to(cd).split(layout.rows)
        scales = [per_row[i].view(-1, *([1] * (ps[i].dim() - 1))) for i in idx]
        w = [ws[i] if dtype == cd else ws[i].to(cd) for i in idx]
        d = [deltas[i] if dtype == cd else deltas[i].to(cd) for i in idx]
        if decay == "cautious":  # the mask reads u = -d / step_size of the projected update
            d = torch._foreach_sub(d, torch._foreach_mul(w, scales))
            fs = factor.to(cd).unbind(0)
            w = [torch.where(ref.cautious_mask(-x, y), y * fs[i], y) for x, y, i in zip(d, w, idx, strict=True)]
        else:
            w = torch._foreach_mul(w, scales)
        torch._foreach_add_(w, d)
        torch._foreach_copy_([ps[i] for i in idx], w)


def _coefficients(both, layout, hyper, grad_scale, found_inf, sharded) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the multiple of ``w`` to take off the update (``(w.d) / (|w| + eps)^2`` of the row or of the tensor,
    or 0), and per tensor the decay factor ``1 - lr wd ratio``. ``both``: row sums ``[g.g, g.w, w.w, d.d, d.w,
    w.w]`` of each rank's shards; under DTensor, rows split by a placement and the tensors' sums are completed over
    the mesh (one all-reduce per set of mesh dims)."""
    h = hyper.to(torch.float64)
    delta, ratio, eps = h[ref.H_ADAMP_DELTA], h[ref.H_ADAMP_WD_RATIO], h[ref.H_ADAMP_EPS]
    scale = grad_scale.to(both) if grad_scale is not None else None
    rows = _dtensor().reduce_rows(both, sharded) if sharded else both
    unfit = ~(_cosine(rows[:, :3], scale, eps) < delta / layout.sqrt_row)  # NaN: no projection (AdamP's max)
    tensors = _per_tensor(torch.cat([unfit.to(both)[:, None], both], 1), layout)
    if sharded:
        tensors = _dtensor().reduce_tensors(tensors, sharded)
    channel = tensors[:, 0] == 0
    layer = ~channel & (_cosine(tensors[:, 1:4], scale, eps) < delta / layout.sqrt_numel)
    row_coef = rows[:, 4] / (rows[:, 5].sqrt() + eps) ** 2
    layer_coef = tensors[:, 5] / (tensors[:, 6].sqrt() + eps) ** 2
    zero = torch.zeros((), dtype=both.dtype, device=both.device)
    coef = torch.where(channel[layout.tensor], row_coef, torch.where(layer, layer_coef, zero)[layout.tensor])
    factor = 1.0 - h[ref.H_LR] * h[ref.H_WD] * torch.where(channel | layer, ratio, torch.ones_like(ratio))
    if found_inf is not None:  # the update is zero then; the decay must be too
        factor = torch.where(found_inf.to(factor.device) != 0, torch.ones_like(factor), factor)
    return coef, factor


def _dtensor():
    from regops.optim import dtensor

    return dtensor
