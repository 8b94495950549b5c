"""Triton kernels for MixUp/CutMix: the mixing kernel (one launch for every mode) and the fused mixed losses.

Launchers take and return tensors (no autograd) with the signatures of :mod:`regops.reference.mix`, which
defines the math; the kernels follow it operation by operation so that, under the interpreter, float32 results
agree with the reference to the last bit (on a GPU the compiler may contract a multiply-add: within an ulp).
"""

import torch
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


@triton.jit(do_not_specialize=["per_sample", "inner", "height", "width"])
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
    CHANNELS_LAST: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y[b] = (outside box[b]) x[b] w_self[b] + x[o] (1 inside box[c], else w_other[c]; 0 terms skipped).

    Forward: o = partner[b], c = b. Transposed (the backward): o = inverse_partner[b], c = o.
    """
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
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


def _layout(x: torch.Tensor):
    """(channels_last, inner, height, width) of x viewed as [B, M, H, W] in its memory order."""
    if x.dim() == 2:
        return False, 1, 1, x.shape[1]
    height, width = x.shape[-2], x.shape[-1]
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return channels_last, (x.shape[1] if channels_last else 1), height, width


def _block(per_sample: int, device: torch.device) -> int:
    cap = 4096 if device.type == "cpu" else 2048
    return min(cap, triton.next_power_of_2(max(per_sample, 16)))


def _launch_mix(x, w_self, w_other, index, box, transpose: bool, block=None):
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    batch = x.shape[0]
    per_sample = x.numel() // batch
    channels_last, inner, height, width = _layout(x)
    block = block or _block(per_sample, x.device)
    grid = (triton.cdiv(per_sample, block), batch)
    mix_kernel[grid](
        x,
        y,
        w_self.float().contiguous(),
        w_other.float().contiguous(),
        index.contiguous(),
        box.contiguous(),
        per_sample,
        inner,
        height,
        width,
        CHANNELS_LAST=channels_last,
        TRANSPOSE=transpose,
        BLOCK=block,
        num_warps=4,
    )
    return y


def mix_apply(x, w_self, w_other, partner, box, *, block=None):
    """regops.reference.mix.mix_apply on x (contiguous or channels_last)."""
    return _launch_mix(x, w_self, w_other, partner, box, False, block)


def mix_apply_backward(grad, w_self, w_other, partner, box, *, block=None):
    """regops.reference.mix.mix_apply_backward (partner must be a permutation)."""
    inverse = torch.empty_like(partner)
    inverse[partner] = torch.arange(partner.numel(), device=partner.device, dtype=partner.dtype)
    return _launch_mix(grad, w_self, w_other, inverse, box, True, block)


# ----------------------------------------------------------------------------------------------- losses
@triton.jit
def _row_lse_sums(z_row, t_row, n_cols, WITH_T: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a row: (lse(z), sum z, sum t, sum t z) with an online maximum (lane-wise, reduced at the end)."""
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    zsum = tl.zeros([BLOCK], tl.float32)
    tsum = tl.zeros([BLOCK], tl.float32)
    tz = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        valid = idx < n_cols
        z = tl.load(z_row + idx, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.where(valid, tl.exp(z - m_safe), 0.0)
        m = m_new
        zsum += tl.where(valid, z, 0.0)
        if WITH_T:
            t = tl.load(t_row + idx, mask=valid, other=0).to(tl.float32)
            tsum += t
            tz += t * tl.where(valid, z, 0.0)
    m_row = tl.max(m, 0)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    m_lane = tl.where(m == float("-inf"), m_row_safe, m)
    total = tl.sum(s * tl.exp(m_lane - m_row_safe), 0)
    lse = m_row_safe + tl.log(total)
    return lse, tl.sum(zsum, 0), tl.sum(tsum, 0), tl.sum(tz, 0)


@triton.jit(do_not_specialize=["n_cols", "smoothing"])
def mix_ce_forward_kernel(z_ptr, a_ptr, b_ptr, lam_ptr, loss_ptr, lse_ptr, n_cols, smoothing, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * n_cols
    lse, zsum, _, _ = _row_lse_sums(z_row, z_row, n_cols, False, BLOCK)
    lam = tl.load(lam_ptr + row)
    za = tl.load(z_row + tl.load(a_ptr + row)).to(tl.float32)
    zb = tl.load(z_row + tl.load(b_ptr + row)).to(tl.float32)
    picked = lam * za + (1.0 - lam) * zb
    loss = lse - (1.0 - smoothing) * picked - smoothing * (zsum / n_cols)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["n_cols", "smoothing"])
def mix_ce_backward_kernel(
    g_ptr, z_ptr, lse_ptr, a_ptr, b_ptr, lam_ptr, out_ptr, n_cols, smoothing, BLOCK: tl.constexpr
):
    row = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < n_cols
    z = tl.load(z_ptr + row * n_cols + idx, mask=valid, other=0).to(tl.float32)
    g = tl.load(g_ptr + row).to(tl.float32)
    lam = tl.load(lam_ptr + row)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    p = tl.exp(z - tl.load(lse_ptr + row))
    p = p - smoothing / n_cols
    p = p * g
    p = p + tl.where(idx == a, -(1.0 - smoothing) * lam * g, 0.0)
    p = p + tl.where(idx == b, -(1.0 - smoothing) * (1.0 - lam) * g, 0.0)
    tl.store(out_ptr + row * n_cols + idx, cast_rne(p, out_ptr.dtype.element_ty), mask=valid)


def _acc(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _loss_block(n_cols: int, device: torch.device) -> int:
    cap = 8192 if device.type == "cpu" else 4096
    return min(cap, triton.next_power_of_2(max(n_cols, 16)))


def mix_cross_entropy(logits, target_a, target_b, lam, smoothing, *, block=None):
    """regops.reference.mix.mix_cross_entropy: (loss, lse) float32 [B]."""
    n, c = logits.shape
    loss = torch.empty(n, dtype=_acc(logits), device=logits.device)
    lse = torch.empty(n, dtype=_acc(logits), device=logits.device)
    if n == 0:
        return loss, lse
    block = block or _loss_block(c, logits.device)
    mix_ce_forward_kernel[(n,)](
        logits, target_a, target_b, lam.float().contiguous(), loss, lse, c, float(smoothing), BLOCK=block
    )
    return loss, lse


def mix_cross_entropy_backward(grad, logits, lse, target_a, target_b, lam, smoothing, *, block=None):
    """regops.reference.mix.mix_cross_entropy_backward."""
    n, c = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block = block or _loss_block(c, logits.device)
    mix_ce_backward_kernel[(triton.cdiv(c, block), n)](
        grad.float().contiguous(),
        logits,
        lse,
        target_a,
        target_b,
        lam.float().contiguous(),
        out,
        c,
        float(smoothing),
        BLOCK=block,
    )
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
    row = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < n_cols
    z = tl.load(z_ptr + row * n_cols + idx, mask=valid, other=0).to(tl.float32)
    t = tl.load(t_ptr + row * n_cols + idx, mask=valid, other=0).to(tl.float32)
    lse = tl.load(stats_ptr + row * 2)
    tsum = tl.load(stats_ptr + row * 2 + 1)
    g = tl.load(g_ptr + row).to(tl.float32)
    p = tl.exp(z - lse)
    p = (p * tsum - t) * g
    tl.store(out_ptr + row * n_cols + idx, cast_rne(p, out_ptr.dtype.element_ty), mask=valid)


def soft_target_cross_entropy(logits, target, *, block=None):
    """regops.reference.mix.soft_target_cross_entropy: (loss [B], stats [B, 2] = (lse, sum t))."""
    n, c = logits.shape
    loss = torch.empty(n, dtype=_acc(logits), device=logits.device)
    stats = torch.empty(n, 2, dtype=_acc(logits), device=logits.device)
    if n == 0:
        return loss, stats
    block = block or _loss_block(c, logits.device)
    soft_ce_forward_kernel[(n,)](logits, target, loss, stats, c, BLOCK=block)
    return loss, stats


def soft_target_cross_entropy_backward(grad, logits, stats, target, *, block=None):
    """regops.reference.mix.soft_target_cross_entropy_backward."""
    n, c = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block = block or _loss_block(c, logits.device)
    soft_ce_backward_kernel[(triton.cdiv(c, block), n)](
        grad.float().contiguous(), logits, stats, target, out, c, BLOCK=block
    )
    return out


@triton.jit
def _bce_target(idx, a, b, lam, n_cols, smoothing, threshold, HAS_THRESHOLD: tl.constexpr):
    """The mixed smoothed one-hot t for columns idx (regops.reference.mix.mixed_one_hot, float32 ops in order)."""
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


@triton.jit(do_not_specialize=["n_cols", "smoothing", "threshold"])
def mix_bce_forward_kernel(
    z_ptr,
    a_ptr,
    b_ptr,
    lam_ptr,
    weight_ptr,
    pos_weight_ptr,
    loss_ptr,
    n_cols,
    smoothing,
    threshold,
    HAS_THRESHOLD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    lam = tl.load(lam_ptr + row)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < n_cols
        z = tl.load(z_ptr + row * n_cols + idx, mask=valid, other=0).to(tl.float32)
        t = _bce_target(idx, a, b, lam, n_cols, smoothing, threshold, HAS_THRESHOLD)
        # log_sigmoid(z) = min(z, 0) - log(1 + exp(-|z|)); loss = (1 - t) z - lw log_sigmoid(z)
        log_sig = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))
        if HAS_POS_WEIGHT:
            pw = tl.load(pos_weight_ptr + idx, mask=valid, other=1.0)
            log_sig = log_sig * ((pw - 1.0) * t + 1.0)
        loss = (1.0 - t) * z - log_sig
        if HAS_WEIGHT:
            loss = loss * tl.load(weight_ptr + idx, mask=valid, other=0.0)
        acc += tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, tl.sum(acc, 0))


@triton.jit(do_not_specialize=["n_cols", "smoothing", "threshold"])
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
    smoothing,
    threshold,
    HAS_THRESHOLD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < n_cols
    z = tl.load(z_ptr + row * n_cols + idx, mask=valid, other=0).to(tl.float32)
    t = _bce_target(
        idx,
        tl.load(a_ptr + row),
        tl.load(b_ptr + row),
        tl.load(lam_ptr + row),
        n_cols,
        smoothing,
        threshold,
        HAS_THRESHOLD,
    )
    sig_neg = 1.0 / (1.0 + tl.exp(z))  # sigmoid(-z)
    if HAS_POS_WEIGHT:
        pw = tl.load(pos_weight_ptr + idx, mask=valid, other=1.0)
        d = (1.0 - t) - (1.0 + (pw - 1.0) * t) * sig_neg
    else:
        d = (1.0 - t) - sig_neg
    if HAS_WEIGHT:
        d = d * tl.load(weight_ptr + idx, mask=valid, other=0.0)
    d = d * tl.load(g_ptr + row).to(tl.float32)
    tl.store(out_ptr + row * n_cols + idx, cast_rne(d, out_ptr.dtype.element_ty), mask=valid)


def _bce_args(logits, weight, pos_weight, threshold):
    dummy = logits.new_empty(1, dtype=torch.float32)
    return (
        weight.float().contiguous() if weight is not None else dummy,
        pos_weight.float().contiguous() if pos_weight is not None else dummy,
        float(threshold) if threshold is not None else 0.0,
        {
            "HAS_THRESHOLD": threshold is not None,
            "HAS_WEIGHT": weight is not None,
            "HAS_POS_WEIGHT": pos_weight is not None,
        },
    )


def mix_binary_cross_entropy(logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight, *, block=None):
    """regops.reference.mix.mix_binary_cross_entropy: per-row class sums, float32 [B]."""
    n, c = logits.shape
    loss = torch.empty(n, dtype=_acc(logits), device=logits.device)
    if n == 0:
        return loss
    w, pw, thr, flags = _bce_args(logits, weight, pos_weight, threshold)
    block = block or _loss_block(c, logits.device)
    mix_bce_forward_kernel[(n,)](
        logits,
        target_a,
        target_b,
        lam.float().contiguous(),
        w,
        pw,
        loss,
        c,
        float(smoothing),
        thr,
        BLOCK=block,
        **flags,
    )
    return loss


def mix_binary_cross_entropy_backward(
    grad, logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight, *, block=None
):
    """regops.reference.mix.mix_binary_cross_entropy_backward."""
    n, c = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    w, pw, thr, flags = _bce_args(logits, weight, pos_weight, threshold)
    block = block or _loss_block(c, logits.device)
    mix_bce_backward_kernel[(triton.cdiv(c, block), n)](
        grad.float().contiguous(),
        logits,
        target_a,
        target_b,
        lam.float().contiguous(),
        w,
        pw,
        out,
        c,
        float(smoothing),
        thr,
        BLOCK=block,
        **flags,
    )
    return out


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
}
_LOSS_FLOAT = ("*fp32", "*bf16")
_BCE_FLAGS = {"HAS_THRESHOLD": True, "HAS_WEIGHT": True, "HAS_POS_WEIGHT": True, "BLOCK": 1024}
COMPILE_SPECS = (
    [
        (mix_kernel, {"x_ptr": t, "y_ptr": t, **_MIX_SIG}, {"CHANNELS_LAST": cl, "TRANSPOSE": tr, "BLOCK": 2048})
        for t in (*_FLOAT, "*u8")
        for cl in (False, True)
        for tr in (False, True)
        if not tr or t in ("*fp32", "*bf16")
    ]
    + [
        (
            mix_ce_forward_kernel,
            {
                "z_ptr": t,
                "a_ptr": "*i64",
                "b_ptr": "*i64",
                "lam_ptr": "*fp32",
                "loss_ptr": "*fp32",
                "lse_ptr": "*fp32",
                "n_cols": "i32",
                "smoothing": "fp32",
            },
            {"BLOCK": 4096},
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            mix_ce_backward_kernel,
            {
                "g_ptr": "*fp32",
                "z_ptr": t,
                "lse_ptr": "*fp32",
                "a_ptr": "*i64",
                "b_ptr": "*i64",
                "lam_ptr": "*fp32",
                "out_ptr": t,
                "n_cols": "i32",
                "smoothing": "fp32",
            },
            {"BLOCK": 4096},
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            soft_ce_forward_kernel,
            {"z_ptr": t, "t_ptr": t, "loss_ptr": "*fp32", "stats_ptr": "*fp32", "n_cols": "i32"},
            {"BLOCK": 4096},
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            soft_ce_backward_kernel,
            {"g_ptr": "*fp32", "z_ptr": t, "stats_ptr": "*fp32", "t_ptr": t, "out_ptr": t, "n_cols": "i32"},
            {"BLOCK": 4096},
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            mix_bce_forward_kernel,
            {
                "z_ptr": t,
                "a_ptr": "*i64",
                "b_ptr": "*i64",
                "lam_ptr": "*fp32",
                "weight_ptr": "*fp32",
                "pos_weight_ptr": "*fp32",
                "loss_ptr": "*fp32",
                "n_cols": "i32",
                "smoothing": "fp32",
                "threshold": "fp32",
            },
            _BCE_FLAGS,
        )
        for t in _LOSS_FLOAT
    ]
    + [
        (
            mix_bce_backward_kernel,
            {
                "g_ptr": "*fp32",
                "z_ptr": t,
                "a_ptr": "*i64",
                "b_ptr": "*i64",
                "lam_ptr": "*fp32",
                "weight_ptr": "*fp32",
                "pos_weight_ptr": "*fp32",
                "out_ptr": t,
                "n_cols": "i32",
                "smoothing": "fp32",
                "threshold": "fp32",
            },
            _BCE_FLAGS,
        )
        for t in _LOSS_FLOAT
    ]
)
