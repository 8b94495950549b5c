"""Triton kernels of the losses family: the regularized cross-entropy, one program per row streaming the vocabulary,
and the mixed / soft-target losses (moved here from the mix family; same online-softmax row pass).

The math is :mod:`regops.reference.losses`'s. Forward: one pass over the row with an online (lane-wise) maximum
keeps ``sum e^{z-m}``, ``sum e^{z-m} (z-m)`` (entropy, ``E_p z``), the row sums the smoothing term needs, the
argmax and, for the statistics, the sums without the label column (EL2N) and the runner-up (margin); the lanes
are merged once at the end. Backward: one pass writing ``d loss / d logits`` from the saved row numbers
(``lse``, ``E_p z``, the decoupled coefficients, the argmax), computed in float32 (float64 for float64 logits)
and rounded once. Grids are ``(rows,)``: within CUDA's limits for any row count (2**31 - 1), and there are no
atomics, so results do not depend on scheduling. The option values travel in a small tensor of the compute
dtype (float64 options for float64 logits; no recompilation when a value changes).
"""

import torch
import triton
import triton.language as tl
from regops.kernels.utils import cast_rne

from regops._core.launch import launch
from regops.reference import losses as ref

# Indices into the options tensor.
_SMOOTHING, _MAXSUP, _ZLOSS, _CONF, _DECOUPLED, _SOFTCAP, _SCALE = range(7)


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


def _block(n_cols: int, device: torch.device) -> int:
    cap = 16384 if device.type == "cpu" else 4096
    return min(cap, triton.next_power_of_2(max(n_cols, 16)))


_OPTIONS_CACHE: dict = {}


def _options(device, acc, smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale):
    """The option values as a device tensor (float64 for float64 logits: float scalars would be float32).

    Cached per (device, dtype, values), so a training loop copies them once and a CUDA-graph capture after a
    warm-up step finds them on the device (no copy inside the capture, no device-to-host sync ever).
    """
    values = (smoothing, maxsup, z_loss, confidence, decoupled, softcap or 1.0, scale)
    key = (str(device), acc, values)
    opts = _OPTIONS_CACHE.get(key)
    if opts is None:
        if len(_OPTIONS_CACHE) > 64:
            _OPTIONS_CACHE.clear()
        opts = _OPTIONS_CACHE[key] = torch.tensor(values, dtype=acc).to(device)
    return opts


def cross_entropy(
    logits, index, tweight, row_weight, class_weight,
    smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale, want_stats, *, block=None,
):  # fmt: skip
    """regops.reference.losses.cross_entropy: ``(loss [N], stats [N, 9], argmax [N])``."""
    n, k = logits.shape
    acc = ref.compute_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    stats = torch.empty((n, ref.N_STATS), dtype=acc, device=logits.device)
    argmax = torch.empty(n, dtype=torch.long, device=logits.device)
    if n == 0:
        return loss, stats, argmax
    opts = _options(logits.device, acc, smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale)
    cw = class_weight if class_weight is not None else opts
    launch(
        ce_fwd_kernel, (n,),
        logits, index, tweight.to(acc), row_weight.to(acc), cw, opts, loss, stats, argmax, k, index.shape[1],
        device=logits.device, HAS_CW=class_weight is not None, SOFTCAP=bool(softcap), STATS=bool(want_stats),
        DECOUPLED=bool(decoupled), BLOCK=block or _block(k, logits.device), num_warps=8,
    )  # fmt: skip
    return loss, stats, argmax


def cross_entropy_backward(
    grad, logits, index, tweight, row_weight, class_weight, stats, argmax,
    smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale, *, block=None,
):  # fmt: skip
    """regops.reference.losses.cross_entropy_backward."""
    n, k = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    acc = ref.compute_dtype(logits.dtype)
    opts = _options(logits.device, acc, smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale)
    cw = class_weight if class_weight is not None else opts
    launch(
        ce_bwd_kernel, (n,),
        grad.to(acc).contiguous(), logits, index, tweight.to(acc), row_weight.to(acc), cw, opts, stats, argmax,
        out, k, index.shape[1],
        device=logits.device, HAS_CW=class_weight is not None, SOFTCAP=bool(softcap), DECOUPLED=bool(decoupled),
        BLOCK=block or _block(k, logits.device), num_warps=8,
    )  # fmt: skip
    return out


def _linear_chunk(device: torch.device) -> int:
    # On a GPU a block of logits of 2**26 elements (256 MiB in fp32) keeps the matmuls large; on CPU (the
    # interpreter) the reference's size.
    return 1 << 26 if device.type == "cuda" else 0


def linear_cross_entropy(hidden, weight, bias, *args):
    """regops.reference.losses.linear_cross_entropy with this module's cross-entropy kernel on each block."""
    return ref.linear_cross_entropy(hidden, weight, bias, *args, ce=cross_entropy, chunk=_linear_chunk(hidden.device))


def linear_cross_entropy_backward(grad, hidden, weight, bias, *args):
    """regops.reference.losses.linear_cross_entropy_backward with this module's kernels on each block."""
    return ref.linear_cross_entropy_backward(
        grad, hidden, weight, bias, *args, ce_backward=cross_entropy_backward, chunk=_linear_chunk(hidden.device)
    )


# ----------------------------------------------------------------------------------------------- mixed / soft targets
@triton.jit
def _row_lse_sums(z_row, t_row, n_cols, WITH_T: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a row: (lse(z), sum z, sum t, sum t z) with an online maximum (lane-wise, reduced at the end),
    in float32 (float64 for float64 logits)."""
    compute = tl.float64 if z_row.dtype.element_ty == tl.float64 else tl.float32
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), compute)
    s = tl.zeros([BLOCK], compute)
    zsum = tl.zeros([BLOCK], compute)
    tsum = tl.zeros([BLOCK], compute)
    tz = tl.zeros([BLOCK], compute)
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        valid = idx < n_cols
        z = tl.load(z_row + idx, mask=valid, other=float("-inf")).to(compute)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.where(valid, tl.exp(z - m_safe), 0.0)
        m = m_new
        zsum += tl.where(valid, z, 0.0)
        if WITH_T:
            t = tl.load(t_row + idx, mask=valid, other=0).to(compute)
            tsum += t
            tz += t * tl.where(valid, z, 0.0)
    m_row = tl.max(m, 0)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    m_lane = tl.where(m == float("-inf"), m_row_safe, m)
    total = tl.sum(s * tl.exp(m_lane - m_row_safe), 0)
    lse = m_row_safe + tl.log(total)
    return lse, tl.sum(zsum, 0), tl.sum(tsum, 0), tl.sum(tz, 0)


@triton.jit(do_not_specialize=["n_cols"])
def mix_ce_forward_kernel(z_ptr, a_ptr, b_ptr, lam_ptr, loss_ptr, lse_ptr, n_cols, opt_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    compute = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    smoothing = tl.load(opt_ptr).to(compute)
    z_row = z_ptr + row * n_cols
    lse, zsum, _, _ = _row_lse_sums(z_row, z_row, n_cols, False, BLOCK)
    lam = tl.load(lam_ptr + row).to(compute)
    za = tl.load(z_row + tl.load(a_ptr + row)).to(compute)
    zb = tl.load(z_row + tl.load(b_ptr + row)).to(compute)
    picked = lam * za + (1.0 - lam) * zb
    loss = lse - (1.0 - smoothing) * picked - smoothing * (zsum / n_cols)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["n_cols"])
def mix_ce_backward_kernel(g_ptr, z_ptr, lse_ptr, a_ptr, b_ptr, lam_ptr, out_ptr, n_cols, opt_ptr, BLOCK: tl.constexpr):
    # rows on the grid's x axis (up to 2**31 - 1), column blocks on y (<= 65535 blocks: V < 2**28)
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    compute = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    smoothing = tl.load(opt_ptr).to(compute)
    valid = idx < n_cols
    z = tl.load(z_ptr + row * n_cols + idx, mask=valid, other=0).to(compute)
    g = tl.load(g_ptr + row).to(compute)
    lam = tl.load(lam_ptr + row).to(compute)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    p = tl.exp(z - tl.load(lse_ptr + row).to(compute))
    p = p - smoothing / n_cols
    p = p * g
    p = p + tl.where(idx == a, -(1.0 - smoothing) * lam * g, 0.0)
    p = p + tl.where(idx == b, -(1.0 - smoothing) * (1.0 - lam) * g, 0.0)
    tl.store(out_ptr + row * n_cols + idx, cast_rne(p, out_ptr.dtype.element_ty), mask=valid)


def _acc(logits):
    return ref.compute_dtype(logits.dtype)


def _loss_block(n_cols: int, device: torch.device) -> int:
    cap = 8192 if device.type == "cpu" else 4096
    return min(cap, triton.next_power_of_2(max(n_cols, 16)))


def _scalars(device, acc, *values):
    return _options(device, acc, *values, *(0.0,) * (7 - len(values)))


def mix_cross_entropy(logits, target_a, target_b, lam, smoothing, *, block=None):
    """regops.reference.losses.mix_cross_entropy: (loss, lse) [B], float32 (float64 for float64 logits)."""
    n, c = logits.shape
    acc = _acc(logits)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    block = block or _loss_block(c, logits.device)
    opts = _scalars(logits.device, acc, smoothing)
    launch(
        mix_ce_forward_kernel, (n,), logits, target_a, target_b, lam.to(acc).contiguous(), loss, lse, c, opts,
        device=logits.device, BLOCK=block,
    )  # fmt: skip
    return loss, lse


def mix_cross_entropy_backward(grad, logits, lse, target_a, target_b, lam, smoothing, *, block=None):
    """regops.reference.losses.mix_cross_entropy_backward."""
    n, c = logits.shape
    acc = _acc(logits)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    block = block or _loss_block(c, logits.device)
    opts = _scalars(logits.device, acc, smoothing)
    launch(
        mix_ce_backward_kernel, (n, triton.cdiv(c, block)),
        grad.to(acc).contiguous(), logits, lse, target_a, target_b, lam.to(acc).contiguous(), out, c, opts,
        device=logits.device, BLOCK=block,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["n_cols"])
def soft_ce_forward_kernel(z_ptr, t_ptr, loss_ptr, stats_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse, _, tsum, tz = _row_lse_sums(z_ptr + row * n_cols, t_ptr + row * n_cols, n_cols, True, BLOCK)
    tl.store(loss_ptr + row, lse * tsum - tz)
    tl.store(stats_ptr + row * 2, lse)
    tl.store(stats_ptr + row * 2 + 1, tsum)


@triton.jit(do_not_specialize=["n_cols"])
def soft_ce_backward_kernel(g_ptr, z_ptr, stats_ptr, t_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    compute = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    valid = idx < n_cols
    z = tl.load(z_ptr + row * n_cols + idx, mask=valid, other=0).to(compute)
    t = tl.load(t_ptr + row * n_cols + idx, mask=valid, other=0).to(compute)
    lse = tl.load(stats_ptr + row * 2).to(compute)
    tsum = tl.load(stats_ptr + row * 2 + 1).to(compute)
    g = tl.load(g_ptr + row).to(compute)
    p = tl.exp(z - lse)
    p = (p * tsum - t) * g
    tl.store(out_ptr + row * n_cols + idx, cast_rne(p, out_ptr.dtype.element_ty), mask=valid)


def soft_target_cross_entropy(logits, target, *, block=None):
    """regops.reference.losses.soft_target_cross_entropy: (loss [B], stats [B, 2] = (lse, sum t))."""
    n, c = logits.shape
    loss = torch.empty(n, dtype=_acc(logits), device=logits.device)
    stats = torch.empty(n, 2, dtype=_acc(logits), device=logits.device)
    block = block or _loss_block(c, logits.device)
    launch(soft_ce_forward_kernel, (n,), logits, target, loss, stats, c, device=logits.device, BLOCK=block)
    return loss, stats


def soft_target_cross_entropy_backward(grad, logits, stats, target, *, block=None):
    """regops.reference.losses.soft_target_cross_entropy_backward."""
    n, c = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    block = block or _loss_block(c, logits.device)
    launch(
        soft_ce_backward_kernel, (n, triton.cdiv(c, block)),
        grad.to(_acc(logits)).contiguous(), logits, stats, target, out, c, device=logits.device, BLOCK=block,
    )  # fmt: skip
    return out


@triton.jit
def _bce_target(idx, a, b, lam, n_cols, smoothing, threshold, HAS_THRESHOLD: tl.constexpr):
    """The mixed smoothed one-hot t for columns idx (regops.reference.losses.mixed_one_hot, float32 ops in order;
    in lam's float64 for float64 logits, as regops.reference.losses._bce_targets)."""
    off = smoothing / n_cols
    on = 1.0 - smoothing + off
    wo = 1.0 - lam
    same = a == b
    y2_at_a = tl.where(same, on, off)
    base = off * lam + off * wo
    at_a = on * lam + y2_at_a * wo
    at_b = y2_at_a * lam + on * wo
    t = tl.where(idx == a, at_a, tl.where(idx == b, at_b, base))
    if HAS_THRESHOLD:
        t = tl.where(t > threshold, 1.0, 0.0)
    return t


@triton.jit(do_not_specialize=["n_cols"])
def mix_bce_forward_kernel(
    z_ptr,
    a_ptr,
    b_ptr,
    lam_ptr,
    weight_ptr,
    pos_weight_ptr,
    loss_ptr,
    n_cols,
    opt_ptr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    compute = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    smoothing = tl.load(opt_ptr).to(compute)
    threshold = tl.load(opt_ptr + 1).to(compute)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    lam = tl.load(lam_ptr + row).to(compute)
    acc = tl.zeros([BLOCK], compute)
    for start in range(0, n_cols, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < n_cols
        z = tl.load(z_ptr + row * n_cols + idx, mask=valid, other=0).to(compute)
        t = _bce_target(idx, a, b, lam, n_cols, smoothing, threshold, HAS_THRESHOLD)
        # log_sigmoid(z) = min(z, 0) - log(1 + exp(-|z|)); loss = (1 - t) z - lw log_sigmoid(z)
        log_sig = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))
        if HAS_POS_WEIGHT:
            pw = tl.load(pos_weight_ptr + idx, mask=valid, other=1.0).to(compute)
            log_sig = log_sig * ((pw - 1.0) * t + 1.0)
        loss = (1.0 - t) * z - log_sig
        if HAS_WEIGHT:
            loss = loss * tl.load(weight_ptr + idx, mask=valid, other=0.0).to(compute)
        acc += tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, tl.sum(acc, 0))


@triton.jit(do_not_specialize=["n_cols"])
def mix_bce_backward_kernel(
    g_ptr,
    z_ptr,
    a_ptr,
    b_ptr,
    lam_ptr,
    weight_ptr,
    pos_weight_ptr,
    out_ptr,
    n_cols,
    opt_ptr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    compute = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    smoothing = tl.load(opt_ptr).to(compute)
    threshold = tl.load(opt_ptr + 1).to(compute)
    valid = idx < n_cols
    z = tl.load(z_ptr + row * n_cols + idx, mask=valid, other=0).to(compute)
    t = _bce_target(
        idx,
        tl.load(a_ptr + row),
        tl.load(b_ptr + row),
        tl.load(lam_ptr + row).to(compute),
        n_cols,
        smoothing,
        threshold,
        HAS_THRESHOLD,
    )
    sig_neg = 1.0 / (1.0 + tl.exp(z))  # sigmoid(-z)
    if HAS_POS_WEIGHT:
        pw = tl.load(pos_weight_ptr + idx, mask=valid, other=1.0).to(compute)
        d = (1.0 - t) - (1.0 + (pw - 1.0) * t) * sig_neg
    else:
        d = (1.0 - t) - sig_neg
    if HAS_WEIGHT:
        d = d * tl.load(weight_ptr + idx, mask=valid, other=0.0).to(compute)
    d = d * tl.load(g_ptr + row).to(compute)
    tl.store(out_ptr + row * n_cols + idx, cast_rne(d, out_ptr.dtype.element_ty), mask=valid)


def _bce_args(logits, weight, pos_weight, threshold):
    acc = _acc(logits)
    dummy = logits.new_empty(1, dtype=acc)
    return (
        weight.to(acc).contiguous() if weight is not None else dummy,
        pos_weight.to(acc).contiguous() if pos_weight is not None else dummy,
        float(threshold) if threshold is not None else 0.0,
        {
            "HAS_THRESHOLD": threshold is not None,
            "HAS_WEIGHT": weight is not None,
            "HAS_POS_WEIGHT": pos_weight is not None,
        },
    )


def mix_binary_cross_entropy(logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight, *, block=None):
    """regops.reference.losses.mix_binary_cross_entropy: per-row class sums, float32 [B]."""
    n, c = logits.shape
    acc = _acc(logits)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    w, pw, thr, flags = _bce_args(logits, weight, pos_weight, threshold)
    block = block or _loss_block(c, logits.device)
    opts = _scalars(logits.device, acc, smoothing, thr)
    launch(
        mix_bce_forward_kernel, (n,), logits, target_a, target_b, _bce_lam(lam, acc), w, pw, loss, c, opts,
        device=logits.device, BLOCK=block, **flags,
    )  # fmt: skip
    return loss


def mix_binary_cross_entropy_backward(
    grad, logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight, *, block=None
):
    """regops.reference.losses.mix_binary_cross_entropy_backward."""
    n, c = logits.shape
    acc = _acc(logits)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    w, pw, thr, flags = _bce_args(logits, weight, pos_weight, threshold)
    block = block or _loss_block(c, logits.device)
    opts = _scalars(logits.device, acc, smoothing, thr)
    launch(
        mix_bce_backward_kernel, (n, triton.cdiv(c, block)),
        grad.to(acc).contiguous(), logits, target_a, target_b, _bce_lam(lam, acc), w, pw, out, c, opts,
        device=logits.device, BLOCK=block, **flags,
    )  # fmt: skip
    return out


def _bce_lam(lam, acc):
    # float32 lambdas (timm's float32 targets) unless the logits are float64: then float64 targets
    return lam.to(acc).contiguous()


# ----------------------------------------------------------------------------------------------- compile specs

_LOSS_FLOAT = ("*fp32", "*bf16", "*fp64")


def _acc_ptr(t):
    return "*fp64" if t == "*fp64" else "*fp32"


_BCE_FLAGS = {"HAS_THRESHOLD": True, "HAS_WEIGHT": True, "HAS_POS_WEIGHT": True, "BLOCK": 1024}
_MIX_LOSS_SPECS = (
    [
        (
            mix_ce_forward_kernel,
            {"z_ptr": t, "a_ptr": "*i64", "b_ptr": "*i64", "lam_ptr": _acc_ptr(t), "loss_ptr": _acc_ptr(t),
             "lse_ptr": _acc_ptr(t), "n_cols": "i32", "opt_ptr": _acc_ptr(t)},
            {"BLOCK": 4096},
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            mix_ce_backward_kernel,
            {"g_ptr": _acc_ptr(t), "z_ptr": t, "lse_ptr": _acc_ptr(t), "a_ptr": "*i64", "b_ptr": "*i64",
             "lam_ptr": _acc_ptr(t), "out_ptr": t, "n_cols": "i32", "opt_ptr": _acc_ptr(t)},
            {"BLOCK": 4096},
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            soft_ce_forward_kernel,
            {"z_ptr": t, "t_ptr": t, "loss_ptr": _acc_ptr(t), "stats_ptr": _acc_ptr(t), "n_cols": "i32"},
            {"BLOCK": 4096},
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            soft_ce_backward_kernel,
            {"g_ptr": _acc_ptr(t), "z_ptr": t, "stats_ptr": _acc_ptr(t), "t_ptr": t, "out_ptr": t, "n_cols": "i32"},
            {"BLOCK": 4096},
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            mix_bce_forward_kernel,
            {"z_ptr": t, "a_ptr": "*i64", "b_ptr": "*i64", "lam_ptr": _acc_ptr(t), "weight_ptr": _acc_ptr(t),
             "pos_weight_ptr": _acc_ptr(t), "loss_ptr": _acc_ptr(t), "n_cols": "i32", "opt_ptr": _acc_ptr(t)},
            _BCE_FLAGS,
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            mix_bce_backward_kernel,
            {"g_ptr": _acc_ptr(t), "z_ptr": t, "a_ptr": "*i64", "b_ptr": "*i64", "lam_ptr": _acc_ptr(t),
             "weight_ptr": _acc_ptr(t), "pos_weight_ptr": _acc_ptr(t), "out_ptr": t, "n_cols": "i32",
             "opt_ptr": _acc_ptr(t)},
            _BCE_FLAGS,
        )
        for t in _LOSS_FLOAT
    ]
)  # fmt: skip

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
COMPILE_SPECS = (
    [
        (
            ce_fwd_kernel,
            {"x_ptr": t, **_CE_FWD_SIG},
            {"HAS_CW": cw, "SOFTCAP": cap, "STATS": st, "DECOUPLED": dec, "BLOCK": 4096},
        )
        for t in _FLOATS
        for cw, cap, st, dec in ((False, False, False, False), (True, True, True, True))
    ]
    + [
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
    + _MIX_LOSS_SPECS
)


def linear_cross_entropy_with_grad(hidden, weight, bias, *args):
    """regops.reference.losses.linear_cross_entropy_with_grad with this module's kernels on each block."""
    return ref.linear_cross_entropy_with_grad(
        hidden, weight, bias, *args, ce=cross_entropy, ce_backward=cross_entropy_backward,
        chunk=_linear_chunk(hidden.device),
    )  # fmt: skip
