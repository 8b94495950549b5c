"""Triton kernels of LoRA dropout (launchers: :mod:`regops.masks.triton`): matmuls whose ``x`` operand tiles are
masked as they are loaded, the mask regenerated from (seed, element index) -- :func:`regops.dropout`'s bits.

``IEEE``: 0 the default dot (bf16/fp16), 1 an exact float32 dot, 2 a float32 dot of bf16 operands (the
interpreter's bf16 dot is wrong). Element ``(m, k)`` of ``x [M, K]`` has flat index ``i = m * K + k`` and takes
word ``i % 4`` of counter ``offset + i // 4``. When ``K % 4 == 0`` every tile row starts on a counter boundary
and one Philox evaluation feeds four elements (``ALIGNED``); otherwise each element evaluates its own counter and
picks its word.
"""

import triton
import triton.language as tl
from regops.kernels.philox import counter_words, load_seed
from regops.kernels.utils import cast_rne


@triton.jit
def tile_keep(
    seed, offset, rows, k0, K, threshold, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Keep-mask ``[BLOCK_M, BLOCK_K]`` of the elements ``(rows, k0 + arange(BLOCK_K))`` of ``x [M, K]``."""
    if ALIGNED:
        counters = offset + (rows * K + k0)[:, None] // 4 + tl.arange(0, BLOCK_K // 4)[None, :].to(tl.int64)
        r0, r1, r2, r3 = counter_words(seed, counters)
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, BLOCK_K])
    else:
        idx = rows[:, None] * K + (k0 + tl.arange(0, BLOCK_K).to(tl.int64))[None, :]
        r0, r1, r2, r3 = counter_words(seed, offset + idx // 4)
        j = idx % 4
        words = tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))
    return (words >> 1).to(tl.int32, bitcast=True) > threshold


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE == 2:  # the interpreter's bf16 dot is wrong: float32 there (same values, exact products)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _masked_x(
    x_ptr,
    seed,
    offset,
    rows,
    k0,
    M,
    K,
    threshold,
    scale,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The tile of ``dropout(x)`` (x's dtype, rounded as the dropout op rounds) at rows ``rows``, columns ``k0:``."""
    cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    inb = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inb, other=0.0)
    keep = tile_keep(seed, offset, rows, k0, K, threshold, ALIGNED, BLOCK_M, BLOCK_K)
    xc = x.to(tl.float64) if x.dtype == tl.float64 else x.to(tl.float32)
    return cast_rne(xc * tl.where(keep, scale, 0.0), x_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["M", "threshold"])
def lora_dropout_fwd_kernel(
    x_ptr,
    a_ptr,
    y_ptr,
    M,
    K,
    R,
    threshold,
    scale,
    seed_ptr,
    ALIGNED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``y[M, R] = dropout(x)[M, K] @ A[R, K]^T``."""
    seed, offset = load_seed(seed_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc_t = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=acc_t)
    for k0 in range(0, K, BLOCK_K):
        xm = _masked_x(x_ptr, seed, offset, rows, k0, M, K, threshold, scale, ALIGNED, BLOCK_M, BLOCK_K)
        cols = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr < R)[:, None] & (cols < K)[None, :], other=0.0)
        acc += _dot(xm, tl.trans(a), IEEE)
    out = y_ptr + rows[:, None] * R + rr[None, :]
    tl.store(out, cast_rne(acc, y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (rr < R)[None, :])


@triton.jit(do_not_specialize=["M", "threshold"])
def lora_dropout_dx_kernel(
    g_ptr,
    a_ptr,
    dx_ptr,
    M,
    K,
    R,
    threshold,
    scale,
    seed_ptr,
    ALIGNED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``dx[M, K] = dropout(g[M, R] @ A[R, K])``: the product rounded to x's dtype, then masked (as the unfused
    composition's backward)."""
    seed, offset = load_seed(seed_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    acc_t = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=acc_t)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        g = tl.load(g_ptr + rows[:, None] * R + rr[None, :], mask=(rows < M)[:, None] & (rr < R)[None, :], other=0.0)
        a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=(rr < R)[:, None] & (cols < K)[None, :], other=0.0)
        acc += _dot(g, a, IEEE)
    ga = cast_rne(acc, dx_ptr.dtype.element_ty).to(acc_t)
    keep = tile_keep(seed, offset, rows, k0, K, threshold, ALIGNED, BLOCK_M, BLOCK_K)
    out = dx_ptr + rows[:, None] * K + cols[None, :]
    tl.store(
        out,
        cast_rne(ga * tl.where(keep, scale, 0.0), dx_ptr.dtype.element_ty),
        mask=(rows < M)[:, None] & (cols < K)[None, :],
    )


@triton.jit(do_not_specialize=["M", "threshold", "blocks_per_split"])
def lora_dropout_da_kernel(
    g_ptr,
    x_ptr,
    part_ptr,
    M,
    K,
    R,
    threshold,
    scale,
    seed_ptr,
    blocks_per_split,
    ALIGNED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``part[s, R, K] = g[rows of split s]^T @ dropout(x)[rows of split s]`` (summed over s by the launcher)."""
    seed, offset = load_seed(seed_ptr)
    k0 = tl.program_id(0).to(tl.int64) * BLOCK_K
    rr = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2).to(tl.int64)
    acc_t = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc_t)
    first = split * blocks_per_split
    for b in range(0, blocks_per_split):
        rows = (first + b) * BLOCK_M + tl.arange(0, BLOCK_M)
        xm = _masked_x(x_ptr, seed, offset, rows, k0, M, K, threshold, scale, ALIGNED, BLOCK_M, BLOCK_K)
        g = tl.load(g_ptr + rows[:, None] * R + rr[None, :], mask=(rows < M)[:, None] & (rr < R)[None, :], other=0.0)
        acc += _dot(tl.trans(g), xm, IEEE)
    cols = k0 + tl.arange(0, BLOCK_K)
    out = part_ptr + split * R * K + rr[:, None] * K + cols[None, :]
    tl.store(out, acc, mask=(rr < R)[:, None] & (cols < K)[None, :])


def _specs():
    specs = []
    for t, ieee in (("*fp32", 1), ("*bf16", 0), ("*fp16", 0)):
        common = {"M": "i64", "K": "i64", "R": "i64", "threshold": "i32", "scale": "fp32", "seed_ptr": "*i64"}
        meta = {"ALIGNED": True, "IEEE": ieee, "BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 16}
        specs.append((lora_dropout_fwd_kernel, {"x_ptr": t, "a_ptr": t, "y_ptr": t, **common}, meta))
        specs.append((lora_dropout_dx_kernel, {"g_ptr": t, "a_ptr": t, "dx_ptr": t, **common}, meta))
        specs.append(
            (
                lora_dropout_da_kernel,
                {"g_ptr": t, "x_ptr": t, "part_ptr": "*fp32", **common, "blocks_per_split": "i64"},
                {**meta, "ALIGNED": False},
            )
        )
    return specs


COMPILE_SPECS = _specs()
