"""Triton kernels of the hessian family: Philox probes for all parameters in one launch, and the fused
accumulation of ``v . Hv`` (per parameter and probe) and ``v * Hv`` (diagonal) in one launch.

Both work on the parameters flattened and concatenated into ``[K, N]`` (``K`` probes, ``N`` numbers): one
launch covers every parameter tensor. The probe stream is specified in :mod:`regops.hessian.reference`; the
kernels reproduce it bit for bit (the Gaussian transform uses only correctly rounded operations, and the
launch disables FMA contraction so a GPU rounds like the reference). Launchers: :mod:`regops.hessian.triton`.
"""

import triton
import triton.language as tl
from regops.kernels.philox import counter_words, load_seed
from regops.kernels.utils import cast_rne

from regops.hessian import reference as ref

LN2 = tl.constexpr(ref.LN2)
SQRT2 = tl.constexpr(ref.SQRT2)
TWO_PI = tl.constexpr(ref.TWO_PI)
TWO_POW_M24 = tl.constexpr(ref.TWO_POW_M24)
L0, L1, L2, L3, L4 = (tl.constexpr(c) for c in ref.LOG_COEFFS)
S0, S1, S2, S3, S4, S5, S6 = (tl.constexpr(c) for c in ref.SIN_COEFFS)


@triton.jit
def _log_unit(w):
    """ln(((w >> 8) + 1) 2^-24) for uint32 words, float32 (see regops.hessian.reference.log_unit)."""
    k = ((w >> 8) + 1).to(tl.int32)
    u = k.to(tl.float32) * TWO_POW_M24
    bits = u.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e).to(tl.float32)
    s = tl.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    p = s2 * L0 + L1
    p = p * s2 + L2
    p = p * s2 + L3
    p = p * s2 + L4
    p = p * s2 + 1.0
    return e * LN2 + (s + s) * p


@triton.jit
def _sin_poly(x):
    x2 = x * x
    p = x2 * S0 + S1
    p = p * x2 + S2
    p = p * x2 + S3
    p = p * x2 + S4
    p = p * x2 + S5
    p = p * x2 + S6
    p = p * x2 + 1.0
    return x * p


@triton.jit
def _box_muller(wa, wb):
    r = tl.sqrt_rn(_log_unit(wa) * -2.0)
    u = (wb >> 8).to(tl.int32).to(tl.float32) * TWO_POW_M24
    t = tl.where(u >= 0.5, u - 1.0, u)
    a = tl.abs(t)
    bc = 0.25 - a
    bs = tl.where(a <= 0.25, t, tl.where(t > 0, 0.5 - t, -0.5 - t))
    return r * _sin_poly(bc * TWO_PI), r * _sin_poly(bs * TWO_PI)


@triton.jit(do_not_specialize=["first_probe", "numel", "row_counters"])
def probes_kernel(out_ptr, first_probe, numel, seed_ptr, row_counters, GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, k) writes probe row first_probe + k, columns [b BLOCK, (b + 1) BLOCK) of rows of ``numel``
    (the padded row length)."""
    seed, offset = load_seed(seed_ptr)
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    cols = b * BLOCK + tl.arange(0, BLOCK)
    row_counter = offset + (first_probe + k) * row_counters
    if GAUSSIAN:
        counters = row_counter + b * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
        r0, r1, r2, r3 = counter_words(seed, counters)
        z0, z1 = _box_muller(r0, r1)
        z2, z3 = _box_muller(r2, r3)
        # element 4c + 2m + n takes z_{2m+n} of counter c
        values = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])
    else:
        counters = row_counter + b * (BLOCK // 128) + tl.arange(0, BLOCK // 128).to(tl.int64)
        r0, r1, r2, r3 = counter_words(seed, counters)
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK // 32])  # word 4c + w
        bits = (words[:, None] >> tl.arange(0, 32)[None, :].to(tl.uint32)) & 1  # element 32 (4c + w) + bit
        values = 1.0 - 2.0 * tl.reshape(bits, [BLOCK]).to(tl.float32)
    tl.store(out_ptr + k * numel + cols, cast_rne(values, out_ptr.dtype.element_ty), mask=cols < numel)


@triton.jit(do_not_specialize=["num_probes", "num_blocks"])
def probe_dot_kernel(
    v_ptrs,
    hv_ptrs,
    v_strides,
    hv_strides,
    block_tensor_ptr,
    block_start_ptr,
    block_end_ptr,
    block_col_ptr,
    partial_ptr,
    diag_ptr,
    diag_sq_ptr,
    num_probes,
    num_blocks,
    DTYPE: tl.constexpr,
    WITH_DIAG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Multi-tensor: program b owns columns [start_b, end_b) of tensor t_b, whose K probe rows are found through
    tables of base addresses and row strides (no packing copy). Per probe it stores the partial v . Hv of its
    block; over probes it writes the column sums of v * Hv and (v * Hv)^2 at the block's place in the
    concatenated [N] outputs."""
    b = tl.program_id(0)
    t = tl.load(block_tensor_ptr + b)
    start = tl.load(block_start_ptr + b)
    end = tl.load(block_end_ptr + b)
    col = tl.load(block_col_ptr + b)
    v_base = tl.load(v_ptrs + t).to(tl.pointer_type(DTYPE))
    hv_base = tl.load(hv_ptrs + t).to(tl.pointer_type(DTYPE))
    v_stride = tl.load(v_strides + t)
    hv_stride = tl.load(hv_strides + t)
    cols = start + tl.arange(0, BLOCK)
    mask = cols < end
    acc_ty = partial_ptr.dtype.element_ty
    diag = tl.zeros([BLOCK], dtype=acc_ty)
    diag_sq = tl.zeros([BLOCK], dtype=acc_ty)
    out_off = b.to(tl.int64)  # partial[k, b] at k * num_blocks + b, advanced in int64 (k * num_blocks can pass 2**31)
    for k in range(num_probes):
        v = tl.load(v_base + k * v_stride + cols, mask=mask, other=0.0).to(acc_ty)
        hv = tl.load(hv_base + k * hv_stride + cols, mask=mask, other=0.0).to(acc_ty)
        prod = v * hv
        if WITH_DIAG:
            diag += prod
            diag_sq += prod * prod
        tl.store(partial_ptr + out_off, tl.sum(prod, axis=0))
        out_off += num_blocks
    if WITH_DIAG:
        out = col + tl.arange(0, BLOCK)
        tl.store(diag_ptr + out, diag, mask=mask)
        tl.store(diag_sq_ptr + out, diag_sq, mask=mask)


@triton.jit(do_not_specialize=["num_probes", "num_blocks", "num_tensors"])
def segment_sum_kernel(
    partial_ptr, first_block_ptr, dots_ptr, num_probes, num_blocks, num_tensors, BLOCK: tl.constexpr
):
    """Program p: dots[k, p] = sum of partial[k, first_block[p] : first_block[p + 1]], in block order (the same
    sum on every run, unlike atomics)."""
    p = tl.program_id(0)
    lo = tl.load(first_block_ptr + p)
    hi = tl.load(first_block_ptr + p + 1)
    row_off = lo * 0  # int64 offsets of row k in partial and dots, advanced per probe
    out_off = p.to(tl.int64)
    for _ in range(num_probes):
        acc = tl.zeros([BLOCK], dtype=dots_ptr.dtype.element_ty)
        for b0 in range(lo, hi, BLOCK):
            b = b0 + tl.arange(0, BLOCK)
            acc += tl.load(partial_ptr + row_off + b, mask=b < hi, other=0.0)
        tl.store(dots_ptr + out_off, tl.sum(acc, axis=0))
        row_off += num_blocks
        out_off += num_tensors


_OUT = ("*fp32", "*fp64", "*bf16", "*fp16")
_PROBE_SIG = {"first_probe": "i64", "numel": "i64", "seed_ptr": "*i64", "row_counters": "i64"}
COMPILE_SPECS = [
    (probes_kernel, {"out_ptr": t, **_PROBE_SIG}, {"GAUSSIAN": g, "BLOCK": 1024}) for t in _OUT for g in (True, False)
]
_DOT_SIG = {
    "v_ptrs": "*i64",
    "hv_ptrs": "*i64",
    "v_strides": "*i64",
    "hv_strides": "*i64",
    "block_tensor_ptr": "*i64",
    "block_start_ptr": "*i64",
    "block_end_ptr": "*i64",
    "block_col_ptr": "*i64",
}
COMPILE_SPECS += [
    (
        probe_dot_kernel,
        {**_DOT_SIG, "partial_ptr": a, "diag_ptr": a, "diag_sq_ptr": a, "num_probes": "i32", "num_blocks": "i32"},
        {"DTYPE": d, "WITH_DIAG": w, "BLOCK": 1024},
    )
    for d, a in ((tl.float32, "*fp32"), (tl.bfloat16, "*fp32"), (tl.float16, "*fp32"), (tl.float64, "*fp64"))
    for w in (True, False)
]
COMPILE_SPECS += [
    (
        segment_sum_kernel,
        {
            "partial_ptr": a,
            "first_block_ptr": "*i64",
            "dots_ptr": a,
            "num_probes": "i32",
            "num_blocks": "i32",
            "num_tensors": "i32",
        },
        {"BLOCK": 256},
    )
    for a in ("*fp32", "*fp64")
]
