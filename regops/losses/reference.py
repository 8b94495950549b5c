"""Reference row-softmax losses: the regularized cross-entropy, its linear (LM-head) form and R-Drop's symmetric KL.

CPU path, test oracle and benchmark baseline of :mod:`regops.losses` (the mixed / soft-target losses:
:mod:`regops.losses.reference_mixed`). Every function works on row blocks of at
most ``_CHUNK`` elements with a handful of fused torch row ops, so the memory it needs beyond its inputs and
outputs is a few blocks (``O(rows)`` per-row numbers otherwise), and nothing of size ``rows x V`` is built but
the gradient the backward returns.

The regularized cross-entropy of one row (the contract the Triton kernels follow), with ``x`` the row's
logits, ``z = softcap * tanh(scale * x / softcap)`` (``z = scale * x`` without a cap), ``K`` classes,
``p = softmax(z)``, ``lse = logsumexp(z)``, sparse targets ``(i_j, t_j)`` (one label: ``t = 1``; a mixed
pair: ``lam, 1 - lam``; a top-k teacher: its probabilities), class weights ``w`` (all 1 without), and
``omega_j = t_j w_{i_j}``, ``c = sum_j omega_j`` (``c = 1`` without class weights)::

    ce    = sum_j omega_j (lse - z_{i_j})                         cross-entropy against the sparse target
    u     = (sum_k w_k (lse - z_k)) / K                           uniform (label-smoothing) target
    row   = (1 - a) ce + a u
          + c * ( m (z_max - mean_k z_k)                          MaxSup
                + l lse^2                                         z-loss
                - b H(p)                                          confidence penalty
                + eta D )                                         decoupled mixup (pairs only)
    D     = lam (log(p_a + r) - log p_a) + (1 - lam) (log(p_b + r) - log p_b),  r = sum_{k not in {a, b}} p_k

(``a, m, l, b, eta``, the cap and the scale: :class:`~regops.losses._options.LossOptions`, the ops' ``options``)
and the op returns ``row_weight * row`` per row (``row_weight``: per-token weights, 0 for ignored rows).
Its gradient with respect to ``z`` is::

    (1 - a)(c_sp p - sum_j omega_j e_{i_j}) + a (W p - w) / K
          + c * ( m (e_argmax - 1/K) + 2 l lse p + b p (z - E_p z) + eta dD )

with ``c_sp = sum_j omega_j``, ``W = sum_k w_k``, ``dD_k = p_k (lam / (p_a + r) + (1 - lam) / (p_b + r))``
off ``{a, b}``, ``dD_a = lam (sigma_a - 1)``, ``dD_b = (1 - lam)(sigma_b - 1)``, ``sigma_a = p_a / (p_a + r)``,
then times ``dz/dx = scale (1 - (z / softcap)^2)``.

Per-row statistics (``stats`` columns, float32; float64 for float64 logits): ``lse``, entropy ``H(p)``, EL2N
``||p - e_y||_2``, max probability, margin ``z_y - max_{k != y} z_k`` (``y = i_0``), and what the backward
needs: ``E_p z``, the decoupled coefficient and ``sigma_a``, ``sigma_b``.
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype
from regops.losses._options import LossOptions
from regops.losses._targets import label_targets, reduce_rows, row_grads

# Elements per row block: a few blocks of float32 temporaries stay well under the 64 MiB the CPU bar allows.
_CHUNK = 1 << 22
# The linear form's row blocks are larger: each block's weight-gradient update reads and writes all of ``d weight``
# (a matmul with the block's rows as inner dimension), so fewer, taller blocks cut that traffic.
_LINEAR_CHUNK = 1 << 24

STAT_NAMES = ("lse", "entropy", "el2n", "max_prob", "margin", "mean_z", "dec_coef", "sigma_a", "sigma_b")
LSE, ENTROPY, EL2N, MAX_PROB, MARGIN, MEAN_Z, DEC_COEF, SIGMA_A, SIGMA_B = range(len(STAT_NAMES))
N_STATS = len(STAT_NAMES)


def row_chunks(n_rows: int, n_cols: int, chunk: int = 0):
    step = max(1, (chunk or _CHUNK) // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def transform(x: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """``softcap * tanh(scale * x / softcap)`` (``scale * x`` without a cap); ``x`` itself when both are off."""
    if scale != 1.0:
        x = x * scale
    if softcap:
        x = torch.tanh(x / softcap).mul_(softcap)
    return x


def _row_weights(index, tweight, class_weight, acc):
    """(omega [r, J], c_sp [r], c_row [r]): class-weighted target weights, their sum, the regularizers' weight."""
    t = tweight.to(acc)
    if class_weight is None:
        return t, t.sum(1), torch.ones(t.shape[0], dtype=acc, device=t.device)
    omega = t * class_weight.to(acc)[index]
    c_sp = omega.sum(1)
    return omega, c_sp, c_sp


def cross_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    options: list[float],
    want_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row regularized cross-entropy (see the module docstring).

    Args:
        logits: ``[N, V]`` float. index: int64 ``[N, J]`` target classes (in range; ignored rows point at 0).
        tweight: ``[N, J]`` target weights. row_weight: ``[N]`` (0 for ignored rows).
        class_weight: ``[V]`` or None. options: :meth:`LossOptions.values`.
        want_stats: also fill entropy, EL2N, max probability and margin.

    Returns:
        ``(loss [N], stats [N, N_STATS], argmax int64 [N])``, loss and stats float32 (float64 for float64).
    """
    o = LossOptions.of(options)
    smoothing, maxsup, z_loss, confidence, decoupled = o.smoothing, o.maxsup, o.z_loss, o.confidence, o.decoupled
    n, k = logits.shape
    acc = acc_dtype(logits)
    dev = logits.device
    loss = torch.zeros(n, dtype=acc, device=dev)
    stats = torch.zeros(n, N_STATS, dtype=acc, device=dev)
    argmax = torch.zeros(n, dtype=torch.long, device=dev)
    if n == 0:
        return loss, stats, argmax
    cw = None if class_weight is None else class_weight.to(acc)
    need_max = bool(maxsup) or want_stats
    need_p = bool(confidence) or want_stats or bool(decoupled)
    # Two reusable block buffers: a fresh block per step would page-fault its memory in every time.
    step = max(1, _CHUNK // max(1, k))
    ws_lp = torch.empty((min(step, n), k), dtype=acc, device=dev)
    ws_p = torch.empty_like(ws_lp) if need_p else None
    for rows in row_chunks(n, k):
        z = transform(logits[rows].to(acc), o.scale, o.softcap)
        idx = index[rows]
        omega, _, c_row = _row_weights(idx, tweight[rows], cw, acc)
        lp = torch.ops.aten._log_softmax.out(z, 1, False, out=ws_lp[: z.shape[0]])
        lp_t = lp.gather(1, idx)  # log p at the targets [r, J]
        lse = z[:, 0] - lp[:, 0]
        row = -(omega * lp_t).sum(1)
        if smoothing:
            u = -(lp @ cw) / k if cw is not None else -lp.mean(1)
            row = row.mul_(1.0 - smoothing).add_(u, alpha=smoothing)
        reg = torch.zeros_like(lse)
        if need_max:
            lp_max, amax = lp.max(dim=1)
            argmax[rows] = amax
            if maxsup:
                reg += maxsup * (lp_max - lp.mean(1))
        if z_loss:
            reg += z_loss * lse.square()
        if need_p:
            p = torch.exp(lp, out=ws_p[: z.shape[0]])
            ent = -torch.bmm(p.unsqueeze(1), lp.unsqueeze(2)).view(-1)
            stats[rows, ENTROPY] = ent
            stats[rows, MEAN_Z] = lse - ent
            if confidence:
                reg -= confidence * ent
            if decoupled:
                a, b = idx[:, 0:1], idx[:, 1:2]
                lam, lam_b = tweight[rows, 0].to(acc), tweight[rows, 1].to(acc)
                r = p.scatter(1, a, 0.0).scatter_(1, b, 0.0).sum(1)
                lpa, lpb = lp_t[:, 0], lp_t[:, 1]
                pa, pb = lpa.exp(), lpb.exp()
                dec = lam * (torch.log(pa + r) - lpa) + lam_b * (torch.log(pb + r) - lpb)
                reg += decoupled * dec
                stats[rows, DEC_COEF] = lam / (pa + r) + lam_b / (pb + r)
                stats[rows, SIGMA_A] = pa / (pa + r)
                stats[rows, SIGMA_B] = pb / (pb + r)
            if want_stats:
                y = idx[:, 0:1]
                py = p.gather(1, y).squeeze(1)
                p.scatter_(1, y, 0.0)  # p without the label column
                rest = p.sum(1)
                stats[rows, EL2N] = (p.square_().sum(1) + rest.square()).sqrt()
                stats[rows, MAX_PROB] = lp_max.exp()
                lp_y = lp_t[:, 0]
                lp.scatter_(1, y, float("-inf"))
                stats[rows, MARGIN] = lp_y - lp.max(1).values if k > 1 else torch.full_like(lp_y, float("inf"))
                del py
        row = row + c_row * reg
        loss[rows] = row * row_weight[rows].to(acc)
        stats[rows, LSE] = lse
    return loss, stats, argmax


def softmax_into(out_rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """softmax(z, 1), written into ``out_rows`` when it has z's dtype (no extra pass), else a new tensor."""
    if out_rows.dtype == z.dtype and out_rows.is_contiguous():
        return torch.ops.aten._softmax.out(z, 1, False, out=out_rows)
    return torch.softmax(z, dim=1)


def cross_entropy_grad_z(
    g: torch.Tensor,
    z: torch.Tensor,
    index: torch.Tensor,
    tweight: torch.Tensor,
    cw: torch.Tensor | None,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    o: LossOptions,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``g[:, None] * d(row)/dz`` for one block of transformed logits ``z`` (compute dtype), written into ``out``
    (a block of the gradient, reused for the softmax when the dtypes agree)."""
    smoothing, maxsup, z_loss, confidence, decoupled = o.smoothing, o.maxsup, o.z_loss, o.confidence, o.decoupled
    r, k = z.shape
    acc = z.dtype
    omega, c_sp, c_row = _row_weights(index, tweight, cw, acc)
    lse = stats[:, LSE]
    p = softmax_into(out, z) if out is not None else torch.softmax(z, dim=1)
    # dense part: p * (A + B z) + const (+ outer(coef_w, w) with class weights), all times g
    a_coef = (1.0 - smoothing) * c_sp
    if smoothing:
        a_coef = a_coef + smoothing * (cw.sum() / k if cw is not None else 1.0)
    reg_a = torch.zeros_like(lse)
    if z_loss:
        reg_a += 2.0 * z_loss * lse
    if confidence:
        reg_a -= confidence * stats[:, MEAN_Z]
    if decoupled:
        reg_a += decoupled * stats[:, DEC_COEF]
    a_coef = (a_coef + c_row * reg_a) * g
    const = torch.zeros_like(lse)
    if maxsup:
        const -= maxsup * c_row / k
    if smoothing and cw is None:
        const -= smoothing / k
    const = const * g
    if confidence:  # p (A + B z) + C
        p.mul_(torch.addcmul(a_coef.unsqueeze(1), z, (confidence * c_row * g).unsqueeze(1))).add_(const.unsqueeze(1))
    else:  # p A + C in one pass
        torch.addcmul(const.unsqueeze(1), p, a_coef.unsqueeze(1), out=p)
    if smoothing and cw is not None:
        p.addr_(g, cw, alpha=-smoothing / k)
    # sparse corrections
    p.scatter_add_(1, index, omega * (-(1.0 - smoothing) * g).unsqueeze(1))
    if maxsup:
        p.scatter_add_(1, argmax.view(-1, 1), (maxsup * c_row * g).view(-1, 1))
    if decoupled:
        a, b = index[:, 0:1], index[:, 1:2]
        lam, lam_b = tweight[:, 0].to(acc), tweight[:, 1].to(acc)
        coef = stats[:, DEC_COEF]
        pa, pb = (z.gather(1, a).squeeze(1) - lse).exp(), (z.gather(1, b).squeeze(1) - lse).exp()
        scale = decoupled * c_row * g
        fix_a = lam * (stats[:, SIGMA_A] - 1.0) - pa * coef
        fix_b = lam_b * (stats[:, SIGMA_B] - 1.0) - torch.where(a.squeeze(1) != b.squeeze(1), pb * coef, 0.0)
        p.scatter_add_(1, a, (scale * fix_a).view(-1, 1))
        p.scatter_add_(1, b, (scale * fix_b).view(-1, 1))
    return p


def cross_entropy_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    options: list[float],
) -> torch.Tensor:
    """Gradient of ``sum_i grad[i] * loss[i]`` with respect to ``logits`` (logits' dtype)."""
    o = LossOptions.of(options)
    softcap, scale = o.softcap, o.scale
    n, k = logits.shape
    acc = acc_dtype(logits)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    g_all = grad.to(acc) * row_weight.to(acc)
    cw = None if class_weight is None else class_weight.to(acc)
    direct = out.dtype == acc and not (softcap or scale != 1.0)
    for rows in row_chunks(n, k):
        x = logits[rows].to(acc)
        z = transform(x, scale, softcap)
        dz = cross_entropy_grad_z(
            g_all[rows], z, index[rows], tweight[rows], cw, stats[rows], argmax[rows], o,
            out=out[rows] if direct else None,
        )  # fmt: skip
        if softcap:
            dz.mul_(1.0 - (z / softcap).square_()).mul_(scale)
        elif scale != 1.0:
            dz.mul_(scale)
        if dz.data_ptr() != out[rows].data_ptr():
            out[rows] = dz
    return out


# ------------------------------------------------------------------------------------------------ integer labels
def labels_forward(rows_fn, logits, target, class_weight, ignore_index, options, reduction):
    """``label_cross_entropy`` from a row op with ``cross_entropy``'s signature (this module's, or a backend's)."""
    tg = label_targets(target, logits.shape[1], acc_dtype(logits), ignore_index, class_weight)
    rows, stats, argmax = rows_fn(logits, tg.index, tg.tweight, tg.row_weight, tg.class_weight, options, False)
    return reduce_rows(rows, reduction, tg.denominator, rows.shape), stats, argmax


def labels_backward(
    rows_backward_fn, grad, logits, target, class_weight, stats, argmax, ignore_index, options, reduction
):
    """``label_cross_entropy_backward`` from a row op with ``cross_entropy_backward``'s signature."""
    tg = label_targets(target, logits.shape[1], acc_dtype(logits), ignore_index, class_weight)
    g = row_grads(grad, reduction, tg.denominator, logits.shape[0])
    return rows_backward_fn(g, logits, tg.index, tg.tweight, tg.row_weight, tg.class_weight, stats, argmax, options)


def label_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    ignore_index: int,
    options: list[float],
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cross_entropy` of integer labels ``target`` ``[N]`` (``ignore_index`` rows count nothing), reduced:
    ``(loss, stats [N, N_STATS], argmax [N])``, the loss 0-dim for ``"mean"`` / ``"sum"`` (0 when every row is
    ignored), ``[N]`` for ``"none"``; the statistics as ``want_stats=False`` leaves them."""
    return labels_forward(cross_entropy, logits, target, class_weight, ignore_index, options, reduction)


def label_cross_entropy_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    ignore_index: int,
    options: list[float],
    reduction: str,
) -> torch.Tensor:
    """Gradient of ``grad * loss`` (the reduced loss of :func:`label_cross_entropy`) with respect to ``logits``."""
    return labels_backward(
        cross_entropy_backward, grad, logits, target, class_weight, stats, argmax, ignore_index, options, reduction
    )


# ------------------------------------------------------------------------------------------------ linear CE
def _logits_block(hidden, weight, bias, rows, acc):
    z = hidden[rows] @ weight.t()
    if bias is not None:
        z = z + bias
    return z if z.dtype == acc else z.to(acc)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    options: list[float],
    want_stats: bool,
    *,
    ce=None,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy` (or ``ce``, a kernel with its signature) of ``hidden @ weight.T + bias``
    (``[N, H] x [V, H]``), over row blocks of ``chunk / V`` rows (default ``_LINEAR_CHUNK``): one ``[rows, V]``
    block of logits at a time."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden)
    loss = torch.zeros(n, dtype=acc, device=hidden.device)
    stats = torch.zeros(n, N_STATS, dtype=acc, device=hidden.device)
    argmax = torch.zeros(n, dtype=torch.long, device=hidden.device)
    ce = ce or cross_entropy
    for rows in row_chunks(n, v, chunk or _LINEAR_CHUNK):
        z = _logits_block(hidden, weight, bias, rows, hidden.dtype)
        loss[rows], stats[rows], argmax[rows] = ce(
            z, index[rows], tweight[rows], row_weight[rows], class_weight, options, want_stats
        )
    return loss, stats, argmax


def linear_cross_entropy_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    options: list[float],
    *,
    ce_backward=None,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d hidden, d weight, d bias)`` of ``sum_i grad[i] loss[i]``: each block of logits is recomputed,
    its gradient formed in place, and multiplied into ``d hidden`` and accumulated into ``d weight``.

    ``d weight`` and ``d bias`` accumulate in float32 (float64 for float64) and are rounded once at the end.
    """
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden)
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = torch.zeros(v, dtype=acc, device=weight.device)
    w_mm = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    ce_backward = ce_backward or cross_entropy_backward
    for rows in row_chunks(n, v, chunk or _LINEAR_CHUNK):
        z = _logits_block(hidden, weight, bias, rows, hidden.dtype)
        gz = ce_backward(
            grad[rows], z, index[rows], tweight[rows], row_weight[rows], class_weight, stats[rows], argmax[rows],
            options,
        )  # fmt: skip
        torch.mm(gz, w_mm, out=d_hidden[rows])
        h = hidden[rows]
        if acc == gz.dtype:
            d_weight.addmm_(gz.t(), h)
        else:
            d_weight.add_((gz.t() @ h).to(acc))
        if bias is not None:
            d_bias += gz.sum(0, dtype=acc)
        del z, gz
    return d_hidden, d_weight.to(weight.dtype), d_bias.to(bias.dtype if bias is not None else weight.dtype)


def linear_cross_entropy_with_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    options: list[float],
    want_stats: bool,
    *,
    ce=None,
    ce_backward=None,
    chunk: int = 0,
) -> tuple[torch.Tensor, ...]:
    """:func:`linear_cross_entropy` plus, in the same sweep, the gradients of ``sum_i loss_i`` (upstream gradient
    1 per row): ``(loss, stats, argmax, d hidden, d weight, d bias)``. Three matmuls per block instead of the
    four of forward + recomputing backward; exact whenever the upstream gradient is the same for every row
    (``"mean"`` / ``"sum"``): then ``d weight`` scales by it, and ``d hidden`` row by row in any case."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden)
    ce, ce_backward = ce or cross_entropy, ce_backward or cross_entropy_backward
    loss = torch.zeros(n, dtype=acc, device=hidden.device)
    stats = torch.zeros(n, N_STATS, dtype=acc, device=hidden.device)
    argmax = torch.zeros(n, dtype=torch.long, device=hidden.device)
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = torch.zeros(v, dtype=acc, device=weight.device)
    ones = torch.ones(n, dtype=acc, device=hidden.device)
    for rows in row_chunks(n, v, chunk or _LINEAR_CHUNK):
        z = _logits_block(hidden, weight, bias, rows, hidden.dtype)
        idx, tw, rw = index[rows], tweight[rows], row_weight[rows]
        loss[rows], stats[rows], argmax[rows] = ce(z, idx, tw, rw, class_weight, options, want_stats)
        gz = ce_backward(ones[rows], z, idx, tw, rw, class_weight, stats[rows], argmax[rows], options)
        del z
        torch.mm(gz, weight, out=d_hidden[rows])
        h = hidden[rows]
        if acc == gz.dtype:
            d_weight.addmm_(gz.t(), h)
        else:
            d_weight.add_((gz.t() @ h).to(acc))
        if bias is not None:
            d_bias += gz.sum(0, dtype=acc)
        del gz
    return loss, stats, argmax, d_hidden, d_weight.to(weight.dtype), d_bias.to(weight.dtype)


# ------------------------------------------------------------------------------------------------ symmetric KL
def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row :math:`\tfrac12(KL(p_a\|p_b) + KL(p_b\|p_a)) = \tfrac12\sum_v (p_a - p_b)(\log p_a - \log p_b)`.

    ``a``, ``b``: ``[rows, V]`` logits. Returns ``(loss [rows], stats [rows, 4])`` in float32 (float64 for
    float64): stats = ``(lse_a, lse_b, <p_a, d>, <p_b, d>)`` with ``d = log p_a - log p_b``, all the backward needs.
    """
    cd = acc_dtype(a.dtype)
    a32, b32 = a.to(cd), b.to(cd)
    lse_a, lse_b = torch.logsumexp(a32, -1), torch.logsumexp(b32, -1)
    la, lb = a32 - lse_a[:, None], b32 - lse_b[:, None]
    pa, pb = la.exp(), lb.exp()
    d = la - lb
    loss = 0.5 * ((pa - pb) * d).sum(-1)
    stats = torch.stack([lse_a, lse_b, (pa * d).sum(-1), (pb * d).sum(-1)], dim=1)
    return loss, stats


def symmetric_kl_backward(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d loss_r / d a = g_r/2 (p_a (d - <p_a,d>) + p_a - p_b)``, ``d/db = g_r/2 (-p_b (d - <p_b,d>) + p_b - p_a)``."""
    cd = acc_dtype(a.dtype)
    lse_a, lse_b, pad, pbd = (stats[:, i : i + 1].to(cd) for i in range(4))
    la, lb = a.to(cd) - lse_a, b.to(cd) - lse_b
    pa, pb = la.exp(), lb.exp()
    d = la - lb
    g = 0.5 * grad.to(cd)[:, None]
    ga = g * (pa * (d - pad) + pa - pb)
    gb = g * (pb * (pbd - d) + pb - pa)
    return ga.to(a.dtype), gb.to(b.dtype)
