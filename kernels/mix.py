"""Triton kernel of the mixing op (MixUp/CutMix): one launch for every mode and for its transpose.

The math is :mod:`regops.mix.reference`'s, operation by operation; the launchers in :mod:`regops.mix.triton` launch
it with FMA contraction off, so float32 results agree with the reference to the last bit under the interpreter and
on a GPU.
"""

import triton
import triton.language as tl
from regops.kernels.utils import cast_rne


# ----------------------------------------------------------------------------------------------- mixing
@triton.jit
def _in_box(box_ptr, s, h, w):
    y0 = tl.load(box_ptr + s * 4)
    y1 = tl.load(box_ptr + s * 4 + 1)
    x0 = tl.load(box_ptr + s * 4 + 2)
    x1 = tl.load(box_ptr + s * 4 + 3)
    return (h >= y0) & (h < y1) & (w >= x0) & (w < x1)


@triton.jit
def _round_half_even(y):
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit(do_not_specialize=["per_sample", "inner", "height", "width", "n_blocks"])
def mix_kernel(
    x_ptr,
    y_ptr,
    w_self_ptr,
    w_other_ptr,
    index_ptr,
    box_ptr,
    per_sample,
    inner,
    height,
    width,
    n_blocks,
    CHANNELS_LAST: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y[b] = (outside box[b]) x[b] w_self[b] + x[o] (1 inside box[c], else w_other[c]; 0 terms skipped).

    Forward: o = partner[b], c = b. Transposed (the backward): o = inverse_partner[b], c = o.
    The grid is one-dimensional, ``batch * n_blocks`` programs (CUDA's y and z axes stop at 65535).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_blocks
    offs = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < per_sample
    o = tl.load(index_ptr + b).to(tl.int64)
    if TRANSPOSE:
        c = o
    else:
        c = b
    w_self = tl.load(w_self_ptr + b)
    w_other = tl.load(w_other_ptr + c)
    if CHANNELS_LAST:
        pix = offs // inner
    else:
        pix = offs % (height * width)
    h = pix // width
    w = pix % width
    in_self = _in_box(box_ptr, b, h, w)
    in_other = _in_box(box_ptr, c, h, w)
    x = tl.load(x_ptr + b * per_sample + offs, mask=valid, other=0)
    other_weighted = (tl.zeros([BLOCK], tl.float32) + w_other) != 0.0  # a block, so `|` broadcasts
    need_other = in_other | other_weighted
    xp = tl.load(x_ptr + o * per_sample + offs, mask=valid & need_other, other=0)
    if x.dtype == tl.float64:
        x = x.to(tl.float64)
        xp = xp.to(tl.float64)
        w_self = w_self.to(tl.float64)
        w_other = w_other.to(tl.float64)
    else:
        x = x.to(tl.float32)
        xp = xp.to(tl.float32)
    own = tl.where(in_self, 0.0, x * w_self)
    other = tl.where(in_other, xp, tl.where(other_weighted, xp * w_other, 0.0))
    y = own + other
    if y_ptr.dtype.element_ty == tl.uint8:
        y = tl.minimum(tl.maximum(_round_half_even(y), 0.0), 255.0)
        tl.store(y_ptr + b * per_sample + offs, y.to(tl.uint8), mask=valid)
    else:
        tl.store(y_ptr + b * per_sample + offs, cast_rne(y, y_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------- compile specs
_FLOAT = ("*fp32", "*fp16", "*bf16", "*fp64")
_MIX_SIG = {
    "w_self_ptr": "*fp32",
    "w_other_ptr": "*fp32",
    "index_ptr": "*i64",
    "box_ptr": "*i64",
    "per_sample": "i64",
    "inner": "i64",
    "height": "i64",
    "width": "i64",
    "n_blocks": "i64",
}
COMPILE_SPECS = [
    (mix_kernel, {"x_ptr": t, "y_ptr": t, **_MIX_SIG}, {"CHANNELS_LAST": cl, "TRANSPOSE": tr, "BLOCK": 2048})
    for t in (*_FLOAT, "*u8")
    for cl in (False, True)
    for tr in (False, True)
    if not tr or t in ("*fp32", "*bf16")
]
