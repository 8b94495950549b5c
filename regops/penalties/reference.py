"""The penalties family's references: pure PyTorch, any device, with the ops' exact signatures.

* ``relu_l1``: ReLU / ReLU^2 / FATReLU with the sparsity statistics of the same activations; its backward adds
  the gradient of ``l1 * sum(activation)``.
* ``power_iteration``: power iteration on a group of same-shape matrices, warm-started from ``v``.
* ``orthogonality_penalty``: ``||G - I||_F^2`` with ``G`` the Gram matrix of the smaller side.
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype

EPS = 1e-12


# ------------------------------------------------------------------------------------------------ relu_l1
def activation(xc: torch.Tensor, threshold: float, squared: bool) -> torch.Tensor:
    """``0`` where ``x <= threshold``, else ``x`` (``x^2`` when squared); NaN passes through, as ``torch.relu``."""
    return torch.where(xc <= threshold, 0.0, xc * xc if squared else xc)


def relu_l1(
    x: torch.Tensor, l1: torch.Tensor, threshold: float, squared: bool, stats: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, token_active, unit_active, activation_sum)``; the statistics are empty unless ``stats``.

    ``token_active[...]``: fraction of the ``d`` units with ``x > threshold`` in each row (x's leading shape);
    ``unit_active[d]``: fraction of rows in which each unit is active; ``activation_sum``: ``sum(y)``. All in
    float32 (float64 for float64)."""
    cd = acc_dtype(x)
    xc = x.to(cd)
    y = activation(xc, threshold, squared).to(x.dtype)
    if not stats:
        empty = x.new_empty(0, dtype=cd)
        return y, empty, empty.clone(), empty.clone()
    on = (xc > threshold).to(cd)
    return y, on.mean(-1), on.reshape(-1, x.shape[-1]).mean(0), y.to(cd).sum()


def relu_l1_grad(g: torch.Tensor, x: torch.Tensor, l1: float | torch.Tensor, threshold: float, squared: bool):
    """``(g + l1) * d act / dx`` in the accumulation dtype (differentiable in g, x and a tensor l1)."""
    cd = acc_dtype(x)
    xc = x.to(cd)
    on = (xc > threshold).to(cd)
    return (g.to(cd) + l1) * ((xc + xc) * on if squared else on)


def relu_l1_backward(grad: torch.Tensor, x: torch.Tensor, l1: torch.Tensor, threshold: float, squared: bool):
    return relu_l1_grad(grad, x, float(l1.item()), threshold, squared).to(x.dtype)


# ------------------------------------------------------------------------------------------------ spectral norms
def power_iteration(
    weights: list[torch.Tensor], v: torch.Tensor, num_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_iters`` steps of ``u = normalize(W v); z = W^T u; sigma = ||z||; v = z / sigma`` per matrix.

    Args: weights ``G`` matrices ``[m, n]``; ``v [G, n]`` the starting vectors (any norm). Returns
    ``(sigma [G], u [G, m], v [G, n])`` in float32 (float64 for float64): ``sigma = u^T W v`` exactly in exact
    arithmetic, the largest singular value when converged."""
    cd = acc_dtype(*weights, v)
    sigmas, us, vs = [], [], []
    for g, w in enumerate(weights):
        wc = w.to(cd)
        vg = v[g].to(cd)
        vg = vg / vg.norm().clamp_min(EPS)
        for _ in range(num_iters):
            u = wc @ vg
            u = u / u.norm().clamp_min(EPS)
            z = wc.mT @ u
            sigma = z.norm()
            vg = z / sigma.clamp_min(EPS)
        sigmas.append(sigma)
        us.append(u)
        vs.append(vg)
    return torch.stack(sigmas), torch.stack(us), torch.stack(vs)


# ------------------------------------------------------------------------------------------------ orthogonality
def gram_minus_identity(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(G - I, rows)``: the Gram matrix of the smaller side of ``w [..., m, n]`` (``W W^T`` when ``m <= n``, else
    ``W^T W``) in the accumulation dtype, minus the identity (in place: one ``k x k`` matrix)."""
    wc = w.to(acc_dtype(w))
    rows = w.shape[-2] <= w.shape[-1]
    g = wc @ wc.mT if rows else wc.mT @ wc
    g.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return g, rows


def orthogonality_penalty(w: torch.Tensor) -> torch.Tensor:
    """``||G - I||_F^2`` per matrix of ``w [..., m, n]`` (shape ``[...]``, float32 or float64)."""
    g, _ = gram_minus_identity(w)
    return (g * g).sum((-2, -1))


def orthogonality_penalty_backward(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``4 (W W^T - I) W`` (``4 W (W^T W - I)`` when ``m > n``) times the output gradient, in w's dtype."""
    g, rows = gram_minus_identity(w)
    wc = w.to(g.dtype)
    dw = g @ wc if rows else wc @ g
    return (dw * (4.0 * grad.to(g.dtype))[..., None, None]).to(w.dtype)
