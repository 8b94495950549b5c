"""Helpers shared by the losses tests: the cross-entropy written out densely in float64 (independent of regops'
code) and small seeded inputs."""

from __future__ import annotations

import torch

F64 = torch.float64


def eager_rows(x, index, t, *, row_w=None, cw=None, a=0.0, m=0.0, l=0.0, b=0.0, eta=0.0, cap=None, s=1.0):
    """The regularized cross-entropy of regops.losses.reference's docstring, written densely in float64 with autograd
    (independent of regops' code)."""
    z = x * s
    if cap:
        z = cap * torch.tanh(z / cap)
    n, k = z.shape
    lse = torch.logsumexp(z, 1)
    lp = z - lse[:, None]
    p = lp.exp()
    has_cw = cw is not None
    cw = cw if has_cw else torch.ones(k, dtype=z.dtype)
    omega = t * cw[index]
    ce = -(omega * lp.gather(1, index)).sum(1)
    u = -(lp * cw).sum(1) / k
    c_row = omega.sum(1) if has_cw else torch.ones(n, dtype=z.dtype)
    ent = -(p * lp).sum(1)
    reg = m * (z.max(1).values - z.mean(1)) + l * lse**2 - b * ent
    if eta:
        ia, ib = index[:, 0], index[:, 1]
        cols = torch.arange(k)[None]
        keep = (cols != ia[:, None]) & (cols != ib[:, None])
        z_rest = torch.where(keep, z, float("-inf"))
        za, zb = z.gather(1, index[:, :1]), z.gather(1, index[:, 1:2])
        log_qa = torch.logsumexp(torch.cat([za, z_rest], 1), 1)  # log(e^{z_a} + R)
        log_qb = torch.logsumexp(torch.cat([zb, z_rest], 1), 1)
        reg = reg + eta * (t[:, 0] * (log_qa - za[:, 0]) + t[:, 1] * (log_qb - zb[:, 0]))
    row = (1 - a) * ce + a * u + c_row * reg
    return row if row_w is None else row * row_w


def data(n=6, k=11, seed=0, dtype=F64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, k, generator=g)).to(dtype).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g)
    return x, y, g


def grad_of(out, x):
    return torch.autograd.grad(out, x)[0]
