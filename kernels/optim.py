"""Triton kernels of the optim ops (launchers: :mod:`regops.optim.triton`): one launch covers every tensor of a
list. A program reads its chunk (tensor index, first element) from a chunk table and the tensor's addresses from a
table of pointers (one int64 row per tensor, columns ``C_*``), so the tensors are read and written in place, whatever
their number and sizes. The arithmetic repeats :mod:`regops.optim.reference` operation by operation (no FMA
contraction at launch; divisions and square roots correctly rounded), and the noise is the reference's Philox
stream bit for bit.
"""

import triton
import triton.language as tl
from regops.kernels.hessian import _box_muller
from regops.kernels.philox import counter_words, load_seed
from regops.kernels.utils import cast_rne

from regops.optim import reference as ref

# columns of the step's table: addresses (0 where a list is empty), then sizes and indices
STEP_COLUMNS = ("param", "grad", "s1", "s2", "s3", "ema", "anchor", "fisher", "restore", "numel", "param_id",
                "elem_offset", "row_base", "row_len")  # fmt: skip
C_PARAM, C_GRAD, C_S1, C_S2, C_S3, C_EMA, C_ANCHOR, C_FISHER, C_RESTORE, C_NUMEL, C_PARAM_ID, C_ELEM_OFFSET, \
    C_ROW_BASE, C_ROW_LEN = (tl.constexpr(i) for i in range(len(STEP_COLUMNS)))  # fmt: skip
STEP_COLS = tl.constexpr(len(STEP_COLUMNS))
# hyper-parameter and per-tensor scalar slots (see the reference)
H_BETA1, H_BETA2, H_EPS, H_WD = (tl.constexpr(v) for v in (ref.H_BETA1, ref.H_BETA2, ref.H_EPS, ref.H_WD))
H_GF_ALPHA, H_GF_LAMB, H_CLIP = (tl.constexpr(v) for v in (ref.H_GF_ALPHA, ref.H_GF_LAMB, ref.H_CLIP))
S_STEP_SIZE, S_BC2_SQRT, S_FIRST = (tl.constexpr(v) for v in (ref.S_STEP_SIZE, ref.S_BC2_SQRT, ref.S_FIRST))
S_SIGMA, S_DECAY, SCALARS = (tl.constexpr(v) for v in (ref.S_SIGMA, ref.S_DECAY, ref.SCALARS))
NOISE_PARAM_COUNTERS = tl.constexpr(ref.NOISE_PARAM_COUNTERS)
# method and decay codes (the order of ref.METHODS and ref.DECAYS)
ADAM, SGD, NESTEROV = (tl.constexpr(i) for i in range(3))
NONE, COUPLED, DECOUPLED, CAUTIOUS, L2SP, EWC = (tl.constexpr(i) for i in range(6))


@triton.jit
def _ptr(row, col, DTYPE: tl.constexpr):
    return tl.load(row + col).to(tl.pointer_type(DTYPE))


@triton.jit
def _div(a, b):
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a):
    if a.dtype == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _chunk(chunks_ptr, BLOCK: tl.constexpr):
    """(tensor index, int64 element offsets of this program's chunk)."""
    c = tl.program_id(0).to(tl.int64)
    i = tl.load(chunks_ptr + 2 * c)
    start = tl.load(chunks_ptr + 2 * c + 1)
    return i, start + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _scalar(ptr, k, CD: tl.constexpr):
    """A float64 value rounded to the compute dtype (as torch rounds a Python scalar for a tensor op)."""
    return tl.load(ptr + k).to(CD)


@triton.jit
def _noise(row, offs, seed_ptr):
    """Standard normals of the parameter's elements (the reference's gaussian_noise)."""
    key, offset = load_seed(seed_ptr)
    e = tl.load(row + C_ELEM_OFFSET) + offs
    counters = offset + tl.load(row + C_PARAM_ID) * NOISE_PARAM_COUNTERS + e // 4
    r0, r1, r2, r3 = counter_words(key, counters)
    j = e % 4
    zc, zs = _box_muller(tl.where(j < 2, r0, r2), tl.where(j < 2, r1, r3))
    return tl.where(j % 2 == 0, zc, zs)


@triton.jit
def _cautious(u, w):
    return (u == 0) | (w == 0) | ((u > 0) == (w > 0))


@triton.jit
def optim_step_kernel(
    table_ptr, chunks_ptr, scalars_ptr, hyper_ptr, row_scales_ptr, seed_ptr, grad_scale_ptr, found_inf_ptr,
    P: tl.constexpr, G: tl.constexpr, CD: tl.constexpr, METHOD: tl.constexpr, DECAY: tl.constexpr,
    HAS_S1: tl.constexpr, AMSGRAD: tl.constexpr, HAS_EMA: tl.constexpr, HAS_RESTORE: tl.constexpr,
    HAS_ROWS: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i, offs = _chunk(chunks_ptr, BLOCK)
    row = table_ptr + i * STEP_COLS
    numel = tl.load(row + C_NUMEL)
    inside = offs < numel
    update = inside
    if HAS_INF:  # a skipped step updates no element
        update = offs < tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    sc = scalars_ptr + i * SCALARS
    if HAS_RESTORE:
        w0 = tl.load(_ptr(row, C_RESTORE, P) + offs, mask=inside, other=0).to(CD)
    else:
        w0 = tl.load(_ptr(row, C_PARAM, P) + offs, mask=inside, other=0).to(CD)
    g = tl.load(_ptr(row, C_GRAD, G) + offs, mask=inside, other=0).to(CD)
    if HAS_SCALE:
        g = _div(g, tl.load(grad_scale_ptr).to(CD))
    if MAXIMIZE:
        g = -g
    if HAS_ROWS:
        rows = tl.load(row + C_ROW_BASE) + offs // tl.maximum(tl.load(row + C_ROW_LEN), 1)
        g = g * tl.load(row_scales_ptr + rows, mask=inside, other=0).to(CD)
    if CLIP:
        c = _scalar(hyper_ptr, H_CLIP, CD)
        g = tl.where(g < -c, -c, tl.where(g > c, c, g))  # NaN stays NaN
    if HAS_EMA:
        alpha = tl.load(hyper_ptr + H_GF_ALPHA)
        ema_ptr = _ptr(row, C_EMA, P) + offs
        prev = tl.load(ema_ptr, mask=inside, other=0).to(CD)
        prev = tl.where(tl.load(sc + S_FIRST) != 0, g, prev)
        e = prev * alpha.to(CD) + g * (1.0 - alpha).to(CD)
        tl.store(ema_ptr, cast_rne(e, P), mask=update)
        g = g + e * _scalar(hyper_ptr, H_GF_LAMB, CD)
    if NOISE:
        z = _noise(row, offs, seed_ptr)
        g = g + (z * tl.load(sc + S_SIGMA).to(tl.float32)).to(CD)
    wd = _scalar(hyper_ptr, H_WD, CD)
    if DECAY == COUPLED:
        g = g + w0 * wd
    if DECAY == L2SP:
        g = g + (w0 - tl.load(_ptr(row, C_ANCHOR, P) + offs, mask=inside, other=0).to(CD)) * wd
    if DECAY == EWC:
        d = w0 - tl.load(_ptr(row, C_ANCHOR, P) + offs, mask=inside, other=0).to(CD)
        g = g + (tl.load(_ptr(row, C_FISHER, P) + offs, mask=inside, other=0).to(CD) * d) * wd
    first = tl.load(sc + S_FIRST) != 0
    if METHOD == ADAM:
        b1 = tl.load(hyper_ptr + H_BETA1)
        b2 = tl.load(hyper_ptr + H_BETA2)
        weight = 1.0 - b1
        m_ptr = _ptr(row, C_S1, P) + offs
        v_ptr = _ptr(row, C_S2, P) + offs
        m = tl.load(m_ptr, mask=inside, other=0).to(CD)
        # torch.lerp's two formulas (regops.optim.reference.lerp), chosen by the weight
        m = tl.where(tl.abs(weight) < 0.5, m + (g - m) * weight.to(CD), g - (g - m) * (1.0 - weight).to(CD))
        v = tl.load(v_ptr, mask=inside, other=0).to(CD) * b2.to(CD) + ((1.0 - b2).to(CD) * g) * g
        tl.store(m_ptr, cast_rne(m, P), mask=update)
        tl.store(v_ptr, cast_rne(v, P), mask=update)
        if AMSGRAD:
            vmax_ptr = _ptr(row, C_S3, P) + offs
            vmax = tl.load(vmax_ptr, mask=inside, other=0).to(CD)
            v = tl.where((vmax != vmax) | (vmax > v), vmax, v)  # torch.maximum: NaN wins
            tl.store(vmax_ptr, cast_rne(v, P), mask=update)
        denom = _div(_sqrt(v), _scalar(sc, S_BC2_SQRT, CD)) + _scalar(hyper_ptr, H_EPS, CD)
        u = m
    else:
        if HAS_S1:
            buf_ptr = _ptr(row, C_S1, P) + offs
            mom = tl.load(hyper_ptr + H_BETA1)
            damp = tl.load(hyper_ptr + H_BETA2)
            buf = tl.load(buf_ptr, mask=inside, other=0).to(CD) * mom.to(CD) + g * (1.0 - damp).to(CD)
            buf = tl.where(first, g, buf)
            tl.store(buf_ptr, cast_rne(buf, P), mask=update)
            if METHOD == NESTEROV:
                g = g + buf * mom.to(CD)
            else:
                g = buf
        u = g
    w = w0
    if DECAY == DECOUPLED:
        w = w * _scalar(sc, S_DECAY, CD)
    if DECAY == CAUTIOUS:
        w = tl.where(_cautious(u, w), w * _scalar(sc, S_DECAY, CD), w)
    if METHOD == ADAM:
        w = w + _div(u * (-tl.load(sc + S_STEP_SIZE)).to(CD), denom)
    else:
        w = w + u * (-tl.load(sc + S_STEP_SIZE)).to(CD)
    p_ptr = _ptr(row, C_PARAM, P) + offs
    if HAS_RESTORE:
        tl.store(p_ptr, cast_rne(tl.where(update, w, w0), P), mask=inside)
    else:
        tl.store(p_ptr, cast_rne(w, P), mask=update)


@triton.jit
def sam_perturb_kernel(
    table_ptr, chunks_ptr, scales_ptr, found_inf_ptr,
    P: tl.constexpr, G: tl.constexpr, CD: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_OLD_GRAD: tl.constexpr,
    HAS_INF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Table columns: param, grad, old param, old grad, numel."""
    i, offs = _chunk(chunks_ptr, BLOCK)
    row = table_ptr + i * 5
    numel = tl.load(row + 4)
    inside = offs < numel
    p_ptr = _ptr(row, 0, P) + offs
    w_raw = tl.load(p_ptr, mask=inside, other=0)
    g_raw = tl.load(_ptr(row, 1, G) + offs, mask=inside, other=0)
    tl.store(_ptr(row, 2, P) + offs, w_raw, mask=inside)
    if HAS_OLD_GRAD:
        tl.store(_ptr(row, 3, G) + offs, g_raw, mask=inside)
    w = w_raw.to(CD)
    s = tl.load(scales_ptr + i).to(CD)
    if ADAPTIVE:
        e = (w * w) * g_raw.to(CD) * s
    else:
        e = g_raw.to(CD) * s
    move = inside
    if HAS_INF:
        move = offs < tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    tl.store(p_ptr, cast_rne(w + e, P), mask=move)


@triton.jit
def axpby_kernel(table_ptr, chunks_ptr, coeffs_ptr, Y: tl.constexpr, X: tl.constexpr, CD: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    """Table columns: y, x, numel. ``y = c0 y + c1 x``; a zero coefficient does not read its operand."""
    i, offs = _chunk(chunks_ptr, BLOCK)
    row = table_ptr + i * 3
    inside = offs < tl.load(row + 2)
    y_ptr = _ptr(row, 0, Y) + offs
    c0 = tl.load(coeffs_ptr).to(CD)
    c1 = tl.load(coeffs_ptr + 1).to(CD)
    y = tl.load(y_ptr, mask=inside, other=0).to(CD)
    x = tl.load(_ptr(row, 1, X) + offs, mask=inside, other=0).to(CD)
    y = tl.where(c0 != 0, y * c0, 0.0) + tl.where(c1 != 0, x * c1, 0.0)
    tl.store(y_ptr, cast_rne(y, Y), mask=inside)


@triton.jit
def dots_partial_kernel(
    table_ptr, chunks_ptr, partial_ptr, A: tl.constexpr, B: tl.constexpr, W: tl.constexpr, CD: tl.constexpr,
    HAS_B: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Chunk rows (tensor, first, end, output slot); table columns: a, b, w. Writes the chunk's three sums."""
    c = tl.program_id(0).to(tl.int64)
    i = tl.load(chunks_ptr + 4 * c)
    offs = tl.load(chunks_ptr + 4 * c + 1) + tl.arange(0, BLOCK).to(tl.int64)
    inside = offs < tl.load(chunks_ptr + 4 * c + 2)
    slot = tl.load(chunks_ptr + 4 * c + 3)
    row = table_ptr + i * 3
    x = tl.load(_ptr(row, 0, A) + offs, mask=inside, other=0).to(CD)
    xw = x
    if HAS_W:
        xw = tl.abs(tl.load(_ptr(row, 2, W) + offs, mask=inside, other=0).to(CD)) * x
    tl.store(partial_ptr + 3 * slot, tl.sum(xw * xw, axis=0))
    if HAS_B:
        y = tl.load(_ptr(row, 1, B) + offs, mask=inside, other=0).to(CD)
        tl.store(partial_ptr + 3 * slot + 1, tl.sum(x * y, axis=0))
        tl.store(partial_ptr + 3 * slot + 2, tl.sum(y * y, axis=0))
    else:
        tl.store(partial_ptr + 3 * slot + 1, tl.sum(x * 0, axis=0))
        tl.store(partial_ptr + 3 * slot + 2, tl.sum(x * 0, axis=0))


@triton.jit
def segment_sums_kernel(partial_ptr, first_ptr, out_ptr, BLOCK: tl.constexpr):
    """Program s: out[s, k] = sum of partial[first[s] : first[s + 1], k], chunk by chunk in order (the same sum on
    every run, unlike atomics)."""
    s = tl.program_id(0).to(tl.int64)
    lo = tl.load(first_ptr + s)
    hi = tl.load(first_ptr + s + 1)
    acc = tl.zeros([BLOCK, 4], dtype=out_ptr.dtype.element_ty)
    k = tl.arange(0, 4)[None, :]
    for c0 in range(lo, hi, BLOCK):
        c = c0 + tl.arange(0, BLOCK).to(tl.int64)[:, None]
        acc += tl.load(partial_ptr + 3 * c + k, mask=(c < hi) & (k < 3), other=0.0)
    kk = tl.arange(0, 4)
    tl.store(out_ptr + 3 * s + kk, tl.sum(acc, axis=0), mask=kk < 3)


_FLOATS = ("fp32", "fp64", "bf16", "fp16")
_TL = {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.bfloat16, "fp16": tl.float16}


def _cd(t):
    return tl.float64 if t == "fp64" else tl.float32


_STEP_SIG = {
    "table_ptr": "*i64", "chunks_ptr": "*i64", "scalars_ptr": "*fp64", "hyper_ptr": "*fp64", "row_scales_ptr": None,
    "seed_ptr": "*i64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
}  # fmt: skip
_ALL_ON = {"HAS_EMA": True, "HAS_RESTORE": True, "HAS_ROWS": True, "CLIP": True, "NOISE": True, "HAS_SCALE": True}
_ALL_ON |= {"HAS_INF": True, "MAXIMIZE": False, "BLOCK": 1024}

COMPILE_SPECS = [
    (
        optim_step_kernel,
        {**_STEP_SIG, "row_scales_ptr": "*fp64" if t == "fp64" else "*fp32"},
        {
            "P": _TL[t],
            "G": _TL[t],
            "CD": _cd(t),
            "METHOD": method,
            "DECAY": decay,
            "HAS_S1": True,
            "AMSGRAD": method == 0,
            **_ALL_ON,
        },
    )
    for t in _FLOATS
    for method, decay in ((0, 3), (0, 5), (2, 4), (1, 1))
]
COMPILE_SPECS += [
    (
        sam_perturb_kernel,
        {
            "table_ptr": "*i64",
            "chunks_ptr": "*i64",
            "scales_ptr": f"*{'fp64' if t == 'fp64' else 'fp32'}",
            "found_inf_ptr": "*fp32",
        },
        {
            "P": _TL[t],
            "G": _TL[t],
            "CD": _cd(t),
            "ADAPTIVE": adaptive,
            "HAS_OLD_GRAD": True,
            "HAS_INF": True,
            "BLOCK": 1024,
        },
    )
    for t in _FLOATS
    for adaptive in (False, True)
]
COMPILE_SPECS += [
    (
        axpby_kernel,
        {"table_ptr": "*i64", "chunks_ptr": "*i64", "coeffs_ptr": f"*{'fp64' if t == 'fp64' else 'fp32'}"},
        {"Y": _TL[t], "X": _TL[t], "CD": _cd(t), "BLOCK": 1024},
    )
    for t in _FLOATS
]
COMPILE_SPECS += [
    (
        dots_partial_kernel,
        {"table_ptr": "*i64", "chunks_ptr": "*i64", "partial_ptr": f"*{'fp64' if t == 'fp64' else 'fp32'}"},
        {"A": _TL[t], "B": _TL[t], "W": _TL[t], "CD": _cd(t), "HAS_B": True, "HAS_W": True, "BLOCK": 1024},
    )
    for t in _FLOATS
]
COMPILE_SPECS += [
    (segment_sums_kernel, {"partial_ptr": p, "first_ptr": "*i64", "out_ptr": p}, {"BLOCK": 256})
    for p in ("*fp32", "*fp64")
]
