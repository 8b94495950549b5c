"""Triton kernels of the merge ops (launchers: :mod:`regops.merge.triton`): one pass over a chunk of the base and
of K deltas, read through a table of data pointers (K is a runtime value: one compiled kernel for every K).

``KEEP``: 0 all, 1 random (DARE), 2 magnitude (TIES' trim). ``COMBINE``: 0 weighted sum, 1 sign election by
total, 2 by frequency (then the disjoint mean). Float operations in the reference's order (no FMA contraction:
the launcher disables it), so the results are bit-identical to :mod:`regops.merge.reference`.
"""

import triton
import triton.language as tl
from regops.kernels.philox import counter_words, load_seed, random_words
from regops.kernels.utils import cast_rne


@triton.jit
def _words(key, offset, idx, ALIGNED: tl.constexpr, first_counter, BLOCK: tl.constexpr):
    """The stream's words of the global element indices ``idx``."""
    if ALIGNED:
        return random_words(key, offset + first_counter, BLOCK)
    else:
        r0, r1, r2, r3 = counter_words(key, offset + idx // 4)
        j = idx % 4
        return tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(v.dtype)


@triton.jit
def _delta(tab_ptr, k, local, inb, b, cd: tl.constexpr, DTYPE: tl.constexpr, FINETUNED: tl.constexpr):
    ptr = tl.load(tab_ptr + k).to(tl.pointer_type(DTYPE))
    d = tl.load(ptr + local, mask=inb, other=0.0).to(cd)
    if FINETUNED:
        d = d - b
    return d


@triton.jit
def _keep(
    d,
    k,
    gidx,
    seeds_ptr,
    thr_ptr,
    cut_ptr,
    first_counter,
    threshold,
    scale,
    cd: tl.constexpr,
    KEEP: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if KEEP == 1:
        key = tl.load(seeds_ptr + 2 * k)
        offset = tl.load(seeds_ptr + 2 * k + 1)
        words = _words(key, offset, gidx, ALIGNED, first_counter, BLOCK)
        kept = (words >> 1).to(tl.int32, bitcast=True) > threshold
        d = d * tl.where(kept, scale, 0.0).to(cd)
    elif KEEP == 2:
        t = tl.load(thr_ptr + k).to(cd)
        cut = tl.load(cut_ptr + k)
        a = tl.abs(d)
        kept = (a > t) | ((a == t) & (gidx < cut))
        d = d * tl.where(kept, 1.0, 0.0).to(cd)
    return d


@triton.jit(do_not_specialize=["n", "K", "first", "threshold"])
def merge_chunk_kernel(
    base_ptr,
    tab_ptr,
    w_ptr,
    seeds_ptr,
    thr_ptr,
    cut_ptr,
    scale_ptr,
    out_ptr,
    n,
    K,
    first,
    threshold,
    KEEP: tl.constexpr,
    COMBINE: tl.constexpr,
    FINETUNED: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DTYPE: tl.constexpr = base_ptr.dtype.element_ty
    cd: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    start = tl.program_id(0).to(tl.int64) * BLOCK
    local = start + tl.arange(0, BLOCK)
    inb = local < n
    gidx = first + local
    first_counter = (first + start) // 4
    b = tl.load(base_ptr + local, mask=inb, other=0.0).to(cd)
    scale = tl.load(scale_ptr).to(cd)
    acc = tl.zeros([BLOCK], dtype=cd)
    if COMBINE == 0:
        for k in range(K):
            d = _delta(tab_ptr, k, local, inb, b, cd, DTYPE, FINETUNED)
            s = _keep(
                d, k, gidx, seeds_ptr, thr_ptr, cut_ptr, first_counter, threshold, scale, cd, KEEP, ALIGNED, BLOCK
            )
            acc = acc + s * tl.load(w_ptr + k).to(cd)
    else:
        e = tl.zeros([BLOCK], dtype=cd)
        for k in range(K):
            d = _delta(tab_ptr, k, local, inb, b, cd, DTYPE, FINETUNED)
            s = _keep(
                d, k, gidx, seeds_ptr, thr_ptr, cut_ptr, first_counter, threshold, scale, cd, KEEP, ALIGNED, BLOCK
            )
            if COMBINE == 1:
                e = e + s
            else:
                e = e + _sign(s)
        elected = tl.where(e >= 0, 1.0, -1.0).to(cd)
        count = tl.zeros([BLOCK], dtype=cd)
        for k in range(K):
            d = _delta(tab_ptr, k, local, inb, b, cd, DTYPE, FINETUNED)
            s = _keep(
                d, k, gidx, seeds_ptr, thr_ptr, cut_ptr, first_counter, threshold, scale, cd, KEEP, ALIGNED, BLOCK
            )
            agree = _sign(s) == elected
            acc = acc + tl.where(agree, s * tl.load(w_ptr + k).to(cd), 0.0)
            count = count + tl.where(agree, 1.0, 0.0).to(cd)
        acc = acc / tl.maximum(count, 1.0)
    tl.store(out_ptr + local, cast_rne(b + acc, DTYPE), mask=inb)


@triton.jit(do_not_specialize=["n", "first"])
def merge_uniform_kernel(seed_ptr, out_ptr, n, first, BLOCK: tl.constexpr):
    key, offset = load_seed(seed_ptr)
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    words = _words(key, offset, first + local, False, 0, BLOCK)
    tl.store(out_ptr + local, (words >> 1).to(tl.float64) * (1.0 / 2147483648.0), mask=local < n)


def _specs():
    specs = []
    common = {
        "tab_ptr": "*i64",
        "w_ptr": "*fp64",
        "seeds_ptr": "*i64",
        "thr_ptr": "*fp64",
        "cut_ptr": "*i64",
        "scale_ptr": "*fp64",
        "n": "i64",
        "K": "i32",
        "first": "i64",
        "threshold": "i32",
    }
    for t in ("*fp32", "*bf16", "*fp16"):
        for keep, combine in ((1, 0), (2, 1), (0, 2)):
            specs.append(
                (
                    merge_chunk_kernel,
                    {"base_ptr": t, **common, "out_ptr": t},
                    {"KEEP": keep, "COMBINE": combine, "FINETUNED": True, "ALIGNED": True, "BLOCK": 1024},
                )
            )
    specs.append(
        (merge_uniform_kernel, {"seed_ptr": "*i64", "out_ptr": "*fp64", "n": "i64", "first": "i64"}, {"BLOCK": 1024})
    )
    return specs


COMPILE_SPECS = _specs()
