"""The dropout family on DTensors: each shard computes the elements of the single-process mask it holds.

The public functions of :mod:`regops.dropout.api` forward DTensor inputs here (one line each). Every function:

1. draws the call's seed from the generator exactly as the single-process function does (the word count of
   the *global* call, so the generator advances identically on every rank), then broadcasts the mesh's first
   rank's seed (16 bytes) so ranks whose generators disagree still draw one mask;
2. computes the word strides of the single-process mask (see ``global_mask_apply`` in
   :mod:`regops.dropout.reference`) and this shard's layout from its box in the global tensor (``Shard(d)`` on
   any dim, ``Replicate()``, uneven shards);
3. runs ``regops::global_mask_apply`` on the local shard and wraps the result as a DTensor with ``x``'s
   placements.

So ``op(x_dtensor).full_tensor()`` equals ``op(x_dtensor.full_tensor())`` under the same seed, bit for bit.
Nothing but the seed is communicated, except where an op needs whole rows or other parameters (see each).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from regops._core import dtensor as _dtensor
from regops._core.dtypes import acc_dtype
from regops.dropout import ops
from regops.dropout import reference as _ref


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _masked(x, strides, p, scale, mode, seed, *, num_samples=1, step=0, residual=None) -> DTensor:
    res = _dtensor.local_like(residual, x, "residual")
    y = ops.global_mask_apply(
        x.to_local(), res, None, p, scale, mode, num_samples, step, _dtensor.layout(x, strides), seed
    )
    return _dtensor.to_dtensor(y, x)


def dropout(x: DTensor, p: float, p_t: torch.Tensor, inplace: bool, mask_mode: str, generator) -> DTensor:
    """:func:`regops.dropout` of a DTensor (``training`` and ``p > 0`` already checked by the caller).
    ``mask_mode="bitmask"``: the shard's part of the single-process keep mask, drawn by the same kernel on ones
    and packed (1 bit per local element), is applied and saved for the backward."""
    seed = _dtensor.seed(x, x.numel(), generator)
    strides = _dtensor.contiguous_strides(x.shape)
    if mask_mode == "bitmask":
        local = x.to_local()
        ones = torch.ones(local.shape, dtype=local.dtype, device=local.device)
        keep = ops.global_mask_apply(ones, None, None, p, 1.0, _ref.MODE_MUL, 1, 0, _dtensor.layout(x, strides), seed)
        # contiguous, as the DTensor's strides say (apply_bitmask keeps a dense input's layout)
        y = _dtensor.to_dtensor(ops.apply_bitmask(local.contiguous(), _ref.pack_bits(keep != 0), p_t), x)
    else:
        y = _masked(x, strides, p, _ref.dropout_scale(p), _ref.MODE_MUL, seed)
    return x.copy_(y) if inplace else y


def shared(x: DTensor, p: float, mask_shape: list[int], inplace: bool, generator) -> DTensor:
    """Masks shared along dims (shared_dropout, dropout1d/2d/3d): one draw per element of ``mask_shape``."""
    seed = _dtensor.seed(x, _numel(mask_shape), generator)
    strides = [0 if m == 1 else s for m, s in zip(mask_shape, _dtensor.contiguous_strides(mask_shape), strict=True)]
    y = _masked(x, strides, p, _ref.dropout_scale(p), _ref.MODE_MUL, seed)
    return x.copy_(y) if inplace else y


def drop_path(x: DTensor, residual, p: float, scale_by_keep: bool, generator) -> DTensor:
    """drop_path (``residual is None``) and drop_path_add: one draw per sample (dim 0)."""
    if p > 0:
        seed = _dtensor.seed(x, x.shape[0], generator)
    else:
        seed = torch.zeros(2, dtype=torch.int64)  # drop_path_add with p = 0 draws nothing, as the single-process op
    strides = [1] + [0] * (x.dim() - 1)
    scale = _ref.dropout_scale(p) if scale_by_keep else 1.0
    return _masked(x, strides, p, scale, _ref.MODE_MUL, seed, residual=residual)


def multi_sample_dropout(x: DTensor, p: float, num_samples: int, generator) -> DTensor:
    """Mean of ``num_samples`` masks; sample ``k`` at counter offset ``k * ceil(numel / 4)`` of the global call."""
    step = _ref.multi_sample_counters(x.numel())
    seed = _dtensor.seed(x, num_samples * 4 * step, generator)
    factor = _ref.float_round(_ref.dropout_scale(p) / num_samples)
    return _masked(
        x, _dtensor.contiguous_strides(x.shape), p, factor, _ref.MODE_MULTI, seed, num_samples=num_samples, step=step
    )


def nested_dropout(x: DTensor, p: float, dim: int, generator) -> DTensor:
    """Per sample keep the first ``b`` units along ``dim``: ``b`` from the sample's global index, units by global
    index. The ``B`` per-sample words are recomputed on every rank (``B`` Philox words, no communication)."""
    seed = _dtensor.seed(x, x.shape[0], generator)
    key, offset = seed.tolist()
    shape, start = _dtensor.box(x)
    counts = _ref.nested_keep_counts(x.shape[0], x.shape[dim], p, key, offset, device=x.device)
    counts = counts[start[0] : start[0] + shape[0]]
    units = start[dim] + torch.arange(shape[dim], device=x.device)
    view = [1] * x.dim()
    view[0], view[dim] = shape[0], shape[dim]
    keep = (units[None, :] < counts[:, None]).reshape(view)
    local = x.to_local()
    y = torch.where(keep, local, torch.zeros((), dtype=local.dtype, device=local.device))
    return _dtensor.to_dtensor(y.contiguous(), x)


def _row_strides(shape) -> list[int]:
    """Word strides of the row layout: rows of ``4 * ceil(H / 4)`` words."""
    padded = [*shape[:-1], 4 * _ref.row_counters(shape[-1])]
    return [*_dtensor.contiguous_strides(padded)[:-1], 1]


def _row_seed(x: DTensor, p: float, generator) -> torch.Tensor:
    if p == 0.0:
        return torch.zeros(2, dtype=torch.int64)  # as the single-process ops: no draw when nothing is dropped
    cols = x.shape[-1]
    return _dtensor.seed(x, (x.numel() // cols) * 4 * _ref.row_counters(cols), generator)


def bias_dropout_add(x: DTensor, bias, residual, p: float, generator) -> DTensor:
    """``residual + dropout(x + bias)``: residual brought to ``x``'s placements; the bias (DTensor or a plain,
    replicated tensor) sliced to the shard's columns, its gradient summed over the ranks holding other rows."""
    seed = _row_seed(x, p, generator)
    res = _dtensor.local_like(residual, x, "residual")
    b = _dtensor.local_columns(bias, x, "bias")
    y = ops.global_mask_apply(
        x.to_local(),
        res,
        b,
        p,
        _ref.dropout_scale(p),
        _ref.MODE_MUL,
        1,
        0,
        _dtensor.layout(x, _row_strides(x.shape)),
        seed,
    )
    return _dtensor.to_dtensor(y, x)


def dropout_add_layer_norm(
    x: DTensor,
    residual,
    weight,
    bias,
    p: float,
    eps: float,
    rms_norm: bool,
    prenorm: bool,
    residual_in_fp32: bool,
    generator,
):
    """``norm(dropout(x) + residual) * weight + bias``: the norm needs whole rows, so a shard of the last dim is
    first all-gathered along it (the result is returned with ``x``'s placements). Weight and bias as
    :func:`bias_dropout_add`'s bias. The dropout + residual pass runs on the shard, then the single-process
    fused norm with ``p = 0`` (the same arithmetic as the one-pass op)."""
    cd = acc_dtype(x)
    s_dtype = _ref.prenorm_dtype(x, residual, residual_in_fp32)
    if acc_dtype(s_dtype) != cd or s_dtype not in (x.dtype, cd):
        raise NotImplementedError(
            f"regops: dropout_add_layer_norm on DTensors needs the stored sum's dtype ({s_dtype}) to be x's dtype "
            f"({x.dtype}) or its compute dtype ({cd}); pass residual_in_fp32=True or a residual of x's dtype"
        )
    seed = _row_seed(x, p, generator)
    rows_placements = _dtensor.gather_dims(x, {x.dim() - 1})
    xg = x.redistribute(x.device_mesh, rows_placements) if rows_placements != list(x.placements) else x
    s = ops.global_mask_apply(
        xg.to_local(),
        _dtensor.local_like(residual, xg, "residual"),
        None,
        p,
        _ref.dropout_scale(p),
        _ref.MODE_MUL,
        1,
        0,
        _dtensor.layout(xg, _row_strides(x.shape)),
        seed,
        s_dtype,
    )
    w = _dtensor.local_columns(weight, xg, "weight")
    b = _dtensor.local_columns(bias, xg, "bias")
    no_dropout = torch.zeros((), dtype=torch.float64)
    y = ops.dropout_add_layer_norm(s, None, w, b, no_dropout, eps, rms_norm, residual_in_fp32, seed)[0].to(x.dtype)
    out = [_dtensor.to_dtensor(t, xg, rows_placements) for t in ((y, s) if prenorm else (y,))]
    out = [t.redistribute(x.device_mesh, x.placements) if rows_placements != list(x.placements) else t for t in out]
    return (out[0], out[1]) if prenorm else out[0]
