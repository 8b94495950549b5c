"""Reference MixUp/CutMix mixing and mixed-label losses (CPU path, test oracle, benchmark baseline).

Everything the kernels compute is defined here in plain PyTorch, and the CPU path runs these functions.
They are written to be fast on a CPU as well as clear: work is done in row (or sample) chunks that stay in cache,
with per-sample scalars broadcast, so no function allocates more than one output of the input's size.

The mixing contract (``mix_apply``), for a batch ``x`` of shape ``[B, ..., H, W]`` (the box lives on the last two
dims; a 2-D ``[B, D]`` batch is read as ``[B, 1, 1, D]``) and per-sample ``w_self``, ``w_other`` (float32),
``partner`` (int64, a permutation of ``0..B-1``) and ``box = (y0, y1, x0, x1)`` (int64, half-open, empty allowed)::

    out[b, ..., h, w] = x[partner[b], ..., h, w]                          if (h, w) in box[b]
                      = x[b] * w_self[b] + x[partner[b]] * w_other[b]     otherwise, if w_other[b] != 0
                      = x[b] * w_self[b]                                  otherwise (partner not read)

computed in float32 (float64 for float64 input) and rounded once to x's dtype (uint8: rounded half to even and
clamped to [0, 255]). The two products and the sum are separately rounded float32 operations, which is what
timm's ``x * lam + x_flip * (1 - lam)`` computes for float32 images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Samples of at least this many elements are mixed one at a time (memory read about once, no batch-sized
# temporaries); smaller ones in chunks of about this many elements, with per-sample weights broadcast.
_CHUNK = 1 << 17
# Elements per row block of the losses: few, large fused row ops (log_softmax, softmax) beat many small ones.
_LOSS_CHUNK = 1 << 23


# ------------------------------------------------------------------------------------------------ mixing
def as_nchw(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` ``[B, ..., H, W]`` as ``[B, M, H, W]`` (``[B, D]`` as ``[B, 1, 1, D]``); 4-D tensors as they are."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x.reshape(x.shape[0], 1, 1, x.shape[1])
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_output(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(dtype)
    return y.to(dtype)


def box_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean ``[n, 1, H, W]``: True inside each sample's half-open box ``(y0, y1, x0, x1)``."""
    dev = box.device
    hh = torch.arange(height, device=dev).view(1, 1, height, 1)
    ww = torch.arange(width, device=dev).view(1, 1, 1, width)
    b = box.view(-1, 4, 1, 1, 1)
    return (hh >= b[:, 0]) & (hh < b[:, 1]) & (ww >= b[:, 2]) & (ww < b[:, 3])


def mix_apply(
    x: torch.Tensor, w_self: torch.Tensor, w_other: torch.Tensor, partner: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    """Mix every sample with its partner (see the module docstring); the output keeps x's memory format.

    Large samples are mixed one at a time with two or three whole-sample ops (a multiply into the output, the
    partner's weighted copy added, the box pasted as a slice), so memory is read about once and nothing of the
    batch's size is allocated; small samples are mixed in chunks of the batch.
    """
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x4, out4 = as_nchw(x), as_nchw(out)
    batch = x4.shape[0]
    per_sample = x4[0].numel()
    ws_all, wo_all = w_self.tolist(), w_other.tolist()
    partners, boxes = partner.tolist(), box.tolist()
    step = max(1, _CHUNK // per_sample)
    for start in range(0, batch, step):
        rows = slice(start, min(batch, start + step))
        if step == 1:
            _mix_one(x4, out4, start, partners[start], ws_all[start], wo_all[start])
        else:
            _mix_rows(x4, out4, rows, partner[rows], ws_all[rows], wo_all[rows])
        for i in range(rows.start, rows.stop):
            y0, y1, c0, c1 = boxes[i]
            if y1 > y0 and c1 > c0:
                out4[i, :, y0:y1, c0:c1] = x4[partners[i], :, y0:y1, c0:c1]
    return out


def _mix_one(x4: torch.Tensor, out4: torch.Tensor, i: int, j: int, ws: float, wo: float) -> None:
    """``out[i] = x[i] * ws (+ x[j] * wo when wo != 0)`` for one large sample: two or three whole-sample ops."""
    ctype = compute_dtype(x4.dtype)
    if x4.dtype == ctype:  # write straight into the output
        if ws == 1.0:
            out4[i].copy_(x4[i])  # x * 1 == x exactly
        else:
            torch.mul(x4[i], ws, out=out4[i])
        if wo != 0.0:
            out4[i].add_(x4[j] * wo)
        return
    y = x4[i].to(ctype) * ws
    if wo != 0.0:
        y.add_(x4[j].to(ctype) * wo)
    out4[i].copy_(_to_output(y, x4.dtype))


def _mix_rows(
    x4: torch.Tensor, out4: torch.Tensor, rows: slice, partner: torch.Tensor, ws: list[float], wo: list[float]
) -> None:
    """``out[rows] = x[rows] * ws (+ x[partner] * wo where wo != 0)``: products and sum each rounded (timm's order)."""
    ctype = compute_dtype(x4.dtype)
    shape = (-1, 1, 1, 1)
    ws_t = torch.tensor(ws, dtype=torch.float32, device=x4.device).to(ctype).view(shape)
    direct = x4.dtype == ctype  # float32 / float64: write straight into the output
    y = torch.mul(x4[rows], ws_t, out=out4[rows]) if direct else x4[rows].to(ctype) * ws_t
    if any(w != 0.0 for w in wo):
        wo_t = torch.tensor(wo, dtype=torch.float32, device=x4.device).to(ctype).view(shape)
        xp = x4.index_select(0, partner).to(ctype).mul_(wo_t)
        unused = [k for k, w in enumerate(wo) if w == 0.0]
        if unused:  # those partners are not read at all (a NaN there must not leak in)
            xp.index_fill_(0, torch.tensor(unused, device=x4.device), 0.0)
        y.add_(xp)
    if not direct:
        out4[rows].copy_(_to_output(y, x4.dtype))


def mix_apply_backward(
    grad: torch.Tensor, w_self: torch.Tensor, w_other: torch.Tensor, partner: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    """Gradient of :func:`mix_apply` w.r.t. ``x`` (the transpose of the mix)::

    gx[b] += grad[b] * w_self[b]   outside box[b]
    gx[partner[b]] += grad[b] * (1 inside box[b], w_other[b] outside)
    """
    g4 = as_nchw(grad)
    _, _, height, width = g4.shape
    ctype = compute_dtype(grad.dtype)
    inside = box_mask(box, height, width)
    ws = w_self.to(ctype).view(-1, 1, 1, 1)
    wo = w_other.to(ctype).view(-1, 1, 1, 1)
    g = g4.to(ctype)
    own = torch.where(inside, 0.0, g * ws)
    other = torch.where(inside, g, torch.where(wo != 0, g * wo, 0.0))
    gx = own.index_add_(0, partner, other)
    out = torch.empty_like(grad)
    as_nchw(out).copy_(gx)
    return out


# ------------------------------------------------------------------------------------------------ targets
def smoothing_values(num_classes: int, smoothing: float) -> tuple[float, float]:
    """timm's (off, on) label values: off = s / C, on = 1 - s + off."""
    off = smoothing / num_classes
    return off, 1.0 - smoothing + off


def mixed_one_hot(
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    w_self: torch.Tensor,
    w_other: torch.Tensor,
    num_classes: int,
    smoothing: float,
) -> torch.Tensor:
    """Dense float32 targets ``y_a * w_self + y_b * w_other`` with smoothed one-hots ``y`` (timm's ``mixup_target``).

    Built as a fill plus two scatters, with every value rounded exactly as timm's dense float32 arithmetic rounds it.
    """
    off, on = smoothing_values(num_classes, smoothing)
    dev = target_a.device
    ws, wo = w_self.float(), w_other.float()
    off_t = torch.tensor(off, dtype=torch.float32, device=dev)
    on_t = torch.tensor(on, dtype=torch.float32, device=dev)
    same = target_a == target_b
    base = off_t * ws + off_t * wo
    at_a = on_t * ws + torch.where(same, on_t, off_t) * wo
    at_b = torch.where(same, on_t, off_t) * ws + on_t * wo
    out = base.unsqueeze(1).repeat(1, num_classes)
    out.scatter_(1, target_b.view(-1, 1), at_b.view(-1, 1))
    out.scatter_(1, target_a.view(-1, 1), at_a.view(-1, 1))
    return out


# ------------------------------------------------------------------------------------------------ losses
def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """Per-row losses and statistics are float32 (float64 for float64 logits)."""
    return compute_dtype(logits.dtype)


def _row_chunks(n_rows: int, n_cols: int, chunk: int = 0):
    step = max(1, (chunk or _CHUNK) // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def mix_cross_entropy(
    logits: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor, lam: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row ``lam * CE_s(z, a) + (1 - lam) * CE_s(z, b)`` and the row log-sum-exp (float32 ``[B]``; float64
    for float64 logits).

    .. math:: \ell_b = \mathrm{lse}(z_b) - (1-s)\,(\lambda_b z_{b,a} + (1-\lambda_b) z_{b,b'}) - s\,\bar z_b

    (``CE_s``: cross-entropy against the one-hot smoothed to ``1 - s + s/C`` / ``s/C``; ``\bar z``: the row mean.)
    Computed from ``log_softmax`` over row blocks of at most ``_LOSS_CHUNK`` elements.
    """
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    lam = lam.to(acc)
    for rows in _row_chunks(n, c, _LOSS_CHUNK):
        z = logits[rows].to(acc)
        logp = torch.log_softmax(z, dim=1)
        a, b = target_a[rows].view(-1, 1), target_b[rows].view(-1, 1)
        lpa, lpb = logp.gather(1, a).squeeze(1), logp.gather(1, b).squeeze(1)
        lr = lam[rows]
        row = (lr * lpa + (1.0 - lr) * lpb) * -(1.0 - smoothing)
        if smoothing:
            row -= smoothing * logp.mean(dim=1)
        loss[rows] = row
        lse[rows] = z.gather(1, a).squeeze(1) - lpa
    return loss, lse


def _softmax_into(out_rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """softmax(z, 1), written into ``out_rows`` when it has z's dtype (no extra pass), else a new tensor."""
    if out_rows.dtype == z.dtype and out_rows.is_contiguous():
        return torch.ops.aten._softmax.out(z, 1, False, out=out_rows)
    return torch.softmax(z, dim=1)


def mix_cross_entropy_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
) -> torch.Tensor:
    """``grad[b] * (softmax(z_b) - s/C - (1-s) (lam_b e_a + (1-lam_b) e_b))`` in logits' dtype.

    (``softmax(z_b) = exp(z_b - lse_b)``; the CPU path recomputes it with ``softmax`` straight into the output.)
    """
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = grad.to(acc)
    lam = lam.to(acc)
    for rows in _row_chunks(n, c, _LOSS_CHUNK):
        p = _softmax_into(out[rows], logits[rows].to(acc))
        gr = g[rows]
        if smoothing:  # p * g - (s / C) g in one pass
            torch.addcmul((-(smoothing / c) * gr).view(-1, 1), p, gr.view(-1, 1), out=p)
        else:
            p.mul_(gr.view(-1, 1))
        lr = lam[rows]
        p.scatter_add_(1, target_a[rows].view(-1, 1), (-(1.0 - smoothing) * lr * gr).view(-1, 1))
        p.scatter_add_(1, target_b[rows].view(-1, 1), (-(1.0 - smoothing) * (1.0 - lr) * gr).view(-1, 1))
        if p.data_ptr() != out[rows].data_ptr():
            out[rows] = p
    return out


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row ``-sum_c t_c log_softmax(z)_c = lse(z) sum_c t_c - sum_c t_c z_c`` and the row statistics the
    backward needs, ``[B, 2] = (lse(z), sum_c t_c)`` (float32; float64 for float64 logits)."""
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    stats = torch.empty(n, 2, dtype=acc, device=logits.device)
    for rows in _row_chunks(n, c, _LOSS_CHUNK):
        z = logits[rows].to(acc)
        t = target[rows].to(acc)
        first = z[:, :1]
        lse_r = (first - torch.log_softmax(z, dim=1)[:, :1]).squeeze(1)  # one fused row op, no logsumexp temps
        t_sum = t.sum(dim=1)
        dot = torch.bmm(t.unsqueeze(1), z.unsqueeze(2)).view(-1)  # row dot products, no B x C temporary
        loss[rows] = lse_r * t_sum - dot
        stats[rows, 0] = lse_r
        stats[rows, 1] = t_sum
    return loss, stats


def soft_target_cross_entropy_backward(
    grad: torch.Tensor, logits: torch.Tensor, stats: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the logits: ``grad[b] * (softmax(z_b) * sum_c t_bc - t_b)`` in logits' dtype."""
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = grad.to(acc)
    for rows in _row_chunks(n, c, _LOSS_CHUNK):
        t = target[rows].to(acc)
        p = _softmax_into(out[rows], logits[rows].to(acc))
        p.mul_(stats[rows, 1].view(-1, 1)).sub_(t).mul_(g[rows].view(-1, 1))
        if p.data_ptr() != out[rows].data_ptr():
            out[rows] = p
    return out


def _bce_targets(
    rows: slice,
    n_cols: int,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
    threshold: float | None,
) -> torch.Tensor:
    lam_r = lam[rows].float()
    t = mixed_one_hot(target_a[rows], target_b[rows], lam_r, 1.0 - lam_r, n_cols, smoothing)
    if threshold is not None:
        t = t.gt(threshold).float()
    return t


def mix_binary_cross_entropy(
    logits: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
    threshold: float | None,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row sums over classes of ``binary_cross_entropy_with_logits(z, t, weight, pos_weight)`` (float32 ``[B]``),
    ``t`` = the mixed smoothed one-hot of :func:`mixed_one_hot` (``w_self = lam``), optionally thresholded."""
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    w = None if weight is None else weight.to(acc)
    pw = None if pos_weight is None else pos_weight.to(acc)
    for rows in _row_chunks(n, c, _LOSS_CHUNK):
        t = _bce_targets(rows, c, target_a, target_b, lam, smoothing, threshold).to(acc)
        z = logits[rows].to(acc)
        loss[rows] = F.binary_cross_entropy_with_logits(z, t, w, pos_weight=pw, reduction="none").sum(dim=1)
    return loss


def mix_binary_cross_entropy_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
    threshold: float | None,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> torch.Tensor:
    """``grad[b] * w_c * ((1 - t) - (1 + (pw_c - 1) t) * sigmoid(-z))`` in logits' dtype."""
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = grad.to(acc)
    for rows in _row_chunks(n, c, _LOSS_CHUNK):
        t = _bce_targets(rows, c, target_a, target_b, lam, smoothing, threshold).to(acc)
        z = logits[rows].to(acc)
        lw = 1.0 if pos_weight is None else 1.0 + (pos_weight.to(acc) - 1.0) * t
        d = (1.0 - t) - lw * torch.sigmoid(-z)
        if weight is not None:
            d = d * weight.to(acc)
        out[rows] = d * g[rows].view(-1, 1)
    return out
