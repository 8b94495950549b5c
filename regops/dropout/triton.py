"""The dropout family's Triton launchers: each takes its op's arguments (contiguous tensors, ``p`` and the seed as
tensors) and returns its results, bit-identical to :mod:`regops.dropout.reference`. The kernels are in
``regops.kernels.dropout`` and ``regops.kernels.dropout_fused``; every launch goes through
:func:`regops._core.launch.launch`. Kernels read the seed from device memory (CUDA-graph safe)."""

from __future__ import annotations

import torch
import triton

from regops._core.dtypes import acc_dtype
from regops._core.launch import launch, sm_count
from regops._core.philox import keep_threshold
from regops._core.validate import probability_value
from regops.dropout.reference import (
    MODE_MUL,
    MODE_MULTI,
    MODE_WHERE,
    MODES,
    dropout_scale,
    float_round,
    multi_sample_counters,
    prenorm_dtype,
    row_counters,
)
from regops.kernels import dropout as K
from regops.kernels import dropout_fused as F
from regops.kernels import dropout_global as G


def _block(x: torch.Tensor) -> int:
    # The interpreter pays per program instance; a GPU wants ~16-32 bytes in flight per thread.
    return 8192 if x.device.type == "cpu" else 2048


def _seed(seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    return seed if seed.device == device or device.type == "meta" else seed.to(device, non_blocking=True)


def _flat(kernel, x: torch.Tensor, *args, **meta) -> None:
    """One program per block of a flat tensor's elements."""
    block = _block(x)
    launch(kernel, (triton.cdiv(x.numel(), block),), *args, device=x.device, BLOCK=block, num_warps=4, **meta)


def dropout(x: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    if x.numel():
        p = probability_value(p)
        _flat(K.dropout_kernel, x, x, y, x.numel(), keep_threshold(p), dropout_scale(p), _seed(seed, x.device))
    return y


def dropout_bitmask(x: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    y, bits = torch.empty_like(x), torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    if n:
        p = probability_value(p)
        _flat(K.dropout_bitmask_kernel, x, x, y, bits, n, keep_threshold(p), dropout_scale(p), _seed(seed, x.device))
    return y, bits


def apply_bitmask(g: torch.Tensor, bits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(g)
    if g.numel():
        _flat(K.apply_bitmask_kernel, g, g, bits, out, g.numel(), dropout_scale(probability_value(p)))
    return out


def multi_sample_dropout_mean(x: torch.Tensor, p: torch.Tensor, num_samples: int, seed: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        p = probability_value(p)
        factor = float_round(dropout_scale(p) / num_samples)
        step, threshold = multi_sample_counters(n), keep_threshold(p)
        _flat(K.multi_sample_mean_kernel, x, x, y, n, num_samples, step, threshold, factor, _seed(seed, x.device))
    return y


def scale_rows_add(x: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        res = residual if residual is not None else x
        # x*s+r stays two roundings, bit-identical to the reference
        _flat(K.scale_rows_add_kernel, x, x, scales, res, y, n, max(n // x.shape[0], 1),
              HAS_RESIDUAL=residual is not None, enable_fp_fusion=False)  # fmt: skip
    return y


# ------------------------------------------------------------------------------------------------ row ops
def _rows_cols(x: torch.Tensor) -> tuple[int, int]:
    cols = x.shape[-1] if x.dim() else 1
    return (x.numel() // cols if cols else 0), cols


def _tile(x: torch.Tensor, cols: int) -> tuple[int, int]:
    target = 16384 if x.device.type == "cpu" else 4096
    block_c = min(max(triton.next_power_of_2(cols), 4), 1024 if x.device.type != "cpu" else 8192)
    return max(1, min(target // block_c, 64)), block_c


def bias_dropout_add(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: torch.Tensor, seed: torch.Tensor
) -> torch.Tensor:
    y = torch.empty_like(x)
    rows, cols = _rows_cols(x)
    if x.numel() == 0:
        return y
    p = probability_value(p)
    block_r, block_c = _tile(x, cols)
    launch(
        F.bias_dropout_add_fwd_kernel,
        (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c)),
        x, bias if bias is not None else x, residual, y, rows, cols, row_counters(cols), keep_threshold(p),
        dropout_scale(p), _seed(seed, x.device),
        device=x.device, HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        enable_fp_fusion=False,  # a*b+c stays two roundings, bit-identical to the reference
    )  # fmt: skip
    return y


def bias_dropout_add_backward(
    grad: torch.Tensor, has_bias: bool, p: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dbias)``; dbias: float32 (float64) column sums of dx before rounding, or empty without a bias."""
    dx = torch.empty_like(grad)
    rows, cols = _rows_cols(grad)
    acc = acc_dtype(grad)
    if grad.numel() == 0:
        return dx, grad.new_zeros(cols if has_bias else 0, dtype=acc)
    p = probability_value(p)
    block_r, block_c = _tile(grad, cols)
    row_blocks = triton.cdiv(rows, block_r)
    programs = min(row_blocks, 8 if grad.device.type == "cpu" else 4 * sm_count(grad.device))
    parts = grad.new_empty((programs, cols), dtype=acc) if has_bias else dx
    launch(
        F.bias_dropout_add_bwd_kernel,
        (programs, triton.cdiv(cols, block_c)),
        grad, dx, parts, rows, cols, row_counters(cols), keep_threshold(p), dropout_scale(p),
        _seed(seed, grad.device), triton.cdiv(row_blocks, programs),
        device=grad.device, HAS_BIAS=has_bias, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return dx, (parts.sum(0) if has_bias else grad.new_empty(0, dtype=acc))


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: torch.Tensor,
    eps: float,
    rms_norm: bool,
    residual_in_fp32: bool,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = _rows_cols(x)
    stat = acc_dtype(x)
    y = torch.empty_like(x)
    s = torch.empty(x.shape, dtype=prenorm_dtype(x, residual, residual_in_fp32), device=x.device)
    mean, rstd = x.new_empty(rows, dtype=stat), x.new_empty(rows, dtype=stat)
    if x.numel() == 0:
        return y, s, mean, rstd
    p = probability_value(p)
    cfg = F.norm_config(cols, x.device.type)
    launch(
        F.dropout_add_layer_norm_fwd_looped_kernel if cfg.looped else F.dropout_add_layer_norm_fwd_kernel,
        (triton.cdiv(rows, cfg.block_r),),
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, s, mean, rstd, rows, cols, row_counters(cols), keep_threshold(p),
        dropout_scale(p), eps, _seed(seed, x.device),
        device=x.device, HAS_DROPOUT=p > 0.0, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, RMS_NORM=rms_norm, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps, maxnreg=cfg.maxnreg,
        enable_fp_fusion=False,  # the stored pre-norm sum is bit-identical to the reference
    )  # fmt: skip
    return y, s, mean, rstd


def dropout_add_layer_norm_backward(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    has_bias: bool,
    p: torch.Tensor,
    rms_norm: bool,
    seed: torch.Tensor,
    x_dtype: torch.dtype,
    res_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = _rows_cols(s)
    acc = acc_dtype(x_dtype)
    none = s.new_empty(0, dtype=acc)
    dx = torch.empty(s.shape, dtype=x_dtype, device=s.device)
    dres = torch.empty(s.shape, dtype=res_dtype, device=s.device) if res_dtype is not None else None
    if s.numel() == 0:
        zeros = s.new_zeros(cols, dtype=acc)
        return (
            dx,
            (dres if dres is not None else none),
            (zeros if weight is not None else none),
            (zeros.clone() if has_bias else none),
        )
    p = probability_value(p)
    cfg = F.norm_config(cols, s.device.type)
    row_blocks = triton.cdiv(rows, cfg.block_r)
    programs = min(row_blocks, 4 if s.device.type == "cpu" else 2 * sm_count(s.device))
    dw = s.new_empty((programs, cols), dtype=acc) if weight is not None else None
    db = s.new_empty((programs, cols), dtype=acc) if has_bias else None
    # the looped kernel's per-row scratch for its two row reductions
    scratch = (s.new_empty(rows, dtype=acc) for _ in range(2)) if cfg.looped else ()
    launch(
        F.dropout_add_layer_norm_bwd_looped_kernel if cfg.looped else F.dropout_add_layer_norm_bwd_kernel,
        (programs,),
        dy, ds if ds is not None else dy, s, mean, rstd, weight if weight is not None else s, dx,
        dres if dres is not None else dx, dw if dw is not None else dx, db if db is not None else dx, *scratch,
        rows, cols, row_counters(cols), keep_threshold(p), dropout_scale(p), _seed(seed, s.device),
        triton.cdiv(row_blocks, programs),
        device=s.device, HAS_DROPOUT=p > 0.0, HAS_DS=ds is not None, HAS_DRES=dres is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, RMS_NORM=rms_norm, BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg,
    )  # fmt: skip
    return (
        dx,
        dres if dres is not None else none,
        dw.sum(0) if dw is not None else none,
        db.sum(0) if db is not None else none,
    )


# ------------------------------------------------------------------------------------------ global masks
assert (MODE_WHERE, MODE_MUL, MODE_MULTI) == (0, 1, 2)  # the kernel's MODE constants


def collapse(local_shape, strides) -> list[tuple[int, int]]:
    """``(size, word_stride)`` pairs, innermost first, with size-1 dims dropped and word-contiguous dims merged."""
    dims: list[tuple[int, int]] = []
    for size, stride in zip(reversed(list(local_shape)), reversed(list(strides)), strict=True):
        size = int(size)
        if size == 1:
            continue
        if dims and stride == dims[-1][1] * dims[-1][0]:
            dims[-1] = (dims[-1][0] * size, dims[-1][1])
        else:
            dims.append((size, int(stride)))
    return dims or [(1, 0)]


def aligned_words(base: int, dims: list[tuple[int, int]]) -> bool:
    """Whether every group of four consecutive local elements (from a multiple of 4) holds the four words of one
    Philox counter: the innermost dim has word stride 1 and a multiple of 4 elements, and every row starts on a
    multiple of 4. Then one Philox evaluation serves four elements."""
    size, stride = dims[0]
    return stride == 1 and size % 4 == 0 and base % 4 == 0 and all(w % 4 == 0 for _, w in dims[1:])


def _default_block(x: torch.Tensor) -> int:
    return 4096 if x.device.type == "cpu" else 1024


def global_mask_apply(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: float,
    scale: float,
    mode: int,
    num_samples: int,
    step: int,
    layout: list[int],
    seed: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """As :func:`regops.dropout.reference.global_mask_apply` (contiguous inputs), bit for bit."""
    if mode not in MODES:
        raise ValueError(f"regops: unknown mask mode {mode}")
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return y
    dims = collapse(x.shape, layout[1:])
    if len(dims) > G.MAX_DIMS:
        raise ValueError(
            f"regops: a shard with more than {G.MAX_DIMS} non-mergeable dims is not supported, got {tuple(x.shape)}"
        )
    aligned = aligned_words(layout[0], dims)
    dims += [(1, 0)] * (G.MAX_DIMS - len(dims))
    flat = [v for pair in dims for v in pair]
    block = block or _default_block(x)
    cols = x.shape[-1] if x.dim() else 1
    launch(
        G.global_mask_kernel,
        (triton.cdiv(n, block),),
        x,
        residual if residual is not None else x,
        bias if bias is not None else x,
        y,
        n,
        max(cols, 1),
        layout[0],
        *flat,
        keep_threshold(p),
        scale,
        _seed(seed, x.device),
        num_samples,
        step,
        device=x.device,
        NDIM=len([d for d in dims if d != (1, 0)]) or 1,
        MODE=mode,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        ALIGNED=aligned,
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,  # t*s+r stays two roundings, bit-identical to the reference
    )
    return y
