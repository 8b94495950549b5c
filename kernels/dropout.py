"""Triton kernels of the dropout ops (launchers: :mod:`regops.dropout.triton`): one pass over a flat tensor; the
same kernel applied to the gradient is the backward."""

import triton
import triton.language as tl
from regops.kernels.philox import keep_mask, load_seed
from regops.kernels.utils import cast_rne


@triton.jit(do_not_specialize=["n", "threshold"])
def dropout_kernel(x_ptr, y_ptr, n, threshold, scale, seed_ptr, BLOCK: tl.constexpr):
    seed, offset = load_seed(seed_ptr)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n
    keep = keep_mask(seed, offset + start // 4, threshold, BLOCK)
    x = tl.load(x_ptr + idx, mask=in_bounds)
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    y = x * tl.where(keep, scale, 0.0)  # multiply, as torch: NaN/Inf at a dropped position -> NaN
    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit(do_not_specialize=["n", "threshold"])
def dropout_bitmask_kernel(x_ptr, y_ptr, bits_ptr, n, threshold, scale, seed_ptr, BLOCK: tl.constexpr):
    seed, offset = load_seed(seed_ptr)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n
    keep = keep_mask(seed, offset + start // 4, threshold, BLOCK)
    x = tl.load(x_ptr + idx, mask=in_bounds)
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    y = x * tl.where(keep, scale, 0.0)  # multiply, as torch: NaN/Inf at a dropped position -> NaN
    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)
    # Bit j of byte k is element 8k + j; bits past n are zero.
    bits = tl.reshape((keep & in_bounds).to(tl.int32), [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
    byte_idx = start // 8 + tl.arange(0, BLOCK // 8)
    # n + 7 in int64: n is an int32 argument below 2**31 and n + 7 could wrap.
    tl.store(bits_ptr + byte_idx, tl.sum(bits, axis=1).to(tl.uint8), mask=byte_idx < (n.to(tl.int64) + 7) // 8)


@triton.jit(do_not_specialize=["n"])
def apply_bitmask_kernel(g_ptr, bits_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n
    byte_idx = start // 8 + tl.arange(0, BLOCK // 8)
    packed = tl.load(bits_ptr + byte_idx, mask=byte_idx < (n.to(tl.int64) + 7) // 8, other=0).to(tl.int32)
    keep = tl.reshape((packed[:, None] >> tl.arange(0, 8)[None, :]) & 1, [BLOCK]) != 0
    g = tl.load(g_ptr + idx, mask=in_bounds)
    if g.dtype != tl.float64:
        g = g.to(tl.float32)
    out = g * tl.where(keep, scale, 0.0)
    tl.store(out_ptr + idx, cast_rne(out, out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit(do_not_specialize=["n", "num_samples", "step", "threshold"])
def multi_sample_mean_kernel(x_ptr, y_ptr, n, num_samples, step, threshold, factor, seed_ptr, BLOCK: tl.constexpr):
    seed, offset = load_seed(seed_ptr)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n
    count = tl.zeros([BLOCK], dtype=tl.int32)
    # Sample k starts at counter offset + k * step: advanced in int64 (k * step in int32 would wrap).
    counter = offset + start // 4
    for _ in range(num_samples):
        count += keep_mask(seed, counter, threshold, BLOCK).to(tl.int32)
        counter += step.to(tl.int64)
    x = tl.load(x_ptr + idx, mask=in_bounds)
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    y = x * (count.to(x.dtype) * factor)
    z = x * 0.0  # NaN where x is NaN/Inf: torch's mean of K products is NaN there if any sample dropped
    y = tl.where((count < num_samples) & (z != z), z, y)
    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit(do_not_specialize=["n", "inner"])
def scale_rows_add_kernel(x_ptr, scales_ptr, res_ptr, y_ptr, n, inner, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < n
    x = tl.load(x_ptr + idx, mask=in_bounds)
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    s = tl.load(scales_ptr + idx // inner, mask=in_bounds, other=0.0).to(x.dtype)
    y = x * s
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + idx, mask=in_bounds).to(x.dtype)
    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)


_DTYPES = ("*fp32", "*fp16", "*bf16", "*fp64")
COMPILE_SPECS = [
    (
        dropout_kernel,
        {"x_ptr": t, "y_ptr": t, "n": "i64", "threshold": "i32", "scale": "fp32", "seed_ptr": "*i64"},
        {"BLOCK": 2048},
    )
    for t in _DTYPES
]
COMPILE_SPECS += [
    (
        dropout_bitmask_kernel,
        {
            "x_ptr": t,
            "y_ptr": t,
            "bits_ptr": "*u8",
            "n": "i64",
            "threshold": "i32",
            "scale": "fp32",
            "seed_ptr": "*i64",
        },
        {"BLOCK": 2048},
    )
    for t in _DTYPES
]
COMPILE_SPECS += [
    (apply_bitmask_kernel, {"g_ptr": t, "bits_ptr": "*u8", "out_ptr": t, "n": "i64", "scale": "fp32"}, {"BLOCK": 2048})
    for t in _DTYPES
]
COMPILE_SPECS += [
    (
        multi_sample_mean_kernel,
        {
            "x_ptr": t,
            "y_ptr": t,
            "n": "i64",
            "num_samples": "i32",
            "step": "i64",
            "threshold": "i32",
            "factor": "fp32",
            "seed_ptr": "*i64",
        },
        {"BLOCK": 2048},
    )
    for t in _DTYPES
]
COMPILE_SPECS += [
    (
        scale_rows_add_kernel,
        {
            "x_ptr": t,
            "scales_ptr": "*fp64" if t == "*fp64" else "*fp32",
            "res_ptr": t,
            "y_ptr": t,
            "n": "i64",
            "inner": "i64",
        },
        {"HAS_RESIDUAL": True, "BLOCK": 2048},
    )
    for t in _DTYPES
]
