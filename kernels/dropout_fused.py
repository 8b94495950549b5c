"""Triton fused dropout ops over rows: residual + dropout(x + bias), and dropout + residual + LayerNorm/RMSNorm.

Masks use the row layout of regops.dropout.reference.row_keep_mask: element (r, c) takes word c % 4 of
counter offset + r * ceil(H / 4) + c // 4, so any tile of rows regenerates its own mask, forward or backward.
"""

from dataclasses import dataclass

import triton
import triton.language as tl
from regops.kernels.philox import counter_words, load_seed
from regops.kernels.utils import cast_rne


@triton.jit
def row_keep_tile(seed, offset, rows, col0, threshold, counters_per_row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Keep-mask of a [BLOCK_R, BLOCK_C] tile: rows ``rows`` (int64 [BLOCK_R]), columns ``col0 + arange``.

    ``col0`` is a multiple of 4; one Philox evaluation feeds four consecutive columns of a row.
    """
    k = tl.arange(0, BLOCK_C // 4).to(tl.int64)
    counters = offset + rows[:, None] * counters_per_row + col0 // 4 + k[None, :]
    r0, r1, r2, r3 = counter_words(seed, counters)
    # join(join(r0, r2), join(r1, r3))[., k, m, n] = r_{2m+n}: flattening gives column 4k + 2m + n.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_R, BLOCK_C])
    return (words >> 1).to(tl.int32, bitcast=True) > threshold


# ------------------------------------------------------------------------------------------------ bias_dropout_add
@triton.jit(do_not_specialize=["rows", "cols", "counters_per_row", "threshold"])
def bias_dropout_add_fwd_kernel(
    x_ptr,
    bias_ptr,
    res_ptr,
    y_ptr,
    rows,
    cols,
    counters_per_row,
    threshold,
    scale,
    seed_ptr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    seed, offset = load_seed(seed_ptr)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    c = col0 + tl.arange(0, BLOCK_C)
    in_bounds = (r[:, None] < rows) & (c[None, :] < cols)
    idx = r[:, None] * cols + c[None, :]
    keep = row_keep_tile(seed, offset, r, col0, threshold, counters_per_row, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + idx, mask=in_bounds, other=0.0)
    compute = tl.float64 if x.dtype == tl.float64 else tl.float32
    t = x.to(compute)
    if HAS_BIAS:
        t += tl.load(bias_ptr + c, mask=c < cols, other=0.0).to(compute)[None, :]
    res = tl.load(res_ptr + idx, mask=in_bounds, other=0.0).to(compute)
    y = t * tl.where(keep, scale, 0.0) + res  # multiply, as torch: NaN/Inf at a dropped position -> NaN
    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit(do_not_specialize=["rows", "cols", "counters_per_row", "threshold", "iters"])
def bias_dropout_add_bwd_kernel(
    g_ptr,
    dx_ptr,
    dbias_part_ptr,
    rows,
    cols,
    counters_per_row,
    threshold,
    scale,
    seed_ptr,
    iters,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    seed, offset = load_seed(seed_ptr)
    # Program (i, j) handles row blocks i, i + G, i + 2G, ... of column block j and writes one partial bias sum.
    pid_r = tl.program_id(0)
    n_prog_r = tl.num_programs(0)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    c = col0 + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if dx_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    for it in range(iters):
        r = (pid_r + it * n_prog_r).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_bounds = (r[:, None] < rows) & (c[None, :] < cols)
        idx = r[:, None] * cols + c[None, :]
        keep = row_keep_tile(seed, offset, r, col0, threshold, counters_per_row, BLOCK_R, BLOCK_C)
        g = tl.load(g_ptr + idx, mask=in_bounds, other=0.0)
        if g.dtype != tl.float64:
            g = g.to(tl.float32)
        dx = g * tl.where(keep, scale, 0.0)
        tl.store(dx_ptr + idx, cast_rne(dx, dx_ptr.dtype.element_ty), mask=in_bounds)
        if HAS_BIAS:
            acc += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + pid_r.to(tl.int64) * cols + c, acc, mask=c < cols)


# ------------------------------------------------------------------------------------------------ + LayerNorm
@triton.jit(do_not_specialize=["rows", "cols", "counters_per_row", "threshold"])
def dropout_add_layer_norm_fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    s_ptr,
    mean_ptr,
    rstd_ptr,
    rows,
    cols,
    counters_per_row,
    threshold,
    scale,
    eps,
    seed_ptr,
    HAS_DROPOUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Whole rows in registers (BLOCK_C >= cols): used up to WHOLE_ROW_MAX_COLS, where it does not spill."""
    seed, offset = load_seed(seed_ptr)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    col_ok = c < cols
    in_bounds = (r[:, None] < rows) & col_ok[None, :]
    idx = r[:, None] * cols + c[None, :]
    x = tl.load(x_ptr + idx, mask=in_bounds, other=0.0)
    compute = tl.float64 if x.dtype == tl.float64 else tl.float32
    t = x.to(compute)
    if HAS_DROPOUT:
        keep = row_keep_tile(seed, offset, r, 0, threshold, counters_per_row, BLOCK_R, BLOCK_C)
        t = t * tl.where(keep, scale, 0.0)
    if HAS_RESIDUAL:
        t += tl.load(res_ptr + idx, mask=in_bounds, other=0.0).to(compute)
    # Normalize the stored pre-norm sum (rounded to its storage dtype), as an unfused composition would.
    s_stored = cast_rne(t, s_ptr.dtype.element_ty)
    tl.store(s_ptr + idx, s_stored, mask=in_bounds)
    s = tl.where(in_bounds, s_stored.to(compute), 0.0)
    if RMS_NORM:
        mean = tl.zeros([BLOCK_R], dtype=compute)
        centered = s
    else:
        mean = tl.sum(s, axis=1) / cols
        centered = tl.where(in_bounds, s - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / cols
    rstd = 1.0 / tl.sqrt(var + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=col_ok, other=0.0).to(compute)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=col_ok, other=0.0).to(compute)[None, :]
    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(mean_ptr + r, mean, mask=r < rows)
    tl.store(rstd_ptr + r, rstd, mask=r < rows)


@triton.jit(do_not_specialize=["rows", "cols", "counters_per_row", "threshold", "iters"])
def dropout_add_layer_norm_bwd_kernel(
    dy_ptr,
    ds_ptr,
    s_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    dx_ptr,
    dres_ptr,
    dw_part_ptr,
    db_part_ptr,
    rows,
    cols,
    counters_per_row,
    threshold,
    scale,
    seed_ptr,
    iters,
    HAS_DROPOUT: tl.constexpr,
    HAS_DS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Whole rows in registers (BLOCK_C >= cols): used up to WHOLE_ROW_MAX_COLS, where it does not spill."""
    seed, offset = load_seed(seed_ptr)
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    c = tl.arange(0, BLOCK_C)
    col_ok = c < cols
    compute = tl.float64 if dx_ptr.dtype.element_ty == tl.float64 else tl.float32
    dw_acc = tl.zeros([BLOCK_C], dtype=compute)
    db_acc = tl.zeros([BLOCK_C], dtype=compute)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(compute)
    for it in range(iters):
        r = (pid + it * n_prog).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < rows
        in_bounds = row_ok[:, None] & col_ok[None, :]
        idx = r[:, None] * cols + c[None, :]
        s = tl.load(s_ptr + idx, mask=in_bounds, other=0.0).to(compute)
        g = tl.load(dy_ptr + idx, mask=in_bounds, other=0.0).to(compute)
        mean = tl.load(mean_ptr + r, mask=row_ok, other=0.0).to(compute)
        rstd = tl.load(rstd_ptr + r, mask=row_ok, other=0.0).to(compute)
        xhat = tl.where(in_bounds, (s - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :] if HAS_WEIGHT else g
        c1 = tl.sum(xhat * wg, axis=1) / cols
        if RMS_NORM:
            dsum = (wg - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wg, axis=1) / cols
            dsum = (wg - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dsum += tl.load(ds_ptr + idx, mask=in_bounds, other=0.0).to(compute)
        dx = dsum
        if HAS_DROPOUT:
            keep = row_keep_tile(seed, offset, r, 0, threshold, counters_per_row, BLOCK_R, BLOCK_C)
            dx = dsum * tl.where(keep, scale, 0.0)
        tl.store(dx_ptr + idx, cast_rne(dx, dx_ptr.dtype.element_ty), mask=in_bounds)
        if HAS_DRES:
            tl.store(dres_ptr + idx, cast_rne(dsum, dres_ptr.dtype.element_ty), mask=in_bounds)
        if HAS_WEIGHT:
            dw_acc += tl.sum(g * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(g, axis=0)
    if HAS_WEIGHT:
        tl.store(dw_part_ptr + pid.to(tl.int64) * cols + c, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid.to(tl.int64) * cols + c, db_acc, mask=col_ok)


# Rows longer than WHOLE_ROW_MAX_COLS do not fit in registers (in fp32 the whole-row backward spills ~0.5 KB per
# thread at 8192 columns and ~30 KB at 65536): the looped kernels stream each row in BLOCK_C-column chunks, as the
# best Triton LayerNorms do. Forward: pass 1 writes s chunk by chunk and merges per-chunk mean and M2 (Chan et al.,
# stable for any row length), pass 2 re-reads s (hot in L2) and writes y. Backward: pass 1 reduces the two row
# dot products c1, c2 into a [rows] scratch, pass 2 walks column chunks in the outer loop so that the dweight and
# dbias partial sums of a chunk stay in registers over all the program's rows (deterministic, no atomics).
@triton.jit(do_not_specialize=["rows", "cols", "counters_per_row", "threshold"])
def dropout_add_layer_norm_fwd_looped_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    s_ptr,
    mean_ptr,
    rstd_ptr,
    rows,
    cols,
    counters_per_row,
    threshold,
    scale,
    eps,
    seed_ptr,
    HAS_DROPOUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    seed, offset = load_seed(seed_ptr)
    compute: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    mean = tl.zeros([BLOCK_R], dtype=compute)
    m2 = tl.zeros([BLOCK_R], dtype=compute)
    for col0 in range(0, cols, BLOCK_C):
        c = col0 + tl.arange(0, BLOCK_C)
        in_bounds = row_ok[:, None] & (c[None, :] < cols)
        idx = r[:, None] * cols + c[None, :]
        t = tl.load(x_ptr + idx, mask=in_bounds, other=0.0).to(compute)
        if HAS_DROPOUT:
            keep = row_keep_tile(seed, offset, r, col0, threshold, counters_per_row, BLOCK_R, BLOCK_C)
            t = t * tl.where(keep, scale, 0.0)
        if HAS_RESIDUAL:
            t += tl.load(res_ptr + idx, mask=in_bounds, other=0.0).to(compute)
        s_stored = cast_rne(t, s_ptr.dtype.element_ty)
        tl.store(s_ptr + idx, s_stored, mask=in_bounds)
        sv = tl.where(in_bounds, s_stored.to(compute), 0.0)
        if RMS_NORM:
            m2 += tl.sum(sv * sv, axis=1)
        else:
            # merge this chunk's (n_c, mean_c, M2_c) into the running (col0, mean, M2)
            n_c = tl.sum((c < cols).to(compute), axis=0)
            n_prev = tl.zeros([BLOCK_R], dtype=compute) + col0
            mean_c = tl.sum(sv, axis=1) / n_c
            d = tl.where(in_bounds, sv - mean_c[:, None], 0.0)
            delta = mean_c - mean
            frac = n_c / (n_prev + n_c)
            m2 += tl.sum(d * d, axis=1) + delta * delta * n_prev * frac
            mean += delta * frac
    rstd = 1.0 / tl.sqrt(m2 / cols + eps)
    tl.store(mean_ptr + r, mean, mask=row_ok)
    tl.store(rstd_ptr + r, rstd, mask=row_ok)
    tl.debug_barrier()  # pass 2 reads s written by other threads of this program
    for col0 in range(0, cols, BLOCK_C):
        c = col0 + tl.arange(0, BLOCK_C)
        col_ok = c < cols
        in_bounds = row_ok[:, None] & col_ok[None, :]
        idx = r[:, None] * cols + c[None, :]
        sv = tl.load(s_ptr + idx, mask=in_bounds, other=0.0).to(compute)
        y = (sv - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + c, mask=col_ok, other=0.0).to(compute)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + c, mask=col_ok, other=0.0).to(compute)[None, :]
        tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit(do_not_specialize=["rows", "cols", "counters_per_row", "threshold", "iters"])
def dropout_add_layer_norm_bwd_looped_kernel(
    dy_ptr,
    ds_ptr,
    s_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    dx_ptr,
    dres_ptr,
    dw_part_ptr,
    db_part_ptr,
    c1_ptr,
    c2_ptr,
    rows,
    cols,
    counters_per_row,
    threshold,
    scale,
    seed_ptr,
    iters,
    HAS_DROPOUT: tl.constexpr,
    HAS_DS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    seed, offset = load_seed(seed_ptr)
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    compute: tl.constexpr = tl.float64 if dx_ptr.dtype.element_ty == tl.float64 else tl.float32
    # pass 1: c1 = mean(xhat * w g), c2 = mean(w g) per row, into the [rows] scratch
    for it in range(iters):
        r = (pid + it * n_prog).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < rows
        mean = tl.load(mean_ptr + r, mask=row_ok, other=0.0).to(compute)
        rstd = tl.load(rstd_ptr + r, mask=row_ok, other=0.0).to(compute)
        c1 = tl.zeros([BLOCK_R], dtype=compute)
        c2 = tl.zeros([BLOCK_R], dtype=compute)
        for col0 in range(0, cols, BLOCK_C):
            c = col0 + tl.arange(0, BLOCK_C)
            col_ok = c < cols
            in_bounds = row_ok[:, None] & col_ok[None, :]
            idx = r[:, None] * cols + c[None, :]
            sv = tl.load(s_ptr + idx, mask=in_bounds, other=0.0).to(compute)
            g = tl.load(dy_ptr + idx, mask=in_bounds, other=0.0).to(compute)
            xhat = tl.where(in_bounds, (sv - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_WEIGHT:
                g = g * tl.load(w_ptr + c, mask=col_ok, other=0.0).to(compute)[None, :]
            c1 += tl.sum(xhat * g, axis=1)
            c2 += tl.sum(g, axis=1)
        tl.store(c1_ptr + r, c1 / cols, mask=row_ok)
        tl.store(c2_ptr + r, c2 / cols, mask=row_ok)
    tl.debug_barrier()  # pass 2 reads c1, c2 written by other threads of this program
    # pass 2: column chunks outside, the program's rows inside; dweight / dbias partials stay in registers
    for col0 in range(0, cols, BLOCK_C):
        c = col0 + tl.arange(0, BLOCK_C)
        col_ok = c < cols
        if HAS_WEIGHT:
            w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(compute)
        dw_acc = tl.zeros([BLOCK_C], dtype=compute)
        db_acc = tl.zeros([BLOCK_C], dtype=compute)
        for it in range(iters):
            r = (pid + it * n_prog).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = r < rows
            in_bounds = row_ok[:, None] & col_ok[None, :]
            idx = r[:, None] * cols + c[None, :]
            mean = tl.load(mean_ptr + r, mask=row_ok, other=0.0).to(compute)
            rstd = tl.load(rstd_ptr + r, mask=row_ok, other=0.0).to(compute)
            c1 = tl.load(c1_ptr + r, mask=row_ok, other=0.0)
            sv = tl.load(s_ptr + idx, mask=in_bounds, other=0.0).to(compute)
            g = tl.load(dy_ptr + idx, mask=in_bounds, other=0.0).to(compute)
            xhat = tl.where(in_bounds, (sv - mean[:, None]) * rstd[:, None], 0.0)
            wg = g * w[None, :] if HAS_WEIGHT else g
            if RMS_NORM:
                dsum = (wg - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.load(c2_ptr + r, mask=row_ok, other=0.0)
                dsum = (wg - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DS:
                dsum += tl.load(ds_ptr + idx, mask=in_bounds, other=0.0).to(compute)
            dx = dsum
            if HAS_DROPOUT:
                keep = row_keep_tile(seed, offset, r, col0, threshold, counters_per_row, BLOCK_R, BLOCK_C)
                dx = dsum * tl.where(keep, scale, 0.0)
            tl.store(dx_ptr + idx, cast_rne(dx, dx_ptr.dtype.element_ty), mask=in_bounds)
            if HAS_DRES:
                tl.store(dres_ptr + idx, cast_rne(dsum, dres_ptr.dtype.element_ty), mask=in_bounds)
            if HAS_WEIGHT:
                dw_acc += tl.sum(g * xhat, axis=0)
            if HAS_BIAS:
                db_acc += tl.sum(g, axis=0)
        if HAS_WEIGHT:
            tl.store(dw_part_ptr + pid.to(tl.int64) * cols + c, dw_acc, mask=col_ok)
        if HAS_BIAS:
            tl.store(db_part_ptr + pid.to(tl.int64) * cols + c, db_acc, mask=col_ok)


# Whole rows in registers up to WHOLE_ROW_MAX_COLS; longer rows stream through LOOP_BLOCK_C-column chunks. GPU
# tiles hold 1024 elements on 8 warps (4 per thread) and the register budget is fixed at MAX_REGISTERS (two
# 256-thread blocks per SM): left to itself ptxas picks an occupancy target and spills a few bytes to meet it
# (4-12 B at 64-128 registers), and whole rows of 4096+ columns sat at 255 registers or spilled ~0.8 KB per
# thread (8192 columns, fp32 backward). Columns are padded to at least MIN_BLOCK_C so that few distinct
# configurations exist: tests/test_kernels_compile.py compiles each one the launchers pick up to 65536 columns
# and fails on any spill.
WHOLE_ROW_MAX_COLS = 1024
MAX_REGISTERS = 128
LOOP_BLOCK_C = 1024
MIN_BLOCK_C = 128
_GPU_TILE = 1024


@dataclass(frozen=True)
class NormConfig:
    block_r: int
    block_c: int
    looped: bool
    num_warps: int
    maxnreg: int


def norm_config(cols: int, device_type: str = "cuda") -> NormConfig:
    """Tile of the LayerNorm kernels for rows of ``cols`` columns: whole rows in registers, or looped rows."""
    block_c = max(triton.next_power_of_2(cols), MIN_BLOCK_C)
    if block_c > WHOLE_ROW_MAX_COLS:
        return NormConfig(1, LOOP_BLOCK_C, True, 8, MAX_REGISTERS)
    target = 16384 if device_type == "cpu" else _GPU_TILE  # the interpreter pays per program: large tiles
    return NormConfig(max(1, min(target // block_c, 16)), block_c, False, 8, MAX_REGISTERS)


def layer_norm_spec(looped: bool, backward: bool, dtype: str, s_dtype: str, cfg: NormConfig):
    """(kernel, signature, constexprs) of a LayerNorm kernel with every option on, for AOT compile tests.

    ``dtype``/``s_dtype``: Triton pointer types of x (y, dx, ...) and of the stored pre-norm sum."""
    stat = "*fp64" if dtype == "*fp64" else "*fp32"
    rows = {"rows": "i64", "cols": "i64", "counters_per_row": "i64", "threshold": "i32", "scale": "fp32"}
    flags = {"HAS_DROPOUT": True, "HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_R": cfg.block_r, "BLOCK_C": cfg.block_c}
    if not backward:
        ptrs = dict(x_ptr=dtype, res_ptr=dtype, w_ptr=dtype, b_ptr=dtype, y_ptr=dtype, s_ptr=s_dtype)
        sig = {**ptrs, "mean_ptr": stat, "rstd_ptr": stat, **rows, "eps": "fp32", "seed_ptr": "*i64"}
        kernel = dropout_add_layer_norm_fwd_looped_kernel if looped else dropout_add_layer_norm_fwd_kernel
        return kernel, sig, {**flags, "HAS_RESIDUAL": True, "RMS_NORM": False}
    ptrs = dict(dy_ptr=dtype, ds_ptr=s_dtype, s_ptr=s_dtype, mean_ptr=stat, rstd_ptr=stat, w_ptr=dtype)
    outs = dict(dx_ptr=dtype, dres_ptr=dtype, dw_part_ptr=stat, db_part_ptr=stat)
    scratch = {"c1_ptr": stat, "c2_ptr": stat} if looped else {}
    sig = {**ptrs, **outs, **scratch, **rows, "seed_ptr": "*i64", "iters": "i32"}
    kernel = dropout_add_layer_norm_bwd_looped_kernel if looped else dropout_add_layer_norm_bwd_kernel
    return kernel, sig, {**flags, "HAS_DS": True, "HAS_DRES": True, "RMS_NORM": False}


_DTYPES = ("*fp32", "*fp16", "*bf16", "*fp64")
_ROW_ARGS = {"rows": "i64", "cols": "i64", "counters_per_row": "i64", "threshold": "i32"}
COMPILE_SPECS = []
for _t in _DTYPES:
    COMPILE_SPECS += [
        (
            bias_dropout_add_fwd_kernel,
            {
                "x_ptr": _t,
                "bias_ptr": _t,
                "res_ptr": _t,
                "y_ptr": _t,
                **_ROW_ARGS,
                "scale": "fp32",
                "seed_ptr": "*i64",
            },
            {"HAS_BIAS": True, "BLOCK_R": 4, "BLOCK_C": 1024},
        ),
        (
            bias_dropout_add_bwd_kernel,
            {
                "g_ptr": _t,
                "dx_ptr": _t,
                "dbias_part_ptr": "*fp64" if _t == "*fp64" else "*fp32",
                **_ROW_ARGS,
                "scale": "fp32",
                "seed_ptr": "*i64",
                "iters": "i32",
            },
            {"HAS_BIAS": True, "BLOCK_R": 4, "BLOCK_C": 1024},
        ),
    ]
    # the LayerNorm kernels with s in the widest dtype; tests/test_kernels_compile.py compiles every launcher
    # configuration of them (fp32/bf16/fp16) and checks registers and spills
    for _cfg in (norm_config(256), norm_config(2 * WHOLE_ROW_MAX_COLS)):
        COMPILE_SPECS += [
            (
                *layer_norm_spec(_cfg.looped, backward, _t, "*fp64" if _t == "*fp64" else "*fp32", _cfg),
                {"num_warps": _cfg.num_warps, "maxnreg": _cfg.maxnreg},
            )
            for backward in (False, True)
        ]
