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

# Elements per chunk: large enough to amortise per-op overhead, small enough to stay in cache.
_CHUNK = 1 << 18


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
    """Mix every sample with its partner (see the module docstring); the output keeps x's memory format."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x4, out4 = as_nchw(x), as_nchw(out)
    batch, _, height, width = x4.shape
    per_sample = x4[0].numel()
    step = max(1, _CHUNK // per_sample)
    ws_all, wo_all = w_self.tolist(), w_other.tolist()
    has_box = ((box[:, 1] > box[:, 0]) & (box[:, 3] > box[:, 2])).tolist()
    ctype = compute_dtype(x.dtype)
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        rows = slice(start, stop)
        ws, wo, boxed = ws_all[rows], wo_all[rows], has_box[rows]
        if all(w == 1.0 for w in ws) and all(w == 0.0 for w in wo):
            out4[rows].copy_(x4[rows])  # CutMix samples and unmixed samples: a copy, then paste the boxes
        else:
            xs = x4[rows].to(ctype)
            ws_t = torch.tensor(ws, dtype=torch.float32, device=x.device).to(ctype).view(-1, 1, 1, 1)
            wo_t = torch.tensor(wo, dtype=torch.float32, device=x.device).to(ctype).view(-1, 1, 1, 1)
            xp = x4.index_select(0, partner[rows]).to(ctype)
            y = xs * ws_t
            y.add_(torch.where(wo_t != 0, xp * wo_t, 0.0))
            out4[rows].copy_(_to_output(y, x.dtype))
        for i in range(start, stop):
            if boxed[i - start]:
                y0, y1, c0, c1 = box[i].tolist()
                j = int(partner[i])
                out4[i, :, y0:y1, c0:c1] = x4[j, :, y0:y1, c0:c1]
    return out


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


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def mix_cross_entropy(
    logits: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor, lam: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row ``lam * CE_s(z, a) + (1 - lam) * CE_s(z, b)`` and the row log-sum-exp, both float32 ``[B]``.

    .. math:: \ell_b = \mathrm{lse}(z_b) - (1-s)\,(\lambda_b z_{b,a} + (1-\lambda_b) z_{b,b'}) - s\,\bar z_b

    (``CE_s`` is cross-entropy against the one-hot smoothed to ``1 - s + s/C`` / ``s/C``; ``\bar z`` the row mean.)
    """
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    lam = lam.to(acc)
    for rows in _row_chunks(n, c):
        z = logits[rows].to(acc)
        lse_r = torch.logsumexp(z, dim=1)
        za = z.gather(1, target_a[rows].view(-1, 1)).squeeze(1)
        zb = z.gather(1, target_b[rows].view(-1, 1)).squeeze(1)
        lr = lam[rows]
        picked = lr * za + (1.0 - lr) * zb
        row = lse_r - (1.0 - smoothing) * picked
        if smoothing:
            row = row - smoothing * z.mean(dim=1)
        loss[rows] = row
        lse[rows] = lse_r
    return loss, lse


def mix_cross_entropy_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: float,
) -> torch.Tensor:
    """``grad[b] * (softmax(z_b) - s/C - (1-s) (lam_b e_a + (1-lam_b) e_b))`` in logits' dtype."""
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = grad.to(acc)
    lam = lam.to(acc)
    for rows in _row_chunks(n, c):
        p = torch.sub(logits[rows].to(acc), lse[rows].view(-1, 1))
        p.exp_()
        if smoothing:
            p.sub_(smoothing / c)
        gr = g[rows]
        p.mul_(gr.view(-1, 1))
        lr = lam[rows]
        p.scatter_add_(1, target_a[rows].view(-1, 1), (-(1.0 - smoothing) * lr * gr).view(-1, 1))
        p.scatter_add_(1, target_b[rows].view(-1, 1), (-(1.0 - smoothing) * (1.0 - lr) * gr).view(-1, 1))
        out[rows] = p
    return out


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row ``-sum_c t_c log_softmax(z)_c = lse(z) sum_c t_c - sum_c t_c z_c`` (float32 ``[B]``) and the row
    statistics the backward needs, float32 ``[B, 2]`` = ``(lse(z), sum_c t_c)``."""
    n, c = logits.shape
    acc = compute_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    stats = torch.empty(n, 2, dtype=acc, device=logits.device)
    for rows in _row_chunks(n, c):
        z = logits[rows].to(acc)
        t = target[rows].to(acc)
        lse_r = torch.logsumexp(z, dim=1)
        t_sum = t.sum(dim=1)
        loss[rows] = lse_r * t_sum - (t * z).sum(dim=1)
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
    for rows in _row_chunks(n, c):
        t = target[rows].to(acc)
        p = torch.sub(logits[rows].to(acc), stats[rows, 0].view(-1, 1))
        p.exp_()
        p.mul_(stats[rows, 1].view(-1, 1)).sub_(t).mul_(g[rows].view(-1, 1))
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
    for rows in _row_chunks(n, c):
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
    for rows in _row_chunks(n, c):
        t = _bce_targets(rows, c, target_a, target_b, lam, smoothing, threshold).to(acc)
        z = logits[rows].to(acc)
        lw = 1.0 if pos_weight is None else 1.0 + (pos_weight.to(acc) - 1.0) * t
        d = (1.0 - t) - lw * torch.sigmoid(-z)
        if weight is not None:
            d = d * weight.to(acc)
        out[rows] = d * g[rows].view(-1, 1)
    return out
