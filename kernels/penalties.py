"""Triton kernels of the penalties ops (launchers: :mod:`regops.penalties.triton`).

* ``relu_l1_fwd_kernel``: the activation and, in the same pass, per-row active counts and sums and per-program
  per-unit counts (summed by the launcher: deterministic integer counts).
* ``relu_l1_bwd_kernel``: ``(g + l1) * d act / dx``, one pass.
* ``power_iteration_kernel``: one step of the power iteration for a group of same-shape matrices read through a
  table of data pointers; program ``(g, s)`` owns a slice of rows of matrix ``g`` and writes its part of
  ``z = W^T u`` (the parts are summed at the start of the next step): one launch per step for the whole group.
* ``gram_penalty_kernel``: ``||G - I||_F^2`` from tiles of the Gram matrix (upper triangle, off-diagonal tiles
  counted twice), never storing ``G``.
"""

import triton
import triton.language as tl
from regops.kernels.utils import cast_rne


@triton.jit(do_not_specialize=["M", "d", "rows_per_program"])
def relu_l1_fwd_kernel(
    x_ptr,
    y_ptr,
    token_ptr,
    counts_ptr,
    sums_ptr,
    thr_ptr,
    M,
    d,
    rows_per_program,
    SQUARED: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cd: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    thr = tl.load(thr_ptr).to(cd)
    r_first = pid * rows_per_program
    r_end = tl.minimum(r_first + rows_per_program, M)
    for r0 in range(r_first, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < r_end
        active = tl.zeros([BLOCK_R], dtype=tl.int32)
        rsum = tl.zeros([BLOCK_R], dtype=cd)
        for c0 in range(0, d, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            m = rmask[:, None] & (cols < d)[None, :]
            x = tl.load(x_ptr + rows[:, None] * d + cols[None, :], mask=m, other=0.0).to(cd)
            if SQUARED:
                f = x * x
            else:
                f = x
            out = cast_rne(tl.where(x <= thr, 0.0, f), y_ptr.dtype.element_ty)
            tl.store(y_ptr + rows[:, None] * d + cols[None, :], out, mask=m)
            if STATS:
                on = ((x > thr) & m).to(tl.int32)
                active += tl.sum(on, axis=1)
                rsum += tl.sum(tl.where(m, out.to(cd), 0.0), axis=1)
                unit = counts_ptr + pid * d + cols
                tl.store(unit, tl.load(unit, mask=cols < d, other=0) + tl.sum(on, axis=0), mask=cols < d)
        if STATS:
            tl.store(token_ptr + rows, active.to(cd) / d, mask=rmask)
            tl.store(sums_ptr + rows, rsum, mask=rmask)


@triton.jit(do_not_specialize=["n"])
def relu_l1_bwd_kernel(g_ptr, x_ptr, dx_ptr, l1_ptr, thr_ptr, n, SQUARED: tl.constexpr, BLOCK: tl.constexpr):
    cd: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    x = tl.load(x_ptr + idx, mask=inb, other=0.0).to(cd)
    g = tl.load(g_ptr + idx, mask=inb, other=0.0).to(cd)
    on = tl.where(x > tl.load(thr_ptr).to(cd), 1.0, 0.0).to(cd)
    if SQUARED:
        deriv = (x + x) * on
    else:
        deriv = on
    tl.store(dx_ptr + idx, cast_rne((g + tl.load(l1_ptr).to(cd)) * deriv, dx_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["m", "n", "S_in", "S", "rows_per_split"])
def power_iteration_kernel(
    tab_ptr,
    vin_ptr,
    vhat_ptr,
    uraw_ptr,
    z_ptr,
    usq_ptr,
    m,
    n,
    S_in,
    S,
    rows_per_split,
    DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    w_ptr = tl.load(tab_ptr + g).to(tl.pointer_type(DTYPE))
    vhat = vhat_ptr + (g * S + s) * n  # this program's own copy of the normalized v
    zpart = z_ptr + (g * S + s) * n
    vsq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, n, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        v = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p in range(0, S_in):
            v += tl.load(vin_ptr + (g * S_in + p) * n + cols, mask=cols < n, other=0.0)
        vsq += v * v
        tl.store(vhat + cols, v, mask=cols < n)
        tl.store(zpart + cols, tl.zeros([BLOCK_C], dtype=tl.float32), mask=cols < n)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(vsq, axis=0)), 1e-12)
    tl.debug_barrier()
    usq = tl.zeros([BLOCK_R], dtype=tl.float32)
    r_first = s * rows_per_split
    r_end = tl.minimum(r_first + rows_per_split, m)
    for r0 in range(r_first, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < r_end
        u = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, n, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            w = tl.load(
                w_ptr + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & (cols < n)[None, :], other=0.0
            ).to(tl.float32)
            v = tl.load(vhat + cols, mask=cols < n, other=0.0) * inv
            u += tl.sum(w * v[None, :], axis=1)
        tl.store(uraw_ptr + g * m + rows, u, mask=rmask)
        usq += u * u
        for c0 in range(0, n, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            w = tl.load(
                w_ptr + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & (cols < n)[None, :], other=0.0
            ).to(tl.float32)
            zc = tl.load(zpart + cols, mask=cols < n, other=0.0)
            tl.store(zpart + cols, zc + tl.sum(w * u[:, None], axis=0), mask=cols < n)
    tl.store(usq_ptr + g * S + s, tl.sum(usq, axis=0))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE == 2:  # the interpreter's bf16 dot is wrong: float32 there (same values, exact products)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit(do_not_specialize=["k", "n", "stride_b", "stride_r", "stride_c", "tiles"])
def gram_penalty_kernel(
    w_ptr,
    out_ptr,
    k,
    n,
    stride_b,
    stride_r,
    stride_c,
    tiles,
    IEEE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    out = out_ptr + (b * tiles + i) * tiles + j
    if j < i:
        tl.store(out, 0.0)
    else:
        ri = i * BLOCK + tl.arange(0, BLOCK)
        rj = j * BLOCK + tl.arange(0, BLOCK)
        base = w_ptr + b * stride_b
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for c0 in range(0, n, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            a = tl.load(
                base + ri[:, None] * stride_r + cols[None, :] * stride_c,
                mask=(ri < k)[:, None] & (cols < n)[None, :],
                other=0.0,
            )
            c = tl.load(
                base + rj[:, None] * stride_r + cols[None, :] * stride_c,
                mask=(rj < k)[:, None] & (cols < n)[None, :],
                other=0.0,
            )
            acc += _dot(a, tl.trans(c), IEEE)
        eye = (ri[:, None] == rj[None, :]) & (ri < k)[:, None]
        acc = acc - tl.where(eye, 1.0, 0.0)
        sq = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
        tl.store(out, tl.where(j > i, 2.0, 1.0) * sq)


def _specs():
    specs = []
    for t in ("*fp32", "*bf16", "*fp16", "*fp64"):
        fwd = {
            "x_ptr": t,
            "y_ptr": t,
            "token_ptr": "*fp64" if t == "*fp64" else "*fp32",
            "counts_ptr": "*i32",
            "sums_ptr": "*fp64" if t == "*fp64" else "*fp32",
            "thr_ptr": "*fp64",
            "M": "i64",
            "d": "i64",
            "rows_per_program": "i64",
        }
        specs.append((relu_l1_fwd_kernel, fwd, {"SQUARED": True, "STATS": True, "BLOCK_R": 8, "BLOCK_C": 256}))
        bwd = {"g_ptr": t, "x_ptr": t, "dx_ptr": t, "l1_ptr": "*fp64", "thr_ptr": "*fp64", "n": "i64"}
        specs.append((relu_l1_bwd_kernel, bwd, {"SQUARED": False, "BLOCK": 1024}))
    pi = {
        "tab_ptr": "*i64",
        "vin_ptr": "*fp32",
        "vhat_ptr": "*fp32",
        "uraw_ptr": "*fp32",
        "z_ptr": "*fp32",
        "usq_ptr": "*fp32",
        "m": "i64",
        "n": "i64",
        "S_in": "i32",
        "S": "i32",
        "rows_per_split": "i64",
    }
    for dt in (tl.float32, tl.bfloat16):
        specs.append((power_iteration_kernel, pi, {"DTYPE": dt, "BLOCK_R": 16, "BLOCK_C": 128}))
    for t, ieee in (("*fp32", 1), ("*bf16", 0)):
        gp = {
            "w_ptr": t,
            "out_ptr": "*fp32",
            "k": "i64",
            "n": "i64",
            "stride_b": "i64",
            "stride_r": "i64",
            "stride_c": "i64",
            "tiles": "i64",
        }
        specs.append((gram_penalty_kernel, gp, {"IEEE": ieee, "BLOCK": 64, "BLOCK_C": 32}))
    return specs


COMPILE_SPECS = _specs()
