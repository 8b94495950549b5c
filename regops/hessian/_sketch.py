"""Sketched trace estimators: Hutch++ and XTrace. Each returns ``(value, stderr, per-probe samples)``; the
caller wraps them in a :class:`~regops.hessian.TraceEstimate` with the operator's bookkeeping."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from regops.hessian import _probes
from regops.hessian._hvp import HessianOperator
from regops.hessian._probes import ParamLayout
from regops.hessian._results import mean_stderr

Estimate = tuple[float, float, torch.Tensor]
SeedSync = Callable[[torch.Tensor], torch.Tensor]


def probe_cap(layout: ParamLayout) -> int:
    """The most products a sketch can use on ``N`` parameters: ``N`` to span the space, ``N`` more on the basis."""
    return 2 * layout.numel


def _same(seed: torch.Tensor) -> torch.Tensor:
    return seed


def hutchpp(
    op: HessianOperator, layout: ParamLayout, m: int, distribution: str, generator, sync: SeedSync = _same
) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): m//3 probes sketch the range, m//3 products give the exact
    trace on it, the rest estimate the trace of the deflated remainder with Hutchinson. A sketch of ``N`` probes
    spans everything: from ``m >= 2 N`` on, ``2 N`` products give the trace exactly (``probe_cap``). ``sync``
    makes every rank use the same seed (FSDP2)."""
    n = layout.numel
    k, rest = (n, 0) if m >= 2 * n else (m // 3, m - 2 * (m // 3))
    seed = sync(_probes.draw_seed(layout, k + rest, distribution, generator))
    exact = 0.0
    q = None
    if k > 0:
        s = _probes.probe_rows(seed, 0, k, layout, distribution)[:, : layout.numel]
        y = op.matmat(s)
        q, _ = torch.linalg.qr(y.T)  # [N, k], orthonormal columns
        hq = op.matmat(q.T.contiguous())
        exact = (q.T.double() * hq.double()).sum().item()
    if rest == 0:
        return exact, 0.0, torch.empty(0, dtype=torch.float64)
    g = _probes.probe_rows(seed, k, rest, layout, distribution)[:, : layout.numel]
    if q is not None:
        g = g - (g @ q) @ q.T
    hg = op.matmat(g)
    samples = (g.double() * hg.double()).sum(1)
    mean, err = mean_stderr(samples)
    return exact + mean, err, samples


def xtrace(
    op: HessianOperator, layout: ParamLayout, m: int, distribution: str, generator, sync: SeedSync = _same
) -> Estimate:
    r"""XTrace (Epperly, Tropp, Webber 2024): Hutch++ made exchangeable by leaving each probe out in turn.

    With ``k = m // 2`` probes ``Omega``, ``Y = A Omega = QR``, ``Z = A Q``: leaving out probe ``i`` projects
    onto ``Q (I - s_i s_i^T) Q^T``, ``s_i`` the normalised column ``i`` of ``R^{-T}``, and every term reduces to
    ``k x k`` products. Gaussian probes are scaled to norm ``sqrt(N)`` (the paper's improved variant, uniform on
    the sphere: still ``E[w w^T] = I``). At most ``N`` probes are used (``2 N`` products, ``probe_cap``). When
    ``Y`` has numerical rank ``r < k`` (a Hessian of rank below the sketch size, as ReLU networks and small heads
    have), its columns span the Hessian's range, on which the trace is exact: every leave-one-out term is that
    trace (``R`` has no inverse then). ``sync`` makes every rank use the same seed (FSDP2).
    """
    n = layout.numel
    k = min(m // 2, n)
    if k < 2:
        raise ValueError(
            f"regops: method='xtrace' needs num_probes >= 4 and at least 2 trainable parameters, got num_probes={m} "
            f"and N={n}"
        )
    seed = sync(_probes.draw_seed(layout, k, distribution, generator))
    omega = _probes.probe_rows(seed, 0, k, layout, distribution)[:, : layout.numel]
    if distribution == "gaussian":
        omega = omega * (math.sqrt(layout.numel) / omega.double().norm(dim=1, keepdim=True)).to(omega.dtype)
    y = op.matmat(omega)
    q, r = torch.linalg.qr(y.T)
    z = op.matmat(q.T.contiguous())
    qd, zd, od, yd, rd = q.double(), z.double(), omega.double(), y.double(), r.double()
    u, sv, _ = torch.linalg.svd(yd.T, full_matrices=False)
    rank = int((sv > sv[0] * 1e3 * torch.finfo(layout.dtype).eps).sum()) if sv.numel() and sv[0] > 0 else 0
    if rank < k:
        # A U_r = Z^T (Q^T U_r), since the columns of Y (hence U_r) lie in the span of Q.
        exact = (u[:, :rank] * (zd.T @ (qd.T @ u[:, :rank]))).sum().item() if rank else 0.0
        samples = torch.full((k,), exact, dtype=torch.float64)
        return exact, 0.0, samples
    h = qd.T @ zd.T  # [k, k] Q^T A Q
    h = 0.5 * (h + h.T)
    w = qd.T @ od.T  # [k, k]: column i = Q^T omega_i
    t = zd @ od.T  # [k, k]: t[j, i] = (A q_j) . omega_i
    s = torch.linalg.inv(rd).T
    s = s / s.norm(dim=0, keepdim=True)
    d = (od * yd).sum(1)  # omega_i . A omega_i
    hs = h @ s
    shs = (s * hs).sum(0)
    hw = h @ w
    c = (s * w).sum(0)
    trace_proj = torch.trace(h) - shs
    r_a_r = d - (t * w).sum(0) - (w * rd).sum(0) + (w * hw).sum(0)
    cross = (s * (rd - hw)).sum(0)
    samples = trace_proj + r_a_r + 2 * c * cross + c * c * shs
    mean, err = mean_stderr(samples)
    return mean, err, samples
