"""Triton kernels of the mixed / soft-target losses (MixUp / CutMix losses from index labels, timm's soft-target
and binary cross-entropy): the same online-softmax row pass as :mod:`regops.kernels.losses`.

The math is :mod:`regops.losses.reference_mixed`'s; the launchers are in :mod:`regops.losses.triton`. Forward: one
program per row; backward: rows on the grid's x axis, column blocks on y. Computed in float32 (float64 for float64
logits) and rounded once.
"""

import triton
import triton.language as tl
from regops.kernels.utils import cast_rne


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


@triton.jit
def _bce_target(idx, a, b, lam, n_cols, smoothing, threshold, HAS_THRESHOLD: tl.constexpr):
    """The mixed smoothed one-hot t for columns idx (regops.mix.reference.mixed_one_hot, float32 ops in order;
    in lam's float64 for float64 logits, as regops.losses.reference_mixed._bce_targets)."""
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


# ----------------------------------------------------------------------------------------------- compile specs

_LOSS_FLOAT = ("*fp32", "*bf16", "*fp64")


def _acc_ptr(t):
    return "*fp64" if t == "*fp64" else "*fp32"


_BCE_FLAGS = {"HAS_THRESHOLD": True, "HAS_WEIGHT": True, "HAS_POS_WEIGHT": True, "BLOCK": 1024}
COMPILE_SPECS = (
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
