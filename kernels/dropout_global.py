"""Triton kernel for one shard of a dropout-family op: the mask is addressed by *global* word index.

See :mod:`regops.dropout.reference` (``global_mask_apply``) for the layout (``word = base + sum_d i_d * W_d``).
The launcher (:mod:`regops.dropout.triton`) merges dims that are contiguous in word space (a Shard(0) dropout
becomes one dim) and passes the rest as scalars, innermost first, so no index tensor is ever allocated.
"""

import triton
import triton.language as tl
from regops.kernels.philox import counter_words, load_seed
from regops.kernels.utils import cast_rne

MAX_DIMS = 6
_INTS = ["n", "cols", "base", "threshold", "num_samples", "step"]
_DIMS = [f"{k}{d}" for d in range(MAX_DIMS) for k in ("L", "W")]


@triton.jit
def _keep(seed, counter_base, w, threshold, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Keep-mask of BLOCK elements. ``w``: every element's word index (one Philox evaluation per element), or,
    ALIGNED, the word index of the first of each group of four elements, a multiple of 4 whose group holds words
    ``w .. w + 3`` (one evaluation per four elements, as the single-process kernel)."""
    r0, r1, r2, r3 = counter_words(seed, counter_base + w // 4)
    if ALIGNED:
        word = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
    else:
        j = w % 4
        word = tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))
    return (word >> 1).to(tl.int32, bitcast=True) > threshold


@triton.jit
def _word_index(idx, base, L0, W0, L1, W1, L2, W2, L3, W3, L4, W4, L5, W5, NDIM: tl.constexpr):
    """Global word index of local linear indices ``idx`` (innermost dim first), in int64."""
    rem = idx
    w = base.to(tl.int64) + (rem % L0) * W0
    rem = rem // L0
    if NDIM > 1:
        w += (rem % L1) * W1
        rem = rem // L1
    if NDIM > 2:
        w += (rem % L2) * W2
        rem = rem // L2
    if NDIM > 3:
        w += (rem % L3) * W3
        rem = rem // L3
    if NDIM > 4:
        w += (rem % L4) * W4
        rem = rem // L4
    if NDIM > 5:
        w += (rem % L5) * W5
    return w


@triton.jit(do_not_specialize=_INTS + _DIMS)
def global_mask_kernel(
    x_ptr,
    res_ptr,
    bias_ptr,
    y_ptr,
    n,
    cols,
    base,
    L0,
    W0,
    L1,
    W1,
    L2,
    W2,
    L3,
    W3,
    L4,
    W4,
    L5,
    W5,
    threshold,
    scale,
    seed_ptr,
    num_samples,
    step,
    NDIM: tl.constexpr,
    MODE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seed, offset = load_seed(seed_ptr)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n
    if ALIGNED:  # groups of four elements hold the four words of one counter
        first = start + 4 * tl.arange(0, BLOCK // 4).to(tl.int64)
        w = _word_index(first, base, L0, W0, L1, W1, L2, W2, L3, W3, L4, W4, L5, W5, NDIM)
    else:
        w = _word_index(idx, base, L0, W0, L1, W1, L2, W2, L3, W3, L4, W4, L5, W5, NDIM)
    x = tl.load(x_ptr + idx, mask=in_bounds)
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + idx % cols, mask=in_bounds).to(x.dtype)
    if MODE == 2:
        count = tl.zeros([BLOCK], dtype=tl.int32)
        for k in range(num_samples):
            count += _keep(seed, offset + k * step.to(tl.int64), w, threshold, ALIGNED, BLOCK).to(tl.int32)
        y = x * (count.to(x.dtype) * scale)
    else:
        keep = _keep(seed, offset, w, threshold, ALIGNED, BLOCK)
        if MODE == 0:
            y = tl.where(keep, x * scale, 0.0)
        else:
            y = x * tl.where(keep, scale, 0.0).to(x.dtype)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + idx, mask=in_bounds).to(x.dtype)
    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)


_DTYPES = ("*fp32", "*fp16", "*bf16", "*fp64")
COMPILE_SPECS = [
    (
        global_mask_kernel,
        {
            "x_ptr": t,
            "res_ptr": t,
            "bias_ptr": t,
            "y_ptr": t,
            **{k: "i64" for k in ("n", "cols", "base")},
            **{k: "i64" for k in _DIMS},
            "threshold": "i32",
            "scale": "fp32",
            "seed_ptr": "*i64",
            "num_samples": "i32",
            "step": "i64",
        },
        {"NDIM": ndim, "MODE": mode, "HAS_RESIDUAL": True, "HAS_BIAS": mode == 0, "ALIGNED": aligned, "BLOCK": 1024},
    )
    for t in _DTYPES
    for ndim, mode, aligned in ((1, 0, True), (2, 0, False), (3, 1, False), (6, 2, True))
]
