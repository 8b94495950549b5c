"""Triton kernels of the regularized cross-entropy: one program per row streaming the vocabulary.

The math is :mod:`regops.losses.reference`'s; the launchers are in :mod:`regops.losses.triton`. Forward: one pass
over the row with an online (lane-wise) maximum keeps ``sum e^{z-m}``, ``sum e^{z-m} (z-m)`` (entropy, ``E_p z``),
the row sums the smoothing term needs, the argmax and, for the statistics, the sums without the label column
(EL2N) and the runner-up (margin); the lanes are merged once at the end. Backward: one pass writing
``d loss / d logits`` from the saved row numbers (``lse``, ``E_p z``, the decoupled coefficients, the argmax),
computed in float32 (float64 for float64 logits) and rounded once. Grids are ``(rows,)``: within CUDA's limits for
any row count (2**31 - 1), and there are no atomics, so results do not depend on scheduling. The option values
travel in a small tensor of the compute dtype (``opt_ptr``: the ops' ``options`` in order; float64 options for
float64 logits; no recompilation when a value changes).
"""

import triton
import triton.language as tl
from regops.kernels.utils import cast_rne


@triton.jit
def _tanh(u):
    """tanh without libdevice (the interpreter has none): a series near 0, (1 - e^{-2|u|}) / (1 + e^{-2|u|}) else."""
    a = tl.abs(u)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    u2 = u * u
    small = a * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
    r = tl.where(a < 0.125, small, big)
    return tl.where(u < 0, -r, r)


@triton.jit
def _transform(x, scale, softcap, SOFTCAP: tl.constexpr):
    z = x * scale
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit(do_not_specialize=["n_cols", "n_targets"])
def ce_fwd_kernel(
    x_ptr,
    idx_ptr,
    tw_ptr,
    rw_ptr,
    cw_ptr,
    opt_ptr,
    loss_ptr,
    stats_ptr,
    amax_ptr,
    n_cols,
    n_targets,
    HAS_CW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    STATS: tl.constexpr,
    DECOUPLED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    compute = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    smoothing = tl.load(opt_ptr + 0).to(compute)
    maxsup = tl.load(opt_ptr + 1).to(compute)
    z_loss = tl.load(opt_ptr + 2).to(compute)
    confidence = tl.load(opt_ptr + 3).to(compute)
    decoupled = tl.load(opt_ptr + 4).to(compute)
    softcap = tl.load(opt_ptr + 5).to(compute)
    scale = tl.load(opt_ptr + 6).to(compute)
    x_row = x_ptr + row * n_cols
    t_row = row * n_targets
    y = tl.load(idx_ptr + t_row)
    ib = tl.load(idx_ptr + t_row + (n_targets - 1))  # the partner label of a mixed pair (n_targets == 2)
    lanes = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    m = tl.full([BLOCK], neg_inf, compute)
    s = tl.zeros([BLOCK], compute)
    t_acc = tl.zeros([BLOCK], compute)  # sum e^{z-m} (z-m)
    zsum = tl.zeros([BLOCK], compute)
    cwz = tl.zeros([BLOCK], compute)
    cwsum = tl.zeros([BLOCK], compute)
    s_ny = tl.zeros([BLOCK], compute)  # sum over k != y of e^{z-m}
    q_ny = tl.zeros([BLOCK], compute)  # ... of e^{2(z-m)}
    m_ny = tl.full([BLOCK], neg_inf, compute)
    s_rest = tl.zeros([BLOCK], compute)  # over k not in {a, b}
    am = tl.zeros([BLOCK], tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + lanes
        valid = cols < n_cols
        xv = tl.load(x_row + cols, mask=valid, other=0.0).to(compute)
        z = tl.where(valid, _transform(xv, scale, softcap, SOFTCAP), neg_inf)
        am = tl.where(z > m, cols.to(tl.int64), am)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        shift = tl.where(m == neg_inf, 0.0, m - m_safe)  # (-inf - x) * 0 would be NaN
        t_acc = alpha * (t_acc + shift * s) + e * (tl.where(e > 0, z, m_safe) - m_safe)
        s = s * alpha + e
        zv = tl.where(valid, z, 0.0)
        zsum += zv
        if HAS_CW:
            w = tl.load(cw_ptr + cols, mask=valid, other=0.0).to(compute)
            cwz += w * zv
            cwsum += w
        if STATS:
            e_ny = tl.where(valid & (cols != y), e, 0.0)
            s_ny = s_ny * alpha + e_ny
            q_ny = q_ny * alpha * alpha + e_ny * e_ny
            m_ny = tl.maximum(m_ny, tl.where(valid & (cols != y), z, neg_inf))
        if DECOUPLED:
            s_rest = s_rest * alpha + tl.where(valid & (cols != y) & (cols != ib), e, 0.0)
        m = m_new
    big_m = tl.max(m, 0)
    big_m_safe = tl.where(big_m == neg_inf, 0.0, big_m)
    f = tl.where(m == neg_inf, 0.0, tl.exp(m - big_m_safe))
    total = tl.sum(s * f, 0)
    lse = big_m_safe + tl.log(total)
    t_rel = tl.sum(f * (t_acc + tl.where(m == neg_inf, 0.0, m - big_m_safe) * s), 0) / total
    entropy = tl.log(total) - t_rel
    mean_z = big_m_safe + t_rel
    argmax = tl.min(tl.where(m == big_m, am, n_cols), 0)
    zmean = tl.sum(zsum, 0) / n_cols
    # the sparse targets
    ce = tl.zeros([1], compute).sum(0)
    c_sp = tl.zeros([1], compute).sum(0)
    for j in range(0, n_targets):
        i = tl.load(idx_ptr + t_row + j)
        t = tl.load(tw_ptr + t_row + j).to(compute)
        zi = _transform(tl.load(x_row + i).to(compute), scale, softcap, SOFTCAP)
        if HAS_CW:
            t = t * tl.load(cw_ptr + i).to(compute)
        ce += t * (lse - zi)
        c_sp += t
    if HAS_CW:
        c_row = c_sp
    else:
        c_row = c_sp * 0.0 + 1.0
    row_loss = ce
    if smoothing != 0.0:
        if HAS_CW:
            u = (tl.sum(cwsum, 0) * lse - tl.sum(cwz, 0)) / n_cols
        else:
            u = lse - zmean
        row_loss = (1.0 - smoothing) * ce + smoothing * u
    reg = c_sp * 0.0
    if maxsup != 0.0:
        reg += maxsup * (big_m - zmean)
    if z_loss != 0.0:
        reg += z_loss * lse * lse
    if confidence != 0.0:
        reg -= confidence * entropy
    zy = _transform(tl.load(x_row + y).to(compute), scale, softcap, SOFTCAP)
    if DECOUPLED:
        r = tl.sum(s_rest * f, 0) / total
        zb = _transform(tl.load(x_row + ib).to(compute), scale, softcap, SOFTCAP)
        lam = tl.load(tw_ptr + t_row).to(compute)
        lam_b = tl.load(tw_ptr + t_row + 1).to(compute)
        lpa = zy - lse
        lpb = zb - lse
        pa = tl.exp(lpa)
        pb = tl.exp(lpb)
        reg += decoupled * (lam * (tl.log(pa + r) - lpa) + lam_b * (tl.log(pb + r) - lpb))
        tl.store(stats_ptr + row * 9 + 6, lam / (pa + r) + lam_b / (pb + r))
        tl.store(stats_ptr + row * 9 + 7, pa / (pa + r))
        tl.store(stats_ptr + row * 9 + 8, pb / (pb + r))
    else:
        tl.store(stats_ptr + row * 9 + 6, 0.0)
        tl.store(stats_ptr + row * 9 + 7, 0.0)
        tl.store(stats_ptr + row * 9 + 8, 0.0)
    rw = tl.load(rw_ptr + row).to(compute)
    tl.store(loss_ptr + row, (row_loss + c_row * reg) * rw)
    tl.store(stats_ptr + row * 9 + 0, lse)
    tl.store(stats_ptr + row * 9 + 1, entropy)
    tl.store(stats_ptr + row * 9 + 5, mean_z)
    if STATS:
        sn = tl.sum(s_ny * f, 0) / total
        qn = tl.sum(q_ny * f * f, 0) / (total * total)
        tl.store(stats_ptr + row * 9 + 2, tl.sqrt(qn + sn * sn))
        tl.store(stats_ptr + row * 9 + 3, 1.0 / total)
        tl.store(stats_ptr + row * 9 + 4, zy - tl.max(m_ny, 0))
    else:
        tl.store(stats_ptr + row * 9 + 2, 0.0)
        tl.store(stats_ptr + row * 9 + 3, 0.0)
        tl.store(stats_ptr + row * 9 + 4, 0.0)
    tl.store(amax_ptr + row, argmax)


@triton.jit(do_not_specialize=["n_cols", "n_targets"])
def ce_bwd_kernel(
    g_ptr,
    x_ptr,
    idx_ptr,
    tw_ptr,
    rw_ptr,
    cw_ptr,
    opt_ptr,
    stats_ptr,
    amax_ptr,
    out_ptr,
    n_cols,
    n_targets,
    HAS_CW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DECOUPLED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    compute = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    smoothing = tl.load(opt_ptr + 0).to(compute)
    maxsup = tl.load(opt_ptr + 1).to(compute)
    z_loss = tl.load(opt_ptr + 2).to(compute)
    confidence = tl.load(opt_ptr + 3).to(compute)
    decoupled = tl.load(opt_ptr + 4).to(compute)
    softcap = tl.load(opt_ptr + 5).to(compute)
    scale = tl.load(opt_ptr + 6).to(compute)
    x_row = x_ptr + row * n_cols
    t_row = row * n_targets
    lanes = tl.arange(0, BLOCK)
    g = tl.load(g_ptr + row).to(compute) * tl.load(rw_ptr + row).to(compute)
    lse = tl.load(stats_ptr + row * 9).to(compute)
    c_sp = tl.zeros([1], compute).sum(0)
    for j in range(0, n_targets):
        t = tl.load(tw_ptr + t_row + j).to(compute)
        if HAS_CW:
            t = t * tl.load(cw_ptr + tl.load(idx_ptr + t_row + j)).to(compute)
        c_sp += t
    if HAS_CW:
        c_row = c_sp
        cwsum = tl.zeros([BLOCK], compute)
        for start in range(0, n_cols, BLOCK):
            cols = start + lanes
            cwsum += tl.load(cw_ptr + cols, mask=cols < n_cols, other=0.0).to(compute)
        w_total = tl.sum(cwsum, 0) / n_cols
        const = -maxsup * c_row / n_cols * g
    else:
        c_row = c_sp * 0.0 + 1.0
        w_total = c_sp * 0.0 + 1.0
        const = (-maxsup * c_row / n_cols - smoothing / n_cols) * g
    reg_a = 2.0 * z_loss * lse - confidence * tl.load(stats_ptr + row * 9 + 5).to(compute)
    if DECOUPLED:
        reg_a += decoupled * tl.load(stats_ptr + row * 9 + 6).to(compute)
    a_coef = ((1.0 - smoothing) * c_sp + smoothing * w_total + c_row * reg_a) * g
    b_coef = confidence * c_row * g
    amax = tl.load(amax_ptr + row)
    if DECOUPLED:
        ia = tl.load(idx_ptr + t_row)
        ib = tl.load(idx_ptr + t_row + 1)
        lam = tl.load(tw_ptr + t_row).to(compute)
        lam_b = tl.load(tw_ptr + t_row + 1).to(compute)
        coef = tl.load(stats_ptr + row * 9 + 6).to(compute)
        pa = tl.exp(_transform(tl.load(x_row + ia).to(compute), scale, softcap, SOFTCAP) - lse)
        pb = tl.exp(_transform(tl.load(x_row + ib).to(compute), scale, softcap, SOFTCAP) - lse)
        dscale = decoupled * c_row * g
        fix_a = dscale * (lam * (tl.load(stats_ptr + row * 9 + 7).to(compute) - 1.0) - pa * coef)
        fix_b = lam_b * (tl.load(stats_ptr + row * 9 + 8).to(compute) - 1.0)
        fix_b = dscale * tl.where(ia != ib, fix_b - pb * coef, fix_b)
    for start in range(0, n_cols, BLOCK):
        cols = start + lanes
        valid = cols < n_cols
        xv = tl.load(x_row + cols, mask=valid, other=0.0).to(compute)
        z = _transform(xv, scale, softcap, SOFTCAP)
        p = tl.exp(z - lse)
        d = p * (a_coef + b_coef * z) + const
        if HAS_CW:
            d += (-smoothing / n_cols) * g * tl.load(cw_ptr + cols, mask=valid, other=0.0).to(compute)
        for j in range(0, n_targets):
            i = tl.load(idx_ptr + t_row + j)
            t = tl.load(tw_ptr + t_row + j).to(compute)
            if HAS_CW:
                t = t * tl.load(cw_ptr + i).to(compute)
            d += tl.where(cols == i, -(1.0 - smoothing) * t * g, 0.0)
        d += tl.where(cols == amax, maxsup * c_row * g, 0.0)
        if DECOUPLED:
            d += tl.where(cols == ia, fix_a, 0.0) + tl.where(cols == ib, fix_b, 0.0)
        if SOFTCAP:
            zc = z / softcap
            d = d * (scale * (1.0 - zc * zc))
        else:
            d = d * scale
        tl.store(out_ptr + row * n_cols + cols, cast_rne(d, out_ptr.dtype.element_ty), mask=valid)


_FLOATS = ("*fp32", "*bf16", "*fp16")  # (float64 logits: the same kernels with *fp64 pointers)
_CE_FWD_SIG = {
    "idx_ptr": "*i64",
    "tw_ptr": "*fp32",
    "rw_ptr": "*fp32",
    "cw_ptr": "*fp32",
    "opt_ptr": "*fp32",
    "loss_ptr": "*fp32",
    "stats_ptr": "*fp32",
    "amax_ptr": "*i64",
    "n_cols": "i32",
    "n_targets": "i32",
}
COMPILE_SPECS = [
    (
        ce_fwd_kernel,
        {"x_ptr": t, **_CE_FWD_SIG},
        {"HAS_CW": cw, "SOFTCAP": cap, "STATS": st, "DECOUPLED": dec, "BLOCK": 4096},
    )
    for t in _FLOATS
    for cw, cap, st, dec in ((False, False, False, False), (True, True, True, True))
] + [
    (
        ce_bwd_kernel,
        {
            "g_ptr": "*fp32",
            "x_ptr": t,
            "idx_ptr": "*i64",
            "tw_ptr": "*fp32",
            "rw_ptr": "*fp32",
            "cw_ptr": "*fp32",
            "opt_ptr": "*fp32",
            "stats_ptr": "*fp32",
            "amax_ptr": "*i64",
            "out_ptr": t,
            "n_cols": "i32",
            "n_targets": "i32",
        },
        {"HAS_CW": cw, "SOFTCAP": cap, "DECOUPLED": dec, "BLOCK": 4096},
    )
    for t in _FLOATS
    for cw, cap, dec in ((False, False, False), (True, True, True))
]
